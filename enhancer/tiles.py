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

import cv2
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
    return _ramp_at(np.arange(p0, p1, dtype=np.float64) + 0.5, p0, c0, c1, p1, n)


def _ramp_at(pos: np.ndarray, p0: int, c0: int, c1: int, p1: int, n: int) -> np.ndarray:
    """_ramp's weights at arbitrary input coordinates `pos` (pixel centres of any scale)."""
    w = np.ones(pos.shape, dtype=np.float64)
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


# ---------------------------------------------------------------- streaming into the output
#
# For real photo sizes the whole-image float32 canvas (acc + norm + result, then a resized
# copy) is what blows the memory: 24 MP at 2x is 1.15 GB per float32 copy. `stream_tiled`
# writes every finished row band straight into a preallocated output of any dtype (uint8,
# uint16 or float32), resampling each tile from the model's native scale to the output scale
# on its own, and keeps only one band of float32 rows. Blending weights are evaluated at each
# output pixel's centre in input coordinates, where the neighbours' ramps sum to exactly 1, so
# no normalisation buffer is needed.

def _box(p0: int, p1: int, s: float, limit: int) -> tuple[int, int]:
    """Output pixels whose centre, in input coordinates, lies in [p0, p1)."""
    lo = max(0, int(np.ceil(p0 * s - 0.5)))
    hi = min(limit, int(np.ceil(p1 * s - 0.5)))
    return lo, hi


def resample_tile(native: np.ndarray, scale: int, py0: int, px0: int,
                  box: tuple[int, int, int, int], sy: float, sx: float) -> np.ndarray:
    """The part `box` = (ty0, ty1, tx0, tx1) of the output (scale sy, sx of the input) taken
    from `native`, the model's output (scale `scale`) for the input region starting at
    (py0, px0). Exact slices when the scales agree, area averaging for integer shrink factors,
    else an exact-coordinate affine resampling (linear when shrinking, Lanczos when
    enlarging, as the whole-image resize does)."""
    ty0, ty1, tx0, tx1 = box
    if sy == scale and sx == scale:
        oy, ox = ty0 - py0 * scale, tx0 - px0 * scale
        return native[oy:oy + ty1 - ty0, ox:ox + tx1 - tx0]
    ky, kx = scale / sy, scale / sx
    if ky == kx and ky == int(ky) and ky >= 2 and (py0 * scale) % int(ky) == 0 \
            and (px0 * scale) % int(ky) == 0 and native.shape[0] % int(ky) == 0 \
            and native.shape[1] % int(ky) == 0:
        k = int(ky)
        small = cv2.resize(native, (native.shape[1] // k, native.shape[0] // k),
                           interpolation=cv2.INTER_AREA)
        oy, ox = ty0 - (py0 * scale) // k, tx0 - (px0 * scale) // k
        return small[oy:oy + ty1 - ty0, ox:ox + tx1 - tx0]
    s_n = float(scale)
    if ky >= 2 and kx >= 2 and native.shape[0] % 2 == 0 and native.shape[1] % 2 == 0:
        native = cv2.resize(native, (native.shape[1] // 2, native.shape[0] // 2),
                            interpolation=cv2.INTER_AREA)
        s_n = scale / 2
    # inverse map: output pixel (ty0 + i) -> native row ((ty0 + i + 0.5) / sy - py0) * s_n - 0.5
    m = np.array([[s_n / sx, 0.0, ((tx0 + 0.5) / sx - px0) * s_n - 0.5],
                  [0.0, s_n / sy, ((ty0 + 0.5) / sy - py0) * s_n - 0.5]], dtype=np.float64)
    interp = cv2.INTER_LINEAR if s_n > min(sx, sy) else cv2.INTER_LANCZOS4
    return cv2.warpAffine(native, m, (tx1 - tx0, ty1 - ty0), flags=interp | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)


def _store(out: np.ndarray, y0: int, rows: np.ndarray) -> None:
    """Rows of float [0, 1] into `out` (uint8, uint16 or float), rounded and clipped."""
    if out.dtype == np.uint8 or out.dtype == np.uint16:
        maxval = np.float32(255 if out.dtype == np.uint8 else 65535)
        rows *= maxval
        rows += np.float32(0.5)
        np.clip(rows, 0, maxval, out=rows)
    else:
        np.clip(rows, 0.0, 1.0, out=rows)
    out[y0:y0 + rows.shape[0]] = rows


def stream_tiled(fn, image: np.ndarray, scale: int, out: np.ndarray, tile: int, pad: int = 16,
                 progress=None, many=None) -> np.ndarray:
    """Apply fn (h x w x C float -> (h*scale) x (w*scale) x C float) tile by tile over
    `image` and write the blended result, resampled to out's size, into `out` (H' x W' x C,
    uint8/uint16/float32), one finished band of rows at a time. Peak extra memory: one band
    of float32 rows of the output's width plus one tile's output. Returns `out`.
    `many` (list of tiles -> list of outputs), when given, gets a whole band's tiles at once
    (batched inference on a GPU); `fn` is then unused."""
    h, w = image.shape[:2]
    oh, ow = out.shape[:2]
    sy, sx = oh / h, ow / w
    plan = plan_tiles(h, w, tile, pad)
    rows: dict[tuple[int, int], list[Tile]] = {}
    for t in plan:
        rows.setdefault((t.py0, t.py1, t.y0, t.y1), []).append(t)
    bands = [(_box(py0, py1, sy, oh), ts) for (py0, py1, _, _), ts in rows.items()]
    height = max(b1 - b0 for (b0, b1), _ in bands)
    acc = np.zeros((height, ow, out.shape[2]), np.float32)
    lo = 0            # output row held at acc[0]
    filled = 0        # output rows [lo, filled) hold partial sums
    for (b0, b1), ts in bands:
        if b0 > lo:                            # rows above this band are final
            done = b0 - lo
            _store(out, lo, acc[:done])
            keep = filled - b0
            if keep > 0:
                acc[:keep] = acc[done:done + keep]
            acc[max(keep, 0):] = 0
            lo = b0
        outs = many([image[t.py0:t.py1, t.px0:t.px1] for t in ts]) if many else None
        for i, t in enumerate(ts):
            if outs is not None:
                native, outs[i] = outs[i], None
            else:
                native = fn(image[t.py0:t.py1, t.px0:t.px1])
            want = ((t.py1 - t.py0) * scale, (t.px1 - t.px0) * scale)
            if native.shape[:2] != want:
                raise ValueError(f"tile output {native.shape[:2]} != expected {want}")
            ty0, ty1 = b0, b1
            tx0, tx1 = _box(t.px0, t.px1, sx, ow)
            part = resample_tile(native, scale, t.py0, t.px0, (ty0, ty1, tx0, tx1), sy, sx)
            del native
            wy = _ramp_at((np.arange(ty0, ty1) + 0.5) / sy, t.py0, t.y0, t.y1, t.py1, h)
            wx = _ramp_at((np.arange(tx0, tx1) + 0.5) / sx, t.px0, t.x0, t.x1, t.px1, w)
            weight = np.outer(wy, wx).astype(np.float32)[..., None]
            acc[ty0 - lo:ty1 - lo, tx0:tx1] += part * weight
            if progress:
                progress()
        filled = max(filled, b1)
    _store(out, lo, acc[:filled - lo])
    return out
