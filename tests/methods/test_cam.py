"""Stage 1 (CAM classifier): the window range its card records, and where it is used."""

import pytest
import torch
from typer.testing import CliRunner

from histo_wsl.cli.app import app
from histo_wsl.inference.predictor import load_model
from histo_wsl.networks.cams import compute_cams, normalize_cams, range_normalize, raw_cams
from histo_wsl.synthetic.patches import write_patch_dataset

runner = CliRunner()
TINY = ["--batch-size", "4", "--workers", "0", "--device", "cpu", "--quiet", "--seed", "0"]


def test_range_normalize_keeps_a_window_without_the_region_low():
    cams = torch.tensor([[[0.0, 10.0]], [[1.0, 2.0]]])  # a window of ROI, a dull one
    torch.testing.assert_close(normalize_cams(cams)[1], torch.tensor([[0.0, 1.0]]))  # stretched
    out = range_normalize(cams, 0.0, 10.0)
    torch.testing.assert_close(out, torch.tensor([[[0.0, 1.0]], [[0.1, 0.2]]]))
    assert range_normalize(torch.tensor([[[-5.0, 20.0]]]), 0.0, 10.0).tolist() == [[[0.0, 1.0]]]


def test_a_stage1_run_records_the_cam_range_that_localize_uses_on_windows(tmp_path):
    from histo_wsl.data.images import LabelledImages, eval_transform
    from histo_wsl.inference.engine import Engine
    from histo_wsl.inference.params import LocalizeParams
    from histo_wsl.methods.base import load_training_data
    from histo_wsl.methods.cam import cam_range
    from histo_wsl.registry.checkpoint import load_checkpoint
    from histo_wsl.training.config import TrainConfig

    data = write_patch_dataset(tmp_path / "data", n_per_class=6, size=32, seed=2)
    out = tmp_path / "run"
    args = ["train-classifier", str(data), "--crop-size", "32", "--resize-size", "36"]
    args += [
        "--backbone",
        "tinycnn",
        "--no-pretrained",
        "--epochs",
        "2",
        "--max-steps-per-epoch",
        "2",
        *TINY,
    ]
    r = runner.invoke(app, [*args, "--out", str(out)])
    assert r.exit_code == 0, r.stderr
    best = out / "best-loc.pt"
    wr = load_checkpoint(best)["card"]["cam_window_range"]
    assert wr["method"] == "cam" and "predicted class" in wr["from"]
    ds = load_training_data(TrainConfig.from_flat(data=str(data)))
    train = LabelledImages(ds.split("train"), 32, eval_transform())
    pred = load_model(best)
    assert tuple(wr["range"]) == pytest.approx(cam_range(pred.model, train, "cam"), abs=1e-4)

    x = torch.randn(2, 3, 32, 32)
    cls = torch.tensor([0, 1])
    whole = Engine(LocalizeParams(model=best, device="cpu", whole_image=True))
    assert whole.predictor.window_range is None and "window_range" not in whole.describe()
    _, maps = whole.predictor.predict(x, cls)
    torch.testing.assert_close(maps, compute_cams(whole.predictor.model, x, cls, size=(32, 32)))
    windows = Engine(LocalizeParams(model=best, device="cpu", mpp=1.0))
    lo, hi = windows.predictor.window_range
    assert [lo, hi] == pytest.approx(wr["range"]) and windows.describe()["window_range"]
    _, maps = windows.predictor.predict(x, cls)
    raw = raw_cams(windows.predictor.model, x, cls, size=(32, 32))
    torch.testing.assert_close(maps, range_normalize(raw, lo, hi))
    other = Engine(LocalizeParams(model=best, device="cpu", mpp=1.0, cam="gradcam"))
    assert other.predictor.window_range is None  # a range is one CAM method's

    dest = tmp_path / "zoo"
    export = ["models", "export", str(best), "--name", "cam", "--dest", str(dest)]
    r = runner.invoke(app, [*export, "--mask-range", str(data)])
    assert r.exit_code == 0, r.stderr
    again = load_checkpoint(dest / "cam" / "model.pt")["card"]["cam_window_range"]
    assert again["range"] == pytest.approx(wr["range"], rel=1e-2, abs=1e-3)  # fp16 weights
