"""Patch grids at a target resolution, in level-0 coordinates."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from histo_wsl.errors import InputError
from histo_wsl.slideio.slide import ReadPlan, Slide

__all__ = ["PatchGrid", "make_grid", "cover_grid"]


@dataclass(frozen=True)
class PatchGrid:
    """Top-left corners of equally spaced square patches.

    Attributes:
        xs: level-0 x of each patch (int64).
        ys: level-0 y of each patch (int64).
        patch_size: patch side in pixels at the output resolution.
        stride: step between patches in pixels at the output resolution.
        scale: level-0 pixels per output pixel.
    """

    xs: np.ndarray
    ys: np.ndarray
    patch_size: int
    stride: int
    scale: float

    @property
    def size_level0(self) -> float:
        """Patch side in level-0 pixels."""
        return self.patch_size * self.scale

    def __len__(self) -> int:
        return int(self.xs.size)

    def subset(self, keep: np.ndarray) -> PatchGrid:
        """The patches selected by a boolean mask or an index array, in grid order."""
        return PatchGrid(self.xs[keep], self.ys[keep], self.patch_size, self.stride, self.scale)


def _axis(extent: int, size: float, step: float) -> np.ndarray:
    if size > extent + 1e-6:
        return np.zeros(0, dtype=np.int64)
    n = math.floor((extent - size) / step + 1e-9) + 1
    return np.round(np.arange(n) * step).astype(np.int64)


def make_grid(slide: Slide, plan: ReadPlan, patch_size: int, stride: int) -> PatchGrid:
    """All patches of ``patch_size`` px (at the plan's resolution) lying wholly inside the slide.

    Patch ``i`` along an axis starts at level-0 ``round(i * stride * plan.scale)``.

    Raises:
        InputError: a patch is larger than the slide at this resolution.
    """
    if patch_size < 1 or stride < 1:
        raise ValueError("patch_size and stride must be positive")
    w0, h0 = slide.dimensions
    size0 = patch_size * plan.scale
    if size0 > w0 + 1e-6 or size0 > h0 + 1e-6:
        at = f"{plan.mpp:.4g} µm/px" if plan.mpp is not None else f"level {plan.level}"
        raise InputError(
            f"a {patch_size} px patch at {at} covers {size0:.0f} level-0 px, more than the slide "
            f"({w0}x{h0}); use a smaller --patch-size or a finer resolution",
            slide.path,
        )
    xs = _axis(w0, size0, stride * plan.scale)
    ys = _axis(h0, size0, stride * plan.scale)
    gx, gy = np.meshgrid(xs, ys)
    return PatchGrid(gx.ravel(), gy.ravel(), patch_size, stride, plan.scale)


def _cover_axis(extent: int, size: float, step: float) -> np.ndarray:
    if size >= extent - 1e-6:
        return np.zeros(1, dtype=np.int64)
    n = math.ceil((extent - size) / step - 1e-9) + 1
    pos = np.round(np.arange(n) * step).astype(np.int64)
    pos[-1] = math.floor(extent - size + 1e-6)
    return np.unique(pos)


def cover_grid(slide: Slide, plan: ReadPlan, patch_size: int, stride: int) -> PatchGrid:
    """Patches of ``patch_size`` px every ``stride`` px that together cover the whole slide.

    As :func:`make_grid`, plus one last patch per row and column flush with the slide's right and
    bottom edges (the sliding-window layout of MONAI and TIAToolbox), so no strip of the slide is
    left out. A slide smaller than one patch gets one patch at 0, read past the edge (white).
    Positions are in level-0 pixels, in row-major order.
    """
    if patch_size < 1 or stride < 1:
        raise ValueError("patch_size and stride must be positive")
    w0, h0 = slide.dimensions
    size0 = patch_size * plan.scale
    xs = _cover_axis(w0, size0, stride * plan.scale)
    ys = _cover_axis(h0, size0, stride * plan.scale)
    gx, gy = np.meshgrid(xs, ys)
    return PatchGrid(gx.ravel(), gy.ravel(), patch_size, stride, plan.scale)
