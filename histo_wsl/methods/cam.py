"""Stage 1 of both papers: a WSOL classifier trained on image labels, whose CAMs localize.

:class:`ClassifierTask` is the recipe the training engine (:func:`histo_wsl.training.engine.fit`) runs for
``histo-wsl train-classifier``: cross-entropy on image labels; each epoch, accuracy on ``val`` and
PxAP of the ground-truth class's CAM on ``valpx``; ``best-loc.pt`` (PxAP, or accuracy when no
validation image has a mask) and ``best-cls.pt`` (accuracy) kept. Its map is the chosen CAM
method's map of a class (``--cam``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from histo_wsl import __version__
from histo_wsl.data.images import IMAGENET_MEAN, IMAGENET_STD
from histo_wsl.data.sources import Dataset
from histo_wsl.errors import InputError
from histo_wsl.methods.base import (
    Method,
    evaluate_maps,
    image_scale,
    load_training_data,
    plain_config,
    seen_mpp,
    training_images,
)
from histo_wsl.networks.cams import compute_cams
from histo_wsl.networks.classifier import WSOLClassifier, build_classifier, param_groups
from histo_wsl.training.config import TrainConfig
from histo_wsl.training.engine import VAL_ACC, VALPX_PXAP, Selection

__all__ = ["METHOD", "ClassifierTask", "classifier_from_card", "train_classifier"]


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
            self.cfg.model.backbone,
            self.cfg.model.head,
            len(self.ds.class_names),
            pretrained=self.cfg.model.pretrained,
        )

    def param_groups(self, model: nn.Module, lr: float) -> list[dict]:
        """Backbone at ``lr``, the method's deep layers and head at ``lr × ratio``."""
        return param_groups(model, lr, self.cfg.optim.lr_classifier_ratio)

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
            model, images, labels, method=self.cfg.model.cam_method, size=tuple(images.shape[-2:])
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
            size=self.cfg.data.crop_size,
            scale=image_scale(self.ds, self.cfg),
        )

    def card(self) -> dict:
        """The model card (DESIGN.md §3)."""
        cfg = self.cfg
        data_mpp = cfg.data.data_mpp
        return {
            "method": "cam",
            "stage": 1,
            "backbone": cfg.model.backbone,
            "head": cfg.model.head,
            "head_opts": {},
            "cam_method": cfg.model.cam_method,
            "num_classes": len(self.ds.class_names),
            "class_names": list(self.ds.class_names),
            "negative_class": self.cfg.data.negative_class,
            "input_size": cfg.data.crop_size,
            "resize_size": cfg.data.resize_size,
            "geometry": cfg.data.geometry,
            "glass": cfg.data.glass,
            "data_mpp": data_mpp,
            "mpp": self._seen_mpp,
            "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
            "threshold": 0.5,
            "training_data": self.ds.describe(),
            "config": plain_config(cfg),
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

    Returns:
        The engine's summary plus the dataset description and any skipped files.
    """
    from histo_wsl.training.engine import fit

    if cfg.knn.refine != "none":
        raise InputError(
            f"--refine {cfg.knn.refine} refines a class-agnostic map: use it with --method maxmin, "
            "or with train-decoder over this classifier"
        )
    ds = load_training_data(cfg)
    if cfg.data.data_mpp is None:
        cfg.data.data_mpp = ds.data_mpp
    task = ClassifierTask(cfg, ds)
    task._seen_mpp = seen_mpp(ds, cfg.data.data_mpp, cfg.data.resize_size)
    summary = fit(cfg, task, resume=resume, quiet=quiet, argv=argv)
    return {**summary, "data": ds.describe(), "skipped_files": ds.skipped_files, "notes": ds.notes}


def classifier_from_card(card: dict, state_dict: dict, path: str | Path) -> WSOLClassifier:
    """The stage-1 classifier a card describes, with ``state_dict`` loaded strictly."""
    try:
        model = build_classifier(
            card["backbone"],
            card["head"],
            int(card["num_classes"]),
            pretrained=False,
            **card.get("head_opts", {}),
        )
    except KeyError as exc:
        raise InputError(
            f"the model card lacks {exc}; the checkpoint is incomplete", path
        ) from None
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise InputError(
            f"weights do not fit the {card['backbone']}/{card['head']} network its card describes "
            f"({str(exc).splitlines()[0][:120]}...)",
            path,
        ) from None
    return model


def map_description(card: dict, map_class: str) -> str:
    """The CAM method's map of the ground-truth or predicted class, in words."""
    which = "ground-truth" if map_class == "gt" else "predicted"
    return f"{card.get('cam_method', 'cam')} map of the {which} class, per-image min-max normalised"


#: the CAM classifier (stage 1 of both papers) as a :class:`~histo_wsl.methods.base.Method`
METHOD = Method(
    name="cam",
    command="train-classifier",
    has_cam=True,
    train=train_classifier,
    from_card=classifier_from_card,
    map_description=map_description,
)
