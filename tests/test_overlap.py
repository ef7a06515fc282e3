"""No idle model (DESIGN invariant 7, jobs.prefetch): the next photo is claimed and decoded, and the
last one encoded and published, while the model works on another; one job at a time in the model.

In-process tests drive `watcher.worker.Pipeline` the way the daemon's worker thread does, with a
fake enhancer whose enhance() waits for the test (threading.Event handshakes, no clocks), so the
order of the stages is observed, not timed. Subprocess tests kill -9 / SIGTERM the real daemon
with a job loaded ahead."""
from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from _invariants import Cand, check
from conftest import make_jpeg, readonly, wait_for, write_config
from fake_enhancer import FakeEnhancer
from watcher import backends, config as config_mod, intake
from watcher.queue import AHEAD, Queue
from watcher.worker import Pipeline, Worker


class Gate(FakeEnhancer):
    """enhance() call i records ("start", i), waits for go[i], records ("end", i). `free`: no wait."""

    def __init__(self, free: bool = False):
        super().__init__(tiles=2)
        self.log: list[tuple[str, int]] = []
        self.entered = [threading.Event() for _ in range(64)]
        self.go = [threading.Event() for _ in range(64)]
        if free:
            for e in self.go:
                e.set()

    def enhance(self, image, params, progress=None):
        i = self.calls
        self.log.append(("start", i))
        self.entered[i].set()
        assert self.go[i].wait(30), f"the test never let call {i} go"
        r = super().enhance(image, params, progress)
        self.log.append(("end", i))
        return r


class Rig:
    def __init__(self, tmp: Path, gate: Gate, **over):
        self.tmp = tmp
        self.cfg = config_mod.load(write_config(tmp, **over))
        for d in (self.cfg.state_dir, self.cfg.folders.outbox, self.cfg.folders.failed, self.cfg.folders.archive):
            d.mkdir(parents=True, exist_ok=True)
        self.queue = backends.connect(self.cfg)               # the daemon's queue: leases, fencing
        self.reader = Queue(self.cfg.queue_path)              # the test's own connection
        self.gate = gate
        self.worker = Worker(self.cfg, self.queue, enhancer=gate)
        self.memory = [1 << 40]                                 # bytes available, as the test says
        self.pipe = Pipeline(self.worker, self.cfg.jobs.prefetch, memory=lambda: self.memory[0])
        self.outs: list = []
        self.errors: list[BaseException] = []
        self.expected: dict[str, Cand] = {}

    def drop(self, rel: str, seed: int | None = None, data: bytes | None = None, expect: str = "done") -> None:
        p = self.cfg.folders.inbox / rel
        if data is None:
            make_jpeg(p, seed=seed)
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        self.expected[hashlib.sha256(p.read_bytes()).hexdigest()] = Cand(rel.encode(), "photo", expect)
        assert intake.take(self.reader, self.cfg.folders.inbox, rel, time.time()).outcome == intake.QUEUED

    def start(self) -> threading.Thread:
        """The daemon's worker loop in short: steps until nothing is due and nothing is in flight."""
        def run():
            try:
                while True:
                    out = self.pipe.step()
                    if out is None and not self.pipe.busy():
                        return
                    if out is not None:
                        self.outs.append(out)
            except BaseException as exc:      # shown by the test
                self.errors.append(exc)
        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t

    def job(self, job_id: int):
        return self.reader.get(job_id)

    def close(self) -> None:
        self.pipe.release()                 # nothing of the pipeline left running on the connection
        self.reader.close()
        self.worker.queue.close()           # (through the pipeline's lock)


@pytest.fixture
def make_rig(tmp_path):
    rigs = []

    def make(gate: Gate | None = None, **over) -> Rig:
        over.setdefault("jobs", {"max_attempts": 3, "backoff_seconds": [0.2], "stop_timeout": 5, "prefetch": 1})
        r = Rig(tmp_path, gate or Gate(), **over)
        rigs.append(r)
        return r
    yield make
    for r in rigs:
        for e in r.gate.go:
            e.set()
        r.close()


def test_next_decode_and_last_publish_overlap_the_model(make_rig):
    rig = make_rig()
    for i in (1, 2, 3):
        rig.drop(f"p{i}.jpg", seed=i)
    t = rig.start()
    g = rig.gate
    assert g.entered[0].wait(30)
    # job 1 in the model: job 2 is claimed, read and decoded meanwhile, and waits marked AHEAD
    wait_for(lambda: rig.job(2).state == "running" and rig.job(2).wait_reason == AHEAD, 30,
             what="job 2 decoded ahead")
    assert g.log == [("start", 0)]                             # the model is still on job 1
    assert rig.worker.current["job"] == 1                       # the status line: the job in the model
    assert rig.job(3).state == "pending"                        # one ahead, no more
    g.go[0].set()
    assert g.entered[1].wait(30)
    # job 2 in the model: job 1 is encoded and published meanwhile, job 3 decoded ahead
    wait_for(lambda: rig.job(1).state == "done", 30, what="job 1 published")
    wait_for(lambda: rig.job(3).wait_reason == AHEAD, 30, what="job 3 decoded ahead")
    assert g.log == [("start", 0), ("end", 0), ("start", 1)]  # …while job 2 was still in the model
    assert rig.job(2).state == "running" and rig.job(2).wait_reason is None     # in the model: not marked
    assert (rig.tmp / "outbox" / "p1.jpg").is_file() and not (rig.tmp / "outbox" / "p2.jpg").exists()
    assert rig.worker.current["job"] == 2
    g.go[1].set()
    g.go[2].set()
    t.join(30)
    assert not t.is_alive() and not rig.errors
    # one job at a time in the model, in order
    assert g.log == [("start", 0), ("end", 0), ("start", 1), ("end", 1), ("start", 2), ("end", 2)]
    assert [j.state for j in rig.reader.jobs()] == ["done"] * 3
    assert rig.worker.current is None and rig.worker.handled == 3
    check(rig.tmp, rig.expected)


def test_short_memory_runs_one_at_a_time_then_loads_ahead_again(make_rig, capsys):
    """A photo decoded ahead costs memory beside the one in the model: with too little available,
    nothing is loaded ahead (said once), every photo still ends; once memory is back, it is."""
    rig = make_rig()
    for i in (1, 2, 3, 4):
        rig.drop(f"p{i}.jpg", seed=i)
    w = rig.worker
    need_alone = int(w.limits.max_input_megapixels * 1e6 * 16)   # the largest decoded photo admitted
    rig.memory[0] = need_alone          # enough beside nothing, not beside a photo in the model
    t = rig.start()
    g = rig.gate
    assert g.entered[0].wait(30)
    assert rig.pipe.short
    # job 1 in the model: job 2 stays pending, nothing claimed ahead; for a while, not by chance
    for _ in range(20):
        assert [j.state for j in rig.reader.jobs()] == ["running", "pending", "pending", "pending"]
        time.sleep(0.01)
    g.go[0].set()
    assert g.entered[1].wait(30)
    wait_for(lambda: rig.job(1).state == "done", 30, what="job 1 published")
    assert rig.job(3).state == "pending"
    rig.memory[0] = 1 << 40             # memory is back: the next step loads job 4 ahead again
    g.go[1].set()
    assert g.entered[2].wait(30)
    wait_for(lambda: rig.job(4).state == "running" and rig.job(4).wait_reason == AHEAD, 30,
             what="job 4 decoded ahead")
    assert not rig.pipe.short
    g.go[2].set()
    g.go[3].set()
    t.join(30)
    assert not t.is_alive() and not rig.errors
    assert [j.state for j in rig.reader.jobs()] == ["done"] * 4
    assert all(j.interruptions == 0 for j in rig.reader.jobs())
    out = capsys.readouterr()
    said = out.out + out.err
    assert said.count("pipeline.one_at_a_time") == 1 and said.count("pipeline.ahead_again") == 1
    check(rig.tmp, rig.expected)


def test_room_ahead_counts_the_output_of_the_photo_in_the_model(make_rig):
    """The photo in the model still grows by its output: a larger one leaves less room."""
    from types import SimpleNamespace
    from enhancer import imageio
    from enhancer.api import Params
    rig = make_rig()
    pipe, w = rig.pipe, rig.worker

    def in_model(width, height, upscale, bits=8):
        info = imageio.Info("JPEG", width, height, 1, "RGB")
        return SimpleNamespace(prep=SimpleNamespace(info=info, params=Params(profile="upscale", upscale=upscale)),
                               decoded=SimpleNamespace(bits=bits))
    next_max = int(w.limits.max_input_megapixels * 1e6 * 16)
    reserve = 2_000_000_000                 # the fake enhancer runs on "cpu"
    rig.memory[0] = None                    # unknown (not Linux): as before, always ahead
    assert pipe.room_ahead(in_model(6000, 4000, 2))
    cap = w.limits.max_output_megapixels * 1e6
    out_24mp = int(min(6000 * 4000 * 4, cap) * 3)   # 24 MP at upscale 2, 8-bit (as the cap allows)
    for have, room in ((next_max + reserve + out_24mp, True), (next_max + reserve + out_24mp - 1, False)):
        rig.memory[0] = have
        assert pipe.room_ahead(in_model(6000, 4000, 2)) is room
    rig.memory[0] = next_max + reserve + out_24mp
    assert not pipe.room_ahead(in_model(6000, 4000, 2, bits=16))  # twice the output bytes
    assert pipe.room_ahead(in_model(600, 400, 2))                # a small photo fits easily
    # the output is counted as max_output_megapixels allows it, not the upscale alone
    rig.memory[0] = int(next_max + reserve + cap * 3) + 1
    assert pipe.room_ahead(in_model(20000, 10000, 4))


def test_a_stream_ends_exactly_once_with_a_corrupt_photo(make_rig):
    rig = make_rig(Gate(free=True))
    for i in range(1, 13):
        if i == 5:
            rig.drop(f"s/x{i:02d}.jpg", data=b"\xff\xd8 not really a jpeg", expect="failed")
        else:
            rig.drop(f"s/x{i:02d}.jpg", seed=i)
    t = rig.start()
    t.join(60)
    assert not t.is_alive() and not rig.errors
    states = {j.rel_path: j.state for j in rig.reader.jobs()}
    assert states == {f"s/x{i:02d}.jpg": ("failed" if i == 5 else "done") for i in range(1, 13)}
    assert rig.gate.calls == 11                                 # all but the corrupt one
    side = json.loads((rig.tmp / "failed/s/x05.jpg.json").read_bytes())
    assert side["error"]["kind"] in ("undecodable", "unsupported")
    assert all(j.interruptions == 0 and j.wait_reason is None for j in rig.reader.jobs())
    check(rig.tmp, rig.expected)


def test_a_corrupt_photo_loaded_ahead_fails_as_today_while_the_model_works(make_rig):
    rig = make_rig()
    rig.drop("a.jpg", seed=1)
    rig.drop("b.jpg", data=b"\xff\xd8 truncated", expect="failed")
    rig.drop("c.jpg", seed=3)
    t = rig.start()
    g = rig.gate
    assert g.entered[0].wait(30)
    # b's load stage ends it (failed/, an attempt counted) while job a is in the model
    wait_for(lambda: rig.job(2).state == "failed", 30, what="the corrupt photo failed")
    assert g.log == [("start", 0)] and rig.worker.current["job"] == 1
    assert rig.job(2).error_kind in ("undecodable", "unsupported") and rig.job(2).attempts == 1
    assert (rig.tmp / "failed" / "b.jpg").is_file() and (rig.tmp / "failed" / "b.jpg.json").is_file()
    g.go[0].set()
    g.go[1].set()
    t.join(30)
    assert not t.is_alive() and not rig.errors
    assert [j.state for j in rig.reader.jobs()] == ["done", "failed", "done"]
    check(rig.tmp, rig.expected)


def test_a_read_only_outbox_in_the_finish_stage_waits_and_publishes_the_held_result(make_rig):
    rig = make_rig(Gate(free=True))
    rig.drop("x.jpg", seed=1)
    with readonly(rig.cfg.folders.outbox):
        out = rig.pipe.step()                       # x through the model, its finish stage behind
        assert out.state == "finishing"
        out = rig.pipe.step()                       # nothing more due: the one behind ends
        assert out.state == "deferred" and rig.worker.folder_problem
        assert not rig.pipe.busy()
    job = rig.job(1)
    assert job.state == "pending" and job.attempts == 0 and job.wait_reason and job.interruptions == 0
    calls = rig.gate.calls
    out = rig.pipe.step(now=time.time() + 10)       # due again: the held result is published, not recomputed
    assert out.state in ("done", "finishing")
    if out.state == "finishing":
        out = rig.pipe.step(now=time.time() + 10)
    assert rig.job(1).state == "done" and rig.gate.calls == calls
    check(rig.tmp, rig.expected)


def test_release_returns_the_job_loaded_ahead_to_pending(make_rig):
    rig = make_rig()
    rig.drop("a.jpg", seed=1)
    rig.drop("b.jpg", seed=2)
    box: list = []
    t = threading.Thread(target=lambda: box.append(rig.pipe.step()), daemon=True)
    t.start()
    assert rig.gate.entered[0].wait(30)
    wait_for(lambda: rig.job(2).wait_reason == AHEAD, 30, what="b decoded ahead")
    rig.gate.go[0].set()
    t.join(30)
    assert box[0].state == "finishing"
    rig.pipe.release()                              # what pause / stop / reload do
    assert not rig.pipe.busy()
    a, b = rig.job(1), rig.job(2)
    assert a.state == "done"
    assert b.state == "pending" and b.interruptions == 0 and b.attempts == 0 and b.wait_reason is None
    assert rig.queue.holds(2) is None and rig.worker.current is None


# --- the real daemon ---------------------------------------------------------------------------

def _rows(tmp: Path) -> dict[int, tuple]:
    path = tmp / "state" / "queue.sqlite3"
    if not path.exists():
        return {}
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return {r[0]: r[1:] for r in db.execute("SELECT id, state, wait_reason, interruptions FROM jobs")}
    except sqlite3.OperationalError:
        return {}
    finally:
        db.close()


def _drop_three(tmp: Path) -> dict[str, Cand]:
    expected = {}
    for i in (1, 2, 3):
        p = make_jpeg(tmp / "inbox" / f"k{i}.jpg.part", seed=i)
        expected[hashlib.sha256(p.read_bytes()).hexdigest()] = Cand(f"k{i}.jpg".encode(), "photo")
        p.rename(tmp / "inbox" / f"k{i}.jpg")
    return expected


def _ahead(tmp: Path) -> bool:
    rows = _rows(tmp)
    return len(rows) == 3 and rows[1][0] == "running" and rows[2][:2] == ("running", AHEAD)


def test_kill_9_with_a_job_loaded_ahead_returns_all_to_pending_and_ends_each_once(tmp_path, daemon_factory):
    cfg = write_config(tmp_path, watch={"mode": "events", "settle_seconds": 0.1, "rescan_interval": 1},
                       jobs={"max_attempts": 3, "backoff_seconds": [0.1], "stop_timeout": 5, "prefetch": 1})
    expected = _drop_three(tmp_path)
    d = daemon_factory(cfg, env={"FAKE_DELAY": "30"})
    wait_for(lambda: _ahead(tmp_path), 60, interval=0.1, what="job 1 in the model, job 2 loaded ahead")
    d.kill()
    rows = _rows(tmp_path)
    assert rows[1][0] == rows[2][0] == "running"            # both claimed when it died
    d = daemon_factory(cfg)
    d.wait_event("recover.finished", 60, requeued=2)         # all returned to pending at the restart
    wait_for(lambda: all(r[0] == "done" for r in _rows(tmp_path).values()), 60, what="all done")
    assert d.stop() == 0
    rows = _rows(tmp_path)
    assert rows[1][2] == 1 and rows[2][2] == 0              # only the job in the model was interrupted
    check(tmp_path, expected)


def test_sigterm_with_a_job_loaded_ahead_leaves_it_pending(tmp_path, daemon_factory):
    cfg = write_config(tmp_path, watch={"mode": "events", "settle_seconds": 0.1, "rescan_interval": 1},
                       jobs={"max_attempts": 3, "backoff_seconds": [0.1], "stop_timeout": 20, "prefetch": 1})
    _drop_three(tmp_path)
    d = daemon_factory(cfg, env={"FAKE_DELAY": "2"})
    wait_for(lambda: _ahead(tmp_path), 60, interval=0.05, what="job 1 in the model, job 2 loaded ahead")
    assert d.stop() == 0                                     # job 1 finishes, job 2 goes back
    rows = _rows(tmp_path)
    assert rows[1][0] == "done"
    assert rows[2] == ("pending", None, 0)
    assert rows[3][0] == "pending" and rows[3][2] == 0
    assert any(e.get("event") == "job.released" and e.get("job") == 2 for e in d.events())
