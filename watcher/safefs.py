"""File operations below a configured folder that are safe at the moment of use.

The inbox is untrusted, and so is anything a user can write into below outbox/failed/archive: any
path component may be swapped for a symlink at any moment. So nothing here resolves a path string
twice. A configured folder (a *root*) is opened by its configured path (the admin's choice, trusted);
every component below it is opened from the previous directory's file descriptor with
``O_NOFOLLOW | O_DIRECTORY``, and the final action (open, link, rename, unlink, mkdir, stat) is a
``dir_fd=`` call on the last directory. A symlink anywhere below a root raises :class:`UnsafePath`;
nothing outside the roots is ever read, moved, written or deleted. Opening a file never blocks on a
FIFO or device (``O_NONBLOCK``) and ``fstat`` decides what was opened.
"""
from __future__ import annotations

import contextlib
import errno
import os
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class UnsafePath(OSError):
    """A path below a root runs through a symlink or a non-directory, or escapes the root."""

    def __init__(self, message: str, path: str = ""):
        super().__init__(errno.ELOOP, message, path)


def parts_of(rel: str) -> list[str]:
    """The components of an inbox-relative path; refuses absolute paths, `..`, `.` and empty parts."""
    if not rel or rel.startswith("/") or "\0" in rel:
        raise UnsafePath(f"not a relative path: {rel!r}", rel)
    parts = rel.split("/")
    for p in parts:
        if p in ("", ".", ".."):
            raise UnsafePath(f"path component {p!r} is not allowed: {rel!r}", rel)
    return parts


def open_root(root: Path) -> int:
    """The configured folder itself (its own path may be a link the admin made)."""
    return os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _open_sub(fd: int, name: str, create: bool, mode: int) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=fd)
    except FileNotFoundError:
        if not create:
            raise
    with contextlib.suppress(FileExistsError):     # made meanwhile by someone else: just as good
        os.mkdir(name, mode, dir_fd=fd)
        os.fsync(fd)                     # the new folder's entry is durable before anything goes in
    return os.open(name, _DIR_FLAGS, dir_fd=fd)


def open_dir(root: Path, parts: list[str] | tuple[str, ...], create: bool = False, mode: int = 0o755) -> int:
    """A file descriptor on root/parts…, every component opened without following links (created
    when `create`). Raises UnsafePath for a symlink or a file on the way, FileNotFoundError when a
    folder is missing (and not created)."""
    fd = open_root(root)
    try:
        for i, name in enumerate(parts):
            try:
                nfd = _open_sub(fd, name, create, mode)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafePath(f"{'/'.join(parts[:i + 1])} is a symlink or not a folder (below {root})",
                                     "/".join(parts[:i + 1])) from None
                raise
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


@contextmanager
def dir_of(root: Path, rel: str, create: bool = False) -> Iterator[tuple[int, str]]:
    """(fd of the folder holding rel, the last component) for a `dir_fd=` call."""
    parts = parts_of(rel)
    fd = open_dir(root, parts[:-1], create)
    try:
        yield fd, parts[-1]
    finally:
        os.close(fd)


def lstat_at(fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def lstat(root: Path, rel: str) -> os.stat_result | None:
    """lstat of root/rel, None when it (or a folder above it) is missing; UnsafePath for a link on the way."""
    try:
        with dir_of(root, rel) as (fd, name):
            return lstat_at(fd, name)
    except FileNotFoundError:
        return None


def open_read_at(fd: int, name: str) -> tuple[int, os.stat_result]:
    """Open a regular file for reading: never follows a link, never blocks on a FIFO/device.
    Raises UnsafePath (a link) or OSError(EINVAL) for anything that is not a regular file."""
    try:
        f = os.open(name, _READ_FLAGS, dir_fd=fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePath(f"{name!r} is a symlink", name) from None
        raise
    st = os.fstat(f)
    if not stat.S_ISREG(st.st_mode):
        os.close(f)
        raise OSError(errno.EINVAL, "not a regular file", name)
    os.set_blocking(f, True)
    return f, st


def read_fd(fd: int, limit: int) -> bytes:
    """All bytes of an open file, at most `limit` + 1 (the caller checks for too many)."""
    chunks, n = [], 0
    while n <= limit:
        b = os.read(fd, min(1 << 20, limit + 1 - n))
        if not b:
            break
        chunks.append(b)
        n += len(b)
    return b"".join(chunks)


def same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def fsync_fd(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise


def write_new_at(fd: int, name: str, data: bytes, mode: int = 0o644) -> None:
    """A new file `name` in folder `fd` with `data`, fsynced (never follows or replaces anything)."""
    f = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(f, view):]
        os.fsync(f)
    except BaseException:
        os.close(f)
        with contextlib.suppress(OSError):           # the write's own error is the one to report
            os.unlink(name, dir_fd=fd)
        raise
    os.close(f)
