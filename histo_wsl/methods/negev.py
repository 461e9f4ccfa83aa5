"""Stage 2 of NEGEV (MIDL 2022): a U-Net decoder trained from the frozen classifier's evidence.

:class:`DecoderTask` is the recipe the engine runs for ``histo-wsl train-decoder``: the stage-1
classifier (encoder and head) is copied from its checkpoint and frozen; at every step its CAM of the
ground-truth class on the augmented crop gives pixel seeds
(:class:`histo_wsl.methods.negev_losses.SeedSampler`;
drawn at random, or the top/bottom CAM pixels with ``seed_mode: static``), and images of the
negative class push every pixel to background. With a negative class the CAM is taken over it
(``seed_contrast``, the default: the true class's map minus the negative class's). With
``seed_teacher`` (a previous train-decoder checkpoint) the seeds come from that decoder's
foreground map instead of the CAM: a second round.
With ``seed_map: knn`` they come from that map (CAM or teacher) averaged over each pixel's most
similar pixels of the other training images (:mod:`histo_wsl.methods.knn`; built at the first step).
With ``refine: knn`` the saved model's map is blended with the k-NN map of the decoder's own map
over training pixels (:mod:`histo_wsl.networks.knn`; rebuilt at every evaluation).
An optional size term (``size_lambda`` > 0, :func:`histo_wsl.methods.negev_losses.size_loss`) keeps
both regions
of the decoder's map non-empty on the other images; its log-barrier t follows t0·mult^(epoch−1) up
to t_max and is part of the task state, so ``--resume`` continues it. An optional colour-affinity
term (``crf_lambda`` > 0, :func:`histo_wsl.methods.negev_losses.crf_loss`) asks neighbours of
similar colour to
get the same label.
Selection: PxAP on ``valpx``, or the last epoch of the fixed schedule when no validation image has
a mask (a mask-free criterion: the frozen classifier's accuracy cannot change); the checkpoint
holds the classifier too, so it is all ``localize`` and ``evaluate`` need.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from histo_wsl import __version__
from histo_wsl.data.images import GLASS_LABEL, IMAGENET_MEAN, IMAGENET_STD
from histo_wsl.data.sources import Dataset
from histo_wsl.errors import InputError
from histo_wsl.methods import load_trained
from histo_wsl.methods.base import (
    Method,
    evaluate_localizer,
    image_scale,
    load_training_data,
    refined_words,
    training_images,
)
from histo_wsl.methods.knn import (
    REFINEMENTS,
    TrainSplitBanks,
    check_stages,
    refine_card,
    refine_checks,
    refiner_from_card,
)
from histo_wsl.methods.negev_losses import (
    SeedSampler,
    SeedSettingError,
    crf_loss,
    crf_window,
    negative_loss,
    pixel_negative_loss,
    seed_loss,
    size_loss,
    size_t_at,
)
from histo_wsl.networks.backbones import X10
from histo_wsl.networks.cams import compute_cams
from histo_wsl.networks.classifier import build_classifier, unwrap
from histo_wsl.networks.knn import FeatureBank, KNNRefiner
from histo_wsl.networks.negev import NEGEVModel
from histo_wsl.training.config import NEGEVSettings, TrainConfig
from histo_wsl.training.engine import LAST_EPOCH, VALPX_PXAP, Selection

__all__ = [
    "METHOD",
    "DecoderTask",
    "REFINEMENTS",
    "SEED_MAPS",
    "STAGE2_DEFAULTS",
    "negev_from_card",
    "train_decoder",
]

#: what the seeds are drawn from (besides ``--seed-teacher``)
SEED_MAPS = ("cam", "knn")


#: stage-2 defaults that differ from stage 1 (method.md §1.4: lr 0.1 for the decoder)
STAGE2_DEFAULTS = {"lr": 0.1, "method": "negev", "out": "runs/negev"}


#: the option of each seed-sampler setting (for errors that name what the user typed)
_SEED_OPTIONS = {
    "fg_sampler": "--fg-sampler",
    "fg_erode": "--fg-erode",
    "bg_sampler": "--bg-sampler",
    "mode": "--seed-mode",
    "ksize": "--seed-ksize",
}


def _seed_sampler(n: NEGEVSettings) -> SeedSampler:
    """The run's seed sampler; a setting out of range is an InputError naming its option."""
    try:
        return SeedSampler(
            n_fg=n.seeds_fg,
            n_bg=n.seeds_bg,
            ksize=n.seed_ksize,
            bg_sampler=n.bg_sampler,
            low_fraction=n.low_fraction,
            mode=n.seed_mode,
            fg_sampler=n.fg_sampler,
            fg_erode=n.fg_erode,
        )
    except SeedSettingError as exc:
        raise InputError(f"{_SEED_OPTIONS[exc.field]} {exc.rule}") from None


class DecoderTask:
    """NEGEV decoder training for the engine."""

    selection = [Selection("best-loc.pt", (VALPX_PXAP, LAST_EPOCH))]

    def __init__(self, cfg: TrainConfig, ds: Dataset, stage1) -> None:
        self.cfg, self.ds, self.stage1 = cfg, ds, stage1
        card = stage1.card
        if card.get("method") != "cam":
            raise InputError(
                f"--classifier must be a stage-1 checkpoint (train-classifier); this one is "
                f"{card.get('method')!r}",
                stage1.path,
            )
        if list(card["class_names"]) != list(ds.class_names):
            raise InputError(
                f"the classifier was trained on classes {card['class_names']} but the data has "
                f"{ds.class_names}; use the same classes (or --class in the same order)",
                stage1.path,
            )
        geometry = card.get("geometry", "squash")
        if geometry != cfg.data.geometry:
            raise InputError(
                f"the classifier was trained with --geometry {geometry}: train the decoder with "
                f"--geometry {geometry} too (the encoder learnt tissue at that geometry)",
                stage1.path,
            )
        n = cfg.negev
        self.seed_sampler = _seed_sampler(n)
        if n.seeds_fg < 1 or n.seeds_bg < 0:
            raise InputError(
                f"--seeds-fg must be >= 1 and --seeds-bg >= 0, got {n.seeds_fg}, {n.seeds_bg}"
            )
        checks = [
            (
                n.size_lambda >= 0,
                f"--size-lambda must be >= 0 (got {n.size_lambda})",
            ),
            (n.size_t0 > 0, f"--size-t0 must be > 0 (got {n.size_t0})"),
            (
                n.size_t_max >= n.size_t0,
                f"--size-t-max must be >= --size-t0 (got {n.size_t_max})",
            ),
            (
                n.size_t_mult >= 1,
                f"--size-t-mult must be >= 1 (got {n.size_t_mult})",
            ),
            (n.crf_lambda >= 0, f"--crf-lambda must be >= 0 (got {n.crf_lambda})"),
            (
                n.crf_sigma_rgb > 0,
                f"--crf-sigma-rgb must be > 0 (got {n.crf_sigma_rgb})",
            ),
            (
                n.crf_sigma_xy > 0,
                f"--crf-sigma-xy must be > 0 (got {n.crf_sigma_xy})",
            ),
            (
                0 < n.crf_scale <= 1,
                f"--crf-scale must be in (0, 1] (got {n.crf_scale})",
            ),
        ]
        if n.seed_map not in SEED_MAPS:
            raise InputError(f"--seed-map must be one of {SEED_MAPS}, got {n.seed_map!r}")
        bank = n.seed_map == "knn" or cfg.knn.refine == "knn"
        checks += refine_checks(cfg, len(ds.split("train")) if bank else 0, bank)
        for ok, message in checks:
            if not ok:
                raise InputError(message)
        self.negative = ds.negative_class
        #: the class the seeds' CAM is taken over (``seed_contrast`` with a negative class)
        self.against = self.negative if cfg.negev.seed_contrast else None
        #: the k-NN seed map's bank of training pixels (``seed_map: knn``; built at the first step)
        self.bank: FeatureBank | None = None
        #: pixels in the refiner's bank (``refine: knn``; set at the first evaluation)
        self.refine_pixels: int | None = None
        #: builds the k-NN banks (seed map, refiner) of the train split
        self._banks = TrainSplitBanks(ds, cfg, self.negative, self.against)
        #: optional NEGEV model whose foreground map replaces the CAM as the seeds' source
        self.teacher = (
            self._load_teacher(cfg.negev.seed_teacher) if cfg.negev.seed_teacher else None
        )
        #: the teacher was trained over this very classifier: it decodes the student's stages
        self._teacher_shares_encoder = self.teacher is not None and _same_weights(
            self.stage1.model, self.teacher.model.classifier
        )
        #: log-barrier t of the size term for the coming epoch (task state: --resume keeps it)
        self.size_t = size_t_at(cfg.negev.size_t0, cfg.negev.size_t_max, cfg.negev.size_t_mult, 1)
        norm = card.get("normalization") or {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
        #: 0–255 RGB = normalised image · _rgb_std + _rgb_mean (for the CRF term's colours)
        self._rgb_mean = 255.0 * torch.tensor(norm["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        self._rgb_std = 255.0 * torch.tensor(norm["std"], dtype=torch.float32).view(1, 3, 1, 1)

    def _load_teacher(self, path: str):
        """The ``--seed-teacher`` checkpoint, checked against the classifier's classes and input."""
        teacher = load_trained(path)
        card, c1 = teacher.card, self.stage1.card
        if teacher.method != "negev":
            raise InputError(
                f"--seed-teacher must be a train-decoder checkpoint (best-loc.pt); this one is "
                f"{teacher.method!r}",
                path,
            )
        if list(card["class_names"]) != list(c1["class_names"]):
            raise InputError(
                f"the seed teacher was trained on classes {card['class_names']} but the "
                f"classifier on {c1['class_names']}; use a teacher of the same classes",
                path,
            )
        if card.get("normalization") != c1.get("normalization"):
            raise InputError(
                "the seed teacher normalises its input differently from the classifier; use a "
                "teacher trained over a classifier of the same backbone",
                path,
            )
        for p in teacher.model.parameters():
            p.requires_grad_(False)
        teacher.model.eval()
        return teacher

    def feature_bank(self, m: NEGEVModel, device: torch.device) -> FeatureBank:
        """The ``seed_map: knn`` bank (built on first use from the train split, eval preset)."""
        if self.bank is None:
            self.bank = self._train_bank(
                m,
                None if self.teacher is None else lambda x, y, st: self._teacher_maps(x, st),
                device,
            )
        return self.bank.to(device)

    def _train_bank(
        self, m: NEGEVModel, values: Callable | None, device: torch.device, glass: bool = False
    ) -> FeatureBank:
        """A k-NN bank of the train split (eval preset) over ``m``'s frozen encoder.

        ``values``: as for :func:`histo_wsl.methods.knn.build_feature_bank` (None: the CAM with
        ``cam_method``); ``glass``: a refiner's bank (:meth:`TrainSplitBanks.build`).
        """
        return self._banks.build(m.classifier, values, device, glass=glass)

    def seed_maps(
        self,
        m: NEGEVModel,
        images: torch.Tensor,
        labels: torch.Tensor,
        stages: list[torch.Tensor] | None = None,
        owners: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Maps (B,H,W) in [0,1] the seeds are drawn from.

        The CAM of the true class (over the negative class with ``seed_contrast``), or the
        ``--seed-teacher``'s foreground probability on the same augmented crops; with
        ``seed_map: knn``, that map averaged over each pixel's ``knn_k`` nearest bank pixels of
        other images (``owners``: the images' training-set indices, −1 for none). ``stages`` are
        the frozen encoder's activations of ``images`` when already computed (the CAM layer and,
        for a teacher over the same classifier, its decoder input): no second backbone pass
        then.
        """
        size = tuple(images.shape[-2:])
        if self.cfg.negev.seed_map == "knn":
            bank = self.feature_bank(m, images.device)
            if stages is None:
                with torch.no_grad():
                    stages = m.classifier.forward_features(images)
            if owners is None:
                owners = torch.full((images.shape[0],), -1, dtype=torch.long)
            return bank.smoothed_maps(stages, owners, self.cfg.knn.knn_k, size)
        if self.teacher is not None:
            return self._teacher_maps(images, stages)
        return compute_cams(
            m.classifier,
            images,
            labels,
            method=self.cfg.model.cam_method,
            size=size,
            features=None if stages is None else stages[-1],
            against=self.against,
        )

    def _teacher_maps(
        self, images: torch.Tensor, stages: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The ``--seed-teacher``'s foreground probability (B,H,W) on ``images``."""
        teacher = self.teacher.to(images.device).model
        if stages is None or not self._teacher_shares_encoder:
            return teacher.localize(images)[1].float()
        with torch.no_grad():
            return teacher.foreground(teacher.decoder(stages, tuple(images.shape[-2:])), stages)

    def build_model(self) -> nn.Module:
        """The frozen classifier of the checkpoint with a new decoder (and an empty refiner)."""
        torch.manual_seed(self.cfg.run.seed)
        refiner = None
        if self.refining:
            stages = check_stages(self.cfg.knn.knn_stages, self.stage1.model)
            refiner = KNNRefiner(self.cfg.knn.knn_k, self.cfg.knn.refine_alpha, stages)
        return NEGEVModel(self.stage1.model, refiner)

    @property
    def refining(self) -> bool:
        """Whether the saved model's map is k-NN refined (``--refine knn``)."""
        return self.cfg.knn.refine == "knn"

    def refine_bank(self, m: NEGEVModel, device: torch.device) -> FeatureBank:
        """Training pixels (eval preset) valued by ``m``'s decoder map, for its refiner.

        With ``--glass`` the bank also holds glass beside tissue valued 0
        (:func:`histo_wsl.methods.knn.with_glass`).
        """
        m.eval()
        size = (self.cfg.data.crop_size, self.cfg.data.crop_size)
        return self._train_bank(
            m,
            lambda x, y, stages: m.foreground(m.decoder(stages, size), stages, refine=False),
            device,
            glass=True,
        )

    def param_groups(self, model: nn.Module, lr: float) -> list[dict]:
        """Decoder parameters only; in the ×10 group for VGG16/InceptionV3 (method.md §1.4)."""
        m = unwrap(model)
        ratio = (
            self.cfg.optim.lr_classifier_ratio if m.classifier.backbone.other_group == X10 else 1.0
        )
        return [
            {"params": [p for p in m.decoder.parameters()], "lr": lr * ratio, "name": "decoder"}
        ]

    def train_dataset(self) -> torch.utils.data.Dataset:
        """The ``train`` split with the training preset."""
        return training_images(self.ds, self.cfg)

    def training_step(self, model: nn.Module, batch: dict, epoch: int) -> tuple[torch.Tensor, dict]:
        """λ·CE on CAM seeds (+ size, CRF terms) of non-negative images; CE to bg on negative ones.

        Statistics (summary.csv columns): ``seed_loss``, ``negative_loss``, with ``size_lambda``
        > 0 ``size_loss`` (unweighted) and its ``size_t``, with ``crf_lambda`` > 0 ``crf_loss``.
        """
        images, labels = batch["image"], batch["label"]
        _, seg, stages = model(images, segment=True, features=True)
        m = unwrap(model)
        neg = (
            labels == self.negative
            if self.negative is not None
            else torch.zeros_like(labels, dtype=torch.bool)
        )
        stats: dict = {}
        loss = seg.sum() * 0.0
        pos = ~neg
        # glass around an image (--glass): known background
        glass = batch["mask"].to(seg.device) == GLASS_LABEL if "mask" in batch else None
        if glass is not None and not glass.any():
            glass = None
        if pos.any():
            owners = batch.get("index")
            owners = None if owners is None else torch.as_tensor(owners)[pos.cpu()]
            cams = self.seed_maps(m, images[pos], labels[pos], [s[pos] for s in stages], owners)
            if glass is not None:
                cams = cams.masked_fill(glass[pos], 0.0)  # foreground seeds never on glass
            seeds = self.seed_sampler(cams)
            ls = seed_loss(seg[pos], seeds)
            loss = loss + self.cfg.negev.seed_lambda * ls
            stats["seed_loss"] = float(ls.detach())
            if self.cfg.negev.size_lambda > 0:
                lz = size_loss(seg[pos], self.size_t)
                loss = loss + self.cfg.negev.size_lambda * lz
                stats["size_loss"] = float(lz.detach())
                stats["size_t"] = self.size_t
            if self.cfg.negev.crf_lambda > 0:
                mean, std = self._rgb_mean.to(images.device), self._rgb_std.to(images.device)
                lc = crf_loss(
                    seg[pos],
                    images[pos].float() * std + mean,
                    self.cfg.negev.crf_sigma_rgb,
                    self.cfg.negev.crf_sigma_xy,
                    self.cfg.negev.crf_scale,
                )
                loss = loss + self.cfg.negev.crf_lambda * lc
                stats["crf_loss"] = float(lc.detach())
        if neg.any():
            ln = negative_loss(seg[neg])
            loss = loss + self.cfg.negev.negative_lambda * ln
            stats["negative_loss"] = float(ln.detach())
        if glass is not None and (pos & glass.flatten(1).any(1)).any():
            # the negative term over the glass pixels of the other images
            lg = pixel_negative_loss(seg[pos], glass[pos])
            loss = loss + self.cfg.negev.negative_lambda * lg
            stats["glass_loss"] = float(lg.detach())
        return loss, stats

    def evaluate(self, model: nn.Module, device: torch.device) -> dict:
        """Frozen classifier's accuracy on val; the model's map PxAP on valpx.

        With ``--refine knn`` the refiner's bank is first rebuilt from the current decoder, the
        selection metric ``valpx_pxap`` is the blended map's, and ``valpx_pxap_decoder`` the
        decoder's own.
        """
        m = unwrap(model)
        if self.refining:
            m.refiner.set_bank(self.refine_bank(m, device))
            self.refine_pixels = len(m.refiner)
        return evaluate_localizer(
            m,
            self.ds,
            device,
            self.cfg.data.crop_size,
            own_key="valpx_pxap_decoder" if self.refining else None,
            scale=image_scale(self.ds, self.cfg),
        )

    def card(self) -> dict:
        """The model card of the NEGEV model (with its classifier's card)."""
        c1 = self.stage1.card
        cfg = self.cfg
        return {
            "method": "negev",
            "stage": 2,
            "backbone": c1["backbone"],
            "head": c1["head"],
            "num_classes": c1["num_classes"],
            "class_names": list(c1["class_names"]),
            "negative_class": cfg.data.negative_class,
            "input_size": cfg.data.crop_size,
            "resize_size": cfg.data.resize_size,
            "geometry": cfg.data.geometry,
            "glass": cfg.data.glass,
            "data_mpp": c1.get("data_mpp"),
            "mpp": c1.get("mpp"),
            "normalization": c1.get("normalization"),
            "threshold": 0.5,
            "seeds": {
                "fg": cfg.negev.seeds_fg,
                "bg": cfg.negev.seeds_bg,
                "ksize": cfg.negev.seed_ksize,
                "lambda": cfg.negev.seed_lambda,
                "bg_sampler": cfg.negev.bg_sampler,
                "low_fraction": cfg.negev.low_fraction,
                "fg_sampler": cfg.negev.fg_sampler,
                "fg_erode": cfg.negev.fg_erode,
                "cam_method": cfg.model.cam_method,
                # the class whose CAM is subtracted (--seed-contrast with a negative class)
                "over_class": None if self.against is None else c1["class_names"][self.against],
                "mode": cfg.negev.seed_mode,
                "map": cfg.negev.seed_map,
                "knn": None
                if cfg.negev.seed_map != "knn"
                else {
                    "k": cfg.knn.knn_k,
                    "bank_pixels": None if self.bank is None else len(self.bank),
                    "dims": cfg.knn.knn_dims,
                    "stages": cfg.knn.knn_stages,
                    "bank_seed": cfg.run.seed,
                },
                "teacher": None
                if self.teacher is None
                else {
                    "checkpoint": str(self.teacher.path),
                    "metrics": self.teacher.card.get("metrics", {}),
                    "seeds": self.teacher.card.get("seeds", {}),
                },
            },
            "size_term": {
                "lambda": cfg.negev.size_lambda,
                "t0": cfg.negev.size_t0,
                "t_max": cfg.negev.size_t_max,
                "mult": cfg.negev.size_t_mult,
                "sizes": "fractions of the image",
            },
            "crf_term": {
                "lambda": cfg.negev.crf_lambda,
                "sigma_rgb": cfg.negev.crf_sigma_rgb,
                "sigma_xy": cfg.negev.crf_sigma_xy,
                "scale": cfg.negev.crf_scale,
                "window": crf_window(cfg.negev.crf_sigma_xy, cfg.negev.crf_scale),
            },
            "refine": refine_card(
                cfg,
                self.refine_pixels,
                "the decoder's foreground map on the train split (eval preset)",
            ),
            "negative_term": self.negative is not None,
            "classifier_checkpoint": str(self.stage1.path),
            "classifier_card": {k: v for k, v in c1.items() if k != "config"},
            "training_data": self.ds.describe(),
            "config": {
                k: (
                    str(v)
                    if not isinstance(v, (int, float, str, bool, list, dict, type(None)))
                    else v
                )
                for k, v in cfg.to_flat().items()
            },
            "versions": {"histo-wsl": __version__, "torch": str(torch.__version__)},
        }

    def on_epoch_end(self, epoch: int) -> None:
        """Advance the size term's t to the next epoch's value (×mult, capped at t_max)."""
        self.size_t = min(self.size_t * self.cfg.negev.size_t_mult, self.cfg.negev.size_t_max)

    def state_dict(self) -> dict:
        """The size term's t for the next epoch."""
        return {"size_t": self.size_t}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (a checkpoint without it leaves t at t0)."""
        if "size_t" in state:
            self.size_t = float(state["size_t"])


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    """Whether two modules hold the same tensors under the same names (buffers included)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


def train_decoder(
    cfg: TrainConfig, *, resume: bool = False, quiet: bool = False, argv: list[str] | None = None
) -> dict:
    """Run ``train-decoder``: check the classifier and the data, then train with the engine."""
    from histo_wsl.training.engine import fit

    if not cfg.negev.classifier:
        raise InputError(
            "--classifier is required: the stage-1 checkpoint (e.g. runs/cam/best-loc.pt)"
        )
    stage1 = load_trained(cfg.negev.classifier)
    if cfg.data.classes is None:
        cfg.data.classes = list(stage1.card["class_names"])
    ds = load_training_data(cfg)
    task = DecoderTask(cfg, ds, stage1)
    summary = fit(cfg, task, resume=resume, quiet=quiet, argv=argv, command="train-decoder")
    return {
        **summary,
        "data": ds.describe(),
        "skipped_files": ds.skipped_files,
        "classifier": str(stage1.path),
        "classifier_metrics": stage1.card.get("metrics", {}),
    }


def negev_from_card(card: dict, state_dict: dict, path: str | Path) -> nn.Module:
    """The NEGEV model (its classifier, decoder and any k-NN refiner) a card describes, loaded."""
    stage1 = card.get("classifier_card")
    if not stage1:
        raise InputError("NEGEV checkpoint without its classifier card; retrain it", path)
    clf = build_classifier(
        stage1["backbone"],
        stage1["head"],
        int(stage1["num_classes"]),
        pretrained=False,
        **stage1.get("head_opts", {}),
    )
    model = NEGEVModel(clf, refiner_from_card(card, path))
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise InputError(f"weights do not fit a NEGEV model ({str(exc)[:120]})", path) from None
    return model


def map_description(card: dict, map_class: str) -> str:
    """The decoder's foreground probability, in words (class-agnostic)."""
    return f"NEGEV decoder foreground probability{refined_words(card)} (class-agnostic)"


#: NEGEV (``train-decoder``) as a :class:`~histo_wsl.methods.base.Method`
METHOD = Method(
    name="negev",
    command="train-decoder",
    has_cam=False,
    train=train_decoder,
    from_card=negev_from_card,
    map_description=map_description,
)
