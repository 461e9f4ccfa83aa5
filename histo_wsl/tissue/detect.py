"""Tissue detection on a slide thumbnail, and tissue outlines as QuPath GeoJSON.

Key components:

- :class:`TissueParams` and :func:`detect_tissue`: the CLAM/WSInfer recipe (HSV saturation, median
  filter, Otsu threshold, closing, size filters) with every size given in µm or µm² and converted with
  the thumbnail's resolution, plus guards against black borders, glass and pale tissue.
- :func:`detect_tissue_strips`: the same detection, strip by strip, on a thumbnail that is never held
  whole (its rows come from a callable), into a :class:`PackedMask` (1 bit per pixel). Memory is
  bounded by the strip height times the thumbnail width, not by the thumbnail's area.
- :func:`mask_to_geojson`, :func:`geojson_to_mask`, :func:`read_geojson`, :func:`write_geojson`: tissue
  outlines in level-0 pixel coordinates that QuPath opens, edits and exports back.
- :func:`draw_tissue`: the thumbnail with the tissue contours drawn on it (the QC image).
- :func:`tissue_fraction_map`: the tissue fraction of many boxes at once (one patch grid), from
  summed-area tables of one band of mask rows at a time.

Everything works on numpy arrays: the caller reads the thumbnail from the slide and passes its
resolution (µm per thumbnail pixel) and its downsample from level 0.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from histo_wsl.errors import InputError

__all__ = [
    "DETECT_STRIP_ROWS",
    "PackedMask",
    "TissueFractionMap",
    "TissueParams",
    "detect_tissue",
    "detect_tissue_strips",
    "draw_tissue",
    "geojson_to_mask",
    "mask_to_geojson",
    "read_geojson",
    "tissue_fraction_map",
    "write_geojson",
]

#: Thumbnail rows per strip in :func:`detect_tissue_strips` (and per band of the fraction map): the
#: strip-sized temporaries (RGB, median, HSV, int32 labels) stay a few MB whatever the slide's size.
DETECT_STRIP_ROWS = 256

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
    return otsu_from_histogram(np.bincount(vals, minlength=256))


def otsu_from_histogram(hist: np.ndarray) -> float:
    """Otsu's threshold of a 256-bin histogram of uint8 values (see :func:`otsu_threshold`).

    Args:
        hist: counts of the values 0-255 (any numeric dtype); all zeros gives 0.

    Returns:
        The threshold (0-255), 0 when the histogram is empty or has a single value.
    """
    hist = np.asarray(hist, dtype=np.float64).ravel()
    if hist.size != 256:
        raise ValueError(f"expected a 256-bin histogram, got {hist.size} bins")
    total = hist.sum()
    if total <= 0:
        return 0.0
    p = hist / total
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


# --------------------------------------------------------------------------------------------------
# Compact masks
# --------------------------------------------------------------------------------------------------

# number of set bits of each byte value
_POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1)


class PackedMask:
    """A bool mask stored with 1 bit per pixel (rows packed with :func:`numpy.packbits`).

    A 2,500 × 2,500 px tissue mask takes 0.8 MB instead of 6.25 MB as bool (or 25 MB as the int32
    labels or summed-area table of the whole mask); rows are unpacked band by band where needed.

    Args:
        shape: (H, W) of the mask.
        bits: (H, ceil(W / 8)) uint8 packed rows; all zeros when omitted.
    """

    def __init__(self, shape: tuple[int, int], bits: np.ndarray | None = None) -> None:
        h, w = int(shape[0]), int(shape[1])
        if h < 0 or w < 0:
            raise ValueError(f"a mask shape must not be negative, got {shape}")
        self.shape: tuple[int, int] = (h, w)
        nbytes = (w + 7) // 8
        if bits is None:
            bits = np.zeros((h, nbytes), dtype=np.uint8)
        elif bits.shape != (h, nbytes) or bits.dtype != np.uint8:
            raise ValueError(f"packed bits of shape {bits.shape} do not fit a {h} x {w} mask")
        self.bits = bits

    @classmethod
    def from_bool(cls, mask: np.ndarray) -> PackedMask:
        """Pack a 2-D bool (or 0/1) mask."""
        m = np.asarray(mask, dtype=bool)
        if m.ndim != 2:
            raise ValueError(f"expected a 2-D mask, got shape {m.shape}")
        return cls(m.shape, np.packbits(m, axis=1))

    @property
    def nbytes(self) -> int:
        """Bytes of the packed bits."""
        return int(self.bits.nbytes)

    def rows(self, y0: int, y1: int) -> np.ndarray:
        """Rows ``y0:y1`` (clipped to the mask) as a C-contiguous (n, W) bool array."""
        y0, y1 = max(0, int(y0)), min(self.shape[0], int(y1))
        out = np.unpackbits(self.bits[y0 : max(y0, y1)], axis=1, count=self.shape[1])
        return out.view(bool)

    def set_rows(self, y0: int, rows: np.ndarray) -> None:
        """Overwrite the rows from ``y0`` with a (n, W) bool array."""
        r = np.asarray(rows, dtype=bool)
        if r.ndim != 2 or r.shape[1] != self.shape[1] or y0 < 0 or y0 + r.shape[0] > self.shape[0]:
            raise ValueError(f"rows of shape {r.shape} at {y0} do not fit a {self.shape} mask")
        self.bits[y0 : y0 + r.shape[0]] = np.packbits(r, axis=1)

    def to_bool(self) -> np.ndarray:
        """The whole mask as an (H, W) bool array."""
        return self.rows(0, self.shape[0])

    def count(self) -> int:
        """Number of True pixels."""
        return int(_POPCOUNT[self.bits].sum(dtype=np.int64)) if self.bits.size else 0

    def mean(self) -> float:
        """Fraction of True pixels (0 for an empty mask)."""
        h, w = self.shape
        return self.count() / (h * w) if h * w else 0.0

    def any(self) -> bool:
        """Whether any pixel is True."""
        return bool(self.bits.any())


#: A thumbnail seen through its rows: ``read_rows(y0, y1)`` returns rows ``y0:y1`` as (n, W, 3) uint8.
RowReader = Callable[[int, int], np.ndarray]


def _strips(height: int, rows: int) -> Iterator[tuple[int, int]]:
    """``(y0, y1)`` of consecutive strips of ``rows`` rows covering ``height`` rows."""
    rows = max(1, int(rows))
    for y0 in range(0, height, rows):
        yield y0, min(height, y0 + rows)


def _closing_strips(
    read: Callable[[int, int], np.ndarray], shape: tuple[int, int], diameter_px: int, rows: int
) -> PackedMask:
    """Binary closing with a disc, strip by strip; outside the image counts as background.

    ``read(y0, y1)`` gives the input's bool rows. Each strip is closed with ``diameter`` rows of
    context above and below (zeros past the image's edges), which is all that a closing (a
    dilation, then an erosion, each reaching ``diameter // 2`` px) looks at, so the result equals
    the closing of the whole mask padded with zeros.
    """
    h, w = shape
    out = PackedMask(shape)
    # An even-sized disc has no centre pixel, and OpenCV's closing with it shifts the mask by one
    # pixel down and right; an odd diameter keeps the disc symmetric about its anchor.
    d = int(diameter_px) | 1
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (d, d))
    for y0, y1 in _strips(h, rows):
        lo, hi = max(0, y0 - d), min(h, y1 + d)
        band = np.ascontiguousarray(read(lo, hi), dtype=bool).view(np.uint8)
        padded = cv2.copyMakeBorder(
            band, d - (y0 - lo), d - (hi - y1), d, d, cv2.BORDER_CONSTANT, value=0
        )
        closed = cv2.morphologyEx(padded, cv2.MORPH_CLOSE, kernel)
        out.set_rows(y0, closed[d : d + (y1 - y0), d : d + w].view(bool))
    return out


def _merge_labels(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Component of each of ``n`` nodes joined by edges ``a[i] - b[i]``: the smallest node id.

    Label propagation with pointer jumping (hook the larger root onto the smaller, then compress
    paths) until every edge joins nodes of one component; a handful of rounds in practice.
    """
    parent = np.arange(n, dtype=np.int64)
    if a.size == 0:
        return parent
    while True:
        ra, rb = parent[a], parent[b]
        differ = ra != rb
        if not differ.any():
            return parent
        lo = np.minimum(ra[differ], rb[differ])
        np.minimum.at(parent, ra[differ], lo)
        np.minimum.at(parent, rb[differ], lo)
        while True:  # path compression: every node points at its root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand


def _flip_components_strips(
    mask: PackedMask,
    *,
    foreground: bool,
    connectivity: int,
    select: Callable[[np.ndarray, np.ndarray], np.ndarray],
    rows: int,
) -> PackedMask:
    """Flip the pixels of the selected connected components of the mask (or of its complement).

    Components are labelled strip by strip with OpenCV and joined across strip boundaries (the
    last row of one strip against the first of the next, diagonals too for 8-connectivity), so the
    int32 labels are never held for the whole mask. A second pass labels each strip again (the same
    labels) and flips the pixels of the selected components.

    Args:
        mask: the mask.
        foreground: components of the mask (True) or of its complement (False).
        connectivity: 4 or 8.
        select: ``select(areas, touches_border)`` -> bool array, over the whole-image components:
            their pixel counts and whether their bounding box touches the image's edge.
        rows: rows per strip.

    Returns:
        A new mask: ``mask`` XOR the pixels of the selected components.
    """
    h, w = mask.shape
    strips = list(_strips(h, rows))
    offsets: list[int] = []
    areas: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]  # id 0: no component
    border: list[np.ndarray] = [np.zeros(1, dtype=bool)]
    edge_a: list[np.ndarray] = []
    edge_b: list[np.ndarray] = []
    prev_last: np.ndarray | None = None
    next_id = 1
    for i, (y0, y1) in enumerate(strips):
        part = mask.rows(y0, y1)
        if not foreground:
            np.logical_not(part, out=part)
        n, labels, stats, _ = cv2.connectedComponentsWithStats(
            part.view(np.uint8), connectivity=connectivity, ltype=cv2.CV_32S
        )
        del part
        base = next_id - 1  # strip label l > 0 is global id base + l
        offsets.append(base)
        st = stats[1:]
        x, y = st[:, cv2.CC_STAT_LEFT], st[:, cv2.CC_STAT_TOP]
        bw, bh = st[:, cv2.CC_STAT_WIDTH], st[:, cv2.CC_STAT_HEIGHT]
        touches = (x == 0) | (x + bw == w)
        if i == 0:
            touches |= y == 0
        if i == len(strips) - 1:
            touches |= y + bh == y1 - y0
        areas.append(st[:, cv2.CC_STAT_AREA].astype(np.int64))
        border.append(touches)
        first = np.where(labels[0] > 0, labels[0].astype(np.int64) + base, 0)
        if prev_last is not None:
            pairs = [(prev_last, first)]
            if connectivity == 8:
                pairs += [(prev_last[:-1], first[1:]), (prev_last[1:], first[:-1])]
            for up, down in pairs:
                both = (up > 0) & (down > 0)
                edge_a.append(up[both])
                edge_b.append(down[both])
        prev_last = np.where(labels[-1] > 0, labels[-1].astype(np.int64) + base, 0)
        del labels
        next_id += n - 1
    if edge_a:
        ab = np.unique(np.stack([np.concatenate(edge_a), np.concatenate(edge_b)]), axis=1)
    else:
        ab = np.zeros((2, 0), dtype=np.int64)
    root = _merge_labels(next_id, ab[0], ab[1])
    area = np.bincount(root, weights=np.concatenate(areas), minlength=next_id)
    touch = np.bincount(root, weights=np.concatenate(border), minlength=next_id) > 0
    chosen = np.asarray(select(area, touch), dtype=bool)
    chosen[0] = False
    flip_id = chosen[root]  # per strip-piece id
    if not flip_id.any():
        return mask
    out = PackedMask(mask.shape)
    for (y0, y1), base in zip(strips, offsets, strict=True):
        part = mask.rows(y0, y1)
        src = part if foreground else ~part
        n, labels = cv2.connectedComponents(
            src.view(np.uint8), connectivity=connectivity, ltype=cv2.CV_32S
        )
        flip = flip_id[base : base + n].copy()
        flip[0] = False
        out.set_rows(y0, part ^ flip[labels])
    return out


#: a thumbnail whose non-glass, non-black pixels have 99.5 % of their saturation at or below this
#: (0-255) is greyscale (a 16-bit greyscale scan, a grey export; JPEG leaves a little chroma noise)
GREY_SATURATION = 3
#: the least share of glass (lit pixels paler than ``bright_value``) a greyscale thumbnail needs for
#: its darker pixels to be told apart as tissue
GREY_MIN_GLASS = 0.01


def is_greyscale(saturation_hist: np.ndarray) -> bool:
    """Whether a saturation histogram (0-255 counts over the tissue candidates) is of a grey image."""
    total = int(saturation_hist.sum())
    if total == 0:
        return False
    return int(saturation_hist[: GREY_SATURATION + 1].sum()) >= 0.995 * total


def detect_tissue_strips(
    read_rows: RowReader,
    shape: tuple[int, int],
    mpp: float,
    params: TissueParams = TissueParams(),  # noqa: B008
    *,
    strip_rows: int = DETECT_STRIP_ROWS,
    on_rows: Callable[[int, np.ndarray], None] | None = None,
) -> PackedMask:
    """Detect tissue strip by strip on a thumbnail that is never held whole.

    The same recipe and the same result as :func:`detect_tissue` on the whole thumbnail: the
    median filter reads ``median // 2`` rows of context around each strip; the Otsu threshold comes
    from the saturation histogram of every strip; the closing reads ``closing`` rows of context;
    the minimum object and hole sizes (µm², converted with ``mpp``) apply to whole-image connected
    components, joined across strip boundaries. Whole-thumbnail memory is one byte per pixel (the
    saturation, until it is thresholded) and then one bit per pixel (the packed masks); everything
    else is per strip.

    Args:
        read_rows: ``read_rows(y0, y1)`` -> rows ``y0:y1`` of the thumbnail, (n, W, 3) uint8 RGB.
        shape: (H, W) of the thumbnail.
        mpp: µm per thumbnail pixel.
        params: detection parameters.
        strip_rows: thumbnail rows per strip.
        on_rows: called as ``on_rows(y0, rgb)`` with each strip's own rows (no context), in order,
            e.g. to stream the thumbnail to a PNG while it is read.

    Returns:
        The tissue mask, packed.

    Raises:
        InputError: ``mpp`` is not a positive number.
        ValueError: a strip is not a uint8 image of the thumbnail's width.
    """
    mpp = _check_mpp(mpp)
    h, w = int(shape[0]), int(shape[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"expected a non-empty image, got shape {(h, w)}")
    px_area = mpp * mpp
    k = _odd_kernel(params.median_um, mpp)
    halo = k // 2

    saturation = np.zeros((h, w), dtype=np.uint8)  # 0 outside candidates: never above a threshold
    darkness = np.zeros((h, w), dtype=np.uint8)  # 255 - V, 0 on black: a greyscale slide's signal
    hist = np.zeros(256, dtype=np.int64)
    hist_dark = np.zeros(256, dtype=np.int64)
    for y0, y1 in _strips(h, strip_rows):
        lo, hi = max(0, y0 - halo), min(h, y1 + halo)
        rgb = _as_rgb_uint8(read_rows(lo, hi))
        if rgb.shape[:2] != (hi - lo, w):
            raise ValueError(f"rows {lo}:{hi} came back as shape {rgb.shape}, expected width {w}")
        if on_rows is not None:
            on_rows(y0, rgb[y0 - lo : y1 - lo])
        smooth = np.ascontiguousarray(cv2.medianBlur(rgb, k)[y0 - lo : y1 - lo])
        del rgb
        hsv = cv2.cvtColor(smooth, cv2.COLOR_RGB2HSV)
        sat = hsv[:, :, 1]
        candidate = (hsv[:, :, 2] >= params.dark_value) & (
            smooth.min(axis=2) <= params.bright_value
        )
        hist += np.bincount(sat[candidate], minlength=256)
        saturation[y0:y1] = np.where(candidate, sat, 0)
        lit = hsv[:, :, 2] >= params.dark_value
        dark = np.where(lit, 255 - hsv[:, :, 2], 0).astype(np.uint8)
        hist_dark += np.bincount(dark[lit], minlength=256)
        darkness[y0:y1] = dark
        del smooth, hsv, sat, candidate, lit, dark
    if hist.sum() == 0:
        return PackedMask((h, w))

    threshold = otsu_from_histogram(hist)
    threshold = min(max(threshold, params.min_saturation), params.max_saturation)
    if is_greyscale(hist):
        # no colour to threshold: tissue is darker than the glass (brightfield), by Otsu on the
        # darkness of every lit pixel; a grey field without glass has no tissue to tell apart
        glass_dark = 255.0 - params.bright_value
        if hist_dark[: int(glass_dark)].sum() < GREY_MIN_GLASS * hist_dark.sum():
            return PackedMask((h, w))
        held = [darkness]
        threshold = max(otsu_from_histogram(hist_dark), glass_dark)
    else:
        held = [saturation]  # released (below) as soon as the thresholded mask is packed
    del saturation, darkness

    def thresholded(y0: int, y1: int) -> np.ndarray:
        return held[0][y0:y1] > threshold

    diameter = int(round(params.closing_um / mpp))
    if diameter >= 2:
        mask = _closing_strips(thresholded, (h, w), diameter, strip_rows)
    else:
        mask = PackedMask((h, w))
        for y0, y1 in _strips(h, strip_rows):
            mask.set_rows(y0, thresholded(y0, y1))
    held.clear()

    min_object = params.min_object_um2 / px_area
    if min_object > 1 and mask.any():
        mask = _flip_components_strips(
            mask,
            foreground=True,
            connectivity=8,
            select=lambda area, _border: area < min_object,
            rows=strip_rows,
        )
    max_hole = params.min_hole_um2 / px_area
    if max_hole > 1 and mask.count() < h * w:
        # 4-connected background is the complement of 8-connected foreground components.
        mask = _flip_components_strips(
            mask,
            foreground=False,
            connectivity=4,
            select=lambda area, border: (area < max_hole) & ~border,
            rows=strip_rows,
        )
    return mask


def detect_tissue(rgb: np.ndarray, mpp: float, params: TissueParams = TissueParams()) -> np.ndarray:  # noqa: B008
    """Detect tissue on a low-resolution RGB thumbnail.

    The recipe: median filter (``params.median_um``) -> HSV saturation and value, min(R, G, B) ->
    candidates are pixels that are neither dark (V < ``dark_value``) nor glass
    (min(R, G, B) > ``bright_value``) -> Otsu threshold of the saturation over the candidates, clipped
    to [``min_saturation``, ``max_saturation``] -> tissue = candidate and saturation above the
    threshold (a greyscale thumbnail, :func:`is_greyscale`, has no saturation: there tissue = pixels
    darker than an Otsu threshold of the lit pixels' darkness, at least as dark as glass's limit, on
    a thumbnail with some glass) -> closing (``closing_um``) -> drop components below
    ``min_object_um2`` -> fill holes below ``min_hole_um2``.

    The median filter is applied to the RGB channels before the saturation is computed: saturation
    (max - min) / max amplifies noise in dark and grey pixels, so filtering first keeps noisy black
    borders and grey glass edges at a low saturation.

    The work runs strip by strip (:func:`detect_tissue_strips`, same result), so its temporaries
    stay small next to the thumbnail.

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
    image = np.asarray(rgb)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {image.dtype}")
    if image.ndim < 2 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"expected a non-empty image, got shape {image.shape}")
    _as_rgb_uint8(image[:1])  # the shape checks, on one row
    return detect_tissue_strips(lambda y0, y1: image[y0:y1], image.shape[:2], mpp, params).to_bool()


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
    contours, _ = cv2.findContours(
        np.ascontiguousarray(m).view(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE
    )
    if contours:
        cv2.drawContours(out, contours, -1, tuple(int(c) for c in color), int(thickness))
    return out


# --------------------------------------------------------------------------------------------------
# Tissue fraction of boxes
# --------------------------------------------------------------------------------------------------


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
    m = np.ascontiguousarray(m)  # bool as uint8 0/1 without a copy (findContours copies anyway)
    contours, hierarchy = cv2.findContours(
        m.view(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE
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
        _, labels = cv2.connectedComponents(m.view(np.uint8), connectivity=8, ltype=cv2.CV_32S)
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
