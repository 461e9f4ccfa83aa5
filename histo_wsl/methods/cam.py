"""Stage 1 of both papers: a WSOL classifier trained on image labels, whose CAMs localize.

:class:`ClassifierTask` is the recipe the training engine (:func:`histo_wsl.training.engine.fit`) runs for
``histo-wsl train-classifier``: cross-entropy on image labels; each epoch, accuracy on ``val`` and
PxAP of the ground-truth class's CAM on ``valpx``; ``best-loc.pt`` (PxAP, or accuracy when no
validation image has a mask) and ``best-cls.pt`` (accuracy) kept. :func:`evaluate_maps` is the
validation loop every method shares.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from statistics import median

import torch
import torch.nn.functional as F  # noqa: N812
from PIL import Image
from torch import nn

from histo_wsl import __version__
from histo_wsl.data.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LabelledImages,
    check_samples,
    eval_transform,
    train_transform,
)
from histo_wsl.data.sources import Dataset, Sample, load_samples
from histo_wsl.errors import InputError
from histo_wsl.evaluation.metrics import ClassificationMeter, PxAPMeter
from histo_wsl.networks.cams import compute_cams
from histo_wsl.networks.classifier import build_classifier, param_groups
from histo_wsl.runtime.console import warn
from histo_wsl.training.config import TrainConfig
from histo_wsl.training.engine import VAL_ACC, VALPX_PXAP, Selection

__all__ = ["STAGE1_METHODS", "ClassifierTask", "evaluate_maps", "load_training_data", "seen_mpp"]

#: methods of ``train-classifier``: the CAM classifier and Max-Min (:mod:`histo_wsl.methods.maxmin`)
STAGE1_METHODS = ("cam", "maxmin")

#: a map function: (model, images (B,3,H,W), labels (B,)) -> (logits (B,K), maps (B,H,W) in [0,1])
MapFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def load_training_data(cfg: TrainConfig) -> Dataset:
    """Read and check the dataset of ``cfg`` (bad files raise unless ``skip_errors``).

    Files left out with ``skip_errors`` are warned about and kept in ``skipped_files``.

    Raises:
        InputError: a crop larger than the resized image, or a bad dataset.
    """
    if cfg.crop_size > cfg.resize_size:
        raise InputError(
            f"--crop-size {cfg.crop_size} is larger than --resize-size {cfg.resize_size}: the "
            "random training crop must fit in the resized image"
        )
    ds = load_samples(
        cfg.data,
        classes=cfg.classes,
        negative_class=cfg.negative_class,
        fold=cfg.fold,
        val_fraction=cfg.val_fraction,
        seed=cfg.seed,
    )
    good, dropped = check_samples(ds.samples, skip_errors=cfg.skip_errors)
    ds.samples, ds.skipped_files = good, dropped
    for message in dropped:
        warn(f"left out (--skip-errors): {message}")
    return ds


def training_images(ds: Dataset, cfg: TrainConfig) -> LabelledImages:
    """The ``train`` split with the training preset (resize, random crop, flips, colour jitter)."""
    return LabelledImages(
        ds.split("train"),
        cfg.resize_size,
        train_transform(cfg.crop_size, jitter=cfg.color_jitter),
    )


def seen_mpp(ds: Dataset, data_mpp: float | None, resize: int) -> float | None:
    """Resolution (µm/px) the network sees: data mpp × median image side / resize side.

    GlaS images (0.62 µm/px, 775×522) resized to 256×256 are seen at about 1.6 µm/px on average
    over both axes (1.88 across, 1.26 down); the card records this so ``localize`` reads slides at
    the resolution the model was trained on.
    """
    if data_mpp is None:
        return None
    sides = []
    for s in ds.samples[:64]:
        with Image.open(s.image) as im:
            sides.append((im.size[0] + im.size[1]) / 2)
    return round(data_mpp * median(sides) / resize, 4) if sides else None


@torch.no_grad()
def evaluate_maps(
    model: nn.Module,
    samples: list[Sample],
    valpx: list[Sample],
    map_fn: MapFn,
    device: torch.device,
    num_classes: int,
    batch_size: int = 16,
    size: int = 224,
) -> dict:
    """Accuracy on ``samples`` and PxAP / Dice at 0.5 on ``valpx`` (maps at ``size``²).

    PxAP follows method.md §4.1: maps of the ground-truth class, masks resized nearest to
    ``size``², dataset-level histograms over 1000 thresholds.
    """
    model.eval()
    out: dict = {}
    if samples:
        cls = ClassificationMeter(num_classes)
        loader = torch.utils.data.DataLoader(
            LabelledImages(samples, size, eval_transform()), batch_size=batch_size
        )
        for b in loader:
            logits = model(b["image"].to(device))
            cls.update(logits.float().cpu(), b["label"])
        out["val_acc"] = float(cls.accuracy())
    if valpx:
        px = PxAPMeter()
        loader = torch.utils.data.DataLoader(
            LabelledImages(valpx, size, eval_transform()), batch_size=batch_size
        )
        for b in loader:
            _, maps = map_fn(model, b["image"].to(device), b["label"].to(device))
            maps = maps.float().cpu()
            for m, gt in zip(maps, b["mask"], strict=True):
                px.update(m.numpy(), gt.numpy() == 1)
        out["valpx_pxap"] = float(px.pxap())
        out["valpx_dice_fg@0.5"] = float(px.dice_iou(0.5)["dice_fg"])
    return out


def evaluate_localizer(
    model: nn.Module, ds: Dataset, device: torch.device, size: int, own_key: str | None = None
) -> dict:
    """:func:`evaluate_maps` of a model with ``localize(x, refine=...)`` (NEGEV, Max-Min).

    Accuracy on ``val`` and PxAP on ``valpx`` of ``localize(x)`` (the refined map when the model
    has a ready refiner); with ``own_key``, also the valpx PxAP of the unrefined map under that
    key.
    """
    metrics = evaluate_maps(
        model,
        ds.split("val"),
        ds.split("valpx"),
        lambda net, x, y: net.localize(x),
        device,
        len(ds.class_names),
        size=size,
    )
    if own_key is not None and "valpx_pxap" in metrics:
        own = evaluate_maps(
            model,
            [],
            ds.split("valpx"),
            lambda net, x, y: net.localize(x, refine=False),
            device,
            len(ds.class_names),
            size=size,
        )
        metrics[own_key] = own["valpx_pxap"]
    return metrics


class ClassifierTask:
    """Stage-1 WSOL classifier (CAM and the other pooling heads) for the training engine."""

    selection = [
        Selection("best-loc.pt", (VALPX_PXAP, VAL_ACC)),
        Selection("best-cls.pt", (VAL_ACC,)),
    ]

    def __init__(self, cfg: TrainConfig, ds: Dataset) -> None:
        self.cfg, self.ds = cfg, ds

    def build_model(self) -> nn.Module:
        """The classifier of ``cfg`` (backbone, head, pretrained weights)."""
        return build_classifier(
            self.cfg.backbone,
            self.cfg.head,
            len(self.ds.class_names),
            pretrained=self.cfg.pretrained,
        )

    def param_groups(self, model: nn.Module, lr: float) -> list[dict]:
        """Backbone at ``lr``, the method's deep layers and head at ``lr × ratio``."""
        return param_groups(model, lr, self.cfg.lr_classifier_ratio)

    def train_dataset(self) -> torch.utils.data.Dataset:
        """The ``train`` split with the training preset."""
        return training_images(self.ds, self.cfg)

    def training_step(self, model: nn.Module, batch: dict, epoch: int) -> tuple[torch.Tensor, dict]:
        """Cross-entropy on the image labels."""
        logits = model(batch["image"])
        loss = F.cross_entropy(logits.float(), batch["label"])
        acc = (logits.argmax(1) == batch["label"]).float().mean()
        return loss, {"train_acc": 100.0 * float(acc)}

    def map_fn(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
        """Logits and the ``cam_method`` map of the given classes, per-image min-max normalised."""
        logits = model(images)
        maps = compute_cams(
            model, images, labels, method=self.cfg.cam_method, size=tuple(images.shape[-2:])
        )
        return logits, maps

    def evaluate(self, model: nn.Module, device: torch.device) -> dict:
        """Accuracy on val, PxAP on valpx."""
        return evaluate_maps(
            model,
            self.ds.split("val"),
            self.ds.split("valpx"),
            self.map_fn,
            device,
            len(self.ds.class_names),
            size=self.cfg.crop_size,
        )

    def card(self) -> dict:
        """The model card (DESIGN.md §3)."""
        cfg = self.cfg
        data_mpp = cfg.data_mpp
        return {
            "method": "cam",
            "stage": 1,
            "backbone": cfg.backbone,
            "head": cfg.head,
            "head_opts": {},
            "cam_method": cfg.cam_method,
            "num_classes": len(self.ds.class_names),
            "class_names": list(self.ds.class_names),
            "negative_class": self.cfg.negative_class,
            "input_size": cfg.crop_size,
            "resize_size": cfg.resize_size,
            "data_mpp": data_mpp,
            "mpp": self._seen_mpp,
            "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
            "threshold": 0.5,
            "training_data": self.ds.describe(),
            "config": _plain_config(cfg),
            "versions": {"histo-wsl": __version__, "torch": str(torch.__version__)},
        }

    def on_epoch_end(self, epoch: int) -> None:
        """No method schedule in stage 1."""

    def state_dict(self) -> dict:
        """No task state in stage 1."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """No task state in stage 1."""


def train_classifier(
    cfg: TrainConfig, *, resume: bool = False, quiet: bool = False, argv: list[str] | None = None
) -> dict:
    """Run ``train-classifier``: read and check the data, then train with the engine.

    ``cfg.method`` ``maxmin`` hands over to :func:`histo_wsl.methods.maxmin.train_maxmin`.

    Returns:
        The engine's summary plus the dataset description and any skipped files.
    """
    from histo_wsl.training.engine import fit

    if cfg.method not in STAGE1_METHODS:
        raise InputError(
            f"--method must be one of {', '.join(STAGE1_METHODS)} (got {cfg.method!r}); "
            "the NEGEV decoder is trained with train-decoder"
        )
    if cfg.method == "cam" and cfg.refine != "none":
        raise InputError(
            f"--refine {cfg.refine} refines a class-agnostic map: use it with --method maxmin, "
            "or with train-decoder over this classifier"
        )
    if cfg.method == "maxmin":
        from histo_wsl.methods.maxmin import train_maxmin

        return train_maxmin(cfg, resume=resume, quiet=quiet, argv=argv)
    ds = load_training_data(cfg)
    if cfg.data_mpp is None:
        cfg.data_mpp = ds.data_mpp
    task = ClassifierTask(cfg, ds)
    task._seen_mpp = seen_mpp(ds, cfg.data_mpp, cfg.resize_size)
    summary = fit(cfg, task, resume=resume, quiet=quiet, argv=argv)
    return {**summary, "data": ds.describe(), "skipped_files": ds.skipped_files, "notes": ds.notes}


def _plain_config(cfg: TrainConfig) -> dict:
    import dataclasses

    d = dataclasses.asdict(cfg)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}
