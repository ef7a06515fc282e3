"""File names as data: the one place that turns a name into something safe to show, store or send.

A Linux file name is any byte string without ``/`` and NUL, up to ``NAME_MAX`` (255) bytes. Python
hands it to us as ``os.fsdecode`` gives it: valid UTF-8 decoded, every byte that is not part of a
valid sequence as a lone surrogate U+DC80..U+DCFF. Such a string may hold newlines, escape
sequences or surrogates that cannot be encoded; none of that may reach a log line, the systemd
STATUS line, a terminal or a JSON document raw.

- ``display(s)``: a printable, single-line, **injective** form (two different names never display
  the same; ``undisplay`` is its inverse). Escaped: the backslash itself (``\\\\``, always — see
  below), C0 controls and DEL (``\\n``, ``\\r``, ``\\t``, else ``\\xNN``), raw bytes that are not
  UTF-8 (``\\xNN`` with NN ≥ 80), C1 controls, other lone surrogates, the line/paragraph separators
  U+2028/U+2029 and the bidirectional controls (``\\uXXXX``). Everything else (any printable
  text, emoji with zero-width joiners, accents, spaces) is returned unchanged.
  Why the backslash is always escaped: if ordinary names kept a raw backslash, the ordinary name
  ``a\\nb`` (backslash, n) and the name ``a<newline>b`` would both display as ``a\\nb``. No choice
  of marker avoids that (every printable string is itself a possible file name), so a name with a
  backslash shows it doubled.
  ``\\xNN`` is unambiguous: NN < 80 are the ASCII controls (a raw byte below 0x80 is always
  valid UTF-8), NN ≥ 80 are raw undecodable bytes; C1 controls are written ``\\u0080``…``\\u009f``.
- ``safe(s)``: ``s`` itself when nothing in it needs escaping (a backslash alone does not), else
  ``display(s)``. For free text that may carry a name (log values, STATUS=, messages): always one
  printable line, idempotent, a no-op on display() output — but not injective.
- ``raw(s)`` the real bytes (``os.fsencode``); ``b64(s)`` those bytes as URL-safe base64 (padded).
- ``fields(s, key)`` for JSON documents (sidecars, ``list --json``, hooks): ``{key: display(s)}``
  plus ``{key + "_b64": b64(s)}`` when the display form differs from the name, so a consumer can
  always get the exact bytes back.
- ``encodable(v)`` a JSON-able value whose strings all encode as UTF-8 (strings with lone
  surrogates replaced by their display form), for documents that may hold a raw name somewhere.
- ``fit(name, reserve)`` shortens a name deterministically so that it and ``reserve`` more bytes
  of derived suffix fit in ``NAME_MAX``.
"""
from __future__ import annotations

import base64
import hashlib
import os
import re

NAME_MAX = 255

# Suffixes publish derives from a result/original name: " (N)" before the extension when the name
# is taken (publish.free_name), then ".json" (sidecar) or ".xmp" (companion) after the whole name.
# Two correct ways for publish: fit(name, PUBLISH_RESERVE) once (covers counters up to 99999 and
# the longest companion suffix), or — what publish._free_at does — fit every numbered candidate
# "stem (n).ext" with reserve = its longest companion suffix (SUFFIX_RESERVE for .json/.xmp). Every
# name placed in outbox/, failed/ or archive/ that gets a NAME + ".json" sidecar needs one of them.
COUNTER_RESERVE = len(" (99999)")                        # 8
SUFFIX_RESERVE = max(len(".json"), len(".xmp"))          # 5
PUBLISH_RESERVE = COUNTER_RESERVE + SUFFIX_RESERVE       # 13
EXT_MAX = 16            # an extension longer than this (bytes, with the dot) is not kept by fit()
HASH_LEN = 8            # hex digits of sha256 appended by fit(): "~" + 8 hex = 9 bytes

_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}
_BIDI = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
# One class with every character display() rewrites; the fast path is "no match".
_NEEDS = re.compile("[\\\\\x00-\x1f\x7f-\x9f\u2028\u2029" + _BIDI + "\ud800-\udfff]")
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029" + _BIDI + "\ud800-\udfff]")


def _escape(m: re.Match) -> str:
    ch = m.group()
    short = _SHORT.get(ch)
    if short is not None:
        return short
    cp = ord(ch)
    if cp < 0x80:
        return f"\\x{cp:02x}"
    if 0xDC80 <= cp <= 0xDCFF:                 # os.fsdecode's escape of one raw byte 0x80..0xFF
        return f"\\x{cp - 0xDC00:02x}"
    return f"\\u{cp:04x}"


def display(s: str) -> str:
    """A printable, single-line, injective form of a name or relative path (see the module doc)."""
    return _NEEDS.sub(_escape, s)


def needs_escape(s: str) -> bool:
    """True when `s` holds a character that must never reach a log line, terminal or notify socket
    raw (a control character, a lone surrogate, a line/paragraph separator, a bidi control)."""
    return _UNSAFE.search(s) is not None


def safe(s: str) -> str:
    """`s` unchanged when nothing in it needs escaping (a backslash alone does not), else display(s).
    For free text that may carry a name (log values, STATUS=, error messages): always one printable
    line of encodable text, idempotent (``safe(safe(s)) == safe(s)``, and ``safe(display(s)) ==
    display(s)``), but not injective — use display() where a name must be told apart exactly."""
    return display(s) if _UNSAFE.search(s) else s


_UNESCAPE = re.compile(r"\\(?:x([0-9a-f]{2})|u([0-9a-f]{4})|(.))", re.S)


def undisplay(d: str) -> str:
    """The inverse of display(): ``undisplay(display(s)) == s`` for every str."""
    def one(m: re.Match) -> str:
        if m.group(1):
            b = int(m.group(1), 16)
            return chr(b) if b < 0x80 else chr(0xDC00 + b)
        if m.group(2):
            return chr(int(m.group(2), 16))
        c = m.group(3)
        mapped = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\"}.get(c)
        if mapped is None:
            raise ValueError(f"not a display() form: bad escape \\{c!r}")
        return mapped
    return _UNESCAPE.sub(one, d)


def raw(s: str) -> bytes:
    """The real bytes of a name as os.fsdecode gave it (raises UnicodeEncodeError for a str that no
    file name decodes to, e.g. a lone surrogate outside U+DC80..U+DCFF)."""
    return os.fsencode(s)


def b64(s: str) -> str:
    """The real bytes as URL-safe base64 with padding (``base64.urlsafe_b64decode`` reverses it)."""
    return base64.urlsafe_b64encode(raw(s)).decode("ascii")


def fields(s: str, key: str = "path") -> dict[str, str]:
    """``{key: display(s)}``, plus ``{key_b64: b64(s)}`` when display(s) != s. Never raises: a str
    that has no bytes (not from the filesystem) gets no ``_b64`` key."""
    d = display(s)
    out = {key: d}
    if d != s:
        try:
            out[key + "_b64"] = b64(s)
        except UnicodeEncodeError:
            pass
    return out


_SURROGATE = re.compile("[\ud800-\udfff]")


def encodable(v):
    """`v` (a JSON-able value) with every str that cannot be encoded as UTF-8 (a name holding
    undecodable bytes, as lone surrogates) replaced by its display() form; dict keys too, tuples
    become lists. Other strings are kept as they are (json.dumps escapes control characters)."""
    if isinstance(v, str):
        return display(v) if _SURROGATE.search(v) else v
    if isinstance(v, dict):
        return {encodable(k): encodable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [encodable(x) for x in v]
    return v


def _split_ext(name: str) -> tuple[str, str]:
    """(stem, ".ext") the way publish.free_name splits: at the last dot; a leading dot only
    (".hidden") is not an extension."""
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        return name, ""
    return stem, "." + ext


def fit(name: str, reserve: int = 0) -> str:
    """`name` unchanged when ``len(raw(name)) + reserve <= NAME_MAX``; else ``STEM~HASH.EXT`` with the
    stem cut on a character boundary, HASH the first 8 hex digits of sha256 of the original name's
    bytes, and the extension kept when it is at most EXT_MAX bytes. Deterministic; the result
    round-trips (``os.fsdecode(os.fsencode(r)) == r``). ValueError when `reserve` leaves no room."""
    data = raw(name)
    if len(data) + reserve <= NAME_MAX:
        return name
    tag = "~" + hashlib.sha256(data).hexdigest()[:HASH_LEN]
    stem, ext = _split_ext(name)
    if len(raw(ext)) > EXT_MAX:
        stem, ext = name, ""
    budget = NAME_MAX - reserve - len(tag) - len(raw(ext))
    if budget < 1 and ext:
        stem, ext = name, ""
        budget = NAME_MAX - reserve - len(tag)
    if budget < 1:
        raise ValueError(f"reserve {reserve} leaves no room for a name within NAME_MAX ({NAME_MAX})")
    used, cut = 0, 0
    for ch in stem:                 # one str character: a whole UTF-8 sequence or one escaped byte
        n = len(raw(ch))
        if used + n > budget:
            break
        used += n
        cut += 1
    return stem[:cut] + tag + ext
