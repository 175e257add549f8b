"""Classification on a whole slide: a map of class probabilities, one value per patch.

A classification model sees patches like its training images (``data.dataset.patch_shape``: their
size at the model's pixel size). On a slide, ``predict`` classifies the patches of a grid without
overlap that touch tissue; ``TileMap`` gathers their outputs and ``write_tile_map`` writes, per
slide:

* ``<slide>_tiles.csv``: one row per patch: grid row and column, its box in the slide's level-0
  pixels (x, y, width, height: what QuPath and the slide's own viewer use), the predicted class,
  one probability per class and the uncertainty;
* ``<slide>.ome.zarr``: the probability maps (one channel per class, then the uncertainty), one
  pixel per patch, with the patch's physical size as pixel size, and the predicted class in
  ``labels/prediction`` (class index + 1; 0 where no patch was classified: glass);
* the slide's record (``predictions.csv``, ``index.json``): the class of the mean probability over
  its patches, that mean, the mean uncertainty, and the number of patches of each class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np


class TileMap:
    """The outputs of one slide's patches, on the grid ``grid`` (``tile.Tile``s, C order);
    ``active``: the indices of the patches that are classified (tissue), else all."""

    def __init__(self, grid: Sequence[Any], active: Sequence[int] | None, n_classes: int):
        self.grid = list(grid)
        ys = sorted({int(t.read[-2].start) for t in self.grid})
        xs = sorted({int(t.read[-1].start) for t in self.grid})
        row, col = {y: k for k, y in enumerate(ys)}, {x: k for k, x in enumerate(xs)}
        self.pos = [(row[int(t.read[-2].start)], col[int(t.read[-1].start)]) for t in self.grid]
        self.prob = np.full((n_classes, len(ys), len(xs)), np.nan, np.float32)
        self.uncertainty = np.full((len(ys), len(xs)), np.nan, np.float32)
        self.todo = set(range(len(self.grid)) if active is None else (int(k) for k in active))
        self.count = len(self.todo)

    def add(self, index: int, outputs: dict) -> bool:
        """One patch's outputs (``prob``, optionally ``uncertainty``); True once all are in."""
        r, c = self.pos[index]
        self.prob[:, r, c] = np.asarray(outputs["prob"], np.float32).reshape(-1)
        if outputs.get("uncertainty") is not None:
            self.uncertainty[r, c] = float(np.asarray(outputs["uncertainty"]).reshape(-1)[0])
        self.todo.discard(int(index))
        return not self.todo


def write_tile_map(s: Any, tm: TileMap, plan: Any, pred_dir: Path, meta: dict) -> dict:
    """Write the patch table and the OME-Zarr map of one slide (see the module docstring); returns
    its record. ``meta``: ``plan.extra["slides"][slide]`` (``factor``: level-0 px per model px,
    ``mpp``: the model grid's pixel size)."""
    from instantdl_ray.data.dataset import patch_shape
    from instantdl_ray.io import write

    names = list(plan.class_names) or [str(k) for k in range(tm.prob.shape[0])]
    factor = float(meta.get("factor", 1.0))
    done = ~np.isnan(tm.prob[0])
    pred = np.where(done, np.nan_to_num(tm.prob).argmax(0), -1)
    has_unc = bool(np.any(~np.isnan(tm.uncertainty)))
    rows = []
    for k, t in enumerate(tm.grid):
        r, c = tm.pos[k]
        if not done[r, c]:
            continue
        y0, x0 = int(t.read[-2].start), int(t.read[-1].start)
        h, w = int(t.read[-2].stop) - y0, int(t.read[-1].stop) - x0
        rows.append([k, r, c, round(x0 * factor), round(y0 * factor), round(w * factor), round(h * factor),
                     int(pred[r, c]), names[int(pred[r, c])]] + [f"{p:.6f}" for p in tm.prob[:, r, c]]
                    + ([f"{tm.uncertainty[r, c]:.6f}"] if has_unc else []))
    header = (["tile", "row", "col", "x", "y", "width", "height", "prediction", "class"]
              + [f"prob_{n}" for n in names] + (["uncertainty"] if has_unc else []))
    table = write.write_csv(pred_dir / f"{s.stem}_tiles.csv", header, rows)
    channels = [np.nan_to_num(tm.prob)] + ([np.nan_to_num(tm.uncertainty)[None]] if has_unc else [])
    mpp = meta.get("mpp")
    patch_um = float(mpp) * float(patch_shape(plan)[-1]) if mpp else None
    labels = (pred + 1).astype(np.uint16)  # 0: no patch classified there
    zarr_path = write.write_ome_zarr(pred_dir / f"{s.stem}.ome.zarr", np.concatenate(channels).astype(np.float32),
                                     [f"prob_{n}" for n in names] + (["uncertainty"] if has_unc else []),
                                     mpp=patch_um, labels={"prediction": labels})
    mean = np.nanmean(tm.prob.reshape(tm.prob.shape[0], -1), 1) if done.any() else np.full(tm.prob.shape[0], np.nan)
    counts = {names[k]: int(np.sum(pred == k)) for k in range(len(names))}
    return {"name": s.stem, "image": str(s.image), "prediction": int(np.nan_to_num(mean, nan=-1).argmax()),
            "prob": [float(p) for p in mean],
            "uncertainty": float(np.nanmean(tm.uncertainty)) if has_unc and done.any() else None,
            "groundtruth": s.groundtruth, "tiles": int(done.sum()), "class_tiles": counts,
            "tile_table": str(table), "ome_zarr": str(zarr_path)}
