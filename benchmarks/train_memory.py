"""Peak memory of training with the CLI's defaults: ``train-classifier`` then ``train-decoder``.

Target: training with the default settings must fit a 16 GB workstation beside other work, i.e.
the peak resident memory of the whole training process tree (the main process plus its data-loader
workers) stays at or below ``--limit-gb`` (6 GB).

Each command runs in a fresh child, ``python -m histo_wsl ...`` with the defaults, only shortened
(``--epochs E --max-steps-per-epoch S --device cpu``; options in ``--extra`` are appended to both
commands, e.g. ``--extra "--batch-size 16 --workers 1"``). Validation runs before epoch 1 and after
every epoch, so full validation passes are measured. ``--epochs`` defaults to 2 on purpose: the
engine makes a new DataLoader every epoch, and from epoch 2 on its workers are forked from a main
process that still holds the (freed but not returned) heap of epoch 1; they share it copy-on-write,
so each worker's RSS is about the parent's, and pages the parent then rewrites are duplicated. With
``--epochs 1`` only the smaller epoch-1 peak is seen. Cases:

1. synthetic: a CSV of 224 px patches (``write_patch_dataset``, enough for S full batches);
   ``train-classifier DATA --out T/cam ...``, then ``train-decoder DATA --classifier
   T/cam/best-cls.pt --out T/negev ...``;
2. GlaS fold 0 (``--glas``, default ``../shared/data/glas`` when it exists): the same two commands
   with ``--fold 0`` (67 training images: at most 3 steps per epoch at batch 32).

Memory is sampled every ``--interval`` s with psutil over the child's process tree: the sum of RSS
(the target's metric) and the sum of PSS (shared copy-on-write pages counted once: what the tree
really takes; a forked worker's RSS includes the parent pages it shares). The main process's own
exact peak comes from ``os.wait4`` (``ru_maxrss``). Samples taken while the main process has
children (the data-loader workers, alive only during the training loop; validation uses none) give
``train_loop_*``, the others (start-up, validation, checkpoints) ``outside_loop_*``.

Pretrained weights: the backbone's ImageNet file is taken from ``$TORCH_HOME`` when it holds it;
otherwise a randomly initialised torchvision state dict is written under a temporary TORCH_HOME
(same tensors, same memory). The data and weights are made by a child process so that this process
stays small (on Linux a child's ``ru_maxrss`` starts from its parent's peak at ``fork``).

Output: one JSON object; exit status 1 when a command fails or peaks above the limit.

    export TORCH_HOME=/work/shared/data/weights
    python benchmarks/train_memory.py                              # defaults (batch 32, 2 workers)
    python benchmarks/train_memory.py --extra "--batch-size 16 --workers 1"
    python benchmarks/train_memory.py --no-glas --steps 4 --metric pss
    python benchmarks/train_memory.py --epochs 1                   # first epoch only (faster)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import DEFAULT_GLAS, histo_wsl  # noqa: E402

MB = 2**20
#: share of each class that ``write_patch_dataset`` puts in ``val`` (its default)
VAL_FRACTION = 0.25

PREPARE_CODE = """
import inspect, json, os, sys
from pathlib import Path
backbone, fallback, data_dir, steps, n_min, size, val_fraction = sys.argv[1:8]
from histo_wsl.cli.train import train_classifier
defaults = {k: p.default for k, p in inspect.signature(train_classifier).parameters.items()
            if k in ("batch_size", "workers", "epochs", "backbone")}
batch = int(sys.argv[8]) if len(sys.argv) > 8 else defaults["batch_size"]
out = {"cli_defaults": defaults}
if backbone != "-":
    from histo_wsl.networks.backbones import weights_path
    path = weights_path(backbone)
    if path.is_file():
        out["weights"] = {"kind": "imagenet file", "path": str(path),
                          "torch_home": os.environ.get("TORCH_HOME")}
    else:
        os.environ["TORCH_HOME"] = fallback
        path = weights_path(backbone)
        path.parent.mkdir(parents=True, exist_ok=True)
        import torch, torchvision.models as tvm
        ctor = {"mobilenetv2": "mobilenet_v2", "inceptionv3": "inception_v3"}.get(backbone, backbone)
        torch.manual_seed(0)
        torch.save(getattr(tvm, ctor)(weights=None).state_dict(), path)
        out["weights"] = {"kind": "random init (no ImageNet file found)", "path": str(path),
                          "torch_home": fallback}
if data_dir != "-":
    import math
    from histo_wsl.synthetic.patches import write_patch_dataset
    n = max(int(n_min), math.ceil(int(steps) * batch / (2 * (1 - float(val_fraction)))))
    out["synthetic"] = {
        "csv": str(write_patch_dataset(data_dir, n_per_class=n, size=int(size), seed=0)),
        "n_per_class": n, "size": int(size)}
print(json.dumps(out))
"""


def option_value(tokens: list[str], name: str) -> str | None:
    """The value of ``--name V`` or ``--name=V`` in ``tokens`` (the last one wins), else None."""
    value = None
    for i, tok in enumerate(tokens):
        if tok == name and i + 1 < len(tokens):
            value = tokens[i + 1]
        elif tok.startswith(name + "="):
            value = tok.split("=", 1)[1]
    return value


def prepare(args: argparse.Namespace, work: Path, extra: list[str]) -> dict:
    """Weights (found or random) and the synthetic data, made in a child process."""
    backbone = option_value(extra, "--backbone") or "mobilenetv2"
    if "--no-pretrained" in extra:
        backbone = "-"
    cmd = [
        sys.executable,
        "-c",
        PREPARE_CODE,
        backbone,
        str(work / "torch_home"),
        "-" if args.data or args.no_synthetic else str(work / "synthetic"),
        str(args.steps),
        str(args.n_per_class),
        str(args.patch_size),
        str(VAL_FRACTION),
    ]
    batch = option_value(extra, "--batch-size")
    if batch is not None:
        cmd.append(batch)
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _tree_sample(main: psutil.Process) -> tuple[float, float, float, float, int] | None:
    """(sum RSS, sum PSS, main RSS, workers' RSS) in bytes and the number of children, or None."""
    try:
        children = main.children(recursive=True)
    except psutil.Error:
        return None
    rss = pss = main_rss = workers = 0.0
    for i, p in enumerate([main, *children]):
        try:
            info = p.memory_full_info()
        except psutil.Error:  # a worker that just exited
            continue
        rss += info.rss
        pss += getattr(info, "pss", info.rss)
        if i == 0:
            main_rss = info.rss
        else:
            workers += info.rss
    return rss, pss, main_rss, workers, len(children)


def measure_tree(cmd: list[str], env: dict, log: Path, interval: float) -> dict:
    """Run ``cmd``; its tree's peak summed RSS / PSS (polled) and main peak (exact), in MB."""
    peaks = {
        "rss": 0.0,
        "pss": 0.0,
        "main_rss_polled": 0.0,
        "workers_rss": 0.0,
        "loop_rss": 0.0,
        "loop_pss": 0.0,
        "outside_rss": 0.0,
        "outside_pss": 0.0,
    }
    at_peak: dict = {}
    samples = loop_samples = 0
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as fh:
        fh.write(f"$ {shlex.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        main = psutil.Process(proc.pid)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid != 0:
                break
            s = _tree_sample(main)
            if s is not None:
                rss, pss, main_rss, workers, n_children = s
                samples += 1
                phase = "loop" if n_children else "outside"
                loop_samples += n_children > 0
                if rss > peaks["rss"]:
                    at_peak = {
                        "seconds": round(time.perf_counter() - start, 1),
                        "processes": 1 + n_children,
                        "main_rss_mb": round(main_rss / MB, 1),
                        "workers_rss_mb": round(workers / MB, 1),
                    }
                for key, value in (
                    ("rss", rss),
                    ("pss", pss),
                    ("main_rss_polled", main_rss),
                    ("workers_rss", workers),
                    (f"{phase}_rss", rss),
                    (f"{phase}_pss", pss),
                ):
                    peaks[key] = max(peaks[key], value)
            time.sleep(interval)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code
    kib = usage.ru_maxrss / 1024 if sys.platform == "darwin" else usage.ru_maxrss
    main_exact = kib / 1024
    # a peak between two samples: the exact main peak is a floor for the tree's peak
    rss_peak = max(peaks["rss"] / MB, main_exact)

    def mb(key: str) -> float | None:
        return round(peaks[key] / MB, 1) if peaks[key] > 0 else None

    return {
        "peak_rss_mb": round(rss_peak, 1),
        "peak_pss_mb": mb("pss"),
        # upper bound: the main process's exact peak plus the workers' polled peak
        "peak_rss_mb_upper_bound": round(main_exact + peaks["workers_rss"] / MB, 1),
        "main_peak_rss_mb_exact": round(main_exact, 1),
        "main_peak_rss_mb_polled": mb("main_rss_polled"),
        "workers_peak_rss_mb": mb("workers_rss"),
        "train_loop_peak_rss_mb": mb("loop_rss") if loop_samples else None,
        "train_loop_peak_pss_mb": mb("loop_pss") if loop_samples else None,
        "outside_loop_peak_rss_mb": mb("outside_rss"),
        "outside_loop_peak_pss_mb": mb("outside_pss"),
        "at_peak": at_peak,
        "samples": samples,
        "seconds": round(seconds, 1),
        "exit_code": code,
    }


def run_config(out: Path) -> dict:
    """``batch_size``/``workers``/``max_steps_per_epoch`` from the run's ``config.yaml``."""
    wanted = ("batch_size", "workers", "max_steps_per_epoch", "backbone")
    found: dict = {}
    path = out / "config.yaml"
    if not path.is_file():
        return found
    for line in path.read_text(encoding="utf-8").splitlines():
        key, _, value = line.partition(":")
        if key.strip() in wanted and not line.startswith(" "):
            found[key.strip()] = value.strip()
    return found


def log_tail(log: Path, n: int = 1500) -> str:
    """The end of a command's log."""
    try:
        return log.read_text(encoding="utf-8", errors="replace")[-n:]
    except OSError:
        return ""


def measure_case(
    name: str,
    data: str,
    data_opts: list[str],
    work: Path,
    args: argparse.Namespace,
    extras: dict[str, list[str]],
    env: dict,
) -> list[dict]:
    """``train-classifier`` then ``train-decoder`` on one dataset; one record per command."""
    short = [
        "--epochs",
        str(args.epochs),
        "--max-steps-per-epoch",
        str(args.steps),
        "--device",
        "cpu",
    ]
    cam, negev = work / name / "cam", work / name / "negev"
    commands = {
        "train-classifier": histo_wsl(
            "train-classifier",
            data,
            *data_opts,
            "--out",
            str(cam),
            *short,
            "--quiet",
            *extras["both"],
            *extras["classifier"],
        ),
        "train-decoder": histo_wsl(
            "train-decoder",
            data,
            *data_opts,
            "--classifier",
            str(cam / "best-cls.pt"),
            "--out",
            str(negev),
            *short,
            "--quiet",
            *extras["both"],
            *extras["decoder"],
        ),
    }
    records = []
    limit_mb = args.limit_gb * 1024
    for command, cmd in commands.items():
        out = cam if command == "train-classifier" else negev
        record: dict = {"case": name, "command_name": command, "command": shlex.join(cmd)}
        if command == "train-decoder" and not (cam / "best-cls.pt").is_file():
            record.update(status="skipped: train-classifier wrote no best-cls.pt", ok=False)
            records.append(record)
            continue
        print(f"[{name}] {shlex.join(cmd)}", file=sys.stderr)
        log = work / name / f"{command}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        r = measure_tree(cmd, env, log, args.interval)
        record.update(r)
        record["effective"] = run_config(out)
        value = r["peak_rss_mb"] if args.metric == "rss" else r["peak_pss_mb"]
        record["within_limit"] = value is not None and value <= limit_mb
        record["status"] = "done" if r["exit_code"] == 0 else f"failed (exit {r['exit_code']})"
        record["ok"] = r["exit_code"] == 0 and record["within_limit"]
        if r["exit_code"] != 0:
            record["log_tail"] = log_tail(log)
        print(
            f"[{name}] {command}: peak RSS {r['peak_rss_mb']:.0f} MB, PSS "
            f"{r['peak_pss_mb'] or 0:.0f} MB, {r['seconds']:.0f} s, {record['status']}",
            file=sys.stderr,
        )
        records.append(record)
    return records


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit-gb", type=float, default=6.0, help="peak limit, GiB (target)")
    parser.add_argument(
        "--metric",
        choices=["rss", "pss"],
        default="rss",
        help="what the limit applies to: the tree's summed RSS (default) or summed PSS",
    )
    parser.add_argument(
        "--steps", type=int, default=4, help="--max-steps-per-epoch of both commands"
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=2,
        help="--epochs of both commands (from 2: workers forked after a trained epoch, the "
        "steady state; 1 sees only the first epoch's peak)",
    )
    parser.add_argument(
        "--extra", default="", help='options appended to both commands, e.g. "--batch-size 16"'
    )
    parser.add_argument("--classifier-extra", default="", help="options for train-classifier only")
    parser.add_argument("--decoder-extra", default="", help="options for train-decoder only")
    parser.add_argument("--data", help="dataset for the first case instead of synthetic patches")
    parser.add_argument("--no-synthetic", action="store_true", help="skip the synthetic case")
    parser.add_argument(
        "--n-per-class",
        type=int,
        default=40,
        help="synthetic patches per class (at least; raised to fill --steps batches)",
    )
    parser.add_argument("--patch-size", type=int, default=224, help="synthetic patch side, px")
    parser.add_argument(
        "--glas",
        type=Path,
        default=DEFAULT_GLAS if DEFAULT_GLAS.is_dir() else None,
        help="GlaS folder for the fold-0 case (default: ../shared/data/glas when it exists)",
    )
    parser.add_argument("--no-glas", action="store_true", help="skip the GlaS case")
    parser.add_argument("--fold", type=int, default=0, help="GlaS fold")
    parser.add_argument("--interval", type=float, default=0.1, help="sampling period, s")
    parser.add_argument("--workdir", type=Path, help="scratch parent folder (default: temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (logs)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.epochs < 1:
        parser.error("--steps and --epochs must be >= 1")
    if args.no_synthetic and (args.no_glas or args.glas is None):
        parser.error("nothing to measure: --no-synthetic and no GlaS")
    extras = {
        "both": shlex.split(args.extra),
        "classifier": shlex.split(args.classifier_extra),
        "decoder": shlex.split(args.decoder_extra),
    }

    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="histo-wsl-train-memory-", dir=args.workdir)
    work = Path(tmp)
    start = time.perf_counter()
    try:
        prep = prepare(args, work, extras["both"] + extras["classifier"])
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if "weights" in prep and prep["weights"]["kind"].startswith("random"):
            env["TORCH_HOME"] = prep["weights"]["torch_home"]
        cases: list[tuple[str, str, list[str]]] = []
        if args.data:
            cases.append(("data", args.data, []))
        elif not args.no_synthetic:
            cases.append(("synthetic", prep["synthetic"]["csv"], []))
        glas = None if args.no_glas else args.glas
        if glas is not None:
            if not ((glas / "splits").is_dir() and (glas / "train").is_dir()):
                parser.error(f"--glas {glas}: not a GlaS folder (needs train/ and splits/)")
            cases.append((f"glas_fold{args.fold}", str(glas), ["--fold", str(args.fold)]))
        runs: list[dict] = []
        for name, data, data_opts in cases:
            runs += measure_case(name, data, data_opts, work, args, extras, env)
        launcher = psutil.Process().memory_info().rss / MB
    finally:
        if not args.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)

    measured = [r for r in runs if "peak_rss_mb" in r]
    worst = max(measured, key=lambda r: r["peak_rss_mb"], default=None)
    result = {
        "benchmark": "train_memory",
        "machine": {
            "cpu_count": os.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "available_gb_at_end": round(psutil.virtual_memory().available / 2**30, 1),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "limit_mb": round(args.limit_gb * 1024, 1),
        "metric": args.metric,
        "extra": args.extra,
        "classifier_extra": args.classifier_extra,
        "decoder_extra": args.decoder_extra,
        "steps": args.steps,
        "epochs": args.epochs,
        "cli_defaults": prep.get("cli_defaults"),
        "weights": prep.get("weights"),
        "synthetic": prep.get("synthetic"),
        "peak_rss_mb": {f"{r['case']}/{r['command_name']}": r.get("peak_rss_mb") for r in runs},
        "peak_pss_mb": {f"{r['case']}/{r['command_name']}": r.get("peak_pss_mb") for r in runs},
        "worst": None
        if worst is None
        else f"{worst['case']}/{worst['command_name']} {worst['peak_rss_mb']} MB",
        "pass": bool(runs) and all(r["ok"] for r in runs),
        "launcher_rss_mb": round(launcher, 1),
        "scratch": str(work) if args.keep else None,
        "runs": runs,
        "total_s": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(result, indent=2))
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
