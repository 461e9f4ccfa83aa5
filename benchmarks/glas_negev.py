"""One command for NEGEV on GlaS fold 0: stage 1, stage 2, then CAM vs NEGEV on the validation set.

Steps (each a ``histo-wsl`` child process, logged to ``--out/logs/``):

1. ``train-classifier`` (the CAM classifier) into ``--out/stage1``;
2. ``train-decoder --classifier --out/stage1/<stage1_checkpoint>`` into ``--out/stage2``; with
   ``rounds`` > 1, round r (≥ 2) trains a new decoder over the same classifier into
   ``--out/stage2-round<r>``, seeded by round r − 1 (``--seed-teacher``);
3. ``evaluate --compare <stage-1 checkpoint> <last round>/best-loc.pt --split val --fold 0`` into
   ``--out/eval``.

It prints one JSON object: CAM and NEGEV validation PxAP (%), the gain, whether the +10 point
target is met, the seconds of each step and the commands it ran. Exit status: 0 when the target is
met (and always with ``--smoke``), 1 when it is missed or a step failed, 2 for bad arguments or
missing data (``--skip-missing``: a message and 0 instead).

Resumable: a finished stage is reused, an interrupted one continued with ``--resume``, and the
evaluation reused when it is newer than both checkpoints; ``--overwrite`` starts over. The settings
are recorded in ``--out/recipe.json``; a folder made with other settings is refused.

The recipes are the dict :data:`RECIPES` below (edit the values there):

* ``cpu``: pretrained MobileNetV2 (stride 8), short schedule, n = 20 seeds drawn from the k-NN
  seed map (``--seed-map knn``), one round, the saved map k-NN refined (``--refine knn``).
* ``cpu-slide``: ``cpu`` at the slide geometry (``--geometry isotropic --glass``: images resized
  by one factor to the card's µm/px, aspect ratio kept, and placed on glass that the decoder learns
  as background), so ``localize`` meets on slides what training saw.
* ``cpu-glass``: ``cpu`` (squashed images) with ``--glass`` only.
* ``cpu-stages``: ``cpu`` with its k-NN banks keyed on every stage of the encoder
  (``--knn-stages 5 --knn-dims 32``).
* ``gpu``: the paper's protocol (method.md §1.4): ResNet50, 1000 epochs per stage, batch 32, step
  250, lr 0.003 / 0.1, n = 1, AMP. Needs ImageNet ResNet50 weights in ``$TORCH_HOME``.

    python benchmarks/glas_negev.py --recipe cpu --out runs/glas-negev-cpu --workers 2
    python benchmarks/glas_negev.py --smoke          # 1 epoch of 1 step per stage: a plumbing check
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
    histo_wsl,
    missing_glas,
    open_run_folder,
    resolve_data,
    run_evaluation,
    run_training,
)

#: the two recipes; option names as in ``histo-wsl train-classifier`` / ``train-decoder --help``
RECIPES: dict[str, dict[str, Any]] = {
    "cpu": {
        "stage1": {
            "backbone": "mobilenetv2",
            "pretrained": True,
            "epochs": 24,
            "batch_size": 16,
            "lr": 0.003,
            "step_size": 16,
        },
        "stage2": {
            "epochs": 20,
            "batch_size": 16,
            "lr": 0.1,
            "step_size": 14,
            "seeds_fg": 20,
            "seeds_bg": 20,
            "seed_map": "knn",
            "refine": "knn",
        },
        # decoders trained in turn, each seeded by the previous one (the first by the CAM)
        "rounds": 1,
        # the frozen encoder/head and the CAM of stage 2 (and the CAM row of the comparison); the
        # paper-era code used best-loc for both (method.md §1.1, "Checkpoint subtlety")
        "stage1_checkpoint": "best-cls.pt",
    },
    "gpu": {
        "stage1": {
            "backbone": "resnet50",
            "pretrained": True,
            "epochs": 1000,
            "batch_size": 32,
            "lr": 0.003,
            "step_size": 250,
            "amp": True,
        },
        "stage2": {
            "epochs": 1000,
            "batch_size": 32,
            "lr": 0.1,
            "step_size": 250,
            "seeds_fg": 1,
            "seeds_bg": 1,
            "amp": True,
        },
        "rounds": 1,
        "stage1_checkpoint": "best-cls.pt",
    },
}
# the cpu recipe at the slide geometry: images resized by one factor to the card's µm/px, aspect
# kept, on glass (--geometry isotropic --glass), so localize meets on slides what training saw
SLIDE_GEOMETRY = {"geometry": "isotropic", "glass": True}
RECIPES["cpu-slide"] = {
    **RECIPES["cpu"],
    "stage1": {**RECIPES["cpu"]["stage1"], **SLIDE_GEOMETRY},
    "stage2": {**RECIPES["cpu"]["stage2"], **SLIDE_GEOMETRY},
}
# the cpu recipe with its images on glass only (squashed as the papers')
RECIPES["cpu-glass"] = {
    **RECIPES["cpu"],
    "stage1": {**RECIPES["cpu"]["stage1"], "glass": True},
    "stage2": {**RECIPES["cpu"]["stage2"], "glass": True},
}
# the cpu recipe with its k-NN banks (seed map and refiner) keyed on every stage of the encoder
RECIPES["cpu-stages"] = {
    **RECIPES["cpu"],
    "stage2": {**RECIPES["cpu"]["stage2"], "knn_stages": 5, "knn_dims": 32},
}
#: NEGEV's PxAP gain over the CAM it starts from (points), the issue's target
TARGET_GAIN = 10.0
#: ``--smoke``: the same commands, shrunk to one step of one epoch per stage
SMOKE = {"epochs": 1, "max_steps_per_epoch": 1}


def plan(args: argparse.Namespace) -> dict[str, Any]:
    """The resolved settings of this invocation (what ``recipe.json`` records)."""
    recipe = RECIPES[args.recipe]
    stage1, stage2 = dict(recipe["stage1"]), dict(recipe["stage2"])
    if args.smoke:
        stage1.update(SMOKE)
        stage2.update(SMOKE)
    return {
        "recipe": args.recipe,
        "smoke": args.smoke,
        "data": str(resolve_data(args.data).resolve()),
        "fold": args.fold,
        "stage1": stage1,
        "stage2": stage2,
        "rounds": int(recipe.get("rounds", 1)),
        "stage1_checkpoint": recipe["stage1_checkpoint"],
    }


def _pxap(model: dict[str, Any]) -> float | None:
    return ((model.get("localization") or {}).get("pxap") or {}).get("value")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_recipe_options(p, sorted(RECIPES), "glas-negev")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the recipe; returns the exit status."""
    args = parse_args(argv)
    t_start = time.perf_counter()
    data = resolve_data(args.data)
    code = missing_glas(data, args.skip_missing)
    if code is not None:
        return code
    settings = plan(args)
    suffix = "-smoke" if args.smoke else ""
    out = Path(args.out or f"runs/glas-negev-{args.recipe}{suffix}").resolve()
    if not open_run_folder(
        out,
        settings,
        ["stage1", "eval", "logs", *(p.name for p in out.glob("stage2*"))],
        args.overwrite,
        args.dry_run,
    ):
        return 2

    runtime = {"workers": args.workers, "device": args.device}
    common = {"fold": args.fold}
    ran: list[str] = []
    steps: dict[str, Any] = {}
    glas = str(data.resolve())
    s1, ev = out / "stage1", out / "eval"
    rounds = [out / "stage2"] + [out / f"stage2-round{r}" for r in range(2, settings["rounds"] + 1)]
    cam_ckpt = s1 / settings["stage1_checkpoint"]
    negev_ckpt = rounds[-1] / "best-loc.pt"

    steps["stage1"] = run_training(
        "train-classifier",
        glas,
        s1,
        {**settings["stage1"], **common},
        runtime,
        out / "logs" / "stage1.log",
        args.dry_run,
        ran,
    )
    teacher: Path | None = None
    for folder in rounds:
        if any(s["exit_code"] != 0 for s in steps.values()):
            break
        options = {**settings["stage2"], **common, "classifier": str(cam_ckpt)}
        if teacher is not None:
            options["seed_teacher"] = str(teacher)
        steps[folder.name] = run_training(
            "train-decoder",
            glas,
            folder,
            options,
            runtime,
            out / "logs" / f"{folder.name}.log",
            args.dry_run,
            ran,
        )
        teacher = folder / "best-loc.pt"
    failed = any(s["exit_code"] != 0 for s in steps.values()) or len(steps) < 1 + len(rounds)

    metrics: dict[str, Any] = {}
    if not failed:
        eval_cmd = histo_wsl(
            "evaluate",
            "--compare",
            str(cam_ckpt),
            str(negev_ckpt),
            "--data",
            glas,
            "--fold",
            str(args.fold),
            "--split",
            "val",
            "--out",
            str(ev),
            "--device",
            args.device,
            "--quiet",
        )
        steps["evaluate"], metrics = run_evaluation(
            eval_cmd, ev, [cam_ckpt, negev_ckpt], out / "logs" / "evaluate.log", args.dry_run, ran
        )
        failed = steps["evaluate"]["exit_code"] != 0

    models = metrics.get("models") or []
    cam_px = _pxap(models[0]) if len(models) == 2 else None
    negev_px = _pxap(models[1]) if len(models) == 2 else None
    gain = negev_px - cam_px if cam_px is not None and negev_px is not None else None
    met = gain is not None and gain >= TARGET_GAIN
    result = {
        "status": "failed" if failed else ("planned" if args.dry_run else "done"),
        "recipe": args.recipe,
        "smoke": args.smoke,
        "data": glas,
        "fold": args.fold,
        "split": "val",
        "out": str(out),
        "cam_val_pxap": cam_px,
        "negev_val_pxap": negev_px,
        "gain": gain,
        "target_gain": TARGET_GAIN,
        "target_met": met,
        "checkpoints": {"cam": str(cam_ckpt), "negev": str(negev_ckpt)},
        "valpx_selection": {"stage1": best_of(s1), **{f.name: best_of(f) for f in rounds}},
        "steps": steps,
        "seconds": round(time.perf_counter() - t_start, 1),
        "commands": ran,
        "settings": settings,
        "report": str(ev / "report.md") if metrics else None,
    }
    print(json.dumps(result, indent=2))
    if failed:
        return 1
    return 0 if (met or args.smoke or args.dry_run) else 1


if __name__ == "__main__":
    sys.exit(main())
