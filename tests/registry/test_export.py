"""Exported and shipped model cards carry no build-machine path (histo_wsl.registry.export)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from histo_wsl.registry.export import portable

MODELS = Path(__file__).resolve().parents[2] / "models"
ABSOLUTE = re.compile(r"(?<![\w.~:/])/(?:home|work|tmp|Users|root|mnt|data|scratch)/|[A-Za-z]:\\")


def test_portable_cuts_absolute_paths_to_their_last_parts():
    card = {
        "source": "/srv/lab/data/glas (fold 0)",
        "runs": ["/srv/lab/runs/a/stage2/best-loc.pt", "/srv/lab/runs/a/stage2"],
        "recipe": "histo-wsl train-decoder /home/me/patches --out runs/negev",
        "windows": r"C:\Users\me\runs\best.pt",
        "kept": ["µm/px", "https://example.org/a/b", "runs/negev/best-loc.pt", 0.5, None],
    }
    assert portable(card) == {
        "source": "glas (fold 0)",
        "runs": ["stage2/best-loc.pt", "stage2"],
        "recipe": "histo-wsl train-decoder patches --out runs/negev",
        "windows": "runs/best.pt",
        "kept": ["µm/px", "https://example.org/a/b", "runs/negev/best-loc.pt", 0.5, None],
    }


def _strings(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)
    elif isinstance(obj, str):
        yield obj


@pytest.mark.parametrize("folder", sorted(p for p in MODELS.iterdir() if p.is_dir()), ids=str)
def test_shipped_cards_name_no_build_machine_path(folder):
    cards = {
        "card.yaml": yaml.safe_load((folder / "card.yaml").read_text(encoding="utf-8")),
        "model.pt": torch.load(folder / "model.pt", weights_only=True, map_location="cpu")["card"],
    }
    for where, card in cards.items():
        found = [s for s in _strings(card) if ABSOLUTE.search(s) or s.startswith("/")]
        assert not found, f"{folder.name}/{where} names absolute paths: {found}"


@pytest.mark.parametrize("folder", sorted(p for p in MODELS.iterdir() if p.is_dir()), ids=str)
def test_shipped_cards_say_what_the_model_is_for_and_not_for(folder):
    card = yaml.safe_load((folder / "card.yaml").read_text(encoding="utf-8"))
    inner = torch.load(folder / "model.pt", weights_only=True, map_location="cpu")["card"]
    for c in (card, inner):
        assert c["intended_use"] and c["out_of_scope"] and c["license"] and c["terms"]
        assert c["domain"]["modality"] in ("brightfield", "dark-field")
