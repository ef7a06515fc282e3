"""More end-to-end behaviour of the real daemon: slow writers, folder problems, symlinks, CLI verbs,
hot folders, reload."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from conftest import cli, make_jpeg, wait_for, write_config


def _ro_bind(path: Path):
    r = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot bind-mount here (needs root and mount rights): {r.stderr.strip()}")
    subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], check=True)


def _umount(path: Path):
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_slow_writer_is_taken_once_and_complete(tmp_path, daemon_factory):
    cfg = write_config(tmp_path, watch={"mode": "events", "settle_seconds": 1.0, "rescan_interval": 2})
    d = daemon_factory(cfg)
    d.wait_event("daemon.ready")
    src = tmp_path / "src.jpg"
    make_jpeg(src, size=(64, 48), seed=3)
    data = src.read_bytes()
    dst = tmp_path / "inbox" / "slow.jpg"
    with open(dst, "wb") as f:                  # ~3 s of trickling, pauses shorter than settle_seconds
        for i in range(0, len(data), max(1, len(data) // 10)):
            f.write(data[i:i + max(1, len(data) // 10)])
            f.flush()
            time.sleep(0.3)
    wait_for((tmp_path / "outbox" / "slow.jpg.json").exists, 30, what="slow file done")
    side = json.loads((tmp_path / "outbox" / "slow.jpg.json").read_text())
    assert side["input"]["bytes"] == len(data)
    wait_for((tmp_path / "archive" / "slow.jpg").is_file, 10, what="archived after its sidecar")
    assert (tmp_path / "archive" / "slow.jpg").read_bytes() == data
    assert len([e for e in d.events() if e.get("event") == "job.queued"]) == 1
    assert d.stop() == 0


def test_read_only_outbox_waits_then_resumes(tmp_path, daemon_factory):
    cfg = write_config(tmp_path)
    (tmp_path / "outbox").mkdir()
    _ro_bind(tmp_path / "outbox")
    try:
        d = daemon_factory(cfg)
        d.wait_event("daemon.ready")
        make_jpeg(tmp_path / "inbox" / "p.jpg")
        wait_for(lambda: json.loads(cli(cfg, "status", "--json").stdout)["daemon"]["state"] == "waiting", 20,
                 what="waiting state")
        st = json.loads(cli(cfg, "status", "--json").stdout)
        assert "outbox" in st["daemon"]["reason"] and "read-only" in st["daemon"]["reason"]
        time.sleep(1.5)
        assert (tmp_path / "inbox" / "p.jpg").exists()
        assert not list((tmp_path / "failed").rglob("*.json"))
    finally:
        _umount(tmp_path / "outbox")
    wait_for((tmp_path / "outbox" / "p.jpg.json").exists, 30, what="resumed by itself")
    job = json.loads(cli(cfg, "list", "--json").stdout)[0]
    assert job["state"] == "done" and job["attempts"] == 0
    assert d.stop() == 0


def test_disk_full_outbox_waits_without_spending_attempts(tmp_path, daemon_factory):
    out = tmp_path / "outbox"
    out.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(out)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        cfg = write_config(tmp_path)
        d = daemon_factory(cfg)
        d.wait_event("daemon.ready")
        make_jpeg(tmp_path / "inbox" / "big.jpg", size=(200, 200), seed=5)
        d.wait_event("job.waiting", 30)
        assert not list(out.rglob("*.jpg"))
        assert (tmp_path / "inbox" / "big.jpg").exists()
        subprocess.run(["mount", "-o", "remount,size=16m", str(out)], check=True)
        wait_for((out / "big.jpg.json").exists, 30, what="done after space came back")
        job = json.loads(cli(cfg, "list", "--json").stdout)[0]
        assert job["attempts"] == 0 and job["state"] == "done"
        assert not any((out / ".photoenhanced-tmp").iterdir())
        assert any(e.get("event") == "job.publish_again" for e in d.events()), "the result was recomputed"
        assert d.stop() == 0
    finally:
        _umount(out)


def test_symlinks_and_fifos_are_never_followed(tmp_path, daemon_factory):
    cfg = write_config(tmp_path)
    secret = tmp_path / "secret.jpg"
    make_jpeg(secret)
    (tmp_path / "inbox").mkdir(exist_ok=True)
    os.symlink(secret, tmp_path / "inbox" / "link.jpg")
    os.symlink(tmp_path, tmp_path / "inbox" / "dirlink")
    os.mkfifo(tmp_path / "inbox" / "pipe.jpg")
    make_jpeg(tmp_path / "inbox" / "real.jpg")
    d = daemon_factory(cfg)
    wait_for((tmp_path / "outbox" / "real.jpg.json").exists, 30, what="the real file")
    time.sleep(1)
    assert secret.exists() and (tmp_path / "inbox" / "link.jpg").is_symlink()
    outs = sorted(p.name for p in (tmp_path / "outbox").rglob("*") if p.is_file())
    assert outs == ["real.jpg", "real.jpg.json"]
    refused = [e for e in d.events() if e.get("event") == "discover.refused"]
    assert len(refused) >= 2
    assert d.stop() == 0


def test_enqueue_retry_and_usage_errors(tmp_path):
    cfg = write_config(tmp_path, watch={"mode": "poll", "settle_seconds": 30, "poll_interval": 60, "rescan_interval": 600})
    outside = make_jpeg(tmp_path / "elsewhere.jpg")
    r = cli(cfg, "enqueue", str(outside))
    assert r.returncode == 2 and "not inside the inbox" in r.stderr
    os.symlink(tmp_path, tmp_path / "inbox" / "escape")
    r = cli(cfg, "enqueue", str(tmp_path / "inbox" / "escape" / "elsewhere.jpg"))
    assert r.returncode == 2 and "symlink" in r.stderr
    p = make_jpeg(tmp_path / "inbox" / "q" / "now.jpg")
    r = cli(cfg, "enqueue", str(p))
    assert r.returncode == 0, r.stderr
    jobs = json.loads(cli(cfg, "list", "--json").stdout)
    assert [(j["path"], j["state"]) for j in jobs] == [("q/now.jpg", "pending")]
    assert cli(cfg, "retry", "999").returncode == 1
    assert cli(cfg, "retry").returncode == 2
    assert cli(cfg, "frobnicate").returncode == 2


def test_enqueue_skips_settle_and_retry_brings_failed_back(tmp_path, daemon_factory):
    cfg = write_config(tmp_path, watch={"mode": "poll", "settle_seconds": 3600, "poll_interval": 0.2, "rescan_interval": 600})
    d = daemon_factory(cfg)
    d.wait_event("daemon.ready")
    p = make_jpeg(tmp_path / "inbox" / "now.jpg")
    assert cli(cfg, "enqueue", str(p)).returncode == 0
    wait_for((tmp_path / "outbox" / "now.jpg.json").exists, 20, what="enqueued file done without settling")
    bad = tmp_path / "inbox" / "bad.png"
    bad.write_bytes(b"garbage")
    assert cli(cfg, "enqueue", str(bad)).returncode == 0
    wait_for((tmp_path / "failed" / "bad.png.json").exists, 20, what="failed")
    failed = json.loads(cli(cfg, "list", "--state", "failed", "--json").stdout)
    assert len(failed) == 1
    make_jpeg(tmp_path / "fixed.png")
    # the user fixes the file in failed/, then retries
    Image.open(tmp_path / "fixed.png").save(tmp_path / "failed" / "bad.png", "PNG")
    r = cli(cfg, "retry", str(failed[0]["id"]))
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "failed" / "bad.png.json").exists()
    wait_for((tmp_path / "outbox" / "bad.png.json").exists, 20, what="retried job done")
    assert d.stop() == 0


def test_hot_folders_override_profile_and_scale(tmp_path, daemon_factory):
    cfg = write_config(tmp_path, enhance={"profile": "upscale", "upscale": 2,
                                          "folders": {"big/x4": {"profile": "full", "upscale": 4}}})
    d = daemon_factory(cfg)
    d.wait_event("daemon.ready")
    make_jpeg(tmp_path / "inbox" / "big" / "x4" / "deep" / "a.jpg", size=(10, 10))
    make_jpeg(tmp_path / "inbox" / "plain.jpg", size=(10, 10))
    wait_for((tmp_path / "outbox" / "big" / "x4" / "deep" / "a.jpg.json").exists, 20, what="hot folder result")
    wait_for((tmp_path / "outbox" / "plain.jpg.json").exists, 20, what="plain result")
    hot = json.loads((tmp_path / "outbox" / "big" / "x4" / "deep" / "a.jpg.json").read_text())
    plain = json.loads((tmp_path / "outbox" / "plain.jpg.json").read_text())
    assert hot["profile"] == "full" and hot["params"]["scale"] == 4 and hot["params"]["hot_folder"] == "big/x4"
    assert hot["outputs"][0]["width"] == 40 and plain["outputs"][0]["width"] == 20
    assert d.stop() == 0


def test_sighup_reload_applies_new_config_and_keeps_old_on_error(tmp_path, daemon_factory):
    cfg = write_config(tmp_path)
    d = daemon_factory(cfg)
    d.wait_event("daemon.ready")
    raw = yaml.safe_load(cfg.read_text())
    raw["enhance"]["upscale"] = 3
    cfg.write_text(yaml.safe_dump(raw))
    d.proc.send_signal(signal.SIGHUP)
    d.wait_event("config.reloaded")
    make_jpeg(tmp_path / "inbox" / "r.jpg", size=(10, 10))
    wait_for((tmp_path / "outbox" / "r.jpg.json").exists, 20, what="result after reload")
    assert json.loads((tmp_path / "outbox" / "r.jpg.json").read_text())["outputs"][0]["width"] == 30
    cfg.write_text("watch: {setle_seconds: 1}\n")
    d.proc.send_signal(signal.SIGHUP)
    d.wait_event("config.reload_failed")
    assert d.proc.poll() is None
    make_jpeg(tmp_path / "inbox" / "s.jpg", size=(10, 10))
    wait_for((tmp_path / "outbox" / "s.jpg.json").exists, 20, what="still working on the old config")
    assert json.loads((tmp_path / "outbox" / "s.jpg.json").read_text())["outputs"][0]["width"] == 30
    assert d.stop() == 0


def test_missing_inbox_waits_and_is_never_created(tmp_path, daemon_factory):
    cfg = write_config(tmp_path)
    (tmp_path / "inbox").rmdir()
    d = daemon_factory(cfg)
    d.wait_event("daemon.ready")
    wait_for(lambda: "inbox missing" in (json.loads(cli(cfg, "status", "--json").stdout)["daemon"]["reason"] or ""),
             20, what="inbox missing reason")
    assert not (tmp_path / "inbox").exists()
    (tmp_path / "inbox").mkdir()
    make_jpeg(tmp_path / "inbox" / "late.jpg")
    wait_for((tmp_path / "outbox" / "late.jpg.json").exists, 30, what="works once the inbox appears")
    assert d.stop() == 0
