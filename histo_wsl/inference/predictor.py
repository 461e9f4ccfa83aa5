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

The network is loaded in its inference form (:func:`histo_wsl.networks.folding.for_inference`:
BatchNorm folded into the convolutions; channels-last on CPU, where :meth:`Predictor.predict`
hands it channels-last batches): the same maps to float rounding, about twice as fast on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from histo_wsl.errors import InputError
from histo_wsl.methods import TrainedModel, get_method, model_from_checkpoint
from histo_wsl.networks.cams import normalize_cams, range_normalize, raw_cams
from histo_wsl.networks.folding import for_inference
from histo_wsl.networks.tta import TTA_MODES, flip, unflipped_mean
from histo_wsl.registry.checkpoint import load_checkpoint

__all__ = ["TTA_MODES", "Predictor", "load_model"]


@dataclass
class Predictor(TrainedModel):
    """A loaded model, its card and path, and the test-time augmentation it predicts with."""

    #: test-time augmentation, a key of :data:`TTA_MODES`
    tta: str = "none"

    def to(self, device: torch.device | str) -> Predictor:
        """Move the network to ``device`` (channels-last on CPU, contiguous elsewhere)."""
        device = torch.device(device)
        fmt = torch.channels_last if device.type == "cpu" else torch.contiguous_format
        self.model.to(device=device, memory_format=fmt)
        return self

    def for_windows(self, on: bool = True) -> Predictor:
        """Tell the network whether its inputs are windows of a slide (default: whole images).

        A network with a ``windowed`` switch then normalises its map for windows: a Max-Min
        ``minmax`` mask by the card's ``maxmin.window_range``
        (:meth:`histo_wsl.networks.maxmin.MaxMinModel.normalise`), a stage-1 classifier's CAMs by
        its ``cam_window_range`` (:func:`histo_wsl.networks.cams.range_normalize`), instead of
        each window's own minimum and maximum.
        """
        if hasattr(self.model, "windowed"):
            self.model.windowed = bool(on)
        return self

    @property
    def window_range(self) -> tuple[float, float] | None:
        """The range a slide's windows are normalised by, when the network uses one."""
        if not getattr(self.model, "windowed", False):
            return None
        return getattr(self.model, "window_range", None)

    def predict(
        self, images: Tensor, classes: Tensor | None = None, where: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(class logits (B,K), foreground map (B,H,W) in [0,1]) of normalised images.

        With :attr:`tta` ``flips``, both are means over the four flipped views (maps flipped
        back); a stage-1 map without ``classes`` is that of the class of the mean logits.
        ``where`` (B,H,W) bool, any resolution: the pixels whose map is needed; a k-NN refiner
        looks up only the grid cells near them, the map elsewhere being 0
        (:meth:`~histo_wsl.networks.knn.KNNRefiner.looking_up`); None: every pixel.
        """
        if self.model.training:  # eval() walks every module: 2.5 ms a batch when repeated
            self.model.eval()
        if images.device.type == "cpu":
            images = images.contiguous(memory_format=torch.channels_last)
        views = TTA_MODES[self.tta]
        if not get_method(self.method).has_cam:  # a class-agnostic map: model.localize
            refiner = getattr(self.model, "refiner", None) if where is not None else None

            def view(d: tuple[int, ...]) -> tuple[Tensor, Tensor]:
                if refiner is None:
                    return self.model.localize(flip(images, d))
                with refiner.looking_up(flip(where, d)):
                    return self.model.localize(flip(images, d))

            with torch.no_grad():
                outs = [view(d) for d in views]
            logits = torch.stack([lg for lg, _ in outs]).mean(0)
            return logits, unflipped_mean([m for _, m in outs], views)
        with torch.no_grad():
            logits = torch.stack([self.model(flip(images, d)) for d in views]).mean(0)
        cls = logits.argmax(1) if classes is None else classes
        method, size, window = (
            self.card.get("cam_method", "cam"),
            images.shape[-2:],
            self.window_range,
        )

        def cam(view: Tensor) -> Tensor:
            raw = raw_cams(self.model, view, cls, method=method, size=tuple(size))
            return normalize_cams(raw) if window is None else range_normalize(raw, *window)

        return logits, unflipped_mean([cam(flip(images, d)) for d in views], views)


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
    if cam_method is not None and get_method(card.get("method"), path).has_cam:
        card["cam_method"] = cam_method  # before the build: a CAM window range is one method's
    model = model_from_checkpoint(card, ckpt["state_dict"], path)
    device = next(iter(model.parameters())).device
    return Predictor(for_inference(model, device), card, path, mode)
