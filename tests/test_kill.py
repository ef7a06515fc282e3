"""The kill -9 campaign: a stream of files, the real daemon killed at random moments over many
start/kill cycles, then every file must be in exactly one of outbox/failed with a correct sidecar,
the inbox empty, no temp files left and the queue in agreement.

Default run: 12 cycles. `scripts/test -m slow tests/test_kill.py` runs 200 (KILL_CYCLES overrides).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import sqlite3
import time
from pathlib import Path

import pytest

from conftest import make_jpeg, wait_for, write_config


def _campaign(tmp_path: Path, daemon_factory, cycles: int, seed: int) -> dict:
    rng = random.Random(seed)
    cfg = write_config(tmp_path, watch={"mode": "events", "settle_seconds": 0.1, "rescan_interval": 1},
                       jobs={"max_attempts": 3, "backoff_seconds": [0.1], "stop_timeout": 2,
                             "max_interruptions": 1000})   # random kills are not a poison photo's
    inbox = tmp_path / "inbox"
    dropped: dict[str, str] = {}         # rel → sha256 of what was dropped
    n = 0

    def drop(k: int) -> None:
        nonlocal n
        for _ in range(k):
            n += 1
            rel = f"d{n % 3}/sub{n % 2}/img{n:04d}.jpg"
            path = inbox / rel
            if n % 17 == 0:                       # some undecodable ones
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + ".part")
                tmp.write_bytes(b"not an image %d" % n)
                os.rename(tmp, path)
            else:
                make_jpeg(path.with_name(path.name + ".part"), seed=n)   # written under a junk name…
                os.rename(path.with_name(path.name + ".part"), path)      # …then renamed into place
            dropped[rel] = hashlib.sha256(path.read_bytes()).hexdigest()

    kills = 0
    for cycle in range(cycles):
        drop(rng.randint(1, 4))
        d = daemon_factory(cfg, env={"FAKE_DELAY": str(rng.choice([0, 0.02, 0.1]))})
        time.sleep(rng.uniform(0.05, 1.2))
        d.kill()                                   # SIGKILL at a random moment
        kills += 1
    d = daemon_factory(cfg)
    d.wait_event("daemon.ready", 60)

    def finished() -> bool:
        sides = [p for p in list((tmp_path / "outbox").rglob("*.json")) + list((tmp_path / "failed").rglob("*.json"))
                 if ".photoenhanced-tmp" not in p.parts]
        return len(sides) >= len(dropped) and not any(p.is_file() for p in inbox.rglob("*"))

    wait_for(finished, 120, interval=0.2, what="every dropped file handled")
    assert d.stop() == 0

    seen: dict[str, list[tuple[str, dict]]] = {}
    for folder in ("outbox", "failed"):
        for side in (tmp_path / folder).rglob("*.json"):
            assert ".photoenhanced-tmp" not in side.parts
            data = json.loads(side.read_text())
            seen.setdefault(data["input"]["path"], []).append((folder, data))
            target = Path(str(side)[:-5])
            assert target.is_file(), f"sidecar without its file: {side}"
            if folder == "outbox":
                assert hashlib.sha256(target.read_bytes()).hexdigest() == data["outputs"][0]["sha256"]
            else:
                assert hashlib.sha256(target.read_bytes()).hexdigest() == dropped[data["input"]["path"]]
    assert sorted(seen) == sorted(dropped), "a file is missing or appeared from nowhere"
    dupes = {rel: [f for f, _ in v] for rel, v in seen.items() if len(v) != 1}
    assert not dupes, f"files handled more than once: {dupes}"
    for rel, [(folder, data)] in seen.items():
        assert data["input"]["sha256"] == dropped[rel]
        if folder == "outbox":
            assert (tmp_path / "archive" / rel).is_file()
        assert (folder == "failed") == (int(rel[-8:-4]) % 17 == 0), (rel, folder)
    assert not any(p.is_file() for p in inbox.rglob("*")), "inbox not empty"
    for folder in ("outbox", "failed", "archive"):
        tmpd = tmp_path / folder / ".photoenhanced-tmp"
        assert not tmpd.exists() or not any(tmpd.iterdir()), f"temp files left in {tmpd}"
    db = sqlite3.connect(tmp_path / "state" / "queue.sqlite3")
    states = dict(db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
    db.close()
    n_failed = sum(1 for rel in dropped if int(rel[-8:-4]) % 17 == 0)
    assert states == {k: v for k, v in {"done": len(dropped) - n_failed, "failed": n_failed}.items() if v}
    return {"cycles": cycles, "kills": kills, "files": len(dropped), "failed": n_failed}


def test_kill_campaign_short(tmp_path, daemon_factory):
    result = _campaign(tmp_path, daemon_factory, cycles=int(os.environ.get("KILL_CYCLES_SHORT", 12)), seed=1)
    assert result["kills"] >= 12 and result["files"] >= 12


@pytest.mark.slow
def test_kill_campaign_long(tmp_path, daemon_factory):
    cycles = int(os.environ.get("KILL_CYCLES", 200))
    result = _campaign(tmp_path, daemon_factory, cycles=cycles, seed=2)
    print(f"kill campaign: {result}")
    assert result["kills"] == cycles
