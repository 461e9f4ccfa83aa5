"""Seed maps smoothed over look-alike pixels: a k-nearest-neighbour regression of the CAM.

The stage-1 CAM scores each pixel from its own features only, and on GlaS it misses whole glands
that look like the glands it finds. ``train-decoder --seed-map knn`` draws the seeds from a
smoothed map instead: each pixel of the augmented crop gets the mean CAM value of its ``k`` most
similar pixels of *other* training images, similarity being the cosine of the frozen encoder's
features. Tissue that looks alike then gets alike evidence, whichever image it is in.

The bank is built once, before the first step, from the training images at the evaluation
preset (resized, no augmentation):

- features: the encoder's last two stages at the CAM layer's resolution (a finer stage is
  average-pooled to it), each L2-normalised, projected on its first ``dims`` principal axes (fitted
  on the bank's pixels), normalised again and concatenated (scaled by 1/√2, so that keys have norm 1);
- values: the map the seeds would otherwise be drawn from: the CAM of the image's true class
  (per-image min-max normalised, as for the seeds), or a ``--seed-teacher``'s foreground
  probability (average-pooled to the CAM layer's resolution); every pixel of an image of the
  negative class has value 0 (it is background by definition);
- owners: each pixel's training-set index, so that a crop never draws on its own image.

At most ``max_pixels`` pixels are kept, the same number drawn from every image (seeded). The
bank is deterministic given the classifier, the data and the seed, so ``--resume`` rebuilds it.
It is not saved: the decoder checkpoint does not need it at inference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from histo_wsl.data.images import (
    GLASS_RGB,
    IMAGENET_MEAN,
    IMAGENET_STD,
    LabelledImages,
    eval_transform,
)
from histo_wsl.data.sources import Dataset
from histo_wsl.errors import InputError
from histo_wsl.methods.base import image_scale, slide_view, training_split
from histo_wsl.networks.cams import compute_cams
from histo_wsl.networks.knn import FeatureBank, KNNRefiner, _stage_pixels, embed_keys
from histo_wsl.networks.tta import flips_mean_map
from histo_wsl.training.config import TrainConfig

__all__ = [
    "REFINEMENTS",
    "TrainSplitBanks",
    "GLASS_SHARE",
    "MIN_GLASS",
    "build_feature_bank",
    "check_glass_share",
    "glass_colour",
    "glass_note",
    "glass_pixels",
    "glass_rows",
    "check_stages",
    "fit_projections",
    "keyed_as_slides",
    "refiner_keyed_as_slides",
    "refiner_with_alpha",
    "refiner_with_glass",
    "with_glass",
    "compact_refiner",
    "refine_card",
    "refine_checks",
    "refiner_from_card",
]


@torch.no_grad()
def build_feature_bank(
    classifier: nn.Module,
    images: torch.utils.data.Dataset,
    *,
    values: Callable[[Tensor, Tensor, list[Tensor]], Tensor] | None = None,
    negative: int | None = None,
    cam_method: str = "cam",
    max_pixels: int = 16384,
    keys: tuple[int, int] = (2, 64),
    seed: int = 0,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
) -> FeatureBank:
    """Bank of training pixels for :meth:`FeatureBank.smoothed_maps`.

    Args:
        classifier: the frozen stage-1 classifier (``backbone`` returning its stages, CAM head).
        images: the training images at the evaluation preset; items are dicts with ``image``,
            ``label`` and ``index`` (the owner recorded for every pixel).
        values: ``(images, labels, stages) -> (B,H,W)`` maps in [0,1] whose values the bank
            holds (average-pooled to the CAM layer's resolution); None: the CAM of the true class
            with ``cam_method``.
        negative: index of the negative class: its images' pixels get value 0 (None: no such
            class).
        cam_method: CAM method of the values (as for the seeds; without ``values``).
        max_pixels: most pixels kept; each image gives the same number, drawn at random.
        keys: ``(stages, dims)``: the encoder's last ``stages`` stages in the keys, ``dims``
            principal axes kept per stage (at most the stage's channels).
        seed: seed of the pixel draw.
        batch_size: images per forward pass.
        device: where the forward passes run and the bank lives.
    """
    n_images = len(images)
    if n_images < 2:
        raise ValueError("the k-NN seed map needs at least 2 training images")
    gen = torch.Generator().manual_seed(seed)
    classifier = classifier.to(device).eval()
    n_stages, dims = int(keys[0]), int(keys[1])
    pixels: list[list[Tensor]] = [[] for _ in range(n_stages)]
    kept, owners = [], []
    per_image = None
    for start in range(0, n_images, batch_size):
        items = [images[i] for i in range(start, min(start + batch_size, n_images))]
        x = torch.stack([it["image"] for it in items]).to(device)
        y = torch.as_tensor([int(it["label"]) for it in items], device=device)
        own = torch.as_tensor([int(it["index"]) for it in items])
        features = classifier.forward_features(x)
        h, w = features[-1].shape[-2:]
        if values is None:
            cams = compute_cams(
                classifier, x, y, method=cam_method, size=(h, w), features=features[-1]
            )
        else:
            cams = F.adaptive_avg_pool2d(values(x, y, features).detach().float()[:, None], (h, w))
            cams = cams[:, 0]
        if negative is not None:
            cams[y == negative] = 0.0
        if per_image is None:
            per_image = max(1, min(h * w, max_pixels // n_images))
        keep = torch.stack([torch.randperm(h * w, generator=gen)[:per_image] for _ in items])
        keep = keep.to(device)
        rows = (torch.arange(len(items), device=device)[:, None] * (h * w) + keep).reshape(-1)
        for j, p in enumerate(_stage_pixels(features, (h, w), n_stages)):
            pixels[j].append(p[rows])
        kept.append(cams.reshape(-1)[rows])
        owners.append(own.repeat_interleave(per_image).to(device))
    stage_rows = [torch.cat(p) for p in pixels]
    projections = fit_projections(stage_rows, dims)
    keys = embed_keys(stage_rows, projections)
    return FeatureBank(keys, torch.cat(kept), torch.cat(owners), projections)


def fit_projections(stage_rows: list[Tensor], dims: int) -> list[tuple[Tensor, Tensor]]:
    """Per stage: (mean (C,), first ``dims`` principal axes (C,q)) of its pixel rows (N,C)."""
    projections = []
    for p in stage_rows:
        mean = p.mean(0)
        q = max(1, min(int(dims), p.shape[1]))
        centred = (p - mean).double()
        # exact principal axes (eigenvectors of the C×C covariance): deterministic, and no
        # draw from the global random stream that the training run's seeds depend on
        _, vecs = torch.linalg.eigh(centred.T @ centred / max(1, p.shape[0] - 1))
        projections.append((mean, vecs[:, -q:].flip(1).to(p.dtype)))
    return projections


#: glass pixels a refiner's bank gets per bank pixel (:func:`glass_pixels`)
GLASS_SHARE = 1 / 16
#: least share of glass in a bank cell (at the keys' resolution) for :func:`with_glass` to count it
#: as glass: on the shipped NEGEV model a quarter left fewer ROI pixels on cmu-1's tissue rim
#: than a half (12.2 % against 14.0 %) at the same GlaS slide PxAP (77.8)
MIN_GLASS = 0.25


def glass_note(share: float = GLASS_SHARE) -> str:
    """What a card's ``refine: glass`` says for glass at ``share`` of the bank's image pixels."""
    part = f"1/{round(1 / share)}" if abs(1 / share - round(1 / share)) < 1e-9 else f"{share:g}"
    return f"glass beside tissue, valued 0, {part} of the bank (histo_wsl.methods.knn.with_glass)"


#: what a card's ``refine: glass`` says (the default share)
GLASS_NOTE = glass_note()


def glass_pixels(bank_pixels: int, share: float = GLASS_SHARE) -> int:
    """Glass pixels added to a refiner's bank of ``bank_pixels`` (``share`` of it, at least 1).

    On the shipped GlaS NEGEV model (4,087 pixels, Lanczos-resampled windows then) 300 to 2,000 of
    them gave 76.1-76.6 slide PxAP on the validation slide against 76.8 without, and 11.6-13.0 %
    of cmu-1's tissue rim ROI against 17.9 % (docs/results.md).
    """
    return max(1, round(bank_pixels * share))


def glass_rows(owners: Tensor, n_images: int) -> Tensor:
    """Which bank pixels are glass: their owners come past the ``n_images`` training images.

    :func:`with_glass` gives each image's glass an owner past every image's index, so the
    training images' own pixels are those owned by ``0 .. n_images - 1``.
    """
    return owners >= n_images


def check_glass_share(share: float) -> None:
    """Refuse a glass share outside (0, 1] (``--knn-glass-share``)."""
    if not 0.0 < share <= 1.0:
        raise InputError(f"--knn-glass-share must be in (0, 1], got {share}")


def glass_colour(
    mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> Tensor:
    """:data:`~histo_wsl.data.images.GLASS_RGB` normalised as the images are (3,)."""
    rgb = torch.tensor(GLASS_RGB, dtype=torch.float32) / 255.0
    return (rgb - torch.tensor(mean)) / torch.tensor(std)


@torch.no_grad()
def with_glass(
    features: Callable[[Tensor], list[Tensor]],
    images: torch.utils.data.Dataset,
    bank: FeatureBank,
    pixels: int,
    glass: Tensor,
    *,
    min_glass: float = MIN_GLASS,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> FeatureBank:
    """``bank`` and about ``pixels`` more: glass beside tissue, valued 0 (background).

    A slide's window at the tissue's edge sees glass, which training images (whole crops of
    tissue) never show; white glass then looks most like a gland's lumen and its k-NN value is
    the gland's, so a map called the glass beside tissue ROI and the tissue mask cut that band
    into one-pixel lines along the border (issue #25). Each image is shifted by up to half its
    side in x and y (seeded) with glass filling the rest, and its cells (at the keys'
    resolution) that are at least ``min_glass`` glass are drawn, the mixed ones (the edge)
    first, and added with value 0. Each image's glass gets a new owner index (past the bank's
    owners and every image's index), so no training image's pixels are excluded through them,
    compaction keeps them apart, and :func:`glass_rows` tells glass from tissue.

    Args:
        features: the encoder's stages of normalised images (B,3,H,W) -> list of (B,C,h,w).
        images: the bank's images (evaluation preset: dicts with a normalised ``image``).
        bank: the bank (its projection embeds the new keys).
        pixels: glass pixels to add, the same number from every image (at least 1 each).
        glass: the glass colour, normalised as the images (3,).
        min_glass: least share of glass in a cell to count it as glass.
        seed: seed of the shifts and the draw.
        device: where the forward passes run.
    """
    n = len(images)
    gen = torch.Generator().manual_seed(seed)
    per_image = max(1, int(pixels) // max(1, n))
    n_stages = len(bank.projections)
    rows: list[list[Tensor]] = [[] for _ in range(n_stages)]
    owners = []
    owner0 = max(n, int(bank.owners.max()) + 1) if len(bank) else n  # past every image
    for i in range(n):
        x = images[i]["image"]
        _, h, w = x.shape
        dx, dy = (int(torch.randint(-(s // 2), s // 2 + 1, (1,), generator=gen)) for s in (w, h))
        canvas = glass.view(3, 1, 1).to(x.dtype).expand(3, h, w).clone()
        is_glass = torch.ones(1, 1, h, w)
        ys, xs = slice(max(0, dy), min(h, h + dy)), slice(max(0, dx), min(w, w + dx))
        src_y, src_x = slice(ys.start - dy, ys.stop - dy), slice(xs.start - dx, xs.stop - dx)
        canvas[:, ys, xs] = x[:, src_y, src_x]
        is_glass[..., ys, xs] = 0.0
        stages = features(canvas[None].to(device))
        size = (stages[-1].shape[-2] * bank.grid, stages[-1].shape[-1] * bank.grid)
        share = F.adaptive_avg_pool2d(is_glass, size).reshape(-1)
        edge = ((share >= min_glass) & (share < 1.0)).nonzero()[:, 0]
        plain = (share >= 1.0).nonzero()[:, 0]
        order = torch.cat(
            [
                edge[torch.randperm(len(edge), generator=gen)],
                plain[torch.randperm(len(plain), generator=gen)],
            ]
        )
        pick = order[:per_image].to(device)
        if not len(pick):
            continue
        for j, p in enumerate(_stage_pixels(stages, size, n_stages)):
            rows[j].append(p[pick])
        owners.append(torch.full((len(pick),), owner0 + i, dtype=bank.owners.dtype))
    if not owners:
        return bank
    keys = bank.embed([torch.cat(r) for r in rows]).to(bank.keys.dtype)
    values = torch.zeros(len(keys), dtype=bank.values.dtype, device=bank.values.device)
    return FeatureBank(
        torch.cat([bank.keys, keys.to(bank.keys.device)]),
        torch.cat([bank.values, values]),
        torch.cat([bank.owners, torch.cat(owners).to(bank.owners.device)]),
        bank.projections,
        bank.grid,
    )


class TrainSplitBanks:
    """Builds k-NN banks of a training run's ``train`` split with the run's settings.

    The images (evaluation preset: resized to ``crop_size``, no augmentation) are decoded at the
    first build and kept, so a bank rebuilt at every evaluation reads no file again. Each bank has
    ``--knn-bank`` pixels, ``--knn-dims`` axes, the run's seed, and without ``values`` the CAM
    of ``--cam-method`` (over the class ``against``, when given); pixels of the negative class
    get value 0.
    """

    def __init__(
        self,
        ds: Dataset,
        cfg: TrainConfig,
        negative: int | None = None,
        against: int | None = None,
    ) -> None:
        self.ds, self.cfg, self.negative, self.against = ds, cfg, negative, against
        self._images: LabelledImages | None = None

    @property
    def images(self) -> LabelledImages:
        """The ``train`` split at the evaluation preset (decoded at the first use, then kept)."""
        if self._images is None:
            self._images = LabelledImages(
                self.ds.split("train"),
                self.cfg.data.crop_size,
                eval_transform(),
                scale=image_scale(self.ds, self.cfg),
            )
        return self._images

    def _contrast(self, model: nn.Module) -> Callable[[Tensor, Tensor, list[Tensor]], Tensor]:
        """Bank values: ``model``'s CAM of the true class over the class ``against``."""

        def values(x: Tensor, y: Tensor, stages: list[Tensor]) -> Tensor:
            return compute_cams(
                model,
                x,
                y,
                method=self.cfg.model.cam_method,
                size=tuple(stages[-1].shape[-2:]),
                features=stages[-1],
                against=self.against,
            )

        return values

    def build(
        self,
        model: nn.Module,
        values: Callable[[Tensor, Tensor, list[Tensor]], Tensor] | None = None,
        device: torch.device | str = "cpu",
        glass: bool = False,
    ) -> FeatureBank:
        """A bank over ``model``'s ``forward_features``; ``values`` as for :func:`build_feature_bank`.

        ``glass``: a refiner's bank, which with ``--glass`` also gets glass beside tissue valued
        0 (:func:`with_glass`, :func:`glass_pixels` of them).
        """
        scale = image_scale(self.ds, self.cfg)
        cfg = self.cfg
        if values is None and self.against is not None:
            values = self._contrast(model)
        bank = build_feature_bank(
            model,
            self.images,
            values=values,
            negative=self.negative,
            cam_method=cfg.model.cam_method,
            max_pixels=cfg.knn.knn_bank,
            keys=(check_stages(cfg.knn.knn_stages, model), cfg.knn.knn_dims),
            seed=cfg.run.seed,
            batch_size=1 if scale is not None else 16,  # images of their own sizes
            device=device,
        )
        if not (glass and cfg.data.glass):
            return bank
        model.eval()
        return with_glass(
            model.forward_features,
            self.images,
            bank,
            glass_pixels(len(bank)),
            glass_colour(),
            seed=cfg.run.seed,
            device=device,
        )


#: refinements of the saved model's map (``--refine``)
REFINEMENTS = ("none", "knn")


def refine_checks(cfg: TrainConfig, n_train: int, bank: bool) -> list[tuple[bool, str]]:
    """(ok, message) pairs for ``--refine`` and, when a k-NN bank is used, the ``--knn-*`` options.

    Args:
        cfg: the training settings.
        n_train: training images (a bank needs 2: a pixel's neighbours come from other images).
        bank: whether the run builds a k-NN bank (``--refine knn`` or ``--seed-map knn``).
    """
    checks = [
        (
            cfg.knn.refine in REFINEMENTS,
            f"--refine must be one of {REFINEMENTS} (got {cfg.knn.refine!r})",
        ),
        (
            0.0 <= cfg.knn.refine_alpha <= 1.0,
            f"--refine-alpha must be in [0, 1] (got {cfg.knn.refine_alpha})",
        ),
    ]
    if bank:
        checks += [
            (cfg.knn.knn_k >= 1, f"--knn-k must be >= 1 (got {cfg.knn.knn_k})"),
            (cfg.knn.knn_bank >= 1, f"--knn-bank must be >= 1 (got {cfg.knn.knn_bank})"),
            (cfg.knn.knn_dims >= 1, f"--knn-dims must be >= 1 (got {cfg.knn.knn_dims})"),
            (cfg.knn.knn_stages >= 1, f"--knn-stages must be >= 1 (got {cfg.knn.knn_stages})"),
            (n_train >= 2, "--seed-map knn and --refine knn need at least 2 training images"),
        ]
    return checks


def check_stages(stages: int, encoder: nn.Module, path: str | Path | None = None) -> int:
    """``--knn-stages``, refused in one line when ``encoder`` (its ``backbone``) has fewer stages."""
    backbone = getattr(encoder, "backbone", encoder)
    available = len(getattr(backbone, "stage_channels", ())) or stages
    if not 1 <= stages <= available:
        raise InputError(
            f"--knn-stages {stages}: the encoder has {available} stages; give --knn-stages 1 "
            f"to {available}",
            path or None,
        )
    return stages


def refine_card(cfg: TrainConfig, bank_pixels: int | None, values: str) -> dict:
    """The model card's ``refine`` entry (``{"method": "none"}`` unless ``--refine knn``).

    Args:
        cfg: the training settings (k, alpha, stages, bank size and seed).
        bank_pixels: pixels in the refiner's bank (None: not built yet).
        values: what the bank's values are, in words.
    """
    if cfg.knn.refine != "knn":
        return {"method": "none"}
    return {
        "method": "knn",
        "k": cfg.knn.knn_k,
        "alpha": cfg.knn.refine_alpha,
        "stages": cfg.knn.knn_stages,
        "bank_pixels": bank_pixels,
        "dims": cfg.knn.knn_dims,
        "bank_seed": cfg.run.seed,
        "values": values,
        **({"glass": GLASS_NOTE} if cfg.data.glass else {}),
    }


def refiner_from_card(card: dict, path: str | Path) -> KNNRefiner | None:
    """The empty k-NN refiner a card asks for (``refine``), filled by the weights."""
    refine = card.get("refine") or {}
    method = refine.get("method", "none")
    if method == "none":
        return None
    if method != "knn":
        raise InputError(f"unknown refinement {method!r} in the model card", path)
    try:
        return KNNRefiner(
            int(refine["k"]),
            float(refine["alpha"]),
            int(refine.get("stages", 2)),
            grid=int(refine.get("grid", 1)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"the model card's k-NN refinement is malformed ({exc})", path) from None


def _bank_prefix(state_dict: dict, path: str | Path) -> str:
    """The state-dict prefix of the k-NN refiner's bank buffers (``...refiner.``)."""
    prefix = next((key[: -len("keys")] for key in state_dict if key.endswith("refiner.keys")), None)
    if prefix is None:
        raise InputError("the checkpoint's k-NN refiner holds no bank", path or None)
    return prefix


def _knn_refine(card: dict, path: str | Path, doing: str, option: str) -> dict:
    """A copy of the card's ``refine`` entry, which must be a k-NN refinement for ``option``."""
    refine = dict(card.get("refine") or {})
    if refine.get("method") != "knn":
        raise InputError(
            f"the model has no k-NN refinement (refine: knn), so it has no bank to {doing}; "
            f"drop {option}",
            path or None,
        )
    return refine


def refiner_with_alpha(card: dict, alpha: float, path: str | Path = "") -> dict:
    """A checkpoint's k-NN refinement with another weight ``alpha`` of the k-NN map.

    The refined map is ``(1 − alpha)·own map + alpha·k-NN map``
    (:class:`~histo_wsl.networks.knn.KNNRefiner`); training records ``--refine-alpha``, and this
    changes it on a trained model (the bank is untouched). 1 is the k-NN map alone.

    Args:
        card: the checkpoint's card (``refine`` must be ``knn``).
        alpha: the new weight, in [0, 1].
        path: the checkpoint, named in errors.

    Returns:
        A copy of the card, its ``refine.alpha`` set.

    Raises:
        InputError: a card without k-NN refinement, or ``alpha`` outside [0, 1].
    """
    refine = _knn_refine(card, path, "weigh", "--knn-alpha")
    if not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
        raise InputError(f"--knn-alpha must be between 0 and 1, got {alpha}")
    refine["alpha"] = float(alpha)
    return dict(card, refine=refine)


def compact_refiner(
    card: dict, state_dict: dict, pixels: int, k: int | None = None, path: str | Path = ""
) -> tuple[dict, dict]:
    """A checkpoint's k-NN refinement with a smaller bank: fewer similarities and a cheaper top-k.

    Every training image keeps the same number of its bank pixels, ``pixels // images`` (at
    least 1): the first ones of the seeded random draw that built the bank, so the result is a
    random subset of each image's pixels, the same at every call. Glass pixels (a card whose
    ``refine`` has ``glass``: owners past the training images, :func:`with_glass`) are kept
    whole, beside them. The keys keep their projection.
    ``k`` (default: the card's ``k`` scaled by the bank's shrinkage, at least 1) is the number of
    neighbours of the smaller bank. The cost of the lookup is proportional to the bank's size
    (one matrix product over it, one top-k per pixel); on GlaS a quarter of the shipped bank with
    a quarter of its ``k`` scores as the whole (docs/results.md, *Localize speed*).

    Args:
        card: the checkpoint's card (``refine`` must be ``knn``).
        state_dict: its weights (``...refiner.keys``, ``values``, ``owners``).
        pixels: the most bank pixels to keep.
        k: neighbours per pixel of the smaller bank.
        path: the checkpoint, named in errors.

    Returns:
        (the new card, whose ``refine`` records ``bank_pixels``, ``k`` and what it was compacted
        from; the new state dict). Both are copies.

    Raises:
        InputError: a card without k-NN refinement, ``pixels`` or ``k`` below 1, or a bank
            smaller than asked.
    """
    refine = _knn_refine(card, path, "compact", "--knn-bank")
    prefix = _bank_prefix(state_dict, path)
    keys, values, owners = (state_dict[prefix + n] for n in ("keys", "values", "owners"))
    glass = (
        glass_rows(owners, _train_images(card))
        if refine.get("glass")
        else torch.zeros_like(owners, dtype=torch.bool)
    )
    images = owners[~glass].unique()
    per_image = max(1, int(pixels) // len(images)) if pixels >= 1 else 0
    if per_image < 1:
        raise InputError(f"--knn-bank must be at least 1, got {pixels}")
    if pixels > int((~glass).sum()):
        raise InputError(
            f"--knn-bank {pixels}: the bank holds only {int((~glass).sum())} pixels of training "
            "images; give a smaller number"
        )
    kept = [(owners == o).nonzero()[:per_image, 0] for o in images]
    keep = torch.cat([*kept, glass.nonzero()[:, 0]]).sort().values
    old_k = int(refine["k"])
    new_k = int(k) if k is not None else max(1, round(old_k * len(keep) / len(owners)))
    if new_k < 1:
        raise InputError(f"--knn-k must be at least 1, got {k}")
    state = dict(state_dict)
    state[prefix + "keys"] = keys[keep].clone()
    state[prefix + "values"] = values[keep].clone()
    state[prefix + "owners"] = owners[keep].clone()
    refine["compacted_from"] = {"bank_pixels": int(len(owners)), "k": old_k}
    refine.update(bank_pixels=int(len(keep)), k=new_k)
    return dict(card, refine=refine), state


def _state_with_bank(state_dict: dict, prefix: str, bank: FeatureBank) -> dict:
    """A copy of ``state_dict`` whose refiner buffers (under ``prefix``) hold ``bank``.

    The projections' buffers are written too, and any of a stage the bank no longer has dropped.
    """
    stale = (prefix + "mean", prefix + "axes")
    state = {
        key: value
        for key, value in state_dict.items()
        if not (key.startswith(stale) and key[len(prefix) + 4 :].isdigit())
    }
    for name in ("keys", "values", "owners"):
        state[prefix + name] = getattr(bank, name).detach().clone()
    for i, (mean, axes) in enumerate(bank.projections):
        state[f"{prefix}mean{i}"] = mean.detach().clone()
        state[f"{prefix}axes{i}"] = axes.detach().clone()
    return state


def _encoder(model: nn.Module) -> nn.Module:
    """The module whose ``forward_features`` gives the refiner's keys (NEGEV: its stage 1)."""
    return model.classifier if hasattr(model, "classifier") else model


def refiner_with_glass(
    card: dict,
    state_dict: dict,
    data: str | Path,
    path: str | Path = "",
    share: float = GLASS_SHARE,
) -> tuple[dict, dict]:
    """A checkpoint's k-NN bank with glass beside tissue (``models export --knn-glass``).

    Its training split is read again from ``data`` (the card's fold, split fraction and seed),
    its images at the evaluation preset are placed on glass and :func:`glass_pixels` (``share``)
    of their glass cells join the bank's image pixels valued 0 (:func:`with_glass`), keyed by
    the model's own encoder and projection. Glass the bank held already (a model trained with
    ``--glass``, or exported with glass before) is drawn again instead of added to.

    Raises:
        InputError: a card without k-NN refinement or training settings, unreadable data, or a
            share outside (0, 1].
    """
    from histo_wsl.methods import model_from_checkpoint

    refine = _knn_refine(card, path, "add glass to", "--knn-glass")
    check_glass_share(share)
    prefix = _bank_prefix(state_dict, path)
    cfg, ds = training_split(card, data, path)
    images = TrainSplitBanks(ds, cfg).images
    model = model_from_checkpoint(card, state_dict, path).eval()
    bank = model.refiner.bank
    tissue = ~glass_rows(bank.owners, len(images))
    bank = FeatureBank(
        bank.keys[tissue], bank.values[tissue], bank.owners[tissue], bank.projections, bank.grid
    )
    norm = card.get("normalization") or {}
    bank = with_glass(
        _encoder(model).forward_features,
        images,
        bank,
        glass_pixels(len(bank), share),
        glass_colour(norm.get("mean") or IMAGENET_MEAN, norm.get("std") or IMAGENET_STD),
        seed=cfg.run.seed,
    )
    state = _state_with_bank(state_dict, prefix, bank)
    refine.update(bank_pixels=len(bank), glass=glass_note(share))
    return {**card, "refine": refine}, state


@torch.no_grad()
def keyed_as_slides(
    features: Callable[[Tensor], list[Tensor]],
    model_map: Callable[[Tensor], Tensor],
    images: torch.utils.data.Dataset,
    slide_images: torch.utils.data.Dataset,
    bank: FeatureBank,
    *,
    negative: int | None = None,
    refit: tuple[int, int] | None = None,
    grid: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> FeatureBank:
    """``bank`` with its training images' pixels keyed as a slide shows them, valued by the model.

    A bank built at the evaluation preset keys each training image squashed to the network's
    input (GlaS: 775×522 px to 224², 2.1 µm/px across and 1.4 down), while ``localize`` reads a
    slide's windows at the card's µm/px with the tissue's own aspect (GlaS: 1.57 µm/px both
    ways), so a window's pixels are looked up among keys of another geometry. Here each image
    keeps its number of bank pixels, drawn afresh (seeded) from the same image as a slide
    shows it (``slide_images[i]``), and valued by the model's own map of the image at the
    evaluation preset (``model_map``, area-resampled to the keys' grid): the map the model is
    validated on, now reachable from the features a slide gives. Pixels of the negative class
    keep value 0; pixels of no training image (glass) are kept as they are.

    Args:
        features: the encoder's stages of normalised images (B,3,H,W) -> list of (B,C,h,w).
        model_map: normalised images (1,3,H,W) -> the model's map (1,H,W) in [0,1].
        images: the bank's images at the evaluation preset (dicts with ``image``, ``label``).
        slide_images: the same images, in the same order, at the slide's geometry.
        bank: the bank (its owners < ``len(images)`` are the images'; its projection embeds
            the new keys).
        negative: index of the negative class (its pixels are valued 0), if any.
        refit: ``(stages, dims)``: keys from the encoder's last ``stages`` stages, on
            projections of ``dims`` axes per stage fitted on the new pixels; the bank's glass,
            keyed by the old projections, is dropped (:func:`with_glass` draws it again).
            None: the bank's stages and projections, its glass kept.
        grid: the new keys' grid in steps finer than the CAM layer's (:attr:`FeatureBank.grid`;
            None: the bank's); another than the bank's needs ``refit``.
        seed: seed of the draw.
        device: where the forward passes run.
    """
    n = len(images)
    if len(slide_images) != n:
        raise ValueError("slide_images must hold the same images as images")
    grid = bank.grid if grid is None else int(grid)
    if grid != bank.grid and refit is None:
        raise ValueError("keys on another grid need refit (the glass is keyed on the old one)")
    gen = torch.Generator().manual_seed(seed)
    n_stages = len(bank.projections) if refit is None else int(refit[0])
    rows: list[list[Tensor]] = [[] for _ in range(n_stages)]
    values, owners = [], []
    for i in range(n):
        count = int((bank.owners == i).sum())
        if not count:
            continue
        item = images[i]
        fg = model_map(item["image"][None].to(device)).float()
        if negative is not None and int(item["label"]) == negative:
            fg = torch.zeros_like(fg)
        stages = features(slide_images[i]["image"][None].to(device))
        h, w = (grid * d for d in stages[-1].shape[-2:])
        value = F.adaptive_avg_pool2d(fg[:, None], (h, w)).reshape(-1)
        pick = torch.randperm(h * w, generator=gen)[:count].to(value.device)
        for j, p in enumerate(_stage_pixels(stages, (h, w), n_stages)):
            rows[j].append(p[pick])
        values.append(value[pick])
        owners.append(torch.full((len(pick),), i, dtype=bank.owners.dtype))
    if not owners:
        return bank
    stage_rows = [torch.cat(r) for r in rows]
    if refit is None:
        projections, other = bank.projections, glass_rows(bank.owners, n)
    else:
        fitted = fit_projections(stage_rows, int(refit[1]))
        projections = [(m.to(bank.keys.device), v.to(bank.keys.device)) for m, v in fitted]
        other = None  # the glass's keys are of the old projections
    new = FeatureBank(
        embed_keys(stage_rows, projections).to(bank.keys.dtype).to(bank.keys.device),
        torch.cat(values).to(bank.values),
        torch.cat(owners).to(bank.owners.device),
        projections,
        grid,
    )
    if other is None:
        return new
    return FeatureBank(
        torch.cat([new.keys, bank.keys[other]]),
        torch.cat([new.values, bank.values[other]]),
        torch.cat([new.owners, bank.owners[other]]),
        projections,
        grid,
    )


#: what a card's ``refine: keys`` / ``values`` say after :func:`refiner_keyed_as_slides`
SLIDE_KEYS_NOTE = (
    "the train split read at {mpp:g} µm/px with its aspect kept, as localize reads a slide "
    "(histo_wsl.methods.knn.keyed_as_slides)"
)
SLIDE_VALUES_NOTE = (
    "the model's own map of each train image (eval preset, the mean of its four flips), "
    "resampled to its keys"
)


def refiner_keyed_as_slides(
    card: dict,
    state_dict: dict,
    data: str | Path,
    path: str | Path = "",
    stages: int | None = None,
    dims: int | None = None,
    grid: int | None = None,
) -> tuple[dict, dict]:
    """A checkpoint's k-NN bank re-keyed at the slide geometry (``models export --knn-slide-keys``).

    The training split is read again from ``data`` (the card's fold, split fraction and seed),
    at the evaluation preset for the values and at the card's µm/px with each image's aspect
    kept (``data_mpp / mpp``, the resolution ``localize`` reads slides at) for the keys:
    :func:`keyed_as_slides`. The values are the model's map averaged over the four flips of each
    image (what ``--tta flips`` gives, computed once here rather than at every window). The bank
    keeps its size (the lookup its cost) and its glass.

    ``stages`` / ``dims``: the keys from the encoder's last ``stages`` stages, on ``dims``
    principal axes per stage, instead of the card's (the shallow stages add the tissue's fine
    texture to the deep ones' context); with either, the projections are fitted again on the
    new pixels and the bank's glass is dropped (``--knn-glass`` draws it again). ``grid``: the
    keys (and the queries of every lookup) on a grid that many times finer than the CAM
    layer's, the coarser stages upsampled (projected again, as ``stages``).

    Raises:
        InputError: a card without k-NN refinement, training settings or µm/px, unreadable
            data, or more stages than the encoder has.
    """
    from histo_wsl.methods import model_from_checkpoint

    refine = _knn_refine(card, path, "re-key", "--knn-slide-keys")
    prefix = _bank_prefix(state_dict, path)
    mpp, data_mpp = card.get("mpp"), card.get("data_mpp")
    if not mpp or not data_mpp:
        raise InputError(
            "the model card records no µm/px (mpp and data_mpp), so the slide geometry is "
            "unknown; drop --knn-slide-keys",
            path or None,
        )
    cfg, ds = training_split(card, data, path)
    banks = TrainSplitBanks(ds, cfg, negative=ds.negative_class)
    slide_images, _ = slide_view(ds.split("train"), cfg.data.crop_size, data_mpp, mpp)
    model = model_from_checkpoint(card, state_dict, path).eval()
    encoder = _encoder(model)
    refit = None
    if stages is not None or dims is not None or grid is not None:
        refit = (int(stages or refine.get("stages", 2)), int(dims or refine.get("dims") or 64))
        check_stages(refit[0], encoder, path)
    bank = keyed_as_slides(
        encoder.forward_features,
        lambda x: flips_mean_map(lambda v: model.localize(v)[1], x),
        banks.images,
        slide_images,
        model.refiner.bank,
        negative=banks.negative,
        refit=refit,
        grid=grid,
        seed=cfg.run.seed,
    )
    state = _state_with_bank(state_dict, prefix, bank)
    if refit is not None:
        refine.update(stages=refit[0], dims=refit[1])
    if bank.grid != 1:
        refine["grid"] = bank.grid
    else:
        refine.pop("grid", None)
    refine.update(
        bank_pixels=len(bank),
        keys=SLIDE_KEYS_NOTE.format(mpp=float(mpp)),
        values=SLIDE_VALUES_NOTE,
    )
    if not glass_rows(bank.owners, len(banks.images)).any():
        refine.pop("glass", None)
    return {**card, "refine": refine}, state


def _train_images(card: dict) -> int:
    """Training images of the card's ``training_data`` (the bank's image owners are below it)."""
    train = (card.get("training_data") or {}).get("train") or {}
    n = sum(int(v) for v in train.values()) if isinstance(train, dict) else 0
    if n < 1:
        raise InputError(
            "the model card records no training images (training_data.train), so its bank's "
            "glass cannot be told from tissue; compact the bank before adding glass"
        )
    return n
