"""A deterministic corpus of hostile image files for every reader enhancer.imageio has.

    from _corpus import generate, EXPECT
    for cls, filename, data in generate(n_max=300, seed=0): ...

Classes (``EXPECT[cls]`` = the outcomes allowed: "ok" or an error kind):
  valid                small well-formed files of every reader (JPEG, progressive JPEG, PNG
                       RGB/RGBA/palette/16-bit, WebP lossy/lossless, TIFF 8/16-bit and multi-page,
                       BMP, HEIC, a still GIF named .jpg)
  truncated-boundary   each valid file cut at every marker/chunk/box/IFD/strip boundary
  truncated-random     cut at seeded random offsets
  bitflip              1–8 flipped bits (half of them in the first 256 bytes)
  wrong-ext            a valid file under another reader's extension
  zero                 0 bytes, 1 byte, text, under every extension
  metadata             EXIF 70 kB (PNG, WebP, TIFF, HEIC), ICC 200 kB (JPEG, PNG, WebP, TIFF),
                       1.5 MB PNG text; they decode
  metadata-over        metadata over max_metadata_bytes (a zTXt chunk inflating to 20 MB)
  multipage            TIFF with a few pages of different sizes, an IFD chain that loops back
                       (read up to the loop); they decode
  pages-over           TIFF with 1,000 tiny pages; TIFF with 60 pages of 8000×8000 (~70 kB)
  animated             GIF, WebP, APNG, and an animated GIF named .jpg
  bomb                 PNG, JPEG (65000×65000), TIFF, WebP, BMP, GIF, HEIC declaring huge sizes
  structure            container abuse: 1 MB of JPEG fill bytes, 150k empty PNG chunks, 100k
                       empty RIFF chunks, a TIFF IFD whose 4,000 entries re-read the same bytes,
                       a TIFF directory with 10,000 entries

Every file is at most ~2 MB; the whole default set (n_max=None) is ~2,500 files. Other tests drop
these into the real daemon's inbox: names are plain ASCII, unique, with the reader's extension.
"""
from __future__ import annotations

import functools
import io
import random
import struct
import zlib
from typing import Callable, Iterator

import cv2
import numpy as np
from PIL import Image, ImageCms

ERROR_KINDS = {"undecodable", "unsupported", "too_large", "animated"}
_ANY = {"ok"} | ERROR_KINDS
EXPECT: dict[str, set[str]] = {
    "valid": {"ok"}, "truncated-boundary": _ANY, "truncated-random": _ANY, "bitflip": _ANY,
    "wrong-ext": {"ok"}, "zero": {"undecodable"}, "metadata": {"ok"},
    "metadata-over": {"too_large"}, "multipage": {"ok"}, "pages-over": {"too_large"},
    "animated": {"animated"}, "bomb": {"too_large"},
    "structure": {"undecodable", "too_large"},
}


# ----------------------------------------------------------------------------------- pieces

def _pixels(w: int, h: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([x * 255 // max(1, w - 1), y * 255 // max(1, h - 1), (x * y) % 256], axis=2)
    return (a ^ rng.integers(0, 8, a.shape)).astype(np.uint8)


def _pil(im: Image.Image, fmt: str, **kw) -> bytes:
    if fmt == "HEIF":
        from pillow_heif import register_heif_opener
        register_heif_opener()
    out = io.BytesIO()
    im.save(out, fmt, **kw)
    return out.getvalue()


def _exif(extra: int = 0, maker: bool = True) -> bytes:
    ex = Image.Exif()
    ex[0x010F] = "CorpusCam"
    ex[0x0112] = 1
    sub = ex.get_ifd(0x8769)
    sub[0x9003] = "2024:01:02 03:04:05"
    if extra:
        sub[0x927C if maker else 0x9286] = bytes(random.Random(extra).randbytes(extra))
    return ex.tobytes()


def _icc(size: int) -> bytes:
    base = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    return base + bytes(random.Random(size).randbytes(max(0, size - len(base))))


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _tiff(pages: list[tuple[int, int, bytes]], *, loop: bool = False) -> bytes:
    """Little-endian 8-bit gray TIFF by hand: one deflate strip per page (w, h, strip); pages
    with the same strip object share its bytes. ``loop``: the last IFD points at the first."""
    out = bytearray(b"II*\x00\x00\x00\x00\x00")
    placed: dict[int, int] = {}
    for _, _, strip in pages:
        if id(strip) not in placed:
            placed[id(strip)] = len(out)
            out += strip + b"\0" * (len(strip) % 2)
    first = len(out)
    struct.pack_into("<I", out, 4, first)
    for i, (w, h, strip) in enumerate(pages):
        entries = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, 1, 8), (259, 3, 1, 8),
                   (262, 3, 1, 1), (273, 4, 1, placed[id(strip)]), (277, 3, 1, 1),
                   (278, 4, 1, h), (279, 4, 1, len(strip))]
        nxt = len(out) + 2 + 12 * len(entries) + 4
        if i == len(pages) - 1:
            nxt = first if loop else 0
        out += struct.pack("<H", len(entries))
        for tag, typ, cnt, val in entries:
            out += struct.pack("<HHI", tag, typ, cnt) + (struct.pack("<HH", val, 0) if typ == 3
                                                          else struct.pack("<I", val))
        out += struct.pack("<I", nxt)
    return bytes(out)


# ----------------------------------------------------------------------------------- valid files

@functools.cache
def _valid(seed: int) -> tuple[tuple[str, str, bytes], ...]:
    """(base name, extension, bytes) of small well-formed files, one per reader and variant."""
    a = _pixels(40, 28, seed)
    rgb = Image.fromarray(a)
    rgba = Image.fromarray(np.dstack([a, a[..., :1]]))
    a16 = (a.astype(np.uint16) * 257)[..., ::-1]           # BGR for OpenCV
    pages = [Image.fromarray(_pixels(20 + 6 * i, 14 + 2 * i, seed + i)) for i in range(3)]
    gif = _pil(rgb.convert("P"), "GIF")
    return (
        ("jpeg", "jpg", _pil(rgb, "JPEG", quality=90, exif=_exif())),
        ("jpeg-progressive", "jpeg", _pil(rgb, "JPEG", quality=80, progressive=True)),
        ("png", "png", _pil(rgb, "PNG")),
        ("png-rgba", "png", _pil(rgba, "PNG")),
        ("png-palette", "png", _pil(rgb.convert("P"), "PNG")),
        ("png16", "png", cv2.imencode(".png", a16)[1].tobytes()),
        ("webp", "webp", _pil(rgb, "WEBP", quality=80)),
        ("webp-lossless", "webp", _pil(rgba, "WEBP", lossless=True)),
        ("tiff", "tif", _pil(rgb, "TIFF", compression="tiff_adobe_deflate")),
        ("tiff-pages", "tiff", _pil(pages[0], "TIFF", save_all=True, append_images=pages[1:],
                                    compression="tiff_lzw")),
        ("tiff16", "tif", cv2.imencode(".tiff", a16)[1].tobytes()),
        ("bmp", "bmp", _pil(rgb, "BMP")),
        ("heic", "heic", _pil(rgb, "HEIF", quality=60)),
        ("gif-as-jpg", "jpg", gif),
    )


# ----------------------------------------------------------------------------------- boundaries

def _boundaries(data: bytes) -> list[int]:
    """Offsets where a structural unit (marker, chunk, box, IFD, strip) starts or its data does."""
    cuts: set[int] = set()
    n = len(data)
    try:
        if data[:2] == b"\xff\xd8":
            pos = 2
            while pos + 4 <= n:
                cuts.update((pos, pos + 2, pos + 4))
                marker, length = data[pos + 1], struct.unpack_from(">H", data, pos + 2)[0]
                if marker == 0xDA:
                    cuts.update((pos + 2 + length, (pos + n) // 2, n - 2))
                    break
                pos += 2 + length
        elif data[:4] == b"\x89PNG":
            pos = 8
            while pos + 8 <= n:
                length = struct.unpack_from(">I", data, pos)[0]
                cuts.update((pos, pos + 4, pos + 8, pos + 8 + length))
                pos += 12 + length
        elif data[:4] == b"RIFF":
            cuts.update((4, 8, 12))
            pos = 12
            while pos + 8 <= n:
                length = struct.unpack_from("<I", data, pos + 4)[0]
                cuts.update((pos, pos + 4, pos + 8, pos + 8 + length // 2))
                pos += 8 + length + (length & 1)
        elif data[:4] in (b"II*\x00", b"MM\x00*"):
            bo = "<" if data[:2] == b"II" else ">"
            pos, seen = struct.unpack_from(bo + "I", data, 4)[0], set()
            cuts.update((4, 8))
            while pos and pos not in seen and pos + 2 <= n:
                seen.add(pos)
                count = struct.unpack_from(bo + "H", data, pos)[0]
                cuts.update((pos, pos + 2, pos + 2 + 6 * count, pos + 2 + 12 * count))
                for i in range(count):
                    tag, typ, cnt, val = struct.unpack_from(bo + "HHII", data, pos + 2 + 12 * i)
                    if tag in (273, 324, 34675):
                        cuts.add(val if cnt == 1 or tag == 34675 else val)
                pos = struct.unpack_from(bo + "I", data, pos + 2 + 12 * count)[0]
        elif data[:2] == b"BM":
            cuts.update((2, 14, 18, 54, struct.unpack_from("<I", data, 10)[0]))
        elif data[4:8] == b"ftyp":
            def boxes(pos: int, end: int, depth: int) -> None:
                while pos + 8 <= end:
                    size, kind = struct.unpack_from(">I4s", data, pos)
                    cuts.update((pos, pos + 8))
                    if size < 8:
                        return
                    if depth < 2 and kind in (b"meta", b"iprp", b"ipco", b"dinf"):
                        boxes(pos + 12 if kind == b"meta" else pos + 8, pos + size, depth + 1)
                    pos += size
            boxes(0, n, 0)
        elif data[:3] == b"GIF":
            cuts.update((6, 10, 13, 13 + 3 * 2 ** ((data[10] & 7) + 1)))
    except (struct.error, IndexError):
        pass
    return sorted(c for c in cuts if 0 < c < n)


# ----------------------------------------------------------------------------------- hostile specials

def _specials(seed: int) -> list[tuple[str, str, bytes]]:
    a = _pixels(32, 24, seed)
    rgb = Image.fromarray(a)
    out: list[tuple[str, str, bytes]] = []
    add = lambda cls, name, data: out.append((cls, name, data))   # noqa: E731

    # metadata a format may or may not hold
    for ext, fmt, kw in (("png", "PNG", {}), ("webp", "WEBP", {"quality": 80}),
                         ("tif", "TIFF", {}), ("heic", "HEIF", {"quality": 60})):
        add("metadata", f"exif70k-makernote.{ext}", _pil(rgb, fmt, exif=_exif(70_000), **kw))
        if fmt != "TIFF":
            add("metadata", f"exif70k-usercomment.{ext}",
                _pil(rgb, fmt, exif=_exif(70_000, maker=False), **kw))
    for ext, fmt in (("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP"), ("tif", "TIFF")):
        add("metadata", f"icc200k.{ext}", _pil(rgb, fmt, icc_profile=_icc(200_000)))
    png = _pil(rgb, "PNG")
    text = _chunk(b"tEXt", b"Comment\x00" + b"x" * 1_500_000)
    add("metadata", "text1m5.png", png[:33] + text + png[33:])
    ztxt = _chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"\0" * 20_000_000, 9))
    add("metadata-over", "ztxt-20mb.png", png[:33] + ztxt + png[33:])

    # pages
    strip = zlib.compress(b"\x80" * (40 * 30))
    add("multipage", "pages-3-sizes.tif",
        _tiff([(40, 30, strip), (20, 10, zlib.compress(b"\x10" * 200)), (40, 30, strip)]))
    small_first = [(8, 8, zlib.compress(b"\x40" * 64)), (400, 300, zlib.compress(b"\x90" * 120_000))]
    add("multipage", "small-first-page.tif", _tiff(small_first))
    add("multipage", "ifd-chain-loops.tif", _tiff([(40, 30, strip)] * 3, loop=True))
    tiny = zlib.compress(b"\x00")
    add("pages-over", "pages-1000-tiny.tif", _tiff([(1, 1, tiny)] * 1000))
    big = zlib.compress(b"\x00" * 8000 * 8000, 9)            # 64 MP page in ~64 kB
    # 60 IFDs sharing one strip: ~8 kB of directories declaring 3,840 MP (each page within
    # max_input_megapixels, their sum far over it)
    add("pages-over", "pages-60-of-64mp.tif", _tiff([(8000, 8000, big)] * 60))

    # animation
    frames = [Image.fromarray(np.roll(a, 4 * i, axis=1)) for i in range(4)]
    gif = _pil(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    add("animated", "anim.gif", gif)
    add("animated", "anim-gif-named.jpg", gif)
    add("animated", "anim.webp", _pil(frames[0], "WEBP", save_all=True, append_images=frames[1:],
                                      duration=50))
    add("animated", "anim.png", _pil(frames[0], "PNG", save_all=True, append_images=frames[1:]))
    many = [Image.new("RGB", (4, 4), (i, 255 - i, i // 2)) for i in range(150)]
    add("animated", "anim-150-frames.gif", _pil(many[0], "GIF", save_all=True,
                                                append_images=many[1:], duration=10))

    # bombs: headers declaring huge sizes over a few bytes of data
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    add("bomb", "bomb.png", b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(b"\0" * 4096, 9)) + _chunk(b"IEND", b""))
    jpg = bytearray(_pil(rgb, "JPEG", quality=50))
    sof = jpg.find(b"\xff\xc0")
    struct.pack_into(">HH", jpg, sof + 5, 65000, 65000)
    add("bomb", "bomb-65000.jpg", bytes(jpg))
    add("bomb", "bomb.tif", _tiff([(60000, 60000, zlib.compress(b"\0" * 60000, 9))]))
    webp = bytearray(_pil(rgb, "WEBP", lossless=True))
    vp8l = webp.find(b"VP8L")
    bits = (16383) | (16383 << 14)                              # 16384 × 16384
    struct.pack_into("<I", webp, vp8l + 9, (struct.unpack_from("<I", webp, vp8l + 9)[0]
                                            & ~0x0FFFFFFF) | bits)
    add("bomb", "bomb.webp", bytes(webp))
    bmp = bytearray(_pil(rgb, "BMP"))
    struct.pack_into("<ii", bmp, 18, 30000, 30000)
    add("bomb", "bomb.bmp", bytes(bmp))
    gifb = bytearray(_pil(rgb.convert("P"), "GIF"))
    struct.pack_into("<HH", gifb, 6, 65535, 65535)
    add("bomb", "bomb.gif-as.jpg", bytes(gifb))
    heic = bytearray(_pil(rgb, "HEIF", quality=50))
    ispe = heic.find(b"ispe")
    if ispe > 0:
        struct.pack_into(">II", heic, ispe + 8, 60000, 60000)
        add("bomb", "bomb.heic", bytes(heic))

    # structure abuse
    j = _pil(rgb, "JPEG", quality=50)
    add("structure", "fill-1mb.jpg", j[:2] + b"\xff" * 1_100_000 + j[2:])
    add("structure", "png-150k-chunks.png",
        png[:33] + _chunk(b"prVt", b"") * 150_000 + png[33:])
    w = _pil(rgb, "WEBP", quality=50)
    body = w[12:] + b"JUNK\x00\x00\x00\x00" * 100_000
    add("structure", "riff-100k-chunks.webp", b"RIFF" + struct.pack("<I", len(body) + 4)
        + b"WEBP" + body)
    add("structure", "ifd-reread.tif", _ifd_reread())
    add("structure", "ifd-10000-entries.tif", _ifd_entries(10_000))
    return out


def _ifd_reread() -> bytes:
    """One 4×4 page whose IFD has 4,000 private tags, each 200 kB at the same offset."""
    blob = bytes(200_000)
    out = bytearray(b"II*\x00\x00\x00\x00\x00") + blob
    strip_off = len(out)
    out += bytes(16)
    struct.pack_into("<I", out, 4, len(out))
    entries = [(256, 4, 1, 4), (257, 4, 1, 4), (258, 3, 1, 8), (262, 3, 1, 1),
               (273, 4, 1, strip_off), (277, 3, 1, 1), (278, 4, 1, 4), (279, 4, 1, 16)]
    entries += [(40000 + i, 7, len(blob), 8) for i in range(4000)]
    entries.sort()
    out += struct.pack("<H", len(entries))
    for tag, typ, cnt, val in entries:
        out += struct.pack("<HHI", tag, typ, cnt) + (struct.pack("<HH", val, 0) if typ == 3
                                                      else struct.pack("<I", val))
    out += struct.pack("<I", 0)
    return bytes(out)


def _ifd_entries(count: int) -> bytes:
    out = bytearray(b"II*\x00\x10\x00\x00\x00") + bytes(8)
    out += struct.pack("<H", count)
    for i in range(count):
        out += struct.pack("<HHII", 256 + i % 40000, 3, 1, 1)
    out += struct.pack("<I", 0)
    return bytes(out)


# ----------------------------------------------------------------------------------- generate

_EXTS = ("jpg", "jpeg", "png", "webp", "tif", "tiff", "bmp", "heic", "heif")


def _streams(seed: int) -> list[Iterator[tuple[str, str, bytes]]]:
    rnd = random.Random(seed)
    bases = _valid(seed)

    def valid() -> Iterator:
        for base, ext, data in bases:
            yield "valid", f"{base}.{ext}", data

    def boundary() -> Iterator:
        cuts = [(base, ext, data, _boundaries(data)) for base, ext, data in bases]
        for i in range(max(len(c[3]) for c in cuts)):
            for base, ext, data, offs in cuts:
                if i < len(offs):
                    yield "truncated-boundary", f"cut{offs[i]}-{base}.{ext}", data[:offs[i]]

    def random_cut() -> Iterator:
        for i in range(100_000):
            base, ext, data = bases[i % len(bases)]
            off = rnd.randrange(1, len(data))
            yield "truncated-random", f"rcut{off}-{i}-{base}.{ext}", data[:off]

    def bitflip() -> Iterator:
        for i in range(100_000):
            base, ext, data = bases[i % len(bases)]
            buf = bytearray(data)
            for _ in range(rnd.randint(1, 8)):
                pos = rnd.randrange(min(256, len(buf)) if rnd.random() < 0.5 else len(buf))
                buf[pos] ^= 1 << rnd.randrange(8)
            yield "bitflip", f"flip{i}-{base}.{ext}", bytes(buf)

    def wrong_ext() -> Iterator:
        for i, (base, ext, data) in enumerate(bases):
            other = [e for e in _EXTS if e != ext]
            yield "wrong-ext", f"wrong-{base}.{other[i % len(other)]}", data

    def zero() -> Iterator:
        for ext in _EXTS:
            yield "zero", f"empty.{ext}", b""
            yield "zero", f"one-byte.{ext}", b"\xff"
            yield "zero", f"text.{ext}", b"not an image, just text\n" * 20

    def specials() -> Iterator:
        for cls, name, data in _specials(seed):
            yield cls, f"{cls}-{name}", data

    return [specials(), valid(), zero(), wrong_ext(), boundary(), random_cut(), bitflip()]


def generate(n_max: int | None = None, seed: int = 0) -> Iterator[tuple[str, str, bytes]]:
    """(class, file name, bytes) items, deterministic for a seed. Every special and valid file
    comes first (~90 items), then truncations, random cuts and bit flips interleaved. Without
    n_max: ~2,500 items."""
    limit = 2500 if n_max is None else n_max
    streams = _streams(seed)
    n = 0
    head, rest = streams[:4], streams[4:]
    for stream in head:
        for item in stream:
            if n >= limit:
                return
            yield item
            n += 1
    while rest and n < limit:
        for stream in list(rest):
            item = next(stream, None)
            if item is None:
                rest.remove(stream)
                continue
            yield item
            n += 1
            if n >= limit:
                return


def classes() -> list[str]:
    return list(EXPECT)


Generator = Callable[..., Iterator[tuple[str, str, bytes]]]
