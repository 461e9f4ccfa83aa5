"""benchmarks/glas_gpu.py: the pack travels, and the whole GPU run works on a CPU in tiny form."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import glas_gpu  # noqa: E402


def _glas_like(root: Path, n: int = 12) -> Path:
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


def test_pack_reencodes_images_and_keeps_masks_lossless(tmp_path):
    glas = _glas_like(tmp_path / "glas")
    info = glas_gpu.pack(glas, tmp_path / "pack", quality=95)
    assert info["images"] == 12 and info["bytes"] > 0
    pack = tmp_path / "pack"
    assert sorted(p.name for p in pack.iterdir()) == ["PACK.json", "splits", "train"]
    assert (pack / "train" / "train_0.jpg").is_file()
    original = np.asarray(Image.open(glas / "train" / "train_3_anno.bmp"))
    assert np.array_equal(np.asarray(Image.open(pack / "train" / "train_3_anno.png")), original)
    with pytest.raises(SystemExit, match="exists"):
        glas_gpu.pack(glas, pack, quality=95)


@pytest.mark.slow
def test_tiny_run_trains_evaluates_and_exports_all_three_methods(tmp_path, capsys):
    glas_gpu.pack(_glas_like(tmp_path / "glas"), tmp_path / "pack", quality=95)
    out, models = tmp_path / "run", tmp_path / "models"
    args = ["run", "--tiny", "--data", str(tmp_path / "pack"), "--out", str(out)]
    code = glas_gpu.main([*args, "--device", "cpu", "--workers", "0", "--export", str(models)])
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report["exit_codes"]
    assert set(report["runs"]) == {"cam", "maxmin", "negev-paper", "negev-knn"}
    assert all(r["status"] == "done" and r["epochs_run"] == 2 for r in report["runs"].values())
    for label in ("cam/best-cls", "negev-paper/best-loc", "negev-knn/best-loc", "maxmin/best-loc"):
        assert 0.0 <= report["val_18_images"][label]["pxap"] <= 100.0
    assert report["val_18_images"]["maxmin/best-loc-native"]["f1_pos"] is not None
    assert report["best_negev"] in ("negev-paper", "negev-knn")
    for name in ("glas-negev-gpu", "glas-maxmin-gpu"):
        assert (models / name / "model.pt").is_file() and (models / name / "card.yaml").is_file()
    # the runs took their data on the device, under --time-limit
    cam = (out / "cam" / "config.yaml").read_text()
    assert "data_on_device: true" in cam and "time_limit:" in cam
    assert glas_gpu.main([*args, "--device", "cpu"]) == 2  # a used --out is refused
