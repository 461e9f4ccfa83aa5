"""Pixels and shapes in and out: slides through OpenSlide, grids, GeoJSON, annotations, writers.

* :mod:`~histo_wsl.slideio.annotations` — Slide annotations as ground-truth masks: QuPath GeoJSON,
  ASAP XML (CAMELYON16) or a mask image.
* :mod:`~histo_wsl.slideio.geojson` — Regions as GeoJSON in level-0 pixel coordinates, the format
  QuPath opens, edits and exports back.
* :mod:`~histo_wsl.slideio.grid` — Patch grids at a target resolution, in level-0 coordinates.
* :mod:`~histo_wsl.slideio.slide` — One reader interface for whole-slide images and plain images.
* :mod:`~histo_wsl.slideio.writers` — Output writers of ``localize``: pyramidal probability TIFF,
  overlay PNG, per-image PNG maps.

The names below are imported from their module on first use, so importing the package is free.
"""

from histo_wsl.runtime.lazy import lazy_exports

#: public name → the module of this package that defines it
_EXPORTS = {
    "annotation_mask": "annotations",
    "ANNOTATION_SUFFIXES": "annotations",
    "EXCLUSION_GROUPS": "annotations",
    "feature_class": "annotations",
    "find_annotation": "annotations",
    "GroundTruth": "annotations",
    "read_asap_xml": "annotations",
    "geojson_to_mask": "geojson",
    "GeoJSONStyle": "geojson",
    "mask_to_geojson": "geojson",
    "read_geojson": "geojson",
    "write_geojson": "geojson",
    "cover_grid": "grid",
    "make_grid": "grid",
    "PatchGrid": "grid",
    "DEFAULT_TILE_CACHE": "slide",
    "LEVEL_TOLERANCE": "slide",
    "MAX_PLAIN_IMAGE_PIXELS": "slide",
    "MAX_PLAUSIBLE_MPP": "slide",
    "open_slide": "slide",
    "plan_read": "slide",
    "read_patch": "slide",
    "read_thumbnail": "slide",
    "read_thumbnail_rows": "slide",
    "ReadPlan": "slide",
    "Slide": "slide",
    "thumbnail_geometry": "slide",
    "THUMBNAIL_TILE_CACHE": "slide",
    "ThumbnailGeometry": "slide",
    "as_rgb_uint8": "writers",
    "draw_tissue": "writers",
    "overlay_image": "writers",
    "PngStream": "writers",
    "pyramid_shapes": "writers",
    "scratch_array": "writers",
    "TILE": "writers",
    "write_mask_png": "writers",
    "write_png": "writers",
    "write_probability_png": "writers",
    "write_pyramid_tiff": "writers",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
