"""systemd/photoenhanced-web.service: cheap checks (verify, exposure ≤ 2.0), then the unit as
scripts/install-service installs it, in a booted systemd (the rig of test_systemd_boot): active
beside the daemon, /healthz 200, the token 0600, a pause through the API reaches the daemon."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from systemd_rig import Container, RigUnavailable, ROOT, rootfs_tarball

UNIT = ROOT / "systemd" / "photoenhanced-web.service"
MAX_EXPOSURE = 2.0
PY = str(ROOT / ".venv" / "bin" / "python")
PE = "/opt/photoenhanced/.venv/bin/photoenhanced"
SRV = "/srv/photoenhanced"
CONFIG = f"""\
folders: {{inbox: {SRV}/inbox, outbox: {SRV}/outbox, failed: {SRV}/failed, archive: {SRV}/archive}}
state_dir: /var/lib/photoenhanced
weights_dir: /var/lib/photoenhanced/weights
enhance: {{profile: upscale, upscale: 2, device: cpu, models: {{background: realesrgan-x4plus}}}}
"""


def _settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            k, _, v = line.partition("=")
            out.setdefault(k, []).append(v)
    return out


def _analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.fail("systemd-analyze is missing (apt-get install systemd)")
    return exe


def test_web_unit_settings():
    s = _settings(UNIT.read_text())
    assert s["ExecStart"] == ["/opt/photoenhanced/.venv/bin/photoenhanced --config /etc/photoenhanced/config.yaml web"]
    assert s["Type"] == ["notify"] and s["User"] == ["photoenhanced"] and s["RestartPreventExitStatus"] == ["78"]
    assert s["ProtectSystem"] == ["strict"] and s["MemoryDenyWriteExecute"] == ["yes"]
    assert s["PrivateDevices"] == ["yes"] and s["CapabilityBoundingSet"] == [""]


def test_web_unit_verifies_and_exposure_is_at_most_2(tmp_path: Path):
    exe = tmp_path / "opt/photoenhanced/.venv/bin/photoenhanced"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("ExecStart=/opt/photoenhanced/", f"ExecStart={tmp_path}/opt/photoenhanced/"))
    res = subprocess.run([_analyze(), "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stderr.strip() == "", res.stderr
    res = subprocess.run([_analyze(), "security", "--offline=yes", "--no-pager", str(unit)],
                         capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", res.stdout + res.stderr)
    assert m and float(m.group(1)) <= MAX_EXPOSURE, res.stdout


@pytest.mark.systemd
def test_install_service_runs_the_web_unit_beside_the_daemon(tmp_path_factory):
    try:
        tarball = rootfs_tarball()
    except RigUnavailable as exc:
        pytest.skip(f"booted-systemd rig unavailable: {exc}")
    c = Container(tarball, tmp_path_factory.mktemp("web-rig"), name="photoenhanced-webtest")
    try:
        c.boot()
        c.write("/root/config.yaml", CONFIG)
        res = c.run(str(ROOT / "scripts" / "install-service"), "--venv", str(ROOT / ".venv"),
                    "--config", "/root/config.yaml", timeout=600)
        assert "photoenhanced-web.service.d/10-install.conf" in res.stdout
        dropin = c.read("/etc/systemd/system/photoenhanced-web.service.d/10-install.conf")
        assert f"-{SRV}/inbox" in dropin and f"-{SRV}/failed" in dropin and f"{SRV}/outbox" not in dropin
        c.wait_for("web unit active", lambda: c.show("photoenhanced-web.service", "ActiveState")["ActiveState"]
                   == "active", timeout=60)
        token_stat = c.run("stat", "-c", "%a %U", "/var/lib/photoenhanced/web.token").stdout.split()
        assert token_stat == ["600", "photoenhanced"]
        token = c.read("/var/lib/photoenhanced/web.token").strip()
        get = ("import sys, urllib.request, urllib.error\n"
               "req = urllib.request.Request('http://127.0.0.1:8765' + sys.argv[1], method=sys.argv[2],"
               " headers=dict(h.split(': ', 1) for h in sys.argv[3:]))\n"
               "try:\n r = urllib.request.urlopen(req, timeout=10); print(r.status); print(r.read().decode())\n"
               "except urllib.error.HTTPError as e:\n print(e.code); print(e.read().decode())\n")

        def call(path, method="GET", *headers):
            out = c.run(PY, "-c", get, path, method, *headers, check=False).stdout.split("\n", 1)
            return int(out[0]), out[1] if len(out) > 1 else ""

        c.wait_for("healthz 200", lambda: call("/healthz")[0] == 200, timeout=60)
        assert call("/api/pause", "POST")[0] == 401
        status, body = call("/api/pause", "POST", f"Authorization: Bearer {token}", "X-CSRF-Token: 1")
        assert status == 200 and json.loads(body)["paused"] is True
        c.wait_for("the daemon says paused", lambda: json.loads(c.run(
            "runuser", "-u", "photoenhanced", "--", PE, "--config", "/etc/photoenhanced/config.yaml",
            "status", "--json").stdout)["daemon"]["state"] == "paused", timeout=30)
        out = c.run("systemd-analyze", "security", "--no-pager", "photoenhanced-web.service", check=False).stdout
        m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", out)
        assert m and float(m.group(1)) <= MAX_EXPOSURE, out
        c.run(str(ROOT / "scripts" / "install-service"), "--uninstall", timeout=300)
        assert not c.exists("/etc/systemd/system/photoenhanced-web.service")
    finally:
        c.close()
