"""The end-state check shared by the hostile-names suite and the fault campaign.

Files are matched by content (the sha256 of the original; sidecars carry `input.sha256`), never by
name: names may be shortened or escaped. Trees are walked with directory file descriptors
(`os.fwalk`, bytes, no symlink following), so paths longer than PATH_MAX and names that are not
UTF-8 are seen as they are.

    report = check(tmp_path, expected, canary=canaries)   # asserts; report.text() for the note
"""
from __future__ import annotations

import base64
import ctypes
import ctypes.util
import hashlib
import json
import os
import re
import stat
import struct
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ERROR_KINDS = frozenset({"undecodable", "unsupported", "too_large", "animated", "out_of_memory", "device",
                         "internal", "interrupted"})
TMP_DIR = b".photoenhanced-tmp"
# What a name must never carry raw into a sidecar: C0/C1 controls, DEL, lone surrogates (bytes that
# were not UTF-8), line/paragraph separators, bidirectional controls.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
                          "\ud800-\udfff]")
_COUNTER = re.compile(rb"^(?P<stem>.*) \((?P<n>\d+)\)(?P<ext>\.[^.]*)?$", re.S)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Cand:
    """One settled candidate the test dropped: its path under the inbox (raw bytes) and what may
    become of it. expect: "done", "failed" or None (either); kinds: the error kinds allowed when it
    fails (None: any kind of ERROR_KINDS). archived: False when the test itself took the original
    away before the daemon could archive it (then archive/ may hold it at most once)."""
    rel: bytes
    cls: str
    expect: str | None = "done"
    kinds: frozenset | None = None
    archived: bool = True


# --- a canary outside the folders, watched with inotify --------------------------------------------

IN_ACCESS, IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE, IN_CLOSE_NOWRITE, IN_OPEN = 0x1, 0x2, 0x4, 0x8, 0x10, 0x20
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF, IN_IGNORED = 0x400, 0x800, 0x8000
CANARY_MASK = IN_OPEN | IN_ACCESS | IN_MODIFY | IN_ATTRIB | IN_DELETE_SELF | IN_MOVE_SELF
_NAMES = {IN_ACCESS: "ACCESS", IN_MODIFY: "MODIFY", IN_ATTRIB: "ATTRIB", IN_CLOSE_WRITE: "CLOSE_WRITE",
          IN_CLOSE_NOWRITE: "CLOSE_NOWRITE", IN_OPEN: "OPEN", IN_MOVED_FROM: "MOVED_FROM", IN_MOVED_TO: "MOVED_TO",
          IN_CREATE: "CREATE", IN_DELETE: "DELETE", IN_DELETE_SELF: "DELETE_SELF", IN_MOVE_SELF: "MOVE_SELF",
          IN_IGNORED: "IGNORED"}


class Canaries:
    """Photos outside every configured folder that must stay untouched and unread: inotify
    (IN_OPEN|IN_ACCESS|IN_MODIFY|IN_ATTRIB|IN_DELETE_SELF|IN_MOVE_SELF) on each file, plus bytes and
    mtime compared at the end. Folders holding canaries can be watched too (`watch_dir`): an
    IN_OPEN there means someone listed a folder outside the configured ones."""

    def __init__(self):
        self._libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.files: dict[int, tuple[Path, bytes, int]] = {}    # wd → (path, bytes, mtime_ns)
        self.dirs: dict[int, Path] = {}
        self.events: list[tuple[str, str]] = []                # (path, event names)
        self.shas: set[str] = set()

    def _watch(self, path: Path, mask: int) -> int:
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(path), mask)
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")
        return wd

    def add(self, path: Path, data: bytes) -> None:
        """Write the canary (before watching it: our own write is not an event)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        st = os.lstat(path)
        self.files[self._watch(path, CANARY_MASK)] = (path, data, st.st_mtime_ns)
        self.shas.add(sha(data))

    def watch_dir(self, path: Path) -> None:
        self.dirs[self._watch(path, IN_OPEN | IN_ACCESS | IN_DELETE_SELF | IN_MOVE_SELF)] = path

    def drain(self) -> list[tuple[str, str]]:
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return self.events
            i = 0
            while i + 16 <= len(buf):
                wd, mask, _cookie, n = struct.unpack_from("iIII", buf, i)
                name = buf[i + 16:i + 16 + n].rstrip(b"\0")
                i += 16 + n
                if mask & IN_IGNORED and not mask & ~IN_IGNORED:
                    continue
                what = "|".join(v for k, v in _NAMES.items() if mask & k)
                where = self.files[wd][0] if wd in self.files else self.dirs.get(wd, f"wd{wd}")
                self.events.append((str(where) + (f"/{os.fsdecode(name)}" if name else ""), what))

    def problems(self) -> list[str]:
        """Call after the daemon stopped. Events first, then our own reads (which are events too)."""
        out = [f"canary touched: {what} on {where}" for where, what in self.drain()]
        self.close()
        for path, data, mtime_ns in self.files.values():
            try:
                st = os.lstat(path)
                now = path.read_bytes() if stat.S_ISREG(st.st_mode) else None
            except FileNotFoundError:
                out.append(f"canary gone: {path}")
                continue
            if now != data:
                out.append(f"canary changed: {path}")
            if st.st_mtime_ns != mtime_ns:
                out.append(f"canary mtime changed: {path}")
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# --- walking ---------------------------------------------------------------------------------------

@dataclass
class Entry:
    rel: bytes            # path under its root, raw bytes
    mode: int
    data: bytes | None    # contents of a regular file


def walk(root: Path, prune_tmp: bool = False) -> list[Entry]:
    """Every entry under root (directories excluded), read through directory fds; symlinks and
    special files are listed (mode) but never followed or opened. Entries that vanish while we
    look (a running daemon) are skipped; prune_tmp skips the temp folders."""
    out: list[Entry] = []
    broot = os.fsencode(root)
    if not os.path.isdir(broot) or os.path.islink(broot):
        return out
    for dirpath, dirnames, filenames, dirfd in os.fwalk(broot, follow_symlinks=False):
        rel_dir = os.path.relpath(dirpath, broot) if dirpath != broot else b""
        names = list(filenames)
        if prune_tmp and TMP_DIR in dirnames:
            dirnames.remove(TMP_DIR)
        for d in list(dirnames):             # fwalk lists symlinks to folders as folders
            try:
                st = os.stat(d, dir_fd=dirfd, follow_symlinks=False)
            except FileNotFoundError:
                dirnames.remove(d)
                continue
            if not stat.S_ISDIR(st.st_mode):
                dirnames.remove(d)
                names.append(d)
        for name in names:
            rel = os.path.join(rel_dir, name) if rel_dir else name
            try:
                st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            data = None
            if stat.S_ISREG(st.st_mode):
                try:
                    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dirfd)
                except FileNotFoundError:
                    continue
                except PermissionError:
                    data = None
                else:
                    with os.fdopen(fd, "rb") as f:
                        data = f.read()
            out.append(Entry(rel, st.st_mode, data))
    return out


# --- the check -------------------------------------------------------------------------------------

@dataclass
class Report:
    files: int = 0
    outcomes: Counter = field(default_factory=Counter)                  # done / failed / lost / duplicated
    kinds: Counter = field(default_factory=Counter)                     # error.kind of failed ones
    by_class: dict = field(default_factory=lambda: defaultdict(Counter))   # class → "done" / "failed:kind"
    lost: int = 0
    duplicated: int = 0
    archived: int = 0
    shortened: int = 0
    left_in_inbox: int = 0               # files in the inbox that are not settled candidates (non-candidates)
    problems: list = field(default_factory=list)

    def text(self) -> str:
        lines = [f"files={self.files} done={self.outcomes['done']} failed={self.outcomes['failed']} "
                 f"lost={self.lost} duplicated={self.duplicated} archived={self.archived} "
                 f"shortened={self.shortened} non-candidates-left={self.left_in_inbox}",
                 "error kinds: " + ", ".join(f"{k}={v}" for k, v in sorted(self.kinds.items()))]
        width = max((len(c) for c in self.by_class), default=0)
        for cls in sorted(self.by_class):
            lines.append(f"  {cls:<{width}}  " + " ".join(f"{k}={v}" for k, v in sorted(self.by_class[cls].items())))
        if self.problems:
            lines.append(f"PROBLEMS ({len(self.problems)}):")
            lines += [f"  {p}" for p in self.problems[:80]]
            if len(self.problems) > 80:
                lines.append(f"  … {len(self.problems) - 80} more")
        return "\n".join(lines)


def _show(b: bytes, limit: int = 160) -> str:
    r = repr(b)[2:-1]
    return r if len(r) <= limit else f"{r[:limit // 2]}…[{len(b)} bytes]…{r[-limit // 2:]}"


def _sidecar_name_checks(rep: Report, folder: str, side_rel: bytes, data: dict, cand: Cand) -> None:
    """input.path printable; path_b64 round-trips to the real name; the folder mirrored; the name
    kept, numbered or shortened with original_name recorded."""
    inp = data.get("input") or {}
    shown = inp.get("path")
    where = f"{folder}/{_show(side_rel)}"
    if not isinstance(shown, str):
        rep.problems.append(f"{where}: input.path missing")
        return
    if _UNPRINTABLE.search(shown):
        rep.problems.append(f"{where}: input.path carries raw control/undecodable characters: {shown!r}")
    if "path_b64" in inp:
        try:
            raw = base64.urlsafe_b64decode(inp["path_b64"])
        except Exception:
            raw = None
        if raw != cand.rel:
            rep.problems.append(f"{where}: input.path_b64 decodes to {raw!r}, the dropped name is {cand.rel!r}")
    elif shown.encode("utf-8", "surrogateescape") != cand.rel:
        rep.problems.append(f"{where}: input.path {shown!r} differs from the real name {cand.rel!r} "
                            f"and there is no input.path_b64")
    beside = side_rel[:-5]
    if os.path.dirname(beside) != os.path.dirname(cand.rel):
        rep.problems.append(f"{where}: not in the mirrored folder {_show(os.path.dirname(cand.rel))!r}")
    name, orig = os.path.basename(beside), os.path.basename(cand.rel)
    if not _same_name(name, orig):
        rep.shortened += 1
        if "original_name" not in data:
            rep.problems.append(f"{where}: name changed from {_show(orig)!r} without original_name in the sidecar")


def _same_name(name: bytes, orig: bytes) -> bool:
    """`name` is `orig`, or `orig` numbered (`stem (n).ext`), or either with another extension
    (an output format other than the input's)."""
    m = _COUNTER.match(name)
    for c in {name, (m["stem"] + (m["ext"] or b"")) if m else name}:
        if c == orig or (b"." in c and b"." in orig and c.rpartition(b".")[0] == orig.rpartition(b".")[0]):
            return True
    return False


def check(tmp_path: Path, expected: dict[str, Cand], canary: Canaries | None = None, *,
          archive: bool = True, foreign: dict[bytes, bytes] | None = None, assert_ok: bool = True,
          folders: dict[str, str] | None = None) -> Report:
    """The end state after a clean stop.

    expected: sha256 of each dropped original → Cand. foreign: files the test placed in outbox/
    failed itself (path under tmp_path → bytes): they must be left as they are. Asserts (unless
    assert_ok=False) and returns the report either way (report.problems lists every violation)."""
    f = {"inbox": "inbox", "outbox": "outbox", "failed": "failed", "archive": "archive", **(folders or {})}
    foreign = dict(foreign or {})
    rep = Report(files=len(expected))
    canary_shas = canary.shas if canary else set()
    placed: dict[str, list[tuple[str, str | None]]] = defaultdict(list)   # sha → [(folder, kind)]

    for folder, status in (("outbox", "done"), ("failed", "failed")):
        root = tmp_path / f[folder]
        entries = walk(root)
        by_rel = {e.rel: e for e in entries}
        claimed: set[bytes] = set()
        for e in entries:
            top = e.rel.split(b"/", 1)[0]
            if top == TMP_DIR:
                rep.problems.append(f"temp file left: {folder}/{_show(e.rel)}")
                claimed.add(e.rel)
                continue
            key = os.fsencode(f[folder]) + b"/" + e.rel
            if key in foreign:
                claimed.add(e.rel)
                if e.data != foreign.pop(key):
                    rep.problems.append(f"a foreign file was changed: {folder}/{_show(e.rel)}")
                continue
            if not stat.S_ISREG(e.mode):
                rep.problems.append(f"not a regular file in {folder}/: {_show(e.rel)} (mode {oct(e.mode)})")
                claimed.add(e.rel)
                continue
            if not e.rel.endswith(b".json"):
                continue
            claimed.add(e.rel)
            where = f"{folder}/{_show(e.rel)}"
            try:
                data = json.loads(e.data)
            except (TypeError, ValueError) as exc:
                rep.problems.append(f"{where}: sidecar is not JSON ({exc})")
                continue
            if not isinstance(data, dict) or data.get("status") != status:
                rep.problems.append(f"{where}: status {data.get('status') if isinstance(data, dict) else data!r}, "
                                    f"expected {status!r}")
                continue
            s = (data.get("input") or {}).get("sha256")
            beside = by_rel.get(e.rel[:-5])
            claimed.add(e.rel[:-5])
            if beside is None or beside.data is None:
                rep.problems.append(f"{where}: sidecar without its file beside it")
            elif folder == "outbox":
                outs = data.get("outputs") or [{}]
                if sha(beside.data) != outs[0].get("sha256"):
                    rep.problems.append(f"{where}: result's sha256 differs from outputs[0].sha256")
            elif sha(beside.data) != s:
                rep.problems.append(f"{where}: the original in failed/ is not byte-identical (sha256 differs)")
            if s in canary_shas:
                rep.problems.append(f"{where}: a CANARY from outside the folders was processed")
                continue
            cand = expected.get(s)
            if cand is None:
                rep.problems.append(f"{where}: input.sha256 {s} matches no dropped file (appeared from nowhere)")
                continue
            kind = None
            if folder == "failed":
                err = data.get("error") or {}
                kind = err.get("kind")
                if kind not in ERROR_KINDS:
                    rep.problems.append(f"{where}: error.kind {kind!r} is not one of {sorted(ERROR_KINDS)}")
                if not isinstance(err.get("message"), str) or not err.get("message"):
                    rep.problems.append(f"{where}: error.message missing")
            placed[s].append((folder, kind))
            _sidecar_name_checks(rep, folder, e.rel, data, cand)
        for e in entries:
            if e.rel not in claimed:
                rep.problems.append(f"orphan in {folder}/ (no sidecar names it): {_show(e.rel)}")

    # archive: each done original exactly once, nothing else
    arch: Counter = Counter()
    if archive and f["archive"]:
        for e in walk(tmp_path / f["archive"]):
            if e.rel.split(b"/", 1)[0] == TMP_DIR:
                rep.problems.append(f"temp file left: archive/{_show(e.rel)}")
            elif not stat.S_ISREG(e.mode) or e.data is None:
                rep.problems.append(f"not a regular file in archive/: {_show(e.rel)} (mode {oct(e.mode)})")
            else:
                s = sha(e.data)
                arch[s] += 1
                if s in canary_shas:
                    rep.problems.append(f"archive/{_show(e.rel)}: a CANARY from outside the folders was archived")
                elif s not in expected:
                    rep.problems.append(f"archive/{_show(e.rel)}: matches no dropped file")

    # the inbox: no settled candidate left
    inbox_left: Counter = Counter()
    for e in walk(tmp_path / f["inbox"]):
        s = sha(e.data) if e.data is not None else None
        if s in expected and expected[s].rel == e.rel:
            inbox_left[s] += 1
        else:
            rep.left_in_inbox += 1

    for s, cand in expected.items():
        got = placed.get(s, [])
        where = f"{cand.cls} '{_show(cand.rel)}'"
        if not got:
            rep.lost += 1
            rep.outcomes["lost"] += 1
            rep.by_class[cand.cls]["LOST"] += 1
            rep.problems.append(f"lost: {where} is in neither outbox/ nor failed/"
                                + (" (still in the inbox)" if inbox_left[s] else ""))
            continue
        if len(got) > 1:
            rep.duplicated += 1
            rep.outcomes["duplicated"] += 1
            rep.problems.append(f"duplicated: {where} ended {len(got)} times: {got}")
        folder, kind = got[0]
        outcome = "done" if folder == "outbox" else "failed"
        rep.outcomes[outcome] += 1
        rep.by_class[cand.cls]["done" if outcome == "done" else f"failed:{kind}"] += 1
        if outcome == "failed":
            rep.kinds[kind] += 1
        if cand.expect and outcome != cand.expect:
            rep.problems.append(f"wrong outcome: {where} ended {outcome}" + (f" ({kind})" if kind else "")
                                + f", expected {cand.expect}")
        elif outcome == "failed" and cand.kinds is not None and kind not in cand.kinds:
            rep.problems.append(f"wrong error.kind: {where} failed as {kind!r}, expected one of {sorted(cand.kinds)}")
        if inbox_left[s]:
            rep.problems.append(f"settled candidate still in the inbox after it ended: {where}")
        if archive and f["archive"]:
            n = arch[s]
            rep.archived += n if outcome == "done" else 0
            if outcome == "done" and n != 1 and (cand.archived or n > 1):
                rep.problems.append(f"archive holds {where} {n} times (expected once)")
            if outcome == "failed" and n:
                rep.problems.append(f"archive holds {where}, which failed")
    for key in foreign:
        rep.problems.append(f"a foreign file vanished: {_show(key)}")
    if canary is not None:
        rep.problems += canary.problems()
    if assert_ok:
        assert not rep.problems, rep.text()
    return rep


# --- harness pieces shared by the suites that drive the real daemon ---------------------------------

NOTIFY_FIELDS = re.compile(r"^(READY=1|STOPPING=1|RELOADING=1|WATCHDOG=1|STATUS=.*|MONOTONIC_USEC=\d+|"
                           r"EXTEND_TIMEOUT_USEC=\d+)$", re.S)


def image_bytes(seed: int, fmt: str = "JPEG", size: tuple[int, int] | None = None,
                marker: tuple[int, int, int] | None = None) -> bytes:
    """A small valid image, different for every seed; `marker` sets the top-left pixel (use PNG to
    keep it exact: blue = the fake enhancer's poison, green = its slow marker)."""
    import io

    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    w, h = size or (int(rng.integers(6, 20)), int(rng.integers(6, 16)))
    arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    arr[0, 0] = marker if marker is not None else (10, 200, 10)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _open_dir(root: Path, rel_dir: bytes, create: bool) -> int:
    """A directory fd for root/rel_dir, walked component by component (any depth, any bytes)."""
    fd = os.open(os.fsencode(root), os.O_RDONLY | os.O_DIRECTORY)
    for part in [p for p in rel_dir.split(b"/") if p]:
        if create:
            try:
                os.mkdir(part, 0o755, dir_fd=fd)
            except FileExistsError:
                pass
        try:
            nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        finally:
            os.close(fd)
        fd = nfd
    return fd


def drop(root: Path, rel: bytes, data: bytes, mode: int = 0o644) -> None:
    """Put a complete file at root/rel (raw bytes, any depth): written under a hidden temp name,
    then renamed into place (as a careful copier does)."""
    d, _, name = rel.rpartition(b"/")
    fd = _open_dir(root, d, create=True)
    try:
        tmp = b".drop-" + os.urandom(6).hex().encode()
        wfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode, dir_fd=fd)
        with os.fdopen(wfd, "wb") as f:
            f.write(data)
        os.rename(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
    finally:
        os.close(fd)


def read_at(root: Path, rel: bytes) -> bytes | None:
    d, _, name = rel.rpartition(b"/")
    try:
        fd = _open_dir(root, d, create=False)
    except OSError:
        return None
    try:
        ffd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
    except OSError:
        return None
    finally:
        os.close(fd)
    with os.fdopen(ffd, "rb") as f:
        return f.read()


def ended(tmp_path: Path) -> set[str]:
    """sha256 of every original that has a sidecar in outbox/ or failed/ (input.sha256)."""
    out = set()
    for folder in ("outbox", "failed"):
        for e in walk(tmp_path / folder, prune_tmp=True):
            if e.rel.endswith(b".json") and e.data:
                try:
                    out.add(json.loads(e.data)["input"]["sha256"])
                except (ValueError, KeyError, TypeError):
                    continue
    return out


def sidecar_count(tmp_path: Path, foreign: dict | None = None) -> int:
    """Sidecars placed in outbox/ and failed/ (temp folders and the test's own files excluded)."""
    n = 0
    for folder in ("outbox", "failed"):
        root = tmp_path / folder
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames, _fd in os.fwalk(os.fsencode(root)):
            if TMP_DIR in dirnames:
                dirnames.remove(TMP_DIR)
            n += sum(1 for fn in filenames if fn.endswith(b".json"))
    return n - sum(1 for k in (foreign or {}) if k.endswith(b".json"))


class NotifyRecorder:
    """A fake NOTIFY_SOCKET (AF_UNIX datagrams) read by a thread, so nothing the daemon sends is
    dropped while the test is busy elsewhere."""

    def __init__(self, path: Path):
        import socket
        import threading
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.msgs: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.msgs.append(self.sock.recv(1 << 17))
            except OSError:
                continue

    def fields(self) -> list[str]:
        return [f for m in list(self.msgs) for f in m.decode("utf-8", "surrogateescape").split("\n")]

    def statuses(self) -> list[str]:
        return [f[7:] for f in self.fields() if f.startswith("STATUS=")]

    def problems(self) -> list[str]:
        """Every field one that the daemon sends (no injected WATCHDOG=trigger, MAINPID=, …), no
        control characters inside a field, valid UTF-8."""
        out = []
        for m in list(self.msgs):
            try:
                m.decode("utf-8")
            except UnicodeDecodeError:
                out.append(f"notify datagram is not UTF-8: {m[:200]!r}")
            for fld in m.decode("utf-8", "surrogateescape").split("\n"):
                if not NOTIFY_FIELDS.match(fld):
                    out.append(f"unexpected notify field {fld[:120]!r} in datagram {m[:300]!r}")
                elif _UNPRINTABLE.search(fld):
                    out.append(f"control/undecodable character in notify field {fld[:200]!r}")
        return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def log_problems(log: Path) -> list[str]:
    """The daemon's output (--log-format json): one JSON object per line, nothing else."""
    bad = []
    for i, line in enumerate(log.read_bytes().split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            bad.append(f"{log.name}:{i}: not one JSON object: {line[:240]!r}")
            continue
        if not isinstance(obj, dict) or "event" not in obj:
            bad.append(f"{log.name}:{i}: not an event object: {line[:240]!r}")
    if len(bad) > 3:
        bad = bad[:3] + [f"{log.name}: {len(bad)} lines in all that are not one JSON event each"]
    return bad


def cli_raw(config: Path, *args: str, timeout: float = 60) -> tuple[int, bytes, bytes]:
    import subprocess
    import sys
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    r = subprocess.run([sys.executable, "-m", "watcher.cli", "--config", str(config), *args],
                       capture_output=True, env=env, timeout=timeout)
    return r.returncode, r.stdout, r.stderr


def cli_problems(config: Path) -> tuple[list[str], list[dict]]:
    """`status --json` and `list --json` parse (UTF-8 JSON), the text forms carry no raw control
    characters and `list` prints one line per job. Returns (problems, the jobs of list --json)."""
    out: list[str] = []
    jobs: list[dict] = []
    for args in (("status", "--json"), ("list", "--json")):
        rc, so, se = cli_raw(config, *args)
        if rc != 0:
            out.append(f"{' '.join(args)}: exit {rc}: {se[-400:]!r}")
            continue
        try:
            doc = json.loads(so.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            out.append(f"{' '.join(args)}: not valid UTF-8 JSON ({exc}): {so[:300]!r}")
            continue
        if args[0] == "list":
            jobs = doc
    for args in (("status",), ("list",)):
        rc, so, se = cli_raw(config, *args)
        if rc != 0:
            out.append(f"{' '.join(args)}: exit {rc}: {se[-400:]!r}")
            continue
        text = so.decode("utf-8", "surrogateescape")
        bad = _UNPRINTABLE.search(text.replace("\n", ""))
        if bad:
            i = bad.start()
            out.append(f"{' '.join(args)}: raw control/undecodable character {bad.group()!r} in output near "
                       f"{text.replace(chr(10), '')[max(0, i - 60):i + 20]!r}")
        if args == ("list",) and jobs and len(text.splitlines()) != len(jobs):
            out.append(f"list: {len(text.splitlines())} lines for {len(jobs)} jobs (a name broke a line?)")
    return out, jobs
