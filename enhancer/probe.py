"""What this machine would do with a config, asked by `photoenhanced doctor`. torch lives here
(in enhancer/), never in watcher/.

    device_plan(device="auto", precision="auto") -> dict
        the device and the precision *candidate* `auto` would pick, without loading a model
        (the daemon keeps a reduced precision only if its quality check passes at start; the
        benchmark below runs that check for real)
    benchmark(settings, *, megapixels=12.0, tile=64, manifest=None) -> dict
        builds the enhancer exactly as the daemon does (load, precision check, warm-up), times
        each model once on a small input and extrapolates to a `megapixels` photo

How the extrapolation works: the cost of a convolutional net is linear in the pixels it sees.
The background model is timed on one `tile`² tile (after the warm-up); seconds per pixel ×
the photo's pixels × the overlap of the tiles the daemon would use (auto tile from free memory,
TILE_PAD px each side) gives the upscale time. The detector runs on the photo shrunk to
DETECT_MAX_SIDE: it is timed on a small pattern and scaled by pixels the same way. Restoring a
face is one GFPGAN + one ParseNet pass on a 512² crop whatever the photo's size, so it is
timed once and reported per face. Decode, encode and the classic resize are left out (they
are in the noise next to the models: scripts/bench). Small tiles run a little less efficiently
than big ones, so the estimate errs on the slow side.
"""
from __future__ import annotations

from enhancer import _compat  # noqa: F401

import os
import time
from pathlib import Path
from typing import Mapping

import torch

from enhancer import pipeline, weights
from enhancer.api import EnhancerSettings

DETECT_PROBE = (300, 400)      # (h, w) of the pattern the detector is timed on


def device_plan(device: str = "auto", precision: str = "auto") -> dict:
    """{device, name, precision, why, cpu_capability, native_bf16, memory_bytes, threads}."""
    dev = pipeline.resolve_device(device)
    out: dict = {"device": str(dev), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                 "native_bf16": pipeline.cpu_has_native_bf16(), "torch": torch.__version__}
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        out["device"] = f"cuda:{index}"
        out["name"] = torch.cuda.get_device_name(index)
        out["memory_bytes"] = int(torch.cuda.mem_get_info(index)[0])
    else:
        out["name"] = _cpu_name()
        out["threads"] = len(os.sched_getaffinity(0))
        out["memory_bytes"] = pipeline.available_memory(dev)
    out["precision"] = pipeline.precision_candidate(precision, dev)
    if precision != "auto":
        out["why"] = f"precision: {precision} in the config"
    elif dev.type == "cuda":
        out["why"] = "fp16 on CUDA (kept only if its output is finite and close to fp32)"
    elif out["precision"] == "bf16":
        out["why"] = "this CPU has native bf16 (kept only if the quality check at start passes)"
    else:
        out["why"] = "this CPU has no native bf16 (bf16 would be ~100x slower here)"
    if device == "auto":
        out["why_device"] = "CUDA available" if dev.type == "cuda" else "no CUDA device visible"
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def benchmark(settings: EnhancerSettings, *, megapixels: float = 12.0, tile: int = 64,
              manifest: Mapping[str, weights.WeightSpec] | None = None) -> dict:
    """{device, precision, load_s, profiles: [{profile, upscale, seconds, per_face_s, parts}]}.

    `seconds` is the expected time for one `megapixels` photo without faces; add `per_face_s`
    for each face (faces/full). Raises WeightsMissingError when a needed weight is missing."""
    t0 = time.perf_counter()
    enh = pipeline.build_enhancer(settings, manifest=manifest)
    load_s = time.perf_counter() - t0
    dev = pipeline.resolve_device(settings.device)
    photo_px = megapixels * 1e6
    parts: dict[str, float] = {}
    with torch.inference_mode():
        bg = enh.model("background")
        if bg is not None:
            fn = pipeline.sr_callable(bg, dev)
            sample = pipeline.test_pattern(tile, tile)
            fn(sample)                                       # warm this shape
            per_px = _timed(lambda: fn(sample)) / (tile * tile)
            t = settings.tile if settings.tile is not None else pipeline.auto_tile(dev, bg.arch, precision=bg.precision)
            pad = min(pipeline.TILE_PAD, t // 4) if t else 0
            overlap = ((t + 2 * pad) / t) ** 2 if t else 1.0
            parts["upscale"] = per_px * photo_px * overlap
            parts["tile"] = t
        det = enh.model("detector")
        if det is not None:
            h, w = DETECT_PROBE
            pattern = pipeline.test_pattern(h, w)
            pipeline.detect_faces(det, pattern, dev)
            side = pipeline.DETECT_MAX_SIDE
            detect_px = min(photo_px, side * side * 3 / 4)   # a 4:3 photo shrunk to DETECT_MAX_SIDE
            parts["detect"] = _timed(lambda: pipeline.detect_faces(det, pattern, dev)) * detect_px / (h * w)
        face, parser = enh.model("face"), enh.model("parser")
        if face is not None and parser is not None:
            crop = pipeline.test_pattern(pipeline.FACE_SIZE, pipeline.FACE_SIZE)
            parts["per_face"] = _timed(
                lambda: pipeline.face_mask(parser, pipeline.restore_face(face, crop, dev), dev))
    rows = []
    for profile, upscale in settings.needs:
        roles = pipeline.PROFILE_ROLES[profile]
        seconds = (parts.get("upscale", 0.0) if "background" in roles else 0.0) + \
            (parts.get("detect", 0.0) if "detector" in roles else 0.0)
        rows.append({"profile": profile, "upscale": upscale, "seconds": round(seconds, 2),
                     "per_face_s": round(parts["per_face"], 2) if "face" in roles and "per_face" in parts else None})
    described = enh.describe()
    return {"device": described["device"], "precision": described["precision"],
            "precisions": described["precisions"], "load_s": round(load_s, 2),
            "megapixels": megapixels, "probe_tile": tile, "tile": parts.get("tile"),
            "profiles": rows,
            "archs": {role: lm.arch for role in ("face", "background", "detector", "parser")
                      if (lm := enh.model(role)) is not None}}
