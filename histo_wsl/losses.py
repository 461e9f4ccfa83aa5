"""Training losses: NEGEV's pixel seeds from CAMs and its two terms (method.md §1.3).

Seeds are re-sampled at every step from the frozen classifier's CAM of the ground-truth class on
the augmented crop: ``n_fg`` foreground pixels drawn without replacement ∝ CAM, ``n_bg`` background
pixels from one of three samplers, each seed dilated by a k×k square; pixels that are both are
dropped. Background samplers, honestly named:

- ``proportional``: ∝ (1 − CAM), the paper's stated intent (a pixel with CAM 1 is never drawn);
- ``uniform``: every pixel alike, which is what the original code does in effect (its weights
  1 − CAM/ΣCAM are ≈ 1 everywhere);
- ``lowest``: uniform among the ``low_fraction`` lowest-CAM pixels of the image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

__all__ = ["BG_SAMPLERS", "IGNORE", "negative_loss", "sample_seeds", "seed_loss"]

BG_SAMPLERS = ("proportional", "uniform", "lowest")
#: target value of pixels without a seed (``F.cross_entropy``'s default ignore index)
IGNORE = -100


def _draw(weights: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
    """(B, HW) weights -> (B, HW) bool with ``n`` pixels drawn without replacement per row."""
    b, hw = weights.shape
    n = min(n, hw)
    w = weights.clone()
    empty = w.sum(1) <= 0
    w[empty] = 1.0  # an image with no admissible pixel draws uniformly rather than failing
    idx = torch.multinomial(w, n, replacement=False, generator=generator)
    out = torch.zeros(b, hw, dtype=torch.bool, device=weights.device)
    out.scatter_(1, idx, True)
    return out


def sample_seeds(
    cams: Tensor,
    n_fg: int = 1,
    n_bg: int = 1,
    ksize: int = 3,
    bg_sampler: str = "proportional",
    low_fraction: float = 0.2,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Seed map (B,H,W) long: 1 foreground seed, 0 background seed, :data:`IGNORE` elsewhere.

    Args:
        cams: (B,H,W) CAMs in [0,1] (per-image min-max normalised).
        n_fg: foreground pixels drawn per image, ∝ CAM (+1e-6).
        n_bg: background pixels drawn per image with ``bg_sampler``.
        ksize: side of the square each seed is dilated to (1 = no dilation; odd).
        bg_sampler: ``proportional`` (∝ 1 − CAM), ``uniform`` or ``lowest``.
        low_fraction: share of lowest-CAM pixels the ``lowest`` sampler draws from.
        generator: random generator (on the CAMs' device) for reproducible draws.
    """
    if bg_sampler not in BG_SAMPLERS:
        raise ValueError(f"bg_sampler must be one of {BG_SAMPLERS}, got {bg_sampler!r}")
    if ksize < 1 or ksize % 2 == 0:
        raise ValueError(f"ksize must be a positive odd number, got {ksize}")
    b, h, w = cams.shape
    flat = cams.detach().float().reshape(b, -1).nan_to_num(0.0).clamp(0, 1)
    fg = _draw(flat + 1e-6, n_fg, generator)
    if bg_sampler == "proportional":
        bw = 1.0 - flat
    elif bg_sampler == "uniform":
        bw = torch.ones_like(flat)
    else:
        k = max(1, int(round(low_fraction * flat.shape[1])))
        cut = flat.kthvalue(k, dim=1, keepdim=True).values
        bw = (flat <= cut).float()
    bg = _draw(bw, n_bg, generator)
    fg, bg = fg.reshape(b, 1, h, w).float(), bg.reshape(b, 1, h, w).float()
    if ksize > 1:
        fg = F.max_pool2d(fg, ksize, stride=1, padding=ksize // 2)
        bg = F.max_pool2d(bg, ksize, stride=1, padding=ksize // 2)
    fg, bg = fg[:, 0] > 0, bg[:, 0] > 0
    seeds = torch.full((b, h, w), IGNORE, dtype=torch.long, device=cams.device)
    seeds[fg & ~bg] = 1
    seeds[bg & ~fg] = 0
    return seeds


def seed_loss(seg_logits: Tensor, seeds: Tensor) -> Tensor:
    """Cross-entropy of 2-channel logits on the seed pixels (mean over seeds; 0 if none)."""
    if not (seeds != IGNORE).any():
        return seg_logits.sum() * 0.0
    return F.cross_entropy(seg_logits.float(), seeds, ignore_index=IGNORE)


def negative_loss(seg_logits: Tensor) -> Tensor:
    """Every pixel of fully negative images to background: mean of −log S_bg (0 for no image)."""
    if seg_logits.shape[0] == 0:
        return seg_logits.sum() * 0.0
    target = torch.zeros(
        seg_logits.shape[0], *seg_logits.shape[-2:], dtype=torch.long, device=seg_logits.device
    )
    return F.cross_entropy(seg_logits.float(), target)
