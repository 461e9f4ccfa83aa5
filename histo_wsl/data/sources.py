"""Where labelled images come from: the dataset layouts histo-wsl reads, as one list of samples.

Layouts (:func:`load_samples` tells them apart):

- a patch folder written by ``extract-patches`` (``manifest.csv`` with ``path`` and ``label``);
- a class-per-subfolder directory ``<root>/<class>/*.png`` with optional masks in
  ``<root>/masks/<same relative path>``;
- a CSV ``image,label[,mask][,split][,valpx]`` (paths relative to the CSV);
- GlaS as released (``train/<name>.png``, ``train/<name>_anno.png``, ``splits/fold-K.csv``).

Every sample has a class index; masks are optional (pixel metrics and model selection only).
Without a split, a seeded stratified validation split is drawn.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from histo_wsl.errors import InputError
from histo_wsl.runtime.inputs import IMAGE_SUFFIXES

__all__ = ["Dataset", "Sample", "load_samples", "IMAGE_SUFFIXES"]


@dataclass(frozen=True)
class Sample:
    """One labelled image.

    Attributes:
        image: image file.
        label: class index.
        mask: ROI mask file (non-zero = ROI) or None.
        split: ``train`` or ``val`` (``test`` too when read for evaluation).
        valpx: True when the image is in the pixel-selection subset (``valpx``) of ``val``.
    """

    image: Path
    label: int
    mask: Path | None = None
    split: str = "train"
    valpx: bool = False


@dataclass
class Dataset:
    """Samples with their class names, the negative class and where they came from."""

    samples: list[Sample]
    class_names: list[str]
    negative_class: int | None = None
    source: str = ""
    layout: str = ""
    notes: list[str] = field(default_factory=list)
    data_mpp: float | None = None
    #: whether the source gave the splits (GlaS fold file, CSV split column) rather than drawn
    splits_given: bool = True
    #: files left out with --skip-errors, one message each (why, and which file)
    skipped_files: list[str] = field(default_factory=list)

    def split(self, name: str) -> list[Sample]:
        """The samples of one split (``train``, ``val`` or ``valpx``)."""
        if name == "valpx":
            return [s for s in self.samples if s.split == "val" and s.valpx]
        return [s for s in self.samples if s.split == name]

    def describe(self) -> dict:
        """Counts per split and class, for run.json and the model card."""
        out: dict = {"source": self.source, "layout": self.layout, "classes": self.class_names}
        out["negative_class"] = (
            None if self.negative_class is None else self.class_names[self.negative_class]
        )
        for name in ("train", "val", "valpx"):
            items = self.split(name)
            counts = np.bincount([s.label for s in items], minlength=len(self.class_names))
            out[name] = {c: int(n) for c, n in zip(self.class_names, counts, strict=True)}
        out["skipped_files"] = list(self.skipped_files)
        return out


def _class_index(names: list[str], label: str, where: str, path: Path) -> int:
    if label not in names:
        raise InputError(
            f"{where}: label {label!r} is not one of the classes {names}; fix the label or "
            "pass --classes with every class name",
            path,
        )
    return names.index(label)


def _resolve_classes(found: list[str], classes: list[str] | None, path: Path) -> list[str]:
    if classes:
        return list(classes)
    names = sorted(set(found))
    # numeric labels sort numerically (0, 1, 2, ..., 10)
    if all(n.lstrip("-").isdigit() for n in names):
        names = sorted(names, key=int)
    return names


def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            header = [h.strip() for h in (reader.fieldnames or [])]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"cannot read the CSV ({exc})", path) from None
    rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in rows]
    return header, rows


def _split_value(value: str, where: str, path: Path, allow_test: bool = False) -> str:
    v = value.lower()
    if v in ("train", "training"):
        return "train"
    if v in ("val", "valid", "validation", "valcl", "valpx"):
        return "val"
    if allow_test and v in ("test", "testing"):
        return "test"
    raise InputError(
        f"{where}: split {value!r} is not train{', val or test' if allow_test else ' or val'}", path
    )


def _from_csv(path: Path, classes: list[str] | None, allow_test: bool = False) -> Dataset:
    header, rows = _read_csv(path)
    image_col = next((c for c in ("image", "path") if c in header), None)
    if image_col is None or "label" not in header:
        raise InputError(
            "a dataset CSV needs the columns image,label (and optionally mask, split, valpx, "
            "mpp); "
            f"found {header}",
            path,
        )
    if not rows:
        raise InputError("the dataset CSV has no rows", path)
    names = _resolve_classes([r["label"] for r in rows], classes, path)
    base = path.parent
    has_split = "split" in header and any(r.get("split") for r in rows)
    samples = []
    for i, r in enumerate(rows, start=2):
        where = f"line {i}"
        if not r[image_col]:
            raise InputError(f"{where}: empty {image_col}", path)
        image = base / r[image_col]
        mask = base / r["mask"] if r.get("mask") else None
        split = _split_value(r["split"], where, path, allow_test) if has_split else "train"
        valpx = r.get("valpx", "") in ("1", "true", "True", "yes")
        samples.append(
            Sample(image, _class_index(names, r["label"], where, path), mask, split, valpx)
        )
    ds = Dataset(samples, names, source=str(path), layout="csv")
    ds.data_mpp = _median_mpp(rows, path) if "mpp" in header else None
    if not has_split:
        ds.notes.append("no split column: a seeded stratified validation split was drawn")
    return ds


def _median_mpp(rows: list[dict], path: Path) -> float | None:
    """The median of the rows' ``mpp`` column (µm/px of each patch; blanks skipped)."""
    try:
        mpps = sorted(float(r["mpp"]) for r in rows if r.get("mpp"))
    except ValueError:
        raise InputError(
            "the mpp column holds a value that is not a number (µm/px)", path
        ) from None
    return mpps[len(mpps) // 2] if mpps else None


def _from_manifest(folder: Path, classes: list[str] | None) -> Dataset:
    path = folder / "manifest.csv"
    header, rows = _read_csv(path)
    if "path" not in header or "label" not in header:
        raise InputError(
            "manifest.csv needs path and label columns (extract-patches writes them)", path
        )
    missing = [r for r in rows if not r.get("label")]
    if missing:
        raise InputError(
            f"{len(missing)} patch(es) have no label (e.g. slide {missing[0].get('slide')!r}); "
            "re-run extract-patches with --label or a CSV label column",
            path,
        )
    if not rows or not any(r.get("path") for r in rows):
        raise InputError(
            "manifest.csv lists no patch images (was it written with --coords-only?)", path
        )
    names = _resolve_classes([r["label"] for r in rows], classes, path)
    samples = [
        Sample(folder / r["path"], _class_index(names, r["label"], f"line {i}", path))
        for i, r in enumerate(rows, start=2)
    ]
    ds = Dataset(samples, names, source=str(folder), layout="patch-folder")
    ds.data_mpp = _median_mpp(rows, path)
    ds.notes.append(
        "patch folder: the validation split is drawn per slide (no slide in both splits)"
    )
    groups = [r.get("slide", "") for r in rows]
    ds._groups = groups  # type: ignore[attr-defined]
    return ds


def _from_class_folders(root: Path, classes: list[str] | None) -> Dataset:
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and d.name != "masks")
    found = []
    files: list[tuple[Path, str]] = []
    for d in class_dirs:
        images = sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if images:
            found.append(d.name)
            files += [(p, d.name) for p in images]
    if len(found) == 0:
        raise InputError(
            "no dataset here: expected manifest.csv (a patch folder), <class>/ subfolders of images, "
            "a GlaS folder (train/ and splits/) or a CSV image,label[,mask][,split]",
            root,
        )
    names = _resolve_classes(found, classes, root)
    samples = []
    for p, label in files:
        mask = root / "masks" / p.relative_to(root)
        samples.append(
            Sample(
                p,
                _class_index(names, label, str(p.relative_to(root)), root),
                mask if mask.is_file() else None,
            )
        )
    ds = Dataset(samples, names, source=str(root), layout="class-folders")
    ds.notes.append("no split given: a seeded stratified validation split was drawn")
    return ds


#: GlaS image files as released (.bmp), as commonly converted (.png), or packed (.jpg)
_GLAS_IMAGE_SUFFIXES = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff")


def _first_file(folder: Path, stem: str, suffixes: Sequence[str]) -> Path:
    """``folder/stem`` with the first of ``suffixes`` that exists (else the first: named if missing)."""
    for suffix in suffixes:
        path = folder / f"{stem}{suffix}"
        if path.is_file():
            return path
    return folder / f"{stem}{suffixes[0]}"


def _from_glas(root: Path, fold: int) -> Dataset:
    split_csv = root / "splits" / f"fold-{fold}.csv"
    if not split_csv.is_file():
        raise InputError(f"GlaS fold file {split_csv.name} is missing; use --fold 0-4", split_csv)
    header, rows = _read_csv(split_csv)
    names = ["benign", "malignant"]
    samples = []
    for i, r in enumerate(rows, start=2):
        image = _first_file(root / "train", r["image"], _GLAS_IMAGE_SUFFIXES)
        mask = _first_file(root / "train", f"{r['image']}_anno", (".png", ".bmp"))
        label = int(r["label"])
        if label not in (0, 1):
            raise InputError(f"line {i}: GlaS label must be 0 (benign) or 1 (malignant)", split_csv)
        samples.append(
            Sample(
                image,
                label,
                mask,
                _split_value(r["split"], f"line {i}", split_csv),
                r.get("valpx") == "1",
            )
        )
    # GlaS: 20x objective scans at about 0.62 µm/px (Sirinukunwattana et al. 2017)
    return Dataset(samples, names, source=f"{root} (fold {fold})", layout="glas", data_mpp=0.62)


def _n_val(n: int, val_fraction: float) -> int:
    """Validation share of ``n`` items (slides or images) of one class.

    At least one when there are two or more and ``val_fraction`` > 0 (a lab with two slides of a
    class still validates on one), and always at least one left for training.
    """
    if n < 2 or val_fraction <= 0:
        return 0
    return min(n - 1, max(1, int(round(n * val_fraction))))


def _draw_split(ds: Dataset, val_fraction: float, seed: int) -> None:
    """Seeded stratified split (grouped by slide for patch folders); valpx = val images with masks."""
    rng = np.random.default_rng(seed)
    groups = getattr(ds, "_groups", None)
    samples = ds.samples
    new = list(samples)
    for c in range(len(ds.class_names)):
        idx = [i for i, s in enumerate(samples) if s.label == c]
        if groups is not None:
            keys = sorted({groups[i] for i in idx})
            rng.shuffle(keys)
            n_val = _n_val(len(keys), val_fraction)
            val_keys = set(keys[:n_val])
            val = {i for i in idx if groups[i] in val_keys}
        else:
            order = rng.permutation(idx)
            n_val = _n_val(len(idx), val_fraction)
            val = set(order[:n_val].tolist())
        for i in idx:
            new[i] = replace(samples[i], split="val" if i in val else "train")
    ds.samples = new


def load_samples(
    source: str | Path,
    *,
    classes: list[str] | None = None,
    negative_class: str | None = None,
    fold: int = 0,
    val_fraction: float = 0.2,
    seed: int = 0,
    evaluation: bool = False,
) -> Dataset:
    """Read a dataset in any of the supported layouts and check it.

    Args:
        source: patch folder, class-folder directory, dataset CSV or GlaS folder.
        classes: class names in index order (default: sorted labels found; GlaS: benign, malignant).
        negative_class: name of the class whose images are fully negative (empty ROI).
        fold: GlaS fold (``splits/fold-K.csv``).
        val_fraction: share of each class drawn into ``val`` when the source has no split.
        seed: seed of that draw.
        evaluation: read the data to evaluate a model (``histo-wsl evaluate``): no split is drawn
            (:attr:`Dataset.splits_given` says whether the source has one), a CSV split may also
            be ``test``, one class and empty splits are allowed, and a listed mask file that is
            missing is left to the caller (``Sample.mask`` keeps its path).

    Returns:
        The dataset. When it has no ``valpx`` flag, every validation image with a mask is in valpx.

    Raises:
        InputError: a missing source, file or column, an unknown label, one class only, an empty
            split, or a negative class that is not a class.
    """
    path = Path(source)
    ds = _read_layout(path, classes, fold, evaluation)
    if ds.layout in ("class-folders", "patch-folder") or (
        ds.layout == "csv" and any("no split column" in n for n in ds.notes)
    ):
        ds.splits_given = False
        if not evaluation:
            _draw_split(ds, val_fraction, seed)
    if not any(s.valpx for s in ds.samples):
        ds.samples = [replace(s, valpx=s.split == "val" and s.mask is not None) for s in ds.samples]
    _check_files(ds, evaluation)
    if not evaluation:
        _check_trainable(ds, path)
    if negative_class is not None:
        if negative_class not in ds.class_names:
            raise InputError(
                f"--negative-class {negative_class!r} is not one of the classes {ds.class_names}",
                path,
            )
        ds.negative_class = ds.class_names.index(negative_class)
    return ds


def _read_layout(path: Path, classes: list[str] | None, fold: int, evaluation: bool) -> Dataset:
    """The dataset at ``path`` in whichever layout it has (CSV, manifest, GlaS, class folders)."""
    if not path.exists():
        raise InputError(
            "dataset not found: give a patch folder, a class-folder directory, a GlaS "
            "folder or a CSV image,label[,mask][,split]",
            path,
        )
    if path.is_file():
        return _from_csv(path, classes, allow_test=evaluation)
    if (path / "manifest.csv").is_file():
        return _from_manifest(path, classes)
    if (path / "splits").is_dir() and (path / "train").is_dir():
        return _from_glas(path, fold)
    return _from_class_folders(path, classes)


def _check_files(ds: Dataset, evaluation: bool) -> None:
    """Every listed image exists, and every listed mask (evaluation leaves masks to the caller)."""
    for s in ds.samples:
        if not s.image.is_file():
            raise InputError(
                "image listed in the dataset is missing; fix the path or remove it", s.image
            )
        if s.mask is not None and not s.mask.is_file() and not evaluation:
            raise InputError(
                f"mask of {s.image.name} is missing; fix the path or drop the mask", s.mask
            )


def _check_trainable(ds: Dataset, path: Path) -> None:
    """Two classes at least, and images in both the train and the val split."""
    if len(ds.class_names) < 2 or len({s.label for s in ds.samples}) < 2:
        raise InputError(
            f"only one class ({ds.class_names[0] if ds.class_names else 'none'}) in the data; a "
            "classifier needs images of at least two classes (e.g. tumour and normal)",
            path,
        )
    for name in ("train", "val"):
        if not ds.split(name):
            raise InputError(
                f"the {name} split is empty; add images or lower/raise --val-fraction", path
            )
