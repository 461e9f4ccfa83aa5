"""Slides of a patch folder as multiple-instance bags: one label per slide, its patches the instances.

:func:`load_bags` reads the ``manifest.csv`` of an ``extract-patches`` folder and groups its
patches by slide. A slide's label is the one label its patches carry (``extract-patches --label``
or a CSV ``label`` column); a slide whose patches disagree, a patch without label, a finished
slide without patches (its ``slide.json`` says 0) and a folder of one class only are refused.
One class is the negative one: its slides are fully negative (every patch is background); every
other class is positive. The validation split is drawn per slide, stratified by slide label and
seeded, as for patch folders read by ``train-classifier``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from histo_wsl.data.sources import _n_val, _read_csv, _resolve_classes
from histo_wsl.errors import InputError

__all__ = ["NEGATIVE_NAMES", "Bag", "BagSet", "load_bags", "patch_geometry", "split_bags"]

#: class names taken as the negative class of a two-class folder when --negative-class is not given
NEGATIVE_NAMES = ("normal", "benign", "negative", "healthy", "non-tumour", "non-tumor", "0")


@dataclass
class Bag:
    """One slide: its label and its patches (the instances).

    Attributes:
        slide: the slide's name (manifest ``slide``).
        label: the slide's class name.
        paths: patch image paths relative to the patch folder, in manifest order.
        rows: the manifest line number of each patch.
        mpps: the manifest's µm/px of each patch (text, as written; blank when read by level).
        split: ``train`` or ``val``.
    """

    slide: str
    label: str
    paths: list[str] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    mpps: list[str] = field(default_factory=list)
    split: str = "train"


@dataclass
class BagSet:
    """The bags of a patch folder, with its classes and which one is negative.

    Attributes:
        folder: the patch folder.
        bags: one per slide, sorted by slide name.
        class_names: the classes, in index order.
        negative_class: the name of the negative class.
        manifest_sha256: hash of ``manifest.csv`` (what cached features were computed from).
        patch: how the patches were cut (:func:`patch_geometry`): what scoring a new slide repeats.
    """

    folder: Path
    bags: list[Bag]
    class_names: list[str]
    negative_class: str
    manifest_sha256: str
    patch: dict = field(default_factory=dict)

    def is_positive(self, bag: Bag) -> bool:
        """Whether a slide is positive (its class is not the negative class)."""
        return bag.label != self.negative_class

    def split(self, name: str) -> list[Bag]:
        """The bags of one split (``train`` or ``val``)."""
        return [b for b in self.bags if b.split == name]

    def paths(self) -> list[str]:
        """Every patch path, bag after bag (the order of the instance features)."""
        return [p for b in self.bags for p in b.paths]

    def describe(self) -> dict:
        """Slides and patches per split and class, for run.json and the model card."""
        out: dict = {
            "source": str(self.folder),
            "classes": list(self.class_names),
            "negative_class": self.negative_class,
        }
        for name in ("train", "val"):
            bags = self.split(name)
            out[name] = {
                c: {
                    "slides": sum(b.label == c for b in bags),
                    "patches": sum(len(b.paths) for b in bags if b.label == c),
                }
                for c in self.class_names
            }
        return out


def patch_geometry(folder: Path, rows: list[dict]) -> dict:
    """How the folder's patches were cut: side (px), µm/px or level, stride, minimum tissue.

    Read from the ``extract-patches`` record (``run.json``'s params) when there is one, else from
    the manifest's rows (the most common side and µm/px; stride = side; the smallest tissue
    fraction kept). ``source`` says which.
    """
    params: dict = {}
    try:
        params = json.loads((folder / "run.json").read_text(encoding="utf-8")).get("params") or {}
    except (OSError, ValueError, AttributeError):
        params = {}
    if params.get("patch_size"):
        return {
            "size": int(params["patch_size"]),
            "mpp": None if params.get("mpp") is None else float(params["mpp"]),
            "level": params.get("level"),
            "stride": int(params.get("stride") or params["patch_size"]),
            "min_tissue": float(params.get("min_tissue") or 0.0),
            "source": "run.json",
        }

    def most_common(key: str) -> str:
        values = [r.get(key) or "" for r in rows]
        return max(set(values), key=values.count) if values else ""

    size = int(most_common("size") or 0) or None
    mpp = most_common("mpp")
    fractions = [float(r["tissue_fraction"]) for r in rows if r.get("tissue_fraction")]
    return {
        "size": size,
        "mpp": float(mpp) if mpp else None,
        "level": None if mpp else int(most_common("level") or 0),
        "stride": size,
        "min_tissue": min(fractions) if fractions else 0.0,
        "source": "manifest.csv",
    }


def _group(rows: list[dict], manifest: Path) -> dict[str, Bag]:
    """Patches grouped by slide; refuses unlabelled patches and slides with mixed labels."""
    bags: dict[str, Bag] = {}
    for i, r in enumerate(rows, start=2):
        slide = r.get("slide", "")
        if not slide:
            raise InputError(f"line {i}: no slide name; re-run extract-patches", manifest)
        if not r.get("label"):
            raise InputError(
                f"slide {slide!r} has no label (line {i}); re-run extract-patches with --label "
                "or a CSV label column, one label per slide",
                manifest,
            )
        bag = bags.setdefault(slide, Bag(slide, r["label"]))
        if r["label"] != bag.label:
            raise InputError(
                f"slide {slide!r} has patches labelled {bag.label!r} and {r['label']!r} (line {i}); "
                "a slide is one bag with one label: fix the manifest's labels for that slide",
                manifest,
            )
        if not r.get("path"):
            raise InputError(
                f"slide {slide!r} has no patch images (line {i}: written with --coords-only?); "
                "re-run extract-patches without --coords-only",
                manifest,
            )
        bag.paths.append(r["path"])
        bag.rows.append(i)
        bag.mpps.append(r.get("mpp") or "")
    return bags


def _empty_slides(folder: Path) -> list[str]:
    """Finished slides of the folder whose record says they gave no patch."""
    empty = []
    for record in sorted(folder.glob("*/slide.json")):
        try:
            item = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if item.get("status") == "done" and item.get("patches") == 0:
            empty.append(str(item.get("name") or record.parent.name))
    return empty


def _negative(names: list[str], negative_class: str | None, manifest: Path) -> str:
    """The negative class: the one given, or the one of two classes with a negative-sounding name."""
    if negative_class is not None:
        if negative_class not in names:
            raise InputError(
                f"--negative-class {negative_class!r} is not one of the slide classes {names}",
                manifest,
            )
        return negative_class
    found = [n for n in names if n.lower() in NEGATIVE_NAMES]
    if len(names) == 2 and len(found) == 1:
        return found[0]
    raise InputError(
        f"which class is negative (its slides hold no region of interest)? the slides' classes "
        f"are {names}: pass --negative-class NAME",
        manifest,
    )


def split_bags(bags: list[Bag], val_fraction: float, seed: int) -> None:
    """Seeded validation split by slide, stratified by slide label (in place).

    Per class, the slides are shuffled with a generator seeded by ``seed`` and the first
    ``round(n × val_fraction)`` (at least one of two or more, never all) go to ``val``, as
    ``train-classifier`` splits a patch folder.
    """
    rng = np.random.default_rng(seed)
    for label in sorted({b.label for b in bags}):
        keys = sorted(b.slide for b in bags if b.label == label)
        rng.shuffle(keys)
        val = set(keys[: _n_val(len(keys), val_fraction)])
        for b in bags:
            if b.label == label:
                b.split = "val" if b.slide in val else "train"


def _read_folder(folder: Path) -> tuple[dict[str, Bag], list[dict], Path]:
    """One ``extract-patches`` folder's bags (paths relative to it), its rows and its manifest."""
    manifest = folder / "manifest.csv"
    if not manifest.is_file():
        raise InputError(
            "no manifest.csv here: give the output folder of histo-wsl extract-patches", folder
        )
    header, rows = _read_csv(manifest)
    missing = [c for c in ("slide", "path", "label") if c not in header]
    if missing:
        raise InputError(
            f"manifest.csv lacks the column(s) {', '.join(missing)}; re-run extract-patches",
            manifest,
        )
    empty = _empty_slides(folder)
    if empty:
        raise InputError(
            f"slide(s) {', '.join(empty)} gave no patch (an empty bag); lower --min-tissue, give "
            "their tissue with --tissue-geojson, or remove them from the folder",
            folder,
        )
    if not rows:
        raise InputError("manifest.csv lists no patch; every bag is empty", manifest)
    bags = _group(rows, manifest)
    for b in bags.values():
        absent = next((p for p in b.paths if not (folder / p).is_file()), None)
        if absent is not None:
            raise InputError(
                f"patch of slide {b.slide!r} is missing; re-run extract-patches", folder / absent
            )
    return bags, rows, manifest


def _add_validation(
    folder: Path, bags: dict[str, Bag], patch: dict, val_folder: Path
) -> tuple[dict[str, Bag], str]:
    """The slides of ``val_folder`` as the validation bags (paths relative to ``folder``).

    Returns:
        (every bag, the validation manifest's hash).

    Raises:
        InputError: a slide in both folders, or patches cut another way (side, µm/px, level).
    """
    val_bags, val_rows, val_manifest = _read_folder(val_folder)
    both = sorted(set(bags) & set(val_bags))
    if both:
        raise InputError(
            f"slide(s) {', '.join(both[:3])} are in both the training and the validation "
            "folder; a slide validates only if it is not trained on",
            val_manifest,
        )
    val_patch = patch_geometry(val_folder, val_rows)
    keys = ("size", "mpp", "level")
    if any(val_patch[k] != patch[k] for k in keys):
        cut = ", ".join(f"{k} {val_patch[k]} vs {patch[k]}" for k in keys)
        raise InputError(
            f"the validation patches were cut another way than the training ones ({cut}); "
            "re-run extract-patches with the same --patch-size and --mpp",
            val_manifest,
        )
    rel = Path(os.path.relpath(val_folder.resolve(), folder.resolve()))
    for b in val_bags.values():
        b.paths = [(rel / p).as_posix() for p in b.paths]
        b.split = "val"
    return {**bags, **val_bags}, hashlib.sha256(val_manifest.read_bytes()).hexdigest()


def load_bags(
    folder: str | Path,
    *,
    negative_class: str | None = None,
    val_fraction: float = 0.25,
    seed: int = 0,
    val_folder: str | Path | None = None,
) -> BagSet:
    """Read an ``extract-patches`` folder as one bag per slide and split it by slide.

    Args:
        folder: the patch folder (``manifest.csv``).
        negative_class: the class whose slides are fully negative; optional with two classes
            when exactly one is named like a negative class (normal, benign, negative, ...).
        val_fraction: share of each class's slides drawn into ``val`` (without ``val_folder``).
        seed: seed of that draw.
        val_folder: another ``extract-patches`` folder whose slides are the validation slides
            (e.g. other patients'); then every slide of ``folder`` trains. Its paths are kept
            relative to ``folder``.

    Returns:
        The bags, sorted by slide name, with their split.

    Raises:
        InputError: no manifest, a patch without label, a slide with mixed labels, a slide without
            patches, one class only, no or an unknown negative class, too few negative slides to
            validate on, a listed patch file missing, or a validation folder that shares slides
            with ``folder`` or was cut another way.
    """
    folder = Path(folder)
    bags, rows, manifest = _read_folder(folder)
    patch = patch_geometry(folder, rows)
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest()
    if val_folder is not None:
        bags, val_digest = _add_validation(folder, bags, patch, Path(val_folder))
        digest = hashlib.sha256((digest + val_digest).encode()).hexdigest()
    names = _resolve_classes([b.label for b in bags.values()], None, manifest)
    if len(names) < 2:
        raise InputError(
            f"every slide is labelled {names[0]!r}: multiple-instance learning needs slides of "
            "two classes (e.g. tumour and normal)",
            manifest,
        )
    negative = _negative(names, negative_class, manifest)
    n_negative = sum(b.label == negative for b in bags.values())
    if n_negative < 2:
        raise InputError(
            f"{n_negative} slide of the negative class {negative!r}: at least two are needed "
            "(one validates the instance threshold); add negative slides",
            manifest,
        )
    ordered = [bags[k] for k in sorted(bags)]
    if val_folder is None:
        split_bags(ordered, val_fraction, seed)
    return BagSet(folder, ordered, names, negative, digest, patch)
