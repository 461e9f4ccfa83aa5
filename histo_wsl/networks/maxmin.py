"""The Max-Min uncertainty network (Belharbi et al., IEEE TMI 2022; method.md §2.1).

One shared backbone runs twice per image: as the **localizer** M on the image X, and as the
**classifier** C on the masked images X+ = X ⊙ M and X− = X ⊙ (1 − M). Each role has its own WILDCAT
head (``head``: localizer, ``cl_head``: classifier), both on the backbone's CAM layer (stride 8).

Mask modes:

- ``minmax`` (GlaS, the paper): the soft mask M+ = Σ_c softmax(s_M)_c · map_c of the localizer's
  class maps, upsampled bilinearly to the input size, min-max normalised **per image** to M̃ (the
  original code normalises over the batch, which couples images; method.md §7 pitfall 4), and the
  pseudo-binary mask M = sigmoid(w · (M̃ − σ)). Every image's mask then spans the same range, so it
  can never be empty: right for data where every image holds some ROI. A window of a slide is
  not such an image (it may hold only stroma, or half glass), so with :attr:`MaxMinModel.windowed`
  set and a :attr:`MaxMinModel.window_range` known, M̃ = (M+ − lo) / (hi − lo) with one range
  (lo, hi) for every window: the mean per-image minimum and maximum of M+ over the training
  images as a slide shows them (:func:`histo_wsl.methods.maxmin.mask_range`).
- ``absolute`` (data with a negative class, the Camelyon16 variant): a class-agnostic foreground
  logit ℓ = logsumexp_{c ≠ neg} map_c − map_neg (the log-odds that a pixel shows any non-negative
  class rather than the negative one), upsampled, and M = sigmoid(w · ℓ) (no σ shift, no min-max, as
  in the Camelyon16 code), so that images of the negative class can have an all-background mask.

The classifier sees X± bilinearly resized by ``cl_scale`` (0.8 in the paper's code, ``scale_in_cl``:
less compute for two of the three backbone passes; 1 = full size).

Gradients reach the localizer through the mask (nothing is detached). ``σ`` and ``w`` are buffers,
so a checkpoint carries the values its model was evaluated with. At inference the class is
argmax C(X+) and the localization map is M (in [0, 1], at the input size; 0.5 ⇔ M̃ ≥ σ). With a
``refiner`` (``--refine knn``, :mod:`histo_wsl.networks.knn`) the map is M blended with
the k-NN map of M over training pixels; the class stays that of C(X ⊙ M).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from histo_wsl.networks.backbones import BASE, X10, Backbone
from histo_wsl.networks.heads import WildcatHead, wildcat_pool
from histo_wsl.networks.knn import KNNRefiner

__all__ = ["MASK_MODES", "MAXMIN_HEAD_OPTS", "MaxMinModel", "MaxMinOutput", "maxmin_param_groups"]

MASK_MODES = ("minmax", "absolute")
#: WILDCAT settings of both heads in the Max-Min GlaS command (method.md §2.1)
MAXMIN_HEAD_OPTS = {"modalities": 5, "kmax": 0.3, "kmin": 0.0, "alpha": 0.6, "dropout": 0.1}


@dataclass
class MaxMinOutput:
    """Everything a training step needs from one forward pass."""

    loc_logits: Tensor  #: localizer's pooled class scores s_M (B,K)
    mask_logits: Tensor  #: logits of the pseudo-binary mask (B,H,W)
    mask: Tensor  #: pseudo-binary mask M = sigmoid(mask_logits) (B,H,W)
    pos_logits: Tensor  #: C(X+) (B,K)
    neg_logits: Tensor  #: C(X−) (B,K)


def _minmax_per_image(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Min-max normalise each map of (B,H,W) to [0,1] separately (differentiable)."""
    flat = x.flatten(1)
    lo = flat.amin(1).view(-1, 1, 1)
    hi = flat.amax(1).view(-1, 1, 1)
    return (x - lo) / (hi - lo + eps)


class MaxMinModel(nn.Module):
    """Shared backbone + localizer head + classifier head.

    Args:
        backbone: the shared stride-8 encoder.
        num_classes: number of classes K.
        w: steepness of the pseudo-binary mask.
        sigma: threshold σ on the normalised map (``minmax`` mode).
        mask_mode: ``minmax`` or ``absolute`` (see the module docstring).
        negative_index: index of the negative class (``absolute`` mode only).
        head_opts: WILDCAT options of both heads (default :data:`MAXMIN_HEAD_OPTS`).
        cl_scale: size factor of the classifier's inputs X± (0 < cl_scale <= 1).
        refiner: k-NN refinement of the map :meth:`localize` returns (filled by training or
            by the checkpoint's weights).
    """

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        *,
        w: float = 5.0,
        sigma: float = 0.15,
        mask_mode: str = "minmax",
        negative_index: int | None = None,
        head_opts: dict | None = None,
        cl_scale: float = 1.0,
        refiner: KNNRefiner | None = None,
    ) -> None:
        super().__init__()
        if not 0 < cl_scale <= 1:
            raise ValueError(f"cl_scale must be in (0, 1], got {cl_scale}")
        if mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
        if mask_mode == "absolute" and (
            negative_index is None or not 0 <= negative_index < num_classes
        ):
            raise ValueError("the absolute mask needs the index of the negative class")
        opts = dict(MAXMIN_HEAD_OPTS if head_opts is None else head_opts)
        self.backbone = backbone
        self.head = WildcatHead(backbone.out_channels, num_classes, **opts)
        self.cl_head = WildcatHead(backbone.out_channels, num_classes, **opts)
        self.mask_mode = mask_mode
        self.negative_index = negative_index
        self.cl_scale = float(cl_scale)
        self.refiner = refiner
        #: (lo, hi) of the soft map M+ on the training images (``minmax`` mode), or None
        self.window_range: tuple[float, float] | None = None
        #: whether inputs are windows of a slide: M̃ then uses :attr:`window_range` when known
        self.windowed = False
        self.register_buffer("sigma", torch.tensor(float(sigma)))
        self.register_buffer("w", torch.tensor(float(w)))

    @property
    def num_classes(self) -> int:
        """Number of classes K."""
        return self.head.num_classes

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """The shared backbone's stages of ``x`` (the k-NN bank's keys come from them)."""
        return self.backbone(x)

    def soft_map(self, x: Tensor, stages: list[Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """(localizer scores s_M (B,K), soft map M+ (B,H,W) at the input size; ``minmax`` mode).

        ``stages``: the backbone's stages of ``x`` when already computed.
        """
        if stages is None:
            stages = self.backbone(x)
        maps = self.head.cams(stages[-1])  # (B,K,h,w)
        scores = wildcat_pool(maps, self.head.kmax, self.head.kmin, self.head.alpha)
        weights = scores.float().softmax(1)[:, :, None, None]
        soft = (weights * maps.float()).sum(1, keepdim=True)
        size = tuple(x.shape[-2:])
        return scores, F.interpolate(soft, size=size, mode="bilinear", align_corners=False)[:, 0]

    def normalise(self, soft: Tensor) -> Tensor:
        """M̃ of the soft map M+ (B,H,W): per image, or by :attr:`window_range` for windows."""
        if self.windowed and self.window_range is not None:
            lo, hi = self.window_range
            return (soft - lo) / (hi - lo)
        return _minmax_per_image(soft)

    def locate(self, x: Tensor, stages: list[Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """(localizer scores s_M (B,K), mask logits (B,H,W) at the input size).

        ``stages``: the backbone's stages of ``x`` when already computed.
        """
        if stages is None:
            stages = self.backbone(x)
        if self.mask_mode == "minmax":
            scores, soft = self.soft_map(x, stages)
            return scores, self.w * (self.normalise(soft) - self.sigma)
        maps = self.head.cams(stages[-1])  # (B,K,h,w)
        scores = wildcat_pool(maps, self.head.kmax, self.head.kmin, self.head.alpha)
        neg = self.negative_index
        others = torch.cat([maps[:, :neg], maps[:, neg + 1 :]], dim=1).float()
        fg = torch.logsumexp(others, dim=1, keepdim=True) - maps[:, neg : neg + 1].float()
        fg = F.interpolate(fg, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
        return scores, self.w * fg[:, 0]

    def classify(self, x: Tensor) -> Tensor:
        """Classifier logits C(x) (B,K) with the shared backbone and the classifier head.

        ``x`` is resized by ``cl_scale`` first (bilinear; differentiable, so the mask's gradient
        still reaches the localizer).
        """
        if self.cl_scale != 1.0:
            x = F.interpolate(x, scale_factor=self.cl_scale, mode="bilinear", align_corners=False)
        return self.cl_head(self.backbone(x)[-1])

    def branches(self, x: Tensor) -> MaxMinOutput:
        """Localizer scores, the mask, C(X+) and C(X−) (gradients flow through the mask)."""
        scores, logits = self.locate(x)
        mask = torch.sigmoid(logits)
        m = mask[:, None].to(x.dtype)
        return MaxMinOutput(scores, logits, mask, self.classify(x * m), self.classify(x * (1 - m)))

    def forward(self, x: Tensor, branches: bool = False) -> Tensor | MaxMinOutput:
        """Image-class logits C(X+) (B,K); with ``branches``, :meth:`branches`' output.

        (Training goes through ``forward(x, branches=True)`` so that DistributedDataParallel sees
        the call.)
        """
        if branches:
            return self.branches(x)
        return self.localize(x)[0]

    def localize(self, x: Tensor, refine: bool = True) -> tuple[Tensor, Tensor]:
        """(C(X+) logits (B,K), map (B,H,W) in [0,1]): what ``localize``/``evaluate`` use.

        The map is the mask M, or with a ready refiner and ``refine`` its blend with the k-NN
        map; X+ is always X ⊙ M.
        """
        stages = self.backbone(x)
        mask = torch.sigmoid(self.locate(x, stages)[1])
        logits = self.classify(x * mask[:, None].to(x.dtype))
        if refine and self.refiner is not None and self.refiner.ready:
            mask = self.refiner(mask, stages)
        return logits, mask


def maxmin_param_groups(model: nn.Module, lr: float, ratio: float = 10.0) -> list[dict]:
    """Two learning-rate groups for a :class:`MaxMinModel` (method.md §1.4's rule).

    The backbone's base layers at ``lr``; its deep layers (``Backbone.is_x10``) and both heads at
    ``ratio × lr``. An empty group is left out.
    """
    from histo_wsl.networks.classifier import unwrap

    m = unwrap(model)
    base: list[nn.Parameter] = []
    x10: list[nn.Parameter] = []
    for name, p in m.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("backbone."):
            group = X10 if m.backbone.is_x10(name[len("backbone.") :]) else BASE
        else:
            group = X10
        (x10 if group == X10 else base).append(p)
    groups = [
        {"params": base, "lr": lr, "name": BASE},
        {"params": x10, "lr": lr * ratio, "name": X10},
    ]
    return [g for g in groups if g["params"]]
