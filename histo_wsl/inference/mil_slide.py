"""``localize --mil``: a ``train-mil`` model's slide-level score beside the map.

The slide is cut as ``extract-patches`` cut the MIL model's training slides (the patch side, µm/px
or level, stride and minimum tissue its card records under ``patch``), on the tissue ``localize``
already found; each patch is read with the same reader, described by the same frozen backbone
and the DSMIL network scores the bag. What goes into ``<slide>.json`` under ``mil``: the slide
score (0-1) and the class it means (positive at or above ``t_slide``, the threshold train-mil chose
on its validation slides), how many patches were scored, how many reach the instance
threshold ``t_pos`` chosen at training, and where the highest-scoring patch is.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from histo_wsl.errors import InputError
from histo_wsl.inference.windows import WindowBatches
from histo_wsl.slideio.grid import make_grid
from histo_wsl.slideio.slide import Slide, plan_read
from histo_wsl.tissue.fraction import grid_tissue_fractions

if TYPE_CHECKING:
    import torch

    from histo_wsl.tissue.scan import HeldLevel, SlideTissue

__all__ = ["SlideMIL", "check_mil_file"]

#: patches per feature batch
BATCH = 32


def check_mil_file(path: Path | str) -> dict:
    """The card of a ``train-mil`` checkpoint, checked before any slide is read.

    Raises:
        InputError: the file is missing, not a ``train-mil`` checkpoint, or from a ``train-mil``
            that did not record how its patches were cut.
    """
    from histo_wsl.registry.checkpoint import load_checkpoint

    path = Path(path)
    if not path.is_file():
        raise InputError("--mil: no such file; give the mil.pt that train-mil wrote", path)
    card = load_checkpoint(path)["card"]
    if card.get("method") != "mil":
        raise InputError("--mil: not a train-mil checkpoint (its card's method is not mil)", path)
    _check_patch_record(card, path)
    return card


def _check_patch_record(card: dict, path: Path) -> None:
    """Refuse a card without the record of how its patches were cut."""
    if not (card.get("patch") or {}).get("size"):
        raise InputError(
            "--mil: the model does not record how its patches were cut (a mil.pt from an older "
            "histo-wsl); re-run train-mil on its patch folder",
            path,
        )


class SlideMIL:
    """A ``train-mil`` model that scores whole slides.

    Args:
        path: the ``mil.pt``.
        device: where the backbone and DSMIL run.
    """

    def __init__(self, path: Path | str, device: torch.device) -> None:
        from histo_wsl.methods.mil import PatchFeatures, load_mil

        self.path = Path(path)
        if not self.path.is_file():
            check_mil_file(self.path)  # the one-line error for a missing file
        try:
            self.model, card = load_mil(self.path)
        except InputError as exc:
            raise InputError(f"--mil: {exc.message}", self.path) from None
        _check_patch_record(card, self.path)
        self.card = card
        self.model.to(device)
        self.device = device
        self.patch = dict(card["patch"])
        self.features = PatchFeatures(
            card["backbone"], bool(card["pretrained"]), int(card.get("seed") or 0), device
        )
        self.input_size = int(card["input_size"])
        thresholds = card.get("threshold") or {}
        self.t_pos = float(thresholds.get("t_pos", 0.5))
        #: the slide score at or above which a slide is positive (chosen on validation slides)
        self.t_slide = float(thresholds.get("t_slide", 0.5))

    def score(
        self,
        slide: Slide,
        slide_path: Path,
        slide_mpp: float | None,
        tissue: SlideTissue,
        pixels: Slide | HeldLevel | None = None,
    ) -> dict:
        """The slide's MIL record (see the module docs); ``score`` is None without a patch."""
        import torch

        from histo_wsl.methods.mil import patch_input, predicted_class, score_bag

        p = self.patch
        plan = plan_read(slide, mpp=p.get("mpp"), level=None if p.get("mpp") else p.get("level"))
        size, stride = int(p["size"]), int(p.get("stride") or p["size"])
        record: dict = {
            "score": None,
            "predicted_class": None,
            "patches": 0,
            "positive_patches": 0,
            "t_pos": round(self.t_pos, 6),
            "t_slide": round(self.t_slide, 6),
            "top_patch": None,
            "read": plan.as_dict(),
            "model": str(self.path),
        }
        try:
            grid = make_grid(slide, plan, size, stride)
        except InputError:
            record["note"] = "the slide is smaller than one MIL patch"
            return record
        fraction = grid_tissue_fractions(tissue.mask, tissue.downsample, grid)
        keep = grid.subset(np.flatnonzero(fraction >= float(p.get("min_tissue", 0.0)) - 1e-9))
        if not len(keep):
            record["note"] = f"no patch has --min-tissue {p.get('min_tissue', 0.0):g} of tissue"
            return record
        from PIL import Image

        batches = WindowBatches(
            slide_path, slide_mpp, plan, keep.xs, keep.ys, size, BATCH, pixels or slide, BATCH
        )
        feats = []
        for i in range(len(batches)):
            rgb = batches[i].numpy()
            x = torch.stack([patch_input(Image.fromarray(a), self.input_size) for a in rgb])
            feats.append(self.features(x))
        score, inst = score_bag(self.model, torch.cat(feats), self.device)
        top = int(np.argmax(inst))
        record.update(
            {
                "score": round(score, 6),
                "predicted_class": predicted_class(
                    self.card["class_names"], self.card["negative_class"], score, self.t_slide
                ),
                "patches": len(keep),
                "positive_patches": int(np.count_nonzero(inst >= self.t_pos)),
                "top_patch": {
                    "x": int(keep.xs[top]),
                    "y": int(keep.ys[top]),
                    "size_level0": round(float(keep.size_level0), 3),
                    "score": round(float(inst[top]), 6),
                },
            }
        )
        return record
