"""Localization and classification metrics of NEGEV (MIDL 2022) and Max-Min (IEEE TMI 2022).

What is here, and where it comes from (``shared/reference/method.md``):

* :class:`PxAPMeter` -- pixel-wise average precision (PxAP, Choe et al. CVPR 2020) exactly as the
  NEGEV code computes it (§4.1): dataset-level histograms of the scores at ground-truth positive and
  negative pixels over the bin edges ``[0, 0.001, ..., 0.999, 1, 2, 3]``, then the area under the
  dataset-level precision-recall curve. Also the Dice/IoU numbers NEGEV logs at a threshold (§4.2).
* :class:`PerImageMeter` -- the Max-Min (TMI) protocol (§2.3): Dice of the foreground (F1+) and of the
  background (F1-) per image at a fixed threshold, averaged over images (F1+ only over images whose
  ground truth has a region of interest, F1- only over images with some ground-truth background).
* :class:`ClassificationMeter` -- image-level accuracy / error, confusion matrix, per-class scores (§4.3).
* :func:`dice` and :func:`iou` helpers.

Confidence intervals are :mod:`histo_wsl.evaluation.bootstrap`.

Units: PxAP, accuracy and classification error are in percent, as in the papers' tables; Dice, IoU,
F1+/F1-, precision, recall and rates are fractions in [0, 1] (multiply by 100 for the tables).

Inputs may be numpy arrays or torch tensors (converted with ``.detach().cpu()``); torch is never
imported by this module. Resizing score maps to the mask size is the caller's job: shapes must match.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from histo_wsl.errors import InputError

__all__ = [
    "BIN_EDGES",
    "THRESHOLDS",
    "ClassificationMeter",
    "MetricInputError",
    "PerImageMeter",
    "PxAPMeter",
    "dice",
    "iou",
]

#: Threshold list tau in {0, 0.001, ..., 0.999} (``cam_curve_interval`` = 0.001).
THRESHOLDS: np.ndarray = np.arange(1000) / 1000
#: Histogram bin edges: the threshold list followed by [1, 2, 3] (1003 edges, 1002 bins:
#: [0, 0.001), ..., [0.999, 1), [1, 2), [2, 3]), as in ``np.histogram(scores, bins=BIN_EDGES)``.
BIN_EDGES: np.ndarray = np.concatenate([THRESHOLDS, [1.0, 2.0, 3.0]])
N_BINS = BIN_EDGES.size - 1  # 1002
_GRID = 1000  # thresholds per unit score


class MetricInputError(InputError, ValueError):
    """Arrays that a metric cannot use (mismatched shapes, bad labels); also a :class:`ValueError`."""


# --------------------------------------------------------------------------------------------------
# conversion helpers
# --------------------------------------------------------------------------------------------------


def to_numpy(x: Any) -> np.ndarray:
    """A numpy view/copy of an array-like or a torch tensor (without importing torch)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
        try:
            return np.asarray(x)
        except (TypeError, RuntimeError):  # e.g. bfloat16 tensors have no numpy dtype
            return np.asarray(x.float())
    return np.asarray(x)


def _as_scores(x: Any) -> np.ndarray:
    """Float64 scores; NaN -> 0, +inf -> 1, -inf -> 0, then clipped to [0, 1]."""
    s = to_numpy(x).astype(np.float64, copy=True)
    np.nan_to_num(s, copy=False, nan=0.0, posinf=1.0, neginf=0.0)
    np.clip(s, 0.0, 1.0, out=s)
    return s


def _as_raw_scores(x: Any) -> np.ndarray:
    """Float64 scores without clipping (NaN -> 0, +-inf kept)."""
    s = to_numpy(x).astype(np.float64, copy=True)
    s[np.isnan(s)] = 0.0
    return s


def _as_mask(x: Any) -> np.ndarray:
    """Boolean mask: bool arrays as they are, anything numeric as ``value > 0.5``."""
    m = to_numpy(x)
    if m.dtype == np.bool_:
        return m
    return m > 0.5


def _check_same_shape(a: np.ndarray, b: np.ndarray, what_a: str, what_b: str) -> None:
    if a.shape != b.shape:
        raise MetricInputError(
            f"{what_a} has shape {tuple(a.shape)} but {what_b} has shape {tuple(b.shape)}; "
            f"resize the {what_a} to the mask size (bilinear) before evaluating"
        )


def _safe_div(num: np.ndarray | float, den: np.ndarray | float, empty: float) -> Any:
    """Divide ``num`` by ``den``, giving ``empty`` where ``den == 0``."""
    num_a = np.asarray(num, dtype=np.float64)
    den_a = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num_a, den_a).shape, empty, dtype=np.float64)
    np.divide(num_a, den_a, out=out, where=den_a != 0)
    return out if out.ndim else float(out)


def _overlap_scores(tp: Any, fp: Any, fn: Any, tn: Any) -> dict[str, Any]:
    """Dice/IoU of foreground and background from confusion counts (empty vs empty = 1.0)."""
    tp, fp, fn, tn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, fn, tn))
    dice_fg = _safe_div(2 * tp, 2 * tp + fp + fn, 1.0)
    dice_bg = _safe_div(2 * tn, 2 * tn + fp + fn, 1.0)
    iou_fg = _safe_div(tp, tp + fp + fn, 1.0)
    iou_bg = _safe_div(tn, tn + fp + fn, 1.0)
    return {
        "dice_fg": dice_fg,
        "dice_bg": dice_bg,
        "iou_fg": iou_fg,
        "iou_bg": iou_bg,
        "miou": (iou_fg + iou_bg) / 2,
    }


# --------------------------------------------------------------------------------------------------
# simple helpers
# --------------------------------------------------------------------------------------------------


def dice(pred: Any, gt: Any) -> float:
    """Dice coefficient 2|P∩G| / (|P| + |G|) of two binary masks.

    Args:
        pred: predicted mask (bool, or numeric with ``> 0.5`` meaning foreground).
        gt: ground-truth mask of the same shape.

    Returns:
        Dice in [0, 1]. Two empty masks give 1.0 (the prediction is correctly empty).

    Raises:
        MetricInputError: the shapes differ.
    """
    p, g = _as_mask(pred), _as_mask(gt)
    _check_same_shape(p, g, "prediction", "ground-truth mask")
    inter = int(np.count_nonzero(p & g))
    total = int(np.count_nonzero(p)) + int(np.count_nonzero(g))
    return 1.0 if total == 0 else 2.0 * inter / total


def iou(pred: Any, gt: Any) -> float:
    """Intersection over union |P∩G| / |P∪G| of two binary masks.

    Args:
        pred: predicted mask (bool, or numeric with ``> 0.5`` meaning foreground).
        gt: ground-truth mask of the same shape.

    Returns:
        IoU in [0, 1]. Two empty masks give 1.0 (the prediction is correctly empty).

    Raises:
        MetricInputError: the shapes differ.
    """
    p, g = _as_mask(pred), _as_mask(gt)
    _check_same_shape(p, g, "prediction", "ground-truth mask")
    union = int(np.count_nonzero(p | g))
    return 1.0 if union == 0 else int(np.count_nonzero(p & g)) / union


# --------------------------------------------------------------------------------------------------
# PxAP
# --------------------------------------------------------------------------------------------------


class PxAPMeter:
    """Streaming, dataset-level PxAP accumulator (method.md §4.1, NEGEV ``MaskEvaluator``).

    Keeps two int64 histograms over the 1002 bins of :data:`BIN_EDGES`: the scores at ground-truth
    positive pixels and at ground-truth negative pixels, summed over every image of the split (both
    classes: images without a region of interest only add negatives, i.e. false positives). Memory
    is O(bins); score maps are never stored.

    Scores are compared in float64 with the edges ``k/1000``, so a score lands in the same bin as
    ``np.histogram(scores, bins=BIN_EDGES)`` would put it.
    """

    def __init__(self) -> None:
        self.pos_hist = np.zeros(N_BINS, dtype=np.int64)
        self.neg_hist = np.zeros(N_BINS, dtype=np.int64)
        self.n_images = 0

    # ---- accumulation ------------------------------------------------------------------------

    def update(self, score_map: Any, gt_mask: Any, ignore: Any | None = None) -> None:
        """Add one image.

        Args:
            score_map: localization scores (H, W) (any shape equal to the mask's), expected in
                [0, 1]; values are clipped to [0, 1] and NaN counts as 0.
            gt_mask: ground-truth mask of the same shape: bool, or numeric with ``> 0.5`` positive.
            ignore: optional mask of the same shape; non-zero pixels (e.g. value 255) are left out.

        Raises:
            MetricInputError: the shapes differ (a :class:`ValueError`).
        """
        scores = _as_scores(score_map)
        gt = _as_mask(gt_mask)
        _check_same_shape(scores, gt, "score map", "ground-truth mask")
        if ignore is not None:
            ign = to_numpy(ignore)
            _check_same_shape(ign, gt, "ignore mask", "ground-truth mask")
            keep = ign == 0
            scores, gt = scores[keep], gt[keep]
        else:
            scores, gt = scores.ravel(), gt.ravel()
        self.pos_hist += self._histogram(scores[gt])
        self.neg_hist += self._histogram(scores[~gt])
        self.n_images += 1

    @staticmethod
    def _histogram(scores: np.ndarray) -> np.ndarray:
        """Bin counts identical to ``np.histogram(scores, bins=BIN_EDGES)`` for scores in [0, 1]."""
        idx = np.searchsorted(BIN_EDGES, scores, side="right") - 1
        idx = np.minimum(idx, N_BINS - 1)  # the last bin [2, 3] is closed on the right
        return np.bincount(idx, minlength=N_BINS).astype(np.int64)

    def merge(self, other: PxAPMeter) -> PxAPMeter:
        """Add another meter's counts (other shard / DDP rank) into this one.

        Args:
            other: a meter filled on other images.

        Returns:
            This meter, for chaining.
        """
        if not isinstance(other, PxAPMeter):
            raise TypeError(f"can only merge a PxAPMeter, got {type(other).__name__}")
        self.pos_hist += other.pos_hist
        self.neg_hist += other.neg_hist
        self.n_images += other.n_images
        return self

    def reset(self) -> None:
        """Forget every image."""
        self.pos_hist[:] = 0
        self.neg_hist[:] = 0
        self.n_images = 0

    def state_dict(self) -> dict[str, Any]:
        """Counts as plain Python lists/ints (JSON- and checkpoint-friendly).

        Returns:
            ``{"pos_hist": [...], "neg_hist": [...], "n_images": int}``.
        """
        return {
            "pos_hist": [int(v) for v in self.pos_hist],
            "neg_hist": [int(v) for v in self.neg_hist],
            "n_images": int(self.n_images),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore counts saved by :meth:`state_dict`.

        Args:
            state: the dict :meth:`state_dict` returned.

        Raises:
            ValueError: the histograms do not have 1002 bins.
        """
        pos = np.asarray(state["pos_hist"], dtype=np.int64)
        neg = np.asarray(state["neg_hist"], dtype=np.int64)
        if pos.shape != (N_BINS,) or neg.shape != (N_BINS,):
            raise ValueError(
                f"PxAP state needs two histograms of {N_BINS} bins, got {pos.shape} and {neg.shape}"
            )
        self.pos_hist = pos.copy()
        self.neg_hist = neg.copy()
        self.n_images = int(state["n_images"])

    # ---- results -----------------------------------------------------------------------------

    @property
    def n_pos(self) -> int:
        """Number of ground-truth positive pixels seen."""
        return int(self.pos_hist.sum())

    @property
    def n_neg(self) -> int:
        """Number of ground-truth negative pixels seen."""
        return int(self.neg_hist.sum())

    def _counts_ge(self) -> tuple[np.ndarray, np.ndarray]:
        """TP and FP at the lower edge of each bin (score >= edge), ascending edge order."""
        tp = self.pos_hist[::-1].cumsum()[::-1]
        fp = self.neg_hist[::-1].cumsum()[::-1]
        return tp, fp

    def pxap(self) -> float:
        """PxAP in percent: area under the dataset-level pixel precision-recall curve.

        With the bins ordered by decreasing threshold (index 0 = [2, 3], 1 = [1, 2), 2 =
        [0.999, 1), ...), PxAP = 100 · Σ_{i≥1} P_i · (R_i − R_{i−1}), skipping bins where
        TP + FP = 0 (method.md §4.1). Scores exactly 1.0 are counted (bin i = 1).

        Returns:
            PxAP in [0, 100], or ``nan`` when no positive pixel has been seen.
        """
        n_pos = self.n_pos
        if n_pos == 0:
            return float("nan")
        tp = self.pos_hist[::-1].cumsum().astype(np.float64)
        fp = self.neg_hist[::-1].cumsum().astype(np.float64)
        nonzero = (tp + fp) != 0
        precision = _safe_div(tp, tp + fp, 0.0)
        recall = tp / n_pos
        terms = precision[1:] * np.diff(recall)
        return float(100.0 * terms[nonzero[1:]].sum())

    def curve(self) -> dict[str, np.ndarray]:
        """Dataset-level precision-recall curve at every threshold of :data:`THRESHOLDS`.

        A pixel is predicted positive when its score is ≥ τ.

        Returns:
            Dict of arrays of length 1000: ``thresholds``, ``precision`` (nan where TP + FP = 0),
            ``recall`` (nan when there is no positive pixel), ``tp``, ``fp``, ``fn``, ``tn`` (int64).
        """
        tp_all, fp_all = self._counts_ge()
        tp, fp = tp_all[: THRESHOLDS.size], fp_all[: THRESHOLDS.size]
        n_pos, n_neg = self.n_pos, self.n_neg
        return {
            "thresholds": THRESHOLDS.copy(),
            "precision": _safe_div(tp, tp + fp, float("nan")),
            "recall": _safe_div(tp, np.full(tp.shape, n_pos), float("nan")),
            "tp": tp.copy(),
            "fp": fp.copy(),
            "fn": n_pos - tp,
            "tn": n_neg - fp,
        }

    @staticmethod
    def _snap(threshold: float) -> int:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        return int(np.floor(threshold * _GRID + 0.5))

    def _scores_at(self, k: int) -> dict[str, Any]:
        tp_all, fp_all = self._counts_ge()
        n_pos, n_neg = self.n_pos, self.n_neg
        tp, fp = int(tp_all[k]), int(fp_all[k])
        fn, tn = n_pos - tp, n_neg - fp
        out: dict[str, Any] = {"threshold": k / _GRID}
        out.update({key: float(v) for key, v in _overlap_scores(tp, fp, fn, tn).items()})
        out.update(
            {
                "tp": tp,
                "fp": fp,
                "fn": fn,
                "tn": tn,
                "tpr": _safe_div(tp, n_pos, float("nan")),
                "fnr": _safe_div(fn, n_pos, float("nan")),
                "tnr": _safe_div(tn, n_neg, float("nan")),
                "fpr": _safe_div(fp, n_neg, float("nan")),
            }
        )
        return out

    def dice_iou(self, threshold: float = 0.5) -> dict[str, Any]:
        """Dataset-level Dice and IoU of foreground and background at one threshold (§4.2).

        Pixels with score ≥ τ are predicted positive. Because only histograms are kept, τ is
        snapped to the nearest point of the 0.001 grid (``round(τ·1000)/1000``), i.e. the scores
        are effectively compared with the snapped value; ``threshold`` in the result is that value.
        Counts are summed over all pixels of all images (not averaged per image). A Dice/IoU whose
        denominator is 0 (both sets empty) is 1.0.

        Args:
            threshold: τ in [0, 1].

        Returns:
            Dict with ``threshold``, ``dice_fg``, ``dice_bg``, ``iou_fg``, ``iou_bg``, ``miou``
            (fractions), ``tp``, ``fp``, ``fn``, ``tn`` (pixel counts) and ``tpr``, ``fnr``,
            ``tnr``, ``fpr`` (fractions of the positive / negative pixels).

        Raises:
            ValueError: τ outside [0, 1].
        """
        return self._scores_at(self._snap(threshold))

    def best_threshold(self, criterion: str = "miou") -> tuple[float, dict[str, Any]]:
        """The threshold of :data:`THRESHOLDS` maximising a criterion on the accumulated data.

        This reproduces NEGEV's logged numbers (τ chosen on the evaluated split itself), which is
        **optimistic**: the threshold is tuned on the very pixels it is scored on. For an honest
        test number pick τ on validation data and call :meth:`dice_iou` on the test meter. Ties go
        to the lowest τ (``np.argmax``).

        Args:
            criterion: ``"miou"`` or ``"dice_fg"``.

        Returns:
            ``(tau, scores)`` where ``scores`` is :meth:`dice_iou` at ``tau``.

        Raises:
            ValueError: unknown criterion.
        """
        if criterion not in ("miou", "dice_fg"):
            raise ValueError(f"criterion must be 'miou' or 'dice_fg', got {criterion!r}")
        values = self.threshold_curve()[criterion]
        k = int(np.argmax(values))
        return k / _GRID, self._scores_at(k)

    def threshold_curve(self) -> dict[str, np.ndarray]:
        """Dataset-level Dice and IoU at every threshold of :data:`THRESHOLDS` (§4.2).

        The Dice-vs-threshold curve of the report; :meth:`dice_iou` gives one point of it.

        Returns:
            Dict of float64 arrays of length 1000: ``thresholds``, ``dice_fg``, ``dice_bg``,
            ``iou_fg``, ``iou_bg``, ``miou`` (a Dice/IoU with both sets empty is 1.0).
        """
        tp_all, fp_all = self._counts_ge()
        tp, fp = tp_all[: THRESHOLDS.size], fp_all[: THRESHOLDS.size]
        fn, tn = self.n_pos - tp, self.n_neg - fp
        out: dict[str, np.ndarray] = {"thresholds": THRESHOLDS.copy()}
        out.update(_overlap_scores(tp, fp, fn, tn))
        return out

    @classmethod
    def from_histograms(cls, pos_hist: Any, neg_hist: Any, n_images: int = 0) -> PxAPMeter:
        """A meter holding given histograms (e.g. a bootstrap resample of per-image histograms).

        Args:
            pos_hist: 1002 counts of scores at ground-truth positive pixels (bins of
                :data:`BIN_EDGES`); rounded to int64.
            neg_hist: 1002 counts at ground-truth negative pixels.
            n_images: number of images the counts come from.

        Returns:
            The meter.

        Raises:
            ValueError: a histogram does not have 1002 bins.
        """
        meter = cls()
        meter.load_state_dict(
            {
                "pos_hist": np.rint(to_numpy(pos_hist)).astype(np.int64),
                "neg_hist": np.rint(to_numpy(neg_hist)).astype(np.int64),
                "n_images": int(n_images),
            }
        )
        return meter


# --------------------------------------------------------------------------------------------------
# Max-Min (TMI) per-image protocol
# --------------------------------------------------------------------------------------------------


class PerImageMeter:
    """Per-image Dice/IoU at a threshold, averaged over images (Max-Min TMI protocol, §2.3).

    For each image the prediction is ``score >= threshold``. F1+ is the Dice of the foreground,
    F1- the Dice of the background. :meth:`f1_pos` averages F1+ only over images whose ground truth
    has a region of interest (non-empty foreground), :meth:`f1_neg` averages F1- only over images
    with non-empty ground-truth background (for GlaS, where every image has glands and background,
    these are plain means over all images).

    Empty sets: a Dice/IoU whose two sets are both empty is 1.0 (the prediction is correctly empty),
    e.g. F1+ of a normal image predicted all-background. Such an image is still left out of
    :meth:`f1_pos`, following the protocol; it is kept in :meth:`rows`. An empty prediction on an
    image with a region of interest has F1+ = 0.
    """

    _KEYS = ("dice_fg", "dice_bg", "iou_fg", "iou_bg", "miou")

    def __init__(self) -> None:
        self._rows: list[dict[str, Any]] = []

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def n_images(self) -> int:
        """Number of images added."""
        return len(self._rows)

    def update(
        self, score_map: Any, gt_mask: Any, threshold: float = 0.5, name: str | None = None
    ) -> dict[str, Any]:
        """Score one image.

        Args:
            score_map: scores (or a binary prediction) with the mask's shape; NaN counts as
                background. Scores are not clipped, so any threshold on raw maps works.
            gt_mask: ground-truth mask: bool, or numeric with ``> 0.5`` foreground.
            threshold: pixels with score ≥ threshold are predicted foreground (0.5 in Max-Min).
            name: image identifier for :meth:`rows` (default: ``image_<index>``).

        Returns:
            The row added (see :meth:`rows`).

        Raises:
            MetricInputError: the shapes differ (a :class:`ValueError`).
        """
        scores = _as_raw_scores(score_map)
        gt = _as_mask(gt_mask)
        _check_same_shape(scores, gt, "score map", "ground-truth mask")
        pred = scores >= threshold
        tp = int(np.count_nonzero(pred & gt))
        fp = int(np.count_nonzero(pred & ~gt))
        fn = int(np.count_nonzero(~pred & gt))
        tn = int(gt.size) - tp - fp - fn
        return self.update_counts(tp, fp, fn, tn, threshold, name)

    def update_counts(
        self, tp: int, fp: int, fn: int, tn: int, threshold: float = 0.5, name: str | None = None
    ) -> dict[str, Any]:
        """Score one image from its confusion counts at ``threshold``.

        For images too large to hold as one array (a slide's map, read in bands): sum the counts of
        the bands, then add the image once. ``update(score_map, gt, t)`` is
        ``update_counts(*counts of score_map >= t against gt, t)``.

        Args:
            tp: foreground pixels predicted foreground.
            fp: background pixels predicted foreground.
            fn: foreground pixels predicted background.
            tn: background pixels predicted background.
            threshold: the threshold the counts were taken at (recorded).
            name: image identifier for :meth:`rows`.

        Returns:
            The row added (see :meth:`rows`).

        Raises:
            MetricInputError: a negative count.
        """
        tp, fp, fn, tn = (int(v) for v in (tp, fp, fn, tn))
        if min(tp, fp, fn, tn) < 0:
            raise MetricInputError(f"confusion counts must be >= 0, got {(tp, fp, fn, tn)}")
        row: dict[str, Any] = {
            "name": name if name is not None else f"image_{len(self._rows):05d}",
            "threshold": float(threshold),
            "n_pixels": tp + fp + fn + tn,
            "gt_fg_pixels": tp + fn,
            "pred_fg_pixels": tp + fp,
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "tn": tn,
            "has_roi": tp + fn > 0,
            "has_background": tn + fp > 0,
        }
        row.update({k: float(v) for k, v in _overlap_scores(tp, fp, fn, tn).items()})
        self._rows.append(row)
        return dict(row)

    def f1_pos_values(self) -> np.ndarray:
        """F1+ (foreground Dice) of the images whose ground truth has a region of interest."""
        return np.array([r["dice_fg"] for r in self._rows if r["has_roi"]], dtype=np.float64)

    def f1_neg_values(self) -> np.ndarray:
        """F1- (background Dice) of the images whose ground truth has some background."""
        return np.array([r["dice_bg"] for r in self._rows if r["has_background"]], dtype=np.float64)

    def f1_pos(self) -> float:
        """Mean F1+ over images with a non-empty ground-truth foreground (fraction; nan if none)."""
        v = self.f1_pos_values()
        return float(v.mean()) if v.size else float("nan")

    def f1_neg(self) -> float:
        """Mean F1- over images with a non-empty ground-truth background (fraction; nan if none)."""
        v = self.f1_neg_values()
        return float(v.mean()) if v.size else float("nan")

    def mean(self, key: str) -> float:
        """Mean of a per-image score over all images.

        Args:
            key: one of ``dice_fg``, ``dice_bg``, ``iou_fg``, ``iou_bg``, ``miou``.

        Returns:
            The mean (nan when no image was added).
        """
        if key not in self._KEYS:
            raise ValueError(f"key must be one of {', '.join(self._KEYS)}, got {key!r}")
        if not self._rows:
            return float("nan")
        return float(np.mean([r[key] for r in self._rows]))

    def rows(self) -> list[dict[str, Any]]:
        """One dict per image, in update order (the columns of ``per_image.csv``).

        Returns:
            Copies of the rows: ``name``, ``threshold``, ``n_pixels``, ``gt_fg_pixels``,
            ``pred_fg_pixels``, ``tp``, ``fp``, ``fn``, ``tn``, ``has_roi``, ``has_background``,
            ``dice_fg`` (F1+), ``dice_bg`` (F1-), ``iou_fg``, ``iou_bg``, ``miou``.
        """
        return [dict(r) for r in self._rows]

    def merge(self, other: PerImageMeter) -> PerImageMeter:
        """Append another meter's rows (other shard / DDP rank).

        Args:
            other: a meter filled on other images.

        Returns:
            This meter, for chaining.
        """
        if not isinstance(other, PerImageMeter):
            raise TypeError(f"can only merge a PerImageMeter, got {type(other).__name__}")
        self._rows.extend(dict(r) for r in other._rows)
        return self

    def state_dict(self) -> dict[str, Any]:
        """The rows as plain Python values."""
        return {"rows": self.rows()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore rows saved by :meth:`state_dict`."""
        self._rows = [dict(r) for r in state["rows"]]


# --------------------------------------------------------------------------------------------------
# classification
# --------------------------------------------------------------------------------------------------


class ClassificationMeter:
    """Image-level classification: accuracy, error, confusion matrix, per-class scores (§4.3).

    Args:
        num_classes: number of classes K.
        class_names: optional names of the K classes (default ``"0"``, ``"1"``, ...).
    """

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"got {len(class_names)} class names for {num_classes} classes")
        self.num_classes = int(num_classes)
        self.class_names = (
            [str(c) for c in class_names]
            if class_names is not None
            else [str(i) for i in range(num_classes)]
        )
        self._confusion = np.zeros((num_classes, num_classes), dtype=np.int64)

    def _labels(self, x: Any, what: str) -> np.ndarray:
        a = np.atleast_1d(to_numpy(x))
        if a.ndim != 1:
            raise MetricInputError(f"{what} must be a 1-D array of class indices, got {a.shape}")
        if a.dtype.kind not in "biu":
            if a.dtype.kind != "f" or not np.all(np.isfinite(a)) or np.any(a != np.round(a)):
                raise MetricInputError(
                    f"{what} must be integer class indices; pass (B, K) scores to take the argmax"
                )
        a = a.astype(np.int64)
        if a.size and (a.min() < 0 or a.max() >= self.num_classes):
            raise MetricInputError(
                f"{what} has class index {int(a.min()) if a.min() < 0 else int(a.max())} "
                f"outside [0, {self.num_classes - 1}]"
            )
        return a

    def update(self, logits_or_pred: Any, labels: Any) -> None:
        """Add a batch.

        Args:
            logits_or_pred: (B, K) scores/logits/probabilities (the prediction is their argmax) or
                (B,) predicted class indices.
            labels: (B,) true class indices.

        Raises:
            MetricInputError: wrong shapes, K mismatch, or class indices out of range.
        """
        x = to_numpy(logits_or_pred)
        if x.ndim == 2:
            if x.shape[1] != self.num_classes:
                raise MetricInputError(
                    f"scores have {x.shape[1]} columns but the meter has {self.num_classes} classes"
                )
            pred = np.argmax(x, axis=1).astype(np.int64)
        else:
            pred = self._labels(x, "predictions")
        y = self._labels(labels, "labels")
        if pred.shape != y.shape:
            raise MetricInputError(f"{pred.size} predictions but {y.size} labels in the batch")
        np.add.at(self._confusion, (y, pred), 1)

    @property
    def n_samples(self) -> int:
        """Number of samples seen."""
        return int(self._confusion.sum())

    def confusion(self) -> np.ndarray:
        """K×K int64 confusion matrix: rows = true class, columns = predicted class (a copy)."""
        return self._confusion.copy()

    def accuracy(self) -> float:
        """Accuracy in percent (nan when empty)."""
        n = self.n_samples
        return float("nan") if n == 0 else 100.0 * float(np.trace(self._confusion)) / n

    def error(self) -> float:
        """Classification error in percent: 100 − accuracy (nan when empty)."""
        return 100.0 - self.accuracy()

    def per_class(self) -> dict[str, dict[str, float | int]]:
        """Precision, recall, F1 and support of each class.

        A ratio with a zero denominator (class never predicted / never present) is 0.0, like
        scikit-learn's ``zero_division=0``.

        Returns:
            ``{class_name: {"precision", "recall", "f1", "support"}}`` (fractions; support = count
            of true samples).
        """
        c = self._confusion.astype(np.float64)
        tp = np.diag(c)
        precision = _safe_div(tp, c.sum(axis=0), 0.0)
        recall = _safe_div(tp, c.sum(axis=1), 0.0)
        f1 = _safe_div(2 * precision * recall, precision + recall, 0.0)
        support = self._confusion.sum(axis=1)
        return {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(self.class_names)
        }

    def merge(self, other: ClassificationMeter) -> ClassificationMeter:
        """Add another meter's counts (other shard / DDP rank).

        Args:
            other: a meter with the same number of classes.

        Returns:
            This meter, for chaining.
        """
        if not isinstance(other, ClassificationMeter):
            raise TypeError(f"can only merge a ClassificationMeter, got {type(other).__name__}")
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes} classes into {self.num_classes}")
        self._confusion += other._confusion
        return self

    def reset(self) -> None:
        """Forget every sample."""
        self._confusion[:] = 0

    def state_dict(self) -> dict[str, Any]:
        """Counts as plain Python values: ``num_classes``, ``class_names``, ``confusion``."""
        return {
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "confusion": self._confusion.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore counts saved by :meth:`state_dict`.

        Raises:
            ValueError: the saved matrix is not K×K for this meter's K.
        """
        conf = np.asarray(state["confusion"], dtype=np.int64)
        k = self.num_classes
        if conf.shape != (k, k):
            raise ValueError(f"confusion matrix must be {k}x{k}, got {conf.shape}")
        self._confusion = conf.copy()
        if "class_names" in state:
            self.class_names = [str(c) for c in state["class_names"]]
