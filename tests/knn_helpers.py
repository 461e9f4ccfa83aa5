"""Helpers shared by the k-NN tests (seed map and refiner): toy banks and a tiny classifier."""

from __future__ import annotations

from pathlib import Path

import torch
from typer.testing import CliRunner

from histo_wsl.cli.app import app
from histo_wsl.methods.knn import FeatureBank

A = [1.0, 0.0]  # two kinds of "tissue" in a 2-channel feature space
B = [0.0, 1.0]

#: tiny, fast training options
TINY = ["--batch-size", "4", "--workers", "0", "--quiet", "--device", "cpu"]


def identity_bank(rows: list[tuple[list[float], float, int]]) -> FeatureBank:
    """A bank over 2-channel features with identity projections (keys = normalised features)."""
    feats = torch.tensor([r[0] for r in rows])
    eye = (torch.zeros(2), torch.eye(2))
    bank = FeatureBank(
        torch.empty(0),
        torch.tensor([r[1] for r in rows]),
        torch.tensor([r[2] for r in rows]),
        [eye, eye],
    )
    bank.keys = bank.embed([feats, feats])
    return bank


def two_stages(pixels: list[list[float]]) -> list[torch.Tensor]:
    """Two identical stages (1,2,1,W) whose pixels are the given features."""
    x = torch.tensor(pixels).T[None, :, None, :]
    return [x, x]


def tiny_classifier(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """(data folder, stage-1 checkpoint, common options) of a 1-epoch synthetic classifier."""
    from histo_wsl.synthetic.patches import write_patch_dataset

    data = write_patch_dataset(tmp_path / "data", n_per_class=4, size=64, seed=5)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("crop_size: 48\nresize_size: 56\nmax_steps_per_epoch: 2\n")
    common = ["--config", str(cfg), "--epochs", "1", *TINY]
    r = CliRunner().invoke(
        app,
        ["train-classifier", str(data), "--out", str(tmp_path / "cam"), "--no-pretrained", *common],
    )
    assert r.exit_code == 0, r.stderr
    return data, tmp_path / "cam" / "best-loc.pt", common
