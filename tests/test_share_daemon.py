"""The real daemon with its inbox, outbox, failed and archive folders all on a real SMB share
(Samba on loopback + smbnetfs), photos written by another SMB client — one of them slowly."""
from __future__ import annotations

import hashlib
import json
import time

import pytest

from conftest import make_jpeg, wait_for, write_config

try:
    from samba_rig import start_samba
except ImportError:  # tests/ imported as a package
    from tests.samba_rig import start_samba

pytestmark = pytest.mark.share


def test_daemon_on_a_share_takes_each_photo_once_and_complete(tmp_path, daemon_factory):
    rig = start_samba(tmp_path / "samba")
    try:
        for d in ("in", "out", "failed", "archive"):
            (rig.share_dir / d).mkdir()
        m = rig.mount_dir
        cfg = write_config(tmp_path, folders={"inbox": str(m / "in"), "outbox": str(m / "out"),
                                              "failed": str(m / "failed"), "archive": str(m / "archive")},
                           watch={"mode": "auto", "settle_seconds": 1.5, "poll_interval": 0.3, "rescan_interval": 30})
        d = daemon_factory(cfg)
        d.wait_event("daemon.ready", 60)
        started = d.wait_event("discover.started")
        assert started.get("mode") == "poll"
        srcs = {}
        for i in range(3):
            p = make_jpeg(tmp_path / f"src{i}.jpg", size=(40, 30), seed=i)
            srcs[f"scan/p{i}.jpg"] = p.read_bytes()
            rig.put(p, f"in/scan/p{i}.jpg")
        big = make_jpeg(tmp_path / "big.jpg", size=(400, 300), seed=99).read_bytes()
        srcs["scan/slow.jpg"] = big
        step = max(1, len(big) // 4)
        t = rig.put_slowly([big[i:i + step] for i in range(0, len(big), step)], "in/scan/slow.jpg", 0.6)
        t.join(60)
        for rel, data in srcs.items():
            side = rig.share_dir / "out" / (rel + ".json")
            wait_for(side.exists, 60, interval=0.3, what=f"{rel} done on the server side")
            meta = json.loads(side.read_text())
            assert meta["input"]["sha256"] == hashlib.sha256(data).hexdigest(), rel
            # the original is archived after the sidecar is placed (the plan's last step)
            wait_for((rig.share_dir / "archive" / rel).exists, 30, interval=0.3, what=f"{rel} archived")
            assert (rig.share_dir / "archive" / rel).read_bytes() == data
        time.sleep(1.0)
        queued = [e for e in d.events() if e.get("event") == "job.queued"]
        assert sorted(e["path"] for e in queued) == sorted(srcs), "a photo was taken twice or early"
        assert not list((rig.share_dir / "failed").rglob("*.json"))
        assert not any(p.is_file() for p in (rig.share_dir / "in").rglob("*"))
        tmpd = rig.share_dir / "out" / ".photoenhanced-tmp"
        assert not tmpd.exists() or not any(tmpd.iterdir())
        assert d.stop() == 0
    finally:
        rig.stop()
