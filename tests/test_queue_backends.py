"""The queue contract, run against both backends (SQLite in tmp_path; PostgreSQL in a private
cluster started by the test set-up, a fresh database per test), plus what several hosts need:
leases, fencing tokens, hosts, idempotent enqueue across connections, a server that goes away.

A parametrised copy of tests/test_queue.py's backend-independent tests (through the public API
only, no raw SQL) and the multi-host additions. No mocks; times are passed explicitly (`now=`) and
the lease clock is a small fake where a test needs a lease to expire.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import pytest
import structlog

from _pg import pg_cluster, pg_url  # noqa: F401  (fixtures)
from watcher import backends
from watcher.backends import Host, LeasedJob, SqliteQueue, mask_url
from watcher.errors import InvalidTransition, LeaseLost, StateUnavailable, UnknownJob
from watcher.queue import AHEAD, DONE, FAILED, PENDING, RUNNING, STATES, TRANSITIONS, Finished, Job

EVENTS = sorted({event for _, event in TRANSITIONS})
T0 = 1_000_000.0
HOST_A = Host("aaaaaaaaaaaa", "alpha", 101, "1.0")
HOST_B = Host("bbbbbbbbbbbb", "beta", 202, "1.0")


class Clock:
    """The lease clock, moved by hand."""

    def __init__(self, t: float = 5_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture(params=["sqlite", "postgresql"])
def make(request, tmp_path):
    """make(host=None, clock=None, lease_s=10) → a new queue object (its own connection) on the
    same store; all closed at the end."""
    opened = []
    if request.param == "sqlite":
        path = tmp_path / "queue.sqlite3"

        def factory(host=None, clock=None, lease_s=10.0, **kw):
            q = SqliteQueue(path, host=host, lease_s=lease_s, clock=clock or Clock(), **kw)
            opened.append(q)
            return q
    else:
        url = request.getfixturevalue("pg_url")

        def factory(host=None, clock=None, lease_s=10.0, **kw):
            from watcher.pgqueue import PgQueue
            q = PgQueue(url, host=host, lease_s=lease_s, clock=clock or Clock(), **kw)
            opened.append(q)
            return q
    factory.backend = request.param
    yield factory
    for q in opened:
        q.close()


@pytest.fixture
def q(make):
    return make()


def _job_in(queue, state: str, rel: str) -> Job:
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


# --- the state machine (parametrised copy of test_queue.py) ------------------------------------

@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("event", EVENTS)
def test_every_state_event_pair_follows_the_table(q, state, event):
    job = _job_in(q, state, f"{state}-{event}.jpg")
    before = q.get(job.id)
    new = TRANSITIONS.get((state, event))
    if new is None:
        with pytest.raises(InvalidTransition):
            q.apply(job.id, event, now=T0 + 50)
        assert q.get(job.id) == before
    else:
        moved = q.apply(job.id, event, now=T0 + 50)
        assert moved.state == new and moved.updated == T0 + 50
        assert q.get(job.id).state == new


@pytest.mark.parametrize("op", ["finish", "fail", "retry_later", "defer", "requeue", "retry"])
def test_named_operations_refuse_illegal_states_and_change_nothing(q, op):
    job = _job_in(q, DONE, "x.jpg")
    before = q.get(job.id)
    calls = {"finish": lambda: q.finish(job.id, []), "fail": lambda: q.fail(job.id, "k", "m"),
             "retry_later": lambda: q.retry_later(job.id, "k", "m", 5),
             "defer": lambda: q.defer(job.id, "r", 5), "requeue": lambda: q.requeue(job.id),
             "retry": lambda: q.retry(job.id)}
    with pytest.raises(InvalidTransition):
        calls[op]()
    assert q.get(job.id) == before


def test_unknown_job_raises(q):
    with pytest.raises(UnknownJob):
        q.apply(4242, "claim")
    with pytest.raises(UnknownJob):
        q.get(4242)
    with pytest.raises(UnknownJob):
        q.retry_later(4242, "k", "m", 1)


def test_claim_takes_the_oldest_due_job_first_and_respects_not_before(q):
    late = q.enqueue("late.jpg", 1, 1, "a", now=T0, not_before=T0 + 100)
    ids = [q.enqueue(f"{i}.jpg", 1, 1, f"s{i}", now=T0 + i).id for i in range(3)]
    assert [q.claim(now=T0 + 10).id for _ in range(3)] == ids
    assert q.claim(now=T0 + 99) is None
    got = q.claim(now=T0 + 100)
    assert got.id == late.id and got.state == RUNNING and got.started == T0 + 100


def test_claim_clears_wait_reason(q):
    job = _job_in(q, RUNNING, "w.jpg")
    q.defer(job.id, "outbox disk full", 0, now=T0 + 3)
    assert q.get(job.id).wait_reason == "outbox disk full"
    again = q.claim(now=T0 + 4)
    assert again.id == job.id and again.wait_reason is None


def test_concurrent_claims_from_two_connections_never_share_a_job(make):
    setup = make()
    n = 80
    for i in range(n):
        setup.enqueue(f"f{i:03}.jpg", 1, 1, f"s{i}", now=T0)
    queues = {"a": make(host=HOST_A), "b": make(host=HOST_B)}
    claimed: dict[str, list[int]] = {"a": [], "b": []}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def worker(name: str) -> None:
        try:
            barrier.wait()
            while (job := queues[name].claim(now=T0 + 1)) is not None:
                claimed[name].append(job.id)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in claimed]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert not set(claimed["a"]) & set(claimed["b"])
    assert len(claimed["a"]) + len(claimed["b"]) == n
    assert setup.counts() == {PENDING: 0, RUNNING: n, DONE: 0, FAILED: 0}


def test_enqueue_records_the_file_and_refuses_a_second_active_job(q):
    job = q.enqueue("a/b/IMG.jpg", 123, 456, "abc", now=T0)
    assert (job.rel_path, job.size, job.mtime_ns, job.sha256, job.state) == ("a/b/IMG.jpg", 123, 456, "abc", PENDING)
    assert job.created == T0 == job.updated and job.plan is None and job.outputs == [] and job.params == {}
    assert q.enqueue("a/b/IMG.jpg", 99, 99, "other", now=T0 + 5) is None
    q.claim(now=T0 + 6)
    assert q.enqueue("a/b/IMG.jpg", 99, 99, "other", now=T0 + 7) is None
    assert q.active("a/b/IMG.jpg").id == job.id


@pytest.mark.parametrize("final", [DONE, FAILED])
def test_enqueue_allows_a_new_job_after_done_or_failed(q, final):
    old = _job_in(q, final, "again.jpg")
    assert q.active("again.jpg") is None
    new = q.enqueue("again.jpg", 11, 22, "new-content", now=T0 + 5)
    assert new is not None and new.id != old.id and new.state == PENDING
    assert q.get(old.id).state == final


def test_enqueue_is_idempotent_across_hosts_racing_for_the_same_files(make):
    """Every host discovers the same files at once: each file becomes exactly one job."""
    queues = [make(host=h) for h in (HOST_A, HOST_B, Host("cccccccccccc", "gamma", 3, "1"))]
    results: list[list] = [[] for _ in queues]
    barrier = threading.Barrier(len(queues))

    def run(i):
        barrier.wait()
        for k in range(60):
            results[i].append(queues[i].enqueue(f"dir/{k:03}.jpg", 1, 1, f"s{k}", now=T0))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(queues))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    made = [j for r in results for j in r if j is not None]
    assert len(made) == 60 and len({j.rel_path for j in made}) == 60
    assert queues[0].counts()[PENDING] == 60


def test_attempts_backoff_defer_and_retry(q):
    job = _job_in(q, RUNNING, "r.jpg")
    q.set_plan(job.id, {"kind": "done", "steps": []})
    moved = q.retry_later(job.id, "out_of_memory", "CUDA OOM", 30, now=T0 + 10)
    assert moved.state == PENDING and moved.attempts == 1 and moved.not_before == T0 + 40 and moved.plan is None
    assert q.claim(now=T0 + 39) is None
    again = q.claim(now=T0 + 40)
    assert again.id == job.id and again.attempts == 1
    d = q.defer(job.id, "outbox read-only", 5, now=T0 + 50)
    assert d.state == PENDING and d.attempts == 1 and d.wait_reason == "outbox read-only"
    q.claim(now=T0 + 55)
    failed = q.fail(job.id, "out_of_memory", "again", now=T0 + 60, attempts=3, outputs=[{"path": "/f/r.jpg"}])
    assert failed.state == FAILED and failed.attempts == 3 and failed.outputs == [{"path": "/f/r.jpg"}]
    back = q.retry(job.id, now=T0 + 70, file=(5, 6, "new"))
    assert back.state == PENDING and back.attempts == 0 and back.error_kind is None and back.outputs == []
    assert (back.size, back.mtime_ns, back.sha256) == (5, 6, "new")


def test_requeue_running_counts_an_interruption_and_keeps_attempts(q):
    job = _job_in(q, RUNNING, "k.jpg")
    q.retry_later(job.id, "k", "m", 0, now=T0 + 2)
    q.claim(now=T0 + 3)
    other = _job_in(q, PENDING, "other.jpg")
    back = q.requeue_running(now=T0 + 500)
    assert [j.id for j in back] == [job.id]
    j = q.get(job.id)
    assert j.state == PENDING and j.attempts == 1 and j.not_before == 0 and j.interruptions == 1
    assert q.get(other.id).state == PENDING and q.requeue_running(now=T0 + 501) == []


def test_finish_records_outputs_and_forget_only_active(q):
    job = _job_in(q, RUNNING, "o.jpg")
    q.set_plan(job.id, {"kind": "done", "steps": [{"op": "place"}]}, params={"key": "k1"}, profile="faces")
    assert [j.id for j in q.with_plan()] == [job.id]
    got = q.get(job.id)
    assert got.params == {"key": "k1"} and got.profile == "faces"
    done = q.finish(job.id, [{"path": "/out/o.jpg", "sha256": "s"}], now=T0 + 7)
    assert done.state == DONE and done.plan is None and done.finished == T0 + 7 and q.with_plan() == []
    with pytest.raises(InvalidTransition):
        q.set_plan(job.id, {"kind": "done"})
    with pytest.raises(InvalidTransition):
        q.forget(job.id)
    p = _job_in(q, PENDING, "p.jpg")
    q.forget(p.id)
    with pytest.raises(UnknownJob):
        q.get(p.id)


def test_done_with_and_rebuilt_rows(q):
    def done(rel, sha, key, outputs):
        job = q.enqueue(rel, 1, 1, sha, now=T0)
        q.claim(now=T0 + 1)
        q.set_plan(job.id, {"kind": "done", "steps": []}, params={"key": key})
        return q.finish(job.id, outputs, now=T0 + 2)
    done("a.jpg", "SHA", "faces:2", [{"path": "/o/a.jpg"}])
    later = done("b.jpg", "SHA", "faces:2", [{"path": "/o/b.jpg"}])
    done("e.jpg", "SHA", "full:4", [])
    assert q.done_with("SHA", "faces:2").id == later.id
    assert q.done_with("SHA", "full:4") is None and q.done_with("OTHER", "faces:2") is None
    rows = [Finished(700, os.fsdecode(b"caf\xe9.jpg"), DONE, 10, 20, "a" * 64, [{"path": "/o/caf.jpg"}],
                     params={"key": "k", "rebuilt": True}),
            Finished(742, "z.jpg", FAILED, 1, 0, "b" * 64, [{"path": "/f/z.jpg"}], error_kind="undecodable")]
    assert q.insert_finished(rows, now=T0) == [700, 742]
    assert q.insert_finished(rows[:1], now=T0) == []
    assert q.enqueue("new.jpg", 1, 1, "s", now=T0).id == 743
    assert q.rebuilt_done(os.fsdecode(b"caf\xe9.jpg"), "a" * 64).id == 700


def test_counts_listing_and_reads(q):
    for state, rel in ((PENDING, "p1.jpg"), (PENDING, "p2.jpg"), (RUNNING, "r.jpg"), (DONE, "d.jpg"),
                       (FAILED, "f.jpg")):
        _job_in(q, state, rel)
    assert q.counts() == {PENDING: 2, RUNNING: 1, DONE: 1, FAILED: 1}
    assert [j.rel_path for j in q.jobs(PENDING)] == ["p1.jpg", "p2.jpg"]
    assert len(q.jobs()) == 5 and len(q.jobs(limit=2)) == 2
    assert q.due_pending(T0 + 10) == 2 and q.done_since(T0) == 1 and q.backing_off(T0) == 0
    assert q.jobs(FAILED)[0].public()["error_kind"] == "undecodable"


HOSTILE = [b"caf\xe9.jpg", b"caf\xe8.jpg", "caf\xe9.jpg".encode(), b"line\nbreak.jpg", b"tab\there.png",
           b"\x1b[31mred.jpg", "sep\u2028arator.jpg".encode(), b"sub\n dir/\xe9t\xe9 \x1b[31m.jpg", b"--", b"\x7f"]


def test_hostile_names_survive_every_operation(q, tmp_path):
    rels = sorted(os.fsdecode(r) for r in HOSTILE)
    jobs = {rel: q.enqueue(rel, 1, 2, hashlib.sha256(os.fsencode(rel)).hexdigest(), now=T0) for rel in rels}
    assert all(j is not None and j.rel_path == rel for rel, j in jobs.items())
    assert len({j.id for j in jobs.values()}) == len(rels)            # invalid bytes are different names
    for rel, job in jobs.items():
        assert q.active(rel).id == job.id and q.enqueue(rel, 1, 2, "again", now=T0) is None
    claimed = [q.claim(now=T0 + 1) for _ in rels]
    assert sorted(j.rel_path for j in claimed) == rels
    for i, job in enumerate(claimed):
        q.set_plan(job.id, {"kind": "done", "dst": str(tmp_path / job.rel_path)}, params={"name": job.rel_path})
        if i % 2:
            q.finish(job.id, [{"path": str(tmp_path / job.rel_path)}], now=T0 + 2)
        else:
            q.fail(job.id, "undecodable", f"cannot decode {job.rel_path}\x00", now=T0 + 2,
                   outputs=[{"path": str(tmp_path / job.rel_path)}])
    for job in q.jobs():
        assert job.rel_path in rels and job.params == {"name": job.rel_path}
        assert json.loads(json.dumps(job.public()))["path"] == job.rel_path


def test_every_public_method_translates_storage_errors(make):
    from watcher.pgqueue import PgQueue
    for cls, delegating in ((SqliteQueue, {"finish", "fail", "defer", "requeue", "retry", "close", "quarantine",
                                           "holds"}),
                            (PgQueue, {"close", "quarantine", "quick_check", "holds", "schema_version"})):
        public = {n for c in cls.__mro__ for n, v in vars(c).items() if callable(v) and not n.startswith("_")}
        unguarded = {n for n in public - delegating if not getattr(getattr(cls, n), "guarded", False)}
        assert not unguarded, (cls.__name__, unguarded)


def test_both_backends_have_the_same_public_interface():
    from watcher.pgqueue import PgQueue
    extra_sqlite = {"quarantine"}
    pub = lambda cls: {n for c in cls.__mro__ if c is not object for n, v in vars(c).items()  # noqa: E731
                       if callable(v) and not n.startswith("_")}
    assert pub(SqliteQueue) - pub(PgQueue) - {"record_request", "requests", "paused", "set_paused"} == set()
    assert pub(PgQueue) - pub(SqliteQueue) <= {"schema_version"} | extra_sqlite


# --- leases and fencing -------------------------------------------------------------------------

def test_claims_carry_increasing_tokens_and_a_lease_the_heartbeat_renews(make):
    clock = Clock()
    a = make(host=HOST_A, clock=clock, lease_s=10)
    for i in range(3):
        a.enqueue(f"{i}.jpg", 1, 1, "s", now=T0)
    jobs = [a.claim(now=T0 + 1) for _ in range(3)]
    assert all(isinstance(j, LeasedJob) for j in jobs)
    tokens = [j.token for j in jobs]
    assert tokens == sorted(tokens) and len(set(tokens)) == 3
    assert jobs[0].lease_host == HOST_A.id and jobs[0].lease_expires == pytest.approx(clock.t + 10)
    clock.t += 8
    assert a.heartbeat(jobs[0].id, jobs[0].token) == pytest.approx(clock.t + 10)
    clock.t += 8                      # 16 s after the claim: only the renewed lease is still live
    b = make(host=HOST_B, clock=clock)
    assert [j.id for j in b.expire_leases(now=T0 + 2)] == [jobs[1].id, jobs[2].id]
    assert [j.id for j in b.jobs(PENDING)] == [jobs[1].id, jobs[2].id]
    assert all(j.interruptions == 1 for j in b.jobs(PENDING))
    assert b.get(jobs[0].id).state == RUNNING


def test_an_expired_lease_on_a_job_only_decoded_ahead_counts_no_interruption(make):
    """As at a restart: a job marked AHEAD never reached the model, so its lease running out
    returns it to pending without counting an interruption; the one in the model counts one."""
    clock = Clock()
    a = make(host=HOST_A, clock=clock, lease_s=10)
    for name in ("model.jpg", "ahead.jpg"):
        a.enqueue(name, 1, 1, "s", now=T0)
    in_model, ahead = a.claim(now=T0 + 1), a.claim(now=T0 + 1)
    a.set_plan(ahead.id, None, wait_reason=AHEAD)
    clock.t += 11
    b = make(host=HOST_B, clock=clock)
    back = {j.id: j for j in b.expire_leases(now=T0 + 2)}
    assert set(back) == {in_model.id, ahead.id}
    assert b.get(in_model.id).interruptions == 1
    assert b.get(ahead.id).interruptions == 0 and b.get(ahead.id).state == PENDING
    # pending again: no stale "decoded ahead" reason for `status` to show (as after a restart)
    assert b.get(ahead.id).wait_reason is None and b.get(in_model.id).wait_reason is None


def test_an_expired_lease_goes_back_to_pending_and_the_old_holder_is_fenced_off(make):
    clock = Clock()
    a = make(host=HOST_A, clock=clock, lease_s=10)
    b = make(host=HOST_B, clock=clock, lease_s=10)
    job = a.enqueue("cut.jpg", 1, 1, "s", now=T0)
    ja = a.claim(now=T0 + 1)
    clock.t += 11                     # host A is cut off longer than the lease
    with structlog.testing.capture_logs() as logs:
        jb = b.claim(now=T0 + 2)
    assert jb.id == job.id and jb.token > ja.token and jb.lease_host == HOST_B.id and jb.interruptions == 1
    assert any(e["event"] == "queue.lease_expired" and e["job"] == job.id for e in logs)
    before = a.get(job.id)
    late = {"set_plan": lambda: a.set_plan(job.id, {"kind": "done", "steps": []}),
            "finish": lambda: a.finish(job.id, [{"path": "/o/late.jpg"}]),
            "fail": lambda: a.fail(job.id, "internal", "late"),
            "retry_later": lambda: a.retry_later(job.id, "k", "m", 1),
            "defer": lambda: a.defer(job.id, "r", 1), "requeue": lambda: a.requeue(job.id),
            "heartbeat": lambda: a.heartbeat(job.id, ja.token), "forget": lambda: a.forget(job.id)}
    for name, call in late.items():
        a._held[job.id] = ja.token    # each late write as the old holder would make it
        with pytest.raises(LeaseLost):
            call()
        assert b.get(job.id) == before, name
    b.set_plan(job.id, {"kind": "done", "steps": []})
    assert b.finish(job.id, [{"path": "/o/cut.jpg"}], now=T0 + 3).state == DONE


def test_a_late_heartbeat_after_the_job_finished_elsewhere_is_lease_lost(make):
    clock = Clock()
    a, b = make(host=HOST_A, clock=clock), make(host=HOST_B, clock=clock)
    a.enqueue("x.jpg", 1, 1, "s", now=T0)
    ja = a.claim(now=T0)
    clock.t += 100
    jb = b.claim(now=T0 + 1)
    b.finish(jb.id, [], now=T0 + 2)
    with pytest.raises(LeaseLost):
        a.heartbeat(ja.id, ja.token)
    assert b.get(ja.id).state == DONE


def test_hosts_register_and_report_their_status(make):
    a = make(host=HOST_A, register=True)
    b = make(host=HOST_B, register=True)
    a.enqueue("x.jpg", 1, 1, "s", now=T0)
    job = a.claim(now=T0)
    bad = os.fsdecode(b"caf\xe9.jpg")
    b.set_daemon(HOST_B.pid, "idle", None, None)
    a.set_daemon(HOST_A.pid, "working", f"on {bad}", {"job": job.id, "path": bad}, started=T0)
    hosts = {h["id"]: h for h in a.hosts()}
    assert set(hosts) >= {HOST_A.id, HOST_B.id}
    assert hosts[HOST_A.id]["name"] == "alpha" and hosts[HOST_A.id]["current_job"] == job.id
    assert hosts[HOST_A.id]["state"] == "working" and hosts[HOST_A.id]["reason"] == "on caf\\xe9.jpg"
    assert hosts[HOST_B.id]["state"] == "idle" and hosts[HOST_B.id]["version"] == "1.0"
    d = a.daemon()
    assert d["state"] == "working" and d["current"] == {"job": job.id, "path": bad}


def test_requeue_running_at_start_takes_back_only_this_hosts_jobs(make):
    if make.backend == "sqlite":
        pytest.skip("one host per SQLite queue: every running job is this host's")
    a, b = make(host=HOST_A), make(host=HOST_B)
    a.enqueue("a.jpg", 1, 1, "s", now=T0)
    a.enqueue("b.jpg", 1, 1, "s", now=T0)
    ja, jb = a.claim(now=T0), b.claim(now=T0)
    restarted = make(host=HOST_A)
    assert [j.id for j in restarted.requeue_running(now=T0 + 1)] == [ja.id]
    assert restarted.get(jb.id).state == RUNNING and restarted.get(ja.id).interruptions == 1


# --- PostgreSQL operations ---------------------------------------------------------------------

def test_a_postgres_restart_is_waited_for_and_the_same_queue_works_again(pg_cluster, pg_url):
    from watcher.pgqueue import PgQueue
    q = PgQueue(pg_url, host=HOST_A, retries=1, connect_timeout=2)
    try:
        q.enqueue("a.jpg", 1, 1, "s", now=T0)
        pg_cluster.stop_server()
        with pytest.raises(StateUnavailable) as info:
            q.counts()
        assert info.value.reason == "PostgreSQL unavailable"
        pg_cluster.start_server()
        assert q.counts()[PENDING] == 1                   # reconnected, nothing lost
        job = q.claim(now=T0)
        pg_cluster.restart()                              # connection dropped between two calls
        assert q.heartbeat(job.id, job.token) > 0
        assert q.finish(job.id, [], now=T0 + 1).state == DONE
    finally:
        q.close()


def test_credentials_never_reach_messages(pg_cluster, tmp_path):
    from watcher.pgqueue import PgQueue
    secret = "s3cr3t-Pa55"
    url = f"postgresql://postgres:{secret}@127.0.0.1:1/nowhere"
    assert secret not in mask_url(url) and "***" in mask_url(url)
    assert secret not in mask_url(f"postgresql:///db?host=x&password={secret}")
    with structlog.testing.capture_logs() as logs:
        with pytest.raises(StateUnavailable) as info:
            PgQueue(url, retries=1, connect_timeout=1)
    assert secret not in str(info.value) and secret not in info.value.path
    assert secret not in json.dumps(logs, default=str)


def test_libpq_reads_the_password_from_pgpassfile(pg_cluster, tmp_path, monkeypatch):
    """A role with a password and scram auth would need a restart of the test cluster; here the
    point is that the URL carries no password and libpq's own PGPASSFILE is honoured (trust
    auth accepts any): the connection works with the file as the only source."""
    from watcher.pgqueue import PgQueue
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"127.0.0.1:{pg_cluster.port}:*:postgres:from-the-file\n")
    passfile.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    q = PgQueue(pg_cluster.url("tmpl"), check_schema=True)
    try:
        assert q.counts()[PENDING] == 0 and q.db.info.password in ("from-the-file", "")
    finally:
        q.close()


def test_schema_versions_are_checked_at_start(pg_cluster, pg_url):
    import psycopg
    from watcher.pgqueue import SCHEMA_VERSION, PgQueue, migrate
    assert migrate(pg_url) == []                           # already up to date
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("INSERT INTO schema_migrations (version, name, applied) VALUES (%s, 'future', 0)",
                     (SCHEMA_VERSION + 1,))
    with pytest.raises(StateUnavailable, match="newer than this program"):
        PgQueue(pg_url, retries=0)
    blank = pg_url.rsplit("/", 1)[0] + "/postgres"
    with pytest.raises(StateUnavailable, match="run photoenhanced queue migrate"):
        PgQueue(blank, retries=0)


def test_migrate_copies_a_sqlite_queue(pg_cluster, pg_url, tmp_path):
    from watcher.migrate import copy_queue
    from watcher.pgqueue import PgQueue
    src = SqliteQueue(tmp_path / "queue.sqlite3")
    bad = os.fsdecode(b"caf\xe9.jpg")
    a = src.enqueue(bad, 1, 2, "sa", now=T0)
    b = src.enqueue("b.jpg", 1, 2, "sb", now=T0)
    src.enqueue("c.jpg", 1, 2, "sc", now=T0)
    src.claim(now=T0)
    src.set_plan(a.id, {"kind": "done", "steps": [{"op": "place", "tmp": "/t", "dst": "/d"}]})
    src.claim(now=T0)
    src.finish(b.id, [{"path": "/o/b.jpg"}], now=T0 + 1)
    before = {j.id: j for j in src.jobs()}
    src.close()
    stats = copy_queue(tmp_path / "queue.sqlite3", pg_url)
    assert stats == {"jobs": 3, "pending": 2, "running": 0, "done": 1, "failed": 0, "requeued": 1}
    dst = PgQueue(pg_url)
    try:
        after = {j.id: j for j in dst.jobs()}
        assert set(after) == set(before)
        assert after[a.id].rel_path == bad and after[a.id].plan == before[a.id].plan
        assert after[a.id].state == PENDING and after[a.id].interruptions == 1
        assert after[b.id] == before[b.id]
        assert dst.enqueue("d.jpg", 1, 1, "s", now=T0).id == max(before) + 1
        with pytest.raises(Exception, match="already holds jobs"):
            copy_queue(tmp_path / "queue.sqlite3", pg_url)
    finally:
        dst.close()


# --- the CLI on a shared queue -----------------------------------------------------------------

def test_cli_queue_migrate_status_lists_hosts_and_never_prints_a_password(pg_cluster, tmp_path):
    from conftest import cli, write_config
    from watcher.pgqueue import PgQueue
    url = pg_cluster.createdb(f"cli{os.getpid()}")
    cfg = write_config(tmp_path, queue={"url": url, "lease_seconds": 30})
    r = cli(cfg, "queue", "migrate")
    assert r.returncode == 0 and "schema 2 (applied 1, 2)" in r.stdout, r.stderr
    assert cli(cfg, "queue", "migrate").stdout.strip().endswith("(up to date)")
    for h in (HOST_A, HOST_B):
        q = PgQueue(url, host=h)
        q.set_daemon(h.pid, "idle", None, None)
        q.close()
    r = cli(cfg, "status", "--json")
    assert r.returncode == 0, r.stderr
    hosts = {h["name"]: h for h in json.loads(r.stdout)["hosts"]}
    assert set(hosts) == {"alpha", "beta"} and hosts["alpha"]["health"] == "alive"
    text = cli(cfg, "status").stdout
    assert "hosts:   2 on postgresql://postgres@127.0.0.1" in text and "alpha [aaaaaaaaaaaa]" in text
    secret = "hunter2-secret"
    (tmp_path / "bad").mkdir()
    bad = write_config(tmp_path / "bad", queue={"url": f"postgresql://postgres:{secret}@127.0.0.1:1/nowhere"})
    for args in (("status",), ("status", "--json"), ("list",), ("queue", "migrate")):
        r = cli(bad, *args)
        assert secret not in r.stdout + r.stderr, args
    assert "***" in cli(bad, "queue", "migrate").stderr
