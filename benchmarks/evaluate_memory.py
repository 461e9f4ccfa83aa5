"""Memory of ``histo-wsl evaluate``: peak RSS must not grow with the number of images (streaming).

Writes a CSV dataset of random 256² images with rectangular masks (half of them of a fully negative
class), an untrained tiny checkpoint (mobilenetv2, input 48 px), then runs ``run_evaluate`` with the
``native`` protocol (maps resized back to 256², 0.5 MB of float64 each) and a 1000-resample bootstrap
on ``--small`` and on ``--large`` images, each in its own process, and compares their peak RSS.
Keeping every map would add about 0.5 MB per image (1.5 GB for 3000 images). Target: the large run's
peak RSS <= 1.15 × the small run's. Prints one JSON object; exit status 1 when the target is missed.

    python benchmarks/evaluate_memory.py                    # 250 vs 1000 images
    python benchmarks/evaluate_memory.py --small 500 --large 3000
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TARGET = 1.15


def write_dataset(root: Path, n: int, size: int = 256, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = []
    for i in range(n):
        label = "gland" if i % 2 == 0 else "normal"
        image = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
        mask = np.zeros((size, size), np.uint8)
        if label == "gland":
            y, x = rng.integers(0, size // 2, size=2)
            mask[y : y + size // 3, x : x + size // 3] = 255
        Image.fromarray(image).save(root / "images" / f"{i:05d}.png", compress_level=1)
        Image.fromarray(mask).save(root / "masks" / f"{i:05d}.png")
        rows.append((f"images/{i:05d}.png", label, f"masks/{i:05d}.png"))
    path = root / "dataset.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "label", "mask"])
        w.writerows(rows)
    return path


def write_checkpoint(path: Path) -> Path:
    import torch

    from histo_wsl.data.images import IMAGENET_MEAN, IMAGENET_STD
    from histo_wsl.networks.classifier import build_classifier
    from histo_wsl.registry.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = build_classifier("mobilenetv2", "wgap", 2, pretrained=False)
    card = {
        "method": "cam",
        "backbone": "mobilenetv2",
        "head": "wgap",
        "head_opts": {},
        "cam_method": "cam",
        "num_classes": 2,
        "class_names": ["gland", "normal"],
        "negative_class": "normal",
        "input_size": 48,
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "threshold": 0.5,
    }
    return save_checkpoint(path, card, model.state_dict())


def child(data: str, ckpt: str, out: str) -> None:
    """Run one evaluation and print its time and peak RSS (MB)."""
    import torch

    from histo_wsl.evaluation.data import EvalSettings
    from histo_wsl.evaluation.images import run_evaluate

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    summary = run_evaluate(
        EvalSettings(
            models=[Path(ckpt)],
            data=data,
            out=Path(out),
            split="all",
            protocol="native",
            bootstrap=1000,
            device="cpu",
            batch_size=32,
        ),
        quiet=True,
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "n_images": summary["data"]["n_images"],
                "seconds": round(time.perf_counter() - t0, 2),
                "peak_rss_mb": round(peak, 1),
            }
        )
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=250)
    ap.add_argument("--large", type=int, default=1000)
    ap.add_argument("--child", nargs=3, metavar=("DATA", "CKPT", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return 0
    with tempfile.TemporaryDirectory(prefix="evaluate-memory-") as tmp:
        root = Path(tmp)
        ckpt = write_checkpoint(root / "model.pt")
        runs = {}
        for key, n in (("small", args.small), ("large", args.large)):
            data = write_dataset(root / key, n)
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    str(data),
                    str(ckpt),
                    str(root / f"out-{key}"),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            runs[key] = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = runs["large"]["peak_rss_mb"] / runs["small"]["peak_rss_mb"]
    result = {
        "benchmark": "evaluate_memory",
        **runs,
        "ratio": round(ratio, 3),
        "target": f"ratio <= {TARGET}",
        "kept_maps_would_add_mb": round((args.large - args.small) * 256 * 256 * 8 / 2**20, 1),
        "ok": ratio <= TARGET,
    }
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
