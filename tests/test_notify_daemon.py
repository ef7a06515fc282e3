"""The real daemon's sd_notify sequence over a fake NOTIFY_SOCKET, and journald priorities."""
from __future__ import annotations

import json
import signal
import socket

from conftest import make_jpeg, wait_for, write_config


class Sock:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.s.bind(str(path))
        self.s.settimeout(0.05)
        self.msgs: list[str] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.msgs.append(self.s.recv(65536).decode())
            except (TimeoutError, socket.timeout):
                return self.msgs

    def wait(self, field: str, timeout: float = 30) -> str:
        return wait_for(lambda: next((m for m in self.drain() if field in m.split("\n")), None), timeout,
                        what=f"{field} on the notify socket")

    def fields(self) -> list[str]:
        return [f for m in self.drain() for f in m.split("\n")]


def test_notify_sequence_ready_status_watchdog_reload_stopping(tmp_path, daemon_factory):
    cfg = write_config(tmp_path)
    sock = Sock(tmp_path / "notify.sock")
    d = daemon_factory(cfg, env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "2000000"})
    ready = sock.wait("READY=1")
    fields = sock.fields()
    first_ready = fields.index("READY=1")
    assert any(f.startswith("EXTEND_TIMEOUT_USEC=") for f in fields[:first_ready]), "no EXTEND_TIMEOUT before READY"
    assert "STATUS=idle" in ready or any(f.startswith("STATUS=idle") for f in fields)
    wait_for(lambda: sock.fields().count("WATCHDOG=1") >= 2, 10, what="watchdog pings")
    make_jpeg(tmp_path / "inbox" / "n.jpg")
    wait_for((tmp_path / "outbox" / "n.jpg.json").exists, 20, what="done")
    wait_for(lambda: any("done today" in f and "1 done" in f for f in sock.fields()), 10, what="status after job")
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "RELOADING=1" in sock.fields(), 10, what="RELOADING=1")
    fields = sock.fields()
    i = fields.index("RELOADING=1")
    assert fields[i + 1].startswith("MONOTONIC_USEC=")
    wait_for(lambda: "READY=1" in sock.fields()[i:], 10, what="READY=1 after reload")
    assert d.stop() == 0
    assert "STOPPING=1" in sock.fields()


def test_missing_weights_ready_with_waiting_status(tmp_path, daemon_factory):
    cfg = write_config(tmp_path)
    sock = Sock(tmp_path / "notify.sock")
    d = daemon_factory(cfg, env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
                                 "FAKE_WEIGHTS": str(tmp_path / "never")})
    msg = sock.wait("READY=1")
    status = [f for f in msg.split("\n") if f.startswith("STATUS=")]
    assert status and "weights missing" in status[0] and "photoenhanced weights fetch" in status[0]
    assert d.stop() == 0


def test_journald_lines_carry_syslog_priorities(tmp_path):
    import os
    import subprocess
    import sys
    from conftest import ROOT
    cfg = write_config(tmp_path, watch__setle_seconds=1)
    out = tmp_path / "out.log"
    with open(out, "wb") as f:
        st = os.fstat(f.fileno())
        env = {**os.environ, "PYTHONPATH": str(ROOT), "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        rc = subprocess.run([sys.executable, str(ROOT / "tests" / "run_daemon.py"), "--config", str(cfg), "run"],
                            stdout=f, stderr=subprocess.DEVNULL, env=env, timeout=60).returncode
    assert rc == 78
    lines = [l for l in out.read_text().splitlines() if l.strip()]
    assert lines and all(l.startswith("<") for l in lines)
    err = [l for l in lines if l.startswith("<3>")]
    assert err and json.loads(err[0][3:])["event"] == "config.invalid"


def test_a_hostile_name_never_injects_a_notify_field(tmp_path, daemon_factory):
    """A file named with newlines and systemd field names is processed; its name reaches STATUS=
    escaped, as one field, and no datagram carries a field it spelled."""
    import os
    from watcher import names
    cfg = write_config(tmp_path)
    sock = Sock(tmp_path / "notify.sock")
    d = daemon_factory(cfg, env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "FAKE_DELAY": "1.5"})
    sock.wait("READY=1")
    name = "x\nWATCHDOG=trigger\nREADY=1\nSTATUS=pwned.jpg"
    make_jpeg(tmp_path / "inbox" / name)
    shown = names.display(name)
    wait_for(lambda: any(f.startswith("STATUS=") and shown in f for f in sock.fields()), 30,
             what="STATUS naming the photo")
    wait_for(lambda: os.path.exists(tmp_path / "outbox" / (name + ".json")), 30, what="done")
    assert d.stop() == 0
    for m in sock.drain():
        for f in m.split("\n"):
            assert f not in ("WATCHDOG=trigger", "STATUS=pwned.jpg")
            assert f.split("=", 1)[0] in ("READY", "STATUS", "WATCHDOG", "EXTEND_TIMEOUT_USEC", "STOPPING",
                                          "RELOADING", "MONOTONIC_USEC"), f
