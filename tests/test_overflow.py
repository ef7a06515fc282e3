"""inotify overflow: watchdog drops IN_Q_OVERFLOW silently; the rescan must find every file."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from watcher import config
from watcher.discover import Discovery

MAX_QUEUED = Path("/proc/sys/fs/inotify/max_queued_events")
BURST = 3000
LOW = 16


def Watch(**over) -> config.Watch:
    """The product's own watch settings, with this file's defaults."""
    return replace(config.Watch(mode="events", poll_interval=5.0, settle_seconds=0.3, rescan_interval=2.0), **over)


def start_with_small_queue(d: Discovery) -> None:
    """Start the observer with a tiny inotify queue. The limit is read when the inotify instance
    is created, so the machine-wide setting is put back at once (other processes keep theirs)."""
    if os.geteuid() != 0:
        pytest.fail("the overflow test needs root to lower fs.inotify.max_queued_events")
    saved = MAX_QUEUED.read_text()
    try:
        MAX_QUEUED.write_text(str(LOW))
        d.start()
    finally:
        MAX_QUEUED.write_text(saved)
    assert MAX_QUEUED.read_text() == saved


def test_burst_beyond_the_inotify_queue_is_found_exactly_once(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    d = Discovery(inbox, Watch())
    assert d.effective_mode == "events"
    start_with_small_queue(d)
    got = []
    try:
        with capture_logs() as logs:
            got += d.poll()  # start-up scan (empty)
            for i in range(BURST):  # far more events than the queue holds
                sub = inbox / f"d{i % 10}"
                sub.mkdir(exist_ok=True)
                (sub / f"IMG_{i:05d}.jpg").write_bytes(b"x")
            end = time.monotonic() + 30
            while time.monotonic() < end and len(got) < BURST:
                got += d.poll()
                time.sleep(0.1)
            settle_end = time.monotonic() + 2.5  # past another rescan: still nothing twice
            while time.monotonic() < settle_end:
                got += d.poll()
                time.sleep(0.1)
    finally:
        d.stop()
    rels = [c.rel for c in got]
    assert len(rels) == len(set(rels)) == BURST
    assert set(rels) == {f"d{i % 10}/IMG_{i:05d}.jpg" for i in range(BURST)}
    # The kernel really overflowed and discovery noticed (watchdog's log line → a full scan at once).
    assert any(e["event"] == "discover.events_overflow" for e in logs)
