"""`photoenhanced web`: the operator's page, a JSON API, /metrics and /healthz — a separate process
from the daemon, so that a fault here never stops enhancement.

A plain WSGI application served by waitress (pure Python, threaded, no dependencies, no event
loop: it fits this threaded codebase; the page is static HTML/CSS/JS from `web_static/`, with no
build step). It reads the queue through read-only SQLite connections (WAL: never blocks the
daemon) and the folders through `safefs` (no link followed). State changes (retry, pause, resume,
enqueue-now) go through `watcher.control` and the queue's API exactly as the CLI verbs do; the daemon carries
them out.

Security: loopback by default (another address needs TLS — `web.tls_cert` + `web.tls_key` — or
`web.insecure_remote: true`); requests whose Host is not the listen address are refused (DNS
rebinding). Plain HTTP is served by waitress; HTTPS by cheroot (threaded WSGI server with the
standard library's ssl; TLS 1.2 at least; the session cookie is then `Secure`). cheroot does the
TLS handshake on its accepting thread, bounded by TLS_TIMEOUT_S: a client that stalls a handshake
delays new connections by at most that long. GET never changes anything. A POST
needs the token from `state_dir/web.token` — as `Authorization: Bearer TOKEN`, or the HttpOnly
SameSite=Strict cookie the page gets for `?token=TOKEN` — plus an `X-CSRF-Token` header (for the
cookie: equal to the `pe_csrf` cookie; for Bearer: any non-empty value). Missing or wrong
credentials → 401, a missing CSRF header → 403, too many wrong tokens from one address → 429.
Images are only served by job id as re-encoded thumbnails/previews/crops made here into a bounded
LRU cache in `state_dir/web-cache/`; never a path in a URL. The raw files are offered for download
by job id only (`/jobs/{id}/files/result|sidecar|original`): the result in outbox/, its sidecar, the
original only from failed/ or archive/ (never from the inbox), each opened through safefs (no link
followed) and checked against what the queue recorded (size and sha256) before a byte is sent.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import io
import json
import os
import re
import secrets
import signal
import sqlite3
import ssl
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import parse_qs, quote

import structlog

from . import control, names, safefs
from .config import Config, is_loopback, split_listen
from .errors import InvalidTransition, QueueCorrupt, StateUnavailable, UnknownJob
from .queue import STATES, Job, Queue

log = structlog.get_logger(__name__)

EX_OK, EX_RUNTIME, EX_USAGE, EX_CONFIG = 0, 1, 2, 78
STATIC = Path(__file__).with_name("web_static")
TOKEN_FILE = "web.token"
CACHE_DIR = "web-cache"
CACHE_BYTES = 256 << 20          # the preview cache's bound (LRU by mtime, touched on each hit)
THUMB_PX, PREVIEW_PX, CROP_PX = 320, 1600, 512
SOURCE_MAX_BYTES = 512 << 20     # a file larger than this gets no preview
FRESH_S = 15.0                   # /healthz: the daemon's status row is at most this old
MAX_BODY = 16 << 10              # request bodies (POSTs carry none that matter)
MAX_HEADERS = 32 << 10
AUTH_WINDOW_S, AUTH_MAX_FAILS = 60.0, 10
JOBS_MAX_LIMIT = 500
ENQUEUE_MAX = 50                 # paths (and again paths_b64) in one POST /api/enqueue
ENQUEUE_OK = ("queued", "active", "busy")     # intake outcomes that mean "it is (or will be) queued"
MAX_ID = 2 ** 63 - 1
THREADS = 6
TLS_TIMEOUT_S = 10               # cheroot: socket timeout, the TLS handshake included
CHUNK = 256 << 10                # downloads are streamed in chunks of this size
SIDECAR_MAX = 2 << 20
FILE_KINDS = ("result", "sidecar", "original")
_STATIC_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_CTYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
           ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png",
           ".ico": "image/x-icon"}
_SEC_HEADERS = [
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
    ("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self';"
     " connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
]


# --- the token ---------------------------------------------------------------------------------

def load_token(state_dir: Path) -> str:
    """The token in state_dir/web.token, created (0600, 32 random bytes, URL-safe) when missing."""
    path = Path(state_dir) / TOKEN_FILE
    state_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if st.st_mode & 0o077:
                os.fchmod(fd, 0o600)
                log.warning("web.token_mode_fixed", path=str(path), was=oct(st.st_mode & 0o777))
            token = os.read(fd, 4096).decode("ascii", "replace").strip()
        finally:
            os.close(fd)
        if len(token) >= 16:
            return token
        raise ValueError(f"{path} holds no usable token (at least 16 characters); delete it to make a new one")
    token = secrets.token_urlsafe(32)
    try:
        os.write(fd, (token + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    log.info("web.token_created", path=str(path))
    return token


# --- TLS ---------------------------------------------------------------------------------------

class TLSProblem(ValueError):
    """web.tls_cert / web.tls_key cannot serve HTTPS; `key` names the config key at fault."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


def _read_pem(path: Path, key: str) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise TLSProblem(key, f"{path}: cannot read it: {exc.strerror}") from None
    try:
        if not (os.fstat(fd).st_mode & 0o170000 == 0o100000):
            raise TLSProblem(key, f"{path}: not a regular file")
        return safefs.read_fd(fd, 1 << 20).decode("ascii", "replace")
    finally:
        os.close(fd)


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context (TLS 1.2 at least) for the PEM certificate chain and its PEM key; raises
    TLSProblem naming the key at fault: unreadable, not PEM, an encrypted key, or a key that does
    not match the certificate."""
    cert_pem, key_pem = _read_pem(cert, "web.tls_cert"), _read_pem(key, "web.tls_key")
    if "-----BEGIN CERTIFICATE-----" not in cert_pem:
        raise TLSProblem("web.tls_cert", f"{cert}: no PEM certificate in it (-----BEGIN CERTIFICATE-----)")
    if not re.search(r"-----BEGIN [A-Z ]*PRIVATE KEY-----", key_pem):
        raise TLSProblem("web.tls_key", f"{key}: no PEM private key in it (-----BEGIN … PRIVATE KEY-----)")
    asked = []

    def password() -> bytes:
        asked.append(1)
        return b""

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert), str(key), password=password)
    except ssl.SSLError as exc:
        text = f"{exc.reason or ''} {exc}".upper()
        if "KEY_VALUES_MISMATCH" in text:
            raise TLSProblem("web.tls_key", f"{key} does not match the certificate in {cert}") from None
        if asked or "ENCRYPTED" in key_pem.upper():
            raise TLSProblem("web.tls_key", f"{key} is encrypted: give an unencrypted key (readable only by"
                             " the web process's user)") from None
        raise TLSProblem("web.tls_cert", f"{cert} and {key} do not load: {exc.reason or exc}") from None
    except OSError as exc:
        raise TLSProblem("web.tls_cert", f"{cert}: {exc.strerror or exc}") from None
    return ctx


def tls_problem(cfg: Config) -> str | None:
    """check-config's check: None when TLS is off or its files load, else 'web.tls_…: why'."""
    if cfg.web.tls_cert is None or cfg.web.tls_key is None:
        return None
    try:
        tls_context(cfg.web.tls_cert, cfg.web.tls_key)
    except TLSProblem as exc:
        return str(exc)
    return None


# --- a file sent in chunks -------------------------------------------------------------------------

class FileBody:
    """Exactly `length` bytes of an open regular file, read in CHUNK pieces as the server sends
    them (never the whole file in memory); the descriptor is closed by close() (WSGI) or at the end."""

    def __init__(self, fd: int, length: int):
        self.fd, self.length = fd, length

    def __iter__(self):
        pos = 0
        try:
            while pos < self.length:
                b = os.pread(self.fd, min(CHUNK, self.length - pos), pos)
                if not b:                      # shrank meanwhile: the server drops the connection
                    break
                pos += len(b)
                yield b
        finally:
            self.close()

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


def content_disposition(name: str) -> str:
    """`attachment` with the name as RFC 6266/5987 `filename*` (UTF-8 of its escaped display form,
    percent-encoded: never a raw byte, newline or quote in the header) and a plain ASCII fallback."""
    shown = names.display(name) or "download"
    plain = "".join(c if " " <= c <= "~" and c not in '"\\%;' else "_" for c in shown)
    return f"attachment; filename=\"{plain}\"; filename*=UTF-8''{quote(shown.encode('utf-8'), safe='')}"


# --- the preview cache ---------------------------------------------------------------------------

class PreviewCache:
    """Re-encoded JPEGs by key in one folder, at most `limit` bytes: a hit touches the file's mtime,
    an insert past the limit removes the least recently used files. Thread-safe; files are written
    to a temp name and renamed, so a reader never sees half a file."""

    def __init__(self, folder: Path, limit: int = CACHE_BYTES):
        self.folder, self.limit = folder, limit
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._sizes: dict[str, int] = {}
        for p in folder.iterdir():
            if p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)
            elif p.is_file():
                self._sizes[p.name] = p.stat().st_size
        self.hits = self.misses = 0

    @property
    def total(self) -> int:
        return sum(self._sizes.values())

    def get(self, key: str, make: Callable[[], bytes]) -> bytes:
        name = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:40] + ".jpg"
        path = self.folder / name
        try:
            data = path.read_bytes()
            os.utime(path)
            self.hits += 1
            return data
        except FileNotFoundError:
            pass
        self.misses += 1
        data = make()
        tmp = self.folder / f"{name}.{threading.get_ident()}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, path)
        with self._lock:
            self._sizes[name] = len(data)
            if self.total > self.limit:
                self._evict(keep=name)
        return data

    def _evict(self, keep: str) -> None:
        aged = []
        for n in list(self._sizes):
            try:
                aged.append((os.stat(self.folder / n).st_mtime_ns, n))
            except FileNotFoundError:
                self._sizes.pop(n, None)
        aged.sort()
        target = self.limit * 0.9
        for _, n in aged:
            if self.total <= target:
                break
            if n == keep:
                continue
            (self.folder / n).unlink(missing_ok=True)
            self._sizes.pop(n, None)


# --- images of a job -----------------------------------------------------------------------------

class NoImage(Exception):
    """No image to show for this job and side (deleted original, not done yet, undecodable …)."""


def _heif() -> None:
    try:
        import pillow_heif
        pillow_heif.register_heif_opener()
    except Exception:              # optional: HEIC previews then say "no preview"
        pass


class Images:
    """Finds a job's original ("before") and result ("after") below the configured folders and
    renders bounded JPEGs of them. Every file is opened through safefs (no link followed, only
    regular files, only below inbox/outbox/failed/archive)."""

    def __init__(self, cfg: Config, cache: PreviewCache):
        self.cfg = cfg
        self.pub = control.publisher(cfg)
        self.cache = cache
        self.max_pixels = int(max(cfg.enhance.max_input_megapixels, cfg.enhance.max_output_megapixels) * 1e6)
        self._sem = threading.Semaphore(2)      # at most two full decodes at once (memory)
        self._hashed: dict[tuple, str] = {}     # (dev, ino, size, mtime_ns, ctime_ns) → sha256 seen
        self._hashed_lock = threading.Lock()
        _heif()

    def source(self, job: Job, which: str) -> tuple[Path, str, os.stat_result] | None:
        """(root, relative path, lstat) of the file that shows `which` side of `job`, or None."""
        f = self.cfg.folders
        cands: list[tuple[Path, str]] = []
        if which == "after":
            if job.state == "done" and job.outputs and isinstance(job.outputs[0].get("path"), str):
                cands.append(self._locate(job.outputs[0]["path"]))
        elif job.state == "failed":
            if job.outputs and isinstance(job.outputs[0].get("path"), str):
                cands.append(self._locate(job.outputs[0]["path"]))
        elif job.state in ("pending", "running"):
            cands.append((f.inbox, job.rel_path))
        elif job.state == "done" and f.archive is not None and self.cfg.jobs.originals == "archive":
            # the archive path is not recorded: the original's name, or a numbered one of its size
            d, _, base = job.rel_path.rpartition("/")
            stem, dot, ext = base.rpartition(".")
            for n in range(0, 10):        # publish's collision names: "NAME (n).EXT"
                name = base if n == 0 else (f"{stem} ({n}).{ext}" if dot and stem else f"{base} ({n})")
                cands.append((f.archive, f"{d}/{name}" if d else name))
        for root, rel in cands:
            if root is None:
                continue
            try:
                st = safefs.lstat(root, rel)
            except (OSError, ValueError):
                continue
            if st is None or not (st.st_mode & 0o170000 == 0o100000):
                continue
            if which == "before" and job.state == "done" and st.st_size != job.size:
                continue
            return root, rel, st
        return None

    def _locate(self, path: str) -> tuple[Path | None, str]:
        try:
            return self.pub.locate(path)
        except ValueError:
            return None, ""

    def _read(self, root: Path, rel: str) -> bytes:
        with safefs.dir_of(root, rel) as (fd, name):
            f, st = safefs.open_read_at(fd, name)
            try:
                if st.st_size > SOURCE_MAX_BYTES:
                    raise NoImage("file too large for a preview")
                return safefs.read_fd(f, st.st_size)
            finally:
                os.close(f)

    def _open(self, data: bytes, draft: int | None):
        from PIL import Image, ImageOps
        try:
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > self.max_pixels or w * h <= 0:
                raise NoImage(f"{w}×{h} is too large for a preview")
            if draft and im.format == "JPEG":
                im.draft("RGB", (draft, draft))
            im = ImageOps.exif_transpose(im)
            if im.mode not in ("RGB", "L"):
                if "A" in im.getbands() or im.mode == "P":
                    rgba = im.convert("RGBA")
                    bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                    im = Image.alpha_composite(bg, rgba)
                im = im.convert("RGB") if im.mode != "I;16" else im.point(lambda v: v / 256).convert("L")
            return im
        except NoImage:
            raise
        except Exception as exc:          # any decoder error: no preview, never a 500
            raise NoImage(f"cannot decode: {type(exc).__name__}") from exc

    @staticmethod
    def _jpeg(im) -> bytes:
        out = io.BytesIO()
        im.save(out, "JPEG", quality=85, optimize=False)
        return out.getvalue()

    def render(self, job: Job, which: str, kind: str, fx: float = 0.5, fy: float = 0.5) -> bytes:
        """A JPEG of one side: kind `thumb` (≤ THUMB_PX), `preview` (≤ PREVIEW_PX) or `crop` (a
        CROP_PX square at 100 % of the result around (fx, fy); the original's same region scaled
        to the same size, so both align under the slider)."""
        src = self.source(job, which)
        if src is None:
            raise NoImage(f"no {which} image")
        root, rel, st = src
        key = f"{job.id}|{which}|{kind}|{fx:.3f}|{fy:.3f}|{root}|{rel}|{st.st_size}|{st.st_mtime_ns}"
        if kind == "crop":
            other = self.source(job, "after" if which == "before" else "before")
            key += f"|{other[2].st_size}|{other[2].st_mtime_ns}" if other else "|-"

        def make() -> bytes:
            with self._sem:
                if kind == "crop":
                    return self._crop(job, which, root, rel, fx, fy)
                from PIL import Image
                px = THUMB_PX if kind == "thumb" else PREVIEW_PX
                im = self._open(self._read(root, rel), px)
                im.thumbnail((px, px), Image.Resampling.LANCZOS)
                return self._jpeg(im)
        return self.cache.get(key, make)

    def _crop(self, job: Job, which: str, root: Path, rel: str, fx: float, fy: float) -> bytes:
        from PIL import Image
        after = self.source(job, "after")
        if after is None:
            raise NoImage("the zoom needs the result")
        a_im = self._open(self._read(after[0], after[1]), None)   # results carry no EXIF rotation
        aw, ah = a_im.size
        side = min(CROP_PX, aw, ah)
        x0 = min(max(0, round(fx * aw - side / 2)), aw - side)
        y0 = min(max(0, round(fy * ah - side / 2)), ah - side)
        if which == "after":
            return self._jpeg(a_im.crop((x0, y0, x0 + side, y0 + side)))
        im = self._open(self._read(root, rel), None)
        bw, bh = im.size
        sx, sy = bw / aw, bh / ah
        box = (round(x0 * sx), round(y0 * sy), max(round(x0 * sx) + 1, round((x0 + side) * sx)),
               max(round(y0 * sy) + 1, round((y0 + side) * sy)))
        return self._jpeg(im.crop(box).resize((side, side), Image.Resampling.NEAREST))

    def sidecar(self, job: Job) -> dict | None:
        """The sidecar beside the result (done) or the original in failed/ (failed), parsed."""
        if job.state not in ("done", "failed") or not job.outputs or not isinstance(job.outputs[0].get("path"), str):
            return None
        root, rel = self._locate(job.outputs[0]["path"] + ".json")
        if root is None:
            return None
        try:
            with safefs.dir_of(root, rel) as (fd, name):
                f, st = safefs.open_read_at(fd, name)
                try:
                    data = safefs.read_fd(f, 2 << 20)
                finally:
                    os.close(f)
            doc = json.loads(data[: 2 << 20])
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None

    # --- the files themselves (downloads) ------------------------------------------------------

    def _sha256(self, fd: int, st: os.stat_result) -> str:
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        with self._hashed_lock:
            known = self._hashed.get(key)
        if known is not None:
            return known
        h, pos = hashlib.sha256(), 0
        while True:
            b = os.pread(fd, CHUNK * 4, pos)
            if not b:
                break
            h.update(b)
            pos += len(b)
        digest = h.hexdigest()
        with self._hashed_lock:
            if len(self._hashed) > 4096:
                self._hashed.clear()
            self._hashed[key] = digest
        return digest

    def _open_checked(self, root: Path, rel: str, size: int | None, sha: str | None) -> tuple[int, os.stat_result]:
        """An open descriptor on root/rel (safefs: no link followed, regular files only) whose size
        and sha256 are the recorded ones (None: not recorded, not checked); OSError otherwise."""
        with safefs.dir_of(root, rel) as (dfd, name):
            f, st = safefs.open_read_at(dfd, name)
        try:
            if size is not None and st.st_size != size:
                raise OSError(f"{rel}: {st.st_size} bytes, the job recorded {size}")
            if isinstance(sha, str) and len(sha) == 64 and self._sha256(f, st) != sha.lower():
                raise OSError(f"{rel}: not the file the job recorded (sha256 differs)")
            return f, st
        except BaseException:
            os.close(f)
            raise

    def has_file(self, job: Job, kind: str) -> bool:
        """Whether download(job, kind) finds its file (the page links only these)."""
        try:
            got = self.download(job, kind)[0]
        except NoImage:
            return False
        if isinstance(got, int):
            os.close(got)
        return True

    def download(self, job: Job, kind: str) -> tuple[int | bytes, int, str, str]:
        """(open descriptor or the bytes, length, file name, content type) of one of the job's files:
        `result` (outbox/, done jobs), `sidecar` (beside the result, or beside the original in
        failed/), `original` (failed/, or archive/ for done jobs — never the inbox). Each is checked
        against the queue's record (size, sha256; a sidecar must name this job). NoImage when there
        is no such file, it was replaced, or it is not below the folder it belongs in."""
        f = self.cfg.folders
        out = job.outputs[0] if job.outputs and isinstance(job.outputs[0], dict) else {}
        recorded = out.get("path") if isinstance(out.get("path"), str) else None
        want_root = {"done": f.outbox, "failed": f.failed}.get(job.state)
        try:
            if kind == "result" and job.state == "done" and recorded:
                root, rel = self._locate(recorded)
                size = out.get("bytes") if isinstance(out.get("bytes"), int) else None
                if root is not None and root == f.outbox:
                    fd, st = self._open_checked(root, rel, size, out.get("sha256"))
                    return fd, st.st_size, rel.rpartition("/")[2], "application/octet-stream"
            elif kind == "sidecar" and want_root is not None and recorded:
                root, rel = self._locate(recorded + ".json")
                if root is not None and root == want_root:
                    fd, st = self._open_checked(root, rel, None, None)
                    try:
                        data = safefs.read_fd(fd, SIDECAR_MAX)
                    finally:
                        os.close(fd)
                    doc = json.loads(data) if len(data) <= SIDECAR_MAX else None
                    if isinstance(doc, dict) and doc.get("job") == job.id:
                        return data, len(data), rel.rpartition("/")[2], "application/json"
            elif kind == "original" and job.state == "failed" and recorded:
                root, rel = self._locate(recorded)
                if root is not None and root == f.failed:
                    fd, st = self._open_checked(root, rel, job.size, job.sha256)
                    return fd, st.st_size, rel.rpartition("/")[2], "application/octet-stream"
            elif kind == "original" and job.state == "done" and f.archive is not None:
                src = self.source(job, "before")          # archive/ only for done jobs; size checked
                if src is not None and src[0] == f.archive:
                    fd, st = self._open_checked(src[0], src[1], job.size, job.sha256)
                    return fd, st.st_size, src[1].rpartition("/")[2], "application/octet-stream"
        except (OSError, ValueError) as exc:
            log.info("web.download_refused", job=job.id, kind=kind, why=names.safe(str(exc)))
        raise NoImage(f"no {kind} file for job {job.id}")


# --- metrics -----------------------------------------------------------------------------------

def metrics_text(doc: dict, now: float) -> bytes:
    """The Prometheus exposition of the status document (prometheus_client): the daemon's own
    metrics snapshot (the same families as the node_exporter textfile) plus up/paused/age."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
    from .metrics import HOOK_RESULTS, JOB_STATES, PREFIX

    class Collector:
        def collect(self):
            d = doc["daemon"]
            snap = doc.get("metrics") or {}
            g = GaugeMetricFamily(PREFIX + "daemon_up", "1 when the daemon holds its lock and runs.")
            g.add_metric([], 1.0 if d.get("running") else 0.0)
            yield g
            g = GaugeMetricFamily(PREFIX + "paused", "1 when the operator paused the worker.")
            g.add_metric([], 1.0 if d.get("paused") else 0.0)
            yield g
            g = GaugeMetricFamily(PREFIX + "status_age_seconds", "Age of the daemon's status row.")
            g.add_metric([], max(0.0, now - d["updated"]) if d.get("updated") else float("nan"))
            yield g
            g = GaugeMetricFamily(PREFIX + "jobs", "Jobs in the queue by state.", labels=["state"])
            for s in dict.fromkeys([*JOB_STATES, *doc["counts"]]):
                g.add_metric([s], float(doc["counts"].get(s, 0)))
            yield g
            g = GaugeMetricFamily(PREFIX + "jobs_backoff", "Pending jobs waiting out a retry backoff.")
            g.add_metric([], float(snap.get("backoffs", 0) or 0))
            yield g
            g = GaugeMetricFamily(PREFIX + "done_last_hour", "Jobs done in the last hour.")
            g.add_metric([], float(doc.get("throughput", {}).get("done_last_hour", 0)))
            yield g
            c = CounterMetricFamily(PREFIX + "outcomes", "Finished job attempts by outcome.", labels=["outcome"])
            for k, v in (snap.get("outcomes") or {}).items():
                c.add_metric([str(k)], float(v))
            yield c
            c = CounterMetricFamily(PREFIX + "faces", "Faces found in processed photos.")
            c.add_metric([], float(snap.get("faces", 0) or 0))
            yield c
            g = GaugeMetricFamily(PREFIX + "last_success_timestamp_seconds", "When a photo was last done (0: never).")
            g.add_metric([], float(snap.get("last_success") or 0))
            yield g
            hooks = snap.get("hooks") or {}
            c = CounterMetricFamily(PREFIX + "hooks", "Completion hook notices by result.", labels=["result"])
            for k in dict.fromkeys([*HOOK_RESULTS, *hooks]):
                c.add_metric([str(k)], float(hooks.get(k, 0)))
            yield c
            h = HistogramMetricFamily(PREFIX + "stage_duration_seconds", "Time spent per processing stage.",
                                      labels=["stage"])
            les = [*(float(b) / 1000 for b in snap.get("buckets_ms", [])), float("inf")]
            for stage, hist in (snap.get("stages") or {}).items():
                counts = hist.get("buckets", [])
                if len(counts) != len(les):
                    continue
                cum, buckets = 0, []
                for le, n in zip(les, counts):
                    cum += n
                    buckets.append(("+Inf" if le == float("inf") else repr(le), float(cum)))
                h.add_metric([str(stage)], buckets, float(hist.get("sum_ms", 0)) / 1000)
            yield h

    reg = CollectorRegistry(auto_describe=False)
    reg.register(Collector())
    return generate_latest(reg)


# --- the application -----------------------------------------------------------------------------

class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: Iterable[tuple[str, str]] = ()):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, list(headers)


_REASONS = {200: "OK", 303: "See Other", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
            404: "Not Found", 405: "Method Not Allowed", 409: "Conflict", 413: "Payload Too Large",
            421: "Misdirected Request", 429: "Too Many Requests", 500: "Internal Server Error",
            503: "Service Unavailable"}


class WebApp:
    """The WSGI application. One instance per process; safe for waitress's worker threads."""

    def __init__(self, cfg: Config, token: str, listen_host: str = "127.0.0.1", tls: bool = False):
        self.cfg = cfg
        self.token = token
        self.tls = tls
        self.session = hmac.new(token.encode(), b"photoenhanced-session", "sha256").hexdigest()
        self.csrf = hmac.new(token.encode(), b"photoenhanced-csrf", "sha256").hexdigest()
        self.loopback_only = is_loopback(listen_host)
        self.allowed_hosts = {"localhost", "127.0.0.1", "::1", listen_host.lower()}
        self.images = Images(cfg, PreviewCache(cfg.state_dir / CACHE_DIR))
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self._fails: dict[str, deque[float]] = {}
        self._fails_lock = threading.Lock()
        self.routes: list[tuple[str, re.Pattern, Callable, bool]] = [
            ("GET", re.compile(r"/"), self.page_dashboard, False),
            ("GET", re.compile(r"/jobs/(\d{1,18})"), self.page_job, False),
            ("GET", re.compile(r"/jobs/(\d{1,18})/files/(result|sidecar|original)"), self.download, False),
            ("GET", re.compile(r"/static/([^/]+)"), self.static, False),
            ("GET", re.compile(r"/api/status"), self.api_status, False),
            ("GET", re.compile(r"/api/jobs"), self.api_jobs, False),
            ("GET", re.compile(r"/api/jobs/(\d{1,18})"), self.api_job, False),
            ("GET", re.compile(r"/api/jobs/(\d{1,18})/image"), self.api_image, False),
            ("POST", re.compile(r"/api/jobs/(\d{1,18})/retry"), self.api_retry, True),
            ("POST", re.compile(r"/api/pause"), self.api_pause, True),
            ("POST", re.compile(r"/api/resume"), self.api_resume, True),
            ("POST", re.compile(r"/api/enqueue"), self.api_enqueue, True),
            ("GET", re.compile(r"/api/session"), self.api_session, False),
            ("GET", re.compile(r"/api/openapi.json"), self.api_openapi, False),
            ("GET", re.compile(r"/metrics"), self.metrics, False),
            ("GET", re.compile(r"/healthz"), self.healthz, False),
        ]

    # --- plumbing ----------------------------------------------------------------------------

    def _postgres(self) -> bool:
        from . import backends
        return backends.is_postgres(getattr(getattr(self.cfg, "queue", None), "url", None))

    def _queue(self) -> Queue | None:
        """This thread's read-only connection (None until the daemon made the queue file)."""
        q = getattr(self._local, "q", None)
        if q is None:
            if self._postgres():
                from . import backends
                q = self._local.q = backends.connect(self.cfg, readonly=True)
                return q
            if not self.cfg.queue_path.exists():
                return None
            q = self._local.q = Queue(self.cfg.queue_path, readonly=True)
        return q

    def _writer(self) -> Queue:
        if self._postgres():
            from . import backends
            return backends.connect(self.cfg)
        self.cfg.state_dir.mkdir(parents=True, exist_ok=True)
        return Queue(self.cfg.queue_path)

    def __call__(self, environ, start_response):
        t0 = time.perf_counter()
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "") or "/"
        headers: list[tuple[str, str]] = []
        try:
            self._check_host(environ)
            try:
                length = int(environ.get("CONTENT_LENGTH") or 0)
            except ValueError:
                raise HTTPError(400, "bad Content-Length") from None
            if length > MAX_BODY:
                raise HTTPError(413, "request body too large")
            allowed = []
            for m, rx, handler, needs_auth in self.routes:
                match = rx.fullmatch(path)
                if not match:
                    continue
                allowed.append(m)
                if m != method and not (m == "GET" and method == "HEAD"):
                    continue
                if needs_auth:
                    self._authorize(environ)
                status, ctype, body, extra = handler(environ, *match.groups())
                break
            else:
                if allowed:
                    raise HTTPError(405, "method not allowed", [("Allow", ", ".join(sorted(set(allowed))))])
                raise HTTPError(404, "not found")
        except HTTPError as exc:
            status, ctype, extra = exc.status, "application/json", exc.headers
            body = json.dumps({"error": exc.message, "status": exc.status}).encode()
        except UnknownJob as exc:
            status, ctype, extra = 404, "application/json", []
            body = json.dumps({"error": names.safe(str(exc)), "status": 404}).encode()
        except (StateUnavailable, QueueCorrupt, sqlite3.OperationalError) as exc:
            # OperationalError: a queue file the daemon is still creating (no tables yet)
            status, ctype, extra = 503, "application/json", [("Retry-After", "5")]
            body = json.dumps({"error": f"the queue cannot be read: {names.safe(str(exc))}", "status": 503}).encode()
        except Exception:
            log.exception("web.error", method=method, path=names.safe(path))
            status, ctype, extra = 500, "application/json", []
            body = json.dumps({"error": "internal error (see the web process's log)", "status": 500}).encode()
        size = body.length if isinstance(body, FileBody) else len(body)
        headers = [("Content-Type", ctype), ("Content-Length", str(size)), *_SEC_HEADERS, *extra]
        if not any(h[0] == "Cache-Control" for h in extra):
            headers.append(("Cache-Control", "no-store"))
        start_response(f"{status} {_REASONS.get(status, 'Unknown')}", headers)
        log.debug("web.request", method=method, path=names.safe(path), status=status,
                  ms=round((time.perf_counter() - t0) * 1000, 1))
        if isinstance(body, FileBody):
            if method != "HEAD":
                return body                   # streamed; the server calls close()
            body.close()
            return [b""]
        return [b"" if method == "HEAD" else body]

    def _check_host(self, environ) -> None:
        if not self.loopback_only:
            return
        host = environ.get("HTTP_HOST", "")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        name = name.strip("[]").lower()
        if name not in self.allowed_hosts:
            raise HTTPError(421, "unexpected Host header (the page answers on its loopback address only)")

    def _client(self, environ) -> str:
        return environ.get("REMOTE_ADDR", "?")

    def _throttled(self, environ) -> bool:
        now = time.monotonic()
        with self._fails_lock:
            q = self._fails.get(self._client(environ))
            while q and now - q[0] > AUTH_WINDOW_S:
                q.popleft()
            return bool(q) and len(q) >= AUTH_MAX_FAILS

    def _failed_attempt(self, environ) -> None:
        with self._fails_lock:
            if len(self._fails) > 10_000:
                self._fails.clear()
            self._fails.setdefault(self._client(environ), deque()).append(time.monotonic())
        log.warning("web.bad_token", client=self._client(environ))

    def _cookies(self, environ) -> dict[str, str]:
        out = {}
        for part in environ.get("HTTP_COOKIE", "").split(";"):
            k, sep, v = part.strip().partition("=")
            if sep:
                out[k] = v
        return out

    def _authorize(self, environ) -> None:
        if self._throttled(environ):
            raise HTTPError(429, "too many wrong tokens; wait a minute", [("Retry-After", str(int(AUTH_WINDOW_S)))])
        auth = environ.get("HTTP_AUTHORIZATION", "")
        cookies = self._cookies(environ)
        csrf = environ.get("HTTP_X_CSRF_TOKEN", "")
        if auth:
            scheme, _, given = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
                self._failed_attempt(environ)
                raise HTTPError(401, "wrong token", [("WWW-Authenticate", 'Bearer realm="photoenhanced"')])
            if not csrf:
                raise HTTPError(403, "missing X-CSRF-Token header")
            return
        session = cookies.get("pe_session", "")
        if not session:
            raise HTTPError(401, "this needs the token from state_dir/web.token (Authorization: Bearer …)",
                            [("WWW-Authenticate", 'Bearer realm="photoenhanced"')])
        if not hmac.compare_digest(session.encode(), self.session.encode()):
            self._failed_attempt(environ)
            raise HTTPError(401, "stale session: open the URL that photoenhanced web printed",
                            [("WWW-Authenticate", 'Bearer realm="photoenhanced"')])
        if not csrf or not hmac.compare_digest(csrf.encode(), self.csrf.encode()):
            raise HTTPError(403, "missing or wrong X-CSRF-Token header")

    def _query(self, environ) -> dict[str, str]:
        try:
            q = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True, strict_parsing=False,
                         max_num_fields=20)
        except ValueError:
            raise HTTPError(400, "too many query parameters") from None
        return {k: v[-1] for k, v in q.items()}

    @staticmethod
    def _json(doc, status: int = 200, extra=()) -> tuple:
        return status, "application/json", json.dumps(doc, ensure_ascii=True).encode(), list(extra)

    # --- pages ---------------------------------------------------------------------------------

    def _page(self, environ, name: str) -> tuple:
        """A static page; `?token=` is exchanged for the session cookies and a redirect to the
        same page without it (the token then stays out of the history and the address bar)."""
        query = self._query(environ)
        if "token" in query:
            if self._throttled(environ):
                raise HTTPError(429, "too many wrong tokens; wait a minute", [("Retry-After", str(int(AUTH_WINDOW_S)))])
            where = quote(environ.get("PATH_INFO", "/"))
            if hmac.compare_digest(query["token"].encode(), self.token.encode()):
                attrs = "Path=/; SameSite=Strict" + ("; Secure" if self.tls else "")
                return 303, "text/plain", b"", [
                    ("Location", where),
                    ("Set-Cookie", f"pe_session={self.session}; {attrs}; HttpOnly"),
                    ("Set-Cookie", f"pe_csrf={self.csrf}; {attrs}")]
            self._failed_attempt(environ)
            return 303, "text/plain", b"", [("Location", where)]
        body = (STATIC / name).read_bytes()
        return 200, _CTYPES[".html"], body, []

    def page_dashboard(self, environ) -> tuple:
        return self._page(environ, "index.html")

    def page_job(self, environ, job_id: str) -> tuple:
        self._job(job_id)                     # 404 for an unknown job
        return self._page(environ, "job.html")

    def static(self, environ, name: str) -> tuple:
        if not _STATIC_NAME.fullmatch(name) or name.endswith(".html"):
            raise HTTPError(404, "not found")
        try:
            with safefs.dir_of(STATIC, name) as (fd, leaf):
                f, st = safefs.open_read_at(fd, leaf)
                try:
                    body = safefs.read_fd(f, 4 << 20)
                finally:
                    os.close(f)
        except (OSError, ValueError):
            raise HTTPError(404, "not found") from None
        ctype = _CTYPES.get(os.path.splitext(name)[1])
        if ctype is None:
            raise HTTPError(404, "not found")
        return 200, ctype, body, [("Cache-Control", "max-age=300")]

    # --- the JSON API --------------------------------------------------------------------------

    def _status_doc(self) -> dict:
        doc, problem = control.status(self.cfg, self._queue())
        if problem:
            raise StateUnavailable(problem)
        return doc

    def api_status(self, environ) -> tuple:
        return self._json(control.encodable_status(self._status_doc()))

    def _int(self, query: dict, key: str, default: int, lo: int, hi: int) -> int:
        raw = query.get(key)
        if raw is None:
            return default
        if not re.fullmatch(r"\d{1,10}", raw) or not lo <= int(raw) <= hi:
            raise HTTPError(400, f"{key} must be an integer from {lo} to {hi}")
        return int(raw)

    def api_jobs(self, environ) -> tuple:
        query = self._query(environ)
        unknown = set(query) - {"state", "limit", "offset", "order"}
        if unknown:
            raise HTTPError(400, f"unknown parameter {names.safe(sorted(unknown)[0])}")
        state = query.get("state")
        if state is not None and state not in STATES:
            raise HTTPError(400, f"state must be one of {', '.join(STATES)}")
        order = query.get("order", "asc")
        if order not in ("asc", "desc"):
            raise HTTPError(400, "order must be asc or desc")
        limit = self._int(query, "limit", 100, 1, JOBS_MAX_LIMIT)
        offset = self._int(query, "offset", 0, 0, 10 ** 9)
        q = self._queue()
        jobs = q.jobs(state, limit, offset, newest_first=order == "desc") if q else []
        return self._json([control.public_job(j.public()) for j in jobs])

    def _job(self, job_id: str) -> Job:
        i = int(job_id)
        q = self._queue()
        if q is None or not 1 <= i <= MAX_ID:
            raise HTTPError(404, f"no job {job_id}")
        return q.get(i)

    def api_job(self, environ, job_id: str) -> tuple:
        job = self._job(job_id)
        doc = control.public_job(job.public())
        sidecar = self.images.sidecar(job)
        doc["sidecar"] = names.encodable(sidecar) if sidecar is not None else None
        doc["images"] = {w: self.images.source(job, w) is not None for w in ("before", "after")}
        doc["files"] = {k: self.images.has_file(job, k) for k in FILE_KINDS}
        return self._json(doc)

    def api_image(self, environ, job_id: str) -> tuple:
        query = self._query(environ)
        which, kind = query.get("which", "after"), query.get("size", "preview")
        if which not in ("before", "after") or kind not in ("thumb", "preview", "crop"):
            raise HTTPError(400, "which must be before|after, size thumb|preview|crop")
        fx = fy = 0.5
        if kind == "crop":
            try:
                fx, fy = float(query.get("x", "0.5")), float(query.get("y", "0.5"))
            except ValueError:
                raise HTTPError(400, "x and y are fractions from 0 to 1") from None
            if not (0.0 <= fx <= 1.0 and 0.0 <= fy <= 1.0):
                raise HTTPError(400, "x and y are fractions from 0 to 1")
        job = self._job(job_id)
        try:
            body = self.images.render(job, which, kind, fx, fy)
        except NoImage as exc:
            raise HTTPError(404, str(exc)) from None
        except OSError:
            raise HTTPError(404, f"no {which} image") from None
        return 200, "image/jpeg", body, [("Cache-Control", "private, max-age=60")]

    def download(self, environ, job_id: str, kind: str) -> tuple:
        """GET /jobs/{id}/files/{result|sidecar|original}: the file itself, as an attachment."""
        if self._query(environ):
            raise HTTPError(400, "this URL takes no parameters")
        job = self._job(job_id)
        try:
            got, length, name, ctype = self.images.download(job, kind)
        except NoImage as exc:
            raise HTTPError(404, str(exc)) from None
        body = FileBody(got, length) if isinstance(got, int) else got
        log.info("web.download", job=job.id, kind=kind, bytes=length)
        return 200, ctype, body, [("Content-Disposition", content_disposition(name)),
                                  ("Cache-Control", "private, no-store")]

    def _write(self, fn: Callable[[Queue], dict]) -> dict:
        with self._write_lock:
            q = self._writer()
            try:
                return fn(q)
            finally:
                q.close()

    def api_retry(self, environ, job_id: str) -> tuple:
        i = int(job_id)
        if not 1 <= i <= MAX_ID:
            raise HTTPError(404, f"no job {job_id}")

        def go(q: Queue) -> dict:
            try:
                job = control.retry_job(self.cfg, q, i, "web", self.images.pub)
            except InvalidTransition as exc:
                raise HTTPError(409, names.safe(str(exc))) from None
            except control.RetryRefused as exc:
                raise HTTPError(409, str(exc)) from None
            log.info("web.retry", job=i, path=names.display(job.rel_path))
            return control.public_job(job.public())
        return self._json(self._write(go))

    def _pause(self, paused: bool) -> tuple:
        def go(q: Queue) -> dict:
            was = q.set_paused(paused, "web")
            log.info("web.pause" if paused else "web.resume", was_paused=was)
            return {"paused": paused, "was_paused": was}
        return self._json(self._write(go))

    def api_pause(self, environ) -> tuple:
        return self._pause(True)

    def api_resume(self, environ) -> tuple:
        return self._pause(False)

    def _body_json(self, environ) -> object:
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            raise HTTPError(400, "bad Content-Length") from None
        data = environ["wsgi.input"].read(length) if length > 0 else b""
        try:
            return json.loads(data)
        except ValueError:
            raise HTTPError(400, "the body must be a JSON object") from None

    def api_enqueue(self, environ) -> tuple:
        """As `photoenhanced enqueue PATH…`: each path (relative to the inbox, or absolute inside
        it; `paths_b64`: the exact bytes, URL-safe base64) is queued at once, skipping the settle
        wait. 200 when every one is queued (or already was), else 409; either way one result per
        path, in order."""
        body = self._body_json(environ)
        if not isinstance(body, dict) or set(body) - {"paths", "paths_b64"}:
            raise HTTPError(400, 'the body must be {"paths": [...]} and/or {"paths_b64": [...]}')
        given: list[tuple[str | None, str]] = []          # (problem, path)
        for key in ("paths", "paths_b64"):
            items = body.get(key, [])
            if not isinstance(items, list) or len(items) > ENQUEUE_MAX or not all(isinstance(x, str) for x in items):
                raise HTTPError(400, f"{key} must be a list of at most {ENQUEUE_MAX} strings")
            for x in items:
                if key == "paths":
                    given.append((None, x))
                    continue
                try:
                    given.append((None, os.fsdecode(base64.urlsafe_b64decode(x.encode("ascii")))))
                except (ValueError, binascii.Error, UnicodeEncodeError):
                    given.append(("not URL-safe base64", x))

        def go(q: Queue) -> list[dict]:
            results = []
            for problem, path in given:
                row: dict = {**names.fields(path), "outcome": "invalid", "job": None, "reason": problem}
                if problem is None:
                    try:
                        rel = control.inbox_rel(self.cfg, path)
                    except control.NotInInbox as exc:
                        row["reason"] = str(exc)
                    else:
                        t = control.enqueue(self.cfg, q, rel, "web")
                        row.update(outcome=t.outcome, job=t.job.id if t.job else None,
                                   reason=names.safe(t.reason) if t.reason else None)
                        log.info("web.enqueue", path=names.display(rel), outcome=t.outcome, job=row["job"])
                results.append(names.encodable(row))
            return results
        results = self._write(go)
        bad = [r for r in results if r["outcome"] not in ENQUEUE_OK]
        if not bad:
            return self._json({"results": results})
        first = bad[0]
        msg = f"{first['path']}: {first['outcome']}" + (f" ({first['reason']})" if first["reason"] else "")
        return self._json({"error": f"{len(bad)} of {len(results)} not queued; {msg}", "status": 409,
                           "results": results}, 409)

    def api_session(self, environ) -> tuple:
        ok = hmac.compare_digest(self._cookies(environ).get("pe_session", "").encode(), self.session.encode())
        return self._json({"authenticated": ok})

    def api_openapi(self, environ) -> tuple:
        return self._json(openapi())

    def metrics(self, environ) -> tuple:
        from prometheus_client import CONTENT_TYPE_LATEST
        return 200, CONTENT_TYPE_LATEST, metrics_text(self._status_doc(), time.time()), []

    def healthz(self, environ) -> tuple:
        doc = self._status_doc()
        d = doc["daemon"]
        age = time.time() - d["updated"] if d.get("updated") else None
        ok = bool(d.get("running")) and age is not None and age <= FRESH_S
        body = {"ok": ok, "state": d.get("state"), "age_s": None if age is None else round(age, 1)}
        return self._json(body, 200 if ok else 503)


# --- OpenAPI -------------------------------------------------------------------------------------

def openapi() -> dict:
    nstr = {"type": "string", "nullable": True}
    nnum = {"type": "number", "nullable": True}
    nint = {"type": "integer", "nullable": True}
    err = {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    job_id = {"name": "id", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 1}}
    job = {"type": "object", "required": ["id", "path", "state", "attempts", "created", "updated", "outputs"],
           "properties": {
               "id": {"type": "integer"}, "path": {"type": "string"},
               "path_b64": {"type": "string", "description": "the exact bytes of the name (URL-safe base64)"},
               "state": {"type": "string", "enum": list(STATES)}, "attempts": {"type": "integer"},
               "interruptions": {"type": "integer"}, "last_error": nstr, "error_kind": nstr, "profile": nstr,
               "sha256": {"type": "string"}, "wait_reason": nstr, "not_before": nnum,
               "created": {"type": "number"}, "updated": {"type": "number"},
               "outputs": {"type": "array", "items": {"type": "object"}}, "duplicate_of": nint}}
    status = {"type": "object", "required": ["daemon", "counts", "current", "hosts"], "properties": {
        "daemon": {"type": "object", "required": ["running", "state", "paused"], "properties": {
            "running": {"type": "boolean"}, "pid": nint, "state": nstr, "reason": nstr, "since": nnum,
            "updated": nnum, "paused": {"type": "boolean"}}},
        "counts": {"type": "object", "required": list(STATES),
                   "properties": {s: {"type": "integer"} for s in STATES}},
        "current": {"type": "object", "nullable": True, "description": "the photo in hand: job, path, stage,"
                    " started, page, faces, tiles_done, tiles_total (as far as known)",
                    "properties": {"job": {"type": "integer"}, "path": {"type": "string"},
                                   "stage": {"type": "string"}, "started": {"type": "number"},
                                   "tiles_done": {"type": "integer"}, "tiles_total": {"type": "integer"}}},
        "metrics": {"type": "object", "nullable": True},
        "throughput": {"type": "object", "properties": {"done_last_hour": {"type": "integer"}}},
        "hosts": {"type": "array", "description": "the daemons registered in a shared (PostgreSQL) queue; [] with SQLite",
                  "items": {"type": "object", "required": ["health"], "properties": {
                      "health": {"type": "string", "enum": ["alive", "silent", "stopped"]},
                      "seen_s_ago": nnum}}}}}
    enqueued = {"type": "object", "required": ["results"], "properties": {
        "results": {"type": "array", "items": {
            "type": "object", "required": ["path", "outcome", "job", "reason"], "properties": {
                "path": {"type": "string"},
                "path_b64": {"type": "string", "description": "the exact bytes of the name (URL-safe base64)"},
                "outcome": {"type": "string", "enum": ["queued", "active", "busy", "changed", "vanished",
                                                       "unreadable", "folder_link", "refused", "invalid"]},
                "job": nint, "reason": nstr}}},
        "error": {"type": "string"}, "status": {"type": "integer"}}}
    auth = [{"bearer": [], "csrf": []}, {"cookie": [], "csrf": []}]
    post_responses = {"401": err, "403": err, "404": err, "409": err, "429": err}
    return {
        "openapi": "3.0.3",
        "info": {"title": "photoenhanced", "version": "1",
                 "description": "The daemon's state and queue; state changes need the token (see README)."},
        "paths": {
            "/api/status": {"get": {"summary": "the same document as `photoenhanced status --json`",
                                    "responses": {"200": {"description": "status", "content": {
                                        "application/json": {"schema": status}}}, "503": err}}},
            "/api/jobs": {"get": {
                "summary": "jobs, in the shape of `photoenhanced list --json`",
                "parameters": [
                    {"name": "state", "in": "query", "schema": {"type": "string", "enum": list(STATES)}},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                                 "maximum": JOBS_MAX_LIMIT, "default": 100}},
                    {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0,
                                                                  "maximum": 10 ** 9, "default": 0}},
                    {"name": "order", "in": "query", "schema": {"type": "string", "enum": ["asc", "desc"]}}],
                "responses": {"200": {"description": "jobs", "content": {"application/json": {
                    "schema": {"type": "array", "items": job}}}}, "400": err, "503": err}}},
            "/api/jobs/{id}": {"get": {
                "summary": "one job, with its sidecar", "parameters": [job_id],
                "responses": {"200": {"description": "the job", "content": {"application/json": {"schema": {
                    "allOf": [job, {"type": "object", "required": ["sidecar", "images"], "properties": {
                        "sidecar": {"type": "object", "nullable": True},
                        "images": {"type": "object", "properties": {"before": {"type": "boolean"},
                                                                    "after": {"type": "boolean"}}},
                        "files": {"type": "object", "description": "which of /jobs/{id}/files/… exist",
                                  "properties": {k: {"type": "boolean"} for k in FILE_KINDS}}}}]}}}},
                              "404": err, "503": err}}},
            "/api/jobs/{id}/image": {"get": {
                "summary": "a re-encoded JPEG of the original (before) or the result (after)",
                "parameters": [job_id,
                               {"name": "which", "in": "query", "schema": {"type": "string", "enum": ["before", "after"]}},
                               {"name": "size", "in": "query",
                                "schema": {"type": "string", "enum": ["thumb", "preview", "crop"]}},
                               {"name": "x", "in": "query", "schema": {"type": "number", "minimum": 0, "maximum": 1}},
                               {"name": "y", "in": "query", "schema": {"type": "number", "minimum": 0, "maximum": 1}}],
                "responses": {"200": {"description": "JPEG", "content": {"image/jpeg": {
                    "schema": {"type": "string", "format": "binary"}}}}, "400": err, "404": err, "503": err}}},
            "/jobs/{id}/files/{kind}": {"get": {
                "summary": "download one of the job's files: its result (outbox), its sidecar, or its original"
                           " (only from failed/ or archive/, never from the inbox)",
                "description": "Served by job id only, as an attachment; the file must be the one the queue"
                               " recorded (size, sha256) and no link is followed: 404 otherwise.",
                "parameters": [job_id, {"name": "kind", "in": "path", "required": True,
                                        "schema": {"type": "string", "enum": list(FILE_KINDS)}}],
                "responses": {"200": {"description": "the file (Content-Disposition: attachment)", "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                    "application/json": {"schema": {"type": "object"}}}},
                    "400": err, "404": err, "503": err}}},
            "/api/jobs/{id}/retry": {"post": {
                "summary": "put a failed job back (as `photoenhanced retry ID`)", "parameters": [job_id],
                "security": auth,
                "responses": {"200": {"description": "the job, pending again", "content": {
                    "application/json": {"schema": job}}}, **post_responses}}},
            "/api/enqueue": {"post": {
                "summary": "queue files in the inbox at once, skipping the settle wait (as `photoenhanced enqueue PATH…`)",
                "description": "Each path is relative to the inbox or absolute inside it; `paths_b64` gives exact"
                               " bytes (URL-safe base64). 200 when every path is queued (or already was), 409 when"
                               " one is not (outside the inbox, missing, a symlink …); one result per path either way.",
                "security": auth,
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "additionalProperties": False, "properties": {
                        "paths": {"type": "array", "maxItems": ENQUEUE_MAX, "items": {"type": "string"}},
                        "paths_b64": {"type": "array", "maxItems": ENQUEUE_MAX, "items": {"type": "string"}}}}}}},
                "responses": {"200": {"description": "all queued", "content": {"application/json": {"schema": enqueued}}},
                              "400": err, "401": err, "403": err, "413": err, "429": err,
                              "409": {"description": "not all queued", "content": {"application/json": {
                                  "schema": enqueued}}}}}},
            "/api/pause": {"post": {"summary": "as `photoenhanced pause`", "security": auth, "responses": {
                "200": {"description": "paused", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Pause"}}}},
                **post_responses}}},
            "/api/resume": {"post": {"summary": "as `photoenhanced resume`", "security": auth, "responses": {
                "200": {"description": "resumed", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Pause"}}}},
                **post_responses}}},
            "/healthz": {"get": {"summary": "200 when the daemon's status row is fresh", "responses": {
                "200": {"description": "fresh", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Health"}}}},
                "503": {"description": "stale or stopped", "content": {"application/json": {
                    "schema": {"anyOf": [{"$ref": "#/components/schemas/Health"}, {"$ref": "#/components/schemas/Error"}]}}}}}}},
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "the token in state_dir/web.token"},
                "cookie": {"type": "apiKey", "in": "cookie", "name": "pe_session"},
                "csrf": {"type": "apiKey", "in": "header", "name": "X-CSRF-Token"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error", "status"],
                          "properties": {"error": {"type": "string"}, "status": {"type": "integer"}}},
                "Pause": {"type": "object", "required": ["paused", "was_paused"],
                          "properties": {"paused": {"type": "boolean"}, "was_paused": {"type": "boolean"}}},
                "Health": {"type": "object", "required": ["ok", "state", "age_s"],
                           "properties": {"ok": {"type": "boolean"}, "state": nstr, "age_s": nnum}}}},
    }


# --- the process ---------------------------------------------------------------------------------

def serve(cfg: Config, listen: str | None = None, log_format: str | None = None, environ=os.environ) -> int:
    """`photoenhanced web`: serve until SIGTERM/SIGINT. Prints the URL with the token once."""
    from . import logs
    from .logs import say
    from .notify import Notifier
    given = listen is not None
    listen = listen or cfg.web.listen
    try:
        host, port = split_listen(listen)
    except ValueError as exc:
        say(f"photoenhanced: --listen {exc}")
        return EX_USAGE
    tls = None
    if cfg.web.tls_cert is not None and cfg.web.tls_key is not None:
        try:
            tls = tls_context(cfg.web.tls_cert, cfg.web.tls_key)
        except TLSProblem as exc:
            say(f"photoenhanced: bad config {cfg.path}: {exc}")
            return EX_CONFIG
    if not is_loopback(host) and not cfg.web.insecure_remote and tls is None:
        say(f"photoenhanced: {listen} is not a loopback address and the page has no TLS: set web.tls_cert and"
            " web.tls_key, put a TLS proxy in front of a loopback address, or set web.insecure_remote: true")
        return EX_USAGE if given else EX_CONFIG
    logs.configure(log_format or cfg.log.format, cfg.log.level)
    try:
        token = load_token(cfg.state_dir)
        app = WebApp(cfg, token, host, tls=tls is not None)
    except (OSError, ValueError) as exc:
        say(f"photoenhanced: state_dir {cfg.state_dir}: {getattr(exc, 'strerror', None) or exc}")
        return EX_RUNTIME
    try:
        server, port, run, close = (_https_server if tls else _http_server)(app, host, port, tls)
    except OSError as exc:
        say(f"photoenhanced: cannot listen on {listen}: {exc.strerror or exc}")
        return EX_RUNTIME
    except ImportError as exc:            # an install without cheroot (HTTPS) or waitress
        say(f"photoenhanced: {exc.name or exc} is missing: install with scripts/setup (requirements.lock)")
        return EX_RUNTIME
    shown = f"[{host}]" if ":" in host else host
    url = f"{'https' if tls else 'http'}://{shown}:{port}/"
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    thread = threading.Thread(target=run, name="http-server", daemon=True)
    thread.start()
    log.info("web.listening", url=url, state_dir=str(cfg.state_dir), pid=os.getpid())
    say(f"photoenhanced web: {url}?token={token}")
    say(f"  (open it once to control the daemon from the page; the token is also in {cfg.state_dir / TOKEN_FILE})")
    notifier = Notifier(environ)
    notifier.ready(f"listening on {url}")
    while not stop.wait(1.0):
        if not thread.is_alive():
            log.error("web.server_died")
            return EX_RUNTIME
    notifier.stopping()
    close()
    log.info("web.stopped")
    return EX_OK


def _http_server(app: WebApp, host: str, port: int, tls: None):
    """Plain HTTP: waitress (its event loop holds slow clients, the THREADS workers run the app)."""
    from waitress.server import create_server
    server = create_server(app, host=host, port=port, threads=THREADS, channel_timeout=30,
                           max_request_body_size=MAX_BODY, max_request_header_size=MAX_HEADERS,
                           connection_limit=64, ident="photoenhanced", expose_tracebacks=False,
                           clear_untrusted_proxy_headers=True)
    return server, getattr(server, "effective_port", port), server.run, server.close


def _https_server(app: WebApp, host: str, port: int, tls: ssl.SSLContext):
    """HTTPS: cheroot's threaded WSGI server with the standard library's ssl (waitress has no TLS),
    with the same bounds: THREADS workers, request header and body sizes, a socket timeout."""
    from cheroot import wsgi
    from cheroot.ssl.builtin import BuiltinSSLAdapter

    class Adapter(BuiltinSSLAdapter):
        def __init__(self, context: ssl.SSLContext):      # the checked context; no files re-read
            self.certificate = self.private_key = self.certificate_chain = self.ciphers = None
            self.private_key_password = None
            self._server_env = {}
            self.context = context

    server = wsgi.Server((host, port), app, numthreads=THREADS, max=THREADS, server_name="photoenhanced",
                         timeout=TLS_TIMEOUT_S, shutdown_timeout=5, request_queue_size=64)
    server.max_request_header_size = MAX_HEADERS
    server.max_request_body_size = MAX_BODY
    server.ssl_adapter = Adapter(tls)

    def error_log(msg="", level=20, traceback=False):
        log.info("web.server", message=names.safe(str(msg))[:300])
    server.error_log = error_log
    server.prepare()                      # binds now: errors here, the OS's port known
    return server, server.bind_addr[1], server.serve, server.stop
