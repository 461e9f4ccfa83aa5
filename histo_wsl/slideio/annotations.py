"""Slide annotations as ground-truth masks: QuPath GeoJSON, ASAP XML (CAMELYON16) or a mask image.

Every reader ends in a bool mask on a grid given by its shape and its ``downsample`` (level-0
pixels per mask pixel): mask pixel ``(c, r)`` covers level-0 ``[c·d, (c+1)·d) × [r·d, (r+1)·d)``,
the grid of ``localize``'s ``<slide>.prob.tif``.

- **GeoJSON** (QuPath *Export objects*): Polygon/MultiPolygon features (holes honoured), in
  level-0 pixels; read and rasterised with :func:`histo_wsl.slideio.geojson.read_geojson` and
  :func:`histo_wsl.slideio.geojson.geojson_to_mask`. Which features are the ROI goes by their
  QuPath classification: the classes asked for (``--roi-class``), else the model's ROI class when
  the file has it, else every class; regions of QuPath's ``Ignore*`` class are left out of every
  metric (:class:`GroundTruth` ``ignore``), as QuPath means them. A FeatureCollection without
  polygon is an empty ground truth (a negative slide).
- **ASAP XML** (CAMELYON16's format): ``<ASAP_Annotations><Annotations><Annotation Type="Polygon"
  PartOfGroup="..."><Coordinates><Coordinate Order="0" X=".." Y=".."/>``, level-0 pixels. Polygon,
  Spline (its control points taken as a polygon) and Rectangle annotations count; Dot and PointSet
  are ignored. Annotations of the groups in :data:`EXCLUSION_GROUPS` (CAMELYON16's ``_2``:
  non-tumour regions drawn inside tumour) are removed from the mask. The XML is parsed with
  ``defusedxml``: a DOCTYPE, entity declarations and external references are refused, so a file
  cannot make the parser read other files or the network, or expand entities without bound.
- **Mask image** (PNG, TIFF, pyramidal TIFF...): non-zero = ROI, covering the whole slide at any
  resolution; the level nearest above the grid is read and resized nearest-neighbour to it.

Malformed files raise :class:`~histo_wsl.errors.InputError` naming the file, the line (and column)
and the reason.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.handler import ContentHandler

import numpy as np

from histo_wsl.errors import InputError

__all__ = [
    "ANNOTATION_SUFFIXES",
    "EXCLUSION_GROUPS",
    "GroundTruth",
    "annotation_mask",
    "feature_class",
    "find_annotation",
    "read_asap_xml",
]

#: ASAP groups whose polygons are removed from the ground truth (CAMELYON16: ``_2``).
EXCLUSION_GROUPS = frozenset({"_2", "exclusion", "Exclusion", "EXCLUSION"})
_POLYGON_TYPES = {"polygon", "spline", "rectangle"}
_IGNORED_TYPES = {"dot", "pointset", "point", "measure", "arrow"}
MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg")
ANNOTATION_SUFFIXES = (".geojson", ".json", ".xml", *MASK_SUFFIXES)
_NAME_VARIANTS = ("{}", "{}_mask", "{}_Mask", "{}.mask", "{}_annotation", "{}.annotations")


def find_annotation(folder: Path, slide: str) -> Path | None:
    """The annotation file of ``slide`` in ``folder``, or None.

    Looks for ``<slide>``, ``<slide>_mask``, ``<slide>_Mask``, ``<slide>.mask``,
    ``<slide>_annotation`` and ``<slide>.annotations`` with the suffixes of
    :data:`ANNOTATION_SUFFIXES` (in that order), then the same in ``<folder>/<slide>/``.

    Args:
        folder: the annotations folder.
        slide: the slide's name (its file name without suffix, as ``localize`` names outputs).

    Returns:
        The first file found.
    """
    for base in (folder, folder / slide):
        for pattern in _NAME_VARIANTS:
            stem = pattern.format(slide)
            for suffix in ANNOTATION_SUFFIXES:
                path = base / f"{stem}{suffix}"
                if path.is_file():
                    return path
    return None


def annotation_name(path: Path) -> str:
    """The slide name an annotation file is for (the inverse of :func:`find_annotation`)."""
    stem = path.name
    for suffix in ANNOTATION_SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    for tail in ("_mask", "_Mask", ".mask", "_annotation", ".annotations"):
        if stem.endswith(tail):
            return stem[: -len(tail)]
    return stem


# --------------------------------------------------------------------------------------------------
# ASAP XML
# --------------------------------------------------------------------------------------------------


class _AsapHandler(ContentHandler):
    """SAX handler collecting ASAP polygons, with the line of each problem."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.locator: Any = None
        self.root: str | None = None
        self.current: dict | None = None
        self.include: list[dict] = []
        self.exclude: list[dict] = []
        self.groups: dict[str, int] = {}
        self.ignored: dict[str, int] = {}
        self.degenerate: list[str] = []

    def setDocumentLocator(self, locator: Any) -> None:  # noqa: N802 (SAX API)
        self.locator = locator

    def _where(self) -> str:
        if self.locator is None:
            return ""
        return f"line {self.locator.getLineNumber()}, column {self.locator.getColumnNumber()}: "

    def fail(self, reason: str) -> None:
        raise InputError(f"is malformed ASAP XML: {self._where()}{reason}", self.path)

    def startElement(self, name: str, attrs: Any) -> None:  # noqa: N802 (SAX API)
        if self.root is None:
            self.root = name
            if name != "ASAP_Annotations":
                self.fail(
                    f"the root element is <{name}>, not <ASAP_Annotations>; export the "
                    "annotations from ASAP (or give QuPath GeoJSON or a mask image)"
                )
        if name == "Annotation":
            self._start_annotation(attrs)
        elif name == "Coordinate":
            self._add_coordinate(attrs)

    def _start_annotation(self, attrs: Any) -> None:
        if self.current is not None:
            self.fail("<Annotation> inside another <Annotation>")
        self.current = {
            "name": attrs.get("Name", f"annotation {len(self.include) + 1}"),
            "type": attrs.get("Type", "Polygon"),
            "group": attrs.get("PartOfGroup", "None"),
            "line": self.locator.getLineNumber() if self.locator else None,
            "points": [],
        }

    def _add_coordinate(self, attrs: Any) -> None:
        if self.current is None:
            self.fail("<Coordinate> outside an <Annotation>")
        values = []
        for key in ("X", "Y"):
            text = attrs.get(key)
            if text is None:
                self.fail(f"<Coordinate> without its {key} attribute")
            try:
                v = float(text.replace(",", "."))
            except ValueError:
                self.fail(f"{key}={text!r} is not a number")
            if not math.isfinite(v):
                self.fail(f"{key}={text!r} is not a finite number")
            values.append(v)
        order = attrs.get("Order")
        try:
            key_order = float(order) if order is not None else len(self.current["points"])
        except ValueError:
            self.fail(f"Order={order!r} is not a number")
        self.current["points"].append((key_order, values[0], values[1]))

    def endElement(self, name: str) -> None:  # noqa: N802 (SAX API)
        if name != "Annotation" or self.current is None:
            return
        ann, self.current = self.current, None
        kind = ann["type"].lower()
        if kind in _IGNORED_TYPES:
            self.ignored[ann["type"]] = self.ignored.get(ann["type"], 0) + 1
            return
        if kind not in _POLYGON_TYPES:
            self.fail(
                f"annotation {ann['name']!r} has Type={ann['type']!r}; expected Polygon, "
                "Spline, Rectangle (or Dot/PointSet, ignored)"
            )
        points = [(x, y) for _, x, y in sorted(ann["points"], key=lambda p: p[0])]
        if len(points) < 3:
            self.degenerate.append(f"{ann['name']} (line {ann['line']})")
            return
        ring = points + [points[0]]
        feature = {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {"name": ann["name"], "group": ann["group"]},
        }
        group = ann["group"]
        self.groups[group] = self.groups.get(group, 0) + 1
        (self.exclude if group in EXCLUSION_GROUPS else self.include).append(feature)


def read_asap_xml(path: str | Path) -> dict:
    """Read an ASAP annotation file (CAMELYON16) safely.

    Args:
        path: the ``.xml`` file.

    Returns:
        ``{"include": FeatureCollection, "exclude": FeatureCollection, "groups": {group: count},
        "ignored": {type: count}, "degenerate": [names of annotations with < 3 points]}``;
        coordinates in level-0 pixels.

    Raises:
        InputError: the file is missing, declares a DTD or entities or refers to external
            resources (refused), is not well-formed XML (line, column and reason), is not ASAP
            XML, or has a coordinate that is not a number (line and reason).
    """
    import xml.sax

    import defusedxml
    import defusedxml.sax

    path = Path(path)
    if not path.is_file():
        raise InputError("annotation file not found", path)
    handler = _AsapHandler(path)
    try:
        with open(path, "rb") as fh:
            defusedxml.sax.parse(
                fh, handler, forbid_dtd=True, forbid_entities=True, forbid_external=True
            )
    except defusedxml.DefusedXmlException as exc:
        raise InputError(
            f"refused: the XML declares a DTD, entities or external references ({exc}); ASAP "
            "annotations need none, and such declarations can make a parser read other files or "
            "the network; remove the <!DOCTYPE ...> part",
            path,
        ) from None
    except xml.sax.SAXParseException as exc:
        raise InputError(
            f"is not well-formed XML: {exc.getMessage()} at line {exc.getLineNumber()}, column "
            f"{exc.getColumnNumber()}; fix the file there or export it again",
            path,
        ) from None
    if handler.root is None:
        raise InputError("is an empty XML file, not ASAP annotations", path)

    def fc(features: list[dict]) -> dict:
        return {"type": "FeatureCollection", "features": features}

    return {
        "include": fc(handler.include),
        "exclude": fc(handler.exclude),
        "groups": handler.groups,
        "ignored": handler.ignored,
        "degenerate": handler.degenerate,
    }


# --------------------------------------------------------------------------------------------------
# any annotation -> mask
# --------------------------------------------------------------------------------------------------


def _geojson(path: Path) -> dict | None:
    """The GeoJSON of ``path``, or None when it holds no polygon (an empty ground truth)."""
    import json

    from histo_wsl.slideio.geojson import read_geojson

    try:
        return read_geojson(path)
    except InputError as exc:
        # an empty FeatureCollection is a negative slide, not an error
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except (OSError, ValueError):
            raise exc from None
        if isinstance(data, list) and not data:
            return None
        if isinstance(data, dict) and data.get("type") == "FeatureCollection":
            if data.get("features") == [] or "no Polygon" in exc.message:
                return None
        raise


def _collection(features: list[dict]) -> dict:
    return {"type": "FeatureCollection", "features": features}


def _mask_image(path: Path, shape: tuple[int, int]) -> tuple[np.ndarray, dict]:
    """A mask image (the level nearest above ``shape`` of a pyramidal TIFF) resized to ``shape``."""
    from PIL import Image

    h, w = shape
    info: dict = {}
    arr: np.ndarray | None = None
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        try:
            with tifffile.TiffFile(path) as tf:
                levels = tf.series[0].levels
                chosen = levels[0]
                for lv in levels:  # the smallest level still at least as large as the grid
                    if lv.shape[0] >= h and lv.shape[1] >= w:
                        chosen = lv
                arr = chosen.asarray()
                info["level_shape"] = list(chosen.shape)
        except Exception as exc:  # tifffile raises many types on a bad file
            raise InputError(f"cannot read the mask TIFF ({exc})", path) from None
    else:
        try:
            with Image.open(path) as im:
                arr = np.asarray(im)
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read the mask image ({exc})", path) from None
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=2) if arr.shape[-1] in (3, 4) else arr.max(axis=0)
    mh, mw = arr.shape[:2]
    if abs(mw / mh - w / h) > 0.02 * (w / h) + 2 / min(mh, h):
        raise InputError(
            f"mask is {mw}x{mh} px, which does not have the slide map's aspect ({w}x{h}); a mask "
            "image must cover the whole slide",
            path,
        )
    info["mask_size"] = [int(mw), int(mh)]
    fg = Image.fromarray(((arr > 0) * 255).astype(np.uint8))
    if (mh, mw) != (h, w):
        fg = fg.resize((w, h), Image.Resampling.NEAREST)
        info["resized"] = "nearest-neighbour to the map grid"
    return np.asarray(fg) > 127, info


@dataclass
class GroundTruth:
    """An annotation rasterised on a grid.

    Attributes:
        mask: (H, W) bool, the ROI.
        ignore: (H, W) bool, pixels left out of every metric (QuPath's ``Ignore*`` regions), or
            None when there are none.
        notes: JSON-ready: format, counts, the classes found and the ones taken as the ROI.
    """

    mask: np.ndarray
    ignore: np.ndarray | None = None
    notes: dict = field(default_factory=dict)


#: QuPath's class of regions to leave out of analysis is ``Ignore*``: any class named so
IGNORE_PREFIX = "ignore"
_UNCLASSIFIED = "(unclassified)"


def feature_class(feature: Any) -> str | None:
    """A GeoJSON feature's QuPath classification name (None: unclassified).

    QuPath writes ``properties.classification`` as ``{"name": ..., "color": [...]}`` (older
    versions ``colorRGB``); a plain string is accepted too.
    """
    props = feature.get("properties") if isinstance(feature, dict) else None
    if not isinstance(props, dict):
        return None
    cls = props.get("classification")
    if isinstance(cls, dict):
        cls = cls.get("name")
    return cls if isinstance(cls, str) and cls else None


def _roi_features(
    geo: dict, roi_classes: Sequence[str] | None, model_roi: str | None
) -> tuple[list[dict], list[dict], dict]:
    """The ROI features and the Ignore* features of a FeatureCollection, and which classes counted.

    ``roi_classes`` (case-insensitive): those classes; else ``model_roi`` when a feature has it;
    else every class but ``Ignore*`` (unclassified features included).
    """
    features = [f for f in geo.get("features", []) or [] if isinstance(f, dict)]
    found: dict[str, int] = {}
    for f in features:
        name = feature_class(f) or _UNCLASSIFIED
        found[name] = found.get(name, 0) + 1

    def is_ignore(f: dict) -> bool:
        return (feature_class(f) or "").casefold().startswith(IGNORE_PREFIX)

    ignore = [f for f in features if is_ignore(f)]
    others = [f for f in features if not is_ignore(f)]
    present = {(feature_class(f) or "").casefold() for f in others}
    if roi_classes:
        wanted = {c.casefold() for c in roi_classes}
        rule = "--roi-class"
    elif model_roi and model_roi.casefold() in present:
        wanted, rule = {model_roi.casefold()}, "the model's ROI class"
    else:
        wanted, rule = None, "every class but Ignore*"
    roi = [f for f in others if wanted is None or (feature_class(f) or "").casefold() in wanted]
    used = sorted({feature_class(f) or _UNCLASSIFIED for f in roi})
    notes = {
        "classes_found": found,
        "roi_classes": used,
        "roi_rule": rule,
        "ignore_regions": len(ignore),
    }
    return roi, ignore, notes


def annotation_mask(
    path: str | Path,
    shape: tuple[int, int],
    downsample: float,
    *,
    roi_classes: Sequence[str] | None = None,
    model_roi: str | None = None,
) -> GroundTruth:
    """Rasterise an annotation file on a grid.

    Args:
        path: GeoJSON (``.geojson``/``.json``), ASAP XML (``.xml``) or a mask image.
        shape: (H, W) of the grid.
        downsample: level-0 pixels per grid pixel (ignored for mask images, which cover the slide).
        roi_classes: the classes (GeoJSON classification names, ASAP groups) that are the ROI;
            None: the model's ROI class when the file has it, else every class but ``Ignore*``.
        model_roi: the model's ROI class (``localize``'s ``roi_class``).

    Returns:
        The ROI mask, the ``Ignore*`` pixels, and notes (format, counts, classes used).

    Raises:
        InputError: a missing or malformed file (with line and reason where the format has lines).
    """
    from histo_wsl.slideio.geojson import geojson_to_mask

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".geojson", ".json"):
        geo = _geojson(path)
        if geo is None:
            return GroundTruth(
                np.zeros(shape, dtype=bool), None, {"format": "geojson", "polygons": 0}
            )
        roi, ignore, notes = _roi_features(geo, roi_classes, model_roi)
        try:
            mask = geojson_to_mask(_collection(roi), shape, downsample)
            ign = geojson_to_mask(_collection(ignore), shape, downsample) if ignore else None
        except InputError as exc:
            raise InputError(exc.message, path) from None
        notes = {"format": "geojson", "features": len(geo.get("features", []) or []), **notes}
        return GroundTruth(mask, ign, notes)
    if suffix == ".xml":
        asap = read_asap_xml(path)
        if roi_classes:
            wanted = {c.casefold() for c in roi_classes}
            asap["include"]["features"] = [
                f
                for f in asap["include"]["features"]
                if str(f["properties"].get("group", "")).casefold() in wanted
            ]
        mask = geojson_to_mask(asap["include"], shape, downsample)
        if asap["exclude"]["features"]:
            mask &= ~geojson_to_mask(asap["exclude"], shape, downsample)
        notes = {
            "format": "asap-xml",
            "polygons": len(asap["include"]["features"]),
            "exclusions": len(asap["exclude"]["features"]),
            "groups": asap["groups"],
        }
        if asap["ignored"]:
            notes["ignored"] = asap["ignored"]
        if asap["degenerate"]:
            notes["degenerate_left_out"] = asap["degenerate"]
        if roi_classes:
            notes["roi_classes"] = sorted(roi_classes)
        return GroundTruth(mask, None, notes)
    if suffix in MASK_SUFFIXES:
        mask, info = _mask_image(path, shape)
        return GroundTruth(mask, None, {"format": "mask-image", **info})
    raise InputError(
        f"unknown annotation format {suffix!r}: give QuPath GeoJSON (.geojson), ASAP XML (.xml) or "
        "a mask image (.png, .tif)",
        path,
    )
