"""enhancer.tiles: pure numpy tiling math, no torch."""
from __future__ import annotations

import numpy as np
import pytest

from enhancer import tiles


def nearest2(a: np.ndarray) -> np.ndarray:
    return np.repeat(np.repeat(a, 2, axis=0), 2, axis=1)


@pytest.mark.parametrize("h,w,tile,pad", [(100, 130, 32, 8), (64, 64, 16, 4), (51, 77, 20, 6),
                                          (200, 50, 64, 16)])
def test_cores_partition_the_image_and_pads_stay_inside(h, w, tile, pad):
    plan = tiles.plan_tiles(h, w, tile, pad)
    cover = np.zeros((h, w), int)
    for t in plan:
        cover[t.y0:t.y1, t.x0:t.x1] += 1
        assert 0 <= t.py0 <= t.y0 < t.y1 <= t.py1 <= h
        assert 0 <= t.px0 <= t.x0 < t.x1 <= t.px1 <= w
        assert t.y1 - t.y0 <= tile + 2 and t.x1 - t.x0 <= tile + 2
    assert (cover == 1).all()


def test_whole_image_when_tile_is_zero_or_large():
    assert tiles.plan_tiles(40, 60, 0) == [tiles.Tile(0, 40, 0, 60, 0, 40, 0, 60)]
    assert len(tiles.plan_tiles(40, 60, 64)) == 1
    with pytest.raises(ValueError):
        tiles.plan_tiles(0, 10, 8)
    with pytest.raises(ValueError):
        tiles.plan_tiles(10, 10, -1)


@pytest.mark.parametrize("tile", [16, 24, 50])
def test_blend_weights_sum_to_one_everywhere(tile):
    h, w, scale = 90, 70, 3
    total = np.zeros((h * scale, w * scale))
    for t in tiles.plan_tiles(h, w, tile, pad=8):
        wt = tiles.tile_weights(t, h, w, scale)
        total[t.py0 * scale:t.py1 * scale, t.px0 * scale:t.px1 * scale] += wt
    np.testing.assert_allclose(total, 1.0, atol=1e-6)


@pytest.mark.parametrize("tile", [0, 16, 32, 50, 200])
def test_pointwise_model_tiled_equals_untiled(tile):
    img = np.random.default_rng(0).random((100, 130, 3)).astype(np.float32)
    calls = []
    out = tiles.run_tiled(nearest2, img, 2, tile, pad=8, progress=lambda: calls.append(1))
    np.testing.assert_allclose(out, nearest2(img), atol=1e-6)
    assert len(calls) == len(tiles.plan_tiles(100, 130, tile, 8))


def test_canvas_rejects_wrong_tile_output_shape():
    canvas = tiles.Canvas(32, 32, 2)
    t = tiles.plan_tiles(32, 32, 16, 4)[0]
    with pytest.raises(ValueError):
        canvas.add(t, np.zeros((5, 5, 3), np.float32))
