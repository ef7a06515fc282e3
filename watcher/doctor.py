"""`photoenhanced doctor`: is everything a `run` needs there? One check per line, ✓ / ✗ (with the
fix) / · (information), produced as a stream so a slow check (the benchmark) shows progress.

    needed_weights(cfg) -> list[str]
    checks(cfg, prog, *, bench=True, systemd=None) -> Iterator[Check]
    exit_code(checks) -> 0 | 1

torch is reached only through enhancer.probe (imported when the device and benchmark checks
run), never imported here.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from . import config as config_mod
from . import discover
from .config import Config

LOW_SPACE_BYTES = 1 << 30          # below this a target folder or state_dir is a ✗ (the daemon waits when full)
PHOTO_MEGAPIXELS = 12.0
UNITS = ("photoenhanced.service", "photoenhanced-web.service")
SYSTEMD_UNIT_DIRS = ("/etc/systemd/system", "/usr/local/lib/systemd/system", "/lib/systemd/system",
                     "/usr/lib/systemd/system")

OK, FAIL, INFO = True, False, None
MARK = {OK: "✓", FAIL: "✗", INFO: "·"}


@dataclass(frozen=True)
class Check:
    ok: bool | None            # True ✓ · False ✗ (run is blocked or will fail) · None information
    what: str                  # area: inbox, outbox, state_dir, weights, device, benchmark, systemd …
    detail: str
    fix: str | None = None

    def line(self) -> str:
        s = f"{MARK[self.ok]} {self.what:10} {self.detail}"
        return s + (f"\n    fix: {self.fix}" if self.fix else "")

    def public(self) -> dict:
        return {"ok": self.ok, "what": self.what, "detail": self.detail, "fix": self.fix}


def exit_code(checks: list[Check]) -> int:
    return 1 if any(c.ok is FAIL for c in checks) else 0


def needed_weights(cfg: Config) -> list[str]:
    """The manifest names every configured profile and hot folder needs (local .pth paths excluded)."""
    s = cfg.enhancer_settings()
    names: set[str] = set()
    for profile, _ in s.needs:
        if profile in ("faces", "full"):
            names |= {s.face_model, s.detector_model, "parsenet"}
        if profile in ("full", "upscale"):
            names.add(s.background_model)
    return sorted(n for n in names if not n.endswith(".pth"))


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def _existing(p: Path) -> Path:
    """p, or its nearest existing ancestor (what a mkdir -p would create under)."""
    for q in [p, *p.parents]:
        if q.exists():
            return q
    return Path("/")


def _fs(p: Path) -> tuple[str, int, int]:
    """(file system type, device, free bytes for an unprivileged writer) of the folder p is on."""
    q = _existing(p)
    st = os.statvfs(q)
    return discover.filesystem_type(q) or "?", os.stat(q).st_dev, st.f_bavail * st.f_frsize


def can_create_in(parent: Path) -> bool:
    try:
        ro = os.statvfs(parent).f_flag & os.ST_RDONLY
    except OSError:
        return False
    return parent.is_dir() and os.access(parent, os.W_OK | os.X_OK) and not ro


def folder_checks(cfg: Config, prog: str) -> Iterator[Check]:
    """The folders as the daemon sees them (config.folder_problems, nothing created) plus file
    system type, free space and same-file-system facts."""
    problems = config_mod.folder_problems(cfg, create=False)
    f = cfg.folders
    devs: dict[str, int] = {}
    inbox = f.inbox
    if not inbox.is_dir():
        yield Check(FAIL, "inbox", f"{inbox} is missing (the daemon never creates it: it would write "
                    "into an empty mount point)", f"mkdir -p {shlex.quote(str(inbox))}   (or mount the share there)")
    elif "inbox" in problems:
        yield Check(FAIL, "inbox", problems["inbox"], "give this user read and write permission, or mount it read-write")
    else:
        fstype, devs["inbox"], _ = _fs(inbox)
        mode, _ = discover.resolve_mode(cfg.watch.mode, inbox)
        net = discover.is_network_fs(fstype)
        yield Check(OK, "inbox", f"{inbox} ({fstype}, watched by {mode}"
                    + (f" every {cfg.watch.poll_interval:g} s: a network/FUSE mount)" if net and mode == "poll" else ")"))
        if net and mode == "events":
            yield Check(FAIL, "inbox", "watch.mode: events on a network mount sees nothing other machines write",
                        "set watch.mode: auto (or poll)")
    targets = {k: v for k, v in cfg.target_folders().items()}
    for name, p in {**targets, "state_dir": cfg.state_dir}.items():
        fstype, dev, free = _fs(p)
        where = f"{p} ({fstype}, {_gib(free)} free)"
        if not p.exists():
            parent = _existing(p)
            if can_create_in(parent):
                devs[name] = dev
                yield Check(OK, name, f"{where}: missing, `run` creates it")
            else:
                yield Check(FAIL, name, f"{p} is missing and cannot be created ({parent} is not writable)",
                            f"sudo install -d -o $USER {shlex.quote(str(p))}")
            continue
        if name in problems:
            yield Check(FAIL, name, problems[name], f"make {p} a folder this user can write (chown/chmod, or mount it read-write)")
            continue
        devs[name] = dev
        if free < LOW_SPACE_BYTES:
            yield Check(FAIL, name, f"{where}: low on space (the daemon waits when it is full)",
                        "free some space, or move the folder to a bigger disk")
        elif name == "state_dir" and discover.is_network_fs(fstype):
            yield Check(FAIL, name, f"{where}: SQLite on a network file system is unsafe",
                        "put state_dir on a local disk (the folders may stay on the share)")
        else:
            yield Check(OK, name, where)
    if "inbox" in devs:
        for name in targets:
            if name in devs:
                same = devs[name] == devs["inbox"]
                if name == "archive" or not same:
                    yield Check(INFO, name, "same file system as the inbox: originals move by rename" if same else
                                "not on the inbox's file system: copy + fsync + unlink (room for a second copy needed)")


def weight_checks(cfg: Config, prog: str, config_path: Path) -> tuple[list[Check], bool]:
    """(checks, all present and verified)."""
    from enhancer import weights
    out: list[Check] = []
    manifest = weights.load_manifest()
    names = needed_weights(cfg)
    rows = {r["name"]: r for r in weights.verify(cfg.weights_dir, [n for n in names if n in manifest], manifest)}
    missing, bad = [], []
    for n in names:
        if n not in manifest:
            out.append(Check(FAIL, "weights", f"{n}: not in the manifest (known: {', '.join(sorted(manifest))})",
                             "fix enhance.models in the config"))
            continue
        r = rows[n]
        if r["ok"]:
            out.append(Check(OK, "weights", f"{n} verified ({r['source']})"))
        elif r["sha256"] is None:
            missing.append(n)
        else:
            bad.append(n)
            out.append(Check(FAIL, "weights", f"{n}: {r['reason']}"))
    s = cfg.enhancer_settings()
    for ref in (s.face_model, s.background_model, s.detector_model):
        if ref.endswith(".pth") and ref in _refs_used(cfg):
            p = Path(ref)
            out.append(Check(OK, "weights", f"{p} (local file)") if p.is_file() else
                       Check(FAIL, "weights", f"{p}: no such file", "fix enhance.models, or copy the file there"))
    if missing or bad:
        todo = missing + bad
        offline = [n for n in todo if any(src.converter for src in manifest[n].sources)]
        online = [n for n in todo if n not in offline]
        note = "" if not online else " (from GitHub; none has an offline source)" if not offline else \
            f" ({', '.join(online)} only from GitHub: no offline source)"
        if missing:
            out.append(Check(FAIL, "weights", f"missing in {cfg.weights_dir}: {', '.join(missing)}{note}"))
        out.append(Check(FAIL, "weights", f"{len(todo)} of {len(names)} needed weights not usable",
                         f"{prog} --config {shlex.quote(str(config_path))} weights fetch {' '.join(todo)}"))
    return out, not (missing or bad or any(c.ok is FAIL for c in out))


def _refs_used(cfg: Config) -> set[str]:
    s = cfg.enhancer_settings()
    refs: set[str] = set()
    for profile, _ in s.needs:
        if profile in ("faces", "full"):
            refs |= {s.face_model, s.detector_model}
        if profile in ("full", "upscale"):
            refs.add(s.background_model)
    return refs


def device_checks(cfg: Config) -> tuple[list[Check], bool]:
    try:
        from enhancer import probe
        plan = probe.device_plan(cfg.enhance.device, cfg.enhance.precision)
    except ImportError as exc:
        return [Check(FAIL, "device", f"the model stack cannot be imported ({exc}); `pip install .` installs only the light CLI",
                      "run scripts/setup (it installs torch and the model libraries pinned)")], False
    except Exception as exc:  # noqa: BLE001  (DeviceError, ValueError: reported with the fix)
        return [Check(FAIL, "device", f"enhance.device {cfg.enhance.device} / precision "
                      f"{cfg.enhance.precision}: {exc}", "set enhance.device: auto and enhance.precision: auto")], False
    what = plan["device"] + (f" ({plan['name']}" + (f", {plan['threads']} threads" if plan.get("threads") else "")
                             + f", {_gib(plan['memory_bytes'])} free)")
    src = f"auto → {what}: {plan['why_device']}" if cfg.enhance.device == "auto" else f"{cfg.enhance.device} → {what}"
    prec = f"{cfg.enhance.precision} → {plan['precision']}: {plan['why']}"
    return [Check(OK, "device", src), Check(OK, "precision", prec),
            Check(INFO, "torch", f"{plan['torch']}, CPU capability {plan['cpu_capability']}")], True


def bench_checks(cfg: Config) -> Iterator[Check]:
    from enhancer import probe
    settings = cfg.enhancer_settings()
    try:
        r = probe.benchmark(settings, megapixels=PHOTO_MEGAPIXELS)
    except Exception as exc:  # noqa: BLE001  (reported: a benchmark that fails means run would too)
        yield Check(FAIL, "benchmark", f"building the enhancer failed: {type(exc).__name__}: {exc}",
                    "see the message; `run` would fail the same way")
        return
    yield Check(INFO, "benchmark", f"models loaded and warmed in {r['load_s']:g} s "
                f"({r['device']}, {r['precision']}) — `run` takes about as long before READY")
    for row in r["profiles"]:
        faces = f" + {row['per_face_s']:g} s per face" if row["per_face_s"] is not None else ""
        yield Check(OK, "benchmark", f"{row['profile']} ×{row['upscale']:g}: ~{_secs(row['seconds'])} per "
                    f"{PHOTO_MEGAPIXELS:g} MP photo{faces}")
    how = (f"timed one {r['probe_tile']}² tile and scaled by pixels"
           + (f" (tiles of {r['tile']} px with overlap)" if r.get("tile") else "")
           + "; the detector on a small image scaled to its 1600 px input; one 512² face restore"
           + f"; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs while measuring")
    yield Check(INFO, "benchmark", how)


def _secs(s: float) -> str:
    if s >= 120:
        return f"{s / 60:.0f} min"
    return f"{s:.1f} s" if s < 10 else f"{s:.0f} s"


def systemd_checks(run: Callable[[list[str]], str | None] | None = None) -> Iterator[Check]:
    installed = [u for u in UNITS if any(Path(d, u).is_file() for d in SYSTEMD_UNIT_DIRS)]
    if not installed:
        yield Check(INFO, "systemd", "no photoenhanced unit installed (optional: sudo scripts/install-service)")
        return
    if not Path("/run/systemd/system").is_dir() or not shutil.which("systemctl"):
        yield Check(INFO, "systemd", f"{', '.join(installed)} installed, but systemd is not running here")
        return
    run = run or _systemctl
    for unit in installed:
        out = run(["show", "-p", "ActiveState,SubState,UnitFileState,StatusText", unit]) or ""
        props = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        active, enabled = props.get("ActiveState", "?"), props.get("UnitFileState", "?")
        status = f" — {props['StatusText']}" if props.get("StatusText") else ""
        detail = f"{unit}: {active} ({props.get('SubState', '?')}), {enabled}{status}"
        if active == "failed":
            yield Check(FAIL, "systemd", detail, f"journalctl -u {unit} -e; then systemctl reset-failed {unit} "
                        f"&& systemctl start {unit}")
        else:
            yield Check(OK if active == "active" else INFO, "systemd", detail)


def _systemctl(args: list[str]) -> str | None:
    try:
        return subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def checks(cfg: Config, prog: str, config_path: Path, *, bench: bool = True) -> Iterator[Check]:
    yield Check(OK, "config", f"{config_path} parses")
    yield from folder_checks(cfg, prog)
    w, weights_ok = weight_checks(cfg, prog, config_path)
    yield from w
    d, device_ok = device_checks(cfg)
    yield from d
    if not bench:
        yield Check(INFO, "benchmark", "skipped (--no-bench)")
    elif not (weights_ok and device_ok):
        yield Check(INFO, "benchmark", "skipped until the weights and the device are there")
    else:
        yield from bench_checks(cfg)
    yield from systemd_checks()
