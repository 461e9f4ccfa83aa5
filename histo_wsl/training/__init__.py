"""The training engine every method runs on, and its configuration.

* :mod:`~histo_wsl.training.config` — Training configurations: defaults, a YAML file, then explicit
  flags, in that order.
* :mod:`~histo_wsl.training.engine` — One training engine for every stage: stage-1 classifiers, the
  NEGEV decoder and Max-Min.

The names below are imported from their module on first use, so importing the package is free.
"""

from histo_wsl.runtime.lazy import lazy_exports

#: public name → the module of this package that defines it
_EXPORTS = {
    "DataSettings": "config",
    "FLAT": "config",
    "flatten": "config",
    "KNNSettings": "config",
    "load_config": "config",
    "MaxMinSettings": "config",
    "merge_config": "config",
    "ModelSettings": "config",
    "NEGEVSettings": "config",
    "OptimSettings": "config",
    "RunSettings": "config",
    "save_config": "config",
    "SECTIONS": "config",
    "TrainConfig": "config",
    "Criterion": "engine",
    "FillingSampler": "engine",
    "fit": "engine",
    "LAST_EPOCH": "engine",
    "resolve_device": "engine",
    "seed_everything": "engine",
    "Selection": "engine",
    "Task": "engine",
    "TrainingError": "engine",
    "VAL_ACC": "engine",
    "VALPX_PXAP": "engine",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
