"""Classification heads on the CAM layer: class logits and raw class activation maps.

Every head takes the last backbone stage ``features`` of shape ``(B, C, h, w)``:

* ``forward(features)`` → logits ``(B, K)``;
* ``cams(features)`` → raw (unnormalised) class maps ``(B, K, h, w)``.

========= ==================================================================================================
wgap      global average pool then ``Linear(C, K)``; CAM_c = Σ_k w_ck A_k (no bias, no ReLU), so
          ``mean(cams) + bias == logits``. The head of CAM, HaS, CutMix and the Grad-CAM family.
gap       1×1 conv to K maps (with bias), logits = spatial mean of the maps; cams = the maps.
max       1×1 conv to K maps, logits = spatial max; cams = the maps.
lse       1×1 conv to K maps, logits = log-sum-exp pooling (1/r)·log(mean(exp(r·m))), r = 10.
wildcat   1×1 conv to K·M modality maps (M = 5), class-wise mean over the M modalities, then per class
          mean of the top-kmax values + α · mean of the bottom-kmin values (kmax 0.5, kmin 0.1, α 0.6).
mil       Deep-MIL attention pooling (Ilse et al. 2018) over the h·w positions (mid 128, not gated).
========= ==================================================================================================

The original NEGEV/Max-Min code computes the WILDCAT min term but discards it (its result is never
assigned), so it pools with the top-kmax mean only; here the min term is applied as in the WILDCAT paper.
Pass ``kmin=0`` to reproduce the original code.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import Tensor, nn

from histo_wsl.errors import InputError

__all__ = [
    "HEADS",
    "Head",
    "WGAPHead",
    "GAPHead",
    "MaxHead",
    "LSEHead",
    "wildcat_pool",
    "WildcatHead",
    "MILHead",
    "build_head",
]

HEADS = ("wgap", "gap", "max", "lse", "wildcat", "mil")


class Head(nn.Module):
    """Base class of the heads.

    Attributes:
        in_channels: channels C of the features.
        num_classes: number of classes K.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 1:
            raise InputError(
                f"a head needs in_channels >= 1 and num_classes >= 1 (got {in_channels}, {num_classes})"
            )
        self.in_channels = in_channels
        self.num_classes = num_classes

    def forward(self, features: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Class logits ``(B, K)`` of features ``(B, C, h, w)``."""
        raise NotImplementedError

    def cams(self, features: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Raw class activation maps ``(B, K, h, w)`` of features ``(B, C, h, w)``."""
        raise NotImplementedError


class WGAPHead(Head):
    """Global average pooling then a linear layer (the CAM head)."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__(in_channels, num_classes)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, features: Tensor) -> Tensor:
        """Logits = ``fc(mean over positions of features)``."""
        return self.fc(features.mean(dim=(2, 3)))

    def cams(self, features: Tensor) -> Tensor:
        """CAM_c = Σ_k w_ck A_k: the fc weights of each class applied per position, no bias, no ReLU."""
        return torch.einsum("kc,bchw->bkhw", self.fc.weight, features)


class _MapHead(Head):
    """1×1 conv to K class maps; subclasses pool the maps to logits."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__(in_channels, num_classes)
        self.conv = nn.Conv2d(in_channels, num_classes, kernel_size=1)

    def cams(self, features: Tensor) -> Tensor:
        """The K class maps of the 1×1 conv."""
        return self.conv(features)

    def pool(self, maps: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Spatial pooling of class maps ``(B, K, h, w)`` to ``(B, K)``."""
        raise NotImplementedError

    def forward(self, features: Tensor) -> Tensor:
        """Logits = spatial pooling of the class maps."""
        return self.pool(self.cams(features))


class GAPHead(_MapHead):
    """1×1 conv to K maps, average pooling."""

    def pool(self, maps: Tensor) -> Tensor:
        """Spatial mean."""
        return maps.mean(dim=(2, 3))


class MaxHead(_MapHead):
    """1×1 conv to K maps, max pooling."""

    def pool(self, maps: Tensor) -> Tensor:
        """Spatial max."""
        return maps.amax(dim=(2, 3))


class LSEHead(_MapHead):
    """1×1 conv to K maps, log-sum-exp pooling ``(1/r)·log(mean(exp(r·m)))``.

    Args:
        in_channels: channels of the features.
        num_classes: number of classes.
        r: sharpness; r → 0 gives the mean, r → ∞ the max.
    """

    def __init__(self, in_channels: int, num_classes: int, r: float = 10.0) -> None:
        super().__init__(in_channels, num_classes)
        if not r > 0:
            raise InputError(f"LSE pooling needs r > 0 (got {r})")
        self.r = float(r)

    def pool(self, maps: Tensor) -> Tensor:
        """Log-sum-exp pooling, computed stably with ``torch.logsumexp``."""
        flat = maps.flatten(2)
        return (torch.logsumexp(self.r * flat, dim=2) - math.log(flat.shape[2])) / self.r


def _count(k: float, n: int) -> int:
    """Number of positions selected by ``k``: a fraction of ``n`` when ``0 < k < 1``, else a count.

    ``k <= 0`` selects none; any ``k > 0`` selects at least one position and at most ``n``.
    """
    if k <= 0:
        return 0
    if k < 1:
        return min(n, max(1, round(k * n)))
    return min(n, int(k))


def wildcat_pool(maps: Tensor, kmax: float, kmin: float, alpha: float) -> Tensor:
    """WILDCAT spatial pooling of class maps.

    Args:
        maps: ``(B, K, h, w)``.
        kmax: positions of highest value per class: a fraction of h·w if in (0, 1), else a count.
        kmin: positions of lowest value per class, same convention; 0 disables the min term.
        alpha: weight of the min term.

    Returns:
        ``(B, K)``: mean of the top-kmax values + alpha · mean of the bottom-kmin values.
    """
    flat = maps.flatten(2)
    n = flat.shape[2]
    n_max = _count(kmax, n)
    scores = flat.topk(n_max, dim=2, largest=True, sorted=False).values.mean(dim=2)
    n_min = _count(kmin, n)
    if n_min > 0 and alpha != 0:
        low = flat.topk(n_min, dim=2, largest=False, sorted=False).values.mean(dim=2)
        scores = scores + alpha * low
    return scores


class WildcatHead(Head):
    """WILDCAT: 1×1 conv to K·M modality maps, class-wise mean over M, top/bottom-k pooling.

    Args:
        in_channels: channels of the features.
        num_classes: number of classes K.
        modalities: maps per class M.
        kmax: top positions per class (fraction of h·w if in (0, 1), else a count).
        kmin: bottom positions per class (same convention); 0 reproduces the original code, which
            discards the min term.
        alpha: weight of the min term.
        dropout: dropout probability on the features before the 1×1 conv.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        modalities: int = 5,
        kmax: float = 0.5,
        kmin: float = 0.1,
        alpha: float = 0.6,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(in_channels, num_classes)
        if modalities < 1 or not kmax > 0 or kmin < 0 or not 0 <= dropout < 1:
            raise InputError(
                "WILDCAT needs modalities >= 1, kmax > 0, kmin >= 0 and 0 <= dropout < 1 "
                f"(got {modalities}, {kmax}, {kmin}, {dropout})"
            )
        self.modalities = int(modalities)
        self.kmax, self.kmin, self.alpha = float(kmax), float(kmin), float(alpha)
        self.dropout = nn.Dropout(dropout)
        self.conv = nn.Conv2d(in_channels, num_classes * self.modalities, kernel_size=1)

    def cams(self, features: Tensor) -> Tensor:
        """Class maps: mean over each class's M modality maps."""
        maps = self.conv(self.dropout(features))
        b, _, h, w = maps.shape
        return maps.view(b, self.num_classes, self.modalities, h, w).mean(dim=2)

    def forward(self, features: Tensor) -> Tensor:
        """Logits = WILDCAT pooling of the class maps."""
        return wildcat_pool(self.cams(features), self.kmax, self.kmin, self.alpha)


class MILHead(Head):
    """Deep-MIL attention pooling (Ilse et al., ICML 2018) over the spatial positions.

    Each position's feature vector h_i is an instance; attention a_i = softmax_i(wᵀ tanh(V h_i)) (times
    sigmoid(U h_i) when gated); the bag embedding z = Σ a_i h_i is classified by ``Linear(C, K)``.
    Because the classifier is linear, logits = Σ_i a_i (W h_i) + b; :meth:`cams` returns the per-position
    terms a_i (W h_i), so ``cams.sum(spatial) + bias == logits``. :meth:`attention` gives the
    class-agnostic attention map.

    Args:
        in_channels: channels of the features.
        num_classes: number of classes K.
        mid_channels: hidden size of the attention network.
        gated: use the gated attention variant.
    """

    def __init__(
        self, in_channels: int, num_classes: int, mid_channels: int = 128, gated: bool = False
    ) -> None:
        super().__init__(in_channels, num_classes)
        if mid_channels < 1:
            raise InputError(f"Deep-MIL needs mid_channels >= 1 (got {mid_channels})")
        self.attention_v = nn.Linear(in_channels, mid_channels)
        self.attention_u = nn.Linear(in_channels, mid_channels) if gated else None
        self.attention_w = nn.Linear(mid_channels, 1)
        self.fc = nn.Linear(in_channels, num_classes)

    def _weights(self, instances: Tensor) -> Tensor:
        hidden = torch.tanh(self.attention_v(instances))
        if self.attention_u is not None:
            hidden = hidden * torch.sigmoid(self.attention_u(instances))
        return torch.softmax(self.attention_w(hidden).squeeze(-1), dim=1)  # (B, n)

    def attention(self, features: Tensor) -> Tensor:
        """Attention weights ``(B, h, w)`` (they sum to 1 over each image's positions)."""
        b, _, h, w = features.shape
        return self._weights(features.flatten(2).transpose(1, 2)).view(b, h, w)

    def forward(self, features: Tensor) -> Tensor:
        """Logits of the attention-pooled bag embedding."""
        instances = features.flatten(2).transpose(1, 2)  # (B, n, C)
        weights = self._weights(instances)
        return self.fc(torch.bmm(weights.unsqueeze(1), instances).squeeze(1))

    def cams(self, features: Tensor) -> Tensor:
        """Attention-weighted class scores per position: a_i · (W h_i), no bias."""
        b, _, h, w = features.shape
        instances = features.flatten(2).transpose(1, 2)
        weights = self._weights(instances)  # (B, n)
        scores = instances @ self.fc.weight.t()  # (B, n, K)
        return (scores * weights.unsqueeze(-1)).transpose(1, 2).reshape(b, self.num_classes, h, w)


_HEAD_CLASSES: dict[str, type[Head]] = {
    "wgap": WGAPHead,
    "gap": GAPHead,
    "max": MaxHead,
    "lse": LSEHead,
    "wildcat": WildcatHead,
    "mil": MILHead,
}


def build_head(name: str, in_channels: int, num_classes: int, **opts: float | int | bool) -> Head:
    """Build a classification head.

    Args:
        name: one of :data:`HEADS`.
        in_channels: channels of the CAM-layer features.
        num_classes: number of classes K.
        **opts: head options: ``lse``: ``r``; ``wildcat``: ``modalities``, ``kmax``, ``kmin``, ``alpha``,
            ``dropout``; ``mil``: ``mid_channels``, ``gated``. The other heads take none.

    Returns:
        The head: ``forward(features)`` → ``(B, K)`` logits, ``cams(features)`` → ``(B, K, h, w)``.

    Raises:
        InputError: unknown head, unknown option for that head, or an invalid option value.
    """
    if name not in _HEAD_CLASSES:
        raise InputError(f"unknown head {name!r}; choose one of {', '.join(HEADS)}")
    cls = _HEAD_CLASSES[name]
    fixed = ("self", "in_channels", "num_classes")
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p not in fixed]
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise InputError(
            f"head {name!r} has no option {', '.join(unknown)}; "
            f"its options: {', '.join(allowed) if allowed else 'none'}"
        )
    return cls(in_channels, num_classes, **opts)
