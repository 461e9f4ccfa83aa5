"""Tissue fractions of patch boxes: exact against brute force, banded equal to one table."""

import math

import cv2
import numpy as np
import pytest

from histo_wsl.tissue.fraction import TissueFractionMap, tissue_fraction_map
from histo_wsl.tissue.packed import PackedMask


def test_tissue_fraction_matches_brute_force_on_random_boxes():
    rng = np.random.default_rng(4)
    h, w = 37, 53
    mask = cv2.GaussianBlur(rng.random((h, w)), (0, 0), 2) > 0.5
    fmap = tissue_fraction_map(mask)
    assert isinstance(fmap, TissueFractionMap) and fmap.shape == (h, w)
    # boxes on a quarter-pixel lattice, partly outside the mask: brute force on a 4x upsampled mask
    k, pad = 4, 8
    fine = np.zeros(((h + 2 * pad) * k, (w + 2 * pad) * k), bool)
    fine[pad * k : (pad + h) * k, pad * k : (pad + w) * k] = np.repeat(
        np.repeat(mask, k, axis=0), k, axis=1
    )
    n = 300
    x0 = rng.integers(-pad * k, (w + pad) * k - 1, n)
    y0 = rng.integers(-pad * k, (h + pad) * k - 1, n)
    x1 = np.minimum(x0 + rng.integers(1, 30 * k, n), (w + pad) * k)
    y1 = np.minimum(y0 + rng.integers(1, 30 * k, n), (h + pad) * k)
    brute = np.array(
        [
            fine[b + pad * k : d + pad * k, a + pad * k : c + pad * k].mean()
            for a, b, c, d in zip(x0, y0, x1, y1, strict=True)
        ]
    )
    got = fmap.fraction(x0 / k, y0 / k, x1 / k, y1 / k)
    np.testing.assert_allclose(got, brute, atol=1e-9)
    area = fmap.area(x0 / k, y0 / k, x1 / k, y1 / k)
    np.testing.assert_allclose(area, brute * (x1 - x0) * (y1 - y0) / k**2, atol=1e-9)
    boxes = np.stack([x0, y0, x1, y1], axis=1) / k
    np.testing.assert_allclose(fmap.fraction_boxes(boxes), got)


def test_tissue_fraction_integer_boxes_and_edge_cases():
    rng = np.random.default_rng(5)
    mask = rng.random((20, 30)) > 0.6
    fmap = TissueFractionMap(mask)
    for _ in range(50):
        x0, y0 = rng.integers(0, 29), rng.integers(0, 19)
        x1, y1 = rng.integers(x0 + 1, 31), rng.integers(y0 + 1, 21)
        frac = fmap.fraction(x0, y0, x1, y1)
        assert frac.shape == () and frac == pytest.approx(mask[y0:y1, x0:x1].mean(), abs=1e-12)
    assert fmap.fraction(0, 0, 30, 20) == pytest.approx(mask.mean())
    # empty and inverted boxes give 0, boxes outside give 0, a broadcast shape comes back
    assert fmap.fraction(5, 5, 5, 9) == 0 and fmap.fraction(6, 5, 2, 9) == 0
    assert fmap.fraction(40, 40, 50, 50) == 0 and fmap.fraction(-9, -9, -1, -1) == 0
    out = fmap.fraction(np.arange(3)[:, None], 0, np.arange(3)[:, None] + 4, np.arange(1, 5))
    assert out.shape == (3, 4)
    assert TissueFractionMap(np.ones((4, 4), bool)).fraction(-4, 0, 4, 4) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="2-D"):
        TissueFractionMap(np.ones((2, 2, 2), bool))


@pytest.mark.parametrize("band_rows", [1, 3, 16, 1000])
def test_banded_fraction_map_equals_one_table(band_rows):
    rng = np.random.default_rng(band_rows)
    h, w = 45, 38
    mask = cv2.GaussianBlur(rng.random((h, w)), (0, 0), 2) > 0.5
    n = 400
    x0, y0 = rng.uniform(-10, w + 5, n), rng.uniform(-10, h + 5, n)
    x1, y1 = x0 + rng.uniform(-2, 25, n), y0 + rng.uniform(-2, 25, n)
    ref = TissueFractionMap(mask, band_rows=10_000).fraction(x0, y0, x1, y1)
    banded = TissueFractionMap(PackedMask.from_bool(mask), band_rows=band_rows)
    np.testing.assert_allclose(banded.fraction(x0, y0, x1, y1), ref, atol=1e-9)
    # brute force on integer boxes inside the mask
    for a, b in zip(rng.integers(0, h - 6, 20), rng.integers(0, w - 6, 20), strict=True):
        assert banded.fraction(b, a, b + 6, a + 6) == pytest.approx(
            mask[a : a + 6, b : b + 6].mean()
        )


def test_window_masks_stretch_each_windows_tissue_and_count_grazed_pixels():
    from histo_wsl.tissue.fraction import window_masks

    mask = np.zeros((10, 12), dtype=bool)
    mask[2:6, 3:9] = True  # thumbnail pixels; 4 level-0 pixels each
    xs, ys = np.array([8.0, 16.0, 40.0, -8.0]), np.array([4.0, 8.0, 0.0, -8.0])
    out = window_masks(mask, 4.0, xs, ys, 16.0, 8)  # 16-px windows = 4 mask pixels
    assert out.shape == (4, 8, 8) and out.dtype == bool
    # window 0 covers mask columns 2-5, rows 1-4: tissue from column 3 and row 2 on
    expected = np.zeros((4, 4), dtype=bool)
    expected[1:, 1:] = True
    assert np.array_equal(out[0], np.repeat(np.repeat(expected, 2, 0), 2, 1))
    assert out[1].all() and not out[2].any()  # inside the tissue; beside it
    assert not out[3].any()  # off the slide's top-left corner: no tissue, no error
    # a window starting half a mask pixel in takes that pixel whole (5 columns, 5 rows)
    half = window_masks(mask, 4.0, np.array([10.0]), np.array([6.0]), 16.0, 10)
    assert half[0, -1, -1] and half[0, 2, 2]


def test_window_masks_match_brute_force_overlap():
    from histo_wsl.tissue.fraction import window_masks

    rng = np.random.default_rng(7)
    mask = rng.random((23, 31)) < 0.3
    ds, side, size = 3.0, 40.0, 9  # a window pixel is 4.4 level-0 px, a mask pixel 3
    xs, ys = rng.uniform(-20, 90, 6), rng.uniform(-20, 70, 6)
    got = window_masks(mask, ds, xs, ys, side, size)
    step = side / size
    for n in range(len(xs)):
        for v in range(size):
            for u in range(size):
                x0, x1 = (xs[n] + u * step) / ds, (xs[n] + (u + 1) * step) / ds
                y0, y1 = (ys[n] + v * step) / ds, (ys[n] + (v + 1) * step) / ds
                c = range(max(0, math.floor(x0)), min(31, math.ceil(x1)))
                r = range(max(0, math.floor(y0)), min(23, math.ceil(y1)))
                want = any(mask[i, j] for i in r for j in c)
                assert got[n, v, u] == want, (n, v, u)
