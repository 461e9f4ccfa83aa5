"""Stage 1 of both papers: a WSOL classifier trained on image labels, whose CAMs localize.

:class:`ClassifierTask` is the recipe the training engine (:func:`histo_wsl.training.engine.fit`) runs for
``histo-wsl train-classifier``: cross-entropy on image labels; each epoch, accuracy on ``val`` and
PxAP of the ground-truth class's CAM on ``valpx``; ``best-loc.pt`` (PxAP, or accuracy when no
validation image has a mask) and ``best-cls.pt`` (accuracy) kept. Its map is the chosen CAM
method's map of a class (``--cam``).

Each map is min-max normalised per image, right for a whole image that holds the region of
interest; a slide's window may hold none. The card also records ``cam_window_range``
(:func:`cam_range`, measured at every evaluation on the train split as a slide shows it), by which
``localize`` normalises the maps of a slide's windows instead; ``models export --mask-range DATA``
adds it to a model trained before.
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
    card_train_slides,
    evaluate_maps,
    image_scale,
    load_training_data,
    mean_range,
    plain_config,
    seen_mpp,
    train_slide_view,
    training_images,
)
from histo_wsl.networks.cams import compute_cams, raw_cams
from histo_wsl.networks.classifier import (
    WSOLClassifier,
    build_classifier,
    param_groups,
    unwrap,
)
from histo_wsl.training.config import TrainConfig
from histo_wsl.training.engine import VAL_ACC, VALPX_PXAP, Selection

__all__ = [
    "METHOD",
    "ClassifierTask",
    "cam_range",
    "classifier_from_card",
    "train_classifier",
    "with_cam_range",
]

#: what a card's ``cam_window_range.from`` says
CAM_RANGE_NOTE = (
    "mean per-image min and max of the raw {method} map of the predicted class over the {n} "
    "train images {how} (histo_wsl.methods.cam.cam_range)"
)


def cam_range(
    model: nn.Module,
    images: torch.utils.data.Dataset,
    method: str,
    device: torch.device | str = "cpu",
) -> tuple[float, float]:
    """(lo, hi): the mean over ``images`` of each image's minimum and maximum raw ``method`` map.

    Each image's map is that of its predicted class (what ``localize`` maps on a slide without
    ``--class``), at the image's size. The range normalises the maps of a slide's windows
    (:func:`histo_wsl.networks.cams.range_normalize`); :func:`histo_wsl.methods.base.mean_range`
    says how, and what it raises.
    """
    net = unwrap(model)

    def raw(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # one backbone pass for the class and (``cam``) the map
            feats = net.forward_features(x)[-1]
            cls = net.head(feats).argmax(1)
        return raw_cams(net, x, cls, method=method, size=tuple(x.shape[-2:]), features=feats)

    return mean_range(net, images, raw, f"the {method} maps", device)


def cam_range_card(model: nn.Module, images, how: str, method: str, device="cpu") -> dict:
    """The card's ``cam_window_range`` of ``model``'s ``method`` maps on ``images``."""
    lo, hi = cam_range(model, images, method, device)
    return {
        "method": method,
        "range": [round(lo, 6), round(hi, 6)],
        "from": CAM_RANGE_NOTE.format(method=method, n=len(images), how=how),
    }


class ClassifierTask:
    """Stage-1 WSOL classifier (CAM and the other pooling heads) for the training engine."""

    selection = [
        Selection("best-loc.pt", (VALPX_PXAP, VAL_ACC)),
        Selection("best-cls.pt", (VAL_ACC,)),
    ]

    def __init__(self, cfg: TrainConfig, ds: Dataset) -> None:
        self.cfg, self.ds = cfg, ds
        self._seen_mpp: float | None = None
        #: the train split as slides show it, and the card's ``cam_window_range``
        self._slide_images: tuple | None = None
        self._range: dict | None = None

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
        """Accuracy on val, PxAP on valpx; the CAM's window range on the train split."""
        if self._slide_images is None:
            self._slide_images = train_slide_view(self.ds, self.cfg, self._seen_mpp)
        images, how = self._slide_images
        try:
            self._range = cam_range_card(
                unwrap(model), images, how, self.cfg.model.cam_method, device
            )
        except ValueError:  # a flat map (an untrained head): no range, per-window maps
            self._range = None
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
            **({} if self._range is None else {"cam_window_range": self._range}),
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
    wr = card.get("cam_window_range")
    if wr is not None:
        try:
            lo, hi = (float(v) for v in wr["range"])
            if not hi > lo:
                raise ValueError("an empty range")
            if wr["method"] == card.get("cam_method", "cam"):  # another --cam has no range
                model.window_range = (lo, hi)
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(
                f"the model card's cam_window_range is malformed ({exc}); export the model "
                "again with --mask-range",
                path,
            ) from None
    return model


def with_cam_range(card: dict, state_dict: dict, data: str | Path, path: str | Path = "") -> dict:
    """``card`` with its CAM method's window range measured on its training data.

    ``models export --mask-range``: the train split (the card's fold, split and seed) read as
    ``localize`` reads a slide (:func:`histo_wsl.methods.base.card_train_slides`), the weights of
    ``state_dict``, the card's ``cam_method``.

    Raises:
        InputError: a card without training settings, unreadable data, or flat maps.
    """
    images, how = card_train_slides(card, data, path)
    model = classifier_from_card(card, state_dict, path).eval()
    try:
        wr = cam_range_card(model, images, how, card.get("cam_method", "cam"))
    except ValueError as exc:
        raise InputError(f"--mask-range: {exc}", path or None) from None
    return {**card, "cam_window_range": wr}


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
