"""Discovery: watchdog events + tree scans → settled candidate photos.

Events (inotify on local disks) only say "look at this path again"; the truth always comes
from ``lstat``. A scan of the tree runs at start-up, every ``rescan_interval`` (catches what
events missed: inotify overflow, downtime) and, in ``poll`` mode, every ``poll_interval``.

Poll cost on big trees (scripts/bench-poll measures it):
* A *quick* scan (poll mode, every ``poll_interval``) stats every directory but lists a
  directory only when its mtime changed since it was last listed, or when that listing is not
  yet *trusted* (see ``_Dir``; never on FUSE file systems, which may report a constant directory
  mtime — smbnetfs does). Creating, renaming or deleting a file changes its directory's mtime on
  local file systems, NFS and SMB, so new files and files renamed into place
  (``x.part`` → ``x.jpg``) are found by the quick scan.
* In a listed directory an entry whose name and inode number (``d_ino``, free from readdir) are
  the same as at the previous listing is the same file: it is not stat'd again. A file renamed
  over an existing name has a new inode and is stat'd.
* Files that are still settling are re-stat'd on every settle check whatever their directory does.
* Not seen by a quick scan: a file already reported and then rewritten *in place* (same name,
  same inode, O_TRUNC) — the directory's mtime does not change; also a name deleted and
  re-created between two quick scans when the file system reuses the inode number. The *full*
  scan (at start-up and every ``rescan_interval``, also in poll mode) stats every file and
  reports such a file again once it settles. In events mode inotify reports both at once.
"""

from __future__ import annotations

import errno
import fnmatch
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from . import safefs

log = structlog.get_logger(__name__)

ALWAYS_IGNORED = (
    ".*", "*.part", "*.tmp", "*.crdownload", "~$*", "Thumbs.db", "desktop.ini",
    "@eaDir", "#recycle", ".stfolder", "__MACOSX",
)
READ_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "tif", "tiff", "bmp", "heic", "heif"})
RAW_EXTENSIONS = frozenset({"cr2", "cr3", "nef", "arw", "dng", "orf", "rw2", "raf", "srw", "pef", "raw"})
# Companions travel with their photo (the publish step moves them); discovery leaves them quiet.
COMPANION_EXTENSIONS = frozenset({"xmp"})
TEMP_DIR_NAME = ".photoenhanced-tmp"

# File systems on which inotify does not see what other machines write.
NETWORK_FS_TYPES = frozenset({
    "cifs", "smb3", "smbfs", "nfs", "nfs4", "fuse", "9p", "virtiofs", "ceph", "afs", "lustre",
})
# A directory listing is trusted (not re-read while the directory's mtime stays the same)
# only after a second listing at least this long after the first one that saw that mtime,
# which covers coarse directory timestamps (FAT 2 s, some SMB servers 1 s) whatever the
# server's clock says.
DIR_TRUST_MARGIN = 2.0
# Paths from events waiting for poll(); beyond this a full scan is cheaper than the set.
MAX_PENDING_EVENTS = 100_000

_SPECIAL_KINDS = (
    (stat.S_ISLNK, "symlink"),
    (stat.S_ISFIFO, "fifo"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
)


@dataclass(frozen=True)
class Candidate:
    rel: str  # POSIX path relative to the inbox, e.g. "a/b/IMG_001.jpg"
    path: Path  # absolute
    size: int
    mtime_ns: int


@dataclass
class _Settling:
    size: int
    mtime_ns: int
    since: float  # when we first saw this (size, mtime_ns)


@dataclass
class _Dir:
    mtime_ns: int  # the directory's mtime when it was last listed (stat'd before listing)
    listed_at: float  # when we first listed it with this mtime
    trusted: bool  # listed again >= DIR_TRUST_MARGIN later with the same mtime
    subdirs: tuple[str, ...]
    files: dict[str, int]  # non-directory entries that are not ignored: name → inode (d_ino)


# --------------------------------------------------------------------------- file systems

def _unescape_mountinfo(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def read_mountinfo(path: str = "/proc/self/mountinfo") -> list[tuple[str, str]]:
    """(mount point, file system type) for every mount, in mountinfo order."""
    mounts = []
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as fh:
            for line in fh:
                left, sep, right = line.partition(" - ")
                fields = left.split()
                if not sep or len(fields) < 5 or not right.split():
                    continue
                mounts.append((_unescape_mountinfo(fields[4]), right.split()[0]))
    except OSError as exc:
        log.warning("discover.mountinfo_unreadable", path=path, error=str(exc))
    return mounts


def filesystem_type(path: Path, mounts: Sequence[tuple[str, str]] | None = None) -> str | None:
    """The type of the file system holding ``path`` (longest mount-point prefix; the last
    mount of that point wins, as in the kernel's view). None when unknown."""
    real = os.path.realpath(path)
    best, best_len = None, -1
    for point, fstype in read_mountinfo() if mounts is None else mounts:
        if real == point or point == "/" or real.startswith(point.rstrip("/") + "/"):
            if len(point) >= best_len:
                best, best_len = fstype, len(point)
    return best


def is_network_fs(fstype: str | None) -> bool:
    if not fstype:
        return False
    return fstype in NETWORK_FS_TYPES or fstype.startswith("fuse.")


def resolve_mode(mode: str, inbox: Path) -> tuple[str, str | None]:
    """(effective mode, file system type): ``auto`` → ``poll`` on network/FUSE mounts."""
    fstype = filesystem_type(inbox)
    if mode == "auto":
        return ("poll" if is_network_fs(fstype) else "events"), fstype
    if mode not in ("events", "poll"):
        raise ValueError(f"watch.mode must be auto, events or poll, not {mode!r}")
    return mode, fstype


# --------------------------------------------------------------------------- ignore rules

class IgnoreRules:
    """Built-in junk patterns (case-insensitive) + the user's ``watch.ignore`` (case-sensitive).
    A pattern without '/' is matched against every path component; one with '/' against the
    whole relative path. The patterns are compiled into one regex each way (a scan checks every
    name)."""

    def __init__(self, extra: Iterable[str] = ()):
        extra = tuple(extra)
        builtin = "|".join(fnmatch.translate(p) for p in (*ALWAYS_IGNORED, TEMP_DIR_NAME))
        self._builtin = re.compile(builtin, re.IGNORECASE)
        names = [p for p in extra if "/" not in p]
        paths = [p.strip("/") for p in extra if "/" in p]
        self._extra_name = re.compile("|".join(fnmatch.translate(p) for p in names)) if names else None
        self._extra_path = re.compile("|".join(fnmatch.translate(p) for p in paths)) if paths else None

    def name_ignored(self, name: str) -> bool:
        if self._builtin.match(name):
            return True
        return self._extra_name is not None and self._extra_name.match(name) is not None

    def path_ignored(self, rel: str) -> bool:
        """Only the patterns with a '/' (the components are checked one by one by the scan)."""
        return self._extra_path is not None and self._extra_path.match(rel) is not None

    def ignored(self, rel: str) -> bool:
        return any(self.name_ignored(part) for part in rel.split("/")) or self.path_ignored(rel)


def _extension(name: str) -> str:
    _, dot, ext = name.rpartition(".")
    return ext.lower() if dot else ""


def _join(drel: str, name: str) -> str:
    return f"{drel}/{name}" if drel else name


# --------------------------------------------------------------------------- watchdog glue

class _EventInbox:
    """What the observer thread hands to poll(): paths to look at again. Thread-safe, bounded."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._paths: set[str] = set()
        self._trees: set[str] = set()
        self.overflowed = False

    def add(self, path: str, tree: bool = False) -> None:
        with self._lock:
            if len(self._paths) + len(self._trees) >= MAX_PENDING_EVENTS:
                self.overflowed = True
                self._paths.clear()
                self._trees.clear()
                return
            (self._trees if tree else self._paths).add(path)

    def signal_overflow(self) -> None:
        with self._lock:
            self.overflowed = True

    def drain(self) -> tuple[set[str], set[str], bool]:
        with self._lock:
            paths, trees, over = self._paths, self._trees, self.overflowed
            self._paths, self._trees, self.overflowed = set(), set(), False
        return paths, trees, over


def _make_handler(sink: _EventInbox) -> Any:
    from watchdog.events import FileSystemEventHandler

    def _s(p: str | bytes) -> str:
        return os.fsdecode(p)

    class _Handler(FileSystemEventHandler):
        def on_any_event(self, event: Any) -> None:
            kind = event.event_type
            if kind in ("opened", "closed_no_write"):
                return
            if event.is_directory:
                # A directory that appears (created or moved in) may already hold files that
                # no watch saw: scan it. "modified" on a directory is just its listing changing.
                if kind in ("created", "moved"):
                    sink.add(_s(event.dest_path if kind == "moved" else event.src_path), tree=True)
                if kind in ("deleted", "moved"):
                    sink.add(_s(event.src_path))
                return
            sink.add(_s(event.src_path))
            if kind == "moved" and event.dest_path:
                sink.add(_s(event.dest_path))

    return _Handler()


class _OverflowSignal(logging.Handler):
    """watchdog only logs an inotify queue overflow; turn that log record into a rescan."""

    def __init__(self, sink: _EventInbox):
        super().__init__(level=logging.WARNING)
        self._sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self._sink.signal_overflow()


_WATCHDOG_LOGGERS = ("watchdog.observers.inotify_c", "watchdog.observers.inotify")


def _real_dirs_below(root: bytes, path: bytes) -> list[bytes]:
    """Every folder below `path` (root or a folder under it), itself excluded, found through
    descriptors opened with O_NOFOLLOW from root (safefs): a symlink on the way is never listed."""
    rel = os.path.relpath(path, root)
    if rel == b".." or rel.startswith(b"../"):
        return []
    parts = [] if rel == b"." else [os.fsdecode(p) for p in rel.split(b"/")]
    try:
        fd = safefs.open_dir(Path(os.fsdecode(root)), parts)
    except OSError:
        return []

    def subdirs(dfd: int) -> list[str]:
        try:
            with os.scandir(dfd) as it:
                return [e.name for e in it if e.is_dir(follow_symlinks=False)]
        except OSError:
            return []

    out: list[bytes] = []
    stack = [(fd, path, subdirs(fd))]            # only the folders on the current chain are open
    try:
        while stack:
            dfd, here, names = stack[-1]
            if not names:
                stack.pop()
                os.close(dfd)
                continue
            name = names.pop()
            try:
                sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            except OSError:
                continue                         # swapped for a symlink, gone or unreadable meanwhile
            out.append(here + b"/" + os.fsencode(name))
            stack.append((sub, out[-1], subdirs(sub)))
    finally:
        for dfd, _, _ in stack:
            os.close(dfd)
    return out


def _observer() -> Any:
    """watchdog's observer. On Linux its recursive inotify emitter walks a folder that appears by
    path (os.walk, which follows the folder itself when it is a symlink by then): a sub-folder
    swapped for a symlink between the event and the walk would have an outside folder listed. So
    the watches below a folder are found through safefs descriptors, and the create events watchdog
    makes up for a new folder's content are not made (discovery scans a folder that appears itself,
    through safefs: `tree=True`)."""
    from watchdog.observers import Observer
    try:
        from watchdog.observers import inotify as wi
    except ImportError:                          # not Linux
        return Observer()
    if Observer is not wi.InotifyObserver:
        return Observer()

    class _Group(wi.InotifyWatchGroup):
        def _add_all_callbacks(self, path: bytes) -> None:
            self._add_callback(path)             # inotify_add_watch with IN_DONT_FOLLOW: opens nothing
            if self.is_recursive:
                for sub in _real_dirs_below(self.path, path):
                    self._add_callback(sub)

        def _recursive_simulate(self, src_path: bytes) -> list:
            return []

    class _Emitter(wi.InotifyEmitter):
        def on_thread_start(self) -> None:
            self._inotify = _Group(self._inotify_fd, os.fsencode(self.watch.path),
                                   is_recursive=self.watch.is_recursive,
                                   event_mask=self.get_event_mask_from_filter(),
                                   follow_symlink=self.watch.follow_symlink)

    # The emitter also walks, by path, a folder moved into the tree to make up events for its
    # content (watchdog.events.generate_sub_created_events / generate_sub_moved_events, os.walk):
    # the same race. Discovery scans such a folder itself (a directory event → `tree=True`), so
    # the made-up events are not needed; the names the emitter calls are replaced (this process
    # runs one observer, ours).
    wi.generate_sub_created_events = _no_sub_events
    wi.generate_sub_moved_events = _no_sub_events
    observer = wi.InotifyObserver()
    observer._emitter_class = _Emitter
    return observer


def _no_sub_events(*_paths) -> tuple:
    return ()


# --------------------------------------------------------------------------- discovery

class Discovery:
    """Finds settled candidate photos in the inbox. ``poll()`` is called from one thread."""

    def __init__(self, inbox: Path, watch: Any, *, exclude: Sequence[Path] = ()):
        self.inbox = Path(os.path.abspath(inbox))
        self.watch = watch
        self.rules = IgnoreRules(getattr(watch, "ignore", ()) or ())
        self._exclude = frozenset(os.path.realpath(p) for p in exclude)
        self._recursive = bool(getattr(watch, "recursive", True))
        self.problem: str | None = None
        self.fstype: str | None = None
        self.effective_mode = "events"
        self._trust_dir_mtime = True
        self._resolve()

        self._settle: dict[str, _Settling] = {}
        self._reported: dict[str, tuple[int, int]] = {}
        self._noted: dict[str, str] = {}  # rel → what we logged about it (refused/skipped)
        self._dirs: dict[str, _Dir] = {}
        self._unreadable: set[str] = set()  # dirs we warned about
        self._sink = _EventInbox()
        self._observer: Any = None
        self._overflow_handler: _OverflowSignal | None = None
        self._started = False
        self._inbox_id: tuple[int, int] | None = None
        self._root_real = os.path.realpath(self.inbox)
        self._next_quick: float | None = None  # due at once
        self._next_full: float | None = None
        self.last_scan: dict[str, Any] = {}
        self._forget_lock = threading.Lock()
        self._to_forget: list[str] = []
        self._to_recheck: list[tuple[str, float]] = []
        self._long_fds: list[int] = []  # the descriptor of the folder being listed
        self._recheck: dict[str, float] = {}  # rel → when to look at it again (monotonic, poll's clock)

    # ----------------------------------------------------------------- lifecycle
    def _resolve(self) -> None:
        mode = getattr(self.watch, "mode", "auto")
        self.effective_mode, self.fstype = resolve_mode(mode, self.inbox)
        # FUSE file systems may serve cached or made-up directory times: list every poll.
        self._trust_dir_mtime = not (self.fstype or "").startswith("fuse")

    def start(self) -> None:
        self._started = True
        self._next_quick = self._next_full = None
        self._overflow_handler = _OverflowSignal(self._sink)
        for name in _WATCHDOG_LOGGERS:
            wlog = logging.getLogger(name)
            if wlog.level == logging.NOTSET:
                wlog.setLevel(logging.WARNING)  # so a quieter root logger cannot hide an overflow
            wlog.addHandler(self._overflow_handler)
        if self.inbox.is_dir():
            self._start_observer()
        log.info("discover.started", inbox=str(self.inbox), mode=self.effective_mode,
                 fstype=self.fstype, configured=getattr(self.watch, "mode", "auto"))

    def stop(self) -> None:
        self._started = False
        self._stop_observer()
        if self._overflow_handler is not None:
            for name in _WATCHDOG_LOGGERS:
                logging.getLogger(name).removeHandler(self._overflow_handler)
            self._overflow_handler = None

    def _start_observer(self) -> None:
        if self.effective_mode != "events" or self._observer is not None:
            return
        observer = _observer()
        try:
            observer.schedule(_make_handler(self._sink), str(self.inbox),
                              recursive=self._recursive, follow_symlink=False)
            observer.start()
        except OSError as exc:
            # e.g. the inotify watch limit: scanning still works.
            log.warning("discover.events_unavailable", inbox=str(self.inbox), error=str(exc),
                        fallback="poll")
            self.effective_mode = "poll"
            return
        self._observer = observer

    def _stop_observer(self) -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            observer.join(timeout=5)

    # ----------------------------------------------------------------- public
    def forget(self, rel: str) -> None:
        """Drop what we remember of rel: a file at that path is new to us from now on (even if
        it arrives before the next listing of its folder and its inode number looks the same).
        Safe from any thread: it takes effect at the start of the next poll()."""
        with self._forget_lock:
            self._to_forget.append(rel)

    def recheck(self, rel: str, delay: float) -> None:
        """Look at rel again in `delay` seconds, even if nothing says it changed: a file that
        could not be read yet (EACCES), or one that waits for the earlier job at its path to end.
        Safe from any thread."""
        with self._forget_lock:
            self._to_recheck.append((rel, delay))

    def _forget_now(self, rel: str) -> None:
        self._reported.pop(rel, None)
        self._settle.pop(rel, None)
        self._noted.pop(rel, None)
        drel, _, name = rel.rpartition("/")
        folder = self._dirs.get(drel)
        if folder is not None:
            folder.files.pop(name, None)

    @property
    def settling(self) -> int:
        return len(self._settle)

    def poll(self, now: float | None = None) -> list[Candidate]:
        """Settled candidates since the last call. ``now``: monotonic seconds (any clock, used
        consistently). Never raises for file-system races."""
        now = time.monotonic() if now is None else now
        with self._forget_lock:
            forgotten, self._to_forget = self._to_forget, []
            rechecks, self._to_recheck = self._to_recheck, []
        for rel in forgotten:
            self._forget_now(rel)
        for rel, delay in rechecks:
            self._recheck[rel] = now + delay
        if not self._check_inbox(now):
            return []
        for rel in [r for r, due in self._recheck.items() if due <= now]:
            del self._recheck[rel]
            self._forget_now(rel)
            self._look(rel, now)
        if self.effective_mode == "events" and self._started:
            if self._observer is not None and not self._observer.is_alive():
                log.warning("discover.observer_died", inbox=str(self.inbox))
                self._observer = None
                self._next_full = None  # what it missed: rescan
            if self._observer is None:
                self._start_observer()

        paths, trees, overflowed = self._sink.drain()
        if overflowed:
            log.warning("discover.events_overflow", inbox=str(self.inbox), action="full scan")
            self._next_full = None
        for tree in trees:
            rel = self._rel(tree)
            if rel is not None and not self._excluded(rel):
                self._scan(now, full=True, top=rel)
        for path in paths:
            rel = self._rel(path)
            if rel is not None and rel not in ("",):
                self._look(rel, now)

        if self._next_full is None or now >= self._next_full:
            self._scan(now, full=True)
            self._next_full = now + float(self.watch.rescan_interval)
            self._next_quick = now + float(self.watch.poll_interval)
        elif self.effective_mode == "poll" and (self._next_quick is None or now >= self._next_quick):
            self._scan(now, full=False)
            self._next_quick = now + float(self.watch.poll_interval)
        return self._settled(now)

    # ----------------------------------------------------------------- inbox health
    def _check_inbox(self, now: float) -> bool:
        problem = None
        try:
            st = os.stat(self.inbox)
            if not stat.S_ISDIR(st.st_mode):
                problem = f"inbox is not a folder: {self.inbox}"
        except FileNotFoundError:
            problem = f"inbox missing: {self.inbox}"
        except OSError as exc:
            problem = f"inbox unreadable: {self.inbox}: {exc.strerror or exc}"
        if problem is not None:
            if problem != self.problem:
                log.warning("discover.inbox_problem", inbox=str(self.inbox), problem=problem)
                self._stop_observer()
            self.problem = problem
            return False
        ident = (st.st_dev, st.st_ino)
        if self.problem is not None or (self._inbox_id is not None and ident != self._inbox_id):
            # Back (a share mounted again) or replaced: look at it afresh.
            log.info("discover.inbox_back", inbox=str(self.inbox), was=self.problem)
            self._stop_observer()
            self._resolve()
            self._root_real = os.path.realpath(self.inbox)
            self._dirs.clear()
            self._next_full = None
            if self._started:
                self._start_observer()
        self.problem = None
        self._inbox_id = ident
        return True

    # ----------------------------------------------------------------- paths
    def _rel(self, path: str) -> str | None:
        """Relative POSIX path of an event path inside the inbox, None when outside/ignored."""
        root = str(self.inbox)
        if path == root:
            return ""
        if not path.startswith(root.rstrip("/") + "/"):
            return None
        rel = path[len(root.rstrip("/")) + 1:].strip("/")
        if not rel or self.rules.ignored(rel):
            return None
        if not self._recursive and "/" in rel:
            return None
        parent = rel.rpartition("/")[0]
        if parent and self._excluded(parent):
            return None
        return rel

    def _excluded(self, drel: str) -> bool:
        if not self._exclude:
            return False
        real = os.path.join(self._root_real, drel) if drel else self._root_real
        return any(real == ex or real.startswith(ex + "/") for ex in self._exclude)

    def _parents_are_dirs(self, rel: str, memo: dict[str, bool] | None = None) -> bool:
        """Every folder between the inbox and rel is a real folder (no symlink on the way).
        ``memo`` caches the answer per folder within one pass."""
        parent = rel.rpartition("/")[0]
        if not parent:
            return True
        if memo is not None and parent in memo:
            return memo[parent]
        ok = self._parents_are_dirs(parent, memo)
        if ok:
            try:
                ok = stat.S_ISDIR(self._lstat(parent).st_mode)
            except OSError:
                ok = False
        if memo is not None:
            memo[parent] = ok
        return ok

    def _lstat(self, rel: str) -> os.stat_result:
        """lstat of inbox/rel; a path longer than PATH_MAX is walked from folder descriptors."""
        try:
            return os.lstat(os.path.join(self.inbox, rel))
        except OSError as exc:
            if exc.errno != errno.ENAMETOOLONG:
                raise
        st = safefs.lstat(self.inbox, rel)
        if st is None:
            raise FileNotFoundError(errno.ENOENT, "gone", rel)
        return st

    # ----------------------------------------------------------------- one path
    def _look(self, rel: str, now: float) -> None:
        """An event said rel may have changed: stat it."""
        if not self._parents_are_dirs(rel):
            self._vanished(rel)
            return
        try:
            st = self._lstat(rel)
        except FileNotFoundError:
            self._vanished(rel)
            return
        except OSError as exc:
            log.warning("discover.stat_failed", path=rel, error=str(exc))
            return
        if stat.S_ISDIR(st.st_mode):
            if not self._excluded(rel):
                self._scan(now, full=True, top=rel)
            return
        self._classify(rel, st, now)

    def _classify(self, rel: str, st: os.stat_result, now: float) -> None:
        mode = st.st_mode
        if not stat.S_ISREG(mode):
            for test, kind in _SPECIAL_KINDS:
                if test(mode):
                    break
            else:
                kind = "special file"
            self._settle.pop(rel, None)
            self._note(rel, f"refused:{kind}", lambda: log.warning(
                "discover.refused", path=rel, reason=f"{kind}: never followed or read"))
            return
        ext = _extension(rel)
        if ext not in READ_EXTENSIONS:
            self._settle.pop(rel, None)
            if ext in COMPANION_EXTENSIONS:
                self._note(rel, "companion", lambda: log.debug(
                    "discover.companion", path=rel))
            elif ext in RAW_EXTENSIONS:
                self._note(rel, "skipped:raw", lambda: log.info(
                    "discover.skipped", path=rel,
                    reason=f"RAW camera file (.{ext}) is not read; left in place"))
            else:
                self._note(rel, "skipped:other", lambda: log.info(
                    "discover.skipped", path=rel,
                    reason=f"not a photo we read (.{ext or 'no extension'}); left in place"))
            return
        self._noted.pop(rel, None)
        key = (st.st_size, st.st_mtime_ns)
        if self._reported.get(rel) == key:
            return
        ent = self._settle.get(rel)
        if ent is None or (ent.size, ent.mtime_ns) != key:
            self._settle[rel] = _Settling(st.st_size, st.st_mtime_ns, now)

    def _note(self, rel: str, what: str, emit: Any) -> None:
        if self._noted.get(rel) != what:
            self._noted[rel] = what
            emit()

    def _vanished(self, rel: str) -> None:
        if self._settle.pop(rel, None) is not None:
            log.debug("discover.vanished", path=rel)
        self._reported.pop(rel, None)
        self._noted.pop(rel, None)
        if rel in self._dirs:
            self._drop_tree(rel)

    def _drop_tree(self, drel: str) -> None:
        prefix = drel + "/"
        for d in [d for d in self._dirs if d == drel or d.startswith(prefix)]:
            del self._dirs[d]
        for table in (self._settle, self._reported, self._noted):
            for rel in [r for r in table if r.startswith(prefix)]:
                del table[rel]
        self._unreadable = {d for d in self._unreadable if d != drel and not d.startswith(prefix)}

    # ----------------------------------------------------------------- scans
    def _scan(self, now: float, *, full: bool, top: str = "") -> None:
        t0 = time.perf_counter()
        listed = stated = dirs = 0
        stack = [top]
        while stack:
            drel = stack.pop()
            dpath = os.path.join(self.inbox, drel) if drel else str(self.inbox)
            try:
                st = self._lstat(drel) if drel else os.stat(dpath)
            except FileNotFoundError:
                if drel:
                    self._vanished(drel)
                continue
            except OSError as exc:
                self._warn_unreadable(drel, exc)
                continue
            if not stat.S_ISDIR(st.st_mode):
                if drel:
                    self._drop_tree(drel)
                    self._dirs.pop(drel, None)
                    self._look(drel, now)
                continue
            dirs += 1
            state = self._dirs.get(drel)
            if full or state is None or state.mtime_ns != st.st_mtime_ns or not state.trusted:
                state, n = self._list(drel, dpath, st, now, state, full)
                if state is None:
                    continue
                listed += 1
                stated += n
            if self._recursive:
                stack.extend(_join(drel, name) for name in state.subdirs)
        ms = (time.perf_counter() - t0) * 1000
        self.last_scan = {"full": full, "top": top, "dirs": dirs, "listed": listed,
                          "stated": stated, "ms": round(ms, 3)}
        log.debug("discover.scan", inbox=str(self.inbox), **self.last_scan)

    def _warn_unreadable(self, drel: str, exc: OSError) -> None:
        if drel not in self._unreadable:
            self._unreadable.add(drel)
            log.warning("discover.unreadable", path=drel or ".", error=str(exc))

    def _list(self, drel: str, dpath: str, st: os.stat_result, now: float,
              old: _Dir | None, full: bool) -> tuple[_Dir | None, int]:
        """List one folder. A full scan stats every entry; otherwise an entry whose name and
        inode number (free from readdir) are as at the last listing is the same file and is not
        stat'd again (files still settling always are)."""
        subdirs: list[str] = []
        files: dict[str, int] = {}
        old_files = old.files if old is not None and not full else {}
        stated = 0
        try:
            # listed from its own descriptor, every folder on the way opened without following a
            # link: a sub-folder swapped for a symlink after it was classified is never listed
            # (nothing outside the inbox is opened); the descriptor stays open for the entries'
            # stat calls and is closed when the listing is done
            dfd = safefs.open_dir(self.inbox, drel.split("/") if drel else [])
            self._long_fds.append(dfd)
            with os.scandir(dfd) as it:
                entries = list(it)
        except safefs.UnsafePath:
            self._close_listing()
            if drel:
                self._drop_tree(drel)
                self._dirs.pop(drel, None)
                self._look(drel, now)                 # refused as a symlink, once
            return None, 0
        except FileNotFoundError:
            self._close_listing()
            if drel:
                self._vanished(drel)
                self._dirs.pop(drel, None)
            return None, 0
        except OSError as exc:
            self._close_listing()
            self._warn_unreadable(drel, exc)
            return None, 0
        self._unreadable.discard(drel)
        for entry in entries:
            name = entry.name
            if self.rules.name_ignored(name):
                continue
            rel = _join(drel, name)
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                is_dir = False
            if self.rules.path_ignored(rel):  # the folders above were checked on the way down
                continue
            if is_dir:
                if not self._excluded(rel):
                    subdirs.append(name)
                continue
            try:
                ino = entry.inode()
            except OSError:
                ino = 0
            files[name] = ino
            if ino and old_files.get(name) == ino and rel not in self._settle:
                continue
            try:
                est = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                del files[name]
                self._vanished(rel)
                continue
            except OSError as exc:
                log.warning("discover.stat_failed", path=rel, error=str(exc))
                continue
            stated += 1
            self._classify(rel, est, now)
        if old is not None:
            for name in old.files.keys() - files.keys():
                self._vanished(_join(drel, name))
            for name in set(old.subdirs) - set(subdirs):
                self._drop_tree(_join(drel, name))
        if old is None or old.mtime_ns != st.st_mtime_ns:
            new = _Dir(st.st_mtime_ns, now, False, tuple(subdirs), files)
        else:
            trusted = self._trust_dir_mtime and (old.trusted or now - old.listed_at >= DIR_TRUST_MARGIN)
            new = _Dir(st.st_mtime_ns, old.listed_at, trusted, tuple(subdirs), files)
        self._dirs[drel] = new
        self._close_listing()
        return new, stated

    def _close_listing(self) -> None:
        while self._long_fds:
            os.close(self._long_fds.pop())

    # ----------------------------------------------------------------- settle
    def _settled(self, now: float) -> list[Candidate]:
        settle = float(self.watch.settle_seconds)
        out: list[Candidate] = []
        memo: dict[str, bool] = {}
        for rel, ent in list(self._settle.items()):
            if now - ent.since < settle:
                continue
            abspath = os.path.join(self.inbox, rel)
            try:
                st = self._lstat(rel)
            except FileNotFoundError:
                self._vanished(rel)
                continue
            except OSError as exc:
                log.warning("discover.stat_failed", path=rel, error=str(exc))
                continue
            if not stat.S_ISREG(st.st_mode) or (st.st_size, st.st_mtime_ns) != (ent.size, ent.mtime_ns):
                self._classify(rel, st, now)  # changed: settles again from now (or refused)
                continue
            if not self._parents_are_dirs(rel, memo):
                self._vanished(rel)
                continue
            del self._settle[rel]
            self._reported[rel] = (st.st_size, st.st_mtime_ns)
            out.append(Candidate(rel, Path(abspath), st.st_size, st.st_mtime_ns))
        out.sort(key=lambda c: (c.mtime_ns, c.rel))
        return out
