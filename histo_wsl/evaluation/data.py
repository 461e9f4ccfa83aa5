"""What evaluate is asked and on which images: its settings, the selected samples, the loader.

:class:`EvalSettings` is what the CLI fills; :func:`select_data` reads the dataset, picks the split
or fold and checks that every image has its mask at its own size (or lists those left out with
``--skip-missing``); :class:`EvalImages` and :func:`collate` feed the streaming pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histo_wsl.data.sources import Dataset, Sample, load_samples
from histo_wsl.errors import InputError

__all__ = [
    "MAP_CLASSES",
    "PROTOCOLS",
    "SPLITS",
    "EvalData",
    "EvalImages",
    "EvalSettings",
    "collate",
    "select_data",
]

#: how maps meet masks (``--protocol``)
PROTOCOLS = {
    "resize": "image resized to the card's input_size square; map and mask (nearest-neighbour) "
    "compared at that size (NEGEV, train-classifier validation)",
    "native": "image resized to the card's input_size square for the network; map resized "
    "bilinearly back to the image size and compared with the mask at full resolution (Max-Min)",
}


SPLITS = ("auto", "val", "train", "test", "all")


MAP_CLASSES = ("gt", "predicted")


@dataclass
class EvalSettings:
    """What ``histo-wsl evaluate`` was asked (the CLI fills it; run.json records it).

    Attributes:
        models: checkpoints to evaluate (several: side by side in one report).
        data: the dataset (any layout :func:`~histo_wsl.data.sources.load_samples` reads).
        out: output folder.
        split: ``auto`` (``val`` when the data has splits, else ``all``), ``val``, ``train``,
            ``test`` or ``all``.
        fold: GlaS fold.
        protocol: ``resize`` or ``native`` (see :data:`PROTOCOLS`).
        threshold: the user's threshold in [0, 1].
        calibrate: write ``<stem>.calibrated.pt`` with the mIoU-best threshold of this set.
        bootstrap: bootstrap resamples for the 95 % intervals (0: none).
        seed: seed of the bootstrap.
        skip_missing: leave out images without a mask (listed in metrics.json) instead of failing.
        map_class: ``gt`` or ``predicted`` (class whose map a stage-1 model gives).
        cam_method: override of the stage-1 card's CAM method.
        tta: test-time augmentation overriding the cards' (``none`` or ``flips``;
            :data:`histo_wsl.inference.predictor.TTA_MODES`).
        negative_class: class whose images are fully negative (default: the card's).
        examples: best and worst images shown in the report (each).
        batch_size: images per forward pass.
        workers: data-loader processes.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
    """

    models: list[Path]
    data: str
    out: Path
    split: str = "auto"
    fold: int = 0
    protocol: str = "resize"
    threshold: float = 0.5
    calibrate: bool = False
    bootstrap: int = 1000
    seed: int = 0
    skip_missing: bool = False
    map_class: str = "gt"
    cam_method: str | None = None
    tta: str | None = None
    negative_class: str | None = None
    examples: int = 4
    batch_size: int = 16
    workers: int = 0
    device: str = "auto"

    def check(self) -> None:
        """Refuse settings that cannot work.

        Raises:
            InputError: an unknown protocol, split or map class, a threshold outside [0, 1], or a
                negative count.
        """
        if not self.models:
            raise InputError("no model given: pass a checkpoint (.pt), or --compare A.pt B.pt")
        if self.protocol not in PROTOCOLS:
            raise InputError(f"--protocol {self.protocol!r} is not one of {', '.join(PROTOCOLS)}")
        if self.split not in SPLITS:
            raise InputError(f"--split {self.split!r} is not one of {', '.join(SPLITS)}")
        if self.map_class not in MAP_CLASSES:
            raise InputError(f"--map-class {self.map_class!r} is not gt or predicted")
        if not 0.0 <= self.threshold <= 1.0:
            raise InputError(f"--threshold {self.threshold} is not in [0, 1]")
        if self.bootstrap < 0 or self.examples < 0 or self.batch_size < 1 or self.workers < 0:
            raise InputError(
                "--bootstrap, --examples and --workers must be >= 0, --batch-size >= 1"
            )

    def as_dict(self) -> dict:
        """JSON-ready parameters."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["models"] = [str(m) for m in self.models]
        out["out"] = str(self.out)
        return out


@dataclass
class EvalData:
    """The images to evaluate on, with what was left out and why.

    Attributes:
        samples: the images (each has a mask, or belongs to the negative class).
        class_names: class names in the models' index order.
        negative_class: index of the negative class, or None.
        info: JSON-ready description (source, layout, split, counts, skipped images).
        root: folder image names are shown relative to.
    """

    samples: list[Sample]
    class_names: list[str]
    negative_class: int | None
    info: dict
    root: Path

    def name(self, sample: Sample) -> str:
        """The image's name as reports show it (relative to the dataset folder when inside it)."""
        try:
            return sample.image.relative_to(self.root).as_posix()
        except ValueError:
            return sample.image.name


def select_data(
    data: str | Path,
    class_names: list[str],
    *,
    split: str = "auto",
    fold: int = 0,
    skip_missing: bool = False,
    negative_class: str | None = None,
) -> EvalData:
    """Read the dataset, choose the split and check the masks.

    Args:
        data: dataset path (CSV, class folders, GlaS folder, patch folder).
        class_names: the models' classes, in index order (labels are matched against them).
        split: ``auto``, ``val``, ``train``, ``test`` or ``all``.
        fold: GlaS fold.
        skip_missing: leave out images whose mask is missing instead of failing.
        negative_class: name of the class whose images are fully negative (no mask needed).

    Returns:
        The selected images.

    Raises:
        InputError: unreadable data, a label that is not one of the models' classes, a split the
            data does not have or that is empty, or an image without a mask (unless
            ``skip_missing``).
    """
    ds = load_samples(data, classes=list(class_names), fold=fold, evaluation=True)
    path = Path(data)
    if list(ds.class_names) != list(class_names):  # GlaS has its own fixed classes
        raise InputError(
            f"the data's classes {ds.class_names} are not the model's {list(class_names)}; "
            "evaluate on data labelled with the model's classes",
            path,
        )
    root = path if path.is_dir() else path.parent
    neg = None
    if negative_class is not None:
        if negative_class not in class_names:
            raise InputError(
                f"negative class {negative_class!r} is not one of the model's classes {class_names}"
            )
        neg = class_names.index(negative_class)
    split, rule, samples = _split_samples(ds, split, path)
    missing: list[Sample] = []
    mismatched: list[tuple[Sample, dict[str, list[int]]]] = []
    kept: list[Sample] = []
    for s in samples:
        has_mask = s.mask is not None and s.mask.is_file()
        if not has_mask and s.label != neg:
            missing.append(s)
            continue
        if has_mask:
            sizes = _image_and_mask_sizes(s)
            if sizes[0] != sizes[1]:
                if not skip_missing:
                    (iw, ih), (mw, mh) = sizes
                    raise InputError(
                        f"the mask is {mw}x{mh} px but its image {s.image.name} is {iw}x{ih}; "
                        "give each image a mask of its own size, or pass --skip-missing to "
                        "leave such images out (listed)",
                        s.mask,
                    )
                mismatched.append((s, {"image": list(sizes[0]), "mask": list(sizes[1])}))
                continue
        kept.append(s)
    if missing and not skip_missing:
        s = missing[0]
        where = f" (expected {s.mask})" if s.mask is not None else ""
        more = f"; {len(missing)} images lack one" if len(missing) > 1 else ""
        raise InputError(
            f"no ground-truth mask for this image{where}{more}; add the masks or pass "
            "--skip-missing to leave such images out",
            s.image,
        )
    if not kept:
        raise InputError("no image with a ground-truth mask to evaluate", path)
    ev = EvalData(kept, list(class_names), neg, {}, root)
    counts = np.bincount([s.label for s in kept], minlength=len(class_names))
    ev.info = {
        "source": ds.source,
        "layout": ds.layout,
        "split": split,
        "split_rule": rule,
        "splits_given": ds.splits_given,
        "n_images": len(kept),
        "images_per_class": {c: int(n) for c, n in zip(class_names, counts, strict=True)},
        "negative_class": None if neg is None else class_names[neg],
        "negative_without_mask": "taken as all background",
        "skipped_missing_masks": [ev.name(s) for s in missing],
        "skipped_mask_size_mismatch": {ev.name(s): sizes for s, sizes in mismatched},
    }
    return ev


def _split_samples(ds: Dataset, split: str, path: Path) -> tuple[str, str, list[Sample]]:
    """The split evaluated (``auto`` resolved), the rule that chose it, and its images.

    Raises:
        InputError: a split the data does not have, or an empty one.
    """
    if split == "auto":
        split = "val" if ds.splits_given and ds.split("val") else "all"
        rule = "auto: val when the data has splits, else all"
    else:
        rule = "chosen (--split)"
    if split == "all":
        return split, rule, list(ds.samples)
    if not ds.splits_given:
        raise InputError(
            f"--split {split}: the data has no split (no split column / fold file); use "
            "--split all",
            path,
        )
    samples = [s for s in ds.samples if s.split == split]
    if not samples:
        raise InputError(f"the {split} split of the data is empty; choose another --split", path)
    return split, rule, samples


def _image_and_mask_sizes(s: Sample) -> tuple[tuple[int, int], tuple[int, int]]:
    """(image, mask) sizes (w, h) read from the file headers."""
    from PIL import Image, UnidentifiedImageError

    sizes = []
    for path, what in ((s.image, "image"), (s.mask, "mask")):
        try:
            with Image.open(path) as im:
                sizes.append(im.size)
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise InputError(f"cannot read the {what} ({exc}); replace it", path) from None
    return sizes[0], sizes[1]


class EvalImages:
    """Torch-style dataset: the normalised network input and the mask for the chosen protocol."""

    def __init__(
        self, samples: list[Sample], size: int, mean: list, std: list, protocol: str
    ) -> None:
        import torch
        from torchvision.transforms import v2

        self.samples, self.size, self.protocol = samples, size, protocol
        # the evaluation preset of histo_wsl.data.images with the card's normalisation
        self.transform = v2.Compose(
            [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
        )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        import torch
        from PIL import Image

        from histo_wsl.data.images import _load_mask, _load_rgb

        s = self.samples[i]
        img = _load_rgb(s.image)
        native = img.size  # (w, h)
        small = np.asarray(img.resize((self.size, self.size), Image.Resampling.BILINEAR))
        x = self.transform(torch.from_numpy(small.copy()).permute(2, 0, 1))
        if s.mask is None or not s.mask.is_file():  # negative class: all background
            shape = (self.size, self.size) if self.protocol == "resize" else native[::-1]
            mask = np.zeros(shape, dtype=np.uint8)
        else:
            m = _load_mask(s.mask)  # of its image's size (select_data)
            target = (self.size, self.size) if self.protocol == "resize" else native
            if m.size != target:
                m = m.resize(target, Image.Resampling.NEAREST)
            mask = (np.asarray(m) > 127).astype(np.uint8)
        return {
            "image": x,
            "label": int(s.label),
            "mask": mask,
            "index": i,
        }


def collate(items: list[dict]) -> dict:
    """A batch of evaluation items: images stacked, masks and paths kept per image."""
    import torch

    return {
        "image": torch.stack([it["image"] for it in items]),
        "label": torch.tensor([it["label"] for it in items], dtype=torch.long),
        "mask": [it["mask"] for it in items],
        "index": [it["index"] for it in items],
    }
