"""Objects several test modules build: checkpoints with their cards, a GlaS-layout folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from histo_wsl.data.images import IMAGENET_MEAN, IMAGENET_STD
from histo_wsl.networks.classifier import build_classifier
from histo_wsl.registry.checkpoint import save_checkpoint

#: input size of the checkpoints of :func:`make_checkpoint`
SIZE = 48


def make_checkpoint(path: Path, seed: int = 0, threshold: float = 0.5) -> Path:
    """A stage-1 checkpoint of an untrained network with the card train-classifier writes."""
    torch.manual_seed(seed)
    model = build_classifier("mobilenetv2", "wgap", 2, pretrained=False)
    card = {
        "method": "cam",
        "stage": 1,
        "backbone": "mobilenetv2",
        "head": "wgap",
        "head_opts": {},
        "cam_method": "cam",
        "num_classes": 2,
        "class_names": ["gland", "normal"],
        "negative_class": "normal",
        "input_size": SIZE,
        "resize_size": 56,
        "data_mpp": 1.0,
        "mpp": 1.33,
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "threshold": threshold,
        "training_data": {},
        "config": {},
        "versions": {},
    }
    return save_checkpoint(path, card, model.state_dict())


def maxmin_card() -> dict:
    """The card of a 2-class MobileNetV2 Max-Min checkpoint (min-max mask, w 5, σ 0.15)."""
    return {
        "method": "maxmin",
        "backbone": "mobilenetv2",
        "head": "wildcat",
        "num_classes": 2,
        "class_names": ["benign", "malignant"],
        "maxmin": {
            "mask": "minmax",
            "negative_index": None,
            "w": 5.0,
            "sigma": 0.15,
            "cl_scale": 0.8,
        },
    }


def negev_card(backbone: str, input_size: int, **extra) -> dict:
    """The card of a 2-class NEGEV checkpoint over a ``backbone`` classifier (``extra`` added)."""
    clf = {
        "method": "cam",
        "backbone": backbone,
        "head": "wgap",
        "head_opts": {},
        "num_classes": 2,
        "class_names": ["gland", "normal"],
    }
    card = {
        **clf,
        "method": "negev",
        "stage": 2,
        "classifier_card": clf,
        "input_size": input_size,
        "mpp": 2.0,
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
    }
    return {**card, **extra}


def glas_like(root: Path, n: int = 12) -> Path:
    """A GlaS-layout folder: n images (discs of 'glands' on pink stroma), masks, fold 0 split."""
    rng = np.random.default_rng(0)
    (root / "train").mkdir(parents=True)
    (root / "splits").mkdir()
    rows = ["image,label,split,valpx"]
    yy, xx = np.mgrid[:60, :80]
    for i in range(n):
        mask = np.zeros((60, 80), bool)
        for _ in range(3):
            cy, cx, r = rng.integers(10, 50), rng.integers(10, 70), rng.integers(5, 12)
            mask |= (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        img = np.where(mask[..., None], (120, 60, 150), (230, 170, 200)).astype(np.uint8)
        img = np.clip(img + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "train" / f"train_{i}.bmp")
        Image.fromarray((mask * 255).astype(np.uint8)).save(root / "train" / f"train_{i}_anno.bmp")
        split = "train" if i < 8 else "val"
        rows.append(f"train_{i},{i % 2},{split},{int(i >= 10)}")
    (root / "splits" / "fold-0.csv").write_text("\n".join(rows) + "\n")
    return root
