"""Downloads on the job page: `/jobs/{id}/files/result|sidecar|original`, served by job id only,
opened through safefs (no link followed), checked against the queue's record (size, sha256), the
original never from the inbox, names in Content-Disposition that cannot break the header, streamed
in chunks. Real daemon (fake enhancer), real files."""
from __future__ import annotations

import json
import os
import re
from urllib.parse import unquote

import pytest

from _web import WebProc
from conftest import DaemonProc, make_jpeg, wait_for, write_config
from watcher import names, web

# a newline, a double quote, a semicolon, a bidi override and two bytes that are not UTF-8
HOSTILE = os.fsdecode(b'a\n"b;\xe2\x80\xae c\xff\xfe.jpg')


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("webfiles")
    cfg = write_config(tmp)
    make_jpeg(tmp / "inbox" / "one.jpg", size=(64, 48), seed=1)
    make_jpeg(tmp / "inbox" / "victim.jpg", size=(40, 30), seed=2)
    make_jpeg(tmp / "inbox" / HOSTILE, size=(20, 20), seed=3)
    (tmp / "inbox" / "bad.jpg").write_bytes(b"this is not a jpeg" * 20)
    d = DaemonProc(cfg)
    w = WebProc(cfg)
    try:
        wait_for(lambda: w.get_json("/api/status")["counts"] == {"pending": 0, "running": 0, "done": 3, "failed": 1},
                 30, 0.1, what="4 photos handled")
        yield tmp, cfg, d, w
    finally:
        w.stop()
        d.kill()


def _job(w: WebProc, name: str) -> dict:
    return next(j for j in w.get_json("/api/jobs?limit=500") if j["path"] == names.display(name))


def _get(w: WebProc, job: int, kind: str) -> tuple[int, dict, bytes]:
    return w.request("GET", f"/jobs/{job}/files/{kind}")


def _attachment_name(h: dict) -> str:
    cd = h["content-disposition"]
    assert cd.isascii() and cd.isprintable() and "\n" not in cd and "\r" not in cd, cd
    m = re.fullmatch(r'attachment; filename="([ -~]*)"; filename\*=UTF-8\'\'([A-Za-z0-9%._~-]+)', cd)
    assert m, cd
    assert '"' not in m.group(1) and "\\" not in m.group(1)
    return unquote(m.group(2), "utf-8", "strict")


def test_result_sidecar_and_originals_download_by_job_id(env):
    tmp, cfg, d, w = env
    j = _job(w, "one.jpg")
    detail = w.get_json(f"/api/jobs/{j['id']}")
    assert detail["files"] == {"result": True, "sidecar": True, "original": True}
    for kind, path, ctype in (("result", tmp / "outbox" / "one.jpg", "application/octet-stream"),
                              ("sidecar", tmp / "outbox" / "one.jpg.json", "application/json"),
                              ("original", tmp / "archive" / "one.jpg", "application/octet-stream")):
        status, h, body = _get(w, j["id"], kind)
        assert status == 200, (kind, body[:200])
        assert body == path.read_bytes() and int(h["content-length"]) == len(body)
        assert h["content-type"] == ctype and h["x-content-type-options"] == "nosniff"
        assert _attachment_name(h) == path.name
        assert w.request("HEAD", f"/jobs/{j['id']}/files/{kind}")[0] == 200
    assert json.loads(_get(w, j["id"], "sidecar")[2])["job"] == j["id"]
    failed = _job(w, "bad.jpg")
    assert w.get_json(f"/api/jobs/{failed['id']}")["files"] == {"result": False, "sidecar": True, "original": True}
    status, h, body = _get(w, failed["id"], "original")
    assert status == 200 and body == (tmp / "failed" / "bad.jpg").read_bytes()
    status, _, body = _get(w, failed["id"], "sidecar")
    assert status == 200 and json.loads(body)["error"]["kind"] == "undecodable"
    assert _get(w, failed["id"], "result")[0] == 404


def test_a_hostile_name_gives_a_valid_header(env):
    tmp, cfg, d, w = env
    j = _job(w, HOSTILE)
    status, h, body = _get(w, j["id"], "result")
    assert status == 200 and body == (tmp / "outbox" / HOSTILE).read_bytes()
    assert _attachment_name(h) == names.display(HOSTILE)          # escaped, injective, one line
    status, h, _ = _get(w, j["id"], "sidecar")
    assert status == 200 and _attachment_name(h) == names.display(HOSTILE + ".json")


@pytest.mark.parametrize("path", [
    "/jobs/1/files/../../../etc/passwd", "/jobs/1/files/%2e%2e%2f%2e%2e%2fconfig.yaml", "/jobs/1/files/result/..",
    "/jobs/1/files/result/../../../../etc/passwd", "/jobs/1/files/outbox%2fone.jpg", "/jobs/1/files/input",
    "/jobs/1/files/", "/jobs/99999/files/result", "/jobs/1/files/Result", "/jobs/1/files/result%00",
    "/jobs/0/files/result", "/jobs/..%2f..%2fetc/files/result"])
def test_traversal_finds_nothing(env, path):
    tmp, cfg, d, w = env
    status, _, body = w.request("GET", path)
    assert status == 404, (path, status)
    assert b"root:" not in body and b"folders" not in body


def test_planted_symlink_or_swapped_file_is_not_served(env):
    tmp, cfg, d, w = env
    j = _job(w, "victim.jpg")
    result = tmp / "outbox" / "victim.jpg"
    real = result.read_bytes()
    assert _get(w, j["id"], "result")[2] == real
    secret = tmp / "secret.bin"
    secret.write_bytes(b"SECRET!" * (len(real) // 7 + 1))
    result.rename(tmp / "kept.jpg")
    try:
        result.symlink_to(secret)                                    # a link in place of the result
        status, _, body = _get(w, j["id"], "result")
        assert status == 404 and b"SECRET" not in body
        assert w.get_json(f"/api/jobs/{j['id']}")["files"]["result"] is False
        result.unlink()
        result.write_bytes(bytes(len(real)))                         # same size, other bytes
        status, _, body = _get(w, j["id"], "result")
        assert status == 404 and body != bytes(len(real))
        result.unlink()
        os.mkfifo(result)                                            # never blocks on a FIFO
        assert _get(w, j["id"], "result")[0] == 404
        result.unlink()
        (tmp / "archive" / "victim.jpg").rename(tmp / "kept-original.jpg")
        (tmp / "archive" / "victim.jpg").symlink_to(secret)
        status, _, body = _get(w, j["id"], "original")
        assert status == 404 and b"SECRET" not in body
    finally:
        for p in (result, tmp / "archive" / "victim.jpg"):
            if p.is_symlink() or p.exists():
                p.unlink()
        (tmp / "kept.jpg").rename(result)
        if (tmp / "kept-original.jpg").exists():
            (tmp / "kept-original.jpg").rename(tmp / "archive" / "victim.jpg")
    assert _get(w, j["id"], "result")[2] == real


def test_an_original_in_the_inbox_is_never_served(env):
    tmp, cfg, d, w = env
    j = _job(w, "bad.jpg")
    assert w.request("POST", "/api/pause", w.auth())[0] == 200
    try:
        wait_for(lambda: w.get_json("/api/status")["daemon"]["state"] == "paused", 10, 0.1, what="paused")
        assert w.request("POST", f"/api/jobs/{j['id']}/retry", w.auth())[0] == 200
        assert (tmp / "inbox" / "bad.jpg").exists() and _job(w, "bad.jpg")["state"] == "pending"
        for kind in web.FILE_KINDS:
            status, _, body = _get(w, j["id"], kind)
            assert status == 404 and b"not a jpeg" not in body, kind
        assert w.get_json(f"/api/jobs/{j['id']}")["files"] == dict.fromkeys(web.FILE_KINDS, False)
    finally:
        assert w.request("POST", "/api/resume", w.auth())[0] == 200
    wait_for(lambda: _job(w, "bad.jpg")["state"] == "failed", 20, 0.1, what="bad.jpg failed again")


def test_downloads_are_streamed_in_chunks(tmp_path):
    path = tmp_path / "big.bin"
    data = os.urandom(web.CHUNK * 3 + 17)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    body = web.FileBody(fd, len(data))
    with open(path, "ab") as grow:
        grow.write(b"appended after the headers were sent")
    chunks = list(body)
    assert [len(c) for c in chunks] == [web.CHUNK] * 3 + [17] and b"".join(chunks) == data
    assert body.fd == -1                       # closed at the end (exactly the length announced)
