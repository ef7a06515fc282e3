"""Discovery on real folders: settle, ignore rules, refusal of special files, events vs scans."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from watcher import config
from watcher.discover import (
    ALWAYS_IGNORED,
    Discovery,
    IgnoreRules,
    filesystem_type,
    is_network_fs,
    read_mountinfo,
    resolve_mode,
)


def Watch(**over) -> config.Watch:
    """The product's own watch settings, with this file's defaults."""
    return replace(config.Watch(mode="poll", poll_interval=1.0, settle_seconds=1.0, rescan_interval=300.0), **over)


def write(path: Path, data: bytes = b"\xff\xd8photo") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def rels(cands) -> list[str]:
    return [c.rel for c in cands]


def drain(d: Discovery, start: float, until: float, step: float = 0.5) -> list:
    out, t = [], start
    while t <= until:
        out += d.poll(now=t)
        t += step
    return out


# ------------------------------------------------------------------ settle (virtual clock)

def test_settled_file_is_returned_once_after_settle(tmp_path):
    write(tmp_path / "a" / "b" / "IMG_001.jpg")
    d = Discovery(tmp_path, Watch(settle_seconds=2))
    assert d.poll(now=0) == []  # seen, not yet settled
    assert d.poll(now=1.9) == []
    got = d.poll(now=2.0)
    assert rels(got) == ["a/b/IMG_001.jpg"]
    c = got[0]
    assert c.path == tmp_path / "a" / "b" / "IMG_001.jpg" and c.size == 7
    assert c.mtime_ns == (tmp_path / "a/b/IMG_001.jpg").stat().st_mtime_ns
    assert drain(d, 3, 20) == []  # never again for the same (rel, size, mtime)
    assert d.problem is None


def test_file_that_changes_settles_again(tmp_path):
    p = write(tmp_path / "x.png", b"1")
    d = Discovery(tmp_path, Watch(settle_seconds=2, poll_interval=1))
    d.poll(now=0)
    with open(p, "ab") as fh:
        fh.write(b"22")
    assert d.poll(now=2) == []  # changed since first seen: timer restarts
    assert d.poll(now=3.9) == []
    got = d.poll(now=4)
    assert [(c.rel, c.size) for c in got] == [("x.png", 3)]


def test_rewritten_reported_file_is_reported_again_by_full_scan(tmp_path):
    p = write(tmp_path / "x.jpg", b"1")
    d = Discovery(tmp_path, Watch(settle_seconds=1, poll_interval=1, rescan_interval=10))
    assert rels(drain(d, 0, 3)) == ["x.jpg"]
    p.write_bytes(b"another content")  # in place, same name: the folder's mtime stays
    os.utime(p, ns=(time.time_ns(), time.time_ns() + 5_000_000_000))
    got = drain(d, 4, 14)
    assert [(c.rel, c.size) for c in got] == [("x.jpg", 15)]


def test_vanished_candidate_is_dropped_quietly(tmp_path):
    p = write(tmp_path / "gone.jpg")
    d = Discovery(tmp_path, Watch(settle_seconds=1))
    d.poll(now=0)
    p.unlink()
    with capture_logs() as logs:
        assert drain(d, 1, 5) == []
    assert [e for e in logs if e["log_level"] in ("warning", "error")] == []
    assert d.settling == 0


def test_forget_lets_a_new_file_at_the_same_path_be_reported(tmp_path):
    p = write(tmp_path / "sub" / "same.jpg", b"first")
    d = Discovery(tmp_path, Watch(settle_seconds=1, poll_interval=1))
    assert rels(drain(d, 0, 3)) == ["sub/same.jpg"]
    p.unlink()  # the daemon moved it to archive/
    d.forget("sub/same.jpg")
    assert drain(d, 4, 6) == []
    write(p, b"second one")
    got = drain(d, 7, 12)
    assert [(c.rel, c.size) for c in got] == [("sub/same.jpg", 10)]
    # Moved away and a new one dropped at once, before the folder is listed again (the new file
    # may even get the old inode number back): forget() alone makes it new to discovery.
    os.rename(p, tmp_path / "elsewhere.jpg.tmp")
    write(p, b"third version")
    d.forget("sub/same.jpg")
    got = drain(d, 12.5, 16)
    assert [(c.rel, c.size) for c in got] == [("sub/same.jpg", 13)]


# ------------------------------------------------------------------ what is a candidate

JUNK = [
    ".DS_Store", "._IMG_1.jpg", "Thumbs.db", "THUMBS.DB", "desktop.ini", "@eaDir/IMG_2.jpg",
    "#recycle/IMG_3.jpg", ".stfolder", "__MACOSX/x/IMG_4.jpg", "IMG_5.jpg.part", "IMG_6.JPG.PART",
    "~$IMG_7.jpg", "IMG_8.jpg.crdownload", "IMG_9.jpg.tmp", ".photoenhanced-tmp/IMG_10.jpg",
    ".hidden/IMG_11.jpg", "a/.git/IMG_12.jpg", "mine/private-IMG_13.jpg", "skipme/IMG_14.jpg",
]


def test_junk_and_ignored_paths_are_never_returned(tmp_path):
    for rel in JUNK:
        write(tmp_path / rel)
    write(tmp_path / "keep" / "IMG_ok.jpg")
    d = Discovery(tmp_path, Watch(ignore=("private-*", "skipme")))
    with capture_logs() as logs:
        got = drain(d, 0, 5)
    assert rels(got) == ["keep/IMG_ok.jpg"]
    assert not [e for e in logs if e.get("path", "").split("/")[-1] in {Path(j).name for j in JUNK}]


def test_ignore_rules_cover_the_contract_list():
    rules = IgnoreRules(("raw-*",))
    assert all(rules.ignored(p.replace("*", "x")) for p in ALWAYS_IGNORED)
    assert rules.ignored("@EADIR/x.jpg") and rules.ignored("a/#Recycle/b.jpg")
    assert rules.ignored("raw-1.jpg") and not rules.ignored("RAW-1.jpg")  # user patterns: exact case
    assert not rules.ignored("a/b/IMG_001.jpg")


def test_extensions_any_case_raw_and_others_left_alone_with_one_event(tmp_path):
    names = ["A.JPG", "b.jpeg", "c.Png", "d.webp", "e.TIF", "f.tiff", "g.bmp", "h.HEIC", "i.heif"]
    for n in names:
        write(tmp_path / n)
    for n in ["r.CR2", "r2.nef", "clip.mp4", "notes.txt", "noext", "IMG.xmp"]:
        write(tmp_path / n)
    d = Discovery(tmp_path, Watch(settle_seconds=1, rescan_interval=2, poll_interval=1))
    with capture_logs() as logs:
        got = drain(d, 0, 10)
    assert sorted(rels(got)) == sorted(names)
    skipped = sorted(e["path"] for e in logs if e["event"] == "discover.skipped")
    assert skipped == ["clip.mp4", "noext", "notes.txt", "r.CR2", "r2.nef"]  # once each, despite rescans
    assert any("RAW" in e["reason"] for e in logs if e["event"] == "discover.skipped" and e["path"] == "r.CR2")
    assert (tmp_path / "r.CR2").exists()


def test_symlinks_fifos_sockets_are_refused_once_and_never_followed(tmp_path):
    inbox, outside = tmp_path / "inbox", tmp_path / "outside"
    write(outside / "secret.jpg")
    write(outside / "dir" / "inner.jpg")
    inbox.mkdir()
    (inbox / "link.jpg").symlink_to(outside / "secret.jpg")
    (inbox / "linkdir").symlink_to(outside / "dir")
    (inbox / "dangling.jpg").symlink_to(outside / "nothing.jpg")
    os.mkfifo(inbox / "pipe.jpg")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(inbox / "sock.jpg"))
    os.mknod(inbox / "dev.jpg", 0o600 | 0o020000, os.makedev(1, 3))  # a character device
    write(inbox / "real.jpg")
    try:
        d = Discovery(inbox, Watch(settle_seconds=1, rescan_interval=2))
        with capture_logs() as logs:
            got = drain(d, 0, 10)
    finally:
        sock.close()
    assert rels(got) == ["real.jpg"]
    refused = {e["path"]: e["reason"] for e in logs if e["event"] == "discover.refused"}
    assert sorted(refused) == ["dangling.jpg", "dev.jpg", "link.jpg", "linkdir", "pipe.jpg", "sock.jpg"]
    assert [e["log_level"] for e in logs if e["event"] == "discover.refused"] == ["warning"] * 6
    assert refused["pipe.jpg"].startswith("fifo") and refused["sock.jpg"].startswith("socket")
    assert refused["linkdir"].startswith("symlink")


def test_exclude_and_non_recursive(tmp_path):
    write(tmp_path / "top.jpg")
    write(tmp_path / "out" / "result.jpg")
    write(tmp_path / "deep" / "x.jpg")
    d = Discovery(tmp_path, Watch(), exclude=[tmp_path / "out"])
    assert sorted(rels(drain(d, 0, 3))) == ["deep/x.jpg", "top.jpg"]
    flat = Discovery(tmp_path, Watch(recursive=False))
    assert rels(drain(flat, 0, 3)) == ["top.jpg"]


def test_missing_inbox_is_a_problem_not_an_error(tmp_path):
    inbox = tmp_path / "share"
    d = Discovery(inbox, Watch(mode="auto", settle_seconds=1))
    d.start()
    try:
        assert d.poll(now=0) == []
        assert d.problem == f"inbox missing: {inbox}"
        write(inbox / "late.jpg")  # the share is mounted again
        got = drain(d, 1, 4)
        assert rels(got) == ["late.jpg"] and d.problem is None
        os.rename(inbox, tmp_path / "away")
        assert d.poll(now=5) == [] and d.problem == f"inbox missing: {inbox}"
    finally:
        d.stop()


# ------------------------------------------------------------------ poll cost levers

def test_quick_scan_skips_unchanged_folders_but_sees_new_files(tmp_path):
    for i in range(5):
        for j in range(20):
            write(tmp_path / f"d{i}" / f"f{j}.jpg")
    d = Discovery(tmp_path, Watch(settle_seconds=1, poll_interval=1))
    assert len(drain(d, 0, 2.5)) == 100
    d.poll(now=3)  # a listing at least DIR_TRUST_MARGIN after the first: folders are trusted now
    d.poll(now=4)
    assert d.last_scan["full"] is False and d.last_scan["listed"] == 0 and d.last_scan["stated"] == 0
    assert d.last_scan["dirs"] == 6
    write(tmp_path / "d3" / "new.jpg")  # creating a file changes its folder's mtime
    os.rename(write(tmp_path / "d1" / "up.jpg.part"), tmp_path / "d1" / "up.jpg")
    d.poll(now=5)
    assert d.last_scan["listed"] == 2
    assert d.last_scan["stated"] == 2  # in a changed folder only new names (or new inodes) are stat'd
    assert sorted(rels(drain(d, 6, 8))) == ["d1/up.jpg", "d3/new.jpg"]
    # A new file renamed over a name already reported (a new inode) is a new candidate.
    os.replace(write(tmp_path / "d0" / "f5.jpg.part", b"replacement"), tmp_path / "d0" / "f5.jpg")
    assert [(c.rel, c.size) for c in drain(d, 8.5, 10.5)] == [("d0/f5.jpg", 11)]
    (tmp_path / "d4" / "f0.jpg").unlink()
    (tmp_path / "d2").rename(tmp_path / "d2-renamed")
    got = drain(d, 11, 14)
    assert sorted(rels(got)) == [f"d2-renamed/f{j}.jpg" for j in sorted(range(20), key=str)]


def test_scan_of_a_racing_tree_never_raises(tmp_path):
    stop = threading.Event()

    def churn():
        i = 0
        while not stop.is_set():
            sub = tmp_path / f"c{i % 7}"
            try:
                sub.mkdir(exist_ok=True)
                write(sub / f"{i}.jpg")
                for p in list(sub.iterdir())[:3]:
                    p.unlink(missing_ok=True)
                if i % 11 == 0:
                    subprocess.run(["rm", "-rf", str(sub)], check=False)
            except OSError:
                pass
            i += 1

    t = threading.Thread(target=churn)
    t.start()
    try:
        d = Discovery(tmp_path, Watch(settle_seconds=0.05, poll_interval=0.01, rescan_interval=0.05))
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            for c in d.poll():
                assert c.rel.endswith(".jpg")
    finally:
        stop.set()
        t.join()
    assert d.problem is None


# ------------------------------------------------------------------ events mode (real inotify)

def wait_for(d: Discovery, want: int, timeout: float = 10.0) -> list:
    got, end = [], time.monotonic() + timeout
    while time.monotonic() < end and len(got) < want:
        got += d.poll()
        time.sleep(0.05)
    time.sleep(0.3)
    got += d.poll()
    return got


def test_events_mode_finds_files_between_rescans(tmp_path):
    d = Discovery(tmp_path, Watch(mode="auto", settle_seconds=0.3, rescan_interval=3600))
    assert d.effective_mode == "events"
    d.start()
    try:
        d.poll()  # the start-up scan
        write(tmp_path / "n1" / "IMG_1.jpg")
        staged = tmp_path.parent / (tmp_path.name + "-staged")
        write(staged / "deep" / "IMG_2.jpg")
        os.rename(staged, tmp_path / "moved-in")  # a folder moved in with files already inside
        os.rename(write(tmp_path / "IMG_3.jpg.part"), tmp_path / "IMG_3.jpg")
        got = wait_for(d, 3)
    finally:
        d.stop()
    assert sorted(rels(got)) == ["IMG_3.jpg", "moved-in/deep/IMG_2.jpg", "n1/IMG_1.jpg"]


@pytest.mark.parametrize("mode", ["events", "poll"])
def test_slow_writer_is_taken_once_complete(tmp_path, mode):
    d = Discovery(tmp_path, Watch(mode=mode, settle_seconds=0.8, poll_interval=0.2, rescan_interval=0.5))
    d.start()
    seen: list = []
    try:
        d.poll()
        p = tmp_path / "slow" / "IMG_slow.jpg"
        p.parent.mkdir()
        with open(p, "wb") as fh:
            for _ in range(8):  # 8 chunks, 0.35 s apart: ~2.8 s of writing
                fh.write(b"x" * 1000)
                fh.flush()
                seen += d.poll()
                t_end = time.monotonic() + 0.35
                while time.monotonic() < t_end:
                    seen += d.poll()
                    time.sleep(0.05)
        assert seen == []  # never while being written
        seen += wait_for(d, 1, timeout=5)
    finally:
        d.stop()
    assert [(c.rel, c.size) for c in seen] == [("slow/IMG_slow.jpg", 8000)]


# ------------------------------------------------------------------ auto mode

def test_mountinfo_parsing_and_longest_prefix(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
        "40 22 0:40 / /srv/photo\\040share rw shared:2 - cifs //nas/p rw,vers=3\n"
        "41 22 0:41 / /mnt/fuse rw - fuse.smbnetfs smbnetfs rw\n"
        "42 22 0:42 / /mnt/n rw - nfs4 nas:/x rw\n"
    )
    mounts = read_mountinfo(str(info))
    assert ("/srv/photo share", "cifs") in mounts
    assert filesystem_type(Path("/srv/photo share/in"), mounts) == "cifs"
    assert filesystem_type(Path("/srv/photo"), mounts) == "ext4"
    assert filesystem_type(Path("/mnt/fuse/x/y"), mounts) == "fuse.smbnetfs"
    assert [is_network_fs(t) for t in ("cifs", "smb3", "nfs", "nfs4", "fuse.smbnetfs", "ext4", "tmpfs", "fuseblk")] == [
        True, True, True, True, True, False, False, False]


def test_auto_mode_on_this_machine(tmp_path):
    mode, fstype = resolve_mode("auto", tmp_path)
    assert fstype == filesystem_type(tmp_path) and fstype is not None
    assert mode == ("poll" if is_network_fs(fstype) else "events")
    assert resolve_mode("poll", tmp_path)[0] == "poll"
    with pytest.raises(ValueError):
        resolve_mode("sometimes", tmp_path)


UNPRIVILEGED = r"""
import json, sys, time
from pathlib import Path
from structlog.testing import capture_logs
from watcher.config import Watch
from watcher.discover import Discovery

d = Discovery(Path(sys.argv[1]), Watch(mode="poll", poll_interval=1.0, settle_seconds=1.0, rescan_interval=2.0))
got = []
with capture_logs() as logs:
    for t in range(8):
        got += [c.rel for c in d.poll(now=float(t))]
print(json.dumps({"got": got, "events": [[e["event"], e.get("path")] for e in logs
                                          if e["log_level"] == "warning"]}))
"""


def test_unreadable_subfolder_is_logged_once_and_skipped(tmp_path):
    """EACCES on a sub-folder. Root ignores modes, so the scan runs in a process without
    CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH (setpriv drops them from the bounding set)."""
    import json
    import shutil
    import sys

    write(tmp_path / "ok" / "IMG_1.jpg")
    write(tmp_path / "locked" / "IMG_2.jpg")
    (tmp_path / "locked").chmod(0o000)
    cmd = [sys.executable, "-c", UNPRIVILEGED, str(tmp_path)]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.fail("setpriv (util-linux) is needed to drop root's file-permission override")
        cmd = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", *cmd]
    repo = Path(__file__).resolve().parent.parent
    try:
        res = subprocess.run(cmd, cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)},
                             capture_output=True, text=True, timeout=60)
    finally:
        (tmp_path / "locked").chmod(0o755)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["got"] == ["ok/IMG_1.jpg"]
    assert out["events"] == [["discover.unreadable", "locked"]]  # once, despite the rescans


def test_the_observer_never_walks_a_moved_in_folder_by_path(tmp_path):
    """watchdog's inotify emitter walks a folder that was moved into the tree (os.walk by path) to
    make up events for its content; if the folder was swapped for a symlink meanwhile, that walk
    lists the folder outside (found by the fault campaign's audit). With the product's observer,
    the names the emitter calls make up nothing and list nothing: a symlink to an outside folder
    handed to them is never opened (an audit hook watches that folder)."""
    import sys
    from watcher.discover import _observer
    outside = tmp_path / "outside"
    (outside / "deep").mkdir(parents=True)
    (outside / "secret.jpg").write_bytes(b"x")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "moved-in").symlink_to(outside)
    seen: list[str] = []
    mark = str(outside)

    def hook(event, args):
        if event in ("os.scandir", "os.listdir") and args and isinstance(args[0], (str, bytes)):
            if os.path.realpath(os.fsdecode(args[0])).startswith(mark):
                seen.append(f"{event} {os.fsdecode(args[0])}")
    sys.addaudithook(hook)                     # stays for the process; it only looks at `outside`
    observer = _observer()
    from watchdog.observers import inotify as wi
    made = list(wi.generate_sub_created_events(str(inbox / "moved-in")))
    made += list(wi.generate_sub_moved_events(str(inbox / "elsewhere"), str(inbox / "moved-in")))
    assert made == [] and seen == []
    import watchdog.events as we                # the library's own function does list it: the test can fail
    list(we.generate_sub_created_events(str(inbox / "moved-in")))
    assert seen, "the audit hook saw nothing: this check would not notice a walk"
    del observer
