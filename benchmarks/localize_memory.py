"""Peak memory of ``localize`` on a small and a large slide: bounded, and not growing with the slide.

Writes two synthetic pyramidal TIFFs (default 10,000 and 40,000 px square at 0.5 µm/px, cached in
``--cache`` so reruns skip them; the same files as ``extract_memory.py``), then runs ``python -m
histo_wsl localize SLIDE --model M --out TMP`` on each in a fresh child process and takes the
child's peak resident set size from ``os.wait4`` (the kernel's ``ru_maxrss``, exact, no polling).
Everything heavy (slides, model) is made in children too: on Linux a child's ``ru_maxrss`` starts
from its parent's peak at ``fork``.

The model is the shipped default (``--model``, any name or checkpoint), with every step its card
switches on (k-NN refinement...). ``--untrained`` builds an untrained checkpoint of an architecture
instead (``--method``, ``--input-size``, ``--mpp``: e.g. a 128-px model at 4 µm/px reads 10x fewer
windows, for a quick check of the canvas's memory).

A ``baseline`` child imports what ``localize`` imports and loads the model, so the
slide-dependent part is ``peak - baseline``. Targets: large / small peak ratio <= 1.2, and with a
real model every peak <= 1,500 MB. Output: one JSON object; exit status 1 when a target is missed.

Usage::

    python benchmarks/localize_memory.py --cache ~/.cache/histo-wsl-bench
    python benchmarks/localize_memory.py --threads 2 --sizes 10000 30000
    python benchmarks/localize_memory.py --untrained --mpp 8 --input-size 128   # quick
    python benchmarks/localize_memory.py --output-mpp 4 --canvas-max-mb 16   # disk-backed map
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from extract_memory import (  # noqa: E402
    peak_rss,
    run_in_scratch,
    self_peak_rss_mb,
    synthetic_slide,
)

TARGET = 1.2
PEAK_TARGET_MB = 1500.0
MODEL_CODE = (
    "import sys, torch\n"
    "from pathlib import Path\n"
    "from histo_wsl.data.images import IMAGENET_MEAN, IMAGENET_STD\n"
    "from histo_wsl.networks.classifier import build_classifier\n"
    "from histo_wsl.networks.negev import NEGEVModel\n"
    "from histo_wsl.registry.checkpoint import save_checkpoint\n"
    "path, method, backbone, size, mpp = sys.argv[1:6]\n"
    "torch.manual_seed(0)\n"
    "clf = build_classifier(backbone, 'wgap', 2, pretrained=False)\n"
    "card = {'method': 'cam', 'stage': 1, 'backbone': backbone, 'head': 'wgap', 'head_opts': {},\n"
    "        'cam_method': 'cam', 'num_classes': 2, 'class_names': ['normal', 'tumour'],\n"
    "        'negative_class': 'normal', 'input_size': int(size), 'mpp': float(mpp),\n"
    "        'normalization': {'mean': list(IMAGENET_MEAN), 'std': list(IMAGENET_STD)},\n"
    "        'threshold': 0.5, 'name': 'benchmark-untrained'}\n"
    "if method == 'cam':\n"
    "    save_checkpoint(Path(path), card, clf.state_dict())\n"
    "else:\n"
    "    card2 = dict(card, method='negev', stage=2, classifier_card=card)\n"
    "    save_checkpoint(Path(path), card2, NEGEVModel(clf).state_dict())\n"
)
BASELINE_CODE = (
    "import sys, torch\n"
    "import histo_wsl.cli.app, histo_wsl.inference.localize\n"
    "import histo_wsl.slideio.writers, histo_wsl.runtime.batch\n"
    "from histo_wsl.inference.engine import Engine\n"
    "from histo_wsl.inference.params import LocalizeParams\n"
    "b = int(sys.argv[3]) or None\n"
    "e = Engine(LocalizeParams(model=sys.argv[1], device='cpu', threads=int(sys.argv[2]),\n"
    "                          batch_size=b))\n"
    "x = torch.zeros((e.batch_size, e.size, e.size, 3), dtype=torch.uint8)\n"
    "e.predict(x)\n"
)


def localize_cmd(slide: Path, model: str, out: Path, args: argparse.Namespace) -> list[str]:
    """The ``localize`` command line for one slide."""
    cmd = [sys.executable, "-m", "histo_wsl", "localize", str(slide), "--model", model]
    cmd += ["--out", str(out), "--device", "cpu"]
    if args.batch_size:
        cmd += ["--batch-size", str(args.batch_size)]
    cmd += ["--threads", str(args.threads), "--quiet", "--json"]
    if args.output_mpp is not None:
        cmd += ["--output-mpp", str(args.output_mpp)]
    if args.canvas_max_mb is not None:
        cmd += ["--canvas-max-mb", str(args.canvas_max_mb)]
    return cmd


def measure(args: argparse.Namespace, cache: Path, work: Path) -> dict:
    """Write (or reuse) the slides and the model, and measure each slide; returns the result."""
    slides: dict[int, Path] = {}
    write_s: dict[str, float] = {}
    for size in args.sizes:
        slides[size], secs = synthetic_slide(cache, size, args.slide_mpp)
        write_s[f"{size // 1000}k"] = round(secs, 1)
    model = args.model
    if args.untrained:
        model = str(work / "model.pt")
        subprocess.run(
            [sys.executable, "-c", MODEL_CODE, model, args.method, args.backbone]
            + [str(args.input_size), str(args.mpp)],
            check=True,
        )
    batch = str(args.batch_size or 0)
    baseline = peak_rss([sys.executable, "-c", BASELINE_CODE, model, str(args.threads), batch])
    if baseline["exit_code"] != 0:
        raise RuntimeError(f"baseline failed: {baseline['output_tail']}")
    runs: dict[str, dict] = {}
    for size, slide in slides.items():
        out = work / f"out_{size}"
        r = peak_rss(localize_cmd(slide, model, out, args))
        if r["exit_code"] != 0:
            raise RuntimeError(f"localize failed on {slide}: {r['output_tail']}")
        rec = json.loads((out / slide.stem / f"{slide.stem}.json").read_text(encoding="utf-8"))
        r.update(
            windows=rec["windows"],
            batch_size=rec["batch_size"],
            output_size=rec["output_size"],
            canvas=rec["canvas"],
            timings=rec["timings"],
            growth_over_baseline_mb=round(r["peak_rss_mb"] - baseline["peak_rss_mb"], 1),
        )
        del r["output_tail"]
        runs[f"{size // 1000}k"] = r

    launcher = self_peak_rss_mb()
    if launcher >= 0.5 * baseline["peak_rss_mb"]:
        raise RuntimeError(
            f"this process peaked at {launcher} MiB, too close to the children's "
            f"{baseline['peak_rss_mb']} MiB: their ru_maxrss would include it"
        )
    small, large = (f"{s // 1000}k" for s in (min(args.sizes), max(args.sizes)))
    ratio = round(runs[large]["peak_rss_mb"] / runs[small]["peak_rss_mb"], 3)
    peak = max(r["peak_rss_mb"] for r in runs.values())
    bounded = args.untrained or peak <= PEAK_TARGET_MB
    return {
        "benchmark": "localize_memory",
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        f"peak_rss_mb_{small}": runs[small]["peak_rss_mb"],
        f"peak_rss_mb_{large}": runs[large]["peak_rss_mb"],
        "ratio": ratio,
        "target": TARGET,
        "peak_target_mb": None if args.untrained else PEAK_TARGET_MB,
        "pass": ratio <= TARGET and bounded,
        "baseline_import_and_model_rss_mb": baseline["peak_rss_mb"],
        "launcher_rss_mb": launcher,
        "model": (
            f"untrained {args.method}/{args.backbone}/{args.input_size}px at {args.mpp:g} µm/px"
            if args.untrained
            else args.model
        ),
        "threads": args.threads,
        "batch_size": runs[small]["batch_size"],
        "output_mpp": args.output_mpp,
        "canvas_max_mb": args.canvas_max_mb,
        "slides": {f"{s // 1000}k": f"{s}x{s} px, {args.slide_mpp:g} µm/px" for s in args.sizes},
        "slide_write_s": write_s,
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, help="folder for the slides (default: a temp dir)")
    parser.add_argument(
        "--sizes", type=int, nargs=2, default=[10000, 40000], help="small and large side, px"
    )
    parser.add_argument("--slide-mpp", type=float, default=0.5, help="slides' µm/px")
    parser.add_argument(
        "--model", default="glas-negev-mobilenetv2", help="model name or checkpoint"
    )
    parser.add_argument(
        "--untrained", action="store_true", help="an untrained model of --method, --backbone..."
    )
    parser.add_argument("--method", choices=["negev", "cam"], default="cam")
    parser.add_argument("--backbone", default="mobilenetv2")
    parser.add_argument("--input-size", type=int, default=128, help="window side, px")
    parser.add_argument("--mpp", type=float, default=4.0, help="model µm/px")
    parser.add_argument("--output-mpp", type=float, help="map µm/px (default localize's)")
    parser.add_argument("--canvas-max-mb", type=float, help="localize --canvas-max-mb")
    parser.add_argument(
        "--batch-size", type=int, help="localize --batch-size (default: localize's own)"
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="localize --threads (0: its own choice)"
    )
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a temp dir)")
    args = parser.parse_args(argv)
    if min(args.sizes) < 1000 or args.sizes[0] == args.sizes[1]:
        parser.error("--sizes: two different sides of at least 1000 px")
    return run_in_scratch(args, measure)


if __name__ == "__main__":
    sys.exit(main())
