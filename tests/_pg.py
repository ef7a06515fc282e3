"""A private PostgreSQL cluster for tests and benchmarks: Debian's postgresql (installed with
apt-get when missing), initdb + pg_ctl as the `postgres` user in a temp folder, a free port on
127.0.0.1, stopped with `-m immediate`. Never relies on a server left running.

    with Cluster.start() as pg:   # or pg = Cluster.start(); …; pg.stop()
        url = pg.url("photos")
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def ensure_installed() -> Path:
    """The folder of initdb/pg_ctl; installs Debian's postgresql when missing (root only)."""
    b = bindir()
    if b is not None:
        return b
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=False, env=env, capture_output=True)
    r = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "postgresql"],
                       env=env, capture_output=True, text=True)
    b = bindir()
    if b is None:
        raise RuntimeError(f"postgresql is not installed and apt-get failed: {r.stderr[-400:]}")
    return b


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, base: Path, port: int, bin_dir: Path, user: str):
        self.base, self.port, self.bin, self.user = base, port, bin_dir, user
        self.data = base / "data"

    def _as_pg(self, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        cmd = [str(self.bin / argv[0]), *argv[1:]]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=timeout)

    @classmethod
    def start(cls, base: Path | None = None, port: int | None = None) -> "Cluster":
        b = ensure_installed()
        user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        base = Path(base or tempfile.mkdtemp(prefix="pe-pg-"))
        base.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(base, user)
            os.chmod(base, 0o755)
        c = cls(base, port or free_port(), b, user)
        c._as_pg("initdb", "-D", str(c.data), "-A", "trust", "-U", "postgres", "--no-sync")
        c.start_server()
        return c

    def allow(self, cidr: str) -> None:
        """Let clients from `cidr` in (trust), e.g. hosts in their own network namespaces."""
        with open(self.data / "pg_hba.conf", "a") as f:
            f.write(f"host all all {cidr} trust\n")

    def start_server(self) -> None:
        self._as_pg("pg_ctl", "-D", str(self.data), "-w", "-t", "60", "-l", str(self.data / "log"), "-o",
                    f"-p {self.port} -k {self.data} -c listen_addresses='*' -c fsync=off "
                    f"-c max_connections=200", "start")

    def stop_server(self, mode: str = "immediate") -> None:
        self._as_pg("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def restart(self) -> None:
        self.stop_server()
        self.start_server()

    def createdb(self, name: str) -> str:
        self._as_pg("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        return self.url(name)

    def url(self, db: str = "postgres", host: str = "127.0.0.1") -> str:
        return f"postgresql://postgres@{host}:{self.port}/{db}"

    def stop(self) -> None:
        self.stop_server()
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_port(host: str, port: int, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection((host, port), 0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"{host}:{port}")


# --- pytest fixtures (import them into a test module: `from _pg import pg_cluster, pg_url`) ---------

try:
    import pytest
except ImportError:                     # benchmarks import this module without pytest
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="session")
    def pg_cluster():
        c = Cluster.start()
        try:
            tmpl = c.createdb("tmpl")
            from watcher.pgqueue import migrate
            migrate(tmpl)
            yield c
        finally:
            c.stop()

    @pytest.fixture
    def pg_url(pg_cluster):
        """A migrated database emptied for this test (tables truncated, ids and tokens restarted)."""
        import psycopg
        with psycopg.connect(pg_cluster.url("tmpl"), autocommit=True) as conn:
            conn.execute("TRUNCATE jobs, hosts, control, requests RESTART IDENTITY")
            conn.execute("ALTER SEQUENCE fencing_token RESTART")
            conn.execute("DELETE FROM schema_migrations WHERE version > (SELECT max(version) FROM"
                         " (VALUES " + ", ".join(f"({v})" for v in _versions()) + ") v(version))")
        yield pg_cluster.url("tmpl")


def _versions() -> list[int]:
    from watcher.pgqueue import migrations
    return [v for v, _, _ in migrations()]
