"""Percentile bootstrap 95 % intervals over images, for per-image and dataset-level numbers.

:func:`bootstrap_ci` resamples per-image values (F1+, F1-, correctness); :func:`bootstrap_histograms`
resamples per-image score histograms and recomputes the dataset-level numbers (PxAP, Dice, IoU) on
each resample's pooled histograms. Both are seeded (``numpy.random.default_rng(seed)``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from histo_wsl.evaluation.metrics import N_BINS, PxAPMeter, to_numpy

__all__ = ["bootstrap_ci", "bootstrap_histograms"]


def bootstrap_ci(
    per_image_values: Iterable[float] | np.ndarray,
    n: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    statistic: Callable[..., Any] = np.mean,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of a statistic of per-image values.

    Images are resampled with replacement ``n`` times with ``np.random.default_rng(seed)``, so the
    result is reproducible. NaN values (e.g. F1+ of an image without a region of interest) are
    dropped first.

    Args:
        per_image_values: one value per image.
        n: number of bootstrap resamples.
        seed: seed of the random generator.
        alpha: 1 - confidence level (0.05 gives a 95% interval).
        statistic: function of a 1-D array (called with ``axis=1`` on a 2-D batch of resamples when
            it accepts that, else once per resample).

    Returns:
        ``(low, high)``: the ``alpha/2`` and ``1 - alpha/2`` quantiles of the bootstrap distribution;
        ``(nan, nan)`` when there is no finite value.

    Raises:
        ValueError: ``n < 1`` or ``alpha`` not in (0, 1).
    """
    if n < 1:
        raise ValueError(f"bootstrap_ci needs n >= 1 resamples, got {n}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"bootstrap_ci needs 0 < alpha < 1, got {alpha}")
    values = np.asarray(to_numpy(per_image_values), dtype=np.float64).ravel()
    values = values[~np.isnan(values)]
    m = values.size
    if m == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    stats = np.empty(n, dtype=np.float64)
    chunk = max(1, 1_000_000 // m)  # bound memory to ~8 MB of resampled values
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        samples = values[rng.integers(0, m, size=(stop - start, m))]
        try:
            out = np.asarray(statistic(samples, axis=1), dtype=np.float64)
            if out.shape != (stop - start,):
                raise TypeError
        except TypeError:
            out = np.array([statistic(row) for row in samples], dtype=np.float64)
        stats[start:stop] = out
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def bootstrap_histograms(
    pos_hists: Any,
    neg_hists: Any,
    statistics: Callable[[PxAPMeter], Mapping[str, float]],
    n: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap confidence intervals of dataset-level pixel metrics, resampling images.

    PxAP and dataset-level Dice/IoU are not means of per-image values, so the images are resampled
    with replacement and the metric is recomputed on the summed histograms of each resample. Only
    the per-image histograms (2 × 1002 counts per image; a ``np.memmap`` works) are needed, never
    the maps. The draws are those of :func:`bootstrap_ci` with the same ``n``, ``seed`` and number of
    images (``np.random.default_rng(seed)``, the same chunking), so intervals of per-image means
    over all images come from the same resamples.

    Args:
        pos_hists: (M, 1002) per-image counts of scores at ground-truth positive pixels.
        neg_hists: (M, 1002) per-image counts at ground-truth negative pixels.
        statistics: function of a :class:`PxAPMeter` returning named values, e.g.
            ``lambda m: {"pxap": m.pxap(), **m.dice_iou(0.5)}``; the names must not change
            between calls.
        n: number of resamples.
        seed: seed of the random generator.
        alpha: 1 - confidence level.

    Returns:
        ``{name: (low, high)}``; ``(nan, nan)`` when there is no image or no finite value.

    Raises:
        ValueError: ``n < 1``, ``alpha`` not in (0, 1), or histograms of the wrong shape.
    """
    if n < 1:
        raise ValueError(f"bootstrap needs n >= 1 resamples, got {n}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"bootstrap needs 0 < alpha < 1, got {alpha}")
    pos, neg = np.asarray(pos_hists), np.asarray(neg_hists)
    if pos.ndim != 2 or pos.shape[1:] != (N_BINS,) or neg.shape != pos.shape:
        raise ValueError(
            f"per-image histograms must both be (M, {N_BINS}), got {pos.shape} and {neg.shape}"
        )
    m = pos.shape[0]
    names = list(statistics(PxAPMeter.from_histograms(pos.sum(axis=0), neg.sum(axis=0), m)))
    if m == 0:
        return {name: (float("nan"), float("nan")) for name in names}
    rng = np.random.default_rng(seed)
    values = {name: np.empty(n, dtype=np.float64) for name in names}
    chunk = max(1, 1_000_000 // m)  # the draws of bootstrap_ci
    rows = 4096  # images summed at a time: bounds memory for memory-mapped inputs
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        b = stop - start
        idx = rng.integers(0, m, size=(b, m))
        weights = np.bincount((np.arange(b)[:, None] * m + idx).ravel(), minlength=b * m).reshape(
            b, m
        )
        agg_pos = np.zeros((b, N_BINS), dtype=np.float64)
        agg_neg = np.zeros((b, N_BINS), dtype=np.float64)
        for r0 in range(0, m, rows):
            w = weights[:, r0 : r0 + rows].astype(np.float64)
            agg_pos += w @ np.asarray(pos[r0 : r0 + rows], dtype=np.float64)
            agg_neg += w @ np.asarray(neg[r0 : r0 + rows], dtype=np.float64)
        for j in range(b):
            result = statistics(PxAPMeter.from_histograms(agg_pos[j], agg_neg[j], m))
            for name in names:
                values[name][start + j] = result[name]
    out = {}
    for name, v in values.items():
        v = v[np.isfinite(v)]
        if v.size == 0:
            out[name] = (float("nan"), float("nan"))
        else:
            low, high = np.quantile(v, [alpha / 2, 1 - alpha / 2])
            out[name] = (float(low), float(high))
    return out
