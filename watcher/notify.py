"""sd_notify(3), a no-op without NOTIFY_SOCKET. The daemon calls these; nothing else talks to systemd.

The protocol is one AF_UNIX datagram of newline-separated `KEY=value` fields to the socket named by
$NOTIFY_SOCKET (a path, or `@name` for the abstract namespace). Written out here rather than through
`sdnotify` so the watchdog can be rate-limited and STATUS de-duplicated in one place; the wire format
is the same.

Every field is made one line before it is sent: systemd splits a datagram on `\n`, so a file name
with a newline in STATUS= could otherwise inject `WATCHDOG=trigger` or `READY=1`. `send()` passes
each field through `names.safe` (control characters, NUL, lone surrogates → visible escapes such as
`\n`, `\x00`, `\xe9`) and cuts STATUS= to `STATUS_MAX` bytes (on a character boundary, with `…`).
"""
from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Mapping

import structlog

from . import names

log = structlog.get_logger(__name__)

STATUS_MAX = 1000       # bytes of STATUS= text (systemd shows one line; keep datagrams small)


def clean_field(field: str) -> str:
    """One `KEY=value` field as it goes on the wire: a single printable line, STATUS capped."""
    field = names.safe(field)
    key, eq, value = field.partition("=")
    if eq and key == "STATUS":
        data = value.encode("utf-8")
        if len(data) > STATUS_MAX:
            value = data[:STATUS_MAX - 3].decode("utf-8", "ignore") + "…"
        field = f"STATUS={value}"
    return field


class Notifier:
    """`Notifier()` reads NOTIFY_SOCKET / WATCHDOG_USEC / WATCHDOG_PID from the environment (or the
    given mapping). Every method is safe to call from any thread and costs nothing when disabled."""

    def __init__(self, environ: Mapping[str, str] | None = None):
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "")
        self._addr = ("\0" + addr[1:]) if addr.startswith("@") else addr
        self._sock: socket.socket | None = None
        if self._addr.startswith(("/", "\0")):
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        elif self._addr:
            log.warning("notify.unsupported_socket", socket=addr)
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        ok_pid = not pid or pid == str(os.getpid())
        # Seconds between systemd's deadlines (0.0: no watchdog configured for this process).
        self.watchdog_interval = int(usec) / 1e6 if usec.isdigit() and ok_pid else 0.0
        self._last_ping = float("-inf")
        self._last_status: str | None = None
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *fields: str) -> None:
        """One datagram with the given `KEY=value` fields, each made one line (clean_field). Errors
        are logged, never raised: a daemon must not die because systemd went away."""
        if self._sock is None or not fields:
            return
        try:
            self._sock.sendto("\n".join(clean_field(f) for f in fields).encode("utf-8"), self._addr)
        except OSError as exc:
            log.warning("notify.failed", error=str(exc), fields=[f.split("=", 1)[0] for f in fields])

    def _with_status(self, fields: list[str], status: str | None) -> list[str]:
        if status is not None:
            with self._lock:
                self._last_status = status
            fields.append(f"STATUS={status}")
        return fields

    def ready(self, status: str | None = None) -> None:
        self.send(*self._with_status(["READY=1"], status))

    def status(self, text: str) -> None:
        """STATUS= for `systemctl status`; repeats of the current text are not sent."""
        with self._lock:
            if text == self._last_status:
                return
            self._last_status = text
        self.send(f"STATUS={text}")

    def watchdog(self) -> None:
        """Cheap enough to call per tile: sends at most every quarter of WatchdogSec."""
        if not self.watchdog_interval or self._sock is None:
            return
        now = time.monotonic()
        with self._lock:
            if now - self._last_ping < self.watchdog_interval / 4:
                return
            self._last_ping = now
        self.send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> None:
        """Ask for `seconds` more before systemd's start/stop timeout fires (weights loading)."""
        self.send(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1e6))}")

    def stopping(self) -> None:
        self.send(*self._with_status(["STOPPING=1"], "stopping"))

    def reloading(self) -> None:
        """RELOADING=1 with the CLOCK_MONOTONIC timestamp systemd (≥ 253, Type=notify-reload) wants."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send(*self._with_status(["RELOADING=1", f"MONOTONIC_USEC={usec}"], "reloading"))

    def reloaded(self, status: str | None = None) -> None:
        self.ready(status)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
