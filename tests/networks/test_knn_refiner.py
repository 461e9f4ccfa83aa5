import csv

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from knn_helpers import A, B, identity_bank, tiny_classifier, two_stages
from typer.testing import CliRunner

from histo_wsl.cli.app import app
from histo_wsl.data.images import LabelledImages, eval_transform
from histo_wsl.inference.predictor import load_model
from histo_wsl.networks.knn import KNNRefiner

runner = CliRunner()


def _filled(alpha: float) -> KNNRefiner:
    refiner = KNNRefiner(k=3, alpha=alpha)
    # every A pixel of the bank's images is foreground, every B pixel background
    refiner.set_bank(
        identity_bank([(A, 1.0, i) for i in range(3)] + [(B, 0.0, i) for i in range(3, 7)])
    )
    return refiner


def test_knn_map_is_the_mean_decoder_value_of_look_alike_pixels():
    refiner = _filled(alpha=1.0)
    stages = two_stages([A, B])
    knn = refiner.knn_map(stages, (1, 2))
    torch.testing.assert_close(knn, torch.tensor([[[1.0, 0.0]]]))
    decoder = torch.tensor([[[0.2, 0.6]]])
    torch.testing.assert_close(refiner(decoder, stages), knn)
    half = _filled(alpha=0.25)
    torch.testing.assert_close(half(decoder, stages), 0.75 * decoder + 0.25 * knn)
    assert _filled(alpha=0.0)(decoder, stages) is decoder
    # upsampled bilinearly to the decoder map's size
    assert refiner.knn_map(stages, (4, 8)).shape == (1, 4, 8)


@pytest.mark.parametrize("grid", [1, 2, 3])
def test_keys_on_a_finer_grid_project_the_coarse_stages_before_upsampling(grid):
    """embed_stages == embed_keys(_stage_pixels(...)): projection commutes with the upsampling."""
    from histo_wsl.networks.knn import _stage_pixels, embed_keys, embed_stages

    torch.manual_seed(grid)
    stages = [torch.randn(2, 6, 16, 12), torch.randn(2, 9, 8, 6), torch.randn(2, 11, 4, 3)]
    projections = [(torch.randn(c), torch.randn(c, 3)) for c in (6, 9, 11)]
    size = (4 * grid, 3 * grid)
    slow = embed_keys(_stage_pixels(stages, size, 3), projections)
    fast = embed_stages(stages, projections, size)
    assert fast.shape == (2 * size[0] * size[1], 9)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-4)


def test_a_bank_on_a_finer_grid_looks_up_every_finer_pixel():
    from histo_wsl.networks.knn import FeatureBank

    coarse = _filled(alpha=1.0).bank
    fine = KNNRefiner(k=3, alpha=1.0, grid=2)
    fine.set_bank(FeatureBank(coarse.keys, coarse.values, coarse.owners, coarse.projections, 2))
    assert fine.grid == 2 and fine.bank.grid == 2
    stages = two_stages([A, B])
    means = fine.bank.neighbour_means(stages, 3)
    assert means.shape == (1, 2, 4)  # the CAM layer's 1 × 2, twice as fine
    torch.testing.assert_close(means[0, :, 0], torch.ones(2))  # A's side stays foreground
    torch.testing.assert_close(means[0, :, -1], torch.zeros(2))  # B's background
    with pytest.raises(ValueError, match="grid"):
        KNNRefiner(grid=0)


def test_empty_refiner_refuses_to_guess_and_arguments_are_checked():
    with pytest.raises(RuntimeError, match="no bank"):
        KNNRefiner().knn_map(two_stages([A]), (1, 1))
    with pytest.raises(ValueError, match="alpha"):
        KNNRefiner(alpha=1.5)
    with pytest.raises(ValueError, match="k must be"):
        KNNRefiner(k=0)


def test_bank_round_trips_through_a_state_dict_into_an_empty_refiner():
    refiner = _filled(alpha=0.5)
    state = refiner.state_dict()
    assert state["keys"].shape == (7, 4) and state["axes1"].shape == (2, 2)
    empty = KNNRefiner(k=3, alpha=0.5)
    assert not empty.ready
    empty.load_state_dict(state)
    assert empty.ready and len(empty) == 7
    stages, decoder = two_stages([A, B, A]), torch.tensor([[[0.1, 0.9, 0.5]]])
    torch.testing.assert_close(empty(decoder, stages), refiner(decoder, stages))


def test_train_decoder_refine_knn_saves_a_self_contained_refined_model(tmp_path):
    data, ckpt, common = tiny_classifier(tmp_path)
    cmd = ["train-decoder", str(data), "--classifier", str(ckpt)]
    cmd += common
    out = tmp_path / "negev"
    refine = ["--refine", "knn", "--refine-alpha", "0.75", "--knn-k", "4", "--knn-bank", "10000"]
    r = runner.invoke(app, [*cmd, "--out", str(out), *refine])
    assert r.exit_code == 0, r.stderr

    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert all(row["valpx_pxap_decoder"] != "" for row in rows)  # the decoder's own PxAP too
    model = load_model(out / "best-loc.pt")  # weights_only loading, nothing else needed
    card = model.card
    assert card["refine"]["method"] == "knn" and card["refine"]["alpha"] == 0.75
    net = model.model
    assert net.refiner.ready and len(net.refiner) == card["refine"]["bank_pixels"]
    # the bank holds the saved decoder's own map on the training images (every pixel kept)
    from histo_wsl.methods.base import load_training_data
    from histo_wsl.training.config import TrainConfig

    ds = load_training_data(TrainConfig.from_flat(data=str(data), crop_size=48))
    train = LabelledImages(ds.split("train"), 48, eval_transform())
    item = train[0]
    x = item["image"][None]
    _, decoder_map = net.localize(x, refine=False)
    pooled = F.adaptive_avg_pool2d(decoder_map[:, None], (6, 6)).reshape(-1)
    own = net.refiner.values[net.refiner.owners == item["index"]]
    torch.testing.assert_close(own.sort().values, pooled.sort().values)
    # and the model's map is the blend
    _, refined = net.localize(x)
    stages = net.classifier.forward_features(x)
    want = 0.25 * decoder_map + 0.75 * net.refiner.knn_map(stages, (48, 48))
    torch.testing.assert_close(refined, want.clamp(0, 1))

    r = runner.invoke(
        app,
        ["evaluate", str(out / "best-loc.pt"), "--data", str(data), "--out", str(tmp_path / "ev")],
    )
    assert r.exit_code == 0, r.stderr
    assert "k-NN refined (α 0.75, k 4" in (tmp_path / "ev" / "report.md").read_text()

    r = runner.invoke(app, [*cmd, "--out", str(tmp_path / "bad"), "--refine", "crf"])
    assert r.exit_code == 2 and "--refine must be one of" in r.stderr
    assert not (tmp_path / "bad" / "best-loc.pt").exists()


def test_train_decoder_keys_its_banks_on_the_stages_asked_for(tmp_path):
    data, ckpt, common = tiny_classifier(tmp_path)
    cmd = ["train-decoder", str(data), "--classifier", str(ckpt), *common]
    knn = ["--seed-map", "knn", "--refine", "knn", "--knn-k", "4", "--knn-dims", "3"]
    out = tmp_path / "negev"
    r = runner.invoke(app, [*cmd, "--out", str(out), *knn, "--knn-stages", "3"])
    assert r.exit_code == 0, r.stderr
    model = load_model(out / "best-loc.pt")
    assert model.card["refine"]["stages"] == 3 and model.card["seeds"]["knn"]["stages"] == 3
    refiner = model.model.refiner
    assert refiner.n_stages == 3 and refiner.keys.shape[1] == 9  # 3 stages × 3 axes
    with torch.no_grad():
        assert model.model.localize(torch.randn(1, 3, 48, 48))[1].shape == (1, 48, 48)
    # more stages than the encoder's five (MobileNetV2): refused before training, in one line
    r = runner.invoke(app, [*cmd, "--out", str(tmp_path / "bad"), *knn, "--knn-stages", "6"])
    assert r.exit_code == 2 and "--knn-stages 6: the encoder has 5 stages" in r.stderr
    assert not (tmp_path / "bad" / "best-loc.pt").exists()


def test_a_card_with_an_unknown_refinement_is_refused(tmp_path):
    from histo_wsl.errors import InputError
    from histo_wsl.methods.knn import refiner_from_card as _refiner_from_card

    assert _refiner_from_card({}, tmp_path / "m.pt") is None
    assert _refiner_from_card({"refine": {"method": "none"}}, tmp_path / "m.pt") is None
    with pytest.raises(InputError, match="unknown refinement"):
        _refiner_from_card({"refine": {"method": "crf"}}, tmp_path / "m.pt")
    with pytest.raises(InputError, match="malformed"):
        _refiner_from_card({"refine": {"method": "knn"}}, tmp_path / "m.pt")


def test_a_refiner_of_alpha_one_does_not_run_the_decoder(monkeypatch):
    from histo_wsl.networks.classifier import build_classifier
    from histo_wsl.networks.negev import NEGEVModel

    torch.manual_seed(0)
    model = NEGEVModel(build_classifier("tinycnn", "wgap", 2, pretrained=False)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, _, stages = model.segment(x, features=True)
    refiner = KNNRefiner(k=2, alpha=1.0)
    g = torch.Generator().manual_seed(1)
    bank_stages = [torch.randn(3, s.shape[1], 4, 4, generator=g) for s in stages]
    from histo_wsl.networks.knn import FeatureBank, _stage_pixels

    pixels = _stage_pixels(bank_stages, (4, 4))
    eye = [(torch.zeros(p.shape[1]), torch.eye(p.shape[1])) for p in pixels]
    bank = FeatureBank(
        torch.empty(0), torch.rand(48, generator=g), torch.arange(3).repeat_interleave(16), eye
    )
    bank.keys = bank.embed(pixels)
    refiner.set_bank(bank)
    model.refiner = refiner
    with torch.no_grad():
        logits_full, seg, st = model.segment(x, features=True)
        want = refiner(model.foreground(seg, st, refine=False), st)
        calls = []
        monkeypatch.setattr(model.decoder, "forward", lambda *a: calls.append(a))
        logits, got = model.localize(x)
    assert not calls  # the decoder's map would be weighted 0
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(logits, logits_full)


@pytest.mark.parametrize("block_bytes", [1, 4 * 300 * 100, 1 << 30])
def test_neighbour_means_do_not_depend_on_the_similarity_blocks(monkeypatch, block_bytes):
    from histo_wsl.networks import knn

    g = torch.Generator().manual_seed(0)
    eye = (torch.zeros(4), torch.eye(4))
    bank = knn.FeatureBank(
        torch.empty(0), torch.rand(300, generator=g), torch.arange(300) // 30, [eye, eye]
    )
    bank.keys = bank.embed([torch.randn(300, 4, generator=g)] * 2)
    stages = [torch.randn(3, 4, 10, 17, generator=g)] * 2  # 510 query pixels
    owners = torch.tensor([0, -1, 4])
    queries = bank.embed(knn._stage_pixels(stages, (10, 17)))
    sim = queries @ bank.keys.T
    own = owners.repeat_interleave(170)
    sim[own[:, None] == bank.owners[None]] = -float("inf")
    expected = bank.values[sim.topk(16, dim=1).indices].mean(1).view(3, 10, 17)

    monkeypatch.setattr(knn, "_BLOCK_BYTES", block_bytes)
    rows = knn._block_rows(len(bank), torch.device("cpu"))
    assert rows == {1: knn._MIN_BLOCK, 4 * 300 * 100: 100, 1 << 30: (1 << 30) // 1200}[block_bytes]
    assert torch.allclose(bank.neighbour_means(stages, 16, owners), expected)
    assert knn._block_rows(len(bank), torch.device("meta")) == knn._GPU_BLOCK


def test_looking_up_only_near_the_needed_pixels_keeps_their_map():
    from histo_wsl.networks.knn import LOOKUP_MARGIN, FeatureBank

    torch.manual_seed(0)
    stages = [torch.randn(2, 6, 16, 16), torch.randn(2, 9, 8, 8)]
    projections = [(torch.randn(c), torch.randn(c, 4)) for c in (6, 9)]
    from histo_wsl.networks.knn import _stage_pixels, embed_keys

    rows = embed_keys(_stage_pixels(stages, (8, 8), 2), projections)
    pick = torch.randperm(rows.shape[0])[:40]
    refiner = KNNRefiner(k=3, alpha=1.0, n_stages=2)
    refiner.set_bank(FeatureBank(rows[pick], torch.rand(40), torch.arange(40) % 5, projections))
    full = refiner.knn_map(stages, (32, 32))
    where = torch.zeros(2, 32, 32, dtype=torch.bool)
    where[0, 4:9, 20:30] = True  # some tissue in the first window, none in the second
    lookups = []
    original = refiner.bank.__class__.neighbour_means

    def counting(bank, *args, **kwargs):
        cells = kwargs.get("where")
        lookups.append(None if cells is None else int(cells.sum()))
        return original(bank, *args, **kwargs)

    refiner.bank.__class__.neighbour_means = counting
    try:
        with refiner.looking_up(where):
            part = refiner.knn_map(stages, (32, 32))
        assert refiner.where is None  # only within the block
        refiner.knn_map(stages, (32, 32))
    finally:
        refiner.bank.__class__.neighbour_means = original
    # the needed pixels and their bilinear neighbourhood are looked up as before...
    torch.testing.assert_close(part[where], full[where])
    # ... and only the cells they touch (4 px a cell here: rows 1-2, columns 5-7 of 8) and a
    # margin around them, inside the grid, are
    m = LOOKUP_MARGIN
    rows_hit = min(7, 2 + m) - max(0, 1 - m) + 1
    cols_hit = min(7, 7 + m) - max(0, 5 - m) + 1
    assert lookups == [rows_hit * cols_hit, None] and rows_hit * cols_hit < 64
    assert float(part[1].abs().max()) == 0.0  # nothing needed: nothing looked up, 0 (glass)


def test_predictor_looks_up_each_flipped_view_where_its_pixels_are(tmp_path):
    """With flips, each view's needed pixels are flipped with it: the same map as without."""
    from knn_helpers import refined_negev_checkpoint

    predictor = load_model(refined_negev_checkpoint(tmp_path / "m.pt"))
    predictor.tta = "flips"
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    where = torch.zeros(2, 32, 32, dtype=torch.bool)
    where[0, 2:10, 20:30] = True
    where[1] = True
    full = predictor.predict(x)[1]
    part = predictor.predict(x, where=where)[1]
    torch.testing.assert_close(part[where], full[where])
    assert predictor.model.refiner.where is None
