"""The one bridge from a settled candidate to a queued job, used by the daemon's discovery and by
`photoenhanced enqueue` alike: lstat → regular file → open safely (no link followed anywhere on
the way, never blocking on a FIFO) → sha256 → check it is still the same file → enqueue.
"""
from __future__ import annotations

import errno
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import safefs
from .queue import Job, Queue

# Outcomes of take():
QUEUED = "queued"          # a new pending job
ACTIVE = "active"          # this very file already has a pending/running job
BUSY = "busy"              # another file at this path has a pending/running job: take it when that ends
CHANGED = "changed"        # size/mtime/identity changed while we looked: let it settle again
VANISHED = "vanished"      # gone
UNREADABLE = "unreadable"  # EACCES & co: look again later
FOLDER_LINK = "folder_link"  # a folder on the way is a symlink: never followed; the daemon looks again
                             # later (it may be a folder again), `enqueue` refuses it (usage error)
REFUSED = "refused"        # a symlink on the way, a FIFO, a device …: never read


@dataclass(frozen=True)
class Taken:
    outcome: str
    job: Job | None = None
    reason: str = ""
    size: int = 0


def take(queue: Queue, inbox: Path, rel: str, now: float, *, expect: tuple[int, int] | None = None,
         tick: Callable[[], None] | None = None) -> Taken:
    """Queue the file at inbox/rel (`expect`: the (size, mtime_ns) it settled with)."""
    tick = tick or (lambda: None)
    try:
        with safefs.dir_of(inbox, rel) as (dfd, name):
            try:
                fd, st = safefs.open_read_at(dfd, name)
            except safefs.UnsafePath:
                return Taken(REFUSED, reason="symlink: never followed")
            except FileNotFoundError:
                return Taken(VANISHED)
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    return Taken(REFUSED, reason="not a regular file")
                return Taken(UNREADABLE, reason=exc.strerror or str(exc))
            try:
                if expect is not None and (st.st_size, st.st_mtime_ns) != expect:
                    return Taken(CHANGED)
                active = queue.active(rel)
                if active is not None:
                    same = (active.size, active.mtime_ns) == (st.st_size, st.st_mtime_ns)
                    return Taken(ACTIVE if same else BUSY, active)
                sha = _sha256_fd(fd, tick)
                after = os.fstat(fd)
            finally:
                os.close(fd)
            cur = safefs.lstat_at(dfd, name)
    except FileNotFoundError:
        return Taken(VANISHED)
    except safefs.UnsafePath:                 # the folder, not the file: it may be a folder again soon
        return Taken(FOLDER_LINK, reason="a folder on the way is a symlink: never followed")
    except OSError as exc:
        return Taken(UNREADABLE, reason=exc.strerror or str(exc))
    if cur is None or not safefs.same_file(cur, st) or (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
        return Taken(CHANGED)
    job = queue.enqueue(rel, st.st_size, st.st_mtime_ns, sha, now)
    if job is None:
        return Taken(BUSY, queue.active(rel))
    return Taken(QUEUED, job, size=st.st_size)


def _sha256_fd(fd: int, tick: Callable[[], None]) -> str:
    h = hashlib.sha256()
    while block := os.read(fd, 1 << 20):
        h.update(block)
        tick()
    return h.hexdigest()


def fingerprint(inbox: Path, rel: str) -> tuple[int, int, str]:
    """(size, mtime_ns, sha256) of the regular file inbox/rel, opened safely (OSError otherwise)."""
    with safefs.dir_of(inbox, rel) as (dfd, name):
        fd, st = safefs.open_read_at(dfd, name)
        try:
            return st.st_size, st.st_mtime_ns, _sha256_fd(fd, lambda: None)
        finally:
            os.close(fd)
