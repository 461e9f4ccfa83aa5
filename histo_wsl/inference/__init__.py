"""A trained model over images and slides: the predictor and sliding-window localization.

* :mod:`~histo_wsl.inference.blending` — Overlapping windows blended into one map (as MONAI's
  sliding-window inference does).
* :mod:`~histo_wsl.inference.domain` — Is a slide what the model was trained on? A cheap check
  before its windows are read.
* :mod:`~histo_wsl.inference.engine` — The inference engine: a trained model run over a slide's
  windows.
* :mod:`~histo_wsl.inference.job` — One slide being localized: what the per-slide steps share, and
  the grid its map is made on.
* :mod:`~histo_wsl.inference.localize` — ``localize``: sliding-window inference over slides and
  images, with QuPath-ready outputs.
* :mod:`~histo_wsl.inference.outputs` — What ``localize`` writes for a slide, and the resolution
  checks before it reads one.
* :mod:`~histo_wsl.inference.params` — The settings of ``localize`` (one dataclass; the CLI options
  have the same names).
* :mod:`~histo_wsl.inference.predictor` — Rebuild a trained model from its self-contained
  checkpoint, with one prediction interface.
* :mod:`~histo_wsl.inference.windows` — The windows of a slide, read in batches: what the engine
  feeds the model.

The names below are imported from their module on first use, so importing the package is free.
"""

from histo_wsl.runtime.lazy import lazy_exports

#: public name → the module of this package that defines it
_EXPORTS = {
    "BandCanvas": "blending",
    "BLEND_MODES": "blending",
    "importance_map": "blending",
    "WindowBlender": "blending",
    "check_domain": "domain",
    "DARK_FIELD_P90": "domain",
    "illumination": "domain",
    "SAMPLE_PIXELS": "domain",
    "Engine": "engine",
    "roi_class": "engine",
    "reads_between_forwards": "engine",
    "run_windows": "engine",
    "TRIM_SECONDS": "engine",
    "SlideGrid": "job",
    "SlideJob": "job",
    "check_inputs": "localize",
    "localize_slide": "localize",
    "localize_whole_image": "localize",
    "check_mpp": "outputs",
    "check_whole_image": "outputs",
    "GEOJSON_MAX_PIXELS": "outputs",
    "mpp_notes": "outputs",
    "MPP_WARN_FACTOR": "outputs",
    "overlap_spans": "outputs",
    "OutputTissue": "outputs",
    "resize_u8": "outputs",
    "ROI_COLOR": "outputs",
    "write_slide_outputs": "outputs",
    "write_tile_detections": "outputs",
    "LocalizeParams": "params",
    "MISSING_MODEL": "params",
    "OUTPUT_FACTOR": "params",
    "load_model": "predictor",
    "Predictor": "predictor",
    "TTA_MODES": "predictor",
    "FIRST_BATCH": "windows",
    "InlineReads": "windows",
    "Prefetch": "windows",
    "WindowBatches": "windows",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
