"""Metrics of maps against masks, on images and on slides, and threshold calibration.

* :mod:`~histo_wsl.evaluation.accumulator` — One model's evaluation as a stream: meters fed image by
  image, then its metrics.json entry.
* :mod:`~histo_wsl.evaluation.bootstrap` — Percentile bootstrap 95 % intervals over images, for
  per-image and dataset-level numbers.
* :mod:`~histo_wsl.evaluation.calibration` — Thresholds of a model card: which one a report names,
  and ``--calibrate``'s new checkpoint.
* :mod:`~histo_wsl.evaluation.data` — What evaluate is asked and on which images: its settings, the
  selected samples, the loader.
* :mod:`~histo_wsl.evaluation.images` — ``histo-wsl evaluate``: the papers' metrics of one or more
  models on images with ground truth.
* :mod:`~histo_wsl.evaluation.metrics` — Localization and classification metrics of NEGEV (MIDL
  2022) and Max-Min (IEEE TMI 2022).
* :mod:`~histo_wsl.evaluation.slides` — ``histo-wsl evaluate --predictions LOCALIZE_OUT
  --annotations ANN``: slide maps against annotations.

The names below are imported from their module on first use, so importing the package is free.
"""

from histo_wsl.runtime.lazy import lazy_exports

#: public name → the module of this package that defines it
_EXPORTS = {
    "Accumulator": "accumulator",
    "Example": "accumulator",
    "F1_THRESHOLD": "accumulator",
    "HistogramSpill": "accumulator",
    "map_description": "accumulator",
    "ModelResult": "accumulator",
    "OVERLAP_KEYS": "accumulator",
    "Thumbnail": "accumulator",
    "bootstrap_ci": "bootstrap",
    "bootstrap_histograms": "bootstrap",
    "calibrated_checkpoint": "calibration",
    "calibrated_path": "calibration",
    "CALIBRATION_CRITERION": "calibration",
    "card_threshold": "calibration",
    "collate": "data",
    "EvalData": "data",
    "EvalImages": "data",
    "EvalSettings": "data",
    "MAP_CLASSES": "data",
    "PROTOCOLS": "data",
    "select_data": "data",
    "SPLITS": "data",
    "evaluate_model": "images",
    "run_evaluate": "images",
    "BIN_EDGES": "metrics",
    "ClassificationMeter": "metrics",
    "dice": "metrics",
    "iou": "metrics",
    "MetricInputError": "metrics",
    "PerImageMeter": "metrics",
    "PxAPMeter": "metrics",
    "THRESHOLDS": "metrics",
    "find_predictions": "slides",
    "pair_slides_with_annotations": "slides",
    "run_evaluate_slides": "slides",
    "SlideEvalSettings": "slides",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
