"""``histo-wsl evaluate --predictions LOCALIZE_OUT --annotations ANN``: slide maps against annotations.

Each slide finished by ``localize`` (``<out>/<slide>/<slide>.json`` with status ``done`` and
``<slide>.prob.tif``) is matched with its annotation (a file of ``--annotations``, or the one file
given; see :func:`histo_wsl.slideio.annotations.find_annotation`), and the two are compared on the
probability map's own grid: level 0 of ``<slide>.prob.tif`` (uint8, value / 255), one pixel =
``output_downsample`` level-0 pixels, with the annotation rasterised on it (pixel centres inside
polygons). Slides are read one at a time, in bands of rows, so memory stays that of one map.

The numbers are those of image evaluation with a slide as the unit: PxAP over all slides' pixels,
dataset-level Dice/IoU at localize's threshold (``<slide>.json``), at ``--threshold`` and at the
best threshold (optimistic), per-slide F1+ / F1− at 0.5, slide-level detection (the slide is
positive when its annotation has a region; predicted positive when localize's predicted class is
the ROI class), bootstrap intervals over slides. Every pixel of the map counts, glass included
(localize writes 0 outside tissue), which raises the background numbers compared with patches.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histo_wsl.errors import InputError
from histo_wsl.evaluation.accumulator import Accumulator, Example, ModelResult
from histo_wsl.evaluation.metrics import THRESHOLDS, PxAPMeter
from histo_wsl.reporting.metrics_file import (
    DEFINITIONS,
    headline,
    round_curve,
    snap,
    write_per_image_csv,
)
from histo_wsl.runtime import atomic
from histo_wsl.runtime.console import warn
from histo_wsl.runtime.record import RunRecord, json_ready, now, versions
from histo_wsl.slideio.annotations import (
    ANNOTATION_SUFFIXES,
    annotation_mask,
    annotation_name,
    find_annotation,
)

__all__ = [
    "SlideEvalSettings",
    "find_predictions",
    "pair_slides_with_annotations",
    "run_evaluate_slides",
]

_BAND = 2048  # rows of the map compared at a time
_THUMB = 256  # long side of the report's thumbnail arrays (its JPEG thumbnails are smaller)


def find_predictions(folder: Path) -> list[tuple[str, Path, Path, dict]]:
    """The slides ``localize`` finished in ``folder``.

    Args:
        folder: a ``localize`` output folder (``<slide>/<slide>.json`` and ``.prob.tif`` per slide),
            or one slide's folder.

    Returns:
        ``(name, json path, prob.tif path, record)`` per finished slide, sorted by name.

    Raises:
        InputError: no finished slide in the folder, or a record that cannot be read.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError("predictions folder not found; give the --out folder of localize", folder)
    candidates = [folder] + sorted(p for p in folder.iterdir() if p.is_dir())
    found = []
    for d in candidates:
        record_path, prob = d / f"{d.name}.json", d / f"{d.name}.prob.tif"
        if not record_path.is_file():
            continue
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read the localize record ({exc})", record_path) from None
        if not isinstance(record, dict) or record.get("status") != "done":
            continue
        if not prob.is_file():
            raise InputError(f"{prob.name} is missing beside its record", record_path)
        found.append((d.name, record_path, prob, record))
    if not found:
        raise InputError(
            "no slide finished by localize here (expected <slide>/<slide>.json and "
            "<slide>/<slide>.prob.tif)",
            folder,
        )
    return found


def _read_prob(path: Path, shape: tuple[int, int] | None) -> np.ndarray:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            prob = tf.pages[0].asarray()
    except Exception as exc:  # tifffile raises many types on a bad file
        raise InputError(f"cannot read the probability map ({exc})", path) from None
    if prob.ndim != 2 or prob.dtype != np.uint8:
        raise InputError(
            f"is not a localize probability map (level 0 is {prob.dtype} {prob.shape})", path
        )
    if shape is not None and tuple(prob.shape) != tuple(shape):
        raise InputError(
            f"level 0 is {prob.shape[1]}x{prob.shape[0]} but its record says {shape[1]}x{shape[0]}",
            path,
        )
    return prob


def _localize_model(folder: Path) -> str | None:
    """The checkpoint localize used, from its run.json (None when unknown)."""
    try:
        run = json.loads((folder / "run.json").read_text(encoding="utf-8"))
        model = run.get("params", {}).get("model")
        return None if model is None else str(model)
    except (OSError, ValueError, AttributeError):
        return None


def _thumb(arr: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    from histo_wsl.reporting.report import resize_array

    return resize_array(arr, size, nearest=nearest)


def _slide_thumbnail(record: dict, size: tuple[int, int]) -> np.ndarray:
    """The slide's thumbnail when the slide is still where localize read it, else grey."""
    try:
        from histo_wsl.slideio.slide import open_slide, read_thumbnail

        with open_slide(record["path"], mpp=record.get("slide_mpp")) as slide:
            thumb, _ = read_thumbnail(slide, min_size=max(size), max_size=4 * max(size))
        return _thumb(thumb, size, nearest=False)
    except Exception:  # the thumbnail is decoration: any problem gives a grey panel
        return np.full((size[1], size[0], 3), 200, dtype=np.uint8)


@dataclass
class SlideEvalSettings:
    """What ``histo-wsl evaluate --predictions ... --annotations ...`` was asked.

    Attributes:
        predictions: the ``localize`` output folder.
        annotations: a folder of annotation files named after the slides, or one file (one slide).
        out: output folder.
        threshold: the threshold reported besides localize's and the best one.
        bootstrap: resamples over slides for the 95 % intervals (0: none).
        seed: seed of the bootstrap.
        skip_missing: leave out slides without an annotation instead of failing.
        examples: best and worst slides shown in the report (each).
        roi_classes: the annotation classes that are the ROI (``--roi-class``); None: the model's
            ROI class when an annotation has it, else every class but QuPath's ``Ignore*``.
    """

    predictions: Path
    annotations: Path
    out: Path
    threshold: float = 0.5
    bootstrap: int = 1000
    seed: int = 0
    skip_missing: bool = False
    examples: int = 4
    roi_classes: list[str] | None = None

    def params(self) -> dict:
        """The settings as recorded in metrics.json and run.json."""
        return {
            "predictions": str(self.predictions),
            "annotations": str(self.annotations),
            "out": str(self.out),
            "threshold": self.threshold,
            "bootstrap": self.bootstrap,
            "seed": self.seed,
            "skip_missing": self.skip_missing,
            "examples": self.examples,
            "roi_classes": self.roi_classes,
        }


#: one slide to evaluate: (name, its folder, its probability map, its localize record, annotation)
SlidePair = tuple[str, Path, Path, dict, Path]


def run_evaluate_slides(
    settings: SlideEvalSettings, argv: list[str] | None = None, quiet: bool = False
) -> dict:
    """Evaluate localize's slide maps against annotations; writes the same files as image evaluation.

    Writes metrics.json, per_image.csv, the reports and run.json in ``settings.out``.

    Returns:
        A JSON-ready summary.

    Raises:
        InputError: no finished slide, slides without annotation (unless ``skip_missing``),
            predictions and annotations without a slide in common, malformed annotations.
    """
    s = settings
    if not 0.0 <= s.threshold <= 1.0:
        raise InputError(f"--threshold {s.threshold} is not in [0, 1]")
    atomic.ensure_writable_dir(s.out)  # before the evaluation, not after it
    record = RunRecord(
        s.out / "run.json",
        "evaluate",
        params=s.params(),
        argv=argv,
        seed=s.seed,
        machine=versions(),
    )
    slides = find_predictions(Path(s.predictions))
    pairs, missing = pair_slides_with_annotations(slides, Path(s.annotations), s.skip_missing)
    try:
        s.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"the output folder cannot be created ({exc})", s.out) from None
    acc, roi = _slide_accumulator(pairs, s)
    t_eval = time.perf_counter()
    try:
        ann_notes = _accumulate(acc, pairs, roi, s)
        seconds = time.perf_counter() - t_eval
        metrics_m, curves, _ = acc.summarise()
    finally:
        acc.close()
    result = _slides_result(acc, pairs, metrics_m, curves, roi, seconds, s)
    metrics = _slides_metrics(s, record, pairs, missing, ann_notes, result, curves)
    return _write_slide_outputs(s, metrics, result, pairs, missing, record)


def pair_slides_with_annotations(
    slides: list[tuple[str, Path, Path, dict]], annotations: Path, skip_missing: bool
) -> tuple[list[SlidePair], list[str]]:
    """Each finished slide with its annotation file, and the slides left without one.

    ``annotations`` is a folder (files matched by slide name) or one file (the one slide, or the
    slide whose name it bears). Annotation files without a prediction are warned about.

    Raises:
        InputError: no annotation at all, no slide in common, or slides without an annotation
            (unless ``skip_missing``: they are returned in the second list).
    """
    if not annotations.exists():
        raise InputError(
            "annotations not found; give a folder of annotation files or a file", annotations
        )
    if annotations.is_file():
        pairs, missing = _pair_with_one_file(slides, annotations)
    else:
        pairs, missing = _pair_with_a_folder(slides, annotations)
    if missing and not skip_missing:
        raise InputError(
            f"no annotation for slide {missing[0]!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + "; add <slide>.geojson, .xml or a mask image (an empty FeatureCollection for a "
            "negative slide), or pass --skip-missing to leave such slides out",
            annotations,
        )
    return pairs, missing


def _pair_with_one_file(
    slides: list[tuple[str, Path, Path, dict]], annotation: Path
) -> tuple[list[SlidePair], list[str]]:
    missing: list[str] = []
    if len(slides) > 1:
        match = [s for s in slides if s[0] == annotation_name(annotation)]
        if not match:
            raise InputError(
                f"one annotation file for {len(slides)} slides, and its name matches none of "
                f"them ({', '.join(s[0] for s in slides[:5])}...); give a folder of "
                "<slide>.geojson / .xml / mask files",
                annotation,
            )
        missing = [s[0] for s in slides if s[0] != match[0][0]]
        slides = match + [s for s in slides if s[0] != match[0][0]]
    return [(*slides[0], annotation)], missing


def _pair_with_a_folder(
    slides: list[tuple[str, Path, Path, dict]], annotations: Path
) -> tuple[list[SlidePair], list[str]]:
    pairs: list[SlidePair] = []
    missing: list[str] = []
    for s in slides:
        ann = find_annotation(annotations, s[0])
        if ann is None:
            missing.append(s[0])
        else:
            pairs.append((*s, ann))
    if not pairs:
        files = sorted(
            p.name for p in annotations.iterdir() if p.suffix.lower() in ANNOTATION_SUFFIXES
        )
        raise InputError(
            "predictions and annotations share no slide: predicted "
            f"{', '.join(s[0] for s in slides[:5])}; annotation files "
            f"{', '.join(files[:5]) or 'none'} (names must be <slide>.geojson, .xml or a mask "
            "image such as <slide>_mask.tif)",
            annotations,
        )
    predicted = {s[0] for s in slides}
    orphans = sorted(
        p.name
        for p in annotations.iterdir()
        if p.is_file()
        and p.suffix.lower() in ANNOTATION_SUFFIXES
        and annotation_name(p) not in predicted
    )
    if orphans:
        warn(
            f"{len(orphans)} annotation file(s) have no localize prediction and were not "
            f"evaluated (e.g. {orphans[0]})"
        )
    return pairs, missing


def _slide_accumulator(pairs: list[SlidePair], s: SlideEvalSettings) -> tuple[Accumulator, str]:
    """The accumulator of the slides (localize's ROI class and threshold), and that class."""
    first = pairs[0][3]
    roi = str(first.get("roi_class") or "ROI")
    t_loc = float(first.get("threshold", 0.5))
    others = sorted({float(p[3].get("threshold", 0.5)) for p in pairs} - {t_loc})
    if others:
        warn(
            f"the slides were localized with different thresholds ({t_loc} and {others}); the "
            f"localize-threshold numbers use {t_loc}"
        )
    acc = Accumulator(
        Path(s.predictions).name or "predictions",
        [f"not {roi}", roi],
        {"card": snap(t_loc), "user": snap(s.threshold)},
        f"localize threshold (from {pairs[0][0]}.json)",
        examples=s.examples,
        bootstrap=s.bootstrap,
        seed=s.seed,
        work_dir=s.out,
    )
    return acc, roi


def _slide_prediction(record: dict, roi: str) -> int | None:
    """1 when localize predicted the ROI class for the slide, 0 when another; None without a label.

    A slide's label is whether its annotation has a region; it can be compared with the prediction
    only when the ROI class is one of the model's classes (a model whose ROI is ``ROI``, such as
    the benign/malignant GlaS model, predicts no ROI-or-not label: no accuracy then, not 0 %).
    """
    classes = (record.get("model") or {}).get("class_names") or []
    predicted = record.get("predicted_class")
    if roi not in classes or predicted is None:
        return None
    return int(predicted == roi)


def _accumulate(
    acc: Accumulator, pairs: list[SlidePair], roi: str, s: SlideEvalSettings
) -> dict[str, dict]:
    """Feed every slide's map and annotation to ``acc``, one slide in memory at a time.

    With each slide go its thumbnails (map, annotation, the slide itself, at most :data:`_THUMB`
    pixels long): the report's grid of every slide and its best and worst examples.

    Returns:
        Each slide's annotation notes.
    """
    ann_notes: dict[str, dict] = {}
    for i, (name, _, prob_path, record, ann_path) in enumerate(pairs):
        size = record.get("output_size")
        shape = (int(size[1]), int(size[0])) if size else None
        prob = _read_prob(prob_path, shape)
        h, w = prob.shape
        d = float(record.get("output_downsample") or 1.0)
        truth = annotation_mask(ann_path, (h, w), d, roi_classes=s.roi_classes, model_roi=roi)
        gt, ignore = truth.mask, truth.ignore
        ann_notes[name] = {"file": str(ann_path), **truth.notes}
        meter = PxAPMeter()
        for r in range(0, h, _BAND):
            band_ignore = None if ignore is None else ignore[r : r + _BAND]
            meter.update(prob[r : r + _BAND] / 255.0, gt[r : r + _BAND], band_ignore)
        scale = _THUMB / max(h, w)
        tsize = (max(1, round(w * scale)), max(1, round(h * scale)))
        acc.add_meter(
            i,
            name,
            meter,
            int(gt.any()),
            _slide_prediction(record, roi),
            extra={
                "p_label": None,
                "p_predicted": record.get("score"),
                "annotation": ann_path.name,
                "map_size": f"{w}x{h}",
                "level0_px_per_map_px": d,
            },
            thumbnail=_thumb(prob, tsize, nearest=False),
            thumbnail_mask=_thumb(gt.astype(np.uint8) * 255, tsize, nearest=True) > 127,
            thumbnail_image=_slide_thumbnail(record, tsize),
        )
        del prob, gt, ignore
    return ann_notes


def _slides_result(
    acc: Accumulator,
    pairs: list[SlidePair],
    metrics_m: dict,
    curves: dict,
    roi: str,
    seconds: float,
    s: SlideEvalSettings,
) -> ModelResult:
    """The predictions' result as one model's, with the slides' thumbnails and examples."""
    examples_list: list[Example] = acc.examples()
    first = pairs[0][3]
    model = first.get("model")
    model_path = (
        (model.get("path") if isinstance(model, dict) else model)
        or _localize_model(Path(s.predictions))
        or "localize"
    )
    metrics_m.update(
        {
            "name": Path(s.predictions).name or "predictions",
            "checkpoint": str(model_path),
            "method": "localize predictions",
            "map": f"localize probability map of {roi} (level 0 of <slide>.prob.tif, value/255)",
            "input_size": None,
            "class_names": [f"not {roi}", roi],
            "seconds": round(seconds, 3),
        }
    )
    return ModelResult(
        metrics_m["name"],
        Path(str(model_path)),
        {},
        metrics_m,
        acc.rows,
        curves,
        examples_list,
        thumbnails=acc.thumbnails,
    )


def _slides_metrics(
    s: SlideEvalSettings,
    record: RunRecord,
    pairs: list[SlidePair],
    missing: list[str],
    ann_notes: dict[str, dict],
    result: ModelResult,
    curves: dict,
) -> dict:
    """metrics.json of the slides (JSON-ready): the same keys as image evaluation's."""
    class_names = result.metrics["class_names"]
    n_pos = sum(1 for r in result.rows if r["has_roi"])
    metrics = {
        **{k: v for k, v in record.header.items() if k not in ("seed", "device")},
        "ended": now(),
        "seconds": record.seconds(),
        "data": {
            "source": f"{s.predictions} + {s.annotations}",
            "layout": "slides",
            "split": "all",
            "split_rule": "every slide localize finished that has an annotation",
            "n_images": len(pairs),
            "images_per_class": {class_names[0]: len(pairs) - n_pos, class_names[1]: n_pos},
            "negative_class": class_names[0],
            "skipped_missing_masks": missing if s.skip_missing else [],
            "annotations": ann_notes,
            "mask_size_mismatch": {"policy": "mask images resized nearest to the map", "count": 0},
        },
        "protocol": {
            "name": "slides",
            "description": "localize's probability map at its output resolution (level 0 of "
            "<slide>.prob.tif) against the annotation rasterised on the same grid (pixel centres "
            "inside polygons, ASAP exclusion groups removed); every pixel of the map counts, glass "
            "included; a slide is positive when its annotation has a region",
        },
        "definitions": {
            **DEFINITIONS,
            "accuracy": "slide-level detection: localize's predicted class is the ROI class exactly "
            "when the annotation has a region; %.",
            "card": "the threshold localize used (in <slide>.json).",
        },
        "threshold_grid": [round(float(t), 3) for t in THRESHOLDS],
        "bootstrap": {"n": s.bootstrap, "seed": s.seed, "confidence": 0.95, "unit": "slide"},
        "models": [
            {
                **result.metrics,
                "curves": {
                    "thresholds": "threshold_grid",
                    **{k: round_curve(curves[k]) for k in ("precision", "recall")},
                    **{
                        k: round_curve(curves[k])
                        for k in ("dice_fg", "dice_bg", "iou_fg", "iou_bg", "miou")
                    },
                },
            }
        ],
    }
    return json_ready(metrics)


def _write_slide_outputs(
    s: SlideEvalSettings,
    metrics: dict,
    result: ModelResult,
    pairs: list[SlidePair],
    missing: list[str],
    record: RunRecord,
) -> dict:
    """metrics.json, per_image.csv, the reports and run.json; returns the summary."""
    from histo_wsl.reporting import report

    out = s.out
    atomic.write_json(out / "metrics.json", metrics)
    write_per_image_csv(out / "per_image.csv", [result.rows])
    files = report.write_reports(out, metrics, [result])
    summary: dict[str, Any] = {
        "out": str(out),
        "files": {
            "metrics": str(out / "metrics.json"),
            "per_image": str(out / "per_image.csv"),
            **{k: str(v) for k, v in files.items()},
        },
        "data": {"source": metrics["data"]["source"], "split": "all", "n_images": len(pairs)},
        "skipped_slides": missing if s.skip_missing else [],
        "models": [headline(m) for m in metrics["models"]],
        "seconds": record.seconds(),
    }
    items = [
        {"name": p[0], "path": str(p[2]), "annotation": str(p[4]), "status": "done"} for p in pairs
    ]
    record.write(ended=True, items=items, outputs=summary["files"])
    return summary
