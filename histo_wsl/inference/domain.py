"""Is a slide what the model was trained on? A cheap check before its windows are read.

A model card's ``domain`` says what the model was trained on (``modality``: ``brightfield``, the
stain, the tissue; cards without it are brightfield: every histo-wsl model is trained on RGB
brightfield patches). A fluorescence or dark-field slide is told apart from brightfield on the
thumbnail that tissue detection already read: brightfield glass and pale stroma make its brightest
tenth bright, a dark-field image's brightest tenth stays dark (a DAPI NDPI: 17/255, H&E slides:
above 240). A mismatch stops the slide with a line naming ``--force``; with ``--force`` it is
mapped and the mismatch is recorded in ``<slide>.json`` and warned about.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from histo_wsl.errors import InputError
from histo_wsl.runtime.console import warn

__all__ = ["DARK_FIELD_P90", "SAMPLE_PIXELS", "check_domain", "illumination"]

#: an image whose 90th-percentile luminance (0-255) is below this is dark-field (fluorescence)
DARK_FIELD_P90 = 64.0
#: pixels the brightness is measured on, at most (about; a regular subsample)
SAMPLE_PIXELS = 2**18


def illumination(rgb: np.ndarray) -> dict:
    """``{"kind": "brightfield" | "dark-field", "p90_luminance": ...}`` of an RGB uint8 image.

    Measured on at most about :data:`SAMPLE_PIXELS` pixels (a regular subsample of a large
    thumbnail), so the check costs the same on any slide.
    """
    rgb = np.asarray(rgb)
    step = max(1, int(np.ceil(np.sqrt(rgb.shape[0] * rgb.shape[1] / SAMPLE_PIXELS))))
    rgb = rgb[::step, ::step, :3].astype(np.float32)
    lum = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    p90 = float(np.percentile(lum, 90)) if lum.size else 255.0
    kind = "dark-field" if p90 < DARK_FIELD_P90 else "brightfield"
    return {"kind": kind, "p90_luminance": round(p90, 1)}


def check_domain(rgb: np.ndarray, card: dict, path: Path, force: bool) -> tuple[dict, list[str]]:
    """The slide's illumination against the model's; returns the record and the notes.

    Raises:
        InputError: the slide is not of the model's modality and ``force`` is off.
    """
    domain = card.get("domain") or {}
    expected = str(domain.get("modality") or "brightfield")
    seen = illumination(rgb)
    record = {"model_modality": expected, **seen}
    if seen["kind"] == expected:
        return record, []
    message = (
        f"looks like a {seen['kind']} image (90th-percentile brightness "
        f"{seen['p90_luminance']:.0f}/255) but the model was trained on {expected} slides"
        f"{' (' + domain['stain'] + ')' if domain.get('stain') else ''}, so its map would mean "
        "nothing; check the file, or pass --force to map it anyway"
    )
    if not force:
        raise InputError(message, path)
    warn(f"{path}: {message} (--force: mapped anyway)")
    return {**record, "forced": True}, [f"{message} (--force: mapped anyway)"]
