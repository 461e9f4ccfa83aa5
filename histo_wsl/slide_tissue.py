"""The tissue step every slide command shares: a thumbnail, then detected or given tissue.

``extract-patches`` and ``localize`` both read a low-resolution thumbnail (:func:`read_thumbnail`),
then either detect tissue on it (:func:`histo_wsl.tissue.detect_tissue`) or rasterise a GeoJSON the
user gave (``--tissue-geojson``: one file, or a folder of ``<slide>.geojson`` /
``<slide>/tissue.geojson``, or a ``tissue_geojson`` CSV column per slide).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from histo_wsl import tissue
from histo_wsl.errors import InputError
from histo_wsl.inputs import InputItem
from histo_wsl.slide import Slide, read_thumbnail

__all__ = ["ASSUMED_MPP", "SlideTissue", "find_tissue", "save_png", "tissue_geojson_for"]

#: Level-0 µm/px assumed for tissue-detection sizes on slides whose resolution is unknown.
ASSUMED_MPP = 0.5


@dataclass
class SlideTissue:
    """A slide's thumbnail and its tissue mask.

    Attributes:
        thumbnail: (H, W, 3) uint8 RGB thumbnail.
        downsample: level-0 pixels per thumbnail pixel.
        mask: (H, W) bool tissue mask on the thumbnail.
        source: ``detected``, ``whole slide`` or the GeoJSON file the tissue came from.
    """

    thumbnail: np.ndarray
    downsample: float
    mask: np.ndarray
    source: str

    @property
    def fraction(self) -> float:
        """Fraction of the thumbnail that is tissue (0-1)."""
        return round(float(self.mask.mean()), 6) if self.mask.size else 0.0


def tissue_geojson_for(item: InputItem, source: Path | None) -> Path | None:
    """The tissue GeoJSON of one slide: its CSV column, the file given, or its file in a folder.

    Args:
        item: the slide (a ``tissue_geojson`` CSV column wins).
        source: ``--tissue-geojson``: None, a GeoJSON file, or a folder of ``<slide>.geojson`` /
            ``<slide>/tissue.geojson``.

    Returns:
        The GeoJSON file, or None to detect tissue.

    Raises:
        InputError: a folder without this slide's GeoJSON.
    """
    if item.extra.get("tissue_geojson"):
        return Path(item.extra["tissue_geojson"])
    if source is None or source.is_file():
        return source
    for candidate in (source / f"{item.name}.geojson", source / item.name / "tissue.geojson"):
        if candidate.is_file():
            return candidate
    raise InputError(
        f"no tissue GeoJSON for slide {item.name!r} in this folder (looked for {item.name}.geojson and "
        f"{item.name}/tissue.geojson); add it or drop --tissue-geojson",
        source,
    )


def find_tissue(
    slide: Slide,
    *,
    thumbnail_mpp: float = 8.0,
    geojson: Path | None = None,
    params: tissue.TissueParams | None = None,
    whole_slide: bool = False,
) -> SlideTissue:
    """Read the slide's thumbnail and find its tissue.

    Args:
        slide: the open slide.
        thumbnail_mpp: resolution of the thumbnail (µm/px; see :func:`read_thumbnail`).
        geojson: tissue polygons in level-0 pixels to use instead of detection.
        params: detection parameters (default :class:`~histo_wsl.tissue.TissueParams`).
        whole_slide: count the whole slide as tissue (no detection).

    Returns:
        The thumbnail and its tissue mask. Sizes in detection are converted with the slide's mpp,
        or with :data:`ASSUMED_MPP` when the slide has none.
    """
    thumb, ds = read_thumbnail(slide, mpp=thumbnail_mpp)
    if whole_slide:
        return SlideTissue(thumb, ds, np.ones(thumb.shape[:2], dtype=bool), "whole slide")
    if geojson is not None:
        mask = tissue.geojson_to_mask(tissue.read_geojson(geojson), thumb.shape[:2], ds)
        return SlideTissue(thumb, ds, mask, str(geojson))
    level0_mpp = slide.mpp if slide.mpp is not None else ASSUMED_MPP
    mask = tissue.detect_tissue(thumb, level0_mpp * ds, params or tissue.TissueParams())
    return SlideTissue(thumb, ds, mask, "detected")


def save_png(path: Path, rgb: np.ndarray) -> None:
    """Save an RGB (or grey) uint8 array as a PNG."""
    # QC images: the fast zlib level patches use (level 6 cost ~0.2 s per slide for 10 % smaller files)
    Image.fromarray(rgb).save(path, format="PNG", compress_level=1)
