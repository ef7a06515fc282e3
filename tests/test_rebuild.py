"""watcher/rebuild.py: a lost queue's finished rows come back from real sidecar files on disk.

Sidecars are written into tmp folders the way the product lays them out (outbox/REL/RESULT.json,
failed/REL/ORIGINAL.json), by hand (the on-disk contract) and through watcher.sidecar (the real
builder); the queue is a real SQLite file. No mocks.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

import pytest
import structlog

from watcher import sidecar as sidecars
from watcher.queue import DONE, FAILED, PENDING, Queue, open_queue
from watcher.rebuild import SIDECAR_MAX, rebuild

T0 = 1_800_000_000.0


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode()


@pytest.fixture
def folders(tmp_path):
    out, failed = tmp_path / "outbox", tmp_path / "failed"
    out.mkdir()
    failed.mkdir()
    (tmp_path / "state").mkdir()
    queue = Queue(tmp_path / "state" / "queue.sqlite3")
    yield queue, out, failed
    queue.close()


def put(root: Path, rel: bytes, doc: dict | bytes, content: bytes = b"img") -> str:
    """Write the file `root/rel` and its sidecar `root/rel.json`; returns the file's path (str)."""
    full = os.path.join(os.fsencode(root), rel)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    with open(full, "wb") as f:
        f.write(content)
    with open(full + b".json", "wb") as f:
        f.write(doc if isinstance(doc, bytes) else json.dumps(doc, indent=2).encode())
    return os.fsdecode(full)


def done_doc(job: int, rel: bytes, **over) -> dict:
    inp = {"path": os.fsdecode(rel).encode("utf-8", "backslashreplace").decode(), "bytes": 1234,
           "sha256": sha(rel), "mtime_ns": 99}
    if inp["path"] != os.fsdecode(rel):
        inp["path_b64"] = b64(rel)
    doc = {"schema": 1, "status": "done", "job": job, "input": inp, "profile": "faces",
           "params": {"profile": "faces", "key": "faces:2"}, "outputs": [{"path": "/old/outbox/x", "bytes": 3,
                                                                           "sha256": sha(b"img"), "width": 2}],
           "faces": 1, "models": [{"name": "gfpgan", "sha256": "0" * 64}], "attempts": 2, "interruptions": 1,
           "created": "2026-12-01T10:00:00+00:00"}
    doc.update(over)
    return doc


def failed_doc(job: int, rel: bytes, **over) -> dict:
    doc = done_doc(job, rel, status="failed", error={"kind": "undecodable", "message": "cannot identify image"})
    doc.pop("outputs")
    doc.update(over)
    return doc


def test_done_and_failed_sidecars_become_rows_with_their_ids(folders):
    queue, out, failed = folders
    a = put(out, b"a/b/IMG_1.jpg", done_doc(5, b"a/b/IMG_1.jpg"))
    odd = b"sub/caf\xe9\nname.png"
    b = put(out, odd, done_doc(9, odd))
    c = put(failed, b"broken.jpg", failed_doc(12, b"broken.jpg"))
    stats = rebuild(queue, out, failed, now=T0)
    assert stats == {"done": 2, "failed": 1, "skipped": 0}
    j5, j9, j12 = queue.get(5), queue.get(9), queue.get(12)
    assert (j5.state, j5.rel_path, j5.size, j5.mtime_ns, j5.sha256) == (DONE, "a/b/IMG_1.jpg", 1234, 99,
                                                                       sha(b"a/b/IMG_1.jpg"))
    assert j5.outputs == [{"path": a, "bytes": 3, "sha256": sha(b"img"), "width": 2}]
    assert j5.params["key"] == "faces:2" and j5.params["rebuilt"] is True
    assert (j5.attempts, j5.interruptions, j5.profile) == (2, 1, "faces")
    assert j9.rel_path == os.fsdecode(odd) and j9.outputs[0]["path"] == b       # real bytes from path_b64
    assert (j12.state, j12.error_kind, j12.last_error) == (FAILED, "undecodable", "cannot identify image")
    assert j12.outputs == [{"path": c}] and j12.params == {"key": "faces:2", "rebuilt": True}
    assert queue.enqueue("new.jpg", 1, 1, "s", now=T0).id == 13                # ids continue above
    assert queue.rebuilt_done(os.fsdecode(odd), sha(odd)).id == 9
    assert queue.done_with(sha(b"a/b/IMG_1.jpg"), "faces:2").id == 5


def test_sidecars_from_the_real_builder_round_trip_hostile_names(folders):
    queue, out, failed = folders
    names = [b"new\nline.jpg", b"\xff\xfe.jpg", b"-dash \x01.jpg", "emoji \U0001f4f7.jpg".encode(), b"x" * 246 + b".jpg"]             # 250 bytes: + ".json" = NAME_MAX
    for i, raw in enumerate(names, start=1):
        rel = os.fsdecode(raw)
        doc = sidecars.build("done", job=i, path=rel, size=10 + i, sha256=sha(raw), now=T0, mtime_ns=7,
                             eff={"profile": "upscale", "key": "up:2"})
        doc["outputs"] = [{"path": str(out / rel), "bytes": 1, "sha256": sha(b"img")}]
        put(out, raw, sidecars.render(doc))
    assert rebuild(queue, out, failed, now=T0) == {"done": len(names), "failed": 0, "skipped": 0}
    assert [j.rel_path for j in queue.jobs()] == [os.fsdecode(n) for n in names]
    assert all(j.params == {"key": "up:2", "rebuilt": True} and j.mtime_ns == 7 for j in queue.jobs())


def test_what_is_not_a_usable_sidecar_is_skipped_and_never_followed(folders, tmp_path):
    queue, out, failed = folders
    outside = tmp_path / "outside"
    outside.mkdir()
    put(outside, b"secret.jpg", done_doc(70, b"secret.jpg"))
    os.symlink(outside / "secret.jpg.json", out / "link.jpg.json")            # a symlinked sidecar
    os.symlink(outside, out / "linked-dir")                                     # a symlinked folder
    put(out / ".photoenhanced-tmp", b"t.jpg", done_doc(71, b"t.jpg"))           # temp files
    os.mkfifo(out / "fifo.jpg.json")                                            # would block a plain open
    put(out, b"junk.jpg", b"{not json")
    put(out, b"deep.jpg", b"[" * 100_000 + b"]" * 100_000)                      # nesting past the recursion limit
    put(out, b"huge.jpg", b'{"pad": "' + b"x" * SIDECAR_MAX + b'"}')
    put(out, b"foreign.jpg", {"title": "someone else's JSON"})
    put(out, b"escape.jpg", done_doc(72, b"../../etc/passwd"))
    put(out, b"abs.jpg", done_doc(73, b"x", input={"path": "/etc/passwd", "sha256": "a" * 64}))
    put(out, b"noid.jpg", done_doc(True, b"noid.jpg"))
    put(out, b"nosha.jpg", done_doc(74, b"nosha.jpg", input={"path": "nosha.jpg", "sha256": "zz"}))
    put(out, b"badb64.jpg", done_doc(75, b"b.jpg", input={"path": "b.jpg", "path_b64": "!!", "sha256": "a" * 64}))
    put(failed, b"wrong-folder.jpg", done_doc(76, b"wrong-folder.jpg"))
    put(out, b"good.jpg", done_doc(80, b"good.jpg"))
    put(failed, b"good.jpg", failed_doc(80, b"good.jpg"))                       # same id twice: the first wins
    with structlog.testing.capture_logs() as logs:
        stats = rebuild(queue, out, failed, now=T0)
    assert stats == {"done": 1, "failed": 0, "skipped": 11}
    assert [(j.id, j.state) for j in queue.jobs()] == [(80, DONE)]
    reasons = {e["path"].rsplit("/", 1)[-1]: e["reason"] for e in logs if e["event"] == "rebuild.skipped"}
    assert reasons["junk.jpg.json"].startswith("not JSON") and reasons["deep.jpg.json"].startswith("not JSON")
    assert "larger than" in reasons["huge.jpg.json"] and "foreign.jpg.json" not in reasons
    assert "wrong-folder.jpg.json" in reasons and "already rebuilt" in reasons["good.jpg.json"]
    assert [e for e in logs if e["event"] == "rebuild.done"][0]["skipped"] == 11


def test_an_id_already_in_the_queue_is_kept_and_counted_skipped(folders):
    queue, out, failed = folders
    job = queue.enqueue("pending.jpg", 1, 1, "s", now=T0)
    put(out, b"other.jpg", done_doc(job.id, b"other.jpg"))
    assert rebuild(queue, out, failed, now=T0) == {"done": 0, "failed": 0, "skipped": 1}
    assert queue.get(job.id).state == PENDING and queue.get(job.id).rel_path == "pending.jpg"


def test_missing_folders_rebuild_nothing(folders, tmp_path):
    queue, _, _ = folders
    assert rebuild(queue, tmp_path / "nope", tmp_path / "gone", now=T0) == {"done": 0, "failed": 0, "skipped": 0}
    assert queue.jobs() == []


def test_a_quarantined_queue_is_rebuilt_from_its_folders(tmp_path):
    """The whole path: jobs finished, the file corrupted, open_queue moves it aside, rebuild."""
    out, failed, state = tmp_path / "outbox", tmp_path / "failed", tmp_path / "state"
    state.mkdir()
    queue = Queue(state / "queue.sqlite3")
    for i in range(1, 31):
        rel = f"d/IMG_{i}.jpg".encode()
        job = queue.enqueue(os.fsdecode(rel), 1, 1, sha(rel), now=T0)
        queue.claim(now=T0)
        if i % 3:
            path = put(out, rel, done_doc(job.id, rel))
            queue.finish(job.id, [{"path": path}], now=T0)
        else:
            path = put(failed, rel, failed_doc(job.id, rel))
            queue.fail(job.id, "undecodable", "x", outputs=[{"path": path}], now=T0)
    queue.enqueue("still/pending.jpg", 1, 1, "s", now=T0)
    queue.close()
    (state / "queue.sqlite3").write_bytes(os.urandom(8192))
    queue, moved = open_queue(state / "queue.sqlite3", now=T0)
    try:
        assert moved is not None and moved.exists()
        assert rebuild(queue, out, failed, now=T0) == {"done": 20, "failed": 10, "skipped": 0}
        assert [j.id for j in queue.jobs()] == list(range(1, 31))
        assert all(queue.rebuilt_done(j.rel_path, j.sha256) for j in queue.jobs(DONE))
        assert queue.enqueue("still/pending.jpg", 1, 1, "s", now=T0).id == 31    # lost pending: found again by discovery
    finally:
        queue.close()
