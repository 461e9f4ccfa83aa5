"""Tissue detection on a slide thumbnail, and tissue outlines as QuPath GeoJSON.

Key components:

- :class:`TissueParams` and :func:`detect_tissue`: the CLAM/WSInfer recipe (HSV saturation, median
  filter, Otsu threshold, closing, size filters) with every size given in µm or µm² and converted with
  the thumbnail's resolution, plus guards against black borders, glass and pale tissue.
- :func:`mask_to_geojson`, :func:`geojson_to_mask`, :func:`read_geojson`, :func:`write_geojson`: tissue
  outlines in level-0 pixel coordinates that QuPath opens, edits and exports back.
- :func:`draw_tissue`: the thumbnail with the tissue contours drawn on it (the QC image).
- :func:`tissue_fraction_map`: the tissue fraction of many boxes at once (one patch grid).

Everything works on numpy arrays: the caller reads the thumbnail from the slide and passes its
resolution (µm per thumbnail pixel) and its downsample from level 0.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from histo_wsl.errors import InputError

__all__ = [
    "TissueFractionMap",
    "TissueParams",
    "detect_tissue",
    "draw_tissue",
    "geojson_to_mask",
    "mask_to_geojson",
    "read_geojson",
    "tissue_fraction_map",
    "write_geojson",
]

_ON_EDGE = 2e-3  # a pixel centre this close (px) to a polygon boundary counts as on it

_GEOJSON_HINT = (
    "export the annotations from QuPath with File > Export objects as GeoJSON, "
    "or pass a FeatureCollection of Polygon/MultiPolygon features in level-0 pixels"
)


@dataclass(frozen=True)
class TissueParams:
    """Parameters of :func:`detect_tissue`; sizes are physical and converted with the thumbnail mpp.

    The defaults follow WSInfer/CLAM (median 7 px, closing 6 px at about 8 µm/px, objects below
    200² µm² dropped, holes below 190² µm² filled) and were checked on H&E slides.

    Attributes:
        median_um: median filter size in µm (converted to an odd number of pixels, at least 3).
        closing_um: diameter of the disc used for the morphological closing, in µm.
        min_object_um2: connected tissue components smaller than this (µm²) are dropped.
        min_hole_um2: holes in tissue smaller than this (µm²) are filled.
        min_saturation: floor of the Otsu threshold on HSV saturation (0-255): a blank slide, whose
            saturation is only noise, gives no tissue.
        max_saturation: ceiling of the Otsu threshold (0-255). Glass is excluded from the Otsu
            population, so on a slide with strongly stained tissue Otsu would split the tissue itself
            into pale and dark; the ceiling keeps pale tissue.
        dark_value: pixels whose HSV value (max of R, G, B) is below this are never tissue (black
            borders, scanner margins; near-black noise has a high saturation).
        bright_value: pixels whose min(R, G, B) is above this are glass and never tissue.
    """

    median_um: float = 56.0
    closing_um: float = 48.0
    min_object_um2: float = 40_000.0
    min_hole_um2: float = 36_100.0
    min_saturation: float = 15.0
    max_saturation: float = 20.0
    dark_value: float = 50.0
    bright_value: float = 235.0

    def __post_init__(self) -> None:
        for name in ("median_um", "closing_um", "min_object_um2", "min_hole_um2"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise InputError(f"tissue parameter {name} must be a number >= 0, got {value!r}")
        for name in ("min_saturation", "max_saturation", "dark_value", "bright_value"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 <= value <= 255):
                raise InputError(
                    f"tissue parameter {name} must be between 0 and 255, got {value!r}"
                )
        if self.min_saturation > self.max_saturation:
            raise InputError(
                f"tissue parameter min_saturation ({self.min_saturation}) is above max_saturation "
                f"({self.max_saturation}); lower min_saturation or raise max_saturation"
            )


# --------------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------------


def _as_rgb_uint8(rgb: np.ndarray) -> np.ndarray:
    """Return a C-contiguous (H, W, 3) uint8 view/copy of an RGB, RGBA or grey uint8 image."""
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    elif arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"expected a non-empty image, got shape {arr.shape}")
    return np.ascontiguousarray(arr)


def _check_mpp(mpp: float) -> float:
    mpp = float(mpp)
    if not (math.isfinite(mpp) and mpp > 0):
        raise InputError(
            f"the thumbnail resolution must be a positive number of µm/px, got {mpp!r}; "
            "give the slide's resolution explicitly (e.g. --slide-mpp)"
        )
    return mpp


def _odd_kernel(size_um: float, mpp: float) -> int:
    """Median filter size in pixels: odd, at least 3."""
    k = max(3, int(round(size_um / mpp)))
    return k if k % 2 == 1 else k + 1


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of uint8 values (a pixel is foreground when its value is above it).

    Args:
        values: uint8 array of any shape; an empty array gives 0.

    Returns:
        The threshold t (0-255) maximising the between-class variance of ``values <= t`` and
        ``values > t``; 0 when there are no values or all are equal.
    """
    vals = np.asarray(values, dtype=np.uint8).ravel()
    if vals.size == 0:
        return 0.0
    hist = np.bincount(vals, minlength=256).astype(np.float64)
    p = hist / hist.sum()
    omega = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    mu_t = mu[-1]
    denom = omega * (1.0 - omega)
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma_b = np.where(denom > 1e-12, (mu_t * omega - mu) ** 2 / denom, 0.0)
    if not np.any(sigma_b > 0):
        return 0.0
    # Several maxima (a flat plateau between two modes): take the middle of the plateau.
    best = np.flatnonzero(sigma_b >= sigma_b.max() * (1 - 1e-12))
    return float((best[0] + best[-1]) // 2)


def _remove_small_objects(mask: np.ndarray, min_px: float) -> np.ndarray:
    if min_px <= 1 or not mask.any():
        return mask
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_px
    keep[0] = False
    return keep[labels]


def _fill_small_holes(mask: np.ndarray, max_px: float) -> np.ndarray:
    if max_px <= 1 or mask.all():
        return mask
    background = (~mask).view(np.uint8)
    # 4-connected background is the complement of 8-connected foreground components.
    n, labels, stats, _ = cv2.connectedComponentsWithStats(background, connectivity=4)
    small = stats[:, cv2.CC_STAT_AREA] < max_px
    x, y = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP]
    w, h = stats[:, cv2.CC_STAT_WIDTH], stats[:, cv2.CC_STAT_HEIGHT]
    touches_border = (x == 0) | (y == 0) | (x + w == mask.shape[1]) | (y + h == mask.shape[0])
    fill = small & ~touches_border
    fill[0] = False  # label 0 is the foreground here
    return mask | fill[labels]


def _closing(mask: np.ndarray, diameter_px: int) -> np.ndarray:
    """Binary closing with a disc; outside the image counts as background."""
    if diameter_px < 2 or not mask.any():
        return mask
    # An even-sized disc has no centre pixel, and OpenCV's closing with it shifts the mask by one
    # pixel down and right; an odd diameter keeps the disc symmetric about its anchor.
    diameter_px |= 1
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (diameter_px, diameter_px))
    pad = diameter_px
    padded = cv2.copyMakeBorder(
        mask.view(np.uint8), pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0
    )
    closed = cv2.morphologyEx(padded, cv2.MORPH_CLOSE, kernel)
    return closed[pad:-pad, pad:-pad].astype(bool)


def detect_tissue(rgb: np.ndarray, mpp: float, params: TissueParams = TissueParams()) -> np.ndarray:  # noqa: B008
    """Detect tissue on a low-resolution RGB thumbnail.

    The recipe: median filter (``params.median_um``) -> HSV saturation and value, min(R, G, B) ->
    candidates are pixels that are neither dark (V < ``dark_value``) nor glass
    (min(R, G, B) > ``bright_value``) -> Otsu threshold of the saturation over the candidates, clipped
    to [``min_saturation``, ``max_saturation``] -> tissue = candidate and saturation above the
    threshold -> closing (``closing_um``) -> drop components below ``min_object_um2`` -> fill holes
    below ``min_hole_um2``.

    The median filter is applied to the RGB channels before the saturation is computed: saturation
    (max - min) / max amplifies noise in dark and grey pixels, so filtering first keeps noisy black
    borders and grey glass edges at a low saturation.

    Args:
        rgb: (H, W, 3) uint8 RGB thumbnail (RGBA or grey are accepted too).
        mpp: µm per thumbnail pixel.
        params: detection parameters.

    Returns:
        (H, W) bool mask, True on tissue.

    Raises:
        InputError: ``mpp`` is not a positive number.
        ValueError: ``rgb`` is not a non-empty uint8 image.
    """
    image = _as_rgb_uint8(rgb)
    mpp = _check_mpp(mpp)
    px_area = mpp * mpp

    smooth = cv2.medianBlur(image, _odd_kernel(params.median_um, mpp))
    hsv = cv2.cvtColor(smooth, cv2.COLOR_RGB2HSV)
    saturation, value = hsv[:, :, 1], hsv[:, :, 2]
    candidate = (value >= params.dark_value) & (smooth.min(axis=2) <= params.bright_value)
    if not candidate.any():
        return np.zeros(image.shape[:2], dtype=bool)

    threshold = otsu_threshold(saturation[candidate])
    threshold = min(max(threshold, params.min_saturation), params.max_saturation)
    mask = candidate & (saturation > threshold)

    mask = _closing(mask, int(round(params.closing_um / mpp)))
    mask = _remove_small_objects(mask, params.min_object_um2 / px_area)
    mask = _fill_small_holes(mask, params.min_hole_um2 / px_area)
    return mask


def draw_tissue(
    rgb: np.ndarray,
    mask: np.ndarray,
    color: Sequence[int] = (0, 200, 0),
    thickness: int = 2,
) -> np.ndarray:
    """Draw the tissue contours (outlines and holes) on a copy of the thumbnail.

    Args:
        rgb: (H, W, 3) uint8 RGB thumbnail.
        mask: (H, W) bool tissue mask of the same size.
        color: RGB colour of the contours.
        thickness: line thickness in pixels.

    Returns:
        A new (H, W, 3) uint8 RGB image.
    """
    out = _as_rgb_uint8(rgb).copy()
    m = np.asarray(mask, dtype=bool)
    if m.shape != out.shape[:2]:
        raise ValueError(f"mask shape {m.shape} does not match image shape {out.shape[:2]}")
    contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if contours:
        cv2.drawContours(out, contours, -1, tuple(int(c) for c in color), int(thickness))
    return out


# --------------------------------------------------------------------------------------------------
# Tissue fraction of boxes
# --------------------------------------------------------------------------------------------------


class TissueFractionMap:
    """Tissue fraction of axis-aligned boxes, from a summed-area table of the mask.

    Pixel (row r, column c) covers the square [c, c+1) x [r, r+1) in thumbnail coordinates. The
    summed-area table is bilinear inside each pixel, so interpolating it gives the exact tissue area
    of boxes with sub-pixel edges. Parts of a box outside the mask count as non-tissue.

    Args:
        mask: (H, W) bool tissue mask.
    """

    def __init__(self, mask: np.ndarray) -> None:
        m = np.asarray(mask, dtype=bool)
        if m.ndim != 2:
            raise ValueError(f"expected a 2-D mask, got shape {m.shape}")
        self.shape: tuple[int, int] = (int(m.shape[0]), int(m.shape[1]))
        # int32 in place: exact (a thumbnail has far fewer than 2**31 pixels) and 4 bytes per
        # pixel, where float64 through int64 temporaries took 24 (benchmarks/extract_memory.py)
        sat = np.zeros((m.shape[0] + 1, m.shape[1] + 1), dtype=np.int32)
        np.cumsum(m, axis=0, dtype=np.int32, out=sat[1:, 1:])
        np.cumsum(sat[1:, 1:], axis=1, out=sat[1:, 1:])
        self._sat = sat

    def _integral(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Tissue area of [0, x] x [0, y] (x, y clipped to the mask)."""
        h, w = self.shape
        x = np.clip(x, 0.0, float(w))
        y = np.clip(y, 0.0, float(h))
        x0 = np.minimum(np.floor(x).astype(np.int64), max(w - 1, 0))
        y0 = np.minimum(np.floor(y).astype(np.int64), max(h - 1, 0))
        x1 = np.minimum(x0 + 1, w)
        y1 = np.minimum(y0 + 1, h)
        fx, fy = x - x0, y - y0
        s = self._sat
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
        a = (
            self._integral(bx1, by1)
            - self._integral(bx0, by1)
            - self._integral(bx1, by0)
            + self._integral(bx0, by0)
        )
        empty = (bx1 <= bx0) | (by1 <= by0)
        return np.where(empty, 0.0, np.maximum(a, 0.0))

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


# --------------------------------------------------------------------------------------------------
# GeoJSON
# --------------------------------------------------------------------------------------------------


def _signed_area(ring: np.ndarray) -> float:
    """Shoelace signed area of an (N, 2) ring (closed or not)."""
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _ring_coords(contour: np.ndarray, downsample: float, outer: bool) -> list[list[float]] | None:
    """OpenCV contour -> closed GeoJSON ring in level-0 pixels, or None when degenerate."""
    pts = contour.reshape(-1, 2).astype(np.float64)
    if len(np.unique(pts, axis=0)) < 3:
        return None
    area = _signed_area(pts)
    if area == 0:
        return None
    # RFC 7946 right-hand rule on the coordinates as written: exterior positive, holes negative.
    if (area < 0) == outer:
        pts = pts[::-1]
    pts = (pts + 0.5) * downsample  # pixel centres in pixel-corner coordinates, then level 0
    ring = [[round(float(x), 3), round(float(y), 3)] for x, y in pts]
    ring.append(list(ring[0]))
    return ring


def mask_to_geojson(
    mask: np.ndarray,
    downsample: float,
    *,
    name: str = "Tissue",
    color: Sequence[int] = (0, 200, 0),
    mpp: float | None = None,
    min_area_px: int = 0,
    values: np.ndarray | None = None,
    value_name: str = "Mean probability",
    value_scale: float = 1.0,
) -> dict:
    """Outline a mask as a QuPath-style GeoJSON FeatureCollection in level-0 pixels.

    Each 8-connected component becomes one ``Feature`` whose ``geometry`` is a ``Polygon`` (outer
    ring, then one ring per hole). Rings run through the centres of the boundary pixels, written in
    pixel-corner coordinates (pixel ``(c, r)`` has centre ``(c + 0.5, r + 0.5)``) and multiplied by
    ``downsample``; they are closed, the outer ring has a positive shoelace area on the coordinates as
    written and holes a negative one (RFC 7946 orientation; QuPath accepts either). Components or holes
    with fewer than 3 distinct points (or no area) are dropped.

    Args:
        mask: (H, W) bool mask (thumbnail coordinates).
        downsample: level-0 pixels per mask pixel.
        name: classification name.
        color: classification colour, RGB 0-255.
        mpp: level-0 µm per pixel; when given each feature gets ``measurements["Area µm^2"]``.
        min_area_px: components whose polygon area (mask px², holes subtracted) is below this are
            dropped.
        values: optional (H, W) per-pixel values (e.g. a probability map); each feature then gets
            ``measurements[value_name]``, the mean of ``values × value_scale`` over the pixels of its
            8-connected component.
        value_name: name of that measurement.
        value_scale: factor applied to the mean (e.g. 1/255 for a uint8 probability map).

    Returns:
        A JSON-serialisable ``FeatureCollection`` dict whose features have ``properties.objectType``
        ``"annotation"``, ``classification`` ``{name, color}``, ``isLocked`` False, and
        ``measurements``.
    """
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {m.shape}")
    downsample = float(downsample)
    if not (math.isfinite(downsample) and downsample > 0):
        raise ValueError(f"downsample must be a positive number, got {downsample!r}")
    rgb = [int(c) for c in color]
    features: list[dict] = []
    contours, hierarchy = cv2.findContours(
        m.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE
    )
    if hierarchy is None:
        return {"type": "FeatureCollection", "features": features}
    hier = hierarchy.reshape(-1, 4)  # next, previous, first child, parent
    means = None
    if values is not None:
        v = np.asarray(values)
        if v.shape != m.shape:
            raise ValueError(f"values shape {v.shape} does not match mask shape {m.shape}")
        # 8-connected components are exactly the outer contours' components.
        _, labels = cv2.connectedComponents(m.astype(np.uint8), connectivity=8, ltype=cv2.CV_32S)
        counts = np.bincount(labels.ravel())
        sums = np.bincount(labels.ravel(), weights=v.ravel().astype(np.float64))
        means = sums / np.maximum(counts, 1) * float(value_scale)
    for i in np.flatnonzero(hier[:, 3] < 0):
        outer = _ring_coords(contours[i], downsample, outer=True)
        if outer is None:
            continue
        rings = [outer]
        area_px = abs(_signed_area(contours[i].reshape(-1, 2).astype(np.float64)))
        child = hier[i, 2]
        while child >= 0:
            hole = _ring_coords(contours[child], downsample, outer=False)
            if hole is not None:
                rings.append(hole)
                area_px -= abs(_signed_area(contours[child].reshape(-1, 2).astype(np.float64)))
            child = hier[child, 0]
        if area_px < min_area_px:
            continue
        measurements: dict[str, float] = {}
        if mpp is not None:
            measurements["Area µm^2"] = round(area_px * (downsample * float(mpp)) ** 2, 3)
        if means is not None:
            cx, cy = contours[i].reshape(-1, 2)[0]  # a contour runs through its component's pixels
            measurements[value_name] = round(float(means[labels[cy, cx]]), 4)
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": rings},
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": name, "color": rgb},
                    "isLocked": False,
                    "measurements": measurements,
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def _iter_geometries(obj: Any) -> Iterator[dict]:
    """Yield every geometry dict inside a FeatureCollection, Feature, geometry or list of them."""
    if isinstance(obj, list):
        for item in obj:
            yield from _iter_geometries(item)
        return
    if not isinstance(obj, dict):
        return
    kind = obj.get("type")
    if kind == "FeatureCollection" or (kind is None and "features" in obj):
        yield from _iter_geometries(obj.get("features") or [])
    elif kind == "Feature" or (kind is None and "geometry" in obj):
        geometry = obj.get("geometry")
        if isinstance(geometry, dict):
            yield from _iter_geometries(geometry)
    elif kind == "GeometryCollection":
        yield from _iter_geometries(obj.get("geometries") or [])
    elif isinstance(kind, str):
        yield obj


def _iter_polygons(obj: Any) -> Iterator[list[np.ndarray]]:
    """Yield each polygon as a list of (N, 2) float rings (outer first); other geometries skipped.

    Raises:
        ValueError: a Polygon/MultiPolygon whose coordinates are not lists of [x, y] numbers.
    """
    for geometry in _iter_geometries(obj):
        kind = geometry.get("type")
        if kind == "Polygon":
            polygons = [geometry.get("coordinates")]
        elif kind == "MultiPolygon":
            polygons = geometry.get("coordinates")
            if not isinstance(polygons, list):
                raise ValueError("a MultiPolygon has no list of coordinates")
        else:
            continue
        for polygon in polygons:
            if not isinstance(polygon, list):
                raise ValueError(f"a {kind} has coordinates that are not a list of rings")
            rings = []
            for ring in polygon:
                try:
                    arr = np.asarray(ring, dtype=np.float64)
                except (TypeError, ValueError):
                    raise ValueError(f"a {kind} ring is not a list of [x, y] numbers") from None
                if arr.ndim != 2 or arr.shape[1] < 2 or not np.isfinite(arr[:, :2]).all():
                    raise ValueError(f"a {kind} ring is not a list of [x, y] numbers")
                rings.append(arr[:, :2])
            if rings:
                yield rings


def _count_polygons(obj: Any) -> int:
    return sum(1 for _ in _iter_polygons(obj))


def _rasterise_polygons(polygons: list[list[np.ndarray]], shape: tuple[int, int]) -> np.ndarray:
    """Even-odd scanline fill of polygons given in mask pixel-index coordinates (centres at integers).

    A pixel is set when its centre is inside a polygon (holes excluded) or on its boundary (within
    ``_ON_EDGE`` px). Polygons are OR-ed together. Vectorised over all edges of all polygons.
    """
    h, w = shape
    eps = _ON_EDGE
    out_rows: list[np.ndarray] = []
    out_c0: list[np.ndarray] = []
    out_c1: list[np.ndarray] = []

    def add_spans(rows: np.ndarray, x0: np.ndarray, x1: np.ndarray) -> None:
        c0 = np.ceil(x0 - eps)
        c1 = np.floor(x1 + eps)
        ok = (rows >= 0) & (rows < h) & (c1 >= 0) & (c0 <= w - 1) & (c0 <= c1)
        out_rows.append(rows[ok].astype(np.int64))
        out_c0.append(np.clip(c0[ok], 0, w - 1).astype(np.int64))
        out_c1.append(np.clip(c1[ok], 0, w - 1).astype(np.int64))

    pid_parts, a_parts, b_parts = [], [], []
    for pid, rings in enumerate(polygons):
        for ring in rings:
            if len(ring) < 3:
                continue
            pid_parts.append(np.full(len(ring), pid, dtype=np.int64))
            a_parts.append(ring)
            b_parts.append(np.roll(ring, -1, axis=0))  # implicit closing edge
    if not a_parts:
        return np.zeros(shape, dtype=bool)
    pid = np.concatenate(pid_parts)
    a = np.concatenate(a_parts)
    b = np.concatenate(b_parts)
    xa, ya, xb, yb = a[:, 0], a[:, 1], b[:, 0], b[:, 1]

    # Interior: rows whose centre line y crosses an edge with min(ya, yb) <= y < max(ya, yb).
    lo, hi = np.minimum(ya, yb), np.maximum(ya, yb)
    r0 = np.clip(np.ceil(lo), 0, h).astype(np.int64)
    r1 = np.clip(np.ceil(hi), 0, h).astype(np.int64)
    count = np.where(ya != yb, np.maximum(r1 - r0, 0), 0)
    total = int(count.sum())
    if total:
        edge = np.repeat(np.arange(len(count)), count)
        first = np.cumsum(count) - count
        rows = r0[edge] + (np.arange(total) - first[edge])
        t = (rows - ya[edge]) / (yb[edge] - ya[edge])
        xs = xa[edge] + t * (xb[edge] - xa[edge])
        order = np.lexsort((xs, rows, pid[edge]))
        rows, xs = rows[order], xs[order]
        # Each (polygon, row) group has an even number of crossings: pair them in order.
        add_spans(rows[0::2], xs[0::2], xs[1::2])

    # Boundary: horizontal edges on a row of centres, and vertices on a centre.
    flat = (ya == yb) & (np.abs(ya - np.round(ya)) <= eps)
    add_spans(np.round(ya[flat]), np.minimum(xa[flat], xb[flat]), np.maximum(xa[flat], xb[flat]))
    on_centre = (np.abs(xa - np.round(xa)) <= eps) & (np.abs(ya - np.round(ya)) <= eps)
    add_spans(np.round(ya[on_centre]), xa[on_centre], xa[on_centre])

    rows = np.concatenate(out_rows)
    c0 = np.concatenate(out_c0)
    c1 = np.concatenate(out_c1)
    stride = w + 1
    n = h * stride
    diff = np.bincount(rows * stride + c0, minlength=n) - np.bincount(
        rows * stride + c1 + 1, minlength=n
    )
    return np.cumsum(diff.reshape(h, stride), axis=1)[:, :w] > 0


def geojson_to_mask(geojson: Any, shape: tuple[int, int], downsample: float) -> np.ndarray:
    """Rasterise Polygon/MultiPolygon geometries into a bool mask (thumbnail coordinates).

    Level-0 coordinates are divided by ``downsample``; a pixel is set when its centre lies inside a
    polygon (holes honoured, even-odd rule) or on its boundary. Every polygon counts as tissue,
    whatever its ``objectType`` or classification; other geometry types (points, lines) are ignored.
    This inverts :func:`mask_to_geojson` exactly.

    Args:
        geojson: a FeatureCollection, a Feature, a bare geometry, or a list of features.
        shape: (H, W) of the mask to produce.
        downsample: level-0 pixels per mask pixel.

    Returns:
        (H, W) bool mask.

    Raises:
        InputError: a polygon's coordinates are not lists of [x, y] numbers.
    """
    h, w = int(shape[0]), int(shape[1])
    downsample = float(downsample)
    if not (math.isfinite(downsample) and downsample > 0):
        raise ValueError(f"downsample must be a positive number, got {downsample!r}")
    try:
        polygons = list(_iter_polygons(geojson))
    except ValueError as exc:
        raise InputError(f"the GeoJSON is malformed: {exc}; {_GEOJSON_HINT}") from None
    if h <= 0 or w <= 0:
        return np.zeros((max(h, 0), max(w, 0)), dtype=bool)
    # Pixel (c, r) has its centre at (c + 0.5, r + 0.5) in pixel-corner coordinates.
    scaled = [[ring / downsample - 0.5 for ring in rings] for rings in polygons]
    return _rasterise_polygons(scaled, (h, w))


def read_geojson(path: str | Path) -> dict:
    """Load a GeoJSON file of tissue (or region) polygons, e.g. exported from QuPath.

    A top-level list of features is wrapped in a FeatureCollection.

    Args:
        path: the ``.geojson``/``.json`` file.

    Returns:
        The parsed GeoJSON object (a dict).

    Raises:
        InputError: the file is missing or unreadable, is not valid JSON (the message gives the line
            and column), or holds no Polygon/MultiPolygon geometry.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError("GeoJSON file not found; check the path", path) from None
    except IsADirectoryError:
        raise InputError(
            "is a directory, not a GeoJSON file; pass the .geojson file", path
        ) from None
    except UnicodeDecodeError:
        raise InputError(
            "is not a UTF-8 text file, so not GeoJSON; pass the .geojson file exported from QuPath",
            path,
        ) from None
    except OSError as exc:
        raise InputError(f"cannot be read ({exc.strerror}); check its permissions", path) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(
            f"is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}; "
            "fix the file there or export it again from QuPath",
            path,
        ) from None
    if isinstance(data, list):
        data = {"type": "FeatureCollection", "features": data}
    if not isinstance(data, dict):
        raise InputError(
            f"is JSON but not GeoJSON (top level is a {type(data).__name__}); {_GEOJSON_HINT}", path
        )
    try:
        n = _count_polygons(data)
    except ValueError as exc:
        raise InputError(f"is malformed GeoJSON: {exc}; {_GEOJSON_HINT}", path) from None
    if n == 0:
        raise InputError(f"contains no Polygon or MultiPolygon geometry; {_GEOJSON_HINT}", path)
    return data


def write_geojson(path: str | Path, data: dict) -> None:
    """Write GeoJSON atomically: a temporary file in the same folder, then ``os.replace``.

    Readers never see a half-written file, and an interrupted write leaves no file behind.

    Args:
        path: destination file; its folder is created if needed.
        data: a JSON-serialisable GeoJSON object.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
