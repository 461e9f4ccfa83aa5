"""Regions as GeoJSON in level-0 pixel coordinates, the format QuPath opens, edits and exports back.

- :func:`mask_to_geojson`: a mask's outlines (with holes) as a FeatureCollection of polygons,
  styled by a :class:`GeoJSONStyle`;
- :func:`geojson_to_mask`: polygons rasterised onto a mask at a downsample (pixel centres);
- :func:`read_geojson` / :func:`write_geojson`: checked reading (a clear error naming the file and how
  to export it from QuPath) and atomic writing.

Tissue outlines, localize's regions and ground-truth annotations all use it.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from histo_wsl.errors import InputError

__all__ = ["GeoJSONStyle", "geojson_to_mask", "mask_to_geojson", "read_geojson", "write_geojson"]

_ON_EDGE = 2e-3  # a pixel centre this close (px) to a polygon boundary counts as on it


_GEOJSON_HINT = (
    "export the annotations from QuPath with File > Export objects as GeoJSON, "
    "or pass a FeatureCollection of Polygon/MultiPolygon features in level-0 pixels"
)


#: level-0 ring coordinates are written with this many decimals
_DECIMALS = 3
#: namespace of the features' stable ids (uuid5 of the mask, style and component)
_ID_NAMESPACE = uuid.UUID("6f1c2a57-6b0e-4f4e-9a51-5d1f2e3c4b7a")


def _ring(contour: np.ndarray) -> np.ndarray:
    """A contour traced on the mask upscaled 3x -> its ring on the mask's pixel edges.

    On the 3x grid a boundary pixel of an original pixel ``c`` sits at ``3c`` (its left or top
    edge) or ``3c + 2`` (its right or bottom edge): ``(i + 1) // 3`` is that edge's coordinate,
    ``c`` or ``c + 1``. The diagonal steps OpenCV takes at corners collapse onto the corner.
    """
    q = (contour.reshape(-1, 2) + 1) // 3
    keep = np.ones(len(q), dtype=bool)
    keep[1:] = np.any(q[1:] != q[:-1], axis=1)
    q = q[keep]
    if len(q) > 1 and (q[0] == q[-1]).all():
        q = q[:-1]
    return q


def _trace(mask: np.ndarray, offset: tuple[int, int] = (0, 0)) -> list[tuple]:
    """Each outer contour of ``mask`` as (shell, holes, a pixel of it), on pixel edges + offset."""
    up = cv2.resize(mask.view(np.uint8), None, fx=3, fy=3, interpolation=cv2.INTER_NEAREST)
    contours, hierarchy = cv2.findContours(up, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    hier = hierarchy.reshape(-1, 4)  # next, previous, first child, parent
    off = np.asarray(offset)
    out = []
    for i in np.flatnonzero(hier[:, 3] < 0):
        holes, child = [], hier[i, 2]
        while child >= 0:
            hole = _ring(contours[child])
            if len(hole) >= 3:
                holes.append(hole + off)
            child = hier[child, 0]
        x, y = contours[i].reshape(-1, 2)[0] // 3 + off
        out.append((_ring(contours[i]) + off, holes, (int(x), int(y))))
    return out


def _component_geometry(
    shell: np.ndarray, holes: list, labels: np.ndarray, k: int, box: tuple[int, int, int, int]
) -> Any:
    """Component ``k``'s polygon, valid by OGC rules (what QuPath and shapely measure right).

    Traced as one 8-connected piece, a component whose pixels touch only at corners gives a ring
    that touches itself (invalid); it is then traced again as its 4-connected parts (its pixels in
    ``labels`` within its bounding ``box`` x, y, w, h), which touch at points only: a valid
    MultiPolygon.
    """
    import shapely

    polygon = shapely.Polygon(shell, holes)
    if polygon.is_valid:
        return polygon
    x0, y0, bw, bh = box
    sub = labels[y0 : y0 + bh, x0 : x0 + bw] == k
    n, labels, stats, _ = cv2.connectedComponentsWithStats(sub.view(np.uint8), connectivity=4)
    parts = []
    for j in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[j])
        if area == w * h:  # a filled rectangle
            parts.append(shapely.box(x0 + x, y0 + y, x0 + x + w, y0 + y + h))
            continue
        piece = np.ascontiguousarray(labels[y : y + h, x : x + w] == j)
        for ring, hole_rings, _ in _trace(piece, (x0 + x, y0 + y)):
            part = shapely.Polygon(ring, hole_rings)
            part = part if part.is_valid else shapely.make_valid(part)
            parts.extend(getattr(part, "geoms", [part]))
    return shapely.MultiPolygon([p for p in parts if p.geom_type == "Polygon"])


@dataclass(frozen=True)
class GeoJSONStyle:
    """How :func:`mask_to_geojson` labels its features in QuPath.

    Attributes:
        name: classification name (``Tissue``, ``Gland``...).
        color: classification colour, RGB 0-255.
        value_name: name of the per-feature measurement taken from ``values``.
        value_scale: factor applied to that mean (e.g. 1/255 for a uint8 probability map).
    """

    name: str = "Tissue"
    color: tuple[int, int, int] = (0, 200, 0)
    value_name: str = "Mean probability"
    value_scale: float = 1.0


def mask_to_geojson(
    mask: np.ndarray,
    downsample: float,
    *,
    style: GeoJSONStyle = GeoJSONStyle(),  # noqa: B008 (frozen, shared safely)
    mpp: float | None = None,
    min_area_px: int = 0,
    values: np.ndarray | None = None,
    id_namespace: str | None = None,
) -> dict:
    """Outline a mask as a QuPath-style GeoJSON FeatureCollection in level-0 pixels.

    Each 8-connected component becomes one ``Feature`` whose ``geometry`` is a ``Polygon`` (outer
    ring, then one ring per hole), or a ``MultiPolygon`` of its 4-connected parts when they touch
    only at corners. Rings run along the pixels' edges (pixel ``(c, r)`` covers ``[c, c+1) ×
    [r, r+1)``), multiplied by ``downsample``: a polygon's area is its pixels' area exactly, and
    every geometry is valid by OGC rules (no self-intersection or spike; holes kept), so QuPath and
    shapely measure what the mask holds. Rings are closed, exteriors counter-clockwise and holes
    clockwise on the coordinates as written (RFC 7946; QuPath accepts either). Each feature has a
    stable ``id`` (a UUID, as QuPath 0.4+ writes): the same mask, style and ``id_namespace`` give
    the same ids.

    Args:
        mask: (H, W) bool mask (thumbnail coordinates).
        downsample: level-0 pixels per mask pixel.
        style: the features' classification name and colour, and the measurement's name and
            scale.
        mpp: level-0 µm per pixel; when given each feature gets ``measurements["Area µm^2"]``.
        min_area_px: components of fewer pixels than this are dropped.
        values: optional (H, W) per-pixel values (e.g. a probability map); each feature then gets
            ``measurements[style.value_name]``, the mean of ``values × style.value_scale`` over the
            pixels of its 8-connected component.
        id_namespace: what the ids are unique within (e.g. the slide's name).

    Returns:
        A JSON-serialisable ``FeatureCollection`` dict whose features have ``properties.objectType``
        ``"annotation"``, ``classification`` ``{name, color}``, ``isLocked`` False, and
        ``measurements``.
    """
    import shapely

    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {m.shape}")
    downsample = float(downsample)
    if not (math.isfinite(downsample) and downsample > 0):
        raise ValueError(f"downsample must be a positive number, got {downsample!r}")
    rgb = [int(c) for c in style.color]
    features: list[dict] = []
    m = np.ascontiguousarray(m)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(
        m.view(np.uint8), connectivity=8, ltype=cv2.CV_32S
    )
    means = None
    if values is not None:
        v = np.asarray(values)
        if v.shape != m.shape:
            raise ValueError(f"values shape {v.shape} does not match mask shape {m.shape}")
        counts = np.bincount(labels.ravel(), minlength=n)
        sums = np.bincount(labels.ravel(), weights=v.ravel().astype(np.float64), minlength=n)
        means = sums / np.maximum(counts, 1) * float(style.value_scale)
    namespace = f"{id_namespace or ''}|{style.name}|{downsample!r}|{m.shape}"
    for shell, holes, (px, py) in _trace(m):
        k = int(labels[py, px])  # an outer contour runs through its 8-connected component
        x, y, w, h, area_px = (int(a) for a in stats[k])
        if area_px < min_area_px:
            continue
        geometry = _component_geometry(shell, holes, labels, k, (x, y, w, h))
        geometry = shapely.orient_polygons(geometry)  # RFC 7946: exteriors counter-clockwise
        geometry = shapely.transform(geometry, lambda c: np.round(c * downsample, _DECIMALS))
        measurements: dict[str, float] = {}
        if mpp is not None:
            measurements["Area µm^2"] = round(area_px * (downsample * float(mpp)) ** 2, 3)
        if means is not None:
            measurements[style.value_name] = round(float(means[k]), 4)
        features.append(
            {
                "type": "Feature",
                "id": str(uuid.uuid5(_ID_NAMESPACE, f"{namespace}|{px},{py}")),
                "geometry": json.loads(shapely.to_geojson(geometry)),
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": style.name, "color": rgb},
                    "isLocked": False,
                    "measurements": measurements,
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def _iter_geometries(obj: Any) -> Iterator[dict]:
    """Yield every geometry dict inside a FeatureCollection, Feature, geometry or list of them."""
    if isinstance(obj, list):
        for item in obj:
            yield from _iter_geometries(item)
        return
    if not isinstance(obj, dict):
        return
    kind = obj.get("type")
    if kind == "FeatureCollection" or (kind is None and "features" in obj):
        yield from _iter_geometries(obj.get("features") or [])
    elif kind == "Feature" or (kind is None and "geometry" in obj):
        geometry = obj.get("geometry")
        if isinstance(geometry, dict):
            yield from _iter_geometries(geometry)
    elif kind == "GeometryCollection":
        yield from _iter_geometries(obj.get("geometries") or [])
    elif isinstance(kind, str):
        yield obj


def _iter_polygons(obj: Any) -> Iterator[list[np.ndarray]]:
    """Yield each polygon as a list of (N, 2) float rings (outer first); other geometries skipped.

    Raises:
        ValueError: a Polygon/MultiPolygon whose coordinates are not lists of [x, y] numbers.
    """
    for geometry in _iter_geometries(obj):
        kind = geometry.get("type")
        if kind == "Polygon":
            polygons = [geometry.get("coordinates")]
        elif kind == "MultiPolygon":
            polygons = geometry.get("coordinates")
            if not isinstance(polygons, list):
                raise ValueError("a MultiPolygon has no list of coordinates")
        else:
            continue
        for polygon in polygons:
            if not isinstance(polygon, list):
                raise ValueError(f"a {kind} has coordinates that are not a list of rings")
            rings = []
            for ring in polygon:
                try:
                    arr = np.asarray(ring, dtype=np.float64)
                except (TypeError, ValueError):
                    raise ValueError(f"a {kind} ring is not a list of [x, y] numbers") from None
                if arr.ndim != 2 or arr.shape[1] < 2 or not np.isfinite(arr[:, :2]).all():
                    raise ValueError(f"a {kind} ring is not a list of [x, y] numbers")
                rings.append(arr[:, :2])
            if rings:
                yield rings


def _count_polygons(obj: Any) -> int:
    return sum(1 for _ in _iter_polygons(obj))


def _rasterise_polygons(polygons: list[list[np.ndarray]], shape: tuple[int, int]) -> np.ndarray:
    """Even-odd scanline fill of polygons given in mask pixel-index coordinates (centres at integers).

    A pixel is set when its centre is inside a polygon (holes excluded) or on its boundary (within
    ``_ON_EDGE`` px). Polygons are OR-ed together. Vectorised over all edges of all polygons.
    """
    h, w = shape
    eps = _ON_EDGE
    out_rows: list[np.ndarray] = []
    out_c0: list[np.ndarray] = []
    out_c1: list[np.ndarray] = []

    def add_spans(rows: np.ndarray, x0: np.ndarray, x1: np.ndarray) -> None:
        c0 = np.ceil(x0 - eps)
        c1 = np.floor(x1 + eps)
        ok = (rows >= 0) & (rows < h) & (c1 >= 0) & (c0 <= w - 1) & (c0 <= c1)
        out_rows.append(rows[ok].astype(np.int64))
        out_c0.append(np.clip(c0[ok], 0, w - 1).astype(np.int64))
        out_c1.append(np.clip(c1[ok], 0, w - 1).astype(np.int64))

    pid_parts, a_parts, b_parts = [], [], []
    for pid, rings in enumerate(polygons):
        for ring in rings:
            if len(ring) < 3:
                continue
            pid_parts.append(np.full(len(ring), pid, dtype=np.int64))
            a_parts.append(ring)
            b_parts.append(np.roll(ring, -1, axis=0))  # implicit closing edge
    if not a_parts:
        return np.zeros(shape, dtype=bool)
    pid = np.concatenate(pid_parts)
    a = np.concatenate(a_parts)
    b = np.concatenate(b_parts)
    xa, ya, xb, yb = a[:, 0], a[:, 1], b[:, 0], b[:, 1]

    # Interior: rows whose centre line y crosses an edge with min(ya, yb) <= y < max(ya, yb).
    lo, hi = np.minimum(ya, yb), np.maximum(ya, yb)
    r0 = np.clip(np.ceil(lo), 0, h).astype(np.int64)
    r1 = np.clip(np.ceil(hi), 0, h).astype(np.int64)
    count = np.where(ya != yb, np.maximum(r1 - r0, 0), 0)
    total = int(count.sum())
    if total:
        edge = np.repeat(np.arange(len(count)), count)
        first = np.cumsum(count) - count
        rows = r0[edge] + (np.arange(total) - first[edge])
        t = (rows - ya[edge]) / (yb[edge] - ya[edge])
        xs = xa[edge] + t * (xb[edge] - xa[edge])
        order = np.lexsort((xs, rows, pid[edge]))
        rows, xs = rows[order], xs[order]
        # Each (polygon, row) group has an even number of crossings: pair them in order.
        add_spans(rows[0::2], xs[0::2], xs[1::2])

    # Boundary: horizontal edges on a row of centres, and vertices on a centre.
    flat = (ya == yb) & (np.abs(ya - np.round(ya)) <= eps)
    add_spans(np.round(ya[flat]), np.minimum(xa[flat], xb[flat]), np.maximum(xa[flat], xb[flat]))
    on_centre = (np.abs(xa - np.round(xa)) <= eps) & (np.abs(ya - np.round(ya)) <= eps)
    add_spans(np.round(ya[on_centre]), xa[on_centre], xa[on_centre])

    rows = np.concatenate(out_rows)
    c0 = np.concatenate(out_c0)
    c1 = np.concatenate(out_c1)
    stride = w + 1
    n = h * stride
    diff = np.bincount(rows * stride + c0, minlength=n) - np.bincount(
        rows * stride + c1 + 1, minlength=n
    )
    return np.cumsum(diff.reshape(h, stride), axis=1)[:, :w] > 0


def geojson_to_mask(geojson: Any, shape: tuple[int, int], downsample: float) -> np.ndarray:
    """Rasterise Polygon/MultiPolygon geometries into a bool mask (thumbnail coordinates).

    Level-0 coordinates are divided by ``downsample``; a pixel is set when its centre lies inside a
    polygon (holes honoured, even-odd rule) or on its boundary. Every polygon counts as tissue,
    whatever its ``objectType`` or classification; other geometry types (points, lines) are ignored.
    This inverts :func:`mask_to_geojson` exactly.

    Args:
        geojson: a FeatureCollection, a Feature, a bare geometry, or a list of features.
        shape: (H, W) of the mask to produce.
        downsample: level-0 pixels per mask pixel.

    Returns:
        (H, W) bool mask.

    Raises:
        InputError: a polygon's coordinates are not lists of [x, y] numbers.
    """
    h, w = int(shape[0]), int(shape[1])
    downsample = float(downsample)
    if not (math.isfinite(downsample) and downsample > 0):
        raise ValueError(f"downsample must be a positive number, got {downsample!r}")
    try:
        polygons = list(_iter_polygons(geojson))
    except ValueError as exc:
        raise InputError(f"the GeoJSON is malformed: {exc}; {_GEOJSON_HINT}") from None
    if h <= 0 or w <= 0:
        return np.zeros((max(h, 0), max(w, 0)), dtype=bool)
    # Pixel (c, r) has its centre at (c + 0.5, r + 0.5) in pixel-corner coordinates.
    scaled = [[ring / downsample - 0.5 for ring in rings] for rings in polygons]
    return _rasterise_polygons(scaled, (h, w))


def read_geojson(path: str | Path) -> dict:
    """Load a GeoJSON file of tissue (or region) polygons, e.g. exported from QuPath.

    A top-level list of features is wrapped in a FeatureCollection.

    Args:
        path: the ``.geojson``/``.json`` file.

    Returns:
        The parsed GeoJSON object (a dict).

    Raises:
        InputError: the file is missing or unreadable, is not valid JSON (the message gives the line
            and column), or holds no Polygon/MultiPolygon geometry.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError("GeoJSON file not found; check the path", path) from None
    except IsADirectoryError:
        raise InputError(
            "is a directory, not a GeoJSON file; pass the .geojson file", path
        ) from None
    except UnicodeDecodeError:
        raise InputError(
            "is not a UTF-8 text file, so not GeoJSON; pass the .geojson file exported from QuPath",
            path,
        ) from None
    except OSError as exc:
        raise InputError(f"cannot be read ({exc.strerror}); check its permissions", path) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(
            f"is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}; "
            "fix the file there or export it again from QuPath",
            path,
        ) from None
    if isinstance(data, list):
        data = {"type": "FeatureCollection", "features": data}
    if not isinstance(data, dict):
        raise InputError(
            f"is JSON but not GeoJSON (top level is a {type(data).__name__}); {_GEOJSON_HINT}", path
        )
    try:
        n = _count_polygons(data)
    except ValueError as exc:
        raise InputError(f"is malformed GeoJSON: {exc}; {_GEOJSON_HINT}", path) from None
    if n == 0:
        raise InputError(f"contains no Polygon or MultiPolygon geometry; {_GEOJSON_HINT}", path)
    return data


def write_geojson(path: str | Path, data: dict) -> None:
    """Write GeoJSON atomically: a temporary file in the same folder, then ``os.replace``.

    Readers never see a half-written file, and an interrupted write leaves no file behind.

    Args:
        path: destination file; its folder is created if needed.
        data: a JSON-serialisable GeoJSON object.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            # json.dumps encodes in C; json.dump writes piece by piece from Python (several times slower)
            f.write(json.dumps(data, ensure_ascii=False, separators=(",", ":")))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
