"""A photo's metadata, apart from its pixels: read every block of the original (``read``), decide
what the result carries in its format (``plan``), and put it into the encoded result (``apply``).
enhancer/imageio.py calls these three around its pixel encoders; nothing here touches pixels.

Blocks and what happens to them (README "Metadata" has the table per format):

* ``exif`` — kept (Orientation = 1 because the pixels were rotated, PixelX/YDimension = the new
  size, X/YResolution scaled with the DPI below, ``Software`` = "photoenhanced X.Y" when stamping);
  its ``gps`` and ``makernote`` travel inside it; ``thumbnail`` (IFD1) is dropped: it shows the
  unenhanced picture.
* ``xmp`` — kept, merged through exiv2's XMP toolkit: tiff:Orientation, the pixel sizes and
  mwg-rs:AppliedToDimensions follow the new pixels (face regions are relative, so they stay valid).
* multi-page TIFF — every page's IFD gets the EXIF (IFD0 tags + EXIF/GPS sub-IFDs), XMP and
  IPTC-IIM (``apply`` → ``_tiff_every_page``; the pixel writer puts the ICC profile on every
  page); a later page keeps its own descriptive tags (``PAGE_TAGS``: PageName, PageNumber, …).
* ``iptc`` (IPTC-IIM) — kept where the target holds it (JPEG APP13, TIFF, PNG raw profile);
  converted to XMP (exiv2's standard IIM → XMP mapping, XMP values win) where it cannot (WebP, HEIF).
* ``icc`` — kept byte-identical (imageio). ``nclx`` (HEIF colour information) — kept in HEIF,
  dropped elsewhere (no such box). ``dpi`` — *scaled* with the pixels so that the print size is
  unchanged (a 6×4 in scan stays 6×4 in). ``png_text`` — PNG text chunks copied verbatim into a
  PNG; into other formats Title/Author/Description/Copyright become dc:title/creator/description/
  rights in XMP. ``jpeg_comment`` — kept in JPEG, a tEXt "Comment" in PNG, dropped elsewhere.
* ``bit_depth`` — noted by imageio.encode for a deeper-than-8-bit source: kept (16-bit PNG/TIFF;
  a 10/12-bit HEIF as HEIF at its own depth, or as 16-bit PNG/TIFF) or converted (to 8 bits).
* ``provenance`` (``enhance.provenance``, default on) — EXIF Software, an xmpMM:History entry
  (when, software, parameters), Iptc4xmpExt:DigitalSourceType = trainedAlgorithmicMedia's
  "composite" term, xmpMM:DerivedFrom naming the original (its DocumentID, else its sha256),
  fresh xmpMM:DocumentID/InstanceID.

Every decision is a note ``{"block", "action": kept|converted|trimmed|dropped|added, "reason"?,
"to"?}``: the sidecar's ``metadata`` block. Reading/writing IPTC-IIM and merging XMP uses pyexiv2
(exiv2 0.28 inside the wheel; GPL-3.0 — used as a library, not modified, see README).
"""
from __future__ import annotations

import functools
import struct
import uuid
import warnings
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone

import structlog
from PIL import Image

log = structlog.get_logger(__name__)

DIGITAL_SOURCE_TYPE = ("http://cv.iptc.org/newscodes/digitalsourcetype/"
                       "compositeWithTrainedAlgorithmicMedia")
# Formats exiv2 writes into in place; multi-page TIFF is not among them (exiv2 writes IFD0 only).
_EXIV2_WRITES = ("JPEG", "PNG", "WEBP", "TIFF")
_HOLDS_IIM = ("JPEG", "TIFF", "PNG")
_HOLDS_XMP = ("JPEG", "PNG", "WEBP", "TIFF", "HEIF")
_HOLDS_EXIF = ("JPEG", "PNG", "WEBP", "TIFF", "HEIF")
_ORIENTATION, _EXIF_IFD, _SOFTWARE, _XRES, _YRES = 0x0112, 0x8769, 0x0131, 0x011A, 0x011B
_PIXEL_X, _PIXEL_Y, _GPS_IFD, _MAKERNOTE = 0xA002, 0xA003, 0x8825, 0x927C
_PNG_TEXT = (b"tEXt", b"zTXt", b"iTXt")
# A TIFF page's own descriptive tags, kept page by page in a multi-page result: DocumentName,
# ImageDescription, Make, Model, PageName, PageNumber, Software, DateTime, Artist, HostComputer,
# Copyright. The blocks every page of the result carries as the first page has them:
PAGE_TAGS = (269, 270, 271, 272, 285, 297, 305, 306, 315, 316, 33432)
_PAGE_BLOCKS = {700: "xmp", 33723: "iptc", 34675: "icc"}
# PNG keywords that are other blocks in disguise (read by exiv2/ImageMagick as EXIF/IPTC/XMP).
_PNG_SKIP = (b"XML:com.adobe.xmp", b"Raw profile type exif", b"Raw profile type APP1",
             b"Raw profile type iptc", b"Raw profile type xmp", b"Raw profile type icc",
             b"Raw profile type icm", b"Raw profile type 8bim")
_PNG_TO_XMP = {b"Title": "Xmp.dc.title", b"Author": "Xmp.dc.creator",
               b"Description": "Xmp.dc.description", b"Copyright": "Xmp.dc.rights"}
_BLANK_JPEG = b"\xff\xd8\xff\xd9"      # exiv2's scratch image for building an XMP packet


@dataclass(frozen=True)
class Provenance:
    """What the result's stamp says (built per job by the caller; nothing read from globals)."""

    software: str                  # "photoenhanced 0.1.0"
    when: float                    # epoch seconds
    parameters: str                # one line: profile, scale, models
    original_sha256: str


@dataclass
class Blocks:
    """Metadata of the original beside its EXIF/ICC (those stay in imageio.Decoded)."""

    format: str = ""
    xmp: bytes | None = None
    iptc: dict = field(default_factory=dict)             # exiv2 keys → str | list[str]
    comment: bytes | None = None                          # JPEG COM
    png_text: list[tuple[bytes, bytes]] = field(default_factory=list)   # (chunk type, data)
    nclx: dict | None = None
    heif_bits: int | None = None
    # multi-page TIFF: each later page's own descriptive tags (index 0, the first page: {} — its
    # tags travel in the EXIF block), the first page's raw XMP/IPTC/ICC tags, and the blocks a
    # later page holds a different version of ({block: [page numbers]})
    page_tags: list[dict] = field(default_factory=list)
    first_page: dict = field(default_factory=dict, repr=False)
    page_differs: dict = field(default_factory=dict)


@dataclass
class Plan:
    """What goes into the result: given to the pixel encoder (exif, dpi, heif_xmp, nclx) and to
    ``apply`` (the rest)."""

    fmt: str
    exif: bytes | None = None
    dpi: tuple[float, float] | None = None
    xmp: bytes | None = None
    iptc: dict = field(default_factory=dict)
    comment: bytes | None = None
    png_text: list[tuple[bytes, bytes]] = field(default_factory=list)
    nclx: dict | None = None
    exif_after: bytes | None = None    # EXIF the pixel encoder could not write (16-bit TIFF)
    page_tags: list[dict] = field(default_factory=list)   # multi-page TIFF: per page, see Blocks
    software: str | None = None        # the stamp: wins over a later page's own Software tag


@functools.cache
def _exiv2():
    import pyexiv2
    pyexiv2.set_log_level(4)       # errors come back as exceptions; nothing on stderr
    return pyexiv2


def _note(notes: list[dict], block: str, action: str, reason: str | None = None, **more) -> None:
    entry = {"block": block, "action": action}
    if reason:
        entry["reason"] = reason[:300]
    entry.update(more)
    notes.append(entry)


# ------------------------------------------------------------------------------------- reading

def _png_text_chunks(data: bytes) -> tuple[list[tuple[bytes, bytes]], bytes | None]:
    """(text chunks other than disguised blocks, the XMP iTXt's text). Bounded walk over chunks."""
    out, xmp, pos, n = [], None, 8, len(data)
    while pos + 12 <= n and len(out) < 4096:
        length, tag = struct.unpack_from(">I4s", data, pos)
        body = data[pos + 8:pos + 8 + length]
        if tag in _PNG_TEXT:
            key = body.split(b"\x00", 1)[0]
            if key == b"XML:com.adobe.xmp" and tag == b"iTXt":
                xmp = _itxt_text(body)
            elif key not in _PNG_SKIP:
                out.append((tag, body))
        if tag == b"IEND":
            break
        pos += 12 + length
    return out, xmp


def _itxt_text(body: bytes) -> bytes | None:
    try:
        key, rest = body.split(b"\x00", 1)
        comp, method, rest = rest[0], rest[1], rest[2:]
        _lang, _tkey, text = rest.split(b"\x00", 2)
        return zlib.decompress(text) if comp else text
    except (ValueError, IndexError, zlib.error):
        return None


def _png_text_value(tag: bytes, body: bytes) -> tuple[bytes, str] | None:
    """(keyword, text) of a tEXt/zTXt/iTXt chunk."""
    try:
        key, rest = body.split(b"\x00", 1)
        if tag == b"tEXt":
            return key, rest.decode("latin-1")
        if tag == b"zTXt":
            return key, zlib.decompress(rest[1:]).decode("latin-1")
        text = _itxt_text(body)
        return (key, text.decode("utf-8", "replace")) if text is not None else None
    except (ValueError, IndexError, zlib.error):
        return None


def read(data: bytes, fmt: str, info: dict, tiff_tags=None, notes: list[dict] | None = None) -> Blocks:
    """The original's metadata besides EXIF/ICC. ``info``: PIL's ``im.info`` of the opened file;
    ``tiff_tags``: its ``tag_v2`` for a TIFF. A block that cannot be read is a note, never an
    error (the pixels still get enhanced)."""
    notes = [] if notes is None else notes
    b = Blocks(format=fmt)
    if fmt == "PNG":
        b.png_text, b.xmp = _png_text_chunks(data)
    elif fmt == "TIFF" and tiff_tags is not None and 700 in tiff_tags:
        raw = tiff_tags[700]
        b.xmp = bytes(raw) if isinstance(raw, (bytes, bytearray)) else str(raw).encode()
    if fmt == "TIFF" and tiff_tags is not None:
        b.first_page = {t: tiff_tags.get(t) for t in _PAGE_BLOCKS}
    else:
        raw = info.get("xmp")
        b.xmp = raw.encode() if isinstance(raw, str) else raw or None
    if fmt == "JPEG" and info.get("comment"):
        c = info["comment"]
        b.comment = c.encode("utf-8") if isinstance(c, str) else bytes(c)
    if fmt == "HEIF":
        b.nclx = dict(info["nclx_profile"]) if isinstance(info.get("nclx_profile"), dict) else None
        b.heif_bits = info.get("bit_depth")
    if fmt in ("JPEG", "TIFF", "PNG"):
        try:
            img = _exiv2().ImageData(data)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    b.iptc = {k: v for k, v in img.read_iptc().items() if v not in ("", [])}
            finally:
                img.close()
        except (RuntimeError, ValueError, UnicodeDecodeError) as exc:
            _note(notes, "iptc", "dropped", f"unreadable: {exc}")
    if b.xmp is not None:
        b.xmp = b.xmp.rstrip(b"\x00") or None
    return b


def read_page(b: Blocks, index: int, tags, notes: list[dict] | None = None) -> None:
    """Page ``index`` (1 = the second page) of a multi-page TIFF, given its IFD's tags (PIL's
    ``tag_v2`` after seeking): its own descriptive tags (DocumentName, PageName, PageNumber, …)
    go to ``b.page_tags[index]``; an XMP packet, IPTC-IIM block or ICC profile that differs from
    the first page's is recorded in ``b.page_differs`` (the result carries the first page's on
    every page; ``plan`` says so)."""
    if tags is None or index < 1:
        return
    while len(b.page_tags) <= index:
        b.page_tags.append({})
    own = {}
    try:
        for tag in PAGE_TAGS:
            value = tags.get(tag)
            if isinstance(value, str) or (isinstance(value, int) and 0 <= value < 1 << 16) or (
                    isinstance(value, tuple) and 0 < len(value) <= 2
                    and all(isinstance(v, int) and 0 <= v < 1 << 16 for v in value)):
                own[tag] = value
        for tag, block in _PAGE_BLOCKS.items():
            value = tags.get(tag)
            if value is not None and value != b.first_page.get(tag):
                b.page_differs.setdefault(block, []).append(index + 1)
    except (ValueError, TypeError, KeyError, struct.error) as exc:    # a tag PIL cannot parse
        _note(notes if notes is not None else [], "exif", "trimmed",
              f"page {index + 1}'s own tags are unreadable: {exc}")
    b.page_tags[index] = own


# ------------------------------------------------------------------------------------ planning

def _exif_for_output(blob: bytes, size: tuple[int, int], scale: float,
                     software: str | None, notes: list[dict]) -> bytes | None:
    """The original's EXIF with Orientation 1, the new pixel size, scaled X/YResolution and (when
    stamping) Software. Pillow writes IFD0 and its EXIF/GPS sub-IFDs, never IFD1 (thumbnail)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ex = Image.Exif()
            ex.load(blob)
            sub = ex.get_ifd(_EXIF_IFD)
            gps = ex.get_ifd(_GPS_IFD)
            ex[_ORIENTATION] = 1
            if sub:
                sub[_PIXEL_X], sub[_PIXEL_Y] = int(size[0]), int(size[1])
            for tag in (_XRES, _YRES):
                if tag in ex and scale != 1:
                    try:
                        ex[tag] = round(float(ex[tag]) * scale, 4)
                    except (TypeError, ValueError, ZeroDivisionError):
                        pass
            if software:
                ex[_SOFTWARE] = software
            out = ex.tobytes()
    except (ValueError, TypeError, SyntaxError, struct.error, OSError, KeyError, IndexError) as exc:
        _note(notes, "exif", "dropped", f"could not be rewritten: {exc}")
        return None
    _note(notes, "exif", "kept", "Orientation set to 1 (pixels rotated), pixel size updated"
          + (", Software stamped" if software else ""))
    if gps:
        _note(notes, "gps", "kept")
    if _MAKERNOTE in sub:
        _note(notes, "makernote", "kept")
    if _has_ifd1(blob):
        _note(notes, "thumbnail", "dropped", "it shows the picture before enhancement")
    return out


def _inner_blocks(blob: bytes) -> list[str]:
    """Which of gps, makernote, thumbnail an EXIF blob holds."""
    out = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ex = Image.Exif()
            ex.load(blob)
            if ex.get_ifd(_GPS_IFD):
                out.append("gps")
            if _MAKERNOTE in ex.get_ifd(_EXIF_IFD):
                out.append("makernote")
    except (ValueError, TypeError, SyntaxError, struct.error, OSError, KeyError, IndexError):
        pass
    return out + (["thumbnail"] if _has_ifd1(blob) else [])


def _has_ifd1(blob: bytes) -> bool:
    """True when IFD0 links to an IFD1 (the EXIF thumbnail)."""
    try:
        t = blob[6:] if blob.startswith(b"Exif\x00\x00") else blob
        e = "<" if t[:2] == b"II" else ">"
        off = struct.unpack_from(e + "I", t, 4)[0]
        count = struct.unpack_from(e + "H", t, off)[0]
        return struct.unpack_from(e + "I", t, off + 2 + 12 * count)[0] != 0
    except (struct.error, IndexError):
        return False


def _xmp_updates(current: dict, size: tuple[int, int], scale: float) -> dict:
    """XMP properties that describe the pixels, set for the result."""
    up: dict = {}
    if "Xmp.tiff.Orientation" in current:
        up["Xmp.tiff.Orientation"] = "1"
    for key, v in (("Xmp.exif.PixelXDimension", size[0]), ("Xmp.exif.PixelYDimension", size[1]),
                   ("Xmp.tiff.ImageWidth", size[0]), ("Xmp.tiff.ImageLength", size[1]),
                   ("Xmp.mwg-rs.Regions/mwg-rs:AppliedToDimensions/stDim:w", size[0]),
                   ("Xmp.mwg-rs.Regions/mwg-rs:AppliedToDimensions/stDim:h", size[1])):
        if key in current:
            up[key] = str(int(v))
    for key in ("Xmp.tiff.XResolution", "Xmp.tiff.YResolution"):
        if key in current and scale != 1:
            try:
                num, _, den = str(current[key]).partition("/")
                value = float(num) / float(den or 1) * scale
                up[key] = f"{round(value * 10000)}/10000"
            except (ValueError, ZeroDivisionError):
                pass
    return up


def _provenance_updates(current: dict, prov: Provenance) -> dict:
    when = datetime.fromtimestamp(prov.when, timezone.utc).isoformat(timespec="seconds")
    digest = f"urn:sha256:{prov.original_sha256}"
    n = 1 + max((int(k.split("[", 1)[1].split("]", 1)[0]) for k in current
                 if k.startswith("Xmp.xmpMM.History[")), default=0)
    h = f"Xmp.xmpMM.History[{n}]"
    iid = f"xmp.iid:{uuid.uuid4()}"
    up = {} if "Xmp.xmpMM.History" in current else {"Xmp.xmpMM.History": 'type="Seq"'}
    up |= {h: 'type="Struct"',
          f"{h}/stEvt:action": "edited", f"{h}/stEvt:when": when,
          f"{h}/stEvt:softwareAgent": prov.software, f"{h}/stEvt:parameters": prov.parameters,
          f"{h}/stEvt:changed": "/", f"{h}/stEvt:instanceID": iid,
          "Xmp.iptcExt.DigitalSourceType": DIGITAL_SOURCE_TYPE,
          "Xmp.xmpMM.DerivedFrom/stRef:documentID": str(current.get("Xmp.xmpMM.DocumentID") or digest),
          "Xmp.xmpMM.DerivedFrom/stRef:instanceID": str(current.get("Xmp.xmpMM.InstanceID") or digest),
          "Xmp.xmpMM.DocumentID": f"xmp.did:{uuid.uuid4()}", "Xmp.xmpMM.InstanceID": iid}
    if "Xmp.xmpMM.OriginalDocumentID" not in current:
        up["Xmp.xmpMM.OriginalDocumentID"] = str(current.get("Xmp.xmpMM.DocumentID") or digest)
    return up


def _build_xmp(src: bytes | None, extra: dict, size: tuple[int, int] | None, scale: float,
               prov: Provenance | None) -> bytes | None:
    """The result's XMP packet: the original's, merged with ``extra`` (converted blocks; the
    original's values win), pixel properties updated, the provenance added. Built by exiv2's
    XMP toolkit on a scratch image."""
    if src is None and not extra and prov is None:
        return None
    e = _exiv2()
    img = e.ImageData(_BLANK_JPEG)
    try:
        if src:
            img.modify_raw_xmp(src.decode("utf-8", "replace"))
        current = img.read_xmp()
        add = {k: v for k, v in extra.items() if k not in current}
        if add:
            img.modify_xmp(add)
        up = _xmp_updates(current, size, scale) if size else {}
        if prov is not None:
            up.update(_provenance_updates(current, prov))
        for key, value in up.items():   # one at a time: exiv2 creates arrays/structs in order
            img.modify_xmp({key: value})
        return img.read_raw_xmp().encode("utf-8")
    finally:
        img.close()


def plan(fmt: str, *, exif: bytes | None, blocks: Blocks | None, size: tuple[int, int],
         scale: float, dpi: tuple[float, float] | None, pages: int,
         provenance: Provenance | None, notes: list[dict]) -> Plan:
    """Decide what the result in ``fmt`` carries; a note for every block of the original (and for
    the stamp). ``size``: the result's first page (w, h); ``scale``: result/original width."""
    fmt = fmt.upper()
    blocks = blocks or Blocks()
    p = Plan(fmt=fmt)
    software = provenance.software if provenance else None
    first_note = len(notes)
    # EXIF (+ gps, makernote, thumbnail)
    if fmt in _HOLDS_EXIF and (exif or software):
        base = exif or Image.Exif().tobytes()
        p.exif = _exif_for_output(base, size, scale, software, [] if not exif else notes)
    elif exif:
        _note(notes, "exif", "dropped", f"{fmt} holds no EXIF")
        for inner in _inner_blocks(exif):
            _note(notes, inner, "dropped", "with the EXIF block")
    # DPI: scaled so that the physical print size is unchanged
    if dpi and fmt in ("JPEG", "PNG", "TIFF", "BMP"):
        p.dpi = (dpi[0] * scale, dpi[1] * scale)
        _note(notes, "dpi", "converted" if scale != 1 else "kept",
              f"scaled ×{scale:g} with the pixels: the print size is unchanged" if scale != 1 else None)
    elif dpi:
        _note(notes, "dpi", "dropped", f"{fmt} stores no resolution outside EXIF")
    # IPTC-IIM, PNG text, comment → XMP where the target cannot hold them
    extra: dict = {}
    if blocks.iptc:
        if fmt in _HOLDS_IIM:
            p.iptc = dict(blocks.iptc)
            _note(notes, "iptc", "kept")
        elif fmt in _HOLDS_XMP:
            try:
                extra.update(_exiv2().convert_iptc_to_xmp(dict(blocks.iptc)))
                _note(notes, "iptc", "converted", f"{fmt} cannot hold IPTC-IIM; IIM → XMP (IPTC "
                      "Core mapping)", to="xmp")
            except (RuntimeError, ValueError) as exc:
                _note(notes, "iptc", "dropped", f"could not be converted to XMP: {exc}")
        else:
            _note(notes, "iptc", "dropped", f"{fmt} holds no metadata blocks")
    if blocks.png_text:
        if fmt == "PNG":
            p.png_text = list(blocks.png_text)
            _note(notes, "png_text", "kept", f"{len(blocks.png_text)} chunks copied verbatim")
        elif fmt in _HOLDS_XMP:
            moved, left = [], []
            for tag, body in blocks.png_text:
                kv = _png_text_value(tag, body)
                key = kv[0] if kv else b"?"
                if kv and key in _PNG_TO_XMP and _PNG_TO_XMP[key] not in extra:
                    xkey = _PNG_TO_XMP[key]
                    extra[xkey] = [kv[1]] if xkey == "Xmp.dc.creator" else {'lang="x-default"': kv[1]}
                    moved.append(key.decode("latin-1"))
                else:
                    left.append(key.decode("latin-1", "replace"))
            if moved:
                _note(notes, "png_text", "converted", f"{', '.join(moved)} → XMP dc"
                      + (f"; {', '.join(left)} dropped (no XMP equivalent)" if left else ""), to="xmp")
            else:
                _note(notes, "png_text", "dropped", f"{fmt} has no text chunks and "
                      f"{', '.join(left)} have no XMP equivalent")
        else:
            _note(notes, "png_text", "dropped", f"{fmt} holds no metadata blocks")
    if blocks.comment:
        if fmt == "JPEG":
            p.comment = blocks.comment
            _note(notes, "jpeg_comment", "kept")
        elif fmt == "PNG":
            p.png_text.append((b"tEXt", b"Comment\x00" + blocks.comment.decode(
                "utf-8", "replace").encode("latin-1", "replace")))
            _note(notes, "jpeg_comment", "converted", "a PNG tEXt chunk 'Comment'", to="png_text")
        else:
            _note(notes, "jpeg_comment", "dropped", f"{fmt} has no comment block")
    # nclx
    if blocks.nclx:
        if fmt == "HEIF":
            p.nclx = blocks.nclx
            _note(notes, "nclx", "kept")
        else:
            _note(notes, "nclx", "dropped", f"{fmt} has no nclx colour box (the ICC profile, "
                  "when there is one, describes the colours)")
    # XMP (+ provenance)
    if fmt in _HOLDS_XMP:
        try:
            p.xmp = _build_xmp(blocks.xmp, extra, size, scale, provenance)
            if blocks.xmp:
                _note(notes, "xmp", "kept", "orientation, pixel sizes and face-region dimensions "
                      "follow the new pixels")
        except (RuntimeError, ValueError, UnicodeError) as exc:
            log.warning("metadata.xmp_failed", error=str(exc)[:200])
            _note(notes, "xmp", "dropped", f"could not be merged: {exc}")
            p.xmp = None
    elif blocks.xmp:
        _note(notes, "xmp", "dropped", f"{fmt} holds no XMP")
    if provenance is not None:
        where = [w for w, ok in (("exif Software", p.exif is not None),
                                 ("xmp History/DigitalSourceType/DerivedFrom", p.xmp is not None))
                 if ok]
        if where:
            _note(notes, "provenance", "added", ", ".join(where))
        else:
            _note(notes, "provenance", "dropped", f"{fmt} holds no EXIF or XMP")
    if fmt == "TIFF" and pages > 1:
        _plan_pages(p, blocks, pages, software, notes, first_note)
    return p


def _plan_pages(p: Plan, blocks: Blocks, pages: int, software: str | None, notes: list[dict],
                first_note: int) -> None:
    """Multi-page TIFF: EXIF (with its sub-IFDs), XMP, IPTC-IIM and the ICC profile go into every
    page's IFD (``apply``); each later page keeps its own descriptive tags. Where a later page
    had its own, different XMP/IPTC/ICC, that page now carries the first page's: a note says so."""
    p.page_tags = [dict(t) for t in blocks.page_tags[:pages]]
    p.software = software
    for n in notes[first_note:]:
        if n.get("block") in ("exif", "xmp", "iptc", "gps", "makernote") and n.get("action") == "kept":
            n["reason"] = (n.get("reason", "") + "; " if n.get("reason") else "") + \
                f"on every page ({pages} pages)"
    for block, where in sorted(blocks.page_differs.items()):
        listed = ", ".join(map(str, where[:10])) + (" …" if len(where) > 10 else "")
        _note(notes, block, "trimmed", f"page(s) {listed} had their own {block}, different from "
              f"page 1's; every page of the result carries page 1's")


# ------------------------------------------------------------------------------------- writing

def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _png_insert(png: bytes, chunks: list[tuple[bytes, bytes]]) -> bytes:
    """Text chunks right after IHDR (before IDAT, where every reader sees them)."""
    if not chunks:
        return png
    ihdr_end = 8 + 8 + 13 + 4
    return png[:ihdr_end] + b"".join(_png_chunk(t, d) for t, d in chunks) + png[ihdr_end:]


def apply(data: bytes, p: Plan, pages: int, notes: list[dict]) -> bytes:
    """Put XMP, IPTC-IIM, the JPEG comment and PNG text into the encoded result (exiv2 writes in
    place; EXIF, ICC, DPI and a HEIF's XMP were written by the pixel encoder). A block the
    writer refuses is dropped with a note; the pixels are never lost for metadata."""
    if p.fmt == "PNG" and p.png_text:
        data = _png_insert(data, p.png_text)
    if p.fmt == "TIFF" and pages > 1:
        return _tiff_every_page(data, p, pages, notes)
    if p.fmt not in _EXIV2_WRITES or not (p.xmp or p.iptc or p.comment or p.exif_after):
        return data
    e = _exiv2()
    try:
        img = e.ImageData(data)
    except RuntimeError as exc:
        _note(notes, "xmp", "dropped", f"exiv2 cannot open the result: {exc}")
        return data
    try:
        if p.exif_after:
            try:
                _copy_exif(p.exif_after, img)
            except RuntimeError as exc:
                _note(notes, "exif", "dropped", f"exiv2 could not write it into {p.fmt}: {exc}")
        for block, write in (("xmp", lambda: img.modify_raw_xmp(p.xmp.decode("utf-8"))),
                             ("iptc", lambda: img.modify_iptc(p.iptc)),
                             ("jpeg_comment", lambda: img.modify_comment(
                                 p.comment.decode("utf-8", "replace")))):
            if not getattr(p, "comment" if block == "jpeg_comment" else block):
                continue
            try:
                write()
            except (RuntimeError, ValueError, UnicodeError) as exc:
                log.warning("metadata.write_failed", block=block, error=str(exc)[:200])
                _note(notes, block, "dropped", f"the {p.fmt} writer refused it: {exc}")
        return img.get_bytes()
    finally:
        img.close()


# --------------------------------------------------------------------------- multi-page TIFF
# exiv2 writes the first IFD of a TIFF only, and neither libtiff (through Pillow) nor tifffile
# writes EXIF/GPS sub-IFDs: so each page's IFD gets the metadata here. Pillow serialises the
# tags (EXIF IFD0 tags + the EXIF/GPS/Interop sub-IFDs + XMP + IPTC) as one IFD placed at the end
# of the file; its entries are merged into the page's own IFD, rewritten after it; the pointer
# to the page is moved to the new IFD. Pixel data and the pixel writer's tags stay where they
# are (the old IFD becomes unused bytes).

# Tags that describe a page's pixels and their storage: always the pixel writer's.
_TIFF_PIXEL_TAGS = frozenset({254, 255, 256, 257, 258, 259, 262, 263, 264, 265, 266, 273, 277,
                              278, 279, 280, 281, 284, 286, 287, 290, 291, 292, 293, 301, 317,
                              318, 319, 320, 321, 322, 323, 324, 325, 330, 332, 338, 339, 340,
                              341, 347, 513, 514, 515, 529, 530, 531, 532, 559, 34675})
_TIFF_PAGE_WINS = frozenset({282, 283, 296})      # resolution: the page's (scaled dpi) if it has one
_TIFF_TYPE_SIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4}
_TIFF_MAX_ENTRIES = 4096
_TIFF_EVERY_PAGE_MAX = 64 << 20   # metadata copies over all pages; beyond: page 1 only (a note)


def _tiff_ifd(data: bytes | bytearray, e: str, off: int) -> tuple[dict[int, bytes], int]:
    """{tag: 12-byte entry} of the classic-TIFF IFD at ``off``, and the next IFD's offset."""
    count = struct.unpack_from(e + "H", data, off)[0]
    if not 0 < count <= _TIFF_MAX_ENTRIES or off + 6 + 12 * count > len(data):
        raise ValueError(f"IFD at {off} has {count} entries")
    entries = {}
    for i in range(count):
        raw = bytes(data[off + 2 + 12 * i:off + 14 + 12 * i])
        entries[struct.unpack_from(e + "H", raw)[0]] = raw
    return entries, struct.unpack_from(e + "I", data, off + 2 + 12 * count)[0]


def _entry_bytes(data: bytes | bytearray, e: str, entry: bytes) -> bytes:
    """The value bytes of one IFD entry (inline when they fit in 4 bytes)."""
    _tag, typ, count = struct.unpack_from(e + "HHI", entry)
    size = _TIFF_TYPE_SIZE.get(typ, 1) * count
    if size <= 4:
        return entry[8:8 + size]
    at = struct.unpack_from(e + "I", entry, 8)[0]
    if at + size > len(data):
        raise ValueError("entry value beyond the end of the file")
    return bytes(data[at:at + size])


def _entry_int(data: bytes | bytearray, e: str, entry: bytes | None) -> int | None:
    if entry is None:
        return None
    typ = struct.unpack_from(e + "H", entry, 2)[0]
    value = _entry_bytes(data, e, entry)
    return struct.unpack_from(e + ("H" if typ == 3 else "I"), value)[0] if typ in (3, 4) else None


def _iim_bytes(iptc: dict) -> bytes:
    """IPTC-IIM datasets as a TIFF holds them (tag 33723), encoded by exiv2 (into a scratch
    1×1 TIFF, from which the tag's bytes are taken)."""
    import io
    scratch = io.BytesIO()
    Image.new("L", (1, 1)).save(scratch, "TIFF")
    img = _exiv2().ImageData(scratch.getvalue())
    try:
        img.modify_iptc(dict(iptc))
        data = img.get_bytes()
    finally:
        img.close()
    e = "<" if data[:2] == b"II" else ">"
    entries, _ = _tiff_ifd(data, e, struct.unpack_from(e + "I", data, 4)[0])
    if 33723 not in entries:
        raise RuntimeError("exiv2 wrote no IPTC-IIM")
    return _entry_bytes(data, e, entries[33723])


def _page_exif(p: Plan, index: int, size: tuple[int | None, int | None], e: str,
               iim: bytes | None) -> Image.Exif:
    """Everything one page's IFD gets: the EXIF (IFD0 tags and sub-IFDs; the page's own
    descriptive tags win on a later page, the stamp's Software wins over them), XMP, IPTC-IIM."""
    ex = Image.Exif()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if p.exif:
            ex.load(p.exif)
        sub = ex.get_ifd(_EXIF_IFD)
        ex.get_ifd(_GPS_IFD)
    own = p.page_tags[index] if index < len(p.page_tags) else {}
    for tag, value in own.items():
        if not (tag == _SOFTWARE and p.software):
            ex[tag] = value
    if sub and _PIXEL_X in sub and size[0] and size[1]:
        sub[_PIXEL_X], sub[_PIXEL_Y] = size
    if p.xmp:
        ex[700] = p.xmp
    if iim:
        ex[33723] = iim
    ex.endian = e
    return ex


def _tiff_every_page(data: bytes, p: Plan, pages: int, notes: list[dict]) -> bytes:
    """EXIF, XMP and IPTC-IIM into every page's IFD of a multi-page TIFF (see above)."""
    if not (p.exif or p.xmp or p.iptc or any(p.page_tags)):
        return data
    if data[:4] not in (b"II*\x00", b"MM\x00*"):
        for block in ("exif", "xmp", "iptc"):
            if getattr(p, block):
                _note(notes, block, "dropped", "the result is not a classic TIFF (BigTIFF?)")
        return data
    iim = None
    if p.iptc:
        try:
            iim = _iim_bytes(p.iptc)
        except (RuntimeError, ValueError, UnicodeError, struct.error) as exc:
            log.warning("metadata.write_failed", block="iptc", error=str(exc)[:200])
            _note(notes, "iptc", "dropped", f"exiv2 could not encode it as IIM: {exc}")
    e = "<" if data[:2] == b"II" else ">"
    out = bytearray(data)
    pointer, off, seen = 4, struct.unpack_from(e + "I", data, 4)[0], set()
    first_only = None
    try:
        for index in range(pages):
            if index == 1 and (len(out) - len(data)) * pages > _TIFF_EVERY_PAGE_MAX:
                first_only = Plan(fmt=p.fmt, page_tags=p.page_tags, software=p.software)
                for block in ("exif", "xmp", "iptc"):
                    if getattr(p, block):
                        _note(notes, block, "trimmed", f"on page 1 only: {len(out) - len(data)} "
                              f"bytes of metadata × {pages} pages would be over "
                              f"{_TIFF_EVERY_PAGE_MAX >> 20} MiB")
            if off == 0 or off in seen:
                raise ValueError(f"the result has fewer than {pages} pages")
            seen.add(off)
            own, following = _tiff_ifd(out, e, off)
            size = (_entry_int(out, e, own.get(256)), _entry_int(out, e, own.get(257)))
            page_plan = first_only if first_only is not None and index else p
            ex = _page_exif(page_plan, index, size, e, None if page_plan is first_only else iim)
            if not len(ex):                     # nothing for this page: its IFD stays as it is
                pointer = off + 2 + 12 * struct.unpack_from(e + "H", out, off)[0]
                off = following
                continue
            if len(out) & 1:
                out += b"\x00"
            at = len(out)
            out += ex.tobytes(at)[14:]          # without "Exif\0\0" and the 8-byte header
            added, _ = _tiff_ifd(out, e, at)
            merged = dict(own)
            for tag, entry in added.items():
                if tag in _TIFF_PIXEL_TAGS or (tag in _TIFF_PAGE_WINS and tag in own):
                    continue
                merged[tag] = entry
            if len(out) & 1:
                out += b"\x00"
            new = len(out)
            out += struct.pack(e + "H", len(merged)) + b"".join(merged[t] for t in sorted(merged))
            out += struct.pack(e + "I", following)
            struct.pack_into(e + "I", out, pointer, new)
            pointer, off = new + 2 + 12 * len(merged), following
    except (ValueError, TypeError, KeyError, struct.error, OSError) as exc:
        log.warning("metadata.write_failed", block="exif", error=str(exc)[:200])
        for block in ("exif", "xmp", "iptc"):
            if getattr(p, block):
                _note(notes, block, "dropped", f"could not be written into the pages: {exc}")
        return data
    return bytes(out)


def _copy_exif(exif: bytes, target) -> None:
    """EXIF (as Pillow wrote it) into an exiv2 image: through a scratch JPEG holding it as APP1."""
    blob = exif if exif.startswith(b"Exif\x00\x00") else b"Exif\x00\x00" + exif
    if len(blob) > 65533:
        raise RuntimeError(f"EXIF of {len(blob)} bytes")
    scratch = _exiv2().ImageData(b"\xff\xd8\xff\xe1" + struct.pack(">H", len(blob) + 2) + blob
                                 + b"\xff\xd9")
    try:
        scratch.copy_to_another_image(target, exif=True, iptc=False, xmp=False, comment=False,
                                      icc=False, thumbnail=False)
    finally:
        scratch.close()


def stamp_xmp_file(data: bytes, provenance: Provenance) -> bytes:
    """A companion `.xmp` file with the same history entry, digital source type and DerivedFrom as
    the result it travels with (its other properties untouched). Unreadable XMP comes back as it
    was: a companion is the user's file, never lost for a stamp."""
    try:
        return _build_xmp(data, {}, None, 1.0, provenance) or data
    except (RuntimeError, ValueError, UnicodeError) as exc:
        log.warning("metadata.companion_not_stamped", error=str(exc)[:200])
        return data


def summary(notes: list[dict]) -> dict:
    """The sidecar's ``metadata`` block: per block, the last word on it."""
    blocks: dict[str, dict] = {}
    for n in notes:
        if isinstance(n, dict) and n.get("block"):
            blocks[str(n["block"])] = {k: v for k, v in n.items() if k != "block"}
    if blocks.get("exif", {}).get("action") == "dropped":     # they live inside the EXIF block
        for inner in ("gps", "makernote"):
            if inner in blocks:
                blocks[inner] = {"action": "dropped", "reason": "with the EXIF block"}
    return {"blocks": blocks, "provenance": blocks.get("provenance", {}).get("action") == "added"}
