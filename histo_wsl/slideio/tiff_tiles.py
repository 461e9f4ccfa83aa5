"""A TIFF slide's tiles decoded directly (tifffile + imagecodecs), pixel for pixel as OpenSlide.

OpenSlide spends 2-6 ms on a 354-px region of a JPEG-tiled TIFF even when every tile it needs is
in its cache (painting premultiplied ARGB through Cairo, then un-premultiplying it for Python);
decoding a 256-px JPEG tile takes 0.65 ms. For the two formats that are plain tiled TIFF
pyramids, Aperio SVS and generic tiled TIFF, :class:`TiffTiles` reads a level's tiles from the
file itself, decodes them with tifffile's decoder for the page (imagecodecs: libjpeg-turbo for
JPEG) and cuts regions from a byte-bounded cache of decoded tiles.

It stays OpenSlide's reader in every other respect: every level is checked against OpenSlide
on its first read (one tile decoded both ways must be equal to the last byte, or the level is
left to OpenSlide; a level with an uneven downsample at its origin tile and at level 0, see
:meth:`TiffTiles._check`), and any read it cannot serve exactly is handed back (``None``) for
OpenSlide to do: a level-0 location between two of the level's pixels (:meth:`TiffTiles.region`;
:meth:`TiffTiles.level_region` takes the level's own pixels), a tile without data, one that fails
to decode or whose JPEG stream stops short of its end marker (OpenSlide refuses those, and its
error is the one the user sees). ``HISTO_WSL_TILE_READER=openslide`` turns it off.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["TILE_READER_ENV", "TIFF_VENDORS", "TiffTiles", "tile_reader_enabled"]

#: Environment variable that turns the direct tile reader off (``openslide``) for every slide.
TILE_READER_ENV = "HISTO_WSL_TILE_READER"
#: OpenSlide formats whose levels are the tiled pages of one TIFF, with no offsets or overlaps.
TIFF_VENDORS = frozenset({"aperio", "generic-tiff"})

#: A level whose check found this many tiles it could not decode (missing, cut short, foreign) is
#: left to OpenSlide instead of being checked again at every read.
MAX_FAILED_CHECKS = 8

#: A level's location is a whole pixel of it when within this of an integer (OpenSlide paints
#: other locations through Cairo's bilinear path, which this reader does not imitate).
_WHOLE_PIXEL = 1e-6

#: (level, x, y, width, height), x and y in the level's pixels -> that region as OpenSlide paints
#: it: an RGB Pillow image flattened over white, with the ICC profile OpenSlide attaches in ``info``.
OpenSlideRead = Callable[[int, int, int, int, int], "object"]


def tile_reader_enabled() -> bool:
    """Whether the direct tile reader may be used (``HISTO_WSL_TILE_READER`` is not ``openslide``)."""
    return os.environ.get(TILE_READER_ENV, "").strip().lower() not in ("openslide", "0", "off")


@dataclass
class _Level:
    """One pyramid level's tiled TIFF page: its geometry, tile table and decoder."""

    width: int
    height: int
    tile_w: int
    tile_h: int
    offsets: np.ndarray
    counts: np.ndarray
    decode: Callable
    jpegtables: bytes | None
    signature: tuple  # how its tiles are encoded (compression, photometric, subsampling)
    downsample: float = 1.0
    state: str = "unchecked"  # "unchecked", "tiles" or "openslide"
    reason: str = ""
    failed_checks: int = 0
    served: int = 0  # reads this reader served
    handed_back: int = 0  # reads it handed to OpenSlide (between pixels, not decodable here)
    icc_profile: bytes | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def jpeg(self) -> bool:
        return self.signature[0] == "JPEG"

    @property
    def tiles_across(self) -> int:
        return -(-self.width // self.tile_w)

    @property
    def tiles_down(self) -> int:
        return -(-self.height // self.tile_h)


class TiffTiles:
    """Regions of a tiled TIFF slide's levels from its decoded tiles (see the module's docstring).

    Make one with :meth:`open`; it is safe to read from several threads at once.
    """

    def __init__(self, path: Path, levels: dict[int, _Level], capacity: int) -> None:
        self.path = path
        self.levels = levels
        self.capacity = int(capacity)
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()
        self._fh = open(path, "rb")  # noqa: SIM115 - held for the slide's life, closed by close()
        self._fh_lock = threading.Lock()

    @classmethod
    def open(
        cls,
        path: Path,
        level_dimensions: tuple[tuple[int, int], ...],
        level_downsamples: tuple[float, ...],
        capacity: int,
    ) -> TiffTiles | None:
        """The tile reader of a :data:`TIFF_VENDORS` slide, or None when it can serve no level.

        Each OpenSlide level (its size and downsample as OpenSlide gives them) is matched to the
        one tiled, 8-bit, 3-sample, pixel-interleaved page of the file with its exact size;
        levels without such a page stay with OpenSlide.
        """
        try:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                pages = [p for p in tif.pages if getattr(p, "is_tiled", False)]
                levels: dict[int, _Level] = {}
                for i, (w, h) in enumerate(level_dimensions):
                    same = [p for p in pages if tuple(p.shape[:2]) == (h, w)]
                    if len(same) == 1 and _servable(same[0]):
                        levels[i] = _level_of(same[0], float(level_downsamples[i]))
        except Exception:  # noqa: BLE001 - tifffile cannot parse it: OpenSlide reads it alone
            return None
        if not levels:
            return None
        return cls(path, levels, capacity)

    def region(
        self,
        level: int,
        location: tuple[int, int],
        size: tuple[int, int],
        openslide_read: OpenSlideRead,
    ) -> tuple[np.ndarray, bytes | None] | None:
        """The RGB pixels of a region and its ICC profile, or None when OpenSlide must read it.

        Args:
            level: the pyramid level.
            location: top-left (x, y) in level-0 pixels.
            size: (width, height) in the level's pixels.
            openslide_read: reads (level, x, y, width, height in the level's pixels) as
                OpenSlide does, for the level's check on its first read.
        """
        lv = self.levels.get(level)
        if lv is None:
            return None
        fx, fy = location[0] / lv.downsample, location[1] / lv.downsample
        x, y = round(fx), round(fy)
        if abs(fx - x) > _WHOLE_PIXEL or abs(fy - y) > _WHOLE_PIXEL:
            return self._tally(lv, None)
        return self.level_region(level, x, y, size, openslide_read)

    def level_region(
        self, level: int, x: int, y: int, size: tuple[int, int], openslide_read: OpenSlideRead
    ) -> tuple[np.ndarray, bytes | None] | None:
        """As :meth:`region`, at whole pixels ``(x, y)`` of the level's own grid.

        On a level whose downsample is not a whole number (every level above 0 of a scanner's
        pyramid: sizes are rounded) most of its pixels have no level-0 location of their own,
        so only this call reaches them; OpenSlide, given the nearest level-0 location, paints
        the region shifted by a fraction of a pixel through its bilinear path.
        """
        lv = self.levels.get(level)
        if lv is None:
            return None
        served = None
        if lv.state != "openslide":
            w, h = int(size[0]), int(size[1])
            if lv.state == "tiles" or self._check(level, lv, x, y, openslide_read):
                rgb = self._assemble(level, lv, x, y, w, h)
                if rgb is not None:
                    inside = x >= 0 and y >= 0 and x + w <= lv.width and y + h <= lv.height
                    served = rgb, (lv.icc_profile if inside else None)
        return self._tally(lv, served)

    def record(self) -> dict:
        """Levels served, levels refused and why, and the reads of each level either way.

        ``{"tiles": [levels checked equal], "openslide": {level: why}, "reads": {level:
        {"tiles": n, "openslide": n}}}``; ``reads`` counts the reads this reader served and those
        it handed to OpenSlide (a location between two of the level's pixels, a tile it cannot
        decode, or the level refused).
        """
        tiles = sorted(i for i, lv in self.levels.items() if lv.state == "tiles")
        other = {
            str(i): lv.reason for i, lv in sorted(self.levels.items()) if lv.state == "openslide"
        }
        reads = {
            str(i): {"tiles": lv.served, "openslide": lv.handed_back}
            for i, lv in sorted(self.levels.items())
            if lv.served or lv.handed_back
        }
        return {"tiles": tiles, "openslide": other, "reads": reads}

    def set_capacity(self, capacity: int) -> None:
        """Bound the decoded-tile cache to ``capacity`` bytes (dropping the oldest tiles)."""
        with self._lock:
            self.capacity = int(capacity)
            self._evict()

    def close(self) -> None:
        """Release the file handle and the cache."""
        with self._lock:
            self._cache.clear()
            self._cached_bytes = 0
        self._fh.close()

    # -- internals ---------------------------------------------------------------------------

    def _tally(
        self, lv: _Level, served: tuple[np.ndarray, bytes | None] | None
    ) -> tuple[np.ndarray, bytes | None] | None:
        """Count a read of ``lv`` as served or handed to OpenSlide; return ``served``."""
        with self._lock:
            if served is None:
                lv.handed_back += 1
            else:
                lv.served += 1
        return served

    def _check(self, level: int, lv: _Level, x: int, y: int, openslide_read: OpenSlideRead) -> bool:
        """Decode a tile of the level both ways; serve the level if OpenSlide's is the same.

        On a level whose downsample is a whole number, the tile is the first one the read at
        ``(x, y)`` touches. On one with an uneven downsample OpenSlide paints whole pixels only
        at the level's origin: its origin tile is compared, and so is level 0's tile under the
        read (level 0 is always at whole pixels), which must be encoded as this level is; the
        decoder is then tried on the tissue being read, not only on the slide's corner.
        """
        with lv.lock:
            if lv.state != "unchecked":
                return lv.state == "tiles"
            tx = min(max(x, 0) // lv.tile_w, lv.tiles_across - 1)
            ty = min(max(y, 0) // lv.tile_h, lv.tiles_down - 1)
            if not _whole(lv.downsample):
                base = self.levels.get(0)
                if base is None or base.signature != lv.signature:
                    return self._refuse(
                        level, lv, "its downsample is uneven and level 0 is encoded otherwise"
                    )
                x0, y0 = round(x * lv.downsample), round(y * lv.downsample)
                if not self._check(0, base, x0, y0, openslide_read):
                    if base.state == "unchecked":
                        return False  # level 0's tile was not decodable here: check again later
                    return self._refuse(level, lv, "level 0, encoded as it is, differs")
                tx = ty = 0
            ok = self._compare_tile(level, lv, tx, ty, openslide_read)
            if ok is None:
                return False
            if not ok:
                return self._refuse(level, lv, "its decoded tile differs from OpenSlide's")
            lv.state = "tiles"
            return True

    def _compare_tile(
        self, level: int, lv: _Level, tx: int, ty: int, openslide_read: OpenSlideRead
    ) -> bool | None:
        """Whether tile (tx, ty) decodes as OpenSlide paints it (None: not decodable here)."""
        x0, y0 = tx * lv.tile_w, ty * lv.tile_h
        tw, th = min(lv.tile_w, lv.width - x0), min(lv.tile_h, lv.height - y0)
        ours = self._assemble(level, lv, x0, y0, tw, th)
        if ours is None:  # this read goes to OpenSlide; the next one checks again
            lv.failed_checks += 1
            if lv.failed_checks >= MAX_FAILED_CHECKS:
                self._refuse(
                    level, lv, f"{MAX_FAILED_CHECKS} of its tiles could not be decoded here"
                )
            return None
        theirs = openslide_read(level, x0, y0, tw, th)
        ref = np.asarray(theirs)
        if ref.shape != ours.shape or not np.array_equal(ref, ours):
            return False
        lv.icc_profile = getattr(theirs, "info", {}).get("icc_profile")
        return True

    def _refuse(self, level: int, lv: _Level, why: str) -> bool:
        """Leave the level to OpenSlide (its decoded tiles dropped); False."""
        lv.state = "openslide"
        lv.reason = why
        self._drop_level(level)
        return False

    def _assemble(
        self, level: int, lv: _Level, x: int, y: int, w: int, h: int
    ) -> np.ndarray | None:
        """The region from decoded tiles, white outside the level; None if a tile is not servable."""
        x1, y1 = min(x + w, lv.width), min(y + h, lv.height)
        x0, y0 = max(x, 0), max(y, 0)
        if x1 <= x0 or y1 <= y0 or x0 != x or y0 != y or x1 != x + w or y1 != y + h:
            out = np.full((h, w, 3), 255, dtype=np.uint8)
        else:
            out = np.empty((h, w, 3), dtype=np.uint8)
        if x1 <= x0 or y1 <= y0:
            return out
        for ty in range(y0 // lv.tile_h, (y1 - 1) // lv.tile_h + 1):
            for tx in range(x0 // lv.tile_w, (x1 - 1) // lv.tile_w + 1):
                tile = self._tile(level, lv, tx, ty)
                if tile is None:
                    return None
                ox, oy = tx * lv.tile_w, ty * lv.tile_h
                ax0, ay0 = max(x0, ox), max(y0, oy)
                ax1, ay1 = min(x1, ox + lv.tile_w), min(y1, oy + lv.tile_h)
                out[ay0 - y : ay1 - y, ax0 - x : ax1 - x] = tile[
                    ay0 - oy : ay1 - oy, ax0 - ox : ax1 - ox
                ]
        return out

    def _tile(self, level: int, lv: _Level, tx: int, ty: int) -> np.ndarray | None:
        """One decoded tile (from the cache when there), or None when it is not servable."""
        key = (level, ty * lv.tiles_across + tx)
        with self._lock:
            tile = self._cache.get(key)
            if tile is not None:
                self._cache.move_to_end(key)
                return tile
        index = key[1]
        count = int(lv.counts[index])
        if count <= 0:
            return None
        with self._fh_lock:
            self._fh.seek(int(lv.offsets[index]))
            data = self._fh.read(count)
        if len(data) != count or (lv.jpeg and not _ends_jpeg(data)):
            return None
        try:
            segment = lv.decode(data, index, jpegtables=lv.jpegtables)[0]
        except Exception:  # noqa: BLE001 - a tile that does not decode is OpenSlide's to report
            return None
        tile = np.ascontiguousarray(np.asarray(segment).reshape(segment.shape[-3:])[..., :3])
        if tile.dtype != np.uint8 or tile.shape[:2] != (lv.tile_h, lv.tile_w):
            return None
        with self._lock:
            if key not in self._cache:
                self._cache[key] = tile
                self._cached_bytes += tile.nbytes
                self._evict()
        return tile

    def _evict(self) -> None:
        while self._cached_bytes > self.capacity and self._cache:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= old.nbytes

    def _drop_level(self, level: int) -> None:
        with self._lock:
            for key in [k for k in self._cache if k[0] == level]:
                self._cached_bytes -= self._cache.pop(key).nbytes


def _whole(value: float) -> bool:
    """Whether a level-0 coordinate is a whole number (OpenSlide then paints at whole pixels)."""
    return abs(value - round(value)) <= _WHOLE_PIXEL


def _ends_jpeg(data: bytes) -> bool:
    """Whether a JPEG stream reaches its end marker (EOI), trailing zero padding allowed."""
    return data.endswith(b"\xff\xd9") or data.rstrip(b"\x00").endswith(b"\xff\xd9")


def _servable(page: object) -> bool:
    """Whether a tiled page holds 8-bit, 3-sample, pixel-interleaved RGB/YCbCr tiles."""
    photometric = getattr(getattr(page, "photometric", None), "name", "")
    planar = getattr(getattr(page, "planarconfig", None), "name", "")
    return (
        getattr(page, "samplesperpixel", 0) == 3
        and np.dtype(getattr(page, "dtype", None) or "f8") == np.uint8
        and photometric in ("RGB", "YCBCR")
        and planar == "CONTIG"
        and getattr(page, "imagedepth", 1) == 1
        and getattr(page, "tiledepth", 1) == 1
    )


def _level_of(page: object, downsample: float) -> _Level:
    """A :class:`_Level` of a servable tiled page (its tile table read once)."""
    h, w = page.shape[:2]  # type: ignore[attr-defined]
    return _Level(
        width=int(w),
        height=int(h),
        tile_w=int(page.tilewidth),  # type: ignore[attr-defined]
        tile_h=int(page.tilelength),  # type: ignore[attr-defined]
        offsets=np.asarray(page.dataoffsets, dtype=np.int64),  # type: ignore[attr-defined]
        counts=np.asarray(page.databytecounts, dtype=np.int64),  # type: ignore[attr-defined]
        decode=page.decode,  # type: ignore[attr-defined]
        jpegtables=page.jpegtables,  # type: ignore[attr-defined]
        signature=(
            page.compression.name,  # type: ignore[attr-defined]
            page.photometric.name,  # type: ignore[attr-defined]
            tuple(getattr(page, "subsampling", None) or ()),
        ),
        downsample=downsample,
    )
