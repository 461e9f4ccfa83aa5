"""Training losses: NEGEV's pixel seeds from CAMs and its two terms (method.md §1.3).

Seeds are re-sampled at every step from the frozen classifier's CAM of the ground-truth class on
the augmented crop: ``n_fg`` foreground pixels and ``n_bg`` background pixels, each drawn without
replacement by one of the samplers below, each seed dilated by a k×k square; pixels that are both
are dropped. Foreground samplers:

- ``proportional``: ∝ CAM, the paper's probability seeder;
- ``otsu``: uniform inside the CAM's Otsu foreground eroded by a ``fg_erode``×``fg_erode`` square
  (the un-eroded region when erosion empties it), the original code's ``threshold_seeder``
  (method.md §1.3; with the ``lowest`` background sampler it is that seeder exactly).

Background samplers, honestly named:

- ``proportional``: ∝ (1 − CAM), the paper's stated intent (a pixel with CAM 1 is never drawn);
- ``uniform``: every pixel alike, which is what the original code does in effect (its weights
  1 − CAM/ΣCAM are ≈ 1 everywhere);
- ``lowest``: uniform among the ``low_fraction`` lowest-CAM pixels of the image.

``mode="static"`` replaces the draws by a fixed choice for the paper's "random vs static selection"
ablation (NG-slides p.15): the ``n_fg`` highest-CAM pixels are foreground and the ``n_bg``
lowest-CAM pixels background (ties go to the lower flat index, row-major), with the same dilation
and overlap rule. It is still recomputed on every crop's CAM, but it uses no randomness.

:func:`size_loss` is NEGEV's optional size term (method.md §1.3 item 4, off in the paper), built on
the extended log-barrier :func:`histo_wsl.methods.maxmin_losses.elb`. :func:`crf_loss` is an optional
colour-affinity (CRF) term: the original code has a dense-CRF regulariser, off in the paper
(method.md §1.3 item 4); this one is a windowed version of it that runs on a CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from histo_wsl.methods.maxmin_losses import elb

__all__ = [
    "BG_SAMPLERS",
    "FG_SAMPLERS",
    "IGNORE",
    "SEED_MODES",
    "crf_loss",
    "crf_window",
    "negative_loss",
    "otsu_thresholds",
    "pixel_negative_loss",
    "SeedSampler",
    "SeedSettingError",
    "seed_loss",
    "size_loss",
    "size_t_at",
]

BG_SAMPLERS = ("proportional", "uniform", "lowest")
FG_SAMPLERS = ("proportional", "otsu")
#: ``random``: seeds drawn at every step (the paper); ``static``: the top/bottom CAM pixels
SEED_MODES = ("random", "static")
#: target value of pixels without a seed (``F.cross_entropy``'s default ignore index)
IGNORE = -100


def _draw(weights: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
    """(B, HW) weights -> (B, HW) bool with ``n`` pixels drawn without replacement per row."""
    b, hw = weights.shape
    n = min(n, hw)
    if n <= 0:
        return torch.zeros(b, hw, dtype=torch.bool, device=weights.device)
    w = weights.clone()
    empty = w.sum(1) <= 0
    w[empty] = 1.0  # an image with no admissible pixel draws uniformly rather than failing
    idx = torch.multinomial(w, n, replacement=False, generator=generator)
    out = torch.zeros(b, hw, dtype=torch.bool, device=weights.device)
    out.scatter_(1, idx, True)
    return out


def _extreme(flat: Tensor, n: int, highest: bool) -> Tensor:
    """(B, HW) values -> (B, HW) bool marking the ``n`` highest (or lowest) values of each row.

    Deterministic: a stable sort, so equal values go to the lower flat index.
    """
    b, hw = flat.shape
    n = min(n, hw)
    out = torch.zeros(b, hw, dtype=torch.bool, device=flat.device)
    if n <= 0:
        return out
    key = -flat if highest else flat
    idx = torch.sort(key, dim=1, stable=True).indices[:, :n]
    out.scatter_(1, idx, True)
    return out


def _levels(flat: Tensor) -> Tensor:
    """(B, HW) values in [0,1] -> the same as 8-bit levels (0-255, float)."""
    return (flat.detach().float().clamp(0, 1) * 255).round()


def otsu_thresholds(flat: Tensor) -> Tensor:
    """(B, HW) values in [0,1] -> (B, 1) Otsu thresholds as 8-bit levels (OpenCV).

    A pixel is foreground when its level (value × 255, rounded) is above the threshold, as in
    ``cv2.THRESH_BINARY``.
    """
    levels = _levels(flat).to(torch.uint8).cpu().numpy()
    otsu = cv2.THRESH_BINARY + cv2.THRESH_OTSU
    t = [cv2.threshold(np.ascontiguousarray(row[None]), 0, 255, otsu)[0] for row in levels]
    return torch.tensor(t, dtype=torch.float32, device=flat.device).reshape(-1, 1)


def _otsu_region(cams: Tensor, erode: int) -> Tensor:
    """(B,H,W) CAMs -> (B, HW) float: 1 inside the eroded Otsu foreground of each CAM.

    Where erosion leaves nothing, the un-eroded region is used instead.
    """
    b, h, w = cams.shape
    flat = cams.reshape(b, -1)
    region = (_levels(flat) > otsu_thresholds(flat)).float()
    if erode > 1:
        inv = 1.0 - region.reshape(b, 1, h, w)
        eroded = 1.0 - F.max_pool2d(inv, erode, stride=1, padding=erode // 2)
        eroded = eroded.reshape(b, -1)
        keep = eroded.sum(1, keepdim=True) > 0
        region = torch.where(keep, eroded, region)
    return region


class SeedSettingError(ValueError):
    """A :class:`SeedSampler` setting out of its range: ``field`` names it, ``rule`` says why."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field} {rule}")
        self.field, self.rule = field, rule


@dataclass(frozen=True)
class SeedSampler:
    """How pixel seeds are drawn from CAMs: ``sampler(cams, generator)`` -> seed map.

    Built once per run from the NEGEV settings; called on every batch. The seed map is (B,H,W)
    long: 1 foreground seed, 0 background seed, :data:`IGNORE` elsewhere.

    Attributes:
        n_fg: foreground pixels per image: drawn with ``fg_sampler``, or the highest (static).
        n_bg: background pixels per image: drawn with ``bg_sampler``, or the lowest (static);
            0 = no background seeds (the "C+ only" ablation).
        ksize: side of the square each seed is dilated to (1 = no dilation; odd).
        bg_sampler: ``proportional`` (∝ 1 − CAM), ``uniform`` or ``lowest`` (random mode only).
        low_fraction: share of lowest-CAM pixels the ``lowest`` sampler draws from.
        mode: ``random`` (draws, the paper) or ``static`` (the ``n_fg`` highest and ``n_bg``
            lowest CAM pixels, ties to the lower row-major index; no randomness).
        fg_sampler: ``proportional`` (∝ CAM + 1e-6) or ``otsu`` (uniform inside the CAM's Otsu
            foreground eroded by ``fg_erode``; random mode only).
        fg_erode: side of the erosion square of the ``otsu`` sampler (1 = no erosion; odd).

    Raises:
        ValueError: a sampler, mode or size that is not one of the valid ones.
    """

    n_fg: int = 1
    n_bg: int = 1
    ksize: int = 3
    bg_sampler: str = "proportional"
    low_fraction: float = 0.2
    mode: str = "random"
    fg_sampler: str = "proportional"
    fg_erode: int = 11

    def __post_init__(self) -> None:
        checks = [
            ("fg_sampler", self.fg_sampler in FG_SAMPLERS, f"must be one of {FG_SAMPLERS}"),
            (
                "fg_erode",
                self.fg_erode >= 1 and self.fg_erode % 2 == 1,
                "must be a positive odd number",
            ),
            ("bg_sampler", self.bg_sampler in BG_SAMPLERS, f"must be one of {BG_SAMPLERS}"),
            ("mode", self.mode in SEED_MODES, f"must be one of {SEED_MODES}"),
            ("ksize", self.ksize >= 1 and self.ksize % 2 == 1, "must be a positive odd number"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise SeedSettingError(name, f"{rule}, got {getattr(self, name)!r}")

    def __call__(self, cams: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The seed map of ``cams`` (B,H,W) in [0,1] (per-image min-max normalised).

        ``generator``: random generator (on the CAMs' device) for reproducible draws.
        """
        n_fg, n_bg, ksize, mode = self.n_fg, self.n_bg, self.ksize, self.mode
        bg_sampler, low_fraction = self.bg_sampler, self.low_fraction
        fg_sampler, fg_erode = self.fg_sampler, self.fg_erode
        b, h, w = cams.shape
        flat = cams.detach().float().reshape(b, -1).nan_to_num(0.0).clamp(0, 1)
        if mode == "static":
            fg = _extreme(flat, n_fg, highest=True)
            bg = _extreme(flat, n_bg, highest=False)
        else:
            if fg_sampler == "otsu":
                fg = _draw(_otsu_region(flat.reshape(b, h, w), fg_erode), n_fg, generator)
            else:
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


def pixel_negative_loss(seg_logits: Tensor, background: Tensor) -> Tensor:
    """The negative term over known background pixels only: mean of −log S_bg on ``background``.

    ``background`` (B,H,W) bool marks pixels known to be background (the glass an image is placed
    on with ``--glass``); 0 when none is marked.
    """
    if not background.any():
        return seg_logits.sum() * 0.0
    log_bg = F.log_softmax(seg_logits.float(), dim=1)[:, 0]
    return -log_bg[background].mean()


def size_t_at(t0: float, t_max: float, mult: float, epoch: int) -> float:
    """Log-barrier t of the size term during ``epoch`` (1-based): min(t0·mult^(epoch−1), t_max)."""
    return min(t0 * mult ** max(epoch - 1, 0), t_max)


def size_loss(seg_logits: Tensor, t: float) -> Tensor:
    """NEGEV's size term: mean over images of ½ Σ_{c∈{bg,fg}} ELB(−s_c) (method.md §1.3 item 4).

    ``s_c`` is the **fraction** of the image the decoder gives to region ``c``: the mean of its
    softmax channel over the pixels, in (0, 1); the original code feeds raw pixel sums (up to
    50 176 at 224 px), where the barrier's slope 1/(t·s) is ≈ 0 for any region bigger than a few
    pixels. As fractions the barrier's switch point −1/t² is a share of the image at every input
    size (1 % at t = 10) and the term is of the order of the cross-entropies. The constraint is
    ``−s_c <= 0`` for both regions: it keeps each region non-empty and is smallest for equal sizes.

    Note: for t <= √2 both regions are on the ELB's linear branch t·z + const whenever
    ``s_c < 1/t²``; at t = 1 (the paper's t0) the sum is then the constant 1 on the whole simplex
    (zero gradient), so the term only starts acting as the schedule raises t.

    Args:
        seg_logits: (B,2,H,W) decoder logits (background, foreground); images of the negative
            class are left out by the caller.
        t: the log-barrier parameter of the current epoch (> 0).

    Returns:
        A scalar (0 with no image).
    """
    if seg_logits.shape[0] == 0:
        return seg_logits.sum() * 0.0
    prob = torch.softmax(seg_logits.float(), dim=1)
    sizes = prob.flatten(2).mean(2)  # (B, 2): fractions of background and foreground
    return 0.5 * elb(-sizes, t).sum(1).mean()


def crf_window(sigma_xy: float, scale: float) -> int:
    """Side of the square neighbourhood :func:`crf_loss` uses: ±2σ_xy, in pixels at ``scale``."""
    return 2 * max(1, int(math.ceil(2.0 * sigma_xy * scale))) + 1


def crf_loss(
    seg_logits: Tensor,
    images: Tensor,
    sigma_rgb: float = 15.0,
    sigma_xy: float = 8.0,
    scale: float = 0.25,
) -> Tensor:
    """Colour-affinity (relaxed Potts CRF) term on the decoder's softmax: similar neighbours agree.

    The mean over pixels i and their neighbours j ≠ i of ``w_ij · (1 − Σ_c S_i^c S_j^c)``, with
    ``w_ij = exp(−‖I_i − I_j‖² / 2σ_rgb² − ‖p_i − p_j‖² / 2σ_xy²)``: the probability that two
    pixels get different labels, weighted by how alike they look and how close they are. It is
    the dense-CRF loss of weakly supervised segmentation (the original NEGEV code's ``crf_ng``,
    off in the paper) restricted to a square window of ±2σ_xy, computed on the image and the
    softmax resized by ``scale`` so that it is cheap on a CPU; the value lies in [0, 1].

    Args:
        seg_logits: (B,2,H,W) decoder logits.
        images: (B,3,H,W) the same images in 0–255 RGB (not normalised).
        sigma_rgb: colour scale in 0–255 units.
        sigma_xy: spatial scale in pixels of the input.
        scale: resize factor of image and softmax before the window is taken, in (0, 1].

    Returns:
        A scalar (0 with no image).
    """
    if seg_logits.shape[0] == 0:
        return seg_logits.sum() * 0.0
    prob = torch.softmax(seg_logits.float(), dim=1)
    img = images.float()
    if scale != 1.0:
        size = [max(1, round(d * scale)) for d in prob.shape[-2:]]
        prob = F.interpolate(prob, size=size, mode="bilinear", align_corners=False, antialias=True)
        img = F.interpolate(img, size=size, mode="bilinear", align_corners=False, antialias=True)
    b, c, h, w = prob.shape
    k = crf_window(sigma_xy, scale)
    pad = k // 2
    ones = torch.ones(1, 1, h, w, device=prob.device)
    valid = F.unfold(ones, k, padding=pad).view(1, k * k, h, w)  # 0 outside the image
    near_img = F.unfold(img, k, padding=pad).view(b, 3, k * k, h, w)
    near_prob = F.unfold(prob, k, padding=pad).view(b, c, k * k, h, w)
    colour = ((near_img - img.unsqueeze(2)) ** 2).sum(1)  # (B, k², h, w)
    offsets = torch.arange(k, device=prob.device, dtype=torch.float32) - pad
    dist2 = (offsets.view(k, 1) ** 2 + offsets.view(1, k) ** 2).view(1, k * k, 1, 1) / scale**2
    weight = torch.exp(-colour / (2 * sigma_rgb**2) - dist2 / (2 * sigma_xy**2)) * valid
    weight[:, pad * k + pad] = 0.0  # a pixel is not its own neighbour
    differ = 1.0 - (near_prob * prob.unsqueeze(2)).sum(1)
    pairs = valid.sum() - h * w  # neighbour pairs inside the image, per image
    return (weight * differ).sum() / (b * pairs)
