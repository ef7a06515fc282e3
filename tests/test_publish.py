"""Contract tests for watcher/publish.py (plans: temp → fsync → rename; collisions; companions;
cross-file-system moves; recovery after a crash at every step; disk full) and for start-up recovery
through watcher.worker.recover() with a real Queue and Worker. Real folders, real mounts, no mocks."""
from __future__ import annotations

import json
import os
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import PY, ROOT, write_config, readonly
from watcher import config as config_mod
from watcher.errors import FolderError
from watcher.publish import TMP_DIR, PlanBroken, PlanConflict, Publisher
from watcher.queue import DONE, FAILED, PENDING, Queue
from watcher.worker import Worker, recover

ORIG = b"\xff\xd8original-bytes\x00" * 50
RESULT = b"\x89PNGresult-bytes" * 300
MTIME_NS = 1_600_000_000_123_456_789


@dataclass
class Dirs:
    root: Path
    inbox: Path
    outbox: Path
    failed: Path
    archive: Path

    def publisher(self, originals: str = "archive") -> Publisher:
        return Publisher(self.inbox, self.outbox, self.failed, self.archive, originals)


@pytest.fixture
def dirs(tmp_path) -> Dirs:
    d = Dirs(tmp_path, *(tmp_path / n for n in ("inbox", "outbox", "failed", "archive")))
    for p in (d.inbox, d.outbox, d.failed, d.archive):
        p.mkdir()
    return d


def drop(inbox: Path, rel: str, data: bytes = ORIG, mtime_ns: int = MTIME_NS) -> tuple[int, int]:
    p = inbox / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    os.utime(p, ns=(mtime_ns, mtime_ns))
    st = os.stat(p)
    return st.st_size, st.st_mtime_ns


def files(root: Path) -> dict[str, bytes]:
    """Every regular file below root, by relative path → content."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = Path(dirpath) / n
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


def tmp_files(*roots: Path) -> list[str]:
    return [f"{r.name}/{k}" for r in roots for k in files(r) if k.startswith(TMP_DIR + "/")]


def sidecar_of(path: Path) -> dict:
    return json.loads(path.read_text())




@contextmanager
def tmpfs(path: Path, size: str = "4m"):
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs (needs root): {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def plan_done(pub: Publisher, rel: str, job: int = 7, result: bytes = RESULT, name: str | None = None) -> dict:
    size, mtime = _ident(pub.inbox / rel)
    return pub.plan_done(job, rel, size, mtime, result, name or Path(rel).name, {"status": "done", "job": job})


def plan_failed(pub: Publisher, rel: str, job: int = 9) -> dict:
    size, mtime = _ident(pub.inbox / rel)
    return pub.plan_failed(job, rel, size, mtime, {"status": "failed", "job": job,
                                                   "error": {"kind": "undecodable", "message": "bad"}})


def _ident(p: Path) -> tuple[int, int]:
    st = os.lstat(p)
    return st.st_size, st.st_mtime_ns


# --- done --------------------------------------------------------------------------------------

def test_plan_done_writes_only_fsynced_temp_files_until_executed(dirs):
    drop(dirs.inbox, "a/b/IMG.jpg")
    pub = dirs.publisher()
    plan = plan_done(pub, "a/b/IMG.jpg")
    # before execute: only temp files, all inside the hidden temp folder of the outbox
    out = files(dirs.outbox)
    assert out and all(k.startswith(TMP_DIR + "/") for k in out)
    assert sorted(v for v in out.values() if v == RESULT) == [RESULT]
    assert any(k.startswith(f"{TMP_DIR}/job7-result-") for k in out)
    assert any(k.startswith(f"{TMP_DIR}/job7-sidecar-") for k in out)
    assert files(dirs.archive) == {} and files(dirs.failed) == {}
    assert (dirs.inbox / "a/b/IMG.jpg").read_bytes() == ORIG
    assert plan["kind"] == "done"
    assert plan["outputs"] == [str(dirs.outbox / "a/b/IMG.jpg")]
    assert plan["sidecar"] == str(dirs.outbox / "a/b/IMG.jpg.json")
    assert json.loads(json.dumps(plan)) == plan                     # the queue stores it as JSON


def test_execute_places_result_and_sidecar_and_archives_the_original(dirs):
    drop(dirs.inbox, "a/b/IMG.jpg")
    pub = dirs.publisher()
    plan = plan_done(pub, "a/b/IMG.jpg")
    pub.execute(plan)
    assert (dirs.outbox / "a/b/IMG.jpg").read_bytes() == RESULT
    side = sidecar_of(dirs.outbox / "a/b/IMG.jpg.json")
    assert side["status"] == "done" and side["job"] == 7
    assert side["outputs"][0]["path"] == str(dirs.outbox / "a/b/IMG.jpg")
    archived = dirs.archive / "a/b/IMG.jpg"
    assert archived.read_bytes() == ORIG and os.stat(archived).st_mtime_ns == MTIME_NS
    assert not (dirs.inbox / "a/b/IMG.jpg").exists()
    assert set(files(dirs.outbox)) == {"a/b/IMG.jpg", "a/b/IMG.jpg.json"}
    assert set(files(dirs.archive)) == {"a/b/IMG.jpg"}
    assert files(dirs.failed) == {}


def test_result_name_may_differ_from_the_input(dirs):
    drop(dirs.inbox, "IMG.heic")
    pub = dirs.publisher()
    pub.execute(plan_done(pub, "IMG.heic", name="IMG.jpg"))
    assert set(files(dirs.outbox)) == {"IMG.jpg", "IMG.jpg.json"}
    assert set(files(dirs.archive)) == {"IMG.heic"}


def test_originals_delete_removes_the_original(dirs):
    drop(dirs.inbox, "sub/IMG.jpg")
    pub = dirs.publisher(originals="delete")
    pub.execute(plan_done(pub, "sub/IMG.jpg"))
    assert not (dirs.inbox / "sub/IMG.jpg").exists()
    assert files(dirs.archive) == {}
    assert (dirs.outbox / "sub/IMG.jpg").read_bytes() == RESULT


def test_delete_does_not_remove_a_changed_file(dirs):
    drop(dirs.inbox, "IMG.jpg")
    pub = dirs.publisher(originals="delete")
    plan = plan_done(pub, "IMG.jpg")
    drop(dirs.inbox, "IMG.jpg", b"new content dropped meanwhile", MTIME_NS + 5)
    pub.execute(plan)
    assert (dirs.inbox / "IMG.jpg").read_bytes() == b"new content dropped meanwhile"


# --- collisions --------------------------------------------------------------------------------

@pytest.mark.parametrize("taken, expected", [
    ({"IMG.jpg"}, "IMG (1).jpg"),
    ({"IMG.jpg.json"}, "IMG (1).jpg"),
    ({"IMG.jpg", "IMG (1).jpg.json"}, "IMG (2).jpg"),
    ({"IMG.jpg", "IMG (1).jpg", "IMG (2).jpg"}, "IMG (3).jpg"),
])
def test_collisions_take_the_next_free_name_and_never_overwrite(dirs, taken, expected):
    drop(dirs.inbox, "d/IMG.jpg")
    (dirs.outbox / "d").mkdir()
    for name in taken:
        (dirs.outbox / "d" / name).write_bytes(b"theirs " + name.encode())
    pub = dirs.publisher()
    plan = plan_done(pub, "d/IMG.jpg")
    assert plan["outputs"] == [str(dirs.outbox / "d" / expected)]
    pub.execute(plan)
    for name in taken:
        assert (dirs.outbox / "d" / name).read_bytes() == b"theirs " + name.encode()
    assert (dirs.outbox / "d" / expected).read_bytes() == RESULT
    assert sidecar_of(dirs.outbox / "d" / (expected + ".json"))["outputs"][0]["path"] == str(dirs.outbox / "d" / expected)


def test_archive_collision_keeps_the_earlier_original(dirs):
    drop(dirs.inbox, "IMG.jpg")
    (dirs.archive / "IMG.jpg").write_bytes(b"archived yesterday")
    pub = dirs.publisher()
    pub.execute(plan_done(pub, "IMG.jpg"))
    assert (dirs.archive / "IMG.jpg").read_bytes() == b"archived yesterday"
    assert (dirs.archive / "IMG (1).jpg").read_bytes() == ORIG


def test_free_name_without_extension_and_with_reserved_names(tmp_path):
    (tmp_path / "README").write_text("x")
    assert Publisher.free_name(tmp_path, "README") == tmp_path / "README (1)"
    assert Publisher.free_name(tmp_path, "a.b.png", taken={tmp_path / "a.b.png"}) == tmp_path / "a.b (1).png"


def test_a_file_appearing_at_the_result_name_after_planning_is_never_overwritten(dirs):
    drop(dirs.inbox, "IMG.jpg")
    pub = dirs.publisher()
    plan = plan_done(pub, "IMG.jpg")
    (dirs.outbox / "IMG.jpg").write_bytes(b"someone else's")
    with pytest.raises(PlanConflict):                               # the photo's problem: planned again
        pub.execute(plan)
    assert (dirs.outbox / "IMG.jpg").read_bytes() == b"someone else's"
    assert (dirs.inbox / "IMG.jpg").read_bytes() == ORIG            # the original stays until it is safe


def test_a_foreign_file_at_the_archive_name_never_costs_the_original(dirs):
    drop(dirs.inbox, "IMG.jpg")
    pub = dirs.publisher()
    plan = plan_done(pub, "IMG.jpg")
    (dirs.archive / "IMG.jpg").write_bytes(b"restored by the user meanwhile")
    with pytest.raises(PlanConflict):                               # never a folder problem (no endless wait)
        pub.execute(plan)
    kept = [p for p in (dirs.inbox / "IMG.jpg", *dirs.archive.glob("IMG*.jpg")) if p.exists() and p.read_bytes() == ORIG]
    assert kept, "the original is gone from inbox and archive"
    assert (dirs.archive / "IMG.jpg").read_bytes() == b"restored by the user meanwhile"


# --- failed ------------------------------------------------------------------------------------

def test_plan_failed_moves_the_original_byte_identical_with_the_sidecar_beside_it(dirs):
    drop(dirs.inbox, "x/y/BAD.png")
    pub = dirs.publisher()
    plan = plan_failed(pub, "x/y/BAD.png")
    assert plan["kind"] == "failed" and plan["outputs"] == [str(dirs.failed / "x/y/BAD.png")]
    assert all(k.startswith(TMP_DIR + "/") for k in files(dirs.failed))
    pub.execute(plan)
    moved = dirs.failed / "x/y/BAD.png"
    assert moved.read_bytes() == ORIG and os.stat(moved).st_mtime_ns == MTIME_NS
    side = sidecar_of(dirs.failed / "x/y/BAD.png.json")
    assert side["status"] == "failed" and side["error"]["kind"] == "undecodable"
    assert side["original"] == str(moved)
    assert not (dirs.inbox / "x/y/BAD.png").exists()
    assert set(files(dirs.failed)) == {"x/y/BAD.png", "x/y/BAD.png.json"}
    assert files(dirs.outbox) == {} and files(dirs.archive) == {}


def test_failed_collision_takes_the_next_free_name(dirs):
    drop(dirs.inbox, "BAD.png")
    (dirs.failed / "BAD.png").write_bytes(b"earlier failure")
    pub = dirs.publisher()
    pub.execute(plan_failed(pub, "BAD.png"))
    assert (dirs.failed / "BAD.png").read_bytes() == b"earlier failure"
    assert (dirs.failed / "BAD (1).png").read_bytes() == ORIG
    assert (dirs.failed / "BAD (1).png.json").exists()


# --- companions ---------------------------------------------------------------------------------

def _with_xmp(dirs: Dirs) -> None:
    drop(dirs.inbox, "a/IMG.jpg")
    drop(dirs.inbox, "a/IMG.xmp", b"<xmp stem/>")
    drop(dirs.inbox, "a/IMG.jpg.XMP", b"<xmp full/>")
    drop(dirs.inbox, "a/OTHER.xmp", b"<xmp other/>")


def test_companion_xmp_files_travel_with_a_done_photo(dirs):
    _with_xmp(dirs)
    (dirs.outbox / "a").mkdir()
    (dirs.outbox / "a/IMG.jpg").write_bytes(b"taken")               # result becomes IMG (1).jpg
    pub = dirs.publisher()
    plan = plan_done(pub, "a/IMG.jpg")
    pub.execute(plan)
    out = files(dirs.outbox / "a")
    assert out["IMG (1).jpg"] == RESULT
    xmps = {k: v for k, v in out.items() if k.lower().endswith(".xmp")}
    assert set(xmps.values()) == {b"<xmp stem/>", b"<xmp full/>"}
    assert all(k.startswith("IMG (1)") for k in xmps)              # named after the result's stem
    assert "IMG (1).xmp" in xmps
    side = sidecar_of(dirs.outbox / "a/IMG (1).jpg.json")
    assert sorted(side["companions"]) == sorted(str(dirs.outbox / "a" / k) for k in xmps)
    assert files(dirs.archive / "a") == {"IMG.jpg": ORIG, "IMG.xmp": b"<xmp stem/>", "IMG.jpg.XMP": b"<xmp full/>"}
    assert files(dirs.inbox) == {"a/OTHER.xmp": b"<xmp other/>"}    # an unrelated xmp stays


def test_companion_xmp_files_travel_with_a_failed_photo(dirs):
    _with_xmp(dirs)
    pub = dirs.publisher()
    pub.execute(plan_failed(pub, "a/IMG.jpg"))
    assert files(dirs.failed / "a") == {"IMG.jpg": ORIG, "IMG.xmp": b"<xmp stem/>", "IMG.jpg.XMP": b"<xmp full/>",
                                        "IMG.jpg.json": (dirs.failed / "a/IMG.jpg.json").read_bytes()}
    assert files(dirs.inbox) == {"a/OTHER.xmp": b"<xmp other/>"}
    assert files(dirs.outbox) == {}


def test_companions_are_deleted_with_originals_delete(dirs):
    _with_xmp(dirs)
    pub = dirs.publisher(originals="delete")
    pub.execute(plan_done(pub, "a/IMG.jpg"))
    assert files(dirs.inbox) == {"a/OTHER.xmp": b"<xmp other/>"}
    assert {k for k in files(dirs.outbox / "a")} == {"IMG.jpg", "IMG.jpg.json", "IMG.xmp", "IMG (1).xmp"}


# --- across file systems -------------------------------------------------------------------------

def test_cross_file_system_archive_copies_fsyncs_and_unlinks(dirs):
    with tmpfs(dirs.inbox):
        drop(dirs.inbox, "s/IMG.jpg")
        assert os.stat(dirs.inbox).st_dev != os.stat(dirs.archive).st_dev
        pub = dirs.publisher()
        pub.execute(plan_done(pub, "s/IMG.jpg"))
        assert files(dirs.inbox) == {}
    archived = dirs.archive / "s/IMG.jpg"
    assert archived.read_bytes() == ORIG and os.stat(archived).st_mtime_ns == MTIME_NS
    assert tmp_files(dirs.outbox, dirs.archive) == []
    assert (dirs.outbox / "s/IMG.jpg").read_bytes() == RESULT


def test_cross_file_system_failed_move_keeps_bytes_and_mtime(dirs):
    with tmpfs(dirs.inbox):
        drop(dirs.inbox, "BAD.jpg")
        drop(dirs.inbox, "BAD.xmp", b"<x/>")
        pub = dirs.publisher()
        pub.execute(plan_failed(pub, "BAD.jpg"))
        assert files(dirs.inbox) == {}
    assert (dirs.failed / "BAD.jpg").read_bytes() == ORIG
    assert os.stat(dirs.failed / "BAD.jpg").st_mtime_ns == MTIME_NS
    assert (dirs.failed / "BAD.xmp").read_bytes() == b"<x/>"
    assert tmp_files(dirs.failed) == []


# --- recovery: a crash after every step -----------------------------------------------------------

def _assert_done_once(dirs: Dirs, rel_dir: str = "r", name: str = "IMG.jpg", xmp: bool = True) -> None:
    out = files(dirs.outbox)
    results = [k for k, v in out.items() if v == RESULT]
    assert results == [f"{rel_dir}/{name}"]
    assert [k for k in out if k.endswith(".json")] == [f"{rel_dir}/{name}.json"]
    archived = [k for k, v in files(dirs.archive).items() if v == ORIG]
    assert archived == [f"{rel_dir}/{name}"]
    if xmp:
        assert sorted(k for k in out if k.endswith(".xmp")) == [f"{rel_dir}/IMG.xmp"]
        assert files(dirs.archive)[f"{rel_dir}/IMG.xmp"] == b"<xmp/>"
    assert files(dirs.inbox) == {}


@pytest.mark.parametrize("k", range(6))
def test_a_crash_after_any_prefix_of_a_done_plan_completes_exactly_once(dirs, k):
    drop(dirs.inbox, "r/IMG.jpg")
    drop(dirs.inbox, "r/IMG.xmp", b"<xmp/>")
    pub = dirs.publisher()
    plan = plan_done(pub, "r/IMG.jpg")
    assert [s["op"] for s in plan["steps"]] == ["place", "place", "place", "move", "move"]
    assert k <= len(plan["steps"])
    pub.execute({**plan, "steps": plan["steps"][:k]})               # ... then the power went out
    restarted = dirs.publisher()
    restarted.execute(plan)
    restarted.execute(plan)                                          # and a second recovery changes nothing
    restarted.clean_tmp()
    _assert_done_once(dirs)
    assert tmp_files(dirs.outbox, dirs.archive, dirs.failed) == []


@pytest.mark.parametrize("k", range(4))
def test_a_crash_after_any_prefix_of_a_failed_plan_completes_exactly_once(dirs, k):
    drop(dirs.inbox, "r/BAD.jpg")
    drop(dirs.inbox, "r/BAD.xmp", b"<xmp/>")
    pub = dirs.publisher()
    plan = plan_failed(pub, "r/BAD.jpg")
    assert [s["op"] for s in plan["steps"]] == ["move", "move", "place"]
    pub.execute({**plan, "steps": plan["steps"][:k]})
    dirs.publisher().execute(plan)
    dirs.publisher().clean_tmp()
    assert files(dirs.failed) == {"r/BAD.jpg": ORIG, "r/BAD.xmp": b"<xmp/>",
                                  "r/BAD.jpg.json": (dirs.failed / "r/BAD.jpg.json").read_bytes()}
    assert files(dirs.inbox) == {} and files(dirs.outbox) == {} and files(dirs.archive) == {}


def test_link_then_crash_in_place_completes(dirs):
    drop(dirs.inbox, "r/IMG.jpg")
    drop(dirs.inbox, "r/IMG.xmp", b"<xmp/>")
    pub = dirs.publisher()
    plan = plan_done(pub, "r/IMG.jpg")
    step = plan["steps"][0]
    Path(step["dst"]).parent.mkdir(parents=True, exist_ok=True)
    os.link(step["tmp"], step["dst"])                                # linked, crashed before unlinking tmp
    assert os.path.samefile(step["tmp"], step["dst"])
    pub.execute(plan)
    assert not os.path.lexists(step["tmp"])
    pub.clean_tmp()
    _assert_done_once(dirs)


def test_link_then_crash_in_an_archive_move_completes(dirs):
    drop(dirs.inbox, "r/IMG.jpg")
    drop(dirs.inbox, "r/IMG.xmp", b"<xmp/>")
    pub = dirs.publisher()
    plan = plan_done(pub, "r/IMG.jpg")
    pub.execute({**plan, "steps": plan["steps"][:3]})
    move = plan["steps"][3]
    Path(move["dst"]).parent.mkdir(parents=True, exist_ok=True)
    os.link(move["src"], move["dst"])                                # archived by link, original not yet unlinked
    pub.execute(plan)
    pub.clean_tmp()
    _assert_done_once(dirs)
    assert not (dirs.inbox / "r" / "IMG.jpg").exists()


@pytest.mark.parametrize("state", ["partial_copy", "full_copy", "copy_linked", "copy_linked_src_gone"])
def test_cross_file_system_move_interrupted_mid_copy_completes(dirs, state):
    with tmpfs(dirs.inbox):
        drop(dirs.inbox, "r/IMG.jpg")
        pub = dirs.publisher()
        plan = plan_done(pub, "r/IMG.jpg")
        pub.execute({**plan, "steps": plan["steps"][:2]})
        move = plan["steps"][2]
        assert move["op"] == "move"
        tmp, dst = Path(move["tmp"]), Path(move["dst"])
        tmp.parent.mkdir(exist_ok=True)
        tmp.write_bytes(ORIG if state != "partial_copy" else ORIG[:100])
        os.utime(tmp, ns=(MTIME_NS, MTIME_NS))
        if state.startswith("copy_linked"):
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(tmp, dst)
        if state == "copy_linked_src_gone":
            os.unlink(dirs.inbox / "r/IMG.jpg")
        pub.execute(plan)
        pub.clean_tmp()
        assert files(dirs.inbox) == {}
    assert os.stat(dirs.archive / "r/IMG.jpg").st_mtime_ns == MTIME_NS
    _assert_done_once(dirs, xmp=False)
    assert tmp_files(dirs.outbox, dirs.archive) == []


def test_original_copy_complete_but_source_gone_is_still_archived(dirs):
    """Cross-device copy fsynced, then the original unlinked by someone: the complete copy is used."""
    drop(dirs.inbox, "r/IMG.jpg")
    pub = dirs.publisher()
    plan = plan_done(pub, "r/IMG.jpg")
    move = plan["steps"][2]
    Path(move["tmp"]).parent.mkdir(exist_ok=True)
    Path(move["dst"]).parent.mkdir(parents=True)                    # _move makes the folder before copying
    Path(move["tmp"]).write_bytes(ORIG)
    os.unlink(dirs.inbox / "r/IMG.jpg")
    pub.execute(plan)
    pub.clean_tmp()
    _assert_done_once(dirs, xmp=False)
    assert (dirs.archive / "r" / "IMG.jpg").read_bytes() == ORIG


def test_a_plan_whose_first_temp_file_vanished_is_broken(dirs):
    drop(dirs.inbox, "IMG.jpg")
    pub = dirs.publisher()
    plan = plan_done(pub, "IMG.jpg")
    pub.clean_tmp()                                                  # e.g. a restart that cleaned too early
    with pytest.raises(PlanBroken):
        pub.execute(plan)
    assert (dirs.inbox / "IMG.jpg").read_bytes() == ORIG             # nothing moved
    assert files(dirs.outbox) == {} and files(dirs.archive) == {}


def test_a_later_step_with_neither_temp_nor_target_is_broken(dirs):
    drop(dirs.inbox, "IMG.jpg")
    pub = dirs.publisher()
    plan = plan_done(pub, "IMG.jpg")
    os.unlink(plan["steps"][1]["tmp"])
    with pytest.raises(PlanBroken):
        pub.execute(plan)
    assert (dirs.inbox / "IMG.jpg").read_bytes() == ORIG


def test_clean_tmp_keeps_named_files_and_removes_the_rest(dirs):
    drop(dirs.inbox, "IMG.jpg")
    pub = dirs.publisher()
    plan = plan_done(pub, "IMG.jpg")
    (dirs.archive / TMP_DIR).mkdir()
    (dirs.archive / TMP_DIR / "stale").write_bytes(b"x")
    (dirs.failed / TMP_DIR / "olddir").mkdir(parents=True)
    keep = {plan["steps"][0]["tmp"]}
    assert pub.clean_tmp(keep) == 3
    assert tmp_files(dirs.outbox, dirs.archive, dirs.failed) == [f"outbox/{TMP_DIR}/{Path(plan['steps'][0]['tmp']).name}"]


@pytest.mark.parametrize("rel", ["../x.jpg", "a/../../x.jpg", "/etc/passwd", ""])
def test_an_inbox_path_that_escapes_is_refused(dirs, rel):
    pub = dirs.publisher()
    with pytest.raises(ValueError):
        pub.plan_done(1, rel, 1, 1, RESULT, "x.jpg", {})
    with pytest.raises(ValueError):
        pub.plan_failed(1, rel, 1, 1, {})
    assert files(dirs.outbox) == {} and files(dirs.failed) == {}


# --- disk full ----------------------------------------------------------------------------------

def test_disk_full_raises_folder_error_and_leaves_no_temp_file(dirs):
    drop(dirs.inbox, "IMG.jpg")
    with tmpfs(dirs.outbox, size="64k"):
        pub = dirs.publisher()
        with pytest.raises(FolderError) as info:
            plan_done(pub, "IMG.jpg", result=os.urandom(256 * 1024))
        assert info.value.folder == "outbox" and "disk full" in str(info.value)
        assert files(dirs.outbox) == {}
    assert (dirs.inbox / "IMG.jpg").read_bytes() == ORIG


def test_disk_full_after_the_result_leaves_no_temp_file(dirs):
    drop(dirs.inbox, "IMG.jpg")
    with tmpfs(dirs.outbox, size="64k"):
        pub = dirs.publisher()
        pub.tmp_dir(dirs.outbox)
        st = os.statvfs(dirs.outbox)
        free = st.f_bavail * st.f_frsize
        with pytest.raises(FolderError):
            plan_done(pub, "IMG.jpg", result=os.urandom(free - 512))  # fits; the sidecar does not
        assert files(dirs.outbox) == {}


def test_archive_full_keeps_the_original_and_resumes_when_space_returns(dirs):
    drop(dirs.inbox, "IMG.jpg", os.urandom(40 * 1024))
    orig = (dirs.inbox / "IMG.jpg").read_bytes()
    with tmpfs(dirs.archive, size="64k"):
        (dirs.archive / "filler").write_bytes(b"\0" * 48 * 1024)
        pub = dirs.publisher()
        plan = plan_done(pub, "IMG.jpg")
        with pytest.raises(FolderError) as info:
            pub.execute(plan)
        assert info.value.folder == "archive"
        assert (dirs.inbox / "IMG.jpg").read_bytes() == orig        # never lost
        os.unlink(dirs.archive / "filler")
        pub.execute(plan)
        pub.clean_tmp()
        assert (dirs.archive / "IMG.jpg").read_bytes() == orig
        assert tmp_files(dirs.archive) == []
    assert files(dirs.inbox) == {}
    assert (dirs.outbox / "IMG.jpg").read_bytes() == RESULT


# --- start-up recovery through the worker ---------------------------------------------------------

def _daemon_parts(tmp_path: Path):
    cfg = config_mod.load(write_config(tmp_path))
    assert config_mod.folder_problems(cfg) == {}
    queue = Queue(cfg.queue_path)
    return cfg, queue, Worker(cfg, queue)


def _record_done_plan(cfg, queue, worker, rel: str):
    size, mtime = drop(cfg.folders.inbox, rel)
    job = queue.enqueue(rel, size, mtime, "sha-" + rel)
    job = queue.claim()
    plan = worker.publisher.plan_done(job.id, rel, size, mtime, RESULT, Path(rel).name,
                                      {"status": "done", "job": job.id})
    record = [{"path": plan["outputs"][0], "bytes": len(RESULT), "sha256": "r"}]
    queue.set_plan(job.id, {**plan, "record": record, "duplicate_of": None}, params={"key": "k"}, profile="upscale")
    return job, plan, record


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_recover_finishes_a_half_executed_done_plan(tmp_path, k):
    cfg, queue, worker = _daemon_parts(tmp_path)
    job, plan, record = _record_done_plan(cfg, queue, worker, "a/b/IMG.jpg")
    worker.publisher.execute({**plan, "steps": plan["steps"][:k]})
    stale = cfg.folders.failed / TMP_DIR / "job99-sidecar-dead"
    stale.parent.mkdir(exist_ok=True)
    stale.write_bytes(b"left by a crash")
    queue.close()                                                    # kill -9 … restart:
    queue = Queue(cfg.queue_path)
    stats = recover(Worker(cfg, queue), queue)
    assert stats["requeued"] == 1 and stats["done"] == 1 and stats["dropped"] == 0
    assert stats["tmp_removed"] >= 1
    j = queue.get(job.id)
    assert j.state == DONE and j.plan is None and j.outputs == record and j.finished
    assert queue.counts() == {PENDING: 0, "running": 0, DONE: 1, FAILED: 0}
    assert files(cfg.folders.outbox) == {"a/b/IMG.jpg": RESULT,
                                         "a/b/IMG.jpg.json": (cfg.folders.outbox / "a/b/IMG.jpg.json").read_bytes()}
    assert files(cfg.folders.archive) == {"a/b/IMG.jpg": ORIG}
    assert files(cfg.folders.inbox) == {}
    assert tmp_files(cfg.folders.outbox, cfg.folders.archive, cfg.folders.failed) == []
    assert recover(Worker(cfg, queue), queue)["done"] == 0           # never finished twice
    queue.close()


def test_recover_finishes_a_half_executed_failed_plan(tmp_path):
    cfg, queue, worker = _daemon_parts(tmp_path)
    size, mtime = drop(cfg.folders.inbox, "BAD.jpg")
    job = queue.enqueue("BAD.jpg", size, mtime, "s")
    queue.claim()
    plan = worker.publisher.plan_failed(job.id, "BAD.jpg", size, mtime, {"status": "failed", "job": job.id})
    queue.set_plan(job.id, {**plan, "error": {"kind": "undecodable", "message": "bad"}, "attempts": 1})
    worker.publisher.execute({**plan, "steps": plan["steps"][:1]})
    queue.close()
    queue = Queue(cfg.queue_path)
    stats = recover(Worker(cfg, queue), queue)
    assert stats["failed"] == 1
    j = queue.get(job.id)
    assert j.state == FAILED and j.error_kind == "undecodable" and j.attempts == 1 and j.plan is None
    assert j.outputs == [{"path": str(cfg.folders.failed / "BAD.jpg")}]
    assert (cfg.folders.failed / "BAD.jpg").read_bytes() == ORIG and (cfg.folders.failed / "BAD.jpg.json").exists()
    assert files(cfg.folders.inbox) == {}
    queue.close()


def test_recover_drops_a_broken_plan_and_keeps_the_job_pending(tmp_path):
    cfg, queue, worker = _daemon_parts(tmp_path)
    job, plan, _ = _record_done_plan(cfg, queue, worker, "IMG.jpg")
    worker.publisher.clean_tmp()                                     # the temp files are gone
    stats = recover(worker, queue)
    assert stats["dropped"] == 1 and stats["done"] == 0
    j = queue.get(job.id)
    assert j.state == PENDING and j.plan is None
    assert (cfg.folders.inbox / "IMG.jpg").read_bytes() == ORIG      # processed again later, never lost
    assert files(cfg.folders.outbox) == {}
    queue.close()


def test_recover_waits_on_a_read_only_archive_keeps_the_plan_and_its_temp_files(tmp_path):
    cfg, queue, worker = _daemon_parts(tmp_path)
    job, plan, record = _record_done_plan(cfg, queue, worker, "IMG.jpg")
    queue.close()
    queue = Queue(cfg.queue_path)
    with readonly(cfg.folders.archive):
        stats = recover(Worker(cfg, queue), queue)
        assert stats["done"] == 0 and stats["dropped"] == 0
        j = queue.get(job.id)
        assert j.state == PENDING and j.plan is not None and j.attempts == 0   # waiting, no attempt spent
        assert (cfg.folders.inbox / "IMG.jpg").read_bytes() == ORIG
        assert all(os.path.lexists(s["tmp"]) or os.path.lexists(s["dst"]) for s in plan["steps"] if s["op"] == "place")
    stats = recover(Worker(cfg, queue), queue)                       # the folder is writable again
    assert stats["done"] == 1
    assert queue.get(job.id).state == DONE and queue.get(job.id).outputs == record
    assert files(cfg.folders.archive) == {"IMG.jpg": ORIG} and files(cfg.folders.inbox) == {}
    assert tmp_files(cfg.folders.outbox, cfg.folders.archive, cfg.folders.failed) == []
    queue.close()


# --- durability order, seen from the system calls -----------------------------------------------

_SCRIPT = r"""
import os, sys
from pathlib import Path
from watcher.publish import Publisher
root = Path(sys.argv[1])
pub = Publisher(root / "inbox", root / "outbox", root / "failed", root / "archive", "archive")
st = os.stat(root / "inbox/a/IMG.jpg")
plan = pub.plan_done(7, "a/IMG.jpg", st.st_size, st.st_mtime_ns, b"result" * 100, "IMG.jpg", {"job": 7})
pub.execute(plan)
"""


def _fs_events(log: Path) -> list[tuple]:
    """From an `strace -f -y` log: ("fsync", path) / ("link", src, dst) / ("unlink", path), in order.
    `-y` shows each file descriptor with the path it names, so the `*at` calls that publish makes
    on folder descriptors resolve to full paths (folder path + name)."""
    import re
    tok = re.compile(r'(?:(\d+|AT_FDCWD)<((?:[^>\\]|\\.)*)>|AT_FDCWD)?\s*,?\s*"((?:[^"\\]|\\.)*)"|(\d+)<((?:[^>\\]|\\.)*)>')
    out: list[tuple] = []
    for line in log.read_text().splitlines():
        m = re.match(r"^(\d+)\s+(\w+)\((.*)\)\s+=\s+(-?\d+)", line)
        if not m or int(m.group(4)) < 0:
            continue
        _pid, name, args, _ret = m.groups()
        paths, fdpaths = [], []
        for t in tok.finditer(args):
            if t.group(3) is not None:
                base = t.group(2)
                rel = t.group(3)
                paths.append(os.path.normpath(rel if rel.startswith("/") or not base else os.path.join(base, rel)))
            elif t.group(5) is not None:
                fdpaths.append(os.path.normpath(t.group(5)))
        if name in ("fsync", "fdatasync") and fdpaths:
            out.append(("fsync", fdpaths[0]))
        elif name in ("link", "linkat", "rename", "renameat", "renameat2") and len(paths) >= 2:
            out.append(("link", paths[0], paths[1]))
        elif name in ("unlink", "unlinkat") and paths:
            out.append(("unlink", paths[-1]))
    return out


def test_temp_files_are_fsynced_before_rename_and_the_original_leaves_last(dirs):
    drop(dirs.inbox, "a/IMG.jpg")
    (dirs.outbox / "a").mkdir()
    script = dirs.root / "pub.py"
    script.write_text(_SCRIPT)
    log = dirs.root / "strace.log"
    r = subprocess.run(["strace", "-f", "-y", "-qq", "-s", "4096", "-o", str(log), "-e",
                        "trace=openat,fsync,fdatasync,link,linkat,rename,renameat,renameat2,unlink,unlinkat",
                        PY, str(script), str(dirs.root)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    if r.returncode and ("ptrace" in r.stderr or "not permitted" in r.stderr):
        pytest.skip(f"strace not permitted: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr
    ev = _fs_events(log)
    root = str(dirs.root)
    src, outdir = f"{root}/inbox/a/IMG.jpg", f"{root}/outbox/a"
    placed = [(i, e[1], e[2]) for i, e in enumerate(ev) if e[0] == "link" and e[2].startswith(outdir + "/")]
    assert sorted(Path(dst).name for _, _, dst in placed) == ["IMG.jpg", "IMG.jpg.json"]
    for i, tmp, dst in placed:
        assert f"/outbox/{TMP_DIR}/" in tmp
        assert ("fsync", tmp) in ev[:i], f"{tmp} was not fsynced before it was linked to {dst}"
    gone = [i for i, e in enumerate(ev) if e == ("unlink", src)]
    assert len(gone) == 1, "the original was not removed from the inbox exactly once"
    last_place = max(i for i, _, _ in placed)
    assert gone[0] > last_place                                      # results in place before the original leaves
    assert ("fsync", outdir) in ev[last_place:gone[0]], "outbox folder not fsynced before the original left"
    archived = [i for i, e in enumerate(ev) if e == ("link", src, f"{root}/archive/a/IMG.jpg")]
    assert archived and archived[0] < gone[0]
    assert ("fsync", f"{root}/archive/a") in ev[archived[0]:gone[0]]
    assert (dirs.archive / "a/IMG.jpg").read_bytes() == ORIG


def test_a_rel_path_through_a_symlinked_folder_never_touches_files_outside_the_inbox(dirs):
    outside = dirs.root / "outside"
    outside.mkdir()
    drop(outside, "secret.jpg")
    os.symlink(outside, dirs.inbox / "link")
    pub = dirs.publisher()
    try:
        plan = plan_failed(pub, "link/secret.jpg")
        pub.execute(plan)
    except (ValueError, FolderError, OSError):
        pass
    assert (outside / "secret.jpg").read_bytes() == ORIG
    assert files(dirs.failed) == {} or not any(v == ORIG for v in files(dirs.failed).values())


def test_adopt_orphans_places_a_sidecar_whose_result_was_placed_before_a_crash(dirs):
    """The queue was lost after the result was placed and before its sidecar: the sidecar waiting in
    the temp folder is placed (its result checked by sha256), so the rebuild recognises the work."""
    import hashlib
    from watcher import sidecar as sidecar_mod
    drop(dirs.inbox, "a/IMG.jpg")
    pub = dirs.publisher()
    sc = {"status": "done", "job": 7, "outputs": [{"sha256": hashlib.sha256(RESULT).hexdigest()}]}
    plan = pub.plan_done(7, "a/IMG.jpg", *_ident(dirs.inbox / "a/IMG.jpg"), RESULT, "IMG.jpg", sc,
                         render_sidecar=sidecar_mod.render)
    pub.execute({**plan, "steps": plan["steps"][:1]})                # result placed, then the crash
    assert not (dirs.outbox / "a/IMG.jpg.json").exists()
    other = dirs.publisher()
    assert other.adopt_orphans() == 1
    side = json.loads((dirs.outbox / "a/IMG.jpg.json").read_text())
    assert side["job"] == 7 and side["outputs"][0]["path"] == str(dirs.outbox / "a/IMG.jpg")
    assert other.adopt_orphans() == 0                                # nothing twice
    drop(dirs.inbox, "b/IMG.jpg")
    plan = pub.plan_done(8, "b/IMG.jpg", *_ident(dirs.inbox / "b/IMG.jpg"), RESULT, "IMG.jpg",
                         {**sc, "job": 8}, render_sidecar=sidecar_mod.render)
    pub.execute({**plan, "steps": plan["steps"][:1]})
    (dirs.outbox / "b/IMG.jpg").write_bytes(b"edited by someone")    # not the result the sidecar describes
    assert other.adopt_orphans() == 0
    assert not (dirs.outbox / "b/IMG.jpg.json").exists()


@pytest.mark.parametrize("how", ["removed", "folder swapped for a link"])
def test_a_failed_photo_whose_original_went_away_has_a_sidecar_that_says_so(dirs, tmp_path, how):
    """The original left the inbox between the plan and its run (the user removed it, or its
    folder was replaced by a symlink): failed/ holds only the sidecar, and the sidecar says that
    rather than pointing at a file that is not there; running the plan again changes nothing."""
    drop(dirs.inbox, "x/BAD.png")
    pub = dirs.publisher()
    plan = plan_failed(pub, "x/BAD.png")
    if how == "removed":
        (dirs.inbox / "x/BAD.png").unlink()
    else:
        outside = tmp_path / "elsewhere"
        (dirs.inbox / "x").rename(outside)
        (dirs.inbox / "x").symlink_to(outside)
    pub.execute(plan)
    assert not (dirs.failed / "x/BAD.png").exists()
    side = json.loads((dirs.failed / "x/BAD.png.json").read_bytes())
    assert "failed/ holds only this sidecar" in side["original_missing"]
    assert "x/BAD.png" in side["original_missing"]
    from _schema import validator
    assert validator().schema["properties"]["original_missing"]["type"] == "string"   # a documented key
    pub.execute(plan)                                                   # idempotent
    assert json.loads((dirs.failed / "x/BAD.png.json").read_bytes()) == side
    if how != "removed":
        assert (tmp_path / "elsewhere" / "BAD.png").read_bytes() == ORIG   # never followed


def test_a_failed_photo_moved_normally_has_no_missing_note(dirs):
    drop(dirs.inbox, "BAD.png")
    pub = dirs.publisher()
    pub.execute(plan_failed(pub, "BAD.png"))
    assert "original_missing" not in json.loads((dirs.failed / "BAD.png.json").read_bytes())
