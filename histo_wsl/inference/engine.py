"""The inference engine: a trained model run over a slide's windows.

:func:`roi_class` picks the class whose map is made; :class:`Engine` holds the model, device and
precision and turns a batch of windows into maps; :func:`run_windows` drives the batches through
the engine and the blender, with progress and memory kept in check.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from histo_wsl.errors import InputError
from histo_wsl.inference.blending import BandCanvas, WindowBlender
from histo_wsl.inference.params import MISSING_MODEL, LocalizeParams
from histo_wsl.inference.windows import FollowingReads, WindowBatches
from histo_wsl.methods import get_method
from histo_wsl.runtime.batch import Progress
from histo_wsl.runtime.console import warn
from histo_wsl.runtime.memory import release_freed_memory, reuse_freed_memory
from histo_wsl.runtime.threads import ThreadGovernor, openmp_spin_record, usable_cores

if TYPE_CHECKING:
    import torch

__all__ = [
    "CPU_BATCH",
    "GPU_BATCH",
    "TRIM_SECONDS",
    "default_batch_size",
    "roi_class",
    "Engine",
    "run_windows",
]

#: Windows per forward pass on a CPU, and on a GPU (:func:`default_batch_size`).
CPU_BATCH = 4
GPU_BATCH = 16

#: During inference, freed memory is handed back to the OS at most this often (seconds; each
#: call takes about 10 ms, see release_freed_memory).
TRIM_SECONDS = 2.0


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
        reuse_freed_memory()  # each batch's activations reuse the last one's pages
        #: the forward's CPU threads (measured before the model's load, again while slides run)
        self.governor = ThreadGovernor(params.threads) if self.device.type == "cpu" else None
        self.predictor = load_model(
            model_path, map_location="cpu", cam_method=params.cam, tta=params.tta
        )
        self.predictor.to(self.device)
        self.predictor.for_windows(not params.whole_image)
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
        #: windows per forward pass: ``--batch-size``, else the device's own
        self.batch_size = params.batch_size or default_batch_size(self.device.type)
        if params.workers is not None:
            self.workers = params.workers
        else:
            self.workers = (
                min(4, max(1, (os.cpu_count() or 2) - 1)) if self.device.type == "cuda" else 0
            )
        self.params = params
        torch.manual_seed(params.seed)
        #: the train-mil model scoring each slide (``--mil``), or None
        self.mil = None
        if params.mil is not None:
            from histo_wsl.inference.mil_slide import SlideMIL

            self.mil = SlideMIL(params.mil, self.device)

    def threads_record(self) -> dict | None:
        """The forward's CPU threads and how they were chosen (None on a GPU)."""
        g = self.governor
        if g is None:
            return None
        return {"used": g.threads, "chosen_by": g.reason, "openmp_wait": openmp_spin_record()}

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
            **(
                {}
                if self.predictor.window_range is None
                else {"window_range": list(self.predictor.window_range)}
            ),
        }

    def predict(
        self, batch: torch.Tensor, where: np.ndarray | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(class probabilities (B, K), maps (B, S, S) in [0, 1]) of uint8 windows (B, S, S, 3).

        ``where``: (B, H, W) bool, the windows' pixels whose map is needed (their tissue): a
        k-NN refined map is looked up only there (:meth:`Predictor.predict`); None: everywhere.
        """
        import torch

        x = batch.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        x = (x - self._mean) / self._std
        classes = None
        if self.roi_index is not None and get_method(self.predictor.method).has_cam:
            classes = torch.full((x.shape[0],), self.roi_index, dtype=torch.long, device=x.device)
        needed = None if where is None else torch.from_numpy(where).to(self.device)
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
            logits, maps = self.predictor.predict(x, classes, where=needed)
        return logits.float().softmax(1), maps.float().clamp_(0.0, 1.0)


def default_batch_size(device_type: str) -> int:
    """Windows per forward pass when ``--batch-size`` is not given: 4 on a CPU, 16 on a GPU.

    On a CPU small batches run faster (most likely the stride-8 network's activations staying
    nearer the caches): the shipped MobileNetV2 model ran 28 windows/s at batch 4 against 22 at
    16 on two cores, and ``localize`` on a 40,000 × 4,480 band 20.5 against 13.0 windows/s, at
    830 instead of 1,030 MB (docs/results.md, *Batch size on a CPU*). A GPU wants large batches.
    """
    return CPU_BATCH if device_type == "cpu" else GPU_BATCH


def run_windows(
    engine: Engine,
    dataset: WindowBatches,
    blender: WindowBlender,
    canvas: BandCanvas,
    ox: np.ndarray,
    oy: np.ndarray,
    limit: tuple[float, float],
    progress: Progress,
    where: Callable[[int, int], np.ndarray] | None = None,
) -> tuple[np.ndarray, float, float, dict | None]:
    """Infer every window (read ahead of the model) and blend it into the canvas.

    ``where(i, j)``: the tissue of windows ``i:j`` (``(j − i, H, W)`` bool), where their maps
    are needed (:meth:`Engine.predict`); None: everywhere.

    Returns:
        (sum of the windows' class probabilities (K,), seconds computing, seconds waiting for
        the reader, batches read between forwards and ahead of them (None with reader
        processes)).
    """
    import torch

    class_sum = torch.zeros(len(engine.class_names), dtype=torch.float64)
    t_model = t_wait = 0.0
    if len(dataset) == 0:
        return class_sum.numpy(), t_model, t_wait, None
    reader: Any
    if engine.workers == 0:
        reader = FollowingReads(
            dataset,
            lambda: reads_between_forwards(engine),
            threads=min(usable_cores(), dataset.batch_size),
        )
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
            if engine.governor is not None:
                engine.governor.update()
            t_got = time.perf_counter()
            t_wait += t_got - t_ready
            b = batch.shape[0]
            probs, maps = engine.predict(batch, None if where is None else where(done, done + b))
            class_sum += probs.double().sum(0).cpu()
            planes, r0s, c0s = blender(maps, ox[done : done + b], oy[done : done + b], limit)
            for k in range(b):
                canvas.add(int(r0s[k]), int(c0s[k]), planes[k])
            done += b
            progress.advance(b)
            if time.perf_counter() - t_trim > TRIM_SECONDS:
                release_freed_memory()  # freed batches and activations would pile up in the heap
                t_trim = time.perf_counter()
            t_ready = time.perf_counter()
            t_model += t_ready - t_got
    finally:
        if isinstance(reader, FollowingReads):
            reader.close()
    reads = dict(reader.counts) if isinstance(reader, FollowingReads) else None
    return class_sum.numpy(), t_model, t_wait, reads


def reads_between_forwards(engine: Engine) -> bool:
    """Whether the next batch is read between forwards, not beside them.

    True for a CPU forward (no reader processes) whose threads fill every core this process may
    use, on two or more: a reader thread beside it would stall all of them
    (:class:`~histo_wsl.inference.windows.InlineReads`). With a core to spare, or on one core,
    a prefetch thread reads ahead while the model runs. Asked before every batch
    (:class:`~histo_wsl.inference.windows.FollowingReads`), after the thread governor's update:
    under load, ``--threads`` left to localize drops to the free cores, and the reader then goes
    beside the forward; when the load ends, back between forwards.
    """
    g = engine.governor
    if g is None:
        return False
    g.update()  # the load measured now, not at the model's load: auto threads may have dropped
    cores = usable_cores()
    return cores > 1 and g.threads >= cores
