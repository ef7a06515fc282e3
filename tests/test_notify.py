"""watcher/notify.py over a real AF_UNIX datagram socket: a name can never inject a field."""
from __future__ import annotations

import os
import socket

import pytest

from watcher.notify import STATUS_MAX, Notifier, clean_field


@pytest.fixture
def sock(tmp_path):
    path = tmp_path / "notify.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(2)
    n = Notifier({"NOTIFY_SOCKET": str(path)})
    yield n, s
    n.close()
    s.close()


def _fields(s: socket.socket) -> list[str]:
    data = s.recv(65536)
    return data.decode("utf-8").split("\n")                      # strict: always valid UTF-8


def test_a_status_with_newlines_arrives_as_one_field(sock):
    n, s = sock
    n.status("3/17 evil\nWATCHDOG=trigger\nREADY=1.jpg faces=2")
    fields = _fields(s)
    assert fields == ["STATUS=3/17 evil\\nWATCHDOG=trigger\\nREADY=1.jpg faces=2"]


def test_ready_with_a_hostile_status_keeps_ready_the_only_extra_field(sock):
    n, s = sock
    name = os.fsdecode(b"bad\r\n\x00STOPPING=1\xe9\x1b[2J")
    n.ready(f"idle · {name}")
    fields = _fields(s)
    assert fields[0] == "READY=1" and len(fields) == 2
    assert fields[1].startswith("STATUS=idle · bad\\r\\n\\x00STOPPING=1\\xe9\\x1b[2J")
    assert all(c.isprintable() for c in fields[1])


def test_a_long_status_is_capped_on_a_character_boundary(sock):
    n, s = sock
    n.status("é" * 5000)
    (field,) = _fields(s)
    value = field[len("STATUS="):]
    assert len(value.encode("utf-8")) <= STATUS_MAX and value.endswith("…")
    assert set(value[:-1]) == {"é"}


def test_every_field_is_cleaned_not_only_status(sock):
    n, s = sock
    n.send("READY=1", "ERRNO=5\nWATCHDOG=trigger")
    assert _fields(s) == ["READY=1", "ERRNO=5\\nWATCHDOG=trigger"]


def test_clean_field_leaves_ordinary_fields_alone():
    assert clean_field("STATUS=3/17 IMG_001.heic faces=2") == "STATUS=3/17 IMG_001.heic faces=2"
    assert clean_field("WATCHDOG=1") == "WATCHDOG=1"
    assert clean_field("STATUS=C:\\photos") == "STATUS=C:\\photos"
