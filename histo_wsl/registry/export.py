"""Export a trained checkpoint as a named model folder: fp16 weights, its card, a prediction check.

:func:`export_model` re-saves a checkpoint's weights in fp16 (floating tensors fp16 cannot hold stay
fp32: :func:`compact_state_dict`), writes ``card.yaml`` from the checkpoint's card plus the zoo
fields (description, recipe, evaluation read from a ``metrics.json``, terms) with the build
machine's absolute paths cut to their last parts (:func:`portable`), checks that the copy
predicts as the source does (within :data:`EXPORT_TOLERANCE`) and swaps the folder in atomically.
It loads the model through the predictor, so it sits above inference in the layers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from histo_wsl import __version__
from histo_wsl.errors import InputError
from histo_wsl.registry.registry import (
    CARD_FILE,
    MODEL_FILE,
    NAME_RE,
    resolve_model,
    user_dir,
)
from histo_wsl.runtime.atomic import shared_mode

__all__ = [
    "EXPORT_TOLERANCE",
    "SHIPPED_MAX_MB",
    "BankEdit",
    "CardText",
    "ExportResult",
    "check_name",
    "compact_state_dict",
    "export_model",
    "plain",
    "portable",
    "read_metrics",
]

#: Largest magnitude fp16 holds; floating tensors beyond it stay fp32 on export.
FP16_MAX = 65504.0

#: Above this, the exported copy's predictions are reported as differing from the source's.
EXPORT_TOLERANCE = 0.02


#: Size a shipped model should stay under (issue 9).
SHIPPED_MAX_MB = 60.0


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
        notes: warnings (size, prediction difference, an evaluation dropped).
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


#: An absolute path inside a string: POSIX (two components or more) or Windows (``C:\\...``).
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~:/])(?:/[\w.+@-]+){2,}|\b[A-Za-z]:\\[^\s:*?\"<>|]+")


def _short_path(match: re.Match) -> str:
    """A path by its last parts: ``parent/name`` for a file, ``name`` for a folder."""
    parts = [p for p in re.split(r"[\\/]", match.group(0)) if p]
    if "." in parts[-1] and len(parts) > 1:
        return "/".join(parts[-2:])
    return parts[-1]


def portable(obj: Any) -> Any:
    """A card without the exporting machine's absolute paths (they mean nothing elsewhere).

    Each absolute path in a string is cut to its last parts (``/data/runs/a/stage2/best-loc.pt``
    -> ``stage2/best-loc.pt``, ``/data/glas (fold 0)`` -> ``glas (fold 0)``), so a shipped card
    still says which run and dataset it came from without naming a home folder.
    """
    if isinstance(obj, dict):
        return {k: portable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [portable(v) for v in obj]
    if isinstance(obj, str):
        return _ABSOLUTE_PATH.sub(_short_path, obj)
    return obj


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
    "intended_use",
    "out_of_scope",
    "domain",
    "license",
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
    "evaluation_slide",
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


@dataclass(frozen=True)
class CardText:
    """What a model card says in words, beside what the checkpoint records (model-card style).

    Attributes:
        description: what the model is, in a sentence or two.
        recipe: the exact command(s) that trained it.
        terms: terms of use of the weights and their training data (citation, restrictions).
        license: the weights' licence (an SPDX identifier or a short name).
        intended_use: what the model is for (task, data, users).
        out_of_scope: uses it is not meant for (e.g. clinical diagnosis, other stains).
        domain: what it was trained on: ``modality`` (``brightfield``...), ``stain``, ``tissue``;
            ``localize`` checks slides against ``modality``.
    """

    description: str | None = None
    recipe: str | None = None
    terms: str | None = None
    license: str | None = None
    intended_use: str | None = None
    out_of_scope: str | None = None
    domain: dict | None = None

    def fields(self) -> dict:
        """The card fields given (None left out)."""
        return {k: v for k, v in self.__dict__.items() if v is not None}


def _check_destination(final: Path, overwrite: bool) -> None:
    """Refuse to replace a model without ``overwrite``, or anything that is not a model folder."""
    if (final.exists() or final.is_symlink()) and not overwrite:
        raise InputError(
            "a model of that name exists; add --overwrite to replace it or choose another --name",
            final,
        )
    if final.exists() and not final.is_dir():
        raise InputError(
            "exists and is not a model folder; remove it or choose another name", final
        )


@dataclass(frozen=True)
class BankEdit:
    """Changes to a k-NN refiner's bank made on export (none by default).

    Attributes:
        pixels: keep at most this many bank pixels, the same number from each training image (a
            faster lookup; :func:`histo_wsl.methods.knn.compact_refiner`).
        k: neighbours per pixel of the compacted bank (default: scaled with the bank).
        slide_keys: the model's training data: the bank's image pixels are keyed again from its
            training images read as ``localize`` reads a slide and valued by the model's own
            map averaged over its flips, after any compaction and before any glass
            (:func:`histo_wsl.methods.knn.refiner_keyed_as_slides`).
        glass: the model's training data: its training images placed on glass give the bank
            glass pixels valued 0, after any compaction
            (:func:`histo_wsl.methods.knn.refiner_with_glass`); glass it held is drawn again.
        glass_share: glass pixels per image pixel of the bank with ``glass`` (default
            :data:`histo_wsl.methods.knn.GLASS_SHARE`).
        stages: with ``slide_keys``: the keys from the encoder's last ``stages`` stages
            instead of the card's; with it or ``dims`` the projections are fitted again and the
            bank's glass is drawn again (``glass`` needed when it has glass).
        dims: with ``slide_keys``: principal axes per stage of the keys instead of the card's.
        grid: with ``slide_keys``: keys and lookups on a grid this many times finer than the
            CAM layer's (refitted and glass drawn again, as ``stages``).
        alpha: the k-NN map's weight in the refined map, ``(1 − alpha)·own map + alpha·k-NN
            map`` (:func:`histo_wsl.methods.knn.refiner_with_alpha`), set before the other
            edits, so that ``slide_keys`` values the bank by the map with this weight.
    """

    pixels: int | None = None
    k: int | None = None
    glass: Path | None = None
    slide_keys: Path | None = None
    glass_share: float | None = None
    stages: int | None = None
    dims: int | None = None
    grid: int | None = None
    alpha: float | None = None


def _source(
    ckpt: dict, src: Path, knn: BankEdit, given: dict[str, dict], mask_range: Path | None = None
) -> tuple[dict, dict, list[str]]:
    """The checkpoint's card and weights, changed as ``knn`` and ``mask_range`` ask, and notes.

    The options are checked before any of the (slower) bank edits runs. A changed bank
    changes the predictions: the card's evaluations then go, with a note for each not
    ``given`` again; a window range measured again changes a slide's, not an image's
    (``evaluation_slide`` goes).
    """
    if knn.glass_share is not None:
        if knn.glass is None:
            raise InputError("--knn-glass-share needs --knn-glass (the training data)", src)
        from histo_wsl.methods.knn import check_glass_share

        check_glass_share(knn.glass_share)
    card, state = dict(ckpt["card"]), ckpt["state_dict"]
    if knn.stages is not None or knn.dims is not None or knn.grid is not None:
        _check_refit(card, knn, src)
    if knn.alpha is not None:
        from histo_wsl.methods.knn import refiner_with_alpha

        card = refiner_with_alpha(card, knn.alpha, src)
    if mask_range is not None:  # the model's own map: the bank does not enter it
        if card.get("method") == "cam":
            from histo_wsl.methods.cam import with_cam_range

            card = with_cam_range(card, state, mask_range, src)
        else:
            from histo_wsl.methods.maxmin import with_mask_range

            card = with_mask_range(card, state, mask_range, src)
    if knn.pixels is not None or knn.k is not None:
        from histo_wsl.methods.knn import compact_refiner

        refine = card.get("refine") or {}
        pixels = knn.pixels if knn.pixels is not None else refine.get("bank_pixels")
        card, state = compact_refiner(card, state, int(pixels or 0), knn.k, src)
    if knn.slide_keys is not None:
        from histo_wsl.methods.knn import refiner_keyed_as_slides

        card, state = refiner_keyed_as_slides(
            card, state, knn.slide_keys, src, knn.stages, knn.dims, knn.grid
        )
    if knn.glass is not None:
        from histo_wsl.methods.knn import GLASS_SHARE, refiner_with_glass

        share = GLASS_SHARE if knn.glass_share is None else knn.glass_share
        card, state = refiner_with_glass(card, state, knn.glass, src, share)
    changed = _map_changes(ckpt, card, state)
    if changed:
        card, notes = _without_evaluations(
            card, given, ("evaluation", "evaluation_slide"), " and ".join(changed)
        )
        return card, state, notes
    if mask_range is not None:
        card, notes = _without_evaluations(
            card, given, ("evaluation_slide",), "the window range was measured again"
        )
        return card, state, notes
    return card, state, []


def _map_changes(ckpt: dict, card: dict, state: dict) -> list[str]:
    """What in ``card`` and ``state`` changes the map of the checkpoint ``ckpt``, in words.

    A new window range is not in it: it changes a slide's windows, not an image's map.
    """

    def alpha(c: dict) -> float | None:
        return (c.get("refine") or {}).get("alpha")

    return [
        why
        for why, yes in (
            ("the k-NN bank changed", state is not ckpt["state_dict"]),
            ("the k-NN map's weight changed", alpha(card) != alpha(ckpt["card"])),
        )
        if yes
    ]


def _check_refit(card: dict, knn: BankEdit, src: Path) -> None:
    """``--knn-stages`` / ``--knn-dims`` / ``--knn-grid`` come with the data, and glass again."""
    given = {"--knn-stages": knn.stages, "--knn-dims": knn.dims, "--knn-grid": knn.grid}
    option = next(name for name, value in given.items() if value is not None)
    if knn.slide_keys is None:
        raise InputError(
            f"{option} needs --knn-slide-keys (the training data: the bank's pixels are keyed "
            "again from the training images)",
            src,
        )
    if (card.get("refine") or {}).get("glass") and knn.glass is None:
        raise InputError(
            f"{option} keys the bank anew, so its glass (keyed the old way) is dropped; add "
            "--knn-glass with the training data to draw it again",
            src,
        )


def _exported_card(
    source_card: dict, name: str, text: CardText | None, evaluations: dict[str, dict]
) -> dict:
    """The source's card with the name, the written sections and the evaluations."""
    card = dict(source_card)
    card["name"] = name
    fields = (text or CardText()).fields()
    # the domain's entries given now complete the checkpoint's (a re-export keeps its stain)
    domain = {**(card.get("domain") or {}), **fields.pop("domain", {})}
    domain.setdefault("modality", "brightfield")
    card.update(fields, domain=domain)
    card.update(evaluations)
    return card


def _without_evaluations(
    card: dict, given: dict[str, dict], keys: tuple[str, ...], why: str
) -> tuple[dict, list[str]]:
    """``card`` less its evaluations ``keys`` (stale since ``why``).

    With a note when one of them is not ``given`` again.
    """
    stale = [key for key in keys if key in card]
    card = {k: v for k, v in card.items() if k not in stale}
    missing = [key for key in stale if key not in given]
    if not missing:
        return card, []
    again = " / ".join(
        {"evaluation": "--metrics", "evaluation_slide": "--slide-metrics"}[k] for k in missing
    )
    return card, [
        f"the source card's {' and '.join(missing)} "
        f"{'were' if len(missing) > 1 else 'was'} measured before {why} and "
        f"{'are' if len(missing) > 1 else 'is'} dropped; evaluate the export and export it "
        f"again with {again}"
    ]


def _export_record(src: Path, kept_fp32: list[str]) -> dict:
    """The card's ``exported``: from where, when, with which versions."""
    import torch

    return {
        "from": str(src),
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "histo-wsl": __version__,
        "torch": str(torch.__version__),
        "kept_fp32": kept_fp32,
    }


def export_model(
    source: str | Path,
    name: str,
    dest: Path | None = None,
    *,
    fp16: bool = True,
    text: CardText | None = None,
    metrics: Path | None = None,
    slide_metrics: Path | None = None,
    overwrite: bool = False,
    knn: BankEdit | None = None,
    mask_range: Path | None = None,
) -> ExportResult:
    """Write ``<dest>/<name>/`` (``model.pt`` + ``card.yaml``): a compact copy of a checkpoint.

    The copy keeps the checkpoint's card (plus ``name``, the given fields and the export record;
    less its evaluations when ``knn`` changes the bank, since they no longer describe it),
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
        text: the card's written sections (description, recipe, terms, licence, intended use,
            out of scope, domain): :class:`CardText`.
        metrics: a JSON file of evaluation numbers (e.g. evaluate's ``metrics.json``).
        slide_metrics: a JSON file of the model's numbers as labs run it, on a slide (e.g.
            ``benchmarks/glas_slide.py``'s output): the card's ``evaluation_slide``.
        overwrite: replace an existing model folder of that name.
        knn: changes to the k-NN refiner (:class:`BankEdit`); the predictions are then
            checked against the changed source.
        mask_range: the model's training data: the window range of a Max-Min model's mask or a
            stage-1 model's CAMs is measured again on it
            (:func:`histo_wsl.methods.maxmin.with_mask_range`,
            :func:`histo_wsl.methods.cam.with_cam_range`).

    Raises:
        InputError: a bad name or source, an unreadable metrics file, an existing model without
            ``overwrite``, or a destination that cannot be written.
    """
    from histo_wsl.registry.checkpoint import load_checkpoint, save_checkpoint

    check_name(name)
    dest = Path(dest).expanduser() if dest is not None else user_dir()
    final = dest / name
    _check_destination(final, overwrite)
    src = resolve_model(source)
    evaluations = {"evaluation": metrics, "evaluation_slide": slide_metrics}
    evaluations = {k: read_metrics(v) for k, v in evaluations.items() if v is not None}
    ckpt = load_checkpoint(src)
    source_card, source_state, notes = _source(
        ckpt, src, knn or BankEdit(), evaluations, mask_range
    )
    state, kept = compact_state_dict(source_state, fp16=fp16)
    dtype = "float16" if fp16 else "float32"
    card = _exported_card(source_card, name, text, evaluations)
    card["weights_dtype"] = dtype
    card["exported"] = _export_record(src, kept)
    try:
        dest.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=dest))
    except OSError as exc:
        raise InputError(f"the models folder cannot be written ({exc.strerror})", dest) from None
    try:
        card = portable(plain(card))
        weights = save_checkpoint(staging / MODEL_FILE, card, state)
        card["weights"] = {
            "file": MODEL_FILE,
            "dtype": dtype,
            "bytes": weights.stat().st_size,
            "sha256": _sha256(weights),
        }
        (staging / CARD_FILE).write_text(_card_yaml(card), encoding="utf-8")
        _share(staging)
        reference = src
        if _map_changes(ckpt, source_card, source_state):  # compared with the changed source
            reference = save_checkpoint(staging / "reference.pt", source_card, source_state)
        max_diff = _prediction_diff(reference, weights, card)
        if reference != src:
            reference.unlink()
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
