"""histo-wsl: weakly-supervised localization for histology whole-slide images.

The Python interface (:mod:`histo_wsl.api`): ``localize``, ``evaluate`` and ``load_model``, imported
on first use so that ``import histo_wsl`` (and ``histo-wsl --help``) stays free of torch. The code
map is ``histo_wsl/README.md``.
"""

from histo_wsl.runtime.lazy import lazy_exports

__version__ = "0.1.0"

#: public name → the module of this package that defines it
_EXPORTS = {
    "evaluate": "api",
    "load_model": "api",
    "localize": "api",
}

__all__ = ["__version__", *sorted(_EXPORTS)]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
