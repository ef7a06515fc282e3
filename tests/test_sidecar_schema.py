"""The sidecar is a published JSON Schema (draft 2020-12): `photoenhanced schema sidecar` prints it,
the sidecars we write validate against it, and it refuses what a consumer must not see."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from jsonschema import Draft202012Validator

from _schema import assert_valid_sidecar, errors
from conftest import ROOT, make_jpeg, write_config
from fake_enhancer import factory
from watcher import config as config_mod
from watcher import oneoff, sidecar


def test_schema_verb_prints_the_shipped_draft_2020_12_schema_without_a_config(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PHOTOENHANCED_CONFIG"}
    env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run([sys.executable, "-m", "watcher.cli", "schema", "sidecar"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    printed = json.loads(r.stdout)
    assert printed == sidecar.schema()
    assert printed["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(printed)              # a valid schema of its own draft
    assert printed["properties"]["schema"]["const"] == sidecar.SCHEMA
    bad = subprocess.run([sys.executable, "-m", "watcher.cli", "schema", "nope"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2


def _done(**over) -> dict:
    doc = sidecar.build("done", job=3, path="a/b.jpg", size=10, sha256="0" * 64, now=0.0,
                        eff={"profile": "upscale", "upscale": 2, "scale": 2.0, "key": "k"},
                        timings={"decode": 1.0, "total": 2.0})
    doc.update({"outputs": [{"path": "/o/a/b.jpg", "bytes": 5, "sha256": "1" * 64, "width": 4, "height": 2}],
                "faces": 0, "models": [{"name": "m", "sha256": None, "source": None}], "device": "cpu",
                "metadata": {"blocks": {"exif": {"action": "kept"}}, "provenance": False}})
    doc.update(over)
    return doc


def test_rendered_sidecars_validate_even_with_undecodable_names():
    name = os.fsdecode(b"caf\xe9\n.jpg")                  # a name with a lone surrogate and a newline
    doc = _done()
    doc["input"]["path"] = "a/" + name
    doc["outputs"][0]["path"] = "/o/a/" + name
    rendered = json.loads(sidecar.render(doc))
    assert "path_b64" in rendered["input"] and "path_b64" in rendered["outputs"][0]
    assert_valid_sidecar(rendered)
    failed = sidecar.build("failed", job=4, path="x.png", size=3, sha256="2" * 64, now=0.0)
    failed.update({"error": {"kind": "undecodable", "message": "x.png: not an image"}, "original": "/f/x.png"})
    assert_valid_sidecar(json.loads(sidecar.render(failed)))


def test_schema_refuses_what_a_consumer_must_not_see():
    assert errors(_done()) == []
    assert any("status" in e for e in errors(_done(status="finished")))
    assert errors(_done(outputs=[]))                                   # done without a result
    no_error = sidecar.build("failed", job=1, path="x", size=1, sha256="3" * 64, now=0.0)
    assert any("'error' is a required property" in e for e in errors(no_error))
    assert errors(_done(metadata={"blocks": {"exif": {"action": "lost"}}, "provenance": True}))
    assert errors(_done(metadata={"blocks": {"sound": {"action": "kept"}}, "provenance": True}))
    bad_sha = _done()
    bad_sha["input"]["sha256"] = "xyz"
    assert errors(bad_sha)


def test_one_off_enhance_sidecar_validates_and_lists_the_metadata(tmp_path):
    cfg = config_mod.load(write_config(tmp_path, enhance={"profile": "upscale", "upscale": 2}))
    src = make_jpeg(tmp_path / "in.jpg", seed=3)
    assert oneoff.enhance_paths(cfg, src, tmp_path / "out.jpg", None, None, factory=factory) == 0
    doc = assert_valid_sidecar(tmp_path / "out.jpg.json")
    assert doc["job"] is None and doc["metadata"]["provenance"] is True
    assert doc["metadata"]["blocks"]["provenance"]["action"] == "added"
