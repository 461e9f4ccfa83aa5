"""``train-mil``: from one label per slide to pseudo patch labels, by multiple-instance learning.

A slide of an ``extract-patches`` folder is a bag, its patches the instances
(:func:`histo_wsl.data.bags.load_bags`). Each patch is described once by a frozen backbone's
globally average-pooled last feature map (ImageNet normalisation; cached in ``features.pt``). A
dual-stream MIL network (DSMIL, Li et al. CVPR 2021, as implemented by the ``torchmil`` library)
is trained on the slide labels alone, negative class vs every other class: its instance
classifier scores each patch, its attention stream the slide.

Pseudo labels (``pseudo-labels.csv``, a dataset CSV ``train-classifier`` and ``train-decoder``
read as it is): every patch of a negative slide is negative; a patch of a positive slide takes
its slide's class when its instance score reaches ``t_pos``, and is left out otherwise (or, below
``t_neg`` when given, labelled negative: ``negative_below``, or ``negative_quantile`` of the
negative validation slides' patch scores). ``t_pos`` is chosen on the validation slides
only: the smallest threshold that keeps at most ``negative_fpr`` of the negative validation
slides' patches at or above it.
"""

from __future__ import annotations

import csv
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from histo_wsl import __version__
from histo_wsl.data.bags import Bag, BagSet, load_bags
from histo_wsl.data.images import IMAGENET_MEAN, IMAGENET_STD
from histo_wsl.errors import InputError
from histo_wsl.registry.checkpoint import load_checkpoint, save_checkpoint
from histo_wsl.runtime import atomic
from histo_wsl.runtime.console import stderr_console, warn
from histo_wsl.runtime.record import RunRecord, json_ready

__all__ = [
    "MILParams",
    "binary_auc",
    "build_dsmil",
    "load_mil",
    "PatchFeatures",
    "patch_input",
    "positive_threshold",
    "predicted_class",
    "slide_threshold",
    "score_bag",
    "score_bags",
    "score_patch_folder",
    "train_mil",
]

#: the install hint when torchmil is missing
INSTALL_HINT = "pip install 'histo-wsl[mil]'"


@dataclass
class MILParams:
    """Settings of ``train-mil`` (CLI options of the same names).

    Attributes:
        data: the patch folder (``manifest.csv``).
        out: the run folder.
        negative_class: the class of fully negative slides (None: guessed from two classes).
        backbone: the frozen feature extractor (``histo_wsl.networks.backbones``).
        pretrained: ImageNet weights from the torch hub cache.
        input_size: patches are resized to this square before the backbone (px).
        batch_size: patches per feature-extraction batch.
        epochs: passes over the training slides (one slide per step).
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        att_dim: DSMIL query dimension.
        val_fraction: share of each class's slides in ``val`` (without ``val_data``).
        val_data: another patch folder whose slides validate (``t_pos``, the slide AUC) instead
            of a share of ``data``'s: slides of other patients than the training ones.
        negative_fpr: at most this share of the negative validation slides' patches may score at
            or above ``t_pos``.
        negative_below: patches of positive slides scoring below this are labelled negative
            (None: left out).
        negative_quantile: instead of ``negative_below``, ``t_neg`` is this quantile of the
            negative validation slides' patch scores: a positive slide's patch scoring below
            what that share of the fully negative patches score is labelled negative.
        seed: seed of the split, the weights and the slide order.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
    """

    data: Path
    out: Path
    negative_class: str | None = None
    backbone: str = "mobilenetv2"
    pretrained: bool = True
    input_size: int = 224
    batch_size: int = 32
    epochs: int = 40
    lr: float = 1e-3
    weight_decay: float = 1e-4
    att_dim: int = 128
    val_fraction: float = 0.25
    val_data: Path | None = None
    negative_fpr: float = 0.02
    negative_below: float | None = None
    negative_quantile: float | None = None
    seed: int = 0
    device: str = "auto"

    def validate(self) -> None:
        """Raise InputError on settings that cannot work together."""
        if not 0.0 <= self.negative_fpr < 1.0:
            raise InputError(f"--negative-fpr {self.negative_fpr}: give a share in [0, 1)")
        if self.negative_below is not None and not 0.0 < self.negative_below < 1.0:
            raise InputError(f"--negative-below {self.negative_below}: give a score in (0, 1)")
        if self.negative_quantile is not None:
            if not 0.0 < self.negative_quantile < 1.0:
                raise InputError(
                    f"--negative-quantile {self.negative_quantile}: give a share in (0, 1)"
                )
            if self.negative_below is not None:
                raise InputError("give --negative-below or --negative-quantile, not both")

    def record(self) -> dict:
        """The settings as plain values (run.json, the card)."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


def _torchmil():
    """The torchmil models module, or a clear InputError naming the extra to install."""
    try:
        from torchmil import models
    except ImportError:
        raise InputError(
            f"train-mil needs the torchmil library; install it with {INSTALL_HINT}"
        ) from None
    return models


class Standardize(nn.Module):
    """Per-feature standardisation with the training instances' mean and std (kept as buffers)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std``."""
        return (x - self.mean) / self.std


def build_dsmil(
    feature_dim: int,
    att_dim: int,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
) -> nn.Module:
    """The DSMIL network of torchmil over standardised features of ``feature_dim`` channels."""
    models = _torchmil()
    mean = torch.zeros(feature_dim) if mean is None else mean
    std = torch.ones(feature_dim) if std is None else std
    return models.DSMIL(in_shape=(feature_dim,), att_dim=att_dim, feat_ext=Standardize(mean, std))


# ------------------------------------------------------------------------------------------------
# Instance features
# ------------------------------------------------------------------------------------------------


def _feature_card(bags: BagSet, params: MILParams) -> dict:
    card = {
        "kind": "instance-features",
        "backbone": params.backbone,
        "pretrained": params.pretrained,
        "input_size": params.input_size,
        "pooling": "global average of the last feature map",
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "manifest_sha256": bags.manifest_sha256,
        "paths": bags.paths(),
    }
    if not params.pretrained:  # random weights: the seed decides the features
        card["seed"] = params.seed
    return card


def patch_input(image: Image.Image, size: int) -> torch.Tensor:
    """A patch as the feature backbone takes it: RGB, bilinear to ``size``², uint8 ``(3, S, S)``."""
    rgb = image.convert("RGB")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)


def _load_image(path: Path, size: int) -> torch.Tensor:
    try:
        with Image.open(path) as im:
            return patch_input(im, size)
    except OSError as exc:
        raise InputError(f"cannot read the patch ({exc}); re-run extract-patches", path) from None


class PatchFeatures:
    """The frozen backbone describing each patch: the global average of its last feature map.

    Args:
        backbone: a :mod:`histo_wsl.networks.backbones` name.
        pretrained: ImageNet weights (else random weights drawn with ``seed``).
        seed: the seed of random weights.
        device: where the backbone runs.
    """

    def __init__(self, backbone: str, pretrained: bool, seed: int, device: torch.device) -> None:
        from histo_wsl.networks.backbones import build_backbone

        torch.manual_seed(seed)
        self.device = device
        self.net = build_backbone(backbone, pretrained).to(device).eval()
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` uint8 patches to ``(B, C)`` float32 features on the CPU."""
        x = (x.to(self.device).float() / 255.0 - self.mean) / self.std
        return self.net(x)[-1].mean(dim=(2, 3)).float().cpu()


@torch.no_grad()
def extract_features(
    folder: Path, paths: list[str], params: MILParams, device: torch.device, quiet: bool = True
) -> torch.Tensor:
    """Global-average-pooled last-stage features of each patch, ``(N, C)`` float32 on the CPU."""
    features = PatchFeatures(params.backbone, params.pretrained, params.seed, device)
    out = []
    console = stderr_console()
    t0 = time.perf_counter()
    for i in range(0, len(paths), params.batch_size):
        chunk = paths[i : i + params.batch_size]
        out.append(
            features(torch.stack([_load_image(folder / p, params.input_size) for p in chunk]))
        )
        if not quiet and (i // params.batch_size) % 20 == 0:
            console.print(
                f"features: {i + len(chunk)}/{len(paths)} patches "
                f"({time.perf_counter() - t0:.0f} s)",
                highlight=False,
            )
    return torch.cat(out)


def instance_features(
    bags: BagSet, params: MILParams, device: torch.device, quiet: bool = True
) -> tuple[torch.Tensor, bool]:
    """The patches' features, from ``<out>/features.pt`` when it matches, else computed and saved.

    Returns:
        (features ``(N, C)`` in :meth:`BagSet.paths` order, whether the cache was used).
    """
    card = _feature_card(bags, params)
    cache = Path(params.out) / "features.pt"
    if cache.is_file():
        try:
            saved = load_checkpoint(cache)
        except InputError:
            saved = None
        if saved is not None and saved["card"] == card:
            return saved["state_dict"]["features"], True
    feats = extract_features(bags.folder, card["paths"], params, device, quiet)
    save_checkpoint(cache, card, {"features": feats})
    return feats, False


# ------------------------------------------------------------------------------------------------
# Training and scoring
# ------------------------------------------------------------------------------------------------


def score_patch_folder(
    mil_path: str | Path,
    folder: str | Path,
    device: torch.device,
    negative_class: str | None = None,
    seed: int = 0,
) -> tuple[BagSet, dict[str, float], dict[str, np.ndarray]]:
    """A trained ``mil.pt`` applied to another ``extract-patches`` folder (e.g. test slides).

    Returns:
        (the folder's bags, slide scores, instance scores in each bag's patch order).
    """
    model, card = load_mil(mil_path)
    bags = load_bags(folder, negative_class=negative_class, seed=seed)
    params = MILParams(
        data=Path(folder),
        out=Path(mil_path).parent,
        backbone=card["backbone"],
        pretrained=card["pretrained"],
        input_size=card["input_size"],
        seed=card["seed"],
    )
    feats = extract_features(bags.folder, bags.paths(), params, device)
    slides, instances = score_bags(model.to(device), bags.bags, _bag_tensors(bags, feats), device)
    return bags, slides, instances


def _bag_tensors(bags: BagSet, feats: torch.Tensor) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for b in bags.bags:
        out[b.slide] = feats[start : start + len(b.paths)]
        start += len(b.paths)
    return out


def _train(
    bags: BagSet,
    x: dict[str, torch.Tensor],
    params: MILParams,
    device: torch.device,
    quiet: bool,
) -> tuple[nn.Module, list[dict]]:
    """DSMIL trained on the training slides, one slide per step; the last epoch is kept."""
    train = bags.split("train")
    pooled = torch.cat([x[b.slide] for b in train])
    torch.manual_seed(params.seed)
    model = build_dsmil(
        pooled.shape[1], params.att_dim, pooled.mean(0), pooled.std(0).clamp_min(1e-6)
    ).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    rng = np.random.default_rng(params.seed)
    console = stderr_console()
    history = []
    for epoch in range(1, params.epochs + 1):
        model.train()
        losses = []
        for k in rng.permutation(len(train)).tolist():
            b = train[k]
            y = torch.tensor([float(bags.is_positive(b))], device=device)
            _, terms = model.compute_loss(y, x[b.slide].to(device)[None])
            loss = sum(terms.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses))})
        if not quiet and (epoch % 10 == 0 or epoch == params.epochs):
            console.print(f"epoch {epoch}/{params.epochs}: loss {history[-1]['train_loss']:.4f}")
    return model.eval(), history


@torch.no_grad()
def score_bags(
    model: nn.Module, bags: list[Bag], x: dict[str, torch.Tensor], device: torch.device
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Slide scores (DSMIL's bag prediction) and instance scores (its instance classifier), 0-1."""
    slides, instances = {}, {}
    for b in bags:
        slides[b.slide], instances[b.slide] = score_bag(model, x[b.slide], device)
    return slides, instances


@torch.no_grad()
def score_bag(
    model: nn.Module, feats: torch.Tensor, device: torch.device
) -> tuple[float, np.ndarray]:
    """One bag's score and its instances' scores (0-1) from its ``(N, C)`` instance features."""
    bag_logit, inst_logits = model.predict(feats.to(device)[None], return_inst_pred=True)
    return float(torch.sigmoid(bag_logit.float())[0]), torch.sigmoid(inst_logits.float())[
        0
    ].cpu().numpy()


def binary_auc(scores: np.ndarray | list[float], labels: np.ndarray | list[int]) -> float | None:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties); None without both classes."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    i = 0
    while i < len(s):  # mid-ranks of tied scores
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def positive_threshold(negative_scores: np.ndarray, fpr: float) -> float:
    """The smallest threshold with at most ``fpr`` of ``negative_scores`` at or above it."""
    s = np.sort(np.asarray(negative_scores, dtype=np.float64))[::-1]
    k = int(np.floor(fpr * len(s)))
    if k >= len(s):
        return 0.0
    return float(np.nextafter(s[k], np.inf))


# ------------------------------------------------------------------------------------------------
# Outputs
# ------------------------------------------------------------------------------------------------


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with atomic.atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _pseudo_label(bags: BagSet, b: Bag, score: float, t_pos: float, t_neg: float | None) -> str:
    if not bags.is_positive(b):
        return bags.negative_class
    if score >= t_pos:
        return b.label
    if t_neg is not None and score < t_neg:
        return bags.negative_class
    return ""


def slide_threshold(scores: list[float], positive: list[bool]) -> float:
    """The slide-score threshold with the best balanced accuracy on labelled slides.

    Candidates are 0.5 and the midpoints between consecutive distinct scores; a slide is called
    positive at or above the threshold. Ties go to the candidate nearest 0.5 (DSMIL's own cut);
    without slides of both kinds, 0.5.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(positive, dtype=bool)
    if y.all() or not y.any():
        return 0.5
    u = np.unique(s)
    candidates = np.concatenate([[0.5], (u[:-1] + u[1:]) / 2.0])
    tpr = ((s[None, :] >= candidates[:, None]) & y).sum(1) / y.sum()
    tnr = ((s[None, :] < candidates[:, None]) & ~y).sum(1) / (~y).sum()
    balanced = (tpr + tnr) / 2.0
    best = np.flatnonzero(balanced >= balanced.max() - 1e-12)
    return float(candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])


def predicted_class(
    class_names: list[str], negative_class: str, score: float, threshold: float = 0.5
) -> str:
    """The class a slide score means: the negative class below ``threshold``, else the positive.

    With several positive classes (trained as one: negative vs every other class), ``positive``.
    """
    if score < threshold:
        return negative_class
    positives = [c for c in class_names if c != negative_class]
    return positives[0] if len(positives) == 1 else "positive"


def _write_outputs(
    bags: BagSet, slides: dict, instances: dict, threshold: dict, params: MILParams
) -> dict[str, int]:
    """instances.csv, slides.csv and pseudo-labels.csv; returns pseudo-label counts per class."""
    out = Path(params.out)
    t_pos, t_neg, t_slide = threshold["t_pos"], threshold["t_neg"], threshold["t_slide"]
    inst_rows, pseudo_rows, slide_rows = [], [], []
    counts: dict[str, int] = {c: 0 for c in bags.class_names}
    counts["left out"] = 0
    rel = os.path.relpath(bags.folder.resolve(), out.resolve())
    for b in bags.bags:
        scores = instances[b.slide].tolist()
        for path, mpp, score in zip(b.paths, b.mpps, scores, strict=True):
            label = _pseudo_label(bags, b, score, t_pos, t_neg)
            inst_rows.append([path, b.slide, b.label, b.split, f"{score:.6f}", label])
            counts[label or "left out"] += 1
            if label:
                image = Path(os.path.normpath(Path(rel, path))).as_posix()
                pseudo_rows.append([image, label, b.split, b.slide, mpp])
        score = slides[b.slide]
        slide_rows.append(
            [
                b.slide,
                b.label,
                b.split,
                len(b.paths),
                f"{score:.6f}",
                predicted_class(bags.class_names, bags.negative_class, score, t_slide),
            ]
        )
    _write_csv(
        out / "instances.csv",
        ["path", "slide", "slide_label", "split", "score", "pseudo_label"],
        inst_rows,
    )
    _write_csv(
        out / "slides.csv", ["slide", "label", "split", "patches", "score", "predicted"], slide_rows
    )
    _write_csv(out / "pseudo-labels.csv", ["image", "label", "split", "slide", "mpp"], pseudo_rows)
    return counts


def _threshold(bags: BagSet, slides: dict, instances: dict, params: MILParams) -> dict:
    """The instance and slide thresholds, and how they were chosen.

    ``t_pos`` from the negative validation slides' patches, ``t_slide`` from the validation slides'
    scores.
    """
    negatives = [b for b in bags.split("val") if not bags.is_positive(b)]
    scores = np.concatenate([instances[b.slide] for b in negatives])
    t_pos = positive_threshold(scores, params.negative_fpr)
    val = bags.split("val")
    t_slide = slide_threshold([slides[b.slide] for b in val], [bags.is_positive(b) for b in val])
    t_neg = params.negative_below
    if params.negative_quantile is not None:
        t_neg = min(float(np.quantile(scores, params.negative_quantile)), t_pos)
    return {
        "t_slide": t_slide,
        "t_slide_rule": "best balanced accuracy on the validation slides (0.5 and the midpoints "
        "between their scores; ties nearest 0.5); a slide scoring at or above it is positive",
        "t_pos": t_pos,
        "rule": "smallest threshold keeping at most negative_fpr of the negative validation "
        "slides' patches at or above it",
        "negative_fpr": params.negative_fpr,
        "negative_val_slides": [b.slide for b in negatives],
        "negative_val_patches": int(len(scores)),
        "negative_val_share_at_or_above": float(np.mean(scores >= t_pos)),
        "negative_below": params.negative_below,
        "negative_quantile": params.negative_quantile,
        "t_neg": t_neg,
        "t_neg_rule": None
        if t_neg is None
        else "positive slides' patches scoring below it are labelled negative"
        + (
            ""
            if params.negative_quantile is None
            else ": the negative_quantile of the negative validation slides' patch scores"
        ),
    }


def _slide_metrics(bags: BagSet, slides: dict, t_slide: float) -> dict:
    out: dict = {"t_slide": t_slide}
    for name in ("train", "val"):
        items = bags.split(name)
        y = [bags.is_positive(b) for b in items]
        s = [slides[b.slide] for b in items]
        out[f"{name}_slide_auc"] = binary_auc(s, y)
        out[f"{name}_slide_accuracy"] = (
            float(np.mean([(v >= t_slide) == t for v, t in zip(s, y, strict=True)]))
            if items
            else None
        )
    return out


def train_mil(params: MILParams, *, quiet: bool = False, argv: list[str] | None = None) -> dict:
    """Run ``train-mil``: bags, features, DSMIL, scores, threshold, pseudo labels, checkpoint.

    Writes in ``params.out``: ``features.pt`` (cache), ``mil.pt``, ``instances.csv``,
    ``slides.csv``, ``pseudo-labels.csv`` and ``run.json``.

    Returns:
        The summary (also in run.json): slide AUC on the validation slides, the threshold and how
        it was chosen, pseudo-label counts, files.

    Raises:
        InputError: bad data or settings, or torchmil missing.
    """
    from histo_wsl.training.engine import resolve_device, seed_everything

    params.validate()
    _torchmil()  # before any work: the install hint first
    out = atomic.ensure_writable_dir(params.out)
    bags = load_bags(
        params.data,
        negative_class=params.negative_class,
        val_fraction=params.val_fraction,
        seed=params.seed,
        val_folder=params.val_data,
    )
    more = "add negative slides to --val-data" if params.val_data else "raise --val-fraction"
    if not any(not bags.is_positive(b) for b in bags.split("val")):
        raise InputError(f"no negative slide in the validation split: {more}", bags.folder)
    if len({bags.is_positive(b) for b in bags.split("train")}) < 2:
        raise InputError(
            "the training slides are of one kind only (negative or positive): MIL learns from "
            "both; add slides of the other kind to the training folder",
            bags.folder,
        )
    device = resolve_device(params.device)
    record = RunRecord(
        out / "run.json",
        "train-mil",
        params=params.record(),
        argv=argv if argv is not None else sys.argv,
        seed=params.seed,
        device=str(device),
    )
    record.write(ended=False, status="running")
    seed_everything(params.seed)
    try:
        summary = _run(bags, params, device, quiet)
    except BaseException as exc:
        record.write(
            ended=True,
            exit_code=getattr(exc, "exit_code", 1),
            status="failed",
            error=str(exc) or type(exc).__name__,
        )
        raise
    record.write(ended=True, status="done", summary=summary)
    if not quiet:
        _print_closing(summary, bags)
    return summary


def _run(bags: BagSet, params: MILParams, device: torch.device, quiet: bool) -> dict:
    """Features, DSMIL, scores, threshold, the CSVs and mil.pt; returns the JSON-ready summary."""
    out = Path(params.out)
    feats, cached = instance_features(bags, params, device, quiet)
    x = _bag_tensors(bags, feats)
    model, history = _train(bags, x, params, device, quiet)
    slides, instances = score_bags(model, bags.bags, x, device)
    threshold = _threshold(bags, slides, instances, params)
    counts = _write_outputs(bags, slides, instances, threshold, params)
    metrics = _slide_metrics(bags, slides, threshold["t_slide"])
    card = {
        "method": "mil",
        "mil_model": "torchmil.models.DSMIL",
        "backbone": params.backbone,
        "pretrained": params.pretrained,
        "feature_dim": int(feats.shape[1]),
        "input_size": params.input_size,
        "patch": bags.patch,
        "att_dim": params.att_dim,
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "class_names": list(bags.class_names),
        "negative_class": bags.negative_class,
        "task": "slide: negative class vs every other class",
        "threshold": threshold,
        "seed": params.seed,
        "data": bags.describe(),
        "pseudo_labels": counts,
        "metrics": metrics,
        "history": history,
        "config": params.record(),
        "versions": {"histo-wsl": __version__, "torch": str(torch.__version__)},
    }
    save_checkpoint(out / "mil.pt", json_ready(card), _cpu_state(model))
    positives = sum(v for k, v in counts.items() if k not in (bags.negative_class, "left out"))
    warnings = []
    if positives == 0:
        warnings.append(
            "no patch reached t_pos: pseudo-labels.csv has no positive patch; raise "
            "--negative-fpr or train longer (--epochs)"
        )
        warn(warnings[-1])
    summary = {
        "out": str(out),
        "slides": len(bags.bags),
        "patches": len(feats),
        "features_cached": cached,
        "val_slide_auc": metrics["val_slide_auc"],
        "metrics": metrics,
        "threshold": threshold,
        "pseudo_labels": counts,
        "seed": params.seed,
        "warnings": warnings,
        "files": {
            n: str(out / n)
            for n in (
                "mil.pt",
                "instances.csv",
                "slides.csv",
                "pseudo-labels.csv",
                "features.pt",
                "run.json",
            )
        },
    }
    return json_ready(summary)


def _cpu_state(model: nn.Module) -> dict:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _print_closing(summary: dict, bags: BagSet) -> None:
    auc = summary["val_slide_auc"]
    console = stderr_console()
    console.print(
        f"[green]Done[/green]: {summary['slides']} slides, {summary['patches']} patches; "
        f"validation slide AUC {'n/a' if auc is None else f'{auc:.3f}'}; "
        f"t_pos {summary['threshold']['t_pos']:.4f}; pseudo labels {summary['pseudo_labels']}\n"
        f"  Next: histo-wsl train-classifier {summary['files']['pseudo-labels.csv']} "
        f"--negative-class {bags.negative_class} ...",
        soft_wrap=True,
        highlight=False,
    )


def load_mil(path: str | Path) -> tuple[nn.Module, dict]:
    """The DSMIL network and card of a ``mil.pt`` (loaded with ``weights_only``)."""
    ckpt = load_checkpoint(path)
    card = ckpt["card"]
    if card.get("method") != "mil":
        raise InputError("not a train-mil checkpoint (its card's method is not mil)", path)
    model = build_dsmil(int(card["feature_dim"]), int(card["att_dim"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), card
