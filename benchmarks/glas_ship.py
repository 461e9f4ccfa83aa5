"""From a trained GlaS checkpoint to a model to ship, the way the shipped models were made.

The shipped models' k-NN refinement was changed after training by a chain of ``histo-wsl models
export`` calls, each measured on the GlaS validation slide (docs/results.md, *The k-NN bank keyed
as slides show the tissue* to *The k-NN map's weight in Max-Min's map*). This script is that chain
for any k-NN refined NEGEV or Max-Min checkpoint trained on GlaS (a CPU run, or the models
``glas_gpu.py run --export`` returns), each step a ``histo-wsl`` child process logged under
``<out>/logs``:

1. ``export``: the bank cut to :data:`BANK` pixels (the same number from each training image),
   keyed again as ``localize`` reads a slide, on every stage of the encoder at 32 principal axes
   each, on a grid twice as fine as the CAM layer's, with glass (1/8 of the bank) valued 0, and
   valued by the model's own map of each training image; a Max-Min model's mask also gets its
   window range (``--mask-range``).
2. ``round``: the same keys again from step 1 without the cut: the same bank pixels valued by
   the exported model's own map (one round of propagation over the bank).
3. ``weight`` (Max-Min): the k-NN map weighted :data:`MAXMIN_ALPHA` in the model's map instead
   of training's 0.5, and the bank valued again by that map.
4. ``slide``: ``benchmarks/glas_slide.py --tta card,flips``: slide PxAP and the papers' protocol.
5. ``card``: ``export`` once more with ``--metrics`` and ``--slide-metrics``, so the card carries
   both protocols and its recipe records this command.

It prints one JSON object: the model, the numbers of the slide step (F1+ / F1− of the papers' protocol
beside them), each step's seconds and command. ``<dest>/<name>/`` appears only when every step
ran (the work folder, ``runs/ship-<name>`` by default, keeps the logs and the slide's
run). Exit status 0, 1 when a step failed, 2 for a source that is not a k-NN refined NEGEV or
Max-Min checkpoint or when GlaS is missing (``--skip-missing``: a message and 0).

    python benchmarks/glas_ship.py runs/glas-gpu/negev-knn/best-loc.pt --name glas-negev-gpu
    python benchmarks/glas_ship.py runs/glas-maxmin/best-loc.pt --name glas-maxmin-mobilenetv2 \\
        --dest models --overwrite
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _runs import card_of, eval_numbers, histo_wsl, missing_glas, resolve_data, run_logged  # noqa: E402

#: k-NN bank pixels kept of each method's (the lookup's cost is proportional to it)
BANK = {"negev": 1536, "maxmin": 2048}
#: the k-NN weight of a Max-Min model's map (NEGEV's map is the k-NN map alone)
MAXMIN_ALPHA = 0.75


def key_options(data: Path) -> list[str]:
    """The options that key the bank as slides show the tissue: every stage, grid 2, glass."""
    return [
        "--knn-slide-keys", str(data), "--knn-stages", "5", "--knn-dims", "32",
        "--knn-grid", "2", "--knn-glass", str(data), "--knn-glass-share", "0.125",
    ]  # fmt: skip


def export_steps(method: str, data: Path) -> dict[str, list[str]]:
    """Each export's options (the source: the previous step's model), in order.

    ``export``: the bank cut, keyed again (:func:`key_options`), and Max-Min's window range;
    ``round``: the bank's pixels valued again by the model's own map; Max-Min's ``weight``: the
    k-NN map weighted :data:`MAXMIN_ALPHA` instead of training's 0.5, the bank valued by that map.
    """
    keys = key_options(data)
    first = ["--knn-bank", str(BANK[method]), *keys]
    steps = {"export": first, "round": keys}
    if method == "maxmin":
        steps["export"] = [*first, "--mask-range", str(data)]
        steps["weight"] = ["--knn-alpha", str(MAXMIN_ALPHA), *keys]
    return steps


def check_source(card: dict[str, Any]) -> str:
    """The source's method; ValueError (its message for the user) when this chain does not fit it."""
    method = card.get("method")
    if method not in BANK:
        raise ValueError(
            f"the chain is for NEGEV and Max-Min models; this one is {method!r} (a stage-1 CAM "
            "model takes histo-wsl models export --mask-range alone)"
        )
    if (card.get("refine") or {}).get("method") != "knn":
        raise ValueError(
            "the model has no k-NN refinement; train it with --refine knn (the shipped recipes do)"
        )
    if (card.get("training_data") or {}).get("layout") not in (None, "glas"):
        raise ValueError("the model was not trained on GlaS (its card's training_data.layout)")
    return str(method)


def plan(
    source: Path, name: str, card: dict[str, Any], data: Path, device: str, work: Path
) -> dict[str, list[str]]:
    """Every step's command line, in order (:func:`main` runs them); the model ends in
    ``work/final/<name>``. The slide is laid out from the validation images of the fold the
    source's ``card`` was trained on (the exports read its train split from its card too)."""
    method, fold = check_source(card), int((card.get("config") or {}).get("fold") or 0)
    steps: dict[str, list[str]] = {}
    exports = export_steps(method, data)
    model = source
    for i, (step, options) in enumerate(exports.items()):
        dest = work / ("final" if i == len(exports) - 1 else step)
        steps[step] = histo_wsl(
            "models", "export", str(model), "--name", name, "--dest", str(dest), *options
        )
        model = dest / name / "model.pt"
    slide = work / "slide"
    steps["slide"] = [
        sys.executable, str(Path(__file__).with_name("glas_slide.py")), "--model", str(model),
        "--data", str(data), "--fold", str(fold), "--device", device,
        "--tta", "card,flips", "--out", str(slide),
    ]  # fmt: skip
    steps["card"] = histo_wsl(
        "models", "export", str(model), "--name", name, "--dest", str(work / "final"),
        "--overwrite", "--metrics", str(slide / "eval-images" / "metrics.json"),
        "--slide-metrics", str(slide / "card.json"),
    )  # fmt: skip
    return steps


def recipe(source_card: dict[str, Any], argv: list[str]) -> str:
    """The source's recipe and this command with the exports it ran, for the card."""
    before = str(source_card.get("recipe") or "").strip()
    this = shlex.join(["python", "benchmarks/glas_ship.py", *argv])
    exports = export_steps(str(source_card.get("method")), Path("GLAS"))
    how = f"{this}, i.e. histo-wsl models export " + ", then ".join(
        shlex.join(options) for options in exports.values()
    )
    return f"{before}; then {how}" if before else how


def _move_into(folder: Path, final: Path, aside: Path) -> None:
    """``folder`` becomes ``final``; a model already there is set ``aside`` first, then removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        shutil.move(str(final), str(aside))
    shutil.move(str(folder), str(final))
    shutil.rmtree(aside, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Run the chain; print JSON; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path, help="A k-NN refined NEGEV or Max-Min checkpoint.")
    p.add_argument("--name", required=True, help="The shipped model's name (its folder).")
    p.add_argument("--dest", type=Path, default=Path("runs/ship"), help="Models folder.")
    p.add_argument(
        "--out", type=Path, help="Work folder: logs, steps, the slide's run (runs/ship-<name>)."
    )
    p.add_argument("--data", help="GlaS folder (default: ../shared/data/glas next to the repo).")
    p.add_argument("--device", default="cpu")
    p.add_argument("--overwrite", action="store_true", help="Replace <dest>/<name>.")
    p.add_argument("--skip-missing", action="store_true")
    args = p.parse_args(argv)
    data = resolve_data(args.data)
    code = missing_glas(data, args.skip_missing)
    if code is not None:
        return code
    final = args.dest / args.name
    if final.exists() and not args.overwrite:
        print(f"error: {final} exists; add --overwrite to replace it", file=sys.stderr)
        return 2
    try:
        source_card = card_of(args.source)
        method = check_source(source_card)
    except Exception as exc:  # an unreadable checkpoint, or one the chain does not fit
        print(f"error: {args.source}: {exc}", file=sys.stderr)
        return 2
    work = args.out or Path("runs") / f"ship-{args.name}"
    if work.exists():
        shutil.rmtree(work)
    steps = plan(args.source, args.name, source_card, data, args.device, work)
    steps["card"] += ["--recipe", recipe(source_card, argv if argv is not None else sys.argv[1:])]
    seconds: dict[str, float] = {}
    for step, cmd in steps.items():
        code, secs = run_logged(cmd, work / "logs" / f"{step}.log")
        seconds[step] = round(secs, 1)
        if code != 0:
            print(
                f"error: step {step} failed; see {work / 'logs' / (step + '.log')}", file=sys.stderr
            )
            return 1
    report = json.loads((work / "slide" / "report.json").read_text(encoding="utf-8"))
    images = json.loads((work / "slide" / "eval-images" / "metrics.json").read_text())
    f1 = eval_numbers(images["models"][0])
    _move_into(work / "final" / args.name, final, work / "replaced")
    keep = ("slide_pxap", "slide_dice", "papers_protocol_pxap", "papers_protocol_dice", "gap")
    print(
        json.dumps(
            {
                "benchmark": "glas_ship",
                "source": str(args.source),
                "method": method,
                "model": str(final / "model.pt"),
                **{k: report.get(k) for k in keep},
                "papers_protocol_f1_pos": f1["f1_pos"],
                "papers_protocol_f1_neg": f1["f1_neg"],
                "tissue_bounds": report.get("tissue_bounds"),
                "flips": (report.get("other_tta") or {}).get("flips"),
                "seconds": seconds,
                "commands": {k: shlex.join(v) for k, v in steps.items()},
                "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
