"""Metrics: per-stage duration histograms, outcomes, faces, last success → a node_exporter
textfile (``state_dir/photoenhanced.prom``, written atomically) and a JSON snapshot (stored by the
daemon in SQLite so ``status --json`` shows the same numbers).

Durations are observed in milliseconds; the textfile speaks Prometheus' base unit (seconds):
``photoenhanced_stage_duration_seconds`` with ``le`` buckets = ``BUCKETS_MS`` / 1000. Counters
start from the snapshot given to ``Metrics(snapshot=...)``, so they survive daemon restarts.
"""

from __future__ import annotations

import bisect
import threading
from pathlib import Path
from typing import Any

import structlog

from .publish import atomic_write

log = structlog.get_logger(__name__)

PREFIX = "photoenhanced_"
STAGES = ("decode", "detect", "restore", "upscale", "encode", "publish", "total")
OUTCOMES = ("done", "failed", "duplicate", "retried")
JOB_STATES = ("pending", "running", "done", "failed")
HOOK_RESULTS = ("sent", "failed", "dropped")
BUCKETS_MS = (10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000, 120_000, 300_000, 600_000)
SNAPSHOT_SCHEMA = 1


def _fmt(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _label(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Histogram:
    __slots__ = ("counts", "sum_ms", "count")

    def __init__(self, n: int):
        self.counts = [0] * (n + 1)  # per bucket (not cumulative); the last one is +Inf
        self.sum_ms = 0.0
        self.count = 0


class Metrics:
    def __init__(self, *, buckets_ms: tuple[float, ...] = BUCKETS_MS, snapshot: dict | None = None):
        self._lock = threading.Lock()
        self.buckets_ms = tuple(sorted(float(b) for b in buckets_ms))
        self._hist = {s: _Histogram(len(self.buckets_ms)) for s in STAGES}
        self._outcomes = dict.fromkeys(OUTCOMES, 0)
        self._faces = 0
        self._last_success: float | None = None
        if snapshot:
            self._restore(snapshot)

    # ------------------------------------------------------------------ recording
    def observe(self, stage: str, ms: float) -> None:
        ms = max(0.0, float(ms))
        with self._lock:
            h = self._hist.get(stage)
            if h is None:  # a stage we did not plan for still gets its own histogram
                h = self._hist[stage] = _Histogram(len(self.buckets_ms))
            h.counts[bisect.bisect_left(self.buckets_ms, ms)] += 1
            h.sum_ms += ms
            h.count += 1

    def outcome(self, outcome: str) -> None:
        with self._lock:
            self._outcomes[outcome] = self._outcomes.get(outcome, 0) + 1

    def faces(self, n: int) -> None:
        with self._lock:
            self._faces += max(0, int(n))

    def success(self, now: float) -> None:
        """``now``: wall-clock seconds since the epoch (time.time())."""
        with self._lock:
            self._last_success = float(now)

    # ------------------------------------------------------------------ reading
    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "schema": SNAPSHOT_SCHEMA,
                "buckets_ms": list(self.buckets_ms),
                "stages": {s: {"count": h.count, "sum_ms": round(h.sum_ms, 3), "buckets": list(h.counts)}
                           for s, h in self._hist.items()},
                "outcomes": dict(self._outcomes),
                "faces": self._faces,
                "last_success": self._last_success,
            }

    def _restore(self, snap: dict) -> None:
        try:
            if tuple(float(b) for b in snap.get("buckets_ms", ())) == self.buckets_ms:
                for stage, h in snap.get("stages", {}).items():
                    hist = _Histogram(len(self.buckets_ms))
                    if len(h["buckets"]) == len(hist.counts):
                        hist.counts = [int(c) for c in h["buckets"]]
                        hist.count, hist.sum_ms = int(h["count"]), float(h["sum_ms"])
                        self._hist[stage] = hist
            for k, v in snap.get("outcomes", {}).items():
                self._outcomes[k] = int(v)
            self._faces = int(snap.get("faces", 0))
            last = snap.get("last_success")
            self._last_success = None if last is None else float(last)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("metrics.snapshot_ignored", error=f"{type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ textfile
    def render(self, counts: dict[str, int], backoffs: int, hooks: dict[str, int]) -> str:
        snap = self.snapshot()
        out: list[str] = []

        def family(name: str, kind: str, help_: str) -> None:
            out.append(f"# HELP {PREFIX}{name} {help_}")
            out.append(f"# TYPE {PREFIX}{name} {kind}")

        family("jobs", "gauge", "Jobs in the queue by state.")
        for state in dict.fromkeys([*JOB_STATES, *counts]):
            out.append(f'{PREFIX}jobs{{state="{_label(state)}"}} {int(counts.get(state, 0))}')
        family("jobs_backoff", "gauge", "Pending jobs waiting out a retry backoff.")
        out.append(f"{PREFIX}jobs_backoff {int(backoffs)}")
        family("outcomes_total", "counter", "Finished job attempts by outcome.")
        for k, v in snap["outcomes"].items():
            out.append(f'{PREFIX}outcomes_total{{outcome="{_label(k)}"}} {v}')
        family("faces_total", "counter", "Faces found in processed photos.")
        out.append(f"{PREFIX}faces_total {snap['faces']}")
        family("last_success_timestamp_seconds", "gauge", "When a photo was last done (Unix time; 0: never).")
        out.append(f"{PREFIX}last_success_timestamp_seconds {_fmt(snap['last_success'] or 0)}")
        family("hooks_total", "counter", "Completion hook notices by result.")
        for k in dict.fromkeys([*HOOK_RESULTS, *hooks]):
            out.append(f'{PREFIX}hooks_total{{result="{_label(k)}"}} {int(hooks.get(k, 0))}')
        family("stage_duration_seconds", "histogram", "Time spent per processing stage.")
        les = [*(b / 1000 for b in self.buckets_ms), float("inf")]
        for stage, h in snap["stages"].items():
            cum = 0
            for le, c in zip(les, h["buckets"]):
                cum += c
                out.append(f'{PREFIX}stage_duration_seconds_bucket{{stage="{_label(stage)}",le="{_fmt(le)}"}} {cum}')
            out.append(f'{PREFIX}stage_duration_seconds_sum{{stage="{_label(stage)}"}} {_fmt(h["sum_ms"] / 1000)}')
            out.append(f'{PREFIX}stage_duration_seconds_count{{stage="{_label(stage)}"}} {h["count"]}')
        return "\n".join(out) + "\n"

    def write_textfile(self, path: Path, counts: dict[str, int], backoffs: int, hooks: dict[str, int]) -> None:
        """Write the textfile atomically: a temp file in the same folder (a name node_exporter
        does not read), fsync, rename over ``path``, fsync the folder."""
        atomic_write(Path(path), self.render(counts, backoffs, hooks).encode("utf-8"))
