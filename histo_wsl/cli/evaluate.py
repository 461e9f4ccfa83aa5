"""``histo-wsl evaluate``: the papers' metrics and a report, for images or for slides."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from histo_wsl.cli.common import fail, print_json, reports_errors
from histo_wsl.cli.options import JsonOpt, QuietOpt

EPILOG = (
    "Examples: histo-wsl evaluate runs/cam/best-loc.pt --data ../shared/data/glas --out eval/cam  |  "
    "histo-wsl evaluate best-loc.pt --data data.csv --split val --calibrate --out eval/val  |  "
    "histo-wsl evaluate --compare runs/cam/best-loc.pt runs/negev/best-loc.pt --data test.csv "
    "--split test --out eval/compare  |  histo-wsl evaluate glas-negev-mobilenetv2 --data "
    "../shared/data/glas --split test --out eval/default  |  "
    "histo-wsl evaluate --predictions localized/ --annotations annotations/ --out eval/slides"
)


def _fmt(entry: dict | None, scale: float = 1.0) -> str:
    if not entry or entry.get("value") is None:
        return "n/a"
    text = f"{entry['value'] * scale:.2f}"
    ci = entry.get("ci95")
    if ci and None not in ci:
        text += f" [{ci[0] * scale:.2f}, {ci[1] * scale:.2f}]"
    return text


@reports_errors
def evaluate(
    models: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="[MODEL]...",
            help="Checkpoint(s) (.pt) from train-classifier / train-decoder, or installed model "
            "names (see `histo-wsl models`); several with --compare.",
            show_default=False,
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            "-d",
            help="Images with ground-truth masks: a CSV image,label,mask[,split], <class>/ folders "
            "with masks/, a GlaS folder, or a patch folder (negative-class images need no mask).",
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("eval"),
    compare: Annotated[
        bool,
        typer.Option("--compare", help="Several checkpoints side by side in one report."),
    ] = False,
    split: Annotated[
        str,
        typer.Option(help="auto (val when the data has splits, else all), val, train, test, all."),
    ] = "auto",
    fold: Annotated[int, typer.Option(min=0, help="GlaS fold (splits/fold-K.csv).")] = 0,
    protocol: Annotated[
        str,
        typer.Option(
            help="resize: maps and masks (nearest) compared at the model's input size (NEGEV); "
            "native: maps resized back to each mask's own size (Max-Min)."
        ),
    ] = "resize",
    threshold: Annotated[
        float,
        typer.Option(
            min=0.0, max=1.0, help="A threshold to report besides the card's and the best one."
        ),
    ] = 0.5,
    calibrate: Annotated[
        bool,
        typer.Option(
            "--calibrate",
            help="Choose the threshold maximising mIoU on this set and write "
            "<out>/<stem>.calibrated.pt (a new file) whose card carries it; use a validation set.",
        ),
    ] = False,
    bootstrap: Annotated[
        int,
        typer.Option(min=0, help="Bootstrap resamples of the images for 95% intervals (0: none)."),
    ] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
    skip_missing: Annotated[
        bool,
        typer.Option(
            "--skip-missing",
            help="Leave out images without a usable mask (none, or of another size than the "
            "image; listed) instead of failing.",
        ),
    ] = False,
    map_class: Annotated[
        str,
        typer.Option(
            help="Stage-1 map of the gt (ground-truth, the papers') or predicted (as localize) class."
        ),
    ] = "gt",
    cam: Annotated[
        str | None,
        typer.Option(
            help="CAM method instead of the card's: cam, gradcam, gradcampp, smoothgradcampp, "
            "xgradcam, layercam."
        ),
    ] = None,
    tta: Annotated[
        str | None,
        typer.Option(
            help="Test-time augmentation instead of the cards': none, or flips (mean of the image "
            "and its left-right, up-down and both flips; 4x the compute)."
        ),
    ] = None,
    negative_class: Annotated[
        str | None,
        typer.Option(help="Class of fully negative images (default: the model card's)."),
    ] = None,
    examples: Annotated[
        int, typer.Option(min=0, help="Best and worst images shown in the report (each).")
    ] = 4,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 16,
    workers: Annotated[int, typer.Option(min=0, help="Data-loader processes.")] = 0,
    device: Annotated[
        str, typer.Option(help="auto (CUDA, MPS, CPU), cpu, cuda, cuda:N, mps.")
    ] = "auto",
    predictions: Annotated[
        Path | None,
        typer.Option(
            "--predictions",
            help="Slides instead of images: the --out folder of localize (<slide>/<slide>.prob.tif "
            "and <slide>.json), evaluated against --annotations.",
        ),
    ] = None,
    annotations: Annotated[
        Path | None,
        typer.Option(
            "--annotations",
            help="With --predictions: a folder of <slide>.geojson (QuPath), <slide>.xml (ASAP, "
            "CAMELYON16) or mask images (<slide>.png, <slide>_mask.tif), or one such file.",
        ),
    ] = None,
    roi_class: Annotated[
        list[str] | None,
        typer.Option(
            "--roi-class",
            metavar="NAME",
            help="With --annotations: the annotation class(es) that are the ROI (repeat for "
            "several). Default: the model's ROI class when the annotations have it, else every "
            "class; QuPath's Ignore* regions are always left out of the metrics.",
        ),
    ] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Evaluate models against ground truth: PxAP, Dice/IoU, F1+/F1-, accuracy, with a report.

    Writes <out>/metrics.json (every number, its definition, 95% bootstrap intervals, the threshold
    list, command and versions), per_image.csv, report.md and a self-contained report.html (PR and
    Dice-vs-threshold curves, best and worst images), and run.json.
    """
    from histo_wsl.evaluation.data import EvalSettings
    from histo_wsl.evaluation.images import run_evaluate

    models = list(models or [])
    if predictions is not None or annotations is not None:
        if predictions is None or annotations is None:
            raise fail("slides need both --predictions (localize's --out) and --annotations")
        if models or data is not None or calibrate or compare:
            raise fail(
                "--predictions evaluates maps localize already wrote: give no checkpoint, --data, "
                "--calibrate or --compare with it"
            )
        from histo_wsl.evaluation.slides import SlideEvalSettings, run_evaluate_slides

        settings = SlideEvalSettings(
            predictions,
            annotations,
            out,
            threshold,
            bootstrap,
            seed,
            skip_missing,
            examples,
            roi_classes=list(roi_class) if roi_class else None,
        )
        summary = run_evaluate_slides(settings, argv=sys.argv, quiet=quiet or json_out)
        if json_out:
            print_json(summary)
        else:
            _print_summary(out)
        return
    if roi_class:
        raise fail(
            "--roi-class chooses annotation classes: it goes with --predictions/--annotations"
        )
    if not models:
        raise fail("give a checkpoint to evaluate (or several with --compare)")
    if len(models) > 1 and not compare:
        raise fail(f"{len(models)} checkpoints given: add --compare to put them side by side")
    if data is None:
        raise fail("--data is required: the images with their ground-truth masks")
    from histo_wsl.registry.registry import resolve_model

    settings = EvalSettings(
        models=[resolve_model(m) for m in models],
        data=data,
        out=out,
        split=split,
        fold=fold,
        protocol=protocol,
        threshold=threshold,
        calibrate=calibrate,
        bootstrap=bootstrap,
        seed=seed,
        skip_missing=skip_missing,
        map_class=map_class,
        cam_method=cam,
        tta=tta,
        negative_class=negative_class,
        examples=examples,
        batch_size=batch_size,
        workers=workers,
        device=device,
    )
    summary = run_evaluate(settings, argv=sys.argv, quiet=quiet or json_out)
    if json_out:
        print_json(summary)
    else:
        _print_summary(out)


def _print_summary(out: Path) -> None:
    """The headline numbers of <out>/metrics.json on stderr."""
    import json

    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    d = metrics["data"]
    lines = [f"{d['n_images']} images ({d['split']}) of {d['source']}"]
    for m in metrics["models"]:
        loc = m["localization"]
        card = loc["at_threshold"]["card"]
        best = loc["at_threshold"]["best"]
        lines.append(
            f"{m['name']}: PxAP {_fmt(loc['pxap'])}  F1+ {_fmt(loc['f1']['f1_pos'], 100)}  "
            f"F1- {_fmt(loc['f1']['f1_neg'], 100)}  Dice fg @{card['threshold']:g} "
            f"{_fmt(card['dice_fg'], 100)}  best_threshold (optimistic) {best['threshold']:g}  "
            f"accuracy {_fmt(m['classification']['accuracy'])}"
        )
        if "calibration" in m:
            lines.append(f"  calibrated checkpoint: {m['calibration']['checkpoint']}")
    lines.append(f"report: {out / 'report.html'}; numbers: {out / 'metrics.json'}")
    print("\n".join(lines), file=sys.stderr)
