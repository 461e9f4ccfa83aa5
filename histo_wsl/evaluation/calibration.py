"""Thresholds of a model card: which one a report names, and ``--calibrate``'s new checkpoint.

``--calibrate`` takes the threshold that maximises :data:`CALIBRATION_CRITERION` on the evaluated
set and writes ``<stem>.calibrated.pt`` (:func:`calibrated_path`, :func:`calibrated_checkpoint`),
whose card carries it and the set it was calibrated on.
"""

from __future__ import annotations

from pathlib import Path

from histo_wsl.errors import InputError
from histo_wsl.methods import get_method

__all__ = [
    "CALIBRATION_CRITERION",
    "calibrated_checkpoint",
    "calibrated_path",
    "card_threshold",
]

#: the criterion --calibrate maximises
CALIBRATION_CRITERION = "miou"


def card_threshold(card: dict) -> float:
    """The card's threshold (0.5 when it has none).

    Its name in reports is :func:`~histo_wsl.reporting.metrics_file.card_threshold_name`.
    """
    return float(card.get("threshold", 0.5))


def calibrated_path(model: Path, out: Path, taken: set[str] | None = None) -> Path:
    """Where ``--calibrate`` writes the calibrated copy of ``model``: ``<out>/<stem>.calibrated.pt``.

    When two models of a comparison share a stem (``runs/a/best-loc.pt`` and
    ``runs/b/best-loc.pt``), the parent folder's name is put in front (``a-best-loc``).
    """
    from histo_wsl.registry.registry import display_stem

    stem = display_stem(model)
    if taken is not None and stem in taken:
        stem = f"{model.parent.name}-{stem}"
    if taken is not None:
        taken.add(display_stem(model))
    return out / f"{stem}.calibrated.pt"


def calibrated_checkpoint(
    source: Path,
    target: Path,
    threshold: float,
    calibration: dict,
    cam_method: str | None = None,
    tta: str | None = None,
) -> Path:
    """Write a copy of ``source`` whose card carries the calibrated threshold (never in place).

    Args:
        source: the evaluated checkpoint.
        target: the new file; it must not exist.
        threshold: the chosen threshold.
        calibration: ``{set, criterion, value, ...}`` stored as ``card["calibration"]``.
        cam_method: the stage-1 CAM method the threshold was chosen with (stored in the card, as
            the threshold belongs to that map).
        tta: the test-time augmentation the threshold was chosen with (stored in the card, for
            the same reason).

    Returns:
        ``target``.

    Raises:
        InputError: ``target`` exists or is ``source``.
    """
    from histo_wsl.registry.checkpoint import load_checkpoint, save_checkpoint

    if target.exists() or target.resolve() == source.resolve():
        raise InputError(
            "the calibrated checkpoint exists already and is never overwritten; remove it or "
            "choose another --out",
            target,
        )
    ckpt = load_checkpoint(source)
    card = dict(ckpt["card"])
    card["threshold"] = float(threshold)
    if cam_method is not None and get_method(card.get("method"), source).has_cam:
        card["cam_method"] = cam_method
    if tta is not None:
        card["tta"] = tta
    card["calibration"] = dict(calibration)
    # a calibrated model is for inference: the optimizer state of a resumable last.pt is dropped
    return save_checkpoint(target, card, ckpt["state_dict"])
