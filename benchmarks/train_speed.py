"""Training throughput: the real loader + step against pure forward+backward on in-memory tensors.

Both rates are measured in the same run, on the same model, batch size and crop: (a) the compute
limit, forward + backward + SGD step of random tensors already in memory; (b) what
``train-classifier`` does, batches from ``LabelledImages`` with the training preset through a
``DataLoader`` with ``--workers`` processes, then the same step. Target: (b) / (a) >= 0.85 (the
loader must not starve the model). Also prints the peak RSS of the process.

    python benchmarks/train_speed.py                       # synthetic patches, CPU
    python benchmarks/train_speed.py --data ../shared/data/glas --steps 12
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time

import torch
import torch.nn.functional as F  # noqa: N812

from histo_wsl.data.images import LabelledImages, train_transform
from histo_wsl.data.sources import load_samples
from histo_wsl.networks.classifier import build_classifier, param_groups
from histo_wsl.synthetic.patches import write_patch_dataset
from histo_wsl.training.engine import FillingSampler, resolve_device

TARGET = 0.85


def _step(model, opt, images, labels):
    loss = F.cross_entropy(model(images), labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="dataset (default: synthetic patches written to a temp dir)")
    ap.add_argument("--backbone", default="mobilenetv2")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = resolve_device(args.device)
    resize = int(round(args.crop * 256 / 224))
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or write_patch_dataset(tmp, n_per_class=32, size=resize, seed=0)
        ds = load_samples(data)
        train = LabelledImages(ds.split("train"), resize, train_transform(args.crop))
        model = build_classifier(args.backbone, "wgap", len(ds.class_names), pretrained=False).to(
            device
        )
        model.train()
        opt = torch.optim.SGD(param_groups(model, 1e-3), lr=1e-3, momentum=0.9)
        x = torch.randn(args.batch_size, 3, args.crop, args.crop, device=device)
        y = torch.randint(0, 2, (args.batch_size,), device=device)
        _step(model, opt, x, y)  # warm-up
        t0 = time.perf_counter()
        for _ in range(args.steps):
            _step(model, opt, x, y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        pure = args.steps * args.batch_size / (time.perf_counter() - t0)

        sampler = FillingSampler(len(train), args.batch_size, seed=0)
        loader = torch.utils.data.DataLoader(
            train,
            batch_size=args.batch_size,
            sampler=sampler,
            num_workers=args.workers,
            drop_last=True,
            pin_memory=device.type == "cuda",
            persistent_workers=args.workers > 0,
        )
        done, t0, first = 0, None, True
        while done < args.steps:
            for batch in loader:
                images = batch["image"].to(device, non_blocking=True)
                labels = batch["label"].to(device, non_blocking=True)
                _step(model, opt, images, labels)
                if first:  # the first batch pays the worker start-up: not counted
                    first, t0 = False, time.perf_counter()
                    continue
                done += 1
                if done >= args.steps:
                    break
        if device.type == "cuda":
            torch.cuda.synchronize()
        real = args.steps * args.batch_size / (time.perf_counter() - t0)
    ratio = real / pure
    result = {
        "benchmark": "train_speed",
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "device": str(device),
            "torch_threads": torch.get_num_threads(),
        },
        "backbone": args.backbone,
        "batch_size": args.batch_size,
        "crop": args.crop,
        "workers": args.workers,
        "steps": args.steps,
        "data": str(data),
        "pure_images_per_s": round(pure, 2),
        "train_images_per_s": round(real, 2),
        "ratio": round(ratio, 3),
        "target": TARGET,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "pass": ratio >= TARGET,
    }
    print(json.dumps(result, indent=2))
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
