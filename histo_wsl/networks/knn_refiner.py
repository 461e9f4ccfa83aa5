"""k-NN refinement of a NEGEV map: each pixel takes the decoder's map of its look-alike pixels.

``train-decoder --refine knn`` attaches a :class:`KNNRefiner` to the NEGEV model. Its bank is a
:class:`histo_wsl.seed_bank.FeatureBank` of training pixels (the frozen encoder's last two
stages, the same keys as the k-NN seed map) whose values are the trained decoder's foreground
probability on those training images (average-pooled to the CAM layer's resolution). At
inference each pixel's map is the mean value of its ``k`` most similar bank pixels, upsampled
bilinearly, blended with the decoder's own map: ``(1 − alpha)·decoder + alpha·k-NN``.

The k-NN map averages the decoder's verdicts over look-alike tissue of many images (on GlaS it
scores above the decoder itself: README, "Train the NEGEV decoder"). It lives at the CAM
layer's resolution (stride 8 for the stride-8 backbones); ``alpha`` < 1 keeps the decoder's finer
boundaries in the blend.

The bank is part of the model's state (buffers): the checkpoint stays self-contained and is
loaded with ``weights_only=True``. Buffers start empty and take the shapes of the state they
are loaded from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from histo_wsl.seed_bank import FeatureBank

__all__ = ["KNNRefiner"]


class KNNRefiner(nn.Module):
    """Bank of training pixels labelled by the decoder, and the blend of its k-NN map.

    Args:
        k: neighbours per pixel.
        alpha: weight of the k-NN map in the blend (1: the k-NN map alone).
        n_stages: encoder stages in the keys (the bank's projections; 2 for
            :func:`histo_wsl.seed_bank.build_feature_bank`).
    """

    def __init__(self, k: int = 128, alpha: float = 1.0, n_stages: int = 2) -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.k, self.alpha, self.n_stages = int(k), float(alpha), int(n_stages)
        self.register_buffer("keys", torch.zeros(0, 0))
        self.register_buffer("values", torch.zeros(0))
        self.register_buffer("owners", torch.zeros(0, dtype=torch.long))
        for i in range(self.n_stages):
            self.register_buffer(f"mean{i}", torch.zeros(0))
            self.register_buffer(f"axes{i}", torch.zeros(0, 0))

    @property
    def ready(self) -> bool:
        """Whether the bank holds pixels."""
        return self.values.numel() > 0

    def __len__(self) -> int:
        return int(self.values.numel())

    def set_bank(self, bank: FeatureBank) -> None:
        """Hold ``bank``'s keys, values, owners and projections (on this module's device)."""
        if len(bank.projections) != self.n_stages:
            raise ValueError(
                f"the bank has {len(bank.projections)} stage projections, expected {self.n_stages}"
            )
        device = self.values.device
        self.keys = bank.keys.detach().to(device)
        self.values = bank.values.detach().float().to(device)
        self.owners = bank.owners.detach().to(device)
        for i, (mean, axes) in enumerate(bank.projections):
            setattr(self, f"mean{i}", mean.detach().to(device))
            setattr(self, f"axes{i}", axes.detach().to(device))

    @property
    def bank(self) -> FeatureBank:
        """The held bank as a :class:`FeatureBank` (views of the buffers)."""
        projections = [
            (getattr(self, f"mean{i}"), getattr(self, f"axes{i}")) for i in range(self.n_stages)
        ]
        return FeatureBank(self.keys, self.values, self.owners, projections)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        # empty buffers take the shapes (and dtypes) of the state being loaded
        for name, buf in self._buffers.items():
            incoming = state_dict.get(prefix + name)
            if buf is not None and incoming is not None and incoming.shape != buf.shape:
                self._buffers[name] = torch.empty_like(incoming, device=buf.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def knn_map(self, stages: list[Tensor], size: tuple[int, int]) -> Tensor:
        """(B,H,W) mean decoder value of each pixel's ``k`` nearest bank pixels, upsampled."""
        if not self.ready:
            raise RuntimeError("the k-NN refiner has no bank (train-decoder builds it)")
        means = self.bank.neighbour_means(stages, self.k)
        return F.interpolate(means[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]

    def forward(self, decoder_map: Tensor, stages: list[Tensor]) -> Tensor:
        """The blend ``(1 − alpha)·decoder_map + alpha·k-NN map`` (B,H,W) in [0,1]."""
        if self.alpha == 0.0:
            return decoder_map
        knn = self.knn_map(stages, tuple(decoder_map.shape[-2:])).to(decoder_map.dtype)
        return ((1.0 - self.alpha) * decoder_map + self.alpha * knn).clamp(0.0, 1.0)
