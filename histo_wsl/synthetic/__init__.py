"""Generated slides and patches with known truth (tests, demo, benchmarks), and the demo.

* :mod:`~histo_wsl.synthetic.demo` — The demo: the whole histo-wsl pipeline, run for real on an
  embedded synthetic default.
* :mod:`~histo_wsl.synthetic.patches` — Synthetic H&E-like patch datasets with known gland masks
  (tests, the demo, benchmarks).
* :mod:`~histo_wsl.synthetic.slides` — Deterministic synthetic H&E-like slides with tissue and
  glands at known places.

The names below are imported from their module on first use, so importing the package is free.
"""

from histo_wsl.runtime.lazy import lazy_exports

#: public name → the module of this package that defines it
_EXPORTS = {
    "DemoRecipe": "demo",
    "RECIPE": "demo",
    "run_demo": "demo",
    "SHORT_RECIPE": "demo",
    "write_patch_dataset": "patches",
    "Ellipse": "slides",
    "gland_mask_region": "slides",
    "make_layout": "slides",
    "pixel_centres": "slides",
    "pyramid_level_sizes": "slides",
    "render_region": "slides",
    "SlideLayout": "slides",
    "tissue_mask_region": "slides",
    "write_image_with_mask": "slides",
    "write_pyramid_tiff": "slides",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
