"""Every filesystem effect on results: temp name → fsync → rename, collision names, originals moved
to archive/failed (link or copy+fsync, then unlink), and recovery of half-done publishes.

A publish is a *plan*: a list of idempotent steps, recorded in the queue (durably) before the first
rename. Running a plan again after a crash at any point finishes it and never duplicates a file, so
start-up recovery is just "run every recorded plan again". No SQL here, no torch.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterable

import structlog

from .errors import FolderError

log = structlog.get_logger(__name__)

TMP_DIR = ".photoenhanced-tmp"
_FOLDER_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.ENOTDIR,
                  errno.ENOENT, errno.EIO, errno.ESTALE, errno.ENOTCONN, errno.EHOSTDOWN}
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS, errno.EACCES}


class PlanBroken(Exception):
    """A plan can no longer be completed (its temp files are gone before any rename): drop it."""


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def write_synced(path: Path, data: bytes, exclusive: bool = True) -> None:
    """Write `data` to `path` (a new file when `exclusive`) and fsync it; never follows a symlink."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` atomically: a hidden temp file beside it, fsync, rename over, fsync the folder."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write_synced(tmp, data, exclusive=False)
    try:
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _folder_error(exc: OSError, what: str, folder: str) -> FolderError:
    reason = {errno.ENOSPC: "disk full", errno.EDQUOT: "quota exceeded", errno.EROFS: "read-only",
              errno.EACCES: "permission denied", errno.EPERM: "permission denied"}.get(exc.errno, exc.strerror)
    return FolderError(f"{folder} {reason}: cannot {what} ({exc.filename or ''})", folder)


class Publisher:
    """Knows the configured folders; every write goes below one of them."""

    def __init__(self, inbox: Path, outbox: Path, failed: Path, archive: Path | None, originals: str = "archive"):
        self.inbox, self.outbox, self.failed, self.archive = inbox, outbox, failed, archive
        self.originals = originals
        self.roots = {"outbox": outbox, "failed": failed, **({"archive": archive} if archive else {})}

    # --- naming -----------------------------------------------------------------------------

    def _below(self, root: Path, rel: str) -> Path:
        """root/rel, refusing a path that escapes root or runs through a symlinked folder (the
        inbox is untrusted: a link to elsewhere must never make us move files from there)."""
        target = Path(os.path.normpath(root / rel))
        if target == root or root not in target.parents:
            raise ValueError(f"{rel!r} escapes {root}")
        cur = root
        for part in target.relative_to(root).parent.parts:
            cur = cur / part
            if os.path.islink(cur):
                raise ValueError(f"{rel!r} runs through a symlink ({cur})")
        return target

    @staticmethod
    def free_name(folder: Path, name: str, companions: Iterable[str] = (".json",),
                  taken: set[Path] = frozenset()) -> Path:
        """`name`, or `stem (1).ext`, `stem (2).ext` … : the first whose file and companions are free."""
        stem, dot, ext = name.rpartition(".")
        if not dot:
            stem, ext = name, ""
        n = 0
        while True:
            cand = name if n == 0 else (f"{stem} ({n}).{ext}" if ext else f"{stem} ({n})")
            p = folder / cand
            if p not in taken and not os.path.lexists(p) and not any(
                    os.path.lexists(folder / (cand + c)) for c in companions):
                return p
            n += 1

    # --- temp files -------------------------------------------------------------------------

    def tmp_dir(self, root: Path) -> Path:
        d = root / TMP_DIR
        d.mkdir(exist_ok=True)
        return d

    def write_tmp(self, root: Path, data: bytes, tag: str, folder: str) -> Path:
        try:
            tmp = self.tmp_dir(root) / f"{tag}-{uuid.uuid4().hex[:8]}"
            write_synced(tmp, data)
            fsync_dir(tmp.parent)
            return tmp
        except OSError as exc:
            if "tmp" in locals():
                _unlink_quiet(tmp)
            raise _folder_error(exc, "write a temp file", folder) from exc

    def clean_tmp(self, keep: set[str] = frozenset()) -> int:
        """Start-up, after recovery: no temp file survives a restart (except those of plans that
        could not finish yet, named in `keep`)."""
        n = 0
        for root in self.roots.values():
            d = root / TMP_DIR
            if not d.is_dir() or d.is_symlink():
                continue
            for entry in os.scandir(d):
                if entry.path in keep:
                    continue
                try:
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path)
                    else:
                        os.unlink(entry.path)
                    n += 1
                except OSError as exc:
                    log.warning("publish.tmp_clean_failed", path=entry.path, error=exc.strerror)
        return n

    # --- plans ------------------------------------------------------------------------------

    def companions(self, src: Path) -> list[Path]:
        """`.xmp` sidecars that travel with a photo: IMG_001.xmp and IMG_001.jpg.xmp (any case)."""
        out = []
        try:
            names = {e.name: e for e in os.scandir(src.parent)}
        except OSError:
            return out
        stem = src.name.rsplit(".", 1)[0]
        for name, entry in names.items():
            low = name.lower()
            if low in (stem.lower() + ".xmp", src.name.lower() + ".xmp") and entry.is_file(follow_symlinks=False):
                out.append(Path(entry.path))
        return sorted(out)

    def _original_steps(self, src: Path, rel: str, size: int, mtime_ns: int, dest_root: Path | None,
                        folder: str, taken: set[Path], job_id: int) -> list[dict]:
        ident = {"size": size, "mtime_ns": mtime_ns}
        if dest_root is None:
            return [{"op": "delete", "src": str(src), **ident}]
        dst = self.free_name(self._below(dest_root, rel).parent, src.name, (), taken)
        taken.add(dst)
        tmp = dest_root / TMP_DIR / f"job{job_id}-orig-{uuid.uuid4().hex[:8]}"
        return [{"op": "move", "src": str(src), "dst": str(dst), "tmp": str(tmp), "folder": folder, **ident}]

    def plan_done(self, job_id: int, rel: str, size: int, mtime_ns: int, result: bytes, result_name: str,
                  sidecar: dict) -> dict:
        """Write the result and sidecar to temp files (fsynced) and return the plan that places them,
        then archives/deletes the original and its companions. `sidecar` gets `outputs[*].path`."""
        src = self._below(self.inbox, rel)
        rel_dir = os.path.dirname(rel)
        out_dir = self._below(self.outbox, os.path.join(rel_dir, "x")).parent
        taken: set[Path] = set()
        final = self.free_name(out_dir, result_name, (".json",), taken)
        taken.add(final)
        steps: list[dict] = []
        outputs = sidecar.setdefault("outputs", [{}])
        outputs[0]["path"] = str(final)
        comps = self.companions(src)
        result_stem = final.name.rsplit(".", 1)[0]
        extra = []
        for comp in comps:
            dst = self.free_name(out_dir, result_stem + ".xmp", (), taken)
            taken.add(dst)
            extra.append((comp, dst))
        sidecar["companions"] = [str(d) for _, d in extra]
        written: list[Path] = []
        try:
            tmp_res = self.write_tmp(self.outbox, result, f"job{job_id}-result", "outbox")
            written.append(tmp_res)
            body = (json.dumps(sidecar, indent=2, sort_keys=False) + "\n").encode()
            tmp_side = self.write_tmp(self.outbox, body, f"job{job_id}-sidecar", "outbox")
            written.append(tmp_side)
            steps.append({"op": "place", "tmp": str(tmp_res), "dst": str(final), "folder": "outbox"})
            for comp, dst in extra:
                try:
                    data = _read_nofollow(comp)
                except OSError as exc:
                    log.warning("publish.companion_unreadable", path=str(comp), error=exc.strerror)
                    continue
                tmp = self.write_tmp(self.outbox, data, f"job{job_id}-xmp", "outbox")
                written.append(tmp)
                steps.append({"op": "place", "tmp": str(tmp), "dst": str(dst), "folder": "outbox"})
        except BaseException:
            for t in written:
                _unlink_quiet(t)
            raise
        steps.append({"op": "place", "tmp": str(tmp_side), "dst": str(final) + ".json", "folder": "outbox"})
        dest = self.archive if self.originals == "archive" else None
        steps += self._original_steps(src, rel, size, mtime_ns, dest, "archive", set(), job_id)
        for comp in comps:
            st = _lstat(comp)
            if st is not None:
                steps += self._original_steps(comp, os.path.join(rel_dir, comp.name), st.st_size, st.st_mtime_ns,
                                              dest, "archive", set(), job_id)
        return {"kind": "done", "steps": steps, "outputs": [str(final)], "sidecar": str(final) + ".json"}

    def plan_failed(self, job_id: int, rel: str, size: int, mtime_ns: int, sidecar: dict) -> dict:
        """The original (byte-identical) and its companions to failed/REL, then the sidecar beside it."""
        src = self._below(self.inbox, rel)
        taken: set[Path] = set()
        steps = self._original_steps(src, rel, size, mtime_ns, self.failed, "failed", taken, job_id)
        final = Path(steps[0]["dst"])
        for comp in self.companions(src):
            st = _lstat(comp)
            if st is not None:
                steps += self._original_steps(comp, os.path.join(os.path.dirname(rel), comp.name), st.st_size,
                                              st.st_mtime_ns, self.failed, "failed", taken, job_id)
        sidecar["original"] = str(final)
        body = (json.dumps(sidecar, indent=2) + "\n").encode()
        tmp_side = self.write_tmp(self.failed, body, f"job{job_id}-sidecar", "failed")
        steps.append({"op": "place", "tmp": str(tmp_side), "dst": str(final) + ".json", "folder": "failed"})
        return {"kind": "failed", "steps": steps, "outputs": [str(final)], "sidecar": str(final) + ".json"}

    # --- running a plan (idempotent) ----------------------------------------------------------

    def execute(self, plan: dict) -> None:
        first = True
        for step in plan["steps"]:
            try:
                if step["op"] == "place":
                    self._place(Path(step["tmp"]), Path(step["dst"]), first)
                elif step["op"] == "move":
                    self._move(step)
                elif step["op"] == "delete":
                    self._delete(step)
                else:
                    raise ValueError(f"unknown publish step {step['op']!r}")
            except OSError as exc:
                raise _folder_error(exc, f"{step['op']} {step.get('dst') or step.get('src')}",
                                    step.get("folder", "inbox")) from exc
            first = False

    def _place(self, tmp: Path, dst: Path, first: bool) -> None:
        if not os.path.lexists(tmp):
            if os.path.lexists(dst):
                return                      # done before the crash
            if first:
                raise PlanBroken(f"temp file {tmp} is gone")
            raise PlanBroken(f"neither {tmp} nor {dst} exists")
        dst.parent.mkdir(parents=True, exist_ok=True)
        _link_or_rename(tmp, dst)
        fsync_dir(dst.parent)

    def _move(self, step: dict) -> None:
        src, dst, tmp = Path(step["src"]), Path(step["dst"]), Path(step["tmp"])
        st = _lstat(src)
        same = st is not None and st.st_size == step["size"] and st.st_mtime_ns == step["mtime_ns"]
        if os.path.lexists(dst):
            dst_st = os.lstat(dst)
            ours = (dst_st.st_size, dst_st.st_mtime_ns) == (step["size"], step["mtime_ns"])
            if not ours:
                raise OSError(errno.EEXIST, "a different file took the planned name", str(dst))
            if same:
                _unlink(src)
            _unlink_quiet(tmp)
            return
        if not same:
            if os.path.lexists(tmp) and _lstat(tmp).st_size == step["size"]:
                dst.parent.mkdir(parents=True, exist_ok=True)
                _link_or_rename(tmp, dst)       # the copy was complete and fsynced before the crash
                fsync_dir(dst.parent)
            else:
                log.warning("publish.original_gone", path=str(src))
            return
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in _NO_LINK:
                raise
            _copy_durable(src, tmp)
            _link_or_rename(tmp, dst)
        fsync_dir(dst.parent)
        _unlink(src)

    def _delete(self, step: dict) -> None:
        src = Path(step["src"])
        st = _lstat(src)
        if st is not None and st.st_size == step["size"] and st.st_mtime_ns == step["mtime_ns"]:
            _unlink(src)


# --- small file helpers ------------------------------------------------------------------------

def _lstat(p: Path) -> os.stat_result | None:
    try:
        return os.lstat(p)
    except FileNotFoundError:
        return None


def _unlink(p: Path) -> None:
    try:
        os.unlink(p)
    except FileNotFoundError:
        return
    fsync_dir(p.parent)


def _unlink_quiet(p: Path) -> None:
    try:
        os.unlink(p)
    except FileNotFoundError:
        return                      # already gone: what we wanted
    except OSError as exc:
        log.warning("publish.unlink_failed", path=str(p), error=exc.strerror)


def _read_nofollow(p: Path) -> bytes:
    fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _link_or_rename(tmp: Path, dst: Path) -> None:
    """Move tmp to dst without ever overwriting dst (link+unlink; rename where links don't exist)."""
    try:
        os.link(tmp, dst, follow_symlinks=False)
    except FileExistsError:
        if os.path.samefile(tmp, dst):      # linked before a crash, not yet unlinked
            os.unlink(tmp)
            return
        raise OSError(errno.EEXIST, "target appeared while publishing", str(dst)) from None
    except OSError as exc:
        if exc.errno not in _NO_LINK:
            raise
        if os.path.lexists(dst):
            raise OSError(errno.EEXIST, "target appeared while publishing", str(dst)) from None
        os.rename(tmp, dst)
        return
    os.unlink(tmp)


def _copy_durable(src: Path, tmp: Path) -> None:
    tmp.parent.mkdir(exist_ok=True)
    fd_in = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        fd_out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd_out, "wb") as out, os.fdopen(os.dup(fd_in), "rb") as inp:
            shutil.copyfileobj(inp, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        st = os.fstat(fd_in)
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    finally:
        os.close(fd_in)
    fsync_dir(tmp.parent)
