"""The shared queue on PostgreSQL (psycopg 3): the same public interface, states, transitions and
exceptions as watcher.queue.Queue, for several hosts at once. Every SQL statement of it is here.

* Claims take the oldest due pending job with `FOR UPDATE SKIP LOCKED` (claimers never wait on
  each other) and give it a lease (`lease_host`, `lease_expires`, the database's clock) and a
  fencing token from a sequence (it only grows). A claim first returns expired leases to pending
  (one interruption counted).
* Writes on a job this object claimed lock the row and check the token first (`LeaseLost` when it
  is no longer current); writes on a running job that another host holds are refused the same
  way, so a host that lost its lease can never record anything for it.
* Enqueue is `INSERT … ON CONFLICT DO NOTHING` on the one-active-job-per-name index: idempotent
  across hosts that discover the same file.
* Connection loss (and serialization failures, deadlocks, admin shutdown) is retried a few times
  on a fresh connection; then `StateUnavailable` ("PostgreSQL unavailable") and the daemon waits.
  A **job in hand** is never given up that way: while this object holds a claim, every operation
  (the heartbeat too, once the job's publish plan is recorded) retries with a growing pause until
  PostgreSQL answers again (`queue.waiting` … `queue.back`; `on_wait` is called each round so the
  daemon keeps pinging its watchdog). The result is kept; back online, the fenced write decides:
  the token still current → the job completes; taken over meanwhile → LeaseLost, the result is
  discarded and the new owner finishes it. `hold_s` bounds the wait (None: until it answers).
* Host rows are pruned (`prune_hosts`, also at registration and every PRUNE_EVERY_S from the
  status row): a host silent for `hosts_keep_s` (7 days), or gone (stopped or silent) for
  `hosts_gone_s` (1 day) while holding no lease.
  `QueueCorrupt` is never raised. Messages never carry the password (backends.scrub).
* The schema is versioned by the SQL files in watcher/migrations/pg/ (`migrate()` applies them
  under an advisory lock; `photoenhanced queue migrate`). A queue whose schema is older or newer
  than this program's is StateUnavailable with what to do.
"""
from __future__ import annotations

import functools
import json
import os
import re
import time
from contextlib import contextmanager
from importlib import resources
from typing import Any, Callable, Iterator, Sequence, TypeVar

import structlog

from . import queue as q
from .backends import (DEFAULT_LEASE_S, HOST_COLS, HOSTS_GONE_S, HOSTS_KEEP_S, Host, LeasedJob, leased, mask_url,
                       scrub)
from .errors import InvalidTransition, LeaseLost, StateUnavailable, UnknownJob, WatcherError
from .queue import AHEAD, DONE, FAILED, PENDING, RUNNING, STATES, TRANSITIONS, Finished, Job

log = structlog.get_logger(__name__)

RETRIES = 3                         # tries after the first on a connection/transient error
HOLD_PAUSE_S = (0.5, 5.0)           # a job in hand waits for PostgreSQL: first pause, longest pause
PRUNE_EVERY_S = 600.0               # host rows are pruned at most this often (from the status row)
_NUL = re.compile("\x00")
_MIGRATION_LOCK = 0x70686f74        # pg_advisory_xact_lock key while migrating ("phot")
_COLS = q._COLS
_LEASE_COLS = _COLS + ", token, lease_host, lease_expires"
_DBNOW = "extract(epoch from clock_timestamp())"


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, SQL) of every shipped migration, in order."""
    out = []
    for f in resources.files("watcher.migrations.pg").iterdir():
        m = re.fullmatch(r"(\d{4})_([\w-]+)\.sql", f.name)
        if m:
            out.append((int(m[1]), m[2], f.read_text()))
    return sorted(out)


SCHEMA_VERSION = max(v for v, _, _ in migrations())


def _text(v: Any) -> Any:
    """Text PostgreSQL takes: surrogates escaped as watcher.queue does, NUL as \\x00."""
    v = q._text(v)
    return _NUL.sub("\\\\x00", v) if isinstance(v, str) else v


def _value(col: str, v: Any) -> Any:
    if col in q._JSON_COLS:
        return json.dumps(v) if v is not None else None
    if col == "rel_path":
        return os.fsencode(v)
    return _text(v)


def _job(row: Sequence) -> Job:
    return Job.from_row(tuple(row[:21]))


def _leased(row: Sequence) -> LeasedJob:
    return leased(_job(row), row[21], row[22], row[23])


F = TypeVar("F", bound=Callable[..., Any])


def _guarded(method: F) -> F:
    """Retry an operation on a fresh connection after connection loss or a transient failure
    (its transaction was rolled back); past the retries, StateUnavailable with a short reason."""
    @functools.wraps(method)
    def wrapper(self: "PgQueue", *args: Any, **kwargs: Any) -> Any:
        if self._depth:                            # an inner call: the outer one retries
            return method(self, *args, **kwargs)
        attempt = 0
        waited_since: float | None = None          # a job in hand waiting for the server (monotonic)
        while True:
            self._depth += 1
            try:
                if self.db is None or self.db.closed:
                    self._connect()
                out = method(self, *args, **kwargs)
                if waited_since is not None:
                    log.info("queue.back", op=method.__name__, jobs=sorted(self._held),
                             waited_s=round(time.monotonic() - waited_since, 1))
                return out
            except self._psycopg.Error as exc:
                reason = self._transient(exc)
                if reason is None:
                    raise
                self._drop_if_broken()
                first = scrub(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, self.url)
                attempt += 1
                if attempt > self.retries and self._holding(method.__name__, args):
                    now_m = time.monotonic()
                    if waited_since is None:
                        waited_since = now_m
                        log.warning("queue.waiting", op=method.__name__, jobs=sorted(self._held), reason=reason,
                                    error=first, action="the job in hand is kept; retrying until the queue answers")
                    if self.hold_s is None or now_m - waited_since < self.hold_s:
                        if self.on_wait is not None:
                            self.on_wait()
                        time.sleep(min(HOLD_PAUSE_S[0] * 2 ** (attempt - self.retries - 1), HOLD_PAUSE_S[1]))
                        continue
                    log.error("queue.wait_given_up", jobs=sorted(self._held), waited_s=round(now_m - waited_since, 1))
                    for job_id in list(self._held):  # abandoned: its lease expires, another claim redoes it
                        self._lost_lease(job_id)
                if attempt > self.retries:
                    raise StateUnavailable(reason, path=self.shown, code=getattr(exc, "sqlstate", None),
                                           detail=first) from None
                log.warning("queue.retry", op=method.__name__, attempt=attempt, reason=reason, error=first)
                time.sleep(min(0.2 * 2 ** (attempt - 1), 1.0))
            finally:
                self._depth -= 1
    wrapper.guarded = True                         # type: ignore[attr-defined]
    return wrapper                                 # type: ignore[return-value]


class PgQueue:
    backend = "postgresql"
    shared = True       # several hosts: a recorded plan is finished by whoever claims its job (fenced)

    def __init__(self, url: str, *, host: Host | None = None, lease_s: float = DEFAULT_LEASE_S,
                 readonly: bool = False, connect_timeout: float = 5.0, retries: int = RETRIES,
                 clock: Callable[[], float] | None = None, check_schema: bool = True, register: bool = True,
                 hold_s: float | None = None, on_wait: Callable[[], None] | None = None,
                 hosts_keep_s: float = HOSTS_KEEP_S, hosts_gone_s: float = HOSTS_GONE_S):
        import psycopg
        self._psycopg = psycopg
        self.url = url
        self.shown = mask_url(url)
        self.path = self.shown                     # what messages name (Queue.path's role)
        self.host = host
        self.lease_s = float(lease_s)
        self.readonly = readonly
        self.connect_timeout = connect_timeout
        self.retries = retries
        self.clock = clock                         # None: the database's clock (one clock for all hosts)
        self.check_schema = check_schema
        self.register = register
        self.tmp_subdir = host.id if host else None
        self.db = None
        self._depth = 0
        self._held: dict[int, int] = {}            # job id → the fencing token of our claim (a job in hand)
        self._planned: set[int] = set()            # jobs in hand whose publish plan is recorded
        self._lost: set[int] = set()               # held jobs whose lease was lost (fenced; nothing waits)
        self.hold_s = hold_s                       # how long a job in hand waits for the server (None: until back)
        self.on_wait = on_wait                     # called each round of that wait (the daemon: watchdog ping)
        self.hosts_keep_s, self.hosts_gone_s = float(hosts_keep_s), float(hosts_gone_s)
        self._pruned_at = 0.0
        self._open()

    # --- connection ---------------------------------------------------------------------------

    @_guarded
    def _open(self) -> None:
        """Connect (the guard connects, retrying) and check the schema."""

    def _connect(self) -> None:
        self._drop()
        # a server that vanishes mid-query (network cut) fails the call within seconds instead of
        # TCP's minutes: keepalives on an idle connection, tcp_user_timeout on unacknowledged data
        self.db = self._psycopg.connect(self.url, autocommit=True, connect_timeout=max(1, int(self.connect_timeout)),
                                        application_name="photoenhanced", keepalives=1, keepalives_idle=5,
                                        keepalives_interval=2, keepalives_count=2, tcp_user_timeout=5000)
        if self.check_schema:
            have = self.schema_version()
            if have != SCHEMA_VERSION:
                self._drop()
                if have < SCHEMA_VERSION:
                    raise StateUnavailable(f"queue schema {have} is older than this program's {SCHEMA_VERSION}"
                                           " — run photoenhanced queue migrate", path=self.shown)
                raise StateUnavailable(f"queue schema {have} is newer than this program's {SCHEMA_VERSION}"
                                       " — upgrade photoenhanced on this host", path=self.shown)
        if self.host is not None and self.register and not self.readonly:
            self._register()

    def _holding(self, op: str, args: tuple) -> bool:
        """Does `op` wait for the server instead of giving up? Yes while this object holds a job,
        except a heartbeat before the job's publish plan is recorded (the render goes on meanwhile;
        recording its result is what waits)."""
        if op == "heartbeat":
            return bool(args) and args[0] in self._planned
        return any(j not in self._lost for j in self._held)

    def _let_go(self, job_id: int) -> None:
        """The job left our hands (a transition away from running, or forgotten)."""
        self._held.pop(job_id, None)
        self._planned.discard(job_id)
        self._lost.discard(job_id)

    def _lost_lease(self, job_id: int) -> None:
        """Our claim on job_id is no longer current (or abandoned): nothing waits for it any more;
        its token stays in _held so that every later write on the job is refused (fenced)."""
        self._lost.add(job_id)
        self._planned.discard(job_id)

    def _drop(self) -> None:
        if self.db is not None:
            try:
                self.db.close()
            except Exception:
                pass
            self.db = None

    def _drop_if_broken(self) -> None:
        if self.db is not None and (self.db.closed or self.db.broken):
            self._drop()
        elif self.db is not None:
            try:
                self.db.rollback()
            except Exception:
                self._drop()

    def _transient(self, exc: BaseException) -> str | None:
        """A short reason when `exc` is worth retrying / waiting for, else None (a bug)."""
        e = self._psycopg
        state = getattr(exc, "sqlstate", None) or ""
        if isinstance(exc, (e.OperationalError, e.InterfaceError)) or state[:2] in ("08", "57", "53", "40") \
                or state == "25006":
            if state[:2] == "53":
                return "PostgreSQL out of resources (disk full?)"
            if state == "25006":
                return "PostgreSQL is read-only (a standby?)"
            if state[:2] == "40":
                return "PostgreSQL transaction conflict"
            return "PostgreSQL unavailable"
        return None

    def close(self) -> None:
        self._drop()

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        with self.db.transaction():
            with self.db.cursor() as cur:
                yield cur

    def schema_version(self) -> int:
        with self.db.cursor() as cur:
            cur.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
            if not cur.fetchone()[0]:
                return 0
            cur.execute("SELECT COALESCE(max(version), 0) FROM schema_migrations")
            return int(cur.fetchone()[0])

    def quick_check(self) -> None:
        """Nothing to check from here: the server guards its own files."""

    def quarantine(self, now: float | None = None, error: str = ""):
        raise WatcherError("a PostgreSQL queue is never quarantined")

    def _now_sql(self) -> tuple[str, tuple]:
        """SQL for 'now' on the lease clock and its parameters."""
        if self.clock is None:
            return _DBNOW, ()
        return "%s::double precision", (self.clock(),)

    def _register(self) -> None:
        h, now = self.host, time.time()
        with self._tx() as cur:
            cur.execute("INSERT INTO hosts (id, name, pid, version, started, last_seen) VALUES (%s, %s, %s, %s, %s, %s)"
                        " ON CONFLICT (id) DO UPDATE SET name = excluded.name, pid = excluded.pid,"
                        " version = excluded.version, started = excluded.started, last_seen = excluded.last_seen,"
                        " current_job = NULL", (h.id, _text(h.name), h.pid, h.version, now, now))
            self._prune(cur, now)

    def _prune(self, cur, now: float) -> list[str]:
        """Delete host rows nobody needs: silent for hosts_keep_s, or gone (stopped, or silent) for
        hosts_gone_s and holding no lease. Never this object's own host."""
        self._pruned_at = time.monotonic()
        cur.execute("DELETE FROM hosts h WHERE h.id IS DISTINCT FROM %s AND (COALESCE(h.last_seen, 0) < %s OR"
                    " (COALESCE(h.last_seen, 0) < %s AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.state = 'running'"
                    " AND j.lease_host = h.id))) RETURNING h.id, h.name, h.last_seen",
                    (self.host.id if self.host else None, now - self.hosts_keep_s, now - self.hosts_gone_s))
        rows = cur.fetchall()
        for hid, name, seen in rows:
            log.info("queue.host_pruned", host=hid, name=name, silent_s=round(now - (seen or 0)))
        return [r[0] for r in rows]

    @_guarded
    def prune_hosts(self, now: float | None = None) -> list[str]:
        """Remove stale host rows (see _prune); the ids removed."""
        with self._tx() as cur:
            return self._prune(cur, time.time() if now is None else now)

    # --- fencing ------------------------------------------------------------------------------

    def _lock_row(self, cur, job_id: int) -> tuple:
        cur.execute("SELECT state, token, lease_host FROM jobs WHERE id = %s FOR UPDATE", (job_id,))
        row = cur.fetchone()
        if row is None:
            if self._held.get(job_id) is not None:
                raise LeaseLost(f"job {job_id}: lease lost (the job is gone)", job_id)
            raise UnknownJob(f"no job {job_id}")
        return row

    def _fence(self, cur, job_id: int) -> str:
        """Lock the row; LeaseLost unless this object may write it. Returns its state."""
        state, token, host = self._lock_row(cur, job_id)
        held = self._held.get(job_id)
        if held is not None:
            if state != RUNNING or token != held:
                self._lost_lease(job_id)
                raise LeaseLost(f"job {job_id}: lease lost (token {held} is no longer current; now {state}"
                                f"{', token %s' % token if token is not None else ''})", job_id)
            # still ours (its lease may have run out while the server was away, nobody took it):
            # the write renews it, so no claim returns it to pending between our steps
            sql_now, params = self._now_sql()
            cur.execute(f"UPDATE jobs SET lease_expires = {sql_now} + %s WHERE id = %s", (*params, self.lease_s, job_id))
        elif state == RUNNING and host is not None and (self.host is None or host != self.host.id):
            if self.host is not None:
                raise LeaseLost(f"job {job_id} is running on another host ({host})", job_id)
        return state

    def _transition(self, cur, job_id: int, event: str, now: float, fence: bool = True, **sets: Any) -> Job:
        state = self._fence(cur, job_id) if fence else self._lock_row(cur, job_id)[0]
        new = TRANSITIONS.get((state, event))
        if new is None:
            raise InvalidTransition(f"job {job_id}: cannot {event} from {state}")
        cols = {"state": new, "updated": now, **sets}
        if new != RUNNING:
            cols.update(lease_host=None, lease_expires=None)
        assign = ", ".join(f"{k} = %s" for k in cols)
        vals = [_value(k, v) for k, v in cols.items()]
        cur.execute(f"UPDATE jobs SET {assign} WHERE id = %s RETURNING {_COLS}", (*vals, job_id))
        job = _job(cur.fetchone())
        if new != RUNNING:
            self._let_go(job_id)
        return job

    @_guarded
    def apply(self, job_id: int, event: str, now: float | None = None, **sets: Any) -> Job:
        with self._tx() as cur:
            return self._transition(cur, job_id, event, time.time() if now is None else now, **sets)

    def _expire(self, cur, now: float) -> list[Job]:
        sql_now, params = self._now_sql()
        cur.execute(f"WITH x AS (SELECT id FROM jobs WHERE state = 'running' AND lease_expires < {sql_now}"
                    f" FOR UPDATE SKIP LOCKED)"
                    # interruptions: queue.interrupted, in SQL
                    f" UPDATE jobs j SET state = 'pending', not_before = 0, interruptions = j.interruptions"
                    f" + CASE WHEN j.wait_reason IS NOT DISTINCT FROM %s THEN 0 ELSE 1 END,"
                    f" wait_reason = NULL, updated = %s, lease_host = NULL, lease_expires = NULL"
                    f" FROM x WHERE j.id = x.id"   # SET reads the old wait_reason
                    f" RETURNING {', '.join('j.' + c.strip() for c in _COLS.split(','))}, j.token",
                    (*params, AHEAD, now))
        rows = cur.fetchall()
        out = []
        for r in rows:
            job = _job(r)
            out.append(job)
            log.warning("queue.lease_expired", job=job.id, token=r[21], interruptions=job.interruptions,
                        action="back to pending")
        return out

    @_guarded
    def expire_leases(self, now: float | None = None) -> list[Job]:
        """Every running job whose lease expired back to pending, one interruption counted."""
        with self._tx() as cur:
            return self._expire(cur, time.time() if now is None else now)

    # --- named operations -------------------------------------------------------------------------

    @_guarded
    def enqueue(self, rel_path: str, size: int, mtime_ns: int, sha256: str, now: float | None = None,
                not_before: float = 0.0) -> Job | None:
        now = time.time() if now is None else now
        with self._tx() as cur:
            cur.execute(f"INSERT INTO jobs (rel_path, size, mtime_ns, sha256, state, not_before, created, updated)"
                        f" VALUES (%s, %s, %s, %s, 'pending', %s, %s, %s)"
                        f" ON CONFLICT (rel_path) WHERE state IN ('pending', 'running') DO NOTHING RETURNING {_COLS}",
                        (os.fsencode(rel_path), size, mtime_ns, _text(sha256), not_before, now, now))
            row = cur.fetchone()
            return _job(row) if row else None

    @_guarded
    def claim(self, now: float | None = None) -> LeasedJob | None:
        now = time.time() if now is None else now
        sql_now, params = self._now_sql()
        host = self.host.id if self.host else None
        with self._tx() as cur:
            self._expire(cur, now)
            cur.execute(f"WITH c AS (SELECT id FROM jobs WHERE state = 'pending' AND not_before <= %s"
                        f" ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)"
                        f" UPDATE jobs j SET state = 'running', started = %s, updated = %s, wait_reason = NULL,"
                        f" token = nextval('fencing_token'), lease_host = %s, lease_expires = {sql_now} + %s"
                        f" FROM c WHERE j.id = c.id"
                        f" RETURNING {', '.join('j.' + c.strip() for c in _LEASE_COLS.split(','))}",
                        (now, now, now, host, *params, self.lease_s))
            row = cur.fetchone()
            if row is None:
                return None
            job = _leased(row)
            if host:
                cur.execute("UPDATE hosts SET current_job = %s, last_seen = %s WHERE id = %s", (job.id, now, host))
        self._held[job.id] = job.token
        self._lost.discard(job.id)
        return job

    @_guarded
    def heartbeat(self, job_id: int, token: int) -> float:
        """Renew the lease of a job held with `token`; its new expiry. LeaseLost when the token is
        no longer current (the lease expired and was taken back, or another claim followed)."""
        sql_now, params = self._now_sql()
        with self._tx() as cur:
            cur.execute(f"UPDATE jobs SET lease_expires = {sql_now} + %s WHERE id = %s AND state = 'running'"
                        f" AND token = %s RETURNING lease_expires", (*params, self.lease_s, job_id, token))
            row = cur.fetchone()
            if row is None:
                if self._held.get(job_id) == token:
                    self._lost_lease(job_id)
                raise LeaseLost(f"job {job_id}: lease lost (token {token} is no longer current)", job_id)
            if self.host is not None:
                cur.execute("UPDATE hosts SET last_seen = %s, current_job = %s WHERE id = %s",
                            (time.time(), job_id, self.host.id))
            return float(row[0])

    def holds(self, job_id: int) -> int | None:
        """The token of our current claim on job_id (None: not claimed here, or the lease was lost)."""
        return None if job_id in self._lost else self._held.get(job_id)

    @_guarded
    def lease(self, job_id: int) -> dict | None:
        with self._tx() as cur:
            cur.execute("SELECT token, lease_host, lease_expires FROM jobs WHERE id = %s AND state = 'running'",
                        (job_id,))
            row = cur.fetchone()
        return dict(zip(("token", "host", "expires"), row)) if row else None

    @_guarded
    def set_plan(self, job_id: int, plan: dict | None, **sets: Any) -> None:
        with self._tx() as cur:
            state = self._fence(cur, job_id)
            if state not in (PENDING, RUNNING):
                raise InvalidTransition(f"job {job_id}: plan only on pending/running jobs")
            cols = {"plan": plan, **sets}
            assign = ", ".join(f"{k} = %s" for k in cols)
            vals = [_value(k, v) for k, v in cols.items()]
            cur.execute(f"UPDATE jobs SET {assign}, updated = %s WHERE id = %s", (*vals, time.time(), job_id))
        if job_id in self._held:
            (self._planned.add if plan else self._planned.discard)(job_id)

    @_guarded
    def finish(self, job_id: int, outputs: list, now: float | None = None, duplicate_of: int | None = None) -> Job:
        return self.apply(job_id, "finish", now, outputs=outputs, plan=None, finished=now or time.time(),
                          duplicate_of=duplicate_of, error_kind=None, last_error=None)

    @_guarded
    def fail(self, job_id: int, kind: str, message: str, now: float | None = None, outputs: list | None = None,
             attempts: int | None = None) -> Job:
        extra = {} if attempts is None else {"attempts": attempts}
        return self.apply(job_id, "fail", now, error_kind=kind, last_error=message, plan=None,
                          outputs=outputs or [], finished=now or time.time(), **extra)

    @_guarded
    def retry_later(self, job_id: int, kind: str, message: str, delay: float, now: float | None = None) -> Job:
        now = time.time() if now is None else now
        with self._tx() as cur:
            self._fence(cur, job_id)
            cur.execute("SELECT attempts FROM jobs WHERE id = %s", (job_id,))
            attempts = cur.fetchone()[0]
            return self._transition(cur, job_id, "retry_later", now, attempts=attempts + 1, error_kind=kind,
                                    last_error=message, not_before=now + delay, plan=None)

    @_guarded
    def defer(self, job_id: int, reason: str, delay: float, now: float | None = None) -> Job:
        now = time.time() if now is None else now
        return self.apply(job_id, "defer", now, wait_reason=reason, not_before=now + delay)

    @_guarded
    def requeue_running(self, now: float | None = None) -> list[Job]:
        """Start-up: this host's running jobs (its previous process died) back to pending, attempts
        kept, one interruption more; without a host (a tool), every running job."""
        now = time.time() if now is None else now
        with self._tx() as cur:
            if self.host is not None:
                cur.execute("SELECT id, interruptions FROM jobs WHERE state = 'running' AND lease_host = %s"
                            " ORDER BY id FOR UPDATE", (self.host.id,))
            else:
                cur.execute("SELECT id, interruptions FROM jobs WHERE state = 'running' ORDER BY id FOR UPDATE")
            rows = cur.fetchall()
            return [self._transition(cur, i, "requeue", now, fence=False, not_before=0, interruptions=n + 1)
                    for i, n in rows]

    @_guarded
    def requeue(self, job_id: int, now: float | None = None) -> Job:
        return self.apply(job_id, "requeue", now, not_before=0)

    @_guarded
    def retry(self, job_id: int, now: float | None = None, file: tuple[int, int, str] | None = None) -> Job:
        sets = dict(zip(("size", "mtime_ns", "sha256"), file)) if file else {}
        return self.apply(job_id, "retry", now, attempts=0, interruptions=0, not_before=0, error_kind=None,
                          last_error=None, outputs=[], finished=None, **sets)

    @_guarded
    def forget(self, job_id: int) -> None:
        with self._tx() as cur:
            state = self._fence(cur, job_id)
            if state not in (PENDING, RUNNING):
                raise InvalidTransition(f"job {job_id}: only pending/running jobs can be forgotten")
            cur.execute("DELETE FROM jobs WHERE id = %s", (job_id,))
        self._let_go(job_id)

    @_guarded
    def insert_finished(self, rows: Sequence[Finished], now: float) -> list[int]:
        inserted: list[int] = []
        with self._tx() as cur:
            for r in rows:
                if r.state not in (DONE, FAILED):
                    raise ValueError(f"job {r.id}: a rebuilt row is done or failed, not {r.state}")
                cols = {"id": r.id, "rel_path": r.rel_path, "size": r.size, "mtime_ns": r.mtime_ns,
                        "sha256": r.sha256, "state": r.state, "attempts": r.attempts,
                        "interruptions": r.interruptions, "profile": r.profile, "params": r.params,
                        "error_kind": r.error_kind, "last_error": r.last_error, "outputs": r.outputs,
                        "duplicate_of": r.duplicate_of, "created": now, "updated": now,
                        "finished": now if r.finished is None else r.finished}
                cur.execute(f"INSERT INTO jobs ({', '.join(cols)}) VALUES ({', '.join(['%s'] * len(cols))})"
                            f" ON CONFLICT (id) DO NOTHING", [_value(k, v) for k, v in cols.items()])
                if cur.rowcount == 1:
                    inserted.append(r.id)
            if inserted:
                self._bump_ids(cur)
        return inserted

    def _bump_ids(self, cur) -> None:
        cur.execute("SELECT setval(pg_get_serial_sequence('jobs', 'id'), GREATEST((SELECT max(id) FROM jobs),"
                    " (SELECT last_value FROM jobs_id_seq)))")

    # --- reads ----------------------------------------------------------------------------------

    def _rows(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._tx() as cur:
            cur.execute(sql, params)
            return cur.fetchall()

    @_guarded
    def get(self, job_id: int) -> Job:
        rows = self._rows(f"SELECT {_COLS} FROM jobs WHERE id = %s", (job_id,))
        if not rows:
            raise UnknownJob(f"no job {job_id}")
        return _job(rows[0])

    @_guarded
    def jobs(self, state: str | None = None, limit: int | None = None, offset: int = 0,
             newest_first: bool = False) -> list[Job]:
        sql = f"SELECT {_COLS} FROM jobs" + (" WHERE state = %s" if state else "") + \
            (" ORDER BY id DESC" if newest_first else " ORDER BY id")
        if limit:
            sql += f" LIMIT {int(limit)}"
        if offset:
            sql += f" OFFSET {max(0, int(offset))}"
        return [_job(r) for r in self._rows(sql, (state,) if state else ())]

    @_guarded
    def active(self, rel_path: str) -> Job | None:
        rows = self._rows(f"SELECT {_COLS} FROM jobs WHERE rel_path = %s AND state IN ('pending', 'running')",
                          (os.fsencode(rel_path),))
        return _job(rows[0]) if rows else None

    @_guarded
    def with_plan(self) -> list[Job]:
        """Every unfinished recorded plan, of any host (their temp files are kept; their names are
        reserved). Only the host that claims a job finishes its plan."""
        return [_job(r) for r in self._rows(
            f"SELECT {_COLS} FROM jobs WHERE plan IS NOT NULL AND state IN ('pending', 'running') ORDER BY id")]

    @_guarded
    def done_with(self, sha256: str, params_key: str) -> Job | None:
        for r in self._rows(f"SELECT {_COLS} FROM jobs WHERE sha256 = %s AND state = 'done' ORDER BY id DESC",
                            (_text(sha256),)):
            job = _job(r)
            if job.params.get("key") == params_key and job.outputs:
                return job
        return None

    @_guarded
    def rebuilt_done(self, rel_path: str, sha256: str) -> Job | None:
        for r in self._rows(f"SELECT {_COLS} FROM jobs WHERE rel_path = %s AND sha256 = %s AND state = 'done'"
                            f" ORDER BY id DESC", (os.fsencode(rel_path), _text(sha256))):
            job = _job(r)
            if job.params.get("rebuilt") and job.outputs:
                return job
        return None

    @_guarded
    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in STATES}
        for state, n in self._rows("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
            out[state] = n
        return out

    @_guarded
    def due_pending(self, now: float) -> int:
        return self._rows("SELECT COUNT(*) FROM jobs WHERE state = 'pending' AND not_before <= %s", (now,))[0][0]

    @_guarded
    def backing_off(self, now: float) -> int:
        return self._rows("SELECT COUNT(*) FROM jobs WHERE state = 'pending' AND not_before > %s AND attempts > 0",
                          (now,))[0][0]

    @_guarded
    def done_since(self, since: float) -> int:
        return self._rows("SELECT COUNT(*) FROM jobs WHERE state = 'done' AND finished >= %s", (since,))[0][0]

    # --- the operator's controls (shared by every host) -------------------------------------------

    @_guarded
    def paused(self) -> bool:
        rows = self._rows("SELECT paused FROM control WHERE id = 1")
        return bool(rows and rows[0][0])

    @_guarded
    def set_paused(self, paused: bool, source: str, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        with self._tx() as cur:
            cur.execute("SELECT paused FROM control WHERE id = 1 FOR UPDATE")
            row = cur.fetchone()
            cur.execute("INSERT INTO control (id, paused, source, updated) VALUES (1, %s, %s, %s) ON CONFLICT (id)"
                        " DO UPDATE SET paused = excluded.paused, source = excluded.source, updated = excluded.updated",
                        (bool(paused), _text(source), now))
            cur.execute("INSERT INTO requests (action, job, source, created) VALUES (%s, %s, %s, %s)",
                        ("pause" if paused else "resume", None, _text(source), now))
            return bool(row and row[0])

    @_guarded
    def record_request(self, action: str, source: str, job: int | None = None, now: float | None = None) -> None:
        with self._tx() as cur:
            cur.execute("INSERT INTO requests (action, job, source, created) VALUES (%s, %s, %s, %s)",
                        (action, job, _text(source), time.time() if now is None else now))

    @_guarded
    def requests(self, limit: int = 50) -> list[dict]:
        return [dict(zip(("id", "action", "job", "source", "created"), r)) for r in self._rows(
            "SELECT id, action, job, source, created FROM requests ORDER BY id DESC LIMIT %s", (int(limit),))]

    # --- the daemon's status row: one per host ---------------------------------------------------

    @_guarded
    def set_daemon(self, pid: int, state: str, reason: str | None, current: dict | None,
                   metrics: dict | None = None, started: float | None = None) -> None:
        if self.host is None or not self.register:
            return
        now = time.time()
        with self._tx() as cur:
            cur.execute("UPDATE hosts SET pid = %s, state = %s, reason = %s, current = %s,"
                        " metrics = COALESCE(%s, metrics), started = COALESCE(%s, started), last_seen = %s,"
                        " current_job = %s WHERE id = %s",
                        (pid, _text(state), _text(scrub(reason, self.url) if reason else reason),
                         json.dumps(current) if current else None,
                         json.dumps(metrics) if metrics is not None else None, started, now,
                         (current or {}).get("job"), self.host.id))
            if cur.rowcount == 0:
                self._register()
            elif time.monotonic() - self._pruned_at >= PRUNE_EVERY_S:
                self._prune(cur, now)

    @_guarded
    def daemon(self) -> dict | None:
        """This host's status row (`photoenhanced status` on this host)."""
        if self.host is None:
            return None
        rows = self._rows("SELECT pid, state, reason, current, metrics, started, last_seen FROM hosts WHERE id = %s",
                          (self.host.id,))
        if not rows:
            return None
        pid, state, reason, current, metrics, started, updated = rows[0]
        return {"pid": pid, "state": state, "reason": reason, "current": json.loads(current) if current else None,
                "metrics": json.loads(metrics) if metrics else None, "started": started, "updated": updated}

    @_guarded
    def hosts(self) -> list[dict]:
        return [dict(zip(HOST_COLS, r)) for r in self._rows(
            f"SELECT {', '.join(HOST_COLS)} FROM hosts ORDER BY name, id")]


# --- schema migrations -----------------------------------------------------------------------------

def migrate(url: str, *, connect_timeout: float = 10.0) -> list[int]:
    """Apply every shipped migration the database lacks, in order, each in its own transaction,
    under an advisory lock (hosts migrating at once wait for each other). Returns those applied.
    Refuses a database whose schema is newer than this program's."""
    import psycopg
    applied: list[int] = []
    try:
        conn = psycopg.connect(url, autocommit=True, connect_timeout=int(connect_timeout),
                               application_name="photoenhanced-migrate")
    except psycopg.Error as exc:
        raise StateUnavailable("PostgreSQL unavailable", path=mask_url(url), detail=scrub(str(exc).strip(), url)) from None
    try:
        for version, name, sql in migrations():
            with conn.transaction():
                cur = conn.cursor()
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                cur.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY,"
                            " name text NOT NULL, applied double precision NOT NULL)")
                cur.execute("SELECT COALESCE(max(version), 0) FROM schema_migrations")
                have = cur.fetchone()[0]
                if have > SCHEMA_VERSION:
                    raise WatcherError(f"queue schema {have} is newer than this program's {SCHEMA_VERSION}")
                if version <= have:
                    continue
                cur.execute(sql)
                cur.execute("INSERT INTO schema_migrations (version, name, applied) VALUES (%s, %s, %s)",
                            (version, name, time.time()))
                applied.append(version)
                log.info("queue.migrated", url=mask_url(url), version=version, name=name)
    finally:
        conn.close()
    return applied
