"""structlog set-up: one event per line with stable keys. JSON when not on a terminal (or asked),
readable text on a terminal. Under journald (JOURNAL_STREAM names our stdout) each line starts
with a `<N>` syslog priority so `journalctl -p warning` works.

A log line is always exactly one line of valid UTF-8, whatever a file name holds: `escape_values`
runs last before the renderer and passes every string in the event (keys, values, nested lists and
dicts, paths, bytes, exception texts) through `names.safe` — control characters, newlines, lone
surrogates (undecodable bytes of a name) become visible escapes. Log a name as
`path=names.display(rel)` where it must be told apart exactly (a name with a backslash); a raw name
is safe too, only not unambiguous. In text format a traceback stays on the event's line (escaped)."""
from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

import structlog

from . import names

_PRIORITY = {"critical": 2, "exception": 3, "error": 3, "warning": 4, "warn": 4, "info": 6, "debug": 7}
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def say(message: str) -> None:
    """One line for the person at the terminal (stderr), besides the log event. Control characters
    (a name's newline or escape sequence) are escaped (names.safe)."""
    sys.stderr.write(names.safe(message) + "\n")
    sys.stderr.flush()


def under_journald(stream: TextIO, environ=os.environ) -> bool:
    js = environ.get("JOURNAL_STREAM", "")
    if not js:
        return False
    try:
        dev, ino = (int(x) for x in js.split(":"))
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (dev, ino)
    except (ValueError, OSError, AttributeError):
        return False


def _clean(v):
    if isinstance(v, str):
        return names.safe(v)
    if isinstance(v, (bool, int, float)) or v is None:
        return v
    if isinstance(v, dict):
        return {_clean(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set, frozenset)):
        return [_clean(x) for x in v]
    if isinstance(v, os.PathLike):
        return names.safe(os.fsdecode(v))
    if isinstance(v, (bytes, bytearray)):
        return names.safe(os.fsdecode(bytes(v)))
    if isinstance(v, BaseException):
        return names.safe(f"{type(v).__name__}: {v}")
    return v


def escape_values(_, __, event_dict: dict) -> dict:
    """structlog processor: every string of the event made single-line printable text (names.safe)."""
    return {_clean(k): _clean(v) for k, v in event_dict.items()}


def _inline_traces(_, __, event_dict: dict) -> dict:
    """Text format: ConsoleRenderer prints `exception`/`stack` on lines of their own; keep them on the
    event's line instead (escaped by escape_values) so one event stays one line."""
    for key, new in (("exception", "traceback"), ("stack", "stack_trace")):
        if key in event_dict:
            event_dict[new] = event_dict.pop(key)
    return event_dict


def _prefix_priority(_, method: str, event: str) -> str:
    return f"<{_PRIORITY.get(method, 6)}>{event}"


def configure(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> str:
    """Returns the format chosen ("json" or "text")."""
    stream = stream or sys.stdout
    journal = under_journald(stream)
    if fmt == "auto":
        fmt = "json" if journal or not stream.isatty() else "text"
    procs: list = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
        structlog.processors.format_exc_info,
    ]
    if fmt != "json":
        procs.append(_inline_traces)
    procs.append(escape_values)
    if fmt == "json":
        procs.append(structlog.processors.JSONRenderer(sort_keys=False))
        if journal:
            procs.append(_prefix_priority)
    else:
        procs.append(structlog.dev.ConsoleRenderer(colors=stream.isatty()))
    structlog.configure(
        processors=procs,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    return fmt


def capture_warnings() -> None:
    """Python warnings (a library's RuntimeWarning …) become log events instead of raw stderr lines."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        structlog.get_logger("py.warnings").warning(
            "python.warning", category=category.__name__, message=str(message),
            where=f"{os.path.basename(str(filename))}:{lineno}")

    warnings.showwarning = show


def capture_stderr() -> None:
    """Native libraries (libtiff, OpenCV, libheif, libjpeg) write to file descriptor 2 directly,
    past Python. In the daemon with JSON logs each such line becomes one `native.stderr` event
    (escaped like every value), so the log stays one JSON object per line."""
    import threading

    r, w = os.pipe()
    os.dup2(w, 2)
    os.close(w)
    log = structlog.get_logger("native")

    def pump() -> None:
        with os.fdopen(r, "rb", buffering=0) as pipe:
            buf = b""
            while True:
                chunk = pipe.read(65536)
                if not chunk:
                    return
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines[:200]:              # a flood is cut, never allowed to stall us
                    text = line.decode("utf-8", "surrogateescape").rstrip()
                    if text:
                        log.warning("native.stderr", line=text[:2000])
                if len(buf) > 65536:
                    log.warning("native.stderr", line=buf[:2000].decode("utf-8", "surrogateescape"))
                    buf = b""

    threading.Thread(target=pump, name="stderr-pump", daemon=True).start()
