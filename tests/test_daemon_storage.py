"""The real daemon and its own storage and crashes: a corrupt queue file is moved aside and rebuilt
from the folders (finished work recognised by its sidecars, never redone or duplicated); a crash of
the worker thread ends the process non-zero, so systemd's Restart=on-failure restarts it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import PY, ROOT, cli, make_jpeg, wait_for, write_config

_CRASHING = r"""
import sys
sys.path.insert(0, {tests!r})
from fake_enhancer import FakeEnhancer
from watcher.daemon import main

class Exits(FakeEnhancer):
    def enhance(self, image, params, progress=None):
        sys.exit(0)          # a library that calls sys.exit() in the middle of a job

sys.exit(main(sys.argv[1:], enhancer_factory=lambda settings: Exits()))
"""


def _sidecars(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.json") if ".photoenhanced-tmp" not in p.parts)


def test_a_crash_of_the_worker_thread_exits_non_zero(tmp_path):
    cfg = write_config(tmp_path)
    script = tmp_path / "crashing.py"
    script.write_text(_CRASHING.format(tests=str(ROOT / "tests")))
    make_jpeg(tmp_path / "inbox" / "x.jpg")
    r = subprocess.run([PY, str(script), "--config", str(cfg), "--log-format", "json", "run"],
                       capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode != 0, r.stdout[-2000:]
    events = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert any(e["event"] == "worker.crashed" for e in events)
    assert (tmp_path / "inbox" / "x.jpg").exists()           # nothing lost: the job is still queued
    assert json.loads(cli(cfg, "list", "--json").stdout)[0]["state"] in ("running", "pending")


def test_a_corrupt_queue_is_moved_aside_and_rebuilt_without_redoing_finished_work(tmp_path, daemon_factory):
    cfg = write_config(tmp_path)
    for i in range(3):
        make_jpeg(tmp_path / "inbox" / f"p{i}.jpg", seed=i)
    d = daemon_factory(cfg)
    wait_for(lambda: len(_sidecars(tmp_path / "outbox")) == 3, 30, what="3 done")
    assert d.stop() == 0
    # a publish cut short before its archive step: result + sidecar in outbox, original still in the inbox
    arch = tmp_path / "archive" / "p1.jpg"
    st = arch.stat()
    os.rename(arch, tmp_path / "inbox" / "p1.jpg")
    os.utime(tmp_path / "inbox" / "p1.jpg", ns=(st.st_atime_ns, st.st_mtime_ns))
    queue = tmp_path / "state" / "queue.sqlite3"
    data = bytearray(queue.read_bytes())
    data[100:4096 * 2] = os.urandom(4096 * 2 - 100)         # header and first pages destroyed
    queue.write_bytes(bytes(data))
    for suffix in ("-wal", "-shm"):
        Path(f"{queue}{suffix}").unlink(missing_ok=True)
    make_jpeg(tmp_path / "inbox" / "new.jpg", seed=9)
    d = daemon_factory(cfg)
    d.wait_event("queue.corrupt", 30)
    wait_for(lambda: not any(p.is_file() for p in (tmp_path / "inbox").rglob("*")), 30, what="inbox empty")
    wait_for(lambda: len(_sidecars(tmp_path / "outbox")) == 4, 30, what="new photo done")
    assert d.stop() == 0
    moved = list((tmp_path / "state").glob("queue.sqlite3.corrupt-*"))
    assert moved and any(m.name.endswith(tuple("0123456789Z")) for m in moved)
    outs = sorted(p.name for p in (tmp_path / "outbox").iterdir() if p.is_file())
    assert outs == ["new.jpg", "new.jpg.json", "p0.jpg", "p0.jpg.json", "p1.jpg", "p1.jpg.json",
                    "p2.jpg", "p2.jpg.json"]                    # nothing redone, nothing duplicated
    assert sorted(p.name for p in (tmp_path / "archive").iterdir() if p.is_file()) == ["new.jpg", "p0.jpg", "p1.jpg", "p2.jpg"]
    jobs = json.loads(cli(cfg, "list", "--json").stdout)
    assert {j["path"] for j in jobs if j["state"] == "done"} >= {"p0.jpg", "p1.jpg", "p2.jpg", "new.jpg"}
    ids = [j["id"] for j in jobs]
    assert len(ids) == len(set(ids))
