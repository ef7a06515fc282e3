"""config.yaml → frozen dataclasses, once. Every default lives here; every error names its key path.

Relative paths resolve against the config file's folder.
"""
from __future__ import annotations

import difflib
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from enhancer.api import PROFILES, EnhancerSettings
from .errors import ConfigError

DEFAULT_PATHS = ("/etc/photoenhanced/config.yaml", "./config.yaml")
OUTPUT_FORMATS = ("same", "png", "jpeg", "webp", "tiff")


@dataclass(frozen=True)
class Folders:
    inbox: Path
    outbox: Path
    failed: Path
    archive: Path | None


@dataclass(frozen=True)
class Watch:
    mode: str = "auto"
    poll_interval: float = 5.0
    settle_seconds: float = 2.0
    rescan_interval: float = 300.0
    recursive: bool = True
    ignore: tuple[str, ...] = ()


@dataclass(frozen=True)
class Models:
    face: str = "gfpgan-v1.4"
    background: str = "realesrgan-x2plus"
    detector: str = "retinaface-r50"


@dataclass(frozen=True)
class FolderOverride:
    profile: str | None = None
    upscale: float | None = None


@dataclass(frozen=True)
class Enhance:
    profile: str = "faces"
    upscale: float = 2.0
    device: str = "auto"
    tile: int | None = None           # None = auto
    precision: str = "auto"
    output_format: str = "same"
    jpeg_quality: int = 95
    max_input_megapixels: float = 80.0
    max_output_megapixels: float = 64.0
    provenance: bool = True           # stamp EXIF Software, XMP history and IPTC digital source type
    face_fidelity: float = 0.5        # CodeFormer's w (0 = quality … 1 = fidelity); GFPGAN ignores it
    face_strength: float = 1.0        # restored face blended over the original (1 = restored only)
    models: Models = Models()
    folders: tuple[tuple[str, FolderOverride], ...] = ()

    def for_path(self, rel: str) -> tuple[str, float, str]:
        """(profile, upscale, hot folder or "") for a job at inbox-relative path `rel`: the longest
        configured sub-folder that contains it wins."""
        best = ("", FolderOverride())
        for prefix, over in self.folders:
            if (rel.startswith(prefix + "/")) and len(prefix) > len(best[0]):
                best = (prefix, over)
        prefix, over = best
        return (over.profile or self.profile, over.upscale or self.upscale, prefix)


@dataclass(frozen=True)
class Jobs:
    max_attempts: int = 3
    backoff_seconds: tuple[float, ...] = (10.0, 60.0, 300.0)
    originals: str = "archive"
    skip_duplicates: bool = True
    stop_timeout: float = 20.0
    max_interruptions: int = 3        # runs cut short by the daemon's death before failed/ (interrupted)
    prefetch: int = 1                 # jobs decoded ahead while the model works (0: strictly one at a time)

    def backoff(self, attempts: int) -> float:
        seq = self.backoff_seconds or (0.0,)
        return seq[min(max(attempts, 1), len(seq)) - 1]


@dataclass(frozen=True)
class Hooks:
    on_done: str | tuple[str, ...] | None = None
    on_failed: str | tuple[str, ...] | None = None
    timeout: float = 10.0
    retries: int = 2


@dataclass(frozen=True)
class Log:
    format: str = "auto"
    level: str = "info"


@dataclass(frozen=True)
class Web:
    listen: str = "127.0.0.1:8765"    # HOST:PORT of `photoenhanced web`
    insecure_remote: bool = False     # allow a non-loopback listen address (plain HTTP, no TLS)
    tls_cert: Path | None = None      # PEM certificate (chain) and its key: serve HTTPS (both or neither)
    tls_key: Path | None = None


def split_listen(value: str) -> tuple[str, int]:
    """"HOST:PORT" (IPv6 as "[::1]:8765") → (host, port); ValueError naming what is wrong."""
    host, sep, port = str(value).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:8765)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def is_loopback(host: str) -> bool:
    import ipaddress
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class QueueSettings:
    url: str | None = None            # None / "sqlite:" = state_dir/queue.sqlite3; "postgresql://…" = shared
    lease_seconds: float = 60.0       # a claimed job returns to pending this long after its host's last heartbeat


def _queue_url(ctx, key, v):
    from .backends import is_postgres, mask_url
    if v is None or v == "sqlite:" or (isinstance(v, str) and is_postgres(v)):
        return v
    ctx.err(key, f"expected sqlite: or postgresql://USER@HOST:PORT/DB, got {mask_url(str(v))!r}")
    return None


@dataclass(frozen=True)
class Config:
    path: Path | None
    folders: Folders
    state_dir: Path
    weights_dir: Path
    watch: Watch = Watch()
    enhance: Enhance = Enhance()
    jobs: Jobs = Jobs()
    hooks: Hooks = Hooks()
    log: Log = Log()
    web: Web = Web()
    queue: QueueSettings = QueueSettings()

    @property
    def queue_path(self) -> Path:
        return self.state_dir / "queue.sqlite3"

    def enhancer_settings(self) -> EnhancerSettings:
        e = self.enhance
        needs = {(e.profile, float(e.upscale))}
        for _, over in e.folders:
            needs.add((over.profile or e.profile, float(over.upscale or e.upscale)))
        return EnhancerSettings(
            weights_dir=self.weights_dir, device=e.device, precision=e.precision, tile=e.tile,
            face_model=e.models.face, background_model=e.models.background,
            detector_model=e.models.detector, needs=tuple(sorted(needs)),
            face_fidelity=float(e.face_fidelity), face_strength=float(e.face_strength))

    def target_folders(self) -> dict[str, Path]:
        out = {"outbox": self.folders.outbox, "failed": self.folders.failed}
        if self.folders.archive is not None and self.jobs.originals == "archive":
            out["archive"] = self.folders.archive
        return out


# --- parsing -------------------------------------------------------------------------------

class _Ctx:
    def __init__(self, base: Path):
        self.base = base
        self.problems: list[str] = []

    def err(self, key: str, msg: str) -> None:
        self.problems.append(f"{key}: {msg}")


Check = Callable[[_Ctx, str, Any], Any]
_MISSING = object()


def _bool(ctx, key, v):
    if isinstance(v, bool):
        return v
    ctx.err(key, f"expected true or false, got {v!r}")


def _num(lo=None, hi=None, integer=False):
    def check(ctx, key, v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
            ctx.err(key, f"expected {'an integer' if integer else 'a number'}, got {v!r}")
            return None
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            rng = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            ctx.err(key, f"must be {rng}, got {v!r}")
            return None
        return v
    return check


def _enum(*choices, pattern_ok: Callable[[str], bool] | None = None):
    def check(ctx, key, v):
        if isinstance(v, str) and (v in choices or (pattern_ok and pattern_ok(v))):
            return v
        hint = _suggest(str(v), choices)
        ctx.err(key, f"must be one of {'|'.join(choices)}, got {v!r}{hint}")
    return check


def _path(nullable=False):
    def check(ctx, key, v):
        if v is None and nullable:
            return None
        if not isinstance(v, str) or not v.strip():
            ctx.err(key, f"expected a path, got {v!r}")
            return None
        p = Path(os.path.expanduser(v))
        return Path(os.path.abspath(p if p.is_absolute() else ctx.base / p))
    return check


def _str(ctx, key, v):
    if isinstance(v, str) and v:
        return v
    ctx.err(key, f"expected a non-empty string, got {v!r}")


def _str_list(ctx, key, v):
    if isinstance(v, list) and all(isinstance(x, str) and x for x in v):
        return tuple(v)
    ctx.err(key, f"expected a list of strings, got {v!r}")


def _num_list(ctx, key, v):
    if isinstance(v, list) and v and all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in v):
        return tuple(float(x) for x in v)
    ctx.err(key, f"expected a non-empty list of seconds (numbers >= 0), got {v!r}")


def _tile(ctx, key, v):
    if v == "auto" or v is None:
        return None
    if isinstance(v, int) and not isinstance(v, bool) and (v == 0 or 32 <= v <= 4096):
        return v
    ctx.err(key, f"must be auto, 0 (no tiling) or a tile edge from 32 to 4096 px, got {v!r}")


def _device(v: str) -> bool:
    return v.startswith("cuda:") and v[5:].isdigit()


def _hook(ctx, key, v):
    if v is None:
        return None
    if isinstance(v, str):
        if v.startswith(("http://", "https://")):
            return v
        ctx.err(key, f"a hook is an http(s) URL or a command as a list of arguments, got {v!r}")
        return None
    if isinstance(v, list) and v and all(isinstance(x, str) and x for x in v):
        return tuple(v)
    ctx.err(key, f"a hook is null, an http(s) URL or a command as a list of arguments, got {v!r}")


_upscale = _num(1, 4)


_FOLDER_OVERRIDE = {"profile": _enum(*PROFILES), "upscale": _upscale}


def _listen(ctx, key, v):
    try:
        split_listen(v)
    except ValueError as exc:
        ctx.err(key, str(exc))
        return None
    return str(v)


def _hot_folders(ctx, key, v):
    if v is None:
        return ()
    if not isinstance(v, dict):
        ctx.err(key, f"expected a mapping of inbox sub-folder → settings, got {v!r}")
        return ()
    out = []
    for name, over in v.items():
        sub = f"{key}.{name}"
        clean = posixpath.normpath(str(name)).strip("/")
        if not isinstance(name, str) or clean in ("", ".") or ".." in clean.split("/") or name.startswith("/"):
            ctx.err(sub, "must be a relative sub-folder of the inbox")
            continue
        vals = _section(ctx, sub, over, _FOLDER_OVERRIDE, {"profile": None, "upscale": None})
        out.append((clean, FolderOverride(**vals)))
    return tuple(sorted(out))


SCHEMA: dict[str, tuple[dict[str, Check], dict[str, Any]]] = {
    "folders": ({"inbox": _path(), "outbox": _path(), "failed": _path(), "archive": _path(nullable=True)},
                {"inbox": _MISSING, "outbox": _MISSING, "failed": _MISSING, "archive": None}),
    "watch": ({"mode": _enum("auto", "events", "poll"), "poll_interval": _num(0.1, 3600),
               "settle_seconds": _num(0, 3600), "rescan_interval": _num(1, 86400 * 7),
               "recursive": _bool, "ignore": _str_list},
              {"mode": "auto", "poll_interval": 5.0, "settle_seconds": 2.0, "rescan_interval": 300.0,
               "recursive": True, "ignore": ()}),
    "enhance": ({"profile": _enum(*PROFILES), "upscale": _upscale,
                 "device": _enum("auto", "cpu", "cuda", pattern_ok=_device), "tile": _tile,
                 "precision": _enum("auto", "fp32", "bf16", "fp16"),
                 "output_format": _enum(*OUTPUT_FORMATS), "jpeg_quality": _num(1, 100, integer=True),
                 "max_input_megapixels": _num(0.01, 1000), "max_output_megapixels": _num(0.01, 4000),
                 "provenance": _bool, "face_fidelity": _num(0, 1), "face_strength": _num(0, 1),
                 "models": None, "folders": _hot_folders},
                {"profile": "faces", "upscale": 2.0, "device": "auto", "tile": None, "precision": "auto",
                 "output_format": "same", "jpeg_quality": 95, "max_input_megapixels": 80.0,
                 "max_output_megapixels": 64.0, "provenance": True, "face_fidelity": 0.5,
                 "face_strength": 1.0, "models": None, "folders": ()}),
    "jobs": ({"max_attempts": _num(1, 100, integer=True), "backoff_seconds": _num_list,
              "originals": _enum("archive", "delete"), "skip_duplicates": _bool,
              "stop_timeout": _num(0, 3600), "max_interruptions": _num(1, integer=True),
              "prefetch": _num(0, 4, integer=True)},
             {"max_attempts": 3, "backoff_seconds": (10.0, 60.0, 300.0), "originals": "archive",
              "skip_duplicates": True, "stop_timeout": 20.0, "max_interruptions": 3,
              "prefetch": 1}),
    "hooks": ({"on_done": _hook, "on_failed": _hook, "timeout": _num(0.1, 600), "retries": _num(0, 20, integer=True)},
              {"on_done": None, "on_failed": None, "timeout": 10.0, "retries": 2}),
    "log": ({"format": _enum("auto", "json", "text"), "level": _enum("debug", "info", "warning", "error")},
            {"format": "auto", "level": "info"}),
    "web": ({"listen": _listen, "insecure_remote": _bool, "tls_cert": _path(nullable=True), "tls_key": _path(nullable=True)},
            {"listen": "127.0.0.1:8765", "insecure_remote": False, "tls_cert": None, "tls_key": None}),
    "queue": ({"url": _queue_url, "lease_seconds": _num(1, 3600)}, {"url": None, "lease_seconds": 60.0}),
}
MODELS = ({"face": _str, "background": _str, "detector": _str},
          {"face": "gfpgan-v1.4", "background": "realesrgan-x2plus", "detector": "retinaface-r50"})
TOP = {"folders", "state_dir", "weights_dir", "watch", "enhance", "jobs", "hooks", "log", "web", "queue"}


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _section(ctx: _Ctx, key: str, raw: Any, checks: dict[str, Check], defaults: dict[str, Any]) -> dict[str, Any]:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        ctx.err(key, f"expected a mapping, got {raw!r}")
        raw = {}
    for k in raw:
        if k not in checks:
            ctx.err(f"{key}.{k}", f"unknown key{_suggest(str(k), checks)}")
    out = {}
    for k, check in checks.items():
        if k in raw:
            val = raw[k]
            if check is not None:
                val = check(ctx, f"{key}.{k}", val)
                if val is None and defaults.get(k) not in (None, _MISSING) and raw[k] is not None:
                    val = defaults[k]   # error already recorded; keep parsing the rest
            out[k] = val
        elif defaults.get(k, None) is _MISSING:
            ctx.err(f"{key}.{k}", "required")
            out[k] = None
        else:
            out[k] = defaults.get(k)
    return out


def _inside(a: Path, b: Path) -> bool:
    """a is b or inside b, comparing the paths as written (already absolute and normalised)."""
    try:
        a.relative_to(b)
        return True
    except ValueError:
        return False


def _ident(p: Path) -> tuple[int, int] | None:
    """(st_dev, st_ino) of what p names, symlinks followed; None when it does not exist (yet)."""
    try:
        st = os.stat(p)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino) if st.st_ino else None


def _inside_fs(a: Path, b: Path) -> bool:
    """a is b or inside b on the file system: through a symlink anywhere in either path, a bind
    mount or any other path to the same directory. Decided by (device, inode) of b against a and
    each of a's existing ancestors (after resolving symlinks), plus the string comparison of both
    the written and the resolved paths for what does not exist yet."""
    real_a, real_b = Path(os.path.realpath(a)), Path(os.path.realpath(b))
    if _inside(a, b) or _inside(real_a, real_b):
        return True
    id_b = _ident(b)
    if id_b is None:
        return False
    return any(_ident(q) == id_b for q in (real_a, *real_a.parents))


def _via(a: Path, b: Path) -> str:
    """A hint when the overlap is not visible in the paths as written."""
    return "" if _inside(a, b) or _inside(b, a) else \
        f" (the same folder by another path: {os.path.realpath(a)} and {os.path.realpath(b)})"


def parse(raw: Any, base: Path, path: Path | None = None) -> Config:
    ctx = _Ctx(base)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(["the file must be a YAML mapping of sections"], str(path or ""))
    for k in raw:
        if k not in TOP:
            ctx.err(str(k), f"unknown key{_suggest(str(k), TOP)}")
    sec = {name: _section(ctx, name, raw.get(name), *SCHEMA[name]) for name in SCHEMA}
    models = _section(ctx, "enhance.models", sec["enhance"]["models"], *MODELS)
    for k, v in models.items():
        if isinstance(v, str) and v.endswith(".pth"):
            models[k] = str(_path()(ctx, f"enhance.models.{k}", v))
    state_dir = _path()(ctx, "state_dir", raw.get("state_dir", "/var/lib/photoenhanced"))
    weights_dir = _path()(ctx, "weights_dir", raw["weights_dir"]) if "weights_dir" in raw else (
        state_dir / "weights" if state_dir else None)

    f, e, j = sec["folders"], sec["enhance"], sec["jobs"]
    if j["originals"] == "archive" and f["archive"] is None:
        ctx.err("folders.archive", "required when jobs.originals is archive (or set jobs.originals: delete)")
    named = [(k, f[k]) for k in ("inbox", "outbox", "failed", "archive") if f.get(k)]
    if state_dir:
        named.append(("state_dir", state_dir))
    for i, (ka, a) in enumerate(named):
        for kb, b in named[i + 1:]:
            if ka == "state_dir" or kb == "state_dir":
                other, okey = (b, kb) if ka == "state_dir" else (a, ka)
                if _inside_fs(state_dir, other) or (okey == "inbox" and _inside_fs(other, state_dir)):
                    ctx.err("state_dir", f"must not overlap folders.{okey} ({other}){_via(state_dir, other)}")
                continue
            if _inside_fs(a, b) or _inside_fs(b, a):
                ctx.err(f"folders.{kb}", f"overlaps folders.{ka} ({a} and {b}){_via(a, b)}; each folder must be"
                        " separate, or results would be picked up again")
    if weights_dir and f.get("inbox") and _inside_fs(weights_dir, f["inbox"]):
        ctx.err("weights_dir", f"must not be inside folders.inbox ({f['inbox']})")
    for key, p in named + ([("weights_dir", weights_dir)] if weights_dir else []):
        bad = _blocked_parent(p)
        if bad:
            ctx.err(key if key in ("state_dir", "weights_dir") else f"folders.{key}",
                    f"cannot exist: {bad} is not a directory")
    w = sec["web"]
    if (w["tls_cert"] is None) != (w["tls_key"] is None):
        ctx.err("web.tls_key" if w["tls_key"] is None else "web.tls_cert",
                "web.tls_cert and web.tls_key go together: set both (HTTPS) or neither (plain HTTP)")
    tls = w["tls_cert"] is not None and w["tls_key"] is not None
    if w["listen"] and not w["insecure_remote"] and not tls and not is_loopback(split_listen(w["listen"])[0]):
        ctx.err("web.listen", f"{w['listen']} is not a loopback address and the page has no TLS: set web.tls_cert"
                " and web.tls_key, or put a TLS proxy in front of a loopback address, or set"
                " web.insecure_remote: true")
    if ctx.problems:
        raise ConfigError(ctx.problems, str(path or ""))
    return Config(
        path=path,
        folders=Folders(**f),
        state_dir=state_dir, weights_dir=weights_dir,
        watch=Watch(**sec["watch"]),
        enhance=Enhance(**{**e, "upscale": float(e["upscale"]), "models": Models(**models)}),
        jobs=Jobs(**j),
        hooks=Hooks(**sec["hooks"]),
        log=Log(**sec["log"]),
        web=Web(**sec["web"]),
        queue=QueueSettings(**sec["queue"]),
    )


def _blocked_parent(p: Path) -> Path | None:
    """The first existing ancestor-or-self of p that is not a directory (so p can never exist)."""
    for q in [p, *p.parents]:
        try:
            if q.exists():
                return None if q.is_dir() else q
        except OSError:
            return None
    return None


def find_config(explicit: str | None, environ=os.environ) -> Path:
    if explicit:
        return Path(explicit)
    if environ.get("PHOTOENHANCED_CONFIG"):
        return Path(environ["PHOTOENHANCED_CONFIG"])
    for cand in DEFAULT_PATHS:
        if Path(cand).is_file():
            return Path(cand)
    return Path(DEFAULT_PATHS[-1])


def load(path: Path) -> Config:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"config file not found: {path}"], str(path)) from None
    except OSError as exc:
        raise ConfigError([f"cannot read config file: {exc.strerror}"], str(path)) from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError([f"{where}invalid YAML: {getattr(exc, 'problem', exc)}"], str(path)) from exc
    p = Path(os.path.abspath(path))
    return parse(raw, p.parent, p)


def folder_problems(cfg: Config, create: bool = True) -> dict[str, str]:
    """Folders that cannot be used now, by name → reason. Creates missing target folders and the
    state dir (never the inbox: an empty mount point must stay empty)."""
    problems: dict[str, str] = {}
    inbox = cfg.folders.inbox
    try:                                      # a share that went away answers EIO/EHOSTDOWN/ESTALE…
        if not inbox.is_dir():
            problems["inbox"] = f"inbox missing: {inbox} (not mounted?)"
        elif not os.access(inbox, os.R_OK | os.X_OK):
            problems["inbox"] = f"inbox not readable: {inbox}"
        elif not os.access(inbox, os.W_OK):
            problems["inbox"] = f"inbox read-only: {inbox} (originals cannot be moved out)"
    except OSError as exc:
        problems["inbox"] = f"inbox unreachable: {inbox} ({exc.strerror or exc})"
    for name, p in {**cfg.target_folders(), "state_dir": cfg.state_dir}.items():
        try:
            if create:
                p.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            problems[name] = f"{name} cannot be created: {p} ({exc.strerror})"
            continue
        try:
            if not p.is_dir():
                problems[name] = f"{name} missing: {p}"
            elif not _writable(p):
                problems[name] = f"{name} read-only: {p}"
        except OSError as exc:
            problems[name] = f"{name} unreachable: {p} ({exc.strerror or exc})"
    return problems


def _writable(p: Path) -> bool:
    """access() lies for root on read-only mounts' permissions but not for EROFS; try it for real."""
    if not os.access(p, os.W_OK):
        return False
    try:
        fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY)
        try:
            st = os.fstatvfs(fd)
        finally:
            os.close(fd)
        return not (st.f_flag & os.ST_RDONLY)
    except OSError:
        return False
