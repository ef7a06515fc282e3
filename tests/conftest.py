"""Shared fixtures for the watcher's tests: temp folders, a config file, the real daemon as a
subprocess (with the fake enhancer), small real images."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def write_config(tmp: Path, **over) -> Path:
    cfg = {
        "folders": {"inbox": "inbox", "outbox": "outbox", "failed": "failed", "archive": "archive"},
        "state_dir": "state",
        "weights_dir": "weights",
        "watch": {"mode": "events", "settle_seconds": 0.3, "rescan_interval": 2, "poll_interval": 0.3},
        "enhance": {"profile": "upscale", "upscale": 2},
        "jobs": {"max_attempts": 3, "backoff_seconds": [0.2, 0.2, 0.2], "stop_timeout": 5},
    }
    for key, val in over.items():
        sec, _, sub = key.partition("__")
        if sub:
            cfg.setdefault(sec, {})[sub] = val
        else:
            cfg[sec] = val
    for d in ("inbox",):
        (tmp / d).mkdir(exist_ok=True)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def make_jpeg(path: Path, size=(24, 16), color=(30, 120, 200), seed: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if seed is not None:
        rng = np.random.default_rng(seed)
        arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        arr[0, 0] = (10, 200, 10)
        img = Image.fromarray(arr)
    else:
        img = Image.new("RGB", size, color)
    img.save(path, "JPEG", quality=90)
    return path


class DaemonProc:
    def __init__(self, config: Path, env: dict | None = None):
        self.config = config
        self.log = config.parent / f"daemon-{time.monotonic_ns()}.log"
        e = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM", "WATCHDOG_USEC")}
        e.update({"PYTHONPATH": str(ROOT), **(env or {})})
        self.proc = subprocess.Popen([PY, str(ROOT / "tests" / "run_daemon.py"), "--config", str(config),
                                      "--log-format", "json", "run"],
                                     stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, env=e,
                                     start_new_session=True)

    def events(self) -> list[dict]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def wait_event(self, name: str, timeout: float = 30, **match) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for ev in self.events():
                if ev.get("event") == name and all(ev.get(k) == v for k, v in match.items()):
                    return ev
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {name} event within {timeout}s; log:\n{self.log.read_text()[-4000:]}")

    def stop(self, sig=signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def daemon_factory():
    procs: list[DaemonProc] = []

    def start(config: Path, env: dict | None = None) -> DaemonProc:
        d = DaemonProc(config, env)
        procs.append(d)
        return d

    yield start
    for d in procs:
        d.kill()


def wait_for(pred, timeout: float = 30, interval: float = 0.05, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def cli(config: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([PY, "-m", "watcher.cli", "--config", str(config), *args], capture_output=True,
                          text=True, env=e, timeout=120)


@contextmanager
def readonly(path: Path):
    """`path` read-only for everyone, root included (a read-only bind mount), unmounted after."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot bind-mount (needs root): {r.stderr.strip()}")
    try:
        r = subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot remount read-only: {r.stderr.strip()}")
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)
