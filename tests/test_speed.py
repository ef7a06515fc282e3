"""The speed levers and the streaming output, checked for correctness (speed itself is measured
by scripts/bench, never asserted). Tiny inputs: these pass on CPUs with and without native
bf16 (bf16 is emulated, slowly, on AVX2-only machines)."""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest
import torch

from enhancer import imageio, pipeline, tiles
from enhancer.api import EnhancerSettings, Params
from _weightfactory import make_weights_dir

CPU = torch.device("cpu")


def _astronaut(h: int, w: int) -> np.ndarray:
    import skimage.data
    img = cv2.resize(skimage.data.astronaut(), (w, h), interpolation=cv2.INTER_AREA)
    return (img / 255.0).astype(np.float32)


def _rrdb(seed: int = 0) -> torch.nn.Module:
    from basicsr.archs.rrdbnet_arch import RRDBNet
    torch.manual_seed(seed)
    net = RRDBNet(num_in_ch=3, num_out_ch=3, num_feat=16, num_block=2, num_grow_ch=8, scale=4)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(0.5)
    return net.eval()


def test_channels_last_changes_layout_not_output():
    net = _rrdb()
    fast = pipeline.prepare_module(_rrdb(), "fp32", channels_last=True)
    assert fast.conv_first.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.from_numpy(_astronaut(16, 16).transpose(2, 0, 1).copy())[None]
    with torch.inference_mode():
        a = net(x)
        b = fast(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("keep", [0, 1])
def test_bf16_weights_cast_once_with_fp32_ends(keep):
    fast = pipeline.prepare_module(_rrdb(), "bf16", channels_last=True, keep_fp32=keep)
    end_dtype = torch.float32 if keep else torch.bfloat16
    assert fast.conv_first.weight.dtype == end_dtype and fast.conv_last.weight.dtype == end_dtype
    assert fast.body[0].rdb1.conv1.weight.dtype == torch.bfloat16
    x = torch.from_numpy(_astronaut(16, 16).transpose(2, 0, 1).copy())[None]
    with torch.inference_mode():
        ref = _rrdb()(x).numpy()
        got = fast(x.contiguous(memory_format=torch.channels_last)).float().numpy()
    assert np.isfinite(got).all()
    assert pipeline._quality(ref, got) > 35.0          # bf16 keeps ~8 bits: close to fp32


def test_loaded_model_in_bf16_falls_back_to_fp32_module_on_demand():
    net = _rrdb()
    fast = pipeline.prepare_module(_rrdb(), "bf16")
    lm = pipeline.LoadedModel("m", "rrdbnet-x4", "", "", None, fast, "bf16", cast=True,
                              channels_last=True, fallback=net)
    x = torch.rand(1, 3, 12, 12)
    with torch.inference_mode():
        got32 = pipeline._forward(lm, x, CPU, "fp32")
        assert torch.allclose(got32, net(x), atol=1e-6)
        assert pipeline.run_model(lm, x, CPU).dtype == torch.float32


def _nearest(k):
    return lambda x: np.repeat(np.repeat(x, k, axis=0), k, axis=1)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_stream_tiled_integer_output_equals_quantised_whole_image(dtype):
    img = _astronaut(70, 94)
    fn = lambda x: cv2.resize(x, (x.shape[1] * 2, x.shape[0] * 2), interpolation=cv2.INTER_LINEAR)
    ref = fn(img)
    out = np.zeros((140, 188, 3), dtype)
    pings = []
    tiles.stream_tiled(fn, img, 2, out, 24, pad=8, progress=lambda: pings.append(1))
    assert len(pings) == len(tiles.plan_tiles(70, 94, 24, 8))
    maxval = {np.uint8: 255, np.uint16: 65535, np.float32: 1.0}[dtype]
    want = np.clip(ref * maxval + (0.5 if maxval > 1 else 0), 0, maxval).astype(dtype)
    # tiles overlap only where the whole-image function agrees; blending is a partition of 1
    assert np.abs(out.astype(np.float64) - want.astype(np.float64)).max() <= max(1, maxval * 1e-6)


@pytest.mark.parametrize("shape", [(35, 47), (105, 141), (140, 188), (200, 270)])
def test_stream_tiled_resamples_to_any_output_size_without_seams(shape):
    img = _astronaut(70, 94)
    fn = lambda x: cv2.resize(x, (x.shape[1] * 4, x.shape[0] * 4), interpolation=cv2.INTER_CUBIC)
    out = np.zeros(shape + (3,), np.float32)
    tiles.stream_tiled(fn, img, 4, out, 24, pad=8)
    ref = pipeline.resize_to(fn(img), *shape)
    assert pipeline.psnr(out, ref) > 38.0
    # no seam: the worst row/column difference is like any other row's
    err = np.abs(out - ref).mean(axis=(1, 2))
    assert err.max() < 4 * err.mean() + 2e-3


@pytest.fixture(scope="module")
def upscaler(tmp_path_factory):
    d = tmp_path_factory.mktemp("w")
    manifest = make_weights_dir(d, ["realesr-general-x4v3"])
    s = EnhancerSettings(weights_dir=d, precision="fp32", background_model="realesr-general-x4v3",
                         needs=(("upscale", 2.0),))
    return pipeline.build_enhancer(s, manifest=manifest)


@pytest.mark.parametrize("upscale", [2.0, 1.5])
def test_integer_result_matches_the_float_result(upscaler, upscale):
    img = _astronaut(60, 44)
    p = Params(profile="upscale", upscale=upscale, tile=32)
    f = upscaler.enhance(img, p)
    u8 = upscaler.enhance(img, dataclasses.replace(p, bits=8))
    u16 = upscaler.enhance(img, dataclasses.replace(p, bits=16))
    assert (f.bits, u8.bits, u16.bits) == (0, 8, 16)
    assert u8.image.dtype == np.uint8 and u16.image.dtype == np.uint16
    assert f.image.shape == u8.image.shape == u16.image.shape
    assert np.abs(u8.image / 255.0 - f.image).max() <= 0.5 / 255 + 1e-6
    assert np.abs(u16.image / 65535.0 - f.image).max() <= 0.5 / 65535 + 1e-6


def test_bf16_enhancer_upscales_close_to_fp32(tmp_path):
    d = tmp_path
    manifest = make_weights_dir(d, ["realesr-general-x4v3"])
    base = dict(weights_dir=d, background_model="realesr-general-x4v3", needs=(("upscale", 4.0),))
    f32 = pipeline.build_enhancer(EnhancerSettings(precision="fp32", **base), manifest=manifest)
    b16 = pipeline.build_enhancer(EnhancerSettings(precision="bf16", **base), manifest=manifest)
    assert b16.describe()["precision"] == "bf16"
    img = _astronaut(24, 24)
    a = f32.enhance(img, Params(profile="upscale", upscale=4, tile=0)).image
    b = b16.enhance(img, Params(profile="upscale", upscale=4, tile=0)).image
    assert pipeline.psnr(a, b) > 35.0


def test_faces_profile_streams_the_classic_resize_into_integers():
    img = _astronaut(50, 70)
    out = np.zeros((100, 140, 3), np.uint8)
    tiles.stream_tiled(lambda x: x, img, 1, out, 16, pad=8)
    ref = np.clip(cv2.resize(img, (140, 100), interpolation=cv2.INTER_LANCZOS4), 0, 1)
    assert np.abs(out / 255.0 - ref).max() < 3 / 255


class _TinyFace(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return (torch.tanh(self.conv(x)),)


def test_faces_in_one_batch_equal_faces_one_at_a_time():
    lm = pipeline.LoadedModel("tiny", "tiny-face", "", "", None, _TinyFace().eval(), "fp32")
    rng = np.random.default_rng(0)
    crops = [rng.random((64, 64, 3)).astype(np.float32) for _ in range(5)]
    calls = []
    with torch.inference_mode():
        one = [pipeline.restore_faces(lm, [c], CPU, batch=1)[0] for c in crops]
        batched = pipeline.restore_faces(lm, crops, CPU, batch=8, progress=lambda: calls.append(1))
        chunked = pipeline.restore_faces(lm, crops, CPU, batch=2)
    assert len(calls) == 1                       # five faces, one forward pass
    for a, b, c in zip(one, batched, chunked):
        assert np.abs(a - b).max() < 1e-6 and np.abs(a - c).max() < 1e-6


@pytest.mark.parametrize("dtype", [np.float32, np.uint8, np.uint16])
def test_paste_face_over_its_box_equals_the_whole_canvas_paste(dtype):
    rng = np.random.default_rng(1)
    bg = rng.random((300, 260, 3)).astype(np.float32)
    face = rng.random((512, 512, 3)).astype(np.float32)
    mask = np.zeros((512, 512), np.float32)
    mask[100:400, 120:380] = 1.0
    mask = cv2.GaussianBlur(mask, (31, 31), 8)
    lms = np.array([[60, 70], [100, 72], [80, 95], [65, 115], [98, 114]], np.float32)
    affine = cv2.estimateAffinePartial2D(lms, pipeline.FACE_TEMPLATE, method=cv2.LMEDS)[0]
    sy = sx = 2.0
    # the old whole-canvas paste
    inverse = cv2.invertAffineTransform(affine)
    inverse[0] *= sx
    inverse[1] *= sy
    inverse[0, 2] += 0.5 * sx - 0.5
    inverse[1, 2] += 0.5 * sy - 0.5
    full_face = cv2.warpAffine(face, inverse, (260, 300))
    full_m = cv2.warpAffine(mask, inverse, (260, 300), flags=cv2.INTER_AREA)[..., None]
    maxval = {np.float32: 1.0, np.uint8: 255, np.uint16: 65535}[dtype]
    base = bg if maxval == 1.0 else np.round(bg * maxval).astype(dtype)
    want = full_m * full_face + (1 - full_m) * (base / maxval if maxval != 1.0 else base)
    got = pipeline.paste_face(base.copy(), face, mask, affine, sy, sx)
    assert got.dtype == base.dtype
    assert np.abs(got / maxval - want).max() <= (1e-5 if maxval == 1.0 else 0.5 / maxval + 1e-5)


@pytest.mark.parametrize("fmt,bits", [("PNG", 8), ("PNG", 16), ("JPEG", 8), ("TIFF", 16)])
def test_encode_takes_integer_pages_like_float_pages(tmp_path, fmt, bits):
    img = _astronaut(40, 30)
    arr = (img * 65535).round().astype(np.uint16) if bits == 16 else (img * 255).round().astype(np.uint8)
    src = tmp_path / f"in.{fmt.lower()}"
    if fmt == "JPEG":
        cv2.imwrite(str(src), arr[..., ::-1])
    else:
        cv2.imwrite(str(src), arr[..., ::-1])
    dec = imageio.decode(src, imageio.Limits())
    assert dec.bits == bits
    as_float = imageio.encode(dec, [imageio.Page(rgb=dec.pages[0].rgb)], fmt)
    maxval = 65535 if bits == 16 else 255
    ints = (dec.pages[0].rgb * maxval + 0.5).astype(np.uint16 if bits == 16 else np.uint8)
    as_int = imageio.encode(dec, [imageio.Page(rgb=ints)], fmt)
    if fmt == "JPEG":
        assert as_int == as_float
    else:
        a = imageio.decode(as_int, imageio.Limits()).pages[0].rgb
        b = imageio.decode(as_float, imageio.Limits()).pages[0].rgb
        assert np.array_equal(a, b)
    # 8-bit integers into a 16-bit file (and back) are exact
    if bits == 16:
        eight = (dec.pages[0].rgb * 255 + 0.5).astype(np.uint8)
        out = imageio.decode(imageio.encode(dec, [imageio.Page(rgb=eight)], fmt), imageio.Limits())
        assert np.array_equal((out.pages[0].rgb * 65535).round(), eight.astype(np.float64) * 257)


def test_cpu_auto_tile_is_capped_for_memory_not_only_by_free_ram():
    huge = 64 * 2**30
    for precision in ("fp32", "bf16"):
        t = pipeline.auto_tile(CPU, "rrdbnet-x2", free_bytes=huge, precision=precision)
        assert t * t * pipeline.BYTES_PER_INPUT_PX["rrdbnet-x2"] <= pipeline.CPU_TILE_BUDGET[precision]
    # fp32 activations are twice bf16's: smaller tiles (x2plus: 384 + overlap vs 416 + overlap)
    assert pipeline.auto_tile(CPU, "rrdbnet-x2", free_bytes=huge, precision="fp32") == 448
    assert pipeline.auto_tile(CPU, "rrdbnet-x2", free_bytes=huge, precision="bf16") == 480
    assert pipeline.auto_tile(CPU, "rrdbnet-x2", free_bytes=huge, precision="fp16") == 480


class _TinySR(torch.nn.Module):
    """x2, receptive field 1: batched-with-padding must equal one tile at a time exactly."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 12, 1)
        self.shuffle = torch.nn.PixelShuffle(2)

    def forward(self, x):
        return torch.sigmoid(self.shuffle(self.conv(x)))


def test_batched_tiles_equal_tiles_one_at_a_time():
    """The CUDA path's batching (pad to the batch's largest tile, crop back), run on CPU."""
    from enhancer import models
    lm = pipeline.LoadedModel("t", "tiny", "", "", None, _TinySR().eval(), "fp32",
                              details=models.ArchInfo("spandrel", "Tiny", 2, ""))
    img = _astronaut(70, 94)
    single = np.zeros((140, 188, 3), np.uint8)
    batched = np.zeros((140, 188, 3), np.uint8)
    with torch.inference_mode():
        pipeline.stream_upscale(pipeline.sr_callable(lm, CPU), img, 2, single, 32, pad=8)
        pipeline.stream_upscale(pipeline.sr_callable(lm, CPU), img, 2, batched, 32, pad=8,
                                many=pipeline.sr_batch_callable(lm, CPU, batch=3))
    assert np.array_equal(single, batched)


def test_face_batch_is_derived_from_memory():
    gb = 2**30
    # plenty of RAM: the CPU budget binds (FACE_BUDGET_CPU), not the free memory
    big = pipeline.face_batch(CPU, "face", "bf16", free_bytes=64 * gb)
    assert big == max(1, int(pipeline.FACE_BUDGET_CPU // pipeline.FACE_BYTES[("face", "bf16")]))
    assert big * pipeline.FACE_BYTES[("face", "bf16")] <= pipeline.FACE_BUDGET_CPU
    # fp32 activations are larger: never more faces per pass than in bf16, and every fp32
    # pass stays inside the budget (three fp32 parses once took a 2 MP photo to 2.96 GB)
    for role in ("face", "parser"):
        n32 = pipeline.face_batch(CPU, role, "fp32", free_bytes=64 * gb)
        assert n32 <= pipeline.face_batch(CPU, role, "bf16", free_bytes=64 * gb)
        assert n32 == 1 or n32 * pipeline.FACE_BYTES[(role, "fp32")] <= pipeline.FACE_BUDGET_CPU
    assert pipeline.face_batch(CPU, "parser", "fp32", free_bytes=64 * gb) <= 2
    # fp16 (CUDA) activations are the size of bf16's
    assert pipeline.face_batch(CPU, "face", "fp16", free_bytes=64 * gb) == big
    # the parser's activations are smaller: more parses than restorations per pass
    assert pipeline.face_batch(CPU, "parser", "bf16", free_bytes=64 * gb) > big
    # little free memory: one face at a time, never zero
    assert pipeline.face_batch(CPU, "face", "bf16", free_bytes=100 * 2**20) == 1


def test_onednn_isa_cap_makes_auto_choose_as_on_an_avx2_cpu():
    # whatever this CPU has, oneDNN capped to AVX2 has no native bf16 (scripts/bench --isa avx2)
    assert pipeline.cpu_has_native_bf16({"ONEDNN_MAX_CPU_ISA": "AVX2"}) is False
    assert pipeline.cpu_has_native_bf16({"ONEDNN_MAX_CPU_ISA": "avx512_core"}) is False
    # an uncapped or bf16-capable cap leaves the answer to the CPU's flags
    flags = pipeline.cpu_has_native_bf16({})
    assert pipeline.cpu_has_native_bf16({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}) == flags


def test_cast_model_reloads_fp32_from_its_file_instead_of_keeping_a_copy():
    net = _rrdb()
    reloads = []

    def reload():
        reloads.append(1)
        return _rrdb()
    lm = pipeline.LoadedModel("m", "rrdbnet-x4", "", "", None,
                              pipeline.prepare_module(_rrdb(), "bf16"), "bf16", cast=True,
                              channels_last=True, reload=reload)
    x = torch.rand(1, 3, 12, 12)
    with torch.inference_mode():
        assert torch.allclose(pipeline._forward(lm, x, CPU, "fp32"), net(x), atol=1e-6)
        pipeline._forward(lm, x, CPU, "bf16")
    assert reloads == [1]                      # only the fp32 (fallback) call read the file


def test_built_bf16_model_keeps_no_resident_fp32_copy(tmp_path):
    manifest = make_weights_dir(tmp_path, ["realesr-general-x4v3"])
    enh = pipeline.build_enhancer(EnhancerSettings(
        weights_dir=tmp_path, precision="bf16", background_model="realesr-general-x4v3",
        needs=(("upscale", 4.0),)), manifest=manifest)
    bg = enh.model("background")
    assert bg.cast and bg.precision == "bf16" and bg.fallback is None
    ref = bg.reload()
    assert all(p.dtype == torch.float32 for p in ref.parameters())
    x = torch.from_numpy(_astronaut(12, 12).transpose(2, 0, 1).copy())[None]
    with torch.inference_mode():
        assert torch.allclose(pipeline._forward(bg, x, CPU, "fp32"), ref(x), atol=1e-6)


def test_cpu_auto_tile_takes_the_whole_image_when_it_fits_the_budget(upscaler):
    """Overlap is only paid when tiling is needed: an image whose activations fit the budget
    unpadded runs as one tile (reported as 0, the whole image); a bigger one is tiled with
    the budget holding each padded tile."""
    img = _astronaut(60, 44)
    res = upscaler.enhance(img, Params(profile="upscale", upscale=2.0))
    assert res.tile == 0
    full = pipeline.auto_tile(CPU, "srvgg-x4", precision=upscaler.model("background").precision)
    assert upscaler._tile_for(Params(profile="upscale", upscale=2.0), full, full) == 0
    big = upscaler._tile_for(Params(profile="upscale", upscale=2.0), full + 2, full)
    assert big == full - 2 * pipeline.TILE_PAD
    assert upscaler._tile_for(Params(profile="upscale", upscale=2.0, attempt=2), 400, 300) == 200
