"""Segmentations of a slide as GeoJSON that QuPath imports (File > Import objects) and shapely reads.

A ``FeatureCollection`` in the slide's level-0 pixel coordinates (QuPath's), one ``Feature`` per
object (instance segmentation: ``objectType: "detection"``) or per connected region of a class
(semantic segmentation: ``objectType: "annotation"``), polygon outline with its holes, simplified
by half a pixel of the model's grid; ``properties.classification`` ``{name, color}`` and
``measurements`` (area in µm² where the pixel size is known, else px²; the object's score and mean
uncertainty where the run has them), the keys QuPath writes in its own exports.

Objects are read one bounding box at a time from the lazily sliceable label image (the objects
table gives the boxes), so memory stays flat in the slide's size; a semantic mask is labelled
into connected regions block by block and regions cut by a block edge are joined by shapely's union.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

BLOCK = 2048  # px per side of the blocks a semantic mask is vectorised in


def _colour(k: int) -> list[int]:
    from matplotlib import colormaps

    r, g, b, _ = colormaps["tab10"](k % 10)
    return [int(255 * r), int(255 * g), int(255 * b)]


def outline(mask: np.ndarray, y0: float = 0.0, x0: float = 0.0, factor: float = 1.0, simplify: float = 0.5):
    """The shapely (Multi)Polygon of a boolean crop whose pixel ``(0, 0)`` sits at ``(y0, x0)``,
    in ``factor`` x those coordinates; holes kept, simplified by ``simplify`` px (crop units)."""
    from shapely.geometry import Polygon
    from shapely.ops import unary_union
    from shapely.validation import make_valid
    from skimage.measure import find_contours

    padded = np.pad(mask.astype(np.uint8), 1)
    rings = [Polygon(c[:, ::-1]) for c in find_contours(padded, 0.5) if len(c) >= 4]
    rings = [r if r.is_valid else make_valid(r) for r in rings]
    rings = sorted((r for r in rings if r.area > 0), key=lambda r: -r.area)
    shape = None
    for r in rings:  # largest first: a ring inside what is already there is a hole
        if shape is not None and shape.contains(r.representative_point()) and shape.covers(r):
            shape = shape.difference(r)
        else:
            shape = r if shape is None else unary_union([shape, r])
    if shape is None:
        return None
    from shapely import affinity

    # contours run through pixel centres of the padded crop; QuPath's coordinates are pixel corners
    shape = affinity.affine_transform(shape, [factor, 0, 0, factor, (x0 - 0.5) * factor, (y0 - 0.5) * factor])
    shape = shape.simplify(simplify * factor, preserve_topology=True)
    return shape if shape.is_valid else make_valid(shape)


def _feature(geom, object_type: str, name: str | None, colour: list[int], measurements: dict | None = None) -> dict:
    """A QuPath feature: ``classification`` when ``name`` is given (else unclassified),
    ``measurements`` when there are any (NaN written as null)."""
    import geojson
    from shapely.geometry import mapping

    props: dict = {"objectType": object_type}
    if name is not None:
        props["classification"] = {"name": name, "color": colour}
    if measurements:
        props["measurements"] = {k: (None if v is None or (isinstance(v, float) and np.isnan(v)) else v)
                                 for k, v in measurements.items()}
    return geojson.Feature(geometry=mapping(geom), properties=props)


def _area_key(mpp: float | None) -> str:
    return "Area µm^2" if mpp else "Area px^2"


def instance_features(labels: Any, objects_csv: Path, factor: float, mpp: float | None, name: str,
                      uncertainty: Any = None) -> Iterator[dict]:
    """One detection per object of the label image, boxes from the objects table
    (``predictions/<stem>_objects.csv``: id, score, area, y_min, x_min, y_max, x_max)."""
    import csv

    px_area = (mpp * mpp) if mpp else 1.0
    with open(objects_csv, newline="") as f:
        for row in csv.DictReader(f):
            i = int(row["id"])
            y0, x0, y1, x1 = (int(row[k]) for k in ("y_min", "x_min", "y_max", "x_max"))
            crop = np.asarray(labels[y0:y1, x0:x1]) == i
            if not crop.any():
                continue
            geom = outline(crop, y0, x0, factor)
            if geom is None or geom.is_empty:
                continue
            score = float(row["score"]) if row.get("score") not in (None, "", "nan") else None
            meas = {_area_key(mpp): float(crop.sum()) * px_area, "score": score}
            if uncertainty is not None:
                meas["mean uncertainty"] = float(np.asarray(uncertainty[y0:y1, x0:x1])[crop].mean())
            yield _feature(geom, "detection", name, _colour(0), meas)


def label_features(label: np.ndarray, name: str | None = None, y0: int = 0, x0: int = 0,
                   object_type: str = "annotation", simplify: float = 0.0) -> Iterator[dict]:
    """One QuPath feature per object of a label image that sits at ``(y0, x0)`` of a slide: its
    outline (holes kept; ``simplify`` px, none by default, so QuPath's import rasterises back to
    the same pixels), ``classification`` ``name`` (None: unclassified). Existing label masks become
    annotations a pathologist can correct in QuPath, or training groundtruth (``io.annotations``)."""
    from scipy import ndimage as ndi

    for i, box in enumerate(ndi.find_objects(np.asarray(label)), start=1):
        if box is None:
            continue
        geom = outline(np.asarray(label)[box] == i, y0 + box[0].start, x0 + box[1].start, simplify=simplify)
        if geom is not None and not geom.is_empty:
            yield _feature(geom, object_type, name, _colour(0))


def class_features(mask: Any, class_names: list[str], factor: float, mpp: float | None) -> Iterator[dict]:
    """One annotation per connected region of each class > 0 of a semantic mask (``(Y, X)``),
    vectorised ``BLOCK``² px at a time (memory flat in the slide's size); regions cut by a block
    edge are joined across it with shapely."""
    from shapely.ops import unary_union
    from skimage.measure import label, regionprops

    ny, nx = (int(n) for n in mask.shape[-2:])
    px_area = (mpp * mpp) if mpp else 1.0  # area of one pixel of the model's grid
    for k in range(1, max(2, len(class_names))):
        whole, cut = [], []
        for b0 in range(0, ny, BLOCK):
            for c0 in range(0, nx, BLOCK):
                block = np.asarray(mask[b0:b0 + BLOCK, c0:c0 + BLOCK]) == k
                if not block.any():
                    continue
                for r in regionprops(label(block)):
                    y0, x0, y1, x1 = r.bbox
                    geom = outline(r.image, y0 + b0, x0 + c0, factor)
                    if geom is None or geom.is_empty:
                        continue
                    touches = ((y0 == 0 and b0 > 0) or (y1 == block.shape[0] and b0 + BLOCK < ny)
                               or (x0 == 0 and c0 > 0) or (x1 == block.shape[1] and c0 + BLOCK < nx))
                    (cut if touches else whole).append((geom, float(r.area)))
        if cut:  # regions cut by a block edge: joined across it (half a pixel of slack closes the seam)
            merged = unary_union([g.buffer(0.5 * factor) for g, _ in cut]).buffer(-0.5 * factor)
            whole += [(g, g.area / (factor * factor)) for g in getattr(merged, "geoms", [merged]) if not g.is_empty]
        name = class_names[k] if k < len(class_names) else f"class {k}"
        for geom, area in whole:
            yield _feature(geom, "annotation", name, _colour(k - 1), {_area_key(mpp): area * px_area})


def write_geojson(path: Path, features: Iterable[dict]) -> Path:
    """A FeatureCollection written feature by feature (a slide's millions of nuclei never sit in
    memory together), each checked with ``geojson``'s validator; the file appears when complete."""
    import json

    import geojson

    from instantdl_ray.io import write

    with write.atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write('{"type": "FeatureCollection", "features": [')
        for k, feat in enumerate(features):
            if not geojson.GeoJSON.to_instance(feat).is_valid:
                raise ValueError(f"{path}: invalid GeoJSON feature {k}: {geojson.GeoJSON.to_instance(feat).errors()}")
            f.write(("," if k else "") + "\n" + json.dumps(feat, separators=(",", ":"), allow_nan=False))
        f.write("\n]}\n")
    return Path(path)
