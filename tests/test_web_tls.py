"""HTTPS for `photoenhanced web` (web.tls_cert + web.tls_key, served by cheroot): a self-signed
certificate made here with `openssl req`, trusted as the CA by the client; plain HTTP to the TLS port
gets no page; TLS below 1.2 is refused; the session cookie is Secure; check-config names a bad cert
or key (exit 78); a non-loopback listen address is refused without TLS and served with it."""
from __future__ import annotations

import http.client
import json
import re
import socket
import ssl
import subprocess
import warnings
from pathlib import Path

import pytest

from _web import WebProc
from conftest import cli, write_config
from watcher.config import is_loopback


def _own_address() -> str | None:
    """This machine's own non-loopback IPv4 address: the source address of a route (a UDP connect
    sends nothing), else the first global address `ip` lists."""
    found = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.254.254.254", 9))
            found.append(s.getsockname()[0])
        except OSError:
            pass
    try:
        out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True,
                             text=True, timeout=10).stdout
        found += re.findall(r"\binet (\d+\.\d+\.\d+\.\d+)/", out)
    except OSError:
        pass
    return next((a for a in found if not is_loopback(a) and a != "0.0.0.0"), None)


def _cert(folder: Path, name: str, ips: list[str]) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    san = ",".join(["DNS:localhost", *(f"IP:{ip}" for ip in ips)])
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
                    "-addext", f"subjectAltName={san}"], check=True, capture_output=True)
    return cert, key


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    own = _own_address()
    good = _cert(d, "good", ["127.0.0.1", *([own] if own else [])])
    other = _cert(d, "other", ["127.0.0.1"])
    return good, other, own


def test_https_serves_with_the_cert_as_ca_and_plain_http_gets_no_page(tmp_path, certs):
    (cert, key), _, _ = certs
    cfg = write_config(tmp_path, web={"tls_cert": str(cert), "tls_key": str(key)})
    assert cli(cfg, "check-config").returncode == 0
    w = WebProc(cfg, ca=cert)
    try:
        assert w.url.startswith("https://127.0.0.1:")
        status, h, body = w.request("GET", "/api/jobs")
        assert status == 200 and json.loads(body) == []
        assert w.request("POST", "/api/pause", w.auth())[0] == 200
        status, h, _ = w.request("GET", f"/?token={w.token}")
        assert status == 303
        c = http.client.HTTPSConnection(w.host, w.port, timeout=10,
                                        context=ssl.create_default_context(cafile=str(cert)))
        c.request("GET", f"/?token={w.token}")
        r = c.getresponse()
        r.read()
        cookies = [v for k, v in r.getheaders() if k.lower() == "set-cookie"]
        c.close()
        assert len(cookies) == 2 and all("; Secure" in v and "SameSite=Strict" in v for v in cookies)
        assert any(v.startswith("pe_session=") and "HttpOnly" in v for v in cookies)
        # plain HTTP to the TLS port: at most cheroot's plain 400, never a page or the API
        plain = http.client.HTTPConnection(w.host, w.port, timeout=10)
        try:
            plain.request("GET", "/api/status")
            r = plain.getresponse()
            got = (r.status, r.read())
        except (OSError, http.client.HTTPException):
            got = None
        finally:
            plain.close()
        assert got is None or (got[0] == 400 and b"daemon" not in got[1]), got
        # a client that does not trust the certificate gets nothing
        with pytest.raises(ssl.SSLCertVerificationError):
            c = http.client.HTTPSConnection(w.host, w.port, timeout=10, context=ssl.create_default_context())
            c.request("GET", "/api/status")
        # TLS 1.1 is refused (TLS 1.2 at least)
        old = ssl.create_default_context(cafile=str(cert))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
            old.maximum_version = ssl.TLSVersion.TLSv1_1
        with pytest.raises(ssl.SSLError):
            c = http.client.HTTPSConnection(w.host, w.port, timeout=10, context=old)
            c.request("GET", "/api/status")
        assert w.request("GET", "/healthz")[0] == 503          # the server is still there
    finally:
        assert w.stop() == 0


def test_check_config_names_a_bad_cert_or_key(tmp_path, certs):
    (cert, key), (_, other_key), _ = certs
    cases = [
        ({"tls_cert": str(cert)}, "web.tls_key", "go together"),
        ({"tls_key": str(key)}, "web.tls_cert", "go together"),
        ({"tls_cert": str(cert), "tls_key": str(other_key)}, "web.tls_key", "does not match"),
        ({"tls_cert": str(cert), "tls_key": str(tmp_path / "nope.key")}, "web.tls_key", "cannot read"),
        ({"tls_cert": str(key), "tls_key": str(key)}, "web.tls_cert", "no PEM certificate"),
        ({"tls_cert": str(cert), "tls_key": str(cert)}, "web.tls_key", "no PEM private key"),
    ]
    for i, (webcfg, where, why) in enumerate(cases):
        d = tmp_path / f"c{i}"
        d.mkdir()
        cfg = write_config(d, web=webcfg)
        r = cli(cfg, "check-config")
        assert r.returncode == 78 and where in r.stderr and why in r.stderr, (webcfg, r.stderr)
        r = cli(cfg, "web")                                       # the server refuses to start the same way
        assert r.returncode == 78 and where in r.stderr and why in r.stderr, (webcfg, r.stderr)
    enc = tmp_path / "enc.key"
    subprocess.run(["openssl", "pkey", "-in", str(key), "-out", str(enc), "-aes256", "-passout", "pass:x"],
                   check=True, capture_output=True)
    cfg = write_config(tmp_path, web={"tls_cert": str(cert), "tls_key": str(enc)})
    r = cli(cfg, "check-config")
    assert r.returncode == 78 and "web.tls_key" in r.stderr and "encrypted" in r.stderr, r.stderr


def test_a_non_loopback_address_needs_tls(tmp_path, certs):
    (cert, key), _, own = certs
    if own is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    (tmp_path / "lo").mkdir()
    plain = write_config(tmp_path, web={"listen": f"{own}:0"})
    r = cli(plain, "check-config")
    assert r.returncode == 78 and "web.listen" in r.stderr and "no TLS" in r.stderr
    r = cli(write_config(tmp_path / "lo"), "web", "--listen", f"{own}:0")      # loopback config, --listen
    assert r.returncode == 2 and "not a loopback address" in r.stderr
    d = tmp_path / "tls"
    d.mkdir()
    cfg = write_config(d, web={"listen": f"{own}:0", "tls_cert": str(cert), "tls_key": str(key)})
    assert cli(cfg, "check-config").returncode == 0
    w = WebProc(cfg, listen=f"{own}:0", ca=cert)
    try:
        assert w.url.startswith(f"https://{own}:")
        status, _, body = w.request("GET", "/api/jobs", {"Host": f"photos.lan:{w.port}"})   # any Host when remote
        assert status == 200 and json.loads(body) == []
        assert w.request("POST", "/api/resume", w.auth())[0] == 200
        assert w.request("POST", "/api/resume", {"X-CSRF-Token": "1"})[0] == 401
    finally:
        assert w.stop() == 0
