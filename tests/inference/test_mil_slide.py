"""``localize --mil``: a train-mil model's slide score, from the patches extract-patches would cut."""

import csv
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("torchmil")

from histo_wsl.cli.app import app  # noqa: E402
from histo_wsl.data.bags import patch_geometry  # noqa: E402
from histo_wsl.data.extract import ExtractParams, extract_patches  # noqa: E402
from histo_wsl.errors import InputError  # noqa: E402
from histo_wsl.inference.localize import localize  # noqa: E402
from histo_wsl.inference.params import LocalizeParams  # noqa: E402
from histo_wsl.methods.mil import (  # noqa: E402
    MILParams,
    build_dsmil,
    extract_features,
    predicted_class,
)
from histo_wsl.registry.checkpoint import save_checkpoint  # noqa: E402
from histo_wsl.runtime.batch import BatchOptions  # noqa: E402
from histo_wsl.runtime.inputs import InputItem  # noqa: E402

runner = CliRunner()
CLASSES = ["normal", "tumour"]


@pytest.fixture(scope="module")
def patches(tmp_path_factory, synthetic_slide):
    """``extract-patches`` of the synthetic slide: 32 px at 2 µm/px."""
    out = tmp_path_factory.mktemp("mil-patches")
    params = ExtractParams(patch_size=32, mpp=2.0, min_tissue=0.5, label="tumour")
    extract_patches([InputItem(synthetic_slide, "synth")], out, params, BatchOptions(quiet=True))
    return out


def _mil_card(patch: dict | None) -> dict:
    card = {
        "method": "mil",
        "backbone": "tinycnn",
        "pretrained": False,
        "input_size": 16,
        "att_dim": 8,
        "feature_dim": None,
        "class_names": CLASSES,
        "negative_class": "normal",
        "threshold": {"t_pos": 0.5},
        "seed": 3,
    }
    if patch is not None:
        card["patch"] = patch
    return card


@pytest.fixture(scope="module")
def mil_model(tmp_path_factory, patches):
    """A DSMIL over tinycnn features with random weights, its card as train-mil writes it."""
    with open(patches / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    feats = extract_features(
        patches,
        [r["path"] for r in rows],
        MILParams(
            data=patches, out=patches, backbone="tinycnn", pretrained=False, input_size=16, seed=3
        ),
        torch.device("cpu"),
    )
    torch.manual_seed(0)
    model = build_dsmil(feats.shape[1], 8, feats.mean(0), feats.std(0).clamp_min(1e-6)).eval()
    card = _mil_card(patch_geometry(patches, rows))
    card["feature_dim"] = int(feats.shape[1])
    folder = tmp_path_factory.mktemp("mil")
    path = save_checkpoint(folder / "mil.pt", card, model.state_dict())
    old = dict(card)
    old.pop("patch")
    save_checkpoint(folder / "old.pt", old, model.state_dict())
    with torch.no_grad():
        bag, inst = model.predict(feats[None], return_inst_pred=True)
    expected = {
        "score": float(torch.sigmoid(bag)[0]),
        "instances": torch.sigmoid(inst)[0].numpy(),
        "rows": rows,
    }
    return path, expected


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    """An untrained NEGEV checkpoint (the map is not what these tests look at)."""
    from histo_wsl.networks.classifier import build_classifier
    from histo_wsl.networks.negev import NEGEVModel

    torch.manual_seed(0)
    card = {
        "method": "negev",
        "stage": 2,
        "backbone": "tinycnn",
        "head": "wildcat",
        "head_opts": {},
        "num_classes": 2,
        "class_names": CLASSES,
        "negative_class": "normal",
        "input_size": 64,
        "mpp": 4.0,
        "threshold": 0.5,
    }
    clf = build_classifier("tinycnn", "wildcat", 2, pretrained=False)
    card["classifier_card"] = dict(card, method="cam", stage=1)
    path = tmp_path_factory.mktemp("decoder") / "negev.pt"
    return save_checkpoint(path, card, NEGEVModel(clf).state_dict())


def test_the_slide_json_carries_the_score_of_the_extracted_patches(
    tmp_path, synthetic_slide, mil_model, decoder
):
    path, expected = mil_model
    params = LocalizeParams(model=decoder, mil=path, batch_size=8, device="cpu", threads=1)
    summary = localize(
        [InputItem(synthetic_slide, "synth")], tmp_path, params, BatchOptions(quiet=True)
    )
    assert summary.exit_code == 0
    record = json.loads((tmp_path / "synth" / "synth.json").read_text())
    mil = record["mil"]
    # the same patches as extract-patches cut, the same features, the same bag score
    assert mil["patches"] == len(expected["rows"])
    assert mil["score"] == pytest.approx(expected["score"], abs=1e-5)
    assert mil["predicted_class"] == predicted_class(CLASSES, "normal", expected["score"])
    inst = expected["instances"]
    assert mil["positive_patches"] == int(np.count_nonzero(inst >= 0.5))
    top = expected["rows"][int(np.argmax(inst))]
    assert (mil["top_patch"]["x"], mil["top_patch"]["y"]) == (int(top["x"]), int(top["y"]))
    assert mil["top_patch"]["score"] == pytest.approx(float(inst.max()), abs=1e-5)
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["params"]["mil"] == str(path)


def test_a_blank_slide_gets_no_mil_score(tmp_path, blank_slide, mil_model, decoder):
    params = LocalizeParams(model=decoder, mil=mil_model[0], device="cpu", threads=1)
    localize([InputItem(blank_slide, "blank")], tmp_path, params, BatchOptions(quiet=True))
    mil = json.loads((tmp_path / "blank" / "blank.json").read_text())["mil"]
    assert mil["score"] is None and mil["patches"] == 0 and "tissue" in mil["note"]


def test_bad_mil_files_are_refused_before_any_slide(tmp_path, synthetic_slide, mil_model, decoder):
    folder = mil_model[0].parent
    cases = [
        (folder / "absent.pt", "no such file"),
        (decoder, "not a train-mil checkpoint"),
        (folder / "old.pt", "re-run train-mil"),
    ]
    for path, message in cases:
        result = runner.invoke(
            app,
            ["localize", str(synthetic_slide), "--model", str(decoder), "--mil", str(path)]
            + ["--out", str(tmp_path / "out"), "--device", "cpu"],
        )
        assert result.exit_code == 2, result.output
        assert message in result.output and str(path.name) in result.output
        assert not (tmp_path / "out" / "synth").exists()
    with pytest.raises(InputError, match="--whole-image"):
        LocalizeParams(model=decoder, mil=mil_model[0], whole_image=True).validate()


def test_patch_geometry_falls_back_on_the_manifest(tmp_path, patches):
    with open(patches / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    from_run = patch_geometry(patches, rows)
    assert from_run == {
        "size": 32,
        "mpp": 2.0,
        "level": None,
        "stride": 32,
        "min_tissue": 0.5,
        "source": "run.json",
    }
    from_rows = patch_geometry(tmp_path, rows)  # no run.json here
    assert from_rows["size"] == 32 and from_rows["stride"] == 32
    assert from_rows["source"] == "manifest.csv" and from_rows["min_tissue"] >= 0.5
    assert from_rows["mpp"] == pytest.approx(float(rows[0]["mpp"]))
