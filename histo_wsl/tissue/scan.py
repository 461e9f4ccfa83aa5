"""The tissue step every slide command shares: a thumbnail, then detected or given tissue.

``extract-patches`` and ``localize`` both read a low-resolution thumbnail (:func:`read_thumbnail`),
then either detect tissue on it (:func:`histo_wsl.tissue.detect.detect_tissue`) or rasterise a GeoJSON the
user gave (``--tissue-geojson``: one file, or a folder of ``<slide>.geojson`` /
``<slide>/tissue.geojson``, or a ``tissue_geojson`` CSV column per slide).

``localize`` keeps the thumbnail (:func:`find_tissue`: its overlay is drawn on it).
``extract-patches`` holds it only when it is small (:data:`THUMBNAIL_KEEP_BYTES`): else
:func:`scan_tissue` reads it band by band, streams it to ``thumbnail.png`` and detects tissue
strip by strip into a packed mask (1 bit per pixel), and :func:`write_tissue_images` reads it
again band by band to draw ``tissue.png`` and ``patches.png``. Its peak memory therefore does not
grow with the slide (``benchmarks/extract_memory.py``); a small slide's level 0 may be held
(:class:`HeldLevel`, at most :data:`HELD_LEVEL_BYTES`, read in threads) to read it once for the
thumbnail and the patches; a kept thumbnail is resampled block by block in threads
(:func:`read_whole_thumbnail`), and the QC images are deflated each in a thread. The
thumbnail is at ``thumbnail_mpp`` (default 8 µm/px) between 1,024 and 4,096 px on its long side
(:func:`histo_wsl.slideio.slide.thumbnail_geometry`); the resolution used is recorded per slide
(``tissue_mpp``, ``thumbnail_size``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from histo_wsl.errors import InputError
from histo_wsl.runtime.inputs import InputItem
from histo_wsl.slideio.geojson import geojson_to_mask, read_geojson
from histo_wsl.slideio.slide import (
    THUMBNAIL_TILE_CACHE,
    Slide,
    ThumbnailGeometry,
    read_patch,
    read_thumbnail,
    read_thumbnail_rows,
    thumbnail_geometry,
)
from histo_wsl.slideio.writers import QC_PNG, PngStream
from histo_wsl.tissue import detect as tissue
from histo_wsl.tissue.packed import PackedMask

__all__ = [
    "ASSUMED_MPP",
    "HeldLevel",
    "SlideTissue",
    "TissueMap",
    "WHOLE_SLIDE",
    "find_tissue",
    "keeps_thumbnail",
    "read_whole_thumbnail",
    "scan_tissue",
    "tissue_geojson_for",
    "write_tissue_images",
]

#: Thumbnail rows read at a time by :func:`scan_tissue` and :func:`write_tissue_images`.
BAND_ROWS = tissue.DETECT_STRIP_ROWS
#: Thumbnails up to this size (RGB bytes; 1448² px) are read once and kept for the QC images:
#: reading a small thumbnail band by band costs more time than it saves memory. Larger ones
#: (slides over about 46,000 px at 0.25 µm/px) are read in bands, so the peak stays bounded.
THUMBNAIL_KEEP_BYTES = 6 * 2**20
#: :attr:`SlideTissue.source` when the whole slide counts as tissue (no detection)
WHOLE_SLIDE = "whole slide"
#: A level-0 of at most this many RGB bytes (about 4,700² px) may be read once and held
#: (:class:`HeldLevel`), so that a small slide's thumbnail and patches come from one read.
HELD_LEVEL_BYTES = 64 * 2**20
#: Colours of the QC drawings (RGB): tissue contours and extracted patches.
TISSUE_COLOR = (0, 200, 0)
PATCH_COLOR = (30, 90, 230)

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
    pixels: HeldLevel | None = None,
) -> SlideTissue:
    """Read the slide's thumbnail and find its tissue.

    Args:
        slide: the open slide.
        thumbnail_mpp: resolution of the thumbnail (µm/px; see :func:`read_thumbnail`).
        geojson: tissue polygons in level-0 pixels to use instead of detection.
        params: detection parameters (default :class:`~histo_wsl.tissue.detect.TissueParams`).
        whole_slide: count the whole slide as tissue (no detection).
        pixels: the slide's level 0 already held in memory, the thumbnail read from it (the same
            pixels; :class:`HeldLevel`).

    Returns:
        The thumbnail and its tissue mask. Sizes in detection are converted with the slide's mpp,
        or with :data:`ASSUMED_MPP` when the slide has none.
    """
    if pixels is None:
        thumb, ds = read_thumbnail(slide, mpp=thumbnail_mpp)
    else:
        geometry = thumbnail_geometry(slide, mpp=thumbnail_mpp)
        thumb = read_thumbnail_rows(pixels, geometry, 0, geometry.height)  # type: ignore[arg-type]
        ds = geometry.downsample
    if whole_slide:
        return SlideTissue(thumb, ds, np.ones(thumb.shape[:2], dtype=bool), WHOLE_SLIDE)
    if geojson is not None:
        mask = geojson_to_mask(read_geojson(geojson), thumb.shape[:2], ds)
        return SlideTissue(thumb, ds, mask, str(geojson))
    level0_mpp = slide.mpp if slide.mpp is not None else ASSUMED_MPP
    mask = tissue.detect_tissue(thumb, level0_mpp * ds, params or tissue.TissueParams())
    return SlideTissue(thumb, ds, mask, "detected")


@dataclass
class TissueMap:
    """A slide's tissue mask on its thumbnail grid, packed; a small thumbnail is kept too.

    Attributes:
        geometry: the thumbnail's size, downsample and read plan.
        mask: the tissue mask, 1 bit per thumbnail pixel.
        source: ``detected``, ``whole slide`` or the GeoJSON file the tissue came from.
        tissue_mpp: µm per thumbnail pixel the detection sizes were converted with (the slide's
            mpp, or :data:`ASSUMED_MPP`, times the downsample).
        rgb: the thumbnail when it is at most :data:`THUMBNAIL_KEEP_BYTES`, else None (the QC
            images then read it again band by band).
    """

    geometry: ThumbnailGeometry
    mask: PackedMask
    source: str
    tissue_mpp: float
    rgb: np.ndarray | None = None

    @property
    def downsample(self) -> float:
        """Level-0 pixels per thumbnail pixel."""
        return self.geometry.downsample

    @property
    def fraction(self) -> float:
        """Fraction of the thumbnail that is tissue (0-1)."""
        return round(self.mask.mean(), 6)

    def record(self) -> dict:
        """JSON-ready facts for the slide's record: thumbnail size and resolution, tissue."""
        return {
            "thumbnail_size": [self.geometry.width, self.geometry.height],
            "thumbnail_downsample": self.downsample,
            "tissue_mpp": round(self.tissue_mpp, 6),
            "tissue_fraction": self.fraction,
            "tissue_source": self.source,
        }


class HeldLevel:
    """A small slide's level 0, read once and held as RGB; regions are cut from memory.

    :meth:`read_region` returns what :meth:`Slide.read_region` returns: the same RGB values (white
    outside the level), as OpenSlide paints level 0 at whole-pixel offsets and the flattening of
    its alpha works pixel by pixel, and the same ICC profile in ``info`` (a region wholly inside an
    opaque level carries the slide's profile, one reaching outside it none). A small slide's
    thumbnail (:func:`scan_tissue`) and its patches can then come from one read of the file
    instead of one each. Regions of other levels are read from the slide. Make one with
    :meth:`read`.

    Attributes:
        slide: the open slide (its other levels, and everything but level-0 pixels).
        rgb: (H, W, 3) uint8 level 0.
        icc_profile: the ICC profile of the regions inside the level, or None.
    """

    level = 0

    def __init__(self, slide: Slide, rgb: np.ndarray, icc_profile: bytes | None = None) -> None:
        self.slide = slide
        self.rgb: np.ndarray | None = rgb
        self.icc_profile = icc_profile

    @classmethod
    def read(
        cls, slide: Slide, *, max_bytes: int | None = None, band_rows: int = 512
    ) -> HeldLevel | None:
        """Read ``slide``'s level 0 band by band; None when its RGB is over ``max_bytes``.

        ``max_bytes`` defaults to :data:`HELD_LEVEL_BYTES`. Plain images (already held by
        :class:`Slide`) give None too, and so does a slide with an ICC profile whose level 0 is
        not opaque: its regions carry the profile or not depending on their own alpha.
        """
        limit = HELD_LEVEL_BYTES if max_bytes is None else max_bytes
        w, h = slide.dimensions
        if slide.vendor == "image" or w * h * 3 > limit or w < 1 or h < 1:
            return None
        osr = getattr(slide, "_osr", None)
        has_profile = getattr(osr, "color_profile", None) is not None
        rgb = np.empty((h, w, 3), dtype=np.uint8)

        def read_band(y0: int) -> bytes | None:
            n = min(band_rows, h - y0)
            band = slide.read_region((0, y0), 0, (w, n))
            rgb[y0 : y0 + n] = np.asarray(band)
            # an opaque band keeps the profile; one flattened over white (some alpha) has none
            return band.info.get("icc_profile")

        # bands are read in threads: OpenSlide decodes without the GIL, and each band has its rows
        starts = range(0, h, band_rows)
        threads = min(tissue.work_threads(), len(starts))
        if threads > 1:
            with ThreadPoolExecutor(threads, thread_name_prefix="histo-wsl-read") as pool:
                profiles = set(pool.map(read_band, starts))
        else:
            profiles = {read_band(y0) for y0 in starts}
        if not has_profile:
            return cls(slide, rgb)
        if len(profiles) != 1 or None in profiles:
            return None
        return cls(slide, rgb, profiles.pop())

    def read_level_region(self, level: int, x: int, y: int, size: tuple[int, int]) -> Image.Image:
        """An RGB region as :meth:`Slide.read_level_region` reads it (level 0 from memory)."""
        if level != self.level or self.rgb is None:
            return self.slide.read_level_region(level, x, y, size)
        return self.read_region((int(x), int(y)), level, size)

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> Image.Image:
        """An RGB region as :meth:`Slide.read_region` reads it (level 0 from memory)."""
        if level != self.level or self.rgb is None:
            return self.slide.read_region(location, level, size)
        x, y = int(location[0]), int(location[1])
        w, h = int(size[0]), int(size[1])
        height, width = self.rgb.shape[:2]
        if x >= 0 and y >= 0 and x + w <= width and y + h <= height:
            region = Image.fromarray(self.rgb[y : y + h, x : x + w])
            if self.icc_profile is not None:
                region.info["icc_profile"] = self.icc_profile
            return region
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self.rgb[y0:y1, x0:x1]
        return Image.fromarray(out)

    @contextmanager
    def tile_cache(self, capacity: int) -> Iterator[None]:
        """The slide's tile cache for reads of other levels (see :meth:`Slide.tile_cache`)."""
        with self.slide.tile_cache(capacity):
            yield

    def close(self) -> None:
        """Drop the held pixels (the slide stays open: its owner closes it)."""
        self.rgb = None


#: Thumbnail pixels are resampled in blocks of this side (``read_thumbnail_rows``' ``chunk``):
#: a block's pixels depend on its origin, so the blocks must be the same to give the same thumbnail.
THUMBNAIL_CHUNK = 512


def read_whole_thumbnail(source: Slide | HeldLevel, geometry: ThumbnailGeometry) -> np.ndarray:
    """The whole thumbnail, as ``read_thumbnail_rows(source, geometry, 0, height)`` reads it.

    A resampled thumbnail is assembled from the same :data:`THUMBNAIL_CHUNK`-px blocks, each read
    and resized with :func:`~histo_wsl.slideio.slide.read_patch` as there, but in threads
    (OpenSlide's reads and Pillow's resampling release the GIL): the same pixels, sooner. A
    thumbnail that is a level's own pixels is read as it is.
    """
    h, w = geometry.shape
    ds = geometry.downsample
    blocks = [
        (tx, ty) for ty in range(0, h, THUMBNAIL_CHUNK) for tx in range(0, w, THUMBNAIL_CHUNK)
    ]
    threads = min(tissue.work_threads(), len(blocks))
    direct = not geometry.plan.resize and float(ds).is_integer()
    if direct or threads < 2:
        return read_thumbnail_rows(source, geometry, 0, h, THUMBNAIL_CHUNK)  # type: ignore[arg-type]
    out = np.empty((h, w, 3), dtype=np.uint8)

    def block(origin: tuple[int, int]) -> None:
        tx, ty = origin
        cw, ch = min(THUMBNAIL_CHUNK, w - tx), min(THUMBNAIL_CHUNK, h - ty)
        patch = read_patch(source, geometry.plan, (round(tx * ds), round(ty * ds)), (cw, ch))  # type: ignore[arg-type]
        out[ty : ty + ch, tx : tx + cw] = np.asarray(patch)

    with ThreadPoolExecutor(threads, thread_name_prefix="histo-wsl-thumbnail") as pool:
        list(pool.map(block, blocks))
    return out


def scan_tissue(
    slide: Slide,
    *,
    thumbnail_mpp: float = 8.0,
    geojson: Path | None = None,
    params: tissue.TissueParams | None = None,
    whole_slide: bool = False,
    thumbnail_png: Path | None = None,
    pixels: HeldLevel | None = None,
) -> TissueMap:
    """Find a slide's tissue reading its thumbnail band by band (:func:`find_tissue`'s mask).

    The thumbnail (the one :func:`read_thumbnail` reads) goes through
    :func:`histo_wsl.tissue.detect.detect_tissue_strips` as it is read, and to ``thumbnail_png`` when
    given, through a small tile cache; only the packed mask stays. A GeoJSON is rasterised with
    :func:`histo_wsl.tissue.detect.geojson_to_mask` as in :func:`find_tissue`.

    Args:
        slide: the open slide.
        thumbnail_mpp: resolution of the thumbnail (µm/px; see :func:`thumbnail_geometry`).
        geojson: tissue polygons in level-0 pixels to use instead of detection.
        params: detection parameters (default :class:`~histo_wsl.tissue.detect.TissueParams`).
        whole_slide: count the whole slide as tissue (no detection).
        thumbnail_png: where to stream the thumbnail as a PNG, or None.
        pixels: the slide's level 0 already held in memory, read from instead of the slide (the
            same pixels; :class:`HeldLevel`).

    Returns:
        The packed mask on the thumbnail grid and where it came from.
    """
    geometry = thumbnail_geometry(slide, mpp=thumbnail_mpp)
    h, w = geometry.shape
    level0_mpp = slide.mpp if slide.mpp is not None else ASSUMED_MPP
    tissue_mpp = level0_mpp * geometry.downsample
    png = PngStream(thumbnail_png, w, h, **QC_PNG) if thumbnail_png is not None else None
    source = slide if pixels is None else pixels
    kept: np.ndarray | None = None
    strip_rows = BAND_ROWS

    def read_rows(y0: int, y1: int) -> np.ndarray:
        if kept is not None:
            return kept[y0:y1]
        return read_thumbnail_rows(source, geometry, y0, y1)  # type: ignore[arg-type]

    def on_rows(_y0: int, rgb: np.ndarray) -> None:
        if png is not None:
            png.write_rows(rgb)

    try:
        with source.tile_cache(THUMBNAIL_TILE_CACHE):
            if keeps_thumbnail(geometry):
                kept = read_whole_thumbnail(source, geometry)
                strip_rows = max(BAND_ROWS, h)  # held whole: one strip, no overlapping context
            if whole_slide or geojson is not None:
                if png is not None:
                    for y0 in range(0, h, BAND_ROWS):
                        png.write_rows(read_rows(y0, y0 + BAND_ROWS))
                if whole_slide:
                    mask = PackedMask.from_bool(np.ones((1, w), dtype=bool))
                    mask = PackedMask((h, w), np.repeat(mask.bits, h, axis=0))
                    source = WHOLE_SLIDE
                else:
                    polygons = read_geojson(geojson)
                    mask = PackedMask.from_bool(
                        geojson_to_mask(polygons, (h, w), geometry.downsample)
                    )
                    source = str(geojson)
            else:
                mask = tissue.detect_tissue_strips(
                    read_rows,
                    (h, w),
                    tissue_mpp,
                    params or tissue.TissueParams(),
                    strip_rows=strip_rows,
                    on_rows=on_rows,
                )
                source = "detected"
        if png is not None:
            png.close()
    except BaseException:
        if png is not None:
            png.abort()
        raise
    return TissueMap(geometry, mask, source, tissue_mpp, kept)


def write_tissue_images(
    slide: Slide,
    found: TissueMap,
    *,
    tissue_png: Path | None,
    patches_png: Path | None = None,
    boxes: np.ndarray | None = None,
    contours: Sequence[np.ndarray] | None = None,
    thickness: int = 2,
    thumbnail_png: Path | None = None,
) -> None:
    """Draw the QC images band by band: the thumbnail with the tissue contours (and patches).

    A thumbnail kept by :func:`scan_tissue` is used as it is, in one band; a larger one is read
    again, one band of rows at a time, through a small tile cache; the
    contours (traced on the whole mask) and the patch outlines are drawn on each band with the
    band's offset and a margin of rows, so the images equal drawing on the whole thumbnail.

    Args:
        slide: the open slide.
        found: its tissue (:func:`scan_tissue`).
        tissue_png: where to write the thumbnail with the tissue contours, or None.
        patches_png: where to write that image with the patches outlined too, or None.
        boxes: (N, 4) patch boxes ``x0, y0, x1, y1`` in thumbnail pixels (for ``patches_png``).
        contours: the mask's contours (``cv2.findContours`` with ``RETR_CCOMP``), when already
            traced; else they are traced here.
        thickness: contour line thickness in pixels.
        thumbnail_png: where to write the thumbnail itself, or None (e.g. when
            :func:`scan_tissue` streamed it already).
    """
    paths = (thumbnail_png, tissue_png, patches_png)
    if all(p is None for p in paths):
        return
    h, w = found.geometry.shape
    if contours is None:
        full = found.mask.to_bool()
        contours, _ = cv2.findContours(full.view(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
        del full
    if boxes is None:
        boxes = np.zeros((0, 4), dtype=np.int64)
    # cv2.rectangle corners, as the whole-image drawing truncates them
    rect = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).astype(np.int64)
    margin = thickness + 2
    rows = max(BAND_ROWS, h) if found.rgb is not None else BAND_ROWS
    outs = [PngStream(p, w, h, **QC_PNG) if p is not None else None for p in paths]
    # each image's rows are deflated in a thread of their own (zlib releases the GIL)
    threads = min(tissue.work_threads(), sum(out is not None for out in outs))
    try:
        with (
            slide.tile_cache(THUMBNAIL_TILE_CACHE),
            ThreadPoolExecutor(max(1, threads), thread_name_prefix="histo-wsl-png") as pool,
        ):
            for y0 in range(0, h, rows):
                y1 = min(h, y0 + rows)
                lo, hi = max(0, y0 - margin), min(h, y1 + margin)
                if found.rgb is not None:
                    band = np.array(found.rgb[lo:hi], order="C")  # a copy, drawn on
                else:
                    band = read_thumbnail_rows(slide, found.geometry, lo, hi)
                writes = _draw_band(band, lo, y0, y1, outs, contours, thickness, rect)
                if threads > 1:
                    list(pool.map(lambda job: job[0].write_rows(job[1]), writes))
                else:
                    for out, rgb in writes:
                        out.write_rows(rgb)
        for out in outs:
            if out is not None:
                out.close()
    except BaseException:
        for out in outs:
            if out is not None:
                out.abort()
        raise


def _draw_band(
    band: np.ndarray,
    lo: int,
    y0: int,
    y1: int,
    outs: Sequence[PngStream | None],
    contours: Sequence[np.ndarray],
    thickness: int,
    rect: np.ndarray,
) -> list[tuple[PngStream, np.ndarray]]:
    """Rows ``y0:y1`` of each QC image from thumbnail rows ``lo:`` (``band``, drawn on).

    ``outs``: the thumbnail's, the tissue contours' and the patches' PNG streams (or None).
    Returns each stream with its rows (copies where ``band`` is drawn on afterwards), to write.
    """
    writes: list[tuple[PngStream, np.ndarray]] = []
    if outs[0] is not None:
        writes.append((outs[0], band[y0 - lo : y1 - lo].copy()))
    if contours:
        cv2.drawContours(band, contours, -1, TISSUE_COLOR, thickness, offset=(0, -lo))
    if outs[1] is not None:
        rows = band[y0 - lo : y1 - lo]
        writes.append((outs[1], rows.copy() if outs[2] is not None else rows))
    if outs[2] is not None:
        hi = lo + band.shape[0]
        near = np.flatnonzero((rect[:, 3] >= lo - 1) & (rect[:, 1] <= hi))
        for x0, r0, x1, r1 in rect[near].tolist():
            cv2.rectangle(band, (x0, r0 - lo), (x1, r1 - lo), PATCH_COLOR, 1)
        writes.append((outs[2], band[y0 - lo : y1 - lo]))
    return writes


def keeps_thumbnail(geometry: ThumbnailGeometry) -> bool:
    """Whether :func:`scan_tissue` keeps this thumbnail in memory (:data:`THUMBNAIL_KEEP_BYTES`)."""
    return geometry.height * geometry.width * 3 <= THUMBNAIL_KEEP_BYTES
