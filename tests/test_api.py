"""The Python interface: from histo_wsl import localize, evaluate, load_model (histo_wsl.api)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from factories import make_checkpoint

import histo_wsl
from histo_wsl import evaluate, load_model, localize
from histo_wsl.errors import InputError
from histo_wsl.runtime.batch import BatchOptions


def test_importing_histo_wsl_stays_light_and_names_its_interface():
    code = "import sys, histo_wsl; print('torch' in sys.modules, sorted(histo_wsl.__all__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[0].startswith("False")
    assert {"localize", "evaluate", "load_model"} <= set(histo_wsl.__all__)


def test_localize_evaluate_and_load_model_from_a_notebook(tmp_path, synthetic_slide):
    import torch

    ckpt = make_checkpoint(tmp_path / "m.pt")
    model = load_model(ckpt)
    assert model.card["class_names"] == ["gland", "normal"]
    logits, maps = model.predict(torch.zeros(1, 3, 48, 48))
    assert logits.shape == (1, 2) and maps.shape[-2:] == (48, 48)

    run = localize(str(synthetic_slide), tmp_path / "maps", model=ckpt, mpp=4.0, device="cpu")
    assert run.exit_code == 0 and set(run.records) == {"synth"}
    record = run.records["synth"]
    assert record["roi_class"] == "gland" and record["windows"] > 0
    assert (tmp_path / "maps" / "synth" / "synth.prob.tif").is_file()
    # a rerun skips the finished slide, as the command does
    again = localize([synthetic_slide], tmp_path / "maps", model=ckpt, mpp=4.0, device="cpu")
    assert again.counts["skipped"] == 1 and again.records == {}

    truth = {"type": "FeatureCollection", "features": []}
    (tmp_path / "synth.geojson").write_text(json.dumps(truth))
    result = evaluate(
        tmp_path / "maps", annotations=tmp_path / "synth.geojson", out=tmp_path / "e", bootstrap=0
    )
    assert result["data"]["n_images"] == 1 and (tmp_path / "e" / "metrics.json").is_file()


def test_bad_settings_are_one_clear_error(tmp_path, synthetic_slide):
    ckpt = make_checkpoint(tmp_path / "m.pt")
    with pytest.raises(InputError, match="overlapp"):
        localize(synthetic_slide, tmp_path / "o", model=ckpt, overlapp=0.5)
    with pytest.raises(InputError, match="no such file|not found|unknown"):
        load_model(tmp_path / "missing.pt")
    with pytest.raises(InputError, match="annotations="):
        evaluate(ckpt)
    opts = BatchOptions(quiet=True, skip_errors=True)
    run = localize([synthetic_slide], tmp_path / "o2", model=ckpt, options=opts, mpp=4.0)
    assert run.exit_code == 0
