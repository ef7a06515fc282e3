"""Completion hooks: tell the next step of a pipeline that a photo is done (or failed).

A hook is a command (an argv list, run as configured: no name is ever put on its command line) or
an http(s) URL. Both get one JSON document: the sidecar, plus a ``hook`` object with the event and
the exact paths as ``names.fields`` gives them — ``{"event", "input", "output", "sidecar"}`` in
their ``names.display`` form, each with an ``…_b64`` twin (URL-safe base64 of the real bytes) when
the display form differs from the path (a name with a newline, a backslash or invalid UTF-8). A
command reads it on stdin; an URL gets it POSTed as application/json. A command also finds
PHOTOENHANCED_EVENT and PHOTOENHANCED_INPUT / _OUTPUT / _SIDECAR in its environment, the paths
there in their ``names.display`` form only (printable, one line; equal to the path for ordinary
names): a script that needs the exact bytes of an unusual name reads the JSON.

Hooks never block or fail the queue: ``fire()`` only appends to a bounded queue that one daemon
thread delivers from, without waiting on that thread; when the queue is full the oldest notice is
dropped (with a warning event). Nothing a hook does (a crash in delivery, a command that hangs or
leaves children behind) escapes the delivery thread. Failures are logged as ``hook.failed`` events
and counted; ``counts`` feeds the metrics.

Delivery: up to ``1 + retries`` attempts with exponential backoff (0.5 s, 1 s, 2 s …), each
bounded by ``timeout`` seconds. A command fails on a non-zero exit status, a timeout (it and its
process group are killed) or when it cannot be started; an URL on a connection error, a timeout or
a non-2xx answer. Redirects are never followed: a 3xx answer is a failed attempt (retried, then
counted as failed) and the redirect target is never contacted. HTTP 4xx answers other than
408/429 are not retried (the request itself is wrong).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Sequence
from typing import Any

import structlog

from . import names

log = structlog.get_logger(__name__)

EVENTS = ("done", "failed")
QUEUE_SIZE = 1000
BACKOFF_BASE = 0.5
ENV_EVENT = "PHOTOENHANCED_EVENT"
ENV_SIDECAR = "PHOTOENHANCED_SIDECAR"
ENV_INPUT = "PHOTOENHANCED_INPUT"
ENV_OUTPUT = "PHOTOENHANCED_OUTPUT"
_STDERR_TAIL = 500


class _Permanent(Exception):
    """A delivery error that a retry will not fix."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Never follow a redirect: the 3xx answer itself becomes an HTTPError (a failed attempt)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def _body(sidecar: dict, hook: dict) -> bytes:
    doc = {**sidecar, "hook": hook}
    try:
        return json.dumps(doc, ensure_ascii=False, default=str).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(names.encodable(doc), ensure_ascii=False, default=str).encode("utf-8")


def _describe(target: Sequence[str] | str) -> str:
    """What to name in logs: argv[0], or the URL without credentials and query."""
    if isinstance(target, str):
        u = urllib.parse.urlsplit(target)
        host = u.hostname or ""
        if u.port:
            host = f"{host}:{u.port}"
        return urllib.parse.urlunsplit((u.scheme, host, u.path, "", ""))
    return target[0] if target else "?"


def _check_target(name: str, target: Any) -> Sequence[str] | str | None:
    if target is None:
        return None
    if isinstance(target, str):
        scheme = urllib.parse.urlsplit(target).scheme.lower()
        if scheme not in ("http", "https"):
            raise ValueError(f"hooks.{name}: a string must be an http(s) URL, not {target!r}")
        return target
    argv = list(target)
    if not argv or not all(isinstance(a, str) and a for a in argv):
        raise ValueError(f"hooks.{name}: a command is a non-empty list of strings")
    return tuple(argv)


class Hooks:
    def __init__(self, on_done: Sequence[str] | str | None, on_failed: Sequence[str] | str | None,
                 timeout: float = 10, retries: int = 2, *, queue_size: int = QUEUE_SIZE,
                 backoff: float = BACKOFF_BASE):
        self._targets = {"done": _check_target("on_done", on_done),
                         "failed": _check_target("on_failed", on_failed)}
        self.timeout = float(timeout)
        self.retries = max(0, int(retries))
        self._backoff = float(backoff)
        self._queue: deque[tuple[str, bytes, dict[str, str]]] = deque()
        self._queue_size = max(1, int(queue_size))
        self._cond = threading.Condition()
        self._counts = {"sent": 0, "failed": 0, "dropped": 0}
        self._busy = False
        self._closing = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ caller side
    @property
    def enabled(self) -> bool:
        return any(t is not None for t in self._targets.values())

    @property
    def counts(self) -> dict[str, int]:
        with self._cond:
            return dict(self._counts)

    def fire(self, event: str, sidecar: dict, paths: dict[str, str]) -> None:
        """Queue a notice for the ``event`` hook ("done" or "failed"). ``paths`` maps input, output,
        sidecar to the paths as the filesystem gave them (any bytes). Never blocks or raises."""
        try:
            if self._targets.get(event) is None:
                return
            exact = {k: os.fsdecode(paths.get(k) or "") for k in ("input", "output", "sidecar")}
            hook: dict[str, str] = {"event": event}
            for k, v in exact.items():
                hook.update(names.fields(v, k))
            body = _body(sidecar, hook)
            env = {ENV_EVENT: names.display(event),
                   ENV_SIDECAR: names.display(exact["sidecar"]),
                   ENV_INPUT: names.display(exact["input"]),
                   ENV_OUTPUT: names.display(exact["output"])}
            with self._cond:
                if self._closing:
                    self._counts["dropped"] += 1
                    log.warning("hook.dropped", hook_event=event, reason="closing")
                    return
                if len(self._queue) >= self._queue_size:
                    old_event, _, old_env = self._queue.popleft()
                    self._counts["dropped"] += 1
                    log.warning("hook.dropped", hook_event=old_event, input=old_env.get(ENV_INPUT),
                                reason=f"queue full ({self._queue_size})")
                self._queue.append((event, body, env))
                self._ensure_thread()
                self._cond.notify()
        except Exception as exc:  # fire() must never break the worker; the failure is counted
            with self._cond:
                self._counts["failed"] += 1
            log.error("hook.failed", hook_event=event, error=f"{type(exc).__name__}: {exc}", attempts=0)

    def close(self, timeout: float = 5.0) -> bool:
        """Deliver what is queued within ``timeout`` seconds, then stop. True when all went out;
        what is still queued then is counted as dropped."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            while (self._queue or self._busy) and self._thread is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            left_over = len(self._queue)
            if left_over or self._busy:
                self._stop.set()  # out of time: no more backoff waits for the one in flight
            if left_over:
                self._counts["dropped"] += left_over
                self._queue.clear()
                log.warning("hook.dropped", count=left_over, reason="shutdown timeout")
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=max(0.0, deadline - time.monotonic()) + 0.1)
        return left_over == 0 and not self._busy

    # ------------------------------------------------------------------ delivery thread
    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="photoenhanced-hooks", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    self._cond.notify_all()
                    return
                event, body, env = self._queue.popleft()
                self._busy = True
            ok = False
            try:
                ok = self._deliver(event, body, env)
            except Exception as exc:  # a bug in delivery ends this notice, never the thread
                try:
                    log.error("hook.failed", hook_event=event, error=f"{type(exc).__name__}: {exc}")
                except Exception:
                    pass
            finally:
                with self._cond:
                    self._counts["sent" if ok else "failed"] += 1
                    self._busy = False
                    self._cond.notify_all()

    def _deliver(self, event: str, body: bytes, env: dict[str, str]) -> bool:
        target = self._targets[event]
        assert target is not None
        name = _describe(target)
        attempts = 1 + self.retries
        error = ""
        for attempt in range(1, attempts + 1):
            t0 = time.perf_counter()
            try:
                if isinstance(target, str):
                    self._post(target, body, event)
                else:
                    self._run_command(target, body, env)
            except _Permanent as exc:
                error = str(exc)
                break
            except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
                error = str(exc) or type(exc).__name__
                if attempt < attempts:
                    # Back off; a close() that ran out of time cuts the wait short.
                    self._stop.wait(self._backoff * 2 ** (attempt - 1))
                continue
            log.info("hook.sent", hook_event=event, target=name, attempt=attempt,
                     input=env.get(ENV_INPUT), ms=round((time.perf_counter() - t0) * 1000, 1))
            return True
        log.warning("hook.failed", hook_event=event, target=name, input=env.get(ENV_INPUT),
                    attempts=attempt, error=error)
        return False

    def _post(self, url: str, body: bytes, event: str) -> None:
        req = urllib.request.Request(url, data=body, method="POST", headers={
            "Content-Type": "application/json", "User-Agent": "photoenhanced-hook",
            "X-Photoenhanced-Event": event})
        try:
            with _OPENER.open(req, timeout=self.timeout) as resp:
                resp.read(65536)
                status = resp.status
        except urllib.error.HTTPError as exc:
            exc.close()
            msg = f"HTTP {exc.code} {exc.reason}"
            if 300 <= exc.code < 400:
                raise RuntimeError(f"{msg} (redirects are not followed)") from exc
            if 400 <= exc.code < 500 and exc.code not in (408, 429):
                raise _Permanent(msg) from exc
            raise RuntimeError(msg) from exc
        if not 200 <= status < 300:
            raise RuntimeError(f"HTTP {status}")

    def _run_command(self, argv: Sequence[str], body: bytes, env: dict[str, str]) -> None:
        """The command in a session of its own, so a timeout kills it with everything it started
        (a child left holding the stderr pipe would otherwise hang this thread)."""
        try:
            proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, env={**os.environ, **env},
                                    start_new_session=True)
        except FileNotFoundError as exc:
            raise _Permanent(f"command not found: {argv[0]}") from exc
        try:
            _, err = proc.communicate(body, timeout=self.timeout)
        except subprocess.TimeoutExpired as exc:
            _kill_group(proc)
            try:
                proc.communicate(timeout=2)
            except (subprocess.TimeoutExpired, OSError, ValueError):
                pass
            raise RuntimeError(f"timed out after {self.timeout:g} s (killed)") from exc
        finally:
            if proc.returncode is None:
                _kill_group(proc)
                proc.wait()
            for pipe in (proc.stdin, proc.stderr):
                if pipe is not None and not pipe.closed:
                    pipe.close()
        if proc.returncode != 0:
            tail = names.safe((err or b"")[-_STDERR_TAIL:].decode("utf-8", "replace").strip())
            raise RuntimeError(f"exit status {proc.returncode}" + (f": {tail}" if tail else ""))


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        try:
            proc.kill()
        except OSError:
            pass
