"""The web page in a real browser: Debian's chromium + chromium-driver (installed here with apt-get
when missing), driven by selenium, against the real daemon (fake enhancer) and the real web
process. Screenshots go to build/test-artifacts/web/ (one of each is in docs/ for the README)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _web import ARTIFACTS, WebProc
from conftest import DaemonProc, make_jpeg, wait_for, write_config
from watcher.queue import Finished, Queue

HOSTILE = "<i>a & b</i>.jpg"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-sync", "--window-size=1280,1000",
         "--disable-dev-shm-usage", "--hide-scrollbars"]


def _ensure_chromium() -> None:
    if shutil.which("chromium") and shutil.which("chromedriver"):
        return
    if os.geteuid() != 0:
        pytest.fail("the browser tests need Debian's chromium and chromium-driver: "
                    "apt-get install chromium chromium-driver (as root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"]):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
        if r.returncode:
            pytest.fail(f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")


@pytest.fixture(scope="module")
def chrome():
    _ensure_chromium()
    os.environ.setdefault("SE_OFFLINE", "true")          # selenium-manager never downloads anything
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for f in FLAGS:
        opts.add_argument(f)
    driver = webdriver.Chrome(options=opts, service=Service(shutil.which("chromedriver")))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _photo(path: Path, arr: np.ndarray, fmt: str = "JPEG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return path


def _small(arr: np.ndarray, width: int) -> np.ndarray:
    im = Image.fromarray(arr)
    return np.asarray(im.resize((width, round(im.height * width / im.width)), Image.Resampling.LANCZOS))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    import skimage.data as sk
    tmp = tmp_path_factory.mktemp("website")
    cfg = write_config(tmp)
    inbox = tmp / "inbox"
    _photo(inbox / "portraits" / "astronaut.jpg", _small(sk.astronaut(), 240))
    _photo(inbox / "coffee.jpg", _small(sk.coffee(), 240))
    _photo(inbox / "cats" / "chelsea.jpg", _small(sk.chelsea(), 240))
    _photo(inbox / HOSTILE, _small(sk.rocket(), 200))
    (inbox / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated" * 8)
    d = DaemonProc(cfg, env={"FAKE_MARK_DELAY": "8", "FAKE_FACE_BOXES": "0.3,0.1,0.6,0.45"})
    w = WebProc(cfg)
    try:
        wait_for(lambda: w.get_json("/api/status")["counts"] == {"pending": 0, "running": 0, "done": 4, "failed": 1},
                 40, 0.1, what="5 photos handled")
        yield tmp, w
    finally:
        w.stop()
        d.kill()


def _job(w: WebProc, name: str) -> dict:
    return next(j for j in w.get_json("/api/jobs?limit=500") if j["path"].endswith(name))


def _wait_js(driver, script: str, timeout: float = 20, what: str = "page condition"):
    return wait_for(lambda: driver.execute_script(script), timeout, 0.05, what=what)


def _shot(driver, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    driver.save_screenshot(str(path))
    return path


def test_dashboard_shows_the_running_daemon(site, chrome):
    tmp, w = site
    import skimage.data as sk
    marked = _small(sk.chelsea(), 200).copy()
    marked[0, 0] = (0, 255, 0)                           # the fake enhancer holds this one for 8 s
    _photo(tmp / "inbox" / "cats" / "slow.png", marked, "PNG")
    wait_for(lambda: (w.get_json("/api/status")["current"] or {}).get("path") == "cats/slow.png", 20, 0.1,
             what="slow.png in hand")
    chrome.get(f"{w.url}/?token={w.token}")
    assert chrome.current_url == f"{w.url}/"             # the token left the address bar
    _wait_js(chrome, "return document.body.dataset.loaded === '1'")
    _wait_js(chrome, "return document.getElementById('current').textContent.includes('slow.png')",
             what="the current photo shown")
    _wait_js(chrome, "return document.getElementById('state').textContent === 'working'", what="working")
    # progress by tiles (the fake reports 8 over its 8 s) and an ETA from their rate
    _wait_js(chrome, "const t = document.getElementById('tiles');"
                     " return !!t && /^tiles [1-8]\\/8$/.test(t.textContent)", what="tiles done/total shown")
    _wait_js(chrome, "return /ETA \\d/.test(document.getElementById('eta').textContent)", what="an ETA shown")
    assert chrome.execute_script("return document.querySelector('#bar > div').style.width") != "0%"
    api = w.get_json("/api/status")["counts"]
    _wait_js(chrome, f"return document.getElementById('n-done').textContent === '{api['done']}'", what="done count")
    assert chrome.find_element("id", "n-failed").text == str(api["failed"]) == "1"
    # names are text, never markup
    _wait_js(chrome, "return document.querySelectorAll('#recent img').length >= 4")
    texts = [e.text for e in chrome.find_elements("css selector", "#recent .thumb span")]
    assert HOSTILE in texts and not chrome.find_elements("css selector", "#recent i")
    _wait_js(chrome, "return [...document.querySelectorAll('#recent img')].every(i => i.complete && i.naturalWidth > 0)",
             what="thumbnails loaded")
    _wait_js(chrome, "return document.querySelectorAll('#failed button.retry').length === 1")
    assert not chrome.find_element("id", "pause").get_attribute("disabled")          # the cookie came with the token
    _shot(chrome, "dashboard.png")
    wait_for(lambda: _job(w, "slow.png")["state"] == "done", 30, 0.1, what="slow.png done")
    _wait_js(chrome, "return document.getElementById('state').textContent === 'idle'", what="idle on the page")


def test_retry_button_puts_the_photo_back_and_it_is_processed(site, chrome):
    tmp, w = site
    j = _job(w, "broken.jpg")
    assert j["state"] == "failed" and j["error_kind"] == "undecodable"
    (tmp / "failed" / "broken.jpg").unlink()
    make_jpeg(tmp / "failed" / "broken.jpg", size=(60, 40), seed=11)     # fixed in failed/ by the user
    chrome.get(f"{w.url}/")
    row = f"#failed tr[data-job='{j['id']}']"
    _wait_js(chrome, f"return !!document.querySelector(\"{row} button.retry\")", what="the failed row")
    chrome.find_element("css selector", f"{row} button.retry").click()
    wait_for(lambda: _job(w, "broken.jpg")["state"] == "done", 20, 0.1, what="broken.jpg done after Retry")
    assert (tmp / "outbox" / "broken.jpg").exists() and not (tmp / "failed" / "broken.jpg").exists()
    _wait_js(chrome, f"return !document.querySelector(\"{row}\")", what="the row gone from the page")
    assert chrome.find_element("id", "error").get_attribute("hidden") is not None


def test_enqueue_from_the_page(site, chrome):
    tmp, w = site
    chrome.get(f"{w.url}/")
    _wait_js(chrome, "return document.body.dataset.loaded === '1'")
    # paused, so that the daemon cannot finish (and move) the photo before the page asks for it
    assert w.request("POST", "/api/pause", w.auth())[0] == 200
    make_jpeg(tmp / "inbox" / "now" / "asked.jpg", size=(48, 32), seed=12)
    box = chrome.find_element("id", "enqueue-path")
    box.send_keys("now/asked.jpg")
    chrome.find_element("id", "enqueue").click()
    # queued by the page, or by the daemon's discovery a moment before: either way it is queued
    _wait_js(chrome, "return /queued/.test(document.getElementById('enqueue-result').textContent)",
             what="the enqueue result")
    assert "now/asked.jpg" in chrome.find_element("id", "enqueue-result").text
    assert w.request("POST", "/api/resume", w.auth())[0] == 200
    wait_for(lambda: _job(w, "asked.jpg")["state"] == "done", 20, 0.1, what="asked.jpg done")
    box.send_keys("../outside.jpg")
    chrome.find_element("id", "enqueue").click()
    _wait_js(chrome, "return /invalid/.test(document.getElementById('enqueue-result').textContent)",
             what="the refusal shown")
    assert "error" in chrome.find_element("id", "enqueue-result").get_attribute("class")


def test_before_after_page_shows_two_images_and_the_slider_moves(site, chrome):
    from selenium.webdriver.common.action_chains import ActionChains
    tmp, w = site
    j = _job(w, "astronaut.jpg")
    chrome.get(f"{w.url}/jobs/{j['id']}")
    _wait_js(chrome, "return document.body.dataset.loaded === '1'")
    both = ("return ['before', 'after'].every(id => { const i = document.getElementById(id);"
            " return i.complete && i.naturalWidth > 0; })")
    _wait_js(chrome, both, what="both images loaded")
    sizes = chrome.execute_script("return ['before', 'after'].map(id => { const i = document.getElementById(id);"
                                  " const r = i.getBoundingClientRect(); return [i.naturalWidth, r.width, r.height]; })")
    assert sizes[0][0] == 240 and sizes[1][0] == 480                  # the result is 2× the original …
    assert sizes[0][1:] == sizes[1][1:]                               # … shown at the same size
    clip0 = chrome.execute_script("return document.getElementById('after').style.clipPath")
    slider = chrome.find_element("id", "slider")
    ActionChains(chrome).click_and_hold(slider).move_by_offset(-90, 0).release().perform()
    value = int(slider.get_attribute("value"))
    clip1 = chrome.execute_script("return document.getElementById('after').style.clipPath")
    assert value < 50 and clip1 != clip0 and clip1 == f"inset(0px 0px 0px {value}%)"
    assert "photoenhanced" in chrome.find_element("id", "sidecar").text     # the sidecar, readable
    # links to the files, by job id; the page's own fetch of the result gets its exact size
    links = chrome.execute_script("return [...document.querySelectorAll('#files a')].map(a => a.getAttribute('href'))")
    assert links == [f"/jobs/{j['id']}/files/{k}" for k in ("result", "sidecar", "original")]
    got = chrome.execute_async_script("const done = arguments[arguments.length - 1]; fetch(arguments[0])"
                                      ".then(async r => done([r.status, (await r.arrayBuffer()).byteLength,"
                                      " r.headers.get('content-disposition')]), e => done([String(e), 0, '']))",
                                      links[0])
    assert got[0] == 200 and got[1] == (tmp / "outbox" / "portraits" / "astronaut.jpg").stat().st_size
    assert got[2].startswith("attachment;") and "astronaut.jpg" in got[2]
    chrome.execute_script("const s = document.getElementById('slider'); s.value = 50;"
                          " s.dispatchEvent(new Event('input'));")
    _shot(chrome, "before-after.png")
    # zoom: a click shows that region at 100 % of the result, both sides cropped alike
    chrome.find_element("id", "compare").click()
    _wait_js(chrome, "return document.getElementById('after').src.includes('size=crop')")
    _wait_js(chrome, both, what="both crops loaded")
    nat = chrome.execute_script("return ['before', 'after'].map(id => document.getElementById(id).naturalWidth)")
    assert nat[0] == nat[1] == 480 and chrome.find_element("id", "fit").is_displayed()
    _wait_js(chrome, "return document.getElementById('after').getBoundingClientRect().width === 480",
             what="the crop shown at 100 %")
    chrome.find_element("id", "fit").click()
    _wait_js(chrome, "return document.getElementById('after').src.includes('size=preview')")
    # the face the detector found: a box on the picture, one click shows it at 100 %
    box = chrome.find_element("css selector", "#compare .facebox")
    r = chrome.execute_script("const c = document.getElementById('compare').getBoundingClientRect();"
                              " const b = arguments[0].getBoundingClientRect();"
                              " return [(b.left - c.left) / c.width, (b.top - c.top) / c.height, b.width / c.width];", box)
    assert abs(r[0] - 0.3) < 0.02 and abs(r[1] - 0.1) < 0.02 and abs(r[2] - 0.3) < 0.02
    box.click()
    _wait_js(chrome, "return document.getElementById('after').src.includes('size=crop&x=0.450&y=0.275')",
             what="zoomed on the face")
    assert "face 1" in chrome.find_element("id", "zoominfo").text
    chrome.find_element("id", "fit").click()


def test_without_the_token_requests_are_refused_and_paths_find_nothing(site, chrome):
    tmp, w = site
    chrome.get(f"{w.url}/")
    fetch = ("const done = arguments[arguments.length - 1];"
             "fetch(arguments[0], arguments[1]).then(r => done(r.status)).catch(e => done(String(e)));")
    # the page's own session, but a request that leaves out the cookie / the CSRF header
    assert chrome.execute_async_script(fetch, "/api/pause", {"method": "POST", "credentials": "omit",
                                                             "headers": {"X-CSRF-Token": "x"}}) == 401
    assert chrome.execute_async_script(fetch, "/api/pause", {"method": "POST"}) == 403
    for path in ("/static/..%2f..%2fweb.py", "/jobs/1%2f..%2f..%2fetc%2fpasswd", "/api/jobs/1%2f..%2f..%2fqueue.py",
                 "/static/%2e%2e%2fconfig.py"):
        assert chrome.execute_async_script(fetch, path, {}) == 404, path
    chrome.get(f"{w.url}/static/..%2f..%2fconfig.py")
    assert "not found" in chrome.page_source and "import" not in chrome.page_source
    # a browser without the cookie: read-only page, Retry/Pause disabled
    chrome.delete_all_cookies()
    chrome.get(f"{w.url}/")
    _wait_js(chrome, "return document.body.dataset.loaded === '1'")
    assert chrome.find_element("id", "auth").is_displayed()
    assert chrome.find_element("id", "pause").get_attribute("disabled") is not None
    assert w.get_json("/api/status")["daemon"]["paused"] is False


def test_dashboard_with_10000_jobs_load_time_and_memory(tmp_path, chrome):
    """Measured, not asserted on time: the numbers go to build/test-artifacts/web/load-10k.json."""
    cfg = write_config(tmp_path)
    (tmp_path / "state").mkdir()
    q = Queue(tmp_path / "state" / "queue.sqlite3")
    now = time.time()
    rows = [Finished(id=i, rel_path=f"shoot/{i // 100:03d}/IMG_{i:05d}.jpg", state="done" if i % 100 else "failed",
                     size=3_000_000, mtime_ns=1, sha256=f"{i:064x}",
                     outputs=[{"path": str(tmp_path / "outbox" / f"IMG_{i:05d}.jpg"), "width": 4000, "height": 3000}],
                     error_kind=None if i % 100 else "undecodable", last_error=None if i % 100 else "cannot identify",
                     finished=now - (10_000 - i)) for i in range(1, 10_001)]
    q.insert_finished(rows, now)
    q.close()
    w = WebProc(cfg)
    try:
        chrome.get(f"{w.url}/?token={w.token}")
        loads = []
        for _ in range(3):
            chrome.get(f"{w.url}/")
            _wait_js(chrome, "return document.body.dataset.loaded === '1'", 60)
            loads.append(chrome.execute_script(
                "const n = performance.getEntriesByType('navigation')[0];"
                " return {dom_content_loaded_ms: Math.round(n.domContentLoadedEventEnd),"
                " data_shown_ms: Number(document.body.dataset.loadedMs)};"))
        assert chrome.find_element("id", "n-done").text == "9900"
        assert chrome.find_element("id", "n-failed").text == "100"
        assert len(chrome.find_elements("css selector", "#failed tbody tr")) == 50
        api = {}
        for path in ("/api/status", "/api/jobs?limit=500", "/api/jobs?state=failed&order=desc&limit=50", "/metrics"):
            t = time.perf_counter()
            status, _, body = w.request("GET", path)
            api[path] = {"status": status, "ms": round((time.perf_counter() - t) * 1000, 1), "bytes": len(body)}
        mem = w.rss_kib()
        result = {"jobs": 10_000, "page_loads": loads,
                  "median_data_shown_ms": sorted(x["data_shown_ms"] for x in loads)[1],
                  "api": api, "web_rss_kib": mem.get("VmRSS"), "web_peak_rss_kib": mem.get("VmHWM")}
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "load-10k.json").write_text(json.dumps(result, indent=2))
        print("\nweb with 10,000 jobs:", json.dumps(result))
        assert all(v["status"] == 200 for v in api.values())
    finally:
        w.stop()
