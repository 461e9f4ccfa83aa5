"""benchmarks/glas_ship.py: the shipped models' export chain for a trained GlaS checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import glas_ship  # noqa: E402


def _option(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


@pytest.mark.parametrize("method", ["negev", "maxmin"])
def test_each_export_takes_the_last_ones_model_and_the_card_gets_the_slide(method, tmp_path):
    data, work = tmp_path / "glas", tmp_path / "work"
    card = {"method": method, "refine": {"method": "knn"}, "config": {"fold": 2}}
    steps = glas_ship.plan(Path("src.pt"), "m", card, data, "cpu", work)
    exports = ["export", "round", *(["weight"] if method == "maxmin" else [])]
    assert list(steps) == [*exports, "slide", "card"]
    source = "src.pt"
    for step in exports:
        cmd = steps[step]
        assert cmd[cmd.index("export") + 1] == source and _option(cmd, "--name") == "m"
        # every export keys the bank as slides show it, on the same grid and stages, with glass
        assert _option(cmd, "--knn-slide-keys") == str(data) and _option(cmd, "--knn-grid") == "2"
        assert _option(cmd, "--knn-glass") == str(data)
        source = str(Path(_option(cmd, "--dest")) / "m" / "model.pt")
    assert source == str(work / "final" / "m" / "model.pt")
    first = steps["export"]
    assert _option(first, "--knn-bank") == str(glas_ship.BANK[method])
    assert "--knn-bank" not in steps["round"]  # the round keeps the bank's pixels
    assert ("--mask-range" in first) == (method == "maxmin")
    if method == "maxmin":
        assert _option(steps["weight"], "--knn-alpha") == str(glas_ship.MAXMIN_ALPHA)
    assert _option(steps["slide"], "--model") == source
    assert _option(steps["slide"], "--tta") == "card,flips"
    assert _option(steps["slide"], "--fold") == "2"  # the slide of the fold it was trained on
    card = steps["card"]
    assert card[card.index("export") + 1] == source and "--overwrite" in card
    assert _option(card, "--slide-metrics") == str(work / "slide" / "card.json")


def test_the_recipe_keeps_the_sources_and_names_every_export():
    card = {"method": "maxmin", "recipe": "python benchmarks/glas_maxmin.py --recipe cpu"}
    text = glas_ship.recipe(card, ["runs/a/best-loc.pt", "--name", "x"])
    assert text.startswith("python benchmarks/glas_maxmin.py --recipe cpu; then python ")
    assert "glas_ship.py runs/a/best-loc.pt --name x" in text
    assert "--knn-bank 2048" in text and "--knn-alpha 0.75" in text
    assert "--knn-slide-keys GLAS" in text  # the data as a placeholder, not this machine's path


def test_sources_the_chain_does_not_fit_are_named():
    refined = {"refine": {"method": "knn"}}
    assert glas_ship.check_source({"method": "negev", **refined}) == "negev"
    for card, words in (
        ({"method": "cam", **refined}, "--mask-range alone"),
        ({"method": "negev", "refine": {"method": "none"}}, "--refine knn"),
        (
            {"method": "maxmin", **refined, "training_data": {"layout": "folders"}},
            "not trained on GlaS",
        ),
    ):
        with pytest.raises(ValueError, match=words):
            glas_ship.check_source(card)


def test_refusals_come_before_any_step(tmp_path, capsys):
    from factories import glas_like

    glas = glas_like(tmp_path / "glas")
    dest = tmp_path / "models"
    (dest / "m").mkdir(parents=True)
    work = tmp_path / "work"
    argv = ["nope.pt", "--name", "m", "--dest", str(dest), "--data", str(glas), "--out", str(work)]
    assert glas_ship.main(argv) == 2
    assert "exists; add --overwrite" in capsys.readouterr().err
    assert glas_ship.main([*argv, "--overwrite"]) == 2
    assert "nope.pt" in capsys.readouterr().err
    assert not work.exists() and (dest / "m").is_dir()  # nothing ran, nothing lost
    assert glas_ship.main([*argv[:-4], "--data", str(tmp_path / "none")]) == 2
