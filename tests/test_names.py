"""watcher/names.py: the display form is printable, single-line and injective; fields() carries the
exact bytes; fit() shortens deterministically within NAME_MAX — checked on real files."""
from __future__ import annotations

import base64
import hashlib
import json
import itertools
import os
import random
import unicodedata

import pytest

from watcher import names
from watcher.names import NAME_MAX, PUBLISH_RESERVE, display, fields, fit, raw, safe, undisplay

ORDINARY = ["IMG_001.jpg", "Grüße aus Köln.heic", "写真 2024.png", "-rf.jpg", "--help", "a b  c.tif",
            "👨‍👩‍👧 family.jpg", "naïve café.webp", "x" * 255, "ℌ𝔢𝔩𝔩𝔬.png", "#recycle", "~$doc.jpg"]

ALPHABET = [b"a", b"\\", b"n", b"x", b"u", b"0", b"8", b"5", b"\n", b"\t", b"\r", b"\x1b", b"\x7f", b"\xc2\x85",
            b"\xc2", b"\x85", b"\xe9", b"\xe2\x80\xa8", b"\xe2\x80\xae", b"\xed\xa0\x80", b"\xf0\x9f\x98\x80",
            b"\xf0\x9f", b" ", b"."]


def _clean(d: str) -> bool:
    """One printable line of encodable text."""
    d.encode("utf-8")
    return all(unicodedata.category(c) not in ("Cc", "Cs", "Zl", "Zp") for c in d) and \
        not any(c in d for c in "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c")


@pytest.mark.parametrize("name", ORDINARY)
def test_ordinary_names_are_unchanged(name):
    assert display(name) == name and safe(name) == name
    assert fields(name) == {"path": name}


@pytest.mark.parametrize("name, shown", [
    ("a\nb.jpg", "a\\nb.jpg"), ("a\tb", "a\\tb"), ("a\rb", "a\\rb"), ("\x1b[31mred", "\\x1b[31mred"),
    ("del\x7f", "del\\x7f"), ("nul\x00", "nul\\x00"), ("c1\x85", "c1\\u0085"),
    (os.fsdecode(b"caf\xe9.jpg"), "caf\\xe9.jpg"), (os.fsdecode(b"\xc2\x85"), "\\u0085"),
    (os.fsdecode(b"\x85"), "\\x85"), ("line\u2028sep", "line\\u2028sep"), ("evil\u202egpj.exe", "evil\\u202egpj.exe"),
    ("C:\\photos\\a.jpg", "C:\\\\photos\\\\a.jpg"), ("a\\nb", "a\\\\nb"), ("\ud800", "\\ud800"),
])
def test_what_is_escaped_and_how(name, shown):
    assert display(name) == shown
    assert _clean(shown) and undisplay(shown) == name


def test_a_raw_c1_byte_and_a_c1_character_display_differently():
    assert display(os.fsdecode(b"\x85")) != display(os.fsdecode(b"\xc2\x85"))


def test_every_code_point_round_trips_through_display():
    seen = set()
    for cp in range(0x110000):
        ch = chr(cp)
        d = display(ch)
        assert undisplay(d) == ch
        seen.add(d)
        if cp % 97 == 0:
            assert _clean(d), hex(cp)
    assert len(seen) == 0x110000                                   # injective on single characters


def test_every_two_byte_name_displays_uniquely_and_cleanly():
    byte_values = [bytes([b]) for b in range(1, 256) if b != ord("/")]
    shown = {}
    for a, b in itertools.product(byte_values, repeat=2):
        name = os.fsdecode(a + b)
        d = display(name)
        assert _clean(d)
        assert shown.setdefault(d, name) == name
        assert raw(undisplay(d)) == a + b
    assert len(shown) == len(byte_values) ** 2


def test_random_hostile_names_round_trip():
    rng = random.Random(9)
    for _ in range(5000):
        data = b"".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 12)))
        name = os.fsdecode(data)
        d = display(name)
        assert _clean(d) and raw(undisplay(d)) == data
        assert safe(safe(name)) == safe(name) and safe(d) == d
        assert _clean(safe(name))
        f = fields(name)
        assert f["path"] == d
        assert ("path_b64" in f) == (d != name)
        if "path_b64" in f:
            assert base64.urlsafe_b64decode(f["path_b64"]) == data


def test_fields_with_another_key_and_a_str_without_bytes():
    name = os.fsdecode(b"a\nb\xff")
    assert fields(name, "input") == {"input": "a\\nb\\xff", "input_b64": names.b64(name)}
    assert base64.urlsafe_b64decode(names.b64(name)) == b"a\nb\xff"
    assert fields("\ud800") == {"path": "\\ud800"}                 # no bytes: no _b64, no exception


def test_undisplay_refuses_what_display_never_makes():
    with pytest.raises(ValueError):
        undisplay("a\\qb")


# --- fit() ---------------------------------------------------------------------------------------

def _long_names():
    return [
        "a" * 300 + ".jpg",
        "é" * 200 + ".jpeg",                                     # 2-byte characters
        "😀" * 80 + ".png",                                      # 4-byte characters
        *("x" * k + "😀" * 70 + ".heic" for k in range(4)),       # every alignment of the cut
        os.fsdecode(b"\xe9" * 260 + b".tif"),                    # escaped raw bytes
        os.fsdecode(b"ab" + b"\xe2\x82" * 130 + b".jpg"),         # truncated sequences
        os.fsdecode((b"\xe2\x82\xac" + b"\xe2\x82") * 60 + b".webp"),
        "b" * 250 + "." + "e" * 30,                              # an extension too long to keep
        "c" * 260,                                               # no extension
        "." + "d" * 280,                                         # a dot name: no extension
        "n\n" * 130 + ".jpg",
    ]


@pytest.mark.parametrize("reserve", [0, PUBLISH_RESERVE, 40])
def test_fit_shortens_within_name_max_keeping_the_extension(tmp_path, reserve):
    for name in _long_names():
        r = fit(name, reserve)
        data = raw(r)
        assert len(data) + reserve <= NAME_MAX
        assert len(data) + reserve >= NAME_MAX - 4                  # cut no more than one character
        assert os.fsdecode(data) == r                                # round-trips as a name
        assert r == fit(name, reserve)                               # deterministic
        assert fit(r, reserve) == r                                  # a fitted name fits
        stem, dot, ext = name.rpartition(".")
        if dot and stem and len(raw("." + ext)) <= names.EXT_MAX:
            assert r.endswith("." + ext)
        assert hashlib.sha256(raw(name)).hexdigest()[:8] in r
        assert raw(r)[:8] == raw(name)[:8]                           # the stem starts as before
        # the real file system takes the name and the longest derived name publish may make
        pad = "x" * reserve
        open(os.path.join(os.fsencode(tmp_path), raw(r + pad)), "wb").close()
        os.unlink(os.path.join(os.fsencode(tmp_path), raw(r + pad)))


def test_fit_keeps_valid_utf8_valid(tmp_path):
    for name in ("é" * 200 + ".jpeg", "😀" * 80 + ".png", "写" * 120 + ".jpg"):
        fitted = raw(fit(name, PUBLISH_RESERVE))
        text = fitted.decode("utf-8")                                # no split sequence
        assert len(fitted) + PUBLISH_RESERVE <= 255 and text.endswith(name.rsplit(".", 1)[1])


def test_fit_leaves_names_that_fit_alone():
    assert fit("IMG_001.jpg") == "IMG_001.jpg"
    assert fit("a" * 255) == "a" * 255
    assert fit("a" * 242, PUBLISH_RESERVE) == "a" * 242
    assert fit("a" * 243, PUBLISH_RESERVE) != "a" * 243


def test_fit_gives_different_names_for_different_long_names():
    a, b = "p" * 300 + "1.jpg", "p" * 300 + "2.jpg"
    assert fit(a) != fit(b) and fit(a)[:200] == fit(b)[:200]


def test_fit_refuses_a_reserve_that_leaves_no_room():
    with pytest.raises(ValueError):
        fit("a" * 300, NAME_MAX)


def test_publish_reserve_covers_the_derived_names():
    assert PUBLISH_RESERVE >= len(" (99999)") + len(".json")
    assert PUBLISH_RESERVE >= len(" (99999)") + len(".xmp")


# --- the CLI: `list` and `status`, human and --json, on hostile names ------------------------------

HOSTILE_REL = os.fsdecode(b"sub/evil\nWATCHDOG=1\x1b[2J\xe9\\.jpg")


def _utf8_stdout(r) -> str:
    assert r.returncode == 0, r.stderr
    return r.stdout.decode("utf-8")                        # strict: valid UTF-8 whatever the names


def _cli_bytes(config, *args):
    import subprocess
    from conftest import PY, ROOT
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PHOTOENHANCED_CONFIG", None)
    return subprocess.run([PY, "-m", "watcher.cli", "--config", str(config), *args], capture_output=True,
                          env=env, timeout=60)


@pytest.fixture
def hostile_queue(tmp_path):
    from conftest import write_config
    from watcher.config import load
    from watcher.queue import Queue
    path = write_config(tmp_path)
    cfg = load(path)
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    q = Queue(cfg.queue_path)
    ok = q.enqueue("plain/IMG_1.jpg", 10, 1, "aa" * 32)
    bad = q.enqueue(HOSTILE_REL, 10, 1, "bb" * 32)
    assert ok and bad
    failed_path = os.fsdecode(os.fsencode(cfg.folders.failed) + b"/" + raw(HOSTILE_REL))
    q.db.execute("UPDATE jobs SET state = 'running' WHERE id = ?", (bad.id,))
    q.fail(bad.id, "undecodable", f"cannot decode {HOSTILE_REL}\nsecond line", outputs=[{"path": failed_path}])
    yield path, cfg, q, ok, bad, failed_path
    q.close()


def test_list_json_is_valid_json_with_exact_bytes(hostile_queue):
    path, cfg, q, ok, bad, failed_path = hostile_queue
    rows = {r["id"]: r for r in json.loads(_utf8_stdout(_cli_bytes(path, "list", "--json")))}
    assert rows[ok.id]["path"] == "plain/IMG_1.jpg" and "path_b64" not in rows[ok.id]
    row = rows[bad.id]
    assert list(row)[:3] == ["id", "path", "path_b64"]
    assert row["path"] == display(HOSTILE_REL)
    assert base64.urlsafe_b64decode(row["path_b64"]) == raw(HOSTILE_REL)
    assert base64.urlsafe_b64decode(row["outputs"][0]["path_b64"]) == raw(failed_path)
    assert row["state"] == "failed" and "interruptions" in row


def test_list_human_rows_are_one_line_each(hostile_queue):
    path, cfg, q, ok, bad, failed_path = hostile_queue
    out = _utf8_stdout(_cli_bytes(path, "list"))
    lines = out.splitlines()
    assert len(lines) == 2 and "\x1b" not in out
    line = next(l for l in lines if l.lstrip().startswith(str(bad.id)))
    assert display(HOSTILE_REL) in line and "second line" in line


def test_status_shows_the_current_name_escaped(hostile_queue):
    from watcher.daemon import StateLock
    path, cfg, q, ok, bad, failed_path = hostile_queue
    lock = StateLock(cfg.state_dir)
    lock.acquire()                                         # "a daemon is running"
    try:
        q.set_daemon(os.getpid(), "waiting", f"outbox missing: {HOSTILE_REL}",
                     {"path": HOSTILE_REL, "stage": "restore"})
        out = _utf8_stdout(_cli_bytes(path, "status"))
        assert out.count("\n") == 3 and "\x1b" not in out
        assert f"now:     {display(HOSTILE_REL)} (restore)" in out
        doc = json.loads(_utf8_stdout(_cli_bytes(path, "status", "--json")))
        assert doc["current"]["path"] == display(HOSTILE_REL)
        assert base64.urlsafe_b64decode(doc["current"]["path_b64"]) == raw(HOSTILE_REL)
        assert doc["daemon"]["reason"].startswith("outbox missing: sub/evil")   # free text, JSON-escaped
        assert "photoenhanced: running" in out and "outbox missing: sub/evil\\nWATCHDOG=1\\x1b" in out
    finally:
        lock.release()
