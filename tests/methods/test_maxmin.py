"""Max-Min uncertainty: mask, gradients, losses, schedules, training, checkpoints, CLI."""

import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from factories import maxmin_card
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from histo_wsl.cli.app import app
from histo_wsl.inference.predictor import load_model
from histo_wsl.methods.maxmin import mask_range, sigma_at, t_at
from histo_wsl.methods.maxmin_losses import (
    eem,
    elb,
    maxmin_loss,
    negative_mask_loss,
    sem,
    size_barrier,
)
from histo_wsl.networks.backbones import Backbone
from histo_wsl.networks.maxmin import MaxMinModel, MaxMinOutput, maxmin_param_groups
from histo_wsl.registry.checkpoint import save_checkpoint
from histo_wsl.synthetic.patches import write_patch_dataset
from histo_wsl.training.config import TrainConfig

runner = CliRunner()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from threads; on a busy machine one thread is far faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyBackbone(Backbone):
    """3 → 8 channels at stride 4: enough to exercise the Max-Min wiring in milliseconds."""

    def __init__(self) -> None:
        super().__init__()
        self.name = "tiny"
        self.conv = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.stage_channels, self.stage_strides = [8], [4]

    def forward(self, x):
        return [torch.relu(self.conv(x))]

    def is_x10(self, param_name: str) -> bool:
        return False


def _model(**kw) -> MaxMinModel:
    torch.manual_seed(0)
    return MaxMinModel(TinyBackbone(), 2, **kw).eval()


# -- network ------------------------------------------------------------------------------------
def test_mask_is_binary_like_and_normalised_per_image():
    x = torch.rand(1, 3, 32, 32)
    batch = torch.cat([x, 100.0 * torch.rand(1, 3, 32, 32)])  # two very different scales
    steep = _model(w=50.0, sigma=0.5)
    _, mask = steep.localize(batch)
    assert mask.shape == (2, 32, 32)
    for m in mask:  # each image reaches both ends: per-image, not per-batch, normalisation
        assert m.min() < 0.01 and m.max() > 0.99
    assert ((mask < 0.05) | (mask > 0.95)).float().mean() > 0.7  # mostly binary
    # the paper's w = 5, σ = 0.15: every image spans exactly [sigmoid(−wσ), sigmoid(w(1 − σ))]
    _, mask = _model().localize(batch)
    lo, hi = torch.sigmoid(torch.tensor(-0.75)), torch.sigmoid(torch.tensor(4.25))
    assert torch.allclose(mask.flatten(1).amin(1), lo.expand(2), atol=1e-5)
    assert torch.allclose(mask.flatten(1).amax(1), hi.expand(2), atol=1e-4)


def test_windows_of_a_slide_are_normalised_by_the_training_range():
    """A window of stroma is not stretched to foreground once the range is the training's."""
    model = _model()
    x = torch.rand(2, 3, 32, 32)
    x[1] *= 0.05  # a dull, nearly flat window
    with torch.no_grad():
        _, soft = model.soft_map(x)
    w, sigma = float(model.w), float(model.sigma)
    own = (soft - soft.flatten(1).amin(1)[:, None, None]) / (
        soft.flatten(1).amax(1) - soft.flatten(1).amin(1) + 1e-6
    )[:, None, None]
    torch.testing.assert_close(model.locate(x)[1], w * (own - sigma))
    # training images whose maps spanned 20 times what these windows span
    lo = float(soft.min())
    hi = lo + 20.0 * (float(soft.max()) - lo)
    model.window_range = (lo, hi)
    torch.testing.assert_close(model.locate(x)[1], w * (own - sigma))  # whole images: per image
    model.windowed = True
    windowed = model.locate(x)[1]
    torch.testing.assert_close(windowed, w * ((soft - lo) / (hi - lo) - sigma))
    assert torch.sigmoid(windowed[1]).max() < 0.5 < torch.sigmoid(model.w * (own[1] - sigma)).max()
    model.window_range = None  # no range recorded: per image, as before
    torch.testing.assert_close(model.locate(x)[1], w * (own - sigma))


def test_mask_range_is_the_mean_per_image_minimum_and_maximum():
    model = _model()
    images = [{"image": torch.rand(3, 32, 40)}, {"image": torch.rand(3, 24, 32) * 3}]
    lows, highs = [], []
    for item in images:
        with torch.no_grad():
            soft = model.soft_map(item["image"][None])[1]
        lows.append(float(soft.min()))
        highs.append(float(soft.max()))
    lo, hi = mask_range(model.train(), images)
    assert model.training  # left as it was found
    assert lo == pytest.approx(sum(lows) / 2) and hi == pytest.approx(sum(highs) / 2)
    with pytest.raises(ValueError, match="at least one image"):
        mask_range(model, [])
    flat = _model()
    for p in flat.head.parameters():
        nn.init.zeros_(p)
    with pytest.raises(ValueError, match="flat on every image"):
        mask_range(flat, images)


@pytest.mark.parametrize("cl_scale", [1.0, 0.8])
def test_gradients_reach_the_localizer_through_the_mask_from_ce_pos_alone(cl_scale):
    model = _model(cl_scale=cl_scale).train()
    out = model(torch.rand(2, 3, 32, 32), branches=True)
    F.cross_entropy(out.pos_logits, torch.tensor([0, 1])).backward()
    # the localizer head only touches C(X+) through the mask
    assert model.head.conv.weight.grad is not None
    assert model.head.conv.weight.grad.abs().sum() > 0
    assert model.cl_head.conv.weight.grad.abs().sum() > 0
    assert model.backbone.conv.weight.grad.abs().sum() > 0


def test_absolute_mask_can_be_empty_and_needs_the_negative_class():
    model = _model(mask_mode="absolute", negative_index=1)
    with torch.no_grad():  # localizer: class 1 (negative) dominates everywhere
        model.head.conv.weight.zero_()
        model.head.conv.bias.copy_(torch.tensor([-1.0] * 5 + [1.0] * 5))
    _, mask = model.localize(torch.rand(2, 3, 32, 32))
    assert mask.max() < 1e-4  # 5 · (−1 − 1) = −10 → sigmoid ≈ 4.5e-5
    with pytest.raises(ValueError, match="negative class"):
        MaxMinModel(TinyBackbone(), 2, mask_mode="absolute")


def test_param_groups_put_both_heads_at_ten_times():
    model = _model()
    groups = maxmin_param_groups(model, 0.01, 10.0)
    x10 = next(g for g in groups if g["name"] == "x10")
    ids = {id(p) for p in x10["params"]}
    assert x10["lr"] == pytest.approx(0.1)
    assert all(id(p) in ids for p in [*model.head.parameters(), *model.cl_head.parameters()])
    assert id(model.backbone.conv.weight) not in ids


# -- losses -------------------------------------------------------------------------------------
def test_eem_and_sem_closed_forms():
    k = 4
    uniform = torch.zeros(3, k)
    assert eem(uniform).item() == pytest.approx(-math.log(k))  # −H maximal entropy
    assert sem(uniform).item() == pytest.approx(math.log(k))
    one_hot = torch.tensor([[60.0, 0.0, 0.0, 0.0]])
    assert eem(one_hot).item() == pytest.approx(0.0, abs=1e-6)
    assert sem(one_hot).item() == pytest.approx(0.75 * 60.0, rel=1e-4)
    p = torch.tensor([[0.5, 0.25, 0.25]])
    assert eem(p.log()).item() == pytest.approx(0.5 * math.log(0.5) + 0.5 * math.log(0.25))
    assert sem(p.log()).item() == pytest.approx(-(math.log(0.5) + 2 * math.log(0.25)) / 3)
    # the uniform distribution is the minimiser of both
    rand = torch.randn(50, k)
    assert eem(rand) > -math.log(k) and sem(rand) > math.log(k)


@pytest.mark.parametrize("t", [5.0, 10.0])
def test_log_barrier_matches_its_definition_and_is_c1(t):
    z = torch.tensor([-2.0, -0.5, -0.05, 0.0, 0.3])
    out = elb(z, t)
    for zi, oi in zip(z.tolist(), out.tolist(), strict=True):
        if zi <= -1 / t**2:
            expected = -math.log(-zi) / t
        else:
            expected = t * zi - math.log(1 / t**2) / t + 1 / t
        assert oi == pytest.approx(expected, rel=1e-5, abs=1e-6)
    z0, eps = -1.0 / t**2, 1e-4
    zz = torch.tensor([z0 - eps, z0, z0 + eps], dtype=torch.float64, requires_grad=True)
    v = elb(zz, t)
    v.sum().backward()
    assert v[0].item() == pytest.approx(v[2].item(), abs=3 * t * eps)  # value
    assert v[1].item() == pytest.approx(-math.log(1 / t**2) / t)
    assert zz.grad.tolist() == pytest.approx([t, t, t], rel=1e-2)  # slope on both sides


def test_size_barrier_uses_fractions_and_maxmin_loss_terms():
    half = torch.full((2, 8, 8), 0.5)
    t = 5.0
    assert size_barrier(half, t).tolist() == pytest.approx([2 * math.log(2) / t] * 2)
    assert size_barrier(torch.full((1, 64, 64), 0.5), t).item() == pytest.approx(
        size_barrier(half, t)[0].item()
    )  # independent of the image size
    logits = torch.zeros(2, 2)
    labels = torch.tensor([0, 1])
    mask_logits = torch.zeros(2, 8, 8)
    out = MaxMinOutput(logits, mask_logits, half, logits, logits)
    loss, stats = maxmin_loss(out, labels, lam=2.0, regularizer="sem", t=t)
    expected = 2 * math.log(2) + 2.0 * math.log(2) + 2 * math.log(2) / t
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert set(stats) >= {"ce_loc", "ce_pos", "sem_neg", "size_barrier"}
    negative = torch.tensor([False, True])
    loss, stats = maxmin_loss(
        out,
        labels,
        lam=2.0,
        regularizer="eem",
        t=t,
        size=False,
        negative=negative,
    )
    # R on the positive image only; BCE(sigmoid(0) = 0.5, 0) = log 2 on the negative one
    assert stats["negative_bce"] == pytest.approx(math.log(2))
    assert loss.item() == pytest.approx(2 * math.log(2) - 2.0 * math.log(2) + math.log(2))
    assert negative_mask_loss(torch.zeros(0, 4, 4)).item() == 0.0


def test_sigma_and_t_schedules():
    cfg = TrainConfig()
    assert sigma_at(cfg, 1) == pytest.approx(0.15) and sigma_at(cfg, 11) == pytest.approx(0.16)
    assert sigma_at(cfg, 500) == pytest.approx(0.2)
    assert t_at(cfg, 1) == pytest.approx(5.0) and t_at(cfg, 2) == pytest.approx(5.05)
    assert t_at(cfg, 500) == pytest.approx(10.0)


# -- checkpoints --------------------------------------------------------------------------------
def test_checkpoint_round_trip_through_the_predictor(tmp_path):
    from histo_wsl.networks.backbones import build_backbone
    from histo_wsl.networks.folding import for_inference

    torch.manual_seed(1)
    model = MaxMinModel(build_backbone("mobilenetv2", False), 2, sigma=0.17, cl_scale=0.8).eval()
    card = maxmin_card()
    mm = card["maxmin"]
    path = save_checkpoint(tmp_path / "mm.pt", card, model.state_dict())
    pred = load_model(path)
    assert pred.method == "maxmin" and float(pred.model.sigma) == pytest.approx(0.17)
    assert pred.model.cl_scale == 0.8
    # a card written before cl_scale existed: its model saw X± at full size
    old = dict(card, maxmin={k: v for k, v in mm.items() if k != "cl_scale"})
    save_checkpoint(tmp_path / "old.pt", old, model.state_dict())
    assert load_model(tmp_path / "old.pt").model.cl_scale == 1.0
    x = torch.randn(2, 3, 40, 40)
    logits, maps = pred.predict(x, torch.tensor([1, 1]))
    with torch.no_grad():  # against the same inference form (folded, channels-last)
        fast = for_inference(model)
        ref_logits, ref_maps = fast.localize(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(logits, ref_logits, atol=1e-5) and torch.allclose(maps, ref_maps)
    assert maps.shape == (2, 40, 40) and 0 <= maps.min() and maps.max() <= 1
    bad = dict(card, maxmin={"w": 5.0})
    save_checkpoint(tmp_path / "bad.pt", bad, model.state_dict())
    with pytest.raises(Exception, match="Max-Min model card"):
        load_model(tmp_path / "bad.pt")


# -- CLI ----------------------------------------------------------------------------------------
TINY = ["--batch-size", "4", "--workers", "0", "--device", "cpu", "--quiet", "--seed", "0"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--maxmin-regularizer", "kl"], "must be sem or eem"),
        (["--maxmin-sigma", "0.3"], "--maxmin-sigma-max must be in"),
        (["--elb-t0", "20"], "--elb-t-max must be >= --elb-t0"),
        (["--head", "gap"], "WILDCAT heads"),
    ],
)
def test_bad_settings_are_rejected_before_reading_data(tmp_path, args, message):
    r = runner.invoke(
        app, ["train-classifier", str(tmp_path / "nodata"), "--method", "maxmin", *args, *TINY]
    )
    assert r.exit_code == 2 and message in r.stderr, r.stderr


def test_bad_config_file_values_and_method_are_rejected(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("method: maxmin\nmaxmin_w: 0\n")
    r = runner.invoke(app, ["train-classifier", "x", "--config", str(cfg), *TINY])
    assert r.exit_code == 2 and "--maxmin-w must be > 0" in r.stderr
    cfg.write_text("method: maxmin\nmaxmin_lambda: -1\n")
    r = runner.invoke(app, ["train-classifier", "x", "--config", str(cfg), *TINY])
    assert r.exit_code == 2 and "--maxmin-lambda must be >= 0" in r.stderr
    cfg.write_text("method: maxmin\nmaxmin_cl_scale: 1.5\n")
    r = runner.invoke(app, ["train-classifier", "x", "--config", str(cfg), *TINY])
    assert r.exit_code == 2 and "--maxmin-cl-scale must be in (0, 1]" in r.stderr
    r = runner.invoke(app, ["train-classifier", "x", "--method", "negev", *TINY])
    assert r.exit_code == 2 and "--method must be one of cam, maxmin" in r.stderr


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """8 + 8 synthetic 32 px gland/normal patches with masks (seeded)."""
    return write_patch_dataset(
        tmp_path_factory.mktemp("mm") / "data", n_per_class=8, size=32, seed=1
    )


class SmallBackbone(Backbone):
    """Three conv-BN-ReLU layers at stride 4: learns the synthetic glands in a few steps."""

    def __init__(self) -> None:
        super().__init__()
        self.name = "small"
        layers: list[nn.Module] = []
        for cin, cout, stride in ((3, 16, 1), (16, 32, 2), (32, 32, 2)):
            layers += [nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU()]
        self.net = nn.Sequential(*layers)
        self.stage_channels, self.stage_strides = [32], [4]

    def forward(self, x):
        return [self.net(x)]

    def is_x10(self, param_name: str) -> bool:
        return False


def _load(csv_path):
    names = sorted((csv_path.parent / "images").glob("*.png"))
    x = torch.stack(
        [torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in names]
    )
    masks = torch.stack(
        [
            torch.from_numpy(np.array(Image.open(csv_path.parent / "masks" / p.name)) > 0)
            for p in names
        ]
    )
    labels = torch.tensor([0 if p.name.startswith("gland") else 1 for p in names])
    return (x.float() / 255 - 0.5) / 0.25, masks, labels


@pytest.mark.parametrize(("mode", "steps", "margin"), [("minmax", 20, 20), ("absolute", 50, 15)])
def test_localizer_learns_the_glands_better_than_chance(synthetic, mode, steps, margin):
    """Seeded SGD steps on 16 images; PxAP of the mask vs a random map's (the prevalence).

    minmax: every image's mask spans [0, 1], so PxAP is taken on gland images (the GlaS case);
    absolute (negative class normal): over all images, normal ones included. Margins are about
    half the smallest seen over 4 model seeds × 3 data seeds (minmax ≥ 29, absolute ≥ 25 points).
    """
    from histo_wsl.evaluation.metrics import PxAPMeter

    x, masks, labels = _load(synthetic)
    torch.manual_seed(0)
    neg = 1 if mode == "absolute" else None
    model = MaxMinModel(SmallBackbone(), 2, mask_mode=mode, negative_index=neg)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        i = torch.randperm(len(x), generator=g)[:8]
        out = model.train()(x[i], branches=True)
        loss, _ = maxmin_loss(
            out,
            labels[i],
            lam=1.0,
            negative=labels[i] == 1 if neg is not None else None,
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        _, maps = model.eval().localize(x)
    keep = labels == 0 if mode == "minmax" else torch.ones_like(labels, dtype=torch.bool)
    meter = PxAPMeter()
    for m, gt in zip(maps[keep], masks[keep], strict=True):
        meter.update(m.numpy(), gt.numpy())
    prevalence = 100 * masks[keep].float().mean().item()
    assert meter.pxap() > prevalence + margin, (meter.pxap(), prevalence)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, synthetic):
    """Two one-step epochs of train-classifier --method maxmin --negative-class normal."""
    root = tmp_path_factory.mktemp("maxmin")
    cfg = root / "tiny.yaml"
    cfg.write_text("crop_size: 32\nresize_size: 36\n")
    out = root / "run"
    r = runner.invoke(
        app,
        [
            "train-classifier",
            str(synthetic),
            "--method",
            "maxmin",
            "--negative-class",
            "normal",
            "--out",
            str(out),
            "--config",
            str(cfg),
            "--backbone",
            "mobilenetv2",
            "--no-pretrained",
            "--epochs",
            "2",
            "--max-steps-per-epoch",
            "1",
            *TINY,
        ],
    )
    assert r.exit_code == 0, r.stderr
    return root, synthetic, out


def test_tiny_run_writes_a_stage1_style_checkpoint(tiny_run):
    _, _, out = tiny_run
    for name in ("best-cls.pt", "best-loc.pt", "last.pt", "summary.csv", "config.yaml", "run.json"):
        assert (out / name).is_file()
    pred = load_model(out / "last.pt")
    card = pred.card
    assert card["method"] == "maxmin" and card["class_names"] == ["gland", "normal"]
    assert card["negative_class"] == "normal" and card["threshold"] == 0.5
    assert card["maxmin"]["mask"] == "absolute" and card["maxmin"]["negative_index"] == 1
    assert (
        card["head"] == "wildcat" and card["maxmin"]["lambda"] == TrainConfig().maxmin.maxmin_lambda
    )
    assert card["input_size"] == 32
    # σ moved after each of the 2 epochs: the checkpoint carries the next epoch's value
    assert float(pred.model.sigma) == pytest.approx(0.152)
    summary = (out / "summary.csv").read_text()
    assert "size_barrier" in summary and "sem_neg" in summary and "val_acc" in summary


def test_evaluate_and_localize_take_a_maxmin_checkpoint(tiny_run):
    root, data, out = tiny_run
    ev = root / "eval"
    r = runner.invoke(
        app,
        [
            "evaluate",
            str(out / "last.pt"),
            "--data",
            str(data),
            "--split",
            "val",
            "--bootstrap",
            "0",
            "--examples",
            "0",
            "--out",
            str(ev),
            "--device",
            "cpu",
            "--quiet",
        ],
    )
    assert r.exit_code == 0, r.stderr
    model = json.loads((ev / "metrics.json").read_text())["models"][0]
    assert model["method"] == "maxmin" and "Max-Min" in model["map"]
    assert 0 <= model["localization"]["pxap"]["value"] <= 100
    r = runner.invoke(
        app,
        [
            "localize",
            str(data.parent / "images" / "gland_000.png"),
            "--model",
            str(out / "last.pt"),
            "--whole-image",
            "--out",
            str(root / "loc"),
            "--device",
            "cpu",
            "--quiet",
        ],
    )
    assert r.exit_code == 0, r.stderr
    rec = json.loads((root / "loc" / "gland_000" / "gland_000.json").read_text())
    assert rec["predicted_class"] in ("gland", "normal")
    prob = np.asarray(Image.open(root / "loc" / "gland_000" / "gland_000.prob.png"))
    assert prob.shape == (32, 32)


def test_refine_knn_keeps_a_bank_of_the_mask_and_blends_it(tmp_path, synthetic):
    """--refine knn: the bank holds the saved mask on the train images (0 on negative ones)."""
    from histo_wsl.data.images import LabelledImages, eval_transform
    from histo_wsl.methods.base import load_training_data

    out = tmp_path / "run"
    common = ["train-classifier", str(synthetic), "--method", "maxmin", "--negative-class"]
    common += ["normal", "--crop-size", "32", "--resize-size", "36", "--no-pretrained"]
    common += ["--epochs", "2", "--max-steps-per-epoch", "1", *TINY]
    refine = ["--refine", "knn", "--refine-alpha", "0.6", "--knn-k", "3", "--knn-dims", "4"]
    refine += ["--knn-stages", "3"]
    r = runner.invoke(app, [*common, "--out", str(out), *refine])
    assert r.exit_code == 0, r.stderr
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and all(row["valpx_pxap_mask"] != "" for row in rows)  # the mask's own

    pred = load_model(out / "best-loc.pt")
    card, net = pred.card, pred.model
    assert card["refine"]["method"] == "knn" and card["refine"]["alpha"] == 0.6
    assert card["refine"]["k"] == 3 and card["refine"]["stages"] == 3
    assert net.refiner.n_stages == 3 and net.refiner.keys.shape[1] == 12
    assert net.refiner.ready and len(net.refiner) == card["refine"]["bank_pixels"]
    ds = load_training_data(TrainConfig.from_flat(data=str(synthetic), negative_class="normal"))
    train = LabelledImages(ds.split("train"), 32, eval_transform())
    for index in (0, len(train) - 1):
        item = train[index]
        own = net.refiner.values[net.refiner.owners == item["index"]]
        if ds.class_names[item["label"]] == "normal":
            assert torch.all(own == 0)  # negative images are background by definition
        else:  # each kept pixel is the 4×4-pooled mask of the saved model
            mask = torch.sigmoid(net.locate(item["image"][None])[1])
            pooled = F.adaptive_avg_pool2d(mask[:, None], (4, 4)).reshape(-1)
            assert all(torch.isclose(pooled, v, atol=1e-5).any() for v in own)
    x = torch.stack([train[i]["image"] for i in range(3)])
    logits, refined = net.localize(x)
    raw_logits, mask = net.localize(x, refine=False)
    torch.testing.assert_close(logits, raw_logits)  # the class is still that of C(X ⊙ M)
    want = 0.4 * mask + 0.6 * net.refiner.knn_map(net.forward_features(x), (32, 32))
    torch.testing.assert_close(refined, want.clamp(0, 1))

    ev = tmp_path / "ev"
    r = runner.invoke(
        app,
        ["evaluate", str(out / "best-loc.pt"), "--data", str(synthetic), "--split", "val"]
        + ["--bootstrap", "0", "--examples", "0", "--out", str(ev), "--device", "cpu", "--quiet"],
    )
    assert r.exit_code == 0, r.stderr
    assert (
        "k-NN refined (α 0.6, k 3)"
        in json.loads((ev / "metrics.json").read_text())["models"][0]["map"]
    )

    r = runner.invoke(app, [*common, "--out", str(tmp_path / "bad"), "--refine", "crf"])
    assert r.exit_code == 2 and "--refine must be one of" in r.stderr
    cam = [a if a != "maxmin" else "cam" for a in common]
    r = runner.invoke(app, [*cam, "--out", str(tmp_path / "cam"), "--refine", "knn"])
    assert r.exit_code == 2 and "use it with --method maxmin" in r.stderr
    assert not (tmp_path / "bad").exists() and not (tmp_path / "cam").exists()


def test_a_minmax_run_records_the_window_range_localize_and_export_use(tmp_path, synthetic):
    """Training measures the range on the train split; localize's windows use it, images not;
    ``models export --mask-range`` measures the same on the same weights."""
    from histo_wsl.data.images import LabelledImages, eval_transform
    from histo_wsl.inference.engine import Engine
    from histo_wsl.inference.params import LocalizeParams
    from histo_wsl.methods.base import load_training_data
    from histo_wsl.registry.checkpoint import load_checkpoint

    out = tmp_path / "run"
    args = ["train-classifier", str(synthetic), "--method", "maxmin", "--crop-size", "32"]
    args += ["--resize-size", "36", "--backbone", "tinycnn", "--no-pretrained", "--epochs", "1"]
    args += ["--max-steps-per-epoch", "1", *TINY, "--out", str(out)]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.stderr
    best = out / "best-loc.pt"
    card = load_checkpoint(best)["card"]
    lo, hi = card["maxmin"]["window_range"]
    ds = load_training_data(TrainConfig.from_flat(data=str(synthetic)))
    train = LabelledImages(ds.split("train"), 32, eval_transform())  # no µm/px: eval preset
    assert f"the {len(train)} train images resized to 32²" in card["maxmin"]["window_range_from"]
    pred = load_model(best)
    assert (lo, hi) == pytest.approx(mask_range(pred.model, train), abs=1e-5)
    assert pred.model.window_range == pytest.approx((lo, hi)) and not pred.model.windowed

    windows = Engine(LocalizeParams(model=best, device="cpu", mpp=1.0))
    assert windows.predictor.model.windowed
    assert windows.describe()["window_range"] == pytest.approx([lo, hi])
    whole = Engine(LocalizeParams(model=best, device="cpu", whole_image=True))
    assert not whole.predictor.model.windowed and "window_range" not in whole.describe()

    # a card measured on images and on a slide: a new range leaves the image numbers valid
    ckpt = load_checkpoint(best)
    measured = {"evaluation": {"pxap": 50.0}, "evaluation_slide": {"slide_pxap": 40.0}}
    src = save_checkpoint(tmp_path / "src.pt", {**ckpt["card"], **measured}, ckpt["state_dict"])
    dest = tmp_path / "zoo"
    export = ["models", "export", str(src), "--name", "mm", "--dest", str(dest)]
    r = runner.invoke(app, [*export, "--mask-range", str(synthetic)])
    assert r.exit_code == 0, r.stderr
    assert "evaluation_slide was measured before the window range" in r.stderr
    exported = load_checkpoint(dest / "mm" / "model.pt")["card"]
    assert exported["evaluation"] == {"pxap": 50.0} and "evaluation_slide" not in exported
    assert exported["maxmin"]["window_range"] == pytest.approx([lo, hi], rel=1e-2)  # fp16 copy
