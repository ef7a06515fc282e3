"""Tiling math on numpy, no torch: split an image into tiles with overlap, and blend the
tiles' upscaled outputs back so that seams vanish.

Each tile has a *core* (the tiles' cores partition the image) and a *padded* input region
(the core grown by `pad` on every side that is not an image border). Outputs are blended with
linear ramps across each overlap of width 2*pad: the two neighbours' weights sum to exactly 1
everywhere, the outer half of each pad (spoilt by the tile's zero padding) is dropped, and a
pixel far from any seam comes from one tile only.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tile:
    y0: int   # core, input pixels, [y0, y1) x [x0, x1)
    y1: int
    x0: int
    x1: int
    py0: int  # padded input region
    py1: int
    px0: int
    px1: int


def _edges(n: int, tile: int) -> list[int]:
    count = max(1, -(-n // tile))
    # equal-ish cores, even lengths where possible (models that pixel-unshuffle need them)
    edges = [round(i * n / count) for i in range(count + 1)]
    return [e - (e % 2) if 0 < e < n else e for e in edges]


def plan_tiles(height: int, width: int, tile: int, pad: int = 16) -> list[Tile]:
    """Tiles covering a height x width image; tile = 0 (or >= both sides) -> one tile."""
    if height <= 0 or width <= 0:
        raise ValueError(f"empty image {height}x{width}")
    if tile < 0:
        raise ValueError(f"tile must be >= 0, got {tile}")
    if tile == 0 or (tile >= height and tile >= width):
        return [Tile(0, height, 0, width, 0, height, 0, width)]
    pad = max(0, min(pad, tile // 4))
    pad -= pad % 2
    ys, xs = _edges(height, tile), _edges(width, tile)
    tiles = []
    for y0, y1 in zip(ys, ys[1:]):
        for x0, x1 in zip(xs, xs[1:]):
            tiles.append(Tile(y0, y1, x0, x1, max(0, y0 - pad), min(height, y1 + pad),
                              max(0, x0 - pad), min(width, x1 + pad)))
    return tiles


def _ramp(p0: int, c0: int, c1: int, p1: int, n: int) -> np.ndarray:
    """1-D weights over the padded span [p0, p1). With pad d = c0 - p0 and r = d // 2 the
    weight rises linearly across [c0 - r, c0 + r) and falls across [c1 - r, c1 + r): the
    outer half of every pad (where the tile's own zero padding spoils the output) gets weight
    0, the neighbour's ramp is the mirror image (the two sum to 1), image borders stay 1."""
    pos = np.arange(p0, p1, dtype=np.float64) + 0.5
    w = np.ones(p1 - p0, dtype=np.float64)
    if c0 > 0:
        r = (c0 - p0) // 2
        w = np.minimum(w, np.clip((pos - (c0 - r)) / (2 * r), 0.0, 1.0) if r else
                       (pos >= c0).astype(np.float64))
    if c1 < n:
        r = (p1 - c1) // 2
        w = np.minimum(w, np.clip(((c1 + r) - pos) / (2 * r), 0.0, 1.0) if r else
                       (pos < c1).astype(np.float64))
    return w


def tile_weights(t: Tile, height: int, width: int, scale: int) -> np.ndarray:
    """(h*scale, w*scale) blending weights for the output of tile t's padded region."""
    wy = np.repeat(_ramp(t.py0, t.y0, t.y1, t.py1, height), scale)
    wx = np.repeat(_ramp(t.px0, t.x0, t.x1, t.px1, width), scale)
    return np.outer(wy, wx).astype(np.float32)


class Canvas:
    """Accumulates tile outputs (H*scale, W*scale, C) with blending weights."""

    def __init__(self, height: int, width: int, scale: int, channels: int = 3):
        self.height, self.width, self.scale = height, width, scale
        self.acc = np.zeros((height * scale, width * scale, channels), dtype=np.float32)
        self.norm = np.zeros((height * scale, width * scale, 1), dtype=np.float32)

    def add(self, t: Tile, out: np.ndarray) -> None:
        s = self.scale
        want = ((t.py1 - t.py0) * s, (t.px1 - t.px0) * s)
        if out.shape[:2] != want:
            raise ValueError(f"tile output {out.shape[:2]} != expected {want}")
        w = tile_weights(t, self.height, self.width, s)[..., None]
        self.acc[t.py0 * s:t.py1 * s, t.px0 * s:t.px1 * s] += out * w
        self.norm[t.py0 * s:t.py1 * s, t.px0 * s:t.px1 * s] += w

    def result(self) -> np.ndarray:
        if np.any(self.norm <= 0):
            raise ValueError("canvas has pixels no tile covered")
        return self.acc / self.norm


def run_tiled(fn, image: np.ndarray, scale: int, tile: int, pad: int = 16,
              progress=None) -> np.ndarray:
    """Apply fn (HxWxC -> (H*scale)x(W*scale)xC, numpy) tile by tile and blend."""
    h, w = image.shape[:2]
    tiles = plan_tiles(h, w, tile, pad)
    if len(tiles) == 1:
        out = fn(image)
        if progress:
            progress()
        return out
    canvas = Canvas(h, w, scale, image.shape[2])
    for t in tiles:
        canvas.add(t, fn(image[t.py0:t.py1, t.px0:t.px1]))
        if progress:
            progress()
    return canvas.result()
