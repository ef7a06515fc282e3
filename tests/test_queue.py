"""Contract tests for watcher/queue.py: the job state machine over a real SQLite file.

Every test uses a fresh queue file in tmp_path; no mocks. Times are passed explicitly (`now=`)
wherever the queue takes them, so nothing here sleeps.
"""
from __future__ import annotations

import calendar
import hashlib
import json
import os
import random
import re
import sqlite3
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
import structlog

from conftest import readonly
from watcher.errors import InvalidTransition, QueueCorrupt, StateUnavailable, UnknownJob, WatcherError
from watcher.queue import (DONE, FAILED, PENDING, RUNNING, SCHEMA_VERSION, STATES, TRANSITIONS, Finished,
                           Job, Queue, open_queue)

EVENTS = sorted({event for _, event in TRANSITIONS})
T0 = 1_000_000.0


@pytest.fixture
def q(tmp_path):
    queue = Queue(tmp_path / "queue.sqlite3")
    yield queue
    queue.close()


def _raw_row(queue: Queue, job_id: int) -> tuple:
    return queue.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()


def _job_in(queue: Queue, state: str, rel: str) -> Job:
    """A job brought into `state` through legal transitions only."""
    job = queue.enqueue(rel, 10, 20, "sha-" + rel, now=T0)
    assert job is not None and job.state == PENDING
    if state == PENDING:
        return job
    job = queue.apply(job.id, "claim", now=T0 + 1)
    if state == RUNNING:
        return job
    if state == DONE:
        return queue.finish(job.id, [{"path": "/o/" + rel}], now=T0 + 2)
    return queue.fail(job.id, "undecodable", "broken", now=T0 + 2)


# --- the transition table ------------------------------------------------------------------------

@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("event", EVENTS)
def test_every_state_event_pair_follows_the_table(q, state, event):
    job = _job_in(q, state, f"{state}-{event}.jpg")
    before = _raw_row(q, job.id)
    new = TRANSITIONS.get((state, event))
    if new is None:
        with pytest.raises(InvalidTransition):
            q.apply(job.id, event, now=T0 + 50)
        assert _raw_row(q, job.id) == before          # nothing changed, not even `updated`
        assert q.get(job.id).state == state
    else:
        moved = q.apply(job.id, event, now=T0 + 50)
        assert moved.state == new
        assert moved.updated == T0 + 50
        assert q.get(job.id).state == new


def test_table_covers_the_documented_lifecycle():
    assert TRANSITIONS[(PENDING, "claim")] == RUNNING
    assert TRANSITIONS[(RUNNING, "finish")] == DONE
    assert TRANSITIONS[(RUNNING, "fail")] == FAILED
    assert TRANSITIONS[(FAILED, "retry")] == PENDING
    # done is terminal: nothing leaves it
    assert not [k for k in TRANSITIONS if k[0] == DONE]
    assert set(TRANSITIONS.values()) <= set(STATES)


@pytest.mark.parametrize("op", ["finish", "fail", "retry_later", "defer", "requeue", "retry"])
def test_named_operations_refuse_illegal_states_and_change_nothing(q, op):
    job = _job_in(q, DONE, "x.jpg")
    before = _raw_row(q, job.id)
    calls = {"finish": lambda: q.finish(job.id, []), "fail": lambda: q.fail(job.id, "k", "m"),
             "retry_later": lambda: q.retry_later(job.id, "k", "m", 5),
             "defer": lambda: q.defer(job.id, "r", 5), "requeue": lambda: q.requeue(job.id),
             "retry": lambda: q.retry(job.id)}
    with pytest.raises(InvalidTransition):
        calls[op]()
    assert _raw_row(q, job.id) == before


def test_unknown_job_raises(q):
    with pytest.raises(UnknownJob):
        q.apply(4242, "claim")
    with pytest.raises(UnknownJob):
        q.get(4242)
    with pytest.raises(UnknownJob):
        q.retry_later(4242, "k", "m", 1)


def test_requeue_running_moves_every_running_job_in_one_go(q):
    """requeue_running (start-up) moves every running job, in id order, in one transaction."""
    a = _job_in(q, RUNNING, "a.jpg")
    b = _job_in(q, RUNNING, "b.jpg")
    moved = q.requeue_running(now=T0 + 9)
    assert [j.id for j in moved] == [a.id, b.id]
    assert {j.state for j in q.jobs()} == {PENDING}


# --- claim -------------------------------------------------------------------------------------

def test_claim_takes_the_oldest_due_job_first(q):
    ids = [q.enqueue(f"{i}.jpg", 1, 1, f"s{i}", now=T0 + i).id for i in range(4)]
    got = [q.claim(now=T0 + 10).id for _ in range(4)]
    assert got == ids
    assert q.claim(now=T0 + 10) is None


def test_claim_respects_not_before(q):
    late = q.enqueue("late.jpg", 1, 1, "a", now=T0, not_before=T0 + 100)
    early = q.enqueue("early.jpg", 1, 1, "b", now=T0 + 1)
    first = q.claim(now=T0 + 5)
    assert first.id == early.id
    assert q.claim(now=T0 + 99) is None              # the older job is not due yet
    second = q.claim(now=T0 + 100)
    assert second.id == late.id and second.state == RUNNING and second.started == T0 + 100


def test_claim_clears_wait_reason(q):
    job = _job_in(q, RUNNING, "w.jpg")
    q.defer(job.id, "outbox disk full", 0, now=T0 + 3)
    assert q.get(job.id).wait_reason == "outbox disk full"
    again = q.claim(now=T0 + 4)
    assert again.id == job.id and again.wait_reason is None


def test_concurrent_claims_from_two_connections_never_share_a_job(tmp_path):
    path = tmp_path / "queue.sqlite3"
    setup = Queue(path)
    n = 120
    for i in range(n):
        setup.enqueue(f"f{i:03}.jpg", 1, 1, f"s{i}", now=T0)
    setup.close()
    claimed: dict[str, list[int]] = {"a": [], "b": []}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def worker(name: str) -> None:
        queue = Queue(path)
        try:
            barrier.wait()
            while (job := queue.claim(now=T0 + 1)) is not None:
                claimed[name].append(job.id)
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            queue.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in claimed]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    a, b = set(claimed["a"]), set(claimed["b"])
    assert not a & b
    assert len(claimed["a"]) + len(claimed["b"]) == n
    check = Queue(path)
    assert check.counts() == {PENDING: 0, RUNNING: n, DONE: 0, FAILED: 0}
    check.close()


# --- enqueue -----------------------------------------------------------------------------------

def test_enqueue_records_the_file_and_starts_pending(q):
    job = q.enqueue("a/b/IMG.jpg", 123, 456, "abc", now=T0)
    assert (job.rel_path, job.size, job.mtime_ns, job.sha256) == ("a/b/IMG.jpg", 123, 456, "abc")
    assert job.state == PENDING and job.attempts == 0 and job.created == T0 == job.updated
    assert job.plan is None and job.outputs == [] and job.params == {}


@pytest.mark.parametrize("active", [PENDING, RUNNING])
def test_enqueue_refuses_a_second_active_job_for_the_same_path(q, active):
    job = _job_in(q, active, "dup.jpg")
    assert q.enqueue("dup.jpg", 99, 99, "other", now=T0 + 5) is None
    assert [j.id for j in q.jobs()] == [job.id]
    assert q.active("dup.jpg").id == job.id


@pytest.mark.parametrize("final", [DONE, FAILED])
def test_enqueue_allows_a_new_job_after_done_or_failed(q, final):
    old = _job_in(q, final, "again.jpg")
    assert q.active("again.jpg") is None
    new = q.enqueue("again.jpg", 11, 22, "new-content", now=T0 + 5)
    assert new is not None and new.id != old.id and new.state == PENDING
    assert q.get(old.id).state == final


def test_the_unique_index_holds_even_without_the_check(q):
    """The schema itself forbids two active rows per path (a second writer cannot race past it)."""
    _job_in(q, PENDING, "u.jpg")
    with pytest.raises(sqlite3.IntegrityError):
        q.db.execute("INSERT INTO jobs (rel_path, size, mtime_ns, sha256, state, created, updated)"
                     " VALUES ('u.jpg', 1, 1, 'x', 'pending', 0, 0)")


# --- attempts, backoff, defer, retry -----------------------------------------------------------

def test_retry_later_counts_an_attempt_and_backs_off(q):
    job = _job_in(q, RUNNING, "r.jpg")
    moved = q.retry_later(job.id, "out_of_memory", "CUDA OOM", 30, now=T0 + 10)
    assert moved.state == PENDING and moved.attempts == 1
    assert moved.not_before == T0 + 40
    assert (moved.error_kind, moved.last_error) == ("out_of_memory", "CUDA OOM")
    assert q.claim(now=T0 + 39) is None
    again = q.claim(now=T0 + 40)
    assert again.id == job.id and again.attempts == 1
    assert q.retry_later(job.id, "device", "lost", 60, now=T0 + 50).attempts == 2


def test_retry_later_drops_a_recorded_plan(q):
    job = _job_in(q, RUNNING, "p.jpg")
    q.set_plan(job.id, {"kind": "done", "steps": []})
    assert q.retry_later(job.id, "k", "m", 1, now=T0 + 5).plan is None


def test_defer_spends_no_attempt(q):
    job = _job_in(q, RUNNING, "d.jpg")
    moved = q.defer(job.id, "outbox read-only", 5, now=T0 + 10)
    assert moved.state == PENDING and moved.attempts == 0
    assert moved.not_before == T0 + 15 and moved.wait_reason == "outbox read-only"
    assert q.claim(now=T0 + 14) is None
    assert q.claim(now=T0 + 15).id == job.id


def test_requeue_running_at_start_up_keeps_attempts(q):
    job = _job_in(q, RUNNING, "k.jpg")
    q.retry_later(job.id, "k", "m", 100, now=T0 + 2)
    q.claim(now=T0 + 200)
    q.retry_later(job.id, "k", "m", 100, now=T0 + 201)
    q.claim(now=T0 + 400)
    other = _job_in(q, PENDING, "other.jpg")
    back = q.requeue_running(now=T0 + 500)
    assert [j.id for j in back] == [job.id]
    j = q.get(job.id)
    assert j.state == PENDING and j.attempts == 2 and j.not_before == 0
    assert j.interruptions == 1                       # the process died while it ran
    assert q.get(other.id).state == PENDING
    assert q.requeue_running(now=T0 + 501) == []


def test_retry_resets_attempts_and_error(q):
    job = _job_in(q, RUNNING, "f.jpg")
    q.retry_later(job.id, "k", "m", 0, now=T0 + 2)
    q.claim(now=T0 + 3)
    failed = q.fail(job.id, "out_of_memory", "again", now=T0 + 4, attempts=3, outputs=[{"path": "/f/f.jpg"}])
    assert failed.state == FAILED and failed.attempts == 3 and failed.outputs == [{"path": "/f/f.jpg"}]
    back = q.retry(job.id, now=T0 + 5)
    assert back.state == PENDING and back.attempts == 0
    assert back.error_kind is None and back.last_error is None and back.outputs == [] and back.finished is None


def test_finish_records_outputs_and_clears_the_plan(q):
    job = _job_in(q, RUNNING, "o.jpg")
    q.set_plan(job.id, {"kind": "done", "steps": [{"op": "place"}]})
    done = q.finish(job.id, [{"path": "/out/o.jpg", "sha256": "s"}], now=T0 + 7, duplicate_of=None)
    assert done.state == DONE and done.plan is None and done.finished == T0 + 7
    assert done.outputs == [{"path": "/out/o.jpg", "sha256": "s"}]
    assert q.with_plan() == []


def test_forget_only_pending_or_running(q):
    p = _job_in(q, PENDING, "p.jpg")
    d = _job_in(q, DONE, "d.jpg")
    q.forget(p.id)
    with pytest.raises(UnknownJob):
        q.get(p.id)
    with pytest.raises(InvalidTransition):
        q.forget(d.id)
    assert q.get(d.id).state == DONE


# --- plans -------------------------------------------------------------------------------------

@pytest.mark.parametrize("state", [PENDING, RUNNING])
def test_set_plan_on_active_jobs(q, state):
    job = _job_in(q, state, "plan.jpg")
    plan = {"kind": "done", "steps": [{"op": "place", "tmp": "/t", "dst": "/d"}], "record": [{"path": "/d"}]}
    q.set_plan(job.id, plan, params={"key": "k1"}, profile="faces")
    got = q.get(job.id)
    assert got.plan == plan and got.params == {"key": "k1"} and got.profile == "faces"
    assert [j.id for j in q.with_plan()] == [job.id]
    q.set_plan(job.id, None)
    assert q.get(job.id).plan is None and q.with_plan() == []


@pytest.mark.parametrize("state", [DONE, FAILED])
def test_set_plan_refused_on_finished_jobs(q, state):
    job = _job_in(q, state, "plan.jpg")
    before = _raw_row(q, job.id)
    with pytest.raises(InvalidTransition):
        q.set_plan(job.id, {"kind": "done", "steps": []})
    assert _raw_row(q, job.id) == before


def test_with_plan_ignores_finished_jobs(q):
    a = _job_in(q, RUNNING, "a.jpg")
    q.set_plan(a.id, {"kind": "done", "steps": []})
    b = _job_in(q, RUNNING, "b.jpg")
    q.set_plan(b.id, {"kind": "failed", "steps": []})
    q.finish(a.id, [{"path": "/x"}])
    assert [j.id for j in q.with_plan()] == [b.id]


# --- duplicates --------------------------------------------------------------------------------

def _done_with_params(q, rel, sha, key, outputs):
    job = q.enqueue(rel, 1, 1, sha, now=T0)
    q.claim(now=T0 + 1)
    q.set_plan(job.id, {"kind": "done", "steps": []}, params={"key": key})
    return q.finish(job.id, outputs, now=T0 + 2)


def test_done_with_finds_a_done_job_by_content_and_settings_key(q):
    first = _done_with_params(q, "a.jpg", "SHA", "faces:2", [{"path": "/o/a.jpg"}])
    later = _done_with_params(q, "b.jpg", "SHA", "faces:2", [{"path": "/o/b.jpg"}])
    _done_with_params(q, "c.jpg", "SHA", "full:4", [{"path": "/o/c.jpg"}])
    assert q.done_with("SHA", "faces:2").id == later.id          # the latest one
    assert q.done_with("SHA", "full:4").rel_path == "c.jpg"
    assert q.done_with("SHA", "upscale:2") is None
    assert q.done_with("OTHER", "faces:2") is None
    assert first.id != later.id


def test_done_with_ignores_jobs_that_are_not_done_or_have_no_outputs(q):
    _done_with_params(q, "empty.jpg", "S2", "k", [])
    job = q.enqueue("run.jpg", 1, 1, "S2", now=T0)
    q.claim(now=T0 + 1)
    q.set_plan(job.id, {"kind": "done", "steps": []}, params={"key": "k"})
    assert q.done_with("S2", "k") is None


# --- reads -------------------------------------------------------------------------------------

def test_counts_and_listing(q):
    _job_in(q, PENDING, "p1.jpg")
    _job_in(q, PENDING, "p2.jpg")
    _job_in(q, RUNNING, "r.jpg")
    _job_in(q, DONE, "d.jpg")
    _job_in(q, FAILED, "f.jpg")
    assert q.counts() == {PENDING: 2, RUNNING: 1, DONE: 1, FAILED: 1}
    assert [j.rel_path for j in q.jobs(PENDING)] == ["p1.jpg", "p2.jpg"]
    assert len(q.jobs()) == 5 and len(q.jobs(limit=2)) == 2
    assert q.due_pending(T0 + 10) == 2
    pub = q.jobs(FAILED)[0].public()
    assert pub["state"] == FAILED and pub["path"] == "f.jpg" and pub["error_kind"] == "undecodable"


def test_empty_queue_counts_every_state(q):
    assert q.counts() == {s: 0 for s in STATES}


# --- the file on disk ----------------------------------------------------------------------------

def test_wal_synchronous_full_and_user_version(tmp_path):
    path = tmp_path / "queue.sqlite3"
    queue = Queue(path)
    assert queue.db.execute("PRAGMA synchronous").fetchone()[0] == 2         # FULL
    assert queue.db.execute("PRAGMA busy_timeout").fetchone()[0] > 0
    queue.close()
    raw = sqlite3.connect(path)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"      # persistent in the file
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION >= 1
    finally:
        raw.close()


def test_reopening_keeps_jobs_and_does_not_migrate_again(tmp_path):
    path = tmp_path / "queue.sqlite3"
    first = Queue(path)
    job = first.enqueue("keep.jpg", 1, 2, "s", now=T0)
    first.close()
    second = Queue(path)
    assert second.get(job.id).rel_path == "keep.jpg"
    second.close()


def test_a_readonly_queue_reads_while_a_writer_holds_the_write_lock(tmp_path):
    path = tmp_path / "queue.sqlite3"
    writer = Queue(path)
    job = writer.enqueue("seen.jpg", 1, 1, "s", now=T0)
    writer.db.execute("BEGIN IMMEDIATE")
    writer.db.execute("UPDATE jobs SET state = 'running' WHERE id = ?", (job.id,))
    reader = Queue(path, readonly=True, timeout=0.5)
    try:
        assert reader.counts()[PENDING] == 1                                   # committed state only
        assert reader.get(job.id).state == PENDING
        with pytest.raises(sqlite3.OperationalError):
            reader.db.execute("UPDATE jobs SET attempts = 5")                  # truly read-only
    finally:
        writer.db.execute("COMMIT")
    assert reader.get(job.id).state == RUNNING
    reader.close()
    writer.close()


def test_daemon_status_row_round_trips(q):
    assert q.daemon() is None
    q.set_daemon(321, "working", None, {"job": 1, "path": "a.jpg"}, metrics={"done": 3}, started=T0)
    d = q.daemon()
    assert d["pid"] == 321 and d["state"] == "working" and d["reason"] is None
    assert d["current"] == {"job": 1, "path": "a.jpg"} and d["metrics"] == {"done": 3} and d["started"] == T0
    assert d["updated"] > 0
    q.set_daemon(321, "waiting", "outbox disk full", None)                     # metrics/started kept
    d = q.daemon()
    assert (d["state"], d["reason"], d["current"]) == ("waiting", "outbox disk full", None)
    assert d["metrics"] == {"done": 3} and d["started"] == T0
    assert q.db.execute("SELECT COUNT(*) FROM daemon").fetchone()[0] == 1


def test_a_newer_schema_than_the_code_is_refused(tmp_path):
    path = tmp_path / "queue.sqlite3"
    Queue(path).close()
    raw = sqlite3.connect(path)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.commit()
    raw.close()
    with pytest.raises(WatcherError, match="newer"):
        Queue(path)
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1   # left alone
    raw.close()


def test_a_version_1_queue_is_migrated_in_place_and_keeps_its_jobs(tmp_path):
    from watcher import queue as qmod
    path = tmp_path / "old.sqlite3"
    raw = sqlite3.connect(path)
    raw.executescript(qmod._MIGRATIONS[1])
    raw.execute("PRAGMA user_version = 1")
    raw.execute("INSERT INTO jobs (rel_path, size, mtime_ns, sha256, state, created, updated, finished)"
                " VALUES ('a.jpg', 1, 1, 'x', 'done', 1, 1, 5)")
    raw.commit()
    raw.close()
    q = Queue(path)
    try:
        assert q.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
        assert [j.rel_path for j in q.jobs(DONE)] == ["a.jpg"] and q.done_since(4) == 1
        assert q.jobs(DONE)[0].interruptions == 0
        names = {r[0] for r in q.db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert "jobs_finished" in names
    finally:
        q.close()


def test_a_version_2_queue_gains_interruptions_and_keeps_its_jobs(tmp_path):
    from watcher import queue as qmod
    path = tmp_path / "v2.sqlite3"
    raw = sqlite3.connect(path)
    raw.executescript(qmod._MIGRATIONS[1] + qmod._MIGRATIONS[2])
    raw.execute("PRAGMA user_version = 2")
    raw.execute("INSERT INTO jobs (rel_path, size, mtime_ns, sha256, state, created, updated)"
                " VALUES ('r.jpg', 1, 1, 'x', 'running', 1, 1)")
    raw.commit()
    raw.close()
    q = Queue(path)
    try:
        assert q.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert q.jobs()[0].interruptions == 0
        assert q.requeue_running(now=T0)[0].interruptions == 1
    finally:
        q.close()


# --- interruptions (a photo that kills the process) ------------------------------------------------

def test_requeue_running_counts_an_interruption_each_time(q):
    job = _job_in(q, RUNNING, "poison.jpg")
    for n in (1, 2, 3):
        back = q.requeue_running(now=T0 + 10 * n)
        assert [(j.id, j.interruptions, j.state) for j in back] == [(job.id, n, PENDING)]
        again = q.claim(now=T0 + 10 * n + 1)
        assert again.id == job.id and again.interruptions == n        # the worker sees it at claim
    assert q.get(job.id).attempts == 0                                 # interruptions are not attempts
    assert q.get(job.id).public()["interruptions"] == 3


def test_a_graceful_requeue_counts_no_interruption(q):
    job = _job_in(q, RUNNING, "stop.jpg")
    assert q.requeue(job.id, now=T0 + 5).interruptions == 0
    assert q.get(job.id).interruptions == 0 and q.get(job.id).state == PENDING


def test_an_interrupted_job_can_be_failed_after_claim_and_retry_resets_interruptions(q):
    job = _job_in(q, RUNNING, "kill.jpg")
    q.requeue_running(now=T0 + 1)
    q.requeue_running(now=T0 + 2)                       # not running any more: nothing counted
    assert q.get(job.id).interruptions == 1
    claimed = q.claim(now=T0 + 3)
    failed = q.fail(claimed.id, "interrupted", "killed while processing", now=T0 + 4)
    assert (failed.state, failed.error_kind, failed.interruptions) == (FAILED, "interrupted", 1)
    back = q.retry(job.id, now=T0 + 5)
    assert back.state == PENDING and back.interruptions == 0 and back.attempts == 0


# --- hostile names ---------------------------------------------------------------------------------

HOSTILE = [
    b"new\nline.jpg", b"ctrl\x01char.jpg", b"caf\xe9.jpg", b"caf\xe8.jpg", b"caf\xc3\xa9.jpg",
    b"\xff\xfe\x80.png", b"x" * 251 + b".jpg", "emoji \U0001f4f7\u200d.jpg".encode(), b"-leading-dash.jpg",
    b"tab\there.jpg", b"back\\slash.jpg", b"caf\\xe9.jpg", b"\xed\xa0\x80.jpg", "sep\u2028arator.jpg".encode(),
    b"sub\n dir/\xe9t\xe9 \x1b[31m.jpg", b"--", b" ", b"\x7f",
]


@pytest.fixture
def hostile_names(tmp_path) -> tuple[Path, list[str]]:
    """Real files with hostile names; the rel paths as os.walk gives them (fsdecoded)."""
    root = tmp_path / "inbox"
    root.mkdir()
    for raw in HOSTILE:
        full = os.path.join(os.fsencode(root), raw)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as f:
            f.write(raw)
    rels = []
    for dirpath, _, files in os.walk(root):
        rels += [os.path.relpath(os.path.join(dirpath, f), root) for f in files]
    assert len(rels) == len(HOSTILE)
    return root, sorted(rels)


def test_hostile_names_survive_every_operation(q, hostile_names, tmp_path):
    root, rels = hostile_names
    jobs = {rel: q.enqueue(rel, 1, 2, hashlib.sha256(os.fsencode(rel)).hexdigest(), now=T0) for rel in rels}
    assert all(j is not None and j.rel_path == rel for rel, j in jobs.items())
    for rel, job in jobs.items():
        assert q.active(rel).id == job.id
        assert q.enqueue(rel, 1, 2, "again", now=T0) is None          # still one active job per name
        assert (root / q.get(job.id).rel_path).read_bytes() == os.fsencode(rel)   # the name still finds its file
    claimed = [q.claim(now=T0 + 1) for _ in rels]
    assert sorted(j.rel_path for j in claimed) == rels
    for i, job in enumerate(claimed):
        q.set_plan(job.id, {"kind": "done", "dst": str(tmp_path / "outbox" / job.rel_path)}, params={"name": job.rel_path})
        assert q.with_plan()[0].plan["dst"] == str(tmp_path / "outbox" / job.rel_path)
        if i % 2:
            q.finish(job.id, [{"path": str(tmp_path / "outbox" / job.rel_path)}], now=T0 + 2)
        else:
            q.fail(job.id, "undecodable", f"cannot decode {job.rel_path}", now=T0 + 2,
                   outputs=[{"path": str(tmp_path / "failed" / job.rel_path)}])
    for job in q.jobs():
        assert job.rel_path in rels and q.get(job.id) == job
        assert job.params == {"name": job.rel_path}
        assert job.outputs[0]["path"].endswith(job.rel_path)
        pub = json.loads(json.dumps(job.public()))                     # list --json's document
        assert pub["path"] == job.rel_path and pub["outputs"] == job.outputs
        if job.state == FAILED:
            assert q.retry(job.id, now=T0 + 3).rel_path == job.rel_path
            assert q.active(job.rel_path).id == job.id
        else:
            assert q.active(job.rel_path) is None
            assert q.enqueue(job.rel_path, 1, 2, "new", now=T0 + 3).rel_path == job.rel_path
    assert len(q.jobs()) == len(rels) + len(rels) // 2


def test_names_differing_only_in_invalid_bytes_are_different_jobs(q):
    a, b, text = os.fsdecode(b"caf\xe9.jpg"), os.fsdecode(b"caf\xe8.jpg"), "caf\xe9.jpg"   # the last is valid "café"
    ids = [q.enqueue(n, 1, 1, "s", now=T0).id for n in (a, b, text)]
    assert len(set(ids)) == 3
    assert [q.active(n).id for n in (a, b, text)] == ids
    assert q.active(os.fsdecode(b"caf\xea.jpg")) is None


def test_a_name_has_one_stored_form_so_the_unique_index_holds(q):
    bad = os.fsdecode(b"caf\xe9.jpg")
    q.enqueue(bad, 1, 1, "s", now=T0)
    q.enqueue("ok.jpg", 1, 1, "s", now=T0)
    kinds = dict(q.db.execute("SELECT CAST(rel_path AS BLOB), typeof(rel_path) FROM jobs"))
    assert kinds == {b"caf\xe9.jpg": "blob", b"ok.jpg": "text"}
    with pytest.raises(sqlite3.IntegrityError):
        q.db.execute("INSERT INTO jobs (rel_path, size, mtime_ns, sha256, state, created, updated)"
                     " VALUES (?, 1, 1, 'x', 'pending', 0, 0)", (b"caf\xe9.jpg",))


def test_text_with_raw_name_bytes_is_stored_escaped(q):
    bad = os.fsdecode(b"caf\xe9.jpg")
    job = _job_in(q, RUNNING, bad)
    q.defer(job.id, f"waiting for {bad}", 0, now=T0 + 1)
    assert q.get(job.id).wait_reason == "waiting for caf\\xe9.jpg"
    q.claim(now=T0 + 2)
    assert q.fail(job.id, "undecodable", f"bad {bad}", now=T0 + 3).last_error == "bad caf\\xe9.jpg"
    q.set_daemon(1, "working", f"on {bad}", {"path": bad})
    d = q.daemon()
    assert d["current"] == {"path": bad} and d["reason"] == "on caf\\xe9.jpg"


# --- storage faults --------------------------------------------------------------------------------

@contextmanager
def tiny_tmpfs(path: Path, size: str = "1m"):
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs (needs root): {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def _fill(folder: Path) -> Path:
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError as exc:
        assert exc.errno == 28                         # ENOSPC
    try:
        while True:
            os.write(fd, b"\0")
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def test_a_full_state_dir_is_state_unavailable_and_the_same_queue_works_once_freed(tmp_path):
    with tiny_tmpfs(tmp_path / "state") as state:
        queue = Queue(state / "queue.sqlite3")
        try:
            job = queue.enqueue("a.jpg", 1, 1, "s", now=T0)
            queue.claim(now=T0 + 1)
            filler = _fill(state)
            big = {"kind": "done", "blob": "x" * 400_000}
            with pytest.raises(StateUnavailable) as info:
                queue.set_plan(job.id, big)
            assert info.value.reason == "state_dir full" and info.value.code.startswith("SQLITE_FULL")
            with pytest.raises(StateUnavailable, match="state_dir full"):
                queue.insert_finished([Finished(100 + i, f"r{i}.jpg", DONE, 1, 1, "s", [{"path": "x" * 5000}])
                                       for i in range(200)], now=T0)
            assert queue.get(job.id).plan is None                 # rolled back, still readable
            assert queue.counts() == {PENDING: 0, RUNNING: 1, DONE: 0, FAILED: 0}
            filler.unlink()
            queue.set_plan(job.id, big)                           # same object, works again
            assert queue.get(job.id).plan == big
            assert queue.finish(job.id, [], now=T0 + 2).state == DONE
        finally:
            queue.close()


def test_a_queue_cannot_be_created_on_a_full_state_dir(tmp_path):
    with tiny_tmpfs(tmp_path / "state") as state:
        _fill(state)
        with pytest.raises(StateUnavailable, match="state_dir full"):
            Queue(state / "queue.sqlite3")


def test_a_read_only_state_dir_is_state_unavailable(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    Queue(state / "queue.sqlite3").close()
    before = (state / "queue.sqlite3").read_bytes()
    with readonly(state):
        for make in (lambda: Queue(state / "queue.sqlite3"), lambda: open_queue(state / "queue.sqlite3"),
                     lambda: Queue(state / "queue.sqlite3", readonly=True), lambda: Queue(state / "new.sqlite3")):
            with pytest.raises(StateUnavailable) as info:
                make()
            assert info.value.reason == "state_dir read-only"
    assert os.listdir(state) == ["queue.sqlite3"] and (state / "queue.sqlite3").read_bytes() == before
    queue, moved = open_queue(state / "queue.sqlite3")
    assert moved is None and queue.enqueue("a.jpg", 1, 1, "s", now=T0) is not None
    queue.close()


class _HeldLockQueue(Queue):
    """Releases another connection's write lock on the n-th retry (a fake that stands in for time)."""
    release_on: int | None = None
    holder: sqlite3.Connection | None = None
    backoffs: list[int]

    def _backoff(self, attempt: int) -> None:
        self.backoffs.append(attempt)
        if attempt == self.release_on:
            self.holder.execute("COMMIT")


@pytest.mark.parametrize("release_on", [1, 2, None])
def test_a_busy_queue_is_retried_then_reported(tmp_path, release_on):
    path = tmp_path / "queue.sqlite3"
    Queue(path).close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    queue = _HeldLockQueue(path, timeout=0.01, busy_retries=3)
    queue.backoffs, queue.holder, queue.release_on = [], holder, release_on
    try:
        if release_on is None:
            with pytest.raises(StateUnavailable) as info:
                queue.enqueue("a.jpg", 1, 1, "s", now=T0)
            assert info.value.reason == "queue busy" and queue.backoffs == [1, 2, 3]
            holder.execute("COMMIT")
            assert queue.enqueue("a.jpg", 1, 1, "s", now=T0) is not None
        else:
            assert queue.enqueue("a.jpg", 1, 1, "s", now=T0).rel_path == "a.jpg"
            assert queue.backoffs == list(range(1, release_on + 1))
        assert [j.rel_path for j in queue.jobs()] == ["a.jpg"]
    finally:
        queue.close()
        holder.close()


def test_every_public_queue_method_translates_storage_errors():
    delegating = {"finish", "fail", "defer", "requeue", "retry", "close", "quarantine"}   # via apply/_open
    public = {n for n, v in vars(Queue).items() if callable(v) and not n.startswith("_")}
    unguarded = {n for n in public - delegating if not getattr(getattr(Queue, n), "guarded", False)}
    assert not unguarded


# --- corrupt queue files -----------------------------------------------------------------------------

NOW = calendar.timegm((2026, 12, 3, 5, 28, 14))
STAMP = "20261203T052814Z"


def _populated(path: Path, n: int = 1500) -> Path:
    queue = Queue(path)
    for i in range(n):
        queue.enqueue(f"dir/IMG_{i:05}.jpg", i, i, hashlib.sha256(b"%d" % i).hexdigest(), now=T0)
    queue.close()
    return path


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _random_bytes(path: Path) -> None:
    path.write_bytes(random.Random(7).randbytes(64 * 1024))


def _bad_pages(path: Path) -> None:
    pages = path.stat().st_size // 4096
    rng = random.Random(3)
    with open(path, "r+b") as f:
        for pg in (pages // 2, pages // 2 + 2, pages // 2 + 5):
            f.seek(pg * 4096)
            f.write(rng.randbytes(4096))


CORRUPTIONS = {"truncated": _truncate, "random bytes": _random_bytes, "bad pages": _bad_pages}


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
def test_a_corrupt_file_is_queue_corrupt_at_open_or_first_query(tmp_path, how):
    path = _populated(tmp_path / "queue.sqlite3")
    CORRUPTIONS[how](path)
    with pytest.raises(QueueCorrupt) as info:
        queue = Queue(path)
        try:
            queue.jobs()
            queue.quick_check()
        finally:
            queue.close()
    assert info.value.path == str(path)


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
def test_open_queue_moves_a_corrupt_file_aside_and_starts_fresh(tmp_path, how):
    path = _populated(tmp_path / "queue.sqlite3")
    CORRUPTIONS[how](path)
    (tmp_path / "queue.sqlite3-wal").write_bytes(b"stale wal")
    damaged = path.read_bytes()
    with structlog.testing.capture_logs() as logs:
        queue, moved = open_queue(path, now=NOW)
    try:
        assert moved == tmp_path / f"queue.sqlite3.corrupt-{STAMP}"
        assert moved.read_bytes() == damaged                                   # kept, byte for byte
        aside = Path(f"{moved}-wal")           # SQLite itself may drop an invalid WAL when it closes
        assert not aside.exists() or aside.read_bytes() == b"stale wal"
        assert b"stale wal" not in Path(f"{path}-wal").read_bytes()
        assert queue.jobs() == [] and queue.enqueue("new.jpg", 1, 1, "s", now=NOW).id == 1
        ev = [e for e in logs if e["event"] == "queue.corrupt"]
        assert len(ev) == 1 and ev[0]["log_level"] == "error" and ev[0]["moved_to"] == str(moved)
        assert "rebuilt from the folders" in ev[0]["action"]
    finally:
        queue.close()


def test_a_second_quarantine_in_the_same_second_gets_a_suffix(tmp_path):
    path = tmp_path / "queue.sqlite3"
    names = []
    for _ in range(3):
        path.write_bytes(b"not a database at all" * 100)
        queue, moved = open_queue(path, now=NOW)
        queue.close()
        path.unlink()
        names.append(moved.name)
    assert names == [f"queue.sqlite3.corrupt-{STAMP}", f"queue.sqlite3.corrupt-{STAMP}.1",
                     f"queue.sqlite3.corrupt-{STAMP}.2"]
    assert all((tmp_path / n).read_bytes().startswith(b"not a database") for n in names)


def test_a_healthy_or_empty_file_is_not_quarantined(tmp_path):
    path = _populated(tmp_path / "queue.sqlite3", n=3)
    queue, moved = open_queue(path, now=NOW)
    assert moved is None and len(queue.jobs()) == 3
    queue.close()
    empty = tmp_path / "empty.sqlite3"
    empty.write_bytes(b"")
    queue, moved = open_queue(empty, now=NOW)
    assert moved is None and queue.counts()[PENDING] == 0
    queue.close()
    assert not [p for p in os.listdir(tmp_path) if ".corrupt-" in p]


def test_runtime_corruption_is_quarantined_by_the_same_queue_object(tmp_path):
    path = _populated(tmp_path / "queue.sqlite3")
    _bad_pages(path)
    queue = Queue(path)                        # opens: the damage is in the middle
    try:
        with pytest.raises(QueueCorrupt):
            queue.jobs()
        moved = queue.quarantine(now=NOW)
        assert re.fullmatch(r"queue\.sqlite3\.corrupt-\d{8}T\d{6}Z", moved.name) and moved.exists()
        assert queue.jobs() == [] and queue.enqueue("a.jpg", 1, 1, "s", now=NOW).state == PENDING
        queue.quick_check()
    finally:
        queue.close()


def test_insert_finished_keeps_ids_and_new_ids_continue_above(q):
    rows = [Finished(7, os.fsdecode(b"caf\xe9.jpg"), DONE, 10, 20, "a" * 64, [{"path": "/o/caf.jpg"}],
                     params={"key": "k", "rebuilt": True}),
            Finished(42, "b.jpg", FAILED, 1, 0, "b" * 64, [{"path": "/f/b.jpg"}], error_kind="undecodable",
                     last_error="broken", attempts=1)]
    assert q.insert_finished(rows, now=T0) == [7, 42]
    assert q.insert_finished(rows[:1], now=T0) == []               # an id is never inserted twice
    assert q.get(7).rel_path == os.fsdecode(b"caf\xe9.jpg") and q.get(42).error_kind == "undecodable"
    assert q.enqueue("new.jpg", 1, 1, "s", now=T0).id == 43
    assert q.rebuilt_done(os.fsdecode(b"caf\xe9.jpg"), "a" * 64).id == 7
    assert q.rebuilt_done(os.fsdecode(b"caf\xe9.jpg"), "c" * 64) is None
    assert q.rebuilt_done("b.jpg", "b" * 64) is None                # failed, not done
    assert q.done_with("a" * 64, "k").id == 7
    with pytest.raises(ValueError):
        q.insert_finished([Finished(50, "p.jpg", PENDING, 1, 1, "s", [])], now=T0)
    assert q.counts() == {PENDING: 1, RUNNING: 0, DONE: 1, FAILED: 1}
