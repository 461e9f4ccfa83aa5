"""benchmarks/read_speed.py: both readers on localize's windows, compared byte for byte."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import read_speed  # noqa: E402

from histo_wsl.slideio.tiff_tiles import TILE_READER_ENV  # noqa: E402
from histo_wsl.synthetic.slides import make_layout, write_pyramid_tiff  # noqa: E402


def test_both_readers_read_the_same_windows_and_the_environment_is_restored(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.delenv(TILE_READER_ENV, raising=False)
    slide = write_pyramid_tiff(
        tmp_path / "s.tiff", make_layout(3000, 2000, mpp=0.5, n_sections=1, seed=4)
    )
    read_speed.main(["--slide", str(slide), "--windows", "12", "--repeats", "1"])
    out = json.loads(capsys.readouterr().out)
    (row,) = out["slides"]
    assert row["windows"] == 12 and row["equal"] is True
    assert row["decoded_by"]["tiles"] == [1]  # 1.57 µm/px on a 0.5 µm/px slide: level 1, resized
    assert set(row["cpu_ms_per_window"]) == {"tiles", "openslide"}
    assert out["pass"]["equal"] is True
    assert TILE_READER_ENV not in os.environ
