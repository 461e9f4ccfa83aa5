"""The settings of ``localize`` (one dataclass; the CLI options have the same names)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from histo_wsl.errors import InputError
from histo_wsl.inference.blending import BLEND_MODES
from histo_wsl.tissue import detect as tissue_mod

__all__ = ["OUTPUT_FACTOR", "LocalizeParams", "MISSING_MODEL"]

#: Default output resolution: this many times the model's (coarser), e.g. 2 µm/px -> 8 µm/px.
OUTPUT_FACTOR = 4.0


@dataclass
class LocalizeParams:
    """Parameters of ``localize`` (CLI options of the same names).

    Attributes:
        model: the checkpoint (``train-classifier`` or ``train-decoder``), a model folder or an
            installed model's name (:func:`histo_wsl.registry.registry.resolve_model`).
        cam: CAM method overriding a stage-1 card's (``gradcampp``...).
        tta: test-time augmentation overriding the card's (``none``, ``flips``: the mean of the
            four flipped views; :data:`histo_wsl.inference.predictor.TTA_MODES`).
        class_name: the class whose map is made (default: see module docs).
        mpp: resolution the slide is read at (µm/px; default the card's ``mpp``).
        output_mpp: resolution of the output map (µm/px; default ``OUTPUT_FACTOR`` × ``mpp``).
        overlap: overlap of neighbouring windows as a fraction of the window (0 to 0.9).
        blend: importance weighting of overlaps: ``gaussian``, ``linear`` or ``constant``.
        sigma_scale: σ of the Gaussian weighting as a fraction of the window (MONAI: 0.125).
        threshold: mask threshold on the probability (default the card's ``threshold``).
        batch_size: windows per forward pass (None: the device's own,
            :func:`histo_wsl.inference.engine.default_batch_size`).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        amp: mixed precision on CUDA.
        workers: reader processes that each open the slide (0: one reader thread; default 0 on
            CPU, 4 on CUDA).
        threads: CPU threads of the forward (None or 0: the cores other processes leave free,
            measured again while slides run: :mod:`histo_wsl.runtime.threads`).
        slide_mpp: level-0 µm/px overriding every slide's metadata (a CSV column overrides it).
        tissue_geojson: a GeoJSON file, or a folder of ``<slide>.geojson`` /
            ``<slide>/tissue.geojson``, replacing tissue detection.
        tissue_detection: False counts the whole slide as tissue.
        thumbnail_mpp: resolution of the thumbnail tissue detection works on (µm/px).
        tissue: tissue-detection parameters.
        whole_image: plain images only: resize the whole image to the network input (papers'
            protocol) instead of sliding windows.
        prob_bits: bit depth of the per-image ``.prob.png`` (8 or 16).
        canvas_max_mb: the output map goes to a memmap in the staging folder past this size.
        seed: random seed (noise of ``smoothgradcampp``).
        geojson_tiles: also write ``<slide>.tiles.geojson``: one QuPath detection per window
            read, with its mean probability as a measurement (a heatmap QuPath can colour and
            filter, as WSInfer writes).
        mil: a ``train-mil`` model (``mil.pt``): its slide-level score goes into each slide's
            JSON under ``mil`` (:mod:`histo_wsl.inference.mil_slide`).
        force: map slides that do not look like the model's training domain (e.g. fluorescence
            for a brightfield model; :mod:`histo_wsl.inference.domain`) instead of refusing them.
    """

    model: Path | str | None = None
    cam: str | None = None
    tta: str | None = None
    class_name: str | None = None
    mpp: float | None = None
    output_mpp: float | None = None
    overlap: float = 0.25
    blend: str = "gaussian"
    sigma_scale: float = 0.125
    threshold: float | None = None
    batch_size: int | None = None
    device: str = "auto"
    amp: bool = True
    workers: int | None = None
    threads: int | None = None
    slide_mpp: float | None = None
    tissue_geojson: Path | None = None
    tissue_detection: bool = True
    thumbnail_mpp: float = 8.0
    tissue: tissue_mod.TissueParams = field(default_factory=tissue_mod.TissueParams)
    whole_image: bool = False
    prob_bits: int = 8
    canvas_max_mb: float = 256.0
    seed: int = 0
    force: bool = False
    geojson_tiles: bool = False
    mil: Path | None = None

    def validate(self) -> None:
        """Raise InputError on impossible values."""
        if self.model is None:
            raise InputError(MISSING_MODEL)
        if not 0.0 <= self.overlap <= 0.9:
            raise InputError(f"--overlap {self.overlap} must be a fraction between 0 and 0.9")
        if self.blend not in BLEND_MODES:
            raise InputError(f"--blend {self.blend!r}: use one of {', '.join(BLEND_MODES)}")
        if not 0.0 < self.sigma_scale <= 10.0:
            raise InputError(f"--sigma-scale {self.sigma_scale} must be in (0, 10]")
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise InputError(f"--threshold {self.threshold} must be in (0, 1]")
        if self.batch_size is not None and self.batch_size < 1:
            raise InputError("--batch-size must be at least 1")
        if self.workers is not None and self.workers < 0:
            raise InputError("--workers must be 0 (a reader thread) or more")
        if self.threads is not None and self.threads < 0:
            raise InputError("--threads must be 0 (as many as the free cores) or more")
        for name in ("mpp", "output_mpp", "slide_mpp"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise InputError(
                    f"--{name.replace('_', '-')} must be a positive µm/px, got {value}"
                )
        if self.prob_bits not in (8, 16):
            raise InputError(f"--prob-bits must be 8 or 16, got {self.prob_bits}")
        if self.canvas_max_mb < 0:
            raise InputError("--canvas-max-mb must be >= 0")
        if self.mil is not None and self.whole_image:
            raise InputError(
                "--mil scores slides from their patches; it does not apply to --whole-image"
            )

    def record(self) -> dict:
        """JSON-ready parameters for run.json."""
        out = asdict(self)
        for key in ("model", "tissue_geojson", "mil"):
            out[key] = None if out[key] is None else str(out[key])
        return out


MISSING_MODEL = (
    "--model is required: no default model is installed (`histo-wsl models` lists the installed "
    "ones); pass a model name or a checkpoint from train-classifier (e.g. runs/cam/best-loc.pt) "
    "or train-decoder (e.g. runs/negev/best-loc.pt)"
)
