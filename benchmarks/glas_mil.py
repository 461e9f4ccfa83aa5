"""GlaS-MIL: from slide labels to pixel maps on real tissue (issue 29), MIL vs true vs stamped labels.

Pyramidal "slides" are laid out from the 85 GlaS training images at GlaS's 0.62 µm/px on white
glass, with gaps between the images (as ``glas_slide.py`` lays out a fold): a ``malignant`` slide
holds one to three malignant images among benign ones, a ``benign`` slide benign images only. The
ROI is the malignant images' extent (rectangles), written beside the slides as
``annotations/<slide>_mask.png`` (what ``evaluate --predictions --annotations`` reads). Patients
(``Grade.csv``) are split into train / validation / test, so the three sets of slides come from
disjoint patients: an image is reused across slides of one split, never across splits. The layout
is seeded; the seed, each split's patients and each slide's images are in the JSON. GlaS has 16
patients, three of them with 43 of the 85 images: the split that balances both grades is nearly
fixed (the seed breaks ties between patients of equal size), the seed mostly varies the slides.

Then, through the library as ``mil_synthetic.py`` runs it (and the CLI for ``localize`` and
``evaluate``, as ``glas_slide.py``):

1. ``extract-patches`` per split, each slide with its slide label (96 px at 1.57 µm/px, the
   shipped GlaS model's reading resolution: 151 µm, about six patches per GlaS image);
2. ``train-mil`` on the training slides' patches, the validation patients' slides validating
   (``--val-data``: ``t_pos`` is chosen on slides of other patients) (frozen ImageNet MobileNetV2
   features, torchmil's DSMIL): slide AUC on the validation and the test slides, patch AUC of
   its instance scores against the true patch labels (a patch is malignant when the image under
   it is), and its pseudo labels' precision and recall against them;
3. unless ``--mil-only``, for each row of ``--rows`` (``mil``: the pseudo labels; ``true``: the
   true patch labels, the upper bound; ``stamped``: the slide label on every patch, what
   ``extract-patches --label`` gives today), over the same training patches and split:
   ``train-classifier`` then ``train-decoder --negative-class benign``, ``localize`` on the test
   slides and ``evaluate --predictions --annotations`` against the ROI masks: pixel PxAP and Dice
   (every pixel of the slides counts, glass included; ``test_roi_share`` is the PxAP of a map flat
   over every image, the chance level).

Prints one JSON object on stdout (progress on stderr). Targets (issue 29): MIL PxAP >= 90 % of the
true-label PxAP and >= the stamped PxAP + 10 points; exit status 1 when one is missed (``--tiny``
and ``--mil-only`` check none), 2 when GlaS is missing (``--skip-missing``: a message and 0).

Compute, measured on 2 CPU cores: ``--mil-only`` about 35 s (features are computed once, frozen;
3 min while another job shared the cores); the default three rows about 15 min (MobileNetV2 on
80-px crops trains at about 50 patches/s: each row trains it twice, 10 epochs each); ``--tiny``
about 1 min. Larger recipes (more slides, epochs) want a GPU (``--device cuda``).

    python benchmarks/glas_mil.py --mil-only                     # layout, extract, MIL: ~35 s
    python benchmarks/glas_mil.py --device cpu                   # the three rows: ~15 min
    python benchmarks/glas_mil.py --tiny --out /tmp/glas-mil     # plumbing smoke run

One run ranks the rows only loosely; ``mil_band.py glas --seeds 0,1,2,3 --out DIR -- --device
cpu`` runs it over seeds and checks the targets on the means.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from histo_wsl.runtime.atomic import write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _runs import eval_numbers, fresh_glas_run, histo_wsl, run_logged  # noqa: E402
from glas_slide import GLAS_MPP, _dice, place_images, write_slide  # noqa: E402
from mil_synthetic import manifest, write_csv  # noqa: E402

#: patch resolution (µm/px): the shipped GlaS model's (its card's mpp, 1.5706)
PATCH_MPP = 1.57
#: the negative and the positive class
BENIGN, MALIGNANT = "benign", "malignant"
#: the three rows: which labels the NEGEV chain trains from
ROWS = ("mil", "true", "stamped")
#: the patients' share of each split (per grade, in images)
SPLIT_SHARES = {"train": 0.5, "val": 0.2, "test": 0.3}


@dataclass(frozen=True)
class Recipe:
    """Sizes and settings of the benchmark (the CLI overrides some)."""

    train_slides: int = 12  # per class
    val_slides: int = 4  # per class
    test_slides: int = 4  # per class
    images_per_slide: int = 6
    columns: int = 3
    gap: int = 256  # level-0 px of glass between images (>= a patch's 243 level-0 px)
    patch: int = 96  # px at PATCH_MPP
    mil_backbone: str = "mobilenetv2"
    mil_pretrained: bool = True
    mil_input: int = 96
    mil_epochs: int = 40
    mil_negative_fpr: float = 0.02
    mil_negative_below: float | None = None
    mil_negative_quantile: float | None = None
    backbone: str = "mobilenetv2"
    pretrained: bool = True
    head: str = "wgap"
    classifier_epochs: int = 10
    decoder_epochs: int = 10
    classifier_lr: float = 0.003
    decoder_lr: float = 0.05
    seed_contrast: bool = True  # train-decoder --seed-contrast (seeds from the CAM over benign)
    max_steps: int | None = None  # per epoch
    batch_size: int = 16


TINY = Recipe(
    train_slides=3,
    val_slides=2,
    test_slides=2,
    images_per_slide=2,
    columns=2,
    mil_backbone="tinycnn",
    mil_pretrained=False,
    mil_input=48,
    mil_epochs=5,
    backbone="tinycnn",
    pretrained=False,
    head="wildcat",
    classifier_epochs=1,
    decoder_epochs=1,
    classifier_lr=0.01,
    max_steps=2,
    batch_size=8,
)


# ------------------------------------------------------------------------------------------------
# Layout: patients, slides, pyramids, masks
# ------------------------------------------------------------------------------------------------


def log(message: str) -> None:
    """One progress line on stderr."""
    print(f"[glas-mil {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def read_grades(glas: Path) -> list[dict[str, str]]:
    """``Grade.csv`` as ``[{name, patient, grade}]`` (its names and values carry leading spaces)."""
    path = glas / "Grade.csv"
    with open(path, newline="", encoding="utf-8") as fh:
        rows = [{k.strip(): (v or "").strip() for k, v in r.items()} for r in csv.DictReader(fh)]
    out = [
        {"name": r["name"], "patient": r["patient ID"], "grade": r["grade (GlaS)"]} for r in rows
    ]
    bad = sorted({r["grade"] for r in out} - {BENIGN, MALIGNANT})
    if bad:
        raise ValueError(f"{path}: unexpected grades {bad}")
    return out


def split_patients(
    grades: list[dict[str, str]], seed: int, min_benign: int, shares: dict[str, float] | None = None
) -> dict[str, list[str]]:
    """Patients into train / val / test: every split gets benign and malignant images.

    Patients are taken in a seeded order, largest first, each into the split whose per-grade image
    deficit (against ``shares``) it fills most. A draw that leaves a split with fewer than
    ``min_benign`` benign images or no malignant image is redrawn (next sub-seed).

    Raises:
        ValueError: no draw of 200 satisfies the constraints.
    """
    shares = shares or SPLIT_SHARES
    count: dict[str, dict[str, int]] = {}
    for r in grades:
        count.setdefault(r["patient"], {BENIGN: 0, MALIGNANT: 0})[r["grade"]] += 1
    total = {g: sum(c[g] for c in count.values()) for g in (BENIGN, MALIGNANT)}
    for attempt in range(200):
        rng = np.random.default_rng([seed, attempt])
        patients = sorted(count)
        rng.shuffle(patients)
        patients.sort(key=lambda p: -sum(count[p].values()))  # stable: ties stay shuffled
        have = {s: {BENIGN: 0, MALIGNANT: 0} for s in shares}
        split: dict[str, list[str]] = {s: [] for s in shares}
        for p in patients:
            gain = {
                s: sum(
                    min(count[p][g], max(0.0, shares[s] * total[g] - have[s][g]))
                    for g in (BENIGN, MALIGNANT)
                )
                for s in shares
            }
            best = max(shares, key=lambda s: (gain[s], shares[s]))
            split[best].append(p)
            for g in (BENIGN, MALIGNANT):
                have[best][g] += count[p][g]
        if all(have[s][BENIGN] >= min_benign and have[s][MALIGNANT] >= 1 for s in shares):
            return {s: sorted(v, key=int) for s, v in split.items()}
    raise ValueError(f"no patient split gives every split {min_benign} benign images")


def plan_slides(
    grades: list[dict[str, str]],
    patients: dict[str, list[str]],
    counts: dict[str, int],
    images_per_slide: int,
    seed: int,
) -> list[dict[str, Any]]:
    """The slides of each split: ``counts[split]`` malignant and as many benign slides.

    A malignant slide holds 1-3 malignant images (at most ``images_per_slide - 1``) and benign ones
    up to ``images_per_slide``; a benign slide ``images_per_slide`` benign images. Images come from
    the split's patients only, without repeats within a slide, in a seeded random order.
    """
    rng = np.random.default_rng(seed)
    by_name = {r["name"]: r for r in grades}
    slides = []
    for split in ("train", "val", "test"):
        pool = {
            g: sorted(
                r["name"] for r in grades if r["patient"] in patients[split] and r["grade"] == g
            )
            for g in (BENIGN, MALIGNANT)
        }
        for label in (MALIGNANT, BENIGN):
            for i in range(counts[split]):
                n_mal = 0
                if label == MALIGNANT:
                    n_mal = int(rng.integers(1, 4))
                    n_mal = min(n_mal, images_per_slide - 1, len(pool[MALIGNANT]))
                n_ben = min(images_per_slide - n_mal, len(pool[BENIGN]))
                names = [str(n) for n in rng.choice(pool[MALIGNANT], n_mal, replace=False)]
                names += [str(n) for n in rng.choice(pool[BENIGN], n_ben, replace=False)]
                rng.shuffle(names)
                slides.append(
                    {
                        "name": f"{split}-{label}-{i:02d}",
                        "split": split,
                        "label": label,
                        "images": names,
                        "malignant_images": [n for n in names if by_name[n]["grade"] == MALIGNANT],
                        "patients": sorted({by_name[n]["patient"] for n in names}, key=int),
                    }
                )
    return slides


def layout_slide(
    glas: Path, slide: dict[str, Any], folder: Path, columns: int, gap: int
) -> tuple[Path, Path, list[dict[str, Any]]]:
    """Write ``folder/<name>.tif`` and ``folder/annotations/<name>_mask.png`` (255: malignant).

    The images are placed and the slide and mask written as ``glas_slide.py`` does it.

    Returns:
        (slide, mask, one placement per image: name, grade, x, y, width, height in level-0 px).
    """
    from PIL import Image

    images = [
        np.asarray(Image.open(glas / "train" / f"{n}.png").convert("RGB")) for n in slide["images"]
    ]
    malignant = set(slide["malignant_images"])
    truths = [
        np.full(im.shape[:2], n in malignant, bool)
        for n, im in zip(slide["images"], images, strict=True)
    ]
    rgb, truth, placed = place_images(images, truths, columns, gap)
    for p, name in zip(placed, slide["images"], strict=True):
        p["name"], p["grade"] = name, MALIGNANT if name in malignant else BENIGN
    path, mask = write_slide(folder, slide["name"], rgb, truth)
    return path, mask, placed


def patch_truth(row: dict[str, str], placed: list[dict[str, Any]]) -> tuple[str, str | None]:
    """(true label, image) of a manifest row: the grade of the image the patch overlaps most.

    The gap between images is wider than a patch, so a patch overlaps one image at most.
    """
    x, y, side = float(row["x"]), float(row["y"]), float(row["size_level0"])
    best, image = 0.0, None
    for p in placed:
        ox = min(x + side, p["x"] + p["width"]) - max(x, p["x"])
        oy = min(y + side, p["y"] + p["height"]) - max(y, p["y"])
        if ox > 0 and oy > 0 and ox * oy > best:
            best, image = ox * oy, p
    if image is None:
        return BENIGN, None
    return image["grade"], image["name"]


# ------------------------------------------------------------------------------------------------
# Patches, MIL, label sets
# ------------------------------------------------------------------------------------------------


def extract(items: list, out: Path, recipe: Recipe, seed: int) -> Path:
    """``extract-patches`` of ``items`` (each with its slide label) into ``out``."""
    from histo_wsl.data.extract import ExtractParams, extract_patches
    from histo_wsl.runtime.batch import BatchOptions

    params = ExtractParams(patch_size=recipe.patch, mpp=PATCH_MPP, min_tissue=0.5, seed=seed)
    extract_patches(items, out, params, BatchOptions(quiet=True))
    return out


def score_slides(
    model_dir: Path, patches: Path, device: str, seed: int
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """The MIL model's slide scores and instance scores (by patch path) on another patch folder."""
    from histo_wsl.methods.mil import score_patch_folder
    from histo_wsl.training.engine import resolve_device

    bags, slides, instances = score_patch_folder(
        model_dir / "mil.pt", patches, resolve_device(device), BENIGN, seed
    )
    per_patch = {
        b.slide: dict(zip(b.paths, map(float, instances[b.slide]), strict=True)) for b in bags.bags
    }
    return slides, per_patch


def label_sets(
    patches: Path, mil_out: Path, truth: dict[str, str], out: Path
) -> tuple[dict[str, Path], dict[str, Any]]:
    """The three training CSVs (same patches, same split) and the MIL scores against the truth.

    ``truth`` is keyed by the paths of ``instances.csv`` (relative to ``patches``, the validation
    folder's as ``../patches-val/...``). The MIL statistics are over the training slides.
    """
    from histo_wsl.methods.mil import binary_auc

    with open(mil_out / "instances.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    rel = os.path.relpath(patches, out)
    sets: dict[str, list] = {k: [] for k in ROWS}
    for r in rows:
        image = Path(os.path.normpath(Path(rel, r["path"]))).as_posix()
        if r["pseudo_label"]:
            sets["mil"].append([image, r["pseudo_label"], r["split"]])
        sets["true"].append([image, truth[r["path"]], r["split"]])
        sets["stamped"].append([image, r["slide_label"], r["split"]])
    csvs = {k: write_csv(out / f"{k}.csv", ["image", "label", "split"], v) for k, v in sets.items()}
    inst = [r for r in rows if r["split"] == "train"]
    malignant = [truth[r["path"]] == MALIGNANT for r in inst]
    pseudo_pos = [truth[r["path"]] == MALIGNANT for r in inst if r["pseudo_label"] == MALIGNANT]
    in_pos = [truth[r["path"]] == MALIGNANT for r in inst if r["slide_label"] == MALIGNANT]
    benign_in_pos = [
        truth[r["path"]] == BENIGN
        for r in inst
        if r["slide_label"] == MALIGNANT and r["pseudo_label"] == BENIGN
    ]
    stats = {
        "patch_auc": _round(binary_auc([float(r["score"]) for r in inst], malignant)),
        "patches": len(inst),
        "malignant_patches": int(sum(malignant)),
        "malignant_share_of_malignant_slide_patches": _round(float(np.mean(in_pos))),
        "pseudo_positive": len(pseudo_pos),
        "pseudo_positive_precision": _round(float(np.mean(pseudo_pos))) if pseudo_pos else None,
        "pseudo_positive_recall": _round(sum(pseudo_pos) / max(1, sum(malignant))),
        "left_out": sum(not r["pseudo_label"] for r in inst),
        "pseudo_benign_in_malignant_slides": len(benign_in_pos),
        "pseudo_benign_in_malignant_slides_precision": _round(float(np.mean(benign_in_pos)))
        if benign_in_pos
        else None,
        "stamped_positive_precision": _round(float(np.mean(in_pos))),
    }
    return csvs, stats


def _roi_share(slides: list[dict[str, Any]], placements: dict[str, list[dict]]) -> float:
    """Malignant share of the images' area: the PxAP (in %) of a map flat over every image."""
    area = {g: 0 for g in (BENIGN, MALIGNANT)}
    for s in slides:
        for p in placements[s["name"]]:
            area[p["grade"]] += p["width"] * p["height"]
    return round(100.0 * area[MALIGNANT] / max(1, sum(area.values())), 2)


def _accuracy(scores: dict[str, float], slides: dict[str, dict], cut: float) -> float | None:
    """Share of slides called right when a score at or above ``cut`` means malignant."""
    right = [(v >= cut) == (slides[n]["label"] == MALIGNANT) for n, v in scores.items()]
    return _round(float(np.mean(right))) if right else None


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


# ------------------------------------------------------------------------------------------------
# The NEGEV chain of one row
# ------------------------------------------------------------------------------------------------


def negev_chain(
    data: Path,
    slides: list[Path],
    annotations: Path,
    out: Path,
    recipe: Recipe,
    device: str,
    seed: int,
) -> dict[str, Any]:
    """train-classifier, train-decoder --negative-class benign, localize, evaluate --predictions."""
    from histo_wsl.methods.cam import train_classifier
    from histo_wsl.methods.negev import train_decoder
    from histo_wsl.training.config import TrainConfig

    common = {
        "data": str(data),
        "backbone": recipe.backbone,
        "head": recipe.head,
        "pretrained": recipe.pretrained,
        "data_mpp": PATCH_MPP,
        "batch_size": recipe.batch_size,
        "clip_grad_norm": 1.0,
        "crop_size": recipe.patch - 16,
        "resize_size": recipe.patch,
        "step_size": 1000,
        "workers": 0,
        "device": device,
        "seed": seed,
        "max_steps_per_epoch": recipe.max_steps,
    }
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    cfg = TrainConfig.from_flat(
        out=str(out / "cam"), epochs=recipe.classifier_epochs, lr=recipe.classifier_lr, **common
    )
    train_classifier(cfg, quiet=True)
    seconds["train_classifier"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    cfg = TrainConfig.from_flat(
        out=str(out / "negev"),
        method="negev",
        classifier=str(out / "cam" / "best-cls.pt"),
        negative_class=BENIGN,
        epochs=recipe.decoder_epochs,
        lr=recipe.decoder_lr,
        seeds_fg=20,
        seeds_bg=20,
        seed_contrast=recipe.seed_contrast,
        **common,
    )
    train_decoder(cfg, quiet=True)
    seconds["train_decoder"] = round(time.perf_counter() - t, 1)
    steps = {
        "localize": histo_wsl(
            "localize", *map(str, slides), "--model", str(out / "negev" / "best-loc.pt"),
            "--out", str(out / "localize"), "--device", device, "--quiet",
        ),
        "evaluate": histo_wsl(
            "evaluate", "--predictions", str(out / "localize"), "--annotations",
            str(annotations), "--out", str(out / "evaluate"), "--quiet",
        ),
    }  # fmt: skip
    for name, cmd in steps.items():
        code, secs = run_logged(cmd, out / "logs" / f"{name}.log")
        seconds[name] = round(secs, 1)
        if code != 0:
            raise RuntimeError(f"{name} failed (exit {code}); see {out / 'logs' / (name + '.log')}")
    model = json.loads((out / "evaluate" / "metrics.json").read_text())["models"][0]
    return {"pxap": eval_numbers(model)["pxap"], "dice": _dice(model), "seconds": seconds}


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="GlaS folder (default: ../shared/data/glas next to the repo).")
    p.add_argument("--out", default="runs/bench-glas-mil", help="Working folder (replaced).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the split, layout and training.")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps.")
    p.add_argument("--tiny", action="store_true", help="Smoke run: tiny sizes, no targets.")
    p.add_argument("--mil-only", action="store_true", help="Layout, extract, MIL; no NEGEV rows.")
    p.add_argument("--rows", default=",".join(ROWS), help="Comma list of rows: mil,true,stamped.")
    p.add_argument("--train-slides", type=int, help="Training slides per class.")
    p.add_argument("--val-slides", type=int, help="Validation slides per class.")
    p.add_argument("--test-slides", type=int, help="Test slides per class.")
    p.add_argument("--images-per-slide", type=int, help="GlaS images per slide.")
    p.add_argument("--backbone", help="Backbone of the NEGEV rows (default mobilenetv2).")
    p.add_argument(
        "--pretrained",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ImageNet weights for the NEGEV rows' backbone (default: yes).",
    )
    p.add_argument("--head", help="Pooling head of the classifier (default wgap).")
    p.add_argument(
        "--mil-backbone",
        help="Frozen feature extractor of train-mil (default mobilenetv2, ImageNet weights; "
        "any other: random weights).",
    )
    p.add_argument("--mil-epochs", type=int, help="train-mil epochs.")
    p.add_argument(
        "--mil-negative-fpr", type=float, help="train-mil --negative-fpr (t_pos; default 0.02)."
    )
    p.add_argument(
        "--mil-negative-below",
        type=float,
        help="train-mil --negative-below: positive slides' patches scoring below it are labelled "
        "benign (default: left out).",
    )
    p.add_argument(
        "--mil-negative-quantile",
        type=float,
        default=None,
        help="train-mil --negative-quantile: malignant slides' patches below this quantile of "
        "the benign validation patches' scores are labelled benign.",
    )
    p.add_argument(
        "--seed-contrast",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train-decoder --seed-contrast (default: yes; --no-seed-contrast: the paper's CAM).",
    )
    p.add_argument("--classifier-epochs", type=int, help="train-classifier epochs.")
    p.add_argument("--decoder-epochs", type=int, help="train-decoder epochs.")
    p.add_argument("--max-steps", type=int, help="Training steps per epoch (default: all).")
    p.add_argument("--batch-size", type=int, help="Training batch size.")
    p.add_argument("--skip-missing", action="store_true", help="Exit 0 when GlaS is absent.")
    return p


def _recipe(args: argparse.Namespace) -> Recipe:
    recipe = TINY if args.tiny else Recipe()
    overrides = {
        "train_slides": args.train_slides,
        "val_slides": args.val_slides,
        "test_slides": args.test_slides,
        "images_per_slide": args.images_per_slide,
        "backbone": args.backbone,
        "pretrained": args.pretrained,
        "head": args.head,
        "mil_backbone": args.mil_backbone,
        "mil_epochs": args.mil_epochs,
        "mil_negative_fpr": args.mil_negative_fpr,
        "mil_negative_below": args.mil_negative_below,
        "mil_negative_quantile": args.mil_negative_quantile,
        "classifier_epochs": args.classifier_epochs,
        "decoder_epochs": args.decoder_epochs,
        "seed_contrast": args.seed_contrast,
        "max_steps": args.max_steps,
        "batch_size": args.batch_size,
    }
    recipe = replace(recipe, **{k: v for k, v in overrides.items() if v is not None})
    if args.mil_backbone is not None:
        recipe = replace(recipe, mil_pretrained=args.mil_backbone == "mobilenetv2")
    return recipe


def recipe_for(argv: list[str]) -> dict:
    """The recipe (as ``report.json`` records it) that these options would run."""
    return asdict(_recipe(_parser().parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    """Lay out, extract, train MIL, run the rows; print JSON; returns the exit status."""
    p = _parser()
    args = p.parse_args(argv)
    rows = [] if args.mil_only else [r.strip() for r in args.rows.split(",") if r.strip()]
    if any(r not in ROWS for r in rows) or len(set(rows)) != len(rows):
        p.error(f"--rows: a comma list of distinct rows among {','.join(ROWS)}")
    recipe = _recipe(args)
    if min(recipe.train_slides, recipe.val_slides, recipe.test_slides) < 2:
        # each folder is read as bags, which needs two benign slides at least
        p.error("at least 2 training, validation and test slides per class")
    if recipe.images_per_slide < 2:
        p.error("--images-per-slide: at least 2 (a malignant slide holds benign images too)")
    run = fresh_glas_run(args.data, args.skip_missing, args.out)
    if isinstance(run, int):
        return run
    data, out = run
    t_all = time.perf_counter()
    seconds: dict[str, float] = {}

    # 1. layout
    t = time.perf_counter()
    from histo_wsl.runtime.inputs import InputItem

    grades = read_grades(data)
    patients = split_patients(grades, args.seed, min_benign=recipe.images_per_slide)
    counts = {"train": recipe.train_slides, "val": recipe.val_slides, "test": recipe.test_slides}
    slides = plan_slides(grades, patients, counts, recipe.images_per_slide, args.seed)
    placements: dict[str, list[dict[str, Any]]] = {}
    items: dict[str, list] = {"train": [], "val": [], "test": []}
    paths: dict[str, list[Path]] = {"train": [], "val": [], "test": []}
    for s in slides:
        folder = out / "slides" / s["split"]
        path, _, placements[s["name"]] = layout_slide(data, s, folder, recipe.columns, recipe.gap)
        items[s["split"]].append(InputItem(path, s["name"], label=s["label"]))
        paths[s["split"]].append(path)
    (out / "layout.json").write_text(json.dumps(placements, indent=1) + "\n", encoding="utf-8")
    seconds["layout"] = round(time.perf_counter() - t, 1)
    log(f"{len(slides)} slides laid out ({seconds['layout']} s); patients {patients}")

    # 2. patches, with each slide's label; the true patch labels from the layout
    t = time.perf_counter()
    folders = {k: extract(v, out / f"patches-{k}", recipe, args.seed) for k, v in items.items()}
    truth: dict[str, dict[str, str]] = {}
    for split, folder in folders.items():
        truth[split] = {
            r["path"]: patch_truth(r, placements[r["slide"]])[0] for r in manifest(folder)
        }
    seconds["extract"] = round(time.perf_counter() - t, 1)
    n_patches = {k: len(v) for k, v in truth.items()}
    log(f"patches {n_patches} ({seconds['extract']} s)")

    # 3. MIL on the training slides; scores on the validation and test slides
    from histo_wsl.methods.mil import MILParams, binary_auc, train_mil

    t = time.perf_counter()
    mil = train_mil(
        MILParams(
            data=folders["train"],
            out=out / "mil",
            negative_class=BENIGN,
            backbone=recipe.mil_backbone,
            pretrained=recipe.mil_pretrained,
            input_size=recipe.mil_input,
            epochs=recipe.mil_epochs,
            negative_fpr=recipe.mil_negative_fpr,
            negative_below=recipe.mil_negative_below,
            negative_quantile=recipe.mil_negative_quantile,
            val_data=folders["val"],
            seed=args.seed,
            device=args.device,
        ),
        quiet=True,
    )
    seconds["train_mil"] = round(time.perf_counter() - t, 1)
    log(f"train-mil done ({seconds['train_mil']} s); scoring validation and test slides")
    t = time.perf_counter()
    held_out: dict[str, dict[str, Any]] = {}
    by_name = {s["name"]: s for s in slides}
    for split in ("val", "test"):
        scores, inst = score_slides(out / "mil", folders[split], args.device, args.seed)
        names = sorted(scores)
        flat = [(truth[split][pth], v) for n in names for pth, v in inst[n].items()]
        held_out[split] = {
            "slide_auc": _round(
                binary_auc(
                    [scores[n] for n in names], [by_name[n]["label"] == MALIGNANT for n in names]
                )
            ),
            "patch_auc": _round(
                binary_auc([v for _, v in flat], [g == MALIGNANT for g, _ in flat])
            ),
            **{
                f"slide_accuracy@{key}": _accuracy(scores, by_name, cut)
                for key, cut in (("0.5", 0.5), ("t_slide", mil["threshold"]["t_slide"]))
            },
            "slide_scores": {n: round(scores[n], 4) for n in names},
        }
    seconds["score_held_out"] = round(time.perf_counter() - t, 1)
    val_rel = os.path.relpath(folders["val"], folders["train"])
    by_path = {**truth["train"], **{f"{val_rel}/{p}": g for p, g in truth["val"].items()}}
    csvs, stats = label_sets(folders["train"], out / "mil", by_path, out / "labels")
    log(
        f"slide AUC val {held_out['val']['slide_auc']} test {held_out['test']['slide_auc']}; "
        f"patch AUC (train slides) {stats['patch_auc']}"
    )

    # 4. the NEGEV rows
    results: dict[str, Any] = {}
    for name in rows:
        t = time.perf_counter()
        log(f"row {name}: train-classifier, train-decoder, localize, evaluate")
        run = out / "runs" / name
        results[name] = negev_chain(
            csvs[name],
            paths["test"],
            out / "slides" / "test" / "annotations",
            run,
            recipe,
            args.device,
            args.seed,
        )
        seconds[f"row_{name}"] = round(time.perf_counter() - t, 1)
        log(f"row {name}: PxAP {results[name]['pxap']} Dice {results[name]['dice']}")

    pxap = {k: v["pxap"] for k, v in results.items()}
    targets: dict[str, bool] = {}
    if "mil" in pxap and "true" in pxap:
        targets["mil_pxap >= 0.9 * true_pxap"] = (pxap["mil"] or 0.0) >= 0.9 * (pxap["true"] or 0.0)
    if "mil" in pxap and "stamped" in pxap:
        targets["mil_pxap >= stamped_pxap + 10"] = (pxap["mil"] or 0.0) >= (
            pxap["stamped"] or 0.0
        ) + 10
    checked = not args.tiny and bool(targets)
    result = {
        "benchmark": "glas_mil",
        "tiny": args.tiny,
        "mil_only": args.mil_only,
        "seed": args.seed,
        "device": args.device,
        "recipe": asdict(recipe),
        "patch": {"size_px": recipe.patch, "mpp": PATCH_MPP, "slide_mpp": GLAS_MPP},
        "patients": patients,
        "slides": [
            {k: s[k] for k in ("name", "split", "label", "images", "malignant_images", "patients")}
            for s in slides
        ],
        "patches": n_patches,
        "test_roi_share": _roi_share([s for s in slides if s["split"] == "test"], placements),
        "mil": {
            "train_mil_val_slide_auc": _round(mil["val_slide_auc"]),
            "val_slide_auc": held_out["val"]["slide_auc"],
            "test_slide_auc": held_out["test"]["slide_auc"],
            "t_slide": _round(mil["threshold"]["t_slide"]),
            "val_slide_accuracy@0.5": held_out["val"]["slide_accuracy@0.5"],
            "test_slide_accuracy@0.5": held_out["test"]["slide_accuracy@0.5"],
            "test_slide_accuracy@t_slide": held_out["test"]["slide_accuracy@t_slide"],
            "patch_auc_train_slides": stats["patch_auc"],
            "patch_auc_val_slides": held_out["val"]["patch_auc"],
            "patch_auc_test_slides": held_out["test"]["patch_auc"],
            "t_pos": _round(mil["threshold"]["t_pos"]),
            "pseudo_labels": mil["pseudo_labels"],
            "labels": stats,
            "slide_scores": {k: v["slide_scores"] for k, v in held_out.items()},
        },
        "rows": results,
        "pxap": pxap,
        "targets": targets,
        "targets_checked": checked,
        "cpu_count": os.cpu_count(),
        "seconds": {**seconds, "total": round(time.perf_counter() - t_all, 1)},
    }
    text = json.dumps(result, indent=2, default=str)
    write_text(out / "report.json", text + "\n")
    print(text)
    return 1 if checked and not all(targets.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
