"""The papers' protocol on one GPU in minutes: CAM, NEGEV and Max-Min on GlaS fold 0, side by side.

Two steps: ``pack`` (here, where GlaS is) makes a copy small enough to travel with the repository
to a GPU machine; ``run`` (there) trains and evaluates everything in one go and prints one JSON
object.

    python benchmarks/glas_gpu.py pack ../shared/data/glas .gpu/glas    # ~16 MB: JPEG q95 + PNG masks
    python benchmarks/glas_gpu.py run --data .gpu/glas --out runs/glas-gpu --export runs/glas-gpu/models
    python benchmarks/glas_gpu.py run --tiny --data <glas-like folder> --device cpu   # plumbing check

``run`` starts the CAM classifier (stage 1) and Max-Min together; when stage 1 ends it starts the
two NEGEV decoders over its ``best-cls.pt`` (the paper's n = 1 CAM seeds, and this project's k-NN
seeds, n = 20, k-NN refined map); all four share the GPU. Every training keeps its data on the GPU
(``--data-on-device``: decoded once, batches cropped, flipped and jittered there), runs under AMP
in channels-last, and validates every 10 epochs (NEGEV 20, Max-Min 2; ``--eval-every``).
``--budget`` (minutes) bounds the whole run: each training gets a ``--time-limit`` that ends it,
saved and selected as far as it got, in time for the evaluations; the JSON says how many epochs
each ran. Then each run's ``best-loc.pt`` (and the CAM's ``best-cls.pt``) is evaluated on the 18
validation images (``histo-wsl evaluate --split val``; Max-Min also ``--protocol native``, the TMI
protocol), and with ``--export DIR`` the better NEGEV and the Max-Min model are exported (fp16) as
``DIR/glas-negev-gpu`` and ``DIR/glas-maxmin-gpu``.

The recipes (:data:`RUNS`) are the papers' (method.md §1.4, §2.3) with the one network whose
ImageNet weights these machines hold, MobileNetV2 (stride 8): stage 1 and NEGEV 1000 epochs, batch
32, lr 0.003 / 0.1 stepped ×0.1 every 250 epochs; Max-Min 80 epochs, batch 8, 416-px crops of
448-px images, lr 0.001 stepped at 64, SEM, λ 0.3.

The pack re-encodes the images as JPEG (quality 95; the masks stay lossless PNG) so that GlaS's
65 MB fit the 64 MB a GPU call carries; numbers printed there are on the packed images. Give the
returned models the shipped ones' k-NN edits and measure them here, on the original images, for
the numbers that go into a card: ``python benchmarks/glas_ship.py <returned model.pt> --name
<name>`` (both protocols on the validation slide; docs/results.md, *From a trained model to a
shipped one*).

Exit status: 0 when every step ran, 1 when one failed, 2 for bad arguments or missing data.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _runs import eval_numbers, flags, histo_wsl, missing_glas  # noqa: E402
from glas_maxmin import RECIPES as MAXMIN_RECIPES  # noqa: E402
from glas_negev import RECIPES as NEGEV_RECIPES  # noqa: E402

#: what every GPU training adds to its recipe
GPU = {"amp": True, "channels_last": True, "data_on_device": True, "eval_every": 10}
#: name -> (command, options, the run whose best-cls.pt it takes as --classifier, or None): the
#: GPU recipes of glas_negev.py and glas_maxmin.py, with MobileNetV2 for stage 1
RUNS: dict[str, tuple[str, dict[str, Any], str | None]] = {
    "cam": (
        "train-classifier",
        {**NEGEV_RECIPES["gpu"]["stage1"], "backbone": "mobilenetv2", **GPU},
        None,
    ),
    "maxmin": ("train-classifier", {**MAXMIN_RECIPES["gpu"], **GPU, "eval_every": 2}, None),
    "negev-paper": (
        "train-decoder",
        {**NEGEV_RECIPES["gpu"]["stage2"], **GPU, "eval_every": 20},
        "cam",
    ),
    "negev-knn": (
        "train-decoder",
        {
            **NEGEV_RECIPES["gpu"]["stage2"],
            "seeds_fg": 20,
            "seeds_bg": 20,
            "seed_map": "knn",
            "refine": "knn",
            **GPU,
            "eval_every": 20,
        },
        "cam",
    ),
}
#: ``--tiny``: every run shrunk to a CPU plumbing check on small images, random weights
TINY = {
    "epochs": 2,
    "max_steps_per_epoch": 1,
    "eval_every": 1,
    "batch_size": 4,
    "pretrained": False,
    "resize_size": 64,
    "crop_size": 56,
    "knn_bank": 256,
}
#: minutes kept at the end of ``--budget`` for the evaluations and exports
RESERVE_MIN = 1.5


def pack(glas: Path, dest: Path, quality: int) -> dict[str, Any]:
    """Copy GlaS's splits and masks, re-encode its images as JPEG; returns sizes and counts."""
    from PIL import Image

    if dest.exists():
        raise SystemExit(f"error: {dest} exists; remove it or pick another folder")
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "train").mkdir(parents=True)
    shutil.copytree(glas / "splits", tmp / "splits")
    for extra in ("Grade.csv",):
        if (glas / extra).is_file():
            shutil.copy2(glas / extra, tmp / extra)
    n = 0
    for path in sorted((glas / "train").iterdir()):
        if path.stem.endswith("_anno"):
            with Image.open(path) as m:
                m.save(tmp / "train" / f"{path.stem}.png", optimize=True)
        elif path.suffix.lower() in (".png", ".bmp"):
            with Image.open(path) as im:
                im.convert("RGB").save(tmp / "train" / f"{path.stem}.jpg", quality=quality)
            n += 1
    info = {
        "source": str(glas.resolve()),
        "images": n,
        "image_format": f"JPEG quality {quality}",
        "masks": "PNG (lossless)",
        "bytes": sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()),
    }
    (tmp / "PACK.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    tmp.rename(dest)
    return info


def _plan(args: argparse.Namespace) -> dict[str, tuple[str, dict[str, Any], str | None]]:
    runs = {}
    for name, (command, options, after) in RUNS.items():
        opts = {**options, "fold": args.fold, "seed": args.seed}
        if args.tiny:
            opts.update(TINY)
            opts["amp"] = opts["channels_last"] = False
            if command == "train-decoder":  # the decoder takes its backbone from the classifier
                opts.pop("pretrained")
        runs[name] = (command, opts, after)
    return runs


def _epochs_run(out: Path) -> dict[str, Any]:
    """Epochs run, seconds and status of a finished (or stopped) training folder."""
    try:
        run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"status": "no run.json"}
    summary = run.get("summary") or {}
    rows = list(csv.DictReader(open(out / "summary.csv", newline="", encoding="utf-8")))
    best = summary.get("checkpoints", {}).get("best-loc.pt", {})
    return {
        "status": run.get("status"),
        "epochs_run": summary.get("epochs_run"),
        "epochs": summary.get("epochs"),
        "seconds": summary.get("seconds"),
        "best_loc_epoch": best.get("epoch"),
        "valpx_pxap": best.get("value"),
        "seconds_per_epoch": round(
            sum(float(r.get("seconds") or 0) for r in rows) / max(len(rows) - 1, 1), 3
        ),
    }


def run(args: argparse.Namespace) -> int:
    """Train the four runs concurrently (NEGEV after stage 1), evaluate, export; print JSON."""
    data = Path(args.data)
    code = missing_glas(data, False)
    if code is not None:
        return code
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"error: {out} is not empty; give another --out", file=sys.stderr)
        return 2
    (out / "logs").mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    deadline = t_start + 60.0 * (args.budget - RESERVE_MIN)
    runtime = {"device": args.device, "workers": args.workers}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    plan = _plan(args)
    live: dict[str, tuple[subprocess.Popen, Any]] = {}
    codes: dict[str, int] = {}
    commands: dict[str, str] = {}

    def start(name: str) -> None:
        command, opts, after = plan[name]
        minutes = max((deadline - time.monotonic()) / 60.0, 0.1)
        if name == "cam" and not args.tiny:  # stage 1 leaves the NEGEV runs half the budget
            minutes = max(minutes * 0.45, 0.1)
        extra = {"time_limit": round(minutes, 2)}
        if after is not None:
            extra["classifier"] = str(out / after / "best-cls.pt")
        cmd = histo_wsl(
            command,
            str(data),
            "--out",
            str(out / name),
            "--quiet",
            *flags({**opts, **extra}),
            *flags(runtime),
        )
        commands[name] = shlex.join(cmd)
        log = open(out / "logs" / f"{name}.log", "w", encoding="utf-8")
        log.write(f"$ {commands[name]}\n")
        log.flush()
        live[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log)
        print(f"[{time.monotonic() - t_start:6.1f} s] started {name}", file=sys.stderr)

    for name, (_, _, after) in plan.items():
        if after is None:
            start(name)
    while live:
        time.sleep(1.0)
        for name, (proc, log) in list(live.items()):
            if proc.poll() is None:
                continue
            log.close()
            codes[name] = proc.returncode
            del live[name]
            print(
                f"[{time.monotonic() - t_start:6.1f} s] {name} exited {proc.returncode}",
                file=sys.stderr,
            )
            for other, (_, _, after) in plan.items():
                if after == name and proc.returncode == 0:
                    start(other)
    trained = time.monotonic() - t_start

    # evaluations, side by side: (name, checkpoint, extra options)
    evals = [("cam/best-cls", out / "cam" / "best-cls.pt", [])]
    for name in plan:
        evals.append((f"{name}/best-loc", out / name / "best-loc.pt", []))
    evals.append(
        ("maxmin/best-loc-native", out / "maxmin" / "best-loc.pt", ["--protocol", "native"])
    )
    procs = []
    for label, ckpt, extra in evals:
        if not ckpt.is_file():
            continue
        folder = out / "eval" / label.replace("/", "-")
        cmd = histo_wsl(
            "evaluate",
            str(ckpt),
            "--data",
            str(data),
            "--fold",
            str(args.fold),
            "--split",
            "val",
            "--out",
            str(folder),
            "--quiet",
            "--device",
            args.device,
            *extra,
        )
        log = open(out / "logs" / f"eval-{folder.name}.log", "w", encoding="utf-8")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        procs.append((label, folder, proc, log))
    results: dict[str, Any] = {}
    for label, folder, proc, log in procs:
        codes[f"eval {label}"] = proc.wait()
        log.close()
        metrics = folder / "metrics.json"
        if metrics.is_file():
            models = json.loads(metrics.read_text(encoding="utf-8")).get("models") or [{}]
            results[label] = eval_numbers(models[0])

    exported: dict[str, str] = {}
    negevs = [n for n in plan if n.startswith("negev") and f"{n}/best-loc" in results]
    best_negev = max(negevs, key=lambda n: results[f"{n}/best-loc"]["pxap"] or -1, default=None)
    if args.export:
        for name, run_name in (("glas-negev-gpu", best_negev), ("glas-maxmin-gpu", "maxmin")):
            if run_name is None or not (out / run_name / "best-loc.pt").is_file():
                continue
            cmd = histo_wsl(
                "models",
                "export",
                str(out / run_name / "best-loc.pt"),
                "--name",
                name,
                "--dest",
                str(args.export),
                "--recipe",
                commands.get(run_name, ""),
            )
            with open(out / "logs" / f"export-{name}.log", "w", encoding="utf-8") as log:
                codes[f"export {name}"] = subprocess.call(
                    cmd, stdout=log, stderr=subprocess.STDOUT, env=env
                )
            exported[name] = str(Path(args.export) / name)

    report = {
        "data": str(data),
        "device": args.device,
        "gpu": _gpu_name(),
        "budget_min": args.budget,
        "seconds_training": round(trained, 1),
        "seconds": round(time.monotonic() - t_start, 1),
        "runs": {name: _epochs_run(out / name) for name in plan},
        "val_18_images": results,
        "best_negev": best_negev,
        "exported": exported,
        "exit_codes": codes,
        "commands": commands,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2))
    return 0 if all(c == 0 for c in codes.values()) and len(results) == len(evals) else 1


def _gpu_name() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - a report field, never a failure
        return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="step", required=True)
    pk = sub.add_parser("pack", help="Copy GlaS small enough to travel (JPEG images).")
    pk.add_argument("glas", type=Path)
    pk.add_argument("dest", type=Path)
    pk.add_argument("--quality", type=int, default=95)
    r = sub.add_parser("run", help="Train, evaluate and export on this machine's GPU.")
    r.add_argument("--data", required=True, help="A GlaS folder or a pack of one.")
    r.add_argument("--out", default="runs/glas-gpu")
    r.add_argument("--fold", type=int, default=0)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default="cuda")
    r.add_argument("--workers", type=int, default=2, help="Evaluation data-loader processes.")
    r.add_argument("--budget", type=float, default=7.5, help="Minutes for the whole run.")
    r.add_argument("--export", help="Export the better NEGEV and the Max-Min model here.")
    r.add_argument("--tiny", action="store_true", help="A CPU plumbing check on small images.")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """``pack`` or ``run``; returns the exit status."""
    args = parse_args(argv)
    if args.step == "pack":
        print(json.dumps(pack(args.glas, args.dest, args.quality), indent=2))
        return 0
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
