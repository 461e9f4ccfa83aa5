"""NEGEV's four ablations (NG-slides p.14-17, method.md §5.3) on GlaS fold-0 validation.

Each variant is one ``histo-wsl train-decoder`` run (a child process) over the same frozen stage-1
checkpoint (``--classifier``), written to ``--out/<run>``; the score is the best decoder PxAP on
``valpx`` over the epochs (the engine's model selection). Variants with identical settings share
one run: the paper's default (n = 1, λ = 1, random seeds, C+ and C−, no size term) is the row
``cpos_cneg`` of the terms ablation, ``random``, ``n1`` and ``lambda1`` alike, and runs once in
``--out/base``. The ablations:

* **terms**: ``cpos`` = C+ only (``--seeds-bg 0``: no background seeds at all), ``cpos_cneg`` =
  C+ and C−, ``cpos_cneg_size`` = plus the size term (``--size-lambda``). GlaS has no fully
  negative images, so the paper's D− row does not apply.
* **selection**: ``random`` (seeds drawn at every step) vs ``static`` (``--seed-mode static``:
  the n highest / n lowest CAM pixels of each crop).
* **n**: ``n1``, ``n5``, ``n50``, ``n500`` (``--seeds-fg n --seeds-bg n``).
* **lambda**: ``lambda1``, ``lambda0.1``, ``lambda0.01`` (``--seed-lambda``).

Resumable: a finished run (``run.json`` done with >= ``--epochs``) is reused, an interrupted one
(``last.pt``) is continued with ``--resume``. Writes ``--out/ablation.csv`` and ``ablation.md``
(one table of every variant, runs of earlier invocations included, with the stage-1 CAM's own
valpx PxAP as the reference row) after every run and prints one JSON object. Exit status: 0
(also when the data is absent: skipped, with a message), 1 when a run failed, 2 for bad arguments.

    python benchmarks/negev_ablation.py --classifier runs/glas-negev-cpu/stage1/best-cls.pt \\
        --out runs/negev-ablation --epochs 24 --batch-size 16 --step-size 16
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _runs import best_of, card_of, resolve_data, run_logged, run_state, train_command  # noqa: E402


@dataclass(frozen=True)
class Variant:
    """One row of an ablation table."""

    name: str
    ablation: str
    label: str
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def run(self) -> str:
        """The run folder: ``base`` for the paper's default settings, else the variant's name."""
        return "base" if not self.overrides else self.name


#: the paper's default stage-2 settings (README command with the n bug fixed; method.md §1.3)
BASE: dict[str, Any] = {
    "seeds_fg": 1,
    "seeds_bg": 1,
    "seed_lambda": 1.0,
    "seed_mode": "random",
    "size_lambda": 0.0,
}

VARIANTS: list[Variant] = [
    Variant("cpos", "terms", "C+ only (no background seeds)", {"seeds_bg": 0}),
    Variant("cpos_cneg", "terms", "C+ + C-"),
    Variant("cpos_cneg_size", "terms", "C+ + C- + size term", {"size_lambda": None}),
    Variant("random", "selection", "n=1, random selection"),
    Variant("static", "selection", "n=1, static selection", {"seed_mode": "static"}),
    Variant("n1", "n", "n=1"),
    Variant("n5", "n", "n=5", {"seeds_fg": 5, "seeds_bg": 5}),
    Variant("n50", "n", "n=50", {"seeds_fg": 50, "seeds_bg": 50}),
    Variant("n500", "n", "n=500", {"seeds_fg": 500, "seeds_bg": 500}),
    Variant("lambda1", "lambda", "λ=1"),
    Variant("lambda0.1", "lambda", "λ=0.1", {"seed_lambda": 0.1}),
    Variant("lambda0.01", "lambda", "λ=0.01", {"seed_lambda": 0.01}),
]
ABLATIONS = sorted({v.ablation for v in VARIANTS})

COLUMNS = [
    "variant",
    "ablation",
    "label",
    "settings",
    "run",
    "status",
    "best_valpx_pxap",
    "gain_vs_cam",
    "best_epoch",
    "epochs",
    "seconds",
]


def select(only: list[str] | None) -> list[Variant]:
    """Variants named in ``only`` (variant or ablation names, comma-separated allowed); all if None.

    Raises:
        ValueError: a name that is neither a variant nor an ablation.
    """
    if not only:
        return list(VARIANTS)
    names = [n.strip() for item in only for n in item.split(",") if n.strip()]
    known = {v.name for v in VARIANTS} | set(ABLATIONS)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(
            f"unknown --only {unknown}; variants: {', '.join(v.name for v in VARIANTS)}; "
            f"ablations: {', '.join(ABLATIONS)}"
        )
    return [v for v in VARIANTS if v.name in names or v.ablation in names]


def settings_of(variant: Variant, size_lambda: float) -> dict[str, Any]:
    """The stage-2 settings of a variant (the base with its overrides)."""
    values = {**BASE, **variant.overrides}
    if "size_lambda" in variant.overrides:
        values["size_lambda"] = size_lambda
    return values


def settings_text(values: dict[str, Any]) -> str:
    """Compact flag text of the settings that define a variant."""
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in values.items())


def write_table(out: Path, rows: list[dict[str, Any]]) -> None:
    """``ablation.csv`` and ``ablation.md`` in ``out`` (rewritten as a whole)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "ablation.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(rows)

    def cell(v: Any) -> str:
        if v is None or v == "":
            return "–"
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = [
        "# NEGEV ablations (valpx PxAP, %, best epoch)",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    (out / "ablation.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", help="GlaS folder (default: ../shared/data/glas) or other data.")
    p.add_argument("--classifier", help="Stage-1 checkpoint (best-cls.pt or best-loc.pt).")
    p.add_argument("--out", default="runs/negev-ablation", help="Folder of the runs and table.")
    p.add_argument(
        "--only",
        action="append",
        help="Variants or ablations to run (repeat or comma-separate), e.g. n1,static or terms.",
    )
    p.add_argument("--epochs", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--step-size", type=int, default=16)
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size-lambda", type=float, default=1.0, help="λ of the size-term variant.")
    p.add_argument("--max-steps-per-epoch", type=int, help="Cap on steps per epoch (smoke runs).")
    p.add_argument("--config", help="YAML of further train-decoder settings (fresh runs).")
    p.add_argument(
        "--decoder-args",
        default="",
        help="Extra train-decoder flags for fresh runs, one string (e.g. '--bg-sampler uniform').",
    )
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--dry-run", action="store_true", help="Print the plan; run nothing.")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the selected variants and write the table; returns the exit status."""
    args = parse_args(argv)
    try:
        variants = select(args.only)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    data = resolve_data(args.data)
    if not data.exists():
        reason = f"data not found: {data} (give --data); nothing was run"
        print(f"skipped: {reason}", file=sys.stderr)
        print(json.dumps({"status": "skipped", "reason": reason}))
        return 0
    if not args.classifier or not Path(args.classifier).is_file():
        print(
            f"error: --classifier must be a stage-1 checkpoint (got {args.classifier!r}); train "
            "one with histo-wsl train-classifier or benchmarks/glas_negev.py",
            file=sys.stderr,
        )
        return 2
    classifier = Path(args.classifier).resolve()
    out = Path(args.out).resolve()
    common: dict[str, Any] = {
        "classifier": str(classifier),
        "fold": args.fold,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "step_size": args.step_size,
        "seed": args.seed,
        "max_steps_per_epoch": args.max_steps_per_epoch,
        "config": str(Path(args.config).resolve()) if args.config else None,
    }
    runtime = {"workers": args.workers, "device": args.device}
    extra = shlex.split(args.decoder_args)

    cam = card_of(classifier) if not args.dry_run else {}
    cam_px = (cam.get("metrics") or {}).get("valpx_pxap")
    cam_row: dict[str, Any] = {
        "variant": "cam",
        "ablation": "reference",
        "label": f"CAM (stage 1, {cam.get('backbone', '?')})",
        "settings": f"{classifier.name}, epoch {cam.get('epoch', '?')}",
        "run": str(classifier),
        "status": "given",
        "best_valpx_pxap": cam_px,
        "gain_vs_cam": 0.0 if cam_px is not None else None,
        "best_epoch": cam.get("epoch"),
        "epochs": None,
        "seconds": None,
    }
    commands: list[str] = []
    outcome: dict[str, tuple[str, int]] = {}  # run folder -> (status, exit code)
    failed = False

    def table() -> list[dict[str, Any]]:
        """The CAM row and one row per variant (every variant; runs of earlier calls included)."""
        out_rows = [cam_row]
        for v in VARIANTS:
            run_dir = out / v.run
            if v.run in outcome:
                status = outcome[v.run][0]
            else:
                found = (run_dir / "summary.csv").is_file()
                done = run_state(run_dir, args.epochs) == "done"
                status = "done" if done else ("partial" if found else "not run")
            best = best_of(run_dir)
            value = best["value"]
            out_rows.append(
                {
                    "variant": v.name,
                    "ablation": v.ablation,
                    "label": v.label,
                    "settings": settings_text(settings_of(v, args.size_lambda)),
                    "run": v.run,
                    "status": status,
                    "best_valpx_pxap": value,
                    "gain_vs_cam": value - cam_px
                    if value is not None and cam_px is not None
                    else None,
                    "best_epoch": best["epoch"],
                    "epochs": best["epochs"],
                    "seconds": best["seconds"],
                }
            )
        return out_rows

    for v in variants:
        if v.run in outcome:  # a run several variants share: once
            continue
        run_dir = out / v.run
        state = run_state(run_dir, args.epochs)
        if state == "done":
            outcome[v.run] = ("reused", 0)
            continue
        values = settings_of(v, args.size_lambda)
        cmd = train_command(
            "train-decoder",
            str(data.resolve()),
            run_dir,
            args.epochs,
            {**common, **values},
            runtime,
            state,
        )
        if state == "new":
            cmd += extra
        commands.append(shlex.join(cmd))
        print(f"[{v.run}] {state}: {shlex.join(cmd)}", file=sys.stderr)
        if args.dry_run:
            outcome[v.run] = ("planned", 0)
            continue
        code, _ = run_logged(cmd, out / "logs" / f"{v.run}.log")
        status = "done" if code == 0 else f"failed (exit {code}, logs/{v.run}.log)"
        failed |= code != 0
        outcome[v.run] = (status, code)
        write_table(out, table())
    rows = table()
    if not args.dry_run:
        write_table(out, rows)
    result = {
        "status": "failed" if failed else ("planned" if args.dry_run else "done"),
        "data": str(data),
        "classifier": str(classifier),
        "out": str(out),
        "epochs": args.epochs,
        "rows": rows,
        "commands": commands,
        "table": None if args.dry_run else str(out / "ablation.md"),
    }
    print(json.dumps(result, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
