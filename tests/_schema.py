"""Validate sidecars against the published JSON Schema (watcher/schemas/sidecar.schema.json).

    from _schema import assert_valid_sidecar
    assert_valid_sidecar(path_or_dict)     # raises AssertionError listing every violation
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

from jsonschema import Draft202012Validator


@functools.cache
def validator() -> Draft202012Validator:
    from watcher import sidecar
    schema = sidecar.schema()
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def errors(doc: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
            for e in validator().iter_errors(doc)]


def assert_valid_sidecar(doc: dict | Path | str) -> dict:
    """The sidecar (a dict, or the path of its .json file) validates; returns the dict."""
    if not isinstance(doc, dict):
        doc = json.loads(Path(doc).read_text())
    problems = errors(doc)
    assert not problems, "sidecar does not validate against the schema:\n  " + "\n  ".join(problems)
    return doc
