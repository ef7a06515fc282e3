"""What the CLI verbs and the web process both do, in one place each: the status document
(`status --json`, `/api/status`), a job's public JSON (`list --json`, `/api/jobs`), retry,
enqueue-now and pause/resume. State changes go through the queue's API only; the daemon carries
them out (it picks up a pending job, it stops claiming while paused)."""
from __future__ import annotations

import os
import time
from pathlib import Path

from . import intake, names, safefs
from .config import Config
from .errors import InvalidTransition, QueueCorrupt, StateUnavailable, WatcherError
from .publish import Publisher
from .queue import Job, Queue

HOUR_S = 3600.0


class RetryRefused(WatcherError):
    """A failed job that cannot be put back (its original is gone, or its inbox path is taken).
    The message is one printable line naming the job."""


def status(cfg: Config, queue: Queue | None, now: float | None = None) -> tuple[dict, str | None]:
    """The `status --json` document, read from `queue` (None: no queue file yet) and the daemon's
    lock. Returns (document, a problem reading the queue or None). Names are left as Python holds
    them; `encodable_status` makes the document JSON-safe."""
    from .daemon import StateLock
    now = time.time() if now is None else now
    running = StateLock.held(cfg.state_dir)
    counts = {"pending": 0, "running": 0, "done": 0, "failed": 0}
    d: dict | None = None
    paused, last_hour, problem, hosts = False, 0, None, []
    try:
        if queue is not None:
            counts, d, paused = queue.counts(), queue.daemon(), queue.paused()
            last_hour = queue.done_since(now - HOUR_S)
            hosts = queue.hosts() if hasattr(queue, "hosts") else []     # a shared (PostgreSQL) queue
    except (StateUnavailable, QueueCorrupt) as exc:
        problem = names.safe(str(exc))
    d = dict(d or {})
    note = StateLock.read_note(cfg.state_dir) if running else None
    if note and (note.get("updated") or 0) > (d.get("updated") or 0) and note.get("state") != "working":
        # newer than the queue's status row: the daemon could not write the queue (full state_dir …),
        # or it is about to (the note goes first). Only the row holds the photo in hand, so a note
        # saying "working" adds nothing, and any other state holds no photo: state and `current`
        # always agree.
        d.update(state=note.get("state"), reason=note.get("reason"), updated=note.get("updated"), current=None)
    state = d.get("state") if running else "stopped"
    out = {"daemon": {"running": running, "pid": d.get("pid") if running else None, "state": state,
                      "reason": d.get("reason") if running else None, "since": d.get("started"),
                      "updated": d.get("updated"), "paused": paused},
           "counts": counts, "current": d.get("current") if running else None,
           "metrics": d.get("metrics"), "throughput": {"done_last_hour": last_hour},
           "hosts": host_rows(cfg, hosts, now)}
    return out, problem


def host_rows(cfg: Config, hosts: list, now: float) -> list:
    """Every daemon registered in a shared queue, with `health`: alive (heartbeat within a lease),
    silent (missed it: dead or cut off; its jobs go back to pending when their leases expire),
    stopped. (A SQLite queue has no host table: [].)"""
    lease = float(getattr(getattr(cfg, "queue", None), "lease_seconds", 60) or 60)
    out = []
    for h in hosts:
        seen = h.get("last_seen") or 0
        health = "stopped" if h.get("state") == "stopped" else ("alive" if now - seen <= lease else "silent")
        out.append({**{k: (names.safe(v) if isinstance(v, str) else v) for k, v in h.items()},
                    "health": health, "seen_s_ago": round(now - seen, 1) if seen else None})
    return out


def encodable_status(doc: dict) -> dict:
    """The status document as valid JSON for any name: the current photo's exact bytes as
    `path_b64` beside its display form."""
    cur = doc.get("current")
    if isinstance(cur, dict) and isinstance(cur.get("path"), str):
        doc = {**doc, "current": {**cur, **names.fields(cur["path"])}}
    return names.encodable(doc)


def public_job(row: dict) -> dict:
    """A `list --json` row that is valid JSON for any name: `path` (and each output's `path`) in
    names.display form with `path_b64` (the exact bytes) when they differ; any other string holding
    undecodable bytes displayed."""
    out: dict = {}
    for k, v in row.items():                      # keep the key order; path_b64 right after path
        if k == "path" and isinstance(v, str):
            out.update(names.fields(v))
        else:
            out[k] = v
    outs = out.get("outputs")
    if isinstance(outs, list):
        out["outputs"] = [{**o, **names.fields(o["path"])} if isinstance(o, dict) and isinstance(o.get("path"), str)
                          else o for o in outs]
    return names.encodable(out)


def publisher(cfg: Config) -> Publisher:
    f = cfg.folders
    return Publisher(f.inbox, f.outbox, f.failed, f.archive, cfg.jobs.originals)


def retry_job(cfg: Config, queue: Queue, job_id: int, source: str, pub: Publisher | None = None) -> Job:
    """`photoenhanced retry ID` and `POST /api/jobs/{id}/retry`: the original goes from failed/
    back to its inbox path (never following a link, never overwriting), its failed sidecar is
    removed, and the job is pending again with attempts reset and the file's fingerprint as it is
    now (the user may have fixed it in failed/). UnknownJob, InvalidTransition (not failed) or
    RetryRefused (the original is gone, the inbox path is taken, it cannot be moved)."""
    pub = pub or publisher(cfg)
    inbox = cfg.folders.inbox
    job = queue.get(job_id)
    if job.state != "failed":
        raise InvalidTransition(f"job {job_id} is {job.state}, not failed")
    src = job.outputs[0]["path"] if job.outputs else None
    shown = names.display(job.rel_path)
    try:
        here = src is not None and safefs.lstat(*pub.locate(src)) is not None
        if here:
            pub.restore(src, job.rel_path)
        elif safefs.lstat(inbox, job.rel_path) is None:
            raise RetryRefused(f"job {job_id}: the original is neither in failed/ nor in the inbox")
    except FileExistsError:
        raise RetryRefused(f"job {job_id}: {names.display(str(inbox / job.rel_path))} is taken by another "
                           "file; move it first") from None
    except (OSError, ValueError) as exc:
        raise RetryRefused(f"job {job_id}: cannot restore {names.display(str(src))}: "
                           f"{names.safe(getattr(exc, 'strerror', None) or str(exc))}") from None
    try:
        file = intake.fingerprint(inbox, job.rel_path)
    except OSError as exc:
        raise RetryRefused(f"job {job_id}: {shown}: {names.safe(exc.strerror or str(exc))}") from None
    new = queue.retry(job_id, file=file)
    queue.record_request("retry", source, job=job_id)
    return new


class NotInInbox(WatcherError):
    """A path given to enqueue that is not a file path inside the inbox (absolute elsewhere, `..`,
    empty parts, the inbox itself, a NUL, a name no file system holds)."""


def inbox_rel(cfg: Config, path: str) -> str:
    """The inbox-relative form of `path`: an absolute path inside the inbox (as given or through
    the inbox's resolved path, like `photoenhanced enqueue`), or a path relative to the inbox.
    Raises NotInInbox."""
    inbox = cfg.folders.inbox
    if "\0" in path:
        raise NotInInbox(f"{names.display(path)}: a NUL is not allowed in a path")
    rel = path
    if path.startswith("/"):
        given = Path(os.path.normpath(path))
        for base in (inbox, inbox.resolve()):
            try:
                rel = given.relative_to(base).as_posix()
                break
            except ValueError:
                continue
        else:
            raise NotInInbox(f"{names.display(path)} is not inside the inbox {names.display(str(inbox))}")
        if rel == ".":
            raise NotInInbox(f"{names.display(path)} is the inbox itself, not a file in it")
    try:
        safefs.parts_of(rel)
        names.raw(rel)
    except safefs.UnsafePath:
        raise NotInInbox(f"{names.display(path)} is not a path inside the inbox (no .., no empty parts)") from None
    except UnicodeEncodeError:
        raise NotInInbox(f"{names.display(path)}: no file system name holds these characters") from None
    return rel


def enqueue(cfg: Config, queue: Queue, rel: str, source: str, now: float | None = None) -> intake.Taken:
    """`POST /api/enqueue` (as `photoenhanced enqueue PATH`): queue inbox/rel at once, skipping the
    settle wait, through the one intake step (no link followed, never a FIFO). A new job is
    logged as an `enqueue` request from `source`."""
    t = intake.take(queue, cfg.folders.inbox, rel, time.time() if now is None else now)
    if t.outcome == intake.QUEUED and t.job is not None:
        queue.record_request("enqueue", source, job=t.job.id)
    return t
