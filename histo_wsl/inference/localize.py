"""``localize``: sliding-window inference over slides and images, with QuPath-ready outputs.

Per slide, under ``<out>/<slide>/`` (DESIGN.md §3):

- ``<slide>.prob.tif``: foreground probability (uint8 0-255 = 0-1), pyramidal tiled TIFF at the
  output resolution; it covers the whole slide, one pixel = ``output_mpp / slide_mpp`` level-0
  pixels (see :mod:`histo_wsl.slideio.writers`), 0 outside tissue.
- ``<slide>.mask.png``: the binary mask (255 = ROI) on the same grid, probability >= threshold.
- ``<slide>.geojson``: the mask's outlines as a QuPath FeatureCollection in level-0 pixels
  (polygons with holes; classification = the ROI class; measurements: area µm², mean probability).
- ``<slide>.overlay.png``: the thumbnail tinted by the probability, ROI and tissue outlined.
- ``<slide>.json`` (written last, by the batch runner): slide-level class and score, ROI and
  tissue areas, threshold, resolutions, window layout, timings, model.

Plain images (PNG, JPEG...) take the same path as one-level slides, and also get
``<image>.prob.png`` and ``<image>.mask.png`` at the image's own size. ``--whole-image`` is the
papers' protocol for such images instead: the image is resized to the network input, predicted
once, and the map resized back.

How a slide is processed:

1. Windows: the network's input size at the model's resolution (the card's ``mpp``, the one the
   network saw in training, or ``--mpp``), every ``input × (1 - overlap)`` px, the last row and
   column flush with the slide's edges (:func:`~histo_wsl.slideio.grid.cover_grid`); only windows that
   touch tissue (detected on the thumbnail, or ``--tissue-geojson``) are read.
2. A reader (a background thread, or ``--workers`` processes that each open the slide) reads
   batches of windows ahead of the model, so reading hides behind inference.
3. Blending (as MONAI's sliding-window inferer): each window's map is weighted by an importance
   map (Gaussian with σ = ``sigma_scale`` × window, linear tent, or constant), both are
   area-resampled onto the output grid at the window's exact sub-pixel position, and the output is
   Σ weight·probability / Σ weight, so overlapping windows leave no seams.
4. The weighted sums live in a band of output rows only; finished rows are divided, zeroed
   outside tissue and written into the uint8 map, which is a memmap in the staging folder when it
   exceeds ``--canvas-max-mb``: memory does not grow with the slide.

Slide-level class: the mean of the windows' softmax class probabilities over the tissue windows
(each window counts once); the predicted class is its argmax and the score its value.

The ROI class: ``--class`` if given; else, when the card names a negative class and one other
class, that class; else ``ROI``. For stage-1 (CAM) checkpoints the map is that class's CAM (or the
predicted class's per window when it is ``ROI``); CAMs are min-max normalised per window, as in
training, so a CAM map shows where each window's evidence is, relative to that window. NEGEV
decoders give a class-agnostic foreground probability.
"""

from __future__ import annotations

import functools
import json
import math
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from histo_wsl.errors import InputError
from histo_wsl.methods import get_method
from histo_wsl.runtime.batch import BatchRunner, Progress, RunSummary
from histo_wsl.runtime.console import warn
from histo_wsl.runtime.inputs import InputItem
from histo_wsl.slideio.geojson import GeoJSONStyle, mask_to_geojson, write_geojson
from histo_wsl.slideio.slide import ReadPlan, Slide, open_slide, plan_read, read_patch
from histo_wsl.tissue import detect as tissue_mod
from histo_wsl.tissue.fraction import tissue_fraction_map
from histo_wsl.tissue.scan import SlideTissue, find_tissue, tissue_geojson_for

if TYPE_CHECKING:
    import torch

__all__ = [
    "BLEND_MODES",
    "MISSING_MODEL",
    "BandCanvas",
    "Engine",
    "LocalizeParams",
    "WindowBatches",
    "WindowBlender",
    "importance_map",
    "localize",
    "localize_slide",
    "localize_whole_image",
    "roi_class",
]

#: Importance weightings of overlapping windows.
BLEND_MODES = ("gaussian", "linear", "constant")
#: Default output resolution: this many times the model's (coarser), e.g. 2 µm/px -> 8 µm/px.
OUTPUT_FACTOR = 4.0
#: Reduction (after reading the nearest pyramid level) beyond which a warning is given.
MPP_WARN_FACTOR = 4.0
#: Outlines (GeoJSON) are traced on a mask of at most this many pixels (coarser when larger).
GEOJSON_MAX_PIXELS = 16 * 2**20
#: During inference, freed memory is handed back to the OS at most this often (seconds; each
#: call takes about 10 ms, see _release_freed_memory).
TRIM_SECONDS = 2.0
#: Colour of the ROI class in the GeoJSON and overlay.
ROI_COLOR = (230, 30, 30)
MISSING_MODEL = (
    "--model is required: no default model is installed (`histo-wsl models` lists the installed "
    "ones); pass a model name or a checkpoint from train-classifier (e.g. runs/cam/best-loc.pt) "
    "or train-decoder (e.g. runs/negev/best-loc.pt)"
)


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
        batch_size: windows per forward pass.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        amp: mixed precision on CUDA.
        workers: reader processes that each open the slide (0: one reader thread; default 0 on
            CPU, 4 on CUDA).
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
    batch_size: int = 16
    device: str = "auto"
    amp: bool = True
    workers: int | None = None
    slide_mpp: float | None = None
    tissue_geojson: Path | None = None
    tissue_detection: bool = True
    thumbnail_mpp: float = 8.0
    tissue: tissue_mod.TissueParams = field(default_factory=tissue_mod.TissueParams)
    whole_image: bool = False
    prob_bits: int = 8
    canvas_max_mb: float = 256.0
    seed: int = 0

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
        if self.batch_size < 1:
            raise InputError("--batch-size must be at least 1")
        if self.workers is not None and self.workers < 0:
            raise InputError("--workers must be 0 (a reader thread) or more")
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

    def record(self) -> dict:
        """JSON-ready parameters for run.json."""
        out = asdict(self)
        for key in ("model", "tissue_geojson"):
            out[key] = None if out[key] is None else str(out[key])
        return out


# -- model --------------------------------------------------------------------------------------
def roi_class(card: dict, asked: str | None) -> tuple[str, int | None]:
    """The ROI class's name and index (None: the predicted class of each window).

    Args:
        card: the model card (``class_names``, ``negative_class``).
        asked: ``--class``, or None.

    Raises:
        InputError: ``asked`` is not one of the model's classes.
    """
    names = [str(n) for n in card.get("class_names") or []]
    if asked is not None:
        if asked not in names:
            raise InputError(
                f"--class {asked!r} is not a class of this model (its classes: {', '.join(names)}); "
                "pick one of those"
            )
        return asked, names.index(asked)
    negative = card.get("negative_class")
    positives = [n for n in names if n != negative]
    if negative is not None and len(positives) == 1:
        return positives[0], names.index(positives[0])
    return "ROI", None


class Engine:
    """The model on its device, and what every slide of a run shares.

    Args:
        params: the run's parameters (model, device, class, threshold...).

    Raises:
        InputError: no model, a file that is not a histo-wsl checkpoint, an unknown ``--cam`` or
            ``--class``, or a card without what inference needs.
    """

    def __init__(self, params: LocalizeParams) -> None:
        import torch

        from histo_wsl.inference.predictor import load_model
        from histo_wsl.networks.cams import CAM_METHODS
        from histo_wsl.registry.registry import resolve_model
        from histo_wsl.training.engine import resolve_device

        if params.model is None:
            raise InputError(MISSING_MODEL)
        model_path = resolve_model(params.model)
        if params.cam is not None and params.cam not in CAM_METHODS:
            raise InputError(f"--cam {params.cam!r}: use one of {', '.join(CAM_METHODS)}")
        self.device = resolve_device(params.device)
        self.predictor = load_model(
            model_path, map_location="cpu", cam_method=params.cam, tta=params.tta
        )
        self.predictor.to(self.device)
        card = self.predictor.card
        self.card = card
        self.notes: list[str] = []
        if params.cam is not None and not get_method(self.predictor.method).has_cam:
            self.notes.append(f"--cam {params.cam} ignored: the model is {self.predictor.method!r}")
            warn(self.notes[-1])
        try:
            self.size = int(card["input_size"])
            self.class_names = [str(n) for n in card["class_names"]]
        except (KeyError, TypeError, ValueError):
            raise InputError(
                "the model card lacks input_size or class_names; the checkpoint is incomplete",
                model_path,
            ) from None
        self.roi_name, self.roi_index = roi_class(card, params.class_name)
        norm = card.get("normalization") or {}
        from histo_wsl.data.images import IMAGENET_MEAN, IMAGENET_STD

        mean = norm.get("mean") or IMAGENET_MEAN
        std = norm.get("std") or IMAGENET_STD
        self._mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(std, device=self.device).view(1, 3, 1, 1) * 255.0
        self.threshold = float(
            params.threshold if params.threshold is not None else card.get("threshold") or 0.5
        )
        self.model_mpp = params.mpp if params.mpp is not None else card.get("mpp")
        if self.model_mpp is None and not params.whole_image:
            raise InputError(
                "the model card records no resolution (mpp), so slides cannot be read at the "
                "network's scale; give the µm/px it was trained at with --mpp, or use "
                "--whole-image for plain images",
                model_path,
            )
        self.amp = bool(params.amp and self.device.type == "cuda")
        if params.workers is not None:
            self.workers = params.workers
        else:
            self.workers = (
                min(4, max(1, (os.cpu_count() or 2) - 1)) if self.device.type == "cuda" else 0
            )
        self.params = params
        torch.manual_seed(params.seed)

    def describe(self) -> dict:
        """The model, as recorded in every slide's JSON."""
        c = self.card
        return {
            "path": str(self.predictor.path),
            "name": c.get("name") or self.predictor.path.stem,
            "method": c.get("method"),
            "backbone": c.get("backbone"),
            "head": c.get("head"),
            "cam_method": c.get("cam_method") if get_method(c.get("method")).has_cam else None,
            "tta": c.get("tta", "none"),
            "class_names": self.class_names,
            "negative_class": c.get("negative_class"),
            "input_size": self.size,
            "mpp": c.get("mpp"),
        }

    def predict(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class probabilities (B, K), maps (B, S, S) in [0, 1]) of uint8 windows (B, S, S, 3)."""
        import torch

        x = batch.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        x = (x - self._mean) / self._std
        classes = None
        if self.roi_index is not None and get_method(self.predictor.method).has_cam:
            classes = torch.full((x.shape[0],), self.roi_index, dtype=torch.long, device=x.device)
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
            logits, maps = self.predictor.predict(x, classes)
        return logits.float().softmax(1), maps.float().clamp_(0.0, 1.0)


# -- windows ------------------------------------------------------------------------------------
class WindowBatches:
    """Batch ``i`` of the windows as a uint8 tensor (B, S, S, 3); a map-style dataset.

    The slide opens lazily: each DataLoader worker process opens its own handle (never shared
    across processes); in this process an open slide can be passed in.

    Args:
        path: the slide file.
        slide_mpp: its level-0 µm/px override, if any.
        plan: how to read at the model's resolution.
        xs: level-0 x of each window.
        ys: level-0 y of each window.
        size: window side in pixels at the plan's resolution.
        batch_size: windows per batch.
        slide: an open slide to use in this process.
    """

    def __init__(
        self,
        path: Path,
        slide_mpp: float | None,
        plan: ReadPlan,
        xs: np.ndarray,
        ys: np.ndarray,
        size: int,
        batch_size: int,
        slide: Slide | None = None,
    ) -> None:
        self.path, self.slide_mpp, self.plan = path, slide_mpp, plan
        self.xs, self.ys, self.size, self.batch_size = xs, ys, size, batch_size
        self._slide = slide

    def __len__(self) -> int:
        return math.ceil(len(self.xs) / self.batch_size)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_slide"] = None  # a worker opens its own
        return state

    def __getitem__(self, i: int) -> torch.Tensor:
        import torch

        if not 0 <= i < len(self):
            raise IndexError(i)
        if self._slide is None:
            self._slide = open_slide(self.path, mpp=self.slide_mpp)
        lo = i * self.batch_size
        hi = min(lo + self.batch_size, len(self.xs))
        out = np.empty((hi - lo, self.size, self.size, 3), dtype=np.uint8)
        for j, k in enumerate(range(lo, hi)):
            loc = (int(self.xs[k]), int(self.ys[k]))
            out[j] = np.asarray(read_patch(self._slide, self.plan, loc, (self.size, self.size)))
        return torch.from_numpy(out)


class _Prefetch:
    """Iterate ``source`` in a background thread, at most ``depth`` items ahead."""

    _END = object()

    def __init__(self, source: Iterable, depth: int = 3) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(source,), daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, source: Iterable) -> None:
        try:
            for item in source:
                if not self._put((True, item)):
                    return
            self._put((True, self._END))
        except BaseException as exc:  # handed to the consumer
            self._put((False, exc))

    def __iter__(self) -> Iterator:
        while True:
            ok, item = self._queue.get()
            if not ok:
                raise item
            if item is self._END:
                return
            yield item

    def close(self) -> None:
        """Stop the thread (unblocking it if the queue is full)."""
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=10)


# -- blending -----------------------------------------------------------------------------------
def importance_map(size: int, mode: str = "gaussian", sigma_scale: float = 0.125) -> np.ndarray:
    """Weights of a window's pixels when overlapping windows are blended (max 1, min > 0).

    ``gaussian``: exp(-d²/2σ²) around the window centre with σ = ``sigma_scale × size`` (MONAI's
    default), clipped below at its smallest positive value; ``linear``: a tent,
    ``(1 - |u|)(1 - |v|)`` with u, v in (-1, 1) at pixel centres; ``constant``: ones.
    """
    if mode not in BLEND_MODES:
        raise ValueError(f"blend mode must be one of {BLEND_MODES}, got {mode!r}")
    c = (np.arange(size, dtype=np.float64) + 0.5) / size * 2.0 - 1.0  # pixel centres in (-1, 1)
    if mode == "constant":
        w1 = np.ones(size)
    elif mode == "linear":
        w1 = 1.0 - np.abs(c)
    else:
        sigma = sigma_scale * 2.0  # in units of the half-window
        w1 = np.exp(-(c**2) / (2.0 * sigma**2))
    w = np.outer(w1, w1)
    w /= w.max()
    positive = w[w > 0]
    floor = positive.min() if positive.size else 1.0
    return np.maximum(w, max(floor, 1e-6)).astype(np.float32)


class WindowBlender:
    """Resample weighted window maps onto the output grid at their exact sub-pixel positions.

    A window of ``size`` px covers ``footprint`` output pixels (a float); its top-left corner is at
    output coordinate ``(ox, oy)`` (output pixel ``c`` spans ``[c, c+1)``). Each window gives two
    planes, weight × probability and weight; they are area-downsampled to the footprint, then
    sampled bilinearly at the centres of the output pixels inside the window (pixels whose centre
    falls outside it get 0). Dividing the summed planes gives the blended probability.

    Args:
        size: window side in pixels (the network input).
        footprint: window side in output pixels.
        mode: importance weighting (see :func:`importance_map`).
        sigma_scale: σ of the Gaussian as a fraction of the window.
        device: torch device of the maps.
    """

    def __init__(
        self, size: int, footprint: float, mode: str, sigma_scale: float, device: Any
    ) -> None:
        import torch

        self.size = size
        self.footprint = float(footprint)
        self.resample = max(1, round(self.footprint))
        self.n = math.ceil(self.footprint) + 1
        self.weight = torch.from_numpy(importance_map(size, mode, sigma_scale)).to(device)
        self.device = device

    def __call__(
        self,
        maps: torch.Tensor,
        ox: np.ndarray,
        oy: np.ndarray,
        limit: tuple[float, float] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Planes (B, 2, n, n) float32 for windows at ``(ox, oy)``, and their (row, col) origins.

        ``limit`` is the slide's (width, height) in output pixels: an output pixel straddling the
        slide's right or bottom edge (its centre outside the slide) takes the value at the edge.
        """
        import torch
        import torch.nn.functional as F  # noqa: N812

        b = maps.shape[0]
        w = self.weight.expand(b, -1, -1)
        planes = torch.stack([maps * w, w], dim=1)
        if self.resample < self.size:
            planes = F.interpolate(planes, size=(self.resample,) * 2, mode="area")
        c0 = np.ceil(ox - 0.5).astype(np.int64)
        r0 = np.ceil(oy - 0.5).astype(np.int64)
        j = np.arange(self.n, dtype=np.float64) + 0.5
        ux = c0[:, None] + j[None, :]  # output pixel centres (B, n)
        uy = r0[:, None] + j[None, :]
        if limit is not None:
            ux = np.minimum(ux, limit[0] - 1e-6)
            uy = np.minimum(uy, limit[1] - 1e-6)
        tx = (ux - ox[:, None]) / self.footprint  # in window units: the window is [0, 1)
        ty = (uy - oy[:, None]) / self.footprint
        gx = torch.from_numpy(2.0 * tx - 1.0).float().to(self.device)
        gy = torch.from_numpy(2.0 * ty - 1.0).float().to(self.device)
        grid = torch.stack(
            [gx[:, None, :].expand(b, self.n, self.n), gy[:, :, None].expand(b, self.n, self.n)],
            dim=-1,
        )
        out = F.grid_sample(
            planes, grid, mode="bilinear", padding_mode="border", align_corners=False
        )
        vx = torch.from_numpy((tx >= 0) & (tx < 1)).to(self.device)
        vy = torch.from_numpy((ty >= 0) & (ty < 1)).to(self.device)
        out = out * (vy[:, :, None] & vx[:, None, :])[:, None].to(out.dtype)
        return out.cpu().numpy(), r0, c0


class BandCanvas:
    """Weighted sums of overlapping windows, held only for the output rows still being written.

    Windows must arrive in row order (their top rows never decrease). When a window starts at row
    ``r``, every row above ``r`` is final: it is divided (Σ weight·p / Σ weight; 0 where no window
    reached) and handed to ``sink(first_row, prob (rows, W) float32, covered (rows, W) bool)``.
    Memory is two float32 planes of ``band × width``, whatever the height.

    Args:
        height: output rows.
        width: output columns.
        band: rows kept (grown when a window is taller).
        sink: receives finished rows, in order, each row exactly once.
    """

    def __init__(
        self,
        height: int,
        width: int,
        band: int,
        sink: Callable[[int, np.ndarray, np.ndarray], None],
    ) -> None:
        self.height, self.width = int(height), int(width)
        self.band = max(1, int(band))
        self.acc = np.zeros((2, self.band, self.width), dtype=np.float32)
        self.top = 0
        self.sink = sink

    def add(self, r0: int, c0: int, planes: np.ndarray) -> None:
        """Add one window's planes (2, n, m) whose top-left output pixel is (r0, c0)."""
        n, m = planes.shape[1:]
        rr0, cc0 = max(r0, 0), max(c0, 0)
        rr1, cc1 = min(r0 + n, self.height), min(c0 + m, self.width)
        if rr1 <= rr0 or cc1 <= cc0:
            return
        if rr0 < self.top:
            raise RuntimeError(f"window at row {rr0} arrived after row {self.top} was written")
        self.flush(rr0)
        need = rr1 - self.top
        if need > self.band:
            grown = np.zeros((2, need, self.width), dtype=np.float32)
            grown[:, : self.band] = self.acc
            self.acc, self.band = grown, need
        self.acc[:, rr0 - self.top : rr1 - self.top, cc0:cc1] += planes[
            :, rr0 - r0 : rr1 - r0, cc0 - c0 : cc1 - c0
        ]

    def flush(self, upto: int) -> None:
        """Finish every row above ``upto``."""
        upto = min(int(upto), self.height)
        while self.top < upto:
            k = min(upto - self.top, self.band)
            num, den = self.acc[0, :k], self.acc[1, :k]
            covered = den > 0
            prob = np.divide(num, den, out=np.zeros_like(num), where=covered)
            np.clip(prob, 0.0, 1.0, out=prob)
            self.sink(self.top, prob, covered)
            self.acc[:, : self.band - k] = self.acc[:, k:].copy()
            self.acc[:, self.band - k :] = 0.0
            self.top += k

    def close(self) -> None:
        """Finish every remaining row."""
        self.flush(self.height)


# -- one slide ----------------------------------------------------------------------------------
def _release_freed_memory() -> None:
    """Hand memory freed by large temporaries back to the OS (glibc only; a no-op elsewhere).

    glibc keeps freed blocks of up to 32 MB in its heaps for reuse (its mmap threshold rises with
    the largest block freed), so the temporaries of tissue detection on a big thumbnail, and the
    windows and activations of past batches, would stay resident: without this, peak memory grows
    with the slide and the number of windows (benchmarks/localize_memory.py).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    """The C library's ``malloc_trim`` (glibc), or None where there is none (macOS, musl...)."""
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _nearest_index(n_out: int, out_step: float, n_src: int, src_step: float) -> np.ndarray:
    """For each output pixel, the source pixel holding its centre (both grids start at 0)."""
    centres = (np.arange(n_out, dtype=np.float64) + 0.5) * out_step
    return np.clip(np.floor(centres / src_step).astype(np.int64), 0, max(n_src - 1, 0))


def _resize_u8(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize a uint8 map (maybe a memmap) to (H, W) with bounded memory: stride, then area."""
    import cv2

    h, w = shape
    step = max(1, min(image.shape[0] // max(4 * h, 1), image.shape[1] // max(4 * w, 1)))
    small = np.ascontiguousarray(image[::step, ::step])
    interp = cv2.INTER_AREA if small.shape[0] >= h else cv2.INTER_LINEAR
    return cv2.resize(small, (w, h), interpolation=interp)


def _mpp_notes(slide: Slide, model_mpp: float, plan: ReadPlan) -> list[str]:
    """Warnings about the slide's resolution against the model's."""
    notes = []
    ratio = model_mpp / slide.mpp  # type: ignore[operator]
    resize = plan.scale / plan.level_downsample  # reduction after reading the chosen level
    if ratio < 1.0 / 1.05:
        notes.append(
            f"the slide ({slide.mpp:.4g} µm/px) is coarser than the model's resolution "
            f"({model_mpp:.4g} µm/px): windows are enlarged {1 / ratio:.2f}×, and the model sees "
            "less detail than in training"
        )
    elif resize > MPP_WARN_FACTOR:
        notes.append(
            f"the slide ({slide.mpp:.4g} µm/px) is {ratio:.1f}× finer than the model "
            f"({model_mpp:.4g} µm/px) and has no pyramid level near it: windows are read from "
            f"level {plan.level} and reduced {resize:.1f}×, which is slow (a pyramidal copy of "
            "the slide reads faster)"
        )
    return notes


def _check_mpp(slide: Slide, model_mpp: float | None, path: Path) -> float:
    """The model's mpp, once the slide is known to have one (else a clear error)."""
    if slide.mpp is None:
        reads = (
            "" if model_mpp is None else f", and the model reads slides at {model_mpp:.4g} µm/px"
        )
        raise InputError(
            f"has no resolution (mpp) in its metadata{reads}; give the slide's level-0 µm/px with "
            "--slide-mpp (or a slide_mpp column in the input CSV)"
            + (", or use --whole-image for a plain image" if slide.vendor == "image" else ""),
            path,
        )
    return float(model_mpp or 0.0)


def _check_whole_image(slide: Slide, path: Path) -> None:
    """``--whole-image`` takes plain images only (else a clear error)."""
    if slide.vendor != "image":
        raise InputError(
            f"--whole-image resizes a plain image (PNG, JPEG...) to the network input; this is "
            f"a {slide.vendor} slide: drop --whole-image to slide windows over it",
            path,
        )


def _run_windows(
    engine: Engine,
    dataset: WindowBatches,
    blender: WindowBlender,
    canvas: BandCanvas,
    ox: np.ndarray,
    oy: np.ndarray,
    limit: tuple[float, float],
    progress: Progress,
) -> tuple[np.ndarray, float, float]:
    """Infer every window (read ahead of the model) and blend it into the canvas.

    Returns:
        (sum of the windows' class probabilities (K,), seconds computing, seconds waiting for
        the reader).
    """
    import torch

    class_sum = torch.zeros(len(engine.class_names), dtype=torch.float64)
    t_model = t_wait = 0.0
    if len(dataset) == 0:
        return class_sum.numpy(), t_model, t_wait
    reader: Any
    if engine.workers == 0:
        reader = _Prefetch((dataset[i] for i in range(len(dataset))), depth=3)
    else:
        reader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            shuffle=False,
            num_workers=engine.workers,
            pin_memory=engine.device.type == "cuda",
            prefetch_factor=4,
        )
    try:
        done = 0
        t_ready = t_trim = time.perf_counter()
        for batch in reader:
            t_got = time.perf_counter()
            t_wait += t_got - t_ready
            b = batch.shape[0]
            probs, maps = engine.predict(batch)
            class_sum += probs.double().sum(0).cpu()
            planes, r0s, c0s = blender(maps, ox[done : done + b], oy[done : done + b], limit)
            for k in range(b):
                canvas.add(int(r0s[k]), int(c0s[k]), planes[k])
            done += b
            progress.advance(b)
            if time.perf_counter() - t_trim > TRIM_SECONDS:
                _release_freed_memory()  # freed batches and activations would pile up in the heap
                t_trim = time.perf_counter()
            t_ready = time.perf_counter()
            t_model += t_ready - t_got
    finally:
        if isinstance(reader, _Prefetch):
            reader.close()
    return class_sum.numpy(), t_model, t_wait


def _write_slide_outputs(
    name: str,
    slide: Slide,
    slide_dir: Path,
    scratch: Path,
    prob_u8: np.ndarray,
    found: SlideTissue,
    engine: Engine,
    output_mpp: float,
    s_out: float,
    max_bytes: int,
) -> dict:
    """Write the probability TIFF, mask, GeoJSON and overlay of a finished map, band by band.

    Returns:
        ``roi_px`` and ``roi_sum`` (ROI pixels and their summed uint8 probability), ``step`` (the
        GeoJSON mask's subsampling), ``features``, ``outputs`` and ``notes``.
    """
    from histo_wsl.slideio import writers

    out_h, out_w = prob_u8.shape
    w0, h0 = slide.dimensions
    t8 = max(1, math.ceil(engine.threshold * 255.0 - 1e-6))  # probability >= threshold
    notes: list[str] = []
    roi_px, roi_sum = 0, 0.0
    for r in range(0, out_h, 4096):
        part = np.asarray(prob_u8[r : r + 4096])
        sel = part >= t8
        roi_px += int(sel.sum())
        roi_sum += float(part[sel].sum(dtype=np.float64))
    writers.write_pyramid_tiff(
        slide_dir / f"{name}.prob.tif",
        prob_u8,
        output_mpp,
        description={
            "map": "probability",
            "class": engine.roi_name,
            "scale": "value / 255",
            "mpp": output_mpp,
            "slide": str(slide.path),
            "slide_mpp": slide.mpp,
            "level0_px_per_px": s_out,
        },
        scratch=scratch,
        max_bytes=max_bytes,
    )
    outputs = [f"{name}.prob.tif", f"{name}.mask.png", f"{name}.geojson", f"{name}.overlay.png"]
    if slide.vendor == "image":  # plain images: maps at the image's own size
        full = _resize_u8(prob_u8, (h0, w0))
        writers.write_probability_png(slide_dir / f"{name}.prob.png", full)
        writers.write_mask_png(slide_dir / f"{name}.mask.png", full >= t8)
        outputs.append(f"{name}.prob.png")
        notes.append(f"{name}.prob.png and {name}.mask.png are at the image's own size")
        del full
    else:
        mask_u8 = writers.scratch_array(
            (out_h, out_w), np.uint8, scratch=scratch, max_bytes=max_bytes, name="mask"
        )
        for r in range(0, out_h, 4096):
            part = np.asarray(prob_u8[r : r + 4096])
            mask_u8[r : r + 4096] = (part >= t8).astype(np.uint8) * 255
        writers.write_png(slide_dir / f"{name}.mask.png", mask_u8)
        del mask_u8

    # outlines on a mask of bounded size
    step = 1
    while (out_h // step) * (out_w // step) > GEOJSON_MAX_PIXELS:
        step *= 2
    small = np.ascontiguousarray(prob_u8[::step, ::step])
    geo = mask_to_geojson(
        small >= t8,
        s_out * step,
        style=GeoJSONStyle(engine.roi_name, ROI_COLOR, value_scale=1.0 / 255.0),
        mpp=slide.mpp,
        values=small,
    )
    write_geojson(slide_dir / f"{name}.geojson", geo)
    if step > 1:
        notes.append(f"GeoJSON outlines traced on the map subsampled {step}× (bounded memory)")
    del small

    thumb = found.thumbnail
    prob_thumb = _resize_u8(prob_u8, thumb.shape[:2])
    overlay = writers.overlay_image(
        thumb, prob_thumb, prob_thumb >= t8, color=ROI_COLOR, tissue=found.mask
    )
    writers.write_png(slide_dir / f"{name}.overlay.png", overlay, compress_level=6)
    return {
        "roi_px": roi_px,
        "roi_sum": roi_sum,
        "step": step,
        "features": len(geo["features"]),
        "outputs": outputs,
        "notes": notes,
    }


def localize_slide(
    item: InputItem, stage: Path, progress: Progress, engine: Engine, params: LocalizeParams
) -> dict:
    """Sliding-window inference over one slide into ``stage/<slide>/``; returns its record."""
    t_start = time.perf_counter()
    mpp_override = item.slide_mpp if item.slide_mpp is not None else params.slide_mpp
    slide_dir = stage / item.name
    slide_dir.mkdir(parents=True)
    scratch = stage / f".scratch-{item.name}"
    try:
        with open_slide(item.path, mpp=mpp_override) as slide:
            return _localize_open_slide(
                item, slide, slide_dir, scratch, progress, engine, params, mpp_override, t_start
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _localize_open_slide(
    item: InputItem,
    slide: Slide,
    slide_dir: Path,
    scratch: Path,
    progress: Progress,
    engine: Engine,
    params: LocalizeParams,
    mpp_override: float | None,
    t_start: float,
) -> dict:

    from histo_wsl.slideio import writers
    from histo_wsl.slideio.grid import cover_grid

    model_mpp = _check_mpp(slide, engine.model_mpp, item.path)
    notes = list(slide.notes) + list(engine.notes)
    plan = plan_read(slide, mpp=model_mpp)
    for note in _mpp_notes(slide, model_mpp, plan):
        notes.append(note)
        warn(f"{item.path}: {note}")
    output_mpp = float(params.output_mpp or model_mpp * OUTPUT_FACTOR)
    s_out = output_mpp / slide.mpp  # level-0 px per output px
    w0, h0 = slide.dimensions
    out_w, out_h = max(1, math.ceil(w0 / s_out - 1e-9)), max(1, math.ceil(h0 / s_out - 1e-9))
    if output_mpp < slide.mpp * 0.999:
        notes.append(
            f"--output-mpp {output_mpp:.4g} is finer than the slide ({slide.mpp:.4g} µm/px): "
            "the map has more pixels than the slide"
        )

    # tissue, then the windows that touch it
    found = find_tissue(
        slide,
        thumbnail_mpp=params.thumbnail_mpp,
        geojson=tissue_geojson_for(item, params.tissue_geojson),
        params=params.tissue,
        whole_slide=not params.tissue_detection,
    )
    ds = found.downsample
    size = engine.size
    stride = max(1, round(size * (1.0 - params.overlap)))
    grid = cover_grid(slide, plan, size, stride)
    frac = tissue_fraction_map(found.mask).fraction(
        grid.xs / ds,
        grid.ys / ds,
        (grid.xs + grid.size_level0) / ds,
        (grid.ys + grid.size_level0) / ds,
    )
    windows = grid.subset(frac > 0)
    del frac
    _release_freed_memory()
    t_tissue = time.perf_counter() - t_start

    # the output map: uint8, in memory or a memmap in the staging folder
    max_bytes = int(params.canvas_max_mb * 2**20)
    prob_u8 = writers.scratch_array(
        (out_h, out_w), np.uint8, scratch=scratch, max_bytes=max_bytes, name="prob"
    )
    canvas_kind = "memmap" if isinstance(prob_u8, np.memmap) else "memory"
    th, tw = found.mask.shape
    tissue_rows = _nearest_index(out_h, s_out, th, ds)
    tissue_cols = _nearest_index(out_w, s_out, tw, ds)
    stats = {"tissue_px": 0}

    def sink(r0: int, prob: np.ndarray, covered: np.ndarray) -> None:
        rows = tissue_rows[r0 : r0 + prob.shape[0]]
        inside = found.mask[rows[:, None], tissue_cols[None, :]] & covered
        stats["tissue_px"] += int(inside.sum())
        u8 = np.rint(prob * 255.0).astype(np.uint8)
        u8[~inside] = 0
        prob_u8[r0 : r0 + prob.shape[0]] = u8

    footprint = size * plan.scale / s_out
    blender = WindowBlender(size, footprint, params.blend, params.sigma_scale, engine.device)
    canvas = BandCanvas(out_h, out_w, blender.n + math.ceil(stride * plan.scale / s_out) + 2, sink)
    n = len(windows)
    progress.start(n, item.name)
    t_infer0 = time.perf_counter()
    dataset = WindowBatches(
        item.path,
        mpp_override,
        plan,
        windows.xs,
        windows.ys,
        size,
        params.batch_size,
        slide if engine.workers == 0 else None,
    )
    class_sum, t_model, t_wait = _run_windows(
        engine,
        dataset,
        blender,
        canvas,
        windows.xs / s_out,
        windows.ys / s_out,
        (w0 / s_out, h0 / s_out),
        progress,
    )
    canvas.close()
    _release_freed_memory()
    t_infer = time.perf_counter() - t_infer0

    # outputs
    t_write0 = time.perf_counter()
    threshold = engine.threshold
    written = _write_slide_outputs(
        item.name, slide, slide_dir, scratch, prob_u8, found, engine, output_mpp, s_out, max_bytes
    )
    notes += written.pop("notes")
    roi_px, roi_sum, step = written["roi_px"], written["roi_sum"], written["step"]
    px_um2 = (s_out * slide.mpp) ** 2
    t_write = time.perf_counter() - t_write0

    if n:
        mean_probs = (class_sum / n).tolist()
        top = int(np.argmax(mean_probs))
        predicted, score = engine.class_names[top], round(float(mean_probs[top]), 6)
        class_probs = {
            c: round(float(p), 6) for c, p in zip(engine.class_names, mean_probs, strict=True)
        }
    else:
        predicted, score, class_probs = None, None, {}
        notes.append("no tissue found: the map is empty and the GeoJSON has no feature")
        warn(f"{item.path}: no tissue found; empty map written")
    total = time.perf_counter() - t_start
    tissue_area = stats["tissue_px"] * px_um2
    return {
        "mode": "sliding-window",
        "predicted_class": predicted,
        "score": score,
        "class_probabilities": class_probs,
        "slide_score_rule": "mean of the tissue windows' softmax; predicted class = its argmax",
        "roi_class": engine.roi_name,
        "threshold": threshold,
        "roi_area_um2": round(roi_px * px_um2, 3),
        "roi_pixels": roi_px,
        "roi_mean_probability": round(roi_sum / roi_px / 255.0, 6) if roi_px else None,
        "roi_features": written["features"],
        "tissue_area_um2": round(tissue_area, 3),
        "roi_fraction_of_tissue": round(roi_px * px_um2 / tissue_area, 6) if tissue_area else None,
        "tissue_source": found.source,
        "tissue_fraction": found.fraction,
        "slide_mpp": slide.mpp,
        "mpp_source": slide.mpp_source,
        "slide_size": [w0, h0],
        "model_mpp": model_mpp,
        "read": plan.as_dict(),
        "output_mpp": output_mpp,
        "output_size": [out_w, out_h],
        "output_downsample": s_out,
        "geojson_downsample": s_out * step,
        "window": {
            "size": size,
            "stride": stride,
            "overlap": params.overlap,
            "size_level0": grid.size_level0,
            "blend": params.blend,
        },
        "windows": n,
        "grid_windows": len(grid),
        "batch_size": params.batch_size,
        "device": str(engine.device),
        "workers": engine.workers,
        "canvas": canvas_kind,
        "timings": {
            "tissue_s": round(t_tissue, 3),
            "inference_s": round(t_infer, 3),
            "model_s": round(t_model, 3),
            "read_wait_s": round(t_wait, 3),
            "write_s": round(t_write, 3),
            "total_s": round(total, 3),
            "windows_per_s": round(n / t_infer, 2) if n and t_infer > 0 else None,
        },
        "model": engine.describe(),
        "outputs": written["outputs"],
        "notes": notes,
    }


def localize_whole_image(
    item: InputItem, stage: Path, progress: Progress, engine: Engine, params: LocalizeParams
) -> dict:
    """The papers' protocol for a plain image: resize to the input, predict once, resize back.

    Writes ``<image>.prob.png`` and ``<image>.mask.png`` at the image's size, and
    ``<image>.geojson`` (image pixels) into ``stage/<image>/``; returns its record.
    """
    import torch
    import torch.nn.functional as F  # noqa: N812
    from PIL import Image

    from histo_wsl.slideio import writers

    t0 = time.perf_counter()
    mpp_override = item.slide_mpp if item.slide_mpp is not None else params.slide_mpp
    with open_slide(item.path, mpp=mpp_override) as slide:
        _check_whole_image(slide, item.path)
        w, h = slide.dimensions
        image = slide.read_region((0, 0), 0, (w, h))
        mpp = slide.mpp
    progress.start(1, item.name)
    s = engine.size
    x = torch.from_numpy(np.asarray(image.resize((s, s), Image.Resampling.BILINEAR)).copy())
    probs, maps = engine.predict(x[None])
    full = F.interpolate(
        maps[:, None].float().cpu(), size=(h, w), mode="bilinear", align_corners=False
    )
    prob = full[0, 0].clamp_(0, 1).numpy()
    progress.advance(1)
    threshold = engine.threshold
    mask = prob >= threshold
    out = stage / item.name
    out.mkdir(parents=True)
    name = item.name
    writers.write_probability_png(out / f"{name}.prob.png", prob, bits=params.prob_bits)
    writers.write_mask_png(out / f"{name}.mask.png", mask)
    geo = mask_to_geojson(
        mask, 1.0, style=GeoJSONStyle(engine.roi_name, ROI_COLOR), mpp=mpp, values=prob
    )
    write_geojson(out / f"{name}.geojson", geo)
    p = probs[0].double().cpu().tolist()
    top = int(np.argmax(p))
    roi_px = int(mask.sum())
    return {
        "mode": "whole-image",
        "predicted_class": engine.class_names[top],
        "score": round(float(p[top]), 6),
        "class_probabilities": {
            c: round(float(v), 6) for c, v in zip(engine.class_names, p, strict=True)
        },
        "roi_class": engine.roi_name,
        "threshold": threshold,
        "roi_pixels": roi_px,
        "roi_area_um2": None if mpp is None else round(roi_px * mpp * mpp, 3),
        "roi_mean_probability": round(float(prob[mask].mean()), 6) if roi_px else None,
        "roi_features": len(geo["features"]),
        "image_size": [w, h],
        "image_mpp": mpp,
        "input_size": s,
        "device": str(engine.device),
        "timings": {"total_s": round(time.perf_counter() - t0, 3)},
        "model": engine.describe(),
        "outputs": [f"{name}.prob.png", f"{name}.mask.png", f"{name}.geojson"],
        "notes": list(engine.notes),
    }


def check_inputs(
    inputs: Sequence[InputItem], out_dir: Path, params: LocalizeParams, *, overwrite: bool = False
) -> None:
    """Open every input still to do (its header only) before the model is loaded.

    Loading the model costs seconds and about a gigabyte; a batch with an unreadable slide, a
    slide without resolution or a missing tissue GeoJSON is refused before that. Inputs finished in
    an earlier run are not opened (unless ``overwrite``).

    Raises:
        InputError: the first input that cannot be localized, named, with the fix.
    """
    for item in inputs:
        marker = out_dir / item.name / f"{item.name}.json"
        if not overwrite and marker.is_file():
            try:
                if json.loads(marker.read_text(encoding="utf-8")).get("status") == "done":
                    continue
            except (OSError, ValueError, AttributeError):
                pass
        mpp = item.slide_mpp if item.slide_mpp is not None else params.slide_mpp
        with open_slide(item.path, mpp=mpp) as slide:
            if params.whole_image:
                _check_whole_image(slide, item.path)
                continue
            _check_mpp(slide, None, item.path)
        if params.tissue_detection:
            tissue_geojson_for(item, params.tissue_geojson)


def localize(
    inputs: Sequence[InputItem],
    out_dir: Path,
    params: LocalizeParams,
    *,
    overwrite: bool = False,
    skip_errors: bool = False,
    shard: tuple[int, int] | None = None,
    quiet: bool = False,
    argv: Sequence[str] | None = None,
) -> RunSummary:
    """Localize the model's class on every input into ``out_dir`` (resumable; see module docs).

    Args:
        inputs: slides or images (see :func:`histo_wsl.runtime.inputs.collect_inputs`).
        out_dir: output folder; each input gets ``<out>/<name>/``, the run ``run.json``.
        params: the parameters.
        overwrite: redo inputs finished in an earlier run.
        skip_errors: record a failing input and go on (exit code 1).
        shard: (K, N) when this process runs one shard (recorded).
        quiet: no progress bar.
        argv: the command line to record.

    Returns:
        The run's summary (its ``exit_code`` is the command's).

    Raises:
        InputError: bad parameters or a model that cannot be used (before any input is touched).
    """
    params.validate()
    if not skip_errors:
        check_inputs(inputs, out_dir, params, overwrite=overwrite)  # before the model's load
    engine = Engine(params)
    record = params.record()
    record.update(
        {
            "threshold_used": engine.threshold,
            "model_mpp_used": engine.model_mpp,
            "roi_class": engine.roi_name,
            "workers_used": engine.workers,
        }
    )
    runner = BatchRunner(
        out_dir,
        command="localize",
        params=record,
        marker=lambda name: f"{name}/{name}.json",
        overwrite=overwrite,
        skip_errors=skip_errors,
        shard=shard,
        seed=params.seed,
        quiet=quiet,
        device=str(engine.device),
    )
    step = localize_whole_image if params.whole_image else localize_slide
    return runner.run(inputs, lambda it, st, pr: step(it, st, pr, engine, params), argv)
