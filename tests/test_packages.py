"""Each package's ``__init__`` names its public objects, and naming them costs no import."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "histo_wsl"
PACKAGES = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())


@pytest.mark.parametrize("name", [p for p in PACKAGES if p != "cli"])
def test_every_exported_name_resolves_to_its_modules_object(name):
    pkg = importlib.import_module(f"histo_wsl.{name}")
    assert pkg.__all__, f"histo_wsl.{name} names no public object"
    for export in pkg.__all__:
        obj = getattr(pkg, export)
        module = getattr(obj, "__module__", None)
        if module is not None and module.startswith("histo_wsl."):  # classes and functions
            assert module == pkg.__name__ or module.startswith(f"{pkg.__name__}."), export


def test_importing_the_packages_imports_neither_torch_nor_openslide():
    code = (
        "import sys\n"
        + "".join(f"import histo_wsl.{p}\n" for p in PACKAGES)
        + "print(' '.join(m for m in ('torch', 'openslide', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
