"""benchmarks/localize_speed.py: the hand-written loop it measures beside each localize run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import localize_speed  # noqa: E402

from histo_wsl.registry.checkpoint import load_checkpoint  # noqa: E402
from histo_wsl.registry.registry import resolve_model  # noqa: E402
from histo_wsl.slideio.grid import cover_grid  # noqa: E402
from histo_wsl.slideio.slide import open_slide, plan_read  # noqa: E402
from histo_wsl.synthetic.slides import make_layout, write_pyramid_tiff  # noqa: E402

MODEL = "glas-negev-mobilenetv2"


def test_hand_loop_reads_and_runs_every_window_of_localize_grid(tmp_path, capsys):
    slide = write_pyramid_tiff(
        tmp_path / "small.tiff", make_layout(1400, 1000, mpp=0.5, n_sections=1, seed=3)
    )
    code = localize_speed.main(
        ["--hand-loop-child", str(slide), "--model", MODEL, "--child-threads", "1"]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    card = load_checkpoint(resolve_model(MODEL))["card"]
    size = int(card["input_size"])
    with open_slide(slide) as s:
        plan = plan_read(s, mpp=float(card["mpp"]))
        grid = cover_grid(s, plan, size, round(size * 0.75))
    # every window of the grid, glass included (the loop detects no tissue)
    assert out["windows"] == len(grid) > 1
    assert out["read_s"] > 0 and out["model_s"] > 0
    assert out["seconds"] >= out["read_s"] + out["model_s"]
