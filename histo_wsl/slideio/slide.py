"""One reader interface for whole-slide images and plain images.

:func:`open_slide` returns a :class:`Slide`: OpenSlide for the WSI formats it knows (SVS, NDPI, MRXS,
SCN, Philips and generic tiled TIFF, DICOM, ...), Pillow for plain images (PNG, JPEG, BMP, TIFF strips)
as single-level slides. Coordinates are level-0 pixels (:meth:`Slide.read_level_region`: a level's
own); resolutions are µm per pixel (mpp). The tiles of SVS and generic TIFF are decoded by
:mod:`histo_wsl.slideio.tiff_tiles`, checked equal to OpenSlide's, wherever it can.

Reading at a target resolution goes through a :class:`ReadPlan` (:func:`plan_read`): the nearest level
at or finer than the target is read and resized with a proper filter, so every caller gets the same
geometry for the same request.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from histo_wsl.errors import InputError
from histo_wsl.runtime.inputs import IMAGE_SUFFIXES
from histo_wsl.slideio.tiff_tiles import (
    TIFF_VENDORS,
    TILE_READER_ENV,
    TiffTiles,
    tile_reader_enabled,
)

__all__ = [
    "MAX_PLAUSIBLE_MPP",
    "MAX_PLAIN_IMAGE_PIXELS",
    "LEVEL_TOLERANCE",
    "DEFAULT_TILE_CACHE",
    "THUMBNAIL_TILE_CACHE",
    "Slide",
    "open_slide",
    "ReadPlan",
    "plan_read",
    "RESAMPLE",
    "read_patch",
    "ThumbnailGeometry",
    "thumbnail_geometry",
    "read_thumbnail_rows",
    "read_thumbnail",
]

#: A level-0 resolution coarser than this (µm/px) is a placeholder (e.g. a 72-dpi default), not a scan.
MAX_PLAUSIBLE_MPP = 50.0
#: Plain images larger than this many pixels are refused (they would be held in memory whole).
MAX_PLAIN_IMAGE_PIXELS = 400_000_000
#: Relative difference under which a level is taken as exactly the requested resolution.
LEVEL_TOLERANCE = 0.01
#: OpenSlide's per-slide tile cache (bytes) when a slide is opened.
DEFAULT_TILE_CACHE = 32 * 1024 * 1024
#: Tile cache (bytes) while a thumbnail is read row band by row band: enough for the tiles of one
#: band's boundary row (each tile is read once otherwise), where the default cache would keep up
#: to 32 MB of decoded tiles of the thumbnail's level, more on larger slides.
THUMBNAIL_TILE_CACHE = 4 * 1024 * 1024

_MPP_HINT = "give it with --slide-mpp (or a slide_mpp column in the input CSV)"


@dataclass
class Slide:
    """An open slide or image: geometry, resolution, metadata and a region reader.

    Use :func:`open_slide` to make one, and :meth:`close` (or a ``with`` block) when done.

    Attributes:
        path: the file.
        name: the slide's name in outputs (the file name without its suffix).
        vendor: OpenSlide's format name (``aperio``, ``hamamatsu``, ``generic-tiff``, ...) or ``image``.
        level_dimensions: (width, height) of each level, level 0 first.
        level_downsamples: downsample of each level relative to level 0.
        mpp: level-0 µm per pixel, or None when unknown.
        mpp_source: where ``mpp`` came from: ``metadata``, ``override`` or ``none``.
        objective_power: scanner objective magnification, when the file says.
        associated_images: names and (width, height) of label, macro and thumbnail images.
        properties: the raw metadata key/values.
        notes: remarks about the metadata (e.g. an implausible mpp that was ignored).
    """

    path: Path
    name: str
    vendor: str
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float | None
    mpp_source: str
    objective_power: float | None = None
    associated_images: dict[str, tuple[int, int]] = field(default_factory=dict)
    properties: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    _osr: object | None = field(default=None, repr=False)
    _image: Image.Image | None = field(default=None, repr=False)
    _tiles: TiffTiles | None = field(default=None, repr=False)
    _tiles_state: str = field(default="unopened", repr=False)
    _tiles_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height) in pixels."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        """Number of pyramid levels (1 for plain images)."""
        return len(self.level_dimensions)

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> Image.Image:
        """Read an RGB region.

        Args:
            location: top-left (x, y) in level-0 pixels.
            level: pyramid level to read from.
            size: (width, height) in pixels of that level.

        Returns:
            An RGB Pillow image of ``size``; areas outside the slide or not scanned are white.

        Raises:
            InputError: the file's pixels cannot be decoded (corrupt or truncated file).
        """
        if self._image is not None:
            return _crop_plain(self._image, location, size)
        tiles = self._tile_reader()
        if tiles is not None and 0 <= level < self.level_count:
            served = tiles.region(level, location, size, self._read_level_pixels)
            if served is not None:
                return _served_image(served)
        return self._read_openslide(location, level, size)

    def read_level_region(self, level: int, x: int, y: int, size: tuple[int, int]) -> Image.Image:
        """Read an RGB region at whole pixels ``(x, y)`` of ``level``'s own grid.

        :meth:`read_region` takes a level-0 location, which is a whole pixel of a level only
        when the level's downsample divides it; on a level with an uneven downsample (every
        level above 0 of a scanner's pyramid) OpenSlide paints the nearest one shifted by a
        fraction of a pixel. Here the direct tile reader serves the level's own pixels; a slide
        it does not serve is read by OpenSlide at the nearest level-0 location, as before.
        """
        if self._image is not None or level == 0:
            return self.read_region((int(x), int(y)), level, size)
        tiles = self._tile_reader()
        if tiles is not None and 0 < level < self.level_count:
            served = tiles.level_region(level, int(x), int(y), size, self._read_level_pixels)
            if served is not None:
                return _served_image(served)
        ds = self.level_downsamples[level]
        return self._read_openslide((round(x * ds), round(y * ds)), level, size)

    def reader_record(self) -> dict:
        """Who decodes the slide's pixels (JSON-ready, for outputs' records).

        ``{"tiles": [levels], "openslide": {level: why}, "reads": {level: {"tiles": n,
        "openslide": n}}}``: the levels the direct TIFF tile reader
        (:mod:`histo_wsl.slideio.tiff_tiles`) checked equal to OpenSlide on their first read, the
        levels it left to OpenSlide after that check, and each level's reads served by it or
        handed to OpenSlide (e.g. locations between two pixels of a level whose downsample is not
        a whole number); every other level is OpenSlide's. ``{"tiles": [], "openslide": "why"}``
        when the tile reader is not used for this slide at all; plain images: ``{"image": true}``.
        """
        if self.vendor == "image":
            return {"image": True}
        if self._tiles is None:
            why = {
                "unopened": "no pixels read yet",
                "off": f"{TILE_READER_ENV}=openslide",
                "vendor": f"{self.vendor} is not a plain tiled TIFF pyramid",
                "closed": "the slide is closed",
            }.get(self._tiles_state, "no level is a tiled 8-bit RGB page tifffile reads")
            return {"tiles": [], "openslide": why}
        return self._tiles.record()

    def _tile_reader(self) -> TiffTiles | None:
        """The direct tile reader, opened on the first read (None: OpenSlide reads everything)."""
        if self._tiles_state == "unopened":
            with self._tiles_lock:
                if self._tiles_state == "unopened":
                    if not tile_reader_enabled():
                        self._tiles_state = "off"
                    elif self.vendor not in TIFF_VENDORS or self._osr is None:
                        self._tiles_state = "vendor"
                    else:
                        self._tiles = TiffTiles.open(
                            self.path,
                            self.level_dimensions,
                            self.level_downsamples,
                            DEFAULT_TILE_CACHE,
                        )
                        self._tiles_state = "open" if self._tiles is not None else "none"
        return self._tiles

    def _read_level_pixels(self, level: int, x: int, y: int, w: int, h: int) -> Image.Image:
        """OpenSlide's region at whole pixels (x, y) of ``level`` (the tile reader's check)."""
        ds = self.level_downsamples[level]
        return self._read_openslide((round(x * ds), round(y * ds)), level, (w, h))

    def _read_openslide(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> Image.Image:
        """:meth:`read_region` through OpenSlide."""
        try:
            region = self._osr.read_region(location, level, size)  # type: ignore[union-attr]
        except Exception as exc:  # OpenSlideError and decoder errors
            raise InputError(
                f"reading pixels failed at level {level}, x={location[0]}, y={location[1]} ({exc}); "
                "the file is corrupt or truncated: re-export or re-scan the slide",
                self.path,
            ) from exc
        return _flatten_rgba(region)

    def close(self) -> None:
        """Release the file handle."""
        if self._tiles is not None:
            self._tiles.close()
            self._tiles = None
        self._tiles_state = "closed"
        if self._osr is not None:
            self._osr.close()  # type: ignore[attr-defined]
            self._osr = None
        if self._image is not None:
            self._image.close()
            self._image = None

    @contextmanager
    def tile_cache(self, capacity: int) -> Iterator[None]:
        """Use an OpenSlide tile cache of ``capacity`` bytes inside the block, then a default one.

        Plain images have no tile cache; the block then does nothing.
        """
        osr = self._osr
        if osr is None or not hasattr(osr, "set_cache"):
            yield
            return
        import openslide

        osr.set_cache(openslide.OpenSlideCache(int(capacity)))  # type: ignore[attr-defined]
        tiles = self._tile_reader()
        if tiles is not None:
            tiles.set_capacity(capacity)
        try:
            yield
        finally:
            if tiles is not None and self._tiles is tiles:
                tiles.set_capacity(DEFAULT_TILE_CACHE)
            try:
                if self._osr is not None:
                    self._osr.set_cache(openslide.OpenSlideCache(DEFAULT_TILE_CACHE))  # type: ignore[attr-defined]
            except openslide.OpenSlideError:
                pass  # a slide in OpenSlide's error state (a read failed): that error is raised

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_pixels(self, side: int = 256) -> dict:
        """Decode one small tile at the centre of level 0 and one of the smallest level.

        A slide whose header reads fine can still hold undecodable pixel data (an interrupted
        copy, a damaged disk); this reads a little of it. One tile is no proof for the whole file.

        Returns:
            ``{"status": "ok", "read": [{level, x, y, width, height, mean_rgb}, ...],
            "decoded_by": ...}`` (:meth:`reader_record`: the levels decoded from their tiles).

        Raises:
            InputError: a tile cannot be decoded (corrupt or truncated pixel data).
        """
        read = []
        for level in sorted({0, self.level_count - 1}):
            w, h = self.level_dimensions[level]
            tw, th = min(side, w), min(side, h)
            ds = self.level_downsamples[level]
            x0 = int(round((w - tw) / 2 * ds))
            y0 = int(round((h - th) / 2 * ds))
            region = np.asarray(self.read_region((x0, y0), level, (tw, th)))
            read.append(
                {
                    "level": level,
                    "x": x0,
                    "y": y0,
                    "width": tw,
                    "height": th,
                    "mean_rgb": [round(float(v), 1) for v in region.reshape(-1, 3).mean(axis=0)],
                }
            )
        return {"status": "ok", "read": read, "decoded_by": self.reader_record()}

    def info(self) -> dict:
        """A JSON-ready description: format, sizes, levels, resolution, associated images."""
        return {
            "path": str(self.path),
            "name": self.name,
            "vendor": self.vendor,
            "width": self.dimensions[0],
            "height": self.dimensions[1],
            "levels": [
                {
                    "level": i,
                    "width": w,
                    "height": h,
                    "downsample": round(d, 6),
                    "mpp": None if self.mpp is None else round(self.mpp * d, 6),
                }
                for i, ((w, h), d) in enumerate(
                    zip(self.level_dimensions, self.level_downsamples, strict=True)
                )
            ],
            "mpp": self.mpp,
            "mpp_source": self.mpp_source,
            "objective_power": self.objective_power,
            "associated_images": {k: list(v) for k, v in self.associated_images.items()},
            "file_size_bytes": self.path.stat().st_size if self.path.exists() else None,
            "notes": list(self.notes),
        }


def _served_image(served: tuple[np.ndarray, bytes | None]) -> Image.Image:
    """A Pillow image of the tile reader's pixels, with the ICC profile OpenSlide would attach."""
    region = Image.fromarray(served[0])
    if served[1] is not None:
        region.info["icc_profile"] = served[1]
    return region


def _flatten_rgba(region: Image.Image) -> Image.Image:
    """Composite a straight-alpha RGBA region over white and return RGB."""
    if region.mode != "RGBA":
        return region.convert("RGB")
    if region.getchannel("A").getextrema() == (255, 255):
        return region.convert("RGB")
    white = Image.new("RGBA", region.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, region).convert("RGB")


def _crop_plain(
    image: Image.Image, location: tuple[int, int], size: tuple[int, int]
) -> Image.Image:
    """Crop a plain image, padding with white outside it."""
    x, y = location
    w, h = size
    if x >= 0 and y >= 0 and x + w <= image.width and y + h <= image.height:
        return image.crop((x, y, x + w, y + h))
    out = Image.new("RGB", (w, h), (255, 255, 255))
    box = (max(x, 0), max(y, 0), min(x + w, image.width), min(y + h, image.height))
    if box[2] > box[0] and box[3] > box[1]:
        out.paste(image.crop(box), (box[0] - x, box[1] - y))
    return out


def _plausible_mpp(value: float | None, what: str, notes: list[str]) -> float | None:
    if value is None or not math.isfinite(value) or value <= 0:
        return None
    if value > MAX_PLAUSIBLE_MPP:
        notes.append(
            f"{what} gives {value:.4g} µm/px, which is no scan resolution (a placeholder such as "
            "72 dpi); it is ignored"
        )
        return None
    return value


def _float_or_none(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def _starts_like_a_slide(path: Path) -> bool:
    """Whether the file begins as the formats most slides are (TIFF, BigTIFF, DICOM)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    tiff = head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
    return tiff or head[128:132] == b"DICM"


def _complete_tiff_kind(path: Path) -> str | None:
    """What a TIFF that OpenSlide does not recognise holds, when it is whole.

    Read with tifffile (its tags only): e.g. "a QPTIFF (Akoya/PerkinElmer multiplex image) of 3
    channels, 16-bit". None when tifffile cannot parse it either, or when its pixel data runs past
    the end of the file (a truncated copy).
    """
    import logging

    import tifffile

    class _Complaints(logging.Handler):  # tifffile logs (does not raise) a broken IFD chain
        def __init__(self) -> None:
            super().__init__(logging.WARNING)
            self.seen = 0

        def emit(self, record: logging.LogRecord) -> None:
            self.seen += 1

    complaints = _Complaints()
    log = logging.getLogger("tifffile")
    log.addHandler(complaints)
    try:
        size = path.stat().st_size
        with tifffile.TiffFile(path) as tif:
            tif.pages.useframes = False
            pages = list(tif.pages)
            if complaints.seen:
                return None
            for page in pages:
                spans = zip(page.dataoffsets, page.databytecounts, strict=False)
                if any(o + n > size for o, n in spans):
                    return None
            series = tif.series[0]
            page = tif.pages[0]
            if tif.is_qpi:
                kind = "a QPTIFF (Akoya/PerkinElmer multiplex image)"
            elif tif.is_ome:
                kind = "an OME-TIFF"
            else:
                kind = "a TIFF"
            axes = series.axes
            channels = series.shape[axes.index("C")] if "C" in axes else None
            if channels is None and "S" in axes:
                channels = series.shape[axes.index("S")]
            if channels is None and len(tif.pages) > 1 and axes[:1] in ("I", "Q"):
                channels = series.shape[0]
            depth = f"{np.dtype(page.dtype).itemsize * 8}-bit" if page.dtype is not None else ""
            what = f"{channels} channel(s)" if channels else f"axes {axes}"
            return f"{kind} of {what}, {depth}, {series.shape[-1]}x{series.shape[-2]} px".replace(
                ", ,", ","
            )
    except Exception:  # noqa: BLE001 - tifffile cannot parse it: truncated or foreign
        return None
    finally:
        log.removeHandler(complaints)


def open_slide(path: str | Path, mpp: float | None = None) -> Slide:
    """Open a whole-slide image or a plain image.

    Args:
        path: the file (for DICOM, any file of the series; for MRXS, the ``.mrxs`` file).
        mpp: level-0 µm/px that overrides the file's metadata (``--slide-mpp``).

    Returns:
        The open :class:`Slide`.

    Raises:
        InputError: the file is missing, is not a slide or image, or cannot be opened.
    """
    import openslide
    from openslide import lowlevel

    path = Path(path)
    if not path.exists():
        raise InputError("no such file; check the path", path)
    if path.is_dir():
        raise InputError("is a folder, not a slide; give the slide file inside it", path)
    if mpp is not None and not (0 < mpp <= MAX_PLAUSIBLE_MPP):
        raise InputError(
            f"--slide-mpp {mpp} is not a scan resolution; give µm/px, e.g. 0.25 or 0.5", path
        )

    try:
        vendor = openslide.OpenSlide.detect_format(str(path))
    except Exception:  # detect_format itself can raise on unreadable files
        vendor = None
    if vendor is None:
        return _open_unrecognised(path, mpp)
    try:
        osr = openslide.OpenSlide(str(path))
    except Exception as exc:
        if path.suffix.lower() in (".tif", ".tiff"):
            try:
                return _open_plain(path, mpp)
            except InputError:
                pass
        raise _cannot_open(path, vendor, exc) from exc
    props = dict(osr.properties)
    notes: list[str] = []
    slide_mpp, source = _slide_resolution(props, mpp, notes)
    try:
        dims = tuple(tuple(int(v) for v in d) for d in osr.level_dimensions)
        downsamples = tuple(float(d) for d in osr.level_downsamples)
        # Sizes only: decoding a broken label image would poison the OpenSlide handle.
        associated = {
            key: tuple(int(v) for v in lowlevel.get_associated_image_dimensions(osr._osr, key))
            for key in lowlevel.get_associated_image_names(osr._osr)
        }
    except Exception as exc:
        osr.close()
        raise InputError(
            f"OpenSlide opened this {vendor} file but cannot read its structure ({exc}); the file "
            "is corrupt: re-export or re-scan the slide",
            path,
        ) from exc
    return Slide(
        path=path,
        name=path.stem,
        vendor=vendor,
        level_dimensions=dims,
        level_downsamples=downsamples,
        mpp=slide_mpp,
        mpp_source=source,
        objective_power=_float_or_none(props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)),
        associated_images=associated,
        properties=props,
        notes=notes,
        _osr=osr,
    )


def _open_unrecognised(path: Path, mpp: float | None) -> Slide:
    """A file OpenSlide does not recognise: a plain image, or a one-line error saying what it is."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return _open_plain(path, mpp)
    if _starts_like_a_slide(path):
        kind = _complete_tiff_kind(path)
        if kind is not None:
            raise InputError(
                f"is {kind}, which histo-wsl does not read: it works on brightfield RGB "
                "slides (H&E, IHC); export the brightfield image as an RGB pyramidal TIFF "
                "(e.g. vips tiffsave in out.tif --tile --pyramid --compression jpeg)",
                path,
            )
        raise InputError(
            f"looks truncated or corrupt: it begins like a TIFF- or DICOM-based slide but "
            f"OpenSlide cannot read its structure ({path.stat().st_size:,} bytes; often an "
            "interrupted copy); copy it again from the scanner or archive",
            path,
        )
    raise InputError(
        "not a slide or image histo-wsl can read (OpenSlide does not recognise it and it is not "
        "a PNG/JPEG/BMP/TIFF image); check the file, or convert it to a pyramidal TIFF",
        path,
    )


def _cannot_open(path: Path, vendor: str, exc: Exception) -> InputError:
    """The error for a file OpenSlide recognises but cannot open."""
    if vendor == "dicom":
        return InputError(
            f"OpenSlide cannot open this DICOM file ({exc}): it is not a complete DICOM "
            "whole-slide image (VL Whole Slide Microscopy) as OpenSlide needs one; export the "
            "series again from the archive, with every instance of the series in one folder",
            path,
        )
    return InputError(
        f"OpenSlide cannot open this {vendor} file ({exc}); the file is corrupt or uses an "
        "unsupported encoding: re-export it (e.g. as a JPEG-compressed pyramidal TIFF)",
        path,
    )


def _slide_resolution(props: dict, mpp: float | None, notes: list[str]) -> tuple[float | None, str]:
    """Level-0 µm/px and where it comes from: the override, the metadata, or none."""
    import openslide

    mx = _float_or_none(props.get(openslide.PROPERTY_NAME_MPP_X))
    my = _float_or_none(props.get(openslide.PROPERTY_NAME_MPP_Y))
    if mx is not None and my is not None and abs(mx - my) > 0.01 * max(mx, my):
        notes.append(f"pixels are not square (mpp-x {mx}, mpp-y {my}); mpp-x is used")
    meta_mpp = _plausible_mpp(mx if mx is not None else my, "the file's metadata", notes)
    if mpp is not None:
        return mpp, "override"
    if meta_mpp is not None:
        return meta_mpp, "metadata"
    return None, "none"


def _to_rgb8(image: Image.Image) -> tuple[Image.Image, str | None]:
    """8-bit RGB of a plain image, and a note when its bit depth was scaled.

    Pillow's own conversion clips 16-bit and 32-bit greyscale values above 255, so a 16-bit scan
    would come out all white. Integer images are scaled by the smallest bit depth (8 to 16 bits) that
    holds their maximum, so 12-bit data stored in 16 bits keeps its contrast; float images in [0, 1]
    by 255, others clipped to [0, 255].
    """
    if image.mode == "RGB":
        return image, None
    if not (image.mode.startswith("I") or image.mode == "F"):
        return image.convert("RGB"), None
    arr = np.asarray(image)
    top = float(arr.max()) if arr.size else 0.0
    if image.mode == "F":
        scale, how = (255.0, "float [0, 1] x 255") if top <= 1.0 else (1.0, "float clipped")
    else:
        bits = min(16, max(8, int(np.ceil(np.log2(top + 1))))) if top > 0 else 8
        scale, how = 255.0 / (2**bits - 1), f"{bits}-bit range"
    grey = np.clip(np.rint(arr.astype(np.float64) * scale), 0, 255).astype(np.uint8)
    note = f"{image.mode} greyscale image scaled to 8-bit RGB ({how}; maximum {top:g})"
    return Image.fromarray(np.stack([grey] * 3, axis=-1)), note


def _open_plain(path: Path, mpp: float | None) -> Slide:
    """Open a plain image as a one-level slide, held in memory."""
    try:
        image = Image.open(path)
        size = image.size
        if size[0] * size[1] > MAX_PLAIN_IMAGE_PIXELS:
            raise InputError(
                f"plain image of {size[0]}x{size[1]} px is too large to read whole; convert it to a "
                "tiled pyramidal TIFF (e.g. vips tiffsave --tile --pyramid) and use that",
                path,
            )
        info_dpi = image.info.get("dpi")
        image.load()
        rgb, depth_note = _to_rgb8(image)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(
            f"cannot be read as an image ({exc}); the file is corrupt or truncated: re-export it",
            path,
        ) from exc
    notes: list[str] = [depth_note] if depth_note else []
    meta_mpp = None
    if info_dpi:
        try:
            meta_mpp = _plausible_mpp(25400.0 / float(info_dpi[0]), "the image's dpi tag", notes)
        except (TypeError, ValueError, ZeroDivisionError):
            meta_mpp = None
    if mpp is not None:
        slide_mpp, source = mpp, "override"
    elif meta_mpp is not None:
        slide_mpp, source = meta_mpp, "metadata"
    else:
        slide_mpp, source = None, "none"
    return Slide(
        path=path,
        name=path.stem,
        vendor="image",
        level_dimensions=(tuple(rgb.size),),
        level_downsamples=(1.0,),
        mpp=slide_mpp,
        mpp_source=source,
        notes=notes,
        _image=rgb,
    )


@dataclass(frozen=True)
class ReadPlan:
    """How to read a slide at one output resolution.

    Attributes:
        level: pyramid level read.
        level_downsample: that level's downsample from level 0.
        scale: level-0 pixels per output pixel.
        mpp: output µm/px (None when the slide's mpp is unknown).
        requested_mpp: the resolution asked for, if it was asked in mpp.
    """

    level: int
    level_downsample: float
    scale: float
    mpp: float | None
    requested_mpp: float | None = None

    @property
    def resize(self) -> bool:
        """Whether pixels read from the level must be resized to the output resolution."""
        return self.scale != self.level_downsample

    def as_dict(self) -> dict:
        """JSON-ready record of the plan (written into run.json and manifests)."""
        return {
            "level": self.level,
            "level_downsample": self.level_downsample,
            "downsample": self.scale,
            "mpp": self.mpp,
            "requested_mpp": self.requested_mpp,
        }


def plan_read(slide: Slide, *, mpp: float | None = None, level: int | None = None) -> ReadPlan:
    """Choose the level and resize factor for reading at ``mpp`` µm/px or at pyramid ``level``.

    The level read is the coarsest one at or finer than the target; a level within 1 % of the
    target is used as it is (its exact resolution is recorded).

    Raises:
        InputError: mpp asked on a slide without mpp, or a level the slide does not have.
    """
    if level is not None:
        if not 0 <= level < slide.level_count:
            raise InputError(
                f"has {slide.level_count} level(s) (0-{slide.level_count - 1}); --level {level} does "
                "not exist: pick one of those or use --mpp",
                slide.path,
            )
        d = slide.level_downsamples[level]
        return ReadPlan(level, d, d, None if slide.mpp is None else slide.mpp * d)
    if mpp is None:
        raise ValueError("plan_read needs mpp or level")
    if mpp <= 0:
        raise InputError(f"--mpp must be positive, got {mpp}", slide.path)
    if slide.mpp is None:
        raise InputError(
            f"has no resolution (mpp) in its metadata, so --mpp {mpp} cannot be honoured; "
            f"{_MPP_HINT}, or read by --level",
            slide.path,
        )
    scale = mpp / slide.mpp
    best = 0
    for i, d in enumerate(slide.level_downsamples):
        if d <= scale * (1 + LEVEL_TOLERANCE):
            best = i
    d = slide.level_downsamples[best]
    if abs(scale / d - 1.0) <= LEVEL_TOLERANCE:
        scale = d
    return ReadPlan(best, d, scale, slide.mpp * scale, requested_mpp=mpp)


#: How :func:`read_patch` resamples a level to the output resolution: PIL's antialiased bilinear
#: filter, the one training resizes its images with (``histo_wsl.data.images``), so a slide's
#: windows are filtered as the network's training images were. Against the former Lanczos filter
#: it scored 78.1 instead of 76.8 slide PxAP on the GlaS validation slide (shipped NEGEV model;
#: Max-Min 77.1 and 77.2) and resamples a 705-px window to 224 px in 2.9 instead of 7.1 ms.
RESAMPLE = Image.Resampling.BILINEAR


def read_patch(
    slide: Slide, plan: ReadPlan, location: tuple[int, int], size: tuple[int, int]
) -> Image.Image:
    """Read an RGB patch of ``size`` output pixels whose top-left is ``location`` (level 0).

    The patch covers ``size * plan.scale`` level-0 pixels; it is read from ``plan.level`` and
    resized when the level's resolution is not the output resolution, with :data:`RESAMPLE`.

    The level is read from a whole pixel of its own: a ``location`` that falls between two of its
    pixels (an odd x on a level downsampled 2×) is not handed to OpenSlide, which would shift
    every tile by the fraction through its bilinear slow path (about 3× the time of a whole-pixel read:
    13-17 against 5 ms for a 352-px region on a JPEG-tiled TIFF) before this function resamples the
    result again. The fraction goes into the one resampling instead (``Image.resize``'s ``box``),
    which also uses the plan's exact scale rather than a region size rounded to whole pixels.
    The whole pixels are asked in the level's own grid (:meth:`Slide.read_level_region`), which
    a level-0 location cannot name on a level with an uneven downsample.
    """
    w, h = size
    ds = plan.level_downsample
    x, y = location[0] / ds, location[1] / ds  # in the level's pixels
    if not plan.resize and x.is_integer() and y.is_integer():
        return slide.read_region(location, plan.level, (w, h))
    factor = plan.scale / ds
    ix, iy = math.floor(x), math.floor(y)
    fx, fy = x - ix, y - iy
    bw, bh = w * factor, h * factor
    rw, rh = max(1, math.ceil(fx + bw)), max(1, math.ceil(fy + bh))
    region = slide.read_level_region(plan.level, ix, iy, (rw, rh))
    return region.resize((w, h), RESAMPLE, box=(fx, fy, fx + bw, fy + bh))


@dataclass(frozen=True)
class ThumbnailGeometry:
    """Where a slide's thumbnail comes from: its size, downsample and the read plan behind it.

    Attributes:
        width: thumbnail width in pixels.
        height: thumbnail height in pixels.
        downsample: level-0 pixels per thumbnail pixel.
        plan: how its pixels are read (level, resize).
    """

    width: int
    height: int
    downsample: float
    plan: ReadPlan

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width)."""
        return (self.height, self.width)


def thumbnail_geometry(
    slide: Slide, *, mpp: float = 8.0, min_size: int = 1024, max_size: int = 4096
) -> ThumbnailGeometry:
    """The thumbnail :func:`read_thumbnail` reads, without reading it.

    The thumbnail is at ``mpp`` µm/px when the slide's mpp is known, made finer if its long side
    would be under ``min_size`` px (never finer than level 0) and coarser if it would exceed
    ``max_size``; without mpp its long side is ``min_size`` px.
    """
    w0, h0 = slide.dimensions
    long_side = max(w0, h0)
    downsample = long_side / min_size
    if slide.mpp is not None:
        downsample = min(downsample, mpp / slide.mpp)
    downsample = max(1.0, downsample, long_side / max_size)
    plan = _plan_for_downsample(slide, downsample)
    downsample = plan.scale
    tw, th = max(1, math.ceil(w0 / downsample)), max(1, math.ceil(h0 / downsample))
    return ThumbnailGeometry(tw, th, downsample, plan)


def read_thumbnail_rows(
    slide: Slide, geometry: ThumbnailGeometry, y0: int, y1: int, chunk: int = 512
) -> np.ndarray:
    """Rows ``y0:y1`` of the thumbnail (clipped to it) as (n, W, 3) uint8.

    The pixels are exactly those of :func:`read_thumbnail` (same ``chunk``): when the thumbnail is
    resampled from its level, the ``chunk`` × ``chunk`` blocks it is assembled from are read one at
    a time and cropped (resampling depends on the block's origin); when it is a level's own pixels
    at an integer downsample, the rows are read directly.
    """
    y0, y1 = max(0, int(y0)), min(geometry.height, int(y1))
    out = np.empty((max(0, y1 - y0), geometry.width, 3), dtype=np.uint8)
    ds = geometry.downsample
    direct = not geometry.plan.resize and float(ds).is_integer()
    starts = [y0] if direct else range(y0 - y0 % chunk, y1, chunk)
    for ty in starts:
        ch = y1 - ty if direct else min(chunk, geometry.height - ty)
        lo, hi = max(ty, y0), min(ty + ch, y1)
        if hi <= lo:
            continue
        for tx in range(0, geometry.width, chunk):
            cw = min(chunk, geometry.width - tx)
            patch = np.asarray(
                read_patch(slide, geometry.plan, (round(tx * ds), round(ty * ds)), (cw, ch))
            )
            out[lo - y0 : hi - y0, tx : tx + cw] = patch[lo - ty : hi - ty]
    return out


def read_thumbnail(
    slide: Slide, *, mpp: float = 8.0, min_size: int = 1024, max_size: int = 4096, chunk: int = 512
) -> tuple[np.ndarray, float]:
    """Read a low-resolution RGB thumbnail with bounded memory.

    The thumbnail is at ``mpp`` µm/px when the slide's mpp is known, made finer if its long side
    would be under ``min_size`` px (never finer than level 0) and coarser if it would exceed
    ``max_size``; without mpp its long side is ``min_size`` px (:func:`thumbnail_geometry`). It is
    assembled from chunks read at the best level, so a slide without a pyramid is never loaded
    whole, through a small tile cache (:data:`THUMBNAIL_TILE_CACHE`).

    Returns:
        (thumbnail as (H, W, 3) uint8, downsample = level-0 pixels per thumbnail pixel).
    """
    geometry = thumbnail_geometry(slide, mpp=mpp, min_size=min_size, max_size=max_size)
    with slide.tile_cache(THUMBNAIL_TILE_CACHE):
        out = read_thumbnail_rows(slide, geometry, 0, geometry.height, chunk)
    return out, geometry.downsample


def _plan_for_downsample(slide: Slide, downsample: float) -> ReadPlan:
    best = 0
    for i, d in enumerate(slide.level_downsamples):
        if d <= downsample * (1 + LEVEL_TOLERANCE):
            best = i
    d = slide.level_downsamples[best]
    scale = d if abs(downsample / d - 1.0) <= LEVEL_TOLERANCE else downsample
    return ReadPlan(best, d, scale, None if slide.mpp is None else slide.mpp * scale)
