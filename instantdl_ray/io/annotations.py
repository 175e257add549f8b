"""QuPath GeoJSON annotations as training groundtruth: read, check, rasterise on the fly.

A training pair may be an image (a whole slide) plus ``groundtruth/<name>.geojson``, the file
QuPath writes with *File > Export objects as GeoJSON* (a ``FeatureCollection``, or a JSON list of
features from QuPath before 0.4). Coordinates are the image's level-0 pixel coordinates with
pixel ``(0, 0)`` covering ``[0, 1) x [0, 1)`` (QuPath's, and ``predict.shapes``'), so a pixel is
inside a polygon when its centre is.

What a feature means:

* a polygon (``Polygon``/``MultiPolygon``, holes kept) with ``properties.classification.name`` is
  an object of that class (semantic segmentation: a class index; instance segmentation: one
  object, whatever its class); an unclassified one is of class ``Unclassified`` (QuPath's word);
* ``Region*`` (QuPath's built-in class for it), and an unclassified *annotation* in a file that
  also holds other objects (the rectangle drawn before running a detection inside it), mark the
  annotated region: training tiles are sampled there and nothing is drawn;
* ``Ignore*`` polygons are not drawn (their pixels are background);
* points and lines hold no area and are skipped (counted in the data check's warnings).

Tiles are sampled only where annotations are: inside the regions when a file has any, else
around the drawn objects. Pixels of a sampled tile outside every polygon are background, so
objects inside an annotated region must be annotated completely.

Nothing here holds a whole-slide label: ``Labels`` is a lazy, zarr-like array whose windows are
rasterised when read (an R-tree finds the polygons a window touches).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

ANNOTATION_SUFFIXES = (".geojson", ".json")  # older QuPath scripts write .json
UNCLASSIFIED = "Unclassified"
REGION_CLASS = "Region*"
IGNORE_CLASS = "Ignore*"
AREA_TYPES = ("Polygon", "MultiPolygon")


class AnnotationError(ValueError):
    """A GeoJSON file that cannot be used as groundtruth; the message names the file and the fix."""


def is_annotation(path: Path) -> bool:
    return Path(path).suffix.lower() in ANNOTATION_SUFFIXES and not Path(path).name.startswith(".")


@dataclass
class Annotations:
    """The polygons of one file: ``shapes`` (drawn) with ``classes`` (one name each), ``regions``."""

    path: Path
    shapes: list = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    regions: list = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # geometry type -> count (points, lines)
    repaired: int = 0  # self-intersecting polygons made valid

    @property
    def class_names(self) -> list[str]:
        return sorted(set(self.classes))

    def bounds(self) -> tuple[float, float, float, float] | None:
        """(x_min, y_min, x_max, y_max) over shapes and regions, None when there are none."""
        geoms = self.shapes + self.regions
        if not geoms:
            return None
        b = np.array([g.bounds for g in geoms])
        return float(b[:, 0].min()), float(b[:, 1].min()), float(b[:, 2].max()), float(b[:, 3].max())


def _features(doc: Any, path: Path) -> list[dict]:
    if isinstance(doc, list):  # QuPath < 0.4 exports a JSON list of features
        return [f for f in doc if isinstance(f, dict)]
    if isinstance(doc, dict):
        kind = doc.get("type")
        if kind == "FeatureCollection":
            return [f for f in doc.get("features") or [] if isinstance(f, dict)]
        if kind == "Feature":
            return [doc]
        if kind in AREA_TYPES or kind in ("Point", "MultiPoint", "LineString", "MultiLineString", "GeometryCollection"):
            return [{"type": "Feature", "geometry": doc, "properties": {}}]
    raise AnnotationError(f"{path}: not GeoJSON features (found {type(doc).__name__}"
                          f"{' of type ' + repr(doc.get('type')) if isinstance(doc, dict) else ''}); export the "
                          "annotations from QuPath with File > Export objects as GeoJSON")


def _class_name(props: dict) -> str | None:
    c = props.get("classification")
    if isinstance(c, dict):
        name = c.get("name") or (":".join(c["names"]) if isinstance(c.get("names"), list) else None)
        return str(name) if name else None
    return str(c) if isinstance(c, str) and c else None


def _object_type(feature: dict) -> str:
    props = feature.get("properties") or {}
    kind = props.get("objectType") or feature.get("id") or ""  # QuPath 0.2: "id": "PathAnnotationObject"
    kind = str(kind).lower()
    return "annotation" if "annotation" in kind else ("detection" if ("detection" in kind or "cell" in kind) else kind)


def _areas(geom: Any) -> list:
    """The polygons of a shapely geometry (collections opened up)."""
    if geom.geom_type == "Polygon":
        return [geom] if not geom.is_empty else []
    if geom.geom_type in ("MultiPolygon", "GeometryCollection"):
        return [p for g in geom.geoms for p in _areas(g)]
    return []


@lru_cache(maxsize=32)
def _load(path: str, mtime_ns: int) -> Annotations:
    from shapely.geometry import shape as to_shape
    from shapely.ops import unary_union
    from shapely.validation import make_valid

    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AnnotationError(f"{p}: cannot be read as GeoJSON ({type(e).__name__}: {e}); export it again from "
                              "QuPath (File > Export objects as GeoJSON)") from None
    features = _features(doc, p)
    out = Annotations(p)
    parsed = []
    for k, f in enumerate(features):
        gj = f.get("geometry")
        kind = gj.get("type") if isinstance(gj, dict) else None
        if kind not in AREA_TYPES and kind != "GeometryCollection":
            out.skipped[str(kind)] = out.skipped.get(str(kind), 0) + 1
            continue
        try:
            geom = to_shape(gj)
        except Exception as e:  # noqa: BLE001 (shapely raises several types on bad coordinates)
            raise AnnotationError(f"{p}: feature {k} has a {kind} that is not valid GeoJSON ({type(e).__name__}: "
                                  f"{e}); fix or delete it in QuPath and export again") from None
        if not geom.is_valid:  # a hand-drawn outline crossing itself: keep the area it encloses
            geom = make_valid(geom)
            out.repaired += 1
        parts = _areas(geom)
        if not parts:
            out.skipped[str(kind)] = out.skipped.get(str(kind), 0) + 1
            continue
        props = f.get("properties") or {}
        parsed.append((unary_union(parts) if len(parts) > 1 else parts[0], _class_name(props), _object_type(f)))
    others = any(name is not None or kind != "annotation" for _, name, kind in parsed)
    points = None
    for k, (geom, name, kind) in enumerate(parsed):
        if name == REGION_CLASS:
            out.regions.append(geom)
        elif name == IGNORE_CLASS:
            continue
        elif name is None and kind == "annotation" and others and _holds_others(k, geom, points := points or _points(parsed)):
            out.regions.append(geom)
        else:
            out.shapes.append(geom)
            out.classes.append(name or UNCLASSIFIED)
    return out


def _points(parsed: list) -> Any:
    """An R-tree of a point inside each parsed feature (``representative_point``)."""
    from shapely.strtree import STRtree

    return STRtree([g.representative_point() for g, _, _ in parsed])


def _holds_others(k: int, geom: Any, points: Any) -> bool:
    """An unclassified annotation (feature ``k``) is a region when some other object lies inside
    it: the R-tree of their points, not a scan of every feature for each annotation."""
    return any(int(j) != k for j in points.query(geom, predicate="intersects"))


def load(path: str | Path) -> Annotations:
    """The annotations of a GeoJSON file (cached per process while the file is unchanged)."""
    p = Path(path)
    try:
        mtime = p.stat().st_mtime_ns
    except OSError as e:
        raise AnnotationError(f"{p}: cannot be read ({e.strerror})") from None
    return _load(str(p), mtime)


def problems(path: str | Path, image: str | Path, image_yx: Sequence[int]) -> list[str]:
    """What keeps the annotations of ``path`` from labelling ``image`` of ``image_yx`` pixels."""
    try:
        ann = load(path)
    except AnnotationError as e:
        return [str(e)]
    if not ann.shapes:
        what = f" ({', '.join(f'{n} {k}' for k, n in ann.skipped.items())} without area)" if ann.skipped else ""
        return [f"{path}: no polygon to learn from{what}; annotate objects as areas (polygons, brushes, "
                "rectangles) and export them with File > Export objects as GeoJSON"]
    h, w = int(image_yx[0]), int(image_yx[1])
    x0, y0, x1, y1 = ann.bounds()
    if x0 >= w or y0 >= h or x1 <= 0 or y1 <= 0:
        return [f"{path}: the annotations lie at x {x0:.0f}..{x1:.0f}, y {y0:.0f}..{y1:.0f}, outside {image} "
                f"({w} x {h} px); export them from the same image in QuPath (coordinates are the full-resolution "
                "pixels)"]
    if x1 > w * 1.01 + 1 or y1 > h * 1.01 + 1:
        return [f"{path}: annotations reach x {x1:.0f}, y {y1:.0f}, beyond {image} ({w} x {h} px); were they "
                "exported from another image, or from a downsampled copy of it?"]
    return []


def class_index(names: Sequence[str], class_names: dict[int, str] | None = None) -> dict[str, int]:
    """Class name -> label value: ``classes.txt``'s indices where it names the class, else 1, 2, ...
    in alphabetical order (one class: 1, a binary mask)."""
    if class_names:
        by_name = {v: k for k, v in class_names.items()}
        return {n: int(by_name[n]) for n in names if n in by_name}
    return {n: k for k, n in enumerate(sorted(set(names)), start=1)}


class Labels:
    """A lazy ``(Y, X)`` label image of an annotation file: ``arr[y0:y1, x0:x1]`` rasterises the
    polygons that touch the window. ``classes`` (name -> value) gives a class map; without it each
    polygon gets its own object id (its position in the file, from 1). Larger polygons are drawn
    first, so an object inside another one stays visible."""

    def __init__(self, path: str | Path, shape: Sequence[int], classes: dict[str, int] | None = None):
        self.path = Path(path)
        self.ann = load(self.path)
        self.shape = (int(shape[0]), int(shape[1]))
        self.ndim = 2
        self.classes = classes
        self.dtype = np.dtype(np.uint16 if classes is not None else np.uint32)
        self.values = np.array([classes.get(c, 0) for c in self.ann.classes] if classes is not None
                               else np.arange(1, len(self.ann.shapes) + 1), dtype=self.dtype)
        from shapely.strtree import STRtree

        self._tree = STRtree(self.ann.shapes)
        self._area = np.array([g.area for g in self.ann.shapes])

    def __getitem__(self, index: Any) -> np.ndarray:
        from instantdl_ray.io.slide import read_2d

        return read_2d(index, self.shape, self.window)

    def __array__(self, dtype=None, copy=None):
        out = self[:, :]
        return out if dtype is None else out.astype(dtype)

    def window(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        from shapely.geometry import box

        out = np.zeros((h, w), self.dtype)
        if h == 0 or w == 0:
            return out
        hits = self._tree.query(box(x0, y0, x0 + w, y0 + h))
        for k in sorted(hits, key=lambda i: -self._area[i]):
            if self.values[k]:
                _fill(out, self.ann.shapes[k], y0, x0, self.values[k])
        return out


def _fill(out: np.ndarray, geom: Any, y0: int, x0: int, value) -> None:
    """Set the pixels of ``out`` (whose pixel (0, 0) is image pixel (y0, x0)) whose centres lie in
    ``geom`` (a (Multi)Polygon in pixel-corner coordinates, holes kept) to ``value``."""
    for poly in _areas(geom):
        mask = _ring(out.shape, poly.exterior.coords, y0, x0)
        if mask is None:
            continue
        for hole in poly.interiors:
            inner = _ring(out.shape, hole.coords, y0, x0)
            if inner is not None:
                mask &= ~inner
        out[mask] = value


def _ring(shape: tuple[int, int], coords, y0: int, x0: int) -> np.ndarray | None:
    from skimage.draw import polygon

    xy = np.asarray(coords, dtype=np.float64)
    # skimage fills the pixels whose integer (row, col) lies inside: a pixel's centre is at +0.5
    rr, cc = polygon(xy[:, 1] - y0 - 0.5, xy[:, 0] - x0 - 0.5, shape)
    if rr.size == 0:
        return None
    mask = np.zeros(shape, bool)
    mask[rr, cc] = True
    return mask


def coverage_map(path: str | Path, shape: Sequence[int], cell: Sequence[int]) -> np.ndarray:
    """Where training tiles come from: a coarse ``(Y, X)`` grid (one cell per ``cell`` pixels),
    1 where the regions (or, without regions, the drawn objects) touch the cell."""
    ann = load(path)
    geoms = ann.regions or ann.shapes
    grid = [max(1, -(-int(s) // int(c))) for s, c in zip(shape, cell)]
    out = np.zeros(grid, np.float32)
    cy, cx = float(cell[0]), float(cell[1])
    import shapely
    from skimage.draw import polygon

    for geom in geoms:
        for poly in _areas(geom):
            xy = np.asarray(poly.exterior.coords, dtype=np.float64)
            rr, cc = polygon(xy[:, 1] / cy - 0.5, xy[:, 0] / cx - 0.5, out.shape)  # cells whose centre is inside
            out[rr, cc] = 1
            # and the cells its outline passes through (points at most a quarter cell apart), half a
            # pixel inside it: a pixel belongs to the polygon when its centre does
            inner = _areas(poly.buffer(-0.5, join_style="mitre"))
            rings = [np.asarray(shapely.segmentize(p.exterior, min(cy, cx) / 4).coords, dtype=np.float64) for p in inner]
            edge = np.concatenate(rings) if rings else np.array([poly.representative_point().coords[0]], np.float64)
            ys = np.clip((edge[:, 1] // cy).astype(np.int64), 0, grid[0] - 1)
            xs = np.clip((edge[:, 0] // cx).astype(np.int64), 0, grid[1] - 1)
            inside = (edge[:, 1] < shape[0]) & (edge[:, 0] < shape[1]) & (edge[:, 1] >= 0) & (edge[:, 0] >= 0)
            out[ys[inside], xs[inside]] = 1
    return out
