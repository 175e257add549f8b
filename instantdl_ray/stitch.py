"""Blend tile outputs back into whole images; memory bounded by the image, never by the test set.

Averageable outputs (probabilities, values, uncertainty maps) are accumulated as weighted sums
with Gaussian blending weights; label tiles (Mask R-CNN) are merged by keeping each object in
the tile whose core holds its centroid. Large images accumulate in zarr on disk instead of RAM.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .tile import Tile, blend_weights

IN_MEMORY_LIMIT = 64 * 2**20  # accumulator elements; above this the sums live in zarr on disk


class ImageAccumulator:
    """Weighted-sum accumulator for one image. ``add`` tiles in any order, then ``result``."""

    def __init__(self, spatial_shape: tuple[int, ...], tiles: list[Tile], tile_shape: tuple[int, ...],
                 scratch: Path | None = None, blend: str = "gaussian"):
        self.shape = tuple(spatial_shape)
        self.tiles = tiles
        self.remaining = len(tiles)
        self.weights = blend_weights(tuple(tile_shape), blend) if len(tiles) > 1 else np.ones(tile_shape, np.float32)
        self.scratch = scratch
        self.sums: dict[str, Any] = {}
        self.wsum: Any = None
        self.labels: np.ndarray | None = None
        self.next_label = 1
        self.object_scores: dict[int, float] = {}

    def _array(self, name: str, shape: tuple[int, ...]):
        if self.scratch is None or int(np.prod(shape)) <= IN_MEMORY_LIMIT:
            return np.zeros(shape, np.float32)
        import zarr

        chunks = tuple(min(s, 1024 if i >= len(shape) - 2 else 1) for i, s in enumerate(shape))
        return zarr.create_array(store=str(self.scratch / f"{name}.zarr"), shape=shape, chunks=chunks,
                                 dtype="float32", fill_value=0.0, overwrite=True)

    def add(self, tile_index: int, outputs: dict[str, np.ndarray]) -> bool:
        """Add one tile's outputs (each ``(C, *tile)``); returns True when the image is complete."""
        t = self.tiles[tile_index]
        crop = tuple(slice(0, s.stop - s.start) for s in t.read)
        if "labels" in outputs:
            self._add_labels(t, outputs["labels"][0][crop], outputs.get("scores"))
        w = self.weights[crop]
        if self.wsum is None and any(k not in ("labels", "scores") for k in outputs):
            self.wsum = self._array("weight", self.shape)
        for k, v in outputs.items():
            if k in ("labels", "scores"):
                continue
            if k not in self.sums:
                self.sums[k] = self._array(k, (v.shape[0],) + self.shape)
            region = (slice(None),) + t.read
            self.sums[k][region] = self.sums[k][region] + v[(slice(None),) + crop] * w
        if self.wsum is not None and any(k not in ("labels", "scores") for k in outputs):
            self.wsum[t.read] = self.wsum[t.read] + w
        self.remaining -= 1
        return self.remaining == 0

    def _add_labels(self, t: Tile, lab: np.ndarray, scores: np.ndarray | None) -> None:
        from scipy import ndimage as ndi

        if self.labels is None:
            self.labels = np.zeros(self.shape, np.uint32)
        ids = np.unique(lab)
        ids = ids[ids > 0]
        if len(ids) == 0:
            return
        centroids = ndi.center_of_mass(np.ones_like(lab), lab, ids)
        region = self.labels[t.read]
        for i, c in zip(ids, centroids):
            pos = [int(ci) + s.start for ci, s in zip(c, t.read)]
            if not all(core.start <= p < core.stop for p, core in zip(pos, t.core)):
                continue  # this object belongs to the neighbouring tile whose core holds it
            m = (lab == i) & (region == 0)
            region[m] = self.next_label
            if scores is not None and i - 1 < len(scores):
                self.object_scores[self.next_label] = float(scores[i - 1])
            self.next_label += 1

    def result(self) -> dict[str, np.ndarray]:
        """Blended outputs ``(C, *shape)`` (weighted means) and merged labels ``(*shape)``."""
        out: dict[str, np.ndarray] = {}
        if self.wsum is not None:
            wsum = np.maximum(np.asarray(self.wsum[...]), 1e-12)
            for k, s in self.sums.items():
                out[k] = np.asarray(s[...]) / wsum
        if self.labels is not None:
            out["labels"] = self.labels
            out["object_scores"] = self.object_scores
        if self.scratch is not None and self.scratch.exists():
            shutil.rmtree(self.scratch, ignore_errors=True)
        return out
