"""The NEGEV recipe scripts in benchmarks/: planning, resumability and missing data (no training)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _runs  # noqa: E402
import glas_negev  # noqa: E402
import negev_ablation  # noqa: E402


def test_flags_and_run_state(tmp_path):
    assert _runs.flags({"batch_size": 16, "amp": True, "pretrained": False, "x": None}) == [
        "--batch-size",
        "16",
        "--amp",
        "--no-pretrained",
    ]
    assert _runs.run_state(tmp_path, 3) == "new"
    (tmp_path / "last.pt").write_bytes(b"")
    assert _runs.run_state(tmp_path, 3) == "resume"
    (tmp_path / "run.json").write_text(json.dumps({"status": "done", "summary": {"epochs": 3}}))
    assert _runs.run_state(tmp_path, 3) == "done" and _runs.run_state(tmp_path, 4) == "resume"
    cmd = _runs.train_command("train-decoder", "d", tmp_path, 4, {"lr": 0.1}, {}, "resume")
    assert "--resume" in cmd and "--lr" not in cmd  # --resume keeps the run's own settings


def test_ablation_variants_share_the_default_run():
    picked = negev_ablation.select(["n1,static"])
    assert [v.name for v in picked] == ["static", "n1"] and picked[1].run == "base"
    assert {v.run for v in negev_ablation.select(["terms"])} == {
        "cpos",
        "base",
        "cpos_cneg_size",
    }
    cpos = negev_ablation.settings_of(negev_ablation.select(["cpos"])[0], 1.0)
    assert cpos["seeds_bg"] == 0 and cpos["seeds_fg"] == 1
    size = negev_ablation.settings_of(negev_ablation.select(["cpos_cneg_size"])[0], 0.5)
    assert size["size_lambda"] == 0.5
    with pytest.raises(ValueError):
        negev_ablation.select(["n2"])


def test_missing_glas_is_an_error_unless_skipped(tmp_path, capsys):
    missing = str(tmp_path / "glas")
    assert glas_negev.main(["--data", missing]) == 2
    assert "GlaS not found" in capsys.readouterr().err
    assert glas_negev.main(["--data", missing, "--skip-missing"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "skipped"
    assert negev_ablation.main(["--data", missing]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "skipped"


def test_gpu_recipe_plan(tmp_path, capsys):
    glas = tmp_path / "glas"
    (glas / "splits").mkdir(parents=True)
    (glas / "train").mkdir()
    code = glas_negev.main(
        ["--data", str(glas), "--recipe", "gpu", "--out", str(tmp_path / "o"), "--dry-run"]
    )
    res = json.loads(capsys.readouterr().out)
    assert code == 0 and res["status"] == "planned" and len(res["commands"]) == 3
    s1, s2, ev = res["commands"]
    assert "--backbone resnet50" in s1 and "--epochs 1000" in s1 and "--amp" in s1
    assert "train-decoder" in s2 and "--seeds-fg 1" in s2 and "stage1/best-cls.pt" in s2
    assert "evaluate --compare" in ev and "--split val" in ev


def test_cpu_recipe_chains_its_rounds(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(glas_negev.RECIPES["cpu"], "rounds", 3)
    glas = tmp_path / "glas"
    (glas / "splits").mkdir(parents=True)
    (glas / "train").mkdir()
    out = tmp_path / "o"
    code = glas_negev.main(["--data", str(glas), "--out", str(out), "--dry-run"])
    res = json.loads(capsys.readouterr().out)
    rounds = glas_negev.RECIPES["cpu"]["rounds"]
    assert code == 0 and len(res["commands"]) == 1 + rounds + 1
    decoders = res["commands"][1:-1]
    assert all("--seed-map knn" in c and "stage1/best-cls.pt" in c for c in decoders)
    assert all("--refine knn" in c for c in decoders)
    assert "--seed-teacher" not in decoders[0]
    for r in range(2, rounds + 1):
        previous = "stage2" if r == 2 else f"stage2-round{r - 1}"
        assert f"--seed-teacher {out / previous / 'best-loc.pt'}" in decoders[r - 1]
        assert f"--out {out / f'stage2-round{r}'}" in decoders[r - 1]
    assert str(out / f"stage2-round{rounds}" / "best-loc.pt") in res["commands"][-1]
