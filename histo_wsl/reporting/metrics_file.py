"""The numbers files of evaluate: metrics.json's definitions and value format, per_image.csv.

Shared by image evaluation (:mod:`histo_wsl.evaluation.images`) and slide evaluation
(:mod:`histo_wsl.evaluation.slides`), so both write the same keys the same way: :data:`DEFINITIONS`
names every number, :func:`value_with_ci` gives a value with its bootstrap interval, thresholds are
snapped to the 0.001 grid (:func:`snap`), curves are rounded (:func:`round_curve`).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np

from histo_wsl.runtime import atomic
from histo_wsl.runtime.record import number_or_none

__all__ = [
    "BEST_NAME",
    "DEFINITIONS",
    "UNCALIBRATED_NAME",
    "card_threshold_name",
    "headline",
    "round_curve",
    "snap",
    "value_with_ci",
    "write_per_image_csv",
]

#: how the optimistic threshold is named in metrics.json and reports
BEST_NAME = "best_threshold (optimistic)"

#: how a card's threshold is named when the card carries no calibration record
UNCALIBRATED_NAME = "card threshold (not calibrated: the card has no calibration record)"


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
    "card": "the threshold in the model card; calibrated only when the card carries a calibration "
    "record (written by evaluate --calibrate, naming the set it was chosen on), else the card's "
    "threshold as trained or exported, not calibrated.",
    "user": "the --threshold option.",
    "best": f"{BEST_NAME}: the threshold of the grid 0, 0.001, ..., 0.999 maximising miou on the "
    "evaluated set itself (NEGEV's logged numbers); optimistic, not a test number.",
}


def card_threshold_name(card: dict) -> str:
    """How metrics.json and the reports name a model card's threshold.

    The threshold is called calibrated only when the card carries a ``calibration`` record (what
    ``evaluate --calibrate`` writes, with the set it was chosen on); otherwise it is the card's
    threshold, not calibrated (:data:`UNCALIBRATED_NAME`), whatever its value.

    Args:
        card: the model card.

    Returns:
        The threshold's name.
    """
    cal = card.get("calibration")
    if not cal:
        return UNCALIBRATED_NAME
    where = cal.get("set") if isinstance(cal, dict) else None
    if where:
        return f"card threshold (calibrated on {where})"
    return "card threshold (calibrated by evaluate --calibrate)"


def snap(t: float) -> float:
    """A threshold rounded to the 0.001 grid PxAP is binned on."""
    return math.floor(t * 1000 + 0.5) / 1000


def value_with_ci(v: float, ci: tuple[float, float] | None = None, scale: float = 1.0) -> dict:
    """``{"value": v·scale, "ci95": [lo·scale, hi·scale]}`` (the interval only when given)."""
    out: dict[str, Any] = {"value": number_or_none(v * scale)}
    if ci is not None:
        out["ci95"] = [number_or_none(ci[0] * scale), number_or_none(ci[1] * scale)]
    return out


def round_curve(a: np.ndarray) -> list:
    """A curve as a JSON list: 6 decimals, non-finite points as null."""
    return [None if not np.isfinite(v) else round(float(v), 6) for v in a]


def write_per_image_csv(path: Path, rows_per_model: list[list[dict]]) -> None:
    """One row per (model, image): labels, probabilities and per-image Dice/IoU at each threshold.

    ``rows_per_model``: each model's rows (:attr:`ModelResult.rows` of evaluation), in order;
    the columns are the union of the rows' keys in first-seen order.
    """
    columns: list[str] = []
    for rows in rows_per_model:
        for r in rows:
            for k in r:
                if k not in columns:
                    columns.append(k)
    with atomic.atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=columns, restval="")
            w.writeheader()
            for rows in rows_per_model:
                w.writerows(rows)


def headline(m: dict) -> dict:
    """The few numbers of one model's metrics a summary line shows (PxAP, Dice, accuracy...)."""
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
