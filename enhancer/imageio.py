"""Image I/O faithful to the original: decode a photo into float32 RGB (+ alpha) pages, and encode
the enhanced pages back in the input's format with its EXIF, ICC profile, alpha, bit depth and
grayscale-ness kept.

What the rest of the project relies on (see tests/test_imageio.py for one round trip per point):

* ``probe`` reads headers only: format, displayed size (after EXIF orientation) of every page,
  page count. A source is a path or the file's bytes. Limits hold for the whole file (Limits):
  pixels per page and summed over all pages, pages (counting stops at max_pages + 1), bytes of
  metadata; decompression bombs, animated files and container abuse (enhancer.containers walks
  each container in bounded work before Pillow runs) are refused here, before any pixel is
  decoded. ``tick()`` is called per page and during long walks (the daemon's watchdog).
* ``decode`` = probe + pixels. EXIF orientation is applied; 16-bit PNG/TIFF keep all 16 bits
  (Pillow reduces 16-bit *RGB* to 8 bits, so those go through OpenCV), 10/12-bit HEIF all its
  bits (pillow-heif's ``open_heif(convert_hdr_to_8bit=False)``, scaled so that the source's
  white is 1.0; ``Decoded.bits`` = 16); CMYK is converted to sRGB
  through its embedded ICC profile when it has one; palette images become RGB(A).
* ``encode`` writes the enhanced pages: EXIF with Orientation = 1 and the new pixel dimensions,
  the ICC profile byte-identical, alpha, 16 bits where the source had them (HEIF: the source
  HEIF's 10/12 bits, 12 from a 16-bit PNG/TIFF; ``heif_depth``), grayscale as
  grayscale (Rec. 601 luma, the weights Pillow and JPEG use).
* Paths are opened with ``O_NOFOLLOW | O_NONBLOCK`` and must be regular files (the inbox is
  untrusted); every PIL/OpenCV error or warning is translated into one of enhancer.errors'
  PermanentError classes, never let through (tests/test_hostile_formats.py, scripts/fuzz-decoders).
* Metadata an output format cannot hold (EXIF over 65533 bytes in JPEG, …) is trimmed or
  dropped with a note (``encode(..., notes=)``), never an error. XMP, IPTC-IIM, comments, PNG
  text, nclx, DPI and the provenance stamp are enhancer.metadata's: ``decode`` reads them into
  ``Decoded.meta``, ``encode`` = ``metadata.plan`` → pixel encoders → ``metadata.apply``.

Decisions (see the module's tests): palette images are written as RGB(A) (no re-quantisation);
CMYK with an ICC profile is converted to sRGB and the output carries lcms' built-in sRGB
profile, CMYK without one is converted naively and written without a profile; a still GIF is
read and written as PNG; a JPEG that Pillow opens as MPO (phones embed a second picture) is read
as a JPEG, first picture only; HEIF with several top-level images: the primary one. Alpha into
JPEG (output_format: jpeg) is composited over white. 16-bit RGB(A) TIFF is written by tifffile
(deflate, ICC and dpi on every page; EXIF is added by exiv2 for a single page, by
metadata.apply into every page's IFD for several); 16-bit gray+alpha becomes 16-bit RGBA
(Pillow has no LA;16). PNG orientation
comes only from an eXIf chunk before IDAT (decoding the image to look behind it would break
"header only"; browsers do the same). JPEG: quality as configured, 4:4:4 chroma at quality >= 90
(4:2:0 below), dpi and progressive kept. WebP: lossless if the source was (a VP8L chunk), else
quality. TIFF: the source's compression when Pillow can write it, else Adobe deflate.
"""
from __future__ import annotations

import errno
import functools
import io
import math
import os
import stat
import struct
import threading
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Union

import cv2
import numpy as np
import structlog
from PIL import Image, ImageCms, ImageFile, PngImagePlugin, UnidentifiedImageError

from enhancer import containers, metadata
from enhancer.errors import (AnimatedError, PermanentError, TooLargeError, UndecodableError,
                             UnsupportedError)

log = structlog.get_logger(__name__)

EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "tif", "tiff", "bmp", "heic", "heif"})

# What PIL may try when it identifies a file: our formats (+ GIF, so that a .gif is identified
# and refused or read cleanly). Keeping the list short also keeps exotic plugins (EPS runs
# Ghostscript on load) away from untrusted input.
_PIL_FORMATS = ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "DIB", "GIF", "HEIF")   # JPEG yields MPO too
_FORMAT_NAMES = {"MPO": "JPEG", "DIB": "BMP"}
_WRITABLE = ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "HEIF")
_CONFIGURED = {"png": ("PNG", "png"), "jpeg": ("JPEG", "jpg"), "webp": ("WEBP", "webp"),
               "tiff": ("TIFF", "tif")}
_TIFF_COMPRESSIONS = {"raw", "tiff_lzw", "tiff_adobe_deflate", "tiff_deflate", "packbits"}
_ORIENTATION, _EXIF_IFD, _PIXEL_X, _PIXEL_Y = 0x0112, 0x8769, 0xA002, 0xA003
# Descriptive IFD0 tags carried from a TIFF source (its IFD0 also holds strip offsets etc.).
_TIFF_EXIF_KEEP = metadata.PAGE_TAGS + (0x8769, 0x8825)
_LUMA = (0.299, 0.587, 0.114)       # Rec. 601, as Pillow's convert("L") and JPEG
_CHUNK_ROWS = 512                   # rows per block when quantising (bounds temporaries)

Source = Union[Path, str, bytes, bytearray, memoryview]   # a path, or the file's bytes
Tick = Callable[[], None]


@dataclass(frozen=True)
class Limits:
    """Whole-file limits; every one is checked from headers, before pixels are decoded."""

    max_input_megapixels: float = 80     # per page, and summed over all pages
    max_output_megapixels: float = 64    # per output page
    max_bytes: int = 512 * 1024 * 1024
    max_pages: int = 100                 # TIFF pages; counting stops at max_pages + 1
    max_metadata_bytes: int = 16 * 1024 * 1024   # EXIF + ICC + XMP + text chunks + comments


@dataclass(frozen=True)
class Info:
    """From the header only, nothing decoded. width/height: the first page as displayed (after
    EXIF orientation); page_sizes: every page as displayed (w, h)."""

    format: str            # JPEG, PNG, WEBP, TIFF, BMP, HEIF (GIF for a still .gif)
    width: int
    height: int
    pages: int
    mode: str              # PIL mode of the first page (Pillow says "RGB" for 16-bit RGB)
    page_sizes: tuple[tuple[int, int], ...] = ()
    metadata_bytes: int = 0

    def sizes(self) -> tuple[tuple[int, int], ...]:
        return self.page_sizes or ((self.width, self.height),)


@dataclass
class Page:
    rgb: np.ndarray                    # float32 (H, W, 3) in [0, 1], orientation applied; encode
                                       # also takes uint8/uint16 (an enhancer's integer result)
    alpha: np.ndarray | None = None    # float32 (H, W) in [0, 1]


@dataclass
class Decoded:
    info: Info
    pages: list[Page]
    bits: int                          # 8 or 16
    gray: bool                         # L, LA, I;16, 1
    exif: bytes | None                 # original EXIF ("Exif\0\0" + TIFF structure)
    icc: bytes | None                  # profile to carry over (sRGB after an ICC CMYK conversion)
    palette: bool
    extra: dict = field(default_factory=dict)   # dpi, compression, webp_lossless, …
    notes: list[dict] = field(default_factory=list)   # metadata dropped while decoding
    meta: metadata.Blocks | None = None   # XMP, IPTC, comment, PNG text, nclx (enhancer.metadata)

# ----------------------------------------------------------------------------------- opening

@functools.cache
def _register_heif() -> None:
    from pillow_heif import register_heif_opener

    register_heif_opener()


@functools.cache
def heif_can_write() -> bool:
    """True when pillow-heif has a working HEVC encoder (measured once by encoding 8×8)."""
    _register_heif()
    try:
        Image.new("RGB", (8, 8)).save(io.BytesIO(), "HEIF", quality=50)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        log.info("imageio.heif_write_unavailable", error=str(exc))
        return False
    return True


_PIL_LOCK = threading.Lock()
# What PIL and its decoders raise on corrupt or hostile data (translated, never let through).
_DECODER_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError,
                   struct.error, zlib.error, RuntimeError, NotImplementedError, OverflowError,
                   ZeroDivisionError)


def _no_tick() -> None:
    pass


def _corrupt(exc: BaseException, name: str, what: str) -> PermanentError:
    """A decoder's exception as one of ours (the caller raises it ``from exc``)."""
    if isinstance(exc, PermanentError):
        return exc
    text = str(exc)
    if "MAX_TEXT" in text:      # PNG text/iCCP over the limits _pil_guard sets from ours
        return TooLargeError(f"{name}: text or profile chunks over max_metadata_bytes ({text})")
    if "Security limit exceeded" in text:      # libheif's own size and memory limits
        return TooLargeError(f"{name}: over the HEIF decoder's limits ({text})")
    if isinstance(exc, Image.DecompressionBombError):
        return TooLargeError(f"{name}: refused as a decompression bomb (over twice "
                             f"max_input_megapixels): {text}")
    return UndecodableError(f"{name}: {what}: {text or type(exc).__name__}")


@contextmanager
def _pil_guard(limits: Limits, name: str) -> Iterator[None]:
    """PIL's decompression-bomb and PNG text limits set from *ours* for the duration of one
    open+decode, restored afterwards (under a lock: imageio calls are serialised). Truncated
    files are never loaded half-way; PIL warnings are logged, never printed; bomb warnings
    become errors."""
    pixels = max(1, int(limits.max_input_megapixels * 1e6))
    text = max(1, int(limits.max_metadata_bytes))
    with _PIL_LOCK:
        saved = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES,
                 PngImagePlugin.MAX_TEXT_CHUNK, PngImagePlugin.MAX_TEXT_MEMORY)
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = pixels, False
        PngImagePlugin.MAX_TEXT_CHUNK = PngImagePlugin.MAX_TEXT_MEMORY = text
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                # Between 1× and 2× the limit PIL only warns: our own check, right after the
                # header is read, refuses those with the numbers in the message.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                try:
                    yield
                except Image.DecompressionBombError as exc:
                    raise _corrupt(exc, name, "") from exc
            for w in caught:
                text_w = str(w.message)
                if "truncated" in text_w.lower():
                    raise UndecodableError(f"{name}: truncated image data ({text_w})")
                log.warning("imageio.decoder_warning", path=name, message=text_w[:200],
                            category=w.category.__name__)
        finally:
            (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES,
             PngImagePlugin.MAX_TEXT_CHUNK, PngImagePlugin.MAX_TEXT_MEMORY) = saved


def _read_fd(fd: int, size: int) -> bytes:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = os.readv(fd, [view[got:]])
        if n == 0:
            break
        got += n
    return bytes(view[:got]) if got < size else bytes(buf)


def _load(source: Source, limits: Limits, name: str | None) -> tuple[str, bytes]:
    """(display name, the whole file). A path is opened without following links or blocking on
    a FIFO, and must be a regular file; bytes are taken as they are."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        name = name or "<bytes>"
        size = source.nbytes if isinstance(source, memoryview) else len(source)
        if size > limits.max_bytes:
            raise TooLargeError(f"{name} has {size} bytes, over the limit of "
                                f"{limits.max_bytes} bytes")
        data = source if isinstance(source, bytes) else bytes(source)
    else:
        path = Path(source)
        name = name or path.name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsupportedError(f"{name} is a symbolic link; links in the inbox are not "
                                       "followed") from exc
            raise   # missing/unreadable file: not the content's fault, the caller decides
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise UnsupportedError(f"{name} is not a regular file")
            if st.st_size > limits.max_bytes:
                raise TooLargeError(f"{name} has {st.st_size} bytes, over the limit of "
                                    f"{limits.max_bytes} bytes")
            data = _read_fd(fd, st.st_size)
        finally:
            os.close(fd)
    if not data:
        raise UndecodableError(f"{name} is empty (0 bytes)")
    return name, data


@contextmanager
def _opened(data: bytes, name: str, limits: Limits,
            tick: Tick) -> Iterator[tuple[Image.Image, containers.Scan]]:
    """Walk the container (bounded), then identify with PIL (lazy). Yields (im, scan) inside the
    PIL guard."""
    _register_heif()
    sc = containers.scan(data, name, max_frames=limits.max_pages, tick=tick)
    tick()
    _check_metadata(name, sc.metadata, limits)
    with _pil_guard(limits, name):
        try:
            im = Image.open(io.BytesIO(data), formats=_PIL_FORMATS)
        except UnidentifiedImageError as exc:
            raise UndecodableError(
                f"{name} is not a readable JPEG, PNG, WebP, TIFF, BMP or HEIF image "
                f"({len(data)} bytes starting with {bytes(data[:16])!r})") from exc
        except _DECODER_ERRORS as exc:
            raise _corrupt(exc, name, "corrupt or truncated image header") from exc
        with im:
            yield im, sc


def _format(im: Image.Image) -> str:
    fmt = im.format or "?"
    return _FORMAT_NAMES.get(fmt, fmt)


def _exif_at_open(im: Image.Image, fmt: str) -> Image.Exif | None:
    """EXIF known without decoding pixels. PNG: only an eXIf chunk before IDAT (Pillow's
    getexif() would decode the image to look behind it; browsers ignore a late one too).
    An EXIF blob that would make Pillow's parser re-read its bytes without end is ignored."""
    raw = im.info.get("exif")
    if raw and not containers.exif_ok(raw, "exif"):
        return None
    if fmt == "JPEG":
        return im.getexif()
    if not raw:
        return None
    ex = Image.Exif()
    ex.load(raw)
    return ex


def _orientation(im: Image.Image, fmt: str) -> int:
    if fmt == "HEIF":
        return 1        # libheif applies irot/imir itself and pillow-heif resets EXIF to 1
    try:
        if fmt == "TIFF":                    # per page: the current IFD's own tag
            value = im.tag_v2.get(274, 1) if hasattr(im, "tag_v2") else 1
            value = int(value[0] if isinstance(value, tuple) else value)
            return value if 1 <= value <= 8 else 1
        ex = _exif_at_open(im, fmt)
        value = int(ex.get(_ORIENTATION, 1)) if ex is not None else 1
    except (ValueError, TypeError, SyntaxError, struct.error, OSError, KeyError,
            IndexError) as exc:
        log.warning("imageio.bad_exif", error=str(exc)[:200])
        return 1
    return value if 1 <= value <= 8 else 1


def _displayed_size(im: Image.Image, fmt: str) -> tuple[int, int]:
    """Size after EXIF orientation. Pillow's TIFF plugin already reports (and on load applies)
    it; the stored size is taken from the tags so that both Pillow behaviours give one answer."""
    orientation = _orientation(im, fmt)
    if fmt == "TIFF" and hasattr(im, "tag_v2") and 256 in im.tag_v2 and 257 in im.tag_v2:
        w, h = int(im.tag_v2[256]), int(im.tag_v2[257])
    else:
        w, h = im.size
    return (h, w) if orientation >= 5 else (w, h)


def _check_pixels(name: str, w: int, h: int, limits: Limits, what: str = "") -> None:
    limit = limits.max_input_megapixels * 1e6
    if w * h > limit:
        raise TooLargeError(f"{name}{what}: {w}×{h} = {w * h / 1e6:.1f} MP is over "
                            f"max_input_megapixels = {limits.max_input_megapixels:g}")


def _check_total(name: str, sizes: list[tuple[int, int]] | tuple, limits: Limits) -> None:
    total = sum(w * h for w, h in sizes)
    if total > limits.max_input_megapixels * 1e6:
        raise TooLargeError(f"{name}: the sum of pixels over {len(sizes)} pages = "
                            f"{total / 1e6:.1f} MP is over max_input_megapixels = "
                            f"{limits.max_input_megapixels:g}")


def _check_metadata(name: str, size: int, limits: Limits) -> None:
    if size > limits.max_metadata_bytes:
        raise TooLargeError(f"{name}: {size} bytes of metadata (EXIF, ICC, XMP, text, comments) "
                            f"are over max_metadata_bytes = {limits.max_metadata_bytes}")


def _check_png_bomb(name: str, im: Image.Image, size: int) -> None:
    """Deflate expands at most ~1032:1: a PNG whose header claims more raw bytes than its file
    could hold is truncated or a bomb. Refused before decoding even under a raised limit."""
    w, h = im.size
    raw = h * (1 + (w + 7) // 8)      # the least it can be: 1 bit per pixel, + filter bytes
    if raw > size * 1100 + 1_000_000:
        raise TooLargeError(f"{name}: header declares {w}×{h} ({w * h / 1e6:.0f} MP) but the file "
                            f"has {size} bytes; refused as a decompression bomb")


def _pil_metadata(im: Image.Image, fmt: str) -> int:
    """Bytes of metadata Pillow holds for the file (JPEG: every APPn and COM segment)."""
    if fmt == "JPEG":
        return sum(len(s) for _, s in getattr(im, "applist", ()))
    return sum(len(v) for v in im.info.values() if isinstance(v, (bytes, str)))


def _seek_count(im: Image.Image, cap: int, tick: Tick) -> int:
    """Frames found by seeking, at most cap + 1 (never the whole file)."""
    n = 1
    try:
        while n <= cap:
            im.seek(n)
            tick()
            n += 1
    except EOFError:
        pass
    im.seek(0)
    return n


def _frames(im: Image.Image, fmt: str, sc: containers.Scan, limits: Limits, tick: Tick) -> int:
    cap = limits.max_pages
    if fmt in ("TIFF", "GIF"):
        if sc.kind == fmt and sc.frames:
            return cap + 1 if sc.more else sc.frames
        return _seek_count(im, cap, tick)
    if fmt in ("PNG", "WEBP"):                  # both say it in a header chunk (acTL, ANIM)
        return max(sc.frames if sc.kind == fmt else 1, int(getattr(im, "n_frames", 1) or 1))
    return 1


def _page_sizes(im: Image.Image, fmt: str, sc: containers.Scan, pages: int,
                tick: Tick) -> list[tuple[int, int]]:
    """Every page as displayed, from headers: TIFF from the walk of its IFDs (Pillow's own view
    for page 1), by seeking only when the walk could not say."""
    first = _displayed_size(im, fmt)
    if pages == 1:
        return [first]
    if sc.kind == "TIFF" and len(sc.sizes) >= pages:
        return [first] + [(h, w) if o >= 5 else (w, h)
                          for (w, h), o in zip(sc.sizes[1:pages], sc.orientations[1:pages])]
    sizes = [first]
    for i in range(1, pages):
        im.seek(i)
        tick()
        sizes.append(_displayed_size(im, fmt))
    im.seek(0)
    return sizes


def _info(im: Image.Image, sc: containers.Scan, name: str, limits: Limits, size: int,
          tick: Tick) -> Info:
    fmt = _format(im)
    frames = _frames(im, fmt, sc, limits, tick)
    if fmt in ("GIF", "WEBP", "PNG") and frames > 1:
        count = f"more than {limits.max_pages}" if frames > limits.max_pages else str(frames)
        raise AnimatedError(f"{name}: animated {fmt} with {count} frames is not supported")
    pages = frames if fmt == "TIFF" else 1
    if pages > limits.max_pages:
        raise TooLargeError(f"{name}: more than {limits.max_pages} pages (max_pages = "
                            f"{limits.max_pages}); counting stopped there")
    metadata = max(sc.metadata, _pil_metadata(im, fmt))
    _check_metadata(name, metadata, limits)
    w, h = im.size
    _check_pixels(name, w, h, limits)
    if fmt == "PNG":
        _check_png_bomb(name, im, size)
    sizes = _page_sizes(im, fmt, sc, pages, tick)
    for i, (pw, ph) in enumerate(sizes[1:], start=2):
        _check_pixels(name, pw, ph, limits, what=f" page {i}")
    _check_total(name, sizes, limits)
    return Info(format=fmt, width=sizes[0][0], height=sizes[0][1], pages=pages, mode=im.mode,
                page_sizes=tuple(sizes), metadata_bytes=metadata)


def probe(source: Source, limits: Limits, *, name: str | None = None,
          tick: Tick | None = None) -> Info:
    """Header only. ``source``: a path (opened without following links) or the file's bytes
    (``name`` is then the display name for messages). ``tick()`` is called once per page
    examined and periodically in long walks (feed a watchdog with it). Raises TooLargeError,
    AnimatedError, UnsupportedError, UndecodableError — never another exception for any content
    (OSError only for a path that cannot be opened)."""
    tick = tick or _no_tick
    name, data = _load(source, limits, name)
    with _opened(data, name, limits, tick) as (im, sc):
        try:
            return _info(im, sc, name, limits, len(data), tick)
        except _DECODER_ERRORS as exc:
            raise _corrupt(exc, name, "corrupt image header") from exc


# ----------------------------------------------------------------------------------- decoding

def _orient(a: np.ndarray, orientation: int) -> np.ndarray:
    """EXIF orientation as numpy views (no copy); the float conversion makes it contiguous."""
    if orientation == 2:
        return a[:, ::-1]
    if orientation == 3:
        return a[::-1, ::-1]
    if orientation == 4:
        return a[::-1]
    if orientation == 5:
        return a.swapaxes(0, 1)
    if orientation == 6:
        return np.rot90(a, -1)
    if orientation == 7:
        return a[::-1, ::-1].swapaxes(0, 1)
    if orientation == 8:
        return np.rot90(a, 1)
    return a


def _to_float(a: np.ndarray) -> np.ndarray:
    scale = 1.0 / (65535.0 if a.dtype == np.uint16 or a.dtype.itemsize == 2 else 255.0)
    out = np.empty(a.shape, np.float32)
    np.multiply(a, np.float32(scale), out=out, dtype=np.float32, casting="unsafe")
    return out


def _page_from_array(a: np.ndarray, orientation: int, gray: bool, has_alpha: bool) -> Page:
    a = _orient(a, orientation)
    if gray:
        lum = _to_float(a[..., 0] if a.ndim == 3 else a)
        alpha = _to_float(a[..., -1]) if has_alpha else None
        return Page(rgb=np.repeat(lum[..., None], 3, axis=2), alpha=alpha)
    rgb = _to_float(a[..., :3])
    alpha = _to_float(a[..., 3]) if has_alpha else None
    return Page(rgb=rgb, alpha=alpha)


def _srgb_bytes() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _pil_page(im: Image.Image, orientation: int, extra: dict, name: str) -> tuple[Page, dict]:
    """Pixels of the current PIL frame. Returns the page and what it was (gray, alpha, bits…)."""
    mode = im.mode
    meta = {"gray": False, "alpha": False, "bits": 8, "palette": False, "cmyk": False}
    im.load()
    if getattr(im, "format", None) == "TIFF" and 274 not in getattr(im, "tag_v2", {274: 1}):
        orientation = 1          # Pillow's TIFF plugin transposed on load and dropped the tag
    if mode == "CMYK":
        meta["cmyk"] = True
        icc = im.info.get("icc_profile")
        if icc:
            try:
                src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
                im = ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"),
                                               outputMode="RGB")
                extra["cmyk_conversion"] = "embedded ICC profile → sRGB"
            except (ImageCms.PyCMSError, OSError, ValueError) as exc:
                log.warning("imageio.cmyk_icc_failed", path=name, error=str(exc))
                im = im.convert("RGB")
                extra["cmyk_conversion"] = f"naive (embedded profile unusable: {exc})"
        else:
            im = im.convert("RGB")
            extra["cmyk_conversion"] = "naive (no embedded profile)"
    elif mode in ("P", "PA"):
        meta["palette"] = True
        im = im.convert("RGBA" if mode == "PA" or "transparency" in im.info else "RGB")
    elif mode == "1":
        im = im.convert("L")
    elif mode in ("RGBa", "La"):
        im = im.convert(mode[0:-1] + "A")
    elif mode in ("RGBX", "YCbCr"):
        im = im.convert("RGB")
    elif mode == "RGB" and "transparency" in im.info:
        im = im.convert("RGBA")         # tRNS colour key in an RGB PNG
    elif mode == "L" and "transparency" in im.info:
        im = im.convert("LA")
    elif mode not in ("RGB", "RGBA", "L", "LA", "I;16", "I;16B", "I;16L", "I;16N", "I"):
        raise UnsupportedError(f"{name}: pixel mode {mode} is not supported")
    mode = im.mode
    a = np.asarray(im)
    if mode == "I":
        # 32-bit integer container (some 16-bit grays); values are 16-bit samples
        a = np.clip(a, 0, 65535).astype(np.uint16)
    if mode.startswith("I"):
        meta["bits"] = 16
        a = a.astype(np.uint16, copy=False)
    meta["gray"] = mode in ("L", "LA") or mode.startswith("I")
    meta["alpha"] = mode in ("RGBA", "LA")
    page = _page_from_array(a, orientation, meta["gray"], meta["alpha"])
    return page, meta


def _is_16bit_color(im: Image.Image, fmt: str) -> bool:
    """Pillow holds 16-bit RGB(A) as 8-bit RGB(A): detect it from the header."""
    if im.mode not in ("RGB", "RGBA", "LA"):
        return False
    if fmt == "PNG":
        return any(";16" in str(t.args) for t in im.tile)
    if fmt == "TIFF":
        bps = im.tag_v2.get(258) if hasattr(im, "tag_v2") else None
        bps = bps if isinstance(bps, tuple) else (bps,)
        return bool(bps) and all(b == 16 for b in bps)
    return False


def _cv2_pages(name: str, fmt: str, data: np.ndarray) -> list[np.ndarray]:
    """16-bit colour pixels through OpenCV (BGR(A) → RGB(A) views)."""
    flags = cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION
    try:
        if fmt == "TIFF":
            ok, arrays = cv2.imdecodemulti(data, flags)
            arrays = list(arrays) if ok else []
        else:
            a = cv2.imdecode(data, flags)
            arrays = [] if a is None else [a]
    except cv2.error as exc:
        raise UndecodableError(f"{name}: corrupt 16-bit {fmt} data: {exc}") from exc
    if not arrays:
        raise UndecodableError(f"{name}: corrupt or truncated 16-bit {fmt} data")
    out = []
    for a in arrays:
        if a.ndim == 2:
            a = a[..., None]
        if a.shape[2] >= 3:
            a = np.concatenate([a[..., 2::-1], a[..., 3:]], axis=2) if a.shape[2] == 4 \
                else a[..., ::-1]
        out.append(a)
    return out


def _heif_bits(im: Image.Image) -> int:
    try:
        return int(im.info.get("bit_depth") or 8)
    except (TypeError, ValueError):
        return 8


def _heif_deep_page(data: bytes, name: str, bits: int, limits: Limits) -> tuple[Page, dict]:
    """A 10/12-bit HEIF's primary image with all its bits (pillow-heif's Pillow plugin would
    reduce it to 8). libheif hands the samples over shifted into 16 bits (v << (16 - bits)); they
    are scaled to [0, 1] on the source's own scale, so that white stays 1.0 and writing them
    back with the same depth gives the same code values. Monochrome HEIF stays gray."""
    from pillow_heif import open_heif

    heif = open_heif(data, convert_hdr_to_8bit=False)
    w, h = heif.size
    _check_pixels(name, w, h, limits)
    mode = heif.mode
    if mode not in ("RGB;16", "RGBA;16", "I;16", "L;16", "LA;16"):
        raise UnsupportedError(f"{name}: {bits}-bit HEIF pixel mode {mode} is not supported")
    a = np.asarray(heif)
    if a.dtype != np.uint16:
        raise UndecodableError(f"{name}: {bits}-bit HEIF decoded as {a.dtype}")
    if a.ndim == 2:
        a = a[..., None]
    shift, top = 16 - bits, float((1 << bits) - 1)
    out = np.empty(a.shape, np.float32)
    for y in range(0, a.shape[0], _CHUNK_ROWS):
        blk = a[y:y + _CHUNK_ROWS] >> shift
        np.multiply(blk, np.float32(1 / top), out=out[y:y + _CHUNK_ROWS], casting="unsafe")
    gray = a.shape[2] in (1, 2)
    alpha = a.shape[2] in (2, 4)
    rgb = np.repeat(out[..., :1], 3, axis=2) if gray else out[..., :3]
    page = Page(rgb=np.ascontiguousarray(rgb), alpha=out[..., -1] if alpha else None)
    return page, {"gray": gray, "alpha": alpha, "bits": 16, "palette": False, "cmyk": False}


def _webp_lossless(data: bytes) -> bool:
    """A VP8L chunk (and no lossy VP8 one) means the WebP was lossless."""
    pos, found, size = 12, set(), len(data)
    while pos + 8 <= size and len(found) < 64:
        tag, length = struct.unpack_from("<4sI", data, pos)
        found.add(tag)
        pos += 8 + length + (length & 1)
    return b"VP8L" in found and b"VP8 " not in found


def _clean_exif(im: Image.Image, fmt: str, name: str, notes: list[dict]) -> bytes | None:
    try:
        if fmt == "TIFF":
            ifd0 = im.getexif()
            keep = Image.Exif()
            for tag in _TIFF_EXIF_KEEP:
                if tag in (0x8769, 0x8825):
                    sub = ifd0.get_ifd(tag)
                    if sub:
                        keep.get_ifd(tag).update(sub)
                elif tag in ifd0:
                    keep[tag] = ifd0[tag]
            return keep.tobytes() if len(keep) or keep.get_ifd(0x8769) else None
        raw = im.info.get("exif")
        if not raw:
            return None
        raw = raw if raw.startswith(b"Exif\x00\x00") else b"Exif\x00\x00" + raw
        if not containers.exif_ok(raw, name):
            notes.append({"block": "exif", "action": "dropped",
                          "reason": "its directories would make a parser re-read the same bytes "
                                    "without end (malformed or hostile EXIF)"})
            return None
        return raw
    except (ValueError, TypeError, SyntaxError, struct.error, OSError, KeyError,
            IndexError) as exc:
        log.warning("imageio.bad_exif", path=name, error=str(exc)[:200])
        notes.append({"block": "exif", "action": "dropped", "reason": f"unreadable: {exc}"[:200]})
        return None


def decode(source: Source, limits: Limits, *, name: str | None = None,
           tick: Tick | None = None) -> Decoded:
    """probe, then pixels. Same ``source``, ``name`` and ``tick`` as probe (ticks once per page
    decoded too). Raises like probe, and UndecodableError on corrupt/truncated data."""
    tick = tick or _no_tick
    name, data = _load(source, limits, name)
    size = len(data)
    with _opened(data, name, limits, tick) as (im, sc):
        try:
            info = _info(im, sc, name, limits, size, tick)
        except _DECODER_ERRORS as exc:
            raise _corrupt(exc, name, "corrupt image header") from exc
        fmt = info.format
        notes: list[dict] = []
        pages: list[Page] = []
        metas: list[dict] = []
        try:
            extra: dict = {"source_format": im.format}
            if "dpi" in im.info:
                extra["dpi"] = tuple(float(x) for x in im.info["dpi"])
            if fmt == "TIFF" and im.info.get("compression"):
                extra["compression"] = im.info["compression"]
            if fmt == "WEBP":
                extra["webp_lossless"] = _webp_lossless(data)
            if fmt == "JPEG":
                extra["progressive"] = bool(im.info.get("progressive")
                                            or im.info.get("progression"))
                if im.format == "MPO":
                    extra["note"] = "multi-picture JPEG: first picture only"
            exif = _clean_exif(im, fmt, name, notes)
            icc = im.info.get("icc_profile") or None
            blocks = metadata.read(data, fmt, im.info, getattr(im, "tag_v2", None), notes)
            orientations, sixteen = [], []
            for i in range(info.pages):
                if i:
                    im.seek(i)
                    # the walk of the IFDs said so; Pillow's own reading must agree
                    _check_pixels(name, *im.size, limits, what=f" page {i + 1}")
                    metadata.read_page(blocks, i, getattr(im, "tag_v2", None), notes)
                tick()
                orientations.append(_orientation(im, fmt))
                sixteen.append(_is_16bit_color(im, fmt))
            if any(sixteen):
                arrays = _cv2_pages(name, fmt, np.frombuffer(data, np.uint8))
                if len(arrays) != info.pages:
                    raise UndecodableError(f"{name}: OpenCV read {len(arrays)} of "
                                           f"{info.pages} pages")
                for i, a in enumerate(arrays):
                    gray = a.shape[2] < 3
                    alpha = a.shape[2] in (2, 4)
                    # OpenCV applies TIFF orientation itself, even when told not to.
                    orient = 1 if fmt == "TIFF" else orientations[i]
                    pages.append(_page_from_array(a, orient, gray, alpha))
                    metas.append({"gray": gray, "alpha": alpha, "palette": False, "cmyk": False,
                                  "bits": 16 if a.dtype == np.uint16 else 8})
                    tick()
            elif fmt == "HEIF" and _heif_bits(im) > 8:
                page, meta = _heif_deep_page(data, name, _heif_bits(im), limits)
                pages.append(page)
                metas.append(meta)
                tick()
            else:
                done = 0
                for i in range(info.pages):
                    im.seek(i)
                    done += im.size[0] * im.size[1]
                    if done > limits.max_input_megapixels * 1e6:
                        _check_total(name, [im.size] * (i + 1), limits)   # raises
                    page, meta = _pil_page(im, orientations[i], extra, name)
                    pages.append(page)
                    metas.append(meta)
                    tick()
        except _DECODER_ERRORS as exc:
            raise _corrupt(exc, name, f"truncated or corrupt {fmt} data") from exc
        # PNG text chunks after the image data are only read now
        _check_metadata(name, max(info.metadata_bytes, _pil_metadata(im, fmt)), limits)
    first = metas[0]
    if first["cmyk"]:
        icc = _srgb_bytes() if extra.get("cmyk_conversion", "").startswith("embedded") else None
    extra["page_modes"] = [("16" if m["bits"] == 16 else "8") + ("gray" if m["gray"] else "rgb")
                           + ("+alpha" if m["alpha"] else "") for m in metas]
    log.debug("imageio.decoded", path=name, format=fmt, width=info.width, height=info.height,
              pages=info.pages, modes=extra["page_modes"])
    return Decoded(info=info, pages=pages, bits=max(m["bits"] for m in metas),
                   gray=first["gray"], exif=exif, icc=icc,
                   palette=any(m["palette"] for m in metas), extra=extra, notes=notes, meta=blocks)


# ----------------------------------------------------------------------------------- sizes

# Longest side a format can hold (measured with Pillow 13: JPEG fails above 65500, WebP above
# 16383; PNG, TIFF, BMP and HEIF (grid-coded by pillow-heif) took 40000+).
MAX_SIDE = {"JPEG": 65500, "WEBP": 16383}


def output_scale(info: Info, wanted: float, limits: Limits, fmt: str | None = None) -> float:
    """The upscale factor actually used: ``wanted``, reduced so that every output page stays
    within max_output_megapixels (and, given the output ``fmt``, within the longest side that
    format can hold), rounded down to 1/1000. The largest page decides, not the first. Never
    below 1.0 (the input limit was checked already)."""
    if wanted <= 0:
        raise ValueError(f"upscale must be positive, got {wanted}")
    limit = limits.max_output_megapixels * 1e6
    side = MAX_SIDE.get((fmt or "").upper())
    sizes = [(max(1, w), max(1, h)) for w, h in info.sizes()]

    def fits(k: float) -> bool:
        for w, h in sizes:
            ow, oh = round(w * k), round(h * k)
            if ow * oh > limit or (side is not None and max(ow, oh) > side):
                return False
        return True

    if fits(wanted):
        return float(wanted)
    scale = math.sqrt(limit / max(w * h for w, h in sizes))
    if side is not None:
        scale = min(scale, side / max(max(w, h) for w, h in sizes))
    scale = math.floor(min(scale, wanted) * 1000) / 1000
    while scale > 1.0 and not fits(scale):
        scale -= 0.001
    return max(1.0, round(scale, 3))


def output_format(src_format: str, configured: str) -> tuple[str, str]:
    """(PIL format, extension without dot); extension "" = keep the input's own extension."""
    src = _FORMAT_NAMES.get(src_format.upper(), src_format.upper())
    configured = configured.lower()
    if configured == "same":
        if src == "HEIF":
            return ("HEIF", "") if heif_can_write() else ("JPEG", "jpg")
        if src in _WRITABLE:
            return src, ""
        return "PNG", "png"            # a still GIF (or anything else we read) → PNG
    if configured not in _CONFIGURED:
        raise ValueError(f"output_format must be same|png|jpeg|webp|tiff, got {configured!r}")
    fmt, ext = _CONFIGURED[configured]
    return fmt, "" if fmt == src else ext


def resize_alpha(alpha: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Alpha (H, W) float32 → size (w, h) with Lanczos, clipped to [0, 1]."""
    out = cv2.resize(np.ascontiguousarray(alpha, dtype=np.float32), tuple(size),
                     interpolation=cv2.INTER_LANCZOS4)
    return np.clip(out, 0.0, 1.0, out=out)


# ----------------------------------------------------------------------------------- encoding

def _unit_block(block: np.ndarray) -> np.ndarray:
    """A block of pixels as float32 in [0, 1] (integer pages: uint8/uint16 results)."""
    if block.dtype == np.uint8:
        return block.astype(np.float32) * np.float32(1 / 255)
    if block.dtype == np.uint16:
        return block.astype(np.float32) * np.float32(1 / 65535)
    return block


def _quantize_into(out: np.ndarray, src: np.ndarray, maxval: int) -> None:
    """float [0,1] (or uint8/uint16) → integers, block by block (temporaries bounded to
    _CHUNK_ROWS rows). Integer input of the wanted depth is copied as it is."""
    if src.dtype == out.dtype:
        out[...] = src
        return
    for y in range(0, src.shape[0], _CHUNK_ROWS):
        block = _unit_block(src[y:y + _CHUNK_ROWS]) * np.float32(maxval)
        block += np.float32(0.5)
        np.clip(block, 0, maxval, out=block)
        out[y:y + _CHUNK_ROWS] = block        # casts (truncates the +0.5 → rounds)


def _luma_into(out: np.ndarray, rgb: np.ndarray, maxval: int) -> None:
    r, g, b = _LUMA
    for y in range(0, rgb.shape[0], _CHUNK_ROWS):
        blk = _unit_block(rgb[y:y + _CHUNK_ROWS])
        lum = blk[..., 0] * np.float32(r * maxval)
        lum += blk[..., 1] * np.float32(g * maxval)
        lum += blk[..., 2] * np.float32(b * maxval)
        lum += np.float32(0.5)
        np.clip(lum, 0, maxval, out=lum)
        out[y:y + _CHUNK_ROWS] = lum


def _page_array(page: Page, gray: bool, alpha: bool, bits: int) -> np.ndarray:
    h, w = page.rgb.shape[:2]
    maxval = 65535 if bits == 16 else 255
    dtype = np.uint16 if bits == 16 else np.uint8
    channels = (1 if gray else 3) + (1 if alpha else 0)
    out = np.empty((h, w, channels), dtype)
    if gray:
        _luma_into(out[..., 0], page.rgb, maxval)
    else:
        _quantize_into(out[..., :3], page.rgb, maxval)
    if alpha:
        if page.alpha is None or page.alpha.shape != (h, w):
            raise ValueError(f"alpha of shape {None if page.alpha is None else page.alpha.shape} "
                             f"does not match the image ({h}, {w}); use resize_alpha")
        _quantize_into(out[..., -1], page.alpha, maxval)
    return out[..., 0] if channels == 1 else out


def _flatten_on_white(page: Page) -> Page:
    """For formats without alpha (JPEG, BMP when asked): composite over white."""
    if page.alpha is None:
        return page
    a = page.alpha[..., None]
    rgb = _unit_block(page.rgb) * a
    rgb += 1.0 - a
    return Page(rgb=rgb.astype(np.float32, copy=False), alpha=None)


def _parse_exif(blob: bytes) -> Image.Exif:
    """Pillow's EXIF parser without its warnings on stderr (a bad tag is skipped, as it says)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ex = Image.Exif()
        ex.load(blob)
        ex.get_ifd(_EXIF_IFD)
        ex.get_ifd(0x8825)                       # GPS
        return ex


# What one output format can hold (measured with Pillow 13): JPEG has one APP1 segment of at
# most 65533 bytes for EXIF ("Exif\0\0" included) and splits ICC over at most 255 APP2
# segments of 65519 bytes (beyond that Pillow writes a fragment count that wraps); PNG: Pillow's
# reader (and so this module with default limits, and many programs) refuses an iCCP chunk
# over 1 MiB decompressed. WebP, TIFF and HEIF took 16 MB of each.
JPEG_EXIF_MAX = 65533
JPEG_ICC_MAX = 255 * (65533 - 14)
PNG_ICC_MAX = 1 << 20
_MAKERNOTE = 0x927C


def _trim_exif(exif: bytes, limit: int, fmt: str, notes: list[dict]) -> bytes | None:
    """EXIF over what ``fmt`` holds: without MakerNote if that is enough, else none at all."""
    why = f"{fmt} holds at most {limit} bytes of EXIF; it had {len(exif)}"
    try:
        ex = _parse_exif(exif)
        sub = ex.get_ifd(_EXIF_IFD)
        if _MAKERNOTE in sub:
            del sub[_MAKERNOTE]
            smaller = ex.tobytes()
            if len(smaller) <= limit:
                notes.append({"block": "exif", "action": "trimmed",
                              "reason": f"{why}; MakerNote and thumbnail removed, "
                                        f"{len(smaller)} bytes kept"})
                notes.append({"block": "makernote", "action": "dropped",
                              "reason": f"{fmt} EXIF is limited to {limit} bytes"})
                return smaller
    except (ValueError, TypeError, SyntaxError, struct.error, OSError, KeyError, IndexError):
        pass
    notes.append({"block": "exif", "action": "dropped",
                  "reason": f"{why}, still too many without its MakerNote and thumbnail"})
    return None


def _fit_metadata(fmt: str, exif: bytes | None, icc: bytes | None,
                  notes: list[dict]) -> tuple[bytes | None, bytes | None]:
    """EXIF and ICC as the output format can hold them; a note for each change."""
    if fmt == "JPEG":
        if exif and len(exif) > JPEG_EXIF_MAX:
            exif = _trim_exif(exif, JPEG_EXIF_MAX, fmt, notes)
        if icc and len(icc) > JPEG_ICC_MAX:
            notes.append({"block": "icc", "action": "dropped",
                          "reason": f"JPEG holds at most {JPEG_ICC_MAX} bytes of ICC profile "
                                    f"(255 APP2 segments); it had {len(icc)}"})
            icc = None
    elif fmt == "PNG" and icc and len(icc) > PNG_ICC_MAX:
        notes.append({"block": "icc", "action": "dropped",
                      "reason": f"an iCCP chunk over {PNG_ICC_MAX} bytes is refused by common "
                                f"PNG readers; it had {len(icc)}"})
        icc = None
    elif fmt == "BMP":
        for block, value in (("exif", exif), ("icc", icc)):
            if value:
                notes.append({"block": block, "action": "dropped",
                              "reason": "BMP output holds no such block"})
        exif = icc = None
    return exif, icc


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _png_with_metadata(png: bytes, icc: bytes | None, exif: bytes | None,
                       dpi: tuple[float, float] | None) -> bytes:
    """Insert iCCP, eXIf and pHYs right after IHDR of a PNG written by OpenCV."""
    chunks = b""
    if icc:
        chunks += _png_chunk(b"iCCP", b"ICC Profile\x00\x00" + zlib.compress(icc))
    if exif:
        chunks += _png_chunk(b"eXIf", exif[6:] if exif.startswith(b"Exif\x00\x00") else exif)
    if dpi:
        ppm = [max(1, int(round(d / 0.0254))) for d in dpi]
        chunks += _png_chunk(b"pHYs", struct.pack(">IIB", ppm[0], ppm[1], 1))
    ihdr_end = 8 + 8 + 13 + 4
    return png[:ihdr_end] + chunks + png[ihdr_end:]


def _encode_16bit_color(arrays: list[np.ndarray], fmt: str, exif: bytes | None,
                        icc: bytes | None, dpi: tuple[float, float] | None) -> bytes:
    """16-bit colour pixels (+ ICC on every page, EXIF in PNG, dpi). TIFF: no tags of tifffile's
    own (no JSON description, no Software); EXIF, XMP and IPTC are metadata.apply's."""
    bgr = [a[..., [2, 1, 0, 3]] if a.shape[2] == 4 else a[..., ::-1] for a in arrays]
    if fmt == "PNG":
        ok, buf = cv2.imencode(".png", bgr[0], [cv2.IMWRITE_PNG_COMPRESSION, 6])
        if not ok:
            raise ValueError("OpenCV could not encode the 16-bit PNG")
        return _png_with_metadata(buf.tobytes(), icc, exif, dpi)
    import tifffile   # 16-bit RGB TIFF: Pillow cannot hold it; tifffile writes ICC and dpi

    out = io.BytesIO()
    with tifffile.TiffWriter(out) as tw:
        for i, a in enumerate(arrays):
            kwargs: dict = {}
            if icc:
                kwargs["iccprofile"] = icc
            if dpi:
                kwargs.update(resolution=dpi, resolutionunit="INCH")
            tw.write(a, photometric="rgb", compression="zlib", software=False, metadata=None,
                     extrasamples=("unassalpha",) if a.shape[2] == 4 else None, **kwargs)
    return out.getvalue()


def encode(src: Decoded, pages: list[Page], fmt: str, jpeg_quality: int = 95,
           notes: list[dict] | None = None,
           provenance: metadata.Provenance | None = None) -> bytes:
    """Encode the enhanced pages as ``fmt`` (a PIL format from output_format) with src's
    metadata. Gray sources are written gray, 16-bit PNG/TIFF sources 16-bit, alpha kept where the
    format holds it (JPEG: composited over white). Returns the file's bytes.

    Pixels and metadata are separate steps: ``metadata.plan`` decides what the result carries
    (and stamps ``provenance`` when given), the pixel encoders below write pixels with EXIF, ICC
    and dpi, ``metadata.apply`` adds XMP, IPTC, comments and text. Every block of the source gets
    a note in ``notes`` ({"block", "action": kept|converted|trimmed|dropped|added, "reason"?});
    metadata a format cannot hold is converted, trimmed or dropped, never an error (the sidecar's
    ``metadata``; add ``src.notes`` for what decoding dropped)."""
    notes = [] if notes is None else notes
    fmt = fmt.upper()
    if fmt not in _WRITABLE:
        raise ValueError(f"cannot encode {fmt}; one of {', '.join(_WRITABLE)}")
    if not pages:
        raise ValueError("no pages to encode")
    if fmt != "TIFF":
        pages = pages[:1]
    if fmt == "JPEG" or (fmt == "BMP" and src.gray):    # no alpha there (BMP: no LA)
        pages = [_flatten_on_white(p) for p in pages]
    bits = 16 if src.bits == 16 and fmt in ("PNG", "TIFF", "HEIF") else 8
    gray = src.gray and fmt in ("JPEG", "PNG", "TIFF", "BMP")
    h, w = pages[0].rgb.shape[:2]
    if fmt in MAX_SIDE and max(w, h) > MAX_SIDE[fmt]:
        raise UnsupportedError(f"{fmt} cannot hold {w}×{h}: at most {MAX_SIDE[fmt]} pixels a "
                               "side (pass fmt to output_scale, or choose another output_format)")
    scale = w / max(1, src.info.width)
    plan = metadata.plan(fmt, exif=src.exif, blocks=src.meta, size=(w, h), scale=scale,
                         dpi=src.extra.get("dpi"), pages=len(pages), provenance=provenance,
                         notes=notes)
    _bit_depth_note(src, fmt, bits, notes)
    data = _encode_pixels(src, pages, fmt, jpeg_quality, gray, bits, plan, notes)
    return metadata.apply(data, plan, len(pages), notes)


def _bit_depth_note(src: Decoded, fmt: str, bits: int, notes: list[dict]) -> None:
    """The sidecar's word on a deep source's bit depth (8-bit sources get none)."""
    if src.bits != 16:
        return
    own = src.meta.heif_bits if src.meta is not None and src.meta.format == "HEIF" else None
    was = f"{own}-bit HEIF" if own else f"16-bit {src.info.format}"
    if bits == 8:
        notes.append({"block": "bit_depth", "action": "converted",
                      "reason": f"{was} reduced to 8 bits: {fmt} output holds 8 bits per sample"})
    elif fmt == "HEIF":
        depth = heif_depth(src)
        if own == depth:
            notes.append({"block": "bit_depth", "action": "kept",
                          "reason": f"{was} written with {depth} bits"})
        else:
            notes.append({"block": "bit_depth", "action": "converted",
                          "reason": f"{was} written as {depth}-bit HEIF (the most the HEVC "
                                    "encoder writes)"})
    elif own:
        notes.append({"block": "bit_depth", "action": "kept",
                      "reason": f"{was} written as 16-bit {fmt} (every sample value kept)"})
    else:
        notes.append({"block": "bit_depth", "action": "kept", "reason": f"16-bit {fmt}"})


def _encode_pixels(src: Decoded, pages: list[Page], fmt: str, jpeg_quality: int, gray: bool,
                   bits: int, plan: metadata.Plan, notes: list[dict]) -> bytes:
    """The pixels, with what the encoders write themselves: EXIF, ICC, dpi (HEIF: XMP and nclx).
    Everything else is metadata.apply's; TIFF EXIF too (exiv2 for one page, every page's IFD
    for several)."""
    dpi = plan.dpi
    arrays = [_page_array(p, gray, p.alpha is not None, bits) for p in pages]
    bits16_color = bits == 16 and (not gray or any(a.ndim == 3 for a in arrays))
    exif, icc = _fit_metadata(fmt, plan.exif, src.icc, notes)
    if fmt == "TIFF" and exif:  # neither tifffile nor Pillow+libtiff write EXIF sub-IFDs
        if len(pages) == 1:
            plan.exif_after = exif  # exiv2 writes it
        exif = None                 # several pages: metadata.apply writes it into every page
    if fmt == "HEIF" and bits == 16:
        return _encode_heif_deep(arrays, heif_depth(src), jpeg_quality, exif, icc, plan, notes)
    if bits == 16 and not gray:
        return _encode_16bit_color(arrays, fmt, exif, icc, dpi)
    if bits16_color:
        # 16-bit gray + alpha: Pillow has no LA;16 → 16-bit RGBA (the only lossless choice)
        arrays = [np.concatenate([np.repeat(a[..., :1], 3, axis=2), a[..., 1:]], axis=2)
                  if a.ndim == 3 else np.repeat(a[..., None], 3, axis=2) for a in arrays]
        return _encode_16bit_color(arrays, fmt, exif, icc, dpi)

    images = [_to_pil(a) for a in arrays]
    kwargs: dict = {}
    if exif:
        kwargs["exif"] = exif
    if icc:
        kwargs["icc_profile"] = icc
    if dpi and fmt in ("JPEG", "PNG", "TIFF", "BMP"):
        kwargs["dpi"] = dpi
    if fmt == "JPEG":
        kwargs.update(quality=int(jpeg_quality), subsampling=0 if jpeg_quality >= 90 else 2,
                      optimize=True, progressive=bool(src.extra.get("progressive")))
    elif fmt == "WEBP":
        if src.extra.get("webp_lossless"):
            kwargs.update(lossless=True, quality=100, method=4)
        else:
            kwargs.update(quality=int(jpeg_quality), method=4)
    elif fmt == "PNG":
        kwargs.update(compress_level=6)
    elif fmt == "TIFF":
        comp = src.extra.get("compression")
        kwargs["compression"] = comp if comp in _TIFF_COMPRESSIONS else "tiff_adobe_deflate"
        if len(images) > 1:
            kwargs.update(save_all=True, append_images=images[1:])
    elif fmt == "HEIF":
        _register_heif()
        kwargs.update(quality=int(jpeg_quality))
        kwargs.update({k: v for k, v in _heif_kwargs(plan, None, None).items()})
    try:
        return _save(images[0], fmt, kwargs)
    except (OSError, ValueError, KeyError) as exc:
        held = [k for k in ("exif", "icc_profile", "xmp") if k in kwargs]
        if not held:
            raise ValueError(f"encoding {fmt} failed: {exc}") from exc
        for k in held:                  # an encoder limit not known above: without metadata
            del kwargs[k]
            notes.append({"block": {"icc_profile": "icc"}.get(k, k), "action": "dropped",
                          "reason": f"the {fmt} encoder refused it: {exc}"[:200]})
        try:
            return _save(images[0], fmt, kwargs)
        except (OSError, ValueError, KeyError) as exc2:
            raise ValueError(f"encoding {fmt} failed: {exc2}") from exc2


def heif_depth(src: Decoded) -> int:
    """Bits per sample of a HEIF written from ``src``: a 10/12-bit HEIF's own depth, 12 for other
    16-bit sources (the most libheif's HEVC encoder writes), else 8."""
    if src.bits != 16:
        return 8
    own = src.meta.heif_bits if src.meta is not None else None
    return own if own in (10, 12) else 12


def _heif_kwargs(plan: metadata.Plan, exif: bytes | None, icc: bytes | None) -> dict:
    kwargs: dict = {}
    if exif:
        kwargs["exif"] = exif
    if icc:
        kwargs["icc_profile"] = icc
    if plan.xmp:
        kwargs["xmp"] = plan.xmp
    if plan.nclx:
        kwargs.update({k: plan.nclx[k] for k in ("color_primaries", "transfer_characteristics",
                                                  "matrix_coefficients", "full_range_flag")
                       if k in plan.nclx})
    return kwargs


_HEIF_BLOBS = {"exif": "exif", "icc_profile": "icc", "xmp": "xmp"}


def _encode_heif_deep(arrays: list[np.ndarray], depth: int, quality: int, exif: bytes | None,
                      icc: bytes | None, plan: metadata.Plan, notes: list[dict]) -> bytes:
    """A 10/12-bit HEIF from 16-bit RGB(A) samples, with EXIF, XMP, ICC and nclx. The samples are
    rounded to ``depth`` bits here and handed over as v << (16 - depth): pillow-heif drops the low
    bits (v >> (16 - depth)), so the result holds exactly the rounded values."""
    from pillow_heif import from_bytes

    a = arrays[0]
    shift, top = 16 - depth, (1 << depth) - 1
    q = np.empty(a.shape, np.uint16)
    for y in range(0, a.shape[0], _CHUNK_ROWS):
        blk = a[y:y + _CHUNK_ROWS].astype(np.uint32) * top
        blk += 32767
        blk //= 65535
        q[y:y + _CHUNK_ROWS] = blk << shift
    mode = "RGBA;16" if a.shape[2] == 4 else "RGB;16"
    kwargs = _heif_kwargs(plan, exif, icc)
    heif = from_bytes(mode=mode, size=(a.shape[1], a.shape[0]), data=q.tobytes())
    for attempt in (kwargs, {k: v for k, v in kwargs.items() if k not in _HEIF_BLOBS}):
        out = io.BytesIO()
        try:
            heif.save(out, quality=int(quality), bit_depth=depth, **attempt)
            return out.getvalue()
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            held = [k for k in _HEIF_BLOBS if k in attempt]
            if not held:
                raise ValueError(f"encoding a {depth}-bit HEIF failed: {exc}") from exc
            for k in held:              # an encoder limit not known above: without metadata
                notes.append({"block": _HEIF_BLOBS[k], "action": "dropped",
                              "reason": f"the HEIF encoder refused it: {exc}"[:200]})
    raise AssertionError("unreachable")


def _save(im: Image.Image, fmt: str, kwargs: dict) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **kwargs)
    return out.getvalue()


def _to_pil(a: np.ndarray) -> Image.Image:
    """uint8 (H,W)/(H,W,2|3|4) → L/LA/RGB/RGBA, uint16 (H,W) → I;16 (Pillow infers the mode)."""
    return Image.fromarray(np.ascontiguousarray(a))

