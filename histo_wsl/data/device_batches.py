"""The training set decoded once and kept on the training device, batches augmented there.

``--data-on-device``: a GPU trains MobileNetV2 on a GlaS batch in milliseconds, and a data loader
that decodes, crops and jitters every image on the CPU each epoch (its workers forked anew) keeps
it waiting for most of the run. Here the preloaded images of a :class:`LabelledImages` (uint8,
already resized) are stacked onto the device once; each batch is then cropped and flipped there
per sample in one indexing operation, colour-jittered per sample with the training preset's own
:class:`~torchvision.transforms.v2.ColorJitter` and normalised as a batch. Same transform, same
batch keys as the data loader; the random draws come from torch's generator, seeded per epoch by
the engine like the loader's.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torchvision.transforms import v2

from histo_wsl.data.images import IMAGENET_MEAN, IMAGENET_STD, LabelledImages, jitter_transform

__all__ = ["DeviceBatches"]


class DeviceBatches:
    """Batches of a preloaded :class:`LabelledImages`, kept and augmented on ``device``.

    Args:
        dataset: the training images (``preload=True``: their decoded cache is what moves).
        device: where the images stay and the batches are made.
        crop: side of the random crop (the training preset's ``crop_size``).
        jitter: colour jitter as the training preset (brightness, contrast, saturation .5, hue
            .05), drawn per sample.
    """

    def __init__(
        self, dataset: LabelledImages, device: torch.device, crop: int, jitter: bool = True
    ) -> None:
        cache = dataset.cached()
        self.images = torch.stack([c[0] for c in cache]).to(device)  # N,3,S,S uint8
        self.masks = torch.stack([c[1] for c in cache]).to(device)  # N,S,S uint8
        self.labels = torch.tensor([s.label for s in dataset.samples], device=device)
        self.has_mask = torch.tensor([s.mask is not None for s in dataset.samples], device=device)
        side = self.images.shape[-1]
        if crop > side:
            raise ValueError(f"crop {crop} is larger than the images' side {side}")
        self.crop = crop
        self.device = device
        self.jitter: v2.Transform | None = jitter_transform() if jitter else None
        shape = (1, 3, 1, 1)
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(shape)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(shape)

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, indices: Iterable[int], batch_size: int) -> Iterator[dict]:
        """Full batches of ``batch_size`` over ``indices`` in order (the last partial one dropped)."""
        order = list(indices)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield self.batch(order[start : start + batch_size])

    def batch(self, indices: list[int]) -> dict:
        """One augmented batch: the data loader's keys (image, label, mask, has_mask, index)."""
        idx = torch.tensor(indices, device=self.device)
        n, side, crop = len(indices), self.images.shape[-1], self.crop
        # per-sample crop offsets and flips, drawn on the CPU generator the engine seeds
        oy, ox = torch.randint(0, side - crop + 1, (2, n)).to(self.device)
        flip_h, flip_v = (torch.rand(2, n) < 0.5).to(self.device)
        span = torch.arange(crop, device=self.device)
        rows = torch.where(flip_v[:, None], crop - 1 - span, span) + oy[:, None]  # n,crop
        cols = torch.where(flip_h[:, None], crop - 1 - span, span) + ox[:, None]
        picked = idx[:, None, None]
        images = self.images[picked, :, rows[:, :, None], cols[:, None, :]]  # n,crop,crop,3
        images = images.permute(0, 3, 1, 2)
        masks = self.masks[picked, rows[:, :, None], cols[:, None, :]]
        if self.jitter is not None:
            images = torch.stack([self.jitter(im) for im in images])
        x = (images.float() / 255.0 - self.mean) / self.std
        return {
            "image": x.contiguous(),
            "label": self.labels[idx],
            "mask": masks,
            "has_mask": self.has_mask[idx],
            "index": idx,
        }
