"""structlog set-up: one event per line with stable keys. JSON when not on a terminal (or asked),
readable text on a terminal. Under journald (JOURNAL_STREAM names our stdout) each line starts
with a `<N>` syslog priority so `journalctl -p warning` works."""
from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

import structlog

_PRIORITY = {"critical": 2, "exception": 3, "error": 3, "warning": 4, "warn": 4, "info": 6, "debug": 7}
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def say(message: str) -> None:
    """One line for the person at the terminal (stderr), besides the log event."""
    sys.stderr.write(message + "\n")
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
