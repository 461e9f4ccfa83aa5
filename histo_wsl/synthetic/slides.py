"""Deterministic synthetic H&E-like slides with tissue and glands at known places.

One concept, kept in one module: a synthetic slide from its layout through its rendering to its
pyramidal TIFF and truth masks (the three share the layout's geometry and the texture's period).

A :class:`SlideLayout` places elliptical tissue sections on a glass slide and elliptical glands
inside them, all in level-0 pixel coordinates and all derived from a seed (:func:`make_layout`).
:func:`render_region` paints any region of the slide at any downsample: near-white glass, pink
eosin stroma with fibres and purple nuclei, glands with a pale lumen inside a dark purple
epithelial rim, and optionally very pale ("faint") sections that tissue detection must still find.

Rendering is seamless: a pixel's value depends only on its global level-0 position and the
downsample, never on where a tile starts, because the labels come from the ellipses evaluated at
the pixel centre and the texture is a precomputed periodic image (with a mip-map per power-of-two
downsample) sampled at global coordinates modulo its period. That makes it cheap to write very
large pyramids tile by tile (:func:`write_pyramid_tiff`) with bounded memory, and lets tests
compare what a reader returns with what was written.

Coordinates: the pixel ``(i, j)`` of a region with top-left level-0 ``(x, y)`` rendered at
downsample ``d`` has its centre at level-0 ``(x + (j + 0.5) * d, y + (i + 0.5) * d)``; masks and
colours are decided at that point (:func:`pixel_centres`).
"""

from __future__ import annotations

import functools
import math
import os
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile
from PIL import Image

from histo_wsl.errors import InputError

__all__ = [
    "Ellipse",
    "SlideLayout",
    "gland_mask_region",
    "make_layout",
    "pixel_centres",
    "pyramid_level_sizes",
    "render_region",
    "tissue_mask_region",
    "write_image_with_mask",
    "write_pyramid_tiff",
]

# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ellipse:
    """An axis-aligned ellipse in level-0 pixel coordinates.

    Attributes:
        cx: centre x (level-0 px).
        cy: centre y (level-0 px).
        rx: semi-axis along x (level-0 px).
        ry: semi-axis along y (level-0 px).
    """

    cx: float
    cy: float
    rx: float
    ry: float

    def contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Tell which points lie inside the ellipse (boundary included).

        Args:
            x: level-0 x coordinates (any shape broadcastable with ``y``).
            y: level-0 y coordinates.

        Returns:
            Boolean array of the broadcast shape.
        """
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        return ((x - self.cx) / self.rx) ** 2 + ((y - self.cy) / self.ry) ** 2 <= 1.0

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """Bounding box ``(x0, y0, x1, y1)`` in level-0 px."""
        return (self.cx - self.rx, self.cy - self.ry, self.cx + self.rx, self.cy + self.ry)

    def scaled(self, factor: float) -> Ellipse:
        """Return the concentric ellipse with both semi-axes multiplied by ``factor``."""
        return Ellipse(self.cx, self.cy, self.rx * factor, self.ry * factor)


@dataclass(frozen=True)
class SlideLayout:
    """Where the tissue and the glands of a synthetic slide are.

    Attributes:
        width: slide width in level-0 px.
        height: slide height in level-0 px.
        mpp: microns per pixel at level 0.
        sections: tissue sections; the tissue ground truth is their union.
        glands: glands (the ROI ground truth), each fully inside one section.
        faint: per section, True when it is stained very pale (low saturation).
        seed: the seed the layout (and the texture offset) was made from.
    """

    width: int
    height: int
    mpp: float
    sections: tuple[Ellipse, ...]
    glands: tuple[Ellipse, ...]
    faint: tuple[bool, ...]
    seed: int

    def gland_section(self, index: int) -> int:
        """Return the index of the section that holds gland ``index``."""
        return _gland_sections(self)[index]


@functools.lru_cache(maxsize=64)
def _gland_sections(layout: SlideLayout) -> tuple[int, ...]:
    out = []
    for g in layout.glands:
        owner = next((i for i, s in enumerate(layout.sections) if bool(s.contains(g.cx, g.cy))), -1)
        if owner < 0:
            raise InputError(f"gland {g} lies in no section of the layout")
        out.append(owner)
    return tuple(out)


#: Lumen semi-axes as a fraction of the gland's: the rest of the gland is the epithelial rim.
LUMEN_FRACTION = 0.55

# Minimum clearance between two glands, as a fraction of the sum of their largest semi-axes.
_GLAND_GAP = 0.25
# Glands stay inside this fraction of their section's (normalised) radius.
_GLAND_INNER = 0.88


def make_layout(
    width: int,
    height: int,
    mpp: float = 0.5,
    n_sections: int = 2,
    glands_per_section: int = 6,
    faint_sections: int = 0,
    seed: int = 0,
) -> SlideLayout:
    """Place tissue sections and glands on a slide, deterministically from ``seed``.

    The slide is split into a grid of cells separated from each other and from the border by a
    margin of 5% of the smaller slide side; each section is an ellipse inside its own cell, so
    sections never overlap and are at least that margin apart and from the border. Glands are
    placed inside the sections (inside 88% of the section's radius), at least a quarter of their
    summed sizes apart, so they never touch each other.

    Args:
        width: slide width in level-0 px (>= 64).
        height: slide height in level-0 px (>= 64).
        mpp: microns per pixel at level 0.
        n_sections: number of tissue sections (0 gives an empty slide).
        glands_per_section: glands in each section.
        faint_sections: how many of the sections are stained very pale.
        seed: random seed; the same arguments always give the same layout.

    Returns:
        The layout.

    Raises:
        InputError: impossible parameters (slide too small for that many sections or glands).
    """
    if width < 64 or height < 64:
        raise InputError(f"slide size {width}x{height} px is too small (need at least 64x64)")
    if not mpp > 0:
        raise InputError(f"mpp must be > 0 µm/px, got {mpp}")
    if n_sections < 0 or glands_per_section < 0:
        raise InputError("n_sections and glands_per_section must be >= 0")
    if not 0 <= faint_sections <= n_sections:
        raise InputError(
            f"faint_sections must be in [0, n_sections={n_sections}], got {faint_sections}"
        )
    rng = np.random.default_rng(seed)
    margin = 0.05 * min(width, height)
    cells = _section_cells(width, height, n_sections, margin)
    order = rng.permutation(len(cells))[:n_sections]
    sections: list[Ellipse] = []
    for ci in sorted(order.tolist()):
        x0, y0, cw, ch = cells[ci]
        rx = 0.5 * cw * float(rng.uniform(0.72, 1.0))
        ry = 0.5 * ch * float(rng.uniform(0.72, 1.0))
        rx, ry = min(rx, 1.8 * ry), min(ry, 1.8 * rx)  # not too elongated
        cx = x0 + rx + float(rng.uniform(0.0, cw - 2 * rx))
        cy = y0 + ry + float(rng.uniform(0.0, ch - 2 * ry))
        sections.append(Ellipse(cx, cy, rx, ry))
    faint_idx = set(rng.choice(n_sections, size=faint_sections, replace=False).tolist())
    glands: list[Ellipse] = []
    for si, sec in enumerate(sections):
        glands.extend(_place_glands(sec, glands_per_section, rng, si))
    return SlideLayout(
        width=int(width),
        height=int(height),
        mpp=float(mpp),
        sections=tuple(sections),
        glands=tuple(glands),
        faint=tuple(i in faint_idx for i in range(n_sections)),
        seed=int(seed),
    )


def _section_cells(
    width: int, height: int, n: int, margin: float
) -> list[tuple[float, float, float, float]]:
    """Split the slide into >= n cells ``(x0, y0, w, h)`` separated by ``margin``."""
    if n == 0:
        return []
    best: tuple[float, int, int] | None = None
    for cols in range(1, n + 1):
        rows = math.ceil(n / cols)
        cw = (width - (cols + 1) * margin) / cols
        ch = (height - (rows + 1) * margin) / rows
        score = min(cw, ch) - 1e-9 * cols * rows  # prefer fewer empty cells on ties
        if best is None or score > best[0]:
            best = (score, cols, rows)
    assert best is not None
    _, cols, rows = best
    cw = (width - (cols + 1) * margin) / cols
    ch = (height - (rows + 1) * margin) / rows
    if min(cw, ch) < 16:
        raise InputError(
            f"a {width}x{height} px slide is too small for {n} sections; use a larger slide"
        )
    return [
        (margin + c * (cw + margin), margin + r * (ch + margin), cw, ch)
        for r in range(rows)
        for c in range(cols)
    ]


def _place_glands(
    sec: Ellipse, n: int, rng: np.random.Generator, section_index: int
) -> list[Ellipse]:
    """Place ``n`` non-touching glands fully inside ``sec`` (rejection sampling)."""
    if n == 0:
        return []
    # gland size so that n glands fill roughly a third of the section's area
    base = min(sec.rx, sec.ry) * min(0.2, math.sqrt(0.35 / n) * 0.9)
    theta = np.linspace(0.0, 2 * np.pi, 64, endpoint=False)
    cos_t, sin_t = np.cos(theta), np.sin(theta)
    placed: list[Ellipse] = []
    attempts = 0
    scale = 1.0
    while len(placed) < n:
        attempts += 1
        if attempts % 300 == 0:
            scale *= 0.85
        if attempts > 3000 or base * scale < 2.0:
            raise InputError(
                f"could not place {n} glands in section {section_index} ({sec}); "
                "use fewer glands or a larger slide"
            )
        r = base * scale
        grx = r * float(rng.uniform(0.75, 1.3))
        gry = r * float(rng.uniform(0.75, 1.3))
        gcx = sec.cx + float(rng.uniform(-sec.rx, sec.rx))
        gcy = sec.cy + float(rng.uniform(-sec.ry, sec.ry))
        # the gland outline must lie inside the shrunk section
        bx = gcx + grx * cos_t
        by = gcy + gry * sin_t
        if not np.all(sec.scaled(_GLAND_INNER).contains(bx, by)):
            continue
        gmax = max(grx, gry)
        if any(
            math.hypot(gcx - o.cx, gcy - o.cy) < (1.0 + _GLAND_GAP) * (gmax + max(o.rx, o.ry))
            for o in placed
        ):
            continue
        placed.append(Ellipse(gcx, gcy, grx, gry))
    return placed


def pixel_centres(start: float, n: int, downsample: float = 1.0) -> np.ndarray:
    """Level-0 coordinates of the centres of ``n`` pixels along one axis.

    Args:
        start: level-0 coordinate of the region's first edge.
        n: number of pixels.
        downsample: level-0 pixels per output pixel.

    Returns:
        float64 array ``start + (arange(n) + 0.5) * downsample``.
    """
    return start + (np.arange(n, dtype=np.float64) + 0.5) * downsample


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------

_GLASS, _STROMA, _RIM, _LUMEN = 0, 1, 2, 3
_FAINT_OFFSET = 3  # faint stroma/rim/lumen = 4/5/6
_N_LABELS = 7
_IS_GLAND = np.array([False, False, True, True, False, True, True])


def _window(e: Ellipse, gx: np.ndarray, gy: np.ndarray) -> tuple[int, int, int, int] | None:
    """Rows/cols range of the pixel centres that may fall inside ``e`` (one pixel of slack)."""
    c0 = max(int(np.searchsorted(gx, e.cx - e.rx, "left")) - 1, 0)
    c1 = min(int(np.searchsorted(gx, e.cx + e.rx, "right")) + 1, gx.size)
    r0 = max(int(np.searchsorted(gy, e.cy - e.ry, "left")) - 1, 0)
    r1 = min(int(np.searchsorted(gy, e.cy + e.ry, "right")) + 1, gy.size)
    if c0 >= c1 or r0 >= r1:
        return None
    return r0, r1, c0, c1


def _norm_r2(e: Ellipse, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    # same arithmetic as Ellipse.contains, element by element, so masks match it exactly
    dx2 = ((gx - e.cx) / e.rx) ** 2
    dy2 = ((gy - e.cy) / e.ry) ** 2
    return dx2[None, :] + dy2[:, None]


def _label_region(
    layout: SlideLayout, x: float, y: float, w: int, h: int, downsample: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (labels uint8 (h, w), x centres, y centres) of a region."""
    if w < 0 or h < 0:
        raise InputError(f"region size must be >= 0, got {w}x{h}")
    if not downsample > 0:
        raise InputError(f"downsample must be > 0, got {downsample}")
    gx = pixel_centres(x, w, downsample)
    gy = pixel_centres(y, h, downsample)
    lab = np.zeros((h, w), dtype=np.uint8)
    if w == 0 or h == 0:
        return lab, gx, gy
    for si, sec in enumerate(layout.sections):
        win = _window(sec, gx, gy)
        if win is None:
            continue
        r0, r1, c0, c1 = win
        inside = _norm_r2(sec, gx[c0:c1], gy[r0:r1]) <= 1.0
        np.copyto(lab[r0:r1, c0:c1], _STROMA + _FAINT_OFFSET * layout.faint[si], where=inside)
    if layout.glands:
        owners = _gland_sections(layout)
        lumen2 = LUMEN_FRACTION**2
        for gi, gland in enumerate(layout.glands):
            win = _window(gland, gx, gy)
            if win is None:
                continue
            r0, r1, c0, c1 = win
            r2 = _norm_r2(gland, gx[c0:c1], gy[r0:r1])
            off = _FAINT_OFFSET * layout.faint[owners[gi]]
            sub = lab[r0:r1, c0:c1]
            np.copyto(sub, _RIM + off, where=r2 <= 1.0)
            np.copyto(sub, _LUMEN + off, where=r2 <= lumen2)
    return lab, gx, gy


def tissue_mask_region(
    layout: SlideLayout, x: int, y: int, w: int, h: int, downsample: float = 1.0
) -> np.ndarray:
    """Tissue ground truth of a region: pixel centre inside a section.

    Args:
        layout: the slide layout.
        x: level-0 x of the region's top-left corner.
        y: level-0 y of the region's top-left corner.
        w: region width in pixels at ``downsample``.
        h: region height in pixels at ``downsample``.
        downsample: level-0 pixels per output pixel.

    Returns:
        Boolean array (h, w).
    """
    lab, _, _ = _label_region(layout, x, y, w, h, downsample)
    return lab != _GLASS


def gland_mask_region(
    layout: SlideLayout, x: int, y: int, w: int, h: int, downsample: float = 1.0
) -> np.ndarray:
    """Gland (ROI) ground truth of a region: pixel centre inside a gland.

    Args:
        layout: the slide layout.
        x: level-0 x of the region's top-left corner.
        y: level-0 y of the region's top-left corner.
        w: region width in pixels at ``downsample``.
        h: region height in pixels at ``downsample``.
        downsample: level-0 pixels per output pixel.

    Returns:
        Boolean array (h, w).
    """
    lab, _, _ = _label_region(layout, x, y, w, h, downsample)
    return _IS_GLAND[lab]


# --------------------------------------------------------------------------------------------
# Texture: one periodic RGB image per label, with power-of-two mip levels
# --------------------------------------------------------------------------------------------

#: Texture period in level-0 px (a power of two).
TEXTURE_PERIOD = 1024
_TEX_SEED = 20240611
_GLASS_LEVEL = 240.0
_I0 = 244.0  # light through unstained tissue
# optical density per unit of stain (R, G, B): eosin pink, haematoxylin purple
_OD_EOSIN = np.array([0.068, 0.486, 0.250], dtype=np.float32)
_OD_HAEM = np.array([1.10, 1.26, 0.41], dtype=np.float32)
#: Faint sections have their optical density divided by this (saturation about a third).
FAINT_OD_DIVISOR = 3.5


def _freq_grid(p: int) -> tuple[np.ndarray, np.ndarray]:
    f = np.fft.fftfreq(p).astype(np.float32)
    fr = np.fft.rfftfreq(p).astype(np.float32)
    return f[:, None], fr[None, :]


def _filtered_noise(
    rng: np.random.Generator, p: int, sigma_along: float, sigma_across: float, angle: float
) -> np.ndarray:
    """Periodic Gaussian-filtered white noise (anisotropic), zero mean, unit std, float32."""
    white = rng.standard_normal((p, p)).astype(np.float32)
    fy, fx = _freq_grid(p)
    ca, sa = math.cos(angle), math.sin(angle)
    fa = fx * ca + fy * sa
    fc = -fx * sa + fy * ca
    filt = np.exp(-2 * np.pi**2 * ((sigma_along * fa) ** 2 + (sigma_across * fc) ** 2))
    out = np.fft.irfft2(np.fft.rfft2(white) * filt, s=(p, p)).astype(np.float32)
    out -= out.mean()
    out /= out.std() + 1e-12
    return out


def _nuclei_kernels(p: int, radius: float) -> list[np.ndarray]:
    """FFTs of soft, slightly elongated dot kernels at three orientations (periodic, centred)."""
    off = np.fft.fftfreq(p, d=1.0 / p).astype(np.float32)  # wrapped offsets 0, 1, ..., -1
    kernels = []
    for angle in (0.3, 1.35, 2.4):
        ca, sa = math.cos(angle), math.sin(angle)
        u = off[None, :] * ca + off[:, None] * sa
        v = -off[None, :] * sa + off[:, None] * ca
        dist = np.sqrt((u / 1.25) ** 2 + (v / 0.85) ** 2)
        kernels.append(np.fft.rfft2(np.clip((radius + 0.75 - dist) / 1.5, 0.0, 1.0)))
    return kernels


def _nuclei_field(
    rng: np.random.Generator, p: int, count: int, kernels: list[np.ndarray]
) -> np.ndarray:
    """Periodic field in [0, 1] of ``count`` soft dots ("nuclei")."""
    spectrum = None
    for k, kernel_ft in enumerate(kernels):
        n_k = count // len(kernels) + (k < count % len(kernels))
        imp = np.zeros((p, p), dtype=np.float32)
        py = rng.integers(0, p, n_k)
        px = rng.integers(0, p, n_k)
        np.add.at(imp, (py, px), rng.uniform(0.75, 1.0, n_k).astype(np.float32))
        term = np.fft.rfft2(imp) * kernel_ft
        spectrum = term if spectrum is None else spectrum + term
    field = np.fft.irfft2(spectrum, s=(p, p)).astype(np.float32)
    return np.clip(field, 0.0, 1.0, out=field)


def _stain_to_rgb(eosin: np.ndarray, haem: np.ndarray, faint: bool) -> np.ndarray:
    """Beer-Lambert colour of stain amounts (float32 arrays) -> float32 (..., 3) RGB."""
    scale = -1.0 / FAINT_OD_DIVISOR if faint else -1.0
    od = eosin[..., None] * (_OD_EOSIN * scale) + haem[..., None] * (_OD_HAEM * scale)
    np.exp(od, out=od)
    od *= _I0
    return od


@functools.lru_cache(maxsize=4)
def _texture_mips(mpp: float) -> tuple[np.ndarray, ...]:
    """Per mip level k: uint32 RGBX texels, shape (labels, P >> k, P >> k), C-contiguous."""
    p = TEXTURE_PERIOD
    rng = np.random.default_rng(_TEX_SEED)
    um = 1.0 / mpp  # pixels per micron
    fib = np.maximum(
        _filtered_noise(rng, p, 7.0 * um, 1.0 * um, 0.45),
        _filtered_noise(rng, p, 7.0 * um, 1.0 * um, 2.1),
    )
    blot = _filtered_noise(rng, p, 20.0 * um, 20.0 * um, 0.0)
    fib = np.clip(0.45 + 0.22 * fib + 0.12 * blot, 0.0, 1.0)
    grain = rng.standard_normal((p, p)).astype(np.float32)
    radius = max(3.0 * um, 1.2)
    area_um2 = (p / um) ** 2
    kernels = _nuclei_kernels(p, radius)
    sparse = _nuclei_field(rng, p, max(int(area_um2 / 600.0), 3), kernels)
    dense = _nuclei_field(rng, p, max(int(area_um2 / 110.0), 3), kernels)
    dense *= 0.85 + 0.15 * np.clip(blot, -1.0, 1.0)

    n_mips = p.bit_length()  # P, P/2, ..., 1
    mips = tuple(np.empty((_N_LABELS, p >> k, p >> k), dtype=np.uint32) for k in range(n_mips))
    for label in range(_N_LABELS):
        faint = label > _FAINT_OFFSET
        kind = label - _FAINT_OFFSET if faint else label
        if kind == _GLASS:
            rgb = np.empty((p, p, 3), dtype=np.float32)
            rgb[:] = (_GLASS_LEVEL + np.clip(1.2 * grain, -3, 3))[..., None]
            rgb[..., 2] += 1.0
        else:
            if kind == _STROMA:
                eosin = 0.55 + 0.65 * fib - 0.35 * sparse
                haem = 0.06 + 0.05 * fib + 1.0 * sparse
            elif kind == _RIM:
                eosin = 0.45 + 0.3 * fib - 0.2 * dense
                haem = 0.40 + 0.9 * dense
            else:  # lumen
                eosin = 0.10 + 0.08 * fib
                haem = np.full_like(fib, 0.02)
            rgb = _stain_to_rgb(eosin, haem, faint)
            rgb += (2.0 * grain)[..., None]
        level = rgb
        for k in range(n_mips):
            packed = np.empty((p >> k, p >> k, 4), dtype=np.uint8)
            packed[..., :3] = np.clip(np.rint(level), 0, 255)
            packed[..., 3] = 255
            mips[k][label] = packed.view(np.uint32)[..., 0]
            if k + 1 < n_mips:
                level = 0.25 * (
                    level[0::2, 0::2] + level[1::2, 0::2] + level[0::2, 1::2] + level[1::2, 1::2]
                )
    return mips


def _texture_offset(seed: int) -> tuple[int, int]:
    """Seed-dependent shift of the texture (multiples of 64 px keep mips aligned)."""
    rng = np.random.default_rng([seed, 7])
    ox, oy = rng.integers(0, TEXTURE_PERIOD // 64, 2) * 64
    return int(ox), int(oy)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def render_region(
    layout: SlideLayout, x: int, y: int, w: int, h: int, downsample: float = 1.0
) -> np.ndarray:
    """Render a region of the synthetic slide.

    The region's top-left corner is level-0 ``(x, y)`` and it spans ``w * downsample`` by
    ``h * downsample`` level-0 pixels. Pixels are decided at their centres (see
    :func:`pixel_centres`) so rendering is seamless across tiles and deterministic.

    Args:
        layout: the slide layout.
        x: level-0 x of the region's top-left corner.
        y: level-0 y of the region's top-left corner.
        w: region width in pixels at ``downsample``.
        h: region height in pixels at ``downsample``.
        downsample: level-0 pixels per output pixel (power-of-two values reproduce an
            area-averaged texture exactly; other values use the next finer mip level).

    Returns:
        RGB uint8 array (h, w, 3); pixels outside the slide are white (255).
    """
    lab, gx, gy = _label_region(layout, x, y, w, h, downsample)
    mips = _texture_mips(float(layout.mpp))
    k = 0 if downsample <= 1 else int(math.floor(math.log2(downsample) + 1e-9))
    k = min(k, len(mips) - 1)
    tex = mips[k]
    pk = tex.shape[1]
    m = 1 << k
    ox, oy = _texture_offset(layout.seed)
    ix = np.floor((gx + ox) / m).astype(np.intp) % pk
    iy = np.floor((gy + oy) / m).astype(np.intp) % pk
    if lab.size and lab.min() == lab.max():
        plane = tex[int(lab.flat[0])]
        out32 = plane.take(iy, axis=0).take(ix, axis=1)
    else:
        idx = lab.astype(np.intp)
        idx *= pk * pk
        idx += (iy * pk)[:, None]
        idx += ix[None, :]
        out32 = tex.reshape(-1).take(idx)
    rgb = np.ascontiguousarray(out32.view(np.uint8).reshape(h, w, 4)[..., :3])
    rgb[:, (gx < 0) | (gx >= layout.width)] = 255
    rgb[(gy < 0) | (gy >= layout.height)] = 255
    return rgb


# --------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------


def pyramid_level_sizes(
    width: int, height: int, min_level_size: int = 512
) -> list[tuple[int, int]]:
    """Level sizes of a pyramid that halves until its largest side is <= ``min_level_size``.

    Level ``i`` has downsample exactly ``2**i`` and size ``ceil(width / 2**i)`` by
    ``ceil(height / 2**i)``.

    Args:
        width: level-0 width.
        height: level-0 height.
        min_level_size: stop once the largest side is at most this.

    Returns:
        ``[(w0, h0), (w1, h1), ...]``.
    """
    if min_level_size < 1:
        raise InputError(f"min_level_size must be >= 1, got {min_level_size}")
    sizes = [(width, height)]
    i = 0
    while max(sizes[-1]) > min_level_size:
        i += 1
        sizes.append((math.ceil(width / 2**i), math.ceil(height / 2**i)))
    return sizes


def _level_tiles(
    layout: SlideLayout,
    lw: int,
    lh: int,
    tile: int,
    ds: int,
    encode: Callable[[np.ndarray], bytes] | None,
    executor: ThreadPoolExecutor | None,
    depth: int,
) -> Iterator[np.ndarray | bytes]:
    """Tiles of one level in row-major order, rendered (and encoded) ahead by a thread pool.

    At most ``depth`` tiles are in flight, so memory stays bounded.
    """

    def job(tx: int, ty: int) -> np.ndarray | bytes:
        img = render_region(layout, tx * ds, ty * ds, tile, tile, ds)
        return img if encode is None else encode(img)

    coords = ((tx, ty) for ty in range(0, lh, tile) for tx in range(0, lw, tile))
    if executor is None:
        for tx, ty in coords:
            yield job(tx, ty)
        return
    pending: deque[Future[np.ndarray | bytes]] = deque()
    for tx, ty in coords:
        pending.append(executor.submit(job, tx, ty))
        if len(pending) >= depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


_COMPRESSIONS = {"jpeg": "jpeg", "zlib": "zlib", "deflate": "zlib", None: None, "none": None}


def write_pyramid_tiff(
    path: str | Path,
    layout: SlideLayout,
    tile: int = 256,
    min_level_size: int = 512,
    compression: str | None = "jpeg",
    quality: int = 90,
    mpp_tags: bool = True,
    *,
    workers: int | None = None,
) -> Path:
    """Write the synthetic slide as a tiled, pyramidal, generic TIFF that OpenSlide opens.

    Each level halves the previous one (downsample exactly 2**i, see
    :func:`pyramid_level_sizes`); levels are consecutive pages of the main IFD chain, tiled
    ``tile x tile``, RGB (photometric RGB, JPEG without chroma subsampling), rendered tile by
    tile so memory stays bounded whatever the slide size. With ``mpp_tags`` the resolution tags
    are ResolutionUnit CENTIMETER and X/YResolution = 1e4 / mpp of that level, so OpenSlide
    reports ``openslide.mpp-x == layout.mpp``; without, ResolutionUnit is NONE and OpenSlide
    reports no mpp. BigTIFF is used when level 0 exceeds 2 GiB uncompressed. The file is
    written under a temporary name in the same folder and renamed into place.

    Args:
        path: output file.
        layout: the slide layout.
        tile: tile side in pixels (a multiple of 16).
        min_level_size: the smallest level has its largest side <= this.
        compression: "jpeg", "zlib"/"deflate", or None.
        quality: JPEG quality (1-100); for zlib, the compression level is fixed at 6.
        mpp_tags: write the resolution tags.
        workers: threads that render and compress tiles ahead of the writer (default: up to
            4, one per CPU); 1 renders in the calling thread. The output does not depend on it.

    Returns:
        The path written.

    Raises:
        InputError: bad tile size, compression or quality.
    """
    path = Path(path)
    if tile < 16 or tile % 16:
        raise InputError(f"tile must be a positive multiple of 16, got {tile}")
    key = compression.lower() if isinstance(compression, str) else compression
    if key not in _COMPRESSIONS:
        raise InputError(f"unknown compression {compression!r}; use 'jpeg', 'zlib' or None")
    codec = _COMPRESSIONS[key]
    encode: Callable[[np.ndarray], bytes] | None
    if codec == "jpeg":
        if not 1 <= quality <= 100:
            raise InputError(f"JPEG quality must be in [1, 100], got {quality}")
        # RGB in, RGB JPEG out (no YCbCr conversion, no chroma subsampling): photometric RGB
        cargs: dict[str, object] | None = {
            "level": int(quality),
            "colorspace": "RGB",
            "outcolorspace": "RGB",
            "subsampling": (1, 1),
        }
        subsampling: tuple[int, int] | None = (1, 1)
        encode = functools.partial(imagecodecs.jpeg8_encode, **cargs)
    elif codec == "zlib":
        cargs, subsampling = {"level": 6}, None
        encode = functools.partial(imagecodecs.zlib_encode, level=6)
    else:
        cargs, subsampling, encode = None, None, None
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    sizes = pyramid_level_sizes(layout.width, layout.height, min_level_size)
    bigtiff = layout.width * layout.height * 3 > 2**31
    _texture_mips(float(layout.mpp))  # build the shared texture once, before the threads start
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    executor = ThreadPoolExecutor(workers) if workers > 1 else None
    try:
        with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tw:
            for i, (lw, lh) in enumerate(sizes):
                ds = 2**i
                if mpp_tags:
                    res = 1e4 / (layout.mpp * ds)
                    resolution: tuple[float, float] | None = (res, res)
                    unit = "CENTIMETER"
                else:
                    resolution, unit = None, "NONE"
                tw.write(
                    data=_level_tiles(layout, lw, lh, tile, ds, encode, executor, 4 * workers),
                    shape=(lh, lw, 3),
                    dtype=np.uint8,
                    tile=(tile, tile),
                    photometric="rgb",
                    planarconfig="contig",
                    compression=codec,
                    compressionargs=cargs,
                    subsampling=subsampling,
                    resolution=resolution,
                    resolutionunit=unit,
                    subfiletype=0 if i == 0 else 1,
                    description=(
                        f"histo-wsl synthetic slide {layout.width}x{layout.height} "
                        f"mpp={layout.mpp:g} seed={layout.seed}"
                        if i == 0
                        else None
                    ),
                    metadata=None,
                )
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
    return path


def write_image_with_mask(dir: Path, name: str, layout: SlideLayout) -> tuple[Path, Path]:
    """Render a small layout as ``<dir>/<name>.png`` and its gland mask as ``<name>_mask.png``.

    Args:
        dir: output folder (created if missing).
        name: file stem.
        layout: the slide layout; at most 64 Mpx (the whole image is held in memory).

    Returns:
        (image path, mask path); the mask is 8-bit 0 (background) / 255 (gland).

    Raises:
        InputError: the layout is too large for a plain image.
    """
    if layout.width * layout.height > 64 * 2**20:
        raise InputError(
            f"layout {layout.width}x{layout.height} is too large for a plain image; "
            "use write_pyramid_tiff"
        )
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    img = render_region(layout, 0, 0, layout.width, layout.height)
    mask = gland_mask_region(layout, 0, 0, layout.width, layout.height)
    img_path = dir / f"{name}.png"
    mask_path = dir / f"{name}_mask.png"
    Image.fromarray(img).save(img_path)
    Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
    return img_path, mask_path
