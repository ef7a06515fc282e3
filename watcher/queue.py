"""The persistent job queue: every SQL statement and the job state machine. No torch, no user files.

One row per job: (relative path, sha256) and its history. States pending → running → done | failed,
changed only through the named transitions in TRANSITIONS, each in one `BEGIN IMMEDIATE`
transaction. WAL + synchronous=FULL: a committed transition survives `kill -9` and power loss.

Names: `Job.rel_path` is a str in `os.fsdecode` form (undecodable bytes as lone surrogates, which
SQLite refuses). It is stored as TEXT when it is valid UTF-8, else as a BLOB of its raw bytes — one
form per name, so the `jobs_one_active` index and `rel_path = ?` keep working — and decoded back
on read. JSON columns escape surrogates (`ensure_ascii`), other text columns store them escaped.

Storage errors are translated at the boundary of every public method (`_guarded`): corruption →
QueueCorrupt; full / read-only / I/O / cannot open / busy (after a few retries) → StateUnavailable
with a short reason; the transaction is rolled back and the same Queue works again once the cause
is gone. The queue's own file is the one file this module moves: `open_queue` and
`Queue.quarantine` rename a corrupt file aside (never delete it) and start a fresh one.
"""
from __future__ import annotations

import errno
import functools
import json
import os
import re
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import structlog

from .errors import InvalidTransition, QueueCorrupt, StateUnavailable, UnknownJob, WatcherError

log = structlog.get_logger(__name__)

PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"
STATES = (PENDING, RUNNING, DONE, FAILED)

# (state, event) → new state. Anything else raises InvalidTransition and changes nothing.
TRANSITIONS: dict[tuple[str, str], str] = {
    (PENDING, "claim"): RUNNING,
    (RUNNING, "finish"): DONE,          # result + sidecar published, original archived/deleted
    (RUNNING, "fail"): FAILED,          # original + sidecar in failed/ (also: too many interruptions)
    (RUNNING, "retry_later"): PENDING,  # transient error of the photo: attempts + 1, backoff
    (RUNNING, "defer"): PENDING,        # folder problem / weights missing: no attempt spent
    (RUNNING, "requeue"): PENDING,      # stop before finishing; at start-up (crash) + 1 interruption
    (PENDING, "recover_done"): DONE,    # a publish found complete on disk at start-up
    (PENDING, "recover_failed"): FAILED,
    (FAILED, "retry"): PENDING,         # `photoenhanced retry`: attempts and interruptions reset
}

# wait_reason of a running job claimed ahead, decoded and waiting for the model (jobs.prefetch): a
# restart returns it to pending without counting an interruption (it was not being worked on)
AHEAD = "decoded ahead, waiting for the model"


def interrupted(interruptions: int, wait_reason: str | None) -> int:
    """The count after a running job is sent back to pending without finishing (restart, lease
    expiry): one more, unless it only waited, decoded ahead (AHEAD), and never reached the model."""
    return interruptions + (wait_reason != AHEAD)


SCHEMA_VERSION = 4
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
    # 3: a job that was running when the daemon died counts one interruption (poison photos)
    3: """
    ALTER TABLE jobs ADD COLUMN interruptions INTEGER NOT NULL DEFAULT 0;
    """,
    # 4: the operator's controls (pause/resume) and a log of state-changing requests (CLI and web)
    4: """
    CREATE TABLE control (
        id      INTEGER PRIMARY KEY CHECK (id = 1),
        paused  INTEGER NOT NULL DEFAULT 0,
        source  TEXT,
        updated REAL
    );
    CREATE TABLE requests (
        id      INTEGER PRIMARY KEY AUTOINCREMENT,
        action  TEXT NOT NULL,
        job     INTEGER,
        source  TEXT NOT NULL,
        created REAL NOT NULL
    );
    """,
}
REQUEST_ACTIONS = ("pause", "resume", "retry", "enqueue")

_COLS = ("id, rel_path, size, mtime_ns, sha256, state, attempts, not_before, profile, params, error_kind,"
         " last_error, wait_reason, plan, outputs, duplicate_of, created, updated, started, finished,"
         " interruptions")
_COL_NAMES = tuple(c.strip() for c in _COLS.split(","))
_JSON_COLS = ("params", "plan", "outputs")


# --- names and text as SQLite values ---------------------------------------------------------------

def _name(rel_path: str) -> str | bytes:
    """The one stored form of a name: TEXT when it is valid UTF-8, else a BLOB of its raw bytes."""
    try:
        rel_path.encode("utf-8")
        return rel_path
    except UnicodeEncodeError:
        return os.fsencode(rel_path)


def _unname(value: str | bytes) -> str:
    return os.fsdecode(value) if isinstance(value, (bytes, memoryview)) else value


_SURROGATE = re.compile("[\ud800-\udfff]")


def _escape_surrogate(m: re.Match) -> str:
    cp = ord(m.group())
    return f"\\x{cp - 0xDC00:02x}" if 0xDC80 <= cp <= 0xDCFF else f"\\u{cp:04x}"


def _text(value: Any) -> Any:
    """A str SQLite will take: a lone surrogate (a raw name byte quoted in a message) written the
    way watcher.names.display writes it (`\\xe9`); all other text unchanged."""
    if isinstance(value, str):
        return _SURROGATE.sub(_escape_surrogate, value)
    return value


def _value(col: str, v: Any) -> Any:
    if col in _JSON_COLS:
        return json.dumps(v) if v is not None else None      # ensure_ascii: surrogates as \udcXX
    if col == "rel_path":
        return _name(v)
    return _text(v)


# --- storage errors ------------------------------------------------------------------------------

_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_READONLY, _SQLITE_IOERR = 5, 6, 8, 10
_SQLITE_CORRUPT, _SQLITE_FULL, _SQLITE_CANTOPEN, _SQLITE_NOTADB = 11, 13, 14, 26
_SQLITE_READONLY_DBMOVED = _SQLITE_READONLY | (4 << 8)
BUSY_RETRIES = 3            # tries after the first, each after the connection's busy timeout


class _Busy(StateUnavailable):
    """Busy/locked past the busy timeout: retried by `_guarded` before it surfaces."""


def _fs_reason(folder: Path) -> str | None:
    """What the file system says about the state folder, when it explains an error."""
    try:
        st = os.statvfs(folder)
    except FileNotFoundError:
        return "state_dir missing"
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return "state_dir read-only"
    if st.f_bavail == 0 or (st.f_files and st.f_favail == 0):
        return "state_dir full"
    return None


def translate(exc: sqlite3.Error, path: Path) -> WatcherError | None:
    """The WatcherError for a storage failure, or None for anything else (a bug: let it surface)."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    name = getattr(exc, "sqlite_errorname", None)
    msg = str(exc)
    low = msg.lower()
    where = str(path)
    if primary in (_SQLITE_CORRUPT, _SQLITE_NOTADB) or "malformed" in low or "not a database" in low:
        return QueueCorrupt(f"queue {where}: {msg}", path=where)
    if primary in (_SQLITE_BUSY, _SQLITE_LOCKED) or low in ("database is locked", "database table is locked"):
        return _Busy("queue busy", path=where, code=name, detail=msg)
    if primary == _SQLITE_FULL or "database or disk is full" in low:
        return StateUnavailable("state_dir full", path=where, code=name, detail=msg)
    if code == _SQLITE_READONLY_DBMOVED:
        return StateUnavailable("queue file moved or deleted", path=where, code=name, detail=msg)
    if primary == _SQLITE_READONLY or "readonly database" in low:
        return StateUnavailable(_fs_reason(path.parent) or "state_dir read-only", path=where, code=name,
                                detail=msg)
    if primary == _SQLITE_IOERR or "disk i/o error" in low:
        return StateUnavailable(_fs_reason(path.parent) or "state_dir I/O error", path=where, code=name,
                                detail=msg)
    if primary == _SQLITE_CANTOPEN or "unable to open database" in low:
        return StateUnavailable(_fs_reason(path.parent) or "cannot open the queue in state_dir", path=where,
                                code=name, detail=msg)
    return None


F = TypeVar("F", bound=Callable[..., Any])


def _guarded(method: F) -> F:
    """Translate storage errors of one Queue operation; retry it when the database is busy.

    The operation's transaction is rolled back before anything is raised or retried, so a retry
    starts clean and the connection stays usable."""
    @functools.wraps(method)
    def wrapper(self: "Queue", *args: Any, **kwargs: Any) -> Any:
        attempt = 0
        while True:
            try:
                return method(self, *args, **kwargs)
            except sqlite3.Error as exc:
                self._rollback()
                err = translate(exc, self.path)
                if err is None:
                    raise
                if isinstance(err, _Busy) and attempt < self.busy_retries:
                    attempt += 1
                    log.warning("queue.busy", op=method.__name__, attempt=attempt, error=str(exc))
                    self._backoff(attempt)
                    continue
                raise err from exc
    wrapper.guarded = True          # type: ignore[attr-defined]
    return wrapper                  # type: ignore[return-value]


# --- rows --------------------------------------------------------------------------------------

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
    interruptions: int = 0

    @classmethod
    def from_row(cls, row: tuple) -> "Job":
        d = dict(zip(_COL_NAMES, row))
        d["rel_path"] = _unname(d["rel_path"])
        d["params"] = json.loads(d["params"]) if d["params"] else {}
        d["plan"] = json.loads(d["plan"]) if d["plan"] else None
        d["outputs"] = json.loads(d["outputs"]) if d["outputs"] else []
        return cls(**d)

    def public(self) -> dict:
        """The `list --json` shape. `path` is the name as Python holds it (may contain surrogates):
        the CLI/web encode it for display (watcher.names.fields)."""
        return {"id": self.id, "path": self.rel_path, "state": self.state, "attempts": self.attempts,
                "interruptions": self.interruptions,
                "last_error": self.last_error, "error_kind": self.error_kind, "profile": self.profile,
                "sha256": self.sha256, "wait_reason": self.wait_reason,
                "not_before": self.not_before or None, "created": self.created, "updated": self.updated,
                "outputs": self.outputs, "duplicate_of": self.duplicate_of}


@dataclass(frozen=True)
class Finished:
    """A finished job known from outside the queue (a sidecar found by watcher.rebuild)."""
    id: int
    rel_path: str
    state: str                      # done | failed
    size: int
    mtime_ns: int
    sha256: str
    outputs: list
    params: dict = field(default_factory=dict)
    profile: str | None = None
    error_kind: str | None = None
    last_error: str | None = None
    attempts: int = 0
    interruptions: int = 0
    duplicate_of: int | None = None
    finished: float | None = None


# --- the queue's own file ------------------------------------------------------------------------

def _stamp(now: float | None) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:       # file systems that cannot fsync a folder
            raise
    finally:
        os.close(fd)


def move_aside(path: Path, now: float | None = None, error: str = "") -> Path:
    """Rename a corrupt queue file (and its -wal/-shm) to `NAME.corrupt-<UTC stamp>[.N]`, never
    deleting or overwriting anything; fsync the folder; log `queue.corrupt`. Returns the new path.
    -wal/-shm go first: a stale WAL left beside a new database could be replayed into it."""
    path = Path(path)
    base = path.with_name(f"{path.name}.corrupt-{_stamp(now)}")
    dest, n = base, 0
    while any(os.path.lexists(f"{dest}{s}") for s in ("", "-wal", "-shm", "-journal")):
        n += 1
        dest = base.with_name(f"{base.name}.{n}")
    moved = []
    try:
        for suffix in ("-wal", "-shm", "-journal", ""):
            src = Path(f"{path}{suffix}")
            if os.path.lexists(src):
                os.rename(src, f"{dest}{suffix}")
                moved.append(f"{dest}{suffix}")
        _fsync_dir(path.parent)
    except OSError as exc:
        reason = _fs_reason(path.parent) or "cannot move the corrupt queue aside"
        raise StateUnavailable(reason, path=str(path), detail=str(exc)) from exc
    log.error("queue.corrupt", path=str(path), moved_to=str(dest), files=moved, error=error,
              lost="the old queue's pending jobs, history and publish plans",
              action="a new queue is rebuilt from the folders")
    return dest


def open_queue(path: Path | str, *, now: float | None = None, timeout: float = 10.0) -> tuple["Queue", Path | None]:
    """Open (creating) the daemon's queue and check it once (`PRAGMA quick_check`). A file that is
    not a database, truncated or malformed is moved aside (`move_aside`) and a fresh queue is made.
    Returns (queue, the quarantined path or None). StateUnavailable when the storage is unusable."""
    path = Path(path)
    try:
        queue = Queue(path, timeout=timeout)
        try:
            queue.quick_check()
        except BaseException:
            queue.close()
            raise
        return queue, None
    except QueueCorrupt as exc:
        dest = move_aside(path, now, error=str(exc))
    return Queue(path, timeout=timeout), dest


class Queue:
    def __init__(self, path: Path | str, *, readonly: bool = False, timeout: float = 10.0,
                 busy_retries: int = BUSY_RETRIES):
        self.path = Path(path)
        self.readonly = readonly
        self.timeout = timeout
        self.busy_retries = busy_retries
        self.db: sqlite3.Connection | None = None
        self._open()

    @_guarded
    def _open(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None
        try:
            if self.readonly:
                self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=self.timeout,
                                          isolation_level=None, check_same_thread=False)
            else:
                self.db = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None,
                                          check_same_thread=False)
            self.db.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            if self.readonly:
                self.db.execute("PRAGMA schema_version")     # open errors surface here, not later
            else:
                self.db.execute("PRAGMA journal_mode = WAL")
                self.db.execute("PRAGMA synchronous = FULL")
                self.db.execute("PRAGMA foreign_keys = ON")
                self._migrate()
        except BaseException:
            if self.db is not None:
                self.db.close()         # never hold a file we are about to report (and maybe move)
                self.db = None
            raise

    def close(self) -> None:
        if self.db is not None:
            self.db.close()

    def _rollback(self) -> None:
        if self.db is not None and self.db.in_transaction:
            try:
                self.db.execute("ROLLBACK")
            except sqlite3.Error:
                pass                    # SQLite rolled back itself (SQLITE_FULL, IOERR …)

    def _backoff(self, attempt: int) -> None:
        """Pause before retrying a busy operation (the busy timeout already waited)."""
        time.sleep(min(0.05 * 2 ** attempt, 1.0))

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self._rollback()
            raise
        else:
            try:
                self.db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise

    def _migrate(self) -> None:
        if self.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
            return                      # the common case takes no write lock (a busy writer elsewhere)
        with self._tx() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise WatcherError(f"queue {self.path} has schema {version}, newer than this program ({SCHEMA_VERSION})")
            for v in range(version + 1, SCHEMA_VERSION + 1):
                for stmt in _MIGRATIONS[v].split(";"):
                    if stmt.strip():
                        db.execute(stmt)
                db.execute(f"PRAGMA user_version = {v}")

    @_guarded
    def quick_check(self) -> None:
        """`PRAGMA quick_check`: QueueCorrupt naming the first problems when the file is damaged."""
        rows = [r[0] for r in self.db.execute("PRAGMA quick_check")]
        if rows != ["ok"]:
            raise QueueCorrupt(f"queue {self.path}: quick_check: " + "; ".join(map(str, rows[:5])),
                               path=str(self.path))

    def quarantine(self, now: float | None = None, error: str = "") -> Path:
        """Runtime corruption (a QueueCorrupt from any operation): close this connection, move the
        file aside (see move_aside) and continue on a fresh, empty queue at the same path — this
        object stays usable. The caller closes its other connections first, then runs
        watcher.rebuild.rebuild(). Returns the quarantined path."""
        if self.readonly:
            raise WatcherError("a read-only queue cannot be quarantined")
        self.close()
        self.db = None
        dest = move_aside(self.path, now, error=error)
        self._open()
        return dest

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
        vals = [_value(k, v) for k, v in cols.items()]
        cur = db.execute(f"UPDATE jobs SET {assign} WHERE id = ? RETURNING {_COLS}", (*vals, job_id))
        return Job.from_row(cur.fetchone())

    @_guarded
    def apply(self, job_id: int, event: str, now: float | None = None, **sets: Any) -> Job:
        with self._tx() as db:
            return self._transition(db, job_id, event, time.time() if now is None else now, **sets)

    # --- named operations -------------------------------------------------------------------

    @_guarded
    def enqueue(self, rel_path: str, size: int, mtime_ns: int, sha256: str, now: float | None = None,
                not_before: float = 0.0) -> Job | None:
        """A new pending job, or None when rel_path already has a pending/running one."""
        now = time.time() if now is None else now
        name = _name(rel_path)
        with self._tx() as db:
            if db.execute("SELECT 1 FROM jobs WHERE rel_path = ? AND state IN ('pending','running')",
                          (name,)).fetchone():
                return None
            cur = db.execute(
                f"INSERT INTO jobs (rel_path, size, mtime_ns, sha256, state, not_before, created, updated)"
                f" VALUES (?, ?, ?, ?, 'pending', ?, ?, ?) RETURNING {_COLS}",
                (name, size, mtime_ns, _text(sha256), not_before, now, now))
            return Job.from_row(cur.fetchone())

    @_guarded
    def claim(self, now: float | None = None) -> Job | None:
        """The oldest due pending job, atomically moved to running. The caller fails it with kind
        `interrupted` when `job.interruptions` reached its limit (the photo keeps killing us)."""
        now = time.time() if now is None else now
        with self._tx() as db:
            cur = db.execute(
                f"UPDATE jobs SET state = 'running', started = ?, updated = ?, wait_reason = NULL"
                f" WHERE id = (SELECT id FROM jobs WHERE state = 'pending' AND not_before <= ?"
                f" ORDER BY id LIMIT 1) RETURNING {_COLS}", (now, now, now))
            row = cur.fetchone()
            return Job.from_row(row) if row else None

    @_guarded
    def set_plan(self, job_id: int, plan: dict | None, **sets: Any) -> None:
        """Record a publish plan (durably, before any rename) on a running or pending job."""
        with self._tx() as db:
            cols = {"plan": plan, **sets}
            assign = ", ".join(f"{k} = ?" for k in cols)
            vals = [_value(k, v) for k, v in cols.items()]
            n = db.execute(f"UPDATE jobs SET {assign}, updated = ? WHERE id = ? AND state IN ('pending','running')",
                           (*vals, time.time(), job_id)).rowcount
            if n != 1:
                raise InvalidTransition(f"job {job_id}: plan only on pending/running jobs")

    @_guarded
    def finish(self, job_id: int, outputs: list, now: float | None = None, duplicate_of: int | None = None) -> Job:
        return self.apply(job_id, "finish", now, outputs=outputs, plan=None, finished=now or time.time(),
                          duplicate_of=duplicate_of, error_kind=None, last_error=None)

    def fail(self, job_id: int, kind: str, message: str, now: float | None = None, outputs: list | None = None,
             attempts: int | None = None) -> Job:
        extra = {} if attempts is None else {"attempts": attempts}
        return self.apply(job_id, "fail", now, error_kind=kind, last_error=message, plan=None,
                          outputs=outputs or [], finished=now or time.time(), **extra)

    @_guarded
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

    @_guarded
    def requeue_running(self, now: float | None = None) -> list[Job]:
        """Start-up (the previous process died): every running job goes back to pending, attempts
        kept, one more interruption counted (not for a job that waited, decoded ahead: AHEAD). Returns them."""
        now = time.time() if now is None else now
        with self._tx() as db:
            rows = db.execute("SELECT id, interruptions, wait_reason FROM jobs WHERE state = 'running'"
                              " ORDER BY id").fetchall()
            return [self._transition(db, i, "requeue", now, not_before=0, wait_reason=None,
                                     interruptions=interrupted(n, w)) for i, n, w in rows]

    def requeue(self, job_id: int, now: float | None = None) -> Job:
        """A graceful stop before the job finished: back to pending, no interruption counted."""
        return self.apply(job_id, "requeue", now, not_before=0, wait_reason=None)

    def retry(self, job_id: int, now: float | None = None, file: tuple[int, int, str] | None = None) -> Job:
        """failed → pending with attempts and interruptions reset. `file`: (size, mtime_ns, sha256) of
        the original as it is back in the inbox (the user may have fixed it in failed/ meanwhile)."""
        sets = dict(zip(("size", "mtime_ns", "sha256"), file)) if file else {}
        return self.apply(job_id, "retry", now, attempts=0, interruptions=0, not_before=0, error_kind=None,
                          last_error=None, outputs=[], finished=None, **sets)

    @_guarded
    def forget(self, job_id: int) -> None:
        """Drop a pending/running job whose file vanished or changed before it was processed."""
        with self._tx() as db:
            n = db.execute("DELETE FROM jobs WHERE id = ? AND state IN ('pending','running')", (job_id,)).rowcount
            if n != 1:
                raise InvalidTransition(f"job {job_id}: only pending/running jobs can be forgotten")

    @_guarded
    def insert_finished(self, rows: Sequence[Finished], now: float) -> list[int]:
        """Rebuild: insert done/failed rows with their own ids, in one transaction. A row whose id
        is already taken is left out. New jobs then get ids above every inserted one. Returns the
        ids inserted."""
        inserted: list[int] = []
        with self._tx() as db:
            for r in rows:
                if r.state not in (DONE, FAILED):
                    raise ValueError(f"job {r.id}: a rebuilt row is done or failed, not {r.state}")
                cols = {"id": r.id, "rel_path": r.rel_path, "size": r.size, "mtime_ns": r.mtime_ns,
                        "sha256": r.sha256, "state": r.state, "attempts": r.attempts,
                        "interruptions": r.interruptions, "profile": r.profile, "params": r.params,
                        "error_kind": r.error_kind, "last_error": r.last_error, "outputs": r.outputs,
                        "duplicate_of": r.duplicate_of, "created": now, "updated": now,
                        "finished": now if r.finished is None else r.finished}
                cur = db.execute(f"INSERT OR IGNORE INTO jobs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                                 [_value(k, v) for k, v in cols.items()])
                if cur.rowcount == 1:
                    inserted.append(r.id)
            if inserted:
                top = max(inserted)
                if db.execute("UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = 'jobs'", (top,)).rowcount == 0:
                    db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('jobs', ?)", (top,))
        return inserted

    # --- reads ------------------------------------------------------------------------------

    @_guarded
    def get(self, job_id: int) -> Job:
        row = self.db.execute(f"SELECT {_COLS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise UnknownJob(f"no job {job_id}")
        return Job.from_row(row)

    @_guarded
    def jobs(self, state: str | None = None, limit: int | None = None, offset: int = 0,
             newest_first: bool = False) -> list[Job]:
        q = f"SELECT {_COLS} FROM jobs" + (" WHERE state = ?" if state else "") + \
            (" ORDER BY id DESC" if newest_first else " ORDER BY id")
        if limit or offset:
            q += f" LIMIT {int(limit) if limit else -1} OFFSET {max(0, int(offset))}"
        return [Job.from_row(r) for r in self.db.execute(q, (state,) if state else ())]

    @_guarded
    def active(self, rel_path: str) -> Job | None:
        row = self.db.execute(f"SELECT {_COLS} FROM jobs WHERE rel_path = ? AND state IN ('pending','running')",
                              (_name(rel_path),)).fetchone()
        return Job.from_row(row) if row else None

    @_guarded
    def with_plan(self) -> list[Job]:
        return [Job.from_row(r) for r in self.db.execute(
            f"SELECT {_COLS} FROM jobs WHERE plan IS NOT NULL AND state IN ('pending','running') ORDER BY id")]

    @_guarded
    def done_with(self, sha256: str, params_key: str) -> Job | None:
        """The latest done, non-duplicate job with this content and these pixel-changing settings."""
        for r in self.db.execute(f"SELECT {_COLS} FROM jobs WHERE sha256 = ? AND state = 'done' ORDER BY id DESC",
                                 (_text(sha256),)):
            job = Job.from_row(r)
            if job.params.get("key") == params_key and job.outputs:
                return job
        return None

    @_guarded
    def rebuilt_done(self, rel_path: str, sha256: str) -> Job | None:
        """The latest done row that a rebuild made (from a sidecar) for this path and content, with
        an output: an original still in the inbox whose publish finished before the old queue was
        lost."""
        for r in self.db.execute(f"SELECT {_COLS} FROM jobs WHERE rel_path = ? AND sha256 = ? AND state = 'done'"
                                 f" ORDER BY id DESC", (_name(rel_path), _text(sha256))):
            job = Job.from_row(r)
            if job.params.get("rebuilt") and job.outputs:
                return job
        return None

    @_guarded
    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in STATES}
        for state, n in self.db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
            out[state] = n
        return out

    @_guarded
    def due_pending(self, now: float) -> int:
        return self.db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'pending' AND not_before <= ?",
                               (now,)).fetchone()[0]

    @_guarded
    def backing_off(self, now: float) -> int:
        return self.db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'pending' AND not_before > ? AND attempts > 0",
                               (now,)).fetchone()[0]

    @_guarded
    def done_since(self, since: float) -> int:
        return self.db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'done' AND finished >= ?",
                               (since,)).fetchone()[0]

    # --- the operator's controls (pause/resume) and the request log --------------------------

    def _has_table(self, name: str) -> bool:
        """False on a read-only connection to a queue an older program made (no migration yet)."""
        return self.db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                               (name,)).fetchone() is not None

    @_guarded
    def paused(self) -> bool:
        """Has the operator paused the worker (`photoenhanced pause`, the web page)?"""
        if self.readonly and not self._has_table("control"):
            return False
        row = self.db.execute("SELECT paused FROM control WHERE id = 1").fetchone()
        return bool(row and row[0])

    @_guarded
    def set_paused(self, paused: bool, source: str, now: float | None = None) -> bool:
        """Pause or resume the worker (it finishes the photo in hand, then claims nothing until
        resumed); the request is logged with its source. Returns the previous setting."""
        now = time.time() if now is None else now
        with self._tx() as db:
            row = db.execute("SELECT paused FROM control WHERE id = 1").fetchone()
            db.execute("INSERT INTO control (id, paused, source, updated) VALUES (1, ?, ?, ?) ON CONFLICT(id)"
                       " DO UPDATE SET paused = excluded.paused, source = excluded.source, updated = excluded.updated",
                       (int(bool(paused)), _text(source), now))
            self._log_request(db, "pause" if paused else "resume", None, source, now)
            return bool(row and row[0])

    def _log_request(self, db: sqlite3.Connection, action: str, job: int | None, source: str, now: float) -> None:
        if action not in REQUEST_ACTIONS:
            raise ValueError(f"unknown request action {action!r}")
        db.execute("INSERT INTO requests (action, job, source, created) VALUES (?, ?, ?, ?)",
                   (action, job, _text(source), now))

    @_guarded
    def record_request(self, action: str, source: str, job: int | None = None, now: float | None = None) -> None:
        """Log a state-changing request (retry, enqueue …) that went through another method."""
        with self._tx() as db:
            self._log_request(db, action, job, source, time.time() if now is None else now)

    @_guarded
    def requests(self, limit: int = 50) -> list[dict]:
        """The newest logged requests first: {id, action, job, source, created}."""
        if self.readonly and not self._has_table("requests"):
            return []
        cur = self.db.execute("SELECT id, action, job, source, created FROM requests ORDER BY id DESC LIMIT ?",
                              (int(limit),))
        return [dict(zip(("id", "action", "job", "source", "created"), r)) for r in cur]

    # --- the daemon's status row (read by `photoenhanced status`) ----------------------------

    @_guarded
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
                (pid, _text(state), _text(reason), json.dumps(current) if current else None,
                 json.dumps(metrics) if metrics is not None else None, started, now))

    @_guarded
    def daemon(self) -> dict | None:
        row = self.db.execute("SELECT pid, state, reason, current, metrics, started, updated FROM daemon WHERE id = 1").fetchone()
        if row is None:
            return None
        pid, state, reason, current, metrics, started, updated = row
        return {"pid": pid, "state": state, "reason": reason, "current": json.loads(current) if current else None,
                "metrics": json.loads(metrics) if metrics else None, "started": started, "updated": updated}
