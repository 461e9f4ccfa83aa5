import pytest
import torch
from knn_helpers import A, B, identity_bank, tiny_classifier, two_stages
from typer.testing import CliRunner

from histo_wsl.cli.app import app
from histo_wsl.data.images import LabelledImages, eval_transform
from histo_wsl.inference.predictor import load_model
from histo_wsl.methods.knn import build_feature_bank, glass_colour, keyed_as_slides, with_glass
from histo_wsl.networks.classifier import build_classifier
from histo_wsl.networks.knn import _stage_pixels

runner = CliRunner()


def test_look_alike_pixels_get_the_evidence_of_other_images_only():
    # image 0 says A is foreground, image 1 says the opposite
    bank = identity_bank(
        [(A, 1.0, 0)] * 4 + [(B, 0.0, 0)] * 4 + [(A, 0.0, 1)] * 4 + [(B, 1.0, 1)] * 4
    )
    query = two_stages([A, A, B, B])
    from_0 = bank.smoothed_maps(query, torch.tensor([1]), k=4, size=(1, 4))
    torch.testing.assert_close(from_0, torch.tensor([[[1.0, 1.0, 0.0, 0.0]]]))
    from_1 = bank.smoothed_maps(query, torch.tensor([0]), k=4, size=(1, 4))
    torch.testing.assert_close(from_1, torch.tensor([[[0.0, 0.0, 1.0, 1.0]]]))
    # k is capped so that excluding one image still leaves k neighbours
    capped = bank.smoothed_maps(query, torch.tensor([1]), k=100, size=(1, 4))
    assert capped.shape == (1, 1, 4) and 0 <= capped.min() and capped.max() <= 1


def test_maps_are_min_max_normalised_and_upsampled():
    bank = identity_bank([(A, 0.8, 0)] * 2 + [(B, 0.2, 0)] * 2)
    maps = bank.smoothed_maps(two_stages([A, B]), torch.tensor([-1]), k=2, size=(3, 8))
    assert maps.shape == (1, 3, 8)
    assert maps.min() == 0 and maps.max() == 1
    assert maps[0, :, 0].min() > maps[0, :, -1].max()  # the A side stays above the B side


class _Images(torch.utils.data.Dataset):
    def __init__(self, n: int, size: int = 32):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 3, size, size, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": i % 2, "index": i}


def test_build_feature_bank_is_balanced_bounded_and_reproducible():
    torch.manual_seed(0)
    clf = build_classifier("tinycnn", "wgap", 2, pretrained=False).eval()
    images = _Images(5)
    state = torch.get_rng_state()
    bank = build_feature_bank(
        clf, images, negative=1, max_pixels=40, keys=(2, 3), seed=7, batch_size=2
    )
    assert torch.equal(
        torch.get_rng_state(), state
    )  # the training run's random stream is untouched
    assert len(bank) == 40 and bank.keys.shape == (
        40,
        6,
    )  # 8 pixels of each image, 3 axes × 2 stages
    assert torch.bincount(bank.owners).tolist() == [8] * 5
    torch.testing.assert_close(bank.keys.norm(dim=1), torch.ones(40))
    negative = bank.owners % 2 == 1  # images of class 1, the negative class here
    assert torch.all(bank.values[negative] == 0) and bank.values[~negative].max() > 0
    assert 0 <= bank.values.min() and bank.values.max() <= 1
    again = build_feature_bank(
        clf, images, negative=1, max_pixels=40, keys=(2, 3), seed=7, batch_size=3
    )
    torch.testing.assert_close(again.keys, bank.keys)
    assert torch.equal(again.owners, bank.owners)
    with pytest.raises(ValueError, match="at least 2"):
        build_feature_bank(clf, _Images(1))


def test_a_bank_over_the_negative_class_holds_the_cam_over_it():
    """--seed-contrast: without ``values``, a run's bank holds the true class's CAM over ``against``."""
    from histo_wsl.methods.knn import TrainSplitBanks
    from histo_wsl.networks.cams import compute_cams
    from histo_wsl.training.config import TrainConfig

    torch.manual_seed(0)
    clf = build_classifier("tinycnn", "wgap", 2, pretrained=False).eval()
    images = _Images(4)
    banks = TrainSplitBanks(None, TrainConfig.from_flat(), negative=1, against=1)
    bank = build_feature_bank(
        clf, images, values=banks._contrast(clf), negative=1, max_pixels=10**6
    )
    x = torch.stack([images[i]["image"] for i in range(4)])
    y = torch.tensor([images[i]["label"] for i in range(4)])
    with torch.no_grad():
        h, w = clf.forward_features(x)[-1].shape[-2:]
    want = compute_cams(clf, x, y, size=(h, w), against=1)
    own = compute_cams(clf, x, y, size=(h, w))
    for i in (0, 2):  # the images of class 0 (class 1 is the negative class: all 0)
        got = bank.values[bank.owners == i].sort().values
        torch.testing.assert_close(got, want[i].reshape(-1).sort().values)
        assert not torch.allclose(got, own[i].reshape(-1).sort().values)
    assert torch.all(bank.values[bank.owners % 2 == 1] == 0)


def test_with_glass_adds_glass_valued_zero_that_glass_finds_first():
    torch.manual_seed(0)
    clf = build_classifier("tinycnn", "wgap", 2, pretrained=False).eval()
    images = _Images(5)
    bank = build_feature_bank(clf, images, max_pixels=40, keys=(2, 3), seed=7, batch_size=2)
    bank.values = torch.full((40,), 0.9)  # every tissue pixel ROI
    glass = glass_colour()
    out = with_glass(clf.forward_features, images, bank, 10, glass, seed=3)
    assert len(out) == 50  # 2 glass cells from each image
    assert torch.equal(out.keys[:40], bank.keys) and torch.equal(out.values[:40], bank.values)
    assert torch.all(out.values[40:] == 0)
    assert sorted(set(out.owners[40:].tolist())) == [5, 6, 7, 8, 9]  # one new owner per image
    torch.testing.assert_close(out.keys.norm(dim=1), torch.ones(50))
    again = with_glass(clf.forward_features, images, bank, 10, glass, seed=3)
    torch.testing.assert_close(again.keys, out.keys)
    # a window of glass: its k-NN value was the tissue's; now glass cells are among its neighbours
    with torch.no_grad():
        stages = clf.forward_features(glass.view(1, 3, 1, 1).expand(1, 3, 32, 32))
    assert float(bank.neighbour_means(stages, k=2).mean()) == pytest.approx(0.9)
    assert float(out.neighbour_means(stages, k=2).mean()) < 0.8


def test_train_decoder_with_knn_seed_map(tmp_path):
    data, ckpt, common = tiny_classifier(tmp_path)
    ckpt = tmp_path / "cam" / "best-loc.pt"
    cmd = ["train-decoder", str(data), "--classifier", str(ckpt), *common]
    out = tmp_path / "negev"
    r = runner.invoke(
        app,
        [*cmd, "--out", str(out), "--seed-map", "knn", "--knn-k", "8", "--knn-bank", "256"],
    )
    assert r.exit_code == 0, r.stderr
    card = load_model(out / "best-loc.pt").card
    assert card["seeds"]["map"] == "knn"
    assert card["seeds"]["knn"]["k"] == 8 and 0 < card["seeds"]["knn"]["bank_pixels"] <= 256

    r = runner.invoke(app, [*cmd, "--out", str(tmp_path / "bad1"), "--seed-map", "nearest"])
    assert r.exit_code == 2 and "--seed-map must be one of" in r.stderr
    # with a teacher, the bank holds the teacher's map (pooled to the CAM layer), not the CAM
    import torch.nn.functional as F  # noqa: N812

    from histo_wsl.methods.base import load_training_data
    from histo_wsl.methods.negev import DecoderTask
    from histo_wsl.training.config import TrainConfig

    teacher = out / "best-loc.pt"
    tcfg = TrainConfig.from_flat(
        data=str(data), seed_teacher=str(teacher), seed_map="knn", knn_bank=10**6, crop_size=48
    )
    ds = load_training_data(tcfg)
    task = DecoderTask(tcfg, ds, load_model(ckpt))
    student = load_model(teacher).model  # same classifier; its decoder is not used here
    bank = task.feature_bank(student, torch.device("cpu"))
    first = task.bank.owners == 0
    item = LabelledImages(ds.split("train"), 48, eval_transform())[0]
    _, want = load_model(teacher).model.localize(item["image"][None])
    want = F.adaptive_avg_pool2d(want[:, None], (6, 6)).reshape(-1)  # every pixel is in the bank
    torch.testing.assert_close(bank.values[first].sort().values, want.sort().values)
    maps = task.seed_maps(student, item["image"][None], torch.tensor([0]), owners=torch.tensor([0]))
    assert maps.shape == (1, 48, 48) and 0 <= maps.min() and maps.max() <= 1


def test_compact_refiner_keeps_the_first_pixels_of_each_image_and_scales_k(tmp_path):
    from knn_helpers import refined_negev_checkpoint

    from histo_wsl.errors import InputError
    from histo_wsl.methods.knn import compact_refiner
    from histo_wsl.registry.checkpoint import load_checkpoint

    ckpt = load_checkpoint(refined_negev_checkpoint(tmp_path / "r.pt", images=4, per_image=10))
    card, state = ckpt["card"], ckpt["state_dict"]
    new_card, new_state = compact_refiner(card, state, 20)
    owners = state["refiner.owners"]
    keep = torch.cat([(owners == o).nonzero()[:5, 0] for o in range(4)])
    assert torch.equal(new_state["refiner.keys"], state["refiner.keys"][keep])
    assert torch.equal(new_state["refiner.values"], state["refiner.values"][keep])
    assert new_state["refiner.owners"].tolist() == [o for o in range(4) for _ in range(5)]
    assert new_card["refine"]["bank_pixels"] == 20 and new_card["refine"]["k"] == 4  # 8 · 20/40
    assert new_card["refine"]["compacted_from"] == {"bank_pixels": 40, "k": 8}
    assert card["refine"]["bank_pixels"] == 40 and len(state["refiner.keys"]) == 40  # copies
    assert compact_refiner(card, state, 20, k=3)[0]["refine"]["k"] == 3
    with pytest.raises(InputError, match="holds only 40"):
        compact_refiner(card, state, 41)
    with pytest.raises(InputError, match="at least 1"):
        compact_refiner(card, state, 0)
    with pytest.raises(InputError, match="no k-NN refinement"):
        compact_refiner(dict(card, refine={"method": "none"}), state, 20)
    # glass (owners past the 4 training images) is kept whole beside the images' pixels
    glass_owners = [o for o in range(4) for _ in range(8)] + [4, 4, 5, 5, 6, 6, 7, 7]
    glassy = {**state, "refiner.owners": torch.tensor(glass_owners)}
    glass_card = {**card, "refine": {**card["refine"], "glass": "yes"}}
    glass_card["training_data"] = {"train": {"gland": 2, "normal": 2}}
    new_card, new_state = compact_refiner(glass_card, glassy, 12)
    expected = [o for o in range(4) for _ in range(3)] + glass_owners[32:]
    assert new_state["refiner.owners"].tolist() == expected
    assert new_card["refine"]["bank_pixels"] == 20 and new_card["refine"]["k"] == 4  # 8 · 20/40
    with pytest.raises(InputError, match="32 pixels of training images"):
        compact_refiner(glass_card, glassy, 33)
    with pytest.raises(InputError, match="no training images"):
        compact_refiner({k: v for k, v in glass_card.items() if k != "training_data"}, glassy, 12)


class _Resized(torch.utils.data.Dataset):
    """``images`` resized to ``size`` (h, w): the same images at another geometry."""

    def __init__(self, images: torch.utils.data.Dataset, size: tuple[int, int]):
        self.images, self.size = images, size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.images[i])
        item["image"] = torch.nn.functional.interpolate(
            item["image"][None], size=self.size, mode="bilinear", align_corners=False
        )[0]
        return item


def _glassy_bank():
    """A tiny classifier, its 5 images, a bank of them with glass, and the images as slides."""
    torch.manual_seed(0)
    clf = build_classifier("tinycnn", "wgap", 2, pretrained=False).eval()
    images = _Images(5)
    bank = build_feature_bank(clf, images, max_pixels=40, keys=(2, 3), seed=7, batch_size=2)
    bank = with_glass(clf.forward_features, images, bank, 10, glass_colour(), seed=3)
    return clf, images, bank, _Resized(images, (24, 40))  # another aspect, as on a slide


def test_keyed_as_slides_keys_each_image_at_the_slide_geometry_valued_by_the_model():
    clf, images, bank, slides = _glassy_bank()

    def model_map(x):  # the model's map: 1 on the image's left half, 0 on its right
        out = torch.zeros(x.shape[0], *x.shape[-2:])
        out[..., : x.shape[-1] // 2] = 1.0
        return out

    out = keyed_as_slides(clf.forward_features, model_map, images, slides, bank, seed=1)
    assert len(out) == len(bank)
    for owner in range(5):  # each image keeps its number of bank pixels
        assert int((out.owners == owner).sum()) == int((bank.owners == owner).sum()) == 8
    glass = bank.owners >= 5
    kept = out.owners >= 5
    assert torch.equal(out.keys[kept], bank.keys[glass])  # the glass is kept as it was
    assert torch.equal(out.values[kept], bank.values[glass])
    torch.testing.assert_close(out.keys.norm(dim=1), torch.ones(len(out)))
    # every new key is a cell of its image at the slide geometry, valued by the model's map there
    with torch.no_grad():
        stages = clf.forward_features(slides[0]["image"][None])
    h, w = stages[-1].shape[-2:]
    cells = bank.embed(_stage_pixels(stages, (h, w)))
    mine = out.keys[out.owners == 0]
    dist, cell = torch.cdist(mine, cells).min(dim=1)
    assert float(dist.max()) < 1e-4
    pooled = torch.nn.functional.adaptive_avg_pool2d(model_map(images[0]["image"][None]), (h, w))
    expected = pooled.reshape(-1)[cell]  # the map's left half, pooled onto the keys' grid
    assert 0 < float(expected.mean()) < 1
    torch.testing.assert_close(out.values[out.owners == 0], expected)
    assert not torch.equal(mine, bank.keys[bank.owners == 0])  # not the evaluation preset's keys
    again = keyed_as_slides(clf.forward_features, model_map, images, slides, bank, seed=1)
    assert torch.equal(again.keys, out.keys)
    # the negative class is background whatever the model's map says
    neg = keyed_as_slides(clf.forward_features, model_map, images, slides, bank, negative=1)
    assert torch.all(neg.values[(neg.owners == 1) | (neg.owners == 3)] == 0)
    assert float(neg.values[neg.owners == 0].max()) == 1.0
    with pytest.raises(ValueError, match="same images"):
        keyed_as_slides(clf.forward_features, model_map, images, _Images(4), bank)


def test_keyed_as_slides_refits_the_keys_on_more_stages_and_drops_the_old_glass():
    clf, images, bank, slides = _glassy_bank()

    def model_map(x):
        return torch.full((x.shape[0], *x.shape[-2:]), 0.5)

    out = keyed_as_slides(clf.forward_features, model_map, images, slides, bank, refit=(4, 2))
    assert len(out.projections) == 4  # every stage of the tiny encoder, 2 axes each
    assert [v.shape for _, v in out.projections] == [(16, 2), (32, 2), (64, 2), (128, 2)]
    assert out.keys.shape == (40, 8) and torch.all(out.owners < 5)  # the glass is dropped
    torch.testing.assert_close(out.keys.norm(dim=1), torch.ones(len(out)))
    # the keys are the images' cells on the new projection, and the lookup takes four stages
    with torch.no_grad():
        stages = clf.forward_features(slides[0]["image"][None])
    h, w = stages[-1].shape[-2:]
    cells = out.embed(_stage_pixels(stages, (h, w), 4))
    assert float(torch.cdist(out.keys[out.owners == 0], cells).min(dim=1).values.max()) < 1e-4
    means = out.neighbour_means(stages, k=4)
    torch.testing.assert_close(means, torch.full((1, h, w), 0.5))
    # glass drawn again on the new keys, through the bank's own projections
    glassy = with_glass(clf.forward_features, images, out, 10, glass_colour(), seed=3)
    assert glassy.keys.shape[1] == 8 and int((glassy.owners >= 5).sum()) >= 5
    with pytest.raises(ValueError, match="last 5 stages; it gives 4"):
        _stage_pixels(stages, (h, w), 5)
