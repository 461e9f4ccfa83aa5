"""The model registry: shipped and user models, referred to by name wherever a checkpoint is taken.

Layout (one folder per model, under any *models root*)::

    <root>/DEFAULT                    optional: one line, the name of the default model
    <root>/<name>/card.yaml           the human-readable model card
    <root>/<name>/model.pt            the histo-wsl checkpoint (weights, usually fp16, + its card)

``model.pt`` carries its own card (DESIGN.md §3) and is what inference uses; ``card.yaml`` is
written from it by :func:`histo_wsl.registry.export.export_model` (plus the zoo fields: description,
recipe, evaluation, terms, weights) so that the model can be read about, and listed, without loading torch.

Roots are searched in this order; the first folder holding a name wins (later ones are listed as
shadowed), and the first root with a ``DEFAULT`` file declares the default model:

1. the folders in ``HISTO_WSL_MODELS`` (``os.pathsep``-separated), in order;
2. the user folder: ``$XDG_DATA_HOME/histo-wsl/models`` (``~/.local/share/histo-wsl/models``);
3. the shipped folder: the repository's top-level ``models/`` (a source checkout or an editable
   install; a wheel ships none).

A model reference (``--model`` of ``localize``, the checkpoints of ``evaluate``) is an existing
path (a ``.pt`` file, or a model folder holding ``model.pt``) or else an installed model's name.

Nothing here imports torch except to read the card of a ``.pt`` in :func:`card_of`; listing models
stays fast. Writing a model folder (fp16 export with a prediction check) is
:mod:`histo_wsl.registry.export`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from histo_wsl.errors import InputError

__all__ = [
    "CARD_FILE",
    "DEFAULT_FILE",
    "ENV_VAR",
    "MODEL_FILE",
    "ModelEntry",
    "ModelRoot",
    "Registry",
    "card_of",
    "default_model",
    "display_stem",
    "find_model",
    "registry",
    "resolve_model",
    "search_path",
    "user_dir",
]

MODEL_FILE = "model.pt"
CARD_FILE = "card.yaml"
DEFAULT_FILE = "DEFAULT"
ENV_VAR = "HISTO_WSL_MODELS"
#: Model names: lower-case letters, digits, '.', '_' and '-', starting with a letter or digit.
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def _repo_models_dir() -> Path | None:
    """The repository's ``models/`` folder when the package runs from a source checkout."""
    root = Path(__file__).resolve().parents[2]  # histo_wsl/registry/registry.py → the checkout
    if (root / "pyproject.toml").is_file():
        return root / "models"
    return None  # an installed wheel: site-packages/models would be somebody else's folder


#: The shipped models' folder (None outside a source checkout / editable install).
SHIPPED_DIR: Path | None = _repo_models_dir()


@dataclass(frozen=True)
class ModelRoot:
    """A folder of model folders, and where it comes from (``env``, ``user`` or ``shipped``)."""

    path: Path
    kind: str


def user_dir() -> Path:
    """The user's models folder: ``$XDG_DATA_HOME/histo-wsl/models`` or ``~/.local/share/...``."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base).expanduser() / "histo-wsl" / "models"


def search_path() -> list[ModelRoot]:
    """The models roots in search order (see module docs); folders that do not exist included."""
    roots: list[ModelRoot] = []
    for part in os.environ.get(ENV_VAR, "").split(os.pathsep):
        if part.strip():
            roots.append(ModelRoot(Path(part.strip()).expanduser(), "env"))
    roots.append(ModelRoot(user_dir(), "user"))
    if SHIPPED_DIR is not None:
        roots.append(ModelRoot(SHIPPED_DIR, "shipped"))
    seen: set[Path] = set()
    unique = []
    for r in roots:
        key = r.path.resolve() if r.path.exists() else r.path
        if key not in seen:
            seen.add(key)
            unique.append(r)
    return unique


def read_card(path: Path) -> dict:
    """A ``card.yaml`` as a dict.

    Raises:
        InputError: missing, unreadable or not a YAML mapping.
    """
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"the model card cannot be read ({exc.strerror})", path) from None
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid YAML"
        raise InputError(
            f"the model card is not valid YAML ({first}); fix it or export the model again", path
        ) from None
    if not isinstance(data, dict):
        raise InputError(
            "the model card is not a YAML mapping; fix it or export the model again", path
        )
    return data


@dataclass
class ModelEntry:
    """One installed model.

    Attributes:
        name: the folder's name (how the model is referred to).
        folder: the model folder.
        root: the models root it was found in.
        card: ``card.yaml`` (empty when unreadable).
        problem: why the model cannot be used (no weights, unreadable card), else None.
        is_default: the default model of ``localize``.
    """

    name: str
    folder: Path
    root: ModelRoot
    card: dict = field(default_factory=dict)
    problem: str | None = None
    is_default: bool = False

    @property
    def weights(self) -> Path:
        """The checkpoint file."""
        return self.folder / MODEL_FILE

    @property
    def size_mb(self) -> float | None:
        """Size of the weights file in MB (10⁶ bytes), None when absent."""
        try:
            return self.weights.stat().st_size / 1e6
        except OSError:
            return None

    def validation(self) -> tuple[str, float] | None:
        """The metric the checkpoint was selected by and its value, if the card records them."""
        key = self.card.get("selected_by")
        value = (self.card.get("metrics") or {}).get(key) if key else None
        if isinstance(value, (int, float)):
            return str(key), float(value)
        return None

    def evaluated(self) -> dict | None:
        """The card's measured PxAP, on images and on a slide; None when it has neither.

        ``pxap``: its ``evaluation`` (e.g. the papers' protocol on the validation images);
        ``slide_pxap``: its ``evaluation_slide``; each None when the card lacks it.
        """
        pxap = ((self.card.get("evaluation") or {}).get("pxap") or {}).get("value")
        slide = (self.card.get("evaluation_slide") or {}).get("slide_pxap")
        numbers = {
            "pxap": float(pxap) if isinstance(pxap, (int, float)) else None,
            "slide_pxap": float(slide) if isinstance(slide, (int, float)) else None,
        }
        return numbers if any(v is not None for v in numbers.values()) else None

    def summary(self) -> dict:
        """JSON-ready row of ``histo-wsl models --json``."""
        c = self.card
        val = self.validation()
        return {
            "name": self.name,
            "default": self.is_default,
            "method": c.get("method"),
            "backbone": c.get("backbone"),
            "classes": c.get("class_names"),
            "negative_class": c.get("negative_class"),
            "mpp": c.get("mpp"),
            "input_size": c.get("input_size"),
            "threshold": c.get("threshold"),
            "validation": None if val is None else {"metric": val[0], "value": val[1]},
            "evaluated": self.evaluated(),
            "weights_dtype": c.get("weights_dtype"),
            "size_mb": None if self.size_mb is None else round(self.size_mb, 2),
            "description": c.get("description"),
            "where": self.root.kind,
            "path": str(self.folder),
            "problem": self.problem,
        }


@dataclass
class Registry:
    """What the search path holds.

    Attributes:
        roots: the models roots in search order.
        models: the usable name of each model (first root wins), in search order then name.
        default: the default model (None: no ``DEFAULT`` file, or it names no installed model).
        notes: shadowed models and a ``DEFAULT`` naming nothing, one line each.
        default_error: why the declared default cannot be used (None: fine or none declared).
    """

    roots: list[ModelRoot]
    models: list[ModelEntry]
    default: ModelEntry | None = None
    notes: list[str] = field(default_factory=list)
    default_error: str | None = None

    def get(self, name: str) -> ModelEntry | None:
        """The model called ``name``, or None."""
        for m in self.models:
            if m.name == name:
                return m
        return None

    def names(self) -> list[str]:
        """Names of the installed models."""
        return [m.name for m in self.models]


def _scan_root(root: ModelRoot) -> list[ModelEntry]:
    if not root.path.is_dir():
        return []
    entries = []
    for folder in sorted(root.path.iterdir()):
        if folder.name.startswith(".") or not folder.is_dir():
            continue  # staging folders of an export in progress, stray files
        has_weights = (folder / MODEL_FILE).is_file()
        has_card = (folder / CARD_FILE).is_file()
        if not has_weights and not has_card:
            continue
        entry = ModelEntry(folder.name, folder, root)
        if has_card:
            try:
                entry.card = read_card(folder / CARD_FILE)
            except InputError as exc:
                entry.problem = str(exc)
        else:
            entry.problem = f"{folder / CARD_FILE}: no model card; export the model again"
        if not has_weights:
            entry.problem = (
                f"{folder / MODEL_FILE}: the weights are missing; add them (histo-wsl models "
                "export) or remove the folder"
            )
        entries.append(entry)
    return entries


def registry() -> Registry:
    """Scan the search path: the installed models, the default and notes about conflicts."""
    roots = search_path()
    reg = Registry(roots, [])
    seen: dict[str, ModelEntry] = {}
    for root in roots:
        for entry in _scan_root(root):
            if entry.name in seen:
                reg.notes.append(
                    f"{entry.folder} is shadowed by {seen[entry.name].folder} (same name; the "
                    f"first folder of the search path wins)"
                )
                continue
            seen[entry.name] = entry
            reg.models.append(entry)
    for root in roots:
        marker = root.path / DEFAULT_FILE
        if not marker.is_file():
            continue
        try:
            name = marker.read_text(encoding="utf-8").strip()
        except OSError as exc:
            reg.default_error = f"{marker}: cannot be read ({exc.strerror})"
            break
        entry = seen.get(name)
        if not name:
            reg.default_error = f"{marker}: empty; write the default model's name in it"
        elif entry is None:
            reg.default_error = (
                f"{marker}: names {name!r}, which is not installed (installed: "
                f"{', '.join(seen) or 'none'}); fix the file or install the model"
            )
        elif entry.problem:
            reg.default_error = f"the default model {name!r} cannot be used: {entry.problem}"
        else:
            entry.is_default = True
            reg.default = entry
        break
    if reg.default_error:
        reg.notes.append(reg.default_error)
    return reg


def find_model(name: str) -> ModelEntry | None:
    """The installed model called ``name`` (first in the search path), or None."""
    return registry().get(name)


def default_model() -> ModelEntry | None:
    """The default model, or None when no models root declares one.

    Raises:
        InputError: a ``DEFAULT`` file names a model that is missing or unusable.
    """
    reg = registry()
    if reg.default_error:
        raise InputError(reg.default_error)
    return reg.default


def _looks_like_path(ref: str) -> bool:
    return (
        "/" in ref
        or os.sep in ref
        or (os.altsep is not None and os.altsep in ref)
        or ref.endswith(".pt")
        or ref.startswith(("~", "."))
    )


def resolve_model(ref: str | Path) -> Path:
    """The checkpoint file a model reference means.

    Args:
        ref: a ``.pt`` file, a model folder holding ``model.pt``, or an installed model's name
            (an existing path wins over a name).

    Returns:
        The ``.pt`` path (for a path that does not exist: the path itself, so that loading it
        gives the usual "checkpoint not found" error).

    Raises:
        InputError: a folder without ``model.pt``, or a name that is neither a file nor an
            installed model.
    """
    path = Path(ref).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if (path / MODEL_FILE).is_file():
            return path / MODEL_FILE
        raise InputError(
            f"a folder without {MODEL_FILE}; give the .pt checkpoint or a model folder", path
        )
    text = str(ref)
    if _looks_like_path(text):
        return path
    reg = registry()
    entry = reg.get(text)
    if entry is None:
        installed = ", ".join(reg.names()) or "none installed"
        raise InputError(
            f"{text!r} is neither a checkpoint file nor an installed model (installed: "
            f"{installed}); give a .pt path, or see `histo-wsl models`"
        )
    if entry.problem:
        raise InputError(f"model {text!r} cannot be used: {entry.problem}")
    return entry.weights


def display_stem(path: Path) -> str:
    """A checkpoint's short name: its stem, or its model folder's name for ``<name>/model.pt``."""
    path = Path(path)
    if path.name == MODEL_FILE and (path.parent / CARD_FILE).is_file():
        return path.parent.name
    return path.stem


def card_of(ref: str | Path) -> tuple[dict, Path]:
    """The card of an installed model (its ``card.yaml``) or of a checkpoint file (torch).

    Returns:
        (card, the file it came from).
    """
    path = Path(ref).expanduser()
    if path.is_dir() and (path / CARD_FILE).is_file():
        return read_card(path / CARD_FILE), path / CARD_FILE
    if not path.exists() and not _looks_like_path(str(ref)):
        reg = registry()
        entry = reg.get(str(ref))
        if entry is not None and (entry.folder / CARD_FILE).is_file():
            return read_card(entry.folder / CARD_FILE), entry.folder / CARD_FILE
    from histo_wsl.registry.checkpoint import load_checkpoint

    target = resolve_model(ref)
    return dict(load_checkpoint(target)["card"]), target


# --------------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------------
