"""Torch datasets over :class:`~histo_wsl.data.sources.Sample` lists, with the papers' transforms.

Train preset (NEGEV protocol, method.md §1.4): resize to 256×256 → random 224 crop → random
horizontal and vertical flips → colour jitter (brightness, contrast, saturation .5, hue .05) →
ImageNet normalisation. Eval preset: resize to 224×224 → normalisation. Masks follow every geometric
step (nearest-neighbour) and never the colour ones. With a ``scale`` (the ``isotropic`` training
geometry), images are resized by one factor that keeps their aspect ratio instead of squashed to
a square, so the network learns tissue at the one µm/px ``localize`` reads slides at.

torchvision is imported by the functions that build transforms, not with the module: the
inference path reads this module's constants and does not pay torchvision's import
(:mod:`histo_wsl.networks.mobilenetv2`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from histo_wsl.data.sources import Sample
from histo_wsl.errors import InputError

if TYPE_CHECKING:
    from torchvision.transforms import v2
    from torchvision.tv_tensors import Image as TvImage
    from torchvision.tv_tensors import Mask as TvMask

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LabelledImages",
    "check_samples",
    "GLASS_LABEL",
    "GLASS_RGB",
    "GlassMargins",
    "eval_transform",
    "jitter_transform",
    "train_transform",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


#: the white of a slide's glass (RGB), what ``--glass`` places training images on
GLASS_RGB = (243, 243, 243)
#: the training mask's value on glass added around an image (0/1: ROI, 255: unknown)
GLASS_LABEL = 2


class GlassMargins:
    """Place an image on glass: a random margin of glass on each side, marked in the mask.

    With probability ``p`` each side gets 0 to ``max_px`` px of :data:`GLASS_RGB`; the mask gets
    :data:`GLASS_LABEL` there (known background: a slide's window at an image's edge sees it).
    """

    def __init__(self, max_px: int, p: float = 0.5) -> None:
        self.max_px, self.p = int(max_px), float(p)

    def __call__(self, image: TvImage, mask: TvMask) -> tuple[TvImage, TvMask]:
        """The image and mask with their margins (unchanged when not drawn)."""
        if self.max_px < 1 or float(torch.rand(())) >= self.p:
            return image, mask
        from torchvision.transforms import v2

        left, top, right, bottom = torch.randint(0, self.max_px + 1, (4,)).tolist()
        pad = [left, top, right, bottom]
        image = v2.functional.pad(image, pad, fill=list(GLASS_RGB))
        mask = v2.functional.pad(mask, pad, fill=GLASS_LABEL)
        return image, mask


def train_transform(
    crop: int = 224, resize: int = 256, jitter: bool = True, glass: bool = False
) -> v2.Transform:
    """The training preset: random crop of a resized image, flips, colour jitter.

    An image smaller than ``crop`` on a side (isotropic geometry: a 775×522 GlaS image at
    1.57 µm/px is 306×206) is reflected out to it first; with ``glass`` (``--glass``) it is
    placed on glass instead, half of the time with up to half a crop of glass around it
    (:class:`GlassMargins`), the glass marked :data:`GLASS_LABEL` in the mask.
    """
    from torchvision.transforms import v2
    from torchvision.tv_tensors import Image as TvImage
    from torchvision.tv_tensors import Mask as TvMask

    if glass:
        steps: list = [
            GlassMargins(crop // 2),
            v2.RandomCrop(
                crop, pad_if_needed=True, fill={TvImage: list(GLASS_RGB), TvMask: GLASS_LABEL}
            ),
        ]
    else:
        steps = [v2.RandomCrop(crop, pad_if_needed=True, padding_mode="reflect")]
    steps += [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
    if jitter:
        steps.append(jitter_transform())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(steps)


def jitter_transform() -> v2.Transform:
    """The training preset's colour jitter (NEGEV protocol): brightness/contrast/saturation .5."""
    from torchvision.transforms import v2

    return v2.ColorJitter(brightness=0.5, contrast=0.5, saturation=0.5, hue=0.05)  # hue .05


def eval_transform() -> v2.Transform:
    """The evaluation preset (after the fixed resize done at load time): normalisation only."""
    from torchvision.transforms import v2

    return v2.Compose(
        [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )


def _load_rgb(path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise InputError(
            f"cannot read the image ({exc}); replace it or remove it from the dataset", path
        ) from None


def _load_mask(path) -> Image.Image:
    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise InputError(f"cannot read the mask ({exc}); replace it or drop it", path) from None
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=2)
    return Image.fromarray(((arr > 0) * 255).astype(np.uint8))


def check_samples(
    samples: Sequence[Sample], skip_errors: bool = False
) -> tuple[list[Sample], list[str]]:
    """Open every image and mask header before training: unreadable files, size mismatches.

    Args:
        samples: the samples to check.
        skip_errors: drop bad samples (and say which) instead of raising.

    Returns:
        (the good samples, one message per dropped sample).

    Raises:
        InputError: the first bad sample, unless ``skip_errors``.
    """
    good, dropped = [], []
    for s in samples:
        try:
            try:
                with Image.open(s.image) as im:
                    size = im.size
                    im.verify()
            except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
                raise InputError(
                    f"cannot read the image ({exc}); replace it, remove it from the dataset or "
                    "pass --skip-errors",
                    s.image,
                ) from None
            if s.mask is not None:
                try:
                    with Image.open(s.mask) as m:
                        msize = m.size
                except (OSError, UnidentifiedImageError, ValueError) as exc:
                    raise InputError(f"cannot read the mask ({exc})", s.mask) from None
                if msize != size:
                    raise InputError(
                        f"mask is {msize[0]}x{msize[1]} px but its image {s.image.name} is "
                        f"{size[0]}x{size[1]}; masks must have their image's size",
                        s.mask,
                    )
        except InputError as exc:
            if not skip_errors:
                raise
            dropped.append(str(exc))
            continue
        good.append(s)
    return good, dropped


class LabelledImages(torch.utils.data.Dataset):
    """Images (and masks) resized once to a fixed square size, then transformed per item.

    Items are dicts: ``image`` (3,H,W float), ``label`` (int), ``mask`` (H,W uint8 0/1, or all 255
    when the sample has no mask: "unknown"), ``has_mask`` (bool), ``index`` (int).

    Args:
        samples: the samples.
        size: side every image is resized to at load time (256 for training, 224 for evaluation).
        transform: a torchvision v2 transform applied to (image, mask) together.
        preload: decode and resize every image once and keep it (small datasets such as GlaS:
            85 images of 256² take 17 MB); otherwise decode on every access.
        scale: resize every image by this factor instead, keeping its aspect ratio (the
            ``isotropic`` geometry: the network sees what ``localize`` reads from a slide); items
            then differ in size.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        size: int,
        transform: v2.Transform,
        preload: bool = True,
        scale: float | None = None,
    ) -> None:
        self.samples = list(samples)
        self.size = size
        self.scale = scale
        self.transform = transform
        self._cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        if preload:
            self._cache = [self._decode(i) for i in range(len(self.samples))]

    def __len__(self) -> int:
        return len(self.samples)

    def _decode(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.samples[i]
        img = _load_rgb(s.image)
        size = (self.size, self.size)
        if self.scale is not None:
            size = (max(1, round(img.width * self.scale)), max(1, round(img.height * self.scale)))
        img = img.resize(size, Image.Resampling.BILINEAR)
        image = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
        if s.mask is not None:
            m = _load_mask(s.mask).resize(size, Image.Resampling.NEAREST)
            mask = torch.from_numpy((np.asarray(m) > 127).astype(np.uint8))
        else:
            mask = torch.full(size[::-1], 255, dtype=torch.uint8)
        return image, mask

    def cached(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The decoded (image uint8 3×H×W, mask uint8 H×W) pairs, decoding them now if needed."""
        if self._cache is None:
            self._cache = [self._decode(i) for i in range(len(self.samples))]
        return self._cache

    def __getitem__(self, i: int) -> dict:
        from torchvision import tv_tensors

        image, mask = self._cache[i] if self._cache is not None else self._decode(i)
        image, mask = self.transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
        s = self.samples[i]
        return {
            "image": image.as_subclass(torch.Tensor),
            "label": s.label,
            "mask": mask.as_subclass(torch.Tensor),
            "has_mask": s.mask is not None,
            "index": i,
        }
