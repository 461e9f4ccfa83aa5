"""Max-Min uncertainty losses (Belharbi et al., IEEE TMI 2022; method.md §2.2).

* :func:`elb` — the extended log-barrier ψ_t of Kervadec et al. for a constraint ``z <= 0``.
* :func:`eem` — explicit entropy maximisation: R = −H(p) (natural logs), batch mean.
* :func:`sem` — surrogate entropy maximisation: R = H(q, p), cross-entropy to the uniform q.
* :func:`size_barrier` — the absolute size constraints on both regions, via :func:`elb`.
* :func:`maxmin_loss` — the whole training loss of a batch.

**Sizes are fractions of the image.** The original code feeds the extended log-barrier raw pixel
sums of the 416×416 mask (s up to 1.7·10⁵): −(1/t)·log s then has a slope of 1/(t·s) ≈ 10⁻⁶ per
unit of area, so the barrier is flat (inactive) for any region bigger than a few pixels and only
its linear branch, t·z, ever shows up (for an empty region), which makes it depend on the crop size.
Here s± = mean of the mask (and of 1 − mask) over the pixels, in (0, 1): the barrier's switch point
z = −1/t² (4 % of the image at t = 5, 1 % at t = 10) becomes a size in a unit that means the same at
every input size, the barrier is −(1/t)·log s ≈ 0.14 for a half-image region at t = 5 (comparable
with the cross-entropy terms instead of negligible), and its gradient grows smoothly as a region
shrinks towards a few percent of the image. Natural logarithms are used throughout (the original code
uses base 2, a constant factor 1/ln 2 absorbed by λ).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from histo_wsl.networks.maxmin import MaxMinOutput

__all__ = [
    "REGULARIZERS",
    "eem",
    "elb",
    "maxmin_loss",
    "negative_mask_loss",
    "sem",
    "size_barrier",
]

REGULARIZERS = ("sem", "eem")


def elb(z: Tensor, t: float) -> Tensor:
    """Extended log-barrier ψ_t(z) of a constraint ``z <= 0``, elementwise.

    ψ_t(z) = −(1/t)·log(−z) if z ≤ −1/t², else t·z − (1/t)·log(1/t²) + 1/t. Both branches meet at
    z = −1/t² with the same value −(1/t)·log(1/t²) and the same slope t, so ψ_t is C¹ and finite
    (and linear) for violated constraints, unlike the plain log-barrier.

    Args:
        z: constraint values (any shape); feasible where ``z <= 0``.
        t: barrier parameter (> 0); larger t approaches the hard constraint.
    """
    if not t > 0:
        raise ValueError(f"the log-barrier needs t > 0, got {t}")
    switch = -1.0 / (t * t)
    inside = z <= switch
    # the log only sees feasible values, so the unused branch never gives inf/NaN gradients
    barrier = -torch.log(torch.where(inside, -z, torch.ones_like(z))) / t
    linear = t * z - math.log(1.0 / (t * t)) / t + 1.0 / t
    return torch.where(inside, barrier, linear)


def eem(logits: Tensor) -> Tensor:
    """Explicit entropy maximisation: mean over the batch of −H(softmax(logits)) = Σ_c p_c log p_c.

    −log K (its minimum) for uniform predictions, 0 for one-hot ones.
    """
    logp = F.log_softmax(logits.float(), dim=1)
    return (logp.exp() * logp).sum(1).mean()


def sem(logits: Tensor) -> Tensor:
    """Surrogate entropy maximisation: mean over the batch of H(q, p) = −(1/K) Σ_c log p_c.

    q is the uniform distribution; H(q, p) = KL(q‖p) + log K, so its minimum is log K (uniform p)
    and it grows without bound as p becomes confident (unlike :func:`eem`, whose gradient vanishes
    there).
    """
    logp = F.log_softmax(logits.float(), dim=1)
    return (-logp.mean(1)).mean()


def size_barrier(mask: Tensor, t: float) -> Tensor:
    """Size constraints of both regions, ψ_t(−s+) + ψ_t(−s−), per image (B,).

    ``s+`` = mean of ``mask`` (B,H,W) over pixels (foreground fraction), ``s−`` = 1 − s+.
    """
    fg = mask.float().flatten(1).mean(1)
    return elb(-fg, t) + elb(-(1.0 - fg), t)


def negative_mask_loss(mask_logits: Tensor) -> Tensor:
    """Negative (fully normal) images: every mask pixel to background, BCE with logits, pixel mean."""
    if mask_logits.shape[0] == 0:
        return mask_logits.sum() * 0.0
    x = mask_logits.float()
    return F.binary_cross_entropy_with_logits(x, torch.zeros_like(x))


def maxmin_loss(
    out: MaxMinOutput,
    labels: Tensor,
    *,
    lam: float,
    regularizer: str = "sem",
    t: float = 5.0,
    size: bool = True,
    negative: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The Max-Min loss of a batch (method.md §2.2, code form, with sizes as fractions).

    L = CE(s_M, y) + CE(C(X+), y) + λ·R(C(X−)) + mean_i [ψ_t(−s+_i) + ψ_t(−s−_i)]

    With ``negative`` (images of the negative class, the Camelyon16 variant): those images get
    BCE(mask, 0) on every pixel instead of R and the size barrier (an empty ROI is their truth);
    both cross-entropies apply to every image, so C learns that an empty X+ means the negative class.

    Args:
        out: one forward pass with its branches: the localizer's pooled scores s_M, C(X+), C(X−)
            (B,K), the pseudo-binary mask M (B,H,W) in [0,1] and its logits (the negative-image
            term).
        labels: (B,) class indices.
        lam: weight λ of the background regulariser R.
        regularizer: ``sem`` or ``eem``.
        t: log-barrier parameter of the current epoch.
        size: apply the size constraints.
        negative: (B,) bool, images of the negative class (or None).

    Returns:
        (loss, float statistics of each term).
    """
    if regularizer not in REGULARIZERS:
        raise ValueError(f"regularizer must be one of {REGULARIZERS}, got {regularizer!r}")
    reg_fn = sem if regularizer == "sem" else eem
    mask, mask_logits, neg_logits = out.mask, out.mask_logits, out.neg_logits
    ce_loc = F.cross_entropy(out.loc_logits.float(), labels)
    ce_pos = F.cross_entropy(out.pos_logits.float(), labels)
    loss = ce_loc + ce_pos
    stats = {"ce_loc": float(ce_loc.detach()), "ce_pos": float(ce_pos.detach())}
    pos = torch.ones_like(labels, dtype=torch.bool) if negative is None else ~negative
    if pos.any():
        reg = reg_fn(neg_logits[pos])
        loss = loss + lam * reg
        stats[f"{regularizer}_neg"] = float(reg.detach())
        if size:
            barrier = size_barrier(mask[pos], t).mean()
            loss = loss + barrier
            stats["size_barrier"] = float(barrier.detach())
    if negative is not None and negative.any():
        bce = negative_mask_loss(mask_logits[negative])
        loss = loss + bce
        stats["negative_bce"] = float(bce.detach())
    stats["fg_fraction"] = float(mask.detach().float().mean())
    return loss, stats
