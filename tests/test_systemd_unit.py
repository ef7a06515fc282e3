"""Cheap checks of the unit file and of the sd_notify client, without booting anything.

The booted proof is tests/test_systemd_boot.py."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from watcher.notify import Notifier

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "photoenhanced.service"
MAX_EXPOSURE = 2.0


def _analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "systemd"], check=False,
                       capture_output=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.fail("systemd-analyze is missing (apt-get install systemd)")
    return exe


def _unit_settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key, []).append(value)
    return out


@pytest.fixture()
def unit_copy(tmp_path: Path) -> Path:
    """The unit with only ExecStart pointed at a stand-in executable (verify checks that it exists);
    every other line is the shipped file's."""
    exe = tmp_path / "opt/photoenhanced/.venv/bin/photoenhanced"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    text = UNIT.read_text()
    assert text.count("ExecStart=/opt/photoenhanced/") == 1
    unit = tmp_path / "photoenhanced.service"
    unit.write_text(text.replace("ExecStart=/opt/photoenhanced/", f"ExecStart={tmp_path}/opt/photoenhanced/"))
    return unit


def _verify(unit: Path) -> subprocess.CompletedProcess:
    return subprocess.run([_analyze(), "verify", str(unit)], capture_output=True, text=True, timeout=60)


def test_unit_has_the_contract_settings():
    s = _unit_settings(UNIT.read_text())
    assert s["Type"] == ["notify"]
    assert s["NotifyAccess"] == ["main"]
    assert s["ExecStart"] == ["/opt/photoenhanced/.venv/bin/photoenhanced --config /etc/photoenhanced/config.yaml run"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["Restart"] == ["on-failure"]
    assert s["RestartPreventExitStatus"] == ["78"]
    assert int(s["WatchdogSec"][0]) >= 30
    assert float(s["TimeoutStopSec"][0]) > 20          # jobs.stop_timeout's default
    assert s["User"] == ["photoenhanced"]
    assert s["StateDirectory"] == ["photoenhanced"] and s["ConfigurationDirectory"] == ["photoenhanced"]
    assert s["ProtectSystem"] == ["strict"] and s["NoNewPrivileges"] == ["yes"]
    assert "PrivateDevices" not in s                    # it would hide /dev/nvidia*
    assert s["DevicePolicy"] == ["closed"]
    allowed = " ".join(s["DeviceAllow"])
    assert "char-nvidia-frontend" in allowed and "char-nvidia-uvm" in allowed and "char-drm" in allowed
    assert s["CapabilityBoundingSet"] == [""]


def test_systemd_analyze_verify_is_clean(unit_copy: Path):
    # verify exits 0 even on unknown keys: the stderr is the verdict.
    res = _verify(unit_copy)
    assert res.stderr.strip() == "" and res.returncode == 0, res.stderr


def test_systemd_analyze_verify_catches_a_typo(unit_copy: Path):
    """The check above would see a mistake (a guard against a verify that says nothing)."""
    unit_copy.write_text(unit_copy.read_text().replace("ProtectHome=yes", "ProtectHomme=yes"))
    res = _verify(unit_copy)
    assert "ProtectHomme" in res.stderr


def test_security_exposure_is_at_most_2(tmp_path: Path):
    unit = tmp_path / "photoenhanced.service"
    shutil.copy(UNIT, unit)
    res = subprocess.run([_analyze(), "security", "--offline=yes", "--no-pager", str(unit)],
                         capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", res.stdout + res.stderr)
    assert m, res.stdout + res.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE, res.stdout


# --- sd_notify over a fake NOTIFY_SOCKET -----------------------------------------------------

@pytest.fixture()
def notify_socket(tmp_path: Path):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    yield path, sock
    sock.close()


def _drain(sock: socket.socket) -> list[str]:
    msgs = []
    sock.settimeout(0.05)
    try:
        while True:
            msgs.append(sock.recv(4096).decode())
    except (TimeoutError, socket.timeout):
        pass
    sock.settimeout(2)
    return msgs


def test_notifier_without_socket_is_a_noop():
    n = Notifier({})
    assert not n.enabled and n.watchdog_interval == 0.0
    n.ready("x"); n.status("y"); n.watchdog(); n.stopping(); n.reloading(); n.extend_timeout(5)


def test_notify_sequence_over_a_fake_socket(notify_socket):
    path, sock = notify_socket
    n = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())})
    assert n.enabled and n.watchdog_interval == 2.0
    n.extend_timeout(90)
    n.ready("idle · 0 queued")
    n.status("idle · 0 queued")                    # same text: not sent again
    n.status("enhancing a/IMG_1.jpg · 1 of 1")
    n.watchdog(); n.watchdog(); n.watchdog()       # one ping per quarter interval (0.5 s)
    n.reloading()
    n.reloaded("idle · 0 queued")
    n.stopping()
    got = _drain(sock)
    assert got[0] == "EXTEND_TIMEOUT_USEC=90000000"
    assert got[1] == "READY=1\nSTATUS=idle · 0 queued"
    assert got[2] == "STATUS=enhancing a/IMG_1.jpg · 1 of 1"
    assert got[3] == "WATCHDOG=1"
    reload_fields = got[4].split("\n")
    assert reload_fields[0] == "RELOADING=1"
    usec = int(reload_fields[1].removeprefix("MONOTONIC_USEC="))
    assert abs(usec - time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000) < 5_000_000
    assert got[5] == "READY=1\nSTATUS=idle · 0 queued"
    assert got[6] == "STOPPING=1\nSTATUS=stopping"
    assert len(got) == 7


def test_watchdog_pings_again_after_a_quarter_interval(notify_socket):
    path, sock = notify_socket
    n = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"})
    n.watchdog()
    n.watchdog()
    time.sleep(0.06)                               # > 200 ms / 4
    n.watchdog()
    assert _drain(sock) == ["WATCHDOG=1", "WATCHDOG=1"]


def test_watchdog_for_another_pid_is_ignored(notify_socket):
    path, sock = notify_socket
    n = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert n.watchdog_interval == 0.0
    n.watchdog()
    n.status("hello")
    assert _drain(sock) == ["STATUS=hello"]


def test_abstract_socket_name(tmp_path: Path):
    name = f"photoenhanced-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    try:
        Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        sock.settimeout(2)
        assert sock.recv(100) == b"READY=1"
    finally:
        sock.close()


def test_a_vanished_socket_is_logged_not_raised(tmp_path: Path):
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    n.ready("x")                                   # ENOENT: must not raise
    assert n.enabled
