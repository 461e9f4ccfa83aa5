"""Tissue fractions of patch boxes: exact against brute force, banded equal to one table."""

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
