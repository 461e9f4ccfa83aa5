"""The demo: the whole histo-wsl pipeline, run for real on an embedded synthetic default.

``histo-wsl demo`` needs no data and no network. It writes a small synthetic dataset of H&E-like
patches (``gland`` patches, whose glands are the region of interest, and ``normal`` patches, fully
negative images), a held-out test set drawn from other synthetic tissue, and a synthetic pyramidal
slide whose glands are known; then it calls the library functions behind the subcommands, in order:

1. ``extract-patches`` on the slide (tissue detection, QuPath tissue outlines, patch grid);
2. ``train-classifier``: a small stride-8 CNN (``tinycnn``, from scratch, WILDCAT head) on the
   image labels;
3. ``train-decoder``: the NEGEV decoder from the classifier's CAM seeds and the negative images;
4. ``localize`` the slide with the decoder (probability pyramid, mask, QuPath GeoJSON, overlay);
5. ``evaluate`` the CAM and NEGEV side by side on the held-out patches (PxAP, Dice, report.html);
6. ``evaluate`` the slide's map against the slide's true glands (written as a QuPath GeoJSON).

Every step is skipped when its outputs exist (``overwrite`` redoes them), so an interrupted demo
resumes. The recipe is :data:`RECIPE`; ``short=True`` is the shortened run the tests use.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from histo_wsl.runtime.console import stderr_console

__all__ = ["DemoRecipe", "RECIPE", "SHORT_RECIPE", "run_demo"]


@dataclass(frozen=True)
class DemoRecipe:
    """Sizes and training settings of the demo (recorded in ``demo.json``).

    Attributes:
        slide_size: side of the synthetic slide in level-0 pixels (0.5 µm/px).
        glands_per_section: glands of each of the slide's tissue sections.
        patches_per_class: training + validation patches of each class.
        test_per_class: held-out test patches of each class.
        patch_size: patch side in pixels.
        patch_downsample: slide level-0 pixels per patch pixel (2: patches at 1 µm/px).
        crop_size: training crop side (the network input).
        backbone: the stage-1 backbone (trained from scratch: the demo needs no download).
        head: the stage-1 pooling head.
        classifier_epochs: stage-1 epochs.
        classifier_lr: stage-1 base learning rate.
        decoder_epochs: stage-2 (NEGEV) epochs.
        decoder_lr: stage-2 learning rate.
        seeds: foreground and background seed pixels drawn per image at every stage-2 step.
        clip_grad_norm: cap on each step's gradient norm in both stages (None: no cap); a
            from-scratch classifier without it can be thrown back to chance by one bad batch.
        batch_size: images per step in both stages.
    """

    slide_size: int = 4096
    glands_per_section: int = 40
    patches_per_class: int = 40
    test_per_class: int = 16
    patch_size: int = 96
    patch_downsample: float = 2.0
    crop_size: int = 80
    backbone: str = "tinycnn"
    head: str = "wildcat"
    classifier_epochs: int = 10
    classifier_lr: float = 0.01
    decoder_epochs: int = 24
    decoder_lr: float = 0.05
    seeds: int = 20
    clip_grad_norm: float | None = 1.0
    batch_size: int = 8


#: The demo's recipe.
RECIPE = DemoRecipe()
#: A shortened run (smaller slide, fewer patches): what the tests run.
SHORT_RECIPE = DemoRecipe(
    slide_size=2048,
    glands_per_section=16,
    patches_per_class=32,
    test_per_class=8,
    classifier_epochs=8,
    decoder_epochs=10,
)
#: Resolution of the synthetic slide (µm/px).
SLIDE_MPP = 0.5
STEPS = 7


class _Steps:
    """Numbered step messages and per-step timings."""

    def __init__(self, quiet: bool) -> None:
        self.console = stderr_console()
        self.quiet = quiet
        self.n = 0
        self.seconds: dict[str, float] = {}

    def start(self, name: str, text: str) -> float:
        self.n += 1
        self.console.print(f"[bold]{self.n}/{STEPS}[/bold] {name}: {text}", highlight=False)
        return time.perf_counter()

    def done(self, name: str, t0: float, skipped: bool = False) -> None:
        self.seconds[name] = round(time.perf_counter() - t0, 2)
        if skipped:
            self.console.print("    already done (use --overwrite to redo)", highlight=False)


def _finished(run_dir: Path) -> bool:
    """Whether a training run finished (its run.json says so)."""
    try:
        return json.loads((run_dir / "run.json").read_text())["status"] == "done"
    except (OSError, ValueError, KeyError):
        return False


def _write_data(out: Path, recipe: DemoRecipe, seed: int) -> tuple[Path, Path]:
    from histo_wsl.synthetic.patches import write_patch_dataset

    train = write_patch_dataset(
        out / "data" / "train",
        n_per_class=recipe.patches_per_class,
        size=recipe.patch_size,
        downsample=recipe.patch_downsample,
        val_fraction=0.25,
        seed=seed,
    )
    test = write_patch_dataset(
        out / "data" / "test",
        n_per_class=recipe.test_per_class,
        size=recipe.patch_size,
        downsample=recipe.patch_downsample,
        val_fraction=0.0,
        seed=seed + 1000,
    )
    return train, test


def _write_slide(slide: Path, truth: Path, recipe: DemoRecipe, seed: int) -> None:
    """The synthetic slide and its glands as QuPath annotations (level-0 px)."""
    from histo_wsl.runtime import atomic
    from histo_wsl.slideio.geojson import GeoJSONStyle, mask_to_geojson
    from histo_wsl.synthetic.slides import gland_mask_region, make_layout, write_pyramid_tiff

    layout = make_layout(
        recipe.slide_size,
        recipe.slide_size,
        mpp=SLIDE_MPP,
        n_sections=2,
        glands_per_section=recipe.glands_per_section,
        seed=seed,
    )
    write_pyramid_tiff(slide, layout)
    ds = 4.0
    side = int(recipe.slide_size / ds)
    glands = gland_mask_region(layout, 0, 0, side, side, ds)
    geo = mask_to_geojson(glands, ds, style=GeoJSONStyle("Gland", (200, 0, 0)), mpp=SLIDE_MPP)
    atomic.write_text(truth, json.dumps(geo))


def run_demo(  # noqa: PLR0915 (the demo's steps in order, one library call each)
    out: Path,
    *,
    seed: int = 0,
    overwrite: bool = False,
    quiet: bool = False,
    recipe: DemoRecipe = RECIPE,
) -> dict[str, Any]:
    """Run the whole pipeline on synthetic data into ``out``; returns a JSON-ready summary.

    Args:
        out: demo folder (``data/``, ``slides/``, ``ground-truth/``, ``patches/``, ``runs/``,
            ``localize/``, ``evaluate/``, ``evaluate-slide/`` and ``demo.json`` are written in it).
        seed: seed of the synthetic data and of every training and sampling step.
        overwrite: redo the steps whose outputs exist.
        quiet: no progress bars.
        recipe: sizes and training settings.

    Returns:
        The summary (also written to ``demo.json``): files, the CAM and NEGEV test numbers, the slide's
        Dice against its true glands, per-step seconds and the exit code.
    """
    from histo_wsl.data.extract import ExtractParams, extract_patches
    from histo_wsl.evaluation.data import EvalSettings
    from histo_wsl.evaluation.images import run_evaluate
    from histo_wsl.evaluation.slides import SlideEvalSettings, run_evaluate_slides
    from histo_wsl.inference.localize import localize
    from histo_wsl.inference.params import LocalizeParams
    from histo_wsl.methods.cam import train_classifier
    from histo_wsl.methods.negev import train_decoder
    from histo_wsl.runtime import atomic
    from histo_wsl.runtime.batch import BatchOptions
    from histo_wsl.runtime.inputs import InputItem
    from histo_wsl.training.config import TrainConfig

    steps = _Steps(quiet)
    console = steps.console
    t_all = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"synthetic-{recipe.slide_size}px-seed{seed}"
    slide = out / "slides" / f"{name}.tif"
    truth = out / "ground-truth" / f"{name}.geojson"
    train_csv = out / "data" / "train" / "dataset.csv"
    test_csv = out / "data" / "test" / "dataset.csv"

    t = steps.start(
        "data",
        f"synthetic H&E-like patches ({recipe.patches_per_class} gland + "
        f"{recipe.patches_per_class} normal for training/validation, {recipe.test_per_class} + "
        f"{recipe.test_per_class} held out) and a {recipe.slide_size} px pyramidal slide "
        f"({SLIDE_MPP} µm/px) with known glands",
    )
    done = train_csv.is_file() and test_csv.is_file() and slide.is_file() and truth.is_file()
    if overwrite or not done:
        _write_data(out, recipe, seed)
        _write_slide(slide, truth, recipe, seed)
    steps.done("data", t, skipped=done and not overwrite)

    t = steps.start("extract-patches", "tissue detection and 224 px patches at 1 µm/px")
    extract = extract_patches(
        [InputItem(slide, slide.stem)],
        out / "patches",
        ExtractParams(patch_size=224, mpp=1.0, min_tissue=0.5, seed=seed),
        BatchOptions(overwrite=overwrite, quiet=quiet),
    )
    steps.done("extract-patches", t, skipped=extract.items[0].status == "skipped")

    common = {
        "data": str(train_csv),
        "backbone": recipe.backbone,
        "head": recipe.head,
        "pretrained": False,
        "data_mpp": SLIDE_MPP * recipe.patch_downsample,
        "batch_size": recipe.batch_size,
        "clip_grad_norm": recipe.clip_grad_norm,
        "crop_size": recipe.crop_size,
        "resize_size": recipe.patch_size,
        "step_size": 1000,
        "workers": 0,
        "device": "cpu",
        "seed": seed,
    }
    cam_dir, negev_dir = out / "runs" / "cam", out / "runs" / "negev"
    t = steps.start(
        "train-classifier",
        f"{recipe.backbone} CAM classifier from scratch, {recipe.classifier_epochs} epochs",
    )
    skip = _finished(cam_dir) and not overwrite
    if not skip:
        train_classifier(
            TrainConfig.from_flat(
                out=str(cam_dir),
                epochs=recipe.classifier_epochs,
                lr=recipe.classifier_lr,
                **common,
            ),
            quiet=quiet,
        )
    steps.done("train-classifier", t, skipped=skip)
    classifier = cam_dir / "best-cls.pt"

    t = steps.start(
        "train-decoder",
        f"NEGEV decoder from CAM seeds + negative images, {recipe.decoder_epochs} epochs",
    )
    skip = _finished(negev_dir) and not overwrite
    if not skip:
        train_decoder(
            TrainConfig.from_flat(
                out=str(negev_dir),
                method="negev",
                classifier=str(classifier),
                negative_class="normal",
                epochs=recipe.decoder_epochs,
                lr=recipe.decoder_lr,
                seeds_fg=recipe.seeds,
                seeds_bg=recipe.seeds,
                **common,
            ),
            quiet=quiet,
        )
    steps.done("train-decoder", t, skipped=skip)
    decoder = negev_dir / "best-loc.pt"

    t = steps.start("localize", "the slide, with the NEGEV decoder, where there is tissue")
    loc = localize(
        [InputItem(slide, slide.stem)],
        out / "localize",
        LocalizeParams(model=decoder, device="cpu", workers=0, seed=seed),
        BatchOptions(overwrite=overwrite, quiet=quiet),
    )
    steps.done("localize", t, skipped=loc.items[0].status == "skipped")

    t = steps.start("evaluate", "CAM vs NEGEV on the held-out patches; the slide vs its glands")
    evaluation = run_evaluate(
        EvalSettings(
            models=[classifier, decoder],
            data=str(test_csv),
            out=out / "evaluate",
            split="all",
            bootstrap=200,
            seed=seed,
            device="cpu",
        ),
        quiet=quiet,
    )
    steps.done("evaluate", t)
    t = steps.start("evaluate slide", "the slide's probability map against its true glands")
    slide_eval = run_evaluate_slides(
        SlideEvalSettings(out / "localize", truth, out / "evaluate-slide", bootstrap=0, seed=seed),
        quiet=True,
    )
    steps.done("evaluate slide", t)

    cam_m, negev_m = evaluation["models"]
    slide_metrics = json.loads((out / "evaluate-slide" / "metrics.json").read_text())
    slide_loc = slide_metrics["models"][0]["localization"]
    slide_dir = out / "localize" / slide.stem
    result = {
        "out": str(out),
        "seed": seed,
        "recipe": asdict(recipe),
        "slide": str(slide),
        "ground_truth": str(truth),
        "classifier": str(classifier),
        "decoder": str(decoder),
        "report": evaluation["files"]["report_html"],
        "slide_report": slide_eval["files"]["report_html"],
        "qupath_geojson": str(slide_dir / f"{slide.stem}.geojson"),
        "probability_tiff": str(slide_dir / f"{slide.stem}.prob.tif"),
        "overlay": str(slide_dir / f"{slide.stem}.overlay.png"),
        "test": {
            "cam_pxap": cam_m["pxap"],
            "negev_pxap": negev_m["pxap"],
            "cam_dice@card": cam_m["dice_fg@card"],
            "negev_dice@card": negev_m["dice_fg@card"],
            "negev_accuracy": negev_m["accuracy"],
        },
        "slide_metrics": {
            "pxap": slide_loc["pxap"]["value"],
            "dice_fg@card": slide_loc["at_threshold"]["card"]["dice_fg"]["value"],
            "iou_fg@card": slide_loc["at_threshold"]["card"]["iou_fg"]["value"],
        },
        "patches": extract.items[0].details.get("patches"),
        "seconds": {**steps.seconds, "total": round(time.perf_counter() - t_all, 2)},
        "exit_code": max(extract.exit_code, loc.exit_code),
    }
    atomic.write_json(out / "demo.json", result)
    test = result["test"]
    console.print(
        f"\n[green]Done[/green] in {result['seconds']['total']:.0f} s.\n"
        f"  Held-out patches, PxAP: CAM {test['cam_pxap']:.1f} -> NEGEV {test['negev_pxap']:.1f}; "
        f"Dice at the card's threshold: {test['cam_dice@card']:.3f} -> "
        f"{test['negev_dice@card']:.3f}\n"
        f"  Slide vs its true glands: PxAP {result['slide_metrics']['pxap']:.1f}, "
        f"Dice {result['slide_metrics']['dice_fg@card']:.3f}\n"
        f"  Report:           {result['report']}\n"
        f"  Slide report:     {result['slide_report']}\n"
        f"  QuPath:           open {slide} and import {result['qupath_geojson']} "
        f"(truth: {truth})\n"
        f"  Probability map:  {result['probability_tiff']} (pyramidal TIFF)\n"
        f"  Models:           {classifier}, {decoder}",
        soft_wrap=True,
        highlight=False,
    )
    return result
