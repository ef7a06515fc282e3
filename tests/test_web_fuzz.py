"""Fuzz the JSON API from its own OpenAPI document with schemathesis (its CLI, as a subprocess:
its pytest plugin does not load under pytest 9) against the real web process on a queue with
done, failed and pending jobs: no 500, every response matches the document, bad parameters are
refused with 4xx. A short, seeded run in the default suite; the report goes to the artefacts."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from _web import ARTIFACTS, WebProc
from conftest import make_jpeg, write_config
from watcher.queue import Finished, Queue


@pytest.fixture(scope="module")
def fuzz_web(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    cfg = write_config(tmp)
    (tmp / "state").mkdir()
    make_jpeg(tmp / "outbox" / "a.jpg", size=(32, 24), seed=1)
    make_jpeg(tmp / "archive" / "a.jpg", size=(16, 12), seed=2)
    make_jpeg(tmp / "failed" / "b.jpg", size=(16, 12), seed=3)
    q = Queue(tmp / "state" / "queue.sqlite3")
    q.insert_finished([
        Finished(id=1, rel_path="a.jpg", state="done", size=(tmp / "archive" / "a.jpg").stat().st_size, mtime_ns=1,
                 sha256="0" * 64, outputs=[{"path": str(tmp / "outbox" / "a.jpg"), "width": 32, "height": 24}]),
        Finished(id=2, rel_path="b.jpg", state="failed", size=1, mtime_ns=1, sha256="1" * 64,
                 outputs=[{"path": str(tmp / "failed" / "b.jpg")}], error_kind="undecodable", last_error="bad"),
    ], now=1.0)
    q.enqueue("c\udce9.jpg", 1, 1, "2" * 64)
    q.close()
    w = WebProc(cfg)
    yield tmp, w
    w.stop()


def test_api_matches_its_openapi_document(fuzz_web):
    tmp, w = fuzz_web
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    junit = ARTIFACTS / "schemathesis-junit.xml"
    exe = Path(sys.executable).with_name("schemathesis")
    cmd = [str(exe), "run", f"{w.url}/api/openapi.json", "--url", w.url,
           "-H", f"Authorization: Bearer {w.token}", "-H", "X-CSRF-Token: 1",
           "--checks", "all", "--max-examples", "25", "--seed", "1", "--workers", "1",
           "--phases", "examples,coverage,fuzzing", "--request-timeout", "20",
           "--exclude-path", "/healthz",           # 503 without a daemon is its purpose (tested in test_web)
           "--report", "junit", "--report-junit-path", str(junit), "--no-color"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "SCHEMATHESIS_HOOKS": "", "NO_COLOR": "1"}, cwd=tmp)
    (ARTIFACTS / "schemathesis.txt").write_text(r.stdout + r.stderr)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    assert "Tested: 9" in r.stdout and "No issues found" in r.stdout
    assert "error" not in w.err.read_text().lower()                 # no 500 logged by the web process
