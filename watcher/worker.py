"""The worker loop: `run_once(now)` claims one job and runs small named steps
(read → decode → enhance → encode → publish → record). No torch here: models come in through the
enhancer interface (`enhancer.api.Enhancer`), pixels through `enhancer.imageio`.

Every routing path is a named outcome (done, failed, retry, deferred, vanished, changed) and every
step takes `now`, so each path is a millisecond test with a fake enhancer and a virtual clock.

`Pipeline` (jobs.prefetch > 0, the daemon) runs the same steps in three stages that overlap: the
next job is claimed, read and decoded on a helper thread, and the previous one encoded and published
on another, while the calling thread runs the model on one job at a time (DESIGN invariant 7).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import threading
import time
import dataclasses
import weakref
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import structlog

from enhancer import imageio
from enhancer.api import Enhancer, Params, mem_available
from enhancer.errors import EnhanceError, PermanentError, TooLargeError, TransientError, WeightsMissingError
from . import names, safefs, sidecar as sidecar_mod
from .config import Config
from .errors import FolderError, LeaseLost, StateUnavailable
from .publish import PlanBroken, PlanConflict, Publisher
from .queue import AHEAD, Job, Queue
from .sidecar import iso as _iso, versions  # noqa: F401  (re-exported for callers)

log = structlog.get_logger(__name__)

FOLDER_RETRY_S = 5.0          # a folder problem is looked at again this often
WEIGHTS_RETRY_S = 5.0
UNSAFE_RETRY_S = 60.0         # a symlink planted below an output folder: this job only, looked at again
MAX_REPLANS = 5               # names taken under us in a row before the job backs off


@dataclass
class Outcome:
    job: int
    path: str
    state: str                 # done | failed | retry | deferred | vanished | changed
    message: str = ""
    sidecar: dict | None = None
    timings_ms: dict = field(default_factory=dict)


@dataclass
class Source:
    """The photo as read at the moment of use: its bytes and what fstat said of the open file."""
    data: bytes
    st: os.stat_result


@dataclass
class Finished:
    """A result ready to publish (the hand-off from the render steps to publish/record)."""
    data: bytes
    result_name: str
    sidecar: dict
    eff: dict
    out_info: dict
    timings: dict
    t0: float
    duplicate_of: int | None = None
    faces: int = 0
    ino: int | None = None
    companion: Callable[[bytes], bytes] | None = None   # rewrites a travelling .xmp (the history entry)


class _Changed(Exception):
    """The file changed after it settled (a stalled writer): back to settling."""


class _Gone(Exception):
    """The file is gone, unreadable or reached through a link: the job is dropped (discovery looks again)."""

    def __init__(self, reason: str, recheck: bool = False):
        super().__init__(reason)
        self.recheck = recheck


class Worker:
    def __init__(self, cfg: Config, queue: Queue, *, enhancer: Enhancer | None = None,
                 enhancer_problem: str | None = None, hooks=None, metrics=None,
                 progress: Callable[[], None] | None = None,
                 on_forget: Callable[[str, bool], None] | None = None):
        self.cfg = cfg
        self.queue = queue
        self.enhancer = enhancer
        self.enhancer_problem = enhancer_problem
        self.hooks = hooks
        self.metrics = metrics
        self._progress = progress or (lambda: None)
        self.on_forget = on_forget or (lambda rel, recheck=False: None)
        self.current: dict | None = None
        self.folder_problem: str | None = None
        self.handled = 0               # jobs finished (done or failed) since start, for "3 of 17"
        # A result whose publish hit a folder problem or a name conflict: kept so that the next try
        # publishes it again instead of recomputing. One at a time: (job id, sha256, Finished).
        self._held: tuple[int, str, Finished] | None = None
        self._replans: dict[int, int] = {}
        self._leases: dict[int, int] = {}              # job id → fencing token of every job in hand
        self._beat_at = 0.0
        self._tl = threading.local()                   # .job: the job this thread works on (fences, progress)
        self._lock = threading.RLock()                 # `current` and `handled` (the pipeline's threads)
        self.configure(cfg)

    def configure(self, cfg: Config) -> None:
        """(Re)load settings; called again on SIGHUP between jobs."""
        self.cfg = cfg
        f = cfg.folders
        self.publisher = Publisher(f.inbox, f.outbox, f.failed, f.archive, cfg.jobs.originals,
                                   host=getattr(self.queue, "tmp_subdir", None))
        e = cfg.enhance
        self.limits = imageio.Limits(max_input_megapixels=e.max_input_megapixels,
                                     max_output_megapixels=e.max_output_megapixels)

    def progress(self, **info) -> None:
        """A step or tile of the job in hand: `info` updates `current` when the calling thread works
        on the job `current` describes (the one in the model); always a heartbeat and a ping."""
        if info:
            with self._lock:
                cur = self.current
                if cur is not None and cur.get("job") == getattr(self._tl, "job", cur.get("job")):
                    self.current = {**cur, **info}
        self._heartbeat()
        self._progress()

    def _heartbeat(self) -> None:
        """Renew the leases of the jobs in hand, at most every quarter lease. Never raises: a lost
        lease or an unreachable queue stops the job at its next recorded step (fenced)."""
        if not self._leases:
            return
        t = time.monotonic()
        if t - self._beat_at < getattr(self.queue, "lease_s", 60.0) / 4:
            return
        self._beat_at = t
        for job_id, token in list(self._leases.items()):
            try:
                self.queue.heartbeat(job_id, token)
            except (LeaseLost, StateUnavailable) as exc:
                log.warning("job.heartbeat_failed", job=job_id, error=str(exc))

    def _fence(self, step: dict | None = None) -> None:
        """Before each irreversible publish step: is our claim still current? (renews the lease;
        LeaseLost stops the plan before the step.)"""
        job_id = getattr(self._tl, "job", None)
        token = self._leases.get(job_id) if job_id is not None else None
        if token is not None:
            self.queue.heartbeat(job_id, token)
            self._beat_at = time.monotonic()

    def _begin(self, job: Job, now: float, in_model: bool = True) -> None:
        """A claimed job: its lease is held (renewed, fenced) until `_release`."""
        token = getattr(job, "token", None)
        if token is not None:
            self._leases[job.id] = token
        self._beat_at = time.monotonic()
        self._tl.job = job.id
        if in_model:
            with self._lock:
                self.current = {"job": job.id, "path": job.rel_path, "stage": "claim", "started": now}
        log.info("job.started", job=job.id, path=job.rel_path, attempt=job.attempts + 1,
                 interruptions=job.interruptions)

    def _release(self, job_id: int) -> None:
        self._leases.pop(job_id, None)
        self._tl.job = None
        with self._lock:
            if self.current is not None and self.current.get("job") == job_id:
                self.current = None

    def _count(self, out: Outcome) -> Outcome:
        with self._lock:
            self.handled += out.state in ("done", "failed")
        if self.metrics is not None and out.state in ("done", "failed", "retry"):
            dup = out.state == "done" and bool((out.sidecar or {}).get("duplicate_of"))
            self.metrics.outcome("duplicate" if dup else out.state if out.state != "retry" else "retried")
        return out

    # --- the loop body ------------------------------------------------------------------------

    def run_once(self, now: float | None = None) -> Outcome | None:
        """Claim one job and run all its steps here (jobs.prefetch 0; the unit of the tests)."""
        now = time.time() if now is None else now
        job = self.queue.claim(now)
        if job is None:
            return None
        self._begin(job, now)
        try:
            out = self._stage(job, now)
        finally:
            self._release(job.id)
        return self._count(out)

    def _stage(self, job: Job, now: float, body: Callable[[], object] | None = None):
        """Run `body` (default: every step of the job) with the error routes of a job: an Outcome
        when the job ended, else what `body` returned. Storage errors propagate (the daemon decides)."""
        try:
            return self._guarded(job, now, body)
        except LeaseLost as exc:          # another host owns the job now: it finishes it
            log.warning("job.lease_lost", job=job.id, path=job.rel_path, reason=str(exc),
                        action="stopped before the next irreversible step")
            if self._held is not None and self._held[0] == job.id:
                self._held = None
            return Outcome(job.id, job.rel_path, "lost", str(exc))
        except Exception as exc:
            if _is_storage(exc):
                raise
            try:
                return self._contain(job, exc, now)
            except LeaseLost as lost:
                return Outcome(job.id, job.rel_path, "lost", str(lost))

    def _interrupted(self, job: Job, now: float) -> Outcome | None:
        limit = self.cfg.jobs.max_interruptions
        if job.interruptions >= limit and not job.plan:
            return self._fail(job, "interrupted", _interrupted_message(job, limit), job.attempts, now)
        return None

    def _guarded(self, job: Job, now: float, body: Callable[[], object] | None = None):
        try:
            try:
                if body is not None:
                    return body()
                return self._interrupted(job, now) or self._process(job, now)
            except _Changed:
                self._forget(job, "changed", "the file changed after it settled", recheck=True)
                return Outcome(job.id, job.rel_path, "changed", "the file changed after it settled")
            except _Gone as exc:
                self._forget(job, "vanished", str(exc), recheck=exc.recheck)
                return Outcome(job.id, job.rel_path, "vanished", str(exc))
            except PermanentError as exc:
                return self._fail(job, exc.kind, str(exc), job.attempts + 1, now)
            except WeightsMissingError as exc:
                return self._defer(job, str(exc), WEIGHTS_RETRY_S, now)
            except (FolderError, PlanBroken, LeaseLost):
                raise
            except EnhanceError as exc:               # TransientError and the rest of the enhancer's
                return self._transient(job, exc.kind, str(exc), now)
            except Exception as exc:
                if _is_storage(exc):
                    raise                             # the queue itself: the daemon decides
                # a bug of ours or a library's: counted, never a loop
                log.exception("job.internal_error", job=job.id, path=job.rel_path)
                return self._transient(job, "internal", f"{type(exc).__name__}: {names.safe(str(exc))}", now)
        except FolderError as exc:
            if exc.unsafe:                            # a planted link: only this job waits
                return self._defer(job, str(exc), UNSAFE_RETRY_S, now)
            self.folder_problem = str(exc)
            return self._defer(job, str(exc), FOLDER_RETRY_S, now)
        except PlanConflict as exc:
            self.publisher.discard(self.queue.get(job.id).plan or {})
            self.queue.set_plan(job.id, None)
            n = self._replans[job.id] = self._replans.get(job.id, 0) + 1
            log.warning("publish.replan", job=job.id, path=job.rel_path, reason=str(exc), replans=n)
            if n > MAX_REPLANS:
                self._replans.pop(job.id, None)
                return self._transient(job, "internal", f"publish names kept being taken: {exc}", now)
            return self._defer(job, "a planned name was taken; planning again", 0, now)
        except PlanBroken as exc:
            log.warning("publish.plan_dropped", job=job.id, reason=str(exc))
            self.queue.set_plan(job.id, None)
            return self._defer(job, "publish restarted", 0, now)

    def _contain(self, job: Job, exc: Exception, now: float) -> Outcome:
        """An error in the error handling itself (a bug): keep it to this job. It goes back to the
        queue with an attempt counted and a long backoff; the daemon carries on with the others."""
        log.exception("job.crashed", job=job.id, path=job.rel_path)
        message = f"{type(exc).__name__}: {names.safe(str(exc))}"
        cur = self.queue.get(job.id)
        if cur.state != "running":
            return Outcome(job.id, job.rel_path, cur.state, message)
        if cur.plan:
            self.publisher.discard(cur.plan)
            self.queue.set_plan(job.id, None)
        delay = max(self.cfg.jobs.backoff(cur.attempts + 1), UNSAFE_RETRY_S)
        self.queue.retry_later(job.id, "internal", message, delay, now)
        log.error("job.stuck", job=job.id, path=job.rel_path, error=message, delay_s=delay)
        return Outcome(job.id, job.rel_path, "retry", message)

    def _forget(self, job: Job, event: str, reason: str, recheck: bool) -> None:
        self.queue.forget(job.id)
        self.on_forget(job.rel_path, recheck)
        log.warning(f"job.{event}", job=job.id, path=job.rel_path, reason=reason)

    def _defer(self, job: Job, reason: str, delay: float, now: float) -> Outcome:
        self.queue.defer(job.id, reason, delay, now)
        log.warning("job.waiting", job=job.id, path=job.rel_path, reason=reason)
        return Outcome(job.id, job.rel_path, "deferred", reason)

    def _transient(self, job: Job, kind: str, message: str, now: float) -> Outcome:
        attempts = job.attempts + 1
        if attempts >= self.cfg.jobs.max_attempts:
            return self._fail(job, kind, f"{message} (after {attempts} attempts)", attempts, now)
        delay = self.cfg.jobs.backoff(attempts)
        self.queue.retry_later(job.id, kind, message, delay, now)
        log.warning("job.retry", job=job.id, path=job.rel_path, kind=kind, error=message,
                    attempt=attempts, delay_s=delay)
        return Outcome(job.id, job.rel_path, "retry", message)

    # --- steps --------------------------------------------------------------------------------

    def _process(self, job: Job, now: float) -> Outcome:
        got = self._load(job, now)
        if isinstance(got, Outcome):
            return got
        return self._finish(got, self._infer(got), now)

    def _load(self, job: Job, now: float) -> "Outcome | _Loaded":
        """read → checks → prepare → decode: the job ends here (an Outcome) or is ready for the model."""
        if job.plan:                                   # a publish that stopped half-way: finish it
            return self.complete_plan(job, now=now)
        job, src = self._read(job)
        leftover = self._leftover(job, src, now)
        if leftover is not None:
            return leftover
        if self._held is not None and self._held[:2] == (job.id, job.sha256):
            log.info("job.publish_again", job=job.id, path=job.rel_path)
            return self._publish_done(job, self._held[2], now)
        t0 = time.perf_counter()
        profile, upscale, hot = self.cfg.enhance.for_path(job.rel_path)
        name = job.rel_path.rpartition("/")[2]
        self.progress(stage="decode")
        try:
            prep = prepare(src.data, name, self.cfg, self.limits, profile, upscale, hot, job.attempts + 1,
                           tick=self.progress)
        except PermanentError:
            self._changed_since(job)
            raise
        if self.cfg.jobs.skip_duplicates:
            dup = self._duplicate(job, src, prep, t0, now)
            if dup is not None:
                return dup
        if self.enhancer is None:
            raise WeightsMissingError(self.enhancer_problem or "models not loaded yet")
        timings: dict[str, float] = {}
        try:
            decoded = decode_step(src.data, name, self.limits, self.progress, timings)
        except _DecodeFailed as exc:
            self._changed_since(job)
            raise exc.__cause__ from None
        return _Loaded(job, src, prep, name, t0, decoded, timings)

    def _infer(self, ld: "_Loaded") -> "_Inferred":
        """The model, every page (one job at a time in the model)."""
        return infer_step(ld.decoded, ld.prep, self.enhancer, self.progress, ld.timings)

    def _finish(self, ld: "_Loaded", inf: "_Inferred", now: float) -> Outcome:
        """encode → sidecar → publish → record."""
        job, prep = ld.job, ld.prep
        r = encode_step(ld.src.data, ld.decoded, inf, prep, self.cfg.enhance.jpeg_quality, ld.timings,
                        self.progress, provenance=self.cfg.enhance.provenance, now=now)
        sc = self._sidecar(job, "done", now, prep.info, prep.eff, r.timings)
        sc.update(r.sidecar_extra)
        sc["metadata"] = sidecar_mod.metadata_block(r.notes)
        return self._publish_done(job, Finished(r.data, prep.result_name, sc, prep.eff, r.out_info, r.timings,
                                                ld.t0, faces=r.faces, ino=ld.src.st.st_ino,
                                                companion=_stamper(r.provenance)), now)

    # --- the pipeline's stages (jobs.prefetch > 0; see Pipeline) --------------------------------

    def _load_stage(self, now: float | None, ahead: bool) -> "Outcome | _Loaded | None":
        """Claim + load. `ahead`: another job is in the model meanwhile; a job loaded ahead is
        marked (wait_reason AHEAD) while it waits, so a restart does not count it interrupted."""
        now = time.time() if now is None else now
        job = self.queue.claim(now)
        if job is None:
            return None
        self._begin(job, now, in_model=not ahead)
        try:
            got = self._stage(job, now, lambda: self._interrupted(job, now) or self._load_marked(job, now, ahead))
        except BaseException:
            self._release(job.id)
            raise
        if isinstance(got, Outcome):
            self._release(job.id)
            return self._count(got)
        self._tl.job = None                 # the lease stays held (heartbeats) until the job ends
        return got

    def _load_marked(self, job: Job, now: float, ahead: bool):
        got = self._load(job, now)
        if ahead and isinstance(got, _Loaded):
            self.queue.set_plan(job.id, None, wait_reason=AHEAD)
            got.marked = True
        return got

    def _model_stage(self, ld: "_Loaded", now: float) -> "Outcome | _Inferred":
        """The model, on the calling thread; `current` describes this job from here on."""
        job = ld.job
        self._tl.job = job.id
        with self._lock:
            self.current = {"job": job.id, "path": job.rel_path, "stage": "enhance", "started": now}
        log.debug("job.model", job=job.id, path=job.rel_path)

        def body():
            if ld.marked:                   # in the model now: a restart counts it again
                self.queue.set_plan(job.id, None, wait_reason=None)
                ld.marked = False
            return self._infer(ld)
        try:
            got = self._stage(job, now, body)
        except BaseException:
            self._release(job.id)
            raise
        self._tl.job = None
        if isinstance(got, Outcome):
            self._release(job.id)
            return self._count(got)
        return got

    def _finish_stage(self, ld: "_Loaded", inf: "_Inferred", now: float) -> Outcome:
        self._tl.job = ld.job.id
        try:
            out = self._stage(ld.job, now, lambda: self._finish(ld, inf, now))
        finally:
            self._release(ld.job.id)
        return self._count(out)

    def _give_back(self, ld: "_Loaded") -> None:
        """A job loaded ahead and not started: back to pending, no interruption counted."""
        try:
            self.queue.requeue(ld.job.id)
            log.info("job.released", job=ld.job.id, path=ld.job.rel_path, reason="loaded ahead, not started")
        except Exception as exc:
            if _is_storage(exc):
                raise
            log.warning("job.release_failed", job=ld.job.id, error=str(exc))
        finally:
            self._release(ld.job.id)

    def _read(self, job: Job) -> tuple[Job, Source]:
        """The photo, read once through a safe open, and checked against what was queued."""
        inbox = self.cfg.folders.inbox
        try:
            with safefs.dir_of(inbox, job.rel_path) as (dfd, name):
                fd, st = safefs.open_read_at(dfd, name)
                try:
                    if st.st_size > self.limits.max_bytes:
                        raise TooLargeError(f"{names.safe(name)} has {st.st_size} bytes, over the limit of "
                                            f"{self.limits.max_bytes} bytes")
                    data = safefs.read_fd(fd, self.limits.max_bytes)
                finally:
                    os.close(fd)
        except safefs.UnsafePath:
            raise _Gone("reached through a symlink: never followed") from None
        except FileNotFoundError:
            raise _Gone("gone") from None
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise _Gone("no longer a regular file") from None
            raise _Gone(f"unreadable: {exc.strerror}", recheck=True) from None
        if (len(data), st.st_mtime_ns) != (job.size, job.mtime_ns) or hashlib.sha256(data).hexdigest() != job.sha256:
            raise _Changed()        # not what was queued: it settles again and becomes a job of its own
        return job, Source(data, st)

    def _leftover(self, job: Job, src: Source, now: float) -> Outcome | None:
        """An original still in the inbox whose result and sidecar were published before the queue
        was lost (rebuilt from sidecars): finish its publish instead of redoing it."""
        prev = self.queue.rebuilt_done(job.rel_path, job.sha256)
        if prev is None or prev.mtime_ns != job.mtime_ns or not prev.outputs:
            return None
        dest = self.publisher.archive if self.cfg.jobs.originals == "archive" else None
        steps = self.publisher._original_steps(self.cfg.folders.inbox / job.rel_path, job.rel_path, job.size,
                                               job.mtime_ns, dest, "archive", set(), job.id,
                                               ident={"ino": src.st.st_ino})
        if dest is not None:
            # archived (linked or copied) before the crash, not yet unlinked from the inbox: that
            # copy is the archive; only the unlink is left to do
            try:
                there = safefs.lstat(dest, job.rel_path)
            except OSError:
                there = None
            if there is not None and (there.st_size, there.st_mtime_ns) == (job.size, job.mtime_ns):
                steps[0]["dst"] = str(dest / job.rel_path)
        plan = {"kind": "done", "steps": steps, "outputs": [prev.outputs[0].get("path")],
                "sidecar": str(prev.outputs[0].get("path")) + ".json", "record": prev.outputs,
                "duplicate_of": prev.id}
        self.queue.set_plan(job.id, plan, params=prev.params, profile=prev.profile)
        log.info("job.leftover", job=job.id, path=job.rel_path, published_by=prev.id)
        return self.complete_plan(self.queue.get(job.id), now=now)

    def _changed_since(self, job: Job) -> None:
        """Before a decode error sends a photo to failed/: has it changed since it settled?"""
        try:
            st = safefs.lstat(self.cfg.folders.inbox, job.rel_path)
        except OSError:
            return
        if st is not None and (st.st_size, st.st_mtime_ns) != (job.size, job.mtime_ns):
            raise _Changed()

    def _duplicate(self, job: Job, src: Source, prep: "Prepared", t0: float, now: float) -> Outcome | None:
        prev = self.queue.done_with(job.sha256, prep.eff["key"])
        if prev is None or prev.id == job.id:        # (another host may have finished this very job)
            return None
        out = prev.outputs[0]
        try:
            data = self.publisher._read(Path(out["path"]))
        except (OSError, ValueError):
            return None
        if hashlib.sha256(data).hexdigest() != out.get("sha256"):
            return None                      # the earlier result was edited or replaced: recompute
        sc = self._sidecar(job, "done", now, prep.info, prep.eff, {})
        sc.update({"outputs": [{k: out[k] for k in ("bytes", "sha256", "width", "height", "format", "pages") if k in out}],
                   "duplicate_of": prev.id, "faces": prev.params.get("faces", 0),
                   "models": prev.params.get("models_used", []), "device": None})
        log.info("job.duplicate", job=job.id, path=job.rel_path, duplicate_of=prev.id)
        return self._publish_done(job, Finished(data, prep.result_name, sc, prep.eff, sc["outputs"][0], {}, t0,
                                                duplicate_of=prev.id, faces=sc["faces"], ino=src.st.st_ino), now)

    def _sidecar(self, job: Job, status: str, now: float, info=None, eff: dict | None = None,
                 timings: dict | None = None, attempts: int | None = None) -> dict:
        return sidecar_mod.build(status, job=job.id, path=job.rel_path, size=job.size, sha256=job.sha256,
                                 mtime_ns=job.mtime_ns, now=now, info=info, eff=eff, timings=timings,
                                 attempts=job.attempts + 1 if attempts is None else attempts,
                                 interruptions=job.interruptions)

    def _reserved(self, job_id: int) -> set[str]:
        """Target names of other unfinished plans: never given out twice."""
        return {s["dst"] for j in self.queue.with_plan() if j.id != job_id
                for s in j.plan.get("steps", []) if "dst" in s}

    def _publish_done(self, job: Job, fin: Finished, now: float) -> Outcome:
        self.progress(stage="publish")
        self._held = (job.id, job.sha256, fin)
        t = time.perf_counter()
        fin.timings.setdefault("total", _ms(fin.t0))
        fin.sidecar["timings_ms"] = fin.timings
        plan = self.publisher.plan_done(job.id, job.rel_path, job.size, job.mtime_ns, fin.data, fin.result_name,
                                        fin.sidecar, reserved=self._reserved(job.id),
                                        ident={"ino": fin.ino} if fin.ino else None,
                                        render_sidecar=sidecar_mod.render, companion_data=fin.companion)
        out = {**fin.out_info, "path": plan["outputs"][0]}
        record = {**fin.eff, "faces": fin.faces, "models_used": fin.sidecar.get("models", [])}
        try:
            self.queue.set_plan(job.id, {**plan, "record": [out], "duplicate_of": fin.duplicate_of}, params=record,
                                profile=fin.eff.get("profile"))
        except BaseException:
            self.publisher.discard(plan)          # not recorded (lease lost, queue gone): nobody runs it
            raise
        self.publisher.execute(plan, before_step=self._fence)
        self.queue.finish(job.id, [out], now=now, duplicate_of=fin.duplicate_of)
        self._held = None
        self._replans.pop(job.id, None)
        if self.metrics is not None:
            for stage, ms in fin.timings.items():
                self.metrics.observe(stage, ms)
            self.metrics.observe("publish", _ms(t))
            self.metrics.faces(fin.faces)
            self.metrics.success(now)
        log.info("job.done", job=job.id, path=job.rel_path, output=out["path"], faces=fin.faces,
                 ms=round(fin.timings["total"]), duplicate_of=fin.duplicate_of)
        self._fire("done", fin.sidecar, {"input": str(self.cfg.folders.inbox / job.rel_path), "output": out["path"],
                                         "sidecar": plan["sidecar"]})
        return Outcome(job.id, job.rel_path, "done", sidecar=fin.sidecar, timings_ms=fin.timings)

    def _fail(self, job: Job, kind: str, message: str, attempts: int, now: float) -> Outcome:
        self.progress(stage="publish")
        sc = self._sidecar(job, "failed", now, attempts=attempts)
        sc["error"] = {"kind": kind, "message": message}
        plan = self.publisher.plan_failed(job.id, job.rel_path, job.size, job.mtime_ns, sc,
                                          reserved=self._reserved(job.id), render_sidecar=sidecar_mod.render)
        try:
            self.queue.set_plan(job.id, {**plan, "error": {"kind": kind, "message": message}, "attempts": attempts})
        except BaseException:
            self.publisher.discard(plan)
            raise
        self.publisher.execute(plan, before_step=self._fence)
        self.queue.fail(job.id, kind, message, now=now, outputs=[{"path": plan["outputs"][0]}], attempts=attempts)
        self._replans.pop(job.id, None)
        log.error("job.failed", job=job.id, path=job.rel_path, kind=kind, error=message, attempts=attempts)
        self._fire("failed", sc, {"input": str(self.cfg.folders.inbox / job.rel_path),
                                  "output": plan["outputs"][0], "sidecar": plan["sidecar"]})
        return Outcome(job.id, job.rel_path, "failed", message, sidecar=sc)

    def complete_plan(self, job: Job, recovering: bool = False, now: float | None = None) -> Outcome:
        """Run a recorded plan to its end (idempotent) and record the outcome."""
        now = time.time() if now is None else now
        plan = job.plan
        self.publisher.execute(plan, before_step=self._fence)
        if plan["kind"] == "done":
            if recovering:
                self.queue.apply(job.id, "recover_done", now, outputs=plan["record"], plan=None, finished=now,
                                 duplicate_of=plan.get("duplicate_of"))
            else:
                self.queue.finish(job.id, plan["record"], now=now, duplicate_of=plan.get("duplicate_of"))
            log.info("job.done", job=job.id, path=job.rel_path, output=plan["outputs"][0], recovered=True)
            return Outcome(job.id, job.rel_path, "done")
        err = plan.get("error", {})
        sets = dict(error_kind=err.get("kind"), last_error=err.get("message"), plan=None,
                    outputs=[{"path": plan["outputs"][0]}], finished=now, attempts=plan.get("attempts", job.attempts))
        self.queue.apply(job.id, "recover_failed" if recovering else "fail", now, **sets)
        log.error("job.failed", job=job.id, path=job.rel_path, kind=err.get("kind"), error=err.get("message"),
                  recovered=True)
        return Outcome(job.id, job.rel_path, "failed", err.get("message", ""))

    def _fire(self, event: str, sidecar: dict, paths: dict) -> None:
        if self.hooks is not None:
            self.hooks.fire(event, sidecar, paths)


def _stamper(provenance) -> Callable[[bytes], bytes] | None:
    """The result's history entry, added to the .xmp companions that travel with it too."""
    if provenance is None:
        return None
    from enhancer import metadata
    return lambda data: metadata.stamp_xmp_file(data, provenance)


def _interrupted_message(job: Job, limit: int) -> str:
    return (f"the daemon stopped {job.interruptions} times while this photo was being processed (limit "
            f"jobs.max_interruptions = {limit}): most likely it was killed for using too much memory "
            "(out-of-memory killer), hit the watchdog, or a decoder or model crashed on it. Look for an "
            f"OOM kill in the journal, lower enhance.tile or max_input_megapixels, then run "
            f"`photoenhanced retry {job.id}`")


def _is_storage(exc: BaseException) -> bool:
    """An error of the queue's own storage (full/read-only/corrupt state_dir)."""
    from . import errors
    kinds = tuple(getattr(errors, n) for n in ("StateUnavailable", "QueueCorrupt") if hasattr(errors, n))
    import sqlite3
    return isinstance(exc, kinds + (sqlite3.Error,))


@dataclass
class Prepared:
    info: imageio.Info
    params: Params
    eff: dict                   # the effective settings (sidecar `params`; `key` identifies duplicates)
    fmt: str
    result_name: str


@dataclass
class Rendered:
    data: bytes
    out_info: dict
    timings: dict
    faces: int
    sidecar_extra: dict
    notes: list = field(default_factory=list)
    provenance: object = None            # the stamp written into the result (None: provenance off)


class _DecodeFailed(Exception):
    pass


def prepare(source: bytes | Path, name: str, cfg: Config, limits, profile: str, upscale: float, hot: str,
            attempt: int, tick: Callable[..., None] | None = None) -> Prepared:
    """Header only: limits, the output scale and format, the effective settings."""
    info = imageio.probe(source, limits, name=name, tick=tick)
    fmt, ext = imageio.output_format(info.format, cfg.enhance.output_format)
    scale = imageio.output_scale(info, upscale, limits, fmt)
    m = cfg.enhance.models
    e = cfg.enhance
    key = (f"{profile}:{scale:g}:{fmt}:{e.jpeg_quality}:{m.face}:{m.background}:{m.detector}"
           f":{e.face_fidelity:g}:{e.face_strength:g}:{e.provenance}")   # every setting that changes the bytes"
    params = Params(profile=profile, upscale=scale, tile=cfg.enhance.tile, attempt=attempt)
    eff = {"key": key, "profile": profile, "upscale": upscale, "scale": scale, "hot_folder": hot or None,
           "tile": cfg.enhance.tile, "output_format": fmt, "jpeg_quality": cfg.enhance.jpeg_quality,
           "models": {"face": m.face, "background": m.background, "detector": m.detector}}
    result_name = name if not ext else f"{name.rsplit('.', 1)[0]}.{ext}"
    return Prepared(info, params, eff, fmt, result_name)


@dataclass
class _Loaded:
    """A job through its load stage: read, checked, prepared and decoded."""
    job: Job
    src: Source
    prep: Prepared
    name: str
    t0: float
    decoded: object
    timings: dict
    marked: bool = False             # wait_reason AHEAD recorded (loaded ahead, waiting for the model)


@dataclass
class _Inferred:
    pages: list
    faces: int
    boxes: list
    result: object                   # the last page's enhancer Result (models, device, precision, tile)


def render(source: bytes | Path, name: str, prep: Prepared, enhancer: Enhancer, limits, jpeg_quality: int,
           progress: Callable[..., None], provenance: bool = True, now: float | None = None) -> Rendered:
    """decode → enhance (every page) → encode. Decode errors come wrapped in _DecodeFailed.
    `provenance`: stamp the result (enhance.provenance); `now`: the stamp's time."""
    timings: dict[str, float] = {}
    decoded = decode_step(source, name, limits, progress, timings)
    inf = infer_step(decoded, prep, enhancer, progress, timings)
    return encode_step(source, decoded, inf, prep, jpeg_quality, timings, progress, provenance, now)


def decode_step(source: bytes | Path, name: str, limits, progress: Callable[..., None], timings: dict):
    """The decoded photo (imageio.Decoded); errors wrapped in _DecodeFailed."""
    t = time.perf_counter()
    try:
        decoded = imageio.decode(source, limits, name=name, tick=progress)
    except PermanentError as exc:
        raise _DecodeFailed() from exc
    timings["decode"] = _ms(t)
    return decoded


def infer_step(decoded, prep: Prepared, enhancer: Enhancer, progress: Callable[..., None],
               timings: dict) -> _Inferred:
    """The enhancer on every page."""
    pages, faces, result, boxes = [], 0, None, []
    for i, page in enumerate(decoded.pages):
        progress(stage="enhance", page=i + 1)
        # integer result (8/16 bits as the source): streamed by the enhancer, no float copy
        result = enhancer.enhance(page.rgb, dataclasses.replace(prep.params, bits=decoded.bits),
                                  progress=progress)
        _check_pixels(result.image)
        faces += result.faces
        boxes += [{"page": i + 1, "box": list(b[:4]), "score": b[4]} for b in getattr(result, "face_boxes", ())]
        for k, v in result.timings_ms.items():
            timings[k] = timings.get(k, 0.0) + v
        h, w = result.image.shape[:2]
        alpha = imageio.resize_alpha(page.alpha, (w, h)) if page.alpha is not None else None
        pages.append(imageio.Page(rgb=result.image, alpha=alpha))
        progress(faces=faces)
    return _Inferred(pages, faces, boxes, result)


def encode_step(source: bytes | Path, decoded, inf: _Inferred, prep: Prepared, jpeg_quality: int, timings: dict,
                progress: Callable[..., None], provenance: bool = True, now: float | None = None) -> Rendered:
    """The result's bytes, its output facts and the sidecar's extra keys."""
    pages, faces, boxes, result = inf.pages, inf.faces, inf.boxes, inf.result
    progress(stage="encode")
    t = time.perf_counter()
    notes: list = list(decoded.notes)          # metadata dropped while decoding, then while encoding
    stamp = None
    if provenance:
        raw = source if isinstance(source, (bytes, bytearray)) else Path(source).read_bytes()
        stamp = sidecar_mod.provenance(bytes(raw), prep.eff, time.time() if now is None else now)
    data = imageio.encode(decoded, pages, prep.fmt, jpeg_quality, notes=notes, provenance=stamp)
    timings["encode"] = _ms(t)
    h, w = pages[0].rgb.shape[:2]
    out_info = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "width": w, "height": h,
                "format": prep.fmt, "pages": len(pages)}
    for k in ("detect", "restore", "upscale"):
        timings.setdefault(k, 0.0)
    extra = {"outputs": [out_info], "faces": faces, "face_boxes": boxes,
             "models": [{"name": mi.name, "sha256": mi.sha256, "source": mi.source,
                         **(getattr(mi, "details", None) or {})} for mi in result.models],
             "weights_source": sorted({mi.source for mi in result.models if mi.source}) or None,
             "device": result.device, "precision": result.precision, "tile": result.tile}
    return Rendered(data, out_info, timings, faces, extra, notes, stamp)


def _ms(t: float) -> float:
    return round((time.perf_counter() - t) * 1000, 1)


def _check_pixels(img: np.ndarray) -> None:
    bad_values = img.dtype.kind == "f" and not np.isfinite(img).all()    # integer results are finite
    if img.ndim != 3 or img.shape[2] != 3 or bad_values:
        raise TransientError("the enhancer returned an invalid image (shape or non-finite values)")


def reconcile(worker: Worker, queue: Queue, *, start: bool = False, now: float | None = None) -> dict[str, int]:
    """Finish every recorded publish plan, remove stale temp files; at start-up first put the jobs
    that were `running` when the previous process died back to pending (one interruption each).
    Runs at start and again whenever a folder that was unusable comes back."""
    now = time.time() if now is None else now
    requeued = queue.requeue_running(now) if start else []
    done = failed = dropped = waiting = 0
    # a shared queue (several hosts): a recorded plan is finished by whoever claims its job, fenced
    for job in ([] if getattr(queue, "shared", False) else queue.with_plan()):
        try:
            out = worker.complete_plan(job, recovering=True, now=now)
            done += out.state == "done"
            failed += out.state == "failed"
        except PlanBroken as exc:
            log.warning("recover.plan_dropped", job=job.id, reason=str(exc))
            worker.publisher.discard(job.plan)
            queue.set_plan(job.id, None)
            dropped += 1
        except FolderError as exc:
            waiting += 1
            log.warning("recover.waiting", job=job.id, reason=str(exc))
    keep = {step["tmp"] for job in queue.with_plan() for step in job.plan["steps"] if "tmp" in step}
    cleaned = worker.publisher.clean_tmp(keep)
    stats = {"requeued": len(requeued), "done": done, "failed": failed, "dropped": dropped, "waiting": waiting,
             "tmp_removed": cleaned}
    log.info("recover.finished", **stats)
    return stats


def recover(worker: Worker, queue: Queue) -> dict[str, int]:
    """Start-up reconciliation (see reconcile)."""
    return reconcile(worker, queue, start=True)


# --- the pipeline (jobs.prefetch > 0) -----------------------------------------------------------

_QUEUE_LOCKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class Serialized:
    """A queue used by several threads (the pipeline's, the daemon's worker loop): one operation at
    a time. Each operation is one transaction, so this is all the sharing needs."""

    def __init__(self, queue):
        self._queue = queue
        self._lock = _QUEUE_LOCKS.setdefault(queue, threading.RLock())

    def __getattr__(self, name: str):
        value = getattr(self._queue, name)
        if not callable(value):
            return value

        def call(*args, **kwargs):
            with self._lock:
                return value(*args, **kwargs)
        return call


def serialized(queue):
    return queue if queue is None or isinstance(queue, Serialized) else Serialized(queue)


def _spawn(fn: Callable[[], object], name: str) -> Future:
    """fn on a new daemon thread; its result or exception lands in the Future."""
    fut: Future = Future()

    def run() -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn())
        except BaseException as exc:      # raised again where the result is taken
            fut.set_exception(exc)
    threading.Thread(target=run, name=name, daemon=True).start()
    return fut


# Loading a photo ahead holds one more decoded photo (float32 RGB + alpha: 16 bytes a pixel, 384 MB
# at 24 MP) while the photo in the model still grows by its output and the model's working memory
# (CPU: tiles' activations up to 1.5 GB, faces' up to 1 GB; CUDA: they live on the device). A job is
# loaded ahead only while all of that fits what the system has available: a small box with large
# photos runs them one at a time instead of being killed for memory. Decoding ahead buys ~0.1–0.3 %
# of a photo's time on CPU at real sizes; on a GPU host, where it matters, memory is rarely short.
DECODED_BYTES_PER_PX = 16
WORKING_RESERVE = {"cpu": 2_000_000_000, "cuda": 500_000_000}


class Pipeline:
    """No idle model (DESIGN invariant 7): while the calling thread runs the model on job N, job N+1
    is claimed, read and decoded on a helper thread (up to `depth` jobs ahead, one load at a time)
    and job N-1 is encoded and published on another (one at a time). Jobs loaded ahead are
    `running`, leases renewed with the others, marked AHEAD while they wait (a restart returns them
    to pending without an interruption). Each stage keeps run_once's error routes; an exception a
    helper thread could not route (the queue's storage, a BaseException) is raised on the calling
    thread, after the other stages were handed on. Nothing is loaded ahead while memory is short
    (`room_ahead`); `memory` is injectable (tests), bytes available or None for unknown."""

    def __init__(self, worker: Worker, depth: int = 1,
                 memory: Callable[[], int | None] = mem_available):
        self.worker = worker
        self.depth = max(1, depth)
        self.memory = memory
        self.short: bool = False                # memory was too short to load ahead (logged once)
        self.ahead: deque[Future] = deque()     # load results (None | Outcome | _Loaded), oldest first
        self.behind: Future | None = None       # the finish stage of the last job out of the model

    def step(self, now: float | None = None) -> Outcome | None:
        """One job through the model (or ended before it). Returns the outcome of a job that ended
        meanwhile, `finishing` when the job left the model and nothing ended, None when idle."""
        w = self.worker
        w.queue = serialized(w.queue)
        got = self._take(now)
        if got is None:                          # nothing due: the one behind finishes
            out, err = self._collect(wait=True)
            if err is not None:
                raise err
            return out
        if isinstance(got, Outcome):             # it ended in its load stage
            self._top_up(None)
            out, err = self._collect(wait=False)
            if err is not None:
                raise err
            return got
        self._top_up(got)                        # the next job loads while this one is in the model
        mid = w._model_stage(got, time.time() if now is None else now)
        prev, err = self._collect(wait=True)     # one behind at a time (memory stays bounded)
        if not isinstance(mid, Outcome):
            self.behind = _spawn(lambda: w._finish_stage(got, mid, time.time() if now is None else now),
                                 f"finish-{got.job.id}")
        if err is not None:
            raise err
        if isinstance(mid, Outcome):
            return mid
        return prev if prev is not None else Outcome(got.job.id, got.job.rel_path, "finishing")

    def _take(self, now: float | None):
        while self.ahead:
            got = self.ahead.popleft().result()      # a storage error of the load is raised here
            if got is not None:
                return got
        return self.worker._load_stage(now, ahead=False)

    def _top_up(self, current: "_Loaded | None") -> None:
        if len(self.ahead) < self.depth and (not self.ahead or self.ahead[-1].done()) \
                and self.room_ahead(current):
            w = self.worker
            self.ahead.append(_spawn(lambda: w._load_stage(None, ahead=True), "load-ahead"))

    def room_ahead(self, current: "_Loaded | None") -> bool:
        """Whether the largest photo the config admits fits in memory, decoded, beside `current`
        (the job about to enter the model: its output and the model's working memory)."""
        free = self.memory()
        if free is None:
            return True
        w = self.worker
        need = int(w.limits.max_input_megapixels * 1_000_000 * DECODED_BYTES_PER_PX)
        if current is not None:
            device = "cpu"
            if w.enhancer is not None:
                with contextlib.suppress(Exception):       # describe is informative only
                    device = str(w.enhancer.describe().get("device", "cpu")).split(":")[0]
            info, params = current.prep.info, current.prep.params
            cap = w.limits.max_output_megapixels * 1_000_000        # per output page
            out_px = sum(min(a * b * params.upscale ** 2, cap) for a, b in info.sizes())
            bits = getattr(current.decoded, "bits", 16)
            need += int(out_px * 3 * (2 if bits > 8 else 1)) + WORKING_RESERVE.get(device, WORKING_RESERVE["cpu"])
        room = free >= need
        if room == self.short:                           # a change: said once, not every photo
            self.short = not room
            if room:
                log.info("pipeline.ahead_again", available_mb=free >> 20, needed_mb=need >> 20)
            else:
                log.info("pipeline.one_at_a_time", available_mb=free >> 20, needed_mb=need >> 20,
                         why="too little memory to decode the next photo while this one is in the model")
        return room

    def _collect(self, wait: bool) -> tuple[Outcome | None, BaseException | None]:
        fut = self.behind
        if fut is None or not (wait or fut.done()):
            return None, None
        self.behind = None
        try:
            return fut.result(), None
        except BaseException as exc:
            return None, exc

    def busy(self) -> bool:
        return bool(self.ahead) or self.behind is not None

    def waiting(self) -> list[int]:
        """Ids of the jobs loaded ahead, waiting for the model (read from another thread)."""
        out = []
        for fut in list(self.ahead):
            if fut.done() and fut.exception() is None and isinstance(fut.result(), _Loaded):
                out.append(fut.result().job.id)
        return out

    def release(self) -> None:
        """Stop working ahead (pause, stop, reload, a folder or storage problem): the jobs loaded
        ahead go back to pending, the one behind finishes. An error is raised after all of it."""
        w, err = self.worker, None
        while self.ahead:
            try:
                got = self.ahead.popleft().result()
            except BaseException as exc:
                err = err or exc
                continue
            if isinstance(got, _Loaded):
                try:
                    w._give_back(got)
                except BaseException as exc:
                    err = err or exc
        _, e = self._collect(wait=True)
        err = err or e
        if err is not None:
            raise err
