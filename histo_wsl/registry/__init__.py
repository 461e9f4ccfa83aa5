"""Models on disk: the checkpoint format, names and search paths, fp16 export.

* :mod:`~histo_wsl.registry.checkpoint` — histo-wsl checkpoints: one ``.pt`` file with a model card,
  loaded without running code.
* :mod:`~histo_wsl.registry.export` — Export a trained checkpoint as a named model folder: fp16
  weights, its card, a prediction check.
* :mod:`~histo_wsl.registry.registry` — The model registry: shipped and user models, referred to by
  name wherever a checkpoint is taken.

The names below are imported from their module on first use, so importing the package is free.
"""

from histo_wsl.runtime.lazy import lazy_exports

#: public name → the module of this package that defines it
_EXPORTS = {
    "FORMAT": "checkpoint",
    "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "CardText": "export",
    "check_name": "export",
    "compact_state_dict": "export",
    "export_model": "export",
    "EXPORT_TOLERANCE": "export",
    "ExportResult": "export",
    "plain": "export",
    "portable": "export",
    "read_metrics": "export",
    "SHIPPED_MAX_MB": "export",
    "CARD_FILE": "registry",
    "card_of": "registry",
    "DEFAULT_FILE": "registry",
    "default_model": "registry",
    "display_stem": "registry",
    "ENV_VAR": "registry",
    "find_model": "registry",
    "MODEL_FILE": "registry",
    "ModelEntry": "registry",
    "ModelRoot": "registry",
    "Registry": "registry",
    "resolve_model": "registry",
    "search_path": "registry",
    "user_dir": "registry",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
