"""Rebuild a trained model from its self-contained checkpoint, with one prediction interface.

Every histo-wsl checkpoint carries a model card (``method``, ``backbone``, ``head``, classes, input
size, normalisation, threshold...). :func:`load_model` builds the network the card describes,
loads the weights and returns a :class:`Predictor` whose :meth:`Predictor.predict` gives class
scores and a foreground map in [0, 1] for any method:

- stage-1 (``cam``): the chosen CAM method's map (per-image min-max normalised) of the predicted
  class, or of the classes given (ground truth, for evaluation);
- ``negev``: the decoder's foreground softmax (the classes only choose nothing: the decoder is
  class-agnostic), blended with its k-NN map when the card has ``refine: knn``;
- ``maxmin``: the pseudo-binary mask M of the localizer (class-agnostic: weighted by the
  localizer's own class probabilities), blended with its k-NN map when the card has
  ``refine: knn``, with the class scores of C(X+).

With ``tta="flips"`` (the card's ``tta``, or ``--tta flips``) every batch is also predicted
flipped left-right, up-down and both; the class logits and the maps (flipped back) are averaged
over the four views, and a stage-1 map is that of the class of the averaged logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from histo_wsl.errors import InputError
from histo_wsl.networks.cams import compute_cams
from histo_wsl.networks.classifier import WSOLClassifier, build_classifier
from histo_wsl.networks.knn import KNNRefiner
from histo_wsl.networks.negev import NEGEVModel
from histo_wsl.registry.checkpoint import load_checkpoint

__all__ = ["TTA_MODES", "Predictor", "classifier_from_card", "load_model"]

#: test-time augmentations of :meth:`Predictor.predict`: the flip dimensions of each view
TTA_MODES: dict[str, tuple[tuple[int, ...], ...]] = {
    "none": ((),),
    "flips": ((), (-1,), (-2,), (-2, -1)),
}


def classifier_from_card(card: dict, state_dict: dict, path: str | Path) -> WSOLClassifier:
    """The stage-1 classifier a card describes, with ``state_dict`` loaded strictly."""
    try:
        model = build_classifier(
            card["backbone"],
            card["head"],
            int(card["num_classes"]),
            pretrained=False,
            **card.get("head_opts", {}),
        )
    except KeyError as exc:
        raise InputError(
            f"the model card lacks {exc}; the checkpoint is incomplete", path
        ) from None
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise InputError(
            f"weights do not fit the {card['backbone']}/{card['head']} network its card describes "
            f"({str(exc).splitlines()[0][:120]}...)",
            path,
        ) from None
    return model


def _maxmin_from_card(card: dict, state_dict: dict, path: str | Path) -> nn.Module:
    """The Max-Min network a card describes, with ``state_dict`` (σ and w included) loaded."""
    from histo_wsl.networks.backbones import build_backbone
    from histo_wsl.networks.maxmin import MaxMinModel

    try:
        mm = card["maxmin"]
        model = MaxMinModel(
            build_backbone(card["backbone"], pretrained=False),
            int(card["num_classes"]),
            w=float(mm["w"]),
            sigma=float(mm["sigma"]),
            mask_mode=mm["mask"],
            negative_index=mm.get("negative_index"),
            head_opts=card.get("head_opts"),
            cl_scale=float(mm.get("cl_scale", 1.0)),  # cards before cl_scale: full size
            refiner=_refiner_from_card(card, path),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(
            f"the Max-Min model card is incomplete or invalid ({exc}); retrain it", path
        ) from None
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise InputError(
            f"weights do not fit the {card['backbone']} Max-Min network its card describes "
            f"({str(exc).splitlines()[0][:120]}...)",
            path,
        ) from None
    return model


@dataclass
class Predictor:
    """A loaded model and its card."""

    model: nn.Module
    card: dict
    path: Path
    #: test-time augmentation, a key of :data:`TTA_MODES`
    tta: str = "none"

    @property
    def method(self) -> str:
        """``cam`` (stage 1), ``negev`` or ``maxmin``."""
        return self.card["method"]

    def to(self, device: torch.device) -> Predictor:
        """Move the model to ``device``."""
        self.model.to(device)
        return self

    def predict(self, images: Tensor, classes: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(class logits (B,K), foreground map (B,H,W) in [0,1]) of normalised images.

        With :attr:`tta` ``flips``, both are means over the four flipped views (maps flipped
        back); a stage-1 map without ``classes`` is that of the class of the mean logits.
        """
        self.model.eval()
        views = TTA_MODES[self.tta]
        if self.method in ("negev", "maxmin"):
            with torch.no_grad():
                outs = [self.model.localize(_flip(images, d)) for d in views]
            logits = torch.stack([lg for lg, _ in outs]).mean(0)
            return logits, _unflipped_mean([m for _, m in outs], views)
        with torch.no_grad():
            logits = torch.stack([self.model(_flip(images, d)) for d in views]).mean(0)
        cls = logits.argmax(1) if classes is None else classes
        maps = [
            compute_cams(
                self.model,
                _flip(images, d),
                cls,
                method=self.card.get("cam_method", "cam"),
                size=tuple(images.shape[-2:]),
            )
            for d in views
        ]
        return logits, _unflipped_mean(maps, views)


def _flip(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    return t.flip(dims) if dims else t


def _unflipped_mean(maps: list[Tensor], views: tuple[tuple[int, ...], ...]) -> Tensor:
    """Mean of the views' maps, each flipped back to the image's orientation."""
    if len(maps) == 1:
        return maps[0]
    return torch.stack([_flip(m, d) for m, d in zip(maps, views, strict=True)]).mean(0)


def load_model(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    cam_method: str | None = None,
    tta: str | None = None,
) -> Predictor:
    """Load any histo-wsl checkpoint as a :class:`Predictor` (``weights_only`` loading).

    Args:
        path: the ``.pt`` file.
        map_location: where the weights go.
        cam_method: override the stage-1 card's CAM method (``--cam gradcampp``...).
        tta: test-time augmentation (a key of :data:`TTA_MODES`); None: the card's ``tta``
            (``none`` when it has none). The returned card's ``tta`` is the one in use.

    Raises:
        InputError: not a histo-wsl checkpoint, an unknown method or test-time augmentation,
            or weights that do not fit.
    """
    path = Path(path)
    ckpt = load_checkpoint(path, map_location=map_location)
    card = dict(ckpt["card"])
    mode = (card.get("tta") or "none") if tta is None else tta
    if mode not in TTA_MODES:
        where = "the model card's tta" if tta is None else "--tta"
        raise InputError(
            f"{where} {mode!r} is not one of {', '.join(TTA_MODES)}", path if tta is None else None
        )
    card["tta"] = mode
    method = card.get("method")
    if method == "cam":
        model: nn.Module = classifier_from_card(card, ckpt["state_dict"], path)
        if cam_method is not None:
            card["cam_method"] = cam_method
    elif method == "negev":
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
        model = NEGEVModel(clf, _refiner_from_card(card, path))
        try:
            model.load_state_dict(ckpt["state_dict"])
        except RuntimeError as exc:
            raise InputError(f"weights do not fit a NEGEV model ({str(exc)[:120]})", path) from None
    elif method == "maxmin":
        model = _maxmin_from_card(card, ckpt["state_dict"], path)
    else:
        raise InputError(f"unknown method {method!r} in the model card", path)
    model.eval()
    return Predictor(model, card, path, mode)


def _refiner_from_card(card: dict, path: str | Path) -> KNNRefiner | None:
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
