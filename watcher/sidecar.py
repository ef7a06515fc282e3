"""The photo's JSON sidecar: one builder for the daemon's worker and the one-off `enhance` verb.

Inside the program a sidecar is a dict whose names (input path, output paths, the original in
failed/, companions, original_name) are real file names (os.fsdecode form). `render()` turns it
into bytes for the file: every name through `names.fields` (a printable escaped form, plus
`<key>_b64` with the exact bytes when the two differ), so any name gives valid, one-line-per-key
JSON that strict parsers accept.
"""
from __future__ import annotations

import hashlib
import json
import platform
from datetime import datetime, timezone
from importlib import metadata, resources

from . import names

SCHEMA = 1          # the `schema` field; watcher/schemas/sidecar.schema.json describes it
_VERSIONS: dict[str, str] | None = None


def versions() -> dict[str, str]:
    global _VERSIONS
    if _VERSIONS is None:
        out = {"python": platform.python_version()}
        for dist in ("photoenhanced", "torch", "torchvision", "numpy", "pillow", "opencv-python-headless",
                     "basicsr", "gfpgan", "realesrgan", "facexlib"):
            try:
                out[dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                continue
        _VERSIONS = out
    return dict(_VERSIONS)


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def build(status: str, *, job: int | None, path: str, size: int, sha256: str, now: float,
          mtime_ns: int | None = None, info=None, eff: dict | None = None, timings: dict | None = None,
          attempts: int = 1, interruptions: int = 0) -> dict:
    """The common part of every sidecar (done and failed)."""
    inp: dict = {"path": path, "bytes": size, "sha256": sha256}
    if mtime_ns is not None:
        inp["mtime_ns"] = mtime_ns
    if info is not None:
        inp.update({"width": info.width, "height": info.height, "format": info.format, "pages": info.pages})
    params = {k: v for k, v in (eff or {}).items() if k != "key"}
    if eff and eff.get("key"):
        params["key"] = eff["key"]
    return {"schema": SCHEMA, "status": status, "job": job, "input": inp,
            "profile": (eff or {}).get("profile"), "params": params, "timings_ms": timings or {},
            "attempts": attempts, "interruptions": interruptions, "versions": versions(), "created": iso(now)}


def _named(d: dict, key: str) -> dict:
    v = d.get(key)
    if not isinstance(v, str):
        return d
    out = {k: x for k, x in d.items() if k != key}
    out.update(names.fields(v, key))
    return out


def encodable(doc: dict) -> dict:
    """A copy of the sidecar with every name in its escaped form (+ `_b64` where needed)."""
    out = dict(doc)
    if isinstance(out.get("input"), dict):
        out["input"] = _named(out["input"], "path")
    if isinstance(out.get("outputs"), list):
        out["outputs"] = [_named(o, "path") if isinstance(o, dict) else o for o in out["outputs"]]
    for key in ("original", "original_name"):
        out = _named(out, key)
    if isinstance(out.get("companions"), list):
        out["companions"] = [names.display(c) if isinstance(c, str) else c for c in out["companions"]]
    if isinstance(out.get("error"), dict) and isinstance(out["error"].get("message"), str):
        out["error"] = {**out["error"], "message": names.safe(out["error"]["message"])}
    return out


def render(doc: dict) -> bytes:
    return (json.dumps(encodable(doc), indent=2) + "\n").encode()


# --- metadata of the photo (the `metadata` block) and the provenance stamp ----------------------

def schema_text() -> str:
    """The sidecar's JSON Schema (draft 2020-12), as shipped in the package."""
    return resources.files(__package__).joinpath("schemas/sidecar.schema.json").read_text("utf-8")


def schema() -> dict:
    return json.loads(schema_text())


def metadata_block(notes: list[dict]) -> dict:
    """The sidecar's `metadata`: per block of the original, kept/converted/trimmed/dropped (+ why),
    and whether the provenance stamp was added. `notes` come from imageio.decode/encode."""
    from enhancer.metadata import summary
    return summary(notes)


def provenance(source: bytes, eff: dict, now: float):
    """The stamp for one result (enhancer.metadata.Provenance): this version, the effective
    parameters in one line, when, and the original's sha256."""
    from enhancer.metadata import Provenance
    m = eff.get("models") or {}
    parts = [f"profile={eff.get('profile')}", f"scale={eff.get('scale', eff.get('upscale'))}"]
    parts += [f"{k}={v}" for k, v in m.items() if v] if isinstance(m, dict) else []
    return Provenance(software=f"photoenhanced {versions().get('photoenhanced', '0')}", when=now,
                      parameters=" ".join(parts), original_sha256=hashlib.sha256(source).hexdigest())
