"""`photoenhanced web` against the real daemon (fake enhancer) and real files: the JSON API has the
CLI's shapes, state changes need the token + CSRF header, paths in URLs find nothing, pause/resume
reach the daemon, /metrics parses with prometheus_client, /healthz follows the daemon."""
from __future__ import annotations

import base64
import io
import json
import os
import stat
import time

import numpy as np
import pytest
from PIL import Image

from _web import WebProc
from conftest import DaemonProc, cli, make_jpeg, wait_for, write_config
from watcher import web
from watcher.names import b64
from watcher.queue import SCHEMA_VERSION, Finished, Queue

HOSTILE = "x\u202e<i>\x07.jpg"          # a bidi override, markup and a control character


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("webenv")
    cfg = write_config(tmp)
    make_jpeg(tmp / "inbox" / "a" / "one.jpg", size=(64, 48), seed=1)
    make_jpeg(tmp / "inbox" / "two.jpg", size=(40, 30), seed=2)
    make_jpeg(tmp / "inbox" / HOSTILE, size=(20, 20), seed=3)
    (tmp / "inbox" / "bad.jpg").write_bytes(b"this is not a jpeg" * 20)
    d = DaemonProc(cfg, env={"FAKE_MARK_DELAY": "6"})     # a green-marked photo is held 6 s, 8 tiles
    w = WebProc(cfg)
    try:
        wait_for(lambda: w.get_json("/api/status")["counts"]["done"] == 3
                 and w.get_json("/api/status")["counts"]["failed"] == 1, 30, 0.1, what="4 photos handled")
        yield tmp, cfg, d, w
    finally:
        w.stop()
        d.kill()


def _job(w: WebProc, name: str) -> dict:
    return next(j for j in w.get_json("/api/jobs?limit=500") if j["path"].endswith(name))


def test_token_file_is_created_0600_and_kept(env, tmp_path):
    tmp, cfg, d, w = env
    tok = tmp / "state" / "web.token"
    assert stat.S_IMODE(tok.stat().st_mode) == 0o600
    assert tok.read_text().strip() == w.token and len(w.token) >= 32
    made = web.load_token(tmp_path / "st")
    assert web.load_token(tmp_path / "st") == made != w.token          # created once, then read
    os.chmod(tmp_path / "st" / "web.token", 0o644)
    assert web.load_token(tmp_path / "st") == made
    assert stat.S_IMODE((tmp_path / "st" / "web.token").stat().st_mode) == 0o600


def _api_and_cli_status(w: WebProc, cfg) -> tuple[dict, dict]:
    """/api/status and `status --json` read between two equal /api/status answers (the daemon
    rewrites its row every 2 s: a pair that straddles a rewrite is read again)."""
    for _ in range(30):
        before = w.get_json("/api/status")
        r = cli(cfg, "status", "--json")
        assert r.returncode == 0, r.stderr
        if w.get_json("/api/status") == before:
            return before, json.loads(r.stdout)
    raise AssertionError("the status row never held still for one `status --json`")


def test_status_api_has_the_shape_of_status_json(env):
    tmp, cfg, d, w = env
    api, doc = _api_and_cli_status(w, cfg)
    assert api == doc                                         # one document, hosts included
    assert set(api) >= {"daemon", "counts", "current", "metrics", "throughput", "hosts"}
    assert api["hosts"] == []                                 # SQLite: one host, no host table
    assert set(api["daemon"]) >= {"running", "pid", "state", "reason", "paused"}
    assert api["counts"] == doc["counts"] == {"pending": 0, "running": 0, "done": 3, "failed": 1}
    assert api["daemon"]["running"] is True and api["daemon"]["pid"] == d.proc.pid
    assert api["throughput"]["done_last_hour"] == 3


def test_jobs_api_pages_like_list_json(env):
    tmp, cfg, d, w = env
    r = cli(cfg, "list", "--json")
    listed = json.loads(r.stdout)
    assert w.get_json("/api/jobs") == listed
    assert w.get_json("/api/jobs?limit=2&offset=1") == listed[1:3]
    assert w.get_json("/api/jobs?state=failed") == [j for j in listed if j["state"] == "failed"]
    assert w.get_json("/api/jobs?order=desc&limit=1") == [listed[-1]]
    for bad in ("state=nope", "limit=0", "limit=501", "offset=-1", "limit=x", "order=up", "what=1"):
        status, _, body = w.request("GET", f"/api/jobs?{bad}")
        assert status == 400 and "error" in json.loads(body), bad


def test_a_hostile_name_is_escaped_with_its_exact_bytes_beside_it(env):
    tmp, cfg, d, w = env
    j = _job(w, "\\x07.jpg")
    assert j["path"] == "x\\u202e<i>\\x07.jpg"
    assert os.fsdecode(base64.urlsafe_b64decode(j["path_b64"])) == HOSTILE
    detail = w.get_json(f"/api/jobs/{j['id']}")
    assert detail["path"] == j["path"] and detail["images"] == {"before": True, "after": True}


def test_job_detail_has_the_sidecar_and_reencoded_images(env):
    tmp, cfg, d, w = env
    j = _job(w, "one.jpg")
    detail = w.get_json(f"/api/jobs/{j['id']}")
    assert detail["sidecar"]["status"] == "done" and detail["sidecar"]["job"] == j["id"]
    sizes = {}
    for which in ("before", "after"):
        for size in ("thumb", "preview", "crop"):
            status, h, body = w.request("GET", f"/api/jobs/{j['id']}/image?which={which}&size={size}&x=0.9&y=0.1")
            assert status == 200 and h["content-type"] == "image/jpeg" and body[:3] == b"\xff\xd8\xff"
            sizes[which, size] = Image.open(io.BytesIO(body)).size
    assert sizes["before", "preview"] == (64, 48) and sizes["after", "preview"] == (128, 96)
    assert sizes["before", "crop"] == sizes["after", "crop"] == (96, 96)      # same region, same size
    cache = tmp / "state" / web.CACHE_DIR
    assert len(list(cache.glob("*.jpg"))) == 6
    failed = _job(w, "bad.jpg")
    detail = w.get_json(f"/api/jobs/{failed['id']}")
    assert detail["sidecar"]["error"]["kind"] == "undecodable"
    assert detail["images"] == {"before": True, "after": False}
    status, _, body = w.request("GET", f"/api/jobs/{failed['id']}/image?which=before")
    assert status == 404                                         # not an image: no preview, no 500
    status, _, _ = w.request("GET", f"/api/jobs/{failed['id']}/image?which=after")
    assert status == 404


@pytest.mark.parametrize("path", [
    "/jobs/../../etc/passwd", "/static/../web.py", "/static/%2e%2e%2fweb.py", "/static/..%2f..%2fconfig.py",
    "/api/jobs/1/../../../etc/passwd", "/static/index.html", "/static/.hidden", "/jobs/1%2f..%2f..%2fetc%2fpasswd",
    "/api/jobs/99999", "/jobs/99999", "/api/jobs/99999999999999999999", "/etc/passwd", "//etc/passwd",
    "/api/jobs/1/image/../../../../etc/passwd", "/static/%00"])
def test_paths_in_urls_find_nothing(env, path):
    tmp, cfg, d, w = env
    status, h, body = w.request("GET", path)
    assert status == 404, (path, status)
    assert b"root:" not in body


def test_state_changes_need_the_token_and_a_csrf_header(env):
    tmp, cfg, d, w = env
    assert w.request("POST", "/api/pause")[0] == 401
    assert w.request("POST", "/api/pause", {"X-CSRF-Token": "1"})[0] == 401
    assert w.request("POST", "/api/pause", {"Authorization": f"Bearer {w.token}"})[0] == 403
    assert w.request("POST", "/api/pause", {"Authorization": "Bearer wrong", "X-CSRF-Token": "1"})[0] == 401
    assert w.request("GET", "/api/pause")[0] == 405
    # the page's way: ?token= → cookies (HttpOnly session, SameSite=Strict) → POST with the CSRF header
    status, h, _ = w.request("GET", f"/?token={w.token}")
    assert status == 303 and h["location"] == "/"
    cookies = [c for c in _set_cookies(w, f"/?token={w.token}")]
    session = next(c for c in cookies if c.startswith("pe_session="))
    csrf = next(c for c in cookies if c.startswith("pe_csrf="))
    assert "HttpOnly" in session and "SameSite=Strict" in session and "HttpOnly" not in csrf
    jar = "; ".join(c.split(";")[0] for c in cookies)
    csrf_value = csrf.split(";")[0].split("=", 1)[1]
    assert w.request("POST", "/api/resume", {"Cookie": jar})[0] == 403
    assert w.request("POST", "/api/resume", {"Cookie": jar, "X-CSRF-Token": "0" * 64})[0] == 403
    status, _, body = w.request("POST", "/api/resume", {"Cookie": jar, "X-CSRF-Token": csrf_value})
    assert status == 200 and json.loads(body) == {"paused": False, "was_paused": False}
    status, _, _ = w.request("GET", "/?token=wrong")
    assert status == 303                                       # no cookie for a wrong token
    assert w.request("POST", "/api/pause", w.auth(), b"x" * (web.MAX_BODY + 1))[0] == 413
    # DNS rebinding: another Host never reaches the app
    assert w.request("GET", "/api/status", {"Host": "evil.example:80"})[0] == 421
    q = Queue(cfg.parent / "state" / "queue.sqlite3", readonly=True)
    try:
        assert [(r["action"], r["source"]) for r in q.requests(1)] == [("resume", "web")]
    finally:
        q.close()


def _set_cookies(w: WebProc, path: str) -> list[str]:
    import http.client
    c = http.client.HTTPConnection(w.host, w.port, timeout=10)
    try:
        c.request("GET", path)
        r = c.getresponse()
        r.read()
        return [v for k, v in r.getheaders() if k.lower() == "set-cookie"]
    finally:
        c.close()


def test_pause_holds_new_photos_until_resume(env):
    tmp, cfg, d, w = env
    status, _, body = w.request("POST", "/api/pause", w.auth())
    assert status == 200 and json.loads(body)["paused"] is True
    wait_for(lambda: w.get_json("/api/status")["daemon"]["state"] == "paused", 10, 0.1, what="daemon paused")
    assert "paused" in cli(cfg, "status").stdout
    make_jpeg(tmp / "inbox" / "later.jpg", seed=9)
    wait_for(lambda: w.get_json("/api/status")["counts"]["pending"] == 1, 15, 0.1, what="later.jpg queued")
    seen = w.get_json("/api/status")["daemon"]["updated"]
    for _ in range(2):        # two more status rows from the daemon while the photo waits
        wait_for(lambda: w.get_json("/api/status")["daemon"]["updated"] > seen, 15, 0.1, what="status row")
        seen = w.get_json("/api/status")["daemon"]["updated"]
    assert _job(w, "later.jpg")["state"] == "pending"
    assert w.get_json("/api/status")["daemon"]["state"] == "paused"
    r = cli(cfg, "resume")
    assert r.returncode == 0 and "resumed" in r.stdout
    wait_for(lambda: _job(w, "later.jpg")["state"] == "done", 15, 0.1, what="later.jpg done after resume")
    assert w.get_json("/api/status")["daemon"]["paused"] is False


def test_cli_pause_and_resume_show_in_status(env):
    tmp, cfg, d, w = env
    r = cli(cfg, "pause")
    assert r.returncode == 0 and "paused" in r.stdout
    assert cli(cfg, "pause").stdout.strip() == "already paused"
    wait_for(lambda: json.loads(cli(cfg, "status", "--json").stdout)["daemon"]["state"] == "paused", 10, 0.2,
             what="status --json paused")
    assert json.loads(cli(cfg, "status", "--json").stdout)["daemon"]["paused"] is True
    assert cli(cfg, "resume").stdout.strip() == "resumed"
    assert cli(cfg, "resume").stdout.strip() == "not paused"
    wait_for(lambda: json.loads(cli(cfg, "status", "--json").stdout)["daemon"]["state"] == "idle", 10, 0.2,
             what="idle again")


def test_retry_api_restores_the_original_as_the_cli_does(env):
    tmp, cfg, d, w = env
    j = _job(w, "bad.jpg")
    assert (tmp / "failed" / "bad.jpg").exists()
    assert w.request("POST", f"/api/jobs/{j['id']}/retry")[0] == 401
    done = _job(w, "one.jpg")
    status, _, body = w.request("POST", f"/api/jobs/{done['id']}/retry", w.auth())
    assert status == 409 and b"not failed" in body
    assert w.request("POST", "/api/jobs/99999/retry", w.auth())[0] == 404
    (tmp / "failed" / "bad.jpg").unlink()
    make_jpeg(tmp / "failed" / "bad.jpg", seed=5)                # the user fixed it in failed/
    status, _, body = w.request("POST", f"/api/jobs/{j['id']}/retry", w.auth())
    assert status == 200 and json.loads(body)["state"] == "pending"
    assert not (tmp / "failed" / "bad.jpg.json").exists()
    wait_for(lambda: _job(w, "bad.jpg")["state"] == "done", 15, 0.1, what="bad.jpg done after retry")
    assert (tmp / "outbox" / "bad.jpg").exists() and not (tmp / "failed" / "bad.jpg").exists()


def test_metrics_parse_with_prometheus_client(env):
    from prometheus_client.parser import text_string_to_metric_families
    tmp, cfg, d, w = env
    status, h, body = w.request("GET", "/metrics")
    assert status == 200 and h["content-type"].startswith("text/plain")
    fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
    jobs = {s.labels["state"]: s.value for s in fams["photoenhanced_jobs"].samples}
    assert jobs["done"] == w.get_json("/api/status")["counts"]["done"] >= 3
    assert fams["photoenhanced_daemon_up"].samples[0].value == 1.0
    assert fams["photoenhanced_outcomes"].type == "counter"
    hist = fams["photoenhanced_stage_duration_seconds"]
    assert hist.type == "histogram"
    total = [s for s in hist.samples if s.name.endswith("_count") and s.labels["stage"] == "total"]
    assert total and total[0].value >= 3
    # the node_exporter textfile is still written by the daemon and parses too
    textfile = (tmp / "state" / "photoenhanced.prom").read_text()
    assert "photoenhanced_jobs" in {f.name for f in text_string_to_metric_families(textfile)}


def test_symlinks_below_the_folders_are_never_followed(env):
    tmp, cfg, d, w = env
    secret = tmp / "secret.jpg"
    make_jpeg(secret, seed=7)
    (tmp / "inbox" / "evil.jpg").write_bytes(b"junk" * 10)
    wait_for(lambda: any(j["path"] == "evil.jpg" and j["state"] == "failed" for j in w.get_json("/api/jobs?limit=500")),
             15, 0.1, what="evil.jpg failed")
    j = _job(w, "evil.jpg")
    (tmp / "failed" / "evil.jpg").unlink()
    (tmp / "failed" / "evil.jpg").symlink_to(secret)           # planted link to a file outside
    assert w.request("GET", f"/api/jobs/{j['id']}/image?which=before")[0] == 404
    assert w.get_json(f"/api/jobs/{j['id']}")["images"]["before"] is False
    status, _, body = w.request("POST", f"/api/jobs/{j['id']}/retry", w.auth())
    assert status == 409 and not (tmp / "inbox" / "evil.jpg").exists()
    assert secret.exists() and (tmp / "failed" / "evil.jpg").is_symlink()


def test_status_shows_tiles_of_the_photo_in_hand_and_never_idle_beside_it(env):
    """The fake enhancer reports 8 tiles over 6 s; the daemon rewrites its row every ≤ 2 s, so the
    page sees tiles_done move. Every row read says `working` exactly when it holds a photo."""
    tmp, cfg, d, w = env
    arr = np.full((24, 32, 3), 90, np.uint8)
    arr[0, 0] = (0, 255, 0)
    Image.fromarray(arr).save(tmp / "inbox" / "held.png")
    seen, mismatched = [], []
    end = time.monotonic() + 40
    while time.monotonic() < end:
        s = w.get_json("/api/status")
        cur = s["current"]
        if (s["daemon"]["state"] == "working") != (cur is not None):
            mismatched.append((s["daemon"]["state"], cur))
        if cur and cur["path"] == "held.png" and "tiles_total" in cur:
            seen.append((cur["tiles_done"], cur["tiles_total"], cur["stage"]))
        if seen and _job(w, "held.png")["state"] == "done":
            break
        time.sleep(0.05)
    assert _job(w, "held.png")["state"] == "done"
    assert not mismatched, mismatched[:3]
    dones = [t[0] for t in seen]
    assert {t[1] for t in seen} == {8} and all(1 <= n <= 8 for n in dones)
    assert dones == sorted(dones) and len(set(dones)) >= 2, seen       # rewritten while in hand


def test_healthz_follows_the_daemon(env):
    """Last in this module: it stops the shared daemon."""
    tmp, cfg, d, w = env
    status, _, body = w.request("GET", "/healthz")
    assert status == 200 and json.loads(body)["ok"] is True
    assert d.stop() == 0
    status, _, body = w.request("GET", "/healthz")
    assert status == 503 and json.loads(body)["state"] == "stopped"
    assert w.get_json("/api/status")["daemon"]["running"] is False
    assert w.get_json("/api/status") == json.loads(cli(cfg, "status", "--json").stdout)   # at rest: equal
    assert w.request("GET", "/metrics")[0] == 200              # the page outlives the daemon


# --- without a daemon ------------------------------------------------------------------------------

def test_enqueue_now_as_the_cli_does(tmp_path):
    """POST /api/enqueue queues files at once (no daemon is running to discover them), by path or
    exact bytes, refuses what `photoenhanced enqueue` refuses, needs the token + CSRF header; the
    daemon, started later, carries the jobs out."""
    cfg = write_config(tmp_path, watch={"mode": "poll", "settle_seconds": 600, "rescan_interval": 600,
                                        "poll_interval": 600})
    inbox = tmp_path / "inbox"
    make_jpeg(inbox / "a" / "new.jpg", size=(20, 16), seed=4)
    make_jpeg(tmp_path / "outside.jpg", seed=5)
    (inbox / "link.jpg").symlink_to(tmp_path / "outside.jpg")
    os.mkfifo(inbox / "pipe.jpg")
    raw_name = b"caf\xe9.jpg"                                      # not UTF-8: only path_b64 names it
    with open(os.fsencode(inbox) + b"/" + raw_name, "wb") as f:
        f.write(make_jpeg(tmp_path / "c.jpg", size=(12, 10), seed=6).read_bytes())
    w = WebProc(cfg)
    d = None
    try:
        post = lambda body, h=None: w.request("POST", "/api/enqueue", {"Content-Type": "application/json",
                                              **(w.auth() if h is None else h)}, json.dumps(body).encode())
        assert post({"paths": ["a/new.jpg"]}, {})[0] == 401
        assert post({"paths": ["a/new.jpg"]}, {"Authorization": f"Bearer {w.token}"})[0] == 403
        status, _, body = post({"paths": ["a/new.jpg", str(inbox / "a" / "new.jpg")]})
        res = json.loads(body)["results"]
        assert status == 200 and [r["outcome"] for r in res] == ["queued", "active"]
        assert res[0]["job"] == res[1]["job"] and res[0]["path"] == "a/new.jpg"
        status, _, body = post({"paths_b64": [b64(os.fsdecode(raw_name))]})
        res = json.loads(body)["results"]
        assert status == 200 and res[0]["outcome"] == "queued" and res[0]["path"] == "caf\\xe9.jpg"
        assert base64.urlsafe_b64decode(res[0]["path_b64"]) == raw_name
        status, _, body = post({"paths": ["../outside.jpg", str(tmp_path / "outside.jpg"), "link.jpg", "pipe.jpg",
                                          "nope.jpg", "", "a/../a/new.jpg", str(inbox)]})
        doc = json.loads(body)
        assert status == 409 and doc["status"] == 409 and "8 of 8 not queued" in doc["error"]
        assert [r["outcome"] for r in doc["results"]] == ["invalid", "invalid", "refused", "refused", "vanished",
                                                          "invalid", "invalid", "invalid"]
        assert all(r["job"] is None and r["reason"] for r in doc["results"] if r["outcome"] != "vanished")
        for bad in (b"not json", b"[]", b'{"paths": "a/new.jpg"}', b'{"paths": [1]}', b'{"path": []}',
                    json.dumps({"paths": ["x"] * (web.ENQUEUE_MAX + 1)}).encode(), b'{"paths_b64": ["***"]}'):
            status, _, body = w.request("POST", "/api/enqueue", w.auth(), bad)
            assert status in (400, 409) and "error" in json.loads(body), bad
        assert status == 409 and json.loads(body)["results"][0]["outcome"] == "invalid"    # not base64
        jobs = w.get_json("/api/jobs")
        assert [(j["path"], j["state"]) for j in jobs] == [("a/new.jpg", "pending"), ("caf\\xe9.jpg", "pending")]
        import hashlib
        assert jobs[0]["sha256"] == hashlib.sha256((inbox / "a" / "new.jpg").read_bytes()).hexdigest()
        r = cli(cfg, "enqueue", str(inbox / "a" / "new.jpg"))                 # the CLI sees the same job
        assert r.returncode == 0 and f"already queued (job {jobs[0]['id']})" in r.stdout
        q = Queue(tmp_path / "state" / "queue.sqlite3", readonly=True)
        try:
            assert [(r["action"], r["source"], r["job"]) for r in q.requests()] == [
                ("enqueue", "web", jobs[1]["id"]), ("enqueue", "web", jobs[0]["id"])]
        finally:
            q.close()
        assert (inbox / "link.jpg").is_symlink() and (tmp_path / "outside.jpg").exists()
        d = DaemonProc(cfg)
        wait_for(lambda: [j["state"] for j in w.get_json("/api/jobs")] == ["done", "done"], 30, 0.1,
                 what="the enqueued photos done by the daemon")
        assert (tmp_path / "outbox" / "a" / "new.jpg").exists()
    finally:
        if d is not None:
            d.kill()
        assert w.stop() == 0


def test_wrong_tokens_are_rate_limited(tmp_path):
    cfg = write_config(tmp_path)
    w = WebProc(cfg)
    try:
        for _ in range(web.AUTH_MAX_FAILS):
            assert w.request("POST", "/api/pause", {"Authorization": "Bearer nope", "X-CSRF-Token": "1"})[0] == 401
        status, h, _ = w.request("POST", "/api/pause", w.auth())
        assert status == 429 and int(h["retry-after"]) > 0          # even the right token, for a while
        assert w.request("GET", f"/?token={w.token}")[0] == 429
        assert w.request("GET", "/api/status")[0] == 200             # reading is not limited
        assert w.request("GET", "/healthz")[0] == 503                # no daemon
    finally:
        assert w.stop() == 0


def test_listen_address_must_be_loopback_unless_allowed(tmp_path):
    cfg = write_config(tmp_path)
    r = cli(cfg, "web", "--listen", "0.0.0.0:0")
    assert r.returncode == 2 and "not a loopback address" in r.stderr
    r = cli(cfg, "web", "--listen", "nonsense")
    assert r.returncode == 2 and "HOST:PORT" in r.stderr
    bad = write_config(tmp_path, web={"listen": "0.0.0.0:8765"})
    r = cli(bad, "check-config")
    assert r.returncode == 78 and "web.listen" in r.stderr
    ok = write_config(tmp_path, web={"listen": "0.0.0.0:0", "insecure_remote": True})
    assert cli(ok, "check-config").returncode == 0
    w = WebProc(ok, listen="0.0.0.0:0")
    try:
        w.host = "127.0.0.1"
        assert w.request("GET", "/api/status", {"Host": "photos.lan"})[0] == 200   # any Host when remote
    finally:
        w.stop()


def test_preview_cache_is_bounded_lru(tmp_path):
    cache = web.PreviewCache(tmp_path / "c", limit=2500)
    made = []
    for k in "ab":
        assert cache.get(k, lambda k=k: made.append(k) or k.encode() * 1000) == k.encode() * 1000
        time.sleep(0.02)
    assert cache.get("a", lambda: b"never") == b"a" * 1000 and made == ["a", "b"]    # a hit touches it
    time.sleep(0.02)
    cache.get("c", lambda: b"c" * 1000)                                 # 3000 > 2500: the LRU one goes
    assert cache.total <= 2500
    assert cache.get("a", lambda: b"x") == b"a" * 1000                  # recently used: kept
    assert cache.get("b", lambda: b"B") == b"B"                         # least recently used: made again
    again = web.PreviewCache(tmp_path / "c", limit=2500)                # the bound holds across restarts
    assert again.total == sum(p.stat().st_size for p in (tmp_path / "c").iterdir()) <= 2500


# --- the queue's side ------------------------------------------------------------------------------

def test_queue_v4_pause_flag_and_request_log(tmp_path):
    q = Queue(tmp_path / "q.sqlite3")
    try:
        assert SCHEMA_VERSION == 4 and q.paused() is False
        assert q.set_paused(True, "cli", now=10.0) is False
        assert q.paused() is True and q.set_paused(True, "web", now=11.0) is True
        assert q.set_paused(False, "web", now=12.0) is True and q.paused() is False
        q.record_request("retry", "web", job=7, now=13.0)
        with pytest.raises(ValueError):
            q.record_request("format-disk", "web")
        assert [(r["action"], r["source"], r["job"]) for r in q.requests()] == [
            ("retry", "web", 7), ("resume", "web", None), ("pause", "web", None), ("pause", "cli", None)]
        q.insert_finished([Finished(id=i, rel_path=f"p{i}.jpg", state="done", size=1, mtime_ns=1, sha256="x",
                                    outputs=[]) for i in range(1, 6)], now=1.0)
        assert [j.id for j in q.jobs(limit=2, offset=1)] == [2, 3]
        assert [j.id for j in q.jobs(limit=2, newest_first=True)] == [5, 4]
        assert [j.id for j in q.jobs(offset=3)] == [4, 5]
    finally:
        q.close()


def test_a_read_only_view_of_a_v3_queue_is_not_paused(tmp_path):
    import sqlite3
    from watcher import queue as qmod
    path = tmp_path / "v3.sqlite3"
    raw = sqlite3.connect(path)
    raw.executescript(qmod._MIGRATIONS[1] + qmod._MIGRATIONS[2] + qmod._MIGRATIONS[3])
    raw.execute("PRAGMA user_version = 3")
    raw.commit()
    raw.close()
    ro = Queue(path, readonly=True)
    try:
        assert ro.paused() is False and ro.requests() == []
    finally:
        ro.close()
    q = Queue(path)                                                   # a writer migrates it
    try:
        assert q.db.execute("PRAGMA user_version").fetchone()[0] == 4 and q.set_paused(True, "cli") is False
    finally:
        q.close()
