import csv
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
import yaml
from typer.testing import CliRunner

from histo_wsl.cli.app import app
from histo_wsl.errors import InputError
from histo_wsl.registry.checkpoint import load_checkpoint, save_checkpoint
from histo_wsl.synthetic.patches import write_patch_dataset
from histo_wsl.training.config import TrainConfig, load_config, merge_config
from histo_wsl.training.engine import FillingSampler

runner = CliRunner()
TINY = [
    "--backbone",
    "mobilenetv2",
    "--no-pretrained",
    "--batch-size",
    "4",
    "--workers",
    "0",
    "--lr",
    "0.01",
    "--quiet",
    "--device",
    "cpu",
]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """16 + 16 synthetic 64 px patches; a config that trains on 48 px crops of 56 px resizes."""
    root = tmp_path_factory.mktemp("tiny")
    csv_path = write_patch_dataset(root / "data", n_per_class=8, size=64, seed=2)
    cfg = root / "tiny.yaml"
    cfg.write_text("crop_size: 48\nresize_size: 56\nmax_steps_per_epoch: 2\n")
    return csv_path, cfg


def _train(args):
    result = runner.invoke(app, ["train-classifier", *args])
    return result


def _summary(out):
    with open(out / "summary.csv") as fh:
        return list(csv.DictReader(fh))


def test_train_classifier_writes_checkpoints_summary_and_card(tmp_path, tiny_data):
    data, cfg = tiny_data
    out = tmp_path / "run"
    r = _train(
        [
            str(data),
            "--out",
            str(out),
            "--config",
            str(cfg),
            "--epochs",
            "2",
            "--negative-class",
            "normal",
            "--data-mpp",
            "1.0",
            *TINY,
        ]
    )
    assert r.exit_code == 0, r.stderr
    rows = _summary(out)
    assert [row["epoch"] for row in rows] == ["0", "1", "2"]
    assert {"val_acc", "valpx_pxap", "train_loss"} <= set(rows[1])
    for name in ("best-loc.pt", "best-cls.pt", "last.pt"):
        ckpt = torch.load(out / name, weights_only=True)
        assert ckpt["format"] == "histo-wsl/1"
    card = load_checkpoint(out / "best-loc.pt")["card"]
    assert card["class_names"] == ["gland", "normal"] and card["negative_class"] == "normal"
    assert card["input_size"] == 48 and card["seed"] == 0 and card["selected_by"] == "valpx_pxap"
    # 64 px images at 1 µm/px resized to 56 px are seen at 64/56 µm/px
    assert card["mpp"] == pytest.approx(64 / 56, rel=1e-3)
    saved = load_config(out / "config.yaml")
    assert saved["crop_size"] == 48 and saved["epochs"] == 2 and saved["negative_class"] == "normal"
    assert (out / "run.json").is_file()


def test_resume_equals_an_uninterrupted_run(tmp_path, tiny_data):
    data, cfg = tiny_data
    full, part = tmp_path / "full", tmp_path / "part"
    common = [str(data), "--config", str(cfg), "--deterministic", *TINY]
    assert _train([*common, "--out", str(full), "--epochs", "3"]).exit_code == 0
    # an interrupted run: it stopped after epoch 2, then is resumed up to epoch 3
    assert _train([*common, "--out", str(part), "--epochs", "2"]).exit_code == 0
    r = _train([str(data), "--out", str(part), "--resume", "--epochs", "3", "--quiet"])
    assert r.exit_code == 0, r.stderr
    a, b = _summary(full), _summary(part)
    drop = ("seconds",)
    assert [{k: v for k, v in x.items() if k not in drop} for x in a] == [
        {k: v for k, v in x.items() if k not in drop} for x in b
    ]
    wa = torch.load(full / "last.pt", weights_only=True)["state_dict"]
    wb = torch.load(part / "last.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_refuses_changed_settings_and_missing_run(tmp_path, tiny_data):
    data, cfg = tiny_data
    r = _train([str(data), "--out", str(tmp_path / "none"), "--resume", "--quiet"])
    assert r.exit_code == 2 and "nothing to resume" in r.stderr
    out = tmp_path / "run"
    assert (
        _train(
            [str(data), "--out", str(out), "--config", str(cfg), "--epochs", "1", *TINY]
        ).exit_code
        == 0
    )
    r = _train([str(data), "--out", str(out), "--resume", "--lr", "0.5"])
    assert r.exit_code == 2 and "--lr 0.01 -> 0.5" in r.stderr
    # config.yaml is written in sections; an older run's is flat: both resume
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 0.01 and saved["data"]["path"] == str(data)
    (out / "config.yaml").write_text(
        yaml.safe_dump(merge_config(load_config(out / "config.yaml")).to_flat())
    )
    # the interrupted command line itself, plus --resume: nothing changed, so it resumes
    same = [str(data), "--out", str(out), "--config", str(cfg), "--epochs", "2", *TINY]
    r = _train([*same, "--resume"])
    assert r.exit_code == 0, r.stderr
    assert [row["epoch"] for row in _summary(out)] == ["0", "1", "2"]


def test_config_rejects_unknown_keys_and_flags_override(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 3\nlearning_rate: 0.1\n")
    with pytest.raises(InputError, match="unknown config key"):
        load_config(bad)
    good = tmp_path / "good.yaml"
    good.write_text("epochs: 3\nlr: 0.1\n")
    cfg = merge_config(load_config(good), {"lr": 0.5})
    assert cfg.optim.epochs == 3 and cfg.optim.lr == 0.5
    r = _train(["somewhere", "--config", str(bad)])
    assert r.exit_code == 2 and "learning_rate" in r.stderr


def test_input_size_flags_and_a_crop_larger_than_the_resize(tmp_path, tiny_data):
    data, _ = tiny_data
    out = tmp_path / "run"
    sizes = ["--crop-size", "40", "--resize-size", "44", "--max-steps-per-epoch", "1"]
    r = _train([str(data), "--out", str(out), "--epochs", "1", *sizes, *TINY])
    assert r.exit_code == 0, r.stderr
    assert load_checkpoint(out / "last.pt")["card"]["input_size"] == 40
    r = _train([str(data), "--out", str(tmp_path / "bad"), "--crop-size", "300", *TINY])
    assert r.exit_code == 2 and "--crop-size 300 is larger than --resize-size 256" in r.stderr
    assert not (tmp_path / "bad").exists()


def test_nan_loss_stops_with_epoch_and_step(tmp_path, tiny_data):
    data, cfg = tiny_data
    out = tmp_path / "nan"
    r = _train(
        [
            str(data),
            "--out",
            str(out),
            "--config",
            str(cfg),
            "--epochs",
            "2",
            *[a for a in TINY if a != "0.01" and a != "--lr"],
            "--lr",
            "1e30",
        ]
    )
    assert r.exit_code == 3, r.stderr
    assert "epoch 1, step" in r.stderr and "loss became" in r.stderr
    assert (out / "best-cls.pt").is_file()  # the epoch-0 model is kept


def test_foreign_checkpoints_are_refused(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(2)}, plain)
    with pytest.raises(InputError, match="not a histo-wsl checkpoint"):
        load_checkpoint(plain)
    evil = tmp_path / "evil.pt"

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(InputError, match="refused|not a readable"):
        load_checkpoint(evil)
    torch.save({"payload": Payload()}, tmp_path / "evil2.pt")
    with pytest.raises(InputError, match="refused: the file needs arbitrary code"):
        load_checkpoint(tmp_path / "evil2.pt")
    text = tmp_path / "text.pt"
    text.write_text("hello")
    with pytest.raises(InputError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(text)
    ok = save_checkpoint(tmp_path / "ok.pt", {"method": "cam"}, {"w": torch.ones(1)})
    assert load_checkpoint(ok)["card"]["method"] == "cam"


def test_filling_sampler_pads_the_last_batch_and_splits_ranks():
    s = FillingSampler(10, 4, seed=0)
    idx = list(s)
    assert len(idx) == 12 and set(idx) == set(range(10))
    s.set_epoch(1)
    assert list(s) != idx
    r0 = list(FillingSampler(10, 4, seed=0, rank=0, world=2))
    r1 = list(FillingSampler(10, 4, seed=0, rank=1, world=2))
    assert len(r0) == len(r1) == 8 and set(r0) | set(r1) == set(range(10))


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path, tiny_data):
    data, cfg = tiny_data
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        "-m",
        "histo_wsl",
        "train-classifier",
        str(data),
        "--out",
        str(out),
        "--config",
        str(cfg),
        "--epochs",
        "1",
        *TINY,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2
    assert [r["epoch"] for r in _summary(out)] == ["0", "1"]


def _labels_only(csv_path, tmp_path):
    """The same patches without their masks: image labels only."""
    rows = list(csv.DictReader(open(csv_path)))
    out = tmp_path / "labels-only.csv"
    with open(out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "label", "split"])
        for r in rows:
            w.writerow([str(csv_path.parent / r["image"]), r["label"], r["split"]])
    return out


def test_without_masks_best_loc_is_selected_by_validation_accuracy(tmp_path, tiny_data):
    data, cfg = tiny_data
    labels = _labels_only(data, tmp_path)
    out = tmp_path / "run"
    r = runner.invoke(
        app,
        ["train-classifier", str(labels), "--out", str(out), "--config", str(cfg), "--epochs",
         "2", *[a for a in TINY if a != "--quiet"]],
    )  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert "valpx_pxap" not in _summary(out)[0]
    card = load_checkpoint(out / "best-loc.pt")["card"]
    assert card["selected_by"] == "val_acc"
    assert card["selection"] == {
        "criterion": "val_acc",
        "needs_masks": False,
        "rule": "highest validation accuracy, ties to the later epoch (no masks needed)",
    }
    # the same epoch as best-cls.pt: one criterion, one choice
    assert card["epoch"] == load_checkpoint(out / "best-cls.pt")["card"]["epoch"]
    import json

    summary = json.loads((out / "run.json").read_text())["summary"]
    assert summary["use_next"] == str(out / "best-loc.pt")
    assert summary["checkpoints"]["best-loc.pt"]["criterion"] == "val_acc"
    # the closing summary names the checkpoint to use next, why, and where the report is
    assert "Use next:" in r.stderr and "best-loc.pt" in r.stderr
    assert "highest validation accuracy" in r.stderr and "summary.csv" in r.stderr


def test_resume_of_a_state_saved_before_named_criteria(tmp_path, tiny_data):
    """A last.pt whose bests are keyed by metric (older runs) resumes with the same choices."""
    data, cfg = tiny_data
    out = tmp_path / "old"
    common = [str(data), "--config", str(cfg), "--deterministic", *TINY]
    assert _train([*common, "--out", str(out), "--epochs", "1"]).exit_code == 0
    ckpt = torch.load(out / "last.pt", weights_only=True)
    tr = ckpt["training"]
    files = {"best-loc.pt": "valpx_pxap", "best-cls.pt": "val_acc"}
    tr["best"] = {files[f]: v for f, v in tr["best"].items()}
    tr["best_epoch"] = {files[f]: v for f, v in tr["best_epoch"].items()}
    del tr["selection"]
    torch.save(ckpt, out / "last.pt")
    r = _train([str(data), "--out", str(out), "--resume", "--epochs", "2", "--quiet"])
    assert r.exit_code == 0, r.stderr
    assert load_checkpoint(out / "best-loc.pt")["card"]["selected_by"] == "valpx_pxap"


def test_clip_grad_norm_bounds_every_step(tmp_path, tiny_data):
    """--clip-grad-norm caps the gradient's norm: a learning rate that makes the loss NaN without
    it (test above) leaves the weights nearly where they were with a tiny cap."""
    data, _ = tiny_data
    cfg = tmp_path / "nowd.yaml"
    cfg.write_text("crop_size: 48\nresize_size: 56\nmax_steps_per_epoch: 2\nweight_decay: 0\n")
    out = tmp_path / "clipped"
    args = [a for a in TINY if a not in ("--lr", "0.01")]
    r = _train([str(data), "--out", str(out), "--config", str(cfg), "--epochs", "1", *args,
                "--lr", "1e6", "--clip-grad-norm", "1e-9"])  # fmt: skip
    assert r.exit_code == 0, r.stderr
    rows = _summary(out)
    assert float(rows[1]["train_loss"]) < 10
    assert load_config(out / "config.yaml")["clip_grad_norm"] == 1e-9


def test_an_output_folder_that_cannot_be_written_is_refused_before_training(tmp_path, tiny_data):
    data, _ = tiny_data
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    r = runner.invoke(app, ["train-classifier", str(data), "--out", str(blocker / "run"), *TINY])
    assert r.exit_code == 2, r.stderr
    assert "the output folder cannot be written" in r.stderr and "--out" in r.stderr
    assert "Traceback" not in r.stderr and blocker.read_text() == "not a folder"


class _PoisonTask:
    """A tiny task whose last step of epoch 1 leaves a NaN weight behind a finite loss."""

    from histo_wsl.training.engine import VAL_ACC, Selection

    selection = [Selection("best-cls.pt", (VAL_ACC,))]

    def build_model(self):
        return torch.nn.Linear(2, 2)

    def param_groups(self, model, lr):
        return [{"params": list(model.parameters()), "lr": lr}]

    def train_dataset(self):
        return [{"x": torch.ones(2), "y": torch.tensor(0)} for _ in range(4)]

    def training_step(self, model, batch, epoch):
        loss = torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"])
        self.steps = getattr(self, "steps", 0) + 1
        if self.steps == 2:  # the last of epoch 1's two steps
            with torch.no_grad():
                model.weight[0, 0] = float("nan")  # what an overflowing update leaves
        return loss, {}

    def evaluate(self, model, device):
        return {"val_acc": 50.0}  # a diverged model's chance accuracy would tie epoch 0's

    def card(self):
        return {"method": "test"}

    def on_epoch_end(self, epoch):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_a_diverged_epoch_never_becomes_a_checkpoint(tmp_path):
    """Every step's loss finite, but the weights hold NaN after the epoch: the epoch is neither
    saved nor selected, and the run stops with exit code 1 (issue 26, item 6)."""
    from histo_wsl.training.engine import TrainingError, fit

    out = tmp_path / "diverged"
    cfg = TrainConfig.from_flat(
        out=str(out), epochs=2, batch_size=2, workers=0, device="cpu", lr=0.1
    )
    with pytest.raises(TrainingError, match="weights became non-finite at epoch 1"):
        fit(cfg, _PoisonTask(), quiet=True)
    assert not (out / "last.pt").exists()
    ckpt = load_checkpoint(out / "best-cls.pt")
    assert ckpt["card"]["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def test_skip_errors_lists_every_dropped_file(tmp_path, tiny_data):
    """--skip-errors says which files it left out: on stderr, in run.json and in the card."""
    import json

    data, cfg = tiny_data
    rows = list(csv.DictReader(open(data)))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"cut short")
    copy = tmp_path / "with-a-broken-image.csv"
    with open(copy, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({**r, "image": str(data.parent / r["image"]),
                        "mask": str(data.parent / r["mask"])})  # fmt: skip
        w.writerow({**rows[0], "image": str(broken), "mask": str(data.parent / rows[0]["mask"])})
    out = tmp_path / "run"
    args = [a for a in TINY if a != "--quiet"]
    r = _train([str(copy), "--out", str(out), "--config", str(cfg), "--epochs", "1",
                "--skip-errors", *args])  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert "left out (--skip-errors)" in r.stderr and "broken.png" in r.stderr
    run = json.loads((out / "run.json").read_text())
    assert any("broken.png" in m for m in run["training_data"]["skipped_files"])
    card = load_checkpoint(out / "best-loc.pt")["card"]
    assert any("broken.png" in m for m in card["training_data"]["skipped_files"])


def test_eval_every_validates_and_saves_every_n_epochs_and_at_the_last(tmp_path, tiny_data):
    data, cfg = tiny_data
    out = tmp_path / "run"
    args = [str(data), "--config", str(cfg), *TINY, "--out", str(out), "--epochs", "5"]
    r = _train([*args, "--eval-every", "2", "--data-on-device", "--channels-last"])
    assert r.exit_code == 0, r.stderr
    rows = _summary(out)
    validated = [int(x["epoch"]) for x in rows if x["val_acc"] != ""]
    assert validated == [0, 2, 4, 5]  # epoch 0, every 2nd, and the last
    assert all(x["train_loss"] != "" for x in rows[1:])
    assert load_checkpoint(out / "last.pt")["training"]["epoch"] == 5
    best = load_checkpoint(out / "best-cls.pt")["card"]["epoch"]
    assert best in validated
    saved = load_config(out / "config.yaml")
    assert saved["eval_every"] == 2 and saved["data_on_device"] and saved["channels_last"]


def test_time_limit_stops_a_run_resumably(tmp_path, tiny_data):
    data, cfg = tiny_data
    out = tmp_path / "run"
    args = [str(data), "--config", str(cfg), *TINY, "--out", str(out), "--epochs", "4"]
    r = _train([*args, "--eval-every", "3", "--time-limit", "0", "--json"])
    assert r.exit_code == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["epochs_run"] == 1 and summary["stopped"].startswith("time limit")
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "stopped"
    # the stopped epoch is validated and saved although --eval-every skips it
    assert load_checkpoint(out / "last.pt")["training"]["epoch"] == 1
    assert _summary(out)[-1]["val_acc"] != ""
    # resumed under the same limit it stops again after one epoch; the next job's limit is its own
    resume = [str(data), "--out", str(out), "--resume", "--epochs", "4", "--quiet"]
    assert _train(resume).exit_code == 0
    assert load_checkpoint(out / "last.pt")["training"]["epoch"] == 2
    r = _train([*resume, "--time-limit", "60"])
    assert r.exit_code == 0, r.stderr
    assert json.loads((out / "run.json").read_text())["status"] == "done"
    assert [int(x["epoch"]) for x in _summary(out)] == [0, 1, 2, 3, 4]
