import pytest
import torch
from typer.testing import CliRunner

from histo_wsl.cli.app import app
from histo_wsl.errors import InputError
from histo_wsl.inference.predictor import load_model
from histo_wsl.methods import load_trained
from histo_wsl.methods.negev import DecoderTask
from histo_wsl.methods.negev_losses import negative_loss
from histo_wsl.networks.classifier import build_classifier
from histo_wsl.networks.negev import NEGEVModel
from histo_wsl.registry.checkpoint import load_checkpoint
from histo_wsl.synthetic.patches import write_patch_dataset
from histo_wsl.training.config import TrainConfig

runner = CliRunner()
TINY = ["--batch-size", "4", "--workers", "0", "--quiet", "--device", "cpu"]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    root = tmp_path_factory.mktemp("s2")
    data = write_patch_dataset(root / "data", n_per_class=6, size=64, seed=4)
    cfg = root / "tiny.yaml"
    cfg.write_text("crop_size: 48\nresize_size: 56\nmax_steps_per_epoch: 2\n")
    out = root / "cam"
    r = runner.invoke(
        app,
        [
            "train-classifier",
            str(data),
            "--out",
            str(out),
            "--config",
            str(cfg),
            "--epochs",
            "1",
            "--no-pretrained",
            *TINY,
        ],
    )
    assert r.exit_code == 0, r.stderr
    return data, cfg, out / "best-loc.pt"


@pytest.mark.parametrize("backbone", ["mobilenetv2", "resnet18", "vgg16"])
def test_decoder_output_is_full_resolution(backbone):
    model = NEGEVModel(build_classifier(backbone, "wgap", 2, pretrained=False))
    x = torch.randn(1, 3, 64, 64)
    logits, seg = model.segment(x)
    assert logits.shape == (1, 2) and seg.shape == (1, 2, 64, 64)
    _, _, stages = model.segment(x, features=True)  # for the training step's seeds
    with torch.no_grad():
        for got, want in zip(stages, model.classifier.forward_features(x), strict=True):
            torch.testing.assert_close(got, want)
    _, prob = model.localize(x)
    assert prob.shape == (1, 64, 64) and 0 <= prob.min() and prob.max() <= 1


def test_frozen_classifier_is_unchanged_and_negative_term_drives_to_background():
    torch.manual_seed(0)
    model = NEGEVModel(build_classifier("mobilenetv2", "wgap", 2, pretrained=False))
    before = {k: v.clone() for k, v in model.classifier.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    x = torch.rand(2, 3, 48, 48)
    model.train()
    first = None
    for _ in range(15):
        _, seg = model(x, segment=True)
        loss = negative_loss(seg)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.classifier.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN stats included
    model.eval()
    _, prob = model.localize(x)
    assert loss.item() < first and prob.mean() < 0.2


def test_train_decoder_end_to_end(tmp_path, stage1):
    data, cfg, ckpt = stage1
    out = tmp_path / "negev"
    r = runner.invoke(
        app,
        [
            "train-decoder",
            str(data),
            "--classifier",
            str(ckpt),
            "--out",
            str(out),
            "--config",
            str(cfg),
            "--epochs",
            "2",
            "--negative-class",
            "normal",
            "--size-lambda",
            "0.5",
            "--crf-lambda",
            "0.5",
            *TINY,
        ],
    )
    assert r.exit_code == 0, r.stderr
    pred = load_model(out / "best-loc.pt")  # self-contained: classifier + decoder
    assert pred.method == "negev" and pred.card["negative_term"] is True
    assert pred.card["size_term"]["lambda"] == 0.5
    assert pred.card["crf_term"]["lambda"] == 0.5 and pred.card["crf_term"]["window"] == 9
    header = (out / "summary.csv").read_text().splitlines()[0].split(",")
    assert {"seed_loss", "negative_loss", "size_loss", "size_t", "crf_loss"} <= set(header)
    state = load_checkpoint(out / "last.pt")
    assert state["training"]["task"]["size_t"] == pytest.approx(1.01**2)  # after 2 epochs
    logits, maps = pred.predict(torch.randn(2, 3, 48, 48))
    assert logits.shape == (2, 2) and maps.shape == (2, 48, 48)


def test_bad_inputs_before_training(tmp_path, stage1):
    data, cfg, ckpt = stage1
    r = runner.invoke(
        app,
        [
            "train-decoder",
            str(data),
            "--classifier",
            str(ckpt),
            "--out",
            str(tmp_path / "x"),
            "--negative-class",
            "tumour",
            *TINY,
        ],
    )
    assert r.exit_code == 2 and "not one of the classes" in r.stderr
    other = tmp_path / "other.csv"
    other.write_text(data.read_text().replace(",gland,", ",tumour,"))
    import shutil

    for sub in ("images", "masks"):
        shutil.copytree(data.parent / sub, tmp_path / sub)
    r = runner.invoke(
        app,
        [
            "train-decoder",
            str(other),
            "--classifier",
            str(ckpt),
            "--out",
            str(tmp_path / "y"),
            *TINY,
        ],
    )
    assert r.exit_code == 2 and "label 'tumour'" in r.stderr
    r = runner.invoke(app, ["train-decoder", str(data), "--out", str(tmp_path / "z"), *TINY])
    assert r.exit_code == 2 and "--classifier is required" in r.stderr
    fake = tmp_path / "fake.pt"
    torch.save(
        {
            "format": "histo-wsl/1",
            "card": {"method": "cam", "backbone": "resnet18", "head": "wgap", "num_classes": 2},
            "state_dict": {},
        },
        fake,
    )
    r = runner.invoke(
        app,
        [
            "train-decoder",
            str(data),
            "--classifier",
            str(fake),
            "--out",
            str(tmp_path / "w"),
            *TINY,
        ],
    )
    assert r.exit_code == 2 and "do not fit" in r.stderr


def test_size_t_schedule_is_task_state():
    from types import SimpleNamespace

    stage1 = SimpleNamespace(card={"method": "cam", "class_names": ["a", "b"]}, path="x.pt")
    ds = SimpleNamespace(class_names=["a", "b"], negative_class=None)
    cfg = TrainConfig.from_flat(size_lambda=1.0, size_t0=1.0, size_t_max=1.03, size_t_mult=1.01)
    task = DecoderTask(cfg, ds, stage1)
    seen = [task.size_t]
    for epoch in (1, 2, 3):
        task.on_epoch_end(epoch)
        seen.append(task.size_t)
    assert seen == pytest.approx([1.0, 1.01, 1.0201, 1.03])  # ×1.01 per epoch, capped
    resumed = DecoderTask(cfg, ds, stage1)
    resumed.load_state_dict(task.state_dict())
    assert resumed.size_t == task.size_t
    for bad in (
        {"seed_mode": "fixed"},
        {"size_t_max": 0.5},
        {"size_lambda": -1.0},
        {"fg_sampler": "top"},
        {"fg_erode": 4},
        {"crf_scale": 0.0},
        {"crf_sigma_xy": 0.0},
        {"crf_lambda": -0.1},
    ):
        with pytest.raises(InputError):
            DecoderTask(TrainConfig.from_flat(**bad), ds, stage1)


def test_seeds_come_from_the_cam_over_the_negative_class(stage1):
    """With a negative class the seeds' CAM is the true class's over it (--no-seed-contrast: alone)."""
    from types import SimpleNamespace

    from histo_wsl.networks.cams import compute_cams

    _, _, ckpt = stage1
    classifier = load_trained(ckpt)
    names = classifier.card["class_names"]
    student = NEGEVModel(load_trained(ckpt).model)
    torch.manual_seed(0)
    x, y = torch.randn(3, 3, 48, 48), torch.tensor([1, 1, 0])

    def seeds(negative, **flat):
        ds = SimpleNamespace(class_names=names, negative_class=negative)
        task = DecoderTask(TrainConfig.from_flat(**flat), ds, classifier)
        return task.seed_maps(student, x, y)

    contrast = compute_cams(student.classifier, x, y, size=(48, 48), against=0)
    own = compute_cams(student.classifier, x, y, size=(48, 48))
    torch.testing.assert_close(seeds(0), contrast)
    assert not torch.allclose(contrast[:2], own[:2])
    torch.testing.assert_close(seeds(0, seed_contrast=False), own)
    torch.testing.assert_close(seeds(None), own)  # no negative class: the paper's CAM
    ds = SimpleNamespace(class_names=names, negative_class=0, describe=dict)
    task = DecoderTask(TrainConfig.from_flat(), ds, classifier)
    assert task.card()["seeds"]["over_class"] == names[0]  # the card names the class subtracted


def test_seed_teacher_second_round(tmp_path, stage1):
    from types import SimpleNamespace

    data, cfg, ckpt = stage1
    args = ["--config", str(cfg), "--epochs", "1", "--seeds-fg", "3", "--seeds-bg", "3", *TINY]

    def decoder(out, *extra):
        cmd = ["train-decoder", str(data), "--classifier", str(ckpt), "--out", str(out)]
        return runner.invoke(app, [*cmd, *extra, *args])

    first = tmp_path / "round1"
    r = decoder(first, "--no-seed-contrast")
    assert r.exit_code == 0, r.stderr
    second = tmp_path / "round2"
    teacher = first / "best-loc.pt"
    r = decoder(second, "--seed-teacher", str(teacher))
    assert r.exit_code == 0, r.stderr
    card = load_model(second / "best-loc.pt").card
    assert card["config"]["seed_contrast"] is True
    assert load_model(teacher).card["config"]["seed_contrast"] is False
    assert card["seeds"]["over_class"] is None  # no negative class: the class's own CAM
    assert card["seeds"]["teacher"]["checkpoint"] == str(teacher)
    assert "valpx_pxap" in card["seeds"]["teacher"]["metrics"]
    assert load_model(first / "best-loc.pt").card["seeds"]["teacher"] is None

    # the seeds are drawn from the teacher's foreground probability, not from the CAM
    classifier = load_trained(ckpt)  # as training loads it (not the folded inference form)
    ds = SimpleNamespace(class_names=classifier.card["class_names"], negative_class=None)
    task = DecoderTask(TrainConfig.from_flat(seed_teacher=str(teacher)), ds, classifier)
    student = NEGEVModel(load_trained(ckpt).model)
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    want = load_model(teacher).predict(x)[1]
    # the predictor runs the folded inference form, training the unfolded one: float rounding
    # apart (up to ~1e-5 on some inputs), the same map; a CAM would differ by far more
    close = {"atol": 1e-4, "rtol": 1e-4}
    torch.testing.assert_close(task.seed_maps(student, x, torch.tensor([0, 0])), want, **close)
    assert task._teacher_shares_encoder  # same classifier: the student's stages are decoded
    _, _, stages = student.segment(x, features=True)
    got = task.seed_maps(student, x, torch.tensor([0, 0]), stages)
    torch.testing.assert_close(got, want, **close)

    # a stage-1 checkpoint is not a teacher
    r = decoder(tmp_path / "bad", "--seed-teacher", str(ckpt))
    assert r.exit_code == 2 and "--seed-teacher must be a train-decoder checkpoint" in r.stderr
    assert not (tmp_path / "bad" / "best-loc.pt").exists()
