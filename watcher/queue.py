"""The persistent job queue: every SQL statement and the job state machine. No files, no torch.

One row per job: (relative path, sha256) and its history. States pending → running → done | failed,
changed only through the named transitions in TRANSITIONS, each in one `BEGIN IMMEDIATE`
transaction. WAL + synchronous=FULL: a committed transition survives `kill -9` and power loss.
"""
from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .errors import InvalidTransition, UnknownJob, WatcherError

PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"
STATES = (PENDING, RUNNING, DONE, FAILED)

# (state, event) → new state. Anything else raises InvalidTransition and changes nothing.
TRANSITIONS: dict[tuple[str, str], str] = {
    (PENDING, "claim"): RUNNING,
    (RUNNING, "finish"): DONE,          # result + sidecar published, original archived/deleted
    (RUNNING, "fail"): FAILED,          # original + sidecar in failed/
    (RUNNING, "retry_later"): PENDING,  # transient error of the photo: attempts + 1, backoff
    (RUNNING, "defer"): PENDING,        # folder problem / weights missing: no attempt spent
    (RUNNING, "requeue"): PENDING,      # daemon start (crash recovery) or stop before finishing
    (PENDING, "recover_done"): DONE,    # a publish found complete on disk at start-up
    (PENDING, "recover_failed"): FAILED,
    (FAILED, "retry"): PENDING,         # `photoenhanced retry`: attempts reset
}

SCHEMA_VERSION = 2
_MIGRATIONS = {
    1: """
    CREATE TABLE jobs (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        rel_path    TEXT NOT NULL,
        size        INTEGER NOT NULL,
        mtime_ns    INTEGER NOT NULL,
        sha256      TEXT NOT NULL,
        state       TEXT NOT NULL CHECK (state IN ('pending','running','done','failed')),
        attempts    INTEGER NOT NULL DEFAULT 0,
        not_before  REAL NOT NULL DEFAULT 0,
        profile     TEXT,
        params      TEXT,
        error_kind  TEXT,
        last_error  TEXT,
        wait_reason TEXT,
        plan        TEXT,
        outputs     TEXT,
        duplicate_of INTEGER,
        created     REAL NOT NULL,
        updated     REAL NOT NULL,
        started     REAL,
        finished    REAL
    );
    CREATE UNIQUE INDEX jobs_one_active ON jobs(rel_path) WHERE state IN ('pending','running');
    CREATE INDEX jobs_claim ON jobs(state, not_before, id);
    CREATE INDEX jobs_sha ON jobs(sha256, state);
    CREATE TABLE daemon (
        id      INTEGER PRIMARY KEY CHECK (id = 1),
        pid     INTEGER,
        state   TEXT,
        reason  TEXT,
        current TEXT,
        metrics TEXT,
        started REAL,
        updated REAL
    );
    """,
    # 2: "done today" for the STATUS line without a table scan
    2: """
    CREATE INDEX jobs_finished ON jobs(state, finished);
    """,
}

_COLS = ("id, rel_path, size, mtime_ns, sha256, state, attempts, not_before, profile, params, error_kind,"
         " last_error, wait_reason, plan, outputs, duplicate_of, created, updated, started, finished")


@dataclass(frozen=True)
class Job:
    id: int
    rel_path: str
    size: int
    mtime_ns: int
    sha256: str
    state: str
    attempts: int
    not_before: float
    profile: str | None
    params: dict
    error_kind: str | None
    last_error: str | None
    wait_reason: str | None
    plan: dict | None
    outputs: list
    duplicate_of: int | None
    created: float
    updated: float
    started: float | None
    finished: float | None

    @classmethod
    def from_row(cls, row: tuple) -> "Job":
        d = dict(zip([c.strip() for c in _COLS.split(",")], row))
        d["params"] = json.loads(d["params"]) if d["params"] else {}
        d["plan"] = json.loads(d["plan"]) if d["plan"] else None
        d["outputs"] = json.loads(d["outputs"]) if d["outputs"] else []
        return cls(**d)

    def public(self) -> dict:
        """The `list --json` shape."""
        return {"id": self.id, "path": self.rel_path, "state": self.state, "attempts": self.attempts,
                "last_error": self.last_error, "error_kind": self.error_kind, "profile": self.profile,
                "sha256": self.sha256, "wait_reason": self.wait_reason,
                "not_before": self.not_before or None, "created": self.created, "updated": self.updated,
                "outputs": self.outputs, "duplicate_of": self.duplicate_of}


class Queue:
    def __init__(self, path: Path | str, *, readonly: bool = False, timeout: float = 10.0):
        self.path = Path(path)
        if readonly:
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=timeout,
                                      isolation_level=None, check_same_thread=False)
        else:
            self.db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None, check_same_thread=False)
        self.db.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        if not readonly:
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.execute("PRAGMA synchronous = FULL")
            self.db.execute("PRAGMA foreign_keys = ON")
            self._migrate()

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        else:
            self.db.execute("COMMIT")

    def _migrate(self) -> None:
        with self._tx() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise WatcherError(f"queue {self.path} has schema {version}, newer than this program ({SCHEMA_VERSION})")
            for v in range(version + 1, SCHEMA_VERSION + 1):
                for stmt in _MIGRATIONS[v].split(";"):
                    if stmt.strip():
                        db.execute(stmt)
                db.execute(f"PRAGMA user_version = {v}")

    # --- the state machine ----------------------------------------------------------------

    def _transition(self, db: sqlite3.Connection, job_id: int, event: str, now: float, **sets: Any) -> Job:
        row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise UnknownJob(f"no job {job_id}")
        new = TRANSITIONS.get((row[0], event))
        if new is None:
            raise InvalidTransition(f"job {job_id}: cannot {event} from {row[0]}")
        cols = {"state": new, "updated": now, **sets}
        assign = ", ".join(f"{k} = ?" for k in cols)
        vals = [json.dumps(v) if k in ("params", "plan", "outputs") and v is not None else v for k, v in cols.items()]
        cur = db.execute(f"UPDATE jobs SET {assign} WHERE id = ? RETURNING {_COLS}", (*vals, job_id))
        return Job.from_row(cur.fetchone())

    def apply(self, job_id: int, event: str, now: float | None = None, **sets: Any) -> Job:
        with self._tx() as db:
            return self._transition(db, job_id, event, time.time() if now is None else now, **sets)

    # --- named operations -------------------------------------------------------------------

    def enqueue(self, rel_path: str, size: int, mtime_ns: int, sha256: str, now: float | None = None,
                not_before: float = 0.0) -> Job | None:
        """A new pending job, or None when rel_path already has a pending/running one."""
        now = time.time() if now is None else now
        with self._tx() as db:
            if db.execute("SELECT 1 FROM jobs WHERE rel_path = ? AND state IN ('pending','running')",
                          (rel_path,)).fetchone():
                return None
            cur = db.execute(
                f"INSERT INTO jobs (rel_path, size, mtime_ns, sha256, state, not_before, created, updated)"
                f" VALUES (?, ?, ?, ?, 'pending', ?, ?, ?) RETURNING {_COLS}",
                (rel_path, size, mtime_ns, sha256, not_before, now, now))
            return Job.from_row(cur.fetchone())

    def claim(self, now: float | None = None) -> Job | None:
        """The oldest due pending job, atomically moved to running."""
        now = time.time() if now is None else now
        with self._tx() as db:
            cur = db.execute(
                f"UPDATE jobs SET state = 'running', started = ?, updated = ?, wait_reason = NULL"
                f" WHERE id = (SELECT id FROM jobs WHERE state = 'pending' AND not_before <= ?"
                f" ORDER BY id LIMIT 1) RETURNING {_COLS}", (now, now, now))
            row = cur.fetchone()
            return Job.from_row(row) if row else None

    def set_plan(self, job_id: int, plan: dict | None, **sets: Any) -> None:
        """Record a publish plan (durably, before any rename) on a running or pending job."""
        with self._tx() as db:
            cols = {"plan": json.dumps(plan) if plan is not None else None, **sets}
            for k in ("params", "outputs"):
                if k in cols and cols[k] is not None:
                    cols[k] = json.dumps(cols[k])
            assign = ", ".join(f"{k} = ?" for k in cols)
            n = db.execute(f"UPDATE jobs SET {assign}, updated = ? WHERE id = ? AND state IN ('pending','running')",
                           (*cols.values(), time.time(), job_id)).rowcount
            if n != 1:
                raise InvalidTransition(f"job {job_id}: plan only on pending/running jobs")

    def update_file(self, job_id: int, size: int, mtime_ns: int, sha256: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET size = ?, mtime_ns = ?, sha256 = ?, updated = ? WHERE id = ? AND state = 'running'",
                       (size, mtime_ns, sha256, time.time(), job_id))

    def finish(self, job_id: int, outputs: list, now: float | None = None, duplicate_of: int | None = None) -> Job:
        return self.apply(job_id, "finish", now, outputs=outputs, plan=None, finished=now or time.time(),
                          duplicate_of=duplicate_of, error_kind=None, last_error=None)

    def fail(self, job_id: int, kind: str, message: str, now: float | None = None, outputs: list | None = None,
             attempts: int | None = None) -> Job:
        extra = {} if attempts is None else {"attempts": attempts}
        return self.apply(job_id, "fail", now, error_kind=kind, last_error=message, plan=None,
                          outputs=outputs or [], finished=now or time.time(), **extra)

    def retry_later(self, job_id: int, kind: str, message: str, delay: float, now: float | None = None) -> Job:
        now = time.time() if now is None else now
        with self._tx() as db:
            attempts = db.execute("SELECT attempts FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if attempts is None:
                raise UnknownJob(f"no job {job_id}")
            return self._transition(db, job_id, "retry_later", now, attempts=attempts[0] + 1, error_kind=kind,
                                    last_error=message, not_before=now + delay, plan=None)

    def defer(self, job_id: int, reason: str, delay: float, now: float | None = None) -> Job:
        now = time.time() if now is None else now
        return self.apply(job_id, "defer", now, wait_reason=reason, not_before=now + delay)

    def requeue_running(self, now: float | None = None) -> list[Job]:
        """Start-up: every running job goes back to pending (attempts kept). Returns them."""
        now = time.time() if now is None else now
        with self._tx() as db:
            ids = [r[0] for r in db.execute("SELECT id FROM jobs WHERE state = 'running' ORDER BY id")]
            return [self._transition(db, i, "requeue", now, not_before=0) for i in ids]

    def requeue(self, job_id: int, now: float | None = None) -> Job:
        return self.apply(job_id, "requeue", now, not_before=0)

    def retry(self, job_id: int, now: float | None = None) -> Job:
        return self.apply(job_id, "retry", now, attempts=0, not_before=0, error_kind=None, last_error=None,
                          outputs=[], finished=None)

    def forget(self, job_id: int) -> None:
        """Drop a pending/running job whose file vanished or changed before it was processed."""
        with self._tx() as db:
            n = db.execute("DELETE FROM jobs WHERE id = ? AND state IN ('pending','running')", (job_id,)).rowcount
            if n != 1:
                raise InvalidTransition(f"job {job_id}: only pending/running jobs can be forgotten")

    # --- reads ------------------------------------------------------------------------------

    def get(self, job_id: int) -> Job:
        row = self.db.execute(f"SELECT {_COLS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise UnknownJob(f"no job {job_id}")
        return Job.from_row(row)

    def jobs(self, state: str | None = None, limit: int | None = None) -> list[Job]:
        q = f"SELECT {_COLS} FROM jobs" + (" WHERE state = ?" if state else "") + " ORDER BY id"
        if limit:
            q += f" LIMIT {int(limit)}"
        return [Job.from_row(r) for r in self.db.execute(q, (state,) if state else ())]

    def active(self, rel_path: str) -> Job | None:
        row = self.db.execute(f"SELECT {_COLS} FROM jobs WHERE rel_path = ? AND state IN ('pending','running')",
                              (rel_path,)).fetchone()
        return Job.from_row(row) if row else None

    def with_plan(self) -> list[Job]:
        return [Job.from_row(r) for r in self.db.execute(
            f"SELECT {_COLS} FROM jobs WHERE plan IS NOT NULL AND state IN ('pending','running') ORDER BY id")]

    def done_with(self, sha256: str, params_key: str) -> Job | None:
        """The latest done, non-duplicate job with this content and these pixel-changing settings."""
        for r in self.db.execute(f"SELECT {_COLS} FROM jobs WHERE sha256 = ? AND state = 'done' ORDER BY id DESC",
                                 (sha256,)):
            job = Job.from_row(r)
            if job.params.get("key") == params_key and job.outputs:
                return job
        return None

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in STATES}
        for state, n in self.db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
            out[state] = n
        return out

    def due_pending(self, now: float) -> int:
        return self.db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'pending' AND not_before <= ?",
                               (now,)).fetchone()[0]

    def backing_off(self, now: float) -> int:
        return self.db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'pending' AND not_before > ? AND attempts > 0",
                               (now,)).fetchone()[0]

    def done_since(self, since: float) -> int:
        return self.db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'done' AND finished >= ?",
                               (since,)).fetchone()[0]

    # --- the daemon's status row (read by `photoenhanced status`) ----------------------------

    def set_daemon(self, pid: int, state: str, reason: str | None, current: dict | None,
                   metrics: dict | None = None, started: float | None = None) -> None:
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT INTO daemon (id, pid, state, reason, current, metrics, started, updated)"
                " VALUES (1, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET pid = excluded.pid,"
                " state = excluded.state, reason = excluded.reason, current = excluded.current,"
                " metrics = COALESCE(excluded.metrics, daemon.metrics),"
                " started = COALESCE(excluded.started, daemon.started), updated = excluded.updated",
                (pid, state, reason, json.dumps(current) if current else None,
                 json.dumps(metrics) if metrics is not None else None, started, now))

    def daemon(self) -> dict | None:
        row = self.db.execute("SELECT pid, state, reason, current, metrics, started, updated FROM daemon WHERE id = 1").fetchone()
        if row is None:
            return None
        pid, state, reason, current, metrics, started, updated = row
        return {"pid": pid, "state": state, "reason": reason, "current": json.loads(current) if current else None,
                "metrics": json.loads(metrics) if metrics else None, "started": started, "updated": updated}
