"""enhancer.imageio against hostile files (tests/_corpus.py): every outcome is a success or a
PermanentError with a precise kind, never another exception, never unbounded work."""
from __future__ import annotations

import collections
import io
import tracemalloc

import pytest
from PIL import Image

from enhancer import imageio
from enhancer.errors import PermanentError, TooLargeError
from enhancer.imageio import Limits

import _corpus

LIM = Limits()


class Ticks:
    def __init__(self):
        self.n = 0

    def __call__(self):
        self.n += 1


def outcome(name: str, data: bytes) -> str:
    """probe + decode (+ encode in the output format and as JPEG) → "ok" or the error kind."""
    try:
        info = imageio.probe(data, LIM, name=name)
        dec = imageio.decode(data, LIM, name=name)
        assert dec.info == info
        fmt, _ = imageio.output_format(info.format, "same")
        notes: list[dict] = []
        out = imageio.encode(dec, dec.pages, fmt, notes=notes)
        imageio.encode(dec, dec.pages, "JPEG", notes=notes)
        assert imageio.probe(out, LIM, name="out").pages == len(dec.pages) if fmt == "TIFF" \
            else True
        return "ok"
    except PermanentError as exc:
        assert exc.kind in _corpus.ERROR_KINDS and str(exc)
        return exc.kind


def run_corpus(n_max: int, seed: int = 0) -> tuple[dict, list]:
    table: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    wrong = []
    for cls, name, data in _corpus.generate(n_max=n_max, seed=seed):
        got = outcome(name, data)
        table[cls][got] += 1
        if got not in _corpus.EXPECT[cls]:
            wrong.append((cls, name, got))
    return table, wrong


def render(table: dict) -> str:
    kinds = ["ok", *sorted(_corpus.ERROR_KINDS)]
    lines = [f"{'class':<20}" + "".join(f"{k:>12}" for k in kinds)]
    for cls in sorted(table):
        lines.append(f"{cls:<20}" + "".join(f"{table[cls][k]:>12}" for k in kinds))
    return "\n".join(lines)


def test_a_few_hundred_hostile_files_each_end_in_success_or_a_precise_kind():
    table, wrong = run_corpus(320)
    print("\n" + render(table))
    assert sum(sum(c.values()) for c in table.values()) == 320
    assert set(table) == set(_corpus.EXPECT), render(table)          # every class ran
    assert not wrong, f"unexpected outcomes: {wrong}\n{render(table)}"


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_the_whole_corpus_ends_in_success_or_a_precise_kind(seed):
    table, wrong = run_corpus(2500, seed)
    print("\n" + render(table))
    assert sum(sum(c.values()) for c in table.values()) == 2500
    assert not wrong, f"unexpected outcomes: {wrong}\n{render(table)}"


def special(name: str) -> bytes:
    return next(d for _, n, d in _corpus.generate() if n.endswith(name))


# ------------------------------------------------------------------------------- pages

def test_100k_tiny_pages_tiff_is_refused_after_counting_max_pages_plus_one():
    data = _corpus._tiff([(1, 1, b"x\x9cc\x00\x00\x00\x01\x00\x01")] * 100_000)
    ticks = Ticks()
    with pytest.raises(TooLargeError, match="more than 100 pages") as err:
        imageio.probe(data, LIM, name="many.tif", tick=ticks)
    assert err.value.kind == "too_large"
    assert 101 <= ticks.n <= 110                 # pages examined: 101, not 100,000
    ticks = Ticks()
    with pytest.raises(TooLargeError, match="more than 5 pages"):
        imageio.decode(data, Limits(max_pages=5), name="many.tif", tick=ticks)
    assert ticks.n <= 10


def test_many_large_pages_tiff_is_refused_by_the_sum_of_pixels_from_headers():
    data = special("pages-60-of-64mp.tif")
    assert len(data) < 100_000
    tracemalloc.start()
    try:
        with pytest.raises(TooLargeError, match=r"sum of pixels over 60 pages = 3840\.0 MP"):
            imageio.decode(data, LIM, name="p.tif")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20e6                           # no 64 MP page was decoded
    info = imageio.probe(data, Limits(max_input_megapixels=5000), name="p.tif")
    assert info.pages == 60 and set(info.page_sizes) == {(8000, 8000)}


def test_tick_is_called_for_every_page_decoded():
    ticks = Ticks()
    dec = imageio.decode(special("pages-3-sizes.tif"), LIM, name="p.tif", tick=ticks)
    assert len(dec.pages) == 3 and ticks.n >= 3
    assert dec.info.page_sizes == ((40, 30), (20, 10), (40, 30))


def test_ifd_chain_that_loops_is_read_up_to_the_loop():
    dec = imageio.decode(special("ifd-chain-loops.tif"), LIM, name="loop.tif")
    assert len(dec.pages) == 3


def test_output_scale_is_computed_from_the_largest_page():
    info = imageio.probe(special("small-first-page.tif"), LIM, name="s.tif")
    assert info.page_sizes == ((8, 8), (400, 300))
    lim = Limits(max_output_megapixels=1)
    s = imageio.output_scale(info, 4, lim)
    assert 2.5 < s < 2.9 and round(400 * s) * round(300 * s) <= 1e6      # page 1 alone: 4.0
    first_only = imageio.Info(info.format, 8, 8, 1, info.mode)
    assert imageio.output_scale(first_only, 4, lim) == 4.0


# ------------------------------------------------------------------------------- metadata

def test_exif_of_70kb_into_jpeg_is_trimmed_of_its_makernote_with_a_note():
    dec = imageio.decode(special("exif70k-makernote.png"), LIM, name="e.png")
    assert len(dec.exif) > 70_000
    notes: list[dict] = []
    out = Image.open(io.BytesIO(imageio.encode(dec, dec.pages, "JPEG", notes=notes)))
    changed = [n for n in notes if n["action"] != "kept"]     # every block also gets a "kept" note
    assert [(n["block"], n["action"]) for n in changed] == [("exif", "trimmed"), ("makernote", "dropped")]
    assert "MakerNote" in changed[0]["reason"]
    ex = out.getexif()
    assert ex[0x010F] == "CorpusCam" and 0x927C not in ex.get_ifd(0x8769)
    assert len(out.info["exif"]) <= imageio.JPEG_EXIF_MAX
    # the same EXIF into PNG is kept whole, without a note
    notes = []
    png = Image.open(io.BytesIO(imageio.encode(dec, dec.pages, "PNG", notes=notes)))
    assert [n for n in notes if n["action"] != "kept"] == [] and 0x927C in png.getexif().get_ifd(0x8769)


def test_exif_too_big_without_a_makernote_is_dropped_with_a_note():
    dec = imageio.decode(special("exif70k-usercomment.webp"), LIM, name="e.webp")
    notes: list[dict] = []
    out = Image.open(io.BytesIO(imageio.encode(dec, dec.pages, "JPEG", notes=notes)))
    assert [(n["block"], n["action"]) for n in notes if n["action"] != "kept"] == [("exif", "dropped")]
    assert "exif" not in out.info


def test_icc_of_200kb_is_split_over_app2_segments_in_jpeg_and_kept_byte_identical():
    data = special("icc200k.png")
    dec = imageio.decode(data, LIM, name="i.png")
    notes: list[dict] = []
    out = Image.open(io.BytesIO(imageio.encode(dec, dec.pages, "JPEG", notes=notes)))
    assert notes == [] and out.info["icc_profile"] == dec.icc and len(dec.icc) == 200_000


def test_icc_a_png_reader_would_refuse_is_dropped_with_a_note():
    dec = imageio.decode(special("icc200k.jpg"), LIM, name="i.jpg")
    dec.icc = dec.icc * 6                        # 1.2 MB: over PNG_ICC_MAX
    notes: list[dict] = []
    out = imageio.encode(dec, dec.pages, "PNG", notes=notes)
    assert [(n["block"], n["action"]) for n in notes] == [("icc", "dropped")]
    assert "icc_profile" not in Image.open(io.BytesIO(out)).info


def test_metadata_over_the_limit_is_too_large():
    with pytest.raises(TooLargeError, match="max_metadata_bytes"):
        imageio.probe(special("icc200k.jpg"), Limits(max_metadata_bytes=100_000), name="i.jpg")
    with pytest.raises(TooLargeError, match="max_metadata_bytes"):
        imageio.decode(special("ztxt-20mb.png"), LIM, name="z.png")


# ------------------------------------------------------------------------------- sources

def test_bytes_source_and_path_source_give_the_same_results(tmp_path):
    checked = 0
    for cls, name, data in _corpus.generate(n_max=160):
        path = tmp_path / name
        path.write_bytes(data)
        results = []
        for source in (path, data, memoryview(data)):
            try:
                dec = imageio.decode(source, LIM, name=name if source is not path else None)
                results.append(("ok", dec.info, [p.rgb.tobytes() for p in dec.pages], dec.exif,
                                dec.icc, dec.notes))
            except PermanentError as exc:
                results.append((exc.kind, str(exc)))
        assert results[0] == results[1] == results[2], name
        checked += 1
    assert checked == 160


# ------------------------------------------------------------------------------- containers

@pytest.mark.parametrize("name,kind,message", [
    ("fill-1mb.jpg", "undecodable", "fill or junk bytes"),
    ("png-150k-chunks.png", "undecodable", "PNG chunks"),
    ("riff-100k-chunks.webp", "undecodable", "RIFF chunks"),
    ("ifd-reread.tif", "too_large", "same bytes over and over"),
    ("ifd-10000-entries.tif", "undecodable", "10000 entries"),
])
def test_container_abuse_is_refused_before_pillow_walks_it(name, kind, message):
    ticks = Ticks()
    with pytest.raises(PermanentError, match=message) as err:
        imageio.probe(special(name), LIM, name=name, tick=ticks)
    assert err.value.kind == kind


def test_run_length_bmp_too_big_for_pillows_python_decoder_is_refused():
    bmp = (b"BM" + bytes(12) + (40).to_bytes(4, "little") + bytes(12)
           + (1).to_bytes(4, "little") + bytes(33 << 20))
    with pytest.raises(TooLargeError, match="run-length coded BMP"):
        imageio.probe(bmp, LIM, name="rle.bmp")
