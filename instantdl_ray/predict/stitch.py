"""Blend tile outputs back into whole images; memory bounded by the image, never by the test set,
and for large images not by the image either.

Averageable outputs (probabilities, values, uncertainty maps) are accumulated as weighted sums
with Gaussian blending weights; label tiles (Mask R-CNN) are merged object by object, each
object kept from exactly one tile (see "Label tiles" below).

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

Label tiles (``ImageAccumulator._add_labels``). A tile's model only sees its read window, so an
object cut by a window edge that is not the image border (an *inner* edge) comes out truncated.

* An object that touches no inner edge of the tile's window is *whole* in that tile. It is kept
  by exactly one of the tiles whose window holds it whole: the one with the most context, i.e.
  the largest distance between the object's bounding box and that window's inner edges (per
  axis; ties go to the tile whose core holds the centroid, then to the first tile). Every tile
  computes this owner from the grid alone, so the tiles agree whatever order they arrive in.
* An object that touches an inner edge is dropped: a neighbouring tile, with more context, holds
  it whole and owns it. On an axis with read windows of length ``t`` and overlap ``o``, every
  object whose extent is at most ``o - 1`` lies whole in some window, so each such object comes
  out exactly once and untruncated; ``tile.grid_overlap`` makes the prediction overlap at least
  the training objects' extent plus a margin (``plan.extra["min_overlap"]``).
* Fallback, for an object larger than that: if even the part a tile sees cannot lie whole in any
  window of the grid, no tile will keep it whole, so every tile that sees it so keeps its piece
  and pieces that share pixels (in the overlap zones, so this needs an overlap > 0) are merged
  into one object, whichever order they arrive in. Such an object comes out once (not split
  into one object per tile); it can miss parts that only tiles seeing a smaller piece of it,
  one that would fit whole in some window, saw. Ids freed by merges are renumbered away once
  the image is complete, so objects are numbered 1..n.

Within a tile a kept object only fills pixels no earlier object claimed (predictions of
neighbouring tiles may disagree by a few pixels).
"""

from __future__ import annotations

import bisect
import itertools
import math
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from instantdl_ray.data.tile import Tile, blend_weights

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
    active: indices of the grid's tiles that will be added (a slide's tissue; None: all); pixels
    no active tile covers come out 0. mask: a ``data.tissue.TissueMask`` (``region(block)``): its
    background pixels come out 0 in every output, the background value.
    """

    def __init__(self, spatial_shape: tuple[int, ...], tiles: list[Tile], tile_shape: tuple[int, ...],
                 scratch: Path | None = None, blend: str = "gaussian", keys: tuple[str, ...] | None = None,
                 active: list[int] | None = None, mask: Any = None):
        self.shape = tuple(int(s) for s in spatial_shape)
        self.tiles = tiles
        self.mask = mask
        self.remaining = len(tiles) if active is None else len(active)
        self.weights = blend_weights(tuple(tile_shape), blend) if len(tiles) > 1 else np.ones(tile_shape, np.float32)
        self.scratch = Path(scratch) if scratch is not None else None
        self.streaming = self.scratch is not None and int(np.prod(self.shape)) > IN_MEMORY_LIMIT
        self.keys = tuple(keys) if keys is not None and self.streaming else None
        self.sums: dict[str, Any] = {}
        self.wsum: Any = None
        self.labels: Any = None
        self.next_label = 1
        self.object_scores: dict[int, float] = {}
        self._axes: list[list[tuple[int, int, int, int]]] | None = None  # label grid, per axis
        self._fallback: dict[int, list[list[int]]] = {}  # merged large objects: id -> global bbox
        self._freed: set[int] = set()  # ids merged into another (renumbered once the image is complete)
        self._blocks = (_BlockSums(self.shape, tiles if active is None else [tiles[k] for k in active], self.scratch,
                                   partial=active is not None, mask=mask) if self.streaming else None)

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
        if self.remaining == 0 and self._freed:
            self._compact_labels()
        return self.remaining == 0

    def _add_labels(self, t: Tile, lab: np.ndarray, scores: np.ndarray | None) -> None:
        """Merge one tile's label image (``t.read`` shape, ids local to the tile); see the module
        docstring ("Label tiles") for which tile keeps which object."""
        from scipy import ndimage as ndi

        if self.labels is None:
            self.labels = self._label_array()
            self._axes = self._label_grid()
        lab = np.asarray(lab)
        if not lab.any():
            return
        lab = lab.astype(np.int64, copy=False)
        boxes = ndi.find_objects(lab)
        ids = np.asarray([i + 1 for i, b in enumerate(boxes) if b is not None], np.int64)
        centroids = ndi.center_of_mass(np.ones(lab.shape, np.float32), lab, ids)
        me = self._axis_key(t)
        region = self.labels[t.read] if isinstance(self.labels, np.ndarray) else np.asarray(self.labels[t.read])
        changed = False
        for i, c in zip(ids.tolist(), centroids):
            sl = boxes[i - 1]
            lo = [s.start + r.start for s, r in zip(sl, t.read)]  # global bbox, hi inclusive
            hi = [s.stop - 1 + r.start for s, r in zip(sl, t.read)]
            cen = [ci + r.start for ci, r in zip(c, t.read)]
            score = float(scores[i - 1]) if scores is not None and i - 1 < len(scores) else None
            touches = any(self._touches_inner_edge(d, me[d], lo[d], hi[d]) for d in range(len(lo)))
            if not touches:
                if self._owner(lo, hi, cen) != me:
                    continue  # another tile holds it whole, with more context
                m = (lab[sl] == i) & (region[sl] == 0)
                if not m.any():
                    continue
                region[sl][m] = self.next_label
                if score is not None:
                    self.object_scores[self.next_label] = score
                self.next_label += 1
                changed = True
            elif not all(self._containable(d, lo[d], hi[d]) for d in range(len(lo))):
                changed |= self._add_fallback(t, region, lab[sl] == i, sl, lo, hi, score)
            # else: truncated here, and some tile may hold it whole: that tile owns it
        if changed and not isinstance(self.labels, np.ndarray):
            self.labels[t.read] = region  # zarr: write the tile's window back

    # the label grid per axis: (read_start, read_stop, core_start, core_stop) of each axis tile

    def _label_grid(self) -> list[list[tuple[int, int, int, int]]]:
        axes = [sorted({(t.read[d].start, t.read[d].stop, t.core[d].start, t.core[d].stop) for t in self.tiles})
                for d in range(len(self.shape))]
        if int(np.prod([len(a) for a in axes])) != len(self.tiles) or any(
                len({a[0] for a in ax}) != len(ax) for ax in axes):
            raise ValueError("label tiles need a Cartesian tile grid (tile.tile_grid)")
        self._axis_pos = [{a[0]: j for j, a in enumerate(ax)} for ax in axes]
        self._starts = [[a[0] for a in ax] for ax in axes]
        self._longest = [max(a[1] - a[0] for a in ax) for ax in axes]
        return axes

    def _axis_key(self, t: Tile) -> tuple[int, ...]:
        return tuple(self._axis_pos[d][t.read[d].start] for d in range(len(self.shape)))

    def _margin(self, d: int, j: int, lo: int, hi: int) -> float:
        """Distance of ``[lo, hi]`` from the inner edges of axis tile ``j`` (0: touching; inf: none)."""
        r0, r1, _, _ = self._axes[d][j]
        left = lo - r0 if r0 > 0 else math.inf
        right = r1 - 1 - hi if r1 < self.shape[d] else math.inf
        return min(left, right)

    def _touches_inner_edge(self, d: int, j: int, lo: int, hi: int) -> bool:
        return self._margin(d, j, lo, hi) <= 0

    def _candidates(self, d: int, lo: int, hi: int) -> list[int]:
        """Axis tiles whose window holds ``[lo, hi]`` without touching an inner edge."""
        ax, starts = self._axes[d], self._starts[d]
        first = bisect.bisect_left(starts, hi - self._longest[d] + 1)  # only windows that reach hi
        last = bisect.bisect_right(starts, lo)  # and start at or before lo
        return [j for j in range(first, last) if hi < ax[j][1] and self._margin(d, j, lo, hi) > 0]

    def _containable(self, d: int, lo: int, hi: int) -> bool:
        return bool(self._candidates(d, lo, hi))

    def _owner(self, lo: list[int], hi: list[int], cen: list[float]) -> tuple[int, ...]:
        """The tile that keeps a whole object with bbox ``[lo, hi]``: per axis, the window holding
        it with the largest margin to its inner edges; ties: the core holding the centroid, then
        the first. Axes are independent because the grid is a Cartesian product."""
        key = []
        for d in range(len(lo)):
            def rank(j, d=d):
                _, _, c0, c1 = self._axes[d][j]
                return (-self._margin(d, j, lo[d], hi[d]), not c0 <= cen[d] < c1, j)
            key.append(min(self._candidates(d, lo[d], hi[d]), key=rank))
        return tuple(key)

    def _add_fallback(self, t: Tile, region: np.ndarray, piece: np.ndarray, sl: tuple[slice, ...],
                      lo: list[int], hi: list[int], score: float | None) -> bool:
        """A piece of an object no window can hold whole: merged with the pieces it shares pixels
        with (an object id per connected chain of pieces, independent of the tile order)."""
        seen = region[sl][piece]
        touching = sorted(int(v) for v in np.unique(seen) if int(v) in self._fallback)
        target = touching[0] if touching else None
        for other in touching[1:]:  # this piece joins several: merge them all into the smallest id
            self._relabel(other, target, region, t)
        m = piece & (region[sl] == 0)
        if target is None:
            if not m.any():
                return False
            target = self.next_label
            self.next_label += 1
            self._fallback[target] = [list(lo), [h + 1 for h in hi]]
        else:
            box = self._fallback[target]
            box[0] = [min(a, b) for a, b in zip(box[0], lo)]
            box[1] = [max(a, b + 1) for a, b in zip(box[1], hi)]
        region[sl][m] = target
        if score is not None:
            self.object_scores[target] = max(score, self.object_scores.get(target, -math.inf))
        return True

    def _relabel(self, old: int, new: int, region: np.ndarray, t: Tile) -> None:
        """Rename the fallback object ``old`` to ``new`` everywhere (its bbox) and in ``region``."""
        (a, b), (na, nb) = self._fallback.pop(old), self._fallback[new]
        box = tuple(slice(x, y) for x, y in zip(a, b))
        if isinstance(self.labels, np.ndarray):
            view = self.labels[box]
            view[view == old] = new
        else:
            block = np.asarray(self.labels[box])
            block[block == old] = new
            self.labels[box] = block
            region[region == old] = new  # the tile's window copy, written back after this tile
        self._fallback[new] = [[min(x, y) for x, y in zip(a, na)], [max(x, y) for x, y in zip(b, nb)]]
        if old in self.object_scores:
            self.object_scores[new] = max(self.object_scores.pop(old), self.object_scores.get(new, -math.inf))
        self._freed.add(old)

    def _compact_labels(self) -> None:
        """Renumber the objects 1..n after merges freed some ids (blockwise on the zarr path)."""
        lut = np.zeros(self.next_label, np.uint32)
        keep = np.setdiff1d(np.arange(1, self.next_label), np.fromiter(self._freed, np.int64))
        lut[keep] = np.arange(1, len(keep) + 1, dtype=np.uint32)
        if isinstance(self.labels, np.ndarray):
            self.labels = lut[self.labels]
        else:
            for b in iter_blocks(self.shape, stream_block(self.shape)):
                self.labels[b] = lut[np.asarray(self.labels[b])]
        self.object_scores = {int(lut[k]): v for k, v in self.object_scores.items() if lut[k] > 0}
        self._fallback = {int(lut[k]): v for k, v in self._fallback.items() if lut[k] > 0}
        self.next_label = len(keep) + 1
        self._freed = set()

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
            out.update(self._means())
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
        return self._means()

    def _means(self) -> dict[str, np.ndarray]:
        if self.wsum is None:
            return {}
        wsum = np.maximum(self.wsum, 1e-12)
        keep = self.mask.region(tuple(slice(0, n) for n in self.shape)) if self.mask is not None else 1.0
        return {k: s / wsum * keep for k, s in self.sums.items()}

    def blocks(self) -> list[tuple[slice, ...]]:
        """Spatial blocks (C order) to finalise the image by; the stitched zarr chunks on the streaming path."""
        return list(iter_blocks(self.shape, stream_block(self.shape)))

    def cleanup(self) -> None:
        if self.scratch is not None and self.scratch.exists():
            shutil.rmtree(self.scratch, ignore_errors=True)


class _BlockSums:
    """Streaming weighted sums: per-block buffers, each written out (as a weighted mean) and freed
    as soon as every tile touching its block has been added. See the module docstring."""

    def __init__(self, shape: tuple[int, ...], tiles: list[Tile], scratch: Path, partial: bool = False,
                 mask: Any = None):
        self.shape = shape
        self.mask = mask
        self.block = stream_block(shape)
        self.grid = tuple(math.ceil(s / b) for s, b in zip(shape, self.block))
        self.scratch = scratch
        # tiles still to come per block; the tile grid is a Cartesian product, but counting
        # directly keeps this independent of how the grid was built
        self.pending = np.zeros(self.grid, np.int64)
        for t in tiles:
            self.pending[self._block_range(t)] += 1
        # partial: only some tiles come (a slide's tissue); blocks none touches stay at the fill, 0
        self.untouched = bool((self.pending == 0).any())
        if self.untouched and not partial:
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
        keep = self.mask.region(bsl) if self.mask is not None else 1.0
        for k, s in buf.items():
            mean = s / wsum * keep
            self.out[k][(slice(None),) + bsl] = mean
            flat = mean.reshape(mean.shape[0], -1)
            np.minimum(self.lo[k], flat.min(1), out=self.lo[k])
            np.maximum(self.hi[k], flat.max(1), out=self.hi[k])

    def close(self) -> None:
        """All tiles are in: record each output's per-channel value range for finalisation."""
        if self.open or self.spilled:
            raise RuntimeError(f"{len(self.open) + len(self.spilled)} block(s) still open after the last tile")
        for k, z in self.out.items():
            if self.untouched:  # blocks no tile touched hold the fill value
                np.minimum(self.lo[k], 0.0, out=self.lo[k])
                np.maximum(self.hi[k], 0.0, out=self.hi[k])
            z.attrs.update({"min": [float(x) for x in self.lo[k]], "max": [float(x) for x in self.hi[k]]})
