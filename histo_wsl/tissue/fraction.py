"""Tissue fraction of many boxes at once (one patch grid), from summed-area tables of a mask.

The tables are built one band of mask rows at a time (:data:`~histo_wsl.tissue.detect.DETECT_STRIP_ROWS`),
so a slide-sized mask is never expanded whole.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from histo_wsl.tissue.detect import DETECT_STRIP_ROWS
from histo_wsl.tissue.packed import PackedMask

if TYPE_CHECKING:
    from histo_wsl.slideio.grid import PatchGrid

__all__ = ["TissueFractionMap", "grid_tissue_fractions", "tissue_fraction_map", "window_masks"]


class TissueFractionMap:
    """Tissue fraction of axis-aligned boxes, from summed-area tables of the mask.

    Pixel (row r, column c) covers the square [c, c+1) x [r, r+1) in thumbnail coordinates. The
    summed-area table is bilinear inside each pixel, so interpolating it gives the exact tissue area
    of boxes with sub-pixel edges. Parts of a box outside the mask count as non-tissue.

    The mask is kept packed (1 bit per pixel) and the boxes are answered band by band: boxes are
    grouped by the row their top edge is on (``band_rows`` rows per band) and each band gets the
    int32 summed-area table of just the rows its boxes cover. Memory is bounded by the band, not by
    the whole mask (whose table would take 4 bytes per pixel).

    Args:
        mask: (H, W) bool tissue mask, or a :class:`PackedMask`.
        band_rows: mask rows per band.
    """

    def __init__(self, mask: np.ndarray | PackedMask, band_rows: int = DETECT_STRIP_ROWS) -> None:
        if isinstance(mask, PackedMask):
            packed = mask
        else:
            m = np.asarray(mask, dtype=bool)
            if m.ndim != 2:
                raise ValueError(f"expected a 2-D mask, got shape {m.shape}")
            packed = PackedMask.from_bool(m)
        self.shape: tuple[int, int] = packed.shape
        self._mask = packed
        self._band_rows = max(1, int(band_rows))

    def _band_table(self, y0: int, y1: int) -> np.ndarray:
        """int32 summed-area table of mask rows ``y0:y1``: (y1 - y0 + 1, W + 1)."""
        rows = self._mask.rows(y0, y1)
        # int32 in place: exact (a band has far fewer than 2**31 pixels) and 4 bytes per pixel
        sat = np.zeros((rows.shape[0] + 1, self.shape[1] + 1), dtype=np.int32)
        np.cumsum(rows, axis=0, dtype=np.int32, out=sat[1:, 1:])
        np.cumsum(sat[1:, 1:], axis=1, out=sat[1:, 1:])
        return sat

    @staticmethod
    def _integral(s: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Tissue area of [0, x] x [0, y] from a table ``s`` (x, y clipped to it)."""
        h, w = s.shape[0] - 1, s.shape[1] - 1
        x = np.clip(x, 0.0, float(w))
        y = np.clip(y, 0.0, float(h))
        x0 = np.minimum(np.floor(x).astype(np.int64), max(w - 1, 0))
        y0 = np.minimum(np.floor(y).astype(np.int64), max(h - 1, 0))
        x1 = np.minimum(x0 + 1, w)
        y1 = np.minimum(y0 + 1, h)
        fx, fy = x - x0, y - y0
        return (
            s[y0, x0] * (1 - fx) * (1 - fy)
            + s[y0, x1] * fx * (1 - fy)
            + s[y1, x0] * (1 - fx) * fy
            + s[y1, x1] * fx * fy
        )

    def area(self, x0: Any, y0: Any, x1: Any, y1: Any) -> np.ndarray:
        """Tissue area (thumbnail px²) inside boxes [x0, x1] x [y0, y1]; arrays broadcast."""
        bx0, by0, bx1, by1 = np.broadcast_arrays(
            *(np.asarray(v, dtype=np.float64) for v in (x0, y0, x1, y1))
        )
        shape = bx0.shape
        bx0, by0, bx1, by1 = (v.ravel() for v in (bx0, by0, bx1, by1))
        out = np.zeros(bx0.shape, dtype=np.float64)
        h, w = self.shape
        live = np.flatnonzero((bx1 > bx0) & (by1 > by0) & (by1 > 0) & (by0 < h) & (h > 0) & (w > 0))
        if live.size:
            top = np.floor(np.clip(by0[live], 0.0, float(h))).astype(np.int64)
            order = np.argsort(top, kind="stable")
            live, top = live[order], top[order]
            band = top // self._band_rows
            cuts = np.flatnonzero(np.diff(band)) + 1
            for idx, tops in zip(np.split(live, cuts), np.split(top, cuts), strict=True):
                r0 = int(tops[0] // self._band_rows) * self._band_rows
                bottom = float(np.clip(by1[idx], 0.0, float(h)).max())
                r1 = min(h, int(math.floor(bottom)) + 1)
                table = self._band_table(r0, r1)
                ya, yb = by0[idx] - r0, by1[idx] - r0
                a = (
                    self._integral(table, bx1[idx], yb)
                    - self._integral(table, bx0[idx], yb)
                    - self._integral(table, bx1[idx], ya)
                    + self._integral(table, bx0[idx], ya)
                )
                out[idx] = np.maximum(a, 0.0)
                del table
        return out.reshape(shape)

    def fraction(self, x0: Any, y0: Any, x1: Any, y1: Any) -> np.ndarray:
        """Fraction (0-1) of each box [x0, x1] x [y0, y1] covered by tissue.

        Args:
            x0: left edges, thumbnail pixels (float, scalar or array; arrays broadcast).
            y0: top edges.
            x1: right edges.
            y1: bottom edges.

        Returns:
            float64 array of the broadcast shape (0-d for scalars); empty boxes give 0.
        """
        bx0, by0, bx1, by1 = np.broadcast_arrays(
            *(np.asarray(v, dtype=np.float64) for v in (x0, y0, x1, y1))
        )
        box_area = (bx1 - bx0) * (by1 - by0)
        tissue = self.area(bx0, by0, bx1, by1)
        with np.errstate(divide="ignore", invalid="ignore"):
            frac = np.where(box_area > 0, tissue / np.where(box_area > 0, box_area, 1.0), 0.0)
        return np.clip(frac, 0.0, 1.0)

    def fraction_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """Fraction of tissue in each row ``(x0, y0, x1, y1)`` of an (N, 4) array of boxes."""
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        return self.fraction(b[:, 0], b[:, 1], b[:, 2], b[:, 3])


def tissue_fraction_map(mask: np.ndarray) -> TissueFractionMap:
    """Build a :class:`TissueFractionMap` answering tissue fractions of many boxes at once.

    Args:
        mask: (H, W) bool tissue mask (thumbnail coordinates).

    Returns:
        The map; call ``.fraction(x0, y0, x1, y1)`` with arrays of box edges in thumbnail pixels
        (level-0 coordinates divided by the thumbnail downsample).
    """
    return TissueFractionMap(mask)


def grid_tissue_fractions(mask: np.ndarray, downsample: float, grid: PatchGrid) -> np.ndarray:
    """Tissue fraction (0-1) of every patch of ``grid`` (level-0 positions and side).

    Args:
        mask: (H, W) bool tissue mask (thumbnail coordinates).
        downsample: level-0 pixels per mask pixel.
        grid: the patches (``xs``, ``ys``, ``size_level0``).
    """
    ds = downsample
    return tissue_fraction_map(mask).fraction(
        grid.xs / ds,
        grid.ys / ds,
        (grid.xs + grid.size_level0) / ds,
        (grid.ys + grid.size_level0) / ds,
    )


def window_masks(
    mask: np.ndarray, downsample: float, xs: np.ndarray, ys: np.ndarray, side: float, size: int
) -> np.ndarray:
    """The tissue of square windows, each as a ``size`` × ``size`` bool mask.

    Args:
        mask: (H, W) bool tissue mask (thumbnail coordinates).
        downsample: level-0 pixels per mask pixel.
        xs: the windows' level-0 left edges.
        ys: the windows' level-0 top edges.
        side: the windows' side in level-0 pixels.
        size: the side of each returned mask.

    Returns:
        (len(xs), size, size) bool: a window's pixel is True when its square overlaps any tissue
        pixel of ``mask`` (outside the mask, no tissue), so the tissue is never cut short.
    """
    h, w = mask.shape
    steps = np.arange(size + 1) * (side / downsample / size)
    out = np.zeros((len(xs), size, size), dtype=bool)
    for n, (x, y) in enumerate(zip(np.asarray(xs, float), np.asarray(ys, float), strict=True)):
        cols, rows = x / downsample + steps, y / downsample + steps
        # the mask pixels the window overlaps, and a summed-area table of them
        a0, a1 = int(np.clip(np.floor(rows[0]), 0, h)), int(np.clip(np.ceil(rows[-1]), 0, h))
        b0, b1 = int(np.clip(np.floor(cols[0]), 0, w)), int(np.clip(np.ceil(cols[-1]), 0, w))
        if a1 <= a0 or b1 <= b0:
            continue
        table = np.zeros((a1 - a0 + 1, b1 - b0 + 1), dtype=np.int32)
        table[1:, 1:] = mask[a0:a1, b0:b1].astype(np.int32).cumsum(0).cumsum(1)
        c0 = np.clip(np.floor(cols[:-1]), b0, b1).astype(int) - b0
        c1 = np.clip(np.ceil(cols[1:]), b0, b1).astype(int) - b0
        r0 = np.clip(np.floor(rows[:-1]), a0, a1).astype(int) - a0
        r1 = np.clip(np.ceil(rows[1:]), a0, a1).astype(int) - a0
        count = (
            table[np.ix_(r1, c1)] - table[np.ix_(r0, c1)] - table[np.ix_(r1, c0)]
            + table[np.ix_(r0, c0)]
        )  # fmt: skip
        out[n] = count > 0
    return out
