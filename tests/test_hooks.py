"""Completion hooks with real subprocesses and a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from structlog.testing import capture_logs

from watcher.hooks import Hooks

SIDECAR = {"status": "done", "input": {"path": "a/IMG_1.jpg", "sha256": "ab" * 32}, "faces": 2,
           "outputs": [{"path": "a/IMG_1.jpg"}], "name": "Grüße"}
PATHS = {"sidecar": "/out/a/IMG_1.jpg.json", "input": "/in/a/IMG_1.jpg", "output": "/out/a/IMG_1.jpg"}
HOOK = {"event": "done", **PATHS}           # ordinary names: the exact paths, no *_b64 keys

RECORD = """
import json, os, sys
body = sys.stdin.buffer.read()
with open(sys.argv[1], "a") as fh:
    fh.write(json.dumps({"body": json.loads(body), "env": {k: v for k, v in os.environ.items()
                                                          if k.startswith("PHOTOENHANCED_")}}) + "\\n")
sys.exit(int(sys.argv[2]) if len(sys.argv) > 2 else 0)
"""


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_command_hook_gets_sidecar_on_stdin_and_paths_in_env(tmp_path):
    out = tmp_path / "calls.jsonl"
    hooks = Hooks([sys.executable, "-c", RECORD, str(out)], None, timeout=10, retries=2)
    with capture_logs() as logs:
        hooks.fire("done", SIDECAR, PATHS)
        hooks.fire("failed", SIDECAR, PATHS)  # no on_failed hook: nothing happens
        assert hooks.close(timeout=10) is True
    calls = records(out)
    assert len(calls) == 1
    assert calls[0]["body"] == {**SIDECAR, "hook": HOOK}
    assert calls[0]["env"] == {"PHOTOENHANCED_EVENT": "done", "PHOTOENHANCED_SIDECAR": PATHS["sidecar"],
                               "PHOTOENHANCED_INPUT": PATHS["input"], "PHOTOENHANCED_OUTPUT": PATHS["output"]}
    assert hooks.counts == {"sent": 1, "failed": 0, "dropped": 0}
    assert [e["event"] for e in logs if e["event"].startswith("hook.")] == ["hook.sent"]


def test_failing_command_is_retried_then_counted_and_logged(tmp_path):
    out = tmp_path / "calls.jsonl"
    hooks = Hooks(None, [sys.executable, "-c", RECORD, str(out), "3"], timeout=10, retries=2, backoff=0.05)
    with capture_logs() as logs:
        hooks.fire("failed", {**SIDECAR, "status": "failed"}, PATHS)
        hooks.close(timeout=10)
    assert len(records(out)) == 3  # 1 + 2 retries
    assert hooks.counts == {"sent": 0, "failed": 1, "dropped": 0}
    failed = [e for e in logs if e["event"] == "hook.failed"]
    assert len(failed) == 1 and failed[0]["attempts"] == 3 and "exit status 3" in failed[0]["error"]
    assert failed[0]["log_level"] == "warning"


def test_slow_command_never_blocks_the_caller_and_times_out(tmp_path):
    hooks = Hooks([sys.executable, "-c", "import time; time.sleep(30)"], None, timeout=0.3, retries=0)
    t0 = time.perf_counter()
    hooks.fire("done", SIDECAR, PATHS)
    assert time.perf_counter() - t0 < 0.1
    with capture_logs() as logs:
        hooks.close(timeout=10)
    assert time.perf_counter() - t0 < 5
    assert hooks.counts["failed"] == 1
    assert "timed out" in next(e for e in logs if e["event"] == "hook.failed")["error"]


def test_missing_command_fails_once_without_retries(tmp_path):
    hooks = Hooks([str(tmp_path / "no-such-command")], None, retries=5, backoff=0.01)
    with capture_logs() as logs:
        hooks.fire("done", SIDECAR, PATHS)
        hooks.close(timeout=5)
    failed = [e for e in logs if e["event"] == "hook.failed"]
    assert hooks.counts["failed"] == 1 and failed[0]["attempts"] == 1
    assert "not found" in failed[0]["error"]


def test_full_queue_drops_the_oldest_with_a_warning(tmp_path):
    out = tmp_path / "calls.jsonl"
    gate = tmp_path / "gate"
    slow = RECORD.replace("body = sys.stdin", "import time\nwhile not os.path.exists(%r): time.sleep(0.02)\nbody = sys.stdin" % str(gate))
    hooks = Hooks([sys.executable, "-c", slow, str(out)], None, queue_size=2, timeout=20)
    with capture_logs() as logs:
        for i in range(6):
            hooks.fire("done", {"n": i}, PATHS)
            time.sleep(0.05)  # the first one is being delivered (held by the gate)
        gate.touch()
        hooks.close(timeout=20)
    delivered = [c["body"]["n"] for c in records(out)]
    assert delivered[0] == 0 and delivered[-2:] == [4, 5]  # the newest kept, the oldest waiting dropped
    c = hooks.counts
    assert c["sent"] == len(delivered) and c["dropped"] == 6 - len(delivered) and c["dropped"] >= 3
    assert len([e for e in logs if e["event"] == "hook.dropped"]) == c["dropped"]


def test_fire_never_raises(tmp_path):
    hooks = Hooks([sys.executable, "-c", "pass"], None)
    loop: dict = {}
    loop["self"] = loop  # not serialisable
    hooks.fire("done", loop, PATHS)
    hooks.fire("weird-event", SIDECAR, PATHS)
    hooks.close(timeout=5)
    assert hooks.counts == {"sent": 0, "failed": 1, "dropped": 0}
    hooks.fire("done", SIDECAR, PATHS)  # after close: counted, not delivered, not raised
    assert hooks.counts["dropped"] == 1


def test_bad_targets_are_refused_at_construction():
    with pytest.raises(ValueError, match="hooks.on_done"):
        Hooks("ftp://example.org/x", None)
    with pytest.raises(ValueError, match="hooks.on_failed"):
        Hooks(None, [])
    assert Hooks(None, None).enabled is False


# ------------------------------------------------------------------ HTTP

class Server:
    def __init__(self, statuses):
        self.statuses = list(statuses)
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append({"path": self.path, "body": json.loads(body),
                                       "type": self.headers["Content-Type"],
                                       "event": self.headers["X-Photoenhanced-Event"]})
                status = outer.statuses.pop(0) if outer.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_url_hook_posts_json():
    with Server([200]) as srv:
        hooks = Hooks(srv.url + "/done?token=secret", None, timeout=5)
        with capture_logs() as logs:
            hooks.fire("done", SIDECAR, PATHS)
            hooks.close(timeout=10)
    assert srv.requests == [{"path": "/done?token=secret", "body": {**SIDECAR, "hook": HOOK}, "type": "application/json",
                             "event": "done"}]
    assert hooks.counts == {"sent": 1, "failed": 0, "dropped": 0}
    sent = next(e for e in logs if e["event"] == "hook.sent")
    assert "secret" not in sent["target"]


def test_url_hook_retries_server_errors_with_backoff():
    with Server([500, 503, 200]) as srv:
        hooks = Hooks(None, srv.url + "/failed", timeout=5, retries=2, backoff=0.1)
        t0 = time.perf_counter()
        hooks.fire("failed", SIDECAR, PATHS)
        hooks.close(timeout=10)
        took = time.perf_counter() - t0
    assert len(srv.requests) == 3 and hooks.counts["sent"] == 1
    assert took >= 0.3  # 0.1 s + 0.2 s of backoff


def test_url_hook_gives_up_on_client_errors_and_dead_servers():
    with Server([404]) as srv:
        hooks = Hooks(srv.url, None, retries=3, backoff=0.01)
        hooks.fire("done", SIDECAR, PATHS)
        hooks.close(timeout=10)
    assert len(srv.requests) == 1 and hooks.counts["failed"] == 1  # 4xx: not retried
    dead = Hooks(srv.url, None, retries=1, backoff=0.01, timeout=1)  # the server is gone now
    with capture_logs() as logs:
        dead.fire("done", SIDECAR, PATHS)
        dead.close(timeout=10)
    assert dead.counts["failed"] == 1
    assert next(e for e in logs if e["event"] == "hook.failed")["attempts"] == 2


# ------------------------------------------------------------------ redirects, hostile names, robustness

class RedirectServer(Server):
    """Answers every request (any method) with `status` and a Location pointing at `target`
    (target None: answers 200 — a recorder that a followed redirect would reach)."""

    def __init__(self, status, target=None):
        super().__init__([])
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.requests.append({"path": self.path, "method": self.command})
                self.send_response(status)
                if target:
                    self.send_header("Location", target)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST

            def log_message(self, *args):
                pass

        self.httpd.RequestHandlerClass = Handler


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_url_hook_never_follows_a_redirect(status):
    with RedirectServer(200) as target, RedirectServer(status, target.url + "/stolen") as srv:
        hooks = Hooks(srv.url + "/hook", None, timeout=5, retries=1, backoff=0.01)
        with capture_logs() as logs:
            hooks.fire("done", SIDECAR, PATHS)
            hooks.close(timeout=10)
    assert target.requests == []                       # the redirect target is never contacted
    assert len(srv.requests) == 2                      # a 3xx is a failed attempt: retried
    assert hooks.counts == {"sent": 0, "failed": 1, "dropped": 0}
    failed = next(e for e in logs if e["event"] == "hook.failed")
    assert f"HTTP {status}" in failed["error"] and failed["attempts"] == 2


HOSTILE = b"bad\nname\x1b[31m\xe9\\x.jpg"   # newline, an escape sequence, invalid UTF-8, a backslash

READ_BY_B64 = """
import base64, json, os, sys
doc = json.loads(sys.stdin.buffer.read().decode("utf-8"))
real = base64.urlsafe_b64decode(doc["hook"]["input_b64"])
with open(real, "rb") as fh:
    content = fh.read().decode()
with open(sys.argv[1], "w") as out:
    json.dump({"hook": doc["hook"], "content": content, "argv": sys.argv[1:], "name": doc["name"],
               "env": {k: v for k, v in os.environ.items() if k.startswith("PHOTOENHANCED_")}}, out)
"""


def test_command_hook_gets_hostile_names_only_as_data(tmp_path):
    from watcher import names
    photo = os.fsencode(tmp_path) + b"/" + HOSTILE
    with open(photo, "wb") as fh:
        fh.write(b"the photo")
    name_in = os.fsdecode(photo)                     # what the daemon holds: surrogate-escaped str
    out_path = os.fsdecode(os.fsencode(tmp_path) + b"/out/" + HOSTILE)
    out = tmp_path / "call.json"
    hooks = Hooks([sys.executable, "-c", READ_BY_B64, str(out)], None, timeout=10, retries=0)
    sidecar = {**SIDECAR, "name": os.fsdecode(HOSTILE)}   # even a raw name in the sidecar is survivable
    hooks.fire("done", sidecar, {"input": name_in, "output": out_path, "sidecar": out_path + ".json"})
    assert hooks.close(timeout=10) is True
    assert hooks.counts == {"sent": 1, "failed": 0, "dropped": 0}
    got = json.loads(out.read_text())
    assert got["content"] == "the photo"             # the exact bytes reached the command
    assert got["argv"] == [str(out)]                 # no name on the command line
    assert got["hook"]["input"] == names.display(name_in) and "\n" not in got["hook"]["input"]
    assert base64.urlsafe_b64decode(got["hook"]["output_b64"]) == os.fsencode(out_path)
    assert got["name"] == names.display(os.fsdecode(HOSTILE))
    env = got["env"]
    assert env["PHOTOENHANCED_INPUT"] == names.display(name_in)
    assert env["PHOTOENHANCED_SIDECAR"] == names.display(out_path + ".json")
    for v in env.values():
        assert v.isprintable() and "\x1b" not in v


def test_a_crash_in_delivery_never_escapes_the_hook_thread(tmp_path, monkeypatch):
    crashes = []
    monkeypatch.setattr(threading, "excepthook", crashes.append)
    out = tmp_path / "calls.jsonl"
    # An argv with a NUL byte makes Popen raise ValueError: a bug-shaped failure inside delivery.
    hooks = Hooks([sys.executable, "-c", "pass\0"], [sys.executable, "-c", RECORD, str(out)], retries=0)
    with capture_logs() as logs:
        hooks.fire("done", SIDECAR, PATHS)
        hooks.fire("failed", SIDECAR, PATHS)
        assert hooks.close(timeout=10) is True
    assert hooks.counts == {"sent": 1, "failed": 1, "dropped": 0}
    assert len(records(out)) == 1                    # the thread lived on to deliver the next notice
    assert crashes == []
    assert any(e["event"] == "hook.failed" and "ValueError" in e["error"] for e in logs)


def test_a_timed_out_command_is_killed_with_its_children(tmp_path):
    # The command starts a child that keeps stderr open; it goes with the command's process group.
    pidfile = tmp_path / "child.pid"
    hooks = Hooks(["sh", "-c", f"sleep 60 & echo $! > {pidfile}; sleep 60"], None, timeout=0.5, retries=0)
    hooks.fire("done", SIDECAR, PATHS)
    assert hooks.close(timeout=20) is True
    assert hooks.counts == {"sent": 0, "failed": 1, "dropped": 0}
    pid = int(pidfile.read_text())

    def alive():
        try:
            with open(f"/proc/{pid}/status") as fh:
                return "\tZ" not in next(line for line in fh if line.startswith("State:"))
        except FileNotFoundError:
            return False
    for _ in range(200):
        if not alive():
            break
        time.sleep(0.02)
    assert not alive()


def test_fire_returns_while_a_delivery_hangs_and_the_queue_stays_bounded(tmp_path):
    gate = tmp_path / "gate"
    wait = f"import os, time\nwhile not os.path.exists({str(gate)!r}): time.sleep(0.02)"
    hooks = Hooks([sys.executable, "-c", wait], None, queue_size=3, timeout=30, retries=0)
    with capture_logs():
        for i in range(50):                              # would deadlock here if fire() waited
            hooks.fire("done", {"n": i}, PATHS)
        gate.touch()
        hooks.close(timeout=20)
    c = hooks.counts
    assert c["sent"] + c["failed"] + c["dropped"] == 50 and c["dropped"] >= 46
