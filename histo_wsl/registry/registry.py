"""The model registry: shipped and user models, referred to by name wherever a checkpoint is taken.

Layout (one folder per model, under any *models root*)::

    <root>/DEFAULT                    optional: one line, the name of the default model
    <root>/<name>/card.yaml           the human-readable model card
    <root>/<name>/model.pt            the histo-wsl checkpoint (weights, usually fp16, + its card)

``model.pt`` carries its own card (DESIGN.md §3) and is what inference uses; ``card.yaml`` is
written from it by :func:`export_model` (plus the zoo fields: description, recipe, evaluation,
terms, weights) so that the model can be read about, and listed, without loading torch.

Roots are searched in this order; the first folder holding a name wins (later ones are listed as
shadowed), and the first root with a ``DEFAULT`` file declares the default model:

1. the folders in ``HISTO_WSL_MODELS`` (``os.pathsep``-separated), in order;
2. the user folder: ``$XDG_DATA_HOME/histo-wsl/models`` (``~/.local/share/histo-wsl/models``);
3. the shipped folder: the repository's top-level ``models/`` (a source checkout or an editable
   install; a wheel ships none).

A model reference (``--model`` of ``localize``, the checkpoints of ``evaluate``) is an existing
path (a ``.pt`` file, or a model folder holding ``model.pt``) or else an installed model's name.

Nothing here imports torch except :func:`export_model` and the card of a ``.pt`` in
:func:`card_of`; listing models stays fast.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from histo_wsl import __version__
from histo_wsl.errors import InputError
from histo_wsl.runtime.atomic import shared_mode

__all__ = [
    "CARD_FILE",
    "DEFAULT_FILE",
    "ENV_VAR",
    "MODEL_FILE",
    "ExportResult",
    "ModelEntry",
    "ModelRoot",
    "Registry",
    "card_of",
    "default_model",
    "display_stem",
    "export_model",
    "find_model",
    "plain",
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
#: Largest magnitude fp16 holds; floating tensors beyond it stay fp32 on export.
FP16_MAX = 65504.0
#: Above this, the exported copy's predictions are reported as differing from the source's.
EXPORT_TOLERANCE = 0.02
#: Size a shipped model should stay under (issue 9).
SHIPPED_MAX_MB = 60.0


def _repo_models_dir() -> Path | None:
    """The repository's ``models/`` folder when the package runs from a source checkout."""
    root = Path(__file__).resolve().parents[1]
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


@dataclass
class ExportResult:
    """What :func:`export_model` wrote.

    Attributes:
        folder: the model folder.
        weights: its ``model.pt``.
        card: its ``card.yaml``.
        source_mb: size of the source checkpoint (MB).
        size_mb: size of ``model.pt`` (MB).
        dtype: ``float16`` or ``float32``.
        kept_fp32: floating tensors left in fp32 (values beyond fp16's range).
        max_diff: largest difference of foreground probability / class probability between the
            copy and the source on a fixed random input.
        notes: warnings (size, prediction difference).
    """

    folder: Path
    weights: Path
    card: Path
    source_mb: float
    size_mb: float
    dtype: str
    kept_fp32: list[str]
    max_diff: float
    notes: list[str]

    def as_dict(self) -> dict:
        """JSON-ready."""
        return {
            "folder": str(self.folder),
            "weights": str(self.weights),
            "card": str(self.card),
            "source_mb": round(self.source_mb, 3),
            "size_mb": round(self.size_mb, 3),
            "dtype": self.dtype,
            "kept_fp32": self.kept_fp32,
            "max_prediction_diff": self.max_diff,
            "notes": self.notes,
        }


def compact_state_dict(state_dict: dict, fp16: bool = True) -> tuple[dict, list[str]]:
    """Floating tensors in fp16 (integer buffers untouched); tensors fp16 cannot hold stay fp32.

    Returns:
        (the new state dict, names of floating tensors kept in fp32).
    """
    import torch

    out, kept = {}, []
    for key, t in state_dict.items():
        if fp16 and isinstance(t, torch.Tensor) and t.is_floating_point():
            t32 = t.detach().float()
            if t32.numel() and (
                not bool(torch.isfinite(t32).all()) or float(t32.abs().max()) > FP16_MAX
            ):
                kept.append(key)
                out[key] = t.detach().clone()
            else:
                out[key] = t.detach().to(torch.float16).clone()
        else:
            out[key] = t.detach().clone() if isinstance(t, torch.Tensor) else t
    return out, kept


def plain(obj: Any) -> Any:
    """YAML/JSON-ready copy: tuples -> lists, paths and other objects -> str."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def read_metrics(path: Path) -> dict:
    """Evaluation numbers for the card from a JSON file.

    ``histo-wsl evaluate``'s ``metrics.json`` (one model) gives its headline numbers with their
    95% intervals and the data they were measured on; any other JSON object is kept as it is.

    Raises:
        InputError: unreadable, not JSON, not an object, or an evaluate file with several models.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"the metrics file cannot be read ({exc.strerror})", path) from None
    except json.JSONDecodeError as exc:
        raise InputError(f"the metrics file is not valid JSON ({exc.msg})", path) from None
    if not isinstance(data, dict):
        raise InputError("the metrics file is not a JSON object", path)
    models = data.get("models")
    if not (isinstance(models, list) and isinstance(data.get("data"), dict)):
        return plain(data)
    if len(models) != 1:
        raise InputError(
            f"an evaluate metrics.json of {len(models)} models (--compare); give the metrics.json "
            "of an evaluation of this model alone",
            path,
        )
    m, d = models[0], data["data"]
    loc = m.get("localization") or {}
    at_card = (loc.get("at_threshold") or {}).get("card") or {}
    f1 = loc.get("f1") or {}

    def pick(entry: Any) -> Any:
        if isinstance(entry, dict) and "value" in entry:
            return {k: entry[k] for k in ("value", "ci95") if k in entry}
        return entry

    out = {
        "data": {k: d.get(k) for k in ("source", "split", "n_images") if k in d},
        "pxap": pick(loc.get("pxap")),
        "f1_pos": pick(f1.get("f1_pos")),
        "f1_neg": pick(f1.get("f1_neg")),
        "threshold": at_card.get("threshold"),
        "dice_fg": pick(at_card.get("dice_fg")),
        "miou": pick(at_card.get("miou")),
        "accuracy": pick((m.get("classification") or {}).get("accuracy")),
        "file": str(path),
    }
    return plain({k: v for k, v in out.items() if v is not None})


#: The card's fields shown first in card.yaml; the rest follow in the checkpoint's order.
_CARD_ORDER = (
    "name",
    "description",
    "method",
    "backbone",
    "head",
    "cam_method",
    "tta",
    "class_names",
    "negative_class",
    "num_classes",
    "input_size",
    "mpp",
    "data_mpp",
    "threshold",
    "calibration",
    "normalization",
    "recipe",
    "seed",
    "selected_by",
    "epoch",
    "metrics",
    "evaluation",
    "terms",
    "training_data",
    "weights",
    "weights_dtype",
    "exported",
)

_CARD_HEADER = """\
# histo-wsl model card, written by `histo-wsl models export` from the card inside model.pt.
# model.pt's own card is what inference uses (method, classes, mpp, threshold...): editing this
# file changes what `histo-wsl models` shows, not what the model does; export again instead.
"""


def _card_yaml(card: dict) -> str:
    import yaml

    ordered = {k: card[k] for k in _CARD_ORDER if k in card}
    ordered.update({k: v for k, v in card.items() if k not in ordered})
    body = yaml.safe_dump(
        plain(ordered), sort_keys=False, allow_unicode=True, default_flow_style=None, width=100
    )
    return _CARD_HEADER + body


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _prediction_diff(a: Path, b: Path, card: dict) -> float:
    """Largest difference of the two checkpoints' maps and class probabilities on a fixed input."""
    import torch

    from histo_wsl.inference.predictor import load_model

    size = int(card.get("input_size") or 224)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    outputs = []
    for path in (a, b):
        torch.manual_seed(0)  # the noise of smoothgradcampp
        logits, maps = load_model(path).predict(x)
        outputs.append((logits.float().softmax(1), maps.float()))
    (p1, m1), (p2, m2) = outputs
    return max(float((p1 - p2).abs().max()), float((m1 - m2).abs().max()))


def _share(folder: Path) -> None:
    """Give the folder and its files the umask's usual modes (temporary files are owner-only)."""
    shared_mode(folder)
    for f in folder.iterdir():
        shared_mode(f)


def _swap_in(staging: Path, final: Path) -> None:
    """Replace the folder ``final`` by ``staging``; on failure ``final`` is put back."""
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
    os.replace(final, old / final.name)
    try:
        os.replace(staging, final)
    except OSError:
        os.replace(old / final.name, final)
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)


def check_name(name: str) -> str:
    """``name`` if it can name a model folder.

    Raises:
        InputError: not lower-case letters, digits, '.', '_', '-' (1-64 characters).
    """
    if not NAME_RE.match(name or ""):
        raise InputError(
            f"--name {name!r}: use 1-64 lower-case letters, digits, '.', '_' or '-', starting "
            "with a letter or digit (e.g. glas-negev-mobilenetv2)"
        )
    return name


def export_model(
    source: str | Path,
    name: str,
    dest: Path | None = None,
    *,
    fp16: bool = True,
    description: str | None = None,
    recipe: str | None = None,
    metrics: Path | None = None,
    terms: str | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Write ``<dest>/<name>/`` (``model.pt`` + ``card.yaml``): a compact copy of a checkpoint.

    The copy keeps the checkpoint's card (plus ``name``, the given fields and the export record),
    drops the training state of a resumable ``last.pt``, and stores floating tensors in fp16
    (integer buffers untouched; :func:`histo_wsl.registry.checkpoint.load_checkpoint` casts them back to
    fp32). The folder is assembled under a hidden staging name and renamed into place, so no
    partial folder ever carries the final name; then the copy is loaded back and its predictions
    are compared with the source's on a fixed random input.

    Args:
        source: a checkpoint (or an installed model's name).
        name: the model's name (its folder).
        dest: the models root to write in (default: the user folder, :func:`user_dir`).
        fp16: store floating weights in fp16 (about half the size).
        description: one or two sentences about the model.
        recipe: the exact command(s) that trained it.
        metrics: a JSON file of evaluation numbers (e.g. evaluate's ``metrics.json``).
        terms: terms of use of the weights and their training data (licence, citation).
        overwrite: replace an existing model folder of that name.

    Raises:
        InputError: a bad name or source, an unreadable metrics file, an existing model without
            ``overwrite``, or a destination that cannot be written.
    """
    import torch

    from histo_wsl.registry.checkpoint import load_checkpoint, save_checkpoint

    check_name(name)
    dest = Path(dest).expanduser() if dest is not None else user_dir()
    final = dest / name
    if (final.exists() or final.is_symlink()) and not overwrite:
        raise InputError(
            "a model of that name exists; add --overwrite to replace it or choose another --name",
            final,
        )
    if final.exists() and not final.is_dir():
        raise InputError(
            "exists and is not a model folder; remove it or choose another name", final
        )
    src = resolve_model(source)
    evaluation = read_metrics(metrics) if metrics is not None else None
    ckpt = load_checkpoint(src)
    state, kept = compact_state_dict(ckpt["state_dict"], fp16=fp16)
    dtype = "float16" if fp16 else "float32"
    card = dict(ckpt["card"])
    card["name"] = name
    for key, value in (("description", description), ("recipe", recipe), ("terms", terms)):
        if value is not None:
            card[key] = value
    if evaluation is not None:
        card["evaluation"] = evaluation
    card["weights_dtype"] = dtype
    card["exported"] = {
        "from": str(src),
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "histo-wsl": __version__,
        "torch": str(torch.__version__),
        "kept_fp32": kept,
    }
    try:
        dest.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=dest))
    except OSError as exc:
        raise InputError(f"the models folder cannot be written ({exc.strerror})", dest) from None
    try:
        weights = save_checkpoint(staging / MODEL_FILE, plain(card), state)
        card["weights"] = {
            "file": MODEL_FILE,
            "dtype": dtype,
            "bytes": weights.stat().st_size,
            "sha256": _sha256(weights),
        }
        (staging / CARD_FILE).write_text(_card_yaml(card), encoding="utf-8")
        _share(staging)
        max_diff = _prediction_diff(src, weights, card)
        if final.exists():
            _swap_in(staging, final)
        else:
            os.replace(staging, final)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise InputError(f"the model folder cannot be written ({exc})", final) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    size_mb = (final / MODEL_FILE).stat().st_size / 1e6
    notes = []
    if max_diff > EXPORT_TOLERANCE:
        notes.append(
            f"the exported copy's predictions differ from the source's by up to {max_diff:.3g} "
            f"(> {EXPORT_TOLERANCE}); check it, or export with --no-fp16"
        )
    if size_mb > SHIPPED_MAX_MB:
        notes.append(
            f"model.pt is {size_mb:.1f} MB, above the {SHIPPED_MAX_MB:g} MB a shipped model "
            "should stay under"
        )
    return ExportResult(
        folder=final,
        weights=final / MODEL_FILE,
        card=final / CARD_FILE,
        source_mb=src.stat().st_size / 1e6,
        size_mb=size_mb,
        dtype=dtype,
        kept_fp32=kept,
        max_diff=round(max_diff, 6),
        notes=notes,
    )
