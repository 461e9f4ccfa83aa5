"""k-NN refinement of a model's map: each pixel takes the model's map of its look-alike pixels.

``train-decoder --refine knn`` attaches a :class:`KNNRefiner` to the NEGEV model, and
``train-classifier --method maxmin --refine knn`` to the Max-Min model. Its bank is a
:class:`FeatureBank` of training pixels (the encoder's last two stages, the
same keys as the k-NN seed map; ``models export --knn-stages`` keys it on more) whose values
are the trained model's own map on those training images (NEGEV: the decoder's foreground
probability; Max-Min: the localizer's mask M; average-pooled to the CAM layer's resolution).
At inference each pixel's map is the mean value of its ``k`` most similar bank pixels,
upsampled bilinearly, blended with the model's own map:
``(1 − alpha)·map + alpha·k-NN``.

The k-NN map averages the decoder's verdicts over look-alike tissue of many images (on GlaS it
scores above the decoder itself: docs/results.md). It lives at the CAM
layer's resolution (stride 8 for the stride-8 backbones), or on a grid ``grid`` times finer
(``models export --knn-grid 2``: stride 4, the coarser stages' projections upsampled
bilinearly, for four times the lookup); ``alpha`` < 1 keeps the decoder's finer boundaries in
the blend.

The bank is part of the model's state (buffers): the checkpoint stays self-contained and is
loaded with ``weights_only=True``. Buffers start empty and take the shapes of the state they
are loaded from.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

__all__ = ["FeatureBank", "KNNRefiner", "embed_keys", "embed_stages"]

#: bytes of one (block × bank) similarity block: small enough to stay in a CPU's cache between
#: the matrix product that writes it and the top-k that reads it (docs/results.md, *The
#: forward's own waste*)
_BLOCK_BYTES = 8 << 20
#: fewest query pixels per block on a CPU, however large the bank
_MIN_BLOCK = 64
#: query pixels per block on a GPU (bounds the similarity matrix's memory there)
_GPU_BLOCK = 2048
#: grid cells looked up around those a :meth:`KNNRefiner.looking_up` mask touches: the bilinear
#: upsampling of the map reads one cell beyond, and one more keeps the map on a mask's edge whole
LOOKUP_MARGIN = 2


def _block_rows(bank_size: int, device: torch.device) -> int:
    """Query pixels per similarity block for a bank of ``bank_size`` keys on ``device``."""
    if device.type != "cpu":
        return _GPU_BLOCK
    return max(_MIN_BLOCK, _BLOCK_BYTES // (4 * max(1, bank_size)))


def _stage_pixels(stages: list[Tensor], size: tuple[int, int], n: int = 2) -> list[Tensor]:
    """The last ``n`` stages at ``size`` as (B·h·w, C) rows, L2-normalised per pixel.

    A stage finer than ``size`` is average-pooled to it, then normalised; a coarser one (a
    query grid finer than the CAM layer: :attr:`FeatureBank.grid`) is normalised, then
    upsampled bilinearly.
    """
    if not 1 <= n <= len(stages):
        raise ValueError(f"the keys need the encoder's last {n} stages; it gives {len(stages)}")
    out = []
    for s in stages[-n:]:
        s = s.detach().float()
        if s.shape[-2] < size[0] or s.shape[-1] < size[1]:
            s = F.interpolate(
                F.normalize(s, dim=1), size=size, mode="bilinear", align_corners=False
            )
        else:
            if tuple(s.shape[-2:]) != size:
                s = F.adaptive_avg_pool2d(s, size)
            s = F.normalize(s, dim=1)
        out.append(s.permute(0, 2, 3, 1).reshape(-1, s.shape[1]))
    return out


def embed_keys(pixels: list[Tensor], projections: list[tuple[Tensor, Tensor]]) -> Tensor:
    """Keys (N,D): each stage's rows projected, normalised, concatenated (scaled to norm 1)."""
    parts = [F.normalize((p - m) @ v, dim=1) for p, (m, v) in zip(pixels, projections, strict=True)]
    return torch.cat(parts, dim=1) / math.sqrt(len(parts))


def embed_stages(
    stages: list[Tensor], projections: list[tuple[Tensor, Tensor]], size: tuple[int, int]
) -> Tensor:
    """``embed_keys(_stage_pixels(stages, size, n), projections)``, computed faster.

    A stage coarser than ``size`` is projected at its own resolution and the projection
    upsampled (projection and bilinear interpolation commute), instead of upsampling all of
    its channels (1,280 for MobileNetV2's last stage) and projecting each upsampled pixel.
    """
    n = len(projections)
    if not 1 <= n <= len(stages):
        raise ValueError(f"the keys need the encoder's last {n} stages; it gives {len(stages)}")
    parts = []
    for s, (m, v) in zip(stages[-n:], projections, strict=True):
        s = s.detach().float()
        if s.shape[-2] < size[0] or s.shape[-1] < size[1]:
            b, c, h, w = s.shape
            rows = F.normalize(s, dim=1).permute(0, 2, 3, 1).reshape(-1, c)
            low = ((rows - m) @ v).view(b, h, w, -1).permute(0, 3, 1, 2)
            up = F.interpolate(low, size=size, mode="bilinear", align_corners=False)
            proj = up.permute(0, 2, 3, 1).reshape(-1, up.shape[1])
        else:
            (rows,) = _stage_pixels([s], size, 1)
            proj = (rows - m) @ v
        parts.append(F.normalize(proj, dim=1))
    return torch.cat(parts, dim=1) / math.sqrt(n)


@dataclass
class FeatureBank:
    """Training pixels' keys (N,D), seed-map values (N,) and owning image indices (N,)."""

    keys: Tensor
    values: Tensor
    owners: Tensor
    #: per stage: (mean (C,), principal axes (C,q)) of the projection
    projections: list[tuple[Tensor, Tensor]]
    #: keys on a grid this many times finer than the CAM layer's (queries on the same grid)
    grid: int = 1

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def to(self, device: torch.device | str) -> FeatureBank:
        """The bank on ``device`` (itself when already there)."""
        if self.keys.device == torch.device(device):
            return self
        return FeatureBank(
            self.keys.to(device),
            self.values.to(device),
            self.owners.to(device),
            [(m.to(device), v.to(device)) for m, v in self.projections],
            self.grid,
        )

    def embed(self, pixels: list[Tensor]) -> Tensor:
        """Keys (N,D) of per-stage normalised pixel rows (the bank's projection)."""
        return embed_keys(pixels, self.projections)

    @torch.no_grad()
    def neighbour_means(
        self,
        stages: list[Tensor],
        k: int,
        owners: Tensor | None = None,
        where: Tensor | None = None,
    ) -> Tensor:
        """(B,h,w) mean bank value of each pixel's ``k`` nearest keys, on the bank's grid.

        The grid is the last stage's (the CAM layer's) times :attr:`grid`.

        ``owners``: (B,) training-set index of each image; bank pixels of the same image are
        never neighbours (None or −1: no exclusion). ``k`` is capped at the bank's size minus one
        image's pixels. ``where``: (B,h,w) bool on the bank's grid, the pixels to look up; the
        others are 0, the value of glass in a bank that holds some (None: every pixel).
        """
        if len(self) == 0:
            raise RuntimeError("the k-NN bank is empty")
        b, _, h, w = stages[-1].shape
        h, w = h * self.grid, w * self.grid
        queries = embed_stages(stages, self.projections, (h, w))
        own = None if owners is None else owners.to(queries.device).repeat_interleave(h * w)
        picked = None
        if where is not None:
            picked = where.to(queries.device).reshape(-1).nonzero()[:, 0]
            queries = queries[picked]
            own = None if own is None else own[picked]
        k = max(1, min(int(k), len(self) - int((self.owners == self.owners[0]).sum())))
        means = [self.values.new_zeros(0)]
        step = _block_rows(len(self), queries.device)
        for i in range(0, queries.shape[0], step):
            sim = queries[i : i + step] @ self.keys.T
            if own is not None:  # no comparison over the whole bank when nothing is excluded
                sim.masked_fill_(own[i : i + step, None] == self.owners[None], -math.inf)
            idx = sim.topk(k, dim=1, sorted=False).indices  # their mean: any order
            means.append(self.values[idx].mean(1))
        if picked is None:
            return torch.cat(means).view(b, h, w)
        out = self.values.new_zeros(b * h * w)
        out[picked] = torch.cat(means)
        return out.view(b, h, w)

    @torch.no_grad()
    def smoothed_maps(
        self, stages: list[Tensor], owners: Tensor, k: int, size: tuple[int, int]
    ) -> Tensor:
        """Seed maps (B,H,W) in [0,1]: the mean bank value of each pixel's ``k`` nearest keys.

        Args:
            stages: the frozen encoder's stages of the (augmented) images; the last one is the
                CAM layer, whose resolution the neighbours are found at.
            owners: (B,) training-set index of each image (−1: not a training image); bank
                pixels of the same image are never neighbours.
            k: neighbours per pixel (capped at the bank's size minus one image's pixels).
            size: output size (H,W); maps are upsampled bilinearly, then min-max normalised
                per image.
        """
        maps = self.neighbour_means(stages, k, owners)
        maps = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        lo = maps.amin(dim=(1, 2), keepdim=True)
        hi = maps.amax(dim=(1, 2), keepdim=True)
        return ((maps - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)


class KNNRefiner(nn.Module):
    """Bank of training pixels labelled by the model's map, and the blend of its k-NN map.

    Args:
        k: neighbours per pixel.
        alpha: weight of the k-NN map in the blend (1: the k-NN map alone).
        n_stages: encoder stages in the keys (the bank's projections; 2 for
            :func:`histo_wsl.methods.knn.build_feature_bank`).
        grid: the bank's grid, in steps finer than the CAM layer's (:attr:`FeatureBank.grid`).
    """

    def __init__(self, k: int = 128, alpha: float = 1.0, n_stages: int = 2, grid: int = 1) -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if grid < 1:
            raise ValueError(f"grid must be >= 1, got {grid}")
        self.k, self.alpha, self.n_stages = int(k), float(alpha), int(n_stages)
        self.grid = int(grid)
        #: the input pixels whose map is needed (B,H,W) bool, for the next calls; None: all
        #: (:meth:`looking_up`)
        self.where: Tensor | None = None
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
        self.grid = int(bank.grid)
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
        return FeatureBank(self.keys, self.values, self.owners, projections, self.grid)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        # empty buffers take the shapes (and dtypes) of the state being loaded
        for name, buf in self._buffers.items():
            incoming = state_dict.get(prefix + name)
            if buf is not None and incoming is not None and incoming.shape != buf.shape:
                self._buffers[name] = torch.empty_like(incoming, device=buf.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @contextmanager
    def looking_up(self, where: Tensor | None) -> Iterator[None]:
        """Within the block, look up only the grid cells that ``where`` needs.

        ``where``: (B,H,W) bool at any resolution, the input pixels whose map is needed; the
        cells it touches and :data:`LOOKUP_MARGIN` cells around them (which the bilinear
        upsampling reads) are looked up, the others are 0 (None: every cell).
        """
        self.where = where
        try:
            yield
        finally:
            self.where = None

    def _cells(self, grid_size: tuple[int, int]) -> Tensor | None:
        """The cells of the bank's grid to look up (B,h,w) bool, from :attr:`where`."""
        if self.where is None:
            return None
        where = self.where[:, None].float()
        cells = F.adaptive_max_pool2d(where, grid_size)
        m = LOOKUP_MARGIN
        cells = F.max_pool2d(cells, 2 * m + 1, stride=1, padding=m)
        return cells[:, 0] > 0

    @torch.no_grad()
    def knn_map(self, stages: list[Tensor], size: tuple[int, int]) -> Tensor:
        """(B,H,W) mean bank value of each pixel's ``k`` nearest bank pixels, upsampled.

        Within :meth:`looking_up`, the cells away from its pixels are 0 (not looked up).
        """
        if not self.ready:
            raise RuntimeError(
                "the k-NN refiner has no bank (training with --refine knn builds it)"
            )
        h, w = stages[-1].shape[-2:]
        cells = self._cells((h * self.grid, w * self.grid))
        means = self.bank.neighbour_means(stages, self.k, where=cells)
        return F.interpolate(means[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]

    def forward(self, own_map: Tensor, stages: list[Tensor]) -> Tensor:
        """The blend ``(1 − alpha)·own_map + alpha·k-NN map`` (B,H,W) in [0,1]."""
        if self.alpha == 0.0:
            return own_map
        knn = self.knn_map(stages, tuple(own_map.shape[-2:])).to(own_map.dtype)
        return ((1.0 - self.alpha) * own_map + self.alpha * knn).clamp(0.0, 1.0)
