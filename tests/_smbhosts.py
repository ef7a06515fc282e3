"""The shared folders of the multi-host tests served over SMB: one Samba `smbd` in the test's own
network namespace (the one holding PostgreSQL), listening on port 445 of each host's veth peer
address (10.X.N.1) only, and each host mounting the share itself, from inside its own network
namespace, over its veth. So a network cut (`ip link set <veth> down`) cuts that host's share as
well as its queue: its file operations fail with EIO (after ~20 s for the first one, then at
once) until the link is back, when the mount recovers by itself within seconds.

The kernel's CIFS client is not available in this sandbox (`mount -t cifs` → ENODEV), so each
mount is smbnetfs (FUSE over libsmbclient, the Samba rig's client), started with
`nsenter --net=/run/netns/<host>`: it joins the host's network namespace only, so the mount sits
in the test's mount namespace and the daemon (`ip netns exec`, which copies the mount table at
its start) sees it. On SMB through smbnetfs: no inotify events (the daemon resolves watch.mode
`auto` to `poll`), hard links are refused (EPERM; the publisher then renames, after checking that
the name is still free), rename is atomic on the server.

    smb = SmbShare.start(tmp_path / "smb", ["10.150.1.1", "10.150.2.1"])
    d = smb.mount(1, "pe1234h1", "10.150.1.1")     # the share as host 1 sees it
    smb.share_dir                                   # the folder smbd exports (server side)
    smb.stop()
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import samba_rig

SHARE = "photos"
TOOLS = ("smbd", "smbclient", "smbnetfs", "fusermount", "nsenter")

SMB_CONF = samba_rig.SMB_CONF        # the rig's server, listening on the hosts' veth addresses


def missing() -> str | None:
    """Why SMB hosts cannot run here, or None (installs the rig's packages first, as root)."""
    if os.geteuid() == 0:
        with contextlib.suppress(samba_rig.RigError):
            samba_rig.ensure_tools()
    gone = [t for t in TOOLS if shutil.which(t) is None]
    if gone:
        return f"missing {', '.join(gone)} (apt-get install samba smbclient smbnetfs fuse3 util-linux)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing (smbnetfs needs FUSE)"
    if os.geteuid() != 0:
        return "needs root (network namespaces, smbd on port 445)"
    return None


class SmbShare:
    def __init__(self, root: Path, addrs: list[str]):
        self.root, self.addrs = root, addrs
        self.share_dir = root / "share"
        self.home = root / "home"
        self.netfs_conf = self.home / ".smb" / "smbnetfs.conf"
        self._smbd: subprocess.Popen | None = None
        self._mounts: list[tuple[Path, subprocess.Popen]] = []

    @classmethod
    def start(cls, root: Path, addrs: list[str], timeout: float = 30) -> "SmbShare":
        s = cls(Path(root), addrs)
        for sub in ("private", "lock", "state", "cache", "pid", "ncalrpc", "log", "share", "home/.smb"):
            (s.root / sub).mkdir(parents=True, exist_ok=True)
        conf = s.root / "smb.conf"
        conf.write_text(SMB_CONF.format(root=s.root, addrs=" ".join(addrs), share=SHARE, share_dir=s.share_dir))
        (s.home / ".smb" / "smb.conf").write_text("[global]\n  client min protocol = SMB2\n"
                                                  "  name resolve order = host\n")
        s.netfs_conf.write_text('auth "guest" ""\nshow_hidden_hosts "true"\nsmb_query_browsers "false"\n')
        s.netfs_conf.chmod(0o600)
        with open(s.root / "log" / "smbd.out", "wb") as log:
            s._smbd = subprocess.Popen(["smbd", "--foreground", "--no-process-group", "--debug-stdout", "-s", str(conf)],
                                       stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        end = time.monotonic() + timeout
        while True:
            if s._smbd.poll() is not None:
                raise RuntimeError("smbd exited: " + (s.root / "log" / "smbd.out").read_text()[-2000:])
            r = subprocess.run(["smbclient", "-N", f"//{addrs[0]}/{SHARE}", "-c", "ls"], capture_output=True,
                               text=True, env={**os.environ, "HOME": str(s.home)})
            if r.returncode == 0:
                return s
            if time.monotonic() > end:
                s.stop()
                raise RuntimeError(f"smbd did not answer on {addrs[0]}: {r.stdout}{r.stderr}")
            time.sleep(0.2)

    def mount(self, i: int, netns: str, addr: str, timeout: float = 30) -> Path:
        """Mount the share from inside network namespace `netns`, reaching smbd at `addr`; the
        share's folder as that host sees it."""
        mp = self.root / f"mnt{i}"
        mp.mkdir(exist_ok=True)
        with open(self.root / "log" / f"smbnetfs{i}.out", "wb") as log:
            p = subprocess.Popen(["nsenter", f"--net=/run/netns/{netns}", "smbnetfs", str(mp), "-f", "-o",
                                  f"config={self.netfs_conf},log_file={self.root}/log/smbnetfs{i}.log"],
                                 stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HOME": str(self.home)},
                                 start_new_session=True)
        self._mounts.append((mp, p))
        d = mp / addr / SHARE
        end = time.monotonic() + timeout
        while not d.is_dir():
            if p.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"smbnetfs for host {i} did not show the share: " +
                                   (self.root / "log" / f"smbnetfs{i}.out").read_text()[-2000:])
            time.sleep(0.1)
        return d

    def stop(self) -> None:
        for mp, p in self._mounts:
            subprocess.run(["fusermount", "-u", "-z", str(mp)], capture_output=True)
            samba_rig._end_group(p)
        self._mounts = []
        if self._smbd is not None:
            samba_rig._end_group(self._smbd)
            self._smbd = None
