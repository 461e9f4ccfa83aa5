"""k-NN refinement of a model's map: each pixel takes the model's map of its look-alike pixels.

``train-decoder --refine knn`` attaches a :class:`KNNRefiner` to the NEGEV model, and
``train-classifier --method maxmin --refine knn`` to the Max-Min model. Its bank is a
:class:`histo_wsl.methods.knn.FeatureBank` of training pixels (the encoder's last two stages, the
same keys as the k-NN seed map) whose values are the trained model's own map on those training
images (NEGEV: the decoder's foreground probability; Max-Min: the localizer's mask M;
average-pooled to the CAM layer's resolution). At inference each pixel's map is the mean value of
its ``k`` most similar bank pixels, upsampled bilinearly, blended with the model's own map:
``(1 − alpha)·map + alpha·k-NN``.

The k-NN map averages the decoder's verdicts over look-alike tissue of many images (on GlaS it
scores above the decoder itself: docs/results.md). It lives at the CAM
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

from histo_wsl.methods.knn import FeatureBank
from histo_wsl.training.config import TrainConfig

__all__ = ["REFINEMENTS", "KNNRefiner", "refine_card", "refine_checks"]

#: refinements of the saved model's map (``--refine``)
REFINEMENTS = ("none", "knn")


def refine_checks(cfg: TrainConfig, n_train: int, bank: bool) -> list[tuple[bool, str]]:
    """(ok, message) pairs for ``--refine`` and, when a k-NN bank is used, the ``--knn-*`` options.

    Args:
        cfg: the training settings.
        n_train: training images (a bank needs 2: a pixel's neighbours come from other images).
        bank: whether the run builds a k-NN bank (``--refine knn`` or ``--seed-map knn``).
    """
    checks = [
        (cfg.refine in REFINEMENTS, f"--refine must be one of {REFINEMENTS} (got {cfg.refine!r})"),
        (
            0.0 <= cfg.refine_alpha <= 1.0,
            f"--refine-alpha must be in [0, 1] (got {cfg.refine_alpha})",
        ),
    ]
    if bank:
        checks += [
            (cfg.knn_k >= 1, f"--knn-k must be >= 1 (got {cfg.knn_k})"),
            (cfg.knn_bank >= 1, f"--knn-bank must be >= 1 (got {cfg.knn_bank})"),
            (cfg.knn_dims >= 1, f"--knn-dims must be >= 1 (got {cfg.knn_dims})"),
            (n_train >= 2, "--seed-map knn and --refine knn need at least 2 training images"),
        ]
    return checks


def refine_card(cfg: TrainConfig, bank_pixels: int | None, values: str, stages: int = 2) -> dict:
    """The model card's ``refine`` entry (``{"method": "none"}`` unless ``--refine knn``).

    Args:
        cfg: the training settings (k, alpha, bank size and seed).
        bank_pixels: pixels in the refiner's bank (None: not built yet).
        values: what the bank's values are, in words.
        stages: encoder stages in the keys (the refiner's ``n_stages``).
    """
    if cfg.refine != "knn":
        return {"method": "none"}
    return {
        "method": "knn",
        "k": cfg.knn_k,
        "alpha": cfg.refine_alpha,
        "stages": stages,
        "bank_pixels": bank_pixels,
        "dims": cfg.knn_dims,
        "bank_seed": cfg.seed,
        "values": values,
    }


class KNNRefiner(nn.Module):
    """Bank of training pixels labelled by the model's map, and the blend of its k-NN map.

    Args:
        k: neighbours per pixel.
        alpha: weight of the k-NN map in the blend (1: the k-NN map alone).
        n_stages: encoder stages in the keys (the bank's projections; 2 for
            :func:`histo_wsl.methods.knn.build_feature_bank`).
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
        """(B,H,W) mean bank value of each pixel's ``k`` nearest bank pixels, upsampled."""
        if not self.ready:
            raise RuntimeError(
                "the k-NN refiner has no bank (training with --refine knn builds it)"
            )
        means = self.bank.neighbour_means(stages, self.k)
        return F.interpolate(means[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]

    def forward(self, own_map: Tensor, stages: list[Tensor]) -> Tensor:
        """The blend ``(1 − alpha)·own_map + alpha·k-NN map`` (B,H,W) in [0,1]."""
        if self.alpha == 0.0:
            return own_map
        knn = self.knn_map(stages, tuple(own_map.shape[-2:])).to(own_map.dtype)
        return ((1.0 - self.alpha) * own_map + self.alpha * knn).clamp(0.0, 1.0)
