"""`photoenhanced init [DIR]`: the documented default config written to DIR/config.yaml, and the
four folders it names created. Never overwrites a config; never touches a running daemon.

The template is the repository's `config.yaml` (one place owns the defaults and their
comments); an installed wheel carries the same file as `watcher/default-config.yaml`
(setup.py copies it there at build time). Its folder paths are relative (`./inbox` …), and
relative paths resolve against the config file's folder, so the copy in DIR names DIR/inbox,
DIR/outbox, DIR/failed, DIR/archive, DIR/state and DIR/weights.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from . import config as config_mod

_HERE = Path(__file__).resolve().parent
REPO_TEMPLATE = _HERE.parent / "config.yaml"
PACKAGE_TEMPLATE = _HERE / "default-config.yaml"
CONFIG_NAME = "config.yaml"


class ConfigExists(Exception):
    def __init__(self, path: Path):
        super().__init__(f"{path} exists; init never overwrites a config (edit it, or init another folder)")
        self.path = path


@dataclass(frozen=True)
class Initialised:
    config: Path
    folders: tuple[tuple[str, Path, bool], ...]     # (name, path, created now)


def template_text() -> str:
    for p in (REPO_TEMPLATE, PACKAGE_TEMPLATE):
        if p.is_file():
            return p.read_text(encoding="utf-8")
    raise FileNotFoundError(f"the default config is missing ({REPO_TEMPLATE} and {PACKAGE_TEMPLATE}); "
                            "reinstall photoenhanced")


def render(directory: Path, now: float) -> str:
    stamp = datetime.fromtimestamp(now, timezone.utc).strftime("%Y-%m-%d")
    head = (f"# Written by `photoenhanced init {directory}` on {stamp}. Relative paths below are\n"
            f"# relative to this file's folder ({directory}).\n"
            f"# Next: photoenhanced --config {directory / CONFIG_NAME} weights fetch   (then: doctor, run)\n#\n")
    return head + template_text()


def init(directory: Path, now: float) -> Initialised:
    """Write DIR/config.yaml (exclusive: ConfigExists if any file is there) and create the
    folders it names. The written file is parsed by the product's own loader before the
    folders are made, so a template that does not parse never leaves folders behind."""
    directory = Path(os.path.abspath(directory))
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / CONFIG_NAME
    if os.path.lexists(target):
        raise ConfigExists(target)
    fd, tmp = tempfile.mkstemp(prefix=".config.yaml.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(render(directory, now))
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        try:
            os.link(tmp, target)            # fails if the name was taken meanwhile: no overwrite
        except FileExistsError:
            raise ConfigExists(target) from None
    finally:
        os.unlink(tmp)
    cfg = config_mod.load(target)
    f = cfg.folders
    made = []
    for name, p in (("inbox", f.inbox), ("outbox", f.outbox), ("failed", f.failed), ("archive", f.archive)):
        if p is None:
            continue
        existed = p.is_dir()
        p.mkdir(parents=True, exist_ok=True)
        made.append((name, p, not existed))
    return Initialised(config=target, folders=tuple(made))
