"""A job in hand while PostgreSQL is away, and the pruning of the hosts table.

* A host that loses PostgreSQL mid-job keeps its result and waits (queue.waiting, with growing
  pauses, STATUS/status saying why) far longer than the few quick retries of any other operation;
  back online, its fenced write decides: the token is still current → it completes; another host
  took the job meanwhile → LeaseLost, the result is discarded and the new owner finishes it.
* Host rows of daemons silent for days, or gone and holding no lease, are pruned.

The queue-level tests drive the outage deterministically through the `on_wait` hook (it runs in
the waiting thread, before each pause); the daemon test stops the real server with pg_ctl.
"""
from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest

from _hosts import Host, host_config
from _invariants import Cand, check, cli_raw, drop, image_bytes, sha
from _pg import pg_cluster, pg_url  # noqa: F401  (fixtures)
from watcher.backends import Host as HostId, SqliteQueue
from watcher.errors import LeaseLost, StateUnavailable
from watcher.queue import DONE, PENDING, RUNNING

T0 = 1_700_000_000.0
A = HostId("aaaaaaaaaaaa", "host-a", 1, "1")
B = HostId("bbbbbbbbbbbb", "host-b", 2, "1")


def _pq(url, host, **kw):
    from watcher.pgqueue import PgQueue
    return PgQueue(url, host=host, connect_timeout=2, **kw)


def test_a_job_in_hand_waits_through_an_outage_and_completes(pg_cluster, pg_url):
    rounds: list[int] = []

    def on_wait():                       # PostgreSQL comes back after several rounds of waiting
        rounds.append(1)
        if len(rounds) == 2:
            pg_cluster.start_server()

    a = _pq(pg_url, A, on_wait=on_wait)
    other = _pq(pg_url, None)
    try:
        a.enqueue("x.jpg", 1, 1, "s", now=T0)
        job = a.claim()
        pg_cluster.stop_server()
        with pytest.raises(StateUnavailable):
            other.counts()               # an operation without a job in hand still gives up quickly
        a.set_plan(job.id, {"kind": "done", "steps": []})        # waits, then is recorded
        assert len(rounds) == 2 and a.holds(job.id) == job.token
        assert a.get(job.id).state == RUNNING and a.get(job.id).plan == {"kind": "done", "steps": []}
        assert a.finish(job.id, [{"path": "out/x.jpg"}]).state == DONE
        assert other.get(job.id).interruptions == 0 and other.get(job.id).outputs == [{"path": "out/x.jpg"}]
    finally:
        pg_cluster.start_server() if not _up(pg_cluster) else None
        a.close()
        other.close()


def test_a_job_taken_over_during_the_outage_is_fenced_off_when_the_server_returns(pg_cluster, pg_url):
    b = None
    stolen: list[int] = []

    def on_wait():                       # back online, and another host gets there first
        nonlocal b
        if stolen:
            return
        pg_cluster.start_server()
        b = _pq(pg_url, B, lease_s=60)
        with b._tx() as cur:                                   # the waiting host's lease ran out …
            cur.execute("UPDATE jobs SET lease_expires = 0 WHERE state = 'running'")
        stolen.append(b.claim().id)                            # … and B claims the job

    a = _pq(pg_url, A, on_wait=on_wait, lease_s=60)
    try:
        a.enqueue("x.jpg", 1, 1, "s", now=T0)
        job = a.claim()
        a.set_plan(job.id, {"kind": "done", "steps": []})      # mid-publish: the heartbeat waits too
        pg_cluster.stop_server()
        with pytest.raises(LeaseLost):
            a.heartbeat(job.id, job.token)
        assert stolen == [job.id] and a.holds(job.id) is None
        with pytest.raises(LeaseLost):
            a.finish(job.id, [])                               # nothing of A's is recorded
        cur = b.get(job.id)
        assert cur.state == RUNNING and cur.interruptions == 1 and b.lease(job.id)["host"] == B.id
        assert b.finish(job.id, [{"path": "out/x.jpg"}]).state == DONE   # the new owner finishes it
    finally:
        pg_cluster.start_server() if not _up(pg_cluster) else None
        a.close()
        if b is not None:
            b.close()


def test_a_bounded_wait_gives_the_job_up(pg_cluster, pg_url):
    a = _pq(pg_url, A, hold_s=0.0)
    try:
        a.enqueue("x.jpg", 1, 1, "s", now=T0)
        job = a.claim()
        pg_cluster.stop_server()
        with pytest.raises(StateUnavailable):
            a.set_plan(job.id, None)
        assert a.holds(job.id) is None        # let go: its lease runs out and another claim redoes it
    finally:
        pg_cluster.start_server()
        a.close()


def _up(pg) -> bool:
    import socket
    try:
        socket.create_connection(("127.0.0.1", pg.port), 0.5).close()
        return True
    except OSError:
        return False


# --- the real daemon: PostgreSQL stopped with pg_ctl while the job is in the model ---------------

def test_daemon_keeps_its_result_through_a_postgres_outage(tmp_path, pg_cluster):
    from watcher.pgqueue import PgQueue, migrate
    url = pg_cluster.createdb(f"outage_{int(time.time() * 1000) % 10**9}")
    migrate(url)
    cfg = host_config(tmp_path, 1, url, lease_s=60)
    h = Host(1, cfg, [], env={"FAKE_DELAY": "3"})
    expected = {}
    try:
        h.wait_event("daemon.ready", 60)
        data = image_bytes(4242)
        expected[sha(data)] = Cand(b"p.jpg", "photo", expect="done")
        drop(tmp_path / "inbox", b"p.jpg", data)
        h.wait_event("job.started", 60)
        pg_cluster.stop_server()                      # mid-model: the render goes on without the queue
        waiting = h.wait_event("queue.waiting", 60)   # the result is ready: recording it waits
        assert waiting["op"] in ("set_plan", "get", "with_plan", "done_with")
        h.wait_event("state_dir.unusable", 30)        # the daemon's status side noticed too
        time.sleep(4)                                 # longer than the old retries (~1.4 s)
        code, out, _ = cli_raw(cfg, "status", "--json")
        doc = json.loads(out)
        assert doc["daemon"]["state"] == "waiting" and "PostgreSQL unavailable" in doc["daemon"]["reason"], doc
        assert not h.events("job.done") and not h.events("job.lease_lost")
        pg_cluster.start_server()
        done = h.wait_event("job.done", 60)
        assert h.events("queue.back")
        assert h.stop() == 0
        report = check(tmp_path, expected)
        assert report.lost == 0 and report.duplicated == 0 and report.outcomes["done"] == 1
        q = PgQueue(url)
        try:
            job = q.get(done["job"])
        finally:
            q.close()
        assert job.state == DONE and job.interruptions == 0 and job.attempts == 0   # done once, not redone
    finally:
        if not _up(pg_cluster):
            pg_cluster.start_server()
        h.kill()


# --- pruning the hosts table ---------------------------------------------------------------------

def _seen(url, host_id, last_seen, state=None):
    import psycopg
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("UPDATE hosts SET last_seen = %s, state = COALESCE(%s, state) WHERE id = %s",
                  (last_seen, state, host_id))


def test_stale_host_rows_are_pruned(pg_url):
    now = time.time()
    ids = {k: HostId(k * 12, f"host-{k}", 1, "1") for k in "cdefg"}
    qs = {k: _pq(pg_url, h) for k, h in ids.items()}
    try:
        qs["f"].enqueue("held.jpg", 1, 1, "s")
        held = qs["f"].claim()
        _seen(pg_url, ids["c"].id, now - 8 * 86400)                  # silent for 8 days
        _seen(pg_url, ids["d"].id, now - 2 * 86400, "stopped")       # stopped 2 days ago, no lease
        _seen(pg_url, ids["f"].id, now - 2 * 86400)                  # silent 2 days, still holds a lease
        _seen(pg_url, ids["g"].id, now - 3600, "stopped")            # stopped an hour ago: kept for now
        _seen(pg_url, ids["e"].id, now - 30 * 86400)                 # the caller itself: never pruned
        pruned = qs["e"].prune_hosts(now)
        assert sorted(pruned) == [ids["c"].id, ids["d"].id]
        left = {h["id"] for h in qs["e"].hosts()}
        assert left == {ids["e"].id, ids["f"].id, ids["g"].id}
        assert qs["e"].get(held.id).state == RUNNING                  # the lease holder's job untouched
        # a restarted daemon registers again and the pass runs at registration too
        _seen(pg_url, ids["g"].id, now - 2 * 86400)
        qs["e"].close()
        qs["e"] = _pq(pg_url, ids["e"])
        assert {h["id"] for h in qs["e"].hosts()} == {ids["e"].id, ids["f"].id}
        # status marks each remaining host alive / silent / stopped
        from watcher.control import host_rows
        cfg = SimpleNamespace(queue=SimpleNamespace(lease_seconds=60))
        health = {r["id"]: r["health"] for r in host_rows(cfg, qs["e"].hosts(), time.time())}
        assert health == {ids["e"].id: "alive", ids["f"].id: "silent"}
    finally:
        for q in qs.values():
            q.close()


def test_sqlite_prunes_host_rows_the_same_way(tmp_path):
    now = time.time()
    q = SqliteQueue(tmp_path / "q.sqlite3", host=A)
    other = SqliteQueue(tmp_path / "q.sqlite3", host=B)
    try:
        other.enqueue("x.jpg", 1, 1, "s", now=now)
        other.claim(now=now)
        with q._tx() as db:
            db.execute("UPDATE hosts SET last_seen = ? WHERE id = ?", (now - 2 * 86400, B.id))
        assert q.prune_hosts(now) == []                     # B holds a lease: kept until the long limit
        assert q.prune_hosts(now + 6 * 86400) == [B.id]
        assert [h["id"] for h in q.hosts()] == [A.id]
        assert q.counts()[PENDING] + q.counts()[RUNNING] == 1
    finally:
        q.close()
        other.close()
