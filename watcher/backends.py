"""Which queue a config means, and what several hosts need on top of the state machine.

`connect(cfg)` / `open_queue(cfg)` pick the backend from `queue.url`: absent or `sqlite:` = the
SQLite file in state_dir (watcher.queue, extended here by `SqliteQueue`), `postgresql://…` = the
shared queue (watcher.pgqueue). Both have the same public interface, the same transitions and the
same exceptions, plus:

* **leases**: `claim()` returns a `LeasedJob` whose lease expires `lease_s` after the claim unless
  `heartbeat(job_id, token)` renews it; a claim first returns every running job whose lease
  expired to pending, counting one interruption (the host died or lost the network).
* **fencing**: each claim takes a new, larger `token`; the queue object remembers the tokens it
  holds, and every later write on that job (plan, finish, fail, retry, defer, requeue, forget,
  heartbeat) is recorded only while the token is still the job's current one — else `LeaseLost`
  and nothing changes.
* **hosts**: each daemon registers (id from `state_dir/host-id`, host name, pid, version); its
  status row doubles as its heartbeat; `hosts()` lists them for `photoenhanced status`;
  `prune_hosts()` removes rows of hosts silent for HOSTS_KEEP_S, or gone (stopped or silent) for
  HOSTS_GONE_S while holding no lease (done at registration, and from the status row now and then).

SQLite keeps its lease/host bookkeeping in side tables created idempotently (`CREATE TABLE IF NOT
EXISTS`), outside the user_version chain of watcher.queue. Credentials never reach a log line:
`mask_url` hides the password of every URL shown.
"""
from __future__ import annotations

import errno
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass, fields as dc_fields
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

import structlog

from . import queue as q
from .errors import InvalidTransition, LeaseLost, QueueCorrupt, StateUnavailable, UnknownJob, WatcherError
from .queue import Job, Queue, _guarded, move_aside

log = structlog.get_logger(__name__)

DEFAULT_LEASE_S = 60.0
HOSTS_KEEP_S = 7 * 86400.0       # a host row silent this long is removed, whatever it holds
HOSTS_GONE_S = 86400.0           # a host gone (stopped, or silent) this long and holding no lease: removed
HOST_ID_FILE = "host-id"


@dataclass(frozen=True)
class LeasedJob(Job):
    """A claimed job: the fencing token of this claim, the host holding it and its lease's end."""
    token: int | None = None
    lease_host: str | None = None
    lease_expires: float | None = None


def leased(job: Job, token: int | None, host: str | None, expires: float | None) -> LeasedJob:
    return LeasedJob(**{f.name: getattr(job, f.name) for f in dc_fields(Job)}, token=token, lease_host=host,
                     lease_expires=expires)


# --- URLs and credentials ------------------------------------------------------------------------

_PW_KV = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]+)", re.I)


def mask_url(url: str | None) -> str:
    """The URL as it may be shown: a password (userinfo or `password=`) replaced by ***."""
    if not url:
        return "sqlite:"
    s = str(url)
    try:
        parts = urlsplit(s)
        if parts.password is not None:
            user = parts.username or ""
            host = parts.hostname or ""
            if parts.port:
                host = f"{host}:{parts.port}"
            s = urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    except ValueError:
        pass
    return _PW_KV.sub(lambda m: m.group(1) + "***", s)


def scrub(text: str, url: str | None) -> str:
    """A message with the URL's password (if any) removed wherever it appears."""
    out = str(text)
    try:
        pw = urlsplit(url).password if url else None
    except ValueError:
        pw = None
    if pw:
        out = out.replace(pw, "***")
    return _PW_KV.sub(lambda m: m.group(1) + "***", out)


def is_postgres(url: str | None) -> bool:
    return bool(url) and str(url).split(":", 1)[0] in ("postgresql", "postgres")


def sqlite_path(url: str | None, state_dir: Path | None) -> Path:
    """`sqlite:` (the state_dir's queue.sqlite3) or `sqlite:PATH`."""
    rest = (url or "sqlite:").split(":", 1)[1] if url else ""
    if rest.startswith("//"):
        rest = rest[2:]
    if rest:
        return Path(rest)
    if state_dir is None:
        raise WatcherError("sqlite: needs a state_dir (or sqlite:PATH)")
    return Path(state_dir) / "queue.sqlite3"


def where(cfg) -> str:
    """Where the queue lives, for a log or status line (never with a password)."""
    url = getattr(getattr(cfg, "queue", None), "url", None)
    return mask_url(url) if is_postgres(url) else str(cfg.state_dir)


# --- this host ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Host:
    id: str
    name: str
    pid: int
    version: str


def _version() -> str:
    try:
        from importlib import metadata
        return metadata.version("photoenhanced")
    except Exception:
        return "0"


def known_host(state_dir: Path) -> Host | None:
    """This state_dir's host identity if a daemon ever ran on it (the CLI: never creates one)."""
    try:
        hid = (Path(state_dir) / HOST_ID_FILE).read_text().strip()
    except OSError:
        return None
    return Host(hid, socket.gethostname(), os.getpid(), _version()) if re.fullmatch(r"[0-9a-f]{12}", hid) else None


def host_identity(state_dir: Path) -> Host:
    """This daemon as a host: a stable id kept in state_dir/host-id (made once, 12 hex digits), so a
    restarted daemon knows its own unfinished jobs and its own temp folder."""
    path = Path(state_dir) / HOST_ID_FILE
    try:
        hid = path.read_text().strip()
    except FileNotFoundError:
        hid = ""
    if not re.fullmatch(r"[0-9a-f]{12}", hid):
        hid = uuid.uuid4().hex[:12]
        tmp = path.with_name(f".{HOST_ID_FILE}.{os.getpid()}")
        try:
            tmp.write_text(hid + "\n")
            os.replace(tmp, path)
        except OSError as exc:         # a full or read-only state_dir: the daemon waits, never exits
            tmp.unlink(missing_ok=True)
            reason = {errno.ENOSPC: "state_dir full", errno.EDQUOT: "state_dir full",
                      errno.EROFS: "state_dir read-only", errno.EACCES: "state_dir read-only"}.get(
                exc.errno, "state_dir I/O error")
            raise StateUnavailable(reason, path=str(path), detail=exc.strerror or str(exc)) from exc
    return Host(hid, socket.gethostname(), os.getpid(), _version())


# --- choosing a backend ----------------------------------------------------------------------------

def _settings(cfg) -> tuple[str | None, float]:
    qs = getattr(cfg, "queue", None)
    return getattr(qs, "url", None), float(getattr(qs, "lease_seconds", DEFAULT_LEASE_S) or DEFAULT_LEASE_S)


def connect(cfg, *, daemon: bool = False, readonly: bool = False, url: str | None = None,
            on_wait: Callable[[], None] | None = None):
    """The queue `cfg` names (or `url`). `daemon`: this process is the daemon: register it as a
    host (its id from state_dir). `on_wait`: called while a job in hand waits for an unreachable
    PostgreSQL (the worker's watchdog ping). StateUnavailable when the storage or server cannot be
    used now."""
    cfg_url, lease_s = _settings(cfg)
    url = url or cfg_url
    host = host_identity(cfg.state_dir) if daemon else known_host(cfg.state_dir)
    if is_postgres(url):
        from .pgqueue import PgQueue
        return PgQueue(url, host=host, lease_s=lease_s, readonly=readonly, register=daemon, on_wait=on_wait)
    return SqliteQueue(sqlite_path(url, cfg.state_dir), host=host, lease_s=lease_s, readonly=readonly,
                       register=daemon)


def open_queue(cfg, *, now: float | None = None, daemon: bool = True):
    """The daemon's queue, checked once: (queue, the quarantined SQLite file or None). A SQLite file
    that is not a sound database is moved aside (watcher.queue.move_aside) and a fresh one made; a
    PostgreSQL queue is never corrupt from our side (the server guards its files)."""
    url, _ = _settings(cfg)
    if is_postgres(url):
        return connect(cfg, daemon=daemon), None
    try:
        queue = connect(cfg, daemon=daemon)
        try:
            queue.quick_check()
        except BaseException:
            queue.close()
            raise
        return queue, None
    except QueueCorrupt as exc:
        dest = move_aside(sqlite_path(url, cfg.state_dir), now, error=str(exc))
    return connect(cfg, daemon=daemon), dest


# --- SQLite with leases, fencing and a hosts table -----------------------------------------------

_SIDE_TABLES = """
CREATE TABLE IF NOT EXISTS leases (
    job_id  INTEGER PRIMARY KEY,
    token   INTEGER NOT NULL,
    host    TEXT,
    expires REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS fencing (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    last INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS hosts (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    pid         INTEGER,
    version     TEXT,
    started     REAL,
    last_seen   REAL,
    current_job INTEGER,
    state       TEXT,
    reason      TEXT
);
"""
HOST_COLS = ("id", "name", "pid", "version", "started", "last_seen", "current_job", "state", "reason")


class SqliteQueue(Queue):
    """watcher.queue.Queue (one host: the state_dir's flock) with the multi-host interface."""

    backend = "sqlite"
    shared = False                   # one host: start-up recovery may finish every recorded plan

    def __init__(self, path: Path | str, *, host: Host | None = None, lease_s: float = DEFAULT_LEASE_S,
                 clock: Callable[[], float] = time.time, register: bool = True, **kw: Any):
        self.host = host
        self.register = register
        self.lease_s = float(lease_s)
        self.clock = clock
        self._held: dict[int, int] = {}
        self.tmp_subdir: str | None = None     # one host: today's .photoenhanced-tmp/ layout
        super().__init__(path, **kw)

    @_guarded
    def _open(self) -> None:
        Queue._open.__wrapped__(self)          # type: ignore[attr-defined]
        if self.readonly:
            return
        have = {r[0] for r in self.db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name IN ('leases', 'fencing', 'hosts')")}
        if len(have) < 3:
            with self._tx() as db:
                for stmt in _SIDE_TABLES.split(";"):
                    if stmt.strip():
                        db.execute(stmt)
        if self.host is not None and self.register:
            self._register()

    def _register(self) -> None:
        h, now = self.host, time.time()
        with self._tx() as db:
            db.execute("INSERT INTO hosts (id, name, pid, version, started, last_seen) VALUES (?, ?, ?, ?, ?, ?)"
                       " ON CONFLICT(id) DO UPDATE SET name = excluded.name, pid = excluded.pid,"
                       " version = excluded.version, started = excluded.started, last_seen = excluded.last_seen",
                       (h.id, q._text(h.name), h.pid, h.version, now, now))

    def _has_side_tables(self) -> bool:
        return self.db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'leases'").fetchone() \
            is not None

    # --- fencing ------------------------------------------------------------------------------

    def _fence(self, db, job_id: int) -> None:
        """LeaseLost unless this object's token for job_id (when it holds one) is still current."""
        held = self._held.get(job_id)
        if held is None:
            return
        row = db.execute("SELECT l.token FROM leases l JOIN jobs j ON j.id = l.job_id"
                         " WHERE l.job_id = ? AND j.state = 'running'", (job_id,)).fetchone()
        if row is None or row[0] != held:
            raise LeaseLost(f"job {job_id}: lease lost (token {held} is no longer current)", job_id)

    def _transition(self, db, job_id: int, event: str, now: float, **sets: Any) -> Job:
        self._fence(db, job_id)
        job = super()._transition(db, job_id, event, now, **sets)
        if job.state != q.RUNNING:
            db.execute("DELETE FROM leases WHERE job_id = ?", (job_id,))
            self._held.pop(job_id, None)
        return job

    def _expire(self, db, now: float) -> list[Job]:
        rows = db.execute("SELECT l.job_id, j.interruptions, j.wait_reason, l.host, l.token FROM leases l"
                          " JOIN jobs j ON j.id = l.job_id WHERE l.expires < ? AND j.state = 'running'",
                          (self.clock(),)).fetchall()
        out = []
        for job_id, n, why, host, token in rows:
            out.append(Queue._transition(self, db, job_id, "requeue", now, not_before=0,
                                         wait_reason=None, interruptions=q.interrupted(n, why)))
            db.execute("DELETE FROM leases WHERE job_id = ?", (job_id,))
            log.warning("queue.lease_expired", job=job_id, host=host, token=token, action="back to pending")
        return out

    @_guarded
    def expire_leases(self, now: float | None = None) -> list[Job]:
        """Every running job whose lease expired back to pending, one interruption counted."""
        now = time.time() if now is None else now
        with self._tx() as db:
            return self._expire(db, now)

    @_guarded
    def claim(self, now: float | None = None) -> LeasedJob | None:
        now = time.time() if now is None else now
        with self._tx() as db:
            self._expire(db, now)
            cur = db.execute(
                f"UPDATE jobs SET state = 'running', started = ?, updated = ?, wait_reason = NULL"
                f" WHERE id = (SELECT id FROM jobs WHERE state = 'pending' AND not_before <= ?"
                f" ORDER BY id LIMIT 1) RETURNING {q._COLS}", (now, now, now))
            row = cur.fetchone()
            if row is None:
                return None
            job = Job.from_row(row)
            token = db.execute("INSERT INTO fencing (id, last) VALUES (1, 1) ON CONFLICT(id) DO UPDATE"
                               " SET last = last + 1 RETURNING last").fetchone()[0]
            expires = self.clock() + self.lease_s
            host = self.host.id if self.host else None
            db.execute("INSERT OR REPLACE INTO leases (job_id, token, host, expires) VALUES (?, ?, ?, ?)",
                       (job.id, token, host, expires))
            if host:
                db.execute("UPDATE hosts SET current_job = ?, last_seen = ? WHERE id = ?", (job.id, now, host))
        self._held[job.id] = token
        return leased(job, token, host, expires)

    @_guarded
    def heartbeat(self, job_id: int, token: int) -> float:
        """Renew the lease of a job this host holds with `token`; returns its new expiry.
        LeaseLost when the token is no longer current (nothing changes)."""
        with self._tx() as db:
            row = db.execute("SELECT l.token FROM leases l JOIN jobs j ON j.id = l.job_id"
                             " WHERE l.job_id = ? AND j.state = 'running'", (job_id,)).fetchone()
            if row is None or row[0] != token:
                raise LeaseLost(f"job {job_id}: lease lost (token {token} is no longer current)", job_id)
            expires = self.clock() + self.lease_s
            db.execute("UPDATE leases SET expires = ? WHERE job_id = ?", (expires, job_id))
            return expires

    def holds(self, job_id: int) -> int | None:
        """The token this object holds for job_id, if any."""
        return self._held.get(job_id)

    @_guarded
    def lease(self, job_id: int) -> dict | None:
        row = self.db.execute("SELECT token, host, expires FROM leases WHERE job_id = ?", (job_id,)).fetchone()
        return dict(zip(("token", "host", "expires"), row)) if row else None

    @_guarded
    def set_plan(self, job_id: int, plan: dict | None, **sets: Any) -> None:
        with self._tx() as db:
            self._fence(db, job_id)
            cols = {"plan": plan, **sets}
            assign = ", ".join(f"{k} = ?" for k in cols)
            vals = [q._value(k, v) for k, v in cols.items()]
            n = db.execute(f"UPDATE jobs SET {assign}, updated = ? WHERE id = ? AND state IN ('pending','running')",
                           (*vals, time.time(), job_id)).rowcount
            if n != 1:
                raise InvalidTransition(f"job {job_id}: plan only on pending/running jobs")

    @_guarded
    def forget(self, job_id: int) -> None:
        with self._tx() as db:
            self._fence(db, job_id)
            n = db.execute("DELETE FROM jobs WHERE id = ? AND state IN ('pending','running')", (job_id,)).rowcount
            if n != 1:
                raise InvalidTransition(f"job {job_id}: only pending/running jobs can be forgotten")
            db.execute("DELETE FROM leases WHERE job_id = ?", (job_id,))
        self._held.pop(job_id, None)

    @_guarded
    def requeue_running(self, now: float | None = None) -> list[Job]:
        """Start-up: this host's running jobs (one host: all of them) back to pending, +1 interruption."""
        return Queue.requeue_running.__wrapped__(self, now)      # type: ignore[attr-defined]

    # --- hosts --------------------------------------------------------------------------------

    @_guarded
    def set_daemon(self, pid: int, state: str, reason: str | None, current: dict | None,
                   metrics: dict | None = None, started: float | None = None) -> None:
        Queue.set_daemon.__wrapped__(self, pid, state, reason, current, metrics, started)   # type: ignore
        if self.host is not None and self.register and not self.readonly:
            with self._tx() as db:
                db.execute("UPDATE hosts SET pid = ?, state = ?, reason = ?, last_seen = ?, current_job = ?"
                           " WHERE id = ?", (pid, q._text(state), q._text(reason), time.time(),
                                                 (current or {}).get("job"), self.host.id))

    @_guarded
    def prune_hosts(self, now: float | None = None, keep_s: float = HOSTS_KEEP_S,
                    gone_s: float = HOSTS_GONE_S) -> list[str]:
        """Remove host rows silent for keep_s, or gone for gone_s while holding no lease (as PgQueue)."""
        if self.readonly or not self._has_side_tables():
            return []
        now = time.time() if now is None else now
        mine = self.host.id if self.host else None
        with self._tx() as db:
            rows = db.execute("SELECT h.id FROM hosts h WHERE h.id IS NOT ? AND (COALESCE(h.last_seen, 0) < ? OR"
                              " (COALESCE(h.last_seen, 0) < ? AND NOT EXISTS (SELECT 1 FROM leases l JOIN jobs j"
                              " ON j.id = l.job_id WHERE l.host = h.id AND j.state = 'running')))",
                              (mine, now - keep_s, now - gone_s)).fetchall()
            for (hid,) in rows:
                db.execute("DELETE FROM hosts WHERE id = ?", (hid,))
                log.info("queue.host_pruned", host=hid)
        return [r[0] for r in rows]

    @_guarded
    def hosts(self) -> list[dict]:
        """Every registered daemon: id, name, pid, version, started, last_seen, current_job, state, reason."""
        if not self._has_side_tables():
            return []
        return [dict(zip(HOST_COLS, r)) for r in self.db.execute(
            f"SELECT {', '.join(HOST_COLS)} FROM hosts ORDER BY name, id")]
