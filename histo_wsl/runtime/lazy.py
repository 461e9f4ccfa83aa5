"""Package namespaces that name their modules' public objects without importing them up front.

Each package's ``__init__`` lists its public names and the module each comes from, so
``from histo_wsl.inference import Predictor`` works and a reader sees a package's interface in one
place; the module is imported on first use only, so ``histo-wsl --help`` (which imports the CLI
and a few light modules) never pays for torch (PEP 562 module ``__getattr__``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, exports: dict[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``, whose ``exports`` map name → module.

    Args:
        package: the package's ``__name__``.
        exports: each public name and the module of the package that defines it (``"predictor"``
            for ``histo_wsl.inference.predictor``).
    """

    def __getattr__(name: str) -> Any:  # noqa: N807 (the module-level hook PEP 562 names)
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    def __dir__() -> list[str]:  # noqa: N807
        return sorted(exports)

    return __getattr__, __dir__
