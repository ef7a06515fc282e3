"""Wiring: config → folders → lock → recovery → discovery + worker thread; signals set flags;
sd_notify; reload; exit codes. No business logic here."""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
from collections import deque
import os
import signal
import sys
import threading
import time
from pathlib import Path

import structlog

from enhancer.api import EnhancerFactory
from enhancer.errors import WeightsMissingError
from . import config as config_mod
from . import logs
from .logs import say
from .config import Config
from .errors import ConfigError, LockedError
from .notify import Notifier
from . import intake, names
from .errors import QueueCorrupt, StateUnavailable
from . import backends
from .queue import Queue
from .worker import Pipeline, Worker, reconcile, serialized

log = structlog.get_logger(__name__)

EX_OK, EX_RUNTIME, EX_USAGE, EX_CONFIG = 0, 1, 2, 78
LOOP_S = 0.2
STATUS_EVERY_S = 2.0          # the status row and metrics are rewritten at least this often
STATUS_CHECK_S = 2.0          # … and looked at this often when nothing happens (at once on a new job or stage)
FOLDERS_EVERY_S = 5.0
WEIGHTS_RETRY_S = 5.0
LOAD_ERROR_RETRY_S = 30.0
STORAGE_RETRY_S = 2.0         # a full/read-only state_dir is tried again this often
RECHECK_S = 2.0               # a file waiting for the job at its path is looked at again this often
UNREADABLE_RECHECK_S = 10.0   # a file we could not read (EACCES) is tried again this often
_REBUILD = -1                 # _run's answer when the queue turned out corrupt


def default_factory(settings):
    from enhancer.pipeline import build_enhancer   # torch is imported only here, and only by the daemon
    return build_enhancer(settings)


class StateLock:
    """One daemon per state_dir: an flock on state_dir/daemon.lock, held for the process's life.

    The file also carries the daemon's state in its first NOTE_BYTES (line 1: the pid; line 2: a
    JSON object with state, reason, updated), preallocated at start and rewritten in place, so
    `photoenhanced status` can still say why the daemon waits when the queue itself cannot be
    written (a full or read-only state_dir)."""

    NOTE_BYTES = 4096

    def __init__(self, state_dir: Path):
        self.path = state_dir / "daemon.lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").split("\n")[0].strip()
            os.close(fd)
            raise LockedError(f"another photoenhanced daemon (pid {pid or '?'}) is running on {self.path.parent}") from None
        self.fd = fd
        with contextlib.suppress(OSError):   # a full disk: the note is written where it fits
            os.posix_fallocate(fd, 0, self.NOTE_BYTES)
        self.note("starting", None)

    def note(self, state: str, reason: str | None) -> None:
        if self.fd is None:
            return
        body = f"{os.getpid()}\n" + json.dumps({"state": state, "reason": reason, "updated": time.time()})
        data = body.encode()[: self.NOTE_BYTES - 1] + b"\n"
        with contextlib.suppress(OSError):   # best effort: the status row in the queue is the main record
            os.pwrite(self.fd, data.ljust(self.NOTE_BYTES, b" "), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    @staticmethod
    def read_note(state_dir: Path) -> dict | None:
        try:
            with open(state_dir / "daemon.lock", "rb") as f:
                lines = f.read(StateLock.NOTE_BYTES).decode(errors="replace").split("\n")
            return json.loads(lines[1]) if len(lines) > 1 and lines[1].strip() else None
        except (OSError, ValueError):
            return None

    @staticmethod
    def held(state_dir: Path) -> bool:
        """Is a daemon running on state_dir? (For the CLI; never blocks.)"""
        try:
            fd = os.open(state_dir / "daemon.lock", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)


class ModelHolder:
    """The warm enhancer, built in the worker thread; rebuilt (new first, then swapped) on reload."""

    def __init__(self, factory: EnhancerFactory):
        self.factory = factory
        self.enhancer = None
        self.settings = None
        self.problem: str | None = "loading models"
        self.next_try = 0.0
        self.loading = False
        self.tried = False          # one load attempt has ended (READY may be sent)

    def ensure(self, settings, now: float) -> None:
        if self.enhancer is not None and settings == self.settings:
            return
        if now < self.next_try and settings == self.settings:
            return
        self.loading = True
        t = time.perf_counter()
        log.info("models.loading", weights_dir=str(settings.weights_dir))
        try:
            new = self.factory(settings)
        except WeightsMissingError as exc:
            reason = f"weights missing — run photoenhanced weights fetch ({exc})" if "weights fetch" not in str(exc) else str(exc)
            if self.problem != reason:
                log.warning("models.weights_missing", reason=str(exc), missing=getattr(exc, "missing", []))
            self.problem = reason   # a reload whose new weights are missing keeps the old models
            self.settings, self.next_try = settings, now + WEIGHTS_RETRY_S
            return
        except Exception as exc:
            self.problem = f"models failed to load: {type(exc).__name__}: {exc}"
            self.settings, self.next_try = settings, now + LOAD_ERROR_RETRY_S
            log.error("models.load_failed", error=str(exc), exc_info=True)
            return
        finally:
            self.loading = False
            self.tried = True
        self.enhancer, self.settings, self.problem = new, settings, None
        log.info("models.ready", ms=round((time.perf_counter() - t) * 1000), **_describe(new))


def _describe(enh) -> dict:
    try:
        d = enh.describe()
    except Exception as exc:  # describe() is informational only
        return {"describe_error": str(exc)}
    return {k: v for k, v in d.items() if k in ("device", "precision")}


class Daemon:
    def __init__(self, cfg: Config, factory: EnhancerFactory, notifier: Notifier, cfg_path: Path,
                 log_format: str | None):
        self.cfg = cfg
        self.cfg_path = cfg_path
        self.log_format = log_format
        self.notifier = notifier
        self.models = ModelHolder(factory)
        self.stop = threading.Event()
        self.halt = threading.Event()              # stop the worker thread only (queue rebuilt)
        self.reload_requested = threading.Event()
        self.wake = threading.Event()
        self.pending_cfg: Config | None = None
        self.folder_issues: dict[str, str] = {}
        self.storage_problem: str | None = None    # the queue's own storage (full, read-only …)
        self.corrupt: str | None = None            # a QueueCorrupt seen by either thread
        self.needs_rebuild = False                 # the queue was moved aside: rebuild from the folders
        self.crashed = False                       # the worker thread died: exit non-zero
        self.reconcile_needed = threading.Event()
        self.ready_sent = False
        self.started = time.time()
        self.discovery = None
        self.worker: Worker | None = None
        self.pipeline: Pipeline | None = None      # jobs.prefetch > 0 (the worker thread's)
        self.metrics = None
        self.hooks = None
        self.lock: StateLock | None = None
        self._forgotten: deque[tuple[str, bool]] = deque()   # from the worker thread; drained by the main loop
        self._enqueued = False
        self._unreadable: dict[str, str] = {}      # rel → reason we logged (EACCES …), until it reads

    # --- signals: flags only ----------------------------------------------------------------

    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self.reload_requested.set())

    # --- parts --------------------------------------------------------------------------------

    def _make_discovery(self, cfg: Config):
        from .discover import Discovery
        exclude = [p for p in (cfg.folders.outbox, cfg.folders.failed, cfg.folders.archive, cfg.state_dir) if p]
        d = Discovery(cfg.folders.inbox, cfg.watch, exclude=exclude)
        d.start()           # logs discover.started with the mode it resolved
        return d

    def _make_extras(self, cfg: Config, previous_metrics: dict | None = None) -> None:
        from .hooks import Hooks
        from .metrics import Metrics
        if self.metrics is None:      # totals survive restarts: restored from the last snapshot
            self.metrics = Metrics(snapshot=previous_metrics)
        if self.hooks is not None:
            self.hooks.close(1.0)
        h = cfg.hooks
        self.hooks = Hooks(h.on_done, h.on_failed, timeout=h.timeout, retries=h.retries) \
            if (h.on_done or h.on_failed) else None

    # --- the worker thread ------------------------------------------------------------------

    def _worker_loop(self) -> None:
        try:
            q = backends.connect(self.cfg, daemon=True, on_wait=self.notifier.watchdog)
        except QueueCorrupt as exc:
            self.corrupt = str(exc)
            return
        except StateUnavailable as exc:
            self.storage_problem = exc.reason
            q = None
        q = self.worker.queue = serialized(q)      # the pipeline's threads share it
        started = False
        pipe = None

        def drain() -> None:                       # jobs loaded ahead back to pending, the last one finished
            if pipe is not None and pipe.busy():
                pipe.release()
        try:
            while not (self.stop.is_set() or self.halt.is_set()):
                if q is None:                      # the state_dir could not even be opened
                    self.wake.wait(STORAGE_RETRY_S)
                    try:
                        q = self.worker.queue = backends.connect(self.cfg, daemon=True,
                                                                 on_wait=self.notifier.watchdog)
                    except StateUnavailable:
                        continue
                    q = self.worker.queue = serialized(q)
                try:
                    if not started or self.reconcile_needed.is_set():
                        drain()
                        if not self.folder_issues:
                            self.reconcile_needed.clear()
                            reconcile(self.worker, q, start=not started, now=time.time())
                            started = True
                        elif not started:          # folders unusable: only the crash recovery of rows
                            q.requeue_running(time.time())
                            started = True
                            self.reconcile_needed.set()
                    if self.pending_cfg is not None:
                        drain()
                        cfg, self.pending_cfg = self.pending_cfg, None
                        self.worker.configure(cfg)
                        self.worker.hooks = self.hooks
                    self.models.ensure(self.worker.cfg.enhancer_settings(), time.time())
                    self.worker.enhancer = self.models.enhancer
                    self.worker.enhancer_problem = self.models.problem
                    if self.stop.is_set() or self.halt.is_set():
                        break
                    if self.folder_issues or self.models.enhancer is None or self.storage_problem or q.paused():
                        drain()
                        self.wake.wait(1.0)
                        self.wake.clear()
                        continue
                    # jobs.prefetch: decode ahead / publish behind while the model works (one host only:
                    # with a shared queue the other hosts take the next job instead)
                    depth = 0 if getattr(q, "shared", False) else self.worker.cfg.jobs.prefetch
                    if depth and pipe is None:
                        pipe = self.pipeline = Pipeline(self.worker, depth)
                    if not depth:
                        drain()
                    elif pipe.depth != depth:
                        pipe.depth = depth
                    out = pipe.step() if depth else self.worker.run_once()
                except StateUnavailable as exc:
                    if self.storage_problem != exc.reason:
                        log.error("state_dir.unusable", reason=exc.reason, error=str(exc), action="waiting")
                    self.storage_problem = exc.reason
                    self.wake.wait(STORAGE_RETRY_S)
                    continue
                except QueueCorrupt as exc:
                    self.corrupt = str(exc)
                    return
                if out is None or out.state == "deferred":
                    self.wake.wait(0.5)
                    self.wake.clear()
        except BaseException:                      # a bug, or a library calling sys.exit(): loud
            log.exception("worker.crashed")
            self.crashed = True
            self.stop.set()
        finally:
            try:
                drain()
            except BaseException as exc:           # the queue is unusable: a restart returns them
                log.warning("worker.release_failed", error=str(exc))
            if q is not None:
                q.close()

    # --- main loop --------------------------------------------------------------------------

    def run(self) -> int:
        cfg = self.cfg
        self.lock = lock = StateLock(cfg.state_dir)
        self.install_signals()
        said = None
        while True:
            try:
                lock.acquire()
                break
            except LockedError as exc:
                log.error("daemon.locked", reason=str(exc))
                say(f"photoenhanced: {exc}")
                return EX_RUNTIME
            except OSError as exc:               # a full or read-only state_dir: wait, never exit
                if said != exc.errno:
                    said = exc.errno
                    log.error("state_dir.unusable", path=str(cfg.state_dir), error=exc.strerror, action="waiting")
                text = f"waiting: state_dir {cfg.state_dir}: {exc.strerror} — free space or fix permissions"
                self.notifier.status(text)
                if not self.ready_sent:
                    self.notifier.ready(text)
                    self.ready_sent = True
                self.notifier.watchdog()
                if self.stop.wait(STORAGE_RETRY_S):
                    return EX_OK
        try:
            while True:
                queue = self._open_queue()
                if queue is None:
                    return EX_OK                 # stopped while waiting for the state_dir
                try:
                    code = self._run(queue)
                except QueueCorrupt as exc:
                    self.corrupt = str(exc)
                    code = _REBUILD
                except Exception:
                    log.exception("daemon.crashed")      # systemd restarts us (Restart=on-failure)
                    sys.stdout.flush()
                    os._exit(EX_RUNTIME)
                if code != _REBUILD:
                    queue.close()
                    return code
                self.needs_rebuild = True
                try:
                    queue.quarantine(time.time(), error=self.corrupt or "")
                except StateUnavailable as exc:
                    log.error("state_dir.unusable", reason=exc.reason, error=str(exc))
                queue.close()
                self.corrupt = None
                self.halt.clear()
        finally:
            lock.release()

    def _open_queue(self) -> Queue | None:
        """The queue, moved aside and rebuilt from the folders when it is not a sound database;
        waits (status and STATUS say why) while the state_dir cannot hold it."""
        said = None
        while not self.stop.is_set():
            try:
                queue, moved = backends.open_queue(self.cfg, now=time.time())
                if moved is None and not self.needs_rebuild:
                    return queue
                self.needs_rebuild = True
                from .publish import Publisher
                from .rebuild import rebuild
                f = self.cfg.folders
                adopted = Publisher(f.inbox, f.outbox, f.failed, f.archive, self.cfg.jobs.originals,
                                    host=getattr(queue, "tmp_subdir", None)).adopt_orphans()
                if adopted:
                    log.warning("queue.rebuild_adopted", sidecars=adopted)
                stats = rebuild(queue, f.outbox, f.failed, now=time.time())
                log.error("queue.rebuilt", moved_to=str(moved) if moved else None, **stats)
                self.needs_rebuild = False
                return queue
            except StateUnavailable as exc:
                if said != exc.reason:
                    log.error("state_dir.unusable", reason=exc.reason, error=str(exc), action="waiting")
                    said = exc.reason
                text = f"waiting: {exc.reason} ({backends.where(self.cfg)})" + \
                    ("" if backends.is_postgres(self.cfg.queue.url) else " — free space or fix permissions")
                self.notifier.status(text)
                if not self.ready_sent:
                    self.notifier.ready(text)
                    self.ready_sent = True
                self.lock.note("waiting", exc.reason)
                self.notifier.watchdog()
                self.stop.wait(STORAGE_RETRY_S)
        return None

    def _run(self, queue: Queue) -> int:
        cfg = self.cfg
        self.notifier.extend_timeout(120)
        self.folder_issues = config_mod.folder_problems(cfg)
        for name, reason in self.folder_issues.items():
            log.warning("folders.problem", folder=name, reason=reason)
        self._make_extras(cfg, (queue.daemon() or {}).get("metrics"))
        self.worker = Worker(cfg, queue, hooks=self.hooks, metrics=self.metrics,
                             progress=self.notifier.watchdog, on_forget=self._forget)
        self.discovery = self._make_discovery(cfg)
        log.info("daemon.started", pid=os.getpid(), config=str(self.cfg_path), state_dir=str(cfg.state_dir))
        thread = threading.Thread(target=self._worker_loop, name="worker", daemon=True)
        thread.start()
        last_status = last_folders = last_check = 0.0
        status_text = ""
        last_current = None
        while not self.stop.is_set():
            if self.corrupt is not None:
                return self._halt_for_rebuild(thread)
            if not thread.is_alive() and not self.halt.is_set():
                log.error("worker.died", note="the worker thread ended on its own")
                self.crashed = True
                break
            now = time.time()
            try:
                if self.reload_requested.is_set():
                    self.reload_requested.clear()
                    self._reload(queue)
                if now - last_folders >= FOLDERS_EVERY_S:
                    last_folders = now
                    self._check_folders()
                if self.storage_problem is None:
                    self._discover(queue, now)
                if not self.ready_sent and self.models.tried:
                    self.ready_sent = True
                    text = self._status(queue, now)[1]
                    self.notifier.ready(text)
                    log.info("daemon.ready", status=text)
                elif not self.ready_sent:
                    self.notifier.extend_timeout(30)
                if self.worker.current is None:
                    self.notifier.watchdog()        # during a job the worker pings, per step and per tile
                current = self.worker.current
                # at once on a new job or stage; tile progress is picked up at the regular pace
                step = current and (current.get("job"), current.get("stage"), current.get("page"))
                if now - last_check < STATUS_CHECK_S and step == last_current and not self._enqueued:
                    self.stop.wait(LOOP_S)
                    continue
                last_check, last_current, self._enqueued = now, step, False
                # one read of the photo in hand for both the state and the row (never "idle" beside a photo)
                state, text, reason = self._status(queue, now, current)     # written at once when it changes
                if text != status_text or now - last_status >= STATUS_EVERY_S:
                    self.notifier.status(text)
                    self.lock.note(state, reason)
                    metrics = self._write_metrics(queue, now)
                    queue.set_daemon(os.getpid(), state, reason, current, metrics, started=self.started)
                    status_text, last_status = text, now
                    if self.storage_problem is not None:
                        log.info("state_dir.ok", was=self.storage_problem)
                        self.storage_problem = None
                        self.wake.set()
            except StateUnavailable as exc:
                if self.storage_problem != exc.reason:
                    log.error("state_dir.unusable", reason=exc.reason, error=str(exc), action="waiting")
                self.storage_problem = exc.reason
                text = self._storage_status(queue)
                self.notifier.status(text)
                self.lock.note("waiting", exc.reason)
                status_text = text
                self.stop.wait(STORAGE_RETRY_S)
                continue
            except QueueCorrupt as exc:
                self.corrupt = str(exc)
                continue
            self.stop.wait(LOOP_S)
        code = self._shutdown(queue, thread)
        return EX_RUNTIME if self.crashed else code

    def _halt_for_rebuild(self, thread: threading.Thread) -> int:
        log.error("queue.corrupt_at_runtime", error=self.corrupt, action="moving it aside and rebuilding")
        self.halt.set()
        self.wake.set()
        thread.join(self.cfg.jobs.stop_timeout)
        if self.discovery is not None:
            self.discovery.stop()
            self.discovery = None
        if thread.is_alive():
            log.error("daemon.stop_timeout", reason="worker busy while the queue was being rebuilt; restarting")
            sys.stdout.flush()
            os._exit(EX_RUNTIME)     # systemd restarts us; the next start finds and rebuilds the queue
        return _REBUILD

    def _storage_status(self, queue: Queue) -> str:
        if backends.is_postgres(self.cfg.queue.url):
            return f"waiting: {self.storage_problem} ({backends.where(self.cfg)}) — retrying"
        return f"waiting: {self.storage_problem} ({self.cfg.state_dir}) — the queue cannot be written; " \
               "free space or fix permissions"

    def _shutdown(self, queue: Queue, thread: threading.Thread) -> int:
        self.notifier.stopping()
        current = self.worker.current
        log.info("daemon.stopping", current=current and current.get("path"))
        self.wake.set()
        if self.discovery is not None:
            self.discovery.stop()
        thread.join(self.cfg.jobs.stop_timeout)
        if self.hooks is not None:
            self.hooks.close(2.0)
        self.lock.note("stopped", None)
        try:
            queue.set_daemon(os.getpid(), "stopped", None, None)
        except (StateUnavailable, QueueCorrupt) as exc:
            log.warning("daemon.status_not_written", error=str(exc))
        if thread.is_alive():
            cur = self.worker.current
            requeued = False
            if cur is not None and cur.get("stage") != "publish":
                # mid-inference: back to pending now (a publish in flight is left to recovery)
                try:
                    queue.requeue(cur["job"])
                    requeued = True
                except Exception as exc:  # the worker moved on meanwhile; recovery handles it
                    log.warning("daemon.requeue_failed", job=cur.get("job"), error=str(exc))
            for job_id in self.pipeline.waiting() if self.pipeline is not None else ():
                try:                      # decoded ahead, never started: back to pending too
                    queue.requeue(job_id)
                except Exception as exc:
                    log.warning("daemon.requeue_failed", job=job_id, error=str(exc))
            log.warning("daemon.stop_timeout", job=cur and cur.get("job"), timeout_s=self.cfg.jobs.stop_timeout,
                        requeued=requeued)
            log.info("daemon.stopped", code=0)
            sys.stdout.flush()
            os._exit(EX_OK)     # the worker is mid-inference; its job is `running` → pending on restart
        code = EX_RUNTIME if self.crashed else EX_OK
        log.info("daemon.stopped", code=code)
        return code

    # --- pieces of the loop -------------------------------------------------------------------

    def _forget(self, rel: str, recheck: bool = False) -> None:
        self._forgotten.append((rel, recheck))      # Discovery is used from the main thread only

    def _discover(self, queue: Queue, now: float) -> None:
        while self._forgotten:
            rel, recheck = self._forgotten.popleft()
            self.discovery.forget(rel)
            if recheck:
                self.discovery.recheck(rel, RECHECK_S)
        try:
            found = self.discovery.poll(now)
        except Exception:
            log.exception("discover.error")
            return
        inbox = self.cfg.folders.inbox
        for c in found:
            try:
                t = intake.take(queue, inbox, c.rel, now, expect=(c.size, c.mtime_ns), tick=self.notifier.watchdog)
            except (StateUnavailable, QueueCorrupt):
                self.discovery.recheck(c.rel, RECHECK_S)
                raise
            except Exception:                      # contained to this one file: looked at again later
                log.exception("discover.intake_error", path=c.rel)
                self.discovery.recheck(c.rel, UNREADABLE_RECHECK_S)
                continue
            if t.outcome not in (intake.UNREADABLE, intake.FOLDER_LINK):
                self._unreadable.pop(c.rel, None)
            if t.outcome == intake.QUEUED:
                log.info("job.queued", job=t.job.id, path=c.rel, bytes=t.size)
                self._enqueued = True
                self.wake.set()
            elif t.outcome == intake.BUSY:
                log.debug("discover.waiting_for_job", path=c.rel, job=t.job and t.job.id)
                self.discovery.recheck(c.rel, RECHECK_S)
            elif t.outcome == intake.CHANGED:
                self.discovery.recheck(c.rel, 0)
            elif t.outcome in (intake.UNREADABLE, intake.FOLDER_LINK):
                if self._unreadable.get(c.rel) != t.reason:          # once per file and reason
                    self._unreadable[c.rel] = t.reason
                    log.warning("discover.unreadable_file", path=c.rel, reason=t.reason,
                                action=f"looked at again every {UNREADABLE_RECHECK_S:g} s")
                self.discovery.recheck(c.rel, UNREADABLE_RECHECK_S)
            elif t.outcome == intake.REFUSED:
                log.warning("discover.refused", path=c.rel, reason=t.reason)
            elif t.outcome == intake.VANISHED:
                log.info("discover.vanished", path=c.rel)

    def _check_folders(self) -> None:
        issues = config_mod.folder_problems(self.cfg)
        if self.worker is not None and self.worker.folder_problem and not issues:
            issues = {}
            self.worker.folder_problem = None
        for name, reason in issues.items():
            if self.folder_issues.get(name) != reason:
                log.warning("folders.problem", folder=name, reason=reason)
        for name in self.folder_issues.keys() - issues.keys():
            log.info("folders.ok", folder=name)
        if self.folder_issues and not issues:
            self.reconcile_needed.set()            # half-done publishes finish now, not at the next start
            self.wake.set()
        self.folder_issues = issues

    def _status(self, queue: Queue, now: float, current=...) -> tuple[str, str, str | None]:
        """(state, STATUS= text, reason); `current`: the worker's photo in hand as the caller read
        it (default: read it here)."""
        counts = queue.counts()
        queued = counts["pending"] + counts["running"]
        disc_problem = getattr(self.discovery, "problem", None) if self.discovery else None
        reasons = list(self.folder_issues.values())
        if self.storage_problem:
            reasons.append(f"{self.storage_problem} ({backends.where(self.cfg)})")
        if self.worker is not None and self.worker.folder_problem:
            reasons.append(self.worker.folder_problem)
        if self.models.enhancer is None and self.models.problem:
            reasons.append(self.models.problem)
        if disc_problem and disc_problem not in reasons:
            reasons.append(disc_problem)
        cur = (self.worker.current if self.worker else None) if current is ... else current
        if cur is not None:
            n = self.worker.handled + 1
            faces = cur.get("faces")
            text = f"enhancing {names.safe(cur['path'])} · {n} of {n + queued - 1}" + (f" · {faces} faces" if faces is not None else "")
            return "working", text, None
        if queue.paused():              # the operator's pause (CLI or web); other problems still named
            reason = "; ".join(dict.fromkeys(["run photoenhanced resume to continue", *reasons]))
            return "paused", f"paused · {queued} queued", reason
        if reasons:
            reason = "; ".join(dict.fromkeys(reasons))
            return "waiting", f"waiting: {reason} · {queued} queued", reason
        midnight = time.mktime(time.localtime(now)[:3] + (0, 0, 0, 0, 0, -1))
        return "idle", f"idle · {queued} queued · {queue.done_since(midnight)} done today", None

    def _write_metrics(self, queue: Queue, now: float) -> dict | None:
        if self.metrics is None:
            return None
        counts = queue.counts()
        backoffs = queue.backing_off(now)
        hooks = self.hooks.counts if self.hooks is not None else {}
        try:
            self.metrics.write_textfile(self.cfg.state_dir / "photoenhanced.prom", counts, backoffs, hooks)
        except OSError as exc:
            log.warning("metrics.write_failed", error=exc.strerror)
        snap = self.metrics.snapshot()
        snap.update({"backoffs": backoffs, "hooks": hooks})
        return snap

    def _reload(self, queue: Queue) -> None:
        self.notifier.reloading()
        log.info("config.reloading", path=str(self.cfg_path))
        try:
            new = config_mod.load(self.cfg_path)
        except ConfigError as exc:
            log.error("config.reload_failed", problems=exc.problems, kept="previous config")
            self.notifier.reloaded(self._status(queue, time.time())[1])
            return
        if new.state_dir != self.cfg.state_dir:
            log.warning("config.restart_needed", key="state_dir", note="state_dir changes apply at the next start")
            new = _replace_state_dir(new, self.cfg.state_dir)
        old = self.cfg
        self.cfg = new
        logs.configure(self.log_format or new.log.format, new.log.level)
        if (new.folders.inbox, new.watch) != (old.folders.inbox, old.watch):
            self.discovery.stop()
            self.discovery = self._make_discovery(new)
        self._make_extras(new)
        self.folder_issues = config_mod.folder_problems(new)
        self.pending_cfg = new
        self.models.next_try = 0.0
        self.wake.set()
        log.info("config.reloaded", path=str(self.cfg_path))
        self.notifier.reloaded(self._status(queue, time.time())[1])


def _read_only_mount(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _replace_state_dir(cfg: Config, state_dir: Path) -> Config:
    from dataclasses import replace
    return replace(cfg, state_dir=state_dir)


def run(config_path: Path, log_format: str | None = None,
        enhancer_factory: EnhancerFactory | None = None, environ=os.environ) -> int:
    """`photoenhanced run`: the daemon in the foreground."""
    notifier = Notifier(environ)
    logs.configure(log_format or "auto", "info")
    try:
        cfg = config_mod.load(config_path)
    except ConfigError as exc:
        log.error("config.invalid", path=str(config_path), problems=exc.problems)
        say(f"photoenhanced: bad config {exc}")
        notifier.send(f"STATUS=bad config: {'; '.join(exc.problems)[:400]}")
        return EX_CONFIG
    fmt = logs.configure(log_format or cfg.log.format, cfg.log.level)
    logs.capture_warnings()
    if fmt == "json":
        logs.capture_stderr()      # native libraries' stderr lines become events: one JSON object per line
    try:
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.error("state_dir.unusable", path=str(cfg.state_dir), error=exc.strerror)
        say(f"photoenhanced: state_dir {cfg.state_dir} cannot be created: {exc.strerror}")
        return EX_CONFIG
    if not os.access(cfg.state_dir, os.W_OK) and not _read_only_mount(cfg.state_dir):
        # no permission: only the admin can fix it (78); a read-only *mount* is waited out
        log.error("state_dir.unusable", path=str(cfg.state_dir), error="not writable")
        say(f"photoenhanced: state_dir {cfg.state_dir} is not writable")
        return EX_CONFIG
    return Daemon(cfg, enhancer_factory or default_factory, notifier, Path(config_path), log_format).run()


def main(argv: list[str] | None = None, enhancer_factory: EnhancerFactory | None = None) -> int:
    """Entry point for `run` with an injectable enhancer factory (tests start the real daemon this
    way, with a small fake enhancer). Accepts `[--config FILE] [--log-format F] [run]`."""
    p = argparse.ArgumentParser(prog="photoenhanced")
    p.add_argument("--config")
    p.add_argument("--log-format", choices=("auto", "json", "text"))
    p.add_argument("verb", nargs="?", default="run", choices=("run",))
    args = p.parse_args(argv)
    return run(config_mod.find_config(args.config), args.log_format, enhancer_factory)
