"""The model registry, `histo-wsl models` (list, show, export) and model names in localize/evaluate.

Every test runs against temporary models folders (the shipped folder, the user folder and
HISTO_WSL_MODELS are redirected), never against the repository's models/.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from factories import negev_card
from PIL import Image
from typer.testing import CliRunner

from histo_wsl.cli.app import app
from histo_wsl.errors import InputError
from histo_wsl.inference.predictor import load_model
from histo_wsl.registry import registry as registry_mod
from histo_wsl.registry.checkpoint import load_checkpoint, save_checkpoint
from histo_wsl.registry.registry import display_stem, registry, resolve_model

runner = CliRunner()
SIZE = 48


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: the machine's cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A NEGEV checkpoint (untrained, BN statistics from a few batches) with a training entry."""
    from histo_wsl.networks.classifier import build_classifier
    from histo_wsl.networks.negev import NEGEVModel

    torch.manual_seed(0)
    model = NEGEVModel(build_classifier("mobilenetv2", "wgap", 2, pretrained=False))
    model.train()
    with torch.no_grad():
        for _ in range(2):  # realistic running statistics (not the 0/1 of a fresh network)
            model.segment(torch.randn(4, 3, SIZE, SIZE))
    card = negev_card(
        "mobilenetv2",
        SIZE,
        negative_class="normal",
        threshold=0.4,
        selected_by="valpx_pxap",
        metrics={"valpx_pxap": 0.8125, "val_acc": 0.9},
        seed=7,
        training_data={"source": "synthetic"},
    )
    path = tmp_path_factory.mktemp("src") / "best-loc.pt"
    training = {"optimizer": {"step": torch.tensor(3)}}
    return save_checkpoint(path, card, model.state_dict(), training=training)


@pytest.fixture()
def zoo(tmp_path, monkeypatch):
    """Empty shipped, user and HISTO_WSL_MODELS folders in place of the real ones."""
    roots = {k: tmp_path / k for k in ("shipped", "xdg", "env")}
    monkeypatch.setattr(registry_mod, "SHIPPED_DIR", roots["shipped"])
    monkeypatch.setenv("XDG_DATA_HOME", str(roots["xdg"]))
    monkeypatch.delenv(registry_mod.ENV_VAR, raising=False)
    roots["user"] = roots["xdg"] / "histo-wsl" / "models"
    return roots


@pytest.fixture(scope="module")
def export_run(tmp_path_factory, source):
    """``tiny`` exported once (fp16) through the CLI: (its folder, the --json summary)."""
    dest = tmp_path_factory.mktemp("export")
    r = runner.invoke(
        app,
        ["models", "export", str(source), "--name", "tiny", "--dest", str(dest)]
        + ["--recipe", "histo-wsl train-decoder data --epochs 1", "--json"]
        + ["--license-note", "GlaS: research use only; cite the GlaS challenge"],
    )
    assert r.exit_code == 0, r.stderr
    assert sorted(p.name for p in dest.iterdir()) == ["tiny"]  # no staging folder left
    return dest / "tiny", json.loads(r.stdout)


@pytest.fixture()
def exported(zoo, export_run):
    """``tiny`` installed in the (temporary) shipped folder and declared the default."""
    shutil.copytree(export_run[0], zoo["shipped"] / "tiny")
    (zoo["shipped"] / "DEFAULT").write_text("tiny\n")
    return zoo, export_run[1]


def test_export_halves_the_size_and_predicts_like_the_source(exported, source, tmp_path):
    zoo, summary = exported
    folder = zoo["shipped"] / "tiny"
    assert sorted(p.name for p in zoo["shipped"].iterdir()) == ["DEFAULT", "tiny"]  # no staging
    assert sorted(p.name for p in folder.iterdir()) == ["card.yaml", "model.pt"]
    assert summary["dtype"] == "float16" and summary["kept_fp32"] == []
    assert 0.4 < summary["size_mb"] / summary["source_mb"] < 0.6
    assert summary["max_prediction_diff"] < 1e-2
    raw = torch.load(folder / "model.pt", weights_only=True)
    assert "training" not in raw
    dtypes = {v.dtype for v in raw["state_dict"].values()}
    assert dtypes == {torch.float16, torch.int64}  # num_batches_tracked stays an integer
    loaded = load_checkpoint(folder / "model.pt")["state_dict"]
    assert {v.dtype for v in loaded.values()} == {torch.float32, torch.int64}
    # the copy predicts within a small tolerance of the fp32 source (CPU)
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    p32, m32 = load_model(source).predict(x)
    p16, m16 = load_model(folder / "model.pt").predict(x)
    assert float((m32 - m16).abs().max()) < 1e-2
    assert torch.allclose(p32.softmax(1), p16.softmax(1), atol=1e-2)
    card = raw["card"]
    assert card["name"] == "tiny" and card["weights_dtype"] == "float16"
    assert card["terms"].startswith("GlaS: research use only")
    assert card["threshold"] == 0.4 and card["mpp"] == 2.0 and card["seed"] == 7
    text = (folder / "card.yaml").read_text()
    for needle in ("name: tiny", "recipe: histo-wsl train-decoder", "sha256:", "mpp: 2.0"):
        assert needle in text, needle
    # the build machine's paths are cut to their last parts (the source was under a tmp folder)
    assert card["exported"]["from"] == f"{source.parent.name}/{source.name}"
    assert str(source.parent) not in text


def test_export_refuses_to_overwrite_and_bad_input_leaves_nothing(exported, source, tmp_path):
    zoo, _ = exported
    dest = zoo["shipped"]
    args = ["models", "export", str(source), "--dest", str(dest)]
    r = runner.invoke(app, args + ["--name", "tiny"])
    assert r.exit_code == 2 and "--overwrite" in r.stderr and "tiny" in r.stderr
    r = runner.invoke(app, args + ["--name", "Bad Name"])
    assert r.exit_code == 2 and "--name 'Bad Name'" in r.stderr
    bad = tmp_path / "metrics.json"
    bad.write_text("{not json")
    r = runner.invoke(app, args + ["--name", "other", "--metrics", str(bad)])
    assert r.exit_code == 2 and "metrics.json" in r.stderr
    notours = tmp_path / "notours.pt"
    notours.write_bytes(b"junk")
    r = runner.invoke(app, ["models", "export", str(notours), "--dest", str(dest), "-n", "x"])
    assert r.exit_code == 2 and "notours.pt" in r.stderr
    assert sorted(p.name for p in dest.iterdir()) == ["DEFAULT", "tiny"]
    # --overwrite replaces the folder (fp32 this time) and takes evaluate's metrics.json
    metrics = tmp_path / "eval.json"
    metrics.write_text(
        json.dumps(
            {
                "data": {"source": "glas", "split": "test", "n_images": 80},
                "models": [{"localization": {"pxap": {"value": 0.7, "ci95": [0.6, 0.8]}}}],
            }
        )
    )
    r = runner.invoke(
        app,
        args + ["--name", "tiny", "--overwrite", "--no-fp16", "--metrics", str(metrics), "--json"],
    )
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["dtype"] == "float32"
    card = load_checkpoint(dest / "tiny" / "model.pt")["card"]
    assert card["evaluation"]["pxap"] == {"value": 0.7, "ci95": [0.6, 0.8]}
    assert card["evaluation"]["data"]["split"] == "test"
    assert sorted(p.name for p in dest.iterdir()) == ["DEFAULT", "tiny"]


def test_listing_search_order_default_and_show(exported, monkeypatch):
    zoo, _ = exported
    shutil.copytree(zoo["shipped"] / "tiny", zoo["user"] / "mine")
    shutil.copytree(zoo["shipped"] / "tiny", zoo["env"] / "tiny")  # shadows the shipped one
    (zoo["env"] / "empty-folder").mkdir()  # not a model: ignored
    card = zoo["user"] / "mine" / "card.yaml"  # measured on images and on a slide
    card.write_text(
        card.read_text(encoding="utf-8")
        + "evaluation: {pxap: {value: 84.19, ci95: [79.1, 88.4]}}\n"
        + "evaluation_slide: {slide_pxap: 79.87, gap: 4.32}\n",
        encoding="utf-8",
    )
    monkeypatch.setenv(registry_mod.ENV_VAR, str(zoo["env"]))
    r = runner.invoke(app, ["models", "--json"])
    assert r.exit_code == 0, r.stderr
    listing = json.loads(r.stdout)
    rows = {m["name"]: m for m in listing["models"]}
    assert list(rows) == ["tiny", "mine"] and listing["default"] == "tiny"
    assert rows["tiny"]["where"] == "env" and rows["tiny"]["default"] is True
    assert rows["mine"]["where"] == "user" and rows["mine"]["default"] is False
    assert rows["mine"]["classes"] == ["gland", "normal"] and rows["mine"]["mpp"] == 2.0
    assert rows["mine"]["validation"] == {"metric": "valpx_pxap", "value": 0.8125}
    assert rows["mine"]["evaluated"] == {"pxap": 84.19, "slide_pxap": 79.87}
    assert rows["tiny"]["evaluated"] is None
    assert rows["mine"]["threshold"] == 0.4 and rows["mine"]["size_mb"] > 0
    assert [r["kind"] for r in listing["search_path"]] == ["env", "user", "shipped"]
    assert any("shadowed" in n for n in listing["notes"])
    table = runner.invoke(app, ["models"], terminal_width=250)
    assert table.exit_code == 0 and "* tiny" in table.stdout and "mine" in table.stdout
    assert "PxAP (slide)" in table.stdout and "84.2 (79.9)" in table.stdout
    show = runner.invoke(app, ["models", "show", "mine"])
    assert show.exit_code == 0 and "terms: 'GlaS: research use only" in show.stdout
    missing = runner.invoke(app, ["models", "show", "nothing"])
    assert missing.exit_code == 2 and "histo-wsl models" in missing.stderr


def test_resolve_model_paths_names_and_errors(exported, tmp_path, source):
    zoo, _ = exported
    weights = zoo["shipped"] / "tiny" / "model.pt"
    assert resolve_model("tiny") == weights
    assert resolve_model(zoo["shipped"] / "tiny") == weights
    assert resolve_model(source) == source
    assert resolve_model("runs/x/best.pt") == registry_mod.Path("runs/x/best.pt")  # a path
    with pytest.raises(InputError, match="installed: tiny"):
        resolve_model("nope")
    with pytest.raises(InputError, match="without model.pt"):
        resolve_model(tmp_path)
    assert display_stem(weights) == "tiny" and display_stem(source) == "best-loc"
    (zoo["shipped"] / "DEFAULT").write_text("gone\n")
    reg = registry()
    assert reg.default is None and "'gone'" in reg.default_error


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("img") / "img.png"
    Image.fromarray(rng.integers(0, 255, (60, 70, 3), dtype=np.uint8)).save(path)
    return path


def test_localize_uses_the_default_model_or_fails_clearly(exported, image, tmp_path):
    zoo, _ = exported
    args = ["localize", str(image), "--whole-image", "--quiet", "--json", "--device", "cpu"]
    r = runner.invoke(app, args + ["--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.stderr
    assert f"using the default model tiny ({zoo['shipped'] / 'tiny' / 'model.pt'})" in r.stderr
    rec = json.loads((tmp_path / "a" / "img" / "img.json").read_text())
    assert rec["model"]["name"] == "tiny"
    r = runner.invoke(app, args + ["--out", str(tmp_path / "b"), "--model", "tiny"])
    assert r.exit_code == 0 and "default model" not in r.stderr
    (zoo["shipped"] / "DEFAULT").unlink()
    r = runner.invoke(app, args + ["--out", str(tmp_path / "c")])
    assert r.exit_code == 2
    assert "--model is required" in r.stderr and "histo-wsl models" in r.stderr
    assert not (tmp_path / "c").exists()
    r = runner.invoke(app, args + ["--out", str(tmp_path / "d"), "--model", "nope"])
    assert r.exit_code == 2 and "'nope'" in r.stderr and "installed: tiny" in r.stderr


def test_evaluate_takes_a_model_name(exported, monkeypatch, tmp_path):
    import histo_wsl.evaluation.images as ev

    seen = {}

    def fake_run(settings, argv=None, quiet=False):
        seen["models"] = settings.models
        return {}

    monkeypatch.setattr(ev, "run_evaluate", fake_run)
    r = runner.invoke(
        app, ["evaluate", "tiny", "--data", "d.csv", "--json", "--out", str(tmp_path / "e")]
    )
    assert r.exit_code == 0, r.stderr
    weights = exported[0]["shipped"] / "tiny" / "model.pt"
    assert seen["models"] == [weights]
    # its outputs are named after the model, not after model.pt
    assert ev._display_names([weights, tmp_path / "best-loc.pt"]) == ["tiny", "best-loc"]
    from histo_wsl.evaluation.calibration import calibrated_path

    assert calibrated_path(weights, tmp_path, set()) == tmp_path / "tiny.calibrated.pt"
    r = runner.invoke(app, ["evaluate", "nope", "--data", "d.csv", "--out", str(tmp_path / "f")])
    assert r.exit_code == 2 and "'nope'" in r.stderr


def test_models_commands_need_no_torch(zoo):
    code = (
        "import sys\n"
        "from histo_wsl.cli.app import main\n"
        "for argv in (['models', '--help'], ['models', '--json'], ['localize', '--help']):\n"
        "    sys.argv = ['histo-wsl', *argv]\n"
        "    try:\n        main()\n    except SystemExit as e:\n        assert e.code == 0, e.code\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy'))\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    env = {**__import__("os").environ, "HISTO_WSL_MODELS": str(zoo["env"])}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert out.returncode == 0, out.stderr
    assert "HEAVY=\n" in out.stdout


def test_a_source_checkout_finds_its_shipped_models_folder():
    """The registry finds the repository's models/ from its own place in the package."""
    from histo_wsl.registry import registry as reg

    root = Path(__file__).resolve().parents[2]
    assert reg.SHIPPED_DIR == root / "models"
    assert (root / "models" / "DEFAULT").is_file()


def _refined_with_its_data(tmp_path, **card_extra):
    """A patch dataset and a k-NN refined checkpoint whose card records training on it.

    Returns (data folder, checkpoint path, its card, its state dict).
    """
    from knn_helpers import refined_negev_checkpoint

    from histo_wsl.data.sources import load_samples
    from histo_wsl.registry.checkpoint import load_checkpoint, save_checkpoint
    from histo_wsl.synthetic.patches import write_patch_dataset
    from histo_wsl.training.config import TrainConfig

    data = write_patch_dataset(tmp_path / "data", n_per_class=4, size=40, seed=5)
    src = refined_negev_checkpoint(tmp_path / "src.pt", images=4, per_image=10, k=8)
    ckpt = load_checkpoint(src)
    names = load_samples(data).class_names
    config = TrainConfig.from_flat(crop_size=32, classes=names).to_flat()
    card = {**ckpt["card"], "class_names": names, "config": config, **card_extra}
    save_checkpoint(src, card, ckpt["state_dict"])
    return data, src, card, ckpt["state_dict"]


def test_export_gives_the_knn_bank_glass_from_the_training_data(tmp_path):
    import torch

    from histo_wsl.registry.checkpoint import save_checkpoint

    data, src, card, state = _refined_with_its_data(tmp_path)
    dest = tmp_path / "zoo"
    args = ["models", "export", str(src), "--name", "glassy", "--dest", str(dest), "--json"]
    r = runner.invoke(app, [*args, "--knn-glass", str(data)])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["max_prediction_diff"] < 1e-2
    model = load_model(dest / "glassy" / "model.pt")
    refiner = model.model.refiner
    added = refiner.owners >= 4  # the source bank's 4 images own 0..3
    assert len(refiner) == 40 + int(added.sum()) and int(added.sum()) >= 3
    assert torch.all(refiner.values[added] == 0)
    assert model.card["refine"]["bank_pixels"] == len(refiner) and model.card["refine"]["glass"]
    # a model without a bank, or without its training settings, is refused in one line
    r = runner.invoke(app, [*args, "--overwrite", "--knn-glass", str(tmp_path / "nowhere")])
    assert r.exit_code == 2 and "nowhere" in r.stderr
    save_checkpoint(src, {k: v for k, v in card.items() if k != "config"}, state)
    r = runner.invoke(app, [*args, "--overwrite", "--knn-glass", str(data)])
    assert r.exit_code == 2 and "no training settings" in r.stderr


def _exporter(src, dest):
    """``export(name, *options)``: ``models export src --name name --dest dest --json ...``."""

    def export(name, *options):
        args = ["models", "export", str(src), "--name", name, "--dest", str(dest), "--json"]
        return runner.invoke(app, [*args, *options])

    return export


def test_export_keys_the_knn_bank_as_slides_and_draws_its_glass_again(tmp_path):
    import torch

    from histo_wsl.registry.checkpoint import save_checkpoint

    data, src, card, before = _refined_with_its_data(tmp_path, data_mpp=3.0)
    dest = tmp_path / "zoo"
    export = _exporter(src, dest)

    r = export("slidekeys", "--knn-slide-keys", str(data))
    assert r.exit_code == 0, r.stderr
    model = load_model(dest / "slidekeys" / "model.pt")
    refiner = model.model.refiner
    assert len(refiner) == 40 and model.card["refine"]["bank_pixels"] == 40  # same size
    assert torch.equal(refiner.owners.sort().values, before["refiner.owners"].sort().values)
    assert not torch.allclose(refiner.keys.float(), before["refiner.keys"].float(), atol=1e-2)
    assert "2 µm/px" in model.card["refine"]["keys"]  # the card's mpp, as localize reads
    assert "own map" in model.card["refine"]["values"]
    # glass at a share, drawn again (not added) when the bank has some already
    r = export("glassy", "--knn-slide-keys", str(data), "--knn-glass", str(data),
               "--knn-glass-share", "0.25")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    glassy = load_model(dest / "glassy" / "model.pt")
    n_glass = int((glassy.model.refiner.owners >= 4).sum())
    assert n_glass >= 4 and len(glassy.model.refiner) == 40 + n_glass
    assert "1/4 of the bank" in glassy.card["refine"]["glass"]
    src2 = dest / "glassy" / "model.pt"
    r = runner.invoke(app, ["models", "export", str(src2), "--name", "again", "--dest",
                            str(dest), "--knn-glass", str(data), "--knn-glass-share", "0.25"])  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert len(load_model(dest / "again" / "model.pt").model.refiner) == 40 + n_glass
    # refused in one line: a share without the data, a card without µm/px
    r = export("x", "--knn-glass-share", "0.25")
    assert r.exit_code == 2 and "--knn-glass-share needs --knn-glass" in r.stderr
    r = export("x", "--knn-glass", str(data), "--knn-glass-share", "1.5")
    assert r.exit_code == 2 and "(0, 1]" in r.stderr
    save_checkpoint(src, {k: v for k, v in card.items() if k != "data_mpp"}, before)
    r = export("y", "--knn-slide-keys", str(data))
    assert r.exit_code == 2 and "no µm/px" in r.stderr and "src.pt" in r.stderr


def test_export_mask_range_is_refused_for_models_without_a_min_max_mask(tmp_path):
    data, src, _, _ = _refined_with_its_data(tmp_path)
    dest = tmp_path / "zoo"
    r = _exporter(src, dest)("n", "--mask-range", str(data))
    assert r.exit_code == 2 and "--mask-range applies to stage-1 CAM models" in r.stderr
    assert "src.pt" in r.stderr and not (dest / "n").exists()


def test_export_keys_the_knn_bank_on_more_stages_and_refuses_what_it_cannot_do(tmp_path):
    import torch

    data, src, card, before = _refined_with_its_data(tmp_path, data_mpp=3.0)
    dest = tmp_path / "zoo"
    export = _exporter(src, dest)

    keys = ["--knn-slide-keys", str(data)]
    r = export("deep", *keys, "--knn-stages", "4", "--knn-dims", "3")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["max_prediction_diff"] < 1e-2
    model = load_model(dest / "deep" / "model.pt")
    refiner = model.model.refiner
    assert refiner.n_stages == 4 and refiner.keys.shape == (40, 12)
    assert model.card["refine"]["stages"] == 4 and model.card["refine"]["dims"] == 3
    with torch.no_grad():
        fg = model.model.localize(torch.randn(2, 3, 32, 32))[1]
    assert fg.shape == (2, 32, 32) and torch.isfinite(fg).all()
    # glass drawn again on the new keys when asked; the old glass would be keyed the old way
    r = export("glassy", *keys, "--knn-glass", str(data))
    assert r.exit_code == 0, r.stderr
    glassy = dest / "glassy" / "model.pt"
    again = ["models", "export", str(glassy), "--name", "g4", "--dest", str(dest), *keys]
    r = runner.invoke(app, [*again, "--knn-stages", "3"])
    assert r.exit_code == 2 and "--knn-glass" in r.stderr and "glassy" in r.stderr
    r = runner.invoke(app, [*again, "--knn-stages", "3", "--knn-glass", str(data)])
    assert r.exit_code == 0, r.stderr
    g4 = load_model(dest / "g4" / "model.pt")
    assert g4.model.refiner.n_stages == 3 and int((g4.model.refiner.owners >= 4).sum()) >= 4
    # a finer grid: keys drawn on it, every pixel looked up on it
    r = export("fine", *keys, "--knn-grid", "2")
    assert r.exit_code == 0, r.stderr
    fine = load_model(dest / "fine" / "model.pt")
    assert fine.card["refine"]["grid"] == 2 and fine.model.refiner.grid == 2
    assert "grid" not in model.card["refine"]  # grid 1 is not written
    with torch.no_grad():
        stages = fine.model.classifier.forward_features(torch.randn(1, 3, 32, 32))
        means = fine.model.refiner.bank.neighbour_means(stages, 2)
    assert means.shape[-2:] == tuple(2 * d for d in stages[-1].shape[-2:])
    # exported again from itself: the same pixels, valued by the export's own map (a round)
    again = ["models", "export", str(dest / "fine" / "model.pt"), "--name", "round", "--dest"]
    r = runner.invoke(app, [*again, str(dest), *keys, "--knn-grid", "2"])
    assert r.exit_code == 0, r.stderr
    rounded = load_model(dest / "round" / "model.pt").model.refiner
    assert torch.equal(rounded.owners, fine.model.refiner.owners)
    torch.testing.assert_close(
        rounded.keys.float(), fine.model.refiner.keys.float(), atol=2e-2, rtol=0
    )
    # refused in one line: without the data, more stages than the encoder has
    r = export("x", "--knn-grid", "2")
    assert r.exit_code == 2 and "--knn-grid needs --knn-slide-keys" in r.stderr
    r = export("x", "--knn-dims", "3")
    assert r.exit_code == 2 and "--knn-dims needs --knn-slide-keys" in r.stderr
    r = export("x", *keys, "--knn-stages", "9")
    assert r.exit_code == 2 and "give --knn-stages 1 to 4" in r.stderr
    assert not (dest / "x").exists()


def test_export_compacts_the_knn_bank_and_keeps_the_card_domain(tmp_path):
    from knn_helpers import refined_negev_checkpoint

    src = refined_negev_checkpoint(tmp_path / "src.pt", images=4, per_image=10, k=8)
    dest = tmp_path / "zoo"
    args = ["models", "export", str(src), "--name", "small", "--dest", str(dest), "--json"]
    slide = tmp_path / "slide.json"
    slide.write_text(json.dumps({"slide_pxap": 76.8, "slide_dice": 0.74, "gap": 5.7}))
    r = runner.invoke(app, [*args, "--knn-bank", "20", "--slide-metrics", str(slide)])
    assert r.exit_code == 0, r.stderr
    summary = json.loads(r.stdout)
    # compared with the compacted source: only the fp16 rounding differs
    assert summary["max_prediction_diff"] < 1e-2 and not summary["notes"]
    assert sorted(p.name for p in (dest / "small").iterdir()) == ["card.yaml", "model.pt"]
    card = load_model(dest / "small" / "model.pt").card
    assert card["refine"]["bank_pixels"] == 20 and card["refine"]["k"] == 4
    assert card["domain"] == {"modality": "brightfield", "stain": "H&E"}  # kept, not reset
    assert card["evaluation_slide"] == {"slide_pxap": 76.8, "slide_dice": 0.74, "gap": 5.7}
    r = runner.invoke(app, [*args, "--overwrite", "--knn-bank", "80"])
    assert r.exit_code == 2 and "holds only 40" in r.stderr
    assert load_model(dest / "small" / "model.pt").card["refine"]["bank_pixels"] == 20
    # a copy keeps its source's evaluation, unless the bank changes: then it no longer holds
    again = ["models", "export", str(dest / "small" / "model.pt"), "--dest", str(dest), "--json"]
    r = runner.invoke(app, [*again, "--name", "same"])
    assert r.exit_code == 0 and not json.loads(r.stdout)["notes"]
    assert load_model(dest / "same" / "model.pt").card["evaluation_slide"]["slide_pxap"] == 76.8
    r = runner.invoke(app, [*again, "--name", "smaller", "--knn-bank", "12"])
    assert r.exit_code == 0, r.stderr
    assert "evaluation" in json.loads(r.stdout)["notes"][0]
    assert "evaluation_slide" not in load_model(dest / "smaller" / "model.pt").card


def test_export_weighs_the_knn_map_anew_and_refuses_what_it_cannot(tmp_path):
    import torch
    from knn_helpers import refined_negev_checkpoint

    from histo_wsl.inference.predictor import load_model

    src = refined_negev_checkpoint(tmp_path / "src.pt", images=4, per_image=10, k=8)
    dest = tmp_path / "zoo"
    args = ["models", "export", str(src), "--dest", str(dest), "--json"]
    slide = tmp_path / "slide.json"
    slide.write_text(json.dumps({"slide_pxap": 76.8, "gap": 5.7}))
    r = runner.invoke(app, [*args, "--name", "same", "--slide-metrics", str(slide)])
    assert r.exit_code == 0, r.stderr
    r = runner.invoke(app, [*args[:2], str(dest / "same" / "model.pt"), *args[3:], "--name",
                            "half", "--knn-alpha", "0.5"])  # fmt: skip
    assert r.exit_code == 0, r.stderr
    summary = json.loads(r.stdout)
    # compared with the source as re-weighed: only the fp16 rounding differs
    assert summary["max_prediction_diff"] < 1e-2
    assert "weight changed" in summary["notes"][0]  # its slide numbers no longer hold
    same, half = (load_model(dest / n / "model.pt") for n in ("same", "half"))
    assert same.card["refine"]["alpha"] == 1.0 and half.card["refine"]["alpha"] == 0.5
    assert "evaluation_slide" not in half.card and half.card["refine"]["k"] == 8
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    own = same.model.localize(x, refine=False)[1]
    knn = same.predict(x)[1]
    # (1 − α)·own map + α·k-NN map, from the same bank
    assert torch.allclose(half.predict(x)[1], (0.5 * own + 0.5 * knn).clamp(0, 1), atol=2e-3)
    for bad in ("1.5", "-0.1"):
        r = runner.invoke(app, [*args, "--name", "bad", "--knn-alpha", bad])
        assert r.exit_code == 2 and "between 0 and 1" in r.stderr
    plain = tmp_path / "plain.pt"
    from histo_wsl.registry.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(src)
    save_checkpoint(plain, {**ckpt["card"], "refine": {"method": "none"}}, ckpt["state_dict"])
    r = runner.invoke(app, [*args[:2], str(plain), *args[3:], "--name", "bad", "--knn-alpha", "1"])
    assert r.exit_code == 2 and "no k-NN refinement" in r.stderr and "--knn-alpha" in r.stderr
    assert not (dest / "bad").exists()
