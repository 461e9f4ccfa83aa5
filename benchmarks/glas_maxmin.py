"""One command for Max-Min uncertainty on GlaS fold 0: training, then the TMI metrics on validation.

Steps (each a ``histo-wsl`` child process, logged to ``--out/logs/``):

1. ``train-classifier --method maxmin`` into ``--out/train``;
2. ``evaluate --compare best-loc.pt best-cls.pt --split val --protocol native`` into ``--out/eval``
   (the TMI protocol: the map resized back to each image's own size, F1+ / F1− per image at 0.5),
   and the same with ``--tta flips`` into ``--out/eval-flips``.

It prints one JSON object: for both checkpoints and both evaluations PxAP, F1+, F1−, accuracy and
classification error on the 18 validation images, the paper's targets (GlaS test, ResNet18: F1+
71.9 / F1− 69.2 with SEM, 72.1 / 69.1 with EEM, error 0; the survey's Max-Min PxAP 81.2 with
ResNet50) and whether best-loc (no test-time augmentation) meets them, the seconds of each step and
the commands it ran. Exit status: 0 when the F1 and error targets are met (and always with
``--smoke``), 1 when they are missed or a step failed, 2 for bad arguments or missing data
(``--skip-missing``: a message and 0 instead).

Resumable as ``glas_negev.py``: a finished training is reused, an interrupted one continued with
``--resume``, an evaluation reused when newer than both checkpoints; ``--overwrite`` starts over.
The settings (recipe plus any ``--set``) are recorded in ``--out/recipe.json``; a folder made with
other settings is refused.

The recipes are the dict :data:`RECIPES` below; ``--set NAME=VALUE`` (repeatable; option names as
in ``histo-wsl train-classifier --help``) changes one setting, for sweeps:

* ``cpu``: pretrained MobileNetV2 (stride 8), 224 px crops, 50 epochs at lr 0.001, λ 0.3 (SEM;
  chosen on validation against 0.1), the mask k-NN refined (``--refine knn --refine-alpha 0.5``).
  Measured (2-core CPU): best-loc PxAP 81.9, F1+ 72.0 / F1− 70.2, error 0 (README, Max-Min).
* ``gpu``: the same network at the paper's scale of input (448 px resize, 416 px crops, the TMI
  code's crop size) for 80 epochs, AMP. Not measured yet (no GPU was lent).

    python benchmarks/glas_maxmin.py --recipe cpu --out runs/glas-maxmin-cpu --workers 1
    python benchmarks/glas_maxmin.py --recipe cpu --set maxmin_lambda=0.1 --out runs/mm-l01
    python benchmarks/glas_maxmin.py --smoke          # 1 epoch of 1 step: a plumbing check
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _runs import (  # noqa: E402
    add_recipe_options,
    best_of,
    eval_numbers,
    histo_wsl,
    missing_glas,
    open_run_folder,
    resolve_data,
    run_evaluation,
    run_training,
)

#: the two recipes; option names as in ``histo-wsl train-classifier --help``
RECIPES: dict[str, dict[str, Any]] = {
    "cpu": {
        "method": "maxmin",
        "backbone": "mobilenetv2",
        "pretrained": True,
        "epochs": 50,
        "batch_size": 8,
        "lr": 0.001,
        "step_size": 40,
        "maxmin_lambda": 0.3,
        "maxmin_regularizer": "sem",
        "refine": "knn",
        "refine_alpha": 0.5,
    },
    "gpu": {
        "method": "maxmin",
        "backbone": "mobilenetv2",
        "pretrained": True,
        "epochs": 80,
        "batch_size": 8,
        "lr": 0.001,
        "step_size": 64,
        "maxmin_lambda": 0.3,
        "maxmin_regularizer": "sem",
        "refine": "knn",
        "refine_alpha": 0.5,
        "resize_size": 448,
        "crop_size": 416,
        "amp": True,
    },
}
#: the paper's GlaS test numbers (ResNet18; F1 in %, per image at 0.5) by regularizer
TARGET_F1 = {"sem": (71.9, 69.2), "eem": (72.1, 69.1)}
#: classification error (%) of the paper on GlaS
TARGET_ERROR = 0.0
#: the survey's Max-Min PxAP on GlaS (ResNet50)
TARGET_PXAP = 81.2
#: ``--smoke``: the same commands, shrunk to one step of one epoch
SMOKE = {"epochs": 1, "max_steps_per_epoch": 1}


def parse_value(text: str) -> Any:
    """``--set`` values: true/false, none, int, float, else the string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def plan(args: argparse.Namespace) -> dict[str, Any]:
    """The resolved settings of this invocation (what ``recipe.json`` records).

    Raises:
        ValueError: a ``--set`` without ``=``.
    """
    train = dict(RECIPES[args.recipe])
    for item in args.set or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--set {item!r}: expected NAME=VALUE")
        train[name.strip().replace("-", "_")] = parse_value(value.strip())
    if args.smoke:
        train.update(SMOKE)
    return {
        "recipe": args.recipe,
        "smoke": args.smoke,
        "data": str(resolve_data(args.data).resolve()),
        "fold": args.fold,
        "train": train,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_recipe_options(p, sorted(RECIPES), "glas-maxmin")
    p.add_argument(
        "--set",
        action="append",
        metavar="NAME=VALUE",
        help="Change one training setting of the recipe (repeatable).",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the recipe; returns the exit status."""
    args = parse_args(argv)
    t_start = time.perf_counter()
    data = resolve_data(args.data)
    code = missing_glas(data, args.skip_missing)
    if code is not None:
        return code
    try:
        settings = plan(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    suffix = "-smoke" if args.smoke else ""
    out = Path(args.out or f"runs/glas-maxmin-{args.recipe}{suffix}").resolve()
    evals = {"none": out / "eval", "flips": out / "eval-flips"}
    if not open_run_folder(
        out,
        settings,
        ["train", "logs", *(p.name for p in evals.values())],
        args.overwrite,
        args.dry_run,
    ):
        return 2

    runtime = {"workers": args.workers, "device": args.device}
    glas = str(data.resolve())
    ran: list[str] = []
    steps: dict[str, Any] = {}
    run = out / "train"
    ckpts = [run / "best-loc.pt", run / "best-cls.pt"]
    steps["train"] = run_training(
        "train-classifier",
        glas,
        run,
        {**settings["train"], "fold": args.fold},
        runtime,
        out / "logs" / "train.log",
        args.dry_run,
        ran,
    )
    failed = steps["train"]["exit_code"] != 0
    results: dict[str, Any] = {}
    for tta, folder in evals.items():
        if failed:
            break
        cmd = histo_wsl(
            "evaluate",
            "--compare",
            *map(str, ckpts),
            "--data",
            glas,
            "--fold",
            str(args.fold),
            "--split",
            "val",
            "--protocol",
            "native",
            "--tta",
            tta,
            "--out",
            str(folder),
            "--device",
            args.device,
            "--quiet",
        )
        steps[folder.name], metrics = run_evaluation(
            cmd, folder, ckpts, out / "logs" / f"{folder.name}.log", args.dry_run, ran
        )
        failed = steps[folder.name]["exit_code"] != 0
        models = metrics.get("models") or []
        if len(models) == 2:
            results[tta] = {
                "best-loc": eval_numbers(models[0]),
                "best-cls": eval_numbers(models[1]),
            }

    regularizer = str(settings["train"].get("maxmin_regularizer", "sem"))
    f1_pos, f1_neg = TARGET_F1.get(regularizer, TARGET_F1["sem"])
    head = (results.get("none") or {}).get("best-loc") or {}
    met = (
        head.get("f1_pos") is not None
        and head["f1_pos"] >= f1_pos
        and head["f1_neg"] >= f1_neg
        and head["error"] is not None
        and head["error"] <= TARGET_ERROR
    )
    result = {
        "status": "failed" if failed else ("planned" if args.dry_run else "done"),
        "recipe": args.recipe,
        "smoke": args.smoke,
        "data": glas,
        "fold": args.fold,
        "split": "val",
        "protocol": "native",
        "out": str(out),
        "results": results,
        "targets": {
            "f1_pos": f1_pos,
            "f1_neg": f1_neg,
            "error": TARGET_ERROR,
            "pxap": TARGET_PXAP,
            "source": "paper: GlaS test, ResNet18; PxAP: the survey, ResNet50",
        },
        "target_met": met,
        "pxap_target_met": head.get("pxap") is not None and head["pxap"] >= TARGET_PXAP,
        "valpx_selection": best_of(run),
        "steps": steps,
        "seconds": round(time.perf_counter() - t_start, 1),
        "commands": ran,
        "settings": settings,
    }
    print(json.dumps(result, indent=2))
    if failed:
        return 1
    return 0 if (met or args.smoke or args.dry_run) else 1


if __name__ == "__main__":
    sys.exit(main())
