"""Every filesystem effect on results: temp name → fsync → rename, collision names, originals moved
to archive/failed (link or copy+fsync, then unlink), and recovery of half-done publishes.

A publish is a *plan*: a list of idempotent steps, recorded in the queue (durably) before the first
rename. Running a plan again after a crash at any point finishes it and never duplicates a file, so
start-up recovery is just "run every recorded plan again". No SQL here, no torch.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import stat
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Iterable

import structlog

from . import names, safefs
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


def write_synced(path: Path | str, data: bytes, exclusive: bool = True, dir_fd: int | None = None) -> None:
    """Write `data` to `path` (a new file when `exclusive`; relative to `dir_fd` when given) and
    fsync it; never follows a symlink."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o644, dir_fd=dir_fd)
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


class PlanConflict(PlanBroken):
    """A planned target name was taken by a file that is not ours before anything was placed:
    the plan is dropped and made again with free names (the photo's problem, never a folder's)."""


class Publisher:
    """Knows the configured folders; every write goes below one of them, every path is walked from
    the folder's own descriptor without following links (`safefs`), at the moment of use."""

    def __init__(self, inbox: Path, outbox: Path, failed: Path, archive: Path | None, originals: str = "archive",
                 host: str | None = None):
        self.inbox, self.outbox, self.failed, self.archive = inbox, outbox, failed, archive
        self.originals = originals
        # several hosts share the folders: each writes and cleans only TMP_DIR/<host id>/
        self.tmp_parts = [TMP_DIR, host] if host else [TMP_DIR]
        self.tmp_rel = "/".join(self.tmp_parts)
        self.roots = {"outbox": outbox, "failed": failed, **({"archive": archive} if archive else {})}
        # longest first, so that a root inside another (never allowed by config) could not mislead
        self._all = sorted({"inbox": inbox, **self.roots}.items(), key=lambda kv: -len(str(kv[1])))

    # --- naming -----------------------------------------------------------------------------

    def _below(self, root: Path, rel: str) -> Path:
        """root/rel for a plan (a string, resolved again at the moment of use). Refuses a path that
        escapes root; the symlink checks happen when the path is used."""
        try:
            safefs.parts_of(rel)
        except safefs.UnsafePath as exc:
            raise ValueError(f"{names.display(rel)!r} escapes {root}: {exc.strerror}") from None
        target = Path(os.path.normpath(root / rel)) if rel else root
        if target == root or root not in target.parents:
            raise ValueError(f"{rel!r} escapes {root}")
        return Path(str(root) + "/" + rel)

    def locate(self, path: str | Path) -> tuple[Path, str]:
        """(root, relative path) of a path a plan names; ValueError when it is below no root."""
        s = str(path)
        for _, root in self._all:
            prefix = str(root).rstrip("/") + "/"
            if s.startswith(prefix) and len(s) > len(prefix):
                return root, s[len(prefix):]
        raise ValueError(f"{s!r} is not inside a configured folder")

    @staticmethod
    def _numbered(name: str, n: int) -> str:
        if n == 0:
            return name
        stem, dot, ext = name.rpartition(".")
        return f"{stem} ({n}).{ext}" if dot and stem else f"{name} ({n})"

    @classmethod
    def _free_at(cls, fd: int | None, folder: Path, name: str, companions: Iterable[str],
                 taken: set[Path]) -> tuple[str, bool]:
        """The first of `name`, `stem (1).ext` … (each fitted to NAME_MAX with its companions) whose
        file and companions are free in the folder (fd None: the folder does not exist yet), and
        whether fitting had to shorten it."""
        companions = tuple(companions)
        extra = max((len(os.fsencode(c)) for c in companions), default=0)
        n = 0
        while True:
            numbered = cls._numbered(name, n)
            cand = names.fit(numbered, extra)
            if folder / cand not in taken and (fd is None or (
                    safefs.lstat_at(fd, cand) is None and all(safefs.lstat_at(fd, cand + c) is None for c in companions))):
                return cand, cand != numbered
            n += 1

    @classmethod
    def free_name(cls, folder: Path, name: str, companions: Iterable[str] = (".json",),
                  taken: set[Path] = frozenset()) -> Path:
        """`name`, or `stem (1).ext`, `stem (2).ext` … : the first whose file and companions are free
        (names too long for NAME_MAX with their companions are shortened, see names.fit)."""
        try:
            fd = safefs.open_root(folder)
        except FileNotFoundError:
            fd = None
        try:
            return folder / cls._free_at(fd, folder, name, companions, taken)[0]
        finally:
            if fd is not None:
                os.close(fd)

    def _free_below(self, root: Path, rel_dir: str, name: str, companions: Iterable[str],
                    taken: set[Path], shortened: list | None = None) -> Path:
        folder = root / rel_dir if rel_dir else root
        try:
            fd = safefs.open_dir(root, safefs.parts_of(rel_dir) if rel_dir else [])
        except FileNotFoundError:
            fd = None
        try:
            cand, short = self._free_at(fd, folder, name, companions, taken)
        finally:
            if fd is not None:
                os.close(fd)
        if short and shortened is not None:
            shortened.append(name)
        return folder / cand

    # --- temp files -------------------------------------------------------------------------

    def tmp_dir(self, root: Path) -> Path:
        fd = safefs.open_dir(root, self.tmp_parts, create=True)
        os.close(fd)
        return root / self.tmp_rel

    def write_tmp(self, root: Path, data: bytes, tag: str, folder: str) -> Path:
        name = f"{tag}-{uuid.uuid4().hex[:8]}"
        try:
            fd = safefs.open_dir(root, self.tmp_parts, create=True)
            try:
                safefs.write_new_at(fd, name, data)
                safefs.fsync_fd(fd)
            finally:
                os.close(fd)
            return root / self.tmp_rel / name
        except OSError as exc:
            raise _folder_error(exc, "write a temp file", folder) from exc

    def clean_tmp(self, keep: set[str] = frozenset()) -> int:
        """No temp file survives a restart (except those of plans that could not finish yet, named
        in `keep`). Removes below the hidden temp folders only (this host's own sub-folder when
        several hosts share them), never through a link."""
        n = 0
        for root in self.roots.values():
            try:
                fd = safefs.open_dir(root, self.tmp_parts)
            except OSError:
                continue                 # missing, a link (never followed) or unreadable
            try:
                for entry in os.scandir(fd):
                    if str(root / self.tmp_rel / entry.name) in keep:
                        continue
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            shutil.rmtree(entry.name, dir_fd=fd)
                        else:
                            os.unlink(entry.name, dir_fd=fd)
                        n += 1
                    except OSError as exc:
                        log.warning("publish.tmp_clean_failed", path=str(root / self.tmp_rel / entry.name),
                                    error=exc.strerror)
            finally:
                os.close(fd)
        return n

    def adopt_orphans(self) -> int:
        """After the queue was lost (moved aside as corrupt): a publish cut short between placing
        the result and placing its sidecar left the result in outbox and the sidecar in the temp
        folder. Place each such sidecar whose result is there with the recorded sha256, so the
        rebuild from sidecars recognises the work instead of doing it again."""
        import base64
        n = 0
        try:
            fd = safefs.open_dir(self.outbox, self.tmp_parts)
        except OSError:
            return 0
        try:
            for entry in os.scandir(fd):
                if "-sidecar-" not in entry.name or not entry.is_file(follow_symlinks=False):
                    continue
                try:
                    f, st = safefs.open_read_at(fd, entry.name)
                    try:
                        doc = json.loads(safefs.read_fd(f, 1 << 20)) if st.st_size <= 1 << 20 else None
                    finally:
                        os.close(f)
                    out = (doc or {}).get("outputs", [{}])[0] if isinstance(doc, dict) and doc.get("status") == "done" else {}
                    path = os.fsdecode(base64.urlsafe_b64decode(out["path_b64"])) if "path_b64" in out else out.get("path")
                    if not isinstance(path, str) or not isinstance(out.get("sha256"), str):
                        continue
                    root, rel = self.locate(path)
                    if root != self.outbox or safefs.lstat(root, rel + ".json") is not None:
                        continue
                    data = self._read(Path(path))
                    if hashlib.sha256(data).hexdigest() != out["sha256"]:
                        continue
                    with safefs.dir_of(root, rel + ".json") as (dfd, dname):
                        _link_or_rename_at(fd, entry.name, dfd, dname)
                        safefs.fsync_fd(dfd)
                    n += 1
                    log.warning("publish.orphan_adopted", output=names.display(path), job=doc.get("job"))
                except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError):
                    continue
        finally:
            os.close(fd)
        return n

    def discard(self, plan: dict) -> None:
        """Remove the temp files of a plan that is being dropped (its placed files stay)."""
        for step in plan.get("steps", []):
            if step.get("op") == "place" and step.get("tmp"):
                try:
                    root, rel = self.locate(step["tmp"])
                    with safefs.dir_of(root, rel) as (fd, name):
                        os.unlink(name, dir_fd=fd)
                except (OSError, ValueError):
                    continue

    # --- plans ------------------------------------------------------------------------------

    def companions(self, src: Path) -> list[Path]:
        """`.xmp` sidecars that travel with a photo: IMG_001.xmp and IMG_001.jpg.xmp (any case)."""
        try:
            root, rel = self.locate(src)
        except ValueError:
            return []
        rel_dir, _, name = rel.rpartition("/")
        stem = name.rsplit(".", 1)[0].lower()
        want = (stem + ".xmp", name.lower() + ".xmp")
        out = []
        try:
            fd = safefs.open_dir(root, safefs.parts_of(rel_dir) if rel_dir else [])
        except OSError:
            return out
        try:
            for entry in os.scandir(fd):
                if entry.name.lower() in want and entry.is_file(follow_symlinks=False):
                    out.append(src.parent / entry.name)
        except OSError:
            return out
        finally:
            os.close(fd)
        return sorted(out)

    def _original_steps(self, src: Path, rel: str, size: int, mtime_ns: int, dest_root: Path | None,
                        folder: str, taken: set[Path], job_id: int, companions: Iterable[str] = (),
                        ident: dict | None = None, shortened: list | None = None) -> list[dict]:
        ident = {"size": size, "mtime_ns": mtime_ns, **(ident or {})}
        if dest_root is None:
            return [{"op": "delete", "src": str(src), **ident}]
        self._below(dest_root, rel)
        dst = self._free_below(dest_root, os.path.dirname(rel), src.name, companions, taken, shortened)
        taken.add(dst)
        tmp = dest_root / self.tmp_rel / f"job{job_id}-orig-{uuid.uuid4().hex[:8]}"
        return [{"op": "move", "src": str(src), "dst": str(dst), "tmp": str(tmp), "folder": folder, **ident}]

    def plan_done(self, job_id: int, rel: str, size: int, mtime_ns: int, result: bytes, result_name: str,
                  sidecar: dict, reserved: Iterable[str] = (), ident: dict | None = None,
                  render_sidecar=None, companion_data=None) -> dict:
        """Write the result and sidecar to temp files (fsynced) and return the plan that places them,
        then archives/deletes the original and its companions. `sidecar` gets `outputs[*].path`.
        `reserved`: target paths planned by other unfinished jobs (never given out twice)."""
        src = self._below(self.inbox, rel)
        rel_dir = os.path.dirname(rel)
        self._below(self.outbox, rel)
        taken: set[Path] = {Path(p) for p in reserved}
        shortened: list[str] = []
        final = self._free_below(self.outbox, rel_dir, result_name, (".json", ".xmp"), taken, shortened)
        taken.add(final)
        if shortened:
            sidecar["original_name"] = result_name
        steps: list[dict] = []
        outputs = sidecar.setdefault("outputs", [{}])
        outputs[0]["path"] = str(final)
        comps = self.companions(src)
        result_stem = final.name.rsplit(".", 1)[0]
        extra = []
        for comp in comps:
            dst = self._free_below(self.outbox, rel_dir, result_stem + ".xmp", (), taken)
            taken.add(dst)
            extra.append((comp, dst))
        sidecar["companions"] = [str(d) for _, d in extra]
        render_sidecar = render_sidecar or _json_bytes
        written: list[Path] = []
        try:
            tmp_res = self.write_tmp(self.outbox, result, f"job{job_id}-result", "outbox")
            written.append(tmp_res)
            tmp_side = self.write_tmp(self.outbox, render_sidecar(sidecar), f"job{job_id}-sidecar", "outbox")
            written.append(tmp_side)
            steps.append({"op": "place", "tmp": str(tmp_res), "dst": str(final), "folder": "outbox"})
            for comp, dst in extra:
                try:
                    data = self._read(comp)
                except OSError as exc:
                    log.warning("publish.companion_unreadable", path=names.display(str(comp)), error=exc.strerror)
                    continue
                if companion_data is not None:
                    try:
                        data = companion_data(data)
                    except Exception as exc:      # a malformed .xmp travels unchanged
                        log.warning("publish.companion_not_stamped", path=names.display(str(comp)), error=str(exc))
                tmp = self.write_tmp(self.outbox, data, f"job{job_id}-xmp", "outbox")
                written.append(tmp)
                steps.append({"op": "place", "tmp": str(tmp), "dst": str(dst), "folder": "outbox"})
        except BaseException:
            for t in written:
                self.discard({"steps": [{"op": "place", "tmp": str(t)}]})
            raise
        steps.append({"op": "place", "tmp": str(tmp_side), "dst": str(final) + ".json", "folder": "outbox"})
        dest = self.archive if self.originals == "archive" else None
        steps += self._original_steps(src, rel, size, mtime_ns, dest, "archive", set(), job_id, ident=ident)
        for comp in comps:
            st = self._lstat(comp)
            if st is not None:
                steps += self._original_steps(comp, os.path.join(rel_dir, comp.name), st.st_size, st.st_mtime_ns,
                                              dest, "archive", set(), job_id, ident={"ino": st.st_ino})
        return {"kind": "done", "steps": steps, "outputs": [str(final)], "sidecar": str(final) + ".json"}

    def plan_failed(self, job_id: int, rel: str, size: int, mtime_ns: int, sidecar: dict,
                    reserved: Iterable[str] = (), ident: dict | None = None, render_sidecar=None) -> dict:
        """The original (byte-identical) and its companions to failed/REL, then the sidecar beside it."""
        src = self._below(self.inbox, rel)
        taken: set[Path] = {Path(p) for p in reserved}
        shortened: list[str] = []
        steps = self._original_steps(src, rel, size, mtime_ns, self.failed, "failed", taken, job_id,
                                     companions=(".json",), ident=ident, shortened=shortened)
        final = Path(steps[0]["dst"])
        if shortened:
            sidecar["original_name"] = src.name
        for comp in self.companions(src):
            st = self._lstat(comp)
            if st is not None:
                steps += self._original_steps(comp, os.path.join(os.path.dirname(rel), comp.name), st.st_size,
                                              st.st_mtime_ns, self.failed, "failed", taken, job_id,
                                              companions=(".json",), ident={"ino": st.st_ino})
        sidecar["original"] = str(final)
        tmp_side = self.write_tmp(self.failed, (render_sidecar or _json_bytes)(sidecar), f"job{job_id}-sidecar",
                                  "failed")
        steps.append({"op": "place", "tmp": str(tmp_side), "dst": str(final) + ".json", "folder": "failed"})
        return {"kind": "failed", "steps": steps, "outputs": [str(final)], "sidecar": str(final) + ".json"}

    def _lstat(self, p: Path) -> os.stat_result | None:
        root, rel = self.locate(p)
        return safefs.lstat(root, rel)

    def _read(self, p: Path) -> bytes:
        root, rel = self.locate(p)
        with safefs.dir_of(root, rel) as (fd, name):
            f, st = safefs.open_read_at(fd, name)
            try:
                return safefs.read_fd(f, st.st_size)
            finally:
                os.close(f)

    def restore(self, failed_path: str, rel: str) -> None:
        """`photoenhanced retry`: the original in failed/ back to inbox/rel, its failed sidecar
        removed. Never follows a link (a symlink planted in failed/ is refused), never overwrites."""
        root, frel = self.locate(failed_path)
        if root != self.failed:
            raise ValueError(f"{names.display(failed_path)} is not in failed/")
        with safefs.dir_of(root, frel) as (sfd, sname):
            st = safefs.lstat_at(sfd, sname)
            if st is None:
                raise FileNotFoundError(errno.ENOENT, "not in failed/", failed_path)
            if not stat.S_ISREG(st.st_mode):
                raise safefs.UnsafePath(f"{names.display(failed_path)} is not a regular file (a link is never followed)")
            with safefs.dir_of(self.inbox, rel, create=True) as (dfd, dname):
                if safefs.lstat_at(dfd, dname) is not None:
                    raise FileExistsError(errno.EEXIST, "taken by another file", str(self.inbox / rel))
                try:
                    os.link(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
                except OSError as exc:
                    if exc.errno not in _NO_LINK:
                        raise
                    tmp = f".photoenhanced-retry-{uuid.uuid4().hex[:8]}"    # hidden: never a candidate
                    _copy_durable_at(sfd, sname, st, dfd, tmp)
                    _link_or_rename_at(dfd, tmp, dfd, dname)
                safefs.fsync_fd(dfd)
            _unlink_at(sfd, sname, st)
            side = safefs.lstat_at(sfd, sname + ".json")
            if side is not None and stat.S_ISREG(side.st_mode):
                _unlink_at(sfd, sname + ".json", side)

    # --- running a plan (idempotent) ----------------------------------------------------------

    def execute(self, plan: dict, before_step=None) -> None:
        """Run the plan's steps in order. `before_step(step)`, when given, is called before each
        step and may raise to stop before it (a host that lost its lease: watcher.errors.LeaseLost)."""
        self._preflight(plan)
        first = True
        missing = None                       # a failed photo's original, gone before it was moved
        for step in plan["steps"]:
            if before_step is not None:
                before_step(step)
            try:
                if step["op"] == "place":
                    if missing is not None and step["dst"] == plan.get("sidecar"):
                        self._note_missing(step, missing)
                    self._place(step, first)
                elif step["op"] == "move":
                    if not self._move(step) and plan.get("kind") == "failed" and step is plan["steps"][0]:
                        missing = step["src"]
                elif step["op"] == "delete":
                    self._delete(step)
                else:
                    raise ValueError(f"unknown publish step {step['op']!r}")
            except safefs.UnsafePath as exc:
                raise FolderError(f"{step.get('folder', 'inbox')}: {names.display(str(exc.strerror))}; "
                                  "a symlink below a folder is never followed — remove it",
                                  step.get("folder", "inbox"), unsafe=True) from exc
            except PlanBroken:
                raise
            except OSError as exc:
                if exc.errno == errno.EEXIST:
                    raise PlanConflict(f"{names.display(str(exc.filename or ''))} was taken by another file "
                                       "while publishing") from exc
                if exc.errno == errno.ENAMETOOLONG:
                    raise PlanConflict(f"a name is too long: {names.display(str(exc.filename or ''))}") from exc
                raise _folder_error(exc, f"{step['op']} {names.display(str(step.get('dst') or step.get('src')))}",
                                    step.get("folder", "inbox")) from exc
            first = False

    def _preflight(self, plan: dict) -> None:
        """Before the first placement: every target still free (or already ours)? A foreign file
        at a planned name makes the plan a PlanConflict before anything moved."""
        for step in plan["steps"]:
            if step["op"] != "place":
                continue
            try:
                root, rel = self.locate(step["dst"])
                dst = safefs.lstat(root, rel)
                if dst is None:
                    continue
                troot, trel = self.locate(step["tmp"])
                tmp = safefs.lstat(troot, trel)
            except (OSError, ValueError):
                return                      # let the steps themselves report it
            if tmp is not None and not safefs.same_file(tmp, dst):
                raise PlanConflict(f"{names.display(step['dst'])} is taken by another file")

    def _place(self, step: dict, first: bool) -> None:
        troot, trel = self.locate(step["tmp"])
        droot, drel = self.locate(step["dst"])
        with safefs.dir_of(troot, trel) as (tfd, tname):
            tst = safefs.lstat_at(tfd, tname)
            with safefs.dir_of(droot, drel, create=True) as (dfd, dname):
                if tst is None:
                    if safefs.lstat_at(dfd, dname) is not None:
                        return                      # done before the crash
                    if first:
                        raise PlanBroken(f"temp file {names.display(step['tmp'])} is gone")
                    raise PlanBroken(f"neither {names.display(step['tmp'])} nor {names.display(step['dst'])} exists")
                _link_or_rename_at(tfd, tname, dfd, dname)
                safefs.fsync_fd(dfd)

    def _move(self, step: dict) -> bool:
        """Move an original (link, or durable copy, then unlink). False: it was gone (or
        unreachable behind a link) and nothing was moved; the plan goes on without it."""
        sroot, srel = self.locate(step["src"])
        droot, drel = self.locate(step["dst"])
        troot, trel = self.locate(step["tmp"])
        with ExitStack() as stack:
            sfd = sname = st = None
            try:
                sfd, sname = stack.enter_context(safefs.dir_of(sroot, srel))
                st = safefs.lstat_at(sfd, sname)
            except FileNotFoundError:
                st = None                              # its folder is gone: the original is gone
            except safefs.UnsafePath as exc:
                log.warning("publish.original_unreachable", path=names.display(step["src"]), reason=exc.strerror)
            same = st is not None and stat.S_ISREG(st.st_mode) and _ours(st, step)
            dfd, dname = stack.enter_context(safefs.dir_of(droot, drel, create=True))
            tfd, tname = stack.enter_context(safefs.dir_of(troot, trel, create=True))
            dst_st = safefs.lstat_at(dfd, dname)
            if dst_st is not None:
                if not (stat.S_ISREG(dst_st.st_mode) and _ours(dst_st, step, ino=False)):
                    raise OSError(errno.EEXIST, "a different file took the planned name", step["dst"])
                if same:
                    _unlink_at(sfd, sname, st)
                _unlink_quiet_at(tfd, tname)
                return True
            if not same:
                tst = safefs.lstat_at(tfd, tname)
                if tst is not None and tst.st_size == step["size"]:
                    _link_or_rename_at(tfd, tname, dfd, dname)   # the copy was complete and fsynced
                    safefs.fsync_fd(dfd)
                    return True
                log.warning("publish.original_gone", path=names.display(step["src"]))
                return False
            try:
                os.link(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in _NO_LINK:
                    raise
                _copy_durable_at(sfd, sname, st, tfd, tname)
                _link_or_rename_at(tfd, tname, dfd, dname)
            safefs.fsync_fd(dfd)
            _unlink_at(sfd, sname, st)
            return True

    def _note_missing(self, step: dict, src: str) -> None:
        """A failed photo whose original was gone when it was to be moved into failed/: its
        sidecar (still in the temp folder) says so, rather than pointing at a file that is not
        there. Idempotent: a plan run again after a crash writes the same note."""
        troot, trel = self.locate(step["tmp"])
        with safefs.dir_of(troot, trel) as (fd, name):
            try:
                f, st = safefs.open_read_at(fd, name)
            except FileNotFoundError:
                return                                    # placed already
            try:
                doc = json.loads(safefs.read_fd(f, st.st_size))
            finally:
                os.close(f)
            if "original_missing" in doc:
                return
            doc["original_missing"] = (f"the original was no longer at {names.display(src)} when the photo "
                                       "failed (removed, or its folder replaced by a link): failed/ holds only "
                                       "this sidecar")
            write_synced(name, _json_bytes(doc), exclusive=False, dir_fd=fd)

    def _delete(self, step: dict) -> None:
        root, rel = self.locate(step["src"])
        try:
            with safefs.dir_of(root, rel) as (fd, name):
                st = safefs.lstat_at(fd, name)
                if st is not None and stat.S_ISREG(st.st_mode) and _ours(st, step):
                    _unlink_at(fd, name, st)
        except FileNotFoundError:
            return
        except safefs.UnsafePath as exc:
            log.warning("publish.original_unreachable", path=names.display(step["src"]), reason=exc.strerror)


def _ours(st: os.stat_result, step: dict, ino: bool = True) -> bool:
    """The file the plan was made for: same size and mtime (and inode, when the plan knows it)."""
    if (st.st_size, st.st_mtime_ns) != (step["size"], step["mtime_ns"]):
        return False
    return not ino or "ino" not in step or st.st_ino == step["ino"]


def _json_bytes(doc: dict) -> bytes:
    return (json.dumps(doc, indent=2) + "\n").encode()


# --- small file helpers (all on folder descriptors) -----------------------------------------------

def _unlink_at(fd: int, name: str, st: os.stat_result) -> None:
    """Unlink `name` only while it is still the file `st` describes (never a file swapped in)."""
    cur = safefs.lstat_at(fd, name)
    if cur is None or not safefs.same_file(cur, st):
        return
    os.unlink(name, dir_fd=fd)
    safefs.fsync_fd(fd)


def _unlink_quiet_at(fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=fd)
    except FileNotFoundError:
        return                      # already gone: what we wanted
    except OSError as exc:
        log.warning("publish.unlink_failed", path=names.display(name), error=exc.strerror)


def _link_or_rename_at(tfd: int, tname: str, dfd: int, dname: str) -> None:
    """Move tmp to dst without ever overwriting dst (link+unlink; rename where links don't exist)."""
    try:
        os.link(tname, dname, src_dir_fd=tfd, dst_dir_fd=dfd, follow_symlinks=False)
    except FileExistsError:
        a, b = safefs.lstat_at(tfd, tname), safefs.lstat_at(dfd, dname)
        if a is not None and b is not None and safefs.same_file(a, b):   # linked before a crash
            os.unlink(tname, dir_fd=tfd)
            return
        raise OSError(errno.EEXIST, "target appeared while publishing", dname) from None
    except OSError as exc:
        if exc.errno not in _NO_LINK:
            raise
        if safefs.lstat_at(dfd, dname) is not None:
            raise OSError(errno.EEXIST, "target appeared while publishing", dname) from None
        os.rename(tname, dname, src_dir_fd=tfd, dst_dir_fd=dfd)
        return
    os.unlink(tname, dir_fd=tfd)


def _copy_durable_at(sfd: int, sname: str, st: os.stat_result, tfd: int, tname: str) -> None:
    """Copy the original (still the file `st` describes) to a temp name, fsynced, mtime kept."""
    f_in, got = safefs.open_read_at(sfd, sname)
    try:
        if not safefs.same_file(got, st):
            raise OSError(errno.ESTALE, "the original changed while it was being moved", sname)
        with contextlib.suppress(FileNotFoundError):   # a partial copy from before a crash
            os.unlink(tname, dir_fd=tfd)
        f_out = os.open(tname, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                        dir_fd=tfd)
        try:
            while True:
                b = os.read(f_in, 1 << 20)
                if not b:
                    break
                view = memoryview(b)
                while view:
                    view = view[os.write(f_out, view):]
            os.fsync(f_out)
            os.utime(f_out, ns=(got.st_atime_ns, got.st_mtime_ns))
        finally:
            os.close(f_out)
    finally:
        os.close(f_in)
    safefs.fsync_fd(tfd)
