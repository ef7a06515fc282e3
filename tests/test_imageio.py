"""enhancer.imageio: one round trip per promise (formats, EXIF, ICC, alpha, 16-bit, gray, CMYK,
palette, multi-page, animated, limits, bombs, bad inputs, links)."""
from __future__ import annotations

import io
import os
import tracemalloc
import warnings

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps, JpegImagePlugin

from enhancer import imageio
from enhancer.errors import AnimatedError, TooLargeError, UndecodableError, UnsupportedError
from enhancer.imageio import Limits, Page

from _images import (cmyk_icc_all_red, exif_bytes, gradient, other_icc, png_bomb, save,
                     to_bytes)

LIM = Limits()


def upscale(dec: imageio.Decoded, k: int = 2) -> list[Page]:
    """Stand-in for the enhancer: nearest-neighbour ×k, alpha through resize_alpha."""
    out = []
    for p in dec.pages:
        rgb = np.repeat(np.repeat(p.rgb, k, axis=0), k, axis=1)
        h, w = rgb.shape[:2]
        alpha = None if p.alpha is None else imageio.resize_alpha(p.alpha, (w, h))
        out.append(Page(rgb=rgb, alpha=alpha))
    return out


def reopen(data: bytes) -> Image.Image:
    imageio._register_heif()
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def to_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(x * 255 + 0.5, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------- formats

FORMATS = [("jpg", "JPEG", {"quality": 98, "subsampling": 0}, 6),
           ("png", "PNG", {}, 0), ("webp", "WEBP", {"lossless": True}, 0),
           ("tif", "TIFF", {}, 0), ("bmp", "BMP", {}, 0), ("heic", "HEIF", {"quality": 95}, 14)]


@pytest.mark.parametrize("ext,fmt,kw,tol", FORMATS, ids=[f[1] for f in FORMATS])
def test_every_format_round_trips_in_its_own_format(tmp_path, ext, fmt, kw, tol):
    imageio._register_heif()
    src = gradient(48, 32)
    path = save(tmp_path / f"a.{ext}", Image.fromarray(src), fmt, **kw)
    info = imageio.probe(path, LIM)
    assert (info.format, info.width, info.height, info.pages) == \
        (fmt, 48, 32, 1)
    dec = imageio.decode(path, LIM)
    page = dec.pages[0]
    assert page.rgb.dtype == np.float32 and page.rgb.shape == (32, 48, 3)
    assert page.alpha is None and dec.bits == 8 and not dec.gray
    assert np.abs(to_u8(page.rgb).astype(int) - src).mean() <= tol
    out_fmt, out_ext = imageio.output_format(info.format, "same")
    assert (out_fmt, out_ext) == (fmt, "")
    out = reopen(imageio.encode(dec, upscale(dec), out_fmt))
    assert out.format == fmt and out.size == (96, 64) and out.mode == "RGB"
    back = np.asarray(out)[::2, ::2]
    assert np.abs(back.astype(int) - src).mean() <= 2 * tol + 1


def test_heif_is_kept_when_pillow_heif_can_encode_it_else_jpeg():
    assert imageio.heif_can_write() is True          # x265 is in the pillow-heif wheel here
    assert imageio.output_format("HEIF", "same") == ("HEIF", "")


def test_output_format_configured_and_still_gif():
    assert imageio.output_format("JPEG", "png") == ("PNG", "png")
    assert imageio.output_format("PNG", "jpeg") == ("JPEG", "jpg")
    assert imageio.output_format("JPEG", "jpeg") == ("JPEG", "")     # keep .jpeg / .JPG
    assert imageio.output_format("BMP", "webp") == ("WEBP", "webp")
    assert imageio.output_format("HEIF", "tiff") == ("TIFF", "tif")
    assert imageio.output_format("GIF", "same") == ("PNG", "png")
    with pytest.raises(ValueError, match="gif"):
        imageio.output_format("PNG", "gif")


def test_still_gif_decodes_and_is_written_as_png(tmp_path):
    path = save(tmp_path / "still.gif", Image.fromarray(gradient(20, 10)).convert("P"), "GIF")
    info = imageio.probe(path, LIM)
    assert info.format == "GIF" and info.pages == 1
    dec = imageio.decode(path, LIM)
    assert dec.palette and dec.pages[0].rgb.shape == (10, 20, 3)
    fmt, ext = imageio.output_format(info.format, "same")
    assert reopen(imageio.encode(dec, dec.pages, fmt)).format == "PNG" and ext == "png"


def test_mpo_jpeg_from_a_phone_is_read_as_a_single_jpeg(tmp_path):
    a, b = Image.fromarray(gradient(40, 30)), Image.fromarray(gradient(40, 30, seed=1))
    path = tmp_path / "phone.jpg"
    a.save(path, "MPO", save_all=True, append_images=[b])
    assert Image.open(path).format == "MPO"
    info = imageio.probe(path, LIM)
    assert (info.format, info.pages) == ("JPEG", 1)
    assert imageio.decode(path, LIM).pages[0].rgb.shape == (30, 40, 3)


# ------------------------------------------------------------------------------- EXIF

def test_exif_orientation_6_rotates_and_is_reset_with_new_pixel_dimensions(tmp_path):
    src = gradient(48, 32)
    path = save(tmp_path / "o6.jpg", Image.fromarray(src), "JPEG", quality=98, subsampling=0,
                exif=exif_bytes(6, (48, 32)))
    info = imageio.probe(path, LIM)
    assert (info.width, info.height) == (32, 48)                        # as displayed
    dec = imageio.decode(path, LIM)
    rgb = to_u8(dec.pages[0].rgb)
    assert rgb.shape == (48, 32, 3)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(path)))
    assert np.abs(rgb.astype(int) - expected).mean() < 1
    # the red block moved from the top-left to the top-right (90° clockwise)
    assert rgb[2, -2, 0] > 200 and rgb[2, -2, 1] < 60 and rgb[2, 1, 0] < 100
    out = reopen(imageio.encode(dec, upscale(dec), "JPEG"))
    ex = out.getexif()
    assert out.size == (64, 96)
    assert ex[0x0112] == 1 and ex[0x010F] == "TestCam"
    sub = ex.get_ifd(0x8769)
    assert (sub[0xA002], sub[0xA003]) == (64, 96) and sub[0x9003] == "2024:01:02 03:04:05"


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "WEBP"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillow_exif_transpose(tmp_path, orientation, fmt):
    src = gradient(12, 7)
    kw = {"lossless": True} if fmt == "WEBP" else {}
    path = save(tmp_path / f"o.{fmt.lower()}", Image.fromarray(src), fmt,
                exif=exif_bytes(orientation), **kw)
    ref = Image.new("RGB", (12, 7))
    ref.frombytes(src.tobytes())
    ex = ref.getexif()
    ex[0x0112] = orientation
    expected = np.asarray(ImageOps.exif_transpose(ref))
    info = imageio.probe(path, LIM)
    assert (info.height, info.width) == expected.shape[:2]
    assert np.array_equal(to_u8(imageio.decode(path, LIM).pages[0].rgb), expected)


def test_tiff_source_exif_carries_descriptive_tags_only(tmp_path):
    src = gradient(16, 8)
    path = save(tmp_path / "t.tif", Image.fromarray(src), "TIFF", exif=exif_bytes(6, (16, 8)))
    assert (imageio.probe(path, LIM).width, imageio.probe(path, LIM).height) == (8, 16)
    dec = imageio.decode(path, LIM)
    assert np.array_equal(to_u8(dec.pages[0].rgb), np.rot90(src, -1))     # rotated once
    out = reopen(imageio.encode(dec, upscale(dec), "JPEG"))
    ex = out.getexif()
    assert ex[0x0112] == 1 and ex[0x010F] == "TestCam" and 273 not in ex   # no StripOffsets
    assert ex.get_ifd(0x8769)[0xA002] == 16 and out.size == (16, 32)


# ------------------------------------------------------------------------------- ICC

@pytest.mark.parametrize("ext,fmt", [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP"),
                                     ("tif", "TIFF"), ("heic", "HEIF")])
def test_icc_profile_is_kept_byte_identical(tmp_path, ext, fmt):
    imageio._register_heif()
    icc = other_icc()
    path = save(tmp_path / f"icc.{ext}", Image.fromarray(gradient(16, 16)), fmt, icc_profile=icc)
    dec = imageio.decode(path, LIM)
    assert dec.icc == icc
    assert reopen(imageio.encode(dec, upscale(dec), fmt)).info["icc_profile"] == icc


# ------------------------------------------------------------------------------- alpha

def test_rgba_png_alpha_is_decoded_resized_and_written(tmp_path):
    rgba = np.dstack([gradient(20, 10), np.tile(np.linspace(0, 255, 20, dtype=np.uint8),
                                                (10, 1))])
    path = save(tmp_path / "a.png", Image.fromarray(rgba), "PNG")
    dec = imageio.decode(path, LIM)
    alpha = dec.pages[0].alpha
    assert alpha is not None and alpha.dtype == np.float32 and alpha.shape == (10, 20)
    assert np.array_equal(to_u8(alpha), rgba[..., 3])
    out = reopen(imageio.encode(dec, upscale(dec), "PNG"))
    assert out.mode == "RGBA" and out.size == (40, 20)
    a2 = np.asarray(out)[..., 3]
    assert a2[:, 0].max() <= 3 and a2[:, -1].min() >= 250


def test_la_png_stays_gray_with_alpha(tmp_path):
    la = np.dstack([gradient(20, 10)[..., 0], np.full((10, 20), 128, np.uint8)])
    path = save(tmp_path / "la.png", Image.fromarray(la), "PNG")
    dec = imageio.decode(path, LIM)
    assert dec.gray and dec.pages[0].alpha is not None
    out = reopen(imageio.encode(dec, upscale(dec), "PNG"))
    assert out.mode == "LA"
    assert np.array_equal(np.asarray(out)[::2, ::2, 0], la[..., 0])


def test_palette_png_with_transparency_becomes_rgba(tmp_path):
    p = Image.fromarray(gradient(20, 10)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    idx = np.asarray(p)
    path = save(tmp_path / "p.png", p, "PNG", transparency=int(idx[0, 0]))
    info = imageio.probe(path, LIM)
    assert info.mode == "P"
    dec = imageio.decode(path, LIM)
    assert dec.palette and dec.pages[0].alpha is not None
    assert dec.pages[0].alpha[0, 0] == 0.0 and (dec.pages[0].alpha == 1.0).any()
    out = reopen(imageio.encode(dec, dec.pages, "PNG"))
    assert out.mode == "RGBA" and np.asarray(out)[0, 0, 3] == 0


def test_alpha_to_jpeg_is_composited_on_white(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)          # black, fully transparent
    path = save(tmp_path / "t.png", Image.fromarray(rgba), "PNG")
    dec = imageio.decode(path, LIM)
    out = reopen(imageio.encode(dec, dec.pages, "JPEG"))
    assert out.mode == "RGB" and np.asarray(out).min() >= 250


def test_resize_alpha_is_lanczos_and_clipped():
    a = np.zeros((8, 8), np.float32)
    a[:, 4:] = 1.0                                 # a hard edge: Lanczos rings past [0, 1]
    r = imageio.resize_alpha(a, (32, 16))
    assert r.shape == (16, 32) and r.dtype == np.float32
    assert r.min() == 0.0 and r.max() == 1.0


# ------------------------------------------------------------------------------- 16 bits, gray

def test_16bit_rgb_png_keeps_every_bit_and_metadata(tmp_path):
    rng = np.random.default_rng(3)
    a16 = rng.integers(0, 65536, (10, 12, 3), dtype=np.uint16)
    ok, buf = cv2.imencode(".png", a16[..., ::-1])
    path = tmp_path / "deep.png"
    path.write_bytes(buf.tobytes())
    dec = imageio.decode(path, LIM)
    assert dec.bits == 16 and not dec.gray
    rgb = dec.pages[0].rgb
    assert np.array_equal(np.round(rgb.astype(np.float64) * 65535).astype(np.uint16), a16)
    dec.icc, dec.exif, dec.extra["dpi"] = other_icc(), exif_bytes(1, (12, 10)), (300.0, 300.0)
    data = imageio.encode(dec, upscale(dec), "PNG")
    back = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)[..., ::-1]
    assert back.dtype == np.uint16 and np.array_equal(back[::2, ::2], a16)
    im = Image.open(io.BytesIO(data))
    # dpi scales with the pixels (×2 here) so the print size is unchanged (enhancer/metadata.py)
    assert im.info["icc_profile"] == other_icc() and im.info["dpi"] == pytest.approx((600, 600), abs=0.01)
    assert im.getexif().get_ifd(0x8769)[0xA002] == 24


def test_16bit_gray_png_and_tiff_stay_16bit_gray(tmp_path):
    g16 = np.random.default_rng(4).integers(0, 65536, (9, 11), dtype=np.uint16)
    for ext, fmt in (("png", "PNG"), ("tif", "TIFF")):
        path = save(tmp_path / f"g.{ext}", Image.fromarray(g16), fmt)
        dec = imageio.decode(path, LIM)
        assert dec.bits == 16 and dec.gray
        lum = dec.pages[0].rgb[..., 0].astype(np.float64)
        assert np.array_equal(np.round(lum * 65535).astype(np.uint16), g16)
        out = reopen(imageio.encode(dec, upscale(dec), fmt))
        assert out.mode.startswith("I;16")
        assert np.array_equal(np.asarray(out)[::2, ::2].astype(np.uint16), g16)


def test_16bit_rgb_tiff_keeps_every_bit_orientation_and_icc(tmp_path):
    import tifffile

    a16 = np.random.default_rng(5).integers(0, 65536, (6, 10, 3), dtype=np.uint16)
    a16[0, 0] = (65535, 0, 0)
    path = tmp_path / "deep.tif"
    tifffile.imwrite(path, a16, photometric="rgb", compression="zlib", iccprofile=other_icc(),
                     extratags=[(274, "H", 1, 6, True)])
    info = imageio.probe(path, LIM)
    assert (info.width, info.height) == (6, 10)
    dec = imageio.decode(path, LIM)
    got = np.round(dec.pages[0].rgb.astype(np.float64) * 65535).astype(np.uint16)
    assert dec.bits == 16 and np.array_equal(got, np.rot90(a16, -1))
    data = imageio.encode(dec, upscale(dec), "TIFF")
    back = tifffile.imread(io.BytesIO(data))
    assert back.dtype == np.uint16 and np.array_equal(back[::2, ::2], np.rot90(a16, -1))
    assert Image.open(io.BytesIO(data)).info["icc_profile"] == other_icc()


def test_gray_jpeg_is_written_gray_with_rec601_luma(tmp_path):
    path = save(tmp_path / "g.jpg", Image.fromarray(gradient(16, 16)[..., 0]), "JPEG")
    dec = imageio.decode(path, LIM)
    assert dec.gray and np.array_equal(dec.pages[0].rgb[..., 0], dec.pages[0].rgb[..., 2])
    red = Page(rgb=np.tile(np.array([1, 0, 0], np.float32), (16, 16, 1)))
    out = reopen(imageio.encode(dec, [red], "PNG"))
    assert out.mode == "L" and int(np.asarray(out)[0, 0]) == 76          # 0.299 × 255


# ------------------------------------------------------------------------------- CMYK

def test_cmyk_jpeg_goes_through_its_icc_profile_and_is_written_rgb_with_srgb(tmp_path):
    cmyk = Image.new("CMYK", (8, 8), (200, 100, 50, 30))
    path = save(tmp_path / "c.jpg", cmyk, "JPEG", quality=100, icc_profile=cmyk_icc_all_red())
    info = imageio.probe(path, LIM)
    assert info.mode == "CMYK"
    dec = imageio.decode(path, LIM)
    rgb = to_u8(dec.pages[0].rgb)[4, 4].astype(int)
    naive = np.asarray(Image.open(path).convert("RGB"))[4, 4].astype(int)
    assert np.abs(rgb - (128, 0, 14)).max() <= 3          # what the (all-red) profile says
    assert np.abs(rgb - naive).max() > 50                  # not the naive conversion
    assert dec.icc == imageio._srgb_bytes()                 # the sRGB it now is, said so
    assert "ICC" in dec.extra["cmyk_conversion"]
    out = reopen(imageio.encode(dec, upscale(dec), "JPEG"))
    assert out.mode == "RGB" and out.info["icc_profile"] == dec.icc


def test_cmyk_tiff_without_profile_is_converted_naively(tmp_path):
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))    # red in naive CMYK
    path = save(tmp_path / "c.tif", cmyk, "TIFF")
    dec = imageio.decode(path, LIM)
    assert tuple(to_u8(dec.pages[0].rgb)[0, 0]) == (255, 0, 0) and dec.icc is None
    out = reopen(imageio.encode(dec, dec.pages, "TIFF"))
    assert out.mode == "RGB" and "icc_profile" not in out.info


# ------------------------------------------------------------------------------- multi-page, animated

def test_multipage_tiff_every_page_decoded_and_written(tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    ims = [Image.new("RGB", (10 + i, 8), c) for i, c in enumerate(colours)]
    path = save(tmp_path / "m.tif", ims[0], "TIFF", save_all=True, append_images=ims[1:],
                compression="tiff_lzw")
    info = imageio.probe(path, LIM)
    assert info.pages == 3 and info.page_sizes == ((10, 8), (11, 8), (12, 8))
    dec = imageio.decode(path, LIM)
    assert [p.rgb.shape for p in dec.pages] == [(8, 10, 3), (8, 11, 3), (8, 12, 3)]
    assert [tuple(to_u8(p.rgb)[0, 0]) for p in dec.pages] == colours
    out = Image.open(io.BytesIO(imageio.encode(dec, upscale(dec), "TIFF")))
    assert out.n_frames == 3 and out.info["compression"] == "tiff_lzw"
    for i, c in enumerate(colours):
        out.seek(i)
        assert out.size == (2 * (10 + i), 16) and out.convert("RGB").getpixel((0, 0)) == c


def _frames(n):
    return [Image.new("RGB", (16, 16), (i * 20 % 256, 0, 0)) for i in range(n)]


@pytest.mark.parametrize("ext,fmt,n", [("gif", "GIF", 3), ("webp", "WEBP", 12), ("png", "PNG", 2)])
def test_animated_images_are_refused_with_a_clear_message(tmp_path, ext, fmt, n):
    fr = _frames(n)
    path = save(tmp_path / f"anim.{ext}", fr[0], fmt, save_all=True, append_images=fr[1:],
                duration=100, loop=0)
    with pytest.raises(AnimatedError, match=f"animated {fmt} with {n} frames is not supported"):
        imageio.probe(path, LIM)
    with pytest.raises(AnimatedError):
        imageio.decode(path, LIM)


# ------------------------------------------------------------------------------- limits, bombs

def test_input_over_max_megapixels_is_refused_naming_the_numbers(tmp_path):
    path = save(tmp_path / "big.png", Image.new("RGB", (2000, 1000)), "PNG")
    with pytest.raises(TooLargeError, match=r"2000×1000 = 2\.0 MP is over max_input_megapixels = 1\.5"):
        imageio.probe(path, Limits(max_input_megapixels=1.5))


def test_file_over_max_bytes_is_refused_before_opening(tmp_path):
    path = tmp_path / "huge.jpg"
    path.write_bytes(b"not even an image" * 100)
    with pytest.raises(TooLargeError, match="1700 bytes, over the limit of 1000"):
        imageio.probe(path, Limits(max_bytes=1000))


def test_one_bit_png_that_compresses_well_is_no_bomb(tmp_path):
    path = save(tmp_path / "white.png", Image.new("1", (4000, 3000), 1), "PNG")
    assert path.stat().st_size < 20_000
    dec = imageio.decode(path, LIM)
    assert dec.gray and dec.pages[0].rgb.shape == (3000, 4000, 3) and dec.pages[0].rgb.min() == 1


@pytest.mark.parametrize("limit_mp", [80, 1000])
def test_decompression_bomb_is_refused_never_decoded(tmp_path, limit_mp):
    path = png_bomb(tmp_path / "bomb.png")
    assert path.stat().st_size < 1000
    before = Image.MAX_IMAGE_PIXELS
    tracemalloc.start()
    try:
        with pytest.raises(TooLargeError, match="decompression bomb") as err:
            imageio.decode(path, Limits(max_input_megapixels=limit_mp))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert err.value.kind == "too_large"
    assert peak < 20e6                               # 2.7 GB were never allocated
    assert Image.MAX_IMAGE_PIXELS == before          # PIL's global is left as it was


def test_output_scale_is_capped_by_max_output_megapixels():
    info = imageio.Info("JPEG", 4000, 3000, 1, "RGB")       # 12 MP
    assert imageio.output_scale(info, 2, Limits()) == 2.0          # 48 MP <= 64
    s = imageio.output_scale(info, 4, Limits())                    # 192 MP > 64
    assert 2.0 < s < 2.31 and round(4000 * s) * round(3000 * s) <= 64e6
    huge = imageio.Info("JPEG", 10000, 8000, 1, "RGB")      # 80 MP
    assert imageio.output_scale(huge, 2, Limits()) == 1.0


def test_output_scale_keeps_within_the_formats_longest_side(tmp_path):
    pano = imageio.Info("WEBP", 5000, 600, 1, "RGB")         # ×4 = 20000×2400, 48 MP
    assert imageio.output_scale(pano, 4, Limits(), "PNG") == 4.0
    s = imageio.output_scale(pano, 4, Limits(), "WEBP")
    assert round(5000 * s) <= 16383 and s == 3.276
    path = save(tmp_path / "p.webp", Image.new("RGB", (4, 4)), "WEBP")
    dec = imageio.decode(path, LIM)
    with pytest.raises(UnsupportedError, match="16383"):
        imageio.encode(dec, [Page(rgb=np.zeros((2, 16400, 3), np.float32))], "WEBP")


# ------------------------------------------------------------------------------- bad inputs

def test_truncated_jpeg_is_undecodable(tmp_path):
    data = to_bytes(Image.fromarray(gradient(64, 64)), "JPEG", quality=90)
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(UndecodableError, match="truncated"):
        imageio.decode(path, LIM)


@pytest.mark.parametrize("name,content,message", [
    ("random.jpg", os.urandom(4096), "not a readable"),
    ("empty.jpg", b"", "empty"),
    ("text.png", b"hello, I am a text file\n" * 10, "hello"),
    ("header-only.png", b"\x89PNG\r\n\x1a\n\x00\x00", "PNG|corrupt|not a readable"),
])
def test_bad_inputs_are_undecodable_with_a_reason(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                 # nothing escapes as a warning either
        with pytest.raises(UndecodableError, match=message) as err:
            imageio.decode(path, LIM)
    assert err.value.kind == "undecodable"


def test_symlinks_and_fifos_are_not_followed(tmp_path):
    real = save(tmp_path / "real.png", Image.new("RGB", (4, 4)), "PNG")
    link = tmp_path / "link.png"
    link.symlink_to(real)
    with pytest.raises(UnsupportedError, match="symbolic link"):
        imageio.probe(link, LIM)
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(UnsupportedError, match="not a regular file"):
        imageio.probe(fifo, LIM)           # and does not block waiting for a writer


# ------------------------------------------------------------------------------- encoders

def test_jpeg_quality_subsampling_and_dpi(tmp_path):
    path = save(tmp_path / "d.jpg", Image.fromarray(gradient(32, 32)), "JPEG", dpi=(240, 240))
    dec = imageio.decode(path, LIM)
    hi = reopen(imageio.encode(dec, dec.pages, "JPEG", jpeg_quality=95))
    lo = reopen(imageio.encode(dec, dec.pages, "JPEG", jpeg_quality=80))
    assert JpegImagePlugin.get_sampling(hi) == 0 and JpegImagePlugin.get_sampling(lo) == 2
    assert hi.info["dpi"] == pytest.approx((240, 240))


def test_webp_lossless_source_stays_lossless_and_lossy_stays_lossy(tmp_path):
    src = gradient(24, 16)
    for lossless in (True, False):
        path = save(tmp_path / f"w{lossless}.webp", Image.fromarray(src), "WEBP",
                    lossless=lossless, quality=80)
        dec = imageio.decode(path, LIM)
        assert dec.extra["webp_lossless"] is lossless
        data = imageio.encode(dec, dec.pages, "WEBP")
        assert (b"VP8L" in data[:64]) is lossless
        if lossless:
            assert np.array_equal(np.asarray(reopen(data)), src)


def test_encode_refuses_alpha_of_the_wrong_size(tmp_path):
    path = save(tmp_path / "a.png", Image.new("RGBA", (8, 8)), "PNG")
    dec = imageio.decode(path, LIM)
    with pytest.raises(ValueError, match="resize_alpha"):
        imageio.encode(dec, [Page(rgb=np.zeros((16, 16, 3), np.float32),
                                  alpha=dec.pages[0].alpha)], "PNG")


# ------------------------------------------------------------------------------- big

@pytest.mark.slow
def test_24mp_jpeg_decode_encode_memory_stays_sane(tmp_path):
    w, h = 6000, 4000
    big = cv2.resize(gradient(600, 400), (w, h), interpolation=cv2.INTER_LINEAR)
    path = tmp_path / "big.jpg"
    Image.fromarray(big).save(path, "JPEG", quality=90)
    tracemalloc.start()
    try:
        dec = imageio.decode(path, LIM)
        _, peak_decode = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        data = imageio.encode(dec, dec.pages, "JPEG")
        _, peak_encode = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    float_bytes = w * h * 3 * 4                      # the float32 page itself: 288 MB
    assert dec.pages[0].rgb.shape == (h, w, 3)
    assert peak_decode < float_bytes + w * h * 3 * 2.5      # + the uint8 array, no float copies
    assert peak_encode < float_bytes + w * h * 3 * 2.5
    assert reopen(data).size == (w, h)


def test_heif_orientation_and_exif_round_trip(tmp_path):
    imageio._register_heif()
    src = gradient(48, 32)
    path = save(tmp_path / "o6.heic", Image.fromarray(src), "HEIF", quality=95,
                exif=exif_bytes(6, (48, 32)))
    info = imageio.probe(path, LIM)
    assert (info.format, info.width, info.height) == ("HEIF", 32, 48)    # displayed size
    dec = imageio.decode(path, LIM)
    rgb = to_u8(dec.pages[0].rgb)
    assert rgb.shape == (48, 32, 3) and rgb[2, -2, 0] > 200 and rgb[2, -2, 1] < 80
    out = reopen(imageio.encode(dec, upscale(dec), "HEIF"))
    ex = out.getexif()
    assert out.format == "HEIF" and out.size == (64, 96)
    assert ex.get(0x0112, 1) == 1 and ex[0x010F] == "TestCam"
    assert ex.get_ifd(0x8769)[0xA002] == 64
