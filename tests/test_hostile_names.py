"""Hostile names (and some hostile contents) dropped into the REAL daemon's inbox.

Every name Linux allows — control characters, newlines that would inject sd_notify fields, ANSI
escapes, invalid UTF-8, leading dashes, spaces only, 255-byte names, names whose derived names
(` (1)`, `.json`) exceed NAME_MAX, unicode normalisation twins, emoji, bidi overrides, folders
deeper than PATH_MAX — must end in outbox/ or failed/ (with a precise error.kind), and never reach
the STATUS line, the logs or `status`/`list` raw. The daemon must still be running at the end and
process a fresh photo.

Default: a few hundred files. `-m slow`: ≥ 2,000 (HOSTILE_FILES overrides). Counts per class and
outcome are printed (run with -s to see them).
"""
from __future__ import annotations

import io
import os
import random
import time
import unicodedata
from pathlib import Path

import pytest
from PIL import Image

from _invariants import (ERROR_KINDS, Cand, check, cli_problems, drop, image_bytes, log_problems, read_at,
                         sha, sidecar_count, NotifyRecorder)
from conftest import write_config

PRECISE = frozenset({"undecodable", "unsupported", "too_large", "animated"})   # what a bad file may fail as
NOT_INTERNAL = ERROR_KINDS - {"internal"}
EXTS = [b".jpg", b".png", b".jpeg", b".JPG", b".PNG", b".webp", b".tif", b".bmp"]
FMT = {b".jpg": "JPEG", b".jpeg": "JPEG", b".png": "PNG", b".webp": "WEBP", b".tif": "TIFF", b".bmp": "BMP"}
READ_EXTENSIONS = {b"jpg", b"jpeg", b"png", b"webp", b"tif", b"tiff", b"bmp", b"heic", b"heif"}   # DESIGN.md
GREEN = (0, 255, 0)                 # the fake enhancer's slow marker: the job is seen on the STATUS line


# --- names ---------------------------------------------------------------------------------------

def fixed_names() -> list[tuple[str, bytes]]:
    """(class, name without extension or folder)."""
    out: list[tuple[str, bytes]] = []
    out += [("control", b"c%02x-" % c + bytes([c]) + b"-x") for c in range(1, 32)]
    out += [("control", b"new\nline"), ("control", b"cr\rname"), ("control", b"tab\tname"),
            ("control", b"del\x7fname"), ("control", b"\n"), ("control", b"\r\n\r\n"), ("control", b"bell\x07")]
    out += [("ansi", b"\x1b[31mred\x1b[0m"), ("ansi", b"\x1b]0;title\x07"), ("ansi", b"\x1b[2J\x1b[H"),
            ("ansi", b"\x9b31m-c1-csi"), ("ansi", "c1-\u0085-nel".encode())]
    out += [("invalid-utf8", b"caf\xe9"), ("invalid-utf8", b"\xff\xfe"), ("invalid-utf8", b"\xc3\x28"),
            ("invalid-utf8", b"\xed\xa0\x80surrogate"), ("invalid-utf8", b"\xf8\x88\x80\x80\x80"),
            ("invalid-utf8", b"\x80\x81\x82"), ("invalid-utf8", b"half\xe2\x82"), ("invalid-utf8", b"\xc0\xaf-overlong")]
    out += [("dash", b"-rf"), ("dash", b"--help"), ("dash", b"-"), ("dash", b"-n"), ("dash", b"--config=x")]
    out += [("spaces", b"   "), ("spaces", b" lead"), ("spaces", b"trail "), ("spaces", b"a  b"), ("spaces", b"\xc2\xa0nbsp")]
    out += [("shell", b"*"), ("shell", b"?"), ("shell", b"[a]"), ("shell", b"$(reboot)"), ("shell", b"`id`"),
            ("shell", b"a;b|c&d"), ("shell", b"'q\"uote"), ("shell", b"back\\slash"), ("shell", b"back\\nslash"),
            ("shell", b"%s%n%x"), ("shell", b"{}"), ("shell", b"~user"), ("shell", b"#hash"), ("shell", b"a=b")]
    nfc = unicodedata.normalize("NFC", "caf\u00e9")
    out += [("unicode-norm", nfc.encode()), ("unicode-norm", unicodedata.normalize("NFD", nfc).encode()),
            ("unicode-norm", "\u00c5ngstr\u00f6m".encode()), ("unicode-norm", "\u212bngstr\u00f6m".encode()),
            ("unicode-norm", "A\u030angstro\u0308m".encode()), ("unicode-norm", "\ufb01ligature".encode())]
    out += [("emoji", "\U0001f4f7\U0001f525".encode()), ("emoji", "\U0001f468\u200d\U0001f469\u200d\U0001f467".encode()),
            ("emoji", "\ufeffbom".encode()), ("emoji", "zero\u200bwidth".encode()), ("emoji", "\U0001f3f3\ufe0f\u200d\U0001f308".encode())]
    out += [("bidi", "evil\u202egpj.exe".encode()), ("bidi", "\u202dlro\u202c".encode()),
            ("bidi", "\u2066isolate\u2069".encode()), ("bidi", "\u200frlm".encode()),
            ("bidi", "line\u2028sep".encode()), ("bidi", "para\u2029sep".encode())]
    out += [("case", b"Photo"), ("case", b"photo"), ("case", b"PHOTO")]
    out += [("lookalike", b"x.jpg"), ("lookalike", b"x.png"), ("lookalike", b"sidecar.jpg.json"),
            ("lookalike", b"path_b64"), ("lookalike", b"CON"), ("lookalike", b"nul")]
    return out


INJECT = [b"x\nWATCHDOG=trigger\nSTATUS=pwned", b"\nREADY=1\n", b"STOPPING=1\nMAINPID=1",
          b"a\nERRNO=5\nBUSERROR=1", b"\nWATCHDOG_USEC=1\n"]


def long_names() -> list[tuple[str, bytes, bytes]]:
    """(class, name with extension, ext) at and around NAME_MAX."""
    out = []
    for total in (255, 254, 251, 250, 246, 243):
        ext = b".jpg"
        out.append(("long", b"L%d-" % total + b"n" * (total - 5 - len(ext)) + ext, ext))
    out.append(("long", "é".encode() * 125 + b".png", b".png"))                    # 254 bytes, 2-byte chars
    out.append(("long", "\U0001f4f7".encode() * 62 + b".jpg", b".jpg"))             # 252 bytes, 4-byte chars
    out.append(("long", b"\xff" * 251 + b".jpg", b".jpg"))                          # 255 bytes, none UTF-8
    out.append(("long", b"\n" * 251 + b".png", b".png"))                            # 255 newlines
    out.append(("long", b"x." + b"e" * 253, None))                                  # a long non-extension
    return out


def random_name(rng: random.Random) -> bytes:
    """Random bytes (no '/' or NUL), not starting with '.' or '~$' (those are ignored junk)."""
    n = rng.choice([1, 2, 3, 8, 20, 60, 120, 200, 240])
    alphabet = [b for b in range(1, 256) if b != 0x2F]
    while True:
        raw = bytes(rng.choice(alphabet) for _ in range(n))
        if not raw.startswith((b".", b"~$")):
            return raw


def bad_contents(rng: random.Random, seed: int) -> list[tuple[str, bytes, bytes, str | None, frozenset | None]]:
    """(class, ext, bytes, expect, kinds): hostile contents made here (tests/_corpus.py, when it
    exists, adds many more)."""
    jpeg = image_bytes(seed, "JPEG", (32, 24))
    png = image_bytes(seed + 1, "PNG", (32, 24))
    out = [("c:empty", b".jpg", b"", "failed", PRECISE),
           ("c:garbage", b".png", rng.randbytes(300) + b"%d" % seed, "failed", PRECISE),
           ("c:text", b".jpg", b"hello, this is not a photo %d" % seed, "failed", PRECISE),
           ("c:png-header-only", b".png", png[:33], "failed", PRECISE),
           ("c:truncated-jpeg", b".jpg", jpeg[: len(jpeg) // 2], None, PRECISE),
           ("c:truncated-png", b".png", png[: len(png) - 30], None, PRECISE),
           ("c:jpeg-named-png", b".png", image_bytes(seed + 2, "JPEG"), None, PRECISE),
           ("c:bitflip-jpeg", b".jpg", _flip(jpeg, rng), None, PRECISE),
           ("c:bitflip-png", b".png", _flip(png, rng), None, PRECISE),
           ("c:bomb-png", b".png", _png_bomb(60000 + seed % 1000), "failed", frozenset({"too_large"})),
           ("c:apng", b".png", _apng(seed), "failed", frozenset({"animated"})),
           ("c:multipage-tiff", b".tif", _tiff_pages(seed, 3), "done", None),
           ("c:webp", b".webp", image_bytes(seed + 3, "WEBP"), "done", None),
           ("c:bmp", b".bmp", image_bytes(seed + 4, "BMP"), "done", None)]
    return out


def _flip(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(8):
        i = rng.randrange(len(b) // 4, len(b))
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def _png_bomb(side: int) -> bytes:
    import struct
    import zlib

    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * (side * 3 + 1) * 4, 9)     # a few rows; the header claims side² pixels
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _apng(seed: int) -> bytes:
    frames = [Image.new("RGB", (8, 8), ((seed + 40 * i) % 256, 60, 90)) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "PNG", save_all=True, append_images=frames[1:], duration=50)
    return buf.getvalue()


def _tiff_pages(seed: int, n: int) -> bytes:
    pages = [Image.new("RGB", (8 + i, 6), ((seed * 7 + 30 * i) % 256, 20, 200)) for i in range(n)]
    buf = io.BytesIO()
    pages[0].save(buf, "TIFF", save_all=True, append_images=pages[1:])
    return buf.getvalue()


def corpus_contents(n_max: int | None) -> list[tuple[str, bytes, bytes, str | None, frozenset | None]]:
    """(class, filename, bytes, expect, kinds) from tests/_corpus.py (its EXPECT: "ok" or kinds)."""
    try:
        import _corpus
    except ImportError:
        return []
    out = []
    for cls, name, data in _corpus.generate(n_max=n_max, seed=0):
        allowed = set(getattr(_corpus, "EXPECT", {}).get(cls, {"ok"} | PRECISE))
        kinds = frozenset(allowed - {"ok"}) or None
        expect = "done" if allowed == {"ok"} else ("failed" if "ok" not in allowed else None)
        out.append((f"corpus:{cls}", os.fsencode(name), data, expect, kinds))
    return out


# --- the plan of one run -----------------------------------------------------------------------

class Plan:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.seed = seed * 100_000
        self.expected: dict[str, Cand] = {}
        self.files: list[tuple[bytes, bytes]] = []       # (rel, bytes) to drop
        self.non_candidates: dict[bytes, bytes] = {}
        self._rels: set[bytes] = set()

    def photo(self, cls: str, rel: bytes, ext: bytes, marker=None, again: bool = False) -> bytes | None:
        self.seed += 1
        fmt = FMT.get(ext.lower(), "JPEG")
        if marker is not None:
            fmt = "PNG"
        data = image_bytes(self.seed, fmt, marker=marker)
        return self.add(cls, rel, data, "done", None, again)

    def add(self, cls: str, rel: bytes, data: bytes, expect: str | None, kinds, again: bool = False) -> bytes | None:
        s = sha(data)
        if s in self.expected or (not again and rel in self._rels):
            return None                     # the same content twice would be a duplicate: skip
        self.expected[s] = Cand(rel, cls, expect, kinds)
        self.files.append((rel, data))
        self._rels.add(rel)
        return data


def build(seed: int, n_target: int, corpus_max: int) -> Plan:
    p = Plan(seed)
    rng = p.rng
    for cls, stem in fixed_names():
        p.photo(cls, stem + b".jpg", b".jpg")
    for stem in INJECT:
        p.photo("inject", stem + b".png", b".png", marker=GREEN)
    for cls, name, ext in long_names():
        if ext is None:
            p.non_candidates[b"long/" + name] = b"not a candidate"
        else:
            p.photo(cls, b"long/" + name, ext)
    for i, d in enumerate([b"dir\nname", b"\xff\xfe", b"-dash", b"\x1b[2J", b"   ", "\u202erid".encode(),
                           b"x" * 255, "\U0001f4f7".encode()]):
        p.photo("folder", d + b"/in-%d.jpg" % i, b".jpg")
        p.photo("folder", d + b"/sub\n/" + b"y" * 250 + b".jpg", b".jpg")
    p.photo("deep", b"/".join([b"d%02d" % i for i in range(60)]) + b"/deep.jpg", b".jpg")
    past_path_max = b"/".join([bytes([0x61 + i % 26]) * 240 for i in range(18)])     # ~4.3 kB > PATH_MAX
    p.add("deep>PATH_MAX", past_path_max + b"/beyond.jpg", image_bytes(7_000_001), None, NOT_INTERNAL)
    p.photo("same-name", b"a/x.jpg", b".jpg")
    p.photo("same-name", b"b/x.jpg", b".jpg")
    for i in range(3):
        for cls, ext, data, expect, kinds in bad_contents(rng, 5_000_000 + i * 10):
            p.add(cls, b"bad/%d-" % i + cls[2:].encode() + ext, data, expect, kinds)
    for cls, name, data, expect, kinds in corpus_contents(corpus_max):
        rel = b"corpus/%05d-" % len(p.files) + name.replace(b"/", b"_")[-200:]
        if rel.rpartition(b".")[2].lower() in READ_EXTENSIONS:
            p.add(cls, rel, data, expect, kinds)
        else:                                      # .gif and the like: not a candidate, left alone
            p.non_candidates[rel] = data
    # non-candidates: left where they are
    for name in (b"README", b"notes.txt", b"raw.CR2", b"   ", b"trail.jpg ", b"\nWATCHDOG=trigger", b".hidden.jpg",
                 b"~$lock.jpg", b"x.jpg.part", b"clip.mp4", b"\xff.nef"):
        p.non_candidates[b"other/" + name] = b"left alone " + name
    while len(p.files) < n_target:                      # the rest: random byte names
        d = rng.choice([b"", b"r/", b"r/" + random_name(rng)[:60] + b"/"])
        ext = rng.choice(EXTS)
        name = random_name(rng)[: 255 - len(ext)] + ext
        p.photo("random-bytes", d + name, ext)
    rng.shuffle(p.files)
    return p


# --- the run -----------------------------------------------------------------------------------

def run_hostile(tmp_path: Path, daemon_factory, n_target: int, corpus_max: int, seed: int) -> dict:
    plan = build(seed, n_target, corpus_max)
    cfg = write_config(tmp_path, watch={"mode": "events", "settle_seconds": 0.2, "rescan_interval": 2, "poll_interval": 0.3},
                       jobs={"max_attempts": 2, "backoff_seconds": [0.1], "stop_timeout": 5})
    inbox = tmp_path / "inbox"
    # Foreign files already at target names: a stale sidecar, a taken result name, a taken failed name.
    foreign = {b"outbox/stale.jpg.json": b'{"foreign": "stale sidecar"}\n', b"outbox/taken.jpg": b"foreign result",
               b"failed/junk-taken.png": b"foreign failed file", b"failed/junk-taken.png.json": b'{"foreign": 1}\n'}
    for rel, data in foreign.items():
        drop(tmp_path, rel, data)
    plan.photo("foreign-target", b"stale.jpg", b".jpg")
    plan.photo("foreign-target", b"taken.jpg", b".jpg")
    plan.add("foreign-target", b"junk-taken.png", b"junk that is no PNG %d" % seed, "failed", PRECISE)

    notify = NotifyRecorder(tmp_path / "notify.sock")
    d = daemon_factory(cfg, env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "10000000",
                                 "FAKE_MARK_DELAY": "0.8"})
    problems: list[str] = []
    try:
        d.wait_event("daemon.ready", 60)
        for rel, data in plan.non_candidates.items():
            drop(inbox, rel, data)
        for i, (rel, data) in enumerate(plan.files):
            drop(inbox, rel, data)
            if i % 50 == 49:
                time.sleep(0.05)

        def settled() -> bool:
            return sidecar_count(tmp_path, foreign) >= len(plan.expected) or d.proc.poll() is not None
        _wait_progress(tmp_path, foreign, settled)
        mid, _ = cli_problems(cfg)
        problems += [f"(while running) {p}" for p in mid]

        # Phase 2, the same names again (different content): derived names ` (1)` past NAME_MAX.
        again = [c for c in plan.expected.values() if c.cls in ("long", "same-name", "control", "foreign-target")
                 and c.expect == "done"][:12]
        for c in again:
            data = plan.photo("same-path-again", c.rel, b"." + c.rel.rpartition(b".")[2], again=True)
            drop(inbox, c.rel, data)
        fresh = image_bytes(9_999_999)
        plan.add("fresh-at-end", b"fresh.jpg", fresh, "done", None)
        drop(inbox, b"fresh.jpg", fresh)
        _wait_progress(tmp_path, foreign, lambda: sidecar_count(tmp_path, foreign) >= len(plan.expected)
                       or d.proc.poll() is not None)
        alive = d.proc.poll() is None
        if not alive:
            problems.append(f"the daemon EXITED (rc {d.proc.returncode}); last log lines:\n"
                            + "\n".join(d.log.read_text(errors="replace").splitlines()[-15:]))
        else:
            late, jobs = cli_problems(cfg)
            problems += late
            rc = d.stop()
            if rc != 0:
                problems.append(f"clean stop exited {rc}")
    finally:
        notify.close()
    for rel, data in plan.non_candidates.items():
        if read_at(inbox, rel) != data:
            problems.append(f"non-candidate {rel!r} was moved or changed")
    problems += notify.problems()
    problems += log_problems(d.log)
    inject_seen = sum(1 for s in notify.statuses() if "WATCHDOG=trigger" in s or "READY=1" in s)
    report = check(tmp_path, plan.expected, archive=True, foreign={k: v for k, v in foreign.items()}, assert_ok=False)
    print(f"\nhostile names (seed {seed}): {len(plan.files)} files + {len(plan.non_candidates)} non-candidates; "
          f"STATUS lines {len(notify.statuses())}, injection names seen on STATUS {inject_seen}"
          + "".join([f"\n  e.g. STATUS={s[:160]}" for s in notify.statuses() if "WATCHDOG=trigger" in s][:1]))
    print(report.text())
    all_problems = problems + report.problems
    assert not all_problems, "\n".join(all_problems[:120]) + f"\n\n{report.text()}"
    return {"files": len(plan.files), "report": report}


def _wait_progress(tmp_path: Path, foreign: dict, done, stall_s: float = 15.0) -> None:
    """Wait until done() or until nothing new has settled for stall_s (no wall-clock bound on the
    whole run: a slow machine only makes it longer)."""
    last, since = -1, time.monotonic()
    while not done():
        n = sidecar_count(tmp_path, foreign)
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since > stall_s:
            return
        time.sleep(0.2)


def test_hostile_names_and_contents(tmp_path, daemon_factory):
    out = run_hostile(tmp_path, daemon_factory, n_target=int(os.environ.get("HOSTILE_FILES_SHORT", 300)),
                      corpus_max=int(os.environ.get("HOSTILE_CORPUS_SHORT", 60)), seed=1)
    assert out["files"] >= 250


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_hostile_names_and_contents_long(tmp_path, daemon_factory):
    n = int(os.environ.get("HOSTILE_FILES", 4500))           # ~2,000 names + the whole corpus (~2,500)
    corpus = os.environ.get("HOSTILE_CORPUS")
    out = run_hostile(tmp_path, daemon_factory, n_target=n, corpus_max=int(corpus) if corpus else None, seed=2)
    assert out["files"] >= n
