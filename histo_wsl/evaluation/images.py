"""``histo-wsl evaluate``: the papers' metrics of one or more models on images with ground truth.

For each model, one streaming pass over the images (nothing but meters, one row of numbers per
image and the few best and worst images for the report is kept; per-image score histograms for
the bootstrap go to a temporary file in the output folder):

- **PxAP** (dataset level, method.md §4.1) with :class:`~histo_wsl.evaluation.metrics.PxAPMeter`;
- dataset-level **Dice / IoU** of foreground and background (§4.2) at three thresholds: the card's
  (the calibrated one when the card was calibrated), ``--threshold``, and the threshold that
  maximises mIoU on this very set, named ``best_threshold (optimistic)`` because it is tuned on
  the pixels it is scored on;
- per-image **F1+ / F1-** at 0.5, averaged over images (Max-Min TMI protocol, §2.3) with
  :class:`~histo_wsl.evaluation.metrics.PerImageMeter`: F1+ over images with a region of interest only,
  F1- over images with some background;
- image-level **accuracy / error**, confusion matrix and per-class numbers (§4.3);
- percentile **bootstrap 95 % confidence intervals** over images (``--bootstrap N``, seeded).

Images without a region of interest (the negative class: a normal patch) count as the papers count
them: in PxAP and the dataset-level Dice they only add negative pixels (their foreground is false
positive), they are left out of the F1+ mean and kept in the F1- mean. An image of the negative
class without a mask file is taken as all background.

Protocols (how maps meet masks):

- ``resize`` (default; NEGEV and :func:`histo_wsl.methods.cam.evaluate_maps`): the image is resized to
  the card's ``input_size`` square, the map is computed there, and the mask is resized to the same
  square with nearest neighbour;
- ``native`` (Max-Min's test protocol): the same input, but the map is resized bilinearly back to
  the image's own size and compared with the mask at full resolution.

The map is that of the ground-truth class by default (``--map-class gt``, the papers' protocol and
the validation of ``train-classifier``), or of the predicted class (``predicted``, what
``localize`` outputs). NEGEV models give the decoder's foreground probability either way.

``--calibrate`` picks the threshold maximising the dataset-level mIoU (mean of the foreground and
background IoU, NEGEV's criterion, §4.2) on the evaluated set and writes a new checkpoint
``<stem>.calibrated.pt`` whose card carries it (``localize`` then uses it).
"""

from __future__ import annotations

import csv
import heapq
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from histo_wsl import __version__
from histo_wsl.data.sources import Sample, load_samples
from histo_wsl.errors import InputError
from histo_wsl.evaluation.metrics import (
    BIN_EDGES,
    THRESHOLDS,
    ClassificationMeter,
    PerImageMeter,
    PxAPMeter,
    bootstrap_ci,
    bootstrap_histograms,
)
from histo_wsl.methods import get_method
from histo_wsl.runtime import atomic
from histo_wsl.runtime.console import stderr_console, warn

__all__ = [
    "DEFINITIONS",
    "Accumulator",
    "EvalData",
    "EvalSettings",
    "ModelResult",
    "calibrated_checkpoint",
    "evaluate_model",
    "run_evaluate",
    "select_data",
]

PROTOCOLS = {
    "resize": "image resized to the card's input_size square; map and mask (nearest-neighbour) "
    "compared at that size (NEGEV, train-classifier validation)",
    "native": "image resized to the card's input_size square for the network; map resized "
    "bilinearly back to the image size and compared with the mask at full resolution (Max-Min)",
}
SPLITS = ("auto", "val", "train", "test", "all")
MAP_CLASSES = ("gt", "predicted")
#: threshold of the Max-Min per-image F1+/F1- protocol
F1_THRESHOLD = 0.5
#: the criterion --calibrate maximises
CALIBRATION_CRITERION = "miou"
_BEST_NAME = "best_threshold (optimistic)"
_OVERLAP_KEYS = ("dice_fg", "dice_bg", "iou_fg", "iou_bg", "miou")

#: Names and definitions of every number in metrics.json (units: PxAP, accuracy, error in %;
#: Dice, IoU, F1 and rates as fractions in [0, 1]).
DEFINITIONS: dict[str, str] = {
    "pxap": "PxAP (Choe et al., CVPR 2020; NEGEV MaskEvaluator; method.md §4.1): area under the "
    "dataset-level pixel precision-recall curve, scores binned at the edges 0, 0.001, ..., 0.999, "
    "1, 2, 3, pixels of all images of the set pooled (images without ROI add only negatives); %.",
    "dice_fg": "dataset-level Dice of the foreground 2TP/(2TP+FP+FN), pixels of all images pooled, "
    "a pixel is foreground when its score >= threshold (threshold on the 0.001 grid).",
    "dice_bg": "dataset-level Dice of the background 2TN/(2TN+FP+FN).",
    "iou_fg": "dataset-level IoU of the foreground TP/(TP+FP+FN).",
    "iou_bg": "dataset-level IoU of the background TN/(TN+FP+FN).",
    "miou": "mean of iou_fg and iou_bg (NEGEV's threshold criterion, method.md §4.2).",
    "tpr/fnr/tnr/fpr": "TP/P, FN/P, TN/N, FP/N over the pooled pixels.",
    "f1_pos": "F1+ (Max-Min TMI protocol, method.md §2.3): Dice of the foreground per image at "
    "score >= 0.5, averaged over the images whose ground truth has a region of interest.",
    "f1_neg": "F1-: Dice of the background per image at score >= 0.5, averaged over the images "
    "with some ground-truth background.",
    "accuracy": "image-level accuracy: argmax of the class logits equals the label; %.",
    "error": "classification error = 100 - accuracy; %.",
    "confusion_matrix": "counts, rows = true class, columns = predicted class.",
    "per_class precision/recall/f1": "image-level one-vs-rest scores of each class (0 when a "
    "denominator is 0).",
    "ci95": "percentile bootstrap 95% interval over images: images resampled with replacement "
    "(numpy default_rng(seed)); dataset-level numbers recomputed on each resample's pooled "
    "histograms, per-image means on the resampled values; at a fixed threshold.",
    "card": "the threshold in the model card (set by --calibrate on a validation set, else the "
    "training default 0.5).",
    "user": "the --threshold option.",
    "best": f"{_BEST_NAME}: the threshold of the grid 0, 0.001, ..., 0.999 maximising miou on the "
    "evaluated set itself (NEGEV's logged numbers); optimistic, not a test number.",
}


# --------------------------------------------------------------------------------------------------
# settings and data
# --------------------------------------------------------------------------------------------------


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
    if split == "auto":
        split = "val" if ds.splits_given and ds.split("val") else "all"
        rule = "auto: val when the data has splits, else all"
    else:
        rule = "chosen (--split)"
    if split == "all":
        samples = list(ds.samples)
    else:
        if not ds.splits_given:
            raise InputError(
                f"--split {split}: the data has no split (no split column / fold file); use "
                "--split all",
                path,
            )
        samples = [s for s in ds.samples if s.split == split]
        if not samples:
            raise InputError(
                f"the {split} split of the data is empty; choose another --split", path
            )
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


# --------------------------------------------------------------------------------------------------
# the streaming pass
# --------------------------------------------------------------------------------------------------


class _HistogramSpill:
    """Per-image score histograms (2 × 1002 int32 = 8 KB an image) appended to a temporary file."""

    def __init__(self, folder: Path) -> None:
        fd, name = tempfile.mkstemp(prefix=".evaluate-hist-", suffix=".bin", dir=folder)
        self.path = Path(name)
        self._fh = os.fdopen(fd, "wb")
        self.n = 0

    def add(self, meter: PxAPMeter) -> None:
        self._fh.write(np.stack([meter.pos_hist, meter.neg_hist]).astype(np.int32).tobytes())
        self.n += 1

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(M, 1002) positive and negative histograms, memory-mapped."""
        self._fh.close()
        bins = BIN_EDGES.size - 1
        if self.n == 0:
            empty = np.zeros((0, bins), dtype=np.int32)
            return empty, empty
        mm = np.memmap(self.path, dtype=np.int32, mode="r", shape=(self.n, 2, bins))
        return mm[:, 0, :], mm[:, 1, :]

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        self.path.unlink(missing_ok=True)


@dataclass
class Example:
    """One image of the report's grid (arrays at the network's input size)."""

    name: str
    kind: str  # best | worst
    rank_value: float
    index: int
    score_map: np.ndarray  # (S, S) uint8, score × 255
    caption: str
    image: np.ndarray | None = None  # (S, S, 3) uint8, loaded after the pass
    mask: np.ndarray | None = None  # (S, S) bool


@dataclass
class ModelResult:
    """What one model's evaluation produced."""

    name: str
    path: Path
    card: dict
    metrics: dict
    rows: list[dict]
    curves: dict
    examples: list[Example] = field(default_factory=list)
    best_threshold: float = 0.5


class _EvalImages:
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


def _collate(items: list[dict]) -> dict:
    import torch

    return {
        "image": torch.stack([it["image"] for it in items]),
        "label": torch.tensor([it["label"] for it in items], dtype=torch.long),
        "mask": [it["mask"] for it in items],
        "index": [it["index"] for it in items],
    }


def _snap(t: float) -> float:
    return math.floor(t * 1000 + 0.5) / 1000


def _map_description(card: dict, map_class: str) -> str:
    text = get_method(card.get("method")).map_description(card, map_class)
    if card.get("tta", "none") == "flips":
        text += "; mean of 4 flipped views (--tta flips)"
    return text


def _card_threshold(card: dict) -> tuple[float, str]:
    t = float(card.get("threshold", 0.5))
    cal = card.get("calibration")
    if isinstance(cal, dict) and cal.get("set"):
        return t, f"card threshold (calibrated on {cal['set']})"
    return t, "card threshold (training default, not calibrated)"


class Accumulator:
    """One model's meters over a stream of images (or slides): everything the report needs.

    Each :meth:`add` feeds the dataset-level PxAP meter (and the per-class ones), the per-image
    F1 meter, the classification meter, the per-image row, the temporary histogram file of the
    bootstrap and the heaps of best and worst examples; no map is kept.

    Args:
        model: the model's display name (first column of the rows).
        class_names: class names in index order.
        thresholds: ``{"card": τ, "user": τ}`` (snapped to the 0.001 grid).
        card_name: how the card's threshold is shown.
        examples: best and worst images to keep (each).
        bootstrap: resamples for the intervals (0: none, and no histogram file).
        seed: seed of the bootstrap.
        work_dir: folder of the temporary histogram file.
    """

    def __init__(
        self,
        model: str,
        class_names: list[str],
        thresholds: dict[str, float],
        card_name: str,
        *,
        examples: int,
        bootstrap: int,
        seed: int,
        work_dir: Path,
    ) -> None:
        self.model, self.class_names = model, list(class_names)
        self.thresholds, self.card_name = dict(thresholds), card_name
        self.k_examples, self.bootstrap, self.seed = examples, bootstrap, seed
        self.row_thresholds = sorted({F1_THRESHOLD, thresholds["card"], thresholds["user"]})
        self.pxap = PxAPMeter()
        self.per_class_px = [PxAPMeter() for _ in class_names]
        self.f1 = PerImageMeter()
        self.cls = ClassificationMeter(len(class_names), class_names)
        self.spill = _HistogramSpill(work_dir) if bootstrap > 0 else None
        self.rows: list[dict] = []
        self._best: list[tuple] = []
        self._worst: list[tuple] = []

    def add(
        self,
        index: int,
        name: str,
        score: np.ndarray,
        gt: np.ndarray,
        label: int,
        pred: int,
        *,
        extra: dict | None = None,
        thumbnail: np.ndarray | None = None,
        thumbnail_mask: np.ndarray | None = None,
    ) -> dict:
        """Score one image.

        Args:
            index: the image's index in the evaluated list (examples refer to it).
            name: the image's name in the rows and the report.
            score: (H, W) scores in [0, 1], at the mask's size.
            gt: (H, W) bool ground truth.
            label: true class index.
            pred: predicted class index.
            extra: more columns of the row (after the class columns).
            thumbnail: the map as shown in the report grid (uint8 0-255), if it may be an example.
            thumbnail_mask: the ground truth at the thumbnail's size (else loaded later).

        Returns:
            The image's row.
        """
        img_meter = PxAPMeter()
        img_meter.update(score, gt)
        return self.add_meter(
            index,
            name,
            img_meter,
            label,
            pred,
            extra=extra,
            thumbnail=thumbnail,
            thumbnail_mask=thumbnail_mask,
        )

    def add_meter(
        self,
        index: int,
        name: str,
        img_meter: PxAPMeter,
        label: int,
        pred: int,
        *,
        extra: dict | None = None,
        thumbnail: np.ndarray | None = None,
        thumbnail_mask: np.ndarray | None = None,
    ) -> dict:
        """Score one image from its own score histograms (e.g. a slide read in bands).

        The per-image numbers at a threshold are those of ``score >= threshold`` (the threshold is
        on the 0.001 grid, where the histogram counts are exact), so this equals :meth:`add`.

        Args:
            index: the image's index in the evaluated list.
            name: the image's name.
            img_meter: a :class:`~histo_wsl.evaluation.metrics.PxAPMeter` filled with this image only.
            label: true class index.
            pred: predicted class index.
            extra: more columns of the row.
            thumbnail: the map as shown in the report grid (uint8 0-255).
            thumbnail_mask: the ground truth at the thumbnail's size.

        Returns:
            The image's row.
        """
        self.pxap.merge(img_meter)
        self.per_class_px[label].merge(img_meter)
        if self.spill is not None:
            self.spill.add(img_meter)
        self.cls.update(np.array([pred]), np.array([label]))
        at = img_meter.dice_iou(F1_THRESHOLD)
        tmi = self.f1.update_counts(at["tp"], at["fp"], at["fn"], at["tn"], F1_THRESHOLD, name=name)
        row: dict[str, Any] = {
            "model": self.model,
            "image": name,
            "label": self.class_names[label],
            "predicted": self.class_names[pred],
            "correct": pred == label,
            **(extra or {}),
            "has_roi": tmi["has_roi"],
            "has_background": tmi["has_background"],
            "gt_fg_fraction": round(tmi["gt_fg_pixels"] / max(tmi["n_pixels"], 1), 6),
        }
        for t in self.row_thresholds:
            r = img_meter.dice_iou(t)
            for key in _OVERLAP_KEYS:
                row[f"{key}@{t:g}"] = round(float(r[key]), 6)
        self.rows.append(row)
        if self.k_examples and thumbnail is not None:
            value = row[f"miou@{self.thresholds['card']:g}"]
            ex = Example(
                name,
                "",
                value,
                index,
                thumbnail,
                f"{row['label']} → {row['predicted']}, mIoU {100 * value:.1f}%",
                mask=thumbnail_mask,
            )
            _push(self._best, (value, -index), ex, self.k_examples)
            _push(self._worst, (-value, index), ex, self.k_examples)
        return row

    def examples(self) -> list[Example]:
        """The best images (highest mIoU at the card threshold first), then the worst.

        An image is shown once: with fewer than twice as many images as examples, the worst
        are those left after the best.
        """
        best = [ex for _, ex in sorted(self._best, key=lambda entry: entry[0], reverse=True)]
        shown = {ex.index for ex in best}
        worst = [
            ex
            for _, ex in sorted(self._worst, key=lambda entry: entry[0], reverse=True)
            if ex.index not in shown
        ]
        return [replace(ex, kind="best") for ex in best] + [
            replace(ex, kind="worst") for ex in worst
        ]

    def summarise(self) -> tuple[dict, dict, float]:
        """(metrics, curves, best threshold) of everything added; removes the histogram file."""
        try:
            hists = self.spill.arrays() if self.spill is not None else None
            return _summarise(self, hists)
        finally:
            self.close()

    def close(self) -> None:
        """Remove the temporary histogram file."""
        if self.spill is not None:
            self.spill.close()


def evaluate_model(
    predictor: Any,
    data: EvalData,
    settings: EvalSettings,
    device: Any,
    work_dir: Path,
    *,
    name: str | None = None,
    quiet: bool = False,
) -> ModelResult:
    """Evaluate one loaded model on the images in one streaming pass.

    Args:
        predictor: a :class:`~histo_wsl.inference.predictor.Predictor`.
        data: the images (from :func:`select_data`).
        settings: protocol, thresholds, bootstrap, examples...
        device: torch device.
        work_dir: folder for the temporary per-image histograms (the output folder).
        name: the model's display name (default: the checkpoint's stem).
        quiet: no progress bar.

    Returns:
        The model's numbers, per-image rows, curves and example images.
    """
    import torch
    import torch.nn.functional as F  # noqa: N812

    card = predictor.card
    name = name or predictor.path.stem
    size = int(card.get("input_size", 224))
    norm = card.get("normalization") or {}
    mean = norm.get("mean", [0.485, 0.456, 0.406])
    std = norm.get("std", [0.229, 0.224, 0.225])
    class_names = data.class_names
    t_card, card_name = _card_threshold(card)
    thresholds = {"card": _snap(t_card), "user": _snap(settings.threshold)}
    acc = Accumulator(
        name,
        class_names,
        thresholds,
        card_name,
        examples=settings.examples,
        bootstrap=settings.bootstrap,
        seed=settings.seed,
        work_dir=work_dir,
    )
    dataset = _EvalImages(data.samples, size, mean, std, settings.protocol)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=settings.batch_size,
        num_workers=settings.workers,
        collate_fn=_collate,
    )
    predictor.to(device)
    t0 = time.perf_counter()
    try:
        for batch in _progress(loader, quiet, f"evaluate {name}", len(data.samples)):
            images = batch["image"].to(device)
            labels = batch["label"]
            classes = labels.to(device) if settings.map_class == "gt" else None
            logits, maps = predictor.predict(images, classes)
            maps = maps.float().cpu().clamp_(0.0, 1.0)
            probs = torch.softmax(logits.float().cpu(), dim=1).numpy()
            for j, idx in enumerate(batch["index"]):
                label, pred = int(labels[j]), int(np.argmax(probs[j]))
                gt = batch["mask"][j].astype(bool)
                score = maps[j]
                if score.shape != gt.shape:  # native protocol: back to the image size
                    score = F.interpolate(
                        score[None, None], size=gt.shape, mode="bilinear", align_corners=False
                    )[0, 0].clamp_(0.0, 1.0)
                image_name = data.name(data.samples[idx])
                acc.add(
                    idx,
                    image_name,
                    score.numpy(),
                    gt,
                    label,
                    pred,
                    extra={
                        "p_label": round(float(probs[j, label]), 6),
                        "p_predicted": round(float(probs[j, pred]), 6),
                    },
                    thumbnail=(maps[j].numpy() * 255 + 0.5).astype(np.uint8),
                )
        seconds = time.perf_counter() - t0
        metrics, curves, best_t = acc.summarise()
    finally:
        acc.close()
    metrics.update(
        {
            "name": name,
            "checkpoint": str(predictor.path),
            "method": card.get("method"),
            "backbone": card.get("backbone"),
            "head": card.get("head"),
            "cam_method": card.get("cam_method")
            if get_method(card.get("method")).has_cam
            else None,
            "tta": card.get("tta", "none"),
            "map": _map_description(card, settings.map_class),
            "input_size": size,
            "class_names": list(card.get("class_names", class_names)),
            "seconds": round(seconds, 3),
            "images_per_second": round(len(acc.rows) / seconds, 2) if seconds > 0 else None,
        }
    )
    return ModelResult(
        name, predictor.path, card, metrics, acc.rows, curves, acc.examples(), best_t
    )


def _push(heap: list, key: tuple, example: Example, k: int) -> None:
    """Keep the ``k`` examples of largest ``key`` (unique: it holds the image index) in a min-heap."""
    if len(heap) < k:
        heapq.heappush(heap, (key, example))
    elif key > heap[0][0]:
        heapq.heapreplace(heap, (key, example))


def _progress(loader: Any, quiet: bool, description: str, total: int):
    if quiet:
        yield from loader
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn(description),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=stderr_console(),
        transient=True,
    ) as bar:
        task = bar.add_task("images", total=total)
        for batch in loader:
            yield batch
            bar.advance(task, len(batch["index"]))


def _value(v: float, ci: tuple[float, float] | None = None, scale: float = 1.0) -> dict:
    out: dict[str, Any] = {"value": _num(v * scale)}
    if ci is not None:
        out["ci95"] = [_num(ci[0] * scale), _num(ci[1] * scale)]
    return out


def _num(v: Any) -> float | None:
    v = float(v)
    return None if not math.isfinite(v) else v


def _summarise(
    acc: Accumulator, hists: tuple[np.ndarray, np.ndarray] | None
) -> tuple[dict, dict, float]:
    pxap, per_class_px, f1, cls, rows = acc.pxap, acc.per_class_px, acc.f1, acc.cls, acc.rows
    thresholds, class_names = acc.thresholds, acc.class_names
    best_t, _ = pxap.best_threshold(CALIBRATION_CRITERION)
    points = {**thresholds, "best": best_t}
    names = {"card": acc.card_name, "user": "--threshold", "best": _BEST_NAME}
    n_boot, seed = acc.bootstrap, acc.seed

    ci: dict[str, tuple[float, float]] = {}
    if n_boot > 0 and hists is not None:

        def stats(meter: PxAPMeter) -> dict[str, float]:
            out = {"pxap": meter.pxap()}
            for key, t in points.items():
                r = meter.dice_iou(t)
                out.update({f"{key}.{k}": r[k] for k in _OVERLAP_KEYS})
            return out

        ci.update(bootstrap_histograms(hists[0], hists[1], stats, n=n_boot, seed=seed))
        ci["f1_pos"] = bootstrap_ci(f1.f1_pos_values(), n=n_boot, seed=seed)
        ci["f1_neg"] = bootstrap_ci(f1.f1_neg_values(), n=n_boot, seed=seed)
        correct = np.array([100.0 * r["correct"] for r in rows])
        ci["accuracy"] = bootstrap_ci(correct, n=n_boot, seed=seed)

    at: dict[str, dict] = {}
    for key, t in points.items():
        r = pxap.dice_iou(t)
        entry: dict[str, Any] = {"name": names[key], "threshold": r["threshold"]}
        for k in _OVERLAP_KEYS:
            entry[k] = _value(r[k], ci.get(f"{key}.{k}"))
        for k in ("tp", "fp", "fn", "tn"):
            entry[k] = int(r[k])
        for k in ("tpr", "fnr", "tnr", "fpr"):
            entry[k] = _num(r[k])
        at[key] = entry

    acc = cls.accuracy()
    acc_ci = ci.get("accuracy")
    err_ci = None if acc_ci is None else (100.0 - acc_ci[1], 100.0 - acc_ci[0])
    per_cls_scores = cls.per_class()
    per_class: dict[str, dict] = {}
    for c, cname in enumerate(class_names):
        crow = [r for r in rows if r["label"] == cname]
        f1p = [r[f"dice_fg@{F1_THRESHOLD:g}"] for r in crow if r["has_roi"]]
        f1n = [r[f"dice_bg@{F1_THRESHOLD:g}"] for r in crow if r["has_background"]]
        card_at = per_class_px[c].dice_iou(thresholds["card"]) if crow else None
        per_class[cname] = {
            "n_images": len(crow),
            "n_images_with_roi": sum(1 for r in crow if r["has_roi"]),
            "pxap": _num(per_class_px[c].pxap()) if crow else None,
            "f1_pos": _num(np.mean(f1p)) if f1p else None,
            "f1_neg": _num(np.mean(f1n)) if f1n else None,
            "dice_fg@card": _num(card_at["dice_fg"]) if card_at else None,
            "miou@card": _num(card_at["miou"]) if card_at else None,
            **per_cls_scores[cname],
        }
    n_roi = sum(1 for r in rows if r["has_roi"])
    metrics = {
        "n_images": len(rows),
        "n_images_with_roi": n_roi,
        "n_images_without_roi": len(rows) - n_roi,
        "n_pixels": {"positive": pxap.n_pos, "negative": pxap.n_neg},
        "localization": {
            "pxap": _value(pxap.pxap(), ci.get("pxap")),
            "at_threshold": at,
            "f1": {
                "protocol": "Max-Min TMI, per image",
                "threshold": F1_THRESHOLD,
                "f1_pos": {
                    **_value(f1.f1_pos(), ci.get("f1_pos")),
                    "n_images": int(f1.f1_pos_values().size),
                },
                "f1_neg": {
                    **_value(f1.f1_neg(), ci.get("f1_neg")),
                    "n_images": int(f1.f1_neg_values().size),
                },
            },
        },
        "classification": {
            "accuracy": _value(acc, acc_ci),
            "error": _value(100.0 - acc, err_ci),
            "confusion_matrix": {
                "classes": list(class_names),
                "rows": "true class",
                "columns": "predicted class",
                "counts": cls.confusion().tolist(),
            },
        },
        "per_class": per_class,
    }
    pr = pxap.curve()
    tc = pxap.threshold_curve()
    curves = {
        "precision": pr["precision"],
        "recall": pr["recall"],
        **{k: tc[k] for k in _OVERLAP_KEYS},
        "points": {key: at[key]["threshold"] for key in at},
        "point_names": names,
        "pxap": pxap.pxap(),
    }
    return metrics, curves, best_t


# --------------------------------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------------------------------


def calibrated_path(model: Path, out: Path, taken: set[str] | None = None) -> Path:
    """Where ``--calibrate`` writes the calibrated copy of ``model``: ``<out>/<stem>.calibrated.pt``.

    When two models of a comparison share a stem (``runs/a/best-loc.pt`` and
    ``runs/b/best-loc.pt``), the parent folder's name is put in front (``a-best-loc``).
    """
    from histo_wsl.registry.registry import display_stem

    stem = display_stem(model)
    if taken is not None and stem in taken:
        stem = f"{model.parent.name}-{stem}"
    if taken is not None:
        taken.add(display_stem(model))
    return out / f"{stem}.calibrated.pt"


def calibrated_checkpoint(
    source: Path,
    target: Path,
    threshold: float,
    calibration: dict,
    cam_method: str | None = None,
    tta: str | None = None,
) -> Path:
    """Write a copy of ``source`` whose card carries the calibrated threshold (never in place).

    Args:
        source: the evaluated checkpoint.
        target: the new file; it must not exist.
        threshold: the chosen threshold.
        calibration: ``{set, criterion, value, ...}`` stored as ``card["calibration"]``.
        cam_method: the stage-1 CAM method the threshold was chosen with (stored in the card, as
            the threshold belongs to that map).
        tta: the test-time augmentation the threshold was chosen with (stored in the card, for
            the same reason).

    Returns:
        ``target``.

    Raises:
        InputError: ``target`` exists or is ``source``.
    """
    from histo_wsl.registry.checkpoint import load_checkpoint, save_checkpoint

    if target.exists() or target.resolve() == source.resolve():
        raise InputError(
            "the calibrated checkpoint exists already and is never overwritten; remove it or "
            "choose another --out",
            target,
        )
    ckpt = load_checkpoint(source)
    card = dict(ckpt["card"])
    card["threshold"] = float(threshold)
    if cam_method is not None and get_method(card.get("method"), source).has_cam:
        card["cam_method"] = cam_method
    if tta is not None:
        card["tta"] = tta
    card["calibration"] = dict(calibration)
    # a calibrated model is for inference: the optimizer state of a resumable last.pt is dropped
    return save_checkpoint(target, card, ckpt["state_dict"])


# --------------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def versions() -> dict:
    """Versions of Python, histo-wsl and the packages the numbers and plots depend on."""
    from histo_wsl.runtime.batch import environment

    env = environment()
    for name in ("matplotlib", "defusedxml", "scikit-learn"):
        try:
            env["versions"][name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            env["versions"][name] = None
    return env


def _display_names(models: list[Path]) -> list[str]:
    from histo_wsl.registry.registry import display_stem

    stems = [display_stem(m) for m in models]
    out = []
    for m, stem in zip(models, stems, strict=True):
        if stems.count(stem) > 1:
            out.append(f"{m.parent.name}/{stem}")
        else:
            out.append(stem)
    if len(set(out)) < len(out):  # the same file twice, or same folder names
        out = [f"{i + 1}:{n}" for i, n in enumerate(out)]
    return out


def _clean(obj: Any) -> Any:
    """JSON-ready: NaN/inf -> null, numpy scalars/arrays -> Python, paths -> str."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return _num(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _round_curve(a: np.ndarray) -> list:
    return [None if not np.isfinite(v) else round(float(v), 6) for v in a]


def write_per_image_csv(path: Path, results: list[ModelResult]) -> None:
    """One row per (model, image): labels, probabilities and per-image Dice/IoU at each threshold."""
    columns: list[str] = []
    for res in results:
        for r in res.rows:
            for k in r:
                if k not in columns:
                    columns.append(k)
    with atomic.atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=columns, restval="")
            w.writeheader()
            for res in results:
                w.writerows(res.rows)


def _load_example_arrays(ex: Example, sample: Sample, size: int) -> None:
    from PIL import Image

    from histo_wsl.data.images import _load_mask, _load_rgb

    ex.image = np.asarray(_load_rgb(sample.image).resize((size, size), Image.Resampling.BILINEAR))
    if sample.mask is not None and sample.mask.is_file():
        m = _load_mask(sample.mask).resize((size, size), Image.Resampling.NEAREST)
        ex.mask = np.asarray(m) > 127
    else:
        ex.mask = np.zeros((size, size), dtype=bool)


def run_evaluate(
    settings: EvalSettings, *, argv: list[str] | None = None, quiet: bool = False
) -> dict:
    """Run ``histo-wsl evaluate`` on images: metrics.json, per_image.csv, report.md/.html, run.json.

    Args:
        settings: what to evaluate and how.
        argv: the command line (recorded).
        quiet: no progress bars.

    Returns:
        A JSON-ready summary: output files, and per model the headline numbers.

    Raises:
        InputError: unusable settings, checkpoints or data (see :func:`select_data`), models with
            different classes, or a calibrated checkpoint that exists already.
    """
    from histo_wsl.inference.predictor import load_model
    from histo_wsl.reporting import report
    from histo_wsl.training.engine import resolve_device

    settings.check()
    started, t0 = _now(), time.perf_counter()
    argv = list(argv if argv is not None else sys.argv)
    out = atomic.ensure_writable_dir(settings.out)  # before the evaluation, not after it
    predictors = [
        load_model(m, cam_method=settings.cam_method, tta=settings.tta) for m in settings.models
    ]
    names = _display_names([Path(m) for m in settings.models])
    classes = list(predictors[0].card.get("class_names") or [])
    if not classes:
        raise InputError("the model card has no class_names", settings.models[0])
    for p in predictors[1:]:
        if list(p.card.get("class_names") or []) != classes:
            raise InputError(
                f"the models have different classes ({p.card.get('class_names')} vs {classes}); "
                "compare models trained on the same classes",
                p.path,
            )
    targets: list[Path] = []
    if settings.calibrate:
        taken: set[str] = set()
        for m in settings.models:
            target = calibrated_path(Path(m), out, taken)
            if target.exists():
                raise InputError(
                    "the calibrated checkpoint exists already and is never overwritten; remove "
                    "it or choose another --out",
                    target,
                )
            targets.append(target)
    negative = settings.negative_class
    if negative is None:
        negative = predictors[0].card.get("negative_class")
    data = select_data(
        settings.data,
        classes,
        split=settings.split,
        fold=settings.fold,
        skip_missing=settings.skip_missing,
        negative_class=negative,
    )
    if data.info["skipped_missing_masks"]:
        warn(
            f"{len(data.info['skipped_missing_masks'])} image(s) without a mask left out "
            "(--skip-missing); listed in metrics.json"
        )
    for name, sizes in data.info["skipped_mask_size_mismatch"].items():
        (iw, ih), (mw, mh) = sizes["image"], sizes["mask"]
        warn(f"{name}: left out (--skip-missing): its mask is {mw}x{mh} px, the image {iw}x{ih}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"the output folder cannot be created ({exc})", out) from None
    device = resolve_device(settings.device)
    results = []
    for predictor, name in zip(predictors, names, strict=True):
        results.append(
            evaluate_model(
                predictor,
                data,
                settings,
                device,
                out,
                name=name,
                quiet=quiet,
            )
        )
    calibrations = []
    for res, target in zip(results, targets, strict=False):
        at_best = res.metrics["localization"]["at_threshold"]["best"]
        calibration = {
            "set": f"{data.info['source']} [{data.info['split']}, {data.info['n_images']} images]",
            "criterion": f"{CALIBRATION_CRITERION} (dataset-level mean of foreground and "
            "background IoU over the 0.001 threshold grid)",
            "value": at_best["miou"]["value"],
            "threshold": res.best_threshold,
            "previous_threshold": res.card.get("threshold"),
            "protocol": settings.protocol,
            "map": res.metrics["map"],
            "date": _now(),
            "histo-wsl": __version__,
        }
        calibrated_checkpoint(
            res.path,
            target,
            res.best_threshold,
            calibration,
            cam_method=settings.cam_method,
            tta=res.card.get("tta"),
        )
        res.metrics["calibration"] = {**calibration, "checkpoint": str(target)}
        calibrations.append(str(target))

    # the report's example grid: images and masks read again, only for the few examples
    for res in results:
        size = int(res.metrics["input_size"])
        for ex in res.examples:
            _load_example_arrays(ex, data.samples[ex.index], size)

    env = versions()
    metrics = {
        "tool": "histo-wsl",
        "command": "evaluate",
        "argv": argv,
        "cwd": os.getcwd(),
        "params": settings.as_dict(),
        "started": started,
        "ended": _now(),
        "seconds": round(time.perf_counter() - t0, 3),
        **env,
        "data": {
            **data.info,
        },
        "protocol": {"name": settings.protocol, "description": PROTOCOLS[settings.protocol]},
        "definitions": DEFINITIONS,
        "threshold_grid": [round(float(t), 3) for t in THRESHOLDS],
        "bootstrap": {
            "n": settings.bootstrap,
            "seed": settings.seed,
            "confidence": 0.95,
            "unit": "image",
        },
        "models": [
            {
                **res.metrics,
                "curves": {
                    "thresholds": "threshold_grid",
                    **{k: _round_curve(res.curves[k]) for k in ("precision", "recall")},
                    **{k: _round_curve(res.curves[k]) for k in _OVERLAP_KEYS},
                },
            }
            for res in results
        ],
    }
    metrics = _clean(metrics)
    atomic.write_json(out / "metrics.json", metrics)
    write_per_image_csv(out / "per_image.csv", results)
    files = report.write_reports(out, metrics, results)
    summary = {
        "out": str(out),
        "files": {
            "metrics": str(out / "metrics.json"),
            "per_image": str(out / "per_image.csv"),
            **{k: str(v) for k, v in files.items()},
        },
        "calibrated_checkpoints": calibrations,
        "data": {k: data.info[k] for k in ("source", "split", "n_images")},
        "models": [_headline(m) for m in metrics["models"]],
        "seconds": round(time.perf_counter() - t0, 3),
    }
    atomic.write_json(
        out / "run.json",
        {k: metrics[k] for k in ("tool", "command", "argv", "cwd", "params", "started", "versions")}
        | {
            "platform": metrics.get("platform"),
            "host": metrics.get("host"),
            "seed": settings.seed,
            "device": str(device),
            "ended": _now(),
            "seconds": summary["seconds"],
            "items": [
                {
                    "name": m["name"],
                    "path": m["checkpoint"],
                    "status": "done",
                    "seconds": m["seconds"],
                }
                for m in metrics["models"]
            ],
            "outputs": summary["files"],
            "exit_code": 0,
        },
    )
    return summary


def _headline(m: dict) -> dict:
    loc = m["localization"]
    return {
        "name": m["name"],
        "checkpoint": m["checkpoint"],
        "pxap": loc["pxap"]["value"],
        "f1_pos": loc["f1"]["f1_pos"]["value"],
        "f1_neg": loc["f1"]["f1_neg"]["value"],
        "dice_fg@card": loc["at_threshold"]["card"]["dice_fg"]["value"],
        "best_threshold": loc["at_threshold"]["best"]["threshold"],
        "accuracy": m["classification"]["accuracy"]["value"],
        **({"calibrated_checkpoint": m["calibration"]["checkpoint"]} if "calibration" in m else {}),
    }
