"""A booted systemd in a container, for tests/test_systemd_boot.py.

`scripts/rig-systemd rootfs` gives a cached Debian minbase tarball (debootstrap once, ~1 min);
`Container` unpacks it, boots it with systemd-nspawn (`--volatile=overlay`: writes stay in RAM),
and runs commands inside with nsenter. The checkout, its venv and the host interpreter the venv
points to are bound read-only at the same paths, so the service runs this checkout's code without
a second 6 GB venv.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RIG = ROOT / "scripts" / "rig-systemd"


class RigUnavailable(Exception):
    """The rig cannot run here; the message says precisely why."""


def host_binds() -> list[Path]:
    """Paths the container needs read-only: the checkout, the venv (if it lives elsewhere) and the
    interpreter prefix the venv was made from."""
    venv = ROOT / ".venv"
    paths = [ROOT, venv.resolve(), Path(os.path.realpath(sys.base_prefix))]
    out: list[Path] = []
    for p in paths:
        if not any(p == q or q in p.parents for q in out):
            out = [q for q in out if p not in q.parents] + [p]
    return out


def rootfs_tarball() -> Path:
    if os.geteuid() != 0:
        raise RigUnavailable("needs root (debootstrap, systemd-nspawn, nsenter)")
    if not RIG.exists():
        raise RigUnavailable(f"{RIG} missing")
    res = subprocess.run([str(RIG), "tools"], capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise RigUnavailable(f"cannot install debootstrap/systemd-container: {res.stderr.strip()[-400:]}")
    res = subprocess.run([str(RIG), "rootfs"], capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        raise RigUnavailable(f"rootfs build failed: {res.stderr.strip()[-600:]}")
    return Path(res.stdout.strip().splitlines()[-1])


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class Container:
    def __init__(self, tarball: Path, workdir: Path, name: str = "photoenhanced-test"):
        self.tarball = tarball
        self.root = workdir / "root"
        self.name = f"{name}-{os.getpid()}"
        self.console = workdir / "console.log"
        self.proc: subprocess.Popen | None = None
        self.leader = 0

    # --- life cycle ---------------------------------------------------------------------------
    def boot(self, timeout: float = 60) -> float:
        """Unpack, boot, wait until `systemctl is-system-running` settles. Returns seconds taken."""
        t0 = time.monotonic()
        self.root.mkdir(parents=True)
        unpack = subprocess.run(f"zstd -dc {shlex.quote(str(self.tarball))} | tar -C {shlex.quote(str(self.root))} -xf -",
                                shell=True, capture_output=True, text=True)
        if unpack.returncode != 0:
            raise RigUnavailable(f"cannot unpack {self.tarball}: {unpack.stderr.strip()[-300:]}")
        for p in host_binds():                      # mount points for the binds
            (self.root / p.relative_to("/")).mkdir(parents=True, exist_ok=True)
        cmd = ["systemd-nspawn", "-q", "-D", str(self.root), "--volatile=overlay", "--register=no",
               "--keep-unit", "--console=read-only", f"--machine={self.name[:64]}", "--boot"]
        cmd[1:1] = []
        for p in host_binds():
            cmd.insert(-1, f"--bind-ro={p}")
        with open(self.console, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RigUnavailable(f"systemd-nspawn exited {self.proc.returncode}: "
                                     f"{self.console.read_text(errors='replace')[-800:]}")
            kids = _children(self.proc.pid)
            if kids and Path(f"/proc/{kids[0]}/comm").read_text().strip() == "systemd":
                self.leader = kids[0]
                break
            time.sleep(0.05)
        else:
            raise RigUnavailable(f"no systemd in the container after {timeout}s: {self.console.read_text(errors='replace')[-800:]}")
        while time.monotonic() < deadline:
            state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
            if state in ("running", "degraded"):
                break
            time.sleep(0.1)
        else:
            raise RigUnavailable(f"container systemd did not finish booting (state {state!r})")
        # The host interpreter may live under /root (pyenv): let the service user traverse to it.
        # (A real install uses a system interpreter; ProtectHome= is handled by install-service.)
        self.run("chmod", "0711", "/root")
        return time.monotonic() - t0

    def close(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)    # nspawn asks the container's systemd to power off
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)
        self.proc = None

    # --- commands inside ------------------------------------------------------------------------
    def run(self, *argv: str, check: bool = True, timeout: float = 120, input: str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        if not self.leader:
            raise RuntimeError("container not booted")
        envs = [f"{k}={v}" for k, v in {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                                          "LANG": "C.UTF-8", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0",
                                          **(env or {})}.items()]
        cmd = ["nsenter", "-t", str(self.leader), "-a", "--", "/usr/bin/env", "-i", *envs, *argv]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)
        if check and res.returncode != 0:
            raise AssertionError(f"in container: {shlex.join(argv)} → {res.returncode}\n"
                                 f"stdout: {res.stdout[-2000:]}\nstderr: {res.stderr[-2000:]}")
        return res

    def sh(self, script: str, **kw) -> subprocess.CompletedProcess:
        return self.run("/bin/bash", "-euo", "pipefail", "-c", script, **kw)

    def write(self, path: str, text: str, mode: str = "0644", owner: str = "root:root") -> None:
        self.run("/bin/bash", "-c", f'umask 077; cat > "$1.tmp" && chown {owner} "$1.tmp" && chmod {mode} "$1.tmp" '
                 f'&& mv "$1.tmp" "$1"', "_", path, input=text)

    def read(self, path: str) -> str:
        return self.run("cat", path).stdout

    def exists(self, path: str) -> bool:
        return self.run("test", "-e", path, check=False).returncode == 0

    # --- systemd helpers ------------------------------------------------------------------------
    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str, *args: str) -> list[dict]:
        out = self.run("journalctl", "-u", unit, "-o", "json", "--no-pager", *args, check=False).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def events(self, unit: str, *args: str) -> list[dict]:
        """The daemon's JSON log events from the journal, each with the journal's PRIORITY added."""
        out = []
        for entry in self.journal(unit, *args):
            msg = entry.get("MESSAGE")
            if isinstance(msg, list):                       # journald gives bytes as a list of ints
                msg = bytes(msg).decode(errors="replace")
            if isinstance(msg, str) and msg.startswith("{"):
                try:
                    ev = json.loads(msg)
                except ValueError:
                    continue
                ev["_priority"] = int(entry.get("PRIORITY", -1))
                ev["_pid"] = int(entry.get("_PID", 0) or 0)
                out.append(ev)
        return out

    def wait_for(self, what: str, check, timeout: float = 60, interval: float = 0.25):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = check()
            if last:
                return last
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
