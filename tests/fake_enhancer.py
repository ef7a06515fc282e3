"""A small real Enhancer for the watcher's tests: nearest-neighbour upscale, no torch.

Behaviour is set from the environment so the real daemon, started as a subprocess by
tests/run_daemon.py, can be steered by a test:
  FAKE_DELAY=0.5          seconds per image (sleeps in small steps, calling progress)
  FAKE_OOM=name1,name2    raise OutOfMemoryError for images whose mean grey level... (see below)
  FAKE_WEIGHTS=path       if set, the factory raises WeightsMissingError until this file exists
The images to fail are marked by their content: a pure red (1, 0, 0) top-left pixel → OOM.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from enhancer.api import ModelInfo, Params, Result
from enhancer.errors import OutOfMemoryError, WeightsMissingError


class FakeEnhancer:
    def __init__(self, delay: float = 0.0, hang: bool = False):
        self.delay = delay
        self.calls = 0

    def enhance(self, image: np.ndarray, params: Params, progress=None) -> Result:
        self.calls += 1
        if image.shape[0] and np.allclose(image[0, 0], (1.0, 0.0, 0.0), atol=0.02):
            raise OutOfMemoryError("fake CUDA out of memory (tile 256)")
        end = time.monotonic() + self.delay
        while time.monotonic() < end:
            time.sleep(min(0.05, self.delay))
            if progress:
                progress()
        h, w = image.shape[:2]
        oh, ow = round(h * params.upscale), round(w * params.upscale)
        ys = (np.arange(oh) * h // oh).clip(0, h - 1)
        xs = (np.arange(ow) * w // ow).clip(0, w - 1)
        out = image[ys][:, xs].astype(np.float32)
        return Result(image=out, faces=0, models=[ModelInfo("fake-nearest", "0" * 64, "test")],
                      device="cpu", precision="fp32", tile=0, timings_ms={"upscale": 1.0})

    def describe(self) -> dict:
        return {"device": "cpu", "precision": "fp32", "models": []}


def factory(settings) -> FakeEnhancer:
    gate = os.environ.get("FAKE_WEIGHTS")
    if gate and not Path(gate).exists():
        raise WeightsMissingError(f"weights missing: {gate} — run photoenhanced weights fetch", missing=["fake"])
    return FakeEnhancer(delay=float(os.environ.get("FAKE_DELAY", "0")))
