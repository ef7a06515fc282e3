"""Bounded walks over the containers of untrusted image files, before any decoder sees them.

Pillow's plugins walk a file's structure in Python: every TIFF page (``n_frames`` visits all of
them), every GIF block, every PNG chunk, every 0xFF fill byte of a JPEG header, every value of
every TIFF tag (an IFD of 65,535 entries that all point at the same 10 MB re-reads it 65,535
times). A hostile file can keep those loops busy for minutes. These walkers read only the
container's headers, stop counting pages at a cap, tick the caller's watchdog on the way, and
refuse structural abuse with a precise error *before* Pillow runs:

* pages/frames are counted up to ``max_frames + 1`` and no further;
* metadata blocks (EXIF, ICC, XMP, IPTC, text chunks, comments, APPn) are summed;
* TIFF page sizes and orientations come from each IFD's own tags (pixels are never read);
* the work a parser would do is bounded (entries per IFD, bytes re-read by IFDs, chunks).

Malformed structure that Pillow itself would reject is *not* reported here: the walk stops and
leaves the diagnosis to the decoder. Pure functions over ``bytes``; no PIL, no I/O.
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from typing import Callable

from enhancer.errors import TooLargeError, UndecodableError

Tick = Callable[[], None]

# Bounds on the work a parser may be made to do (legit files stay far below each).
MAX_IFD_ENTRIES = 4096         # a camera IFD has < 100
MAX_JPEG_MARKERS = 4096        # markers before the first scan
MAX_JPEG_SCANS = 500           # progressive scans (libjpeg re-walks the image per scan)
MAX_JPEG_GAP = 1 << 20         # fill (0xFF) and junk bytes between header markers, in all
MAX_BMP_RLE_BYTES = 32 << 20   # Pillow decodes BMP RLE in Python: ~2 s per 8 MB
TICK_EVERY = 4096              # loop iterations between two ticks

_TIFF_UNIT = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4,
              16: 8, 17: 8, 18: 8}
# TIFF tags counted as metadata: description, ICC, XMP, IPTC, Photoshop resources, EXIF/GPS
# sub-IFDs (their values are counted as the sub-IFD is walked). ImageSourceData (37724,
# Photoshop layers) is image data, not counted.
_TIFF_META_TAGS = {270, 700, 33723, 34377, 34675}
_TIFF_SUBIFDS = {34665, 34853, 40965}        # EXIF, GPS, Interop
_PNG_META = {b"tEXt", b"zTXt", b"iTXt", b"iCCP", b"eXIf"}
_WEBP_META = {b"EXIF", b"ICCP", b"XMP "}
_NOT_FF = re.compile(rb"[^\xff]")


@dataclass
class Scan:
    kind: str                                   # JPEG, PNG, GIF, WEBP, TIFF, BMP, HEIF, ?
    frames: int = 0                             # pages/frames seen (0: the container does not say)
    more: bool = False                          # counting stopped at the cap: frames > cap
    sizes: list[tuple[int, int]] = field(default_factory=list)   # TIFF: stored (w, h) per page
    orientations: list[int] = field(default_factory=list)        # TIFF: tag 274 per page
    metadata: int = 0                           # bytes of metadata blocks
    scans: int = 0                              # JPEG: start-of-scan markers


def sniff(data: bytes) -> str:
    head = bytes(data[:16])
    if head.startswith(b"\xff\xd8"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if head[:2] == b"BM":
        return "BMP"
    if head[4:8] == b"ftyp":
        return "HEIF"
    return "?"


def scan(data: bytes, name: str, *, max_frames: int, tick: Tick | None = None) -> Scan:
    """Walk the container of ``data`` (the whole file). Raises TooLargeError / UndecodableError
    for abuse; returns what it saw otherwise (also for files it cannot make sense of)."""
    tick = tick or (lambda: None)
    kind = sniff(data)
    walker = _WALKERS.get(kind)
    result = Scan(kind)
    if walker is not None:
        try:
            walker(memoryview(data), name, max_frames, tick, result)
        except (struct.error, IndexError, ValueError):
            pass                                # malformed: the decoder reports it precisely
    return result


# ----------------------------------------------------------------------------------- JPEG

def _jpeg(d: memoryview, name: str, max_frames: int, tick: Tick, out: Scan) -> None:
    raw = d.obj if isinstance(d.obj, bytes) else bytes(d)
    out.frames = 1
    out.scans = raw.count(b"\xff\xda")
    if out.scans > MAX_JPEG_SCANS:
        raise TooLargeError(f"{name}: JPEG with {out.scans} scans (at most {MAX_JPEG_SCANS}); "
                            "refused as a decompression bomb")
    pos, markers, gap, n = 2, 0, 0, len(raw)
    while pos < n:
        # Pillow skips junk and 0xFF fill bytes one read(1) at a time: bound them here, in C
        ff = raw.find(b"\xff", pos)
        m = _NOT_FF.search(raw, ff) if ff >= 0 else None
        if m is None:
            return
        gap += m.start() - pos - 1
        if gap > MAX_JPEG_GAP:
            raise UndecodableError(f"{name}: more than {MAX_JPEG_GAP} fill or junk bytes between "
                                   "JPEG header markers")
        marker, pos = raw[m.start()], m.start() + 1
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            continue
        if marker == 0xD9 or marker == 0xDA or pos + 2 > n:
            return
        length = (raw[pos] << 8) | raw[pos + 1]
        if 0xE0 <= marker <= 0xEF or marker == 0xFE:
            out.metadata += max(0, length - 2)
        pos += length
        markers += 1
        if markers > MAX_JPEG_MARKERS:
            raise UndecodableError(f"{name}: more than {MAX_JPEG_MARKERS} JPEG markers before "
                                   "the image data")
        if markers % TICK_EVERY == 0:
            tick()


# ----------------------------------------------------------------------------------- PNG

def _png(d: memoryview, name: str, max_frames: int, tick: Tick, out: Scan) -> None:
    n = len(d)
    cap = 4096 + n // 1024
    pos, chunks = 8, 0
    out.frames = 1
    while pos + 8 <= n:
        length, ctype = struct.unpack_from(">I4s", d, pos)
        if length > 0x7FFFFFFF:
            return
        if ctype in _PNG_META:
            out.metadata += length
        elif ctype == b"acTL" and length >= 8:
            out.frames = max(1, struct.unpack_from(">I", d, pos + 8)[0])
        elif ctype == b"IEND":
            return
        pos += 12 + length
        chunks += 1
        if chunks > cap:
            raise UndecodableError(f"{name}: more than {cap} PNG chunks in {n} bytes")
        if chunks % TICK_EVERY == 0:
            tick()


# ----------------------------------------------------------------------------------- GIF

def _gif(d: memoryview, name: str, max_frames: int, tick: Tick, out: Scan) -> None:
    n = len(d)
    flags = d[10]
    pos = 13 + (3 * 2 ** ((flags & 7) + 1) if flags & 0x80 else 0)
    steps = 0

    def blocks(pos: int, meta: bool) -> int:
        nonlocal steps
        while pos < n:
            size = d[pos]
            pos += 1
            if size == 0:
                break
            if meta:
                out.metadata += size
            pos += size
            steps += 1
            if steps % TICK_EVERY == 0:
                tick()
        return pos

    while pos < n:
        b = d[pos]
        pos += 1
        if b == 0x3B:
            return
        if b == 0x21:
            label = d[pos]
            pos = blocks(pos + 1, label in (0xFE, 0xFF))
        elif b == 0x2C:
            out.frames += 1
            if out.frames > max_frames:
                out.more = True
                return
            lflags = d[pos + 8]
            pos += 9 + (3 * 2 ** ((lflags & 7) + 1) if lflags & 0x80 else 0)
            pos = blocks(pos + 1, False)
        else:
            return


# ----------------------------------------------------------------------------------- WebP

def _webp(d: memoryview, name: str, max_frames: int, tick: Tick, out: Scan) -> None:
    n = min(len(d), 8 + struct.unpack_from("<I", d, 4)[0])
    cap = 4096 + n // 1024
    pos, chunks, frames = 12, 0, 0
    while pos + 8 <= n:
        tag, length = struct.unpack_from("<4sI", d, pos)
        if tag in _WEBP_META:
            out.metadata += length
        elif tag == b"ANMF":
            frames += 1
            if frames > max_frames:
                out.more = True
                break
        pos += 8 + length + (length & 1)
        chunks += 1
        if chunks > cap:
            raise UndecodableError(f"{name}: more than {cap} RIFF chunks in {n} bytes")
        if chunks % TICK_EVERY == 0:
            tick()
    out.frames = max(1, frames)


# ----------------------------------------------------------------------------------- TIFF

class _Tiff:
    """One TIFF structure (a file or an EXIF blob) and the bytes its IFDs make a parser read."""

    def __init__(self, d: memoryview, name: str, tick: Tick):
        self.d, self.name, self.tick, self.n = d, name, tick, len(d)
        self.bo = "<" if bytes(d[:2]) == b"II" else ">"
        self.big = struct.unpack_from(self.bo + "H", d, 2)[0] == 43
        self.read = 0                         # bytes of out-of-line values a parser reads
        self.budget = 4 * self.n + (1 << 20)  # legit IFDs point at distinct regions: <= n
        self.metadata = 0

    def first(self) -> int:
        return struct.unpack_from(self.bo + ("Q" if self.big else "I"), self.d,
                                  8 if self.big else 4)[0]

    def ifd(self, pos: int, meta: bool) -> tuple[dict[int, int], int]:
        """Entries of the IFD at pos: ({tag: first value (inline tags) or offset}, next IFD)."""
        bo, d, big = self.bo, self.d, self.big
        count = struct.unpack_from(bo + ("Q" if big else "H"), d, pos)[0]
        if count > MAX_IFD_ENTRIES:
            raise UndecodableError(f"{self.name}: a TIFF directory with {count} entries "
                                   f"(at most {MAX_IFD_ENTRIES})")
        pos += 8 if big else 2
        esize, inline = (20, 8) if big else (12, 4)
        fmt = bo + ("HHQ" if big else "HHI")
        values: dict[int, int] = {}
        for i in range(count):
            tag, typ, cnt = struct.unpack_from(fmt, d, pos + i * esize)
            unit = _TIFF_UNIT.get(typ)
            if unit is None:
                continue
            size = cnt * unit
            vpos = pos + i * esize + (12 if big else 8)
            if size > inline:
                self.read += min(size, self.n)
                if self.read > self.budget:
                    raise TooLargeError(
                        f"{self.name}: TIFF directories point at {self.read} bytes of values in "
                        f"a {self.n}-byte structure (the same bytes over and over); refused")
                if meta or tag in _TIFF_META_TAGS:
                    self.metadata += size
                values[tag] = struct.unpack_from(bo + ("Q" if big else "I"), d, vpos)[0]
            elif cnt >= 1 and typ in (3, 8):
                values[tag] = struct.unpack_from(bo + "H", d, vpos)[0]
            elif cnt >= 1 and typ in (4, 9, 13):
                values[tag] = struct.unpack_from(bo + "I", d, vpos)[0]
            elif cnt >= 1 and typ in (16, 17, 18) and big:
                values[tag] = struct.unpack_from(bo + "Q", d, vpos)[0]
            elif cnt >= 1 and typ in (1, 6, 7):
                values[tag] = d[vpos]
        nxt = struct.unpack_from(bo + ("Q" if big else "I"), d, pos + count * esize)[0]
        return values, nxt

    def sub_ifds(self, values: dict[int, int], seen: set[int]) -> None:
        """EXIF, GPS and Interop directories: their values count as metadata."""
        for tag in _TIFF_SUBIFDS:
            off = values.get(tag)
            if off and off not in seen and off < self.n:
                seen.add(off)
                try:
                    sub, _ = self.ifd(off, True)
                except (struct.error, IndexError):
                    continue
                self.sub_ifds(sub, seen)


def _tiff(d: memoryview, name: str, max_frames: int, tick: Tick, out: Scan) -> None:
    t = _Tiff(d, name, tick)
    pos, seen = t.first(), set()
    try:
        while pos and pos not in seen and pos < t.n:
            seen.add(pos)
            values, pos = t.ifd(pos, False)
            out.frames += 1
            tick()
            if out.frames > max_frames:
                out.more = True
                break
            out.sizes.append((values.get(256, 0), values.get(257, 0)))
            orientation = values.get(274, 1)
            out.orientations.append(orientation if 1 <= orientation <= 8 else 1)
            t.sub_ifds(values, seen)
    finally:
        out.metadata += t.metadata


def exif_ok(blob: bytes, name: str, tick: Tick | None = None) -> bool:
    """An EXIF blob ("Exif\\0\\0" + TIFF structure) that Pillow can parse in bounded work:
    IFD0, IFD1 and their sub-IFDs within the entry and re-read bounds. False = drop it."""
    body = memoryview(blob)[6:] if bytes(blob[:6]) == b"Exif\x00\x00" else memoryview(blob)
    try:
        t = _Tiff(body, name, tick or (lambda: None))
        pos, seen = t.first(), set()
        for _ in range(2):                       # IFD0, IFD1 (thumbnail)
            if not pos or pos in seen or pos >= t.n:
                break
            seen.add(pos)
            values, pos = t.ifd(pos, True)
            t.sub_ifds(values, seen)
    except (TooLargeError, UndecodableError):
        return False
    except (struct.error, IndexError, ValueError):
        return True                              # malformed: Pillow's parser says so itself
    return True


def _bmp(d: memoryview, name: str, max_frames: int, tick: Tick, out: Scan) -> None:
    out.frames = 1
    header = struct.unpack_from("<I", d, 14)[0]
    compression = struct.unpack_from("<I", d, 30)[0] if header >= 40 else 0
    if compression in (1, 2) and len(d) > MAX_BMP_RLE_BYTES:
        raise TooLargeError(f"{name}: run-length coded BMP of {len(d)} bytes (at most "
                            f"{MAX_BMP_RLE_BYTES}; its decoder is slow)")


_WALKERS = {"BMP": _bmp, "JPEG": _jpeg, "PNG": _png, "GIF": _gif, "WEBP": _webp, "TIFF": _tiff}
