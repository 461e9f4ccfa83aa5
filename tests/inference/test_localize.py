import json
import math

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from histo_wsl.errors import InputError
from histo_wsl.inference.localize import localize
from histo_wsl.inference.params import LocalizeParams
from histo_wsl.runtime.batch import LOCKS, BatchOptions
from histo_wsl.runtime.inputs import InputItem

SIGMOID_1 = 1.0 / (1.0 + math.exp(-1.0))  # the constant model's foreground probability
CONST_U8 = round(SIGMOID_1 * 255)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: the machine's cores are shared, and oversubscribed OpenMP crawls."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _card(**kw):
    from histo_wsl.data.images import IMAGENET_MEAN, IMAGENET_STD

    card = {
        "method": "cam",
        "stage": 1,
        "backbone": "mobilenetv2",
        "head": "wgap",
        "head_opts": {},
        "cam_method": "cam",
        "num_classes": 2,
        "class_names": ["normal", "tumour"],
        "negative_class": "normal",
        "input_size": 64,
        "resize_size": 64,
        "data_mpp": 0.5,
        "mpp": 2.0,
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "threshold": 0.5,
    }
    card.update(kw)
    return card


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Untrained checkpoints written as stage 1 / stage 2 write them (no training).

    ``const``: a NEGEV model whose decoder head is zero with bias (0, 1): foreground probability
    sigmoid(1) at every pixel of every window.
    """
    import torch

    from histo_wsl.networks.classifier import build_classifier
    from histo_wsl.networks.negev import NEGEVModel
    from histo_wsl.registry.checkpoint import save_checkpoint

    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    clf = build_classifier("mobilenetv2", "wgap", 2, pretrained=False)
    card = _card()
    save_checkpoint(folder / "cam.pt", card, clf.state_dict())
    model = NEGEVModel(clf)
    with torch.no_grad():
        model.decoder.seg_head.weight.zero_()
        model.decoder.seg_head.bias.copy_(torch.tensor([0.0, 1.0]))
    card2 = dict(card, method="negev", stage=2, classifier_card=card)
    save_checkpoint(folder / "const.pt", card2, model.state_dict())
    save_checkpoint(folder / "nompp.pt", dict(card2, mpp=None), model.state_dict())
    (folder / "notours.pt").write_bytes(b"not a checkpoint at all")
    return folder


def _item(path, **kw):
    return InputItem(path, path.stem, **kw)


def _run(items, out, model, **kw):
    run_kw = {k: kw.pop(k) for k in ("overwrite", "skip_errors") if k in kw}
    params = LocalizeParams(model=model, batch_size=32, **kw)
    return localize(items, out, params, BatchOptions(quiet=True, **run_kw))


def _prob(path):
    import openslide

    with openslide.OpenSlide(str(path)) as s:
        w, h = s.level_dimensions[0]
        arr = np.asarray(s.read_region((0, 0), 0, (w, h)))[..., 0]
        return arr, float(s.properties["openslide.mpp-x"]), s.level_count


# -- slides ---------------------------------------------------------------------------------------
def _tissue_on_output_grid(slide_path, shape, s_out):
    from histo_wsl.slideio.slide import open_slide
    from histo_wsl.tissue.scan import find_tissue

    with open_slide(slide_path) as slide:
        found = find_tissue(slide)
    k = s_out / found.downsample  # mask pixels per output pixel
    h, w = shape
    tissue = np.zeros(shape, bool)
    for r in range(h):  # an output pixel is tissue when any part of it overlaps the mask's tissue
        for c in range(w):
            block = found.mask[
                math.floor(r * k + 1e-9) : math.ceil((r + 1) * k - 1e-9),
                math.floor(c * k + 1e-9) : math.ceil((c + 1) * k - 1e-9),
            ]
            tissue[r, c] = bool(block.any())
    return tissue


def test_constant_model_gives_constant_map_on_tissue_only(tmp_path, synthetic_slide, models):
    out = tmp_path / "out"
    summary = _run([_item(synthetic_slide)], out, models / "const.pt", mpp=4.0)
    assert summary.exit_code == 0, summary.items[0].error
    d = out / "synth"
    names = sorted(p.name for p in d.iterdir())
    assert names == [
        "synth.geojson",
        "synth.json",
        "synth.mask.png",
        "synth.overlay.png",
        "synth.prob.ome.tif",
        "synth.prob.tif",
    ]
    prob, mpp, levels = _prob(d / "synth.prob.tif")
    import tifffile

    with tifffile.TiffFile(d / "synth.prob.ome.tif") as ome:  # the same pyramid, for Bio-Formats
        assert ome.is_ome and len(ome.pages) == 1
        assert (ome.series[0].levels[0].asarray() == prob).all()
        assert len(ome.series[0].levels) == levels
    assert Image.open(d / "synth.mask.png").info["dpi"][0] == pytest.approx(25400 / 16.0, rel=1e-3)
    assert mpp == pytest.approx(16.0)  # default output: 4 x the model's (here --mpp 4)
    assert (
        abs(prob.shape[1] - 3000 * 0.5 / 16.0) <= 1 and abs(prob.shape[0] - 2000 * 0.5 / 16.0) <= 1
    )
    tissue = _tissue_on_output_grid(synthetic_slide, prob.shape, 16.0 / 0.5)
    assert (prob[~tissue] == 0).all()  # nothing outside tissue
    assert (np.abs(prob[tissue].astype(int) - CONST_U8) <= 1).all()  # no seam anywhere
    rec = json.loads((d / "synth.json").read_text())
    assert rec["status"] == "done" and rec["mode"] == "sliding-window"
    assert rec["roi_class"] == "tumour" and rec["threshold"] == 0.5
    assert rec["predicted_class"] in ("normal", "tumour") and 0.5 <= rec["score"] <= 1
    assert sum(rec["class_probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert rec["read"]["level"] == 3 and rec["model_mpp"] == 4.0 and rec["output_mpp"] == 16.0
    assert 3 in rec["read"]["decoded_by"]["tiles"]  # the windows' level, decoded from its tiles
    assert rec["roi_area_um2"] == pytest.approx(rec["tissue_area_um2"])
    assert rec["roi_mean_probability"] == pytest.approx(SIGMOID_1, abs=0.005)
    assert 0 < rec["windows"] <= rec["grid_windows"]
    assert rec["canvas"] == "memory" and rec["model"]["method"] == "negev"
    assert set(rec["timings"]) >= {"tissue_s", "inference_s", "write_s", "total_s"}
    mask = np.asarray(Image.open(d / "synth.mask.png"))
    assert mask.shape == prob.shape and ((mask == 255) == tissue).all()
    geo = json.loads((d / "synth.geojson").read_text())
    assert geo["type"] == "FeatureCollection" and len(geo["features"]) == 2  # two sections
    for f in geo["features"]:
        props = f["properties"]
        assert props["objectType"] == "annotation"
        assert props["classification"]["name"] == "tumour"
        assert props["measurements"]["Mean probability"] == pytest.approx(SIGMOID_1, abs=0.005)
        assert props["measurements"]["Area µm^2"] > 0
        ring = np.asarray(f["geometry"]["coordinates"][0])
        assert ring[:, 0].min() >= 0 and ring[:, 0].max() <= 3000  # level-0 px
        assert ring[:, 1].min() >= 0 and ring[:, 1].max() <= 2000
    overlay = Image.open(d / "synth.overlay.png")
    assert overlay.mode == "RGB" and overlay.size[0] > 100
    run = json.loads((out / "run.json").read_text())
    assert run["command"] == "localize" and run["device"] == "cpu"


@pytest.mark.parametrize("overlap,blend", [(0.0, "constant"), (0.5, "linear")])
def test_constant_map_whatever_the_overlap(tmp_path, synthetic_slide, models, overlap, blend):
    out = tmp_path / "o"
    s = _run(
        [_item(synthetic_slide)],
        out,
        models / "const.pt",
        mpp=4.0,
        output_mpp=10.0,  # windows of 25.6 output px: sub-pixel positions
        overlap=overlap,
        blend=blend,
    )
    assert s.exit_code == 0
    prob, mpp, _ = _prob(out / "synth" / "synth.prob.tif")
    assert mpp == pytest.approx(10.0) and prob.shape == (100, 150)
    inside = prob > 0
    assert inside.mean() > 0.3
    assert (np.abs(prob[inside].astype(int) - CONST_U8) <= 1).all()


def test_geojson_follows_the_given_tissue_region_in_level0(tmp_path, synthetic_slide, models):
    from histo_wsl.slideio.geojson import geojson_to_mask

    box = [[600, 400], [2200, 400], [2200, 1500], [600, 1500], [600, 400]]
    region = tmp_path / "region.geojson"
    region.write_text(
        json.dumps({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [box]}})
    )
    out = tmp_path / "o"
    s = _run(
        [_item(synthetic_slide)],
        out,
        models / "const.pt",
        mpp=4.0,
        output_mpp=8.0,
        tissue_geojson=region,
    )
    assert s.exit_code == 0
    rec = json.loads((out / "synth" / "synth.json").read_text())
    assert rec["tissue_source"] == str(region)
    assert rec["roi_area_um2"] == pytest.approx(1600 * 1100 * 0.25, rel=0.05)
    geo = json.loads((out / "synth" / "synth.geojson").read_text())
    assert len(geo["features"]) == 1
    ring = np.asarray(geo["features"][0]["geometry"]["coordinates"][0])
    assert abs(ring[:, 0].min() - 600) <= 32 and abs(ring[:, 0].max() - 2200) <= 32
    assert abs(ring[:, 1].min() - 400) <= 32 and abs(ring[:, 1].max() - 1500) <= 32
    got = geojson_to_mask(geo, (250, 375), 8.0)
    want = geojson_to_mask({"type": "Polygon", "coordinates": [box]}, (250, 375), 8.0)
    assert (got & want).sum() / (got | want).sum() > 0.95


def test_memmap_canvas_gives_the_same_outputs(tmp_path, synthetic_slide, models):
    a, b = tmp_path / "mem", tmp_path / "disk"
    kw = {"mpp": 4.0, "output_mpp": 8.0}
    assert _run([_item(synthetic_slide)], a, models / "const.pt", **kw).exit_code == 0
    s = _run([_item(synthetic_slide)], b, models / "const.pt", canvas_max_mb=1e-3, **kw)
    assert s.exit_code == 0
    assert json.loads((b / "synth" / "synth.json").read_text())["canvas"] == "memmap"
    np.testing.assert_array_equal(
        _prob(a / "synth" / "synth.prob.tif")[0], _prob(b / "synth" / "synth.prob.tif")[0]
    )
    # no scratch left (the per-slide lock files stay, hidden)
    assert sorted(p.name for p in b.iterdir()) == [LOCKS, "run.json", "synth"]
    assert not list(b.rglob("*.bin"))


def test_reader_processes_give_the_same_map(tmp_path, synthetic_slide, models):
    kw = {"mpp": 4.0, "output_mpp": 8.0}
    a, b = tmp_path / "thread", tmp_path / "procs"
    assert _run([_item(synthetic_slide)], a, models / "cam.pt", workers=0, **kw).exit_code == 0
    s = _run([_item(synthetic_slide)], b, models / "cam.pt", workers=1, **kw)
    assert s.exit_code == 0 and s.items[0].details["workers"] == 1
    np.testing.assert_array_equal(
        _prob(a / "synth" / "synth.prob.tif")[0], _prob(b / "synth" / "synth.prob.tif")[0]
    )


def test_reading_between_forwards_gives_the_same_map(
    tmp_path, synthetic_slide, models, monkeypatch
):
    import histo_wsl.inference.engine as engine

    kw = {"mpp": 4.0, "output_mpp": 8.0}
    maps, counts = [], []
    rules = {
        "beside": lambda: False,
        "between": lambda: True,
        "switching": iter([True, False, False, True] * 100).__next__,  # the load comes and goes
    }
    for name, rule in rules.items():
        monkeypatch.setattr(engine, "reads_between_forwards", lambda e, rule=rule: rule())
        params = LocalizeParams(model=models / "cam.pt", batch_size=2, **kw)
        s = localize([_item(synthetic_slide)], tmp_path / name, params, BatchOptions(quiet=True))
        assert s.exit_code == 0
        counts.append(s.items[0].details["batches_read"])
        maps.append(_prob(tmp_path / name / "synth" / "synth.prob.tif")[0])
    n = counts[0]["ahead"]
    assert n > 4  # enough batches to switch twice
    assert counts[0] == {"between_forwards": 0, "ahead": n}
    assert counts[1] == {"between_forwards": n, "ahead": 0}
    assert counts[2]["between_forwards"] > 0 and counts[2]["ahead"] > 0
    assert sum(counts[2].values()) == n
    np.testing.assert_array_equal(maps[0], maps[1])
    np.testing.assert_array_equal(maps[0], maps[2])


def test_the_batch_size_is_the_device_s_own_and_does_not_change_the_map(
    tmp_path, synthetic_slide, models
):
    from histo_wsl.inference.engine import CPU_BATCH, GPU_BATCH, default_batch_size

    assert (default_batch_size("cpu"), default_batch_size("cuda")) == (CPU_BATCH, GPU_BATCH)
    assert CPU_BATCH < GPU_BATCH
    kw = {"mpp": 4.0, "output_mpp": 8.0, "device": "cpu"}
    a, b = tmp_path / "own", tmp_path / "given"
    params = LocalizeParams(model=models / "cam.pt", **kw)
    s = localize([_item(synthetic_slide)], a, params, BatchOptions(quiet=True))
    assert s.exit_code == 0 and s.items[0].details["batch_size"] == CPU_BATCH
    assert s.items[0].details["windows"] > CPU_BATCH  # several batches
    assert json.loads((a / "run.json").read_text())["params"]["batch_size_used"] == CPU_BATCH
    s = _run([_item(synthetic_slide)], b, models / "cam.pt", **kw)
    assert s.exit_code == 0 and s.items[0].details["batch_size"] == 32
    own, given = (_prob(d / "synth" / "synth.prob.tif")[0].astype(int) for d in (a, b))
    # the same map up to the convolutions' rounding: oneDNN may pick another kernel for another
    # batch size, and a probability on a rounding edge then moves by 1/255 (2 of 23,500 pixels
    # on a 2-core AMD EPYC without AVX-512)
    assert np.abs(own - given).max() <= 1
    assert np.mean(own != given) < 1e-3


def test_rerun_skips_and_overwrite_redoes(tmp_path, synthetic_slide, models):
    out = tmp_path / "o"
    kw = {"mpp": 4.0}
    assert _run([_item(synthetic_slide)], out, models / "const.pt", **kw).exit_code == 0
    again = _run([_item(synthetic_slide)], out, models / "const.pt", **kw)
    assert again.exit_code == 0 and again.items[0].status == "skipped"
    redo = _run([_item(synthetic_slide)], out, models / "const.pt", overwrite=True, **kw)
    assert redo.items[0].status == "done"


def test_failure_mid_slide_leaves_nothing_under_the_final_name(
    tmp_path, synthetic_slide, models, monkeypatch
):
    import histo_wsl.inference.outputs as outputs

    def boom(*a, **k):
        raise RuntimeError("disk gone")

    monkeypatch.setattr(outputs, "write_geojson", boom)
    out = tmp_path / "o"
    s = _run([_item(synthetic_slide)], out, models / "const.pt", mpp=4.0)
    assert s.exit_code == 4 and s.items[0].status == "failed" and "disk gone" in s.items[0].error
    assert not (out / "synth").exists()
    assert sorted(p.name for p in out.iterdir()) == [LOCKS, "run.json"]


def test_skip_errors_with_a_corrupt_slide(tmp_path, synthetic_slide, corrupt_slide, models):
    out = tmp_path / "o"
    items = [_item(corrupt_slide), _item(synthetic_slide)]
    s = _run(items, out, models / "const.pt", mpp=4.0, skip_errors=True)
    assert s.exit_code == 1
    status = {it.name: it.status for it in s.items}
    assert status == {"truncated": "failed", "synth": "done"}
    assert "truncated" in s.items[0].error and (out / "synth" / "synth.prob.tif").is_file()
    # without --skip-errors every input is opened before the model is loaded: refused at once
    with pytest.raises(InputError, match="truncated"):
        _run(items, tmp_path / "o2", models / "const.pt", mpp=4.0)
    assert not (tmp_path / "o2" / "synth").exists()


def test_inputs_are_checked_before_the_model_is_loaded(
    tmp_path, synthetic_slide, synthetic_slide_no_mpp, models, monkeypatch
):
    """Issue 26: localize loaded the model (seconds, a gigabyte) before it looked at its inputs."""
    import histo_wsl.inference.localize as lz

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(lz, "Engine", no_model)
    items = [_item(synthetic_slide), _item(synthetic_slide_no_mpp)]
    with pytest.raises(InputError, match="nompp.tif: has no resolution.*--slide-mpp"):
        _run(items, tmp_path / "o", models / "const.pt")
    missing = tmp_path / "no-such-folder"
    with pytest.raises(InputError, match="synth"):
        _run([_item(synthetic_slide)], tmp_path / "o", models / "const.pt", tissue_geojson=missing)


def test_missing_mpp_is_a_clear_error(tmp_path, synthetic_slide_no_mpp, synthetic_slide, models):
    s = _run([_item(synthetic_slide_no_mpp)], tmp_path / "o", models / "const.pt", skip_errors=True)
    assert s.exit_code == 1 and "--slide-mpp" in s.items[0].error
    with pytest.raises(InputError, match="records no resolution"):
        _run([_item(synthetic_slide)], tmp_path / "o2", models / "nompp.pt")


def test_no_tissue_gives_empty_map_and_geojson(tmp_path, blank_slide, models):
    out = tmp_path / "o"
    s = _run([_item(blank_slide)], out, models / "const.pt")
    assert s.exit_code == 0
    rec = json.loads((out / "blank" / "blank.json").read_text())
    assert rec["windows"] == 0 and rec["predicted_class"] is None and rec["roi_area_um2"] == 0
    assert any("no tissue" in n for n in rec["notes"])
    assert json.loads((out / "blank" / "blank.geojson").read_text())["features"] == []
    assert _prob(out / "blank" / "blank.prob.tif")[0].max() == 0


def test_bad_model_and_class_fail_before_any_slide(tmp_path, synthetic_slide, models):
    with pytest.raises(InputError, match="not a histo-wsl checkpoint"):
        _run([_item(synthetic_slide)], tmp_path / "o", models / "notours.pt")
    with pytest.raises(InputError, match="not a class of this model"):
        _run([_item(synthetic_slide)], tmp_path / "o", models / "const.pt", class_name="gland")
    with pytest.raises(InputError, match="--model is required"):
        _run([_item(synthetic_slide)], tmp_path / "o", None)
    assert not (tmp_path / "o").exists()


# -- plain images ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plain_image(tmp_path_factory):
    from histo_wsl.synthetic.slides import make_layout, write_image_with_mask

    lay = make_layout(400, 300, mpp=0.5, n_sections=1, seed=2)
    return write_image_with_mask(tmp_path_factory.mktemp("img"), "gland", lay)[0]


def test_whole_image_maps_have_the_image_size(tmp_path, plain_image, synthetic_slide, models):
    out = tmp_path / "o"
    s = _run([_item(plain_image)], out, models / "cam.pt", whole_image=True, prob_bits=16)
    assert s.exit_code == 0, s.items[0].error
    d = out / "gland"
    prob = Image.open(d / "gland.prob.png")
    mask = np.asarray(Image.open(d / "gland.mask.png"))
    assert prob.size == (400, 300) and mask.shape == (300, 400)
    assert np.asarray(prob).max() > 255  # 16-bit
    assert set(np.unique(mask)) <= {0, 255}
    rec = json.loads((d / "gland.json").read_text())
    assert rec["mode"] == "whole-image" and rec["image_size"] == [400, 300]
    assert rec["predicted_class"] in ("normal", "tumour")
    with pytest.raises(InputError, match="--whole-image"):
        _run([_item(synthetic_slide)], tmp_path / "o2", models / "cam.pt", whole_image=True)


def test_plain_image_sliding_windows_need_mpp_then_give_image_sized_maps(
    tmp_path, plain_image, models
):
    out = tmp_path / "o"
    s = _run([_item(plain_image)], out, models / "const.pt", skip_errors=True)
    assert s.exit_code == 1 and "--whole-image" in s.items[0].error
    s = _run(
        [_item(plain_image)],
        out,
        models / "const.pt",
        slide_mpp=0.25,
        mpp=0.5,
        tissue_detection=False,
    )
    assert s.exit_code == 0, s.items[0].error
    d = out / "gland"
    assert np.asarray(Image.open(d / "gland.prob.png")).shape == (300, 400)
    mask = np.asarray(Image.open(d / "gland.mask.png"))
    assert mask.shape == (300, 400) and (mask == 255).all()
    rec = json.loads((d / "gland.json").read_text())
    assert rec["tissue_source"] == "whole slide" and rec["slide_mpp"] == 0.25


# -- CLI ------------------------------------------------------------------------------------------
def test_cli_json_summary_and_errors(tmp_path, synthetic_slide, models, monkeypatch):
    from histo_wsl.cli.app import app
    from histo_wsl.registry import registry

    # no installed models (not the repository's models/ nor the user's): no default
    monkeypatch.setattr(registry, "SHIPPED_DIR", None)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(registry.ENV_VAR, raising=False)

    runner = CliRunner()
    out = tmp_path / "o"
    args = ["localize", str(synthetic_slide), "--out", str(out), "--quiet", "--json"]
    r = runner.invoke(app, args + ["--model", str(models / "const.pt"), "--mpp", "4"])
    assert r.exit_code == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["counts"] == {"done": 1, "skipped": 0, "failed": 0}
    assert summary["items"][0]["roi_class"] == "tumour"
    rec = json.loads(next(out.glob("*/*.json")).read_text())
    assert rec["model"]["tta"] == "none"
    tta = args[:3] + [str(tmp_path / "o-tta")] + args[4:]
    r = runner.invoke(
        app, tta + ["--model", str(models / "const.pt"), "--mpp", "4", "--tta", "flips"]
    )
    assert r.exit_code == 0, r.stderr
    assert (
        json.loads(next((tmp_path / "o-tta").glob("*/*.json")).read_text())["model"]["tta"]
        == "flips"
    )
    r = runner.invoke(app, tta + ["--model", str(models / "const.pt"), "--tta", "rot"])
    assert r.exit_code == 2 and "--tta 'rot'" in r.stderr
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "--model is required" in r.stderr
    assert "train-classifier" in r.stderr and "train-decoder" in r.stderr
    assert "histo-wsl models" in r.stderr
    r = runner.invoke(app, args + ["--model", str(models / "notours.pt")])
    assert r.exit_code == 2 and "notours.pt" in r.stderr
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = runner.invoke(
        app,
        ["localize", str(synthetic_slide), "--out", str(blocker / "o")]
        + ["--model", str(models / "const.pt"), "--quiet"],
    )
    assert r.exit_code == 2 and "cannot be written" in r.stderr


def test_cli_help_has_units_and_an_example():
    from histo_wsl.cli.app import app

    text = CliRunner().invoke(app, ["localize", "--help"], terminal_width=200).output
    for needle in (
        "--model",
        "--mpp",
        "--output-mpp",
        "µm/px",
        "--overlap",
        "--blend",
        "--threshold",
        "--batch-size",
        "--device",
        "--workers",
        "--whole-image",
        "--tissue-geojson",
        "--slide-mpp",
        "--cam",
        "--shard",
        "--skip-errors",
        "--json",
        "default: 0.25",
        "Examples",
    ):
        assert needle in text, needle


def test_a_fluorescence_image_is_refused_unless_forced(tmp_path, models):
    """A dark-field (fluorescence) image for a brightfield model: one line naming --force."""
    rng = np.random.default_rng(0)
    dark = (rng.random((300, 400, 3)) * 20).astype(np.uint8)  # DAPI-like: black, faint spots
    dark[100:140, 100:160] = (20, 40, 230)
    path = tmp_path / "dapi.png"
    Image.fromarray(dark).save(path)
    s = _run([_item(path)], tmp_path / "o", models / "cam.pt", whole_image=True, skip_errors=True)
    assert s.exit_code == 1 and "dark-field" in s.items[0].error and "--force" in s.items[0].error
    s = _run([_item(path)], tmp_path / "f", models / "cam.pt", whole_image=True, force=True)
    assert s.exit_code == 0
    rec = json.loads((tmp_path / "f" / "dapi" / "dapi.json").read_text())
    assert rec["domain"]["kind"] == "dark-field" and rec["domain"]["forced"] is True
    assert any("--force" in n for n in rec["notes"])


def test_geojson_tiles_are_qupath_detections_with_their_mean_probability(
    tmp_path, synthetic_slide, models
):
    s = _run(
        [_item(synthetic_slide)], tmp_path / "o", models / "const.pt", mpp=4.0, geojson_tiles=True
    )
    assert s.exit_code == 0, s.items[0].error
    d = tmp_path / "o" / "synth"
    rec = json.loads((d / "synth.json").read_text())
    tiles = json.loads((d / "synth.tiles.geojson").read_text())["features"]
    assert len(tiles) == rec["windows"] and "synth.tiles.geojson" in rec["outputs"]
    for f in tiles:
        assert f["properties"]["objectType"] == "detection" and f["id"]
        assert 0.0 <= f["properties"]["measurements"]["Mean probability"] <= SIGMOID_1 + 0.01
    # a window fully inside tissue has the constant model's probability
    assert max(f["properties"]["measurements"]["Mean probability"] for f in tiles) == pytest.approx(
        SIGMOID_1, abs=0.01
    )


def test_the_thread_count_is_recorded_and_a_fixed_one_kept(tmp_path, synthetic_slide, models):
    import torch

    before = torch.get_num_threads()
    kw = {"mpp": 4.0, "output_mpp": 8.0}
    try:
        s = _run([_item(synthetic_slide)], tmp_path / "one", models / "cam.pt", threads=1, **kw)
        assert s.exit_code == 0
        threads = s.items[0].details["threads"]
        assert threads["used"] == 1 and threads["chosen_by"] == "--threads 1"
        assert threads["openmp_wait"]  # how idle OpenMP threads wait (histo_wsl.runtime.threads)
        assert torch.get_num_threads() == 1
        s = _run([_item(synthetic_slide)], tmp_path / "auto", models / "cam.pt", **kw)
        assert s.exit_code == 0 and s.items[0].details["threads"]["used"] >= 1
    finally:
        torch.set_num_threads(before)


def test_a_small_slide_is_read_once_with_the_same_outputs(tmp_path, wsi_dir, models, monkeypatch):
    """cmu-1-small-region.svs: thumbnail and windows from one held read of level 0."""
    from histo_wsl.tissue.scan import HeldLevel

    slide = wsi_dir / "cmu-1-small-region.svs"
    reads = []
    original = HeldLevel.read.__func__

    def spy(cls, *a, **kw):
        reads.append(original(cls, *a, **kw))
        return reads[-1]

    monkeypatch.setattr(HeldLevel, "read", classmethod(spy))
    kw = {"mpp": 1.0, "output_mpp": 4.0}
    assert (
        _run([_item(slide)], tmp_path / "held", models / "cam.pt", workers=0, **kw).exit_code == 0
    )
    assert len(reads) == 1 and reads[0] is not None  # held, and released after the slide
    assert reads[0].rgb is None
    s = _run([_item(slide)], tmp_path / "read", models / "cam.pt", workers=1, **kw)
    assert s.exit_code == 0 and len(reads) == 1  # reader processes read the file themselves
    name = slide.stem
    for suffix in (".prob.tif", ".mask.png", ".geojson"):
        a = (tmp_path / "held" / name / f"{name}{suffix}").read_bytes()
        assert a == (tmp_path / "read" / name / f"{name}{suffix}").read_bytes(), suffix


def test_a_refined_map_is_looked_up_only_on_tissue_with_the_same_outputs(
    tmp_path, synthetic_slide, monkeypatch
):
    """The k-NN lookup skips the windows' glass; the map the output keeps (tissue) is the same."""
    from knn_helpers import refined_negev_checkpoint

    import histo_wsl.inference.localize as loc
    from histo_wsl.networks.knn import FeatureBank

    model = refined_negev_checkpoint(tmp_path / "knn.pt", images=4, per_image=10, k=3)
    cells = []
    original = FeatureBank.neighbour_means

    def counting(bank, stages, *args, **kwargs):
        where = kwargs.get("where")
        b, _, h, w = stages[-1].shape
        cells.append(b * h * w * bank.grid**2 if where is None else int(where.sum()))
        return original(bank, stages, *args, **kwargs)

    monkeypatch.setattr(FeatureBank, "neighbour_means", counting)
    kw = {"output_mpp": 8.0, "workers": 0}
    assert _run([_item(synthetic_slide)], tmp_path / "tissue", model, **kw).exit_code == 0
    looked_up, cells[:] = sum(cells), []
    monkeypatch.setattr(loc, "_window_tissue", lambda *a, **k: None)  # every pixel
    assert _run([_item(synthetic_slide)], tmp_path / "all", model, **kw).exit_code == 0
    assert looked_up < sum(cells)  # the windows on the tissue's edge hold glass
    name = synthetic_slide.stem
    a, b = (_prob(tmp_path / d / name / f"{name}.prob.tif")[0] for d in ("tissue", "all"))
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # float rounding at most
    assert a.max() > 0 and len(np.unique(a)) > 2  # a map that varies, not a constant one
