"""ExifTool as the independent metadata reader of the metadata tests, and a corpus of photos as real
cameras, scanners and exporters make them (rich metadata written by ExifTool itself).

`ensure()` installs Debian's libimage-exiftool-perl when it is missing (root + apt-get, as the other
rigs do); `read(paths)` runs one `exiftool -j -G1 -a -struct` over many files; `corpus(dir)` writes
the photos; `unexplained(before, after, notes)` lists the tags that differ without a reason.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

DST = "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia"


def ensure() -> str:
    exe = shutil.which("exiftool")
    if exe:
        return exe
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("ExifTool is missing and cannot be installed (not root or no apt-get): "
                    "apt-get install libimage-exiftool-perl")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "libimage-exiftool-perl"]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert r.returncode == 0, f"apt-get install libimage-exiftool-perl failed: {r.stderr[-2000:]}"
    exe = shutil.which("exiftool")
    assert exe, "exiftool not on PATH after installing libimage-exiftool-perl"
    return exe


def write(path: Path, *args: str) -> None:
    r = subprocess.run(["exiftool", "-q", "-q", "-overwrite_original", *args, str(path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, f"exiftool {args}: {r.stderr}"


def read(paths: list[Path]) -> dict[str, dict]:
    """{path: {"Group:Tag": value}} for every file, from one exiftool run."""
    r = subprocess.run(["exiftool", "-j", "-G1", "-a", "-struct", "-n", *map(str, paths)],
                       capture_output=True, text=True)
    assert r.stdout, r.stderr
    return {d["SourceFile"]: d for d in json.loads(r.stdout)}


def _pixels(w: int, h: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (h, w, 3), dtype=np.uint8)


def _apple_makernote() -> bytes:
    """An iPhone's maker note: "Apple iOS" + an IFD with offsets relative to the note itself."""
    ifd = struct.pack(">H", 1) + struct.pack(">HHII", 0x0001, 9, 1, 14) + struct.pack(">I", 0)
    return b"Apple iOS\x00\x00\x01MM" + ifd


XMP_RICH = ["-XMP-dc:Subject=holiday", "-XMP-dc:Subject=beach", "-XMP-dc:Description=At the sea",
            "-XMP-dc:Creator=Ann Example", "-XMP-xmp:Rating=4",
            "-XMP-iptcExt:PersonInImage=Bob", "-XMP-photoshop:City=Kiel"]
REGION = ("-XMP-mwg-rs:RegionInfo={AppliedToDimensions={W=48,H=32,Unit=pixel},RegionList=[{Area="
          "{X=0.5,Y=0.5,W=0.2,H=0.3,Unit=normalized},Name=Bob,Type=Face}]}")


def corpus(folder: Path) -> dict[str, Path]:
    """phone.jpg (GPS, maker note, thumbnail, XMP with face regions, IPTC, comment), scan.tif (16-bit
    RGB, 300 dpi, IPTC caption), export.png (text chunks, XMP, EXIF, pHYs), phone.heic (10-bit,
    EXIF + XMP) and photo.webp (EXIF, XMP, ICC)."""
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    # phone JPEG: 48×32 stored, Orientation 6 (shown 32×48)
    ex = Image.Exif()
    ex[0x010F], ex[0x0110], ex[0x0112] = "Apple", "iPhone 12", 6
    sub = ex.get_ifd(0x8769)
    sub[0x927C] = _apple_makernote()
    p = folder / "phone.jpg"
    Image.fromarray(_pixels(48, 32, 1)).save(p, "JPEG", quality=90, exif=ex.tobytes())
    thumb = folder / "thumb.jpg"
    Image.fromarray(_pixels(16, 12, 9)).save(thumb, "JPEG")
    write(p, "-EXIF:DateTimeOriginal=2024:05:06 07:08:09", "-EXIF:GPSLatitude=54.32",
          "-EXIF:GPSLatitudeRef=N", "-EXIF:GPSLongitude=10.13", "-EXIF:GPSLongitudeRef=E",
          "-EXIF:Copyright=(c) Ann Example", "-EXIF:XResolution=72", "-EXIF:YResolution=72",
          "-EXIF:ResolutionUnit=inches", f"-ThumbnailImage<={thumb}", *XMP_RICH, REGION,
          "-IPTC:Keywords=holiday", "-IPTC:Caption-Abstract=At the sea (IIM)",
          "-IPTC:By-line=Ann Example", "-Comment=shot on a phone")
    thumb.unlink()
    out["phone.jpg"] = p
    # scanner TIFF, 16-bit RGB, 300 dpi, IPTC caption
    import tifffile
    a16 = (np.random.default_rng(2).integers(0, 65535, (24, 36, 3))).astype(np.uint16)
    p = folder / "scan.tif"
    tifffile.imwrite(p, a16, photometric="rgb", compression="zlib", resolution=(300, 300),
                     resolutionunit="INCH")
    write(p, "-IFD0:Make=ScanCo", "-IFD0:Model=FilmScan 9000", "-IFD0:Artist=Archive Dept",
          "-IPTC:Caption-Abstract=Harbour, 1962", "-IPTC:Keywords=harbour",
          "-IPTC:ObjectName=Box 12 / 7", "-XMP-dc:Rights=Public domain")
    out["scan.tif"] = p
    # PNG export with text chunks
    p = folder / "export.png"
    Image.fromarray(_pixels(40, 30, 3)).save(p, "PNG", dpi=(150, 150))
    write(p, "-PNG:Title=Sunset", "-PNG:Author=Ann Example", "-PNG:Description=Exported",
          "-PNG:Copyright=CC-BY", "-PNG:Software=SomeEditor 3", "-XMP-dc:Subject=sunset",
          "-EXIF:Make=Canon", "-EXIF:DateTimeOriginal=2023:01:02 03:04:05")
    out["export.png"] = p
    # phone HEIC, 10-bit
    import pillow_heif
    a16 = (np.random.default_rng(4).integers(0, 65535, (32, 48, 3))).astype(np.uint16)
    p = folder / "phone.heic"
    pillow_heif.from_bytes(mode="RGB;16", size=(48, 32), data=a16.tobytes()).save(p, quality=90)
    write(p, "-EXIF:Make=Apple", "-EXIF:Model=iPhone 15", "-EXIF:GPSLatitude=48.1",
          "-EXIF:GPSLatitudeRef=N", "-EXIF:DateTimeOriginal=2025:06:07 08:09:10",
          "-XMP-dc:Subject=city", "-XMP-xmp:Rating=5")
    out["phone.heic"] = p
    # WebP with ICC
    from PIL import ImageCms
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    p = folder / "photo.webp"
    Image.fromarray(_pixels(40, 24, 5)).save(p, "WEBP", quality=85, icc_profile=icc)
    write(p, "-EXIF:Make=Google", "-EXIF:Model=Pixel 8", "-XMP-dc:Subject=park",
          "-XMP-dc:Creator=Cam User")
    out["photo.webp"] = p
    return out


# --------------------------------------------------------------------------------- comparing

# Tags that describe the file's encoding, not knowledge about the photo.
_STRUCT_GROUPS = {"SourceFile", "ExifTool", "System", "Composite", "RIFF", "QuickTime", "Meta",
                  "ICC-header", "ICC_Profile", "ICC-chrm", "ICC-meas", "ICC-view"}
_STRUCT_TAGS = {
    "File": None,                      # all but File:Comment (the JPEG comment)
    "PNG": {"ImageWidth", "ImageHeight", "BitDepth", "ColorType", "Compression", "Filter",
            "Interlace", "ProfileName"},
    "IFD0": {"ImageWidth", "ImageHeight", "BitsPerSample", "Compression", "PhotometricInterpretation",
             "StripOffsets", "RowsPerStrip", "StripByteCounts", "PlanarConfiguration",
             "SamplesPerPixel", "ExtraSamples", "Predictor", "YCbCrPositioning", "SampleFormat",
             "TileWidth", "TileLength", "TileOffsets", "TileByteCounts", "FillOrder"},
    "JFIF": {"JFIFVersion"},
}
# Tags this project changes on purpose (issue 10): pixels rotated and rescaled, provenance stamped.
CHANGED = {"IFD0:Orientation", "IFD0:Software", "IFD0:XResolution", "IFD0:YResolution",
           "IFD0:ResolutionUnit", "ExifIFD:ExifImageWidth", "ExifIFD:ExifImageHeight",
           "JFIF:XResolution", "JFIF:YResolution", "JFIF:ResolutionUnit",
           "PNG-pHYs:PixelsPerUnitX", "PNG-pHYs:PixelsPerUnitY", "PNG-pHYs:PixelUnits",
           "File:CurrentIPTCDigest", "File:ExifByteOrder",
           "XMP-x:XMPToolkit", "XMP-xmpMM:History", "XMP-xmpMM:DocumentID", "XMP-xmpMM:InstanceID",
           "XMP-xmpMM:DerivedFrom", "XMP-xmpMM:OriginalDocumentID", "XMP-iptcExt:DigitalSourceType",
           "XMP-tiff:Orientation", "XMP-exif:PixelXDimension", "XMP-exif:PixelYDimension"}
# Which sidecar block accounts for a tag's group.
_BLOCK_OF = {"IFD0": "exif", "ExifIFD": "exif", "GPS": "gps", "Apple": "makernote",
             "MakerNotes": "makernote", "InteropIFD": "exif", "IFD1": "thumbnail", "IPTC": "iptc",
             "JFIF": "dpi", "PNG-pHYs": "dpi", "Photoshop": "iptc"}


def structural(key: str) -> bool:
    group, _, tag = key.partition(":")
    if group in _STRUCT_GROUPS:
        return True
    if group == "File":
        return tag != "Comment"
    names = _STRUCT_TAGS.get(group)
    return bool(names) and tag in names


def block_of(key: str) -> str:
    group, _, tag = key.partition(":")
    if group.startswith("XMP"):
        return "xmp"
    if group == "File" and tag == "Comment":
        return "jpeg_comment"
    if group == "PNG":
        return "png_text"
    return _BLOCK_OF.get(group, group)


def _without_dims(v):
    """mwg-rs RegionInfo without AppliedToDimensions (which follows the new pixel size)."""
    if isinstance(v, dict):
        return {k: _without_dims(x) for k, x in v.items() if k != "AppliedToDimensions"}
    return v


def unexplained(before: dict, after: dict, blocks: dict) -> list[str]:
    """Tags of `before` that are gone or changed in `after`, or new in `after`, that neither this
    project changes on purpose (CHANGED), nor are the file's structure, nor belong to a block the
    sidecar reports as converted/trimmed/dropped."""
    out = []
    for key in sorted(set(before) | set(after)):
        if structural(key) or key in CHANGED:
            continue
        a, b = before.get(key), after.get(key)
        if key == "XMP-mwg-rs:RegionInfo":
            a, b = _without_dims(a), _without_dims(b)
        if a == b:
            continue
        block = block_of(key)
        state = blocks.get(block, {}).get("action")
        if a is not None and state in ("converted", "trimmed", "dropped"):
            continue
        made_xmp = any(blocks.get(b, {}).get("to") == "xmp" for b in ("iptc", "png_text"))
        if a is None and (state == "converted" or (block == "xmp" and made_xmp)):
            continue                 # new XMP made from IIM / PNG text, or a PNG Comment from COM
        if a is None and block == "png_text" and blocks.get("jpeg_comment", {}).get("action") == "converted":
            continue
        out.append(f"{key}: {a!r} -> {b!r} (block {block}: {state})")
    return out
