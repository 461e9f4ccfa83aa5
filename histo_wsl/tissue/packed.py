"""Masks of 1 bit per pixel and the strip-by-strip operations that keep tissue detection bounded.

:class:`PackedMask` holds a thumbnail-sized mask packed 8 pixels to a byte; :func:`strip_spans` walks a
height in strips; :func:`closing_strips` and :func:`flip_components_strips` are the morphological
closing and the small-object / small-hole flips of tissue detection done one strip at a time, with
connected components merged across strip borders (:func:`_merge_labels`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

__all__ = ["PackedMask", "closing_strips", "flip_components_strips", "strip_spans"]

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


def strip_spans(height: int, rows: int) -> Iterator[tuple[int, int]]:
    """``(y0, y1)`` of consecutive strips of ``rows`` rows covering ``height`` rows."""
    rows = max(1, int(rows))
    for y0 in range(0, height, rows):
        yield y0, min(height, y0 + rows)


def closing_strips(
    read: Callable[[int, int], np.ndarray],
    shape: tuple[int, int],
    diameter_px: int,
    rows: int,
    *,
    threads: int = 1,
) -> PackedMask:
    """Binary closing with a disc, strip by strip; outside the image counts as background.

    ``read(y0, y1)`` gives the input's bool rows. Each strip is closed with ``diameter`` rows of
    context above and below (zeros past the image's edges), which is all that a closing (a
    dilation, then an erosion, each reaching ``diameter // 2`` px) looks at, so the result equals
    the closing of the whole mask padded with zeros. With ``threads`` > 1 the strips are closed
    in that many threads (OpenCV releases the GIL; ``read`` must then be safe to call from them):
    each strip writes its own rows, so the result is the same.
    """
    h, w = shape
    out = PackedMask(shape)
    # An even-sized disc has no centre pixel, and OpenCV's closing with it shifts the mask by one
    # pixel down and right; an odd diameter keeps the disc symmetric about its anchor.
    d = int(diameter_px) | 1
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (d, d))

    def close_strip(span: tuple[int, int]) -> None:
        y0, y1 = span
        lo, hi = max(0, y0 - d), min(h, y1 + d)
        band = np.ascontiguousarray(read(lo, hi), dtype=bool).view(np.uint8)
        padded = cv2.copyMakeBorder(
            band, d - (y0 - lo), d - (hi - y1), d, d, cv2.BORDER_CONSTANT, value=0
        )
        closed = cv2.morphologyEx(padded, cv2.MORPH_CLOSE, kernel)
        out.set_rows(y0, closed[d : d + (y1 - y0), d : d + w].view(bool))

    spans = list(strip_spans(h, rows))
    threads = min(int(threads), len(spans))
    if threads > 1:
        with ThreadPoolExecutor(threads, thread_name_prefix="histo-wsl-closing") as pool:
            list(pool.map(close_strip, spans))
    else:
        for span in spans:
            close_strip(span)
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


def flip_components_strips(  # noqa: PLR0915 (one two-pass labelling over strips)
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
    strips = list(strip_spans(h, rows))
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
