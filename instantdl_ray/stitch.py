"""Blend tile outputs back into whole images; memory bounded by the image, never by the test set,
and for large images not by the image either.

Averageable outputs (probabilities, values, uncertainty maps) are accumulated as weighted sums
with Gaussian blending weights; label tiles (Mask R-CNN) are merged by keeping each object in
the tile whose core holds its centroid.

Two paths, chosen per image by its spatial size:

* small (``prod(shape) <= IN_MEMORY_LIMIT``, or no ``scratch`` folder): numpy sums for the whole
  image; ``result()`` returns whole arrays for ``task.finalize``.
* large: streaming. The image is cut into blocks (``STREAM_BLOCK``, 512² in-plane). A block's sums
  live in RAM only while some tile that touches it is still missing; when its last tile arrives,
  the block's weighted mean is written once into a zarr array in ``scratch`` (aligned chunks, no
  read-modify-write) and its buffer is freed. Tiles arrive roughly in grid (C) order, so about two
  block rows are open at a time: RAM ~ ``(tile + 2 * block) * width * (channels + 1) * 4`` bytes,
  whatever the image height. If tiles arrive so far out of order that the open buffers pass
  ``MAX_OPEN_BYTES``, the least recently touched ones are spilled to ``scratch`` as partial sums
  and added back when their block completes. ``stitched()`` then hands out the zarr arrays (with
  per-channel ``min``/``max`` in their attrs) for blockwise finalisation (``blocks()``); label
  images (Mask R-CNN) live in a zarr array too.
"""

from __future__ import annotations

import itertools
import math
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .tile import Tile, blend_weights

IN_MEMORY_LIMIT = 64 * 2**20  # spatial elements (8192²); above this an image is stitched streaming
STREAM_BLOCK = 512  # in-plane block edge of the streaming path: zarr chunks, finalize blocks, TIFF tiles
STREAM_BLOCK_Z = 16  # block depth for 3D volumes
MAX_OPEN_BYTES = 1536 * 2**20  # open block buffers above this are spilled to disk (out-of-order tiles)
WEIGHT = "_weight"


def stream_block(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Block shape of the streaming path for a spatial ``shape`` (clipped to the image)."""
    block = (STREAM_BLOCK_Z,) * (len(shape) - 2) + (STREAM_BLOCK, STREAM_BLOCK)
    return tuple(min(b, s) for b, s in zip(block, shape))


def iter_blocks(shape: tuple[int, ...], block: tuple[int, ...]) -> Iterator[tuple[slice, ...]]:
    """Spatial slices of the blocks of ``shape``, C order (last axis fastest); edge blocks are cut."""
    ranges = [range(0, s, b) for s, b in zip(shape, block)]
    for start in itertools.product(*ranges):
        yield tuple(slice(a, min(a + b, s)) for a, b, s in zip(start, block, shape))


class ImageAccumulator:
    """Weighted-sum accumulator for one image. ``add`` tiles in any order, then ``result`` (whole
    arrays) or, when ``streaming``, ``stitched`` + ``blocks`` (blockwise) and ``cleanup``.

    spatial_shape: ``([Z,] Y, X)``; tiles: the prediction grid (``tile.tile_grid``); scratch: a
    folder for the streaming path (None: always in memory); keys: outputs to keep when streaming
    (None: all), e.g. ``("prob", "entropy")`` when the task's finalisation reads only those.
    """

    def __init__(self, spatial_shape: tuple[int, ...], tiles: list[Tile], tile_shape: tuple[int, ...],
                 scratch: Path | None = None, blend: str = "gaussian", keys: tuple[str, ...] | None = None):
        self.shape = tuple(int(s) for s in spatial_shape)
        self.tiles = tiles
        self.remaining = len(tiles)
        self.weights = blend_weights(tuple(tile_shape), blend) if len(tiles) > 1 else np.ones(tile_shape, np.float32)
        self.scratch = Path(scratch) if scratch is not None else None
        self.streaming = self.scratch is not None and int(np.prod(self.shape)) > IN_MEMORY_LIMIT
        self.keys = tuple(keys) if keys is not None and self.streaming else None
        self.sums: dict[str, Any] = {}
        self.wsum: Any = None
        self.labels: Any = None
        self.next_label = 1
        self.object_scores: dict[int, float] = {}
        self._blocks = _BlockSums(self.shape, tiles, self.scratch) if self.streaming else None

    # ---------------------------------------------------------------- adding tiles

    def add(self, tile_index: int, outputs: dict[str, np.ndarray]) -> bool:
        """Add one tile's outputs (each ``(C, *tile)``); returns True when the image is complete."""
        t = self.tiles[tile_index]
        crop = tuple(slice(0, s.stop - s.start) for s in t.read)
        if "labels" in outputs:
            self._add_labels(t, outputs["labels"][0][crop], outputs.get("scores"))
        values = {k: v for k, v in outputs.items()
                  if k not in ("labels", "scores") and (self.keys is None or k in self.keys)}
        if self._blocks is not None:
            if values:
                self._blocks.add(t, values, self.weights)
        elif values:
            w = self.weights[crop]
            if self.wsum is None:
                self.wsum = np.zeros(self.shape, np.float32)
            for k, v in values.items():
                if k not in self.sums:
                    self.sums[k] = np.zeros((v.shape[0],) + self.shape, np.float32)
                region = (slice(None),) + t.read
                self.sums[k][region] = self.sums[k][region] + v[(slice(None),) + crop] * w
            self.wsum[t.read] = self.wsum[t.read] + w
        self.remaining -= 1
        if self.remaining == 0 and self._blocks is not None:
            self._blocks.close()
        return self.remaining == 0

    def _add_labels(self, t: Tile, lab: np.ndarray, scores: np.ndarray | None) -> None:
        from scipy import ndimage as ndi

        if self.labels is None:
            self.labels = self._label_array()
        ids = np.unique(lab)
        ids = ids[ids > 0]
        if len(ids) == 0:
            return
        centroids = ndi.center_of_mass(np.ones_like(lab), lab, ids)
        region = self.labels[t.read] if isinstance(self.labels, np.ndarray) else np.asarray(self.labels[t.read])
        changed = False
        for i, c in zip(ids, centroids):
            pos = [int(ci) + s.start for ci, s in zip(c, t.read)]
            if not all(core.start <= p < core.stop for p, core in zip(pos, t.core)):
                continue  # this object belongs to the neighbouring tile whose core holds it
            m = (lab == i) & (region == 0)
            region[m] = self.next_label
            changed = True
            if scores is not None and i - 1 < len(scores):
                self.object_scores[self.next_label] = float(scores[i - 1])
            self.next_label += 1
        if changed and not isinstance(self.labels, np.ndarray):
            self.labels[t.read] = region  # zarr: write the tile's window back

    def _label_array(self):
        if not self.streaming:
            return np.zeros(self.shape, np.uint32)
        import zarr

        return zarr.create_array(store=str(self.scratch / "labels.zarr"), shape=self.shape,
                                 chunks=stream_block(self.shape), dtype="uint32", fill_value=0, overwrite=True)

    # ---------------------------------------------------------------- results

    def result(self) -> dict[str, np.ndarray]:
        """Blended outputs ``(C, *shape)`` (weighted means) and merged labels ``(*shape)``, whole.

        On the streaming path this reads the stitched zarr arrays into RAM (callers that can
        work blockwise use ``stitched`` instead); the scratch folder is removed either way.
        """
        out: dict[str, np.ndarray] = {}
        if self._blocks is not None:
            for k, z in self._blocks.out.items():
                out[k] = np.asarray(z[...])
        elif self.wsum is not None:
            wsum = np.maximum(self.wsum, 1e-12)
            for k, s in self.sums.items():
                out[k] = s / wsum
        if self.labels is not None:
            out["labels"] = np.asarray(self.labels[...]) if not isinstance(self.labels, np.ndarray) else self.labels
            out["object_scores"] = self.object_scores
        self.cleanup()
        return out

    def stitched(self) -> dict[str, Any]:
        """Blended outputs ``(C, *shape)`` as lazily sliceable arrays (zarr on the streaming path,
        with per-channel ``attrs["min"]`` / ``attrs["max"]``; numpy otherwise). Labels: ``.labels``."""
        if self._blocks is not None:
            return dict(self._blocks.out)
        if self.wsum is None:
            return {}
        wsum = np.maximum(self.wsum, 1e-12)
        return {k: s / wsum for k, s in self.sums.items()}

    def blocks(self) -> list[tuple[slice, ...]]:
        """Spatial blocks (C order) to finalise the image by; the stitched zarr chunks on the streaming path."""
        return list(iter_blocks(self.shape, stream_block(self.shape)))

    def cleanup(self) -> None:
        if self.scratch is not None and self.scratch.exists():
            shutil.rmtree(self.scratch, ignore_errors=True)


class _BlockSums:
    """Streaming weighted sums: per-block buffers, each written out (as a weighted mean) and freed
    as soon as every tile touching its block has been added. See the module docstring."""

    def __init__(self, shape: tuple[int, ...], tiles: list[Tile], scratch: Path):
        self.shape = shape
        self.block = stream_block(shape)
        self.grid = tuple(math.ceil(s / b) for s, b in zip(shape, self.block))
        self.scratch = scratch
        # tiles still to come per block; the tile grid is a Cartesian product, but counting
        # directly keeps this independent of how the grid was built
        self.pending = np.zeros(self.grid, np.int64)
        for t in tiles:
            self.pending[self._block_range(t)] += 1
        if (self.pending == 0).any():
            raise ValueError("the tile grid does not cover every block of the image")
        self.open: OrderedDict[tuple[int, ...], dict[str, np.ndarray]] = OrderedDict()
        self.open_bytes = 0
        self.spilled: set[tuple[int, ...]] = set()
        self.out: dict[str, Any] = {}
        self.lo: dict[str, np.ndarray] = {}
        self.hi: dict[str, np.ndarray] = {}
        self.channels: dict[str, int] = {}

    def _block_range(self, t: Tile) -> tuple[slice, ...]:
        return tuple(slice(r.start // b, (r.stop - 1) // b + 1) for r, b in zip(t.read, self.block))

    def _block_slices(self, cidx: tuple[int, ...]) -> tuple[slice, ...]:
        return tuple(slice(c * b, min((c + 1) * b, s)) for c, b, s in zip(cidx, self.block, self.shape))

    def _buffer(self, cidx: tuple[int, ...]) -> dict[str, np.ndarray]:
        buf = self.open.get(cidx)
        if buf is None:
            bshape = tuple(s.stop - s.start for s in self._block_slices(cidx))
            buf = {k: np.zeros((c,) + bshape, np.float32) for k, c in self.channels.items()}
            buf[WEIGHT] = np.zeros(bshape, np.float32)
            self.open[cidx] = buf
            self.open_bytes += sum(a.nbytes for a in buf.values())
        else:
            self.open.move_to_end(cidx)
        return buf

    def add(self, t: Tile, values: dict[str, np.ndarray], weights: np.ndarray) -> None:
        for k, v in values.items():
            if k not in self.channels:
                if self.open:
                    raise ValueError(f"output '{k}' appeared after the first tile; every tile must give the same outputs")
                self._create_output(k, int(v.shape[0]))
        rng = self._block_range(t)
        for cidx in itertools.product(*(range(s.start, s.stop) for s in rng)):
            bsl = self._block_slices(cidx)
            inter = [slice(max(a.start, r.start), min(a.stop, r.stop)) for a, r in zip(bsl, t.read)]
            in_block = tuple(slice(i.start - a.start, i.stop - a.start) for i, a in zip(inter, bsl))
            in_tile = tuple(slice(i.start - r.start, i.stop - r.start) for i, r in zip(inter, t.read))
            buf = self._buffer(cidx)
            w = weights[in_tile]
            for k, v in values.items():
                region = (slice(None),) + in_block
                buf[k][region] = buf[k][region] + v[(slice(None),) + in_tile] * w
            buf[WEIGHT][in_block] = buf[WEIGHT][in_block] + w
            self.pending[cidx] -= 1
            if self.pending[cidx] == 0:
                self._complete(cidx)
        if self.open_bytes > MAX_OPEN_BYTES:
            self._spill()

    def _create_output(self, key: str, channels: int) -> None:
        import zarr

        self.channels[key] = channels
        self.out[key] = zarr.create_array(
            store=str(self.scratch / f"{key}.zarr"), shape=(channels,) + self.shape,
            chunks=(channels,) + self.block, dtype="float32", fill_value=0.0, overwrite=True)
        self.lo[key] = np.full(channels, np.inf, np.float32)
        self.hi[key] = np.full(channels, -np.inf, np.float32)

    def _spill_path(self, cidx: tuple[int, ...]) -> Path:
        return self.scratch / "spill" / ("_".join(map(str, cidx)) + ".npz")

    def _spill(self) -> None:
        """Move the least recently touched partial blocks to disk until half the budget is free."""
        (self.scratch / "spill").mkdir(parents=True, exist_ok=True)
        while self.open and self.open_bytes > MAX_OPEN_BYTES // 2:
            cidx, buf = self.open.popitem(last=False)
            self.open_bytes -= sum(a.nbytes for a in buf.values())
            path = self._spill_path(cidx)
            if cidx in self.spilled:
                with np.load(path) as old:
                    buf = {k: buf[k] + old[k] for k in buf}
            np.savez(path, **buf)
            self.spilled.add(cidx)

    def _complete(self, cidx: tuple[int, ...]) -> None:
        buf = self.open.pop(cidx)
        self.open_bytes -= sum(a.nbytes for a in buf.values())
        if cidx in self.spilled:
            path = self._spill_path(cidx)
            with np.load(path) as old:
                buf = {k: buf[k] + old[k] for k in buf}
            path.unlink()
            self.spilled.discard(cidx)
        wsum = np.maximum(buf.pop(WEIGHT), 1e-12)
        bsl = self._block_slices(cidx)
        for k, s in buf.items():
            mean = s / wsum
            self.out[k][(slice(None),) + bsl] = mean
            flat = mean.reshape(mean.shape[0], -1)
            np.minimum(self.lo[k], flat.min(1), out=self.lo[k])
            np.maximum(self.hi[k], flat.max(1), out=self.hi[k])

    def close(self) -> None:
        """All tiles are in: record each output's per-channel value range for finalisation."""
        if self.open or self.spilled:
            raise RuntimeError(f"{len(self.open) + len(self.spilled)} block(s) still open after the last tile")
        for k, z in self.out.items():
            z.attrs.update({"min": [float(x) for x in self.lo[k]], "max": [float(x) for x in self.hi[k]]})
