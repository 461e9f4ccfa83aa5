"""Max-Min uncertainty (IEEE TMI 2022) as a stage-1 method: ``train-classifier --method maxmin``.

:class:`MaxMinTask` is the recipe the training engine runs: the network of
:mod:`histo_wsl.networks.maxmin`, the loss of :func:`histo_wsl.methods.maxmin_losses.maxmin_loss`, the
same data, transforms, selection (``best-cls.pt`` by val accuracy of argmax C(X+), ``best-loc.pt`` by
PxAP of the mask on ``valpx``) and checkpoint format as the CAM classifier of stage 1.

With ``refine: knn`` (``--refine knn``) the saved model's map is the mask blended with the k-NN
map of the mask over training pixels (:mod:`histo_wsl.networks.knn`): the bank is rebuilt
from the current model at every evaluation, ``best-loc.pt`` is selected by the blended map's
PxAP, and ``summary.csv`` also has the mask's own (``valpx_pxap_mask``).

A ``minmax`` model's card also records ``maxmin.window_range`` (:func:`mask_range`, measured at
every evaluation): the range that normalises the mask of a slide's windows in ``localize``, where
a window's own minimum and maximum would stretch a stroma-only window into foreground
(:mod:`histo_wsl.networks.maxmin`). ``models export --mask-range DATA`` adds it to a model trained
before.

Schedules (method.md §2.1-2.2), both pure functions of the epoch, so ``--resume`` is exact:
σ during epoch e (1-based) = min(σ0 + (e − 1)·step, σ_max); log-barrier t = min(t0·mult^(e − 1),
t_max). After epoch e the model's σ buffer is set to the value of epoch e + 1, so the checkpoint
written after epoch e is evaluated (and later used) with the σ it carries.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from histo_wsl import __version__
from histo_wsl.data.images import IMAGENET_MEAN, IMAGENET_STD, LabelledImages
from histo_wsl.data.sources import Dataset
from histo_wsl.errors import InputError
from histo_wsl.methods.base import (
    Method,
    card_train_slides,
    evaluate_localizer,
    image_scale,
    load_training_data,
    mean_range,
    plain_config,
    refined_words,
    seen_mpp,
    train_slide_view,
    training_images,
)
from histo_wsl.methods.knn import (
    TrainSplitBanks,
    check_stages,
    refine_card,
    refine_checks,
    refiner_from_card,
)
from histo_wsl.methods.maxmin_losses import REGULARIZERS, maxmin_loss
from histo_wsl.networks.backbones import build_backbone
from histo_wsl.networks.classifier import unwrap
from histo_wsl.networks.knn import FeatureBank, KNNRefiner
from histo_wsl.networks.maxmin import MAXMIN_HEAD_OPTS, MaxMinModel, maxmin_param_groups
from histo_wsl.training.config import TrainConfig
from histo_wsl.training.engine import VAL_ACC, VALPX_PXAP, Selection

__all__ = [
    "METHOD",
    "MaxMinTask",
    "check_maxmin_config",
    "mask_range",
    "maxmin_from_card",
    "with_mask_range",
    "sigma_at",
    "t_at",
    "train_maxmin",
]


def check_maxmin_config(cfg: TrainConfig, n_train: int | None = None) -> None:
    """Reject Max-Min settings that cannot work, before any data is read.

    ``n_train``: training images, once the data is known (``--refine knn`` needs 2); None: the
    data-independent checks only.

    Raises:
        InputError: the first bad value, named with its option and the valid range.
    """
    m = cfg.maxmin
    checks = [
        (
            m.maxmin_regularizer in REGULARIZERS,
            f"--maxmin-regularizer must be sem or eem (got {m.maxmin_regularizer!r})",
        ),
        (
            m.maxmin_lambda >= 0,
            f"--maxmin-lambda must be >= 0 (got {m.maxmin_lambda})",
        ),
        (m.maxmin_w > 0, f"--maxmin-w must be > 0 (got {m.maxmin_w})"),
        (
            0 < m.maxmin_cl_scale <= 1,
            f"--maxmin-cl-scale must be in (0, 1] (got {m.maxmin_cl_scale})",
        ),
        (
            0 <= m.maxmin_sigma < 1,
            f"--maxmin-sigma must be in [0, 1) (got {m.maxmin_sigma})",
        ),
        (
            m.maxmin_sigma_step >= 0,
            f"--maxmin-sigma-step must be >= 0 (got {m.maxmin_sigma_step})",
        ),
        (
            m.maxmin_sigma <= m.maxmin_sigma_max < 1,
            f"--maxmin-sigma-max must be in [--maxmin-sigma, 1) (got {m.maxmin_sigma_max})",
        ),
        (m.elb_t0 > 0, f"--elb-t0 must be > 0 (got {m.elb_t0})"),
        (
            m.elb_t_max >= m.elb_t0,
            f"--elb-t-max must be >= --elb-t0 (got {m.elb_t_max})",
        ),
        (m.elb_mult >= 1, f"--elb-mult must be >= 1 (got {m.elb_mult})"),
        (
            cfg.model.head in ("wgap", "wildcat"),
            f"--head {cfg.model.head}: Max-Min uses its own two WILDCAT heads; drop --head",
        ),
    ]
    checks += refine_checks(cfg, 2 if n_train is None else n_train, bank=cfg.knn.refine == "knn")
    for ok, message in checks:
        if not ok:
            raise InputError(message)


#: what a card's ``maxmin.window_range_from`` says
WINDOW_RANGE_NOTE = (
    "mean per-image min and max of the localizer's soft map M+ over the {n} train images "
    "{how} (histo_wsl.methods.maxmin.mask_range)"
)


def mask_range(
    model: MaxMinModel, images: torch.utils.data.Dataset, device: torch.device | str = "cpu"
) -> tuple[float, float]:
    """(lo, hi): the mean over ``images`` of each image's minimum and maximum of M+.

    The range normalises the mask of a slide's windows (:meth:`MaxMinModel.normalise`);
    :func:`histo_wsl.methods.base.mean_range` says how, and what it raises.
    """

    def soft(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.soft_map(x)[1]

    return mean_range(model, images, soft, "the localizer's map", device)


def range_card(lo: float, hi: float, n: int, how: str) -> dict:
    """The card's ``maxmin`` entries of a window range."""
    return {
        "window_range": [round(lo, 6), round(hi, 6)],
        "window_range_from": WINDOW_RANGE_NOTE.format(n=n, how=how),
    }


def with_mask_range(card: dict, state_dict: dict, data: str | Path, path: str | Path = "") -> dict:
    """``card`` with its Max-Min mask's window range measured on its training data.

    ``models export --mask-range``: the train split (the card's fold, split and seed) read as
    ``localize`` reads a slide (:func:`histo_wsl.methods.base.card_train_slides`), the weights
    of ``state_dict``.

    Raises:
        InputError: not a Max-Min model with a per-image (``minmax``) mask, a card without
            training settings, or unreadable data.
    """
    mm = card.get("maxmin") if card.get("method") == "maxmin" else None
    if not isinstance(mm, dict) or mm.get("mask") != "minmax":
        raise InputError(
            "--mask-range applies to stage-1 CAM models and to Max-Min models whose mask is "
            "min-max normalised per image; drop it for this model",
            path or None,
        )
    images, how = card_train_slides(card, data, path)
    model = maxmin_from_card(card, state_dict, path).eval()
    try:
        lo, hi = mask_range(model, images)
    except ValueError as exc:
        raise InputError(f"--mask-range: {exc}", path or None) from None
    return {**card, "maxmin": {**mm, **range_card(lo, hi, len(images), how)}}


def sigma_at(cfg: TrainConfig, epoch: int) -> float:
    """σ used during ``epoch`` (1-based; epoch 0 = before training uses σ0)."""
    m = cfg.maxmin
    return min(
        m.maxmin_sigma + max(epoch - 1, 0) * m.maxmin_sigma_step,
        m.maxmin_sigma_max,
    )


def t_at(cfg: TrainConfig, epoch: int) -> float:
    """Log-barrier t used during ``epoch`` (1-based)."""
    m = cfg.maxmin
    return min(m.elb_t0 * m.elb_mult ** max(epoch - 1, 0), m.elb_t_max)


class MaxMinTask:
    """Max-Min training for the engine (see the module docstring)."""

    selection = [
        Selection("best-loc.pt", (VALPX_PXAP, VAL_ACC)),
        Selection("best-cls.pt", (VAL_ACC,)),
    ]

    def __init__(self, cfg: TrainConfig, ds: Dataset) -> None:
        check_maxmin_config(cfg, len(ds.split("train")) if cfg.knn.refine == "knn" else None)
        self.cfg, self.ds = cfg, ds
        self.negative = ds.negative_class
        self.mask_mode = "minmax" if self.negative is None else "absolute"
        self.model: MaxMinModel | None = None
        self._seen_mpp: float | None = None
        #: builds the refiner's k-NN bank of the train split
        self._banks = TrainSplitBanks(ds, cfg, self.negative)
        #: the train split as slides show it, and the mask's range on it (``minmax``)
        self._slide_images: tuple[LabelledImages, str] | None = None
        self._range: dict = {}

    @property
    def refining(self) -> bool:
        """Whether the saved model's map is k-NN refined (``--refine knn``)."""
        return self.cfg.knn.refine == "knn"

    def build_model(self) -> nn.Module:
        """Shared backbone (ImageNet weights if ``pretrained``) with the two WILDCAT heads.

        With ``--refine knn`` also an empty refiner (keys: the backbone's last ``--knn-stages``).
        """
        backbone = build_backbone(self.cfg.model.backbone, self.cfg.model.pretrained)
        refiner = None
        if self.refining:
            stages = check_stages(self.cfg.knn.knn_stages, backbone)
            refiner = KNNRefiner(self.cfg.knn.knn_k, self.cfg.knn.refine_alpha, stages)
        self.model = MaxMinModel(
            backbone,
            len(self.ds.class_names),
            w=self.cfg.maxmin.maxmin_w,
            sigma=sigma_at(self.cfg, 1),
            mask_mode=self.mask_mode,
            negative_index=self.negative,
            cl_scale=self.cfg.maxmin.maxmin_cl_scale,
            refiner=refiner,
        )
        return self.model

    def refine_bank(self, m: MaxMinModel, device: torch.device) -> FeatureBank:
        """Training pixels (eval preset) valued by ``m``'s mask M, for its refiner.

        With ``--glass`` the bank also holds glass beside tissue valued 0
        (:func:`histo_wsl.methods.knn.with_glass`).
        """
        m.eval()
        return self._banks.build(
            m, lambda x, y, stages: torch.sigmoid(m.locate(x, stages)[1]), device, glass=True
        )

    def param_groups(self, model: nn.Module, lr: float) -> list[dict]:
        """Backbone base layers at ``lr``; deep layers and both heads at ``lr × ratio``."""
        return maxmin_param_groups(model, lr, self.cfg.optim.lr_classifier_ratio)

    def train_dataset(self) -> torch.utils.data.Dataset:
        """The ``train`` split with the training preset (as stage 1)."""
        return training_images(self.ds, self.cfg)

    def training_step(self, model: nn.Module, batch: dict, epoch: int) -> tuple[torch.Tensor, dict]:
        """The Max-Min loss of the batch at this epoch's σ and t."""
        unwrap(model).sigma.fill_(sigma_at(self.cfg, epoch))
        labels = batch["label"]
        out = model(batch["image"], branches=True)
        negative = labels == self.negative if self.negative is not None else None
        loss, stats = maxmin_loss(
            out,
            labels,
            lam=self.cfg.maxmin.maxmin_lambda,
            regularizer=self.cfg.maxmin.maxmin_regularizer,
            t=t_at(self.cfg, epoch),
            size=self.cfg.maxmin.maxmin_size,
            negative=negative,
        )
        acc = (out.pos_logits.argmax(1) == labels).float().mean()
        return loss, {**stats, "train_acc": 100.0 * float(acc)}

    def evaluate(self, model: nn.Module, device: torch.device) -> dict:
        """Accuracy of argmax C(X+) on val, PxAP of the map on valpx.

        With ``--refine knn`` the refiner's bank is first rebuilt from the current mask, the
        selection metric ``valpx_pxap`` is the blended map's, and ``valpx_pxap_mask`` the mask's.
        """
        m = unwrap(model)
        if self.refining:
            m.refiner.set_bank(self.refine_bank(m, device))
        if self.mask_mode == "minmax":
            if self._slide_images is None:
                self._slide_images = train_slide_view(self.ds, self.cfg, self._seen_mpp)
            images, how = self._slide_images
            try:
                lo, hi = mask_range(m, images, device)
                self._range = range_card(lo, hi, len(images), how)
            except ValueError:  # a flat map (an untrained localizer): per-window masks
                self._range = {}
        return evaluate_localizer(
            m,
            self.ds,
            device,
            self.cfg.data.crop_size,
            own_key="valpx_pxap_mask" if self.refining else None,
            scale=image_scale(self.ds, self.cfg),
        )

    def card(self) -> dict:
        """The model card (DESIGN.md §3), with the Max-Min settings under ``maxmin``."""
        cfg = self.cfg
        sigma = float(self.model.sigma) if self.model is not None else cfg.maxmin.maxmin_sigma
        refiner = self.model.refiner if self.model is not None else None
        return {
            "method": "maxmin",
            "stage": 1,
            "backbone": cfg.model.backbone,
            "head": "wildcat",
            "head_opts": dict(MAXMIN_HEAD_OPTS),
            "num_classes": len(self.ds.class_names),
            "class_names": list(self.ds.class_names),
            "negative_class": cfg.data.negative_class,
            "input_size": cfg.data.crop_size,
            "resize_size": cfg.data.resize_size,
            "geometry": cfg.data.geometry,
            "glass": cfg.data.glass,
            "data_mpp": cfg.data.data_mpp,
            "mpp": self._seen_mpp,
            "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
            "threshold": 0.5,
            "maxmin": {
                "mask": self.mask_mode,
                "negative_index": self.negative,
                "w": cfg.maxmin.maxmin_w,
                "sigma": round(sigma, 6),
                "cl_scale": cfg.maxmin.maxmin_cl_scale,
                "regularizer": cfg.maxmin.maxmin_regularizer,
                "lambda": cfg.maxmin.maxmin_lambda,
                "size_constraint": cfg.maxmin.maxmin_size,
                "size_unit": "fraction of the image",
                "elb": {
                    "t0": cfg.maxmin.elb_t0,
                    "t_max": cfg.maxmin.elb_t_max,
                    "mult": cfg.maxmin.elb_mult,
                },
                **self._range,
            },
            "refine": refine_card(
                cfg,
                len(refiner) if refiner is not None and refiner.ready else None,
                "the localizer's mask M on the train split (eval preset)",
            ),
            "training_data": self.ds.describe(),
            "config": plain_config(cfg),
            "versions": {"histo-wsl": __version__, "torch": str(torch.__version__)},
        }

    def on_epoch_end(self, epoch: int) -> None:
        """Move σ to the next epoch's value (the checkpoint of this epoch carries it)."""
        if self.model is not None:
            self.model.sigma.fill_(sigma_at(self.cfg, epoch + 1))

    def state_dict(self) -> dict:
        """Schedules are functions of the epoch; recorded for information only."""
        return {"sigma": float(self.model.sigma) if self.model is not None else None}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore: σ is a model buffer and t a function of the epoch."""


def train_maxmin(
    cfg: TrainConfig, *, resume: bool = False, quiet: bool = False, argv: list[str] | None = None
) -> dict:
    """Run ``train-classifier --method maxmin``: check settings and data, then train.

    Returns:
        The engine's summary plus the dataset description and any skipped files.
    """
    from histo_wsl.training.engine import fit

    check_maxmin_config(cfg)
    ds = load_training_data(cfg)
    if cfg.data.data_mpp is None:
        cfg.data.data_mpp = ds.data_mpp
    task = MaxMinTask(cfg, ds)
    task._seen_mpp = seen_mpp(ds, cfg.data.data_mpp, cfg.data.resize_size)
    summary = fit(cfg, task, resume=resume, quiet=quiet, argv=argv)
    return {**summary, "data": ds.describe(), "skipped_files": ds.skipped_files, "notes": ds.notes}


def maxmin_from_card(card: dict, state_dict: dict, path: str | Path) -> nn.Module:
    """The Max-Min network a card describes, with ``state_dict`` (σ and w included) loaded."""
    try:
        mm = card["maxmin"]
        model = MaxMinModel(
            build_backbone(card["backbone"], pretrained=False),
            int(card["num_classes"]),
            w=float(mm["w"]),
            sigma=float(mm["sigma"]),
            mask_mode=mm["mask"],
            negative_index=mm.get("negative_index"),
            head_opts=card.get("head_opts"),
            cl_scale=float(mm.get("cl_scale", 1.0)),  # cards before cl_scale: full size
            refiner=refiner_from_card(card, path),
        )
        if mm.get("window_range") is not None:
            lo, hi = (float(v) for v in mm["window_range"])
            if not hi > lo:
                raise ValueError(f"window_range {lo:g}..{hi:g} is empty")
            model.window_range = (lo, hi)
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(
            f"the Max-Min model card is incomplete or invalid ({exc}); retrain it", path
        ) from None
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise InputError(
            f"weights do not fit the {card['backbone']} Max-Min network its card describes "
            f"({str(exc).splitlines()[0][:120]}...)",
            path,
        ) from None
    return model


def map_description(card: dict, map_class: str) -> str:
    """The localizer's mask M, in words (class-agnostic: ``map_class`` does not apply)."""
    refined = refined_words(card)
    if (card.get("maxmin") or {}).get("mask") == "absolute":
        return (
            f"Max-Min localizer mask M = sigmoid(w·foreground log-odds){refined} (class-agnostic)"
        )
    per = "per-image min-max"
    if (card.get("maxmin") or {}).get("window_range") is not None:
        per += " (a slide's windows: by the training images' range)"
    return f"Max-Min localizer mask M = sigmoid(w·(M̃ − σ)), M̃ {per}{refined}"


#: Max-Min uncertainty (``train-classifier --method maxmin``) as a
#: :class:`~histo_wsl.methods.base.Method`
METHOD = Method(
    name="maxmin",
    command="train-classifier",
    has_cam=False,
    train=train_maxmin,
    from_card=maxmin_from_card,
    map_description=map_description,
)
