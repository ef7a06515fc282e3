"""watcher/logs.py through logs.configure on a real file stream: one event is exactly one line of
valid UTF-8, whatever a file name holds."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import structlog

from watcher import logs, names

HOSTILE = os.fsdecode(b"a/evil\nname\r\x1b[31m\xe9\x00\xc2\x85\xe2\x80\xa8.jpg")


@pytest.fixture
def stream(tmp_path):
    path = tmp_path / "log.txt"
    fh = open(path, "w", encoding="utf-8", errors="strict")   # strict: a lone surrogate would raise
    yield fh, path
    fh.close()
    structlog.reset_defaults()


def _emit(fmt, fh):
    assert logs.configure(fmt, "info", stream=fh) == fmt
    log = structlog.get_logger("test")
    log.info("job.done", path=HOSTILE, outputs=[HOSTILE, {"path": HOSTILE}], file=Path(HOSTILE),
             raw=os.fsencode(HOSTILE), **{"key\nX": 1})
    try:
        raise ValueError(f"cannot read {HOSTILE}")
    except ValueError:
        log.exception("job.crashed", path=HOSTILE)
    log.warning(f"event {HOSTILE}")
    fh.flush()


def test_json_lines_are_one_line_each_and_valid_utf8(stream):
    fh, path = stream
    _emit("json", fh)
    lines = path.read_bytes().decode("utf-8").split("\n")
    assert lines[-1] == "" and len(lines) == 4                 # three events, three lines
    docs = [json.loads(line) for line in lines[:3]]
    shown = names.display(HOSTILE)
    assert docs[0]["path"] == shown and docs[0]["file"] == shown and docs[0]["raw"] == shown
    assert docs[0]["outputs"] == [shown, {"path": shown}]
    assert docs[0]["key\\nX"] == 1
    assert "ValueError" in docs[1]["exception"] and shown in docs[1]["exception"]
    assert docs[2]["event"] == f"event {shown}"
    for d in docs:
        for v in d.values():
            if isinstance(v, str):
                assert all(c.isprintable() or c == " " for c in v), v


def test_text_lines_are_one_line_each_even_with_a_traceback(stream):
    fh, path = stream
    _emit("text", fh)
    text = path.read_bytes().decode("utf-8")
    lines = text.split("\n")
    assert lines[-1] == "" and len(lines) == 4
    assert "job.done" in lines[0] and "job.crashed" in lines[1] and "Traceback" in lines[1]
    assert "\x1b" not in text and "\r" not in text and "\x00" not in text
    assert "evil\\nname" in lines[0]


def test_a_plain_name_is_logged_as_it_is(stream):
    fh, path = stream
    logs.configure("json", "info", stream=fh)
    structlog.get_logger().info("job.done", path="a/Grüße C:\\x.jpg")
    fh.flush()
    assert json.loads(path.read_text())["path"] == "a/Grüße C:\\x.jpg"


def test_say_writes_one_line_whatever_the_message_holds(capsys):
    logs.say(f"photoenhanced: {HOSTILE}: bad")
    err = capsys.readouterr().err
    assert err == f"photoenhanced: {names.display(HOSTILE)}: bad\n"
    logs.say("photoenhanced: C:\\x.jpg is fine")
    assert capsys.readouterr().err == "photoenhanced: C:\\x.jpg is fine\n"
