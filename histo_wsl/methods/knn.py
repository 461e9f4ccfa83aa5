"""Seed maps smoothed over look-alike pixels: a k-nearest-neighbour regression of the CAM.

The stage-1 CAM scores each pixel from its own features only, and on GlaS it misses whole glands
that look like the glands it finds. ``train-decoder --seed-map knn`` draws the seeds from a
smoothed map instead: each pixel of the augmented crop gets the mean CAM value of its ``k`` most
similar pixels of *other* training images, similarity being the cosine of the frozen encoder's
features. Tissue that looks alike then gets alike evidence, whichever image it is in.

The bank is built once, before the first step, from the training images at the evaluation
preset (resized, no augmentation):

- features: the encoder's last two stages at the CAM layer's resolution (a finer stage is
  average-pooled to it), each L2-normalised, projected on its first ``dims`` principal axes (fitted
  on the bank's pixels), normalised again and concatenated (scaled by 1/√2, so that keys have norm 1);
- values: the map the seeds would otherwise be drawn from: the CAM of the image's true class
  (per-image min-max normalised, as for the seeds), or a ``--seed-teacher``'s foreground
  probability (average-pooled to the CAM layer's resolution); every pixel of an image of the
  negative class has value 0 (it is background by definition);
- owners: each pixel's training-set index, so that a crop never draws on its own image.

At most ``max_pixels`` pixels are kept, the same number drawn from every image (seeded). The
bank is deterministic given the classifier, the data and the seed, so ``--resume`` rebuilds it.
It is not saved: the decoder checkpoint does not need it at inference.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from histo_wsl.data.images import LabelledImages, eval_transform
from histo_wsl.data.sources import Dataset
from histo_wsl.networks.cams import compute_cams
from histo_wsl.training.config import TrainConfig

__all__ = ["FeatureBank", "TrainSplitBanks", "build_feature_bank"]

#: query pixels per similarity block (bounds the (block × bank) similarity matrix's memory)
_BLOCK = 2048


def _stage_pixels(stages: list[Tensor], size: tuple[int, int]) -> list[Tensor]:
    """The last two stages at ``size``, L2-normalised per pixel, as (B·h·w, C) rows."""
    out = []
    for s in stages[-2:]:
        s = s.detach().float()
        if tuple(s.shape[-2:]) != size:
            s = F.adaptive_avg_pool2d(s, size)
        s = F.normalize(s, dim=1)
        out.append(s.permute(0, 2, 3, 1).reshape(-1, s.shape[1]))
    return out


@dataclass
class FeatureBank:
    """Training pixels' keys (N,D), seed-map values (N,) and owning image indices (N,)."""

    keys: Tensor
    values: Tensor
    owners: Tensor
    #: per stage: (mean (C,), principal axes (C,q)) of the projection
    projections: list[tuple[Tensor, Tensor]]

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
        )

    def embed(self, pixels: list[Tensor]) -> Tensor:
        """Keys (N,D) of per-stage normalised pixel rows (the bank's projection)."""
        parts = [
            F.normalize((p - m) @ v, dim=1)
            for p, (m, v) in zip(pixels, self.projections, strict=True)
        ]
        return torch.cat(parts, dim=1) / math.sqrt(len(parts))

    @torch.no_grad()
    def neighbour_means(self, stages: list[Tensor], k: int, owners: Tensor | None = None) -> Tensor:
        """(B,h,w) mean bank value of each pixel's ``k`` nearest keys, at the last stage's size.

        ``owners``: (B,) training-set index of each image; bank pixels of the same image are
        never neighbours (None or −1: no exclusion). ``k`` is capped at the bank's size minus one
        image's pixels.
        """
        if len(self) == 0:
            raise RuntimeError("the k-NN bank is empty")
        b, _, h, w = stages[-1].shape
        queries = self.embed(_stage_pixels(stages, (h, w)))
        own = None if owners is None else owners.to(queries.device).repeat_interleave(h * w)
        k = max(1, min(int(k), len(self) - int((self.owners == self.owners[0]).sum())))
        means = []
        for i in range(0, queries.shape[0], _BLOCK):
            sim = queries[i : i + _BLOCK] @ self.keys.T
            if own is not None:  # no comparison over the whole bank when nothing is excluded
                sim.masked_fill_(own[i : i + _BLOCK, None] == self.owners[None], -math.inf)
            idx = sim.topk(k, dim=1).indices
            means.append(self.values[idx].mean(1))
        return torch.cat(means).view(b, h, w)

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


@torch.no_grad()
def build_feature_bank(
    classifier: nn.Module,
    images: torch.utils.data.Dataset,
    *,
    values: Callable[[Tensor, Tensor, list[Tensor]], Tensor] | None = None,
    negative: int | None = None,
    cam_method: str = "cam",
    max_pixels: int = 16384,
    dims: int = 64,
    seed: int = 0,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
) -> FeatureBank:
    """Bank of training pixels for :meth:`FeatureBank.smoothed_maps`.

    Args:
        classifier: the frozen stage-1 classifier (``backbone`` returning its stages, CAM head).
        images: the training images at the evaluation preset; items are dicts with ``image``,
            ``label`` and ``index`` (the owner recorded for every pixel).
        values: ``(images, labels, stages) -> (B,H,W)`` maps in [0,1] whose values the bank
            holds (average-pooled to the CAM layer's resolution); None: the CAM of the true class
            with ``cam_method``.
        negative: index of the negative class: its images' pixels get value 0 (None: no such
            class).
        cam_method: CAM method of the values (as for the seeds; without ``values``).
        max_pixels: most pixels kept; each image gives the same number, drawn at random.
        dims: principal axes kept per stage (at most the stage's channels).
        seed: seed of the pixel draw.
        batch_size: images per forward pass.
        device: where the forward passes run and the bank lives.
    """
    n_images = len(images)
    if n_images < 2:
        raise ValueError("the k-NN seed map needs at least 2 training images")
    gen = torch.Generator().manual_seed(seed)
    classifier = classifier.to(device).eval()
    pixels: list[list[Tensor]] = [[], []]
    kept, owners = [], []
    per_image = None
    for start in range(0, n_images, batch_size):
        items = [images[i] for i in range(start, min(start + batch_size, n_images))]
        x = torch.stack([it["image"] for it in items]).to(device)
        y = torch.as_tensor([int(it["label"]) for it in items], device=device)
        own = torch.as_tensor([int(it["index"]) for it in items])
        stages = classifier.forward_features(x)
        h, w = stages[-1].shape[-2:]
        if values is None:
            cams = compute_cams(
                classifier, x, y, method=cam_method, size=(h, w), features=stages[-1]
            )
        else:
            cams = F.adaptive_avg_pool2d(values(x, y, stages).detach().float()[:, None], (h, w))
            cams = cams[:, 0]
        if negative is not None:
            cams[y == negative] = 0.0
        if per_image is None:
            per_image = max(1, min(h * w, max_pixels // n_images))
        keep = torch.stack([torch.randperm(h * w, generator=gen)[:per_image] for _ in items])
        keep = keep.to(device)
        rows = (torch.arange(len(items), device=device)[:, None] * (h * w) + keep).reshape(-1)
        for j, p in enumerate(_stage_pixels(stages, (h, w))):
            pixels[j].append(p[rows])
        kept.append(cams.reshape(-1)[rows])
        owners.append(own.repeat_interleave(per_image).to(device))
    stage_rows = [torch.cat(p) for p in pixels]
    projections = []
    for p in stage_rows:
        mean = p.mean(0)
        q = max(1, min(int(dims), p.shape[1]))
        centred = (p - mean).double()
        # exact principal axes (eigenvectors of the C×C covariance): deterministic, and no
        # draw from the global random stream that the training run's seeds depend on
        _, vecs = torch.linalg.eigh(centred.T @ centred / max(1, p.shape[0] - 1))
        projections.append((mean, vecs[:, -q:].flip(1).to(p.dtype)))
    bank = FeatureBank(torch.empty(0), torch.cat(kept), torch.cat(owners), projections)
    bank.keys = bank.embed(stage_rows)
    return bank


class TrainSplitBanks:
    """Builds k-NN banks of a training run's ``train`` split with the run's settings.

    The images (evaluation preset: resized to ``crop_size``, no augmentation) are decoded at the
    first build and kept, so a bank rebuilt at every evaluation reads no file again. Each bank has
    ``--knn-bank`` pixels, ``--knn-dims`` axes, the run's seed, and without ``values`` the CAM
    of ``--cam-method``; pixels of the negative class get value 0.
    """

    def __init__(self, ds: Dataset, cfg: TrainConfig, negative: int | None = None) -> None:
        self.ds, self.cfg, self.negative = ds, cfg, negative
        self._images: LabelledImages | None = None

    def build(
        self,
        model: nn.Module,
        values: Callable[[Tensor, Tensor, list[Tensor]], Tensor] | None = None,
        device: torch.device | str = "cpu",
    ) -> FeatureBank:
        """A bank over ``model``'s ``forward_features``; ``values`` as for :func:`build_feature_bank`."""
        if self._images is None:
            self._images = LabelledImages(
                self.ds.split("train"), self.cfg.crop_size, eval_transform()
            )
        cfg = self.cfg
        return build_feature_bank(
            model,
            self._images,
            values=values,
            negative=self.negative,
            cam_method=cfg.cam_method,
            max_pixels=cfg.knn_bank,
            dims=cfg.knn_dims,
            seed=cfg.seed,
            device=device,
        )
