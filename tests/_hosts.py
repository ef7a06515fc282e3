"""Several photoenhanced daemons as several "hosts" sharing one inbox/outbox/failed/archive and one
PostgreSQL queue, each with its own state_dir (so its own host id and temp sub-folder).

Each host runs in its own network namespace, joined to the test's namespace (which holds the
PostgreSQL cluster) by a veth pair: 10.X.N.2 (host) ↔ 10.X.N.1 (PostgreSQL's side, X per test process). A network
cut is `ip link set <veth> down` on PostgreSQL's side. The folders are either one local folder all
namespaces see (they share the mount namespace), or an SMB share that each host mounts itself over
its veth (tests/_smbhosts.py), so that a cut takes its share away too. Where namespaces cannot be made (no
root, no `ip`), hosts run on loopback and a "cut" is SIGSTOP/SIGCONT of the daemon (the same
silence as seen from the queue: its lease expires, its late writes are fenced off).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


class Net:
    """One network namespace per host, or loopback when namespaces are not available."""
    made = 0                                   # Nets made by this process (names and subnets differ)

    def __init__(self, n: int):
        self.n = n
        Net.made += 1
        self.tag = f"{os.getpid() % 10000:04d}{Net.made % 10}"
        # a /16 of its own per test process and per Net: two runs at once (two engineers, two
        # sessions) must not route each other's 10.x.N.1 addresses (nor share smbd's port-445
        # addresses), nor a later test a namespace an earlier one left behind (a process still in it)
        self.net16 = 100 + (os.getpid() + 37 * Net.made) % 150
        self.cidr = f"10.{self.net16}.0.0/16"
        self.namespaces: list[str] = []
        self.netns = False
        self.why = ""
        try:
            for i in range(1, n + 1):
                ns, vr, vn = f"pe{self.tag}h{i}", f"pe{self.tag}r{i}", f"pe{self.tag}n{i}"
                _ip("netns", "add", ns)
                self.namespaces.append(ns)
                _ip("link", "add", vr, "type", "veth", "peer", "name", vn)
                _ip("link", "set", vn, "netns", ns)
                _ip("addr", "add", f"10.{self.net16}.{i}.1/24", "dev", vr)
                _ip("link", "set", vr, "up")
                _ip("-n", ns, "addr", "add", f"10.{self.net16}.{i}.2/24", "dev", vn)
                _ip("-n", ns, "link", "set", vn, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
            self.netns = True
        except (OSError, subprocess.CalledProcessError) as exc:
            self.why = getattr(exc, "stderr", None) or str(exc)
            self.close()

    def db_host(self, i: int) -> str:
        return f"10.{self.net16}.{i}.1" if self.netns else "127.0.0.1"

    def ns(self, i: int) -> str:
        return self.namespaces[i - 1]

    def prefix(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[i - 1]] if self.netns else []

    def cut(self, i: int, proc: "Host") -> None:
        if self.netns:
            _ip("link", "set", f"pe{self.tag}r{i}", "down")
        else:
            proc.proc.send_signal(signal.SIGSTOP)

    def restore(self, i: int, proc: "Host") -> None:
        if self.netns:
            _ip("link", "set", f"pe{self.tag}r{i}", "up")
        else:
            proc.proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        for i, ns in enumerate(self.namespaces, 1):
            _ip("link", "del", f"pe{self.tag}r{i}", check=False)   # the pair goes at once, even while a
            _ip("netns", "del", ns, check=False)                    # process still holds the namespace
        self.namespaces = []


def host_config(base: Path, i: int, url: str, lease_s: float, folders: Path | None = None,
                watch: dict | None = None, **jobs) -> Path:
    """Host i's config under base/host{i}: its own state_dir (local), the shared folders under
    `folders` (default: base itself; e.g. this host's SMB mount of the share)."""
    d = base / f"host{i}"
    d.mkdir(parents=True, exist_ok=True)
    folders = folders or base
    cfg = {
        "folders": {k: str(folders / k) for k in ("inbox", "outbox", "failed", "archive")},
        "state_dir": str(d / "state"),
        "weights_dir": str(d / "weights"),
        "watch": {"mode": "events", "settle_seconds": 0.3, "rescan_interval": 2, "poll_interval": 0.3,
                  **(watch or {})},
        "enhance": {"profile": "upscale", "upscale": 2},
        "jobs": {"max_attempts": 3, "backoff_seconds": [0.2], "stop_timeout": 5, "max_interruptions": 1000,
                 **jobs},
        "queue": {"url": url, "lease_seconds": lease_s},
    }
    (folders / "inbox").mkdir(exist_ok=True)
    path = d / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class Host:
    """One daemon (tests/run_daemon.py, the fake enhancer) in its namespace."""

    def __init__(self, i: int, config: Path, prefix: list[str], env: dict | None = None):
        self.i, self.config = i, config
        self.logs: list[Path] = []
        self.prefix, self.env = prefix, env or {}
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        log = self.config.parent / f"daemon-{len(self.logs)}.log"
        self.logs.append(log)
        e = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
        e.update({"PYTHONPATH": str(ROOT), **self.env})
        self.proc = subprocess.Popen([*self.prefix, PY, str(ROOT / "tests" / "run_daemon.py"), "--config",
                                      str(self.config), "--log-format", "json", "run"],
                                     stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=e, start_new_session=True)

    def events(self, name: str | None = None) -> list[dict]:
        out = []
        for log in self.logs:
            for line in log.read_text(errors="replace").splitlines():
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                if name is None or ev.get("event") == name:
                    out.append(ev)
        return out

    def wait_event(self, name: str, timeout: float = 60, after: int = 0) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            evs = self.events(name)
            if len(evs) > after:
                return evs[after]
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"host{self.i}: no {name} within {timeout}s:\n" +
                             self.logs[-1].read_text(errors="replace")[-3000:])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(10)

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)
