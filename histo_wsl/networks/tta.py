"""Test-time augmentation by flips: the views, and maps averaged over them.

A map of a flipped image is flipped back before the views are averaged, so the mean is in the
image's own orientation. Used by :class:`histo_wsl.inference.predictor.Predictor` (``--tta
flips``) and by :func:`histo_wsl.methods.knn.refiner_keyed_as_slides`, which values a k-NN bank
with the averaged map once, at export, instead of at every window.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["TTA_MODES", "flip", "flips_mean_map", "unflipped_mean"]

#: test-time augmentations: the flip dimensions of each view
TTA_MODES: dict[str, tuple[tuple[int, ...], ...]] = {
    "none": ((),),
    "flips": ((), (-1,), (-2,), (-2, -1)),
}


def flip(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``t`` flipped along ``dims`` (itself for no dims)."""
    return t.flip(dims) if dims else t


def unflipped_mean(maps: list[Tensor], views: tuple[tuple[int, ...], ...]) -> Tensor:
    """Mean of the views' maps, each flipped back to the image's orientation."""
    if len(maps) == 1:
        return maps[0]
    return torch.stack([flip(m, d) for m, d in zip(maps, views, strict=True)]).mean(0)


def flips_mean_map(map_of: Callable[[Tensor], Tensor], images: Tensor) -> Tensor:
    """``map_of(images)`` (B,H,W) averaged over the four flipped views (:data:`TTA_MODES`)."""
    views = TTA_MODES["flips"]
    return unflipped_mean([map_of(flip(images, d)) for d in views], views)
