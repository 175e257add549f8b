"""Tiles: which window of an image a network sees, and which part of its output is kept.

Pure part (this section): the tile grid, blending weights, training tile origins and a reader
that works on anything sliceable (numpy, zarr, dask, a lazy TIFF). No Ray imports at module top;
the Ray Dataset of tiles builds on these functions.

Grid definition, per spatial axis of length ``n`` with tile length ``t`` and overlap ``o``
(``0 <= o < t``), the axes combined as a Cartesian product in C order:

* ``n <= t``: one tile; it reads the whole axis and is padded at the end up to ``t``.
* ``n > t``: stride ``s = t - o``; tile starts ``0, s, 2s, ...`` and the last tile is shifted
  back to start at ``n - t`` so it ends exactly at the image border (no padding, and the last
  tile's overlap with its neighbour is ``>= o``). ``k = ceil((n - t) / s) + 1`` tiles.
* Core regions split every overlap at its midpoint: between tiles i and i+1 the boundary is
  ``(start[i+1] + start[i] + t) // 2``; the first core starts at 0, the last ends at ``n``.
  So cores partition the image exactly (every pixel in one core), and each core keeps about
  ``o // 2`` pixels of context to both sides except at image borders.

Padding is only ever added *after* the data (``pad[d][0] == 0``), so ``core_in_tile`` indexes
both the read window and the padded ``(C, *tile)`` array ``read_tile`` returns (and hence the
network output for that tile).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import numpy as np

IntOrSeq = Union[int, Sequence[int]]


@dataclass(frozen=True)
class Tile:
    """One tile of a grid; spatial axes only (2 or 3 entries per field).

    read: window to read from the image (includes context), inside the image bounds.
    core: the region this tile owns, in image coordinates (cores partition the image).
    core_in_tile: the same region relative to the read window (= relative to the padded tile).
    pad: (before, after) padding bringing the read window to the full tile shape; before is 0.
    """

    read: tuple[slice, ...]
    core: tuple[slice, ...]
    core_in_tile: tuple[slice, ...]
    pad: tuple[tuple[int, int], ...]

    @property
    def origin(self) -> tuple[int, ...]:
        """Image coordinates of the tile's first pixel."""
        return tuple(s.start for s in self.read)

    @property
    def shape(self) -> tuple[int, ...]:
        """Full (padded) tile shape."""
        return tuple(s.stop - s.start + p[1] for s, p in zip(self.read, self.pad))


def _per_axis(value: IntOrSeq, ndim: int, name: str) -> tuple[int, ...]:
    if isinstance(value, (int, np.integer)):
        return (int(value),) * ndim
    out = tuple(int(v) for v in value)
    if len(out) != ndim:
        raise ValueError(f"{name} {tuple(value)} needs {ndim} entries, one per spatial axis")
    return out


def _check_shapes(
    shape: Sequence[int], tile: IntOrSeq
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    shape = tuple(int(s) for s in shape)
    tile = _per_axis(tile, len(shape), "tile")
    if len(shape) not in (2, 3):
        raise ValueError(f"shape {shape} must be spatial only: (Y, X) or (Z, Y, X)")
    if any(s < 1 for s in shape) or any(t < 1 for t in tile):
        raise ValueError(f"shape {shape} and tile {tile} must be positive")
    return shape, tile


def _axis_tiles(n: int, t: int, o: int) -> list[tuple[int, int, int, int, int]]:
    """One axis: (read_start, read_stop, core_start, core_stop, pad_after) per tile."""
    if n <= t:
        return [(0, n, 0, n, t - n)]
    s = t - o
    k = math.ceil((n - t) / s) + 1
    starts = [min(i * s, n - t) for i in range(k)]
    bounds = [0] + [(starts[i + 1] + starts[i] + t) // 2 for i in range(k - 1)] + [n]
    return [(a, a + t, bounds[i], bounds[i + 1], 0) for i, a in enumerate(starts)]


def tile_grid(shape: Sequence[int], tile: IntOrSeq, overlap: IntOrSeq = 0) -> list[Tile]:
    """The tile grid of an image; see the module docstring for the exact definition.

    shape: spatial shape ([Z,] Y, X); tile: tile shape (int = same on every axis); overlap:
    pixels shared by neighbouring read windows, 0 <= overlap < tile per axis. Returns tiles in C
    order (last axis fastest); their cores partition the image.
    """
    shape, tile = _check_shapes(shape, tile)
    overlap = _per_axis(overlap, len(shape), "overlap")
    bad = [(t, o) for t, o in zip(tile, overlap) if not 0 <= o < t]
    if bad:
        raise ValueError(
            f"overlap {overlap} must satisfy 0 <= overlap < tile {tile} on every axis"
        )
    axes = [_axis_tiles(n, t, o) for n, t, o in zip(shape, tile, overlap)]
    tiles = []
    for combo in itertools.product(*axes):
        tiles.append(
            Tile(
                read=tuple(slice(r0, r1) for r0, r1, _, _, _ in combo),
                core=tuple(slice(c0, c1) for _, _, c0, c1, _ in combo),
                core_in_tile=tuple(slice(c0 - r0, c1 - r0) for r0, _, c0, c1, _ in combo),
                pad=tuple((0, p) for *_, p in combo),
            )
        )
    return tiles


def grid_overlap(plan: Any, tile_overlap: float) -> tuple[int, ...]:
    """Overlap per spatial axis of the prediction (and validation) tile grid of ``plan``: the
    fraction ``tile_overlap`` of the tile, but at least ``plan.extra["min_overlap"]`` where the
    plan has it (instance segmentation: what the training objects need so each lies whole in some
    read window, see ``plan.required_overlap`` and ``stitch``). That minimum is capped at half the
    tile (objects larger than that need a larger tile; stitching then falls back to merging
    pieces); the result is always < the tile. The one definition for everyone that builds or
    stitches a prediction grid (``dataset.grid_rows``, ``predict``), so the tiles read and the
    tiles stitched are the same grid.
    """
    tile = [int(t) for t in plan.tile_shape]
    need = (getattr(plan, "extra", None) or {}).get("min_overlap") or [0] * len(tile)
    need = _per_axis(need, len(tile), "min_overlap")
    return tuple(max(0, min(max(int(t * float(tile_overlap)), min(int(m), t // 2)), t - 1))
                 for t, m in zip(tile, need))


def grid_tile_origins(shape: Sequence[int], tile: IntOrSeq) -> list[tuple[int, ...]]:
    """Origins of a non-overlapping grid covering the image (the last tile per axis shifted back
    inside the image, so it overlaps its neighbour instead of running off the edge). Images
    smaller than the tile give origin 0 on that axis (``read_tile`` pads)."""
    return [t.origin for t in tile_grid(shape, tile, 0)]


def blend_weights(
    tile: IntOrSeq,
    mode: Literal["gaussian", "constant"] = "gaussian",
    sigma_scale: float = 0.125,
    ndim: Optional[int] = None,
) -> np.ndarray:
    """Weights for blending overlapping tile outputs at prediction: ``tile`` shape float32, max 1.

    gaussian: separable Gaussian centred on the tile with sigma = ``sigma_scale * tile`` per axis
    (nnU-Net / MONAI use 1/8), clipped below at 1e-3 so border pixels covered by a single tile
    still get a finite weighted average. constant: all ones. ``ndim`` is needed only for an int
    ``tile``.
    """
    if isinstance(tile, (int, np.integer)):
        if ndim is None:
            raise ValueError("blend_weights(int tile) needs ndim=2 or 3")
        tile = (int(tile),) * ndim
    tile = tuple(int(t) for t in tile)
    if mode == "constant":
        return np.ones(tile, dtype=np.float32)
    if mode != "gaussian":
        raise ValueError(f"mode must be 'gaussian' or 'constant', got {mode!r}")
    if sigma_scale <= 0:
        raise ValueError(f"sigma_scale must be > 0, got {sigma_scale}")
    w = np.ones((), dtype=np.float64)
    for t in tile:
        x = np.arange(t, dtype=np.float64) - (t - 1) / 2.0  # symmetric: x[i] == -x[t-1-i]
        sigma = max(t * sigma_scale, 1e-6)
        w = np.multiply.outer(w, np.exp(-(x**2) / (2.0 * sigma**2)))
    w /= w.max()
    return np.maximum(w, 1e-3).astype(np.float32)


def random_tile_origins(
    shape: Sequence[int],
    tile: IntOrSeq,
    n: int,
    rng: np.random.Generator,
    weights: Optional[np.ndarray] = None,
) -> list[tuple[int, ...]]:
    """Origins of ``n`` random training tiles (tile = ``image[origin : origin + tile]``).

    Uniform (``weights=None``): each origin coordinate uniform in ``[0, max(n_d - t_d, 0)]``.
    Weighted: ``weights`` is a coarse non-negative grid with one cell per block of the image
    (same number of axes as ``shape``, any size up to ``shape``; e.g. a foreground mask
    downsampled to 1/16, or the mask itself). Cell ``c`` is picked with probability
    ``weights[c] / weights.sum()``, a point uniform inside that cell's image block becomes the
    tile centre, and the origin is clipped so the tile stays inside the image. An all-zero map
    (an image with no foreground) samples uniformly.
    """
    shape, tile = _check_shapes(shape, tile)
    hi = [max(s - t, 0) for s, t in zip(shape, tile)]
    if weights is None or not np.any(np.asarray(weights) > 0):
        if weights is not None:
            _check_weights(np.asarray(weights), shape)
        return [tuple(int(rng.integers(0, h + 1)) for h in hi) for _ in range(n)]

    w = np.asarray(weights, dtype=np.float64)
    _check_weights(w, shape)
    flat = w.ravel() / w.sum()
    cells = rng.choice(flat.size, size=n, p=flat)
    out = []
    for cell in zip(*np.unravel_index(cells, w.shape)):
        origin = []
        for c, g, s, t, h in zip(cell, w.shape, shape, tile, hi):
            lo_px = (c * s) // g
            hi_px = max(((c + 1) * s) // g, lo_px + 1)  # each cell covers >= 1 pixel
            centre = int(rng.integers(lo_px, hi_px))
            origin.append(int(np.clip(centre - t // 2, 0, h)))
        out.append(tuple(origin))
    return out


def _check_weights(w: np.ndarray, shape: tuple[int, ...]) -> None:
    if w.ndim != len(shape) or any(g < 1 or g > s for g, s in zip(w.shape, shape)):
        raise ValueError(
            f"weights shape {w.shape} must have {len(shape)} axes, each between 1 and the image "
            f"shape {shape}"
        )
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("weights must be finite and non-negative")


def read_tile(array_like: Any, tile: Tile, channel_first: bool = True) -> np.ndarray:
    """Read one tile from anything sliceable (numpy, zarr, dask, h5py) and pad to full size.

    array_like: ``(C, *spatial)`` (channel_first), ``(*spatial, C)`` (not channel_first) or
    ``(*spatial)`` (no channel axis). Returns ``(C, *tile.shape)`` (channel axis always first,
    the package convention) or ``(*tile.shape)`` without a channel axis. Only ``tile.read`` is
    read, so a lazy array loads just this window. Padding mirrors the data (reflect); an axis
    whose read extent is 1 cannot be mirrored and is padded with 0.
    """
    n_spatial = len(tile.read)
    ndim = len(array_like.shape)
    if ndim == n_spatial:
        data = np.asarray(array_like[tile.read])
        has_channel = False
    elif ndim == n_spatial + 1:
        index = (slice(None),) + tile.read if channel_first else tile.read + (slice(None),)
        data = np.asarray(array_like[index])
        if not channel_first:
            data = np.moveaxis(data, -1, 0)
        has_channel = True
    else:
        raise ValueError(
            f"array of shape {tuple(array_like.shape)} does not fit a {n_spatial}D tile: "
            f"expected {n_spatial} spatial axes plus at most one channel axis"
        )
    offset = 1 if has_channel else 0
    for d, (before, after) in enumerate(tile.pad):
        if before == 0 and after == 0:
            continue
        width = [(0, 0)] * data.ndim
        width[d + offset] = (before, after)
        if data.shape[d + offset] > 1:
            data = np.pad(data, width, mode="reflect")
        else:
            data = np.pad(data, width, mode="constant", constant_values=0)
    return np.ascontiguousarray(data)
