"""A real SMB share on loopback for tests: Samba's smbd + a FUSE client (smbnetfs).

Everything lives in one temp folder: smb.conf, sockets, state, the exported folder and the
mount point. smbd runs in its own network namespace (``unshare -n``), so it can listen on
127.0.0.1:445 — libsmbclient, which smbnetfs uses, only ever connects to ports 445/139 — without
touching the host's network or colliding with another rig. The kernel's cifs client is not
available in this sandbox (``mount -t cifs`` → ENODEV), so the client side is smbnetfs, a FUSE
file system over libsmbclient, started in the same network namespace. The mount itself is in the
host's mount namespace, so the test process sees it like any network mount
(``fuse.smbnetfs`` in /proc/self/mountinfo).

``smbclient`` (another SMB client) writes files into the share, as a scanner or laptop would.

    rig = start_samba(tmp_path)
    rig.put(local_file, "scans/IMG_1.jpg")         # another client writes a photo
    rig.put_slowly(chunks, "scans/IMG_2.jpg", 0.3)  # ... slowly, in chunks
    rig.mount_dir                                  # the share seen through the FUSE mount
    rig.share_dir                                  # the folder smbd exports (server side)
    rig.stop()

Server settings: ``smb2 max write = 65536`` (64 KiB writes, as small NAS boxes negotiate).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

TOOLS = {"smbd": "samba", "smbclient": "smbclient", "smbnetfs": "smbnetfs",
         "fusermount": "fuse3", "unshare": "util-linux", "nsenter": "util-linux", "ip": "iproute2"}
SHARE = "photos"


class RigError(RuntimeError):
    pass


def ensure_tools() -> None:
    """Install Samba, smbclient and smbnetfs with apt-get when they are missing (root only)."""
    missing = sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None})
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        cmd = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
        if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, capture_output=True)
            subprocess.run(cmd, env=env, capture_output=True)
    still = sorted(tool for tool in TOOLS if shutil.which(tool) is None)
    if still:
        raise RigError(f"cannot run the Samba rig: missing {', '.join(still)} "
                       f"(apt-get install samba smbclient smbnetfs fuse3 iproute2)")
    if not os.path.exists("/dev/fuse"):
        raise RigError("cannot run the Samba rig: /dev/fuse is missing (smbnetfs needs FUSE)")


SMB_CONF = """\
[global]
  server role = standalone server
  smb ports = 445
  interfaces = {addrs}
  bind interfaces only = yes
  private dir = {root}/private
  lock directory = {root}/lock
  state directory = {root}/state
  cache directory = {root}/cache
  pid directory = {root}/pid
  ncalrpc dir = {root}/ncalrpc
  log file = {root}/log/smbd.%m
  disable spoolss = yes
  load printers = no
  printing = bsd
  printcap name = /dev/null
  map to guest = Bad User
  guest account = root
  server min protocol = SMB2
  smb2 max write = 65536
  smb2 max read = 65536
  smb2 max trans = 65536
  kernel oplocks = no
[{share}]
  path = {share_dir}
  read only = no
  guest ok = yes
  force user = root
  create mask = 0644
"""


@dataclass
class SambaRig:
    root: Path
    share_dir: Path  # the folder smbd exports (server side)
    mount_point: Path  # where smbnetfs is mounted
    mount_dir: Path  # the share seen through the mount: mount_point/127.0.0.1/photos
    _smbd: subprocess.Popen | None = field(default=None, repr=False)
    _fuse: subprocess.Popen | None = field(default=None, repr=False)
    _threads: list[threading.Thread] = field(default_factory=list, repr=False)

    # ------------------------------------------------------------------ clients
    def _netns(self) -> list[str]:
        assert self._smbd is not None
        return ["nsenter", "-t", str(self._smbd.pid), "-n"]

    def smbclient(self, commands: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run smbclient commands against the share (a second SMB client, not the mount)."""
        res = subprocess.run(
            [*self._netns(), "smbclient", "-N", f"//127.0.0.1/{SHARE}", "-c", commands],
            capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0 or "NT_STATUS_" in res.stdout + res.stderr:
            raise RigError(f"smbclient {commands!r} failed: {res.stdout}{res.stderr}")
        return res

    def _mkdirs(self, remote: str) -> None:
        parts = remote.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if not (self.share_dir / sub).is_dir():
                self.smbclient(f'mkdir "{sub}"')

    def put(self, local: Path, remote: str) -> None:
        """Write local → share/remote through smbclient (parent folders are created)."""
        self._mkdirs(remote)
        self.smbclient(f'put "{local}" "{remote}"')

    def rename(self, old: str, new: str) -> None:
        self.smbclient(f'rename "{old}" "{new}"')

    def put_slowly(self, chunks: Iterable[bytes], remote: str, gap: float) -> threading.Thread:
        """Start writing share/remote in chunks, ``gap`` seconds apart: after each chunk the file
        on the server holds everything written so far (one ``smbclient put`` per step, each
        sending the longer prefix). Returns the writer thread; once joined the file is complete.

        (smbclient reading a FIFO is no slow writer: it buffers the whole pipe and sends all
        but its first 64 KiB at the end, so the partial file sits unchanged for the whole upload.)
        """
        self._mkdirs(remote)
        chunks = list(chunks)
        local = self.root / f"slow-{len(self._threads)}"
        errors: list[BaseException] = []

        def feed() -> None:
            try:
                with open(local, "wb") as fh:
                    for i, chunk in enumerate(chunks):
                        if i:
                            time.sleep(gap)
                        fh.write(chunk)
                        fh.flush()
                        self.smbclient(f'put "{local}" "{remote}"')
            except BaseException as exc:  # reported by the caller through .errors
                errors.append(exc)

        t = threading.Thread(target=feed, name=f"slow-put-{remote}")
        t.errors = errors  # type: ignore[attr-defined]
        t.start()
        self._threads.append(t)
        return t

    # ------------------------------------------------------------------ lifecycle
    def stop(self) -> None:
        for t in self._threads:
            t.join(timeout=60)
        if self._fuse is not None:
            subprocess.run(["fusermount", "-u", "-z", str(self.mount_point)], capture_output=True)
            _end_group(self._fuse)
            self._fuse = None
        if self._smbd is not None:
            _end_group(self._smbd)
            self._smbd = None


def _end_group(proc: subprocess.Popen) -> None:
    """End a process we started in its own session, and its children (same process group)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def start_samba(tmp: Path, *, timeout: float = 20) -> SambaRig:
    """Start smbd + smbnetfs under ``tmp``; the caller must call ``stop()`` (use try/finally)."""
    ensure_tools()
    root = Path(tmp)
    for sub in ("private", "lock", "state", "cache", "pid", "ncalrpc", "log", "share", "mnt",
                "home/.smb"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    share_dir, mount_point = root / "share", root / "mnt"
    conf = root / "smb.conf"
    conf.write_text(SMB_CONF.format(root=root, addrs="127.0.0.1", share=SHARE, share_dir=share_dir))
    home = root / "home"
    (home / ".smb" / "smb.conf").write_text("[global]\n  client min protocol = SMB2\n  name resolve order = host\n")
    netfs_conf = home / ".smb" / "smbnetfs.conf"
    netfs_conf.write_text('auth "guest" ""\nshow_hidden_hosts "true"\nsmb_query_browsers "false"\n')
    netfs_conf.chmod(0o600)

    rig = SambaRig(root, share_dir, mount_point, mount_point / "127.0.0.1" / SHARE)
    log = open(root / "log" / "smbd.out", "wb")
    rig._smbd = subprocess.Popen(
        ["unshare", "-n", "--", "sh", "-c",
         f'ip link set lo up && exec smbd --foreground --no-process-group --debug-stdout -s "{conf}"'],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    try:
        deadline = time.monotonic() + timeout
        while True:
            if rig._smbd.poll() is not None:
                raise RigError(f"smbd exited: {(root / 'log' / 'smbd.out').read_text()[-2000:]}")
            probe = subprocess.run([*rig._netns(), "smbclient", "-N", f"//127.0.0.1/{SHARE}", "-c", "ls"],
                                   capture_output=True, text=True)
            if probe.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RigError(f"smbd did not answer: {probe.stdout}{probe.stderr}")
            time.sleep(0.1)
        fuse_log = open(root / "log" / "smbnetfs.out", "wb")
        rig._fuse = subprocess.Popen(
            [*rig._netns(), "smbnetfs", str(mount_point), "-f",
             "-o", f"config={netfs_conf},log_file={root}/log/smbnetfs.log"],
            stdout=fuse_log, stderr=subprocess.STDOUT, env=dict(os.environ, HOME=str(home)),
            start_new_session=True)
        fuse_log.close()
        while not rig.mount_dir.is_dir():
            if rig._fuse.poll() is not None:
                raise RigError(f"smbnetfs exited: {(root / 'log' / 'smbnetfs.out').read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RigError("the smbnetfs mount did not show the share")
            time.sleep(0.1)
    except BaseException:
        rig.stop()
        raise
    return rig
