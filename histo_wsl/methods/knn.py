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

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from histo_wsl.data.images import LabelledImages, eval_transform
from histo_wsl.data.sources import Dataset
from histo_wsl.errors import InputError
from histo_wsl.methods.base import image_scale
from histo_wsl.networks.cams import compute_cams
from histo_wsl.networks.knn import FeatureBank, KNNRefiner, _stage_pixels
from histo_wsl.training.config import TrainConfig

__all__ = [
    "REFINEMENTS",
    "TrainSplitBanks",
    "build_feature_bank",
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
    dims: int = 64,
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
        dims: principal axes kept per stage (at most the stage's channels).
        seed: seed of the pixel draw.
        batch_size: images per forward pass.
        device: where the forward passes run and the bank lives.
    """
    n_images = len(images)
    if n_images < 2:
        raise ValueError("the k-NN seed map needs at least 2 training images")
    gen = torch.Generator().manual_seed(seed)
    classifier = classifier.to(device).eval()
    pixels: list[list[Tensor]] = [[], []]
    kept, owners = [], []
    per_image = None
    for start in range(0, n_images, batch_size):
        items = [images[i] for i in range(start, min(start + batch_size, n_images))]
        x = torch.stack([it["image"] for it in items]).to(device)
        y = torch.as_tensor([int(it["label"]) for it in items], device=device)
        own = torch.as_tensor([int(it["index"]) for it in items])
        stages = classifier.forward_features(x)
        h, w = stages[-1].shape[-2:]
        if values is None:
            cams = compute_cams(
                classifier, x, y, method=cam_method, size=(h, w), features=stages[-1]
            )
        else:
            cams = F.adaptive_avg_pool2d(values(x, y, stages).detach().float()[:, None], (h, w))
            cams = cams[:, 0]
        if negative is not None:
            cams[y == negative] = 0.0
        if per_image is None:
            per_image = max(1, min(h * w, max_pixels // n_images))
        keep = torch.stack([torch.randperm(h * w, generator=gen)[:per_image] for _ in items])
        keep = keep.to(device)
        rows = (torch.arange(len(items), device=device)[:, None] * (h * w) + keep).reshape(-1)
        for j, p in enumerate(_stage_pixels(stages, (h, w))):
            pixels[j].append(p[rows])
        kept.append(cams.reshape(-1)[rows])
        owners.append(own.repeat_interleave(per_image).to(device))
    stage_rows = [torch.cat(p) for p in pixels]
    projections = []
    for p in stage_rows:
        mean = p.mean(0)
        q = max(1, min(int(dims), p.shape[1]))
        centred = (p - mean).double()
        # exact principal axes (eigenvectors of the C×C covariance): deterministic, and no
        # draw from the global random stream that the training run's seeds depend on
        _, vecs = torch.linalg.eigh(centred.T @ centred / max(1, p.shape[0] - 1))
        projections.append((mean, vecs[:, -q:].flip(1).to(p.dtype)))
    bank = FeatureBank(torch.empty(0), torch.cat(kept), torch.cat(owners), projections)
    bank.keys = bank.embed(stage_rows)
    return bank


class TrainSplitBanks:
    """Builds k-NN banks of a training run's ``train`` split with the run's settings.

    The images (evaluation preset: resized to ``crop_size``, no augmentation) are decoded at the
    first build and kept, so a bank rebuilt at every evaluation reads no file again. Each bank has
    ``--knn-bank`` pixels, ``--knn-dims`` axes, the run's seed, and without ``values`` the CAM
    of ``--cam-method``; pixels of the negative class get value 0.
    """

    def __init__(self, ds: Dataset, cfg: TrainConfig, negative: int | None = None) -> None:
        self.ds, self.cfg, self.negative = ds, cfg, negative
        self._images: LabelledImages | None = None

    def build(
        self,
        model: nn.Module,
        values: Callable[[Tensor, Tensor, list[Tensor]], Tensor] | None = None,
        device: torch.device | str = "cpu",
    ) -> FeatureBank:
        """A bank over ``model``'s ``forward_features``; ``values`` as for :func:`build_feature_bank`."""
        scale = image_scale(self.ds, self.cfg)
        if self._images is None:
            self._images = LabelledImages(
                self.ds.split("train"), self.cfg.data.crop_size, eval_transform(), scale=scale
            )
        cfg = self.cfg
        return build_feature_bank(
            model,
            self._images,
            values=values,
            negative=self.negative,
            cam_method=cfg.model.cam_method,
            max_pixels=cfg.knn.knn_bank,
            dims=cfg.knn.knn_dims,
            seed=cfg.run.seed,
            batch_size=1 if scale is not None else 16,  # images of their own sizes
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
            (n_train >= 2, "--seed-map knn and --refine knn need at least 2 training images"),
        ]
    return checks


def refine_card(cfg: TrainConfig, bank_pixels: int | None, values: str, stages: int = 2) -> dict:
    """The model card's ``refine`` entry (``{"method": "none"}`` unless ``--refine knn``).

    Args:
        cfg: the training settings (k, alpha, bank size and seed).
        bank_pixels: pixels in the refiner's bank (None: not built yet).
        values: what the bank's values are, in words.
        stages: encoder stages in the keys (the refiner's ``n_stages``).
    """
    if cfg.knn.refine != "knn":
        return {"method": "none"}
    return {
        "method": "knn",
        "k": cfg.knn.knn_k,
        "alpha": cfg.knn.refine_alpha,
        "stages": stages,
        "bank_pixels": bank_pixels,
        "dims": cfg.knn.knn_dims,
        "bank_seed": cfg.run.seed,
        "values": values,
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
        return KNNRefiner(int(refine["k"]), float(refine["alpha"]), int(refine.get("stages", 2)))
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"the model card's k-NN refinement is malformed ({exc})", path) from None


def compact_refiner(
    card: dict, state_dict: dict, pixels: int, k: int | None = None, path: str | Path = ""
) -> tuple[dict, dict]:
    """A checkpoint's k-NN refinement with a smaller bank: fewer similarities and a cheaper top-k.

    Every training image keeps the same number of its bank pixels, ``pixels // images`` (at
    least 1): the first ones of the seeded random draw that built the bank, so the result is a
    random subset of each image's pixels, the same at every call. The keys keep their projection.
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
    refine = dict(card.get("refine") or {})
    if refine.get("method") != "knn":
        raise InputError(
            "the model has no k-NN refinement (refine: knn), so it has no bank to compact; "
            "drop --knn-bank",
            path or None,
        )
    prefix = next((key[: -len("keys")] for key in state_dict if key.endswith("refiner.keys")), None)
    if prefix is None:
        raise InputError("the checkpoint's k-NN refiner holds no bank", path or None)
    keys, values, owners = (state_dict[prefix + n] for n in ("keys", "values", "owners"))
    images = owners.unique()
    per_image = max(1, int(pixels) // len(images)) if pixels >= 1 else 0
    if per_image < 1:
        raise InputError(f"--knn-bank must be at least 1, got {pixels}")
    if pixels > len(owners):
        raise InputError(
            f"--knn-bank {pixels}: the bank holds only {len(owners)} pixels; give a smaller number"
        )
    keep = torch.cat([(owners == o).nonzero()[:per_image, 0] for o in images]).sort().values
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
