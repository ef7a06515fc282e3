"""Proof in a real systemd (issue 5): a booted Debian container (systemd-nspawn), the service
installed by scripts/install-service, and each promise of the unit checked from outside, the way
an admin would see it (systemctl, journalctl, the folders).

One container for the module; the tests run in file order and build on each other (install →
start → photo → … → uninstall). Cost: ~1 min debootstrap on the first run (cached as a tarball,
see scripts/rig-systemd), then ~2 s boot + the daemon's own start-ups.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from systemd_rig import Container, RigUnavailable, ROOT, rootfs_tarball

pytestmark = pytest.mark.systemd

UNIT = "photoenhanced.service"
CONF = "/etc/photoenhanced/config.yaml"
PE = "/opt/photoenhanced/.venv/bin/photoenhanced"
PY = str(ROOT / ".venv" / "bin" / "python")
SRV = "/srv/photoenhanced"
CONFIG = """\
folders: {inbox: /srv/photoenhanced/inbox, outbox: /srv/photoenhanced/outbox,
          failed: /srv/photoenhanced/failed, archive: /srv/photoenhanced/archive}
state_dir: /var/lib/photoenhanced
weights_dir: /var/lib/photoenhanced/weights
watch: {settle_seconds: 0.3, poll_interval: 1, rescan_interval: 30}
enhance: {profile: upscale, upscale: UPSCALE, device: cpu, tile: 0, models: {background: realesrgan-x4plus}}
jobs: {stop_timeout: 20, max_attempts: 2, backoff_seconds: [1]}
log: {level: info}
"""
TIMINGS: dict[str, float] = {}


def config(upscale: int = 2) -> str:
    return CONFIG.replace("UPSCALE", str(upscale))


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    t0 = time.monotonic()
    try:
        tarball = rootfs_tarball()
    except RigUnavailable as exc:
        pytest.skip(f"booted-systemd rig unavailable: {exc}")
    TIMINGS["rootfs"] = time.monotonic() - t0
    c = Container(tarball, tmp_path_factory.mktemp("systemd-rig"))
    try:
        TIMINGS["boot"] = c.boot()
    except RigUnavailable as exc:
        c.close()
        pytest.skip(f"booted-systemd rig unavailable: {exc}")
    yield c
    c.close()
    TIMINGS["total"] = time.monotonic() - t0
    Path(ROOT / ".pytest_cache").mkdir(exist_ok=True)
    (ROOT / ".pytest_cache" / "systemd-boot-timings.json").write_text(json.dumps(TIMINGS, indent=1))


def main_pid(c: Container) -> int:
    return int(c.show(UNIT, "MainPID")["MainPID"])


def drop(c: Container, name: str, size: int = 32, garbage: bool = False) -> None:
    """A photo appears in the inbox at once (written beside it, then renamed in)."""
    if garbage:
        c.sh(f"head -c 2000 /dev/urandom > {SRV}/.{name}.part && mv {SRV}/.{name}.part {SRV}/inbox/{name}")
        return
    c.run(PY, "-c", "import sys, numpy as np; from PIL import Image; rng = np.random.default_rng(len(sys.argv[1]));"
          f"Image.fromarray(rng.integers(0, 255, ({size}, {size}, 3), dtype=np.uint8)).save('{SRV}/.tmp.png');"
          f"import os; os.rename('{SRV}/.tmp.png', '{SRV}/inbox/' + sys.argv[1])", name)


def image_size(c: Container, path: str) -> tuple[int, int]:
    out = c.run(PY, "-c", "import sys; from PIL import Image; print(*Image.open(sys.argv[1]).size)", path).stdout
    w, h = out.split()
    return int(w), int(h)


def wait_done(c: Container, name: str, timeout: float = 120) -> None:
    c.wait_for(f"outbox/{name} + sidecar",
               lambda: c.exists(f"{SRV}/outbox/{name}") and c.exists(f"{SRV}/outbox/{name}.json"), timeout)


def wait_active(c: Container, other_than: int = 0, timeout: float = 120) -> int:
    def ok():
        s = c.show(UNIT, "ActiveState", "SubState", "MainPID")
        pid = int(s["MainPID"])
        return pid if s["ActiveState"] == "active" and s["SubState"] == "running" and pid and pid != other_than else 0
    return c.wait_for("the service active and running", ok, timeout)


def reload(c: Container, pid: int, expect: str) -> None:
    """`systemctl reload` with ExecReload=kill -HUP returns once the signal is sent (systemd < 253
    has no Type=notify-reload); the daemon's RELOADING=1 … READY=1 follows. Wait for its event."""
    before = sum(e["event"] == expect for e in events_of(c, pid))
    c.run("systemctl", "reload", UNIT, timeout=300)
    c.wait_for(expect, lambda: sum(e["event"] == expect for e in events_of(c, pid)) > before, timeout=180)
    c.wait_for("active again", lambda: c.show(UNIT, "ActiveState")["ActiveState"] == "active", timeout=60)


def events_of(c: Container, pid: int | None = None, *args: str) -> list[dict]:
    evs = c.events(UNIT, *args)
    return [e for e in evs if pid is None or e["_pid"] == pid]


# --- the checks, in order ---------------------------------------------------------------------

def test_install_service_starts_and_waits_for_weights(box: Container):
    box.write("/root/test-config.yaml", config(2))
    t0 = time.monotonic()
    res = box.run(str(ROOT / "scripts" / "install-service"), "--venv", str(ROOT / ".venv"),
                  "--config", "/root/test-config.yaml", timeout=600)
    TIMINGS["install"] = time.monotonic() - t0
    assert "wrote /etc/photoenhanced/config.yaml" in res.stdout
    s = box.show(UNIT, "ActiveState", "StatusText", "User", "UnitFileState")
    assert s["ActiveState"] == "active" and s["UnitFileState"] == "enabled" and s["User"] == "photoenhanced"
    assert s["StatusText"].startswith("waiting: weights missing") and "weights fetch" in s["StatusText"]
    dropin = box.read("/etc/systemd/system/photoenhanced.service.d/10-install.conf")
    assert f"-{SRV}/inbox" in dropin and f"-{SRV}/outbox" in dropin and "TimeoutStopSec=30" in dropin
    # The service user owns the folders it creates; the config is never overwritten by a re-run.
    assert box.run("stat", "-c", "%U", f"{SRV}/inbox").stdout.strip() == "photoenhanced"
    box.write("/root/other.yaml", config(3))
    again = box.run(str(ROOT / "scripts" / "install-service"), "--venv", str(ROOT / ".venv"),
                    "--config", "/root/other.yaml", "--no-start", timeout=600)
    assert "keeping the existing /etc/photoenhanced/config.yaml" in again.stdout
    assert "upscale: 2" in box.read(CONF)


def test_start_returns_only_after_ready(box: Container):
    t0 = time.monotonic()
    box.run("runuser", "-u", "photoenhanced", "--", PE, "--config", CONF, "weights", "fetch", "realesrgan-x4plus",
            timeout=600)
    TIMINGS["weights_fetch"] = time.monotonic() - t0
    t0 = time.monotonic()
    box.run("systemctl", "restart", UNIT, timeout=300)
    TIMINGS["start_to_ready"] = time.monotonic() - t0
    pid = main_pid(box)
    names = [e["event"] for e in events_of(box, pid)]
    # systemctl returned, so READY=1 was already sent: the warm models and the ready event are logged.
    assert "models.ready" in names and "daemon.ready" in names
    assert names.index("models.ready") < names.index("daemon.ready")
    s = box.show(UNIT, "ActiveState", "StatusText", "ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic")
    assert s["ActiveState"] == "active" and not s["StatusText"].startswith("waiting")
    # Type=notify: "active" began when READY came, after the weights load + warm-up, not at exec.
    assert int(s["ActiveEnterTimestampMonotonic"]) - int(s["ExecMainStartTimestampMonotonic"]) > 300_000


def test_a_dropped_photo_comes_out_in_the_outbox(box: Container):
    drop(box, "a.png")
    wait_done(box, "a.png")
    assert image_size(box, f"{SRV}/outbox/a.png") == (64, 64)
    side = json.loads(box.read(f"{SRV}/outbox/a.png.json"))
    assert side["status"] == "done"
    assert box.exists(f"{SRV}/archive/a.png") and not box.exists(f"{SRV}/inbox/a.png")


def test_systemctl_status_shows_the_status_line(box: Container):
    text = box.wait_for("an idle STATUS", lambda: (t := box.show(UNIT, "StatusText")["StatusText"]).startswith("idle") and t)
    out = box.run("systemctl", "status", UNIT, "--no-pager", check=False).stdout
    assert f'Status: "{text}"' in out, out
    st = json.loads(box.run(PE, "--config", CONF, "status", "--json").stdout)
    assert st["daemon"]["running"] and st["daemon"]["pid"] == main_pid(box) and st["counts"]["done"] >= 1


def test_journal_has_json_events_with_priorities(box: Container):
    done = [e for e in events_of(box) if e["event"] == "job.done" and e.get("path") == "a.png"]
    assert done and {"job", "path", "ms"} <= done[0].keys() and done[0]["_priority"] == 6
    drop(box, "broken.png", garbage=True)
    box.wait_for("failed/broken.png", lambda: box.exists(f"{SRV}/failed/broken.png.json"))
    warn = events_of(box, None, "-p", "warning")
    assert warn and all(e["_priority"] <= 4 for e in warn)
    names = {e["event"] for e in warn}
    assert "job.failed" in names and "job.done" not in names and "daemon.ready" not in names
    failed = next(e for e in warn if e["event"] == "job.failed")
    assert failed["_priority"] == 3 and failed["path"] == "broken.png"
    # journalctl -o cat gives the bare JSON (the <N> prefix was consumed by journald).
    cat = box.run("journalctl", "-u", UNIT, "-o", "cat", "--no-pager", "-p", "err").stdout.splitlines()
    assert any(json.loads(line)["event"] == "job.failed" for line in cat if line.startswith("{"))


def test_reload_applies_a_changed_setting(box: Container):
    pid = main_pid(box)
    box.write(CONF, config(1), mode="0640", owner="root:photoenhanced")
    reload(box, pid, "config.reloaded")
    assert main_pid(box) == pid
    drop(box, "b.png")
    wait_done(box, "b.png")
    assert image_size(box, f"{SRV}/outbox/b.png") == (32, 32)       # upscale 1 now


def test_a_bad_config_on_reload_keeps_the_service_running(box: Container):
    pid = main_pid(box)
    box.write(CONF, config(1).replace("upscale: 1", "upscale: 1, upscael: 3"), mode="0640", owner="root:photoenhanced")
    reload(box, pid, "config.reload_failed")
    assert main_pid(box) == pid
    bad = [e for e in events_of(box, pid) if e["event"] == "config.reload_failed"]
    assert bad and bad[-1]["_priority"] == 3 and "upscael" in json.dumps(bad[-1])
    drop(box, "c.png")
    wait_done(box, "c.png")
    assert image_size(box, f"{SRV}/outbox/c.png") == (32, 32)       # the previous config is kept
    box.write(CONF, config(2), mode="0640", owner="root:photoenhanced")
    reload(box, pid, "config.reloaded")


def test_kill_9_restarts_and_loses_nothing(box: Container):
    pid = main_pid(box)
    restarts = int(box.show(UNIT, "NRestarts")["NRestarts"])
    names = [f"k{i}.png" for i in range(3)]
    for n in names:
        drop(box, n)
    box.wait_for("a job started", lambda: any(e["event"] == "job.started" and e.get("path") in names
                                              for e in events_of(box, pid)), timeout=60, interval=0.1)
    box.run("kill", "-9", str(pid))
    new = wait_active(box, other_than=pid, timeout=180)
    assert new != pid and int(box.show(UNIT, "NRestarts")["NRestarts"]) == restarts + 1
    for n in names:
        wait_done(box, n, timeout=180)
    out = box.run("ls", f"{SRV}/outbox").stdout.split()
    assert all(out.count(n) == 1 for n in names) and not any("(1)" in f for f in out), out
    assert not box.run("ls", f"{SRV}/inbox").stdout.split()


def test_a_stuck_worker_is_restarted_by_the_watchdog(box: Container):
    box.write("/etc/systemd/system/photoenhanced.service.d/50-test-watchdog.conf", "[Service]\nWatchdogSec=5\nTimeoutAbortSec=2\nRestartSec=1\n")
    box.run("systemctl", "daemon-reload")
    box.run("systemctl", "restart", UNIT, timeout=300)
    pid = main_pid(box)
    time.sleep(6)                          # longer than WatchdogSec: a live daemon keeps pinging
    assert main_pid(box) == pid
    restarts = int(box.show(UNIT, "NRestarts")["NRestarts"])
    box.run("kill", "-STOP", str(pid))
    t0 = time.monotonic()
    new = wait_active(box, other_than=pid, timeout=180)
    TIMINGS["watchdog_restart"] = time.monotonic() - t0
    assert int(box.show(UNIT, "NRestarts")["NRestarts"]) == restarts + 1
    sysmsgs = box.run("journalctl", "-u", UNIT, "--no-pager", "-o", "cat").stdout
    assert "Watchdog timeout" in sysmsgs
    box.run("rm", "/etc/systemd/system/photoenhanced.service.d/50-test-watchdog.conf")
    box.run("systemctl", "daemon-reload")
    drop(box, "w.png")
    wait_done(box, "w.png")
    assert main_pid(box) == new


def test_stop_drains_within_the_timeout(box: Container):
    pid = main_pid(box)
    drop(box, "s.png", size=48)
    box.wait_for("s.png started", lambda: any(e["event"] == "job.started" and e.get("path") == "s.png"
                                              for e in events_of(box, pid)), timeout=60, interval=0.1)
    t0 = time.monotonic()
    box.run("systemctl", "stop", UNIT, timeout=120)
    TIMINGS["stop"] = took = time.monotonic() - t0
    s = box.show(UNIT, "ActiveState", "Result", "ExecMainStatus", "TimeoutStopUSec")
    assert s["ActiveState"] == "inactive" and s["Result"] == "success" and s["ExecMainStatus"] == "0", s
    assert took < 30
    evs = events_of(box, pid)
    names = [e["event"] for e in evs]
    assert "daemon.stopping" in names and "daemon.stopped" in names
    st = json.loads(box.run(PE, "--config", CONF, "status", "--json").stdout)
    assert not st["daemon"]["running"]
    if "daemon.stop_timeout" in names:
        # The photo did not finish within jobs.stop_timeout: the daemon left it for the next start.
        TIMINGS["stop_drain"] = "stop_timeout"
        assert st["counts"]["running"] <= 1
    else:
        TIMINGS["stop_drain"] = "finished"
        assert st["counts"]["running"] == 0
        assert any(e["event"] == "job.done" and e.get("path") == "s.png" for e in evs)
    box.run("systemctl", "start", UNIT, timeout=300)
    wait_done(box, "s.png")                 # finished before the stop, or requeued and done now
    st = json.loads(box.run(PE, "--config", CONF, "status", "--json").stdout)
    assert st["counts"]["running"] == 0 and st["daemon"]["running"]


def test_a_bad_config_at_start_exits_78_without_a_restart_loop(box: Container):
    box.run("systemctl", "stop", UNIT, timeout=120)
    box.write(CONF, config(2).replace("profile: upscale", "profile: upscal"), mode="0640", owner="root:photoenhanced")
    res = box.run("systemctl", "start", UNIT, check=False, timeout=300)
    assert res.returncode != 0
    time.sleep(7)                           # > RestartSec=5: a restart would have happened by now
    s = box.show(UNIT, "ActiveState", "ExecMainStatus", "NRestarts", "Result")
    assert s["ActiveState"] == "failed" and s["ExecMainStatus"] == "78", s
    assert int(s["NRestarts"]) == 0         # counted since this (manual) start: no automatic restart
    err = [e for e in events_of(box) if e["event"] == "config.invalid"]
    assert err and err[-1]["_priority"] == 3
    box.write(CONF, config(2), mode="0640", owner="root:photoenhanced")
    box.run("systemctl", "reset-failed", UNIT)
    box.run("systemctl", "start", UNIT, timeout=300)
    assert box.show(UNIT, "ActiveState")["ActiveState"] == "active"


def test_uninstall_removes_the_service_and_keeps_the_data(box: Container):
    box.run(str(ROOT / "scripts" / "install-service"), "--uninstall", timeout=300)
    assert not box.exists("/etc/systemd/system/photoenhanced.service")
    assert not box.exists("/opt/photoenhanced")
    assert box.show(UNIT, "LoadState")["LoadState"] == "not-found"
    assert box.exists(CONF) and box.exists("/var/lib/photoenhanced/queue.sqlite3")
    assert box.exists(f"{SRV}/outbox/a.png")
