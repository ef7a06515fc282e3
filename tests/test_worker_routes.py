"""Every routing path of the worker, in-process and in milliseconds: a real SQLite queue and real
folders, the small fake enhancer, a virtual clock passed as `now`. Intake goes through the same
`watcher.intake.take` the daemon and `enqueue` use."""
from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _schema import assert_valid_sidecar
from conftest import make_jpeg, readonly, write_config
from fake_enhancer import FakeEnhancer
from watcher import config as config_mod
from watcher import intake
from watcher.publish import TMP_DIR
from watcher.queue import Queue
from watcher.worker import Worker, reconcile

T0 = 1_800_000_000.0


class Rig:
    def __init__(self, tmp_path: Path, **over):
        self.tmp = tmp_path
        self.cfg = config_mod.load(write_config(tmp_path, **over))
        assert config_mod.folder_problems(self.cfg) == {}
        self.queue = Queue(self.cfg.queue_path)
        self.enhancer = FakeEnhancer()
        self.worker = Worker(self.cfg, self.queue, enhancer=self.enhancer)
        self.forgotten: list[tuple[str, bool]] = []
        self.worker.on_forget = lambda rel, recheck=False: self.forgotten.append((rel, recheck))
        self.now = T0

    @property
    def inbox(self) -> Path:
        return self.cfg.folders.inbox

    def drop(self, rel: str, seed: int = 1, data: bytes | None = None) -> Path:
        p = Path(os.fsdecode(os.fsencode(self.inbox) + b"/" + os.fsencode(rel)))
        p.parent.mkdir(parents=True, exist_ok=True)
        if data is None:
            make_jpeg(p, seed=seed)
        else:
            p.write_bytes(data)
        return p

    def take(self, rel: str) -> intake.Taken:
        return intake.take(self.queue, self.inbox, rel, self.now)

    def run(self, dt: float = 0.0):
        self.now += dt
        return self.worker.run_once(self.now)

    def sidecars(self, folder: str) -> list[dict]:
        root = self.tmp / folder
        return [assert_valid_sidecar(json.loads(p.read_bytes()))         # the published schema, every one
                for p in sorted(root.rglob("*.json")) if TMP_DIR not in p.parts]


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.queue.close()


def test_done_path(rig):
    rig.drop("a/x.jpg")
    assert rig.take("a/x.jpg").outcome == intake.QUEUED
    out = rig.run()
    assert out.state == "done"
    [sc] = rig.sidecars("outbox")
    assert sc["status"] == "done" and sc["input"]["path"] == "a/x.jpg" and sc["interruptions"] == 0
    assert (rig.tmp / "archive/a/x.jpg").is_file() and not (rig.inbox / "a/x.jpg").exists()


def test_permanent_error_goes_to_failed_at_once(rig):
    rig.drop("bad.jpg", data=b"\xff\xd8\xff garbage" * 10)
    rig.take("bad.jpg")
    out = rig.run()
    assert out.state == "failed"
    [sc] = rig.sidecars("failed")
    assert sc["error"]["kind"] == "undecodable" and sc["attempts"] == 1
    assert (rig.tmp / "failed/bad.jpg").read_bytes() == b"\xff\xd8\xff garbage" * 10


def test_transient_error_retries_with_backoff_then_fails(rig):
    img = Image.new("RGB", (8, 8), (0, 40, 0))
    img.putpixel((0, 0), (255, 0, 0))                 # the fake enhancer's OOM marker
    p = rig.inbox / "oom.png"
    img.save(p)
    rig.take("oom.png")
    assert rig.run().state == "retry"
    assert rig.run().state is None if False else rig.worker.run_once(rig.now) is None   # backing off
    assert rig.run(dt=1).state == "retry"
    out = rig.run(dt=1)
    assert out.state == "failed" and rig.sidecars("failed")[0]["error"]["kind"] == "out_of_memory"


def test_a_job_that_keeps_killing_the_daemon_fails_as_interrupted(rig):
    rig.drop("poison.jpg")
    rig.take("poison.jpg")
    limit = rig.cfg.jobs.max_interruptions
    for i in range(limit):
        job = rig.queue.claim(rig.now)                 # the daemon claimed it …
        assert job is not None
        rig.queue.close()                              # … and died (kill -9): the next start reconciles
        rig.queue = rig.worker.queue = Queue(rig.cfg.queue_path)
        stats = reconcile(rig.worker, rig.queue, start=True, now=rig.now)
        assert stats["requeued"] == 1
        assert rig.queue.jobs()[0].interruptions == i + 1
    out = rig.run()
    assert out.state == "failed"
    [sc] = rig.sidecars("failed")
    assert sc["error"]["kind"] == "interrupted" and sc["interruptions"] == limit
    assert "retry" in sc["error"]["message"] and "memory" in sc["error"]["message"]
    assert rig.enhancer.calls == 0                     # never run again
    assert rig.queue.jobs()[0].public()["interruptions"] == limit


def test_weights_missing_defers_without_spending_an_attempt(rig):
    rig.worker.enhancer = None
    rig.worker.enhancer_problem = "weights missing — run photoenhanced weights fetch"
    rig.drop("x.jpg")
    rig.take("x.jpg")
    out = rig.run()
    assert out.state == "deferred" and "weights" in out.message
    job = rig.queue.jobs()[0]
    assert job.state == "pending" and job.attempts == 0


def test_read_only_outbox_is_a_folder_problem_and_the_result_is_published_again_not_recomputed(rig):
    rig.drop("x.jpg")
    rig.take("x.jpg")
    with readonly(rig.cfg.folders.outbox):
        out = rig.run()
        assert out.state == "deferred" and rig.worker.folder_problem
        assert rig.queue.jobs()[0].attempts == 0
    calls = rig.enhancer.calls
    out = rig.run(dt=10)
    assert out.state == "done" and rig.enhancer.calls == calls     # the held result was published


def test_changed_since_settle_goes_back_to_settling(rig):
    p = rig.drop("x.jpg", data=b"\xff\xd8 half written")
    rig.take("x.jpg")
    job = rig.queue.claim(rig.now)
    rig.queue.requeue(job.id)
    with open(p, "ab") as f:                          # the slow writer is still writing
        f.write(b"more")
    out = rig.run()
    assert out.state == "changed"                     # never decoded half-written: it settles again
    assert rig.forgotten == [("x.jpg", True)] and rig.queue.jobs() == []
    assert p.exists() and rig.sidecars("failed") == []


def test_duplicate_content_is_copied_not_recomputed(rig):
    rig.drop("a.jpg", seed=5)
    rig.take("a.jpg")
    assert rig.run().state == "done"
    rig.drop("b.jpg", seed=5)
    rig.take("b.jpg")
    calls = rig.enhancer.calls
    out = rig.run()
    assert out.state == "done" and out.sidecar["duplicate_of"] == 1 and rig.enhancer.calls == calls


def test_a_name_planned_by_another_job_or_taken_meanwhile_is_planned_again(rig):
    rig.drop("x.jpg")
    rig.take("x.jpg")
    stale = rig.cfg.folders.outbox / "x.jpg.json"
    stale.write_text("{}")                            # a stale sidecar at the target name
    out = rig.run()
    assert out.state == "done"
    assert out.sidecar["outputs"][0]["path"].endswith("x (1).jpg")
    assert stale.read_text() == "{}"


def test_a_folder_swapped_for_a_symlink_after_queueing_is_never_read(rig, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    make_jpeg(outside / "x.jpg", seed=3)
    secret = (outside / "x.jpg").read_bytes()
    rig.drop("sub/x.jpg", seed=3)                     # same bytes, so the sha256 would even match
    rig.take("sub/x.jpg")
    os.rename(rig.inbox / "sub", tmp_path / "moved-away")
    os.symlink(outside, rig.inbox / "sub")
    before = os.stat(outside / "x.jpg").st_atime_ns
    out = rig.run()
    assert out.state == "vanished"
    assert (outside / "x.jpg").read_bytes() == secret and os.stat(outside / "x.jpg").st_atime_ns == before
    assert rig.sidecars("outbox") == [] and rig.sidecars("failed") == []
    assert rig.forgotten == [("sub/x.jpg", False)]


def test_a_fifo_swapped_in_never_blocks(rig):
    p = rig.drop("x.jpg")
    rig.take("x.jpg")
    os.unlink(p)
    os.mkfifo(p)
    out = rig.run()
    assert out.state == "vanished"
    assert rig.take("x.jpg").outcome == intake.REFUSED


@pytest.mark.parametrize("raw", [
    b"new\nline.jpg", b"caf\xe9.jpg", b"-rf.jpg", b"\x1b[31mred.jpg", b"tab\there\r.jpg",
    b"x" * 251 + b".jpg", "é".encode() * 125 + b".jpg",
])
def test_any_name_is_processed_and_shown_escaped(rig, raw):
    rel = os.fsdecode(raw)
    rig.drop(rel)
    assert rig.take(rel).outcome == intake.QUEUED
    out = rig.run()
    assert out.state == "done"
    sidecars = list((rig.cfg.folders.outbox).glob("*.json"))
    assert len(sidecars) == 1 and len(os.fsencode(sidecars[0].name)) <= 255
    text = sidecars[0].read_bytes().decode("utf-8")    # valid UTF-8 JSON whatever the name
    sc = assert_valid_sidecar(json.loads(text))
    shown = sc["input"]["path"]
    assert "\n" not in shown and "\x1b" not in shown and "\r" not in shown
    real = base64.urlsafe_b64decode(sc["input"]["path_b64"]) if "path_b64" in sc["input"] else shown.encode()
    assert real == raw
    result = Path(sidecars[0].as_posix()[:-5])
    assert result.is_file()
    if len(raw) + len(".json") > 255:
        assert "original_name" in sc
    assert list(rig.cfg.folders.archive.iterdir())      # the original archived once


def test_a_file_at_a_path_whose_job_is_running_waits_for_it(rig):
    rig.drop("x.jpg", seed=1)
    rig.take("x.jpg")
    job = rig.queue.claim(rig.now)
    rig.drop("x.jpg", seed=2)                          # dropped again while the first one runs
    t = rig.take("x.jpg")
    assert t.outcome == intake.BUSY and t.job.id == job.id
    rig.queue.requeue(job.id)
    assert rig.run().state == "changed"                # not the file that was queued: settles again …
    assert rig.take("x.jpg").outcome == intake.QUEUED  # … and becomes a job of its own
    out = rig.run()
    assert out.state == "done" and out.sidecar["input"]["sha256"] == rig.queue.jobs()[-1].sha256


def test_reconcile_runs_again_when_a_folder_comes_back(rig):
    rig.drop("x.jpg")
    rig.take("x.jpg")
    with readonly(rig.cfg.folders.archive):
        out = rig.run()
        assert out.state == "deferred"
        job = rig.queue.jobs()[0]
        assert job.plan is not None                    # result + sidecar placed, the archive step waits
        stats = reconcile(rig.worker, rig.queue, now=rig.now)
        assert stats["waiting"] == 1
    stats = reconcile(rig.worker, rig.queue, now=rig.now)
    assert stats["done"] == 1 and rig.queue.jobs()[0].state == "done"
    assert not list((rig.cfg.folders.outbox / TMP_DIR).iterdir())


def test_a_travelling_xmp_companion_gets_the_history_entry_too(rig):
    rig.drop("x.jpg")
    xmp = (b'<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/">'
           b'<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description rdf:about=""'
           b' xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:subject><rdf:Bag><rdf:li>holiday</rdf:li>'
           b'</rdf:Bag></dc:subject></rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="w"?>')
    (rig.inbox / "x.xmp").write_bytes(xmp)
    rig.take("x.jpg")
    out = rig.run()
    assert out.state == "done"
    got = (rig.cfg.folders.outbox / "x.xmp").read_bytes()
    assert b"holiday" in got and b"photoenhanced" in got and b"History" in got
    assert (rig.cfg.folders.archive / "x.xmp").read_bytes() == xmp      # the original companion, untouched


def test_a_folder_swapped_for_a_link_at_intake_is_looked_at_again_and_queued_when_it_is_back(rig, tmp_path):
    """Found by the fault campaign: the folder of a settled file was swapped for a symlink just as
    it was taken. That is the folder's state, not the file's: the outcome is FOLDER_LINK (the daemon
    looks again), never a refusal that would leave the file unqueued once the folder is back."""
    rig.drop("sub/x.jpg")
    sub = rig.inbox / "sub"
    away = tmp_path / "away"
    sub.rename(away)
    sub.symlink_to(away)
    t = rig.take("sub/x.jpg")
    assert t.outcome == intake.FOLDER_LINK and "symlink" in t.reason
    sub.unlink()
    away.rename(sub)
    assert rig.take("sub/x.jpg").outcome == intake.QUEUED
