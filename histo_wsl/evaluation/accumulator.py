"""One model's evaluation as a stream: meters fed image by image, then its metrics.json entry.

:class:`Accumulator` feeds the dataset-level PxAP meters, the per-image F1 meter, the
classification meter, one row of numbers per image, the few best and worst images and, for the
report's grid of every image, one small JPEG thumbnail per image (:class:`Thumbnail`, a few
kilobytes: no image or map is kept); per-image histograms for the bootstrap spill to a temporary
file (:class:`HistogramSpill`). Images and slides both go through it.
"""

from __future__ import annotations

import heapq
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from histo_wsl.evaluation.bootstrap import bootstrap_ci, bootstrap_histograms
from histo_wsl.evaluation.calibration import (
    CALIBRATION_CRITERION,
)
from histo_wsl.evaluation.metrics import (
    BIN_EDGES,
    ClassificationMeter,
    PerImageMeter,
    PxAPMeter,
)
from histo_wsl.methods import get_method
from histo_wsl.reporting.metrics_file import (
    BEST_NAME,
    value_with_ci,
)
from histo_wsl.reporting.report import thumbnail_jpeg
from histo_wsl.runtime.record import number_or_none

#: threshold of the Max-Min per-image F1+/F1- protocol
F1_THRESHOLD = 0.5


__all__ = [
    "F1_THRESHOLD",
    "OVERLAP_KEYS",
    "Accumulator",
    "Example",
    "HistogramSpill",
    "ModelResult",
    "Thumbnail",
    "map_description",
]

#: the overlap numbers reported at each threshold
OVERLAP_KEYS = ("dice_fg", "dice_bg", "iou_fg", "iou_bg", "miou")


class HistogramSpill:
    """Per-image score histograms (2 × 1002 int32 = 8 KB an image) appended to a temporary file."""

    def __init__(self, folder: Path) -> None:
        fd, name = tempfile.mkstemp(prefix=".evaluate-hist-", suffix=".bin", dir=folder)
        self.path = Path(name)
        self._fh = os.fdopen(fd, "wb")
        self.n = 0

    def add(self, meter: PxAPMeter) -> None:
        """Append one image's positive and negative histograms."""
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
        """Close the spill file (it is deleted with the accumulator's temporary folder)."""
        if not self._fh.closed:
            self._fh.close()
        self.path.unlink(missing_ok=True)


@dataclass
class Example:
    """One image of the report's best-and-worst grid (arrays at the thumbnail's size)."""

    name: str
    kind: str  # best | worst
    rank_value: float
    index: int
    score_map: np.ndarray  # (h, w) uint8, score × 255
    caption: str
    image: np.ndarray | None = None  # (h, w, 3) uint8
    mask: np.ndarray | None = None  # (h, w) bool


@dataclass(frozen=True)
class Thumbnail:
    """One evaluated image as the report's grid of every image shows it: a small JPEG.

    Attributes:
        index: the image's index in the evaluated list.
        name: the image's name.
        row: the position of its row in :attr:`Accumulator.rows`.
        jpeg: the map over the image, the ground truth outlined (JPEG bytes).
        width: the JPEG's width in pixels.
        height: the JPEG's height in pixels.
    """

    index: int
    name: str
    row: int
    jpeg: bytes
    width: int
    height: int


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
    thumbnails: list[Thumbnail] = field(default_factory=list)


def map_description(card: dict, map_class: str) -> str:
    """The evaluated map in words: the method's description, plus the test-time flips if any."""
    text = get_method(card.get("method")).map_description(card, map_class)
    if card.get("tta", "none") == "flips":
        text += "; mean of 4 flipped views (--tta flips)"
    return text


class Accumulator:
    """One model's meters over a stream of images (or slides): everything the report needs.

    Each :meth:`add` feeds the dataset-level PxAP meter (and the per-class ones), the per-image
    F1 meter, the classification meter, the per-image row, the temporary histogram file of the
    bootstrap, the heaps of best and worst examples and the image's JPEG thumbnail (when its
    thumbnail arrays are given); no full-size map or image is kept.

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
        self.spill = HistogramSpill(work_dir) if bootstrap > 0 else None
        self.rows: list[dict] = []
        self.thumbnails: list[Thumbnail] = []
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
        thumbnail_image: np.ndarray | None = None,
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
            thumbnail: the map as the report shows it (uint8 0-255, small, at the image's aspect
                ratio); None: the image is in no grid of the report.
            thumbnail_mask: the ground truth at the thumbnail's size.
            thumbnail_image: the image (RGB uint8) at the thumbnail's size; with ``thumbnail``,
                the image's JPEG thumbnail is made and kept (:attr:`thumbnails`).

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
            thumbnail_image=thumbnail_image,
        )

    def add_meter(
        self,
        index: int,
        name: str,
        img_meter: PxAPMeter,
        label: int,
        pred: int | None,
        *,
        extra: dict | None = None,
        thumbnail: np.ndarray | None = None,
        thumbnail_mask: np.ndarray | None = None,
        thumbnail_image: np.ndarray | None = None,
    ) -> dict:
        """Score one image from its own score histograms (e.g. a slide read in bands).

        The per-image numbers at a threshold are those of ``score >= threshold`` (the threshold is
        on the 0.001 grid, where the histogram counts are exact), so this equals :meth:`add`.

        Args:
            index: the image's index in the evaluated list.
            name: the image's name.
            img_meter: a :class:`~histo_wsl.evaluation.metrics.PxAPMeter` filled with this image only.
            label: true class index.
            pred: predicted class index (None: no prediction to compare, e.g. a slide whose
                ROI class is not a class of the model; no accuracy then).
            extra: more columns of the row.
            thumbnail: the map as the report shows it (uint8 0-255, at the image's aspect ratio).
            thumbnail_mask: the ground truth at the thumbnail's size.
            thumbnail_image: the image (RGB uint8) at the thumbnail's size.

        Returns:
            The image's row.
        """
        self.pxap.merge(img_meter)
        self.per_class_px[label].merge(img_meter)
        if self.spill is not None:
            self.spill.add(img_meter)
        if pred is not None:
            self.cls.update(np.array([pred]), np.array([label]))
        at = img_meter.dice_iou(F1_THRESHOLD)
        tmi = self.f1.update_counts(at["tp"], at["fp"], at["fn"], at["tn"], F1_THRESHOLD, name=name)
        row: dict[str, Any] = {
            "model": self.model,
            "image": name,
            "label": self.class_names[label],
            "predicted": None if pred is None else self.class_names[pred],
            "correct": None if pred is None else pred == label,
            **(extra or {}),
            "has_roi": tmi["has_roi"],
            "has_background": tmi["has_background"],
            "gt_fg_fraction": round(tmi["gt_fg_pixels"] / max(tmi["n_pixels"], 1), 6),
        }
        for t in self.row_thresholds:
            r = img_meter.dice_iou(t)
            for key in OVERLAP_KEYS:
                row[f"{key}@{t:g}"] = round(float(r[key]), 6)
        self.rows.append(row)
        if thumbnail is not None:
            self._keep(index, row, thumbnail, thumbnail_mask, thumbnail_image)
        return row

    def _keep(
        self,
        index: int,
        row: dict,
        score: np.ndarray,
        mask: np.ndarray | None,
        image: np.ndarray | None,
    ) -> None:
        """Keep what the report shows of one image: its JPEG thumbnail and, maybe, an example."""
        name = row["image"]
        if image is not None:
            jpeg, w, h = thumbnail_jpeg(image, score, mask)
            self.thumbnails.append(Thumbnail(index, name, len(self.rows) - 1, jpeg, w, h))
        if self.k_examples:
            value = row[f"miou@{self.thresholds['card']:g}"]
            ex = Example(
                name,
                "",
                value,
                index,
                score,
                f"{row['label']} → {row['predicted']}, mIoU {100 * value:.1f}%",
                image=image,
                mask=mask,
            )
            _push(self._best, (value, -index), ex, self.k_examples)
            _push(self._worst, (-value, index), ex, self.k_examples)

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


def _push(heap: list, key: tuple, example: Example, k: int) -> None:
    """Keep the ``k`` examples of largest ``key`` (unique: it holds the image index) in a min-heap."""
    if len(heap) < k:
        heapq.heappush(heap, (key, example))
    elif key > heap[0][0]:
        heapq.heapreplace(heap, (key, example))


def _summarise(
    acc: Accumulator, hists: tuple[np.ndarray, np.ndarray] | None
) -> tuple[dict, dict, float]:
    """One model's metrics.json entry, its curves and best threshold (bootstrap intervals too)."""
    pxap, per_class_px, f1, cls, rows = acc.pxap, acc.per_class_px, acc.f1, acc.cls, acc.rows
    thresholds, class_names = acc.thresholds, acc.class_names
    best_t, _ = pxap.best_threshold(CALIBRATION_CRITERION)
    points = {**thresholds, "best": best_t}
    names = {"card": acc.card_name, "user": "--threshold", "best": BEST_NAME}
    n_boot, seed = acc.bootstrap, acc.seed

    ci: dict[str, tuple[float, float]] = {}
    if n_boot > 0 and hists is not None:

        def stats(meter: PxAPMeter) -> dict[str, float]:
            out = {"pxap": meter.pxap()}
            for key, t in points.items():
                r = meter.dice_iou(t)
                out.update({f"{key}.{k}": r[k] for k in OVERLAP_KEYS})
            return out

        ci.update(bootstrap_histograms(hists[0], hists[1], stats, n=n_boot, seed=seed))
        ci["f1_pos"] = bootstrap_ci(f1.f1_pos_values(), n=n_boot, seed=seed)
        ci["f1_neg"] = bootstrap_ci(f1.f1_neg_values(), n=n_boot, seed=seed)
        correct = np.array([100.0 * r["correct"] for r in rows if r["correct"] is not None])
        if correct.size:
            ci["accuracy"] = bootstrap_ci(correct, n=n_boot, seed=seed)

    at: dict[str, dict] = {}
    for key, t in points.items():
        r = pxap.dice_iou(t)
        entry: dict[str, Any] = {"name": names[key], "threshold": r["threshold"]}
        for k in OVERLAP_KEYS:
            entry[k] = value_with_ci(r[k], ci.get(f"{key}.{k}"))
        for k in ("tp", "fp", "fn", "tn"):
            entry[k] = int(r[k])
        for k in ("tpr", "fnr", "tnr", "fpr"):
            entry[k] = number_or_none(r[k])
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
            "pxap": number_or_none(per_class_px[c].pxap()) if crow else None,
            "f1_pos": number_or_none(np.mean(f1p)) if f1p else None,
            "f1_neg": number_or_none(np.mean(f1n)) if f1n else None,
            "dice_fg@card": number_or_none(card_at["dice_fg"]) if card_at else None,
            "miou@card": number_or_none(card_at["miou"]) if card_at else None,
            **per_cls_scores[cname],
        }
    n_roi = sum(1 for r in rows if r["has_roi"])
    metrics = {
        "n_images": len(rows),
        "n_images_with_roi": n_roi,
        "n_images_without_roi": len(rows) - n_roi,
        "n_pixels": {"positive": pxap.n_pos, "negative": pxap.n_neg},
        "localization": {
            "pxap": value_with_ci(pxap.pxap(), ci.get("pxap")),
            "at_threshold": at,
            "f1": {
                "protocol": "Max-Min TMI, per image",
                "threshold": F1_THRESHOLD,
                "f1_pos": {
                    **value_with_ci(f1.f1_pos(), ci.get("f1_pos")),
                    "n_images": int(f1.f1_pos_values().size),
                },
                "f1_neg": {
                    **value_with_ci(f1.f1_neg(), ci.get("f1_neg")),
                    "n_images": int(f1.f1_neg_values().size),
                },
            },
        },
        "classification": {
            "accuracy": value_with_ci(acc, acc_ci),
            "error": value_with_ci(100.0 - acc, err_ci),
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
        **{k: tc[k] for k in OVERLAP_KEYS},
        "points": {key: at[key]["threshold"] for key in at},
        "point_names": names,
        "pxap": pxap.pxap(),
    }
    return metrics, curves, best_t
