"""Tissue detection on a slide thumbnail.

Key components:

- :class:`TissueParams` and :func:`detect_tissue`: the CLAM/WSInfer recipe (HSV saturation, median
  filter, Otsu threshold, closing, size filters) with every size given in µm or µm² and converted with
  the thumbnail's resolution, plus guards against black borders, glass and pale tissue.
- :func:`detect_tissue_strips`: the same detection, strip by strip, on a thumbnail that is never held
  whole (its rows come from a callable), into a :class:`PackedMask` (1 bit per pixel). Memory is
  bounded by the strip height times the thumbnail width, not by the thumbnail's area
  (the packed mask and its strip operations: :mod:`histo_wsl.tissue.packed`).
- :func:`is_greyscale`: whether a thumbnail has no colour, so darkness stands in for saturation.

Tissue outlines as QuPath GeoJSON are :mod:`histo_wsl.slideio.geojson`; the QC drawing is
:func:`histo_wsl.slideio.writers.draw_tissue`; tissue fractions of a patch grid are
:mod:`histo_wsl.tissue.fraction`.

Everything works on numpy arrays: the caller reads the thumbnail from the slide and passes its
resolution (µm per thumbnail pixel) and its downsample from level 0.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np

from histo_wsl.errors import InputError
from histo_wsl.slideio.writers import as_rgb_uint8
from histo_wsl.tissue.packed import PackedMask, closing_strips, flip_components_strips, strip_spans

__all__ = [
    "DETECT_STRIP_ROWS",
    "GREY_MIN_GLASS",
    "GREY_SATURATION",
    "TissueParams",
    "detect_tissue",
    "detect_tissue_strips",
    "is_greyscale",
    "otsu_from_histogram",
    "otsu_threshold",
    "work_threads",
]

#: Thumbnail rows per strip in :func:`detect_tissue_strips` (and per band of the fraction map): the
#: strip-sized temporaries (RGB, median, HSV, int32 labels) stay a few MB whatever the slide's size.
DETECT_STRIP_ROWS = 256
#: At most this many threads share a slide's one-off CPU work (reading a held level 0, resampling
#: the thumbnail, the median filter of detection); OpenSlide, Pillow and OpenCV release the GIL.
MAX_WORK_THREADS = 4
#: A median filter (or a closing) over fewer rows than this runs in one call: splitting it costs
#: more than it saves.
PARALLEL_MIN_ROWS = 128


def work_threads() -> int:
    """Threads for a slide's one-off work: the CPUs this process may use, at most :data:`MAX_WORK_THREADS`."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 1
    return max(1, min(MAX_WORK_THREADS, usable))


def _median_blur(rgb: np.ndarray, k: int) -> np.ndarray:
    """``cv2.medianBlur(rgb, k)``, split into bands of rows filtered in threads (the same result).

    Each band is filtered with ``k // 2`` rows of real context above and below, so every output
    pixel sees the window it sees in one call; the image's own edges are the call's edges.
    """
    h = rgb.shape[0]
    threads = min(work_threads(), h // PARALLEL_MIN_ROWS)
    if threads < 2:
        return cv2.medianBlur(rgb, k)
    halo = k // 2
    bounds = np.linspace(0, h, threads + 1).round().astype(int).tolist()
    out = np.empty_like(rgb)

    def band(i: int) -> None:
        y0, y1 = bounds[i], bounds[i + 1]
        lo, hi = max(0, y0 - halo), min(h, y1 + halo)
        out[y0:y1] = cv2.medianBlur(np.ascontiguousarray(rgb[lo:hi]), k)[y0 - lo : y1 - lo]

    with ThreadPoolExecutor(threads, thread_name_prefix="histo-wsl-median") as pool:
        list(pool.map(band, range(threads)))
    return out


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


#: A thumbnail seen through its rows: ``read_rows(y0, y1)`` returns rows ``y0:y1`` as (n, W, 3) uint8.
RowReader = Callable[[int, int], np.ndarray]


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


def detect_tissue_strips(  # noqa: PLR0915 (one recipe, step by step, as detect_tissue)
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
    for y0, y1 in strip_spans(h, strip_rows):
        lo, hi = max(0, y0 - halo), min(h, y1 + halo)
        rgb = as_rgb_uint8(read_rows(lo, hi))
        if rgb.shape[:2] != (hi - lo, w):
            raise ValueError(f"rows {lo}:{hi} came back as shape {rgb.shape}, expected width {w}")
        if on_rows is not None:
            on_rows(y0, rgb[y0 - lo : y1 - lo])
        smooth = np.ascontiguousarray(_median_blur(rgb, k)[y0 - lo : y1 - lo])
        del rgb
        hsv = cv2.cvtColor(smooth, cv2.COLOR_RGB2HSV)
        sat = hsv[:, :, 1]
        # min(R, G, B) channel by channel: several times faster than a reduction over axis 2
        least = np.minimum(np.minimum(smooth[:, :, 0], smooth[:, :, 1]), smooth[:, :, 2])
        candidate = (hsv[:, :, 2] >= params.dark_value) & (least <= params.bright_value)
        hist += np.bincount(sat[candidate], minlength=256)
        saturation[y0:y1] = np.where(candidate, sat, 0)
        lit = hsv[:, :, 2] >= params.dark_value
        dark = np.where(lit, 255 - hsv[:, :, 2], 0).astype(np.uint8)
        hist_dark += np.bincount(dark[lit], minlength=256)
        darkness[y0:y1] = dark
        del smooth, hsv, sat, least, candidate, lit, dark
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
        # strips of the closing shared among threads: a thumbnail in one strip is cut into some
        threads = work_threads()
        rows = min(strip_rows, max(PARALLEL_MIN_ROWS, -(-h // threads)))
        mask = closing_strips(thresholded, (h, w), diameter, rows, threads=threads)
    else:
        mask = PackedMask((h, w))
        for y0, y1 in strip_spans(h, strip_rows):
            mask.set_rows(y0, thresholded(y0, y1))
    held.clear()

    min_object = params.min_object_um2 / px_area
    if min_object > 1 and mask.any():
        mask = flip_components_strips(
            mask,
            foreground=True,
            connectivity=8,
            select=lambda area, _border: area < min_object,
            rows=strip_rows,
        )
    max_hole = params.min_hole_um2 / px_area
    if max_hole > 1 and mask.count() < h * w:
        # 4-connected background is the complement of 8-connected foreground components.
        mask = flip_components_strips(
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
    as_rgb_uint8(image[:1])  # the shape checks, on one row
    return detect_tissue_strips(lambda y0, y1: image[y0:y1], image.shape[:2], mpp, params).to_bool()


# --------------------------------------------------------------------------------------------------
# Tissue fraction of boxes
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# GeoJSON
# --------------------------------------------------------------------------------------------------
