"""Contract tests for watcher/config.py: config.yaml → frozen dataclasses, errors naming key paths,
folder rules, folder_problems(), find_config(), and `check-config` through the real CLI."""
from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import PY, ROOT, write_config, readonly
from watcher import config as config_mod
from watcher.config import Config, Enhance, FolderOverride, find_config, folder_problems, load, parse
from watcher.errors import ConfigError


def _raw(**over) -> dict:
    raw = {"folders": {"inbox": "in", "outbox": "out", "failed": "fail", "archive": "arch"},
           "state_dir": "state", "weights_dir": "weights"}
    for key, val in over.items():
        sec, _, sub = key.partition("__")
        if sub:
            raw.setdefault(sec, {})
            raw[sec][sub] = val
        else:
            raw[sec] = val
    return raw


def _problems(base: Path, raw) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(raw, base)
    return info.value.problems


def _one(base: Path, raw, key: str) -> str:
    """The problem naming `key` (exactly one)."""
    probs = [p for p in _problems(base, raw) if p.startswith(key + ":")]
    assert len(probs) == 1, _problems(base, raw)
    return probs[0]


# --- the documented default file -----------------------------------------------------------------

def test_the_documented_default_config_parses():
    path = ROOT / "config.yaml"
    if not path.is_file():
        pytest.skip("config.yaml at the repo root is not written yet")
    cfg = load(path)
    assert cfg.folders.inbox == ROOT / "inbox"
    assert cfg.folders.archive == ROOT / "archive"
    assert cfg.state_dir == ROOT / "state"
    assert cfg.queue_path == ROOT / "state" / "queue.sqlite3"
    assert cfg.enhance == Enhance()          # the file documents the defaults, it does not change them
    assert cfg.jobs == config_mod.Jobs()
    assert cfg.watch == config_mod.Watch()
    assert cfg.hooks == config_mod.Hooks()
    assert cfg.log == config_mod.Log()


def test_defaults_and_frozen_dataclasses(tmp_path):
    cfg = parse({"folders": {"inbox": "i", "outbox": "o", "failed": "f"}, "jobs": {"originals": "delete"}},
                tmp_path)
    assert cfg.folders.archive is None
    assert cfg.watch.settle_seconds == 2.0 and cfg.watch.mode == "auto"
    assert cfg.enhance.profile == "faces" and cfg.enhance.upscale == 2.0 and cfg.enhance.tile is None
    assert cfg.jobs.max_attempts == 3 and cfg.jobs.backoff_seconds == (10.0, 60.0, 300.0)
    assert cfg.state_dir == Path("/var/lib/photoenhanced")
    assert cfg.weights_dir == Path("/var/lib/photoenhanced/weights")
    assert "archive" not in cfg.target_folders()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.enhance.profile = "full"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.folders = None


# --- unknown keys -------------------------------------------------------------------------------

@pytest.mark.parametrize("raw_over, key, hint", [
    ({"watch": {"setle_seconds": 2}}, "watch.setle_seconds", "settle_seconds"),
    ({"folder": {}}, "folder", "folders"),
    ({"folders__outbx": "x"}, "folders.outbx", "outbox"),
    ({"enhance": {"profiel": "full"}}, "enhance.profile", None),   # replaced below
    ({"enhance": {"models": {"facee": "x"}}}, "enhance.models.facee", "face"),
    ({"enhance": {"folders": {"p4": {"upscal": 4}}}}, "enhance.folders.p4.upscal", "upscale"),
    ({"jobs": {"max_atempts": 2}}, "jobs.max_atempts", "max_attempts"),
    ({"hooks": {"on_don": None}}, "hooks.on_don", "on_done"),
    ({"log": {"levl": "info"}}, "log.levl", "level"),
])
def test_unknown_keys_name_their_path_with_a_suggestion(tmp_path, raw_over, key, hint):
    if key == "enhance.profile":
        key, hint = "enhance.profiel", "profile"
    raw = _raw()
    for sec, val in raw_over.items():
        if "__" in sec:
            s, sub = sec.split("__")
            raw[s][sub] = val
        else:
            raw[sec] = val
    msg = _one(tmp_path, raw, key)
    assert msg == f"{key}: unknown key (did you mean {hint}?)"


def test_the_contract_example_message(tmp_path):
    assert _one(tmp_path, _raw(watch__setle_seconds=2), "watch.setle_seconds") == \
        "watch.setle_seconds: unknown key (did you mean settle_seconds?)"


def test_an_unknown_key_far_from_any_known_one_gets_no_suggestion(tmp_path):
    assert _one(tmp_path, _raw(watch__zzzzqqq=1), "watch.zzzzqqq") == "watch.zzzzqqq: unknown key"


def test_every_problem_is_reported_at_once(tmp_path):
    probs = _problems(tmp_path, _raw(watch__setle_seconds=2, jobs__max_attempts=0, log__level="loud"))
    keys = {p.split(":")[0] for p in probs}
    assert {"watch.setle_seconds", "jobs.max_attempts", "log.level"} <= keys


# --- types and ranges ---------------------------------------------------------------------------

@pytest.mark.parametrize("sec, key, value, words", [
    ("watch", "settle_seconds", "two", "a number"),
    ("watch", "settle_seconds", True, "a number"),
    ("watch", "settle_seconds", -1, "between 0 and 3600"),
    ("watch", "poll_interval", 0, "between 0.1 and 3600"),
    ("watch", "mode", "inotify", "auto|events|poll"),
    ("watch", "recursive", "yes", "true or false"),
    ("watch", "ignore", "*.part", "list of strings"),
    ("enhance", "profile", "facez", "did you mean faces?"),
    ("enhance", "upscale", 8, "between 1 and 4"),
    ("enhance", "upscale", 0.5, "between 1 and 4"),
    ("enhance", "device", "cuda:x", "auto|cpu|cuda"),
    ("enhance", "device", "gpu", "auto|cpu|cuda"),
    ("enhance", "tile", 16, "32 to 4096"),
    ("enhance", "tile", "big", "32 to 4096"),
    ("enhance", "jpeg_quality", 95.5, "an integer"),
    ("enhance", "jpeg_quality", 0, "between 1 and 100"),
    ("enhance", "output_format", "gif", "same|png|jpeg|webp|tiff"),
    ("enhance", "precision", "fp8", "auto|fp32|bf16|fp16"),
    ("jobs", "max_attempts", 0, "between 1 and 100"),
    ("jobs", "backoff_seconds", [], "non-empty list"),
    ("jobs", "backoff_seconds", [1, -2], "numbers >= 0"),
    ("jobs", "originals", "keep", "archive|delete"),
    ("jobs", "skip_duplicates", 1, "true or false"),
    ("hooks", "retries", -1, "between 0 and 20"),
    ("log", "format", "xml", "auto|json|text"),
])
def test_wrong_types_and_out_of_range_values_name_the_key(tmp_path, sec, key, value, words):
    msg = _one(tmp_path, _raw(**{f"{sec}__{key}": value}), f"{sec}.{key}")
    assert words in msg
    assert repr(value) in msg


def test_a_section_that_is_not_a_mapping(tmp_path):
    assert "expected a mapping" in _one(tmp_path, _raw(watch=5), "watch")


def test_the_file_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError):
        parse(["a", "b"], tmp_path)


@pytest.mark.parametrize("key", ["inbox", "outbox", "failed"])
def test_required_folders(tmp_path, key):
    raw = _raw()
    del raw["folders"][key]
    assert _one(tmp_path, raw, f"folders.{key}") == f"folders.{key}: required"


def test_valid_values_are_taken(tmp_path):
    cfg = parse(_raw(enhance={"device": "cuda:1", "tile": 0, "upscale": 3, "precision": "bf16",
                              "output_format": "png"},
                     watch={"mode": "poll", "ignore": ["*.raw"], "settle_seconds": 0},
                     jobs={"backoff_seconds": [1, 2.5]}), tmp_path)
    assert cfg.enhance.device == "cuda:1" and cfg.enhance.tile == 0 and cfg.enhance.upscale == 3.0
    assert cfg.watch.ignore == ("*.raw",) and cfg.watch.settle_seconds == 0
    assert cfg.jobs.backoff_seconds == (1.0, 2.5)
    assert cfg.jobs.backoff(1) == 1.0 and cfg.jobs.backoff(2) == 2.5 and cfg.jobs.backoff(9) == 2.5


# --- folders: overlap, impossible paths, archive ---------------------------------------------------

@pytest.mark.parametrize("folders, state_dir, key", [
    ({"inbox": "in", "outbox": "in/out", "failed": "f", "archive": "a"}, "s", "folders.outbox"),
    ({"inbox": "box/in", "outbox": "box", "failed": "f", "archive": "a"}, "s", "folders.outbox"),
    ({"inbox": "in", "outbox": "o", "failed": "o", "archive": "a"}, "s", "folders.failed"),
    ({"inbox": "in", "outbox": "o", "failed": "f", "archive": "in/archive"}, "s", "folders.archive"),
    ({"inbox": "in", "outbox": "o", "failed": "o/failed", "archive": "a"}, "s", "folders.failed"),
    ({"inbox": "in", "outbox": "o", "failed": "f", "archive": "a"}, "in/.state", "state_dir"),
    ({"inbox": "in", "outbox": "o", "failed": "f", "archive": "a"}, "in", "state_dir"),
    ({"inbox": "data/in", "outbox": "o", "failed": "f", "archive": "a"}, "data", "state_dir"),
])
def test_overlapping_or_nested_folders_are_errors(tmp_path, folders, state_dir, key):
    msg = _one(tmp_path, _raw(folders=folders, state_dir=state_dir), key)
    assert "overlap" in msg


def test_overlap_is_seen_through_dot_dot(tmp_path):
    raw = _raw(folders={"inbox": "in", "outbox": "in/../in/sub", "failed": "f", "archive": "a"})
    assert "overlaps folders.inbox" in _one(tmp_path, raw, "folders.outbox")


def test_siblings_with_a_common_prefix_do_not_overlap(tmp_path):
    cfg = parse(_raw(folders={"inbox": "photos", "outbox": "photos-out", "failed": "photos-failed",
                              "archive": "photos-archive"}), tmp_path)
    assert cfg.folders.outbox == tmp_path / "photos-out"


def test_a_folder_whose_parent_is_a_regular_file_is_an_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    msg = _one(tmp_path, _raw(folders__outbox="afile/out"), "folders.outbox")
    assert "cannot exist" in msg and str(tmp_path / "afile") in msg
    assert "cannot exist" in _one(tmp_path, _raw(state_dir="afile/s"), "state_dir")
    assert "cannot exist" in _one(tmp_path, _raw(weights_dir="afile/w/x"), "weights_dir")


def test_archive_policy_needs_an_archive_folder(tmp_path):
    raw = _raw(folders={"inbox": "in", "outbox": "o", "failed": "f", "archive": None})
    assert "required when jobs.originals is archive" in _one(tmp_path, raw, "folders.archive")
    cfg = parse({**raw, "jobs": {"originals": "delete"}}, tmp_path)
    assert cfg.folders.archive is None and cfg.jobs.originals == "delete"


def test_relative_paths_resolve_against_the_config_files_folder(tmp_path, monkeypatch):
    conf_dir = tmp_path / "etc" / "pe"
    conf_dir.mkdir(parents=True)
    path = conf_dir / "config.yaml"
    path.write_text(yaml.safe_dump(_raw(folders={"inbox": "in", "outbox": "../out", "failed": "/abs/failed",
                                                 "archive": "a"},
                                        enhance={"models": {"face": "models/my.pth"}})))
    monkeypatch.chdir(tmp_path)            # the CWD must not matter
    cfg = load(Path("etc/pe/config.yaml"))
    assert cfg.path == path
    assert cfg.folders.inbox == conf_dir / "in"
    assert cfg.folders.outbox == tmp_path / "etc" / "out"
    assert cfg.folders.failed == Path("/abs/failed")
    assert cfg.state_dir == conf_dir / "state" and cfg.weights_dir == conf_dir / "weights"
    assert cfg.enhance.models.face == str(conf_dir / "models" / "my.pth")
    assert cfg.enhance.models.background == "realesrgan-x2plus"     # a manifest name stays a name


def test_weights_dir_defaults_below_state_dir(tmp_path):
    raw = _raw()
    del raw["weights_dir"]
    assert parse(raw, tmp_path).weights_dir == tmp_path / "state" / "weights"


def test_load_reports_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("folders:\n  inbox: [unclosed\n")
    with pytest.raises(ConfigError, match="line .*invalid YAML"):
        load(bad)


# --- hooks --------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    (None, None),
    ("http://127.0.0.1:8080/hook", "http://127.0.0.1:8080/hook"),
    ("https://example.invalid/x", "https://example.invalid/x"),
    (["/usr/bin/notify", "--done"], ("/usr/bin/notify", "--done")),
])
def test_hooks_accept_null_a_url_or_an_argv_list(tmp_path, value, expected):
    cfg = parse(_raw(hooks={"on_done": value, "on_failed": value}), tmp_path)
    assert cfg.hooks.on_done == expected and cfg.hooks.on_failed == expected


@pytest.mark.parametrize("value", ["/usr/bin/notify --done", "ftp://x/y", [], ["ok", 3], [""], {"cmd": "x"}, 5])
def test_hooks_refuse_anything_else(tmp_path, value):
    assert "hook" in _one(tmp_path, _raw(hooks={"on_failed": value}), "hooks.on_failed")


# --- hot folders --------------------------------------------------------------------------------

def test_hot_folder_overrides_and_longest_prefix_match(tmp_path):
    cfg = parse(_raw(enhance={"profile": "faces", "upscale": 2, "folders": {
        "portraits-4x": {"profile": "full", "upscale": 4},
        "portraits-4x/small": {"upscale": 1},
        "scans/": {"profile": "upscale"},
    }}), tmp_path)
    e = cfg.enhance
    assert dict(e.folders)["scans"] == FolderOverride(profile="upscale", upscale=None)
    assert e.for_path("IMG.jpg") == ("faces", 2.0, "")
    assert e.for_path("portraits-4x/a.jpg") == ("full", 4, "portraits-4x")
    assert e.for_path("portraits-4x/deep/er/a.jpg") == ("full", 4, "portraits-4x")
    # the longest match wins alone: keys it does not set come from `enhance`, not from the outer hot folder
    assert e.for_path("portraits-4x/small/a.jpg") == ("faces", 1, "portraits-4x/small")
    assert e.for_path("scans/x/b.png") == ("upscale", 2.0, "scans")
    assert e.for_path("portraits-4xx/a.jpg") == ("faces", 2.0, "")      # a prefix of a name is no match
    assert e.for_path("portraits-4x") == ("faces", 2.0, "")             # the folder itself is no file in it


def test_enhancer_settings_need_every_hot_folder_profile(tmp_path):
    cfg = parse(_raw(enhance={"profile": "faces", "upscale": 2, "device": "cpu", "tile": 256,
                              "models": {"background": "realesrgan-x4plus"},
                              "folders": {"p4": {"profile": "full", "upscale": 4},
                                          "up": {"profile": "upscale"},
                                          "same": {"upscale": 2}}}), tmp_path)
    s = cfg.enhancer_settings()
    assert set(s.needs) == {("faces", 2.0), ("full", 4.0), ("upscale", 2.0)}
    assert s.device == "cpu" and s.tile == 256 and s.background_model == "realesrgan-x4plus"
    assert s.weights_dir == cfg.weights_dir


@pytest.mark.parametrize("name", ["../escape", "/abs", "a/../../b"])
def test_hot_folders_must_stay_inside_the_inbox(tmp_path, name):
    raw = _raw(enhance={"folders": {name: {"profile": "full"}}})
    assert "relative sub-folder" in _one(tmp_path, raw, f"enhance.folders.{name}")


def test_hot_folder_values_are_checked(tmp_path):
    raw = _raw(enhance={"folders": {"p": {"profile": "ful", "upscale": 9}}})
    assert "did you mean full?" in _one(tmp_path, raw, "enhance.folders.p.profile")
    assert "between 1 and 4" in _one(tmp_path, raw, "enhance.folders.p.upscale")
    assert "expected a mapping" in _one(tmp_path, _raw(enhance={"folders": {"p": 4}}), "enhance.folders.p")


# --- folder_problems -----------------------------------------------------------------------------

def _cfg(tmp_path, **over) -> Config:
    return load(write_config(tmp_path, **over))


def test_folder_problems_creates_targets_but_never_the_inbox(tmp_path):
    cfg = _cfg(tmp_path)
    os.rmdir(cfg.folders.inbox)
    problems = folder_problems(cfg)
    assert set(problems) == {"inbox"} and "inbox missing" in problems["inbox"]
    assert not cfg.folders.inbox.exists()
    for p in (cfg.folders.outbox, cfg.folders.failed, cfg.folders.archive, cfg.state_dir):
        assert p.is_dir()
    cfg.folders.inbox.mkdir()
    assert folder_problems(cfg) == {}


def test_folder_problems_without_create_reports_missing_targets(tmp_path):
    cfg = _cfg(tmp_path)
    problems = folder_problems(cfg, create=False)
    assert set(problems) == {"outbox", "failed", "archive", "state_dir"}
    assert not cfg.folders.outbox.exists()


def test_folder_problems_skips_the_archive_when_originals_are_deleted(tmp_path):
    cfg = _cfg(tmp_path, jobs={"originals": "delete"}, folders={"inbox": "inbox", "outbox": "outbox",
                                                                 "failed": "failed", "archive": "archive"})
    assert folder_problems(cfg) == {}
    assert not (tmp_path / "archive").exists()




@pytest.mark.parametrize("name", ["outbox", "failed", "archive", "state_dir"])
def test_folder_problems_reports_a_read_only_target(tmp_path, name):
    cfg = _cfg(tmp_path)
    target = {"outbox": cfg.folders.outbox, "failed": cfg.folders.failed, "archive": cfg.folders.archive,
              "state_dir": cfg.state_dir}[name]
    with readonly(target):
        problems = folder_problems(cfg)
    assert set(problems) == {name}
    assert "read-only" in problems[name] and str(target) in problems[name]


def test_folder_problems_reports_a_read_only_inbox(tmp_path):
    cfg = _cfg(tmp_path)
    with readonly(cfg.folders.inbox):
        problems = folder_problems(cfg)
    assert set(problems) == {"inbox"} and "read-only" in problems["inbox"]


def test_folder_problems_reports_a_target_that_cannot_be_created(tmp_path):
    cfg = _cfg(tmp_path)
    with readonly(tmp_path / "ro"):
        cfg = dataclasses.replace(cfg, folders=dataclasses.replace(cfg.folders, failed=tmp_path / "ro" / "failed"))
        problems = folder_problems(cfg)
    assert set(problems) == {"failed"} and "cannot be created" in problems["failed"]


# --- find_config -------------------------------------------------------------------------------

def test_find_config_precedence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = {"PHOTOENHANCED_CONFIG": str(tmp_path / "env.yaml")}
    assert find_config("/x/explicit.yaml", env) == Path("/x/explicit.yaml")
    assert find_config(None, env) == tmp_path / "env.yaml"
    assert find_config(None, {"PHOTOENHANCED_CONFIG": ""}) == find_config(None, {})
    if Path("/etc/photoenhanced/config.yaml").is_file():
        assert find_config(None, {}) == Path("/etc/photoenhanced/config.yaml")
        return
    assert find_config(None, {}) == Path("./config.yaml")            # nothing anywhere: the last default
    (tmp_path / "config.yaml").write_text("{}")
    found = find_config(None, {})
    assert found.resolve() == tmp_path / "config.yaml"


# --- through the real CLI -----------------------------------------------------------------------

def _check_config(path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PHOTOENHANCED_CONFIG", None)
    return subprocess.run([PY, "-m", "watcher.cli", "--config", str(path), "check-config"], capture_output=True,
                          text=True, env=env, timeout=60, cwd=path.parent)


def test_check_config_exits_78_on_a_bad_key(tmp_path):
    path = write_config(tmp_path, watch__setle_seconds=2)
    r = _check_config(path)
    assert r.returncode == 78, r
    assert "watch.setle_seconds: unknown key (did you mean settle_seconds?)" in r.stderr
    assert r.stdout == ""


def test_check_config_exits_78_on_overlapping_folders(tmp_path):
    path = write_config(tmp_path, folders={"inbox": "inbox", "outbox": "inbox/out", "failed": "f", "archive": "a"})
    r = _check_config(path)
    assert r.returncode == 78 and "folders.outbox" in r.stderr


def test_check_config_exits_0_on_a_good_config(tmp_path):
    path = write_config(tmp_path)
    r = _check_config(path)
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout and str(tmp_path / "outbox") in r.stdout
    assert not (tmp_path / "outbox").exists()            # checking creates nothing


def test_a_folder_of_the_wrong_type_is_reported_once(tmp_path):
    raw = _raw(folders={"inbox": 5, "outbox": "o", "failed": "f", "archive": "a"})
    assert _problems(tmp_path, raw) == ["folders.inbox: expected a path, got 5"]


def test_hot_folder_names_are_normalised(tmp_path):
    cfg = parse(_raw(enhance={"folders": {"./p4": {"profile": "full"}, "x//y": {"upscale": 3}}}), tmp_path)
    assert cfg.enhance.for_path("p4/a.jpg") == ("full", 2.0, "p4")
    assert cfg.enhance.for_path("x/y/a.jpg") == ("faces", 3, "x/y")


# --- overlap through symlinks and other paths to the same folder (device, inode) -------------------

def test_an_archive_that_is_a_symlink_to_the_inbox_is_an_error(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "arch").symlink_to(tmp_path / "in")
    msg = _one(tmp_path, _raw(), "folders.archive")
    assert "overlaps folders.inbox" in msg and "another path" in msg


def test_an_outbox_symlinked_into_the_inbox_is_an_error(tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "out").symlink_to(tmp_path / "in" / "sub")
    assert "overlaps folders.inbox" in _one(tmp_path, _raw(), "folders.outbox")


def test_a_folder_below_a_symlinked_parent_that_does_not_exist_yet_is_an_error(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "in")
    raw = _raw(folders={"inbox": "in", "outbox": "o", "failed": "link/not-yet/failed", "archive": "a"})
    assert "overlaps folders.inbox" in _one(tmp_path, raw, "folders.failed")


def test_an_inbox_inside_the_outbox_through_a_symlink_is_an_error(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "in").symlink_to(tmp_path / "out" / "incoming")   # dangling now, inside later
    (tmp_path / "out" / "incoming").mkdir()
    assert "overlaps folders.inbox" in _one(tmp_path, _raw(), "folders.outbox")


def test_a_state_dir_inside_the_inbox_through_a_symlink_is_an_error(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "var").symlink_to(tmp_path / "in")
    msg = _one(tmp_path, _raw(state_dir="var/state"), "state_dir")
    assert "must not overlap folders.inbox" in msg


def test_weights_inside_the_inbox_through_a_symlink_is_an_error(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "w").symlink_to(tmp_path / "in")
    assert "inside folders.inbox" in _one(tmp_path, _raw(weights_dir="w"), "weights_dir")


def test_a_bind_mount_of_the_inbox_is_the_same_folder(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "mnt").mkdir()
    r = subprocess.run(["mount", "--bind", str(tmp_path / "in"), str(tmp_path / "mnt")], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot bind-mount (needs root): {r.stderr.strip()}")
    try:
        raw = _raw(folders={"inbox": "in", "outbox": "mnt/out", "failed": "f", "archive": "a"})
        assert "overlaps folders.inbox" in _one(tmp_path, raw, "folders.outbox")
    finally:
        subprocess.run(["umount", str(tmp_path / "mnt")], check=True)


def test_separate_folders_linked_from_elsewhere_are_fine(tmp_path):
    for d in ("real-in", "real-out", "f", "a"):
        (tmp_path / d).mkdir()
    (tmp_path / "in").symlink_to(tmp_path / "real-in")
    (tmp_path / "out").symlink_to(tmp_path / "real-out")
    cfg = parse(_raw(folders={"inbox": "in", "outbox": "out", "failed": "f", "archive": "a"}), tmp_path)
    assert cfg.folders.inbox == tmp_path / "in"


def test_symlinked_overlap_exits_78_on_check_and_on_start(tmp_path):
    path = write_config(tmp_path)
    (tmp_path / "archive").symlink_to(tmp_path / "inbox")
    r = _check_config(path)
    assert r.returncode == 78 and "folders.archive" in r.stderr and "folders.inbox" in r.stderr
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("NOTIFY_SOCKET", None)
    r = subprocess.run([PY, "-m", "watcher.cli", "--config", str(path), "run"], capture_output=True, text=True,
                       env=env, timeout=60, cwd=tmp_path)
    assert r.returncode == 78 and "folders.archive" in r.stderr + r.stdout
    assert not (tmp_path / "state" / "queue.sqlite3").exists()


# --- jobs.max_interruptions ---------------------------------------------------------------------

def test_max_interruptions_default_and_bounds(tmp_path):
    assert parse(_raw(), tmp_path).jobs.max_interruptions == 3
    assert parse(_raw(jobs__max_interruptions=1), tmp_path).jobs.max_interruptions == 1
    assert parse(_raw(jobs__max_interruptions=100000), tmp_path).jobs.max_interruptions == 100000
    for bad in (0, -1, 2.5, "3", True):
        assert "jobs.max_interruptions" in _one(tmp_path, _raw(jobs__max_interruptions=bad),
                                                "jobs.max_interruptions")
    assert "max_interruptions" in _one(tmp_path, _raw(jobs__max_interuptions=3), "jobs.max_interuptions")
