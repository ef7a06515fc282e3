"""A small real Enhancer for the watcher's tests: nearest-neighbour upscale, no torch.

Behaviour is set from the environment so the real daemon, started as a subprocess by
tests/run_daemon.py, can be steered by a test:
  FAKE_DELAY=0.5          seconds per image (sleeps in small steps, calling progress)
  FAKE_TILES=8            the image is worked in this many "tiles": after each one the fake calls
                          progress(tiles_done=i, tiles_total=n), as the real pipeline does; between
                          them plain progress() (the watchdog ping). 0: no tile reports
  FAKE_OOM=name1,name2    raise OutOfMemoryError for images whose mean grey level... (see below)
  FAKE_WEIGHTS=path       if set, the factory raises WeightsMissingError until this file exists
  FAKE_POISON=1           a pure blue (0, 0, 1) top-left pixel kills the whole process with SIGKILL
                          (a "poison photo": an OOM kill or a codec segfault, every time it runs)
  FAKE_MARK_DELAY=1.0     a pure green (0, 1, 0) top-left pixel sleeps this long (calling progress),
                          so that one chosen image is seen as the current job (STATUS= line)
The images to fail are marked by their content: a pure red (1, 0, 0) top-left pixel → OOM. The
blue and green markers act only when their variable is set (a corpus may hold such images), and
need a lossless format (PNG) to keep the pixel exact.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np

from enhancer.api import ModelInfo, Params, Result
from enhancer.errors import OutOfMemoryError, WeightsMissingError


class FakeEnhancer:
    def __init__(self, delay: float = 0.0, hang: bool = False, poison: bool = False, mark_delay: float = 0.0,
                 tiles: int = 8, face_boxes: list | None = None):
        self.face_boxes = face_boxes or []      # reported as found (relative boxes + score)
        self.delay = delay
        self.tiles = tiles
        self.poison = poison
        self.mark_delay = mark_delay
        self.calls = 0

    def enhance(self, image: np.ndarray, params: Params, progress=None) -> Result:
        self.calls += 1
        if image.shape[0] and np.allclose(image[0, 0], (1.0, 0.0, 0.0), atol=0.02):
            raise OutOfMemoryError("fake CUDA out of memory (tile 256)")
        if self.poison and image.shape[0] and np.allclose(image[0, 0], (0.0, 0.0, 1.0), atol=0.02):
            os.kill(os.getpid(), signal.SIGKILL)
        delay = self.delay
        if self.mark_delay and image.shape[0] and np.allclose(image[0, 0], (0.0, 1.0, 0.0), atol=0.02):
            delay = max(delay, self.mark_delay)
        n = max(self.tiles, 0)
        for i in range(1, max(n, 1) + 1):           # delay spread evenly over the tiles
            end = time.monotonic() + delay / max(n, 1)
            while time.monotonic() < end:
                time.sleep(min(0.05, delay))
                if progress:
                    progress()
            if progress and n:
                progress(tiles_done=i, tiles_total=n)
        h, w = image.shape[:2]
        oh, ow = round(h * params.upscale), round(w * params.upscale)
        ys = (np.arange(oh) * h // oh).clip(0, h - 1)
        xs = (np.arange(ow) * w // ow).clip(0, w - 1)
        out = image[ys][:, xs].astype(np.float32)
        return Result(image=out, faces=len(self.face_boxes), models=[ModelInfo("fake-nearest", "0" * 64, "test")],
                      device="cpu", precision="fp32", tile=0, timings_ms={"upscale": 1.0},
                      face_boxes=list(self.face_boxes))

    def describe(self) -> dict:
        return {"device": "cpu", "precision": "fp32", "models": []}


def factory(settings) -> FakeEnhancer:
    gate = os.environ.get("FAKE_WEIGHTS")
    if gate and not Path(gate).exists():
        raise WeightsMissingError(f"weights missing: {gate} — run photoenhanced weights fetch", missing=["fake"])
    return FakeEnhancer(delay=float(os.environ.get("FAKE_DELAY", "0")),
                        poison=os.environ.get("FAKE_POISON", "") not in ("", "0"),
                        mark_delay=float(os.environ.get("FAKE_MARK_DELAY", "0")),
                        tiles=int(os.environ.get("FAKE_TILES", "8")),
                        face_boxes=[(*map(float, b.split(",")), 0.99)
                                    for b in os.environ.get("FAKE_FACE_BOXES", "").split(";") if b])
