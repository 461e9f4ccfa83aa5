"""What evaluation writes: metrics.json and per_image.csv, plots and the md/html report.

* :mod:`~histo_wsl.reporting.metrics_file` — The numbers files of evaluate: metrics.json's
  definitions and value format, per_image.csv.
* :mod:`~histo_wsl.reporting.report` — The evaluation report: ``report.md`` and a self-contained
  ``report.html`` with plots.

The names below are imported from their module on first use, so importing the package is free.
"""

from histo_wsl.runtime.lazy import lazy_exports

#: public name → the module of this package that defines it
_EXPORTS = {
    "BEST_NAME": "metrics_file",
    "card_threshold_name": "metrics_file",
    "DEFINITIONS": "metrics_file",
    "headline": "metrics_file",
    "round_curve": "metrics_file",
    "snap": "metrics_file",
    "UNCALIBRATED_NAME": "metrics_file",
    "value_with_ci": "metrics_file",
    "write_per_image_csv": "metrics_file",
    "dice_curve_png": "report",
    "display_path": "report",
    "examples_png": "report",
    "fit_size": "report",
    "gallery_html": "report",
    "image_columns": "report",
    "image_table_html": "report",
    "PAGE_SIZE": "report",
    "pr_curve_png": "report",
    "relative_text": "report",
    "resize_array": "report",
    "THUMB_SIDE": "report",
    "thumbnail_jpeg": "report",
    "write_reports": "report",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
