"""benchmarks/glas_gpu.py: the pack travels, and the whole GPU run works on a CPU in tiny form."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import glas_gpu  # noqa: E402
from factories import glas_like as _glas_like  # noqa: E402


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
