"""Shared fixtures: synthetic slides with known tissue, and the real data in ../shared when present."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
WSI_DIR = SHARED / "data" / "wsi"


@pytest.fixture(scope="session")
def wsi_dir() -> Path:
    """The real slides of ../shared/data/wsi (the test is skipped when they are absent)."""
    if not WSI_DIR.is_dir():
        pytest.skip(f"real slides not available ({WSI_DIR} is absent)")
    return WSI_DIR


@pytest.fixture(scope="session")
def layout():
    """A 3000x2000 px layout at 0.5 µm/px: two tissue sections (one faint) with glands."""
    from histo_wsl.synthetic.slides import make_layout

    return make_layout(3000, 2000, mpp=0.5, n_sections=2, faint_sections=1, seed=3)


@pytest.fixture(scope="session")
def synthetic_slide(tmp_path_factory, layout) -> Path:
    """The layout written as a pyramidal tiled TIFF with resolution tags."""
    from histo_wsl.synthetic.slides import write_pyramid_tiff

    return write_pyramid_tiff(tmp_path_factory.mktemp("slides") / "synth.tif", layout)


@pytest.fixture(scope="session")
def synthetic_slide_no_mpp(tmp_path_factory) -> Path:
    """A small pyramidal TIFF without resolution metadata."""
    from histo_wsl.synthetic.slides import make_layout, write_pyramid_tiff

    lay = make_layout(1200, 1000, mpp=0.5, n_sections=1, seed=5)
    return write_pyramid_tiff(tmp_path_factory.mktemp("nompp") / "nompp.tif", lay, mpp_tags=False)


@pytest.fixture(scope="session")
def blank_slide(tmp_path_factory) -> Path:
    """A pyramidal TIFF of empty glass (no tissue)."""
    from histo_wsl.synthetic.slides import make_layout, write_pyramid_tiff

    lay = make_layout(1500, 1200, mpp=0.5, n_sections=0, seed=1)
    return write_pyramid_tiff(tmp_path_factory.mktemp("blank") / "blank.tif", lay)


@pytest.fixture()
def corrupt_slide(tmp_path, synthetic_slide) -> Path:
    """A copy of the synthetic slide cut to a third of its bytes (a truncated download)."""
    data = synthetic_slide.read_bytes()
    path = tmp_path / "truncated.tif"
    path.write_bytes(data[: len(data) // 3])
    return path


@pytest.fixture()
def not_a_slide(tmp_path) -> Path:
    """A file with a slide's suffix that is not a slide."""
    path = tmp_path / "notes.svs"
    path.write_bytes(b"this is a text file, not a slide\n" * 20)
    return path


def pytest_collection_modifyitems(config, items):
    """Mark every test that uses real data from ../shared, so `-m shared` / `-m "not shared"` work."""
    for item in items:
        if "wsi_dir" in getattr(item, "fixturenames", ()) or "glas_dir" in getattr(
            item, "fixturenames", ()
        ):
            item.add_marker(pytest.mark.shared)
