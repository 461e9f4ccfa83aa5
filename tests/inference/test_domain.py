"""The training-domain check before a slide is mapped (histo_wsl.inference.domain)."""

from pathlib import Path

import numpy as np
import pytest

from histo_wsl.errors import InputError
from histo_wsl.inference.domain import check_domain, illumination


def test_brightfield_and_dark_field_are_told_apart():
    glass = np.full((64, 64, 3), 240, np.uint8)
    glass[20:40, 20:40] = (150, 60, 140)  # H&E-like tissue on glass
    assert illumination(glass)["kind"] == "brightfield"
    tissue_only = np.full((64, 64, 3), (200, 120, 190), np.uint8)  # a crop with no glass
    assert illumination(tissue_only)["kind"] == "brightfield"
    dapi = np.zeros((64, 64, 3), np.uint8)
    dapi[10:20, 10:20] = (0, 0, 255)
    assert illumination(dapi) == {"kind": "dark-field", "p90_luminance": 0.0}


def test_check_domain_follows_the_card_and_force():
    dapi = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(InputError, match="--force"):
        check_domain(dapi, {}, Path("s.ndpi"), force=False)  # no domain: brightfield
    record, notes = check_domain(dapi, {}, Path("s.ndpi"), force=True)
    assert record["forced"] and notes
    fluo = {"domain": {"modality": "dark-field", "stain": "DAPI"}}
    assert check_domain(dapi, fluo, Path("s.ndpi"), force=False) == (
        {"model_modality": "dark-field", "kind": "dark-field", "p90_luminance": 0.0},
        [],
    )


@pytest.mark.shared
def test_the_dapi_ndpi_is_dark_field_and_cmu_brightfield(wsi_dir):
    from histo_wsl.slideio.slide import open_slide, read_thumbnail

    kinds = {}
    for name in ("test3-DAPI-2-(387).ndpi", "cmu-1-small-region.svs"):
        with open_slide(wsi_dir / name, mpp=0.5) as slide:
            thumb, _ = read_thumbnail(slide, min_size=256, max_size=1024)
        kinds[name] = illumination(thumb)["kind"]
    assert kinds == {
        "test3-DAPI-2-(387).ndpi": "dark-field",
        "cmu-1-small-region.svs": "brightfield",
    }
