"""Small test images made in memory: every case enhancer.imageio must keep faithful."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms


def gradient(w: int = 48, h: int = 32, seed: int = 0) -> np.ndarray:
    """uint8 RGB with structure in every direction (a rotation or flip shows)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([x * 255 // max(1, w - 1), y * 255 // max(1, h - 1), (x + y) * 127 // (w + h)],
                 axis=2).astype(np.uint8)
    a[: h // 4, : w // 4] = (255, 0, 0)       # red block in the top-left corner
    a ^= rng.integers(0, 4, a.shape, dtype=np.uint8)
    return a


def save(path: Path, im: Image.Image, fmt: str, **kw) -> Path:
    im.save(path, fmt, **kw)
    return path


def exif_bytes(orientation: int | None = None, pixel_xy: tuple[int, int] | None = None,
               make: str | None = "TestCam") -> bytes:
    ex = Image.Exif()
    if make:
        ex[0x010F] = make
    if orientation is not None:
        ex[0x0112] = orientation
    if pixel_xy:
        sub = ex.get_ifd(0x8769)
        sub[0xA002], sub[0xA003] = pixel_xy
        sub[0x9003] = "2024:01:02 03:04:05"
    return ex.tobytes()


def srgb_icc() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def other_icc() -> bytes:
    """A valid RGB profile that is not the sRGB one imageio could add itself."""
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()[:-4] + b"TEST"


def _s15(v: float) -> bytes:
    return struct.pack(">i", int(round(v * 65536)))


def cmyk_icc_all_red() -> bytes:
    """A hand-made ICC v2 CMYK output profile (lut8 A2B0, 2-point grid) that maps EVERY CMYK
    colour to the Lab of pure red: a conversion through it is told apart from the naive one."""
    L, a, b = 54.0, 80.0, 67.0
    lab = bytes([round(L * 255 / 100), round(a + 128), round(b + 128)])
    ident = bytes(range(256))
    lut = (b"mft1" + b"\0" * 4 + bytes([4, 3, 2, 0])
           + b"".join(_s15(1.0 if i % 4 == 0 else 0.0) for i in range(9))
           + ident * 4 + lab * (2 ** 4) + ident * 3)
    desc_text = b"all red CMYK\0"
    desc = (b"desc" + b"\0" * 4 + struct.pack(">I", len(desc_text)) + desc_text
            + b"\0" * 4 + b"\0" * 4 + b"\0" * 2 + b"\0" + b"\0" * 67)
    wtpt = b"XYZ " + b"\0" * 4 + _s15(0.9642) + _s15(1.0) + _s15(0.8249)
    cprt = b"text" + b"\0" * 4 + b"no copyright\0"
    tags = [(b"desc", desc), (b"wtpt", wtpt), (b"A2B0", lut), (b"cprt", cprt)]
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for sig, body in tags:
        while (offset + len(data)) % 4:
            data += b"\0"
        table += sig + struct.pack(">II", offset + len(data), len(body))
        data += body
    body = struct.pack(">I", len(tags)) + table + data
    size = 128 + len(body)
    header = (struct.pack(">I", size) + b"lcms" + bytes([2, 0x10, 0, 0]) + b"prtr" + b"CMYK"
              + b"Lab " + b"\0" * 12 + b"acsp" + b"APPL" + b"\0" * 4 + b"\0" * 4 + b"\0" * 4
              + b"\0" * 8 + b"\0" * 4 + _s15(0.9642) + _s15(1.0) + _s15(0.8249) + b"lcms"
              + b"\0" * 44)
    assert len(header) == 128, len(header)
    return header + body


def png_bomb(path: Path, w: int = 30000, h: int = 30000) -> Path:
    """A valid-looking PNG whose header claims w×h but whose file is a few hundred bytes."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 4096, 9)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
                     + chunk(b"IEND", b""))
    return path


def to_bytes(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()
