"""The worker loop: `run_once(now)` claims one job and runs small named steps
(decode → enhance → encode → publish → record). No torch here: models come in through the
enhancer interface (`enhancer.api.Enhancer`), pixels through `enhancer.imageio`.
"""
from __future__ import annotations

import hashlib
import os
import platform
import stat
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np
import structlog

from enhancer import imageio
from enhancer.api import Enhancer, Params
from enhancer.errors import EnhanceError, PermanentError, TransientError, WeightsMissingError
from .config import Config
from .errors import FolderError
from .publish import PlanBroken, Publisher, sha256_file
from .queue import Job, Queue

log = structlog.get_logger(__name__)

FOLDER_RETRY_S = 5.0          # a folder problem is looked at again this often
WEIGHTS_RETRY_S = 5.0


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("photoenhanced", "torch", "torchvision", "numpy", "pillow", "opencv-python-headless",
                 "basicsr", "gfpgan", "realesrgan", "facexlib"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


@dataclass
class Outcome:
    job: int
    path: str
    state: str                 # done | failed | retry | deferred | vanished | changed
    message: str = ""
    sidecar: dict | None = None
    timings_ms: dict = field(default_factory=dict)


class _Changed(Exception):
    """The file changed after it settled (a stalled writer): back to settling."""


class Worker:
    def __init__(self, cfg: Config, queue: Queue, *, enhancer: Enhancer | None = None,
                 enhancer_problem: str | None = None, hooks=None, metrics=None,
                 progress: Callable[[], None] | None = None, on_forget: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.queue = queue
        self.enhancer = enhancer
        self.enhancer_problem = enhancer_problem
        self.hooks = hooks
        self.metrics = metrics
        self._progress = progress or (lambda: None)
        self.on_forget = on_forget or (lambda rel: None)
        self.current: dict | None = None
        self.folder_problem: str | None = None
        self.handled = 0               # jobs finished (done or failed) since start, for "3 of 17"
        # A result whose publish hit a folder problem (disk full, read-only): kept so that the retry
        # publishes it again instead of recomputing. One at a time: (job id, sha256, args).
        self._held: tuple[int, str, tuple] | None = None
        self._versions = versions()
        self.configure(cfg)

    def configure(self, cfg: Config) -> None:
        """(Re)load settings; called again on SIGHUP between jobs."""
        self.cfg = cfg
        f = cfg.folders
        self.publisher = Publisher(f.inbox, f.outbox, f.failed, f.archive, cfg.jobs.originals)
        e = cfg.enhance
        self.limits = imageio.Limits(max_input_megapixels=e.max_input_megapixels,
                                     max_output_megapixels=e.max_output_megapixels)

    def progress(self, **info) -> None:
        if info and self.current is not None:
            self.current = {**self.current, **info}
        self._progress()

    # --- the loop body ------------------------------------------------------------------------

    def run_once(self, now: float | None = None) -> Outcome | None:
        now = time.time() if now is None else now
        job = self.queue.claim(now)
        if job is None:
            return None
        self.current = {"job": job.id, "path": job.rel_path, "stage": "claim", "started": now}
        log.info("job.started", job=job.id, path=job.rel_path, attempt=job.attempts + 1)
        try:
            out = self._guarded(job)
        finally:
            self.current = None
        self.handled += out.state in ("done", "failed")
        if self.metrics is not None and out.state in ("done", "failed", "retry"):
            self.metrics.outcome(out.state if out.state != "retry" else "retried")
        return out

    def _guarded(self, job: Job) -> Outcome:
        try:
            try:
                return self._process(job)
            except _Changed:
                self.queue.forget(job.id)
                self.on_forget(job.rel_path)
                log.info("job.changed", job=job.id, path=job.rel_path)
                return Outcome(job.id, job.rel_path, "changed", "the file changed after it settled")
            except PermanentError as exc:
                return self._fail(job, exc.kind, str(exc), job.attempts + 1)
            except WeightsMissingError as exc:
                return self._defer(job, str(exc), WEIGHTS_RETRY_S)
            except TransientError as exc:
                return self._transient(job, exc.kind, str(exc))
            except (FolderError, PlanBroken):
                raise
            except EnhanceError as exc:
                return self._transient(job, exc.kind, str(exc))
            except Exception as exc:  # a bug of ours or a library's: counted, never a loop
                log.exception("job.internal_error", job=job.id, path=job.rel_path)
                return self._transient(job, "internal", f"{type(exc).__name__}: {exc}")
        except FolderError as exc:
            self.folder_problem = str(exc)
            return self._defer(job, str(exc), FOLDER_RETRY_S)
        except PlanBroken as exc:
            log.warning("publish.plan_dropped", job=job.id, reason=str(exc))
            self.queue.set_plan(job.id, None)
            return self._defer(job, "publish restarted", 0)

    def _defer(self, job: Job, reason: str, delay: float) -> Outcome:
        self.queue.defer(job.id, reason, delay)
        log.warning("job.waiting", job=job.id, path=job.rel_path, reason=reason)
        return Outcome(job.id, job.rel_path, "deferred", reason)

    def _transient(self, job: Job, kind: str, message: str) -> Outcome:
        attempts = job.attempts + 1
        if attempts >= self.cfg.jobs.max_attempts:
            return self._fail(job, kind, f"{message} (after {attempts} attempts)", attempts)
        delay = self.cfg.jobs.backoff(attempts)
        self.queue.retry_later(job.id, kind, message, delay)
        log.warning("job.retry", job=job.id, path=job.rel_path, kind=kind, error=message,
                    attempt=attempts, delay_s=delay)
        return Outcome(job.id, job.rel_path, "retry", message)

    # --- steps --------------------------------------------------------------------------------

    def _process(self, job: Job) -> Outcome:
        if job.plan:                                   # a publish that stopped half-way: finish it
            return self.complete_plan(job)
        src = self.cfg.folders.inbox / job.rel_path
        job = self._check_source(job, src)
        if job is None:
            return Outcome(-1, "", "vanished")
        if self._held is not None and self._held[:2] == (job.id, job.sha256):
            log.info("job.publish_again", job=job.id, path=job.rel_path)
            return self._publish_done(job, *self._held[2])
        t0 = time.perf_counter()
        profile, upscale, hot = self.cfg.enhance.for_path(job.rel_path)
        self.progress(stage="decode")
        try:
            prep = prepare(src, self.cfg, self.limits, profile, upscale, hot, job.attempts + 1)
        except PermanentError:
            self._changed_since(job, src)
            raise
        if self.cfg.jobs.skip_duplicates:
            dup = self._duplicate(job, prep, t0)
            if dup is not None:
                return dup
        if self.enhancer is None:
            raise WeightsMissingError(self.enhancer_problem or "models not loaded yet")
        try:
            r = render(src, prep, self.enhancer, self.limits, self.cfg.enhance.jpeg_quality, self.progress)
        except _DecodeFailed as exc:
            self._changed_since(job, src)
            raise exc.__cause__ from None
        sidecar = self._sidecar(job, "done", prep.info, prep.eff, r.timings, t0)
        sidecar.update(r.sidecar_extra)
        return self._publish_done(job, r.data, prep.result_name, sidecar, prep.eff, r.out_info, r.timings, t0,
                                  faces=r.faces)

    def _check_source(self, job: Job, src: Path) -> Job | None:
        try:
            st = os.lstat(src)
        except FileNotFoundError:
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):
            self.queue.forget(job.id)
            self.on_forget(job.rel_path)
            log.warning("job.vanished", job=job.id, path=job.rel_path,
                        reason="gone" if st is None else "no longer a regular file")
            return None
        if (st.st_size, st.st_mtime_ns) != (job.size, job.mtime_ns):
            sha = sha256_file(src)
            self.queue.update_file(job.id, st.st_size, st.st_mtime_ns, sha)
            job = self.queue.get(job.id)
        return job

    def _changed_since(self, job: Job, src: Path) -> None:
        """Before a decode error sends a photo to failed/: has it changed since it settled?"""
        try:
            st = os.lstat(src)
        except FileNotFoundError:
            return
        if (st.st_size, st.st_mtime_ns) != (job.size, job.mtime_ns):
            raise _Changed()

    def _duplicate(self, job: Job, prep: "Prepared", t0: float) -> Outcome | None:
        info, eff, result_name = prep.info, prep.eff, prep.result_name
        prev = self.queue.done_with(job.sha256, eff["key"])
        if prev is None:
            return None
        out = prev.outputs[0]
        try:
            fd = os.open(out["path"], os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "rb") as f:
                data = f.read()
        except OSError:
            return None
        if hashlib.sha256(data).hexdigest() != out.get("sha256"):
            return None                      # the earlier result was edited or replaced: recompute
        sidecar = self._sidecar(job, "done", info, eff, {}, t0)
        sidecar.update({"outputs": [{k: out[k] for k in ("bytes", "sha256", "width", "height", "format", "pages") if k in out}],
                        "duplicate_of": prev.id, "faces": prev.params.get("faces", 0), "models": prev.params.get("models_used", []),
                        "device": None})
        log.info("job.duplicate", job=job.id, path=job.rel_path, duplicate_of=prev.id)
        return self._publish_done(job, data, result_name, sidecar, eff, sidecar["outputs"][0], {}, t0,
                                  duplicate_of=prev.id, faces=sidecar["faces"])

    def _sidecar(self, job: Job, status: str, info, eff: dict, timings: dict, t0: float) -> dict:
        inp = {"path": job.rel_path, "bytes": job.size, "sha256": job.sha256}
        if info is not None:
            inp.update({"width": info.width, "height": info.height, "format": info.format, "pages": info.pages})
        params = {k: v for k, v in eff.items() if k != "key"} if eff else {}
        return {"schema": 1, "status": status, "job": job.id, "input": inp, "profile": eff.get("profile") if eff else None,
                "params": params, "timings_ms": timings, "attempts": job.attempts + 1, "versions": self._versions,
                "created": _iso(time.time())}

    def _publish_done(self, job: Job, data: bytes, result_name: str, sidecar: dict, eff: dict, out_info: dict,
                      timings: dict, t0: float, duplicate_of: int | None = None, faces: int = 0) -> Outcome:
        self.progress(stage="publish")
        self._held = (job.id, job.sha256, (data, result_name, sidecar, eff, out_info, timings, t0, duplicate_of, faces))
        t = time.perf_counter()
        timings.setdefault("total", _ms(t0))
        sidecar["timings_ms"] = timings
        plan = self.publisher.plan_done(job.id, job.rel_path, job.size, job.mtime_ns, data, result_name, sidecar)
        out = {**out_info, "path": plan["outputs"][0]}
        record = {**eff, "faces": faces, "models_used": sidecar.get("models", [])}
        self.queue.set_plan(job.id, {**plan, "record": [out], "duplicate_of": duplicate_of}, params=record,
                            profile=eff.get("profile"))
        self.publisher.execute(plan)
        self.queue.finish(job.id, [out], duplicate_of=duplicate_of)
        self._held = None
        if self.metrics is not None:
            for stage, ms in timings.items():
                self.metrics.observe(stage, ms)
            self.metrics.observe("publish", _ms(t))
            self.metrics.faces(faces)
            self.metrics.success(time.time())
        log.info("job.done", job=job.id, path=job.rel_path, output=out["path"], faces=faces,
                 ms=round(timings["total"]), duplicate_of=duplicate_of)
        self._fire("done", sidecar, {"input": str(self.cfg.folders.inbox / job.rel_path), "output": out["path"],
                                     "sidecar": plan["sidecar"]})
        return Outcome(job.id, job.rel_path, "done", sidecar=sidecar, timings_ms=timings)

    def _fail(self, job: Job, kind: str, message: str, attempts: int) -> Outcome:
        self.progress(stage="publish")
        sidecar = self._sidecar(job, "failed", None, {}, {}, time.perf_counter())
        sidecar["error"] = {"kind": kind, "message": message}
        sidecar["attempts"] = attempts
        plan = self.publisher.plan_failed(job.id, job.rel_path, job.size, job.mtime_ns, sidecar)
        self.queue.set_plan(job.id, {**plan, "error": {"kind": kind, "message": message}, "attempts": attempts})
        self.publisher.execute(plan)
        self.queue.fail(job.id, kind, message, outputs=[{"path": plan["outputs"][0]}], attempts=attempts)
        log.error("job.failed", job=job.id, path=job.rel_path, kind=kind, error=message, attempts=attempts)
        self._fire("failed", sidecar, {"input": str(self.cfg.folders.inbox / job.rel_path),
                                       "output": plan["outputs"][0], "sidecar": plan["sidecar"]})
        return Outcome(job.id, job.rel_path, "failed", message, sidecar=sidecar)

    def complete_plan(self, job: Job, recovering: bool = False) -> Outcome:
        """Run a recorded plan to its end (idempotent) and record the outcome."""
        plan = job.plan
        self.publisher.execute(plan)
        if plan["kind"] == "done":
            if recovering:
                self.queue.apply(job.id, "recover_done", outputs=plan["record"], plan=None, finished=time.time(),
                                 duplicate_of=plan.get("duplicate_of"))
            else:
                self.queue.finish(job.id, plan["record"], duplicate_of=plan.get("duplicate_of"))
            log.info("job.done", job=job.id, path=job.rel_path, output=plan["outputs"][0], recovered=True)
            return Outcome(job.id, job.rel_path, "done")
        err = plan.get("error", {})
        sets = dict(error_kind=err.get("kind"), last_error=err.get("message"), plan=None,
                    outputs=[{"path": plan["outputs"][0]}], finished=time.time(), attempts=plan.get("attempts", job.attempts))
        if recovering:
            self.queue.apply(job.id, "recover_failed", **sets)
        else:
            self.queue.apply(job.id, "fail", **sets)
        log.error("job.failed", job=job.id, path=job.rel_path, kind=err.get("kind"), error=err.get("message"),
                  recovered=True)
        return Outcome(job.id, job.rel_path, "failed", err.get("message", ""))

    def _fire(self, event: str, sidecar: dict, paths: dict) -> None:
        if self.hooks is not None:
            self.hooks.fire(event, sidecar, paths)


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


class _DecodeFailed(Exception):
    pass


def prepare(src: Path, cfg: Config, limits, profile: str, upscale: float, hot: str, attempt: int) -> Prepared:
    """Header only: limits, the output scale and format, the effective settings."""
    info = imageio.probe(src, limits)
    fmt, ext = imageio.output_format(info.format, cfg.enhance.output_format)
    scale = imageio.output_scale(info, upscale, limits, fmt)
    m = cfg.enhance.models
    key = f"{profile}:{scale:g}:{fmt}:{cfg.enhance.jpeg_quality}:{m.face}:{m.background}:{m.detector}"
    params = Params(profile=profile, upscale=scale, tile=cfg.enhance.tile, attempt=attempt)
    eff = {"key": key, "profile": profile, "upscale": upscale, "scale": scale, "hot_folder": hot or None,
           "tile": cfg.enhance.tile, "output_format": fmt, "jpeg_quality": cfg.enhance.jpeg_quality,
           "models": {"face": m.face, "background": m.background, "detector": m.detector}}
    result_name = src.name if not ext else f"{src.name.rsplit('.', 1)[0]}.{ext}"
    return Prepared(info, params, eff, fmt, result_name)


def render(src: Path, prep: Prepared, enhancer: Enhancer, limits, jpeg_quality: int,
           progress: Callable[..., None]) -> Rendered:
    """decode → enhance (every page) → encode. Decode errors come wrapped in _DecodeFailed."""
    timings: dict[str, float] = {}
    t = time.perf_counter()
    try:
        decoded = imageio.decode(src, limits)
    except PermanentError as exc:
        raise _DecodeFailed() from exc
    timings["decode"] = _ms(t)
    pages, faces, result = [], 0, None
    for i, page in enumerate(decoded.pages):
        progress(stage="enhance", page=i + 1)
        result = enhancer.enhance(page.rgb, prep.params, progress=progress)
        _check_pixels(result.image)
        faces += result.faces
        for k, v in result.timings_ms.items():
            timings[k] = timings.get(k, 0.0) + v
        h, w = result.image.shape[:2]
        alpha = imageio.resize_alpha(page.alpha, (w, h)) if page.alpha is not None else None
        pages.append(imageio.Page(rgb=result.image, alpha=alpha))
        progress(faces=faces)
    progress(stage="encode")
    t = time.perf_counter()
    data = imageio.encode(decoded, pages, prep.fmt, jpeg_quality)
    timings["encode"] = _ms(t)
    h, w = pages[0].rgb.shape[:2]
    out_info = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "width": w, "height": h,
                "format": prep.fmt, "pages": len(pages)}
    for k in ("detect", "restore", "upscale"):
        timings.setdefault(k, 0.0)
    extra = {"outputs": [out_info], "faces": faces,
             "models": [{"name": mi.name, "sha256": mi.sha256, "source": mi.source} for mi in result.models],
             "weights_source": sorted({mi.source for mi in result.models if mi.source}) or None,
             "device": result.device, "precision": result.precision, "tile": result.tile}
    return Rendered(data, out_info, timings, faces, extra)


def _ms(t: float) -> float:
    return round((time.perf_counter() - t) * 1000, 1)


def _check_pixels(img: np.ndarray) -> None:
    if img.ndim != 3 or img.shape[2] != 3 or not np.isfinite(img).all():
        raise TransientError("the enhancer returned an invalid image (shape or non-finite values)")


def recover(worker: Worker, queue: Queue) -> dict[str, int]:
    """Start-up: running → pending, finish every recorded publish plan, remove stale temp files."""
    requeued = queue.requeue_running()
    done = failed = dropped = 0
    for job in queue.with_plan():
        try:
            out = worker.complete_plan(job, recovering=True)
            done += out.state == "done"
            failed += out.state == "failed"
        except PlanBroken as exc:
            log.warning("recover.plan_dropped", job=job.id, reason=str(exc))
            queue.set_plan(job.id, None)
            dropped += 1
        except FolderError as exc:
            log.warning("recover.waiting", job=job.id, reason=str(exc))
    keep = {step[k] for job in queue.with_plan() for step in job.plan["steps"] for k in ("tmp",) if k in step}
    cleaned = worker.publisher.clean_tmp(keep)
    stats = {"requeued": len(requeued), "done": done, "failed": failed, "dropped": dropped, "tmp_removed": cleaned}
    log.info("recover.finished", **stats)
    return stats
