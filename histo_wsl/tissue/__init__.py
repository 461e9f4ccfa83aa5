"""Where the tissue is: detection on a thumbnail, its memory-bounded masks, tissue fractions.

* :mod:`~histo_wsl.tissue.detect` — Tissue detection on a slide thumbnail.
* :mod:`~histo_wsl.tissue.fraction` — Tissue fraction of many boxes at once (one patch grid), from
  summed-area tables of a mask.
* :mod:`~histo_wsl.tissue.packed` — Masks of 1 bit per pixel and the strip-by-strip operations that
  keep tissue detection bounded.
* :mod:`~histo_wsl.tissue.scan` — The tissue step every slide command shares: a thumbnail, then
  detected or given tissue.

The names below are imported from their module on first use, so importing the package is free.
"""

from histo_wsl.runtime.lazy import lazy_exports

#: public name → the module of this package that defines it
_EXPORTS = {
    "DETECT_STRIP_ROWS": "detect",
    "detect_tissue": "detect",
    "detect_tissue_strips": "detect",
    "GREY_MIN_GLASS": "detect",
    "GREY_SATURATION": "detect",
    "is_greyscale": "detect",
    "otsu_from_histogram": "detect",
    "otsu_threshold": "detect",
    "TissueParams": "detect",
    "tissue_fraction_map": "fraction",
    "TissueFractionMap": "fraction",
    "window_masks": "fraction",
    "closing_strips": "packed",
    "flip_components_strips": "packed",
    "PackedMask": "packed",
    "strip_spans": "packed",
    "ASSUMED_MPP": "scan",
    "find_tissue": "scan",
    "HeldLevel": "scan",
    "WHOLE_SLIDE": "scan",
    "keeps_thumbnail": "scan",
    "scan_tissue": "scan",
    "SlideTissue": "scan",
    "tissue_geojson_for": "scan",
    "TissueMap": "scan",
    "write_tissue_images": "scan",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
