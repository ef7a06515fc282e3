"""Rebuild a lost queue's finished rows from the sidecars in outbox/ and failed/.

After a corrupt queue file was moved aside (queue.open_queue / Queue.quarantine), the folders are
the record: every `outbox/REL/RESULT.json` with `"status": "done"` and every
`failed/REL/ORIGINAL.json` with `"status": "failed"` becomes a done/failed row with the sidecar's
job id, so finished work is recognised (never redone, never duplicated) and new ids continue above
the old ones. Files still in the inbox are found again by discovery and queued as usual.

Read only: nothing is moved, written or followed. Symlinks are never followed, temp folders are
skipped, a sidecar is read with O_NOFOLLOW|O_NONBLOCK, only when it is a regular file, and at most
SIDECAR_MAX bytes. SQL stays in watcher.queue (`Queue.insert_finished`).
"""
from __future__ import annotations

import base64
import binascii
import json
import os
import re
import stat
from datetime import datetime
from pathlib import Path
from typing import Iterator

import structlog

from . import names
from .publish import TMP_DIR
from .queue import DONE, FAILED, Finished, Queue

log = structlog.get_logger(__name__)

SIDECAR_MAX = 1 << 20           # bytes; a photoenhanced sidecar is a few kB
PATH_MAX = 4096
_BATCH = 500                    # rows per transaction
_SHA256 = re.compile(r"[0-9a-f]{64}")


def rebuild(queue: Queue, outbox: Path, failed: Path, *, now: float) -> dict:
    """Insert a finished row for every photoenhanced sidecar below `outbox` (done) and `failed`
    (failed). Returns {"done": n, "failed": n, "skipped": n}; `skipped` counts *.json files that
    are not usable sidecars (unreadable, too big, not JSON, not ours, wrong folder, id already in
    the queue)."""
    stats = {DONE: 0, FAILED: 0, "skipped": 0}
    batch: list[Finished] = []
    seen: set[int] = set()

    def flush() -> None:
        inserted = set(queue.insert_finished(batch, now=now))
        for row in batch:
            if row.id in inserted:
                stats[row.state] += 1
            else:
                stats["skipped"] += 1
                log.warning("rebuild.skipped", path=names.display(row.outputs[0]["path"]) if row.outputs else None,
                            job=row.id, reason="job id already in the queue")
        batch.clear()

    for root, status in ((Path(outbox), DONE), (Path(failed), FAILED)):
        for path in _sidecar_files(root):
            row, why = _row(path, status, now)
            if row is not None and row.id in seen:
                row, why = None, f"job id {row.id} already rebuilt from another sidecar"
            if row is None:
                stats["skipped"] += 1
                if why:
                    log.warning("rebuild.skipped", path=names.display(str(path)), reason=why)
                continue
            seen.add(row.id)
            batch.append(row)
            if len(batch) >= _BATCH:
                flush()
    if batch:
        flush()
    log.info("rebuild.done", **stats)
    return stats


def _sidecar_files(root: Path) -> Iterator[Path]:
    """`*.json` regular files below root (lstat: links and special files are not sidecars), sorted,
    without descending into symlinks or the temp folder."""
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            log.warning("rebuild.unreadable", path=names.display(str(folder)), error=exc.strerror)
            continue
        subdirs = []
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    if entry.name != TMP_DIR:
                        subdirs.append(Path(entry.path))
                elif entry.name.endswith(".json") and entry.is_file(follow_symlinks=False):
                    yield Path(entry.path)
            except OSError:
                continue
        stack.extend(reversed(subdirs))


def _read(path: Path) -> tuple[object | None, str]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        return None, f"cannot open: {exc.strerror}"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, "not a regular file"
        if st.st_size > SIDECAR_MAX:
            return None, f"larger than {SIDECAR_MAX} bytes"
        chunks, total = [], 0
        while total <= SIDECAR_MAX:
            chunk = os.read(fd, min(65536, SIDECAR_MAX + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > SIDECAR_MAX:
            return None, f"larger than {SIDECAR_MAX} bytes"
    except OSError as exc:
        return None, f"cannot read: {exc.strerror}"
    finally:
        os.close(fd)
    try:
        return json.loads(b"".join(chunks)), ""
    except (ValueError, RecursionError) as exc:
        return None, f"not JSON: {str(exc)[:200]}"


def _name(d: dict, key: str) -> str | None:
    """The real name under `key`: from `<key>_b64` (exact bytes) when present, else the plain value.
    None when missing or malformed."""
    b64 = d.get(key + "_b64")
    if b64 is not None:
        if not isinstance(b64, str) or len(b64) > 2 * PATH_MAX:
            return None
        try:
            raw = base64.b64decode(b64 + "=" * (-len(b64) % 4), altchars=b"-_", validate=True)
        except (binascii.Error, ValueError):
            return None
        return os.fsdecode(raw)
    value = d.get(key)
    return value if isinstance(value, str) else None


def _safe_rel(rel: str) -> bool:
    """A relative path below a folder: no absolute path, no `..`, `.` or empty parts, no NUL."""
    if not rel or "\0" in rel or rel.startswith("/") or len(os.fsencode(rel)) > PATH_MAX:
        return False
    return all(part not in ("", ".", "..") for part in rel.split("/"))


def _int(v: object, default: int = 0) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else default


def _time(v: object, default: float) -> float:
    if isinstance(v, str):
        try:
            return datetime.fromisoformat(v).timestamp()
        except ValueError:
            pass
    return default


def _row(path: Path, status: str, now: float) -> tuple[Finished | None, str]:
    """The finished row a sidecar stands for, or (None, why); why is "" for JSON that is not ours."""
    doc, why = _read(path)
    if doc is None:
        return None, why
    if not isinstance(doc, dict) or "status" not in doc or "job" not in doc or not isinstance(doc.get("input"), dict):
        return None, ""                     # some other JSON file: not a photoenhanced sidecar
    if doc["status"] != status:
        return None, f"status {str(doc['status'])[:20]!r} in the {status} folder"
    job = doc["job"]
    if not isinstance(job, int) or isinstance(job, bool) or not 0 < job < 2 ** 62:
        return None, "no job id"
    inp = doc["input"]
    rel = _name(inp, "path")
    if rel is None or not _safe_rel(rel):
        return None, "no usable input.path"
    sha = inp.get("sha256")
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        return None, "no input.sha256"
    beside = str(path)[: -len(".json")]     # the result (outbox) or the original (failed) it describes
    params = doc.get("params") if isinstance(doc.get("params"), dict) else {}
    record: dict = {"rebuilt": True}
    if isinstance(params.get("key"), str):
        record["key"] = params["key"]
    error_kind = last_error = None
    if status == DONE:
        outs = doc.get("outputs")
        first = outs[0] if isinstance(outs, list) and outs and isinstance(outs[0], dict) else {}
        out = {k: first[k] for k in ("bytes", "sha256", "width", "height", "format", "pages")
               if isinstance(first.get(k), (int, str)) and not isinstance(first.get(k), bool)}
        outputs = [{**out, "path": beside}]
        if isinstance(doc.get("faces"), int):
            record["faces"] = doc["faces"]
        if isinstance(doc.get("models"), list):
            record["models_used"] = doc["models"]
    else:
        outputs = [{"path": beside}]
        err = doc.get("error") if isinstance(doc.get("error"), dict) else {}
        error_kind = str(err.get("kind") or "unknown")[:64]
        last_error = str(err.get("message") or "")[:2000]
    dup = doc.get("duplicate_of")
    return Finished(
        id=job, rel_path=rel, state=status, size=_int(inp.get("bytes")), mtime_ns=_int(inp.get("mtime_ns")),
        sha256=sha, outputs=outputs, params=record,
        profile=doc["profile"][:64] if isinstance(doc.get("profile"), str) else None,
        error_kind=error_kind, last_error=last_error, attempts=_int(doc.get("attempts")),
        interruptions=_int(doc.get("interruptions")),
        duplicate_of=dup if isinstance(dup, int) and not isinstance(dup, bool) else None,
        finished=_time(doc.get("created"), now)), ""
