"""benchmarks/glas_maxmin.py: planning, --set, refusal of other settings, metrics read-back."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import glas_maxmin  # noqa: E402


def _glas(tmp_path: Path) -> Path:
    glas = tmp_path / "glas"
    (glas / "splits").mkdir(parents=True)
    (glas / "train").mkdir()
    return glas


def test_missing_glas_is_an_error_unless_skipped(tmp_path, capsys):
    missing = str(tmp_path / "glas")
    assert glas_maxmin.main(["--data", missing]) == 2
    assert "GlaS not found" in capsys.readouterr().err
    assert glas_maxmin.main(["--data", missing, "--skip-missing"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "skipped"


def test_gpu_plan_and_set_overrides(tmp_path, capsys):
    glas = _glas(tmp_path)
    args = ["--data", str(glas), "--recipe", "gpu", "--out", str(tmp_path / "o"), "--dry-run"]
    args += ["--set", "maxmin_lambda=0.05", "--set", "pretrained=false"]
    assert glas_maxmin.main(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["status"] == "planned" and len(res["commands"]) == 3
    train, ev, flips = res["commands"]
    assert "--method maxmin" in train and "--crop-size 416" in train and "--amp" in train
    assert "--maxmin-lambda 0.05" in train and "--no-pretrained" in train
    assert "--refine knn" in train and "--fold 0" in train
    for cmd, tta in ((ev, "none"), (flips, "flips")):
        assert "evaluate --compare" in cmd and "--protocol native" in cmd
        assert f"--tta {tta}" in cmd and "best-loc.pt" in cmd and "best-cls.pt" in cmd
    assert res["targets"]["f1_pos"] == 71.9 and res["target_met"] is False
    # EEM runs are held to the paper's EEM numbers
    args = ["--data", str(glas), "--out", str(tmp_path / "e"), "--dry-run"]
    assert glas_maxmin.main([*args, "--set", "maxmin_regularizer=eem"]) == 0
    assert json.loads(capsys.readouterr().out)["targets"]["f1_pos"] == 72.1
    assert glas_maxmin.main([*args, "--set", "lambda"]) == 2
    assert "expected NAME=VALUE" in capsys.readouterr().err


def test_a_folder_with_other_settings_is_refused(tmp_path, capsys):
    glas = _glas(tmp_path)
    out = tmp_path / "o"
    out.mkdir()
    record = {"recipe": "cpu", "smoke": False, "data": str(glas), "fold": 0, "train": {}}
    (out / "recipe.json").write_text(json.dumps(record))
    assert glas_maxmin.main(["--data", str(glas), "--out", str(out)]) == 2
    assert "other settings" in capsys.readouterr().err


def test_values_and_numbers():
    assert [glas_maxmin.parse_value(v) for v in ("3", "0.1", "True", "none", "sem")] == [
        3,
        0.1,
        True,
        None,
        "sem",
    ]
    model = {
        "localization": {
            "pxap": {"value": 80.123},
            "f1": {"f1_pos": {"value": 0.7214}, "f1_neg": {"value": 0.69}},
        },
        "classification": {"accuracy": {"value": 100.0}, "error": {"value": 0.0}},
    }
    assert glas_maxmin.eval_numbers(model) == {
        "pxap": 80.12,
        "f1_pos": 72.14,
        "f1_neg": 69.0,
        "accuracy": 100.0,
        "error": 0.0,
    }
