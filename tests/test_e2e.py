"""The real daemon as a subprocess (fake enhancer) on real temp folders."""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from PIL import Image

from conftest import cli, make_jpeg, wait_for, write_config


def _done(tmp: Path) -> list[Path]:
    return sorted(p for p in (tmp / "outbox").rglob("*.json") if ".photoenhanced-tmp" not in p.parts)


def test_nested_photos_come_out_with_sidecars_and_originals_archived(tmp_path, daemon_factory):
    cfg = write_config(tmp_path)
    d = daemon_factory(cfg)
    d.wait_event("daemon.ready")
    names = ["top.jpg", "a/one.jpg", "a/b/two.jpg", "a/b/c/three.JPG"]
    for i, n in enumerate(names):
        make_jpeg(tmp_path / "inbox" / n, seed=i)
    wait_for(lambda: len(_done(tmp_path)) == 4, 30, what="4 sidecars")
    for i, n in enumerate(names):
        out = tmp_path / "outbox" / n
        side = json.loads(Path(str(out) + ".json").read_text())
        assert side["status"] == "done" and side["input"]["path"] == n
        with Image.open(out) as im:
            assert im.size == (48, 32) and im.format == "JPEG"
        assert side["outputs"][0]["width"] == 48 and side["outputs"][0]["path"] == str(out)
        assert len(side["input"]["sha256"]) == 64
        for key in ("models", "timings_ms", "versions", "attempts", "profile", "job", "created"):
            assert key in side, key
        wait_for((tmp_path / "archive" / n).is_file, 10, what=f"{n} archived")   # archived after the sidecar
    wait_for(lambda: not any(p.is_file() for p in (tmp_path / "inbox").rglob("*")), 10, what="empty inbox")
    st = cli(cfg, "status", "--json")
    assert st.returncode == 0, st.stderr
    status = json.loads(st.stdout)
    assert status["daemon"]["running"] is True and status["counts"]["done"] == 4
    lst = json.loads(cli(cfg, "list", "--state", "done", "--json").stdout)
    assert sorted(j["path"] for j in lst) == sorted(names)
    assert d.stop() == 0
    st2 = json.loads(cli(cfg, "status", "--json").stdout)
    assert st2["daemon"]["running"] is False


def test_corrupt_file_goes_to_failed_with_reason_and_daemon_lives_on(tmp_path, daemon_factory):
    cfg = write_config(tmp_path)
    d = daemon_factory(cfg)
    d.wait_event("daemon.ready")
    bad = tmp_path / "inbox" / "x" / "broken.jpg"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 3)
    orig = bad.read_bytes()
    side = tmp_path / "failed" / "x" / "broken.jpg.json"
    wait_for(side.exists, 30, what="failed sidecar")
    data = json.loads(side.read_text())
    assert data["status"] == "failed" and data["error"]["kind"] == "undecodable"
    assert (tmp_path / "failed" / "x" / "broken.jpg").read_bytes() == orig
    make_jpeg(tmp_path / "inbox" / "fine.jpg")
    wait_for((tmp_path / "outbox" / "fine.jpg.json").exists, 30, what="next photo done")
    assert d.stop() == 0


def test_transient_errors_retry_then_fail_after_max_attempts(tmp_path, daemon_factory):
    cfg = write_config(tmp_path)
    d = daemon_factory(cfg)
    d.wait_event("daemon.ready")
    img = Image.new("RGB", (16, 16), (0, 40, 0))
    img.putpixel((0, 0), (255, 0, 0))
    (tmp_path / "inbox").mkdir(exist_ok=True)
    img.save(tmp_path / "inbox" / "oom.png")
    side = tmp_path / "failed" / "oom.png.json"
    wait_for(side.exists, 30, what="failed after retries")
    data = json.loads(side.read_text())
    assert data["error"]["kind"] == "out_of_memory" and data["attempts"] == 3
    assert len([e for e in d.events() if e.get("event") == "job.retry"]) == 2
    assert d.stop() == 0


def test_missing_weights_make_jobs_wait_not_fail(tmp_path, daemon_factory):
    cfg = write_config(tmp_path)
    gate = tmp_path / "weights-present"
    d = daemon_factory(cfg, env={"FAKE_WEIGHTS": str(gate)})
    d.wait_event("daemon.ready")
    make_jpeg(tmp_path / "inbox" / "wait.jpg")
    wait_for(lambda: json.loads(cli(cfg, "status", "--json").stdout)["counts"]["pending"] == 1, 20, what="queued")
    st = json.loads(cli(cfg, "status", "--json").stdout)
    assert st["daemon"]["state"] == "waiting" and "weights fetch" in st["daemon"]["reason"]
    assert not list((tmp_path / "failed").rglob("*.json"))
    gate.write_text("ok")
    wait_for((tmp_path / "outbox" / "wait.jpg.json").exists, 30, what="done once weights appear")
    assert d.stop() == 0


def test_second_daemon_on_same_state_dir_exits_1(tmp_path, daemon_factory):
    cfg = write_config(tmp_path)
    d1 = daemon_factory(cfg)
    d1.wait_event("daemon.ready")
    d2 = daemon_factory(cfg)
    assert d2.proc.wait(30) == 1
    assert "another photoenhanced daemon" in d2.log.read_text()
    assert d1.stop() == 0


def test_bad_config_exits_78(tmp_path, daemon_factory):
    cfg = write_config(tmp_path, watch__setle_seconds=3)
    d = daemon_factory(cfg)
    assert d.proc.wait(30) == 78
    assert "did you mean settle_seconds" in d.log.read_text()


def test_name_collision_and_duplicate_copy(tmp_path, daemon_factory):
    cfg = write_config(tmp_path)
    d = daemon_factory(cfg)
    d.wait_event("daemon.ready")
    make_jpeg(tmp_path / "inbox" / "same.jpg", seed=7)
    wait_for((tmp_path / "outbox" / "same.jpg.json").exists, 30, what="first")
    wait_for(lambda: not (tmp_path / "inbox" / "same.jpg").exists(), 10, what="archived")
    make_jpeg(tmp_path / "inbox" / "same.jpg", seed=7)   # identical content, same path again
    second = tmp_path / "outbox" / "same (1).jpg.json"
    wait_for(second.exists, 30, what="second result under a new name")
    data = json.loads(second.read_text())
    assert data["duplicate_of"] == 1
    assert (tmp_path / "outbox" / "same (1).jpg").read_bytes() == (tmp_path / "outbox" / "same.jpg").read_bytes()
    wait_for((tmp_path / "archive" / "same (1).jpg").is_file, 10, what="archived after its sidecar")
    assert d.stop() == 0


def test_sigterm_during_a_long_image_requeues_it_and_restart_finishes(tmp_path, daemon_factory):
    cfg = write_config(tmp_path, jobs={"stop_timeout": 0.5, "max_attempts": 3, "backoff_seconds": [0.2]})
    d = daemon_factory(cfg, env={"FAKE_DELAY": "5"})
    d.wait_event("daemon.ready")
    make_jpeg(tmp_path / "inbox" / "slow.jpg")
    d.wait_event("job.started")
    t = time.monotonic()
    assert d.stop(signal.SIGTERM) == 0
    assert time.monotonic() - t < 4.5          # did not wait for the 5 s image
    assert (tmp_path / "inbox" / "slow.jpg").exists()
    assert json.loads(cli(cfg, "list", "--json").stdout)[0]["state"] == "pending"
    assert any(e.get("event") == "daemon.stop_timeout" and e.get("requeued") for e in d.events())
    d2 = daemon_factory(cfg)
    wait_for((tmp_path / "outbox" / "slow.jpg.json").exists, 30, what="finished after restart")
    assert d2.stop() == 0
