"""What the CLI verbs and the web process both do, in one place each: the status document
(`status --json`, `/api/status`), a job's public JSON (`list --json`, `/api/jobs`), retry and
pause/resume. State changes go through the queue's API only; the daemon carries them out (it
picks up a pending job, it stops claiming while paused)."""
from __future__ import annotations

import time

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
    paused, last_hour, problem = False, 0, None
    try:
        if queue is not None:
            counts, d, paused = queue.counts(), queue.daemon(), queue.paused()
            last_hour = queue.done_since(now - HOUR_S)
    except (StateUnavailable, QueueCorrupt) as exc:
        problem = names.safe(str(exc))
    d = dict(d or {})
    note = StateLock.read_note(cfg.state_dir) if running else None
    if note and (note.get("updated") or 0) > (d.get("updated") or 0):
        # newer than the queue's status row: the daemon could not write the queue (full state_dir …)
        d.update(state=note.get("state"), reason=note.get("reason"), updated=note.get("updated"))
    state = d.get("state") if running else "stopped"
    out = {"daemon": {"running": running, "pid": d.get("pid") if running else None, "state": state,
                      "reason": d.get("reason") if running else None, "since": d.get("started"),
                      "updated": d.get("updated"), "paused": paused},
           "counts": counts, "current": d.get("current") if running else None,
           "metrics": d.get("metrics"), "throughput": {"done_last_hour": last_hour}}
    return out, problem


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
