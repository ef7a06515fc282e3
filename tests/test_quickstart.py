"""The README's quick start, pasted line by line into one bash on a fresh machine.

The machine: a temp folder holding a fresh copy of the checkout (watcher/, enhancer/, weights/,
config.yaml) and a `.venv/bin/photoenhanced` that runs that copy with this suite's interpreter
(`scripts/setup` is the environment this suite already runs in, so its line is checked, not
re-run). $HOME is a temp folder with two photos in ~/Pictures. Two stand-ins, nothing else:
  * GitHub is unreachable here, so the copy's weights/manifest.yaml points the weights the
    default config needs at a 127.0.0.1 mirror of seeded-random checkpoints with the real
    architectures (their sha256 pinned in that manifest, as the real ones are). `weights
    fetch` downloads them for real; `doctor` verifies them and runs its benchmark on them.
  * `run` uses the fake enhancer (a 2× nearest upscale), as every end-to-end test does: random
    GFPGAN weights with a random face detector would take minutes per photo.
Each line must exit 0. Between `cp` and `status` the test waits for the results, as a person
would before looking.
"""
from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from conftest import ROOT, make_jpeg, wait_for

MARK = "__quickstart_rc__"


def quickstart_lines() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "the Quick start section has no ```sh block"
    return [line for line in block.group(1).splitlines() if line.strip()]


class Shell:
    """One bash reading commands from a pipe, like a terminal a person pastes into."""

    def __init__(self, cwd: Path, env: dict):
        self.proc = subprocess.Popen(["bash", "--norc", "--noprofile"], cwd=cwd, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.send("exec 2>&1")

    def send(self, line: str, timeout: float = 240) -> tuple[int, str]:
        self.proc.stdin.write(line + "\n" + f'echo "{MARK} $?"\n')
        self.proc.stdin.flush()
        out, end = [], time.monotonic() + timeout
        while time.monotonic() < end:
            got = self.proc.stdout.readline()
            if not got:
                raise AssertionError(f"bash ended during {line!r}: {''.join(out)}")
            if got.startswith(MARK):
                return int(got.split()[1]), "".join(out)
            out.append(got)
        raise AssertionError(f"{line!r} did not finish in {timeout}s: {''.join(out)}")

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, 9)


def _mirror(weights_dir: Path, names: list[str]):
    """Seeded-random checkpoints for `names` served on 127.0.0.1; returns (server, manifest entries)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from _weightfactory import make_checkpoint
    from enhancer import weights
    real = weights.load_manifest()
    weights_dir.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(weights_dir))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    entries = {}
    for name in names:
        spec = real[name]
        digest = make_checkpoint(spec.architecture, weights_dir / spec.file, seed=1)
        entries[name] = {"file": spec.file, "architecture": spec.architecture, "licence": spec.licence,
                         "sources": [{"name": "test-mirror", "sha256": digest,
                                      "bytes": (weights_dir / spec.file).stat().st_size,
                                      "url": f"http://127.0.0.1:{server.server_port}/{spec.file}"}]}
    return server, entries


SHIM = '''#!{py}
# .venv/bin/photoenhanced of the test machine: this checkout copy's CLI; `run` with the fake enhancer.
import sys
sys.path[:0] = [{root!r}, {tests!r}]
args = sys.argv[1:]
verb = next((a for i, a in enumerate(args) if not a.startswith("-") and (i == 0 or args[i - 1] not in ("--config", "--log-format"))), None)
if verb == "run":
    from fake_enhancer import factory
    from watcher.daemon import main
    sys.exit(main(args, enhancer_factory=factory))
from watcher.cli import main
sys.exit(main())
'''


def test_the_readme_quick_start_works_line_by_line(tmp_path):
    lines = quickstart_lines()
    assert lines[0].split("#")[0].strip() == "scripts/setup"
    machine = tmp_path / "checkout"
    machine.mkdir()
    for d in ("watcher", "enhancer", "weights"):
        shutil.copytree(ROOT / d, machine / d, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "config.yaml", machine / "config.yaml")
    default = yaml.safe_load((ROOT / "config.yaml").read_text())["enhance"]
    needed = sorted({default["models"]["face"], default["models"]["detector"], "parsenet"}) \
        if default["profile"] == "faces" else sorted(default["models"].values())
    server, entries = _mirror(tmp_path / "mirror", needed)
    manifest = machine / "weights" / "manifest.yaml"
    doc = yaml.safe_load(manifest.read_text())
    doc["weights"].update(entries)
    manifest.write_text(yaml.safe_dump(doc))
    (machine / "enhancer" / "manifest.yaml").write_text(manifest.read_text())
    venv_bin = machine / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "photoenhanced").write_text(SHIM.format(py=sys.executable, root=str(machine), tests=str(ROOT / "tests")))
    (venv_bin / "photoenhanced").chmod(0o755)
    home = tmp_path / "home"
    make_jpeg(home / "Pictures" / "IMG_0001.jpg", size=(32, 24), seed=1)
    make_jpeg(home / "Pictures" / "IMG_0002.jpg", size=(24, 32), seed=2)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PHOTOENHANCED_CONFIG", "PYTHONPATH", "NOTIFY_SOCKET", "JOURNAL_STREAM", "WATCHDOG_USEC")}
    env["HOME"] = str(home)
    shell = Shell(machine, env)
    outputs: dict[str, str] = {}
    try:
        for line in lines[1:]:
            cmd = line.split("#")[0].strip()
            if cmd.startswith("cp "):
                rc, out = shell.send(line)
                assert rc == 0, f"{line!r} exited {rc}:\n{out}"
                outbox = machine / "photos" / "outbox"
                wait_for(lambda: len(list(outbox.glob("*.jpg.json"))) == 2, timeout=60,
                         what="both photos done (daemon log: %s)" % (machine / "photos" / "daemon.log"))
                outputs[cmd] = out
                continue
            t0 = time.monotonic()
            rc, out = shell.send(line)
            print(f"{time.monotonic() - t0:6.1f}s  {cmd}")
            assert rc == 0, f"{line!r} exited {rc}:\n{out}"
            outputs[cmd] = out
    finally:
        shell.close()
        server.shutdown()
    photos = machine / "photos"
    by_verb = {k.split()[1] if k.startswith(".venv") else k.split()[0]: v for k, v in outputs.items()}
    assert "wrote" in by_verb["init"] and (photos / "config.yaml").is_file()
    assert "ok (test-mirror)" in by_verb["weights"]
    assert "ready: `run` has everything it needs" in by_verb["doctor"]
    assert re.search(r"✓ benchmark  faces ×2: ~[\d.]+ (s|min) per 12 MP photo \+ [\d.]+ s per face", by_verb["doctor"]), by_verb["doctor"]
    assert "2 done" in by_verb["status"] and "photoenhanced: running" in by_verb["status"]
    assert "IMG_0001.jpg" in by_verb["ls"] and "IMG_0002.jpg.json" in by_verb["ls"]
    assert sorted(p.name for p in (photos / "archive").iterdir() if not p.name.startswith(".")) == ["IMG_0001.jpg", "IMG_0002.jpg"]
    assert [p for p in (photos / "inbox").iterdir() if not p.name.startswith(".")] == []
    assert (photos / "weights").is_dir() and (photos / "state" / "queue.sqlite3").is_file()
    from watcher.daemon import StateLock
    wait_for(lambda: not StateLock.held(photos / "state"), timeout=30, what="the daemon stopped by `kill %1`")
    assert '"event": "daemon.stopped"' in (photos / "daemon.log").read_text().replace('"event":"', '"event": "')
