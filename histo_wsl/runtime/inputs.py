"""Slide inputs from files, folders, glob patterns and CSV lists."""

from __future__ import annotations

import csv
import glob
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from histo_wsl.errors import InputError
from histo_wsl.runtime.console import warn

__all__ = [
    "IMAGE_SUFFIXES",
    "WSI_SUFFIXES",
    "SLIDE_SUFFIXES",
    "PATH_COLUMNS",
    "InputItem",
    "read_csv_list",
    "collect_inputs",
    "stdin_paths",
    "parse_shard",
    "select_shard",
]

#: File suffixes read as plain images when OpenSlide does not recognise the file.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
#: File suffixes of whole-slide formats OpenSlide reads.
WSI_SUFFIXES = (
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".vms",
    ".vmu",
    ".scn",
    ".mrxs",
    ".svslide",
    ".bif",
    ".dcm",
    ".czi",
    ".qptiff",
)
#: Suffixes picked up when a folder is given.
SLIDE_SUFFIXES = tuple(sorted(set(WSI_SUFFIXES) | set(IMAGE_SUFFIXES)))
#: CSV column names accepted for the file path, in order of preference.
PATH_COLUMNS = ("path", "slide", "image")


@dataclass
class InputItem:
    """One slide (or image) to process.

    Attributes:
        path: the file.
        name: the name its outputs carry (file name without suffix).
        slide_mpp: per-slide level-0 µm/px override (CSV column ``slide_mpp``).
        label: class label (CSV column ``label``).
        extra: the CSV's other columns, by name.
    """

    path: Path
    name: str
    slide_mpp: float | None = None
    label: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


def _is_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def _from_folder(folder: Path) -> tuple[list[Path], list[Path]]:
    """(the slide and image files of a folder, its other files); hidden files are not counted."""
    files, others = [], []
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        (files if p.suffix.lower() in SLIDE_SUFFIXES else others).append(p)
    return _one_file_per_dicom_series(files), others


def _names(paths: list[Path], limit: int = 8) -> str:
    return ", ".join(p.name for p in paths[:limit]) + (", ..." if len(paths) > limit else "")


def _one_file_per_dicom_series(files: list[Path]) -> list[Path]:
    """Keep one file of each DICOM series: OpenSlide opens a whole series from any of its files."""
    dicom = [p for p in files if p.suffix.lower() == ".dcm"]
    if len(dicom) < 2:
        return files
    import openslide

    seen: set[str] = set()
    drop: set[Path] = set()
    for p in dicom:
        try:
            with openslide.OpenSlide(str(p)) as osr:
                uid = osr.properties.get("dicom.SeriesInstanceUID")
        except Exception:
            uid = None  # reported when the item is processed
        if uid is None:
            continue
        key = f"{p.parent}|{uid}"
        if key in seen:
            drop.add(p)
        seen.add(key)
    return [p for p in files if p not in drop]


def _parse_mpp(value: str, where: str, csv_path: Path) -> float | None:
    value = value.strip()
    if not value:
        return None
    try:
        mpp = float(value)
    except ValueError:
        raise InputError(
            f"{where}: slide_mpp {value!r} is not a number (µm/px, e.g. 0.25)", csv_path
        ) from None
    if not mpp > 0:
        raise InputError(f"{where}: slide_mpp must be positive, got {value}", csv_path)
    return mpp


def read_csv_list(csv_path: Path) -> list[InputItem]:
    """Read a CSV list with a ``path`` (or ``slide``/``image``) column and optional others.

    Relative paths are taken from the CSV's folder. ``slide_mpp`` and ``label`` are recognised;
    every other column is kept in :attr:`InputItem.extra`.
    """
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
            header = [c.strip() for c in (rows[0].keys() if rows else [])]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"cannot read the CSV list ({exc})", csv_path) from exc
    if not rows:
        raise InputError(
            "the CSV list has no rows; add a header (path,...) and one row per slide", csv_path
        )
    column = next((c for c in PATH_COLUMNS if c in header), None)
    if column is None:
        raise InputError(
            f"the CSV list has no 'path' column (columns: {', '.join(header)}); name the column of "
            "file paths 'path'",
            csv_path,
        )
    items = []
    for line, raw in enumerate(rows, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
        if not row.get(column):
            raise InputError(f"line {line}: empty {column!r}", csv_path)
        path = Path(row[column]).expanduser()
        if not path.is_absolute():
            path = csv_path.parent / path
        mpp = _parse_mpp(row.get("slide_mpp", ""), f"line {line}", csv_path)
        extra = {k: v for k, v in row.items() if k not in (column, "slide_mpp", "label")}
        items.append(InputItem(path, path.stem, mpp, row.get("label") or None, extra))
    return items


def stdin_paths(stream: TextIO | None = None) -> list[str]:
    """The paths listed on standard input, one per line (blank lines and ``#`` comments skipped).

    ``-`` as an input reads them, so ``find . -name '*.svs' | histo-wsl localize -`` works.
    """
    stream = sys.stdin if stream is None else stream
    lines = (line.strip() for line in stream)
    return [line for line in lines if line and not line.startswith("#")]


def _with_stdin(specs: Sequence[str | Path]) -> Sequence[str | Path]:
    """``specs`` with ``-`` replaced by the paths read from standard input."""
    if not any(str(s) == "-" for s in specs):
        return specs
    expanded = [p for s in specs for p in (stdin_paths() if str(s) == "-" else [s])]
    if not expanded:
        raise InputError("standard input listed no path (give '-' a list, one path per line)")
    return expanded


def collect_inputs(specs: Sequence[str | Path]) -> list[InputItem]:
    """Expand files, folders (their slide and image files), glob patterns and CSV lists.

    ``-`` stands for the paths listed on standard input (:func:`stdin_paths`).

    Raises:
        InputError: a path that does not exist, a pattern that matches nothing, a folder without
            slides, or two inputs whose outputs would share a name.
    """
    items: list[InputItem] = []
    specs = _with_stdin(specs)
    for spec in specs:
        text = str(spec)
        path = Path(text).expanduser()
        if path.is_dir():
            files, others = _from_folder(path)
            held = f"; it holds {len(others)} other file(s): {_names(others)}" if others else ""
            if not files:
                raise InputError(
                    f"the folder holds no slide or image files ({', '.join(SLIDE_SUFFIXES)}){held}",
                    path,
                )
            if others:  # never left out silently
                warn(
                    f"{path}: {len(others)} file(s) left out, not of a slide or image type "
                    f"histo-wsl reads: {_names(others)} (give a file by name to have it checked)"
                )
            items += [InputItem(p, p.stem) for p in files]
        elif path.is_file() and path.suffix.lower() == ".csv":
            items += read_csv_list(path)
        elif path.is_file():
            items.append(InputItem(path, path.stem))
        elif _is_glob(text):
            matches = [Path(m) for m in sorted(glob.glob(text, recursive=True))]
            matches = [m for m in matches if m.is_file()]
            others = [m for m in matches if m.suffix.lower() not in SLIDE_SUFFIXES]
            files = _one_file_per_dicom_series([m for m in matches if m not in others])
            if not files:
                held = (
                    f" (it matches {len(others)} other file(s): {_names(others)})" if others else ""
                )
                raise InputError(f"the pattern matches no slide or image file{held}", text)
            if others:
                warn(
                    f"{text}: {len(others)} matching file(s) left out, not of a slide or image "
                    f"type histo-wsl reads: {_names(others)}"
                )
            items += [InputItem(p, p.stem) for p in files]
        else:
            raise InputError("no such file or folder; check the path", path)
    by_name: dict[str, Path] = {}
    for item in items:
        other = by_name.setdefault(item.name, item.path)
        if other != item.path:
            raise InputError(
                f"two inputs are named {item.name!r} ({other} and {item.path}), so their outputs "
                "would collide; rename one or process them in separate runs",
                item.path,
            )
    unique: dict[Path, InputItem] = {}
    for item in items:
        unique.setdefault(item.path.resolve(), item)
    return list(unique.values())


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """Parse ``K/N`` (1 <= K <= N) into (K, N); None stays None."""
    if text is None:
        return None
    try:
        k_text, n_text = text.split("/")
        k, n = int(k_text), int(n_text)
    except ValueError:
        raise InputError(
            f"--shard {text!r} is not K/N (e.g. 2/8 for the second of eight shards)"
        ) from None
    if not (n >= 1 and 1 <= k <= n):
        raise InputError(f"--shard {text}: K must be between 1 and N (e.g. 1/4 ... 4/4)")
    return k, n


def select_shard(items: Sequence[InputItem], shard: tuple[int, int] | None) -> list[InputItem]:
    """Every N-th item from the K-th, in path order; all items, in their order, without a shard."""
    if shard is None:
        return list(items)
    ordered = sorted(items, key=lambda it: str(it.path))
    k, n = shard
    return ordered[k - 1 :: n]
