"""Completion hooks (a real command, a real 127.0.0.1 HTTP server) and the metrics textfile, through
the real daemon."""
from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

from conftest import cli, make_jpeg, wait_for, write_config


def test_command_and_http_hooks_get_the_sidecar(tmp_path, daemon_factory):
    got: list[dict] = []

    class H(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            got.append(json.loads(body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = HTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    record = tmp_path / "hook-calls.jsonl"
    script = ("import json,os,sys; d=json.load(sys.stdin); "
              f"open({str(record)!r},'a').write(json.dumps({{'event': os.environ['PHOTOENHANCED_EVENT'], "
              "'output': os.environ['PHOTOENHANCED_OUTPUT'], 'status': d['status']})+'\\n')")
    try:
        cfg = write_config(tmp_path, hooks={"on_done": [sys.executable, "-c", script],
                                            "on_failed": f"http://127.0.0.1:{srv.server_port}/failed",
                                            "timeout": 5, "retries": 1})
        d = daemon_factory(cfg)
        d.wait_event("daemon.ready")
        make_jpeg(tmp_path / "inbox" / "ok.jpg")
        (tmp_path / "inbox" / "bad.jpg").write_bytes(b"nope")
        wait_for(lambda: record.exists() and record.read_text().strip(), 30, what="command hook ran")
        wait_for(lambda: got, 30, what="http hook posted")
        call = json.loads(record.read_text().splitlines()[0])
        assert call == {"event": "done", "output": str(tmp_path / "outbox" / "ok.jpg"), "status": "done"}
        assert got[0]["status"] == "failed" and got[0]["error"]["kind"] == "undecodable"
        wait_for(lambda: (json.loads(cli(cfg, "status", "--json").stdout)["metrics"] or {}).get("hooks", {}).get("sent") == 2,
                 20, what="hook counts in status")
        assert d.stop() == 0
    finally:
        srv.shutdown()


def test_failing_hook_never_blocks_the_queue(tmp_path, daemon_factory):
    cfg = write_config(tmp_path, hooks={"on_done": [sys.executable, "-c", "import sys; sys.exit(3)"],
                                        "timeout": 5, "retries": 0})
    d = daemon_factory(cfg)
    d.wait_event("daemon.ready")
    for i in range(3):
        make_jpeg(tmp_path / "inbox" / f"{i}.jpg", seed=i)
    wait_for(lambda: len(list((tmp_path / "outbox").glob("*.json"))) == 3, 30, what="all done")
    d.wait_event("hook.failed", 20)
    assert d.stop() == 0


def test_metrics_textfile_and_status_json(tmp_path, daemon_factory):
    cfg = write_config(tmp_path)
    d = daemon_factory(cfg)
    d.wait_event("daemon.ready")
    make_jpeg(tmp_path / "inbox" / "m.jpg")
    (tmp_path / "inbox" / "bad.png").write_bytes(b"nope")
    wait_for((tmp_path / "outbox" / "m.jpg.json").exists, 20, what="done")
    wait_for((tmp_path / "failed" / "bad.png.json").exists, 20, what="failed")
    prom = tmp_path / "state" / "photoenhanced.prom"

    def parsed():
        if not prom.exists():
            return None
        vals = {}
        for line in prom.read_text().splitlines():
            if line and not line.startswith("#"):
                k, v = line.rsplit(" ", 1)
                vals[k] = float(v)
        return vals if vals.get('photoenhanced_jobs{state="done"}') == 1 else None

    vals = wait_for(parsed, 20, what="metrics textfile")
    assert vals['photoenhanced_jobs{state="failed"}'] == 1
    assert any(k.startswith("photoenhanced_stage_duration_ms") or "stage" in k for k in vals)
    st = json.loads(cli(cfg, "status", "--json").stdout)
    assert st["metrics"]["outcomes"]["done"] == 1 and st["metrics"]["outcomes"]["failed"] == 1
    assert d.stop() == 0
    d2 = daemon_factory(cfg)                   # totals survive a restart
    d2.wait_event("daemon.ready")
    wait_for(lambda: json.loads(cli(cfg, "status", "--json").stdout)["daemon"]["running"], 10, what="running")
    st = json.loads(cli(cfg, "status", "--json").stdout)
    assert st["metrics"]["outcomes"]["done"] == 1
    assert d2.stop() == 0
