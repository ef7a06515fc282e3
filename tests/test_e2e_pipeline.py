"""Pipeline conventions end to end: companions, RAW files, junk, duplicates switch, multi-page TIFF."""
from __future__ import annotations

import json
import time

from PIL import Image

from conftest import cli, make_jpeg, wait_for, write_config


def test_xmp_companions_travel_and_raw_and_junk_stay(tmp_path, daemon_factory):
    cfg = write_config(tmp_path)
    inbox = tmp_path / "inbox"
    make_jpeg(inbox / "shoot" / "IMG_1.jpg", seed=1)
    (inbox / "shoot" / "IMG_1.xmp").write_text("<x:xmpmeta/>")
    (inbox / "shoot" / "IMG_2.CR2").write_bytes(b"raw bytes")
    for junk in (".DS_Store", "._IMG_1.jpg", "Thumbs.db", "desktop.ini", "x.jpg.part", "~$doc.jpg"):
        (inbox / "shoot" / junk).write_bytes(b"junk")
    make_jpeg(inbox / "@eaDir" / "thumb.jpg")
    make_jpeg(inbox / "__MACOSX" / "a.jpg")
    d = daemon_factory(cfg)
    wait_for((tmp_path / "outbox" / "shoot" / "IMG_1.jpg.json").exists, 30, what="done")
    time.sleep(1.0)
    # not a well-formed XMP packet: it travels unchanged (a valid one gets the history entry:
    # test_worker_routes), never a failed photo
    assert (tmp_path / "outbox" / "shoot" / "IMG_1.xmp").read_text() == "<x:xmpmeta/>"
    assert (tmp_path / "archive" / "shoot" / "IMG_1.xmp").read_text() == "<x:xmpmeta/>"   # original untouched
    assert not (inbox / "shoot" / "IMG_1.xmp").exists()
    assert (inbox / "shoot" / "IMG_2.CR2").read_bytes() == b"raw bytes"
    skipped = [e for e in d.events() if e.get("event") == "discover.skipped" and "IMG_2.CR2" in str(e.get("path"))]
    assert len(skipped) == 1
    jobs = json.loads(cli(cfg, "list", "--json").stdout)
    assert [j["path"] for j in jobs] == ["shoot/IMG_1.jpg"]
    for junk in (".DS_Store", "._IMG_1.jpg", "Thumbs.db", "desktop.ini", "x.jpg.part", "~$doc.jpg"):
        assert (inbox / "shoot" / junk).exists()
    assert (inbox / "@eaDir" / "thumb.jpg").exists() and (inbox / "__MACOSX" / "a.jpg").exists()
    assert d.stop() == 0


def test_duplicates_switch_off_recomputes(tmp_path, daemon_factory):
    cfg = write_config(tmp_path, jobs={"skip_duplicates": False, "backoff_seconds": [0.2], "stop_timeout": 5})
    d = daemon_factory(cfg)
    d.wait_event("daemon.ready")
    make_jpeg(tmp_path / "inbox" / "a.jpg", seed=4)
    wait_for((tmp_path / "outbox" / "a.jpg.json").exists, 20, what="a")
    make_jpeg(tmp_path / "inbox" / "b.jpg", seed=4)
    wait_for((tmp_path / "outbox" / "b.jpg.json").exists, 20, what="b")
    side = json.loads((tmp_path / "outbox" / "b.jpg.json").read_text())
    assert "duplicate_of" not in side
    assert side["timings_ms"]["upscale"] == 1.0 and "decode" in side["timings_ms"]   # the enhancer ran again
    assert side["models"] == [{"name": "fake-nearest", "sha256": "0" * 64, "source": "test"}]
    assert d.stop() == 0


def test_duplicate_in_another_folder_is_copied_not_recomputed(tmp_path, daemon_factory):
    cfg = write_config(tmp_path)
    d = daemon_factory(cfg)
    d.wait_event("daemon.ready")
    make_jpeg(tmp_path / "inbox" / "x" / "a.jpg", seed=9)
    wait_for((tmp_path / "outbox" / "x" / "a.jpg.json").exists, 20, what="a")
    make_jpeg(tmp_path / "inbox" / "y" / "copy.jpg", seed=9)
    wait_for((tmp_path / "outbox" / "y" / "copy.jpg.json").exists, 20, what="copy")
    side = json.loads((tmp_path / "outbox" / "y" / "copy.jpg.json").read_text())
    first = json.loads((tmp_path / "outbox" / "x" / "a.jpg.json").read_text())
    assert side["duplicate_of"] == first["job"]
    assert side["outputs"][0]["sha256"] == first["outputs"][0]["sha256"]
    assert d.stop() == 0


def test_multipage_tiff_keeps_every_page(tmp_path, daemon_factory):
    cfg = write_config(tmp_path)
    pages = [Image.new("RGB", (8, 6), c) for c in ((200, 0, 0), (0, 200, 0), (0, 0, 200))]
    (tmp_path / "inbox").mkdir(exist_ok=True)
    pages[0].save(tmp_path / "inbox" / "scan.tiff", save_all=True, append_images=pages[1:])
    d = daemon_factory(cfg)
    wait_for((tmp_path / "outbox" / "scan.tiff.json").exists, 30, what="tiff")
    with Image.open(tmp_path / "outbox" / "scan.tiff") as im:
        assert im.n_frames == 3 and im.size == (16, 12)
    assert json.loads((tmp_path / "outbox" / "scan.tiff.json").read_text())["outputs"][0]["pages"] == 3
    assert d.stop() == 0


def test_animated_webp_fails_with_kind_animated(tmp_path, daemon_factory):
    cfg = write_config(tmp_path)
    frames = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(3)]
    (tmp_path / "inbox").mkdir(exist_ok=True)
    frames[0].save(tmp_path / "inbox" / "anim.webp", save_all=True, append_images=frames[1:], duration=100)
    d = daemon_factory(cfg)
    wait_for((tmp_path / "failed" / "anim.webp.json").exists, 30, what="failed")
    err = json.loads((tmp_path / "failed" / "anim.webp.json").read_text())["error"]
    assert err["kind"] == "animated" and "3 frames" in err["message"]
    assert d.stop() == 0
