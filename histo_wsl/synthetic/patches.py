"""Synthetic H&E-like patch datasets with known gland masks (tests, the demo, benchmarks).

:func:`write_patch_dataset` crops patches that lie wholly inside the tissue of synthetic slides
(:mod:`histo_wsl.synthetic.slides`): *positive* patches hold glands (the ROI), *negative* ones hold none
(fully negative images, whose every pixel is background). Each patch has its mask, and a CSV
``image,label,mask,split`` lists them, which is one of the dataset layouts ``train-classifier`` reads.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from histo_wsl.synthetic.slides import (
    gland_mask_region,
    make_layout,
    render_region,
    tissue_mask_region,
)

__all__ = ["write_patch_dataset"]


def _crops(layout, n: int, size: int, downsample: float, positive: bool, rng) -> list[tuple]:
    """Random level-0 corners of ``size`` px patches (at ``downsample``) inside tissue."""
    side0 = int(round(size * downsample))
    out: list[tuple] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 1000:
            raise RuntimeError("could not place synthetic patches; use a larger layout")
        x = int(rng.integers(0, layout.width - side0))
        y = int(rng.integers(0, layout.height - side0))
        tissue = tissue_mask_region(layout, x, y, size, size, downsample)
        if not tissue.all():
            continue
        gland = gland_mask_region(layout, x, y, size, size, downsample)
        frac = float(gland.mean())
        if positive and not 0.15 <= frac <= 0.7:
            continue
        if not positive and frac > 0:
            continue
        out.append((x, y, gland))
    return out


def write_patch_dataset(
    out: str | Path,
    n_per_class: int = 16,
    size: int = 96,
    downsample: float = 2.0,
    val_fraction: float = 0.25,
    seed: int = 0,
) -> Path:
    """Write a two-class synthetic patch dataset and return the path of its CSV.

    Classes are ``normal`` (no gland: fully negative) and ``gland``. Files:
    ``<out>/images/<class>_<i>.png``, ``<out>/masks/<class>_<i>.png`` (0/255) and
    ``<out>/dataset.csv`` with columns ``image,label,mask,split`` (paths relative to the CSV).
    The last ``val_fraction`` of each class is the ``val`` split.

    Args:
        out: output folder (created).
        n_per_class: patches per class.
        size: patch side in pixels.
        downsample: level-0 pixels per patch pixel (the layout is at 0.5 µm/px, so 2.0 gives
            patches at 1 µm/px).
        val_fraction: share of each class in the ``val`` split.
        seed: seed of the layouts and of the crop positions.

    Returns:
        The CSV path.
    """
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    side = int(size * downsample * 6)
    with_glands = make_layout(side, side, mpp=0.5, n_sections=1, glands_per_section=24, seed=seed)
    # same seed: the same section, stain and texture, only without glands (no shortcut but glands)
    without = make_layout(side, side, mpp=0.5, n_sections=1, glands_per_section=0, seed=seed)
    rows = []
    n_val = max(1, int(round(n_per_class * val_fraction)))
    for label, layout, positive in (("normal", without, False), ("gland", with_glands, True)):
        for i, (x, y, gland) in enumerate(
            _crops(layout, n_per_class, size, downsample, positive, rng)
        ):
            name = f"{label}_{i:03d}.png"
            Image.fromarray(render_region(layout, x, y, size, size, downsample)).save(
                out / "images" / name
            )
            Image.fromarray(gland.astype(np.uint8) * 255).save(out / "masks" / name)
            split = "val" if i >= n_per_class - n_val else "train"
            rows.append((f"images/{name}", label, f"masks/{name}", split))
    csv_path = out / "dataset.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "label", "mask", "split"])
        writer.writerows(rows)
    return csv_path
