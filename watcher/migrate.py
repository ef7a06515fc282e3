"""`photoenhanced queue migrate --from sqlite:PATH --to postgresql://…`: copy a single host's SQLite
queue into a (migrated, empty) shared PostgreSQL queue, ids, history and recorded publish plans
kept. The SQLite queue's daemon must be stopped; a job it left running goes in as pending with one
interruption counted (what its own restart would have done)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import structlog

from .backends import mask_url
from .errors import WatcherError
from .queue import Queue

log = structlog.get_logger(__name__)
BATCH = 2000


def copy_queue(src: Path, dst_url: str) -> dict[str, int]:
    from .daemon import StateLock
    from .pgqueue import PgQueue, _value
    src = Path(src)
    if not src.exists():
        raise WatcherError(f"no queue at {src}")
    if StateLock.held(src.parent):
        raise WatcherError(f"a daemon is running on {src.parent}: stop it before moving its queue")
    source = Queue(src, readonly=True)
    target = PgQueue(dst_url)
    stats = {"jobs": 0, "pending": 0, "running": 0, "done": 0, "failed": 0, "requeued": 0}
    try:
        with target._tx() as cur:
            cur.execute("SELECT count(*) FROM jobs")
            if cur.fetchone()[0]:
                raise WatcherError(f"{mask_url(dst_url)} already holds jobs: copy into an empty queue only")
        from .queue import Job
        names = [f.name for f in dataclasses.fields(Job)]
        rows, last = [], 0
        with target._tx() as cur:
            while True:
                batch = _after(source, last, BATCH)
                if not batch:
                    break
                for j in batch:
                    d = {n: getattr(j, n) for n in names}
                    if d["state"] == "running":
                        d.update(state="pending", interruptions=d["interruptions"] + 1, not_before=0)
                        stats["requeued"] += 1
                    stats[d["state"]] += 1
                    rows.append([_value(k, v) for k, v in d.items()])
                cur.executemany(f"INSERT INTO jobs ({', '.join(names)}) VALUES ({', '.join(['%s'] * len(names))})",
                                rows)
                stats["jobs"] += len(rows)
                rows, last = [], batch[-1].id
            target._bump_ids(cur)
    finally:
        source.close()
        target.close()
    log.info("queue.copied", source=str(src), target=mask_url(dst_url), **stats)
    return stats


def _after(source: Queue, last: int, n: int):
    from .queue import _COLS, Job
    return [Job.from_row(r) for r in source.db.execute(
        f"SELECT {_COLS} FROM jobs WHERE id > ? ORDER BY id LIMIT ?", (last, n))]
