"""What every weakly-supervised method shares: the method interface, its training data, its validation.

A method (:mod:`histo_wsl.methods`) is a :class:`Method`: its name (the card's ``method``), the
command that trains it, whether its map is a class activation map, how to train it, how to
rebuild its network from a card, and how to describe its map in a report. The helpers below are
the steps the methods' training tasks have in common: reading and checking the data,
the training images, the µm/px the network saw, and the validation loop of every method
(:func:`evaluate_maps`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import median

import torch
from PIL import Image
from torch import nn

from histo_wsl.data.images import LabelledImages, check_samples, eval_transform, train_transform
from histo_wsl.data.sources import Dataset, Sample, load_samples
from histo_wsl.errors import InputError
from histo_wsl.evaluation.metrics import ClassificationMeter, PxAPMeter
from histo_wsl.runtime.console import warn
from histo_wsl.training.config import TrainConfig

__all__ = [
    "GEOMETRIES",
    "Method",
    "MapFn",
    "evaluate_localizer",
    "evaluate_maps",
    "image_scale",
    "load_training_data",
    "plain_config",
    "seen_mpp",
    "training_images",
]


@dataclass(frozen=True)
class Method:
    """One weakly-supervised localization method, as the commands see it.

    Attributes:
        name: the model card's ``method`` (``cam``, ``negev``, ``maxmin``).
        command: the subcommand that trains it (``train-classifier`` or ``train-decoder``).
        has_cam: its map is a class activation map of a chosen class (``--cam`` applies, the map
            of the ground-truth or predicted class); False: a class-agnostic foreground map
            (``model.localize(x)`` gives the class logits and the map).
        train: ``train(cfg, *, resume, quiet, argv) -> summary``.
        from_card: ``from_card(card, state_dict, path) -> nn.Module``, the weights loaded
            strictly (raises :class:`~histo_wsl.errors.InputError` on a card or weights that do
            not fit).
        map_description: ``map_description(card, map_class) -> str``, the map in words for
            reports (``map_class``: ``gt`` or ``pred``, for class maps).
    """

    name: str
    command: str
    has_cam: bool
    train: Callable[..., dict]
    from_card: Callable[[dict, dict, Path], nn.Module]
    map_description: Callable[[dict, str], str]


def refined_words(card: dict) -> str:
    """``, k-NN refined (α …, k …)`` when the card's map is k-NN refined, else empty."""
    refine = card.get("refine") or {}
    if refine.get("method") != "knn":
        return ""
    return f", k-NN refined (α {refine.get('alpha')}, k {refine.get('k')})"


#: how training images are resized (``--geometry``; see :func:`image_scale`)
GEOMETRIES = ("squash", "isotropic")

#: a map function: (model, images (B,3,H,W), labels (B,)) -> (logits (B,K), maps (B,H,W) in [0,1])
MapFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def load_training_data(cfg: TrainConfig) -> Dataset:
    """Read and check the dataset of ``cfg`` (bad files raise unless ``skip_errors``).

    Files left out with ``skip_errors`` are warned about and kept in ``skipped_files``.

    Raises:
        InputError: a crop larger than the resized image, or a bad dataset.
    """
    if cfg.data.geometry not in GEOMETRIES:
        raise InputError(f"--geometry {cfg.data.geometry!r}: use one of {', '.join(GEOMETRIES)}")
    if cfg.data.geometry == "isotropic" and cfg.run.data_on_device:
        raise InputError(
            "--data-on-device keeps square images on the device; it does not take "
            "--geometry isotropic (images of their own aspect ratio): drop one of them"
        )
    if cfg.data.glass and cfg.run.data_on_device:
        raise InputError(
            "--data-on-device augments on the device without glass margins; it does not take "
            "--glass: drop one of them"
        )
    if cfg.data.crop_size > cfg.data.resize_size:
        raise InputError(
            f"--crop-size {cfg.data.crop_size} is larger than --resize-size {cfg.data.resize_size}: the "
            "random training crop must fit in the resized image"
        )
    ds = load_samples(
        cfg.data.path,
        classes=cfg.data.classes,
        negative_class=cfg.data.negative_class,
        fold=cfg.data.fold,
        val_fraction=cfg.data.val_fraction,
        seed=cfg.run.seed,
    )
    good, dropped = check_samples(ds.samples, skip_errors=cfg.run.skip_errors)
    ds.samples, ds.skipped_files = good, dropped
    for message in dropped:
        warn(f"left out (--skip-errors): {message}")
    return ds


def training_images(ds: Dataset, cfg: TrainConfig) -> LabelledImages:
    """The ``train`` split with the training preset (resize, random crop, flips, colour jitter)."""
    return LabelledImages(
        ds.split("train"),
        cfg.data.resize_size,
        train_transform(cfg.data.crop_size, jitter=cfg.data.color_jitter, glass=cfg.data.glass),
        scale=image_scale(ds, cfg),
    )


def _median_side(ds: Dataset) -> float | None:
    """Median of the mean image side over the first 64 images (their headers read once)."""
    return _median_side_of(tuple(str(s.image) for s in ds.samples[:64]))


@functools.lru_cache(maxsize=8)
def _median_side_of(images: tuple[str, ...]) -> float | None:
    # image_scale is asked at every evaluation and bank build: the headers are read once
    sides = []
    for image in images:
        with Image.open(image) as im:
            sides.append((im.size[0] + im.size[1]) / 2)
    return median(sides) if sides else None


def image_scale(ds: Dataset, cfg: TrainConfig) -> float | None:
    """The ``isotropic`` geometry's resize factor (None: ``squash``, images resized to squares).

    resize side / median image side: the network then sees every image at the one resolution
    :func:`seen_mpp` records in the card (GlaS: 775×522 at 0.62 µm/px become 306×206 at
    1.57 µm/px, where ``squash`` made them 256×256, 1.88 µm/px across and 1.26 down).
    """
    if cfg.data.geometry != "isotropic":
        return None
    side = _median_side(ds)
    return cfg.data.resize_size / side if side else None


def seen_mpp(ds: Dataset, data_mpp: float | None, resize: int) -> float | None:
    """Resolution (µm/px) the network sees: data mpp × median image side / resize side.

    GlaS images (0.62 µm/px, 775×522) resized to 256×256 are seen at about 1.6 µm/px on average
    over both axes (1.88 across, 1.26 down); the card records this so ``localize`` reads slides at
    the resolution the model was trained on.
    """
    if data_mpp is None:
        return None
    side = _median_side(ds)
    return round(data_mpp * side / resize, 4) if side else None


def training_split(card: dict, data: str | Path, path: str | Path) -> tuple[TrainConfig, Dataset]:
    """The checkpoint's training settings and its data read again (the card's fold, split, seed)."""
    if not isinstance(card.get("config"), dict):
        raise InputError("the model card records no training settings (config)", path or None)
    cfg = TrainConfig.from_flat(card["config"])
    ds = load_samples(
        data,
        classes=card.get("class_names"),
        negative_class=card.get("negative_class"),
        fold=cfg.data.fold,
        val_fraction=cfg.data.val_fraction,
        seed=cfg.run.seed,
    )
    return cfg, ds


def card_train_slides(
    card: dict, data: str | Path, path: str | Path = ""
) -> tuple[LabelledImages, str]:
    """A checkpoint's train split read again from ``data`` as ``localize`` reads a slide.

    The card's fold, split and seed (:func:`training_split`), at its ``data_mpp / mpp``
    (:func:`slide_view`); and that in words.
    """
    _, ds = training_split(card, data, path)
    return slide_view(
        ds.split("train"), int(card["input_size"]), card.get("data_mpp"), card.get("mpp")
    )


def mean_range(
    model: nn.Module,
    images: torch.utils.data.Dataset,
    map_of: Callable[[torch.Tensor], torch.Tensor],
    what: str,
    device: torch.device | str = "cpu",
) -> tuple[float, float]:
    """(lo, hi): the mean over ``images`` of each image's minimum and maximum of ``map_of``.

    ``images``: items with a normalised ``image`` (3,H,W), one call each (sizes may differ), with
    ``model`` in eval mode (its mode is restored after). The range that normalises the maps of a
    slide's windows (Max-Min's mask, a stage-1 CAM), where each window's own minimum and maximum
    would stretch a window without the region of interest to [0, 1].

    Raises:
        ValueError: no image, or a range the card's six decimals cannot tell from empty (a flat
            map on every image: an untrained model).
    """
    if len(images) == 0:
        raise ValueError(f"measuring the range of {what} needs at least one image")
    lows, highs = [], []
    was_training = model.training
    model.eval()
    for i in range(len(images)):
        m = map_of(images[i]["image"][None].to(device))
        lows.append(float(m.amin()))
        highs.append(float(m.amax()))
    model.train(was_training)
    lo, hi = sum(lows) / len(lows), sum(highs) / len(highs)
    if not hi - lo > 1e-6 * max(1.0, abs(lo), abs(hi)):
        raise ValueError(f"{what} is flat on every image (range {lo:.4g}..{hi:.4g})")
    return lo, hi


def train_slide_view(
    ds: Dataset, cfg: TrainConfig, mpp: float | None
) -> tuple[LabelledImages, str]:
    """A run's ``train`` split as a slide shows it (:func:`slide_view` at the run's µm/px)."""
    return slide_view(ds.split("train"), cfg.data.crop_size, cfg.data.data_mpp, mpp)


def slide_view(
    samples: list[Sample], crop_size: int, data_mpp: float | None, mpp: float | None
) -> tuple[LabelledImages, str]:
    """``samples`` as ``localize`` shows them on a slide, and that in words.

    Read at ``data_mpp / mpp`` with their aspect kept (evaluation transform), or at the evaluation
    preset (resized to ``crop_size``) when either µm/px is unknown.
    """
    if data_mpp and mpp:
        scale: float | None = float(data_mpp) / float(mpp)
        how = f"read at {float(mpp):g} µm/px with their aspect kept, as localize reads a slide"
    else:
        scale, how = None, f"resized to {crop_size}² (the evaluation preset)"
    return LabelledImages(samples, crop_size, eval_transform(), scale=scale), how


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
    scale: float | None = None,
) -> dict:
    """Accuracy on ``samples`` and PxAP / Dice at 0.5 on ``valpx`` (maps at ``size``²).

    PxAP follows method.md §4.1: maps of the ground-truth class, masks resized nearest to
    ``size``², dataset-level histograms over 1000 thresholds. With ``scale`` (the isotropic
    geometry) images and masks are resized by it instead, one image per batch.
    """
    model.eval()
    out: dict = {}
    if scale is not None:
        batch_size = 1  # images of their own sizes

    def images(items: list[Sample]) -> LabelledImages:
        return LabelledImages(items, size, eval_transform(), scale=scale)

    if samples:
        cls = ClassificationMeter(num_classes)
        loader = torch.utils.data.DataLoader(images(samples), batch_size=batch_size)
        for b in loader:
            logits = model(b["image"].to(device))
            cls.update(logits.float().cpu(), b["label"])
        out["val_acc"] = float(cls.accuracy())
    if valpx:
        px = PxAPMeter()
        loader = torch.utils.data.DataLoader(images(valpx), batch_size=batch_size)
        for b in loader:
            _, maps = map_fn(model, b["image"].to(device), b["label"].to(device))
            maps = maps.float().cpu()
            for m, gt in zip(maps, b["mask"], strict=True):
                px.update(m.numpy(), gt.numpy() == 1)
        out["valpx_pxap"] = float(px.pxap())
        out["valpx_dice_fg@0.5"] = float(px.dice_iou(0.5)["dice_fg"])
    return out


def evaluate_localizer(
    model: nn.Module,
    ds: Dataset,
    device: torch.device,
    size: int,
    own_key: str | None = None,
    scale: float | None = None,
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
        scale=scale,
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
            scale=scale,
        )
        metrics[own_key] = own["valpx_pxap"]
    return metrics


def plain_config(cfg: TrainConfig) -> dict:
    """The settings as plain YAML/JSON values (paths as strings), for the model card."""
    d = cfg.to_flat()
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}
