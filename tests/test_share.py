"""Discovery and publish-style file operations on a real SMB share (Samba on loopback + smbnetfs)."""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest

from watcher import config
from watcher.discover import Discovery
from watcher.publish import fsync_dir, write_synced

try:
    from samba_rig import SambaRig, start_samba
except ImportError:  # tests/ imported as a package
    from tests.samba_rig import SambaRig, start_samba

pytestmark = pytest.mark.share


def Watch(**over) -> config.Watch:
    """The product's own watch settings, with this file's defaults."""
    return replace(config.Watch(mode="auto", poll_interval=0.5, settle_seconds=2.0, rescan_interval=300.0), **over)


@pytest.fixture(scope="module")
def samba(tmp_path_factory) -> SambaRig:
    rig = start_samba(tmp_path_factory.mktemp("samba"))
    try:
        yield rig
    finally:
        rig.stop()


@pytest.fixture
def inbox(samba, request) -> tuple[SambaRig, str]:
    """A fresh sub-folder of the share per test: (rig, its name)."""
    name = request.node.name.replace("[", "_").replace("]", "")
    (samba.share_dir / name).mkdir()
    return samba, name


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_auto_mode_polls_on_the_share(inbox):
    rig, name = inbox
    d = Discovery(rig.mount_dir / name, Watch())
    assert d.fstype == "fuse.smbnetfs"
    assert d.effective_mode == "poll"


def test_photos_from_another_client_are_taken_once_and_complete(inbox, tmp_path):
    rig, name = inbox
    inbox_dir = rig.mount_dir / name
    sources = {}
    for i, rel in enumerate(["IMG_1.jpg", "scans/IMG_2.png", "scans/2026/IMG_3.JPG"]):
        src = tmp_path / f"src{i}"
        src.write_bytes(os.urandom(50_000 + i))
        sources[rel] = src
    junk = tmp_path / "junk"
    junk.write_bytes(b"junk")
    slow_chunks = [os.urandom(65536) for _ in range(6)]
    slow_rel = "scans/IMG_slow.jpg"
    slow_sha = hashlib.sha256(b"".join(slow_chunks)).hexdigest()

    d = Discovery(inbox_dir, Watch())
    d.start()
    got: list = []
    try:
        assert d.poll() == [] and d.effective_mode == "poll"
        for rel, src in sources.items():
            rig.put(src, f"{name}/{rel}")
        for j in (".DS_Store", "Thumbs.db", "scans/desktop.ini", "._IMG_1.jpg"):
            rig.put(junk, f"{name}/{j}")
        rig.put(sources["IMG_1.jpg"], f"{name}/IMG_4.jpg.part")  # written under a temp name ...
        writer = rig.put_slowly(slow_chunks, f"{name}/{slow_rel}", gap=0.5)
        early: list = []
        sizes_seen = set()
        while writer.is_alive():
            for c in d.poll():
                early.append(c)
                got.append(c)
            try:
                sizes_seen.add((inbox_dir / slow_rel).stat().st_size)
            except FileNotFoundError:
                pass
            time.sleep(0.1)
        assert writer.errors == []
        assert len(sizes_seen) >= 3  # the mount really saw the file grow ...
        assert [c.rel for c in early if c.rel == slow_rel] == []  # ... and it was never taken then
        rig.rename(f"{name}/IMG_4.jpg.part", f"{name}/IMG_4.jpg")  # ... and renamed at the end
        end = time.monotonic() + 20
        while time.monotonic() < end and len(got) < 5:
            got += d.poll()
            time.sleep(0.1)
        for _ in range(15):  # and nothing comes twice
            got += d.poll()
            time.sleep(0.1)
    finally:
        d.stop()
    assert sorted(c.rel for c in got) == sorted([*sources, "IMG_4.jpg", slow_rel]), [(c.rel, c.size, c.mtime_ns) for c in got]
    for c in got:
        # Reported only when complete: what the candidate says is the whole file.
        server = rig.share_dir / name / c.rel
        assert c.size == server.stat().st_size
        assert c.path == inbox_dir / c.rel
    slow = next(c for c in got if c.rel == slow_rel)
    assert slow.size == 6 * 65536 and sha(slow.path) == slow_sha
    assert sha(inbox_dir / "scans/IMG_2.png") == sha(sources["scans/IMG_2.png"])


def test_publish_steps_through_the_mount(inbox):
    """What publish does on a share: temp file in a hidden folder → fsync → rename into place →
    fsync the folder; the server holds the bytes, and discovery never reports the temp file."""
    rig, name = inbox
    out = rig.mount_dir / name
    tmpdir = out / ".photoenhanced-tmp"
    tmpdir.mkdir()
    (out / "a" / "b").mkdir(parents=True)
    data = os.urandom(300_000)
    d = Discovery(out, Watch(settle_seconds=0.5))
    seen = d.poll()
    tmp = tmpdir / "job-1.jpg"
    write_synced(tmp, data)                          # publish's own write: O_EXCL, fsync
    time.sleep(1)
    seen += d.poll()
    os.replace(tmp, out / "a" / "b" / "IMG_1.jpg")  # across folders on the share: one rename
    for folder in (tmpdir, out / "a" / "b"):
        fsync_dir(folder)
    server = rig.share_dir / name / "a" / "b" / "IMG_1.jpg"
    assert server.read_bytes() == data
    assert not (rig.share_dir / name / ".photoenhanced-tmp" / "job-1.jpg").exists()
    assert (out / "a" / "b" / "IMG_1.jpg").stat().st_size == len(data)
    # A name already taken is detected before the rename (publish never overwrites).
    with pytest.raises(FileExistsError):
        os.open(out / "a" / "b" / "IMG_1.jpg", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    end = time.monotonic() + 3
    while time.monotonic() < end:
        seen += d.poll()
        time.sleep(0.1)
    assert [c.rel for c in seen] == ["a/b/IMG_1.jpg"]  # the result, once; never the temp file
    # Deleting through the mount (archive/delete of the original) reaches the server.
    (out / "a" / "b" / "IMG_1.jpg").unlink()
    assert not server.exists()


def test_same_name_again_after_forget_on_the_share(inbox, tmp_path):
    """smbnetfs gives every entry the same inode number: a photo moved away and a new one put at
    the same name before the next listing is still found, once the daemon has forgotten the old."""
    rig, name = inbox
    first, second = tmp_path / "first", tmp_path / "second"
    first.write_bytes(os.urandom(1000))
    second.write_bytes(os.urandom(2000))
    d = Discovery(rig.mount_dir / name, Watch(settle_seconds=1.0, poll_interval=0.5))
    rig.put(first, f"{name}/IMG.jpg")
    got, end = [], time.monotonic() + 10
    while time.monotonic() < end and not got:
        got += d.poll()
        time.sleep(0.1)
    assert [(c.rel, c.size) for c in got] == [("IMG.jpg", 1000)]
    rig.rename(f"{name}/IMG.jpg", "archived.jpg")  # the daemon archives it ...
    rig.put(second, f"{name}/IMG.jpg")  # ... and the scanner saves the next page with that name
    d.forget("IMG.jpg")
    got, end = [], time.monotonic() + 10
    while time.monotonic() < end and not got:
        got += d.poll()
        time.sleep(0.1)
    assert [(c.rel, c.size) for c in got] == [("IMG.jpg", 2000)]
