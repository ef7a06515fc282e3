"""The real web process (`photoenhanced web`) as a subprocess for the web tests, plus small HTTP
helpers that use only the standard library (raw paths are sent as they are written)."""
from __future__ import annotations

import http.client
import json
import os
import re
import ssl
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("PHOTOENHANCED_ARTIFACTS", ROOT / "build" / "test-artifacts")) / "web"
_URL = re.compile(r"photoenhanced web: (https?://[^/\s]+/)\?token=(\S+)")


class WebProc:
    """`python -m watcher.cli --config CFG web --listen 127.0.0.1:0`; the URL and token are read
    from the line it prints once (the port is the one the OS gave)."""

    def __init__(self, config: Path, listen: str = "127.0.0.1:0", env: dict | None = None,
                 ca: Path | None = None):
        """`ca`: the certificate to trust when the config serves HTTPS (web.tls_cert)."""
        self.config = config
        self.ca = ca
        self.log = config.parent / f"web-{time.monotonic_ns()}.log"
        self.err = self.log.with_suffix(".err")
        e = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        e.pop("NOTIFY_SOCKET", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "watcher.cli", "--config", str(config),
                                      "--log-format", "json", "web", "--listen", listen],
                                     stdout=open(self.log, "wb"), stderr=open(self.err, "wb"), env=e,
                                     start_new_session=True)
        end = time.monotonic() + 30
        while time.monotonic() < end:
            m = _URL.search(self.err.read_text(errors="replace"))
            if m:
                self.url, self.token = m.group(1).rstrip("/"), m.group(2)
                self.scheme, _, rest = self.url.partition("://")
                host, port = rest.rsplit(":", 1)
                self.host, self.port = host, int(port)
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"web did not start: {self.err.read_text()[-3000:]}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def request(self, method: str, path: str, headers: dict | None = None, body: bytes | None = None,
                ) -> tuple[int, dict, bytes]:
        """One request with the path sent exactly as given (no normalisation of `..`)."""
        if self.scheme == "https":
            ctx = ssl.create_default_context(cafile=str(self.ca) if self.ca else None)
            c = http.client.HTTPSConnection(self.host, self.port, timeout=30, context=ctx)
        else:
            c = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            c.putrequest(method, path, skip_accept_encoding=True)
            for k, v in (headers or {}).items():
                c.putheader(k, v)
            if body is not None:
                c.putheader("Content-Length", str(len(body)))
            c.endheaders(body)
            r = c.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            c.close()

    def get_json(self, path: str):
        for _ in range(50):
            status, _, body = self.request("GET", path)
            if status != 503 or path == "/healthz":
                break
            time.sleep(0.1)       # the daemon is still creating the queue
        assert status == 200, (path, status, body[:300])
        return json.loads(body)

    def auth(self) -> dict:
        return {"Authorization": f"Bearer {self.token}", "X-CSRF-Token": "1"}

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def rss_kib(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak) of the web process in KiB."""
        out = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0])
        return out
