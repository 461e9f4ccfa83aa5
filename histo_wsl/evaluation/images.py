"""``histo-wsl evaluate``: the papers' metrics of one or more models on images with ground truth.

For each model, one streaming pass over the images (nothing but meters, one row of numbers per
image, one small JPEG thumbnail per image and the few best and worst images for the report is
kept; per-image score histograms for the bootstrap go to a temporary file in the output folder):

- **PxAP** (dataset level, method.md §4.1) with :class:`~histo_wsl.evaluation.metrics.PxAPMeter`;
- dataset-level **Dice / IoU** of foreground and background (§4.2) at three thresholds: the card's
  (the calibrated one when the card was calibrated), ``--threshold``, and the threshold that
  maximises mIoU on this very set, named ``best_threshold (optimistic)`` because it is tuned on
  the pixels it is scored on;
- per-image **F1+ / F1-** at 0.5, averaged over images (Max-Min TMI protocol, §2.3) with
  :class:`~histo_wsl.evaluation.metrics.PerImageMeter`: F1+ over images with a region of interest only,
  F1- over images with some background;
- image-level **accuracy / error**, confusion matrix and per-class numbers (§4.3);
- percentile **bootstrap 95 % confidence intervals** over images (``--bootstrap N``, seeded).

Images without a region of interest (the negative class: a normal patch) count as the papers count
them: in PxAP and the dataset-level Dice they only add negative pixels (their foreground is false
positive), they are left out of the F1+ mean and kept in the F1- mean. An image of the negative
class without a mask file is taken as all background.

Protocols (how maps meet masks):

- ``resize`` (default; NEGEV and :func:`histo_wsl.methods.cam.evaluate_maps`): the image is resized to
  the card's ``input_size`` square, the map is computed there, and the mask is resized to the same
  square with nearest neighbour;
- ``native`` (Max-Min's test protocol): the same input, but the map is resized bilinearly back to
  the image's own size and compared with the mask at full resolution.

The map is that of the ground-truth class by default (``--map-class gt``, the papers' protocol and
the validation of ``train-classifier``), or of the predicted class (``predicted``, what
``localize`` outputs). NEGEV models give the decoder's foreground probability either way.

The settings and the image selection are :mod:`histo_wsl.evaluation.data`, the streaming meters
:mod:`histo_wsl.evaluation.accumulator`, the calibrated checkpoint
:mod:`histo_wsl.evaluation.calibration`, and the files :mod:`histo_wsl.reporting.metrics_file`.

``--calibrate`` picks the threshold maximising the dataset-level mIoU (mean of the foreground and
background IoU, NEGEV's criterion, §4.2) on the evaluated set and writes a new checkpoint
``<stem>.calibrated.pt`` whose card carries it (``localize`` then uses it).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from histo_wsl import __version__
from histo_wsl.errors import InputError
from histo_wsl.evaluation.accumulator import (
    OVERLAP_KEYS,
    Accumulator,
    ModelResult,
    map_description,
)
from histo_wsl.evaluation.calibration import (
    CALIBRATION_CRITERION,
    calibrated_checkpoint,
    calibrated_path,
    card_threshold,
)
from histo_wsl.evaluation.data import (
    PROTOCOLS,
    EvalData,
    EvalImages,
    EvalSettings,
    collate,
    select_data,
)
from histo_wsl.evaluation.metrics import (
    THRESHOLDS,
)
from histo_wsl.methods import get_method
from histo_wsl.reporting.metrics_file import (
    DEFINITIONS,
    card_threshold_name,
    headline,
    round_curve,
    snap,
    write_per_image_csv,
)
from histo_wsl.reporting.report import fit_size, resize_array
from histo_wsl.runtime import atomic
from histo_wsl.runtime.console import stderr_console, warn
from histo_wsl.runtime.record import RunRecord, json_ready, now, versions

__all__ = ["evaluate_model", "run_evaluate"]


# --------------------------------------------------------------------------------------------------
# settings and data
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# the streaming pass
# --------------------------------------------------------------------------------------------------


def evaluate_model(
    predictor: Any,
    data: EvalData,
    settings: EvalSettings,
    device: Any,
    work_dir: Path,
    *,
    name: str | None = None,
    quiet: bool = False,
) -> ModelResult:
    """Evaluate one loaded model on the images in one streaming pass.

    Args:
        predictor: a :class:`~histo_wsl.inference.predictor.Predictor`.
        data: the images (from :func:`select_data`).
        settings: protocol, thresholds, bootstrap, examples...
        device: torch device.
        work_dir: folder for the temporary per-image histograms (the output folder).
        name: the model's display name (default: the checkpoint's stem).
        quiet: no progress bar.

    Returns:
        The model's numbers, per-image rows, curves and example images.
    """
    import torch
    import torch.nn.functional as F  # noqa: N812

    card = predictor.card
    name = name or predictor.path.stem
    size = int(card.get("input_size", 224))
    norm = card.get("normalization") or {}
    mean = norm.get("mean", [0.485, 0.456, 0.406])
    std = norm.get("std", [0.229, 0.224, 0.225])
    class_names = data.class_names
    t_card = card_threshold(card)
    thresholds = {"card": snap(t_card), "user": snap(settings.threshold)}
    acc = Accumulator(
        name,
        class_names,
        thresholds,
        card_threshold_name(card),
        examples=settings.examples,
        bootstrap=settings.bootstrap,
        seed=settings.seed,
        work_dir=work_dir,
    )
    dataset = EvalImages(data.samples, size, mean, std, settings.protocol)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=settings.batch_size,
        num_workers=settings.workers,
        collate_fn=collate,
    )
    predictor.to(device)
    native = settings.protocol == "native"
    t0 = time.perf_counter()
    try:
        for batch in _progress(loader, quiet, f"evaluate {name}", len(data.samples)):
            images = batch["image"].to(device)
            labels = batch["label"]
            classes = labels.to(device) if settings.map_class == "gt" else None
            logits, maps = predictor.predict(images, classes)
            maps = maps.float().cpu().clamp_(0.0, 1.0)
            probs = torch.softmax(logits.float().cpu(), dim=1).numpy()
            pixels = _unnormalise(batch["image"], mean, std)
            for j, idx in enumerate(batch["index"]):
                label, pred = int(labels[j]), int(np.argmax(probs[j]))
                gt = batch["mask"][j].astype(bool)
                score = maps[j]
                if score.shape != gt.shape:  # native protocol: back to the image size
                    score = F.interpolate(
                        score[None, None], size=gt.shape, mode="bilinear", align_corners=False
                    )[0, 0].clamp_(0.0, 1.0)
                image_name = data.name(data.samples[idx])
                thumb, thumb_mask, thumb_image = _thumbnail_arrays(
                    pixels[j], maps[j].numpy(), gt, _image_size(data.samples[idx].image, gt, native)
                )
                acc.add(
                    idx,
                    image_name,
                    score.numpy(),
                    gt,
                    label,
                    pred,
                    extra={
                        "p_label": round(float(probs[j, label]), 6),
                        "p_predicted": round(float(probs[j, pred]), 6),
                    },
                    thumbnail=thumb,
                    thumbnail_mask=thumb_mask,
                    thumbnail_image=thumb_image,
                )
        seconds = time.perf_counter() - t0
        metrics, curves, best_t = acc.summarise()
    finally:
        acc.close()
    metrics.update(
        {
            "name": name,
            "checkpoint": str(predictor.path),
            "method": card.get("method"),
            "backbone": card.get("backbone"),
            "head": card.get("head"),
            "cam_method": card.get("cam_method")
            if get_method(card.get("method")).has_cam
            else None,
            "tta": card.get("tta", "none"),
            "map": map_description(card, settings.map_class),
            "input_size": size,
            "class_names": list(card.get("class_names", class_names)),
            "seconds": round(seconds, 3),
            "images_per_second": round(len(acc.rows) / seconds, 2) if seconds > 0 else None,
        }
    )
    return ModelResult(
        name,
        predictor.path,
        card,
        metrics,
        acc.rows,
        curves,
        acc.examples(),
        best_t,
        thumbnails=acc.thumbnails,
    )


def _unnormalise(images: Any, mean: list, std: list) -> np.ndarray:
    """The network's input batch (B, 3, S, S), normalised, back to (B, S, S, 3) uint8 pixels."""
    x = images.float().permute(0, 2, 3, 1).numpy()
    rgb = (x * np.asarray(std, np.float32) + np.asarray(mean, np.float32)) * 255 + 0.5
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _image_size(path: Path, gt: np.ndarray, native: bool) -> tuple[int, int]:
    """The image's own (width, height): its mask's under the native protocol, else its header's."""
    if native:
        return gt.shape[1], gt.shape[0]
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except Exception:  # the thumbnail is decoration: the mask's (the network's) square then
        return gt.shape[1], gt.shape[0]


def _thumbnail_arrays(
    pixels: np.ndarray, score: np.ndarray, gt: np.ndarray, image_size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The map, the ground truth and the image as the report shows them.

    At the image's own aspect ratio (``image_size``), the longest side that of the network's
    square input (what the map resolves): the report's grids never squash an image.

    Args:
        pixels: (S, S, 3) uint8, the network's input.
        score: (S, S) map in [0, 1].
        gt: the ground truth (at S × S, or at the image's size).
        image_size: the image's (width, height).

    Returns:
        (map uint8 0-255, mask bool, image uint8), each at the thumbnail size.
    """
    tsize = fit_size(image_size[0], image_size[1], max(pixels.shape[:2]))
    thumb = resize_array((score * 255 + 0.5).astype(np.uint8), tsize)
    return thumb, resize_array(gt.astype(bool), tsize, nearest=True), resize_array(pixels, tsize)


def _progress(loader: Any, quiet: bool, description: str, total: int):
    if quiet:
        yield from loader
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn(description),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=stderr_console(),
        transient=True,
    ) as bar:
        task = bar.add_task("images", total=total)
        for batch in loader:
            yield batch
            bar.advance(task, len(batch["index"]))


# --------------------------------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------------


def _display_names(models: list[Path]) -> list[str]:
    from histo_wsl.registry.registry import display_stem

    stems = [display_stem(m) for m in models]
    out = []
    for m, stem in zip(models, stems, strict=True):
        if stems.count(stem) > 1:
            out.append(f"{m.parent.name}/{stem}")
        else:
            out.append(stem)
    if len(set(out)) < len(out):  # the same file twice, or same folder names
        out = [f"{i + 1}:{n}" for i, n in enumerate(out)]
    return out


def run_evaluate(
    settings: EvalSettings, *, argv: list[str] | None = None, quiet: bool = False
) -> dict:
    """Run ``histo-wsl evaluate`` on images: metrics.json, per_image.csv, report.md/.html, run.json.

    Args:
        settings: what to evaluate and how.
        argv: the command line (recorded).
        quiet: no progress bars.

    Returns:
        A JSON-ready summary: output files, and per model the headline numbers.

    Raises:
        InputError: unusable settings, checkpoints or data (see :func:`select_data`), models with
            different classes, or a calibrated checkpoint that exists already.
    """
    from histo_wsl.reporting import report
    from histo_wsl.training.engine import resolve_device

    settings.check()
    out = atomic.ensure_writable_dir(settings.out)  # before the evaluation, not after it
    record = RunRecord(
        out / "run.json",
        "evaluate",
        params=settings.as_dict(),
        argv=argv,
        seed=settings.seed,
        machine=versions(),
    )
    predictors, classes = _load_models(settings)
    targets = _calibration_targets(settings, out)
    negative = settings.negative_class
    if negative is None:
        negative = predictors[0].card.get("negative_class")
    data = select_data(
        settings.data,
        classes,
        split=settings.split,
        fold=settings.fold,
        skip_missing=settings.skip_missing,
        negative_class=negative,
    )
    _warn_left_out(data)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"the output folder cannot be created ({exc})", out) from None
    device = resolve_device(settings.device)
    record.note(device=str(device))
    names = _display_names([Path(m) for m in settings.models])
    results = [
        evaluate_model(predictor, data, settings, device, out, name=name, quiet=quiet)
        for predictor, name in zip(predictors, names, strict=True)
    ]
    calibrations = [
        _calibrate(res, target, data, settings)
        for res, target in zip(results, targets, strict=False)
    ]

    metrics = {
        **{k: v for k, v in record.header.items() if k not in ("seed", "device")},
        "ended": now(),
        "seconds": record.seconds(),
        "data": {
            **data.info,
        },
        "protocol": {"name": settings.protocol, "description": PROTOCOLS[settings.protocol]},
        "definitions": DEFINITIONS,
        "threshold_grid": [round(float(t), 3) for t in THRESHOLDS],
        "bootstrap": {
            "n": settings.bootstrap,
            "seed": settings.seed,
            "confidence": 0.95,
            "unit": "image",
        },
        "models": [_model_entry(res) for res in results],
    }
    metrics = json_ready(metrics)
    atomic.write_json(out / "metrics.json", metrics)
    write_per_image_csv(out / "per_image.csv", [r.rows for r in results])
    files = report.write_reports(out, metrics, results)
    summary = {
        "out": str(out),
        "files": {
            "metrics": str(out / "metrics.json"),
            "per_image": str(out / "per_image.csv"),
            **{k: str(v) for k, v in files.items()},
        },
        "calibrated_checkpoints": calibrations,
        "data": {k: data.info[k] for k in ("source", "split", "n_images")},
        "models": [headline(m) for m in metrics["models"]],
        "seconds": record.seconds(),
    }
    items = [
        {"name": m["name"], "path": m["checkpoint"], "status": "done", "seconds": m["seconds"]}
        for m in metrics["models"]
    ]
    record.write(ended=True, items=items, outputs=summary["files"])
    return summary


def _load_models(settings: EvalSettings) -> tuple[list, list[str]]:
    """The models to evaluate and their (common) class names.

    Raises:
        InputError: a card without class names, or models trained on different classes.
    """
    from histo_wsl.inference.predictor import load_model

    predictors = [
        load_model(m, cam_method=settings.cam_method, tta=settings.tta) for m in settings.models
    ]
    classes = list(predictors[0].card.get("class_names") or [])
    if not classes:
        raise InputError("the model card has no class_names", settings.models[0])
    for p in predictors[1:]:
        if list(p.card.get("class_names") or []) != classes:
            raise InputError(
                f"the models have different classes ({p.card.get('class_names')} vs {classes}); "
                "compare models trained on the same classes",
                p.path,
            )
    return predictors, classes


def _calibration_targets(settings: EvalSettings, out: Path) -> list[Path]:
    """Where ``--calibrate`` writes each model's calibrated copy (none may exist yet)."""
    if not settings.calibrate:
        return []
    targets: list[Path] = []
    taken: set[str] = set()
    for m in settings.models:
        target = calibrated_path(Path(m), out, taken)
        if target.exists():
            raise InputError(
                "the calibrated checkpoint exists already and is never overwritten; remove "
                "it or choose another --out",
                target,
            )
        targets.append(target)
    return targets


def _warn_left_out(data: EvalData) -> None:
    """One warning per kind of image ``--skip-missing`` left out."""
    if data.info["skipped_missing_masks"]:
        warn(
            f"{len(data.info['skipped_missing_masks'])} image(s) without a mask left out "
            "(--skip-missing); listed in metrics.json"
        )
    for name, sizes in data.info["skipped_mask_size_mismatch"].items():
        (iw, ih), (mw, mh) = sizes["image"], sizes["mask"]
        warn(f"{name}: left out (--skip-missing): its mask is {mw}x{mh} px, the image {iw}x{ih}")


def _calibrate(res: ModelResult, target: Path, data: EvalData, settings: EvalSettings) -> str:
    """Write the model's copy at its mIoU-best threshold (``--calibrate``); returns its path."""
    at_best = res.metrics["localization"]["at_threshold"]["best"]
    calibration = {
        "set": f"{data.info['source']} [{data.info['split']}, {data.info['n_images']} images]",
        "criterion": f"{CALIBRATION_CRITERION} (dataset-level mean of foreground and "
        "background IoU over the 0.001 threshold grid)",
        "value": at_best["miou"]["value"],
        "threshold": res.best_threshold,
        "previous_threshold": res.card.get("threshold"),
        "protocol": settings.protocol,
        "map": res.metrics["map"],
        "date": now(),
        "histo-wsl": __version__,
    }
    calibrated_checkpoint(
        res.path,
        target,
        res.best_threshold,
        calibration,
        cam_method=settings.cam_method,
        tta=res.card.get("tta"),
    )
    res.metrics["calibration"] = {**calibration, "checkpoint": str(target)}
    return str(target)


def _model_entry(res: ModelResult) -> dict:
    """One model's entry of metrics.json: its metrics and its curves on the threshold grid."""
    return {
        **res.metrics,
        "curves": {
            "thresholds": "threshold_grid",
            **{k: round_curve(res.curves[k]) for k in ("precision", "recall")},
            **{k: round_curve(res.curves[k]) for k in OVERLAP_KEYS},
        },
    }
