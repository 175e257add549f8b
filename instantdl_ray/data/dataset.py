"""Ray Data streams of tiles: small specs on the driver, pixels read in parallel Ray tasks.

The driver builds rows ``{image, target, origin, seed}`` (a few bytes each) and never holds
pixel data. ``ReadTiles`` (a plain callable, unit-testable without Ray) turns a batch of specs
into ``(B, C, *tile)`` float32 arrays; ``augment.augment_batch`` follows in ``map_batches``.
One path for everything: a small image is one tile (padded), a slide is many.
"""

from __future__ import annotations

import itertools
import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from instantdl_ray.io import read
from instantdl_ray.io.annotations import is_annotation
from instantdl_ray.config.plan import Plan, normalize_image

EPOCH_SEED_STRIDE = 1_000_003  # a prime, so (epoch, index) pairs give distinct seeds
PASS_THROUGH = ("label", "seed", "image_index", "tile_index")


@lru_cache(maxsize=16)
def _open(path: str) -> Any:
    """Per-process cache of opened arrays (zarr/TIFF lazily, small formats in memory)."""
    return read.open_array(path)


@lru_cache(maxsize=16)
def _open_view(path: str, level: int, scale: float, axes: str) -> Any:
    """Per-process cache of inputs read at a pyramid level / resampled (``io.slide.open_view``)."""
    from instantdl_ray.io.slide import View, open_view

    return open_view(path, View(level, scale), axes)


@lru_cache(maxsize=4)
def _instance_label(paths_json: str) -> np.ndarray:
    return read.read_instance_masks([Path(p) for p in json.loads(paths_json)])


@lru_cache(maxsize=16)
def _annotation_labels(path: str, shape: tuple[int, ...], classes_json: str) -> Any:
    """Per-process cache of GeoJSON annotations rasterised on the fly (``io.annotations.Labels``)."""
    from instantdl_ray.io.annotations import Labels

    return Labels(path, shape, json.loads(classes_json) if classes_json else None)


@lru_cache(maxsize=16)
def _upsampled(target: str, factor: int, image: str, axes: str) -> Any:
    from instantdl_ray.io.slide import Upsampled

    shape = _open(image).shape
    return Upsampled(_open(target), factor, spatial_shape(shape, read.image_axes(shape, axes))[-2:])


def slide_label(target: str | Path, image: str | Path, plan: Plan) -> Any | None:
    """The groundtruth of ``image`` on its own pixels when it is not stored that way: GeoJSON
    rasterised (``annotation_labels``) or a label at a downsample of the slide read upsampled
    (``io.slide.Upsampled``); None for a label image stored pixel for pixel."""
    if is_annotation(Path(target)):
        return annotation_labels(target, _open(str(image)).shape, plan)
    d = plan.extra.get("label_downsample", {}).get(str(image))
    return _upsampled(str(target), int(d), str(image), plan.axes) if d else None


def annotation_labels(target: str | Path, image_shape: Sequence[int], plan: Plan) -> Any:
    """The lazy label image of a GeoJSON groundtruth on an image of ``image_shape`` (as stored):
    class values (``plan.extra["annotation_classes"]``) or, for a task that labels instances, one
    id per polygon."""
    from instantdl_ray.tasks import get_task

    yx = tuple(spatial_shape(image_shape, read.image_axes(image_shape, plan.axes))[-2:])
    classes = None if get_task(plan.task).label_kind == "instances" else plan.extra.get("annotation_classes", {})
    return _annotation_labels(str(target), yx, "" if classes is None else json.dumps(classes, sort_keys=True))


def patch_shape(plan: Plan) -> list[int]:
    """The extent (px of the model's grid) a classification model classifies on a slide: the size
    of its training images (``plan.extra["patch_shape"]``; they are resized to ``image_size``)."""
    return [int(v) for v in (plan.extra.get("patch_shape") or plan.image_size or plan.tile_shape)]


def patch_grid(plan: Plan, shape: Sequence[int]) -> list:
    """The patches (``tile.Tile``s, no overlap) a classification model reads on a slide of ``shape``."""
    from instantdl_ray.data.tile import tile_grid

    return tile_grid(tuple(spatial_shape(shape, read.image_axes(shape, plan.axes))), tuple(patch_shape(plan)), 0)


def encode_target(gt: Any) -> str:
    """A sample's groundtruth -> a string for an Arrow column ('' none, a path, or a JSON list)."""
    if gt is None or isinstance(gt, int):
        return ""
    if isinstance(gt, list):
        return json.dumps([str(p) for p in gt])
    return str(gt)


def read_window(arr: Any, axes: str, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """Read spatial window ``[start, start+size)`` of a stored array -> ``(C, *size)`` float32.

    Parts outside the image are reflect-padded (constant 0 when the image is too small to
    reflect), so every tile has the full shape.
    """
    spatial = [i for i, a in enumerate(axes) if a in "ZYX"]
    shape = [arr.shape[i] for i in spatial]
    idx: list[Any] = [slice(None)] * len(axes)
    pads = []
    for k, i in enumerate(spatial):
        lo, hi = int(start[k]), int(start[k]) + int(size[k])
        clo, chi = max(lo, 0), min(hi, shape[k])
        idx[i] = slice(clo, chi)
        pads.append((clo - lo, hi - chi))
    chw = read.to_channel_first(np.asarray(arr[tuple(idx)]), axes)
    if any(p != (0, 0) for p in pads):
        mode = "reflect" if all(b < s and a < s for (b, a), s in zip(pads, chw.shape[1:])) else "constant"
        chw = np.pad(chw, [(0, 0)] + pads, mode=mode)
    return chw


def resize(chw: np.ndarray, size: Sequence[int], order: int = 1) -> np.ndarray:
    """``(C, Y, X)`` -> ``(C, *size)`` (bilinear for images)."""
    if tuple(chw.shape[1:]) == tuple(size):
        return chw
    from skimage.transform import resize as sk_resize

    return sk_resize(chw, (chw.shape[0], *size), order=order, preserve_range=True, anti_aliasing=order > 0).astype(np.float32)


class ReadTiles:
    """``map_batches`` callable: spec rows -> image tiles (+ targets). No Ray inside."""

    def __init__(self, plan: Plan | dict, with_target: bool = True):
        self.plan = plan if isinstance(plan, Plan) else Plan.from_json(plan)
        self.with_target = with_target
        from instantdl_ray.tasks import get_task

        self.task = get_task(self.plan.task)
        from instantdl_ray.data.augment import AugmentParams

        # raw-target clean-up (threshold_background_groundtruth, binarize_mask), before task scaling
        self.target_params = AugmentParams.from_dict(self.plan.extra.get("augment", {}))
        self.target_threshold = self.plan.extra.get("target_threshold", {})

    def _normalize(self, chw: np.ndarray, image: str) -> np.ndarray:
        # whole-image statistics from the plan (percentiles, or min-max / z-score as configured):
        # every tile of an image gets the same map, in training, validation and prediction
        return normalize_image(chw, self.plan.image_norm[image])

    def read_image(self, image: str, origin: Sequence[int]) -> np.ndarray:
        p = self.plan
        view = p.extra.get("views", {}).get(image)  # a slide read at a level / resampled (prediction)
        arr = _open_view(image, int(view["level"]), float(view["scale"]), p.axes) if view else _open(image)
        axes = read.image_axes(arr.shape, p.axes)
        if not self.task.pixelwise and image in p.extra.get("slides", {}):  # a patch of a slide (a tile map)
            chw = read_window(arr, axes, origin, patch_shape(p))
        elif not self.task.pixelwise:
            chw = read.to_channel_first(np.asarray(arr[...]), axes)
        else:
            chw = read_window(arr, axes, origin, p.tile_shape)
        chw = self._normalize(chw, image)
        if chw.shape[0] == 1 and p.in_channels > 1:  # a grey image among colour ones
            chw = np.repeat(chw, p.in_channels, axis=0)
        return resize(chw, p.image_size) if not self.task.pixelwise else chw

    def read_target(self, target: str, origin: Sequence[int], image: str | None = None) -> np.ndarray:
        from instantdl_ray.data.augment import clean_target

        p = self.plan
        if target.startswith("["):
            lab = _instance_label(target)
            t = read_window(lab, "YX", origin, p.tile_shape)
        elif image and (lab := slide_label(target, image, p)) is not None:  # GeoJSON; a label at 1/d of a slide
            t = read_window(lab, "YX", origin, p.tile_shape)
        else:
            t = read_window(_open(target), p.target_axes, origin, p.tile_shape)
        t = clean_target(t, self.target_params, self.target_threshold.get(image) if image else None)
        return self.task.prepare_target(t, p)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images, targets = [], []
        for i in range(len(batch["image"])):
            origin = [int(v) for v in batch["origin"][i]]
            images.append(self.read_image(str(batch["image"][i]), origin))
            if self.with_target and self.task.pixelwise:
                targets.append(self.read_target(str(batch["target"][i]), origin, str(batch["image"][i])))
        # only numeric scalar columns travel on (torch batches cannot hold lists or strings)
        out = {k: np.asarray(batch[k]) for k in PASS_THROUGH if k in batch}
        out["image"] = np.stack(images)
        if targets:
            out["target"] = np.stack(targets)
        return out


# ---------------------------------------------------------------- spec rows


def _origins(shape: Sequence[int], tile: Sequence[int], n: int, rng: np.random.Generator) -> list[list[int]]:
    """``n`` random tile origins inside an image (0 where the image is smaller than the tile)."""
    return [[int(rng.integers(0, max(s - t, 0) + 1)) for s, t in zip(shape, tile)] for _ in range(n)]


FOREGROUND_BLOCK = 2048  # pixels per axis read at a time when mapping the foreground of a large label


def foreground_map(target: Any, target_axes: str, cell: Sequence[int]) -> np.ndarray:
    """Coarse foreground map of a label image: one cell per ``cell`` pixels, 1 where any pixel > 0.

    Reads the label block by block (``FOREGROUND_BLOCK`` per axis), so a slide-size zarr label
    costs one block of memory; the map itself is small (1/``cell`` per axis). ``target`` is a
    label path or a list of per-object mask paths (InstantDL's instance layout).
    """
    if isinstance(target, list):
        arr, axes = read.read_instance_masks(target), "YX"
    else:
        arr, axes = read.open_array(target), target_axes
    shape = [int(s) for s in arr.shape]
    sp = [k for k, a in enumerate(axes) if a in "ZYX"]
    spatial = [shape[k] for k in sp]
    grid = [max(1, -(-s // c)) for s, c in zip(spatial, cell)]
    out = np.zeros(grid, np.float32)
    step = [max(c, (FOREGROUND_BLOCK // c) * c) for c in cell]  # blocks aligned with cells
    for starts in itertools.product(*[range(0, s, st) for s, st in zip(spatial, step)]):
        idx: list[Any] = [slice(None)] * len(shape)
        for k, a, st in zip(sp, starts, step):
            idx[k] = slice(a, a + st)
        block = np.asarray(arr[tuple(idx)]) > 0
        other = tuple(k for k in range(block.ndim) if k not in sp)
        if other:
            block = block.any(axis=other)
        pad = [(0, (-b) % c) for b, c in zip(block.shape, cell)]
        block = np.pad(block, pad)
        coarse = block.reshape([v for b, c in zip(block.shape, cell) for v in (b // c, c)])
        coarse = coarse.any(axis=tuple(range(1, 2 * len(cell), 2)))
        where = tuple(slice(a // c, a // c + n) for a, c, n in zip(starts, cell, coarse.shape))
        out[where] = np.maximum(out[where], coarse)
    return out


def foreground_maps(samples: list[read.Sample], shapes: dict[str, tuple[int, ...]], plan: Plan) -> dict[str, np.ndarray]:
    """``foreground_map`` of the label of every sample larger than a tile (cells of a quarter tile
    per axis); a tile already covers a smaller image, so its label is not read."""
    cell = coverage_cell(plan)
    return {str(s.image): foreground_map(s.groundtruth, plan.target_axes or "YX", cell) for s in samples
            if s.groundtruth is not None and not isinstance(s.groundtruth, int)
            and not (isinstance(s.groundtruth, Path) and is_annotation(s.groundtruth))  # region_maps
            and _larger_than_tile(spatial_shape(shapes[str(s.image)], plan.axes), plan.tile_shape)}


def coverage_cell(plan: Plan) -> list[int]:
    """Pixels per axis of one cell of the coarse maps tiles are sampled from (a quarter tile)."""
    return [max(1, t // 4) for t in plan.tile_shape]


def region_maps(samples: list[read.Sample], shapes: dict[str, tuple[int, ...]], plan: Plan,
                tissue_setting: str = "none") -> dict[str, np.ndarray]:
    """Where the training tiles of a slide come from, per image a coarse map (``coverage_cell``
    pixels per cell): the annotated regions of a GeoJSON groundtruth (``io.annotations.coverage_map``);
    the tissue of a whole slide with a label image (``tissue_setting``, as ``data.tissue.mask_for``),
    so epochs are not spent on glass. Other images have none (tiles anywhere)."""
    from instantdl_ray.io.annotations import coverage_map
    from instantdl_ray.io.slide import is_pyramid

    out = {}
    cell = coverage_cell(plan)
    for s in samples:
        if not isinstance(s.groundtruth, (str, Path)):
            continue
        shape = shapes[str(s.image)]
        yx = spatial_shape(shape, read.image_axes(shape, plan.axes))[-2:]
        if is_annotation(Path(s.groundtruth)):
            out[str(s.image)] = coverage_map(s.groundtruth, yx, cell)
        elif tissue_setting != "none" and len(yx) == 2 and is_pyramid(s.image):
            from instantdl_ray.data.tissue import mask_for

            mask = mask_for(s.image, tuple(yx), tissue_setting, plan.tile_shape)
            if mask is not None and mask.fraction > 0:
                out[str(s.image)] = mask.coverage(cell)
    return out


def tiles_touching(grid: Sequence[Any], cover: np.ndarray, cell: Sequence[int]) -> list[int]:
    """Indices of the tiles (``tile.Tile``) of ``grid`` whose read window touches a nonzero cell."""
    keep = []
    for k, t in enumerate(grid):
        idx = tuple(slice(sl.start // c, -(-sl.stop // c)) for sl, c in zip(t.read, cell))
        if np.any(cover[idx]):
            keep.append(k)
    return keep


def region_tiles(samples: list[read.Sample], shapes: dict[str, tuple[int, ...]], plan: Plan,
                 regions: dict[str, np.ndarray]) -> dict[str, list[int]]:
    """Per image with a ``region_maps`` map, the tiles of its validation grid (no overlap) that touch
    it (``grid_rows``' ``keep``): a slide is validated where it is annotated / has tissue, not whole."""
    from instantdl_ray.data.tile import grid_overlap, tile_grid

    out = {}
    for s in samples:
        if str(s.image) in regions:
            sp = spatial_shape(shapes[str(s.image)], plan.axes)
            grid = tile_grid(tuple(sp), tuple(plan.tile_shape), grid_overlap(plan, 0.0))
            out[str(s.image)] = tiles_touching(grid, regions[str(s.image)], coverage_cell(plan))
    return out


def _larger_than_tile(spatial: Sequence[int], tile: Sequence[int]) -> bool:
    return any(a > t for a, t in zip(spatial, tile))


def tiles_per_image(spatial_shape: Sequence[int], tile: Sequence[int], configured: int | None) -> int:
    """Enough random tiles per epoch to cover the image about once."""
    if configured:
        return configured
    return int(np.prod([max(1, int(np.ceil(s / t))) for s, t in zip(spatial_shape, tile)]))


def spatial_shape(shape: Sequence[int], axes: str) -> list[int]:
    return [int(s) for s, a in zip(shape, axes) if a in "ZYX"]


def spec_row(s: read.Sample, origin: Sequence[int]) -> dict:
    """One tile spec: image path, encoded target, origin, and the class of a classification sample."""
    row = {"image": str(s.image), "target": encode_target(s.groundtruth), "origin": list(origin)}
    if isinstance(s.groundtruth, int):
        row["label"] = int(s.groundtruth)
    return row


def training_rows(
    samples: list[read.Sample],
    shapes: dict[str, tuple[int, ...]],
    plan: Plan,
    seed: int,
    epochs: range,
    tiles: int | None = None,
    foreground: dict[str, np.ndarray] | None = None,
    foreground_fraction: float = 0.0,
    multiple: int = 1,
    regions: dict[str, np.ndarray] | None = None,
) -> list[dict]:
    """Spec rows for ``epochs`` (e.g. ``range(3, 50)`` when resuming), shuffled per epoch.

    Every epoch holds a multiple of ``multiple`` rows (batch size x workers): a remainder is
    filled up with extra tiles of randomly chosen images (new positions and augmentation seeds),
    so every training batch is full. A batch of one breaks BatchNorm ("Expected more than 1 value
    per channel when training"), and a set smaller than one batch still trains.

    Each row carries its own augmentation seed derived from (seed, epoch, position), so a run
    reproduces regardless of how Ray batches or orders rows. With ``foreground`` maps
    (``foreground_maps``) and ``foreground_fraction`` > 0, about that fraction of each image's
    tiles is centred on a labelled cell (``tile.random_tile_origins`` with weights), the rest
    uniform: sparse objects on a large slide are then seen every epoch. An image with a
    ``regions`` map (``region_maps``: a GeoJSON's annotated regions, a slide's tissue) has all its
    tiles centred in its cells, as many per epoch as cover them about once.
    """
    from instantdl_ray.data.tile import random_tile_origins
    from instantdl_ray.tasks import get_task

    pixelwise = get_task(plan.task).pixelwise
    cell_px = int(np.prod(coverage_cell(plan)))
    tile_px = int(np.prod(plan.tile_shape))

    def origins_of(s: read.Sample, n: int | None, rng: np.random.Generator) -> list[list[int]]:
        sp = spatial_shape(shapes[str(s.image)], plan.axes)
        cover = (regions or {}).get(str(s.image))
        if cover is not None:  # annotated regions / tissue only
            if n is None:
                n = tiles or max(1, int(np.ceil(np.count_nonzero(cover) * cell_px / tile_px)))
            return [list(o) for o in random_tile_origins(sp, plan.tile_shape, n, rng, weights=cover)]
        if n is None:
            n = tiles_per_image(sp, plan.tile_shape, tiles) if pixelwise else 1
        fg = foreground.get(str(s.image)) if foreground and foreground_fraction > 0 else None
        if fg is not None and _larger_than_tile(sp, plan.tile_shape):
            k = int(rng.binomial(n, foreground_fraction))
            origins = [list(o) for o in random_tile_origins(sp, plan.tile_shape, k, rng, weights=fg)]
            return origins + _origins(sp, plan.tile_shape, n - k, rng)
        return _origins(sp, plan.tile_shape, n, rng)

    rows = []
    for epoch in epochs:
        rng = np.random.default_rng([seed, epoch])
        epoch_rows = []
        for s in samples:
            epoch_rows += [spec_row(s, origin) for origin in origins_of(s, None, rng)]
        short = (-len(epoch_rows)) % max(1, int(multiple))
        for k in rng.choice(len(samples), size=short, replace=short > len(samples)) if short else ():
            s = samples[int(k)]
            if regions and str(s.image) in regions:
                epoch_rows.append(spec_row(s, origins_of(s, 1, rng)[0]))
            else:
                epoch_rows.append(spec_row(s, _origins(spatial_shape(shapes[str(s.image)], plan.axes), plan.tile_shape, 1, rng)[0]))
        for j, k in enumerate(rng.permutation(len(epoch_rows))):
            r = dict(epoch_rows[k])
            r["seed"] = int((seed * 7919 + epoch * EPOCH_SEED_STRIDE + j) % (2**63 - 1))
            r["epoch"] = epoch
            rows.append(r)
    return rows


def grid_rows(samples: list[read.Sample], shapes: dict[str, tuple[int, ...]], plan: Plan, overlap: float,
              keep: dict[str, list[int]] | None = None, grids: dict[str, list] | None = None) -> list[dict]:
    """Spec rows covering each image with the prediction tile grid (validation / prediction);
    ``keep``: per image, the indices of the grid's tiles to read (a slide's tissue), else all;
    ``grids``: per image, its grid when the caller built it already (``tile.tile_grid``; a slide's
    patches for a classification model, ``patch_grid``)."""
    from instantdl_ray.data.tile import grid_overlap, tile_grid
    from instantdl_ray.tasks import get_task

    pixelwise = get_task(plan.task).pixelwise  # else one row per image (a label per image)
    ov = grid_overlap(plan, overlap) if pixelwise else None
    rows = []
    for idx, s in enumerate(samples):
        sp = spatial_shape(shapes[str(s.image)], plan.axes)
        tiles = (grids or {}).get(str(s.image)) or (tile_grid(tuple(sp), tuple(plan.tile_shape), ov) if pixelwise
                                                     else [None])  # one row per image, or a slide's patches
        wanted = set(keep[str(s.image)]) if keep and str(s.image) in keep else None
        for t_idx, t in enumerate(tiles):
            if wanted is not None and t_idx not in wanted:
                continue
            origin = [0] * len(sp) if t is None else [int(sl.start) - int(p[0]) for sl, p in zip(t.read, t.pad)]
            rows.append({**spec_row(s, origin), "image_index": idx, "tile_index": t_idx, "seed": 0})
    return rows


# ---------------------------------------------------------------- Ray datasets


STEP_INTERVAL_S = 0.02

try:  # Ray's internal interface; without it nothing is throttled
    from ray.data._internal.execution.execution_callback import ExecutionCallback as _ExecutionCallback
except ImportError:  # pragma: no cover
    _ExecutionCallback = None

if _ExecutionCallback is not None:

    class StepRateLimit(_ExecutionCallback):
        """Caps the Ray Data streaming executor's scheduling loop at one step per ``STEP_INTERVAL_S``.

        Without it the loop busy-spins a CPU whenever the consumer (the training worker) is the
        bottleneck, which on CPU is always: a finished task whose output is held back by
        backpressure counts as active, so the loop's wait returns at once
        (``benchmarks/train_overhead.py`` measures it). 20 ms per step is far below the time of a
        read + augment task, so the data path loses nothing.
        """

        def __init__(self):
            self._last = 0.0

        def on_execution_step(self, executor):
            import time

            wait = STEP_INTERVAL_S - (time.perf_counter() - self._last)
            if wait > 0:
                time.sleep(wait)
            self._last = time.perf_counter()

else:  # pragma: no cover
    StepRateLimit = None


def ray_dataset(rows: list[dict], plan: Plan, augment_params=None, with_target: bool = True, rows_per_block: int = 8):
    """Ray Dataset: spec rows -> ``ReadTiles`` -> (optional) augmentation, all streaming."""
    import ray

    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows) // rows_per_block))
    if StepRateLimit is not None:
        callbacks = list(ds.context.custom_execution_callback_classes)
        if StepRateLimit not in callbacks:
            ds.context.custom_execution_callback_classes = callbacks + [StepRateLimit]
    reader = ReadTiles(plan, with_target)

    def read_tiles(batch: dict) -> dict:
        return reader(batch)

    ds = ds.map_batches(read_tiles, batch_size=rows_per_block, batch_format="numpy")
    if augment_params is not None:
        from instantdl_ray.data.augment import augment_batch
        from instantdl_ray.tasks import get_task

        kind = get_task(plan.task).target_kind
        ds = ds.map_batches(
            augment_batch, fn_kwargs={"params": augment_params, "target_kind": kind or "none"},
            batch_size=rows_per_block, batch_format="numpy",
        )
    return ds

