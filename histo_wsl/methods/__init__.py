"""The weakly-supervised localization methods, one module each, behind a small registry.

* :mod:`~histo_wsl.methods.cam` — the CAM classifier (stage 1 of both papers; ``train-classifier``).
* :mod:`~histo_wsl.methods.negev` — NEGEV: a U-Net decoder over the frozen classifier, trained from
  CAM seeds and negative images (``train-decoder``); its losses in
  :mod:`~histo_wsl.methods.negev_losses`.
* :mod:`~histo_wsl.methods.maxmin` — Max-Min uncertainty: localizer and classifier trained together
  (``train-classifier --method maxmin``); its losses in :mod:`~histo_wsl.methods.maxmin_losses`.
* :mod:`~histo_wsl.methods.mil` — multiple-instance learning from slide labels (DSMIL over frozen
  patch features): instance scores and pseudo patch labels for the methods above (``train-mil``).
* :mod:`~histo_wsl.methods.knn` — the k-NN seed map and refinement both NEGEV and Max-Min use.
* :mod:`~histo_wsl.methods.base` — the :class:`~histo_wsl.methods.base.Method` interface and the
  data and validation steps the methods share.

Each method module defines ``METHOD``, a :class:`~histo_wsl.methods.base.Method`; :data:`METHODS`
names the module of each, so a new method is one file here and one line below. Nothing here
imports torch until a method is asked for (``histo-wsl --help`` stays fast).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from histo_wsl.errors import InputError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from histo_wsl.methods.base import Method

__all__ = ["METHODS", "TrainedModel", "get_method", "load_trained", "model_from_checkpoint"]

#: the card's ``method`` → the module that defines its ``METHOD``
METHODS: dict[str, str] = {
    "cam": "histo_wsl.methods.cam",
    "negev": "histo_wsl.methods.negev",
    "maxmin": "histo_wsl.methods.maxmin",
}


def get_method(name: str | None, path: str | Path | None = None) -> Method:
    """The method a model card names (``path``: the checkpoint, named in the error).

    Raises:
        InputError: a name that is not one of :data:`METHODS`.
    """
    if name not in METHODS:
        raise InputError(
            f"unknown method {name!r} in the model card"
            if path is not None
            else f"unknown method {name!r} (one of {', '.join(METHODS)})",
            path,
        )
    return importlib.import_module(METHODS[name]).METHOD


def model_from_checkpoint(card: dict, state_dict: dict, path: str | Path) -> nn.Module:
    """The network a checkpoint's card describes, with its weights, in eval mode."""
    model = get_method(card.get("method"), path).from_card(card, state_dict, path)
    model.eval()
    return model


@dataclass
class TrainedModel:
    """A trained network with the card and path of its checkpoint."""

    model: nn.Module
    card: dict
    path: Path

    @property
    def method(self) -> str:
        """The card's method (``cam``, ``negev``, ``maxmin``)."""
        return self.card["method"]

    def to(self, device: torch.device | str) -> TrainedModel:
        """Move the network to ``device``."""
        self.model.to(device)
        return self


def load_trained(path: str | Path, map_location: str = "cpu") -> TrainedModel:
    """Load any histo-wsl checkpoint (``weights_only``) as its network, card and path.

    Raises:
        InputError: not a histo-wsl checkpoint, an unknown method, or weights that do not fit.
    """
    from histo_wsl.registry.checkpoint import load_checkpoint

    path = Path(path)
    ckpt = load_checkpoint(path, map_location=map_location)
    card = dict(ckpt["card"])
    return TrainedModel(model_from_checkpoint(card, ckpt["state_dict"], path), card, path)
