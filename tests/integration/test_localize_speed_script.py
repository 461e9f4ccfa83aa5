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


def test_repeated_runs_give_the_median_run_and_the_highest_peak():
    runs = [
        {"slide_ratio": 0.81, "peak_rss_mb": 840.0, "timings": {"total_s": 60}},
        {"slide_ratio": 0.95, "peak_rss_mb": 830.0, "timings": {"total_s": 51}},
        {"slide_ratio": 0.92, "peak_rss_mb": 851.0, "timings": {"total_s": 53}},
    ]
    row = localize_speed.median_run(runs)
    assert row["slide_ratio"] == 0.92 and row["timings"] == {"total_s": 53}
    assert row["slide_ratio_runs"] == [0.81, 0.95, 0.92] and row["repeats"] == 3
    assert row["peak_rss_mb"] == 851.0
    # an even count takes the lower middle run; one run is itself
    assert localize_speed.median_run(runs[:2])["slide_ratio"] == 0.81
    assert localize_speed.median_run(runs[1:2])["slide_ratio_runs"] == [0.95]
    assert runs[0]["peak_rss_mb"] == 840.0  # the runs are left as they were


def test_repeats_below_one_are_refused(capsys):
    try:
        localize_speed.main(["--repeats", "0"])
    except SystemExit as exc:
        assert exc.code == 2
    else:
        raise AssertionError("--repeats 0 was accepted")
    assert "--repeats must be at least 1" in capsys.readouterr().err
