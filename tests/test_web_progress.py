"""The pieces behind the dashboard's progress and enqueue-now, without a server: the pipeline's
per-tile report, the fake enhancer's, `hosts` in control.status (one document for `/api/status`
and `status --json`), and control.inbox_rel / control.enqueue on a real SQLite queue."""
from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import make_jpeg, write_config
from enhancer.api import Params
from fake_enhancer import FakeEnhancer
from watcher import config as config_mod
from watcher import control, intake
from watcher.queue import Queue


def test_stream_upscale_reports_each_tile_of_the_total():
    from enhancer import pipeline, tiles
    img = np.random.default_rng(3).random((40, 56, 3)).astype(np.float32)
    out = np.empty((80, 112, 3), np.float32)
    seen: list[dict] = []
    used = pipeline.stream_upscale(lambda x: np.repeat(np.repeat(x, 2, 0), 2, 1), img, 2, out, 16, pad=4,
                                   progress=lambda **info: seen.append(info))
    n = len(tiles.plan_tiles(40, 56, used, 4))
    assert n > 1 and seen == [{"tiles_done": i, "tiles_total": n} for i in range(1, n + 1)]
    assert np.allclose(out[::2, ::2], img, atol=1e-5)


def test_fake_enhancer_reports_tiles_and_plain_pings():
    calls: list[dict] = []
    img = np.zeros((4, 6, 3), np.float32)
    FakeEnhancer(delay=0.1, tiles=4).enhance(img, Params(profile="upscale", upscale=2),
                                             progress=lambda **info: calls.append(info))
    assert [c for c in calls if c] == [{"tiles_done": i, "tiles_total": 4} for i in range(1, 5)]
    assert {} in calls                                        # the watchdog ping between tiles
    res = FakeEnhancer(tiles=0).enhance(img, Params(profile="upscale", upscale=2), progress=lambda: None)
    assert res.image.shape == (8, 12, 3)                      # no tiles: a no-argument callback is enough


class _SharedQueue:
    """The reading side of a shared queue with two registered hosts (the shape PgQueue returns)."""

    def __init__(self, now: float):
        self.now = now

    def counts(self):
        return {"pending": 2, "running": 1, "done": 5, "failed": 0}

    def daemon(self):
        return {"pid": 7, "state": "working", "reason": None, "started": self.now - 100, "updated": self.now - 1,
                "current": {"job": 3, "path": "a.jpg", "stage": "enhance", "tiles_done": 2, "tiles_total": 9},
                "metrics": None}

    def paused(self):
        return False

    def done_since(self, t):
        return 4

    def hosts(self):
        base = {"pid": 1, "version": "1", "started": self.now - 500, "current_job": None, "reason": None}
        return [{**base, "id": "h1", "name": "gpu-1\x1b[31m", "last_seen": self.now - 5, "state": "working",
                 "current_job": 3},
                {**base, "id": "h2", "name": "gpu-2", "last_seen": self.now - 600, "state": "idle"},
                {**base, "id": "h3", "name": "gpu-3", "last_seen": self.now - 9, "state": "stopped"}]


def test_status_document_carries_hosts(tmp_path):
    cfg = config_mod.load(write_config(tmp_path, queue={"lease_seconds": 60}))
    now = 1_000_000.0
    doc, problem = control.status(cfg, _SharedQueue(now), now=now)
    assert problem is None
    assert [(h["name"], h["health"], h["seen_s_ago"]) for h in doc["hosts"]] == [
        ("gpu-1\\x1b[31m", "alive", 5.0), ("gpu-2", "silent", 600.0), ("gpu-3", "stopped", 9.0)]
    q = Queue(tmp_path / "q.sqlite3")                          # SQLite: one host, no host table
    try:
        assert control.status(cfg, q, now=now)[0]["hosts"] == []
    finally:
        q.close()
    assert control.status(cfg, None, now=now)[0]["hosts"] == []


def test_inbox_rel_takes_what_enqueue_takes(tmp_path):
    cfg = config_mod.load(write_config(tmp_path))
    inbox = cfg.folders.inbox
    assert control.inbox_rel(cfg, "a/b.jpg") == "a/b.jpg"
    assert control.inbox_rel(cfg, str(inbox / "a" / "b.jpg")) == "a/b.jpg"
    assert control.inbox_rel(cfg, str(inbox) + "/a/../c.jpg") == "c.jpg"         # absolute: normalised, as the CLI
    assert control.inbox_rel(cfg, "caf\udce9.jpg") == "caf\udce9.jpg"            # any byte name
    for bad in ("", "../x.jpg", "a/../b.jpg", "./a.jpg", "a//b.jpg", "/etc/passwd", str(inbox), str(inbox) + "/..",
                "a\0b.jpg", "\ud800.jpg"):
        with pytest.raises(control.NotInInbox):
            control.inbox_rel(cfg, bad)


def test_enqueue_queues_once_and_logs_the_request(tmp_path):
    cfg = config_mod.load(write_config(tmp_path))
    make_jpeg(cfg.folders.inbox / "x.jpg", seed=1)
    os.symlink(tmp_path / "config.yaml", cfg.folders.inbox / "y.jpg")
    q = Queue(tmp_path / "q.sqlite3")
    try:
        t = control.enqueue(cfg, q, "x.jpg", "web", now=5.0)
        assert t.outcome == intake.QUEUED and q.get(t.job.id).state == "pending"
        again = control.enqueue(cfg, q, "x.jpg", "web", now=6.0)
        assert again.outcome == intake.ACTIVE and again.job.id == t.job.id
        assert control.enqueue(cfg, q, "y.jpg", "web").outcome == intake.REFUSED
        assert control.enqueue(cfg, q, "z.jpg", "web").outcome == intake.VANISHED
        assert [(r["action"], r["source"], r["job"]) for r in q.requests()] == [("enqueue", "web", t.job.id)]
    finally:
        q.close()
