"""Dataset fingerprint -> ``plan.json``: axes, channels, normalisation, tile shape, classes.

The plan is computed once on the driver from a sample of the data (never every pixel of a
slide) and travels to every worker and actor as plain JSON.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from instantdl_ray.errors import ConfigError
from instantdl_ray.io import read, write

# Robust per-image input normalisation (CSBDeep / StarDist): map these percentiles to 0 and 1.
NORM_PERCENTILES = (1.0, 99.8)
# Pixels drawn per image for statistics; bounded so huge images cost the same as small ones.
STAT_PIXELS = 200_000


@dataclass
class Plan:
    task: str
    spatial_dims: int
    axes: str  # image axes in the files, e.g. "YX", "YXC", "CYX", "ZYX"
    target_axes: str | None  # groundtruth axes (pixel tasks)
    in_channels: int
    out_channels: int
    num_classes: int  # 1 = binary (semantic) / regression channels
    class_names: list[str]
    tile_shape: list[int]  # spatial tile for training and prediction
    image_size: list[int] | None  # classification: resize target
    model: str
    loss: str
    dropout: float
    target_mean: list[float] = field(default_factory=list)  # regression target scaling
    target_std: list[float] = field(default_factory=list)
    image_norm: dict[str, list[list[float]]] = field(default_factory=dict)  # name -> per-channel (lo, hi)
    train_names: list[str] = field(default_factory=list)
    val_names: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    mpp: float | None = None  # µm per pixel the model works at (None: unknown, inputs read as stored)

    def to_json(self, path: str | Path) -> None:
        write.write_json(path, asdict(self), indent=1)

    @classmethod
    def from_json(cls, path_or_text: str | Path | dict) -> "Plan":
        if isinstance(path_or_text, dict):
            return cls(**path_or_text)
        return cls(**json.loads(Path(path_or_text).read_text()))

    def to_dict(self) -> dict:
        return asdict(self)


def _subsample(arr: Any, axes: str | None = None, max_pixels: int = STAT_PIXELS, seed: int = 0) -> np.ndarray:
    """A bounded sample (~``max_pixels`` elements) of a (possibly lazy) array, for statistics.

    Chunked lazy arrays (zarr, TIFF through ``aszarr``) of many chunks: whole chunks at seeded
    random positions of the chunk grid (at least 8), concatenated along the last spatial axis, so
    the cost is O(max_pixels) and not O(image) (a strided view would decode every chunk of a
    slide). Otherwise a strided view. Only spatial axes (``Z``, ``Y``, ``X`` in ``axes``; all axes
    longer than 4 when ``axes`` is None) are sampled, so channels stay whole.
    """
    shape = tuple(int(s) for s in arr.shape)
    total = int(np.prod(shape))
    if total <= max_pixels:
        return np.asarray(arr[...])
    spatial = [a in "ZYX" for a in axes] if axes is not None else [s > 4 for s in shape]
    chunks = getattr(arr, "chunks", None)
    if not isinstance(arr, np.ndarray) and chunks and all(isinstance(c, int) for c in chunks) and any(spatial):
        grid = [max(1, s // c) if sp else 1 for s, c, sp in zip(shape, chunks, spatial)]  # whole chunks only
        cells = int(np.prod(grid))
        chunk_pixels = int(np.prod([c if sp else s for s, c, sp in zip(shape, chunks, spatial)]))
        n = min(cells, max(8, -(-max_pixels // chunk_pixels)))
        if n < cells // 2:  # else the strided read is as cheap
            picks = np.random.default_rng(seed).choice(cells, size=n, replace=False)
            last = max(k for k, sp in enumerate(spatial) if sp)
            parts = []
            for flat in sorted(int(f) for f in picks):
                pos = np.unravel_index(flat, grid)
                idx = tuple(slice(p * c, (p + 1) * c) if sp else slice(None) for p, c, sp in zip(pos, chunks, spatial))
                parts.append(np.asarray(arr[idx]))
            return np.concatenate(parts, axis=last)
    step = int(np.ceil((total / max_pixels) ** (1 / max(1, sum(spatial)))))
    idx = tuple(slice(None, None, step) if st else slice(None) for st in spatial)
    return np.asarray(arr[idx])


def image_percentiles(path: Path, axes: str, augment: dict | None = None) -> list[list[float]]:
    """Per-channel ``(lo, hi)`` of one image, from a bounded subsample: ``normalize_image`` maps
    ``lo`` to 0 and ``hi`` to 1. By default the robust percentiles ``NORM_PERCENTILES``; with
    InstantDL's ``feature_scaling`` the image's min and max; with ``std_normalization`` (which wins
    when both are on, as a z-score ignores a prior min-max scaling) ``(mean, mean + std)``, i.e. a
    z-score. ``augment`` is ``data_gen_args`` (``plan.extra["augment"]``).

    These are statistics of the whole image, computed once at planning, so every tile of an image
    (training, validation, prediction) gets the same affine map and overlapping tiles agree.
    """
    arr = read.open_array(path)
    axes = read.image_axes(arr.shape, axes)
    chw = read.to_channel_first(_subsample(arr, axes), axes)
    return channel_stats(chw.reshape(chw.shape[0], -1), augment)


def image_stats(path: Path, axes: str, augment: dict | None, tissue_setting: str, tile: list[int]) -> list[list[float]]:
    """``image_percentiles`` of an image; of a whole slide, from its tissue only (the ``tissue_mask``
    setting, as prediction does in ``predict.inputs``), so the glass that covers most of a slide
    does not set the intensity range in training either."""
    from instantdl_ray.io.slide import is_pyramid

    if tissue_setting != "none" and is_pyramid(path):
        from instantdl_ray.data.tissue import mask_for, yx_shape

        arr = read.open_array(path)
        mask = mask_for(path, yx_shape(arr.shape), tissue_setting, tile)
        if mask is not None and mask.fraction > 0:
            return channel_stats(mask.sample(arr, read.image_axes(arr.shape, axes)), augment)
    return image_percentiles(path, axes, augment)


def channel_stats(flat: np.ndarray, augment: dict | None = None) -> list[list[float]]:
    """``image_percentiles``' per-channel ``(lo, hi)`` of pixels ``(C, N)`` (e.g. a slide's tissue)."""
    flat = np.asarray(flat, dtype=np.float64)
    augment = augment or {}
    if augment.get("std_normalization"):
        mean, std = flat.mean(1), flat.std(1)
        lo, hi = mean, mean + np.maximum(std, 1e-8)
    elif augment.get("feature_scaling"):
        lo, hi = flat.min(1), flat.max(1)
    else:
        lo, hi = np.percentile(flat, NORM_PERCENTILES, axis=1)
    return [[float(a), float(b)] for a, b in zip(lo, hi)]


def target_thresholds(path, target_axes: str) -> list[float]:
    """Per-channel background threshold of one raw groundtruth image for InstantDL's
    ``threshold_background_groundtruth``: ``augment.GROUNDTRUTH_THRESHOLD_FACTOR`` x its mean (from a
    bounded subsample), in the target's own units, so the same pixels are cleared in every tile."""
    from instantdl_ray.data.augment import GROUNDTRUTH_THRESHOLD_FACTOR

    arr = read.to_channel_first(_subsample(read.open_array(path), target_axes), target_axes)
    flat = arr.reshape(arr.shape[0], -1).astype(np.float64)
    return [float(GROUNDTRUTH_THRESHOLD_FACTOR * m) for m in flat.mean(1)]


def normalize_image(chw: np.ndarray, lohi: list[list[float]]) -> np.ndarray:
    """``(C, ...)`` -> percentiles mapped to [0, 1] per channel (values may exceed the range)."""
    lohi_arr = np.asarray(lohi, dtype=np.float32)
    shape = (-1,) + (1,) * (chw.ndim - 1)
    lo = lohi_arr[:, 0].reshape(shape)
    hi = lohi_arr[:, 1].reshape(shape)
    return ((chw - lo) / np.maximum(hi - lo, 1e-6)).astype(np.float32)


MIN_CLASSIFICATION_SIZE = 64  # px per side fed to a ResNet (5 halvings leave 2x2 maps)


def round_up(n: int, k: int) -> int:
    return int(-(-n // k) * k)


def default_tile(spatial_shape: tuple[int, ...], image_size, divisor: int = 16) -> list[int]:
    """Tile shape: ``image_size`` if set, else the image up to 256 (2D) / 32x128x128 (3D), divisible."""
    nd = len(spatial_shape)
    if image_size not in (False, None):
        size = [int(image_size)] * nd if isinstance(image_size, int) else [int(s) for s in image_size]
        if len(size) == 2 and nd == 3:
            size = [spatial_shape[0], *size]
        return [round_up(s, divisor) for s in size]
    caps = [256, 256] if nd == 2 else [32, 128, 128]
    return [round_up(min(s, c), divisor) for s, c in zip(spatial_shape, caps)]


def _spatial_of(shape: tuple[int, ...], axes: str) -> tuple[int, ...]:
    from instantdl_ray.io.read import image_axes

    return tuple(n for n, a in zip(shape, image_axes(shape, axes)) if a in "ZYX")


def _target_axes(tshape: tuple[int, ...], spatial: str) -> str:
    if len(tshape) == len(spatial):
        return spatial
    if len(tshape) == len(spatial) + 1:
        return spatial + "C" if tshape[-1] <= 4 and tshape[0] > 4 else "C" + spatial
    raise ValueError(f"groundtruth of shape {tshape} does not fit image axes '{spatial}'")


def split_train_val(names: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded 80/20 (by default) split of the training images into train and validation."""
    names = sorted(names)
    if fraction <= 0 or len(names) < 2:
        return names, []
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(names))
    n_val = min(len(names) - 1, max(1, int(round(fraction * len(names)))))
    val = sorted(names[i] for i in order[:n_val])
    return sorted(set(names) - set(val)), val


# Mask R-CNN stitching keeps each object from a tile that holds it whole (``stitch``), so the
# prediction overlap must exceed the objects' extent: measured on the training groundtruth.
OBJECT_IMAGES = 16  # training groundtruths read (evenly spaced over the training set)
OBJECT_MASKS = 256  # per-object mask files read per image at most (instance folder layout)
OBJECT_WINDOW = 1024  # in-plane edge of the windows read from a large label image (64 in Z)
OBJECT_WINDOWS = 4  # windows per large label image
OBJECT_PERCENTILE = 99.0  # of the objects' bounding-box extents; the rarer giants use the fallback
OVERLAP_SLACK = 1.1  # predicted masks can be somewhat larger than the groundtruth ones


def required_overlap(extent: list[int]) -> list[int]:
    """Tile overlap (pixels per axis) that lets every object of bounding-box ``extent`` lie whole
    in some read window: ``extent + 1`` exactly (``stitch``), with ``OVERLAP_SLACK``."""
    return [int(np.ceil(OVERLAP_SLACK * int(e))) + 1 for e in extent]


def object_extents(samples: list, target_axes: str | None, max_images: int = OBJECT_IMAGES,
                   downsample: dict[str, int] | None = None) -> list[int] | None:
    """``OBJECT_PERCENTILE`` percentile over the objects of the samples' label groundtruth of the
    bounding-box extent per spatial axis, in pixels; None when there are no objects.

    Bounded cost: at most ``max_images`` images; of each either at most ``OBJECT_MASKS`` mask
    files (instance folder layout), the whole label image when it is small, or else
    ``OBJECT_WINDOWS`` contiguous windows at seeded positions (objects cut by a window edge inside
    the image are not counted). A binary groundtruth is split into connected components.
    """
    with_gt = [s for s in samples if isinstance(s.groundtruth, (str, Path)) or
               (isinstance(s.groundtruth, (list, tuple)) and len(s.groundtruth) > 0)]
    if not with_gt:
        return None
    picks = sorted({int(k) for k in np.linspace(0, len(with_gt) - 1, min(max_images, len(with_gt))).round()})
    ext: list[list[int]] = []
    for k in picks:
        d = (downsample or {}).get(str(with_gt[k].image), 1)  # a slide's label at 1/d: extents in slide px
        ext += [[e * d for e in box] for box in _sample_object_extents(with_gt[k], target_axes, seed=k)]
    if not ext:
        return None
    return [int(np.ceil(v)) for v in np.percentile(np.asarray(ext, np.float64), OBJECT_PERCENTILE, axis=0)]


def _sample_object_extents(sample, target_axes: str | None, seed: int = 0) -> list[list[int]]:
    from scipy import ndimage as ndi

    gt = sample.groundtruth
    if isinstance(gt, (list, tuple)):  # one binary mask per object
        out = []
        for k in sorted({int(k) for k in np.linspace(0, len(gt) - 1, min(OBJECT_MASKS, len(gt))).round()}):
            m = read.read_raw(gt[k])
            m = m[..., 0] if m.ndim == 3 else m
            nz = np.nonzero(m)
            if nz[0].size:
                out.append([int(c.max() - c.min() + 1) for c in nz])
        return out
    if not isinstance(gt, (str, Path)) or not Path(gt).exists():
        return []
    from instantdl_ray.io import annotations

    if annotations.is_annotation(Path(gt)):  # polygons: their bounding boxes, on the pixel grid
        return [[int(np.ceil(b[3]) - np.floor(b[1])), int(np.ceil(b[2]) - np.floor(b[0]))]
                for b in (g.bounds for g in annotations.load(gt).shapes)]
    arr = read.open_array(gt)
    axes = target_axes if target_axes and len(target_axes) == len(arr.shape) else "ZYX"[-len(arr.shape):]
    spatial = [(d, int(n)) for d, (a, n) in enumerate(zip(axes, arr.shape)) if a in "ZYX"]
    window = [min(n, 64 if axes[d] == "Z" else OBJECT_WINDOW) for d, n in spatial]
    whole = int(np.prod([n for _, n in spatial])) <= 4 * int(np.prod(window))
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(1 if whole else OBJECT_WINDOWS):
        starts = ([0] * len(spatial) if whole
                  else [int(rng.integers(0, n - w + 1)) for (_, n), w in zip(spatial, window)])
        idx = [slice(0, 1)] * len(arr.shape)  # channel axes: the first (the instance labels)
        for (d, n), a, w in zip(spatial, starts, window):
            idx[d] = slice(0, n) if whole else slice(a, a + w)
        lab = np.asarray(arr[tuple(idx)]).reshape([n if whole else w for (_, n), w in zip(spatial, window)])
        lab = lab.astype(np.int64)
        if lab.max() <= 1:
            lab = ndi.label(lab > 0)[0]
        for box in ndi.find_objects(lab):
            if box is None:
                continue
            if not whole and any((s.start == 0 and a > 0) or (s.stop == w and a + w < n)
                                 for s, a, w, (_, n) in zip(box, starts, window, spatial)):
                continue  # cut by the window: its extent is unknown
            out.append([s.stop - s.start for s in box])
    return out


def model_mpp(configured: float | None, train: list) -> tuple[float | None, str | None]:
    """The pixel size (µm) the model works at and where it came from: the ``mpp`` setting, else
    the training images' own (their metadata, when they all state the same within 2 %).

    Training reads images as stored, so an ``mpp`` setting that contradicts the training images'
    metadata is refused (naming an image and both values) rather than silently mislabelling the model."""
    from instantdl_ray.io.slide import SCALE_TOLERANCE, microscope_mpp

    sizes = {}
    for s in train:
        size = microscope_mpp(read.pixel_size(s.image))
        if size is not None:
            sizes[str(s.image)] = size
    if configured is not None:
        off = {k: v for k, v in sizes.items() if abs(v / float(configured) - 1) > SCALE_TOLERANCE}
        if off:
            name, v = next(iter(off.items()))
            raise ConfigError([
                f"mpp: {configured} µm/px contradicts the training images' metadata ({len(off)} image(s), e.g. {name}: "
                f"{v:.4g} µm/px); training reads images at their own resolution. Remove mpp (the model then works at "
                f"{v:.4g} µm/px) or resample the training images to {configured} µm/px"])
        return float(configured), "config"
    if sizes and len(sizes) == len(train):
        vals = np.asarray(list(sizes.values()))
        med = float(np.median(vals))
        if np.all(np.abs(vals / med - 1) <= SCALE_TOLERANCE):
            return med, "metadata"
    return None, None


def make_plan(cfg, inv) -> Plan:
    """Fingerprint the data set described by ``inv`` (from ``validate``) under ``cfg``."""
    from instantdl_ray.tasks import get_task

    task = get_task(cfg.task)
    fields = task.plan_fields(cfg, inv)
    samples = [s for ss in inv.samples.values() for s in ss]
    first = samples[0]
    shape = inv.image_shapes[str(first.image)]
    axes = inv.axes
    in_channels = shape[axes.index("C")] if "C" in axes else 1
    if axes.endswith("C") and in_channels == 4:
        in_channels = 3  # RGBA -> RGB
    spatial_axes = "".join(a for a in axes if a in "ZYX")
    # the tile fits the largest images (capped in default_tile); smaller ones are padded into it,
    # so one small image that happens to sort first does not shrink the tile of the whole set
    spatial_shape = tuple(np.max([_spatial_of(inv.image_shapes[str(s.image)], axes) for s in samples
                                  if str(s.image) in inv.image_shapes], axis=0).tolist())
    target_axes = None
    if task.pixelwise and str(first.image) in inv.target_shapes:
        target_axes = _target_axes(inv.target_shapes[str(first.image)], spatial_axes)

    image_size = None
    extra_fields: dict[str, Any] = {}
    if task.pixelwise:
        tile = default_tile(spatial_shape, cfg.image_size)
    else:
        if cfg.image_size not in (False, None):
            asked = [int(cfg.image_size)] * 2 if isinstance(cfg.image_size, int) else [int(s) for s in cfg.image_size]
        else:
            asked = [min(128, round_up(max(spatial_shape[-2:]), 32))] * 2
        # a ResNet halves the input five times: below 64 px its last stage sees 1x1 maps, where
        # BatchNorm has (almost) nothing to normalise over; small images are resized up
        image_size = [max(a, MIN_CLASSIFICATION_SIZE) for a in asked]
        if image_size != asked:
            extra_fields["image_size_reason"] = (
                f"images resized to {image_size} instead of {asked}: the network needs at least "
                f"{MIN_CLASSIFICATION_SIZE} px per side (its last stage would see 1x1 maps)")
        tile = image_size
        # on a slide the model classifies patches of the training images' size (predict.tilemap)
        train_yx = [_spatial_of(inv.image_shapes[str(s.image)], axes)[-2:] for s in inv.samples.get("train", [])
                    if str(s.image) in inv.image_shapes]
        if train_yx:
            extra_fields["patch_shape"] = [int(v) for v in np.median(np.asarray(train_yx), axis=0)]

    train = [str(s.image) for s in inv.samples.get("train", [])]
    tr, va = split_train_val(train, cfg.validation_split, cfg.seed)
    plan = Plan(
        task=task.name,
        spatial_dims=len(spatial_axes),
        axes=axes,
        target_axes=target_axes,
        in_channels=int(in_channels),
        out_channels=int(fields["out_channels"]),
        num_classes=int(fields["num_classes"]),
        class_names=list(fields["class_names"]),
        tile_shape=[int(t) for t in tile],
        image_size=image_size,
        model=(cfg.model or task.models[0]).lower(),
        loss=fields["loss"],
        dropout=float(cfg.dropout if cfg.dropout is not None else task.default_dropout),
        train_names=tr,
        val_names=va,
        extra={**fields.get("extra", {}), **extra_fields, "augment": cfg.data_gen_args.model_dump()},
    )
    plan.mpp, plan.extra["mpp_source"] = model_mpp(cfg.mpp, inv.samples.get("train", []))
    plan.image_norm = {str(s.image): image_stats(s.image, axes, plan.extra["augment"], cfg.tissue_mask, plan.tile_shape)
                       for s in samples}
    if inv.annotation_classes:
        plan.extra["annotation_classes"] = dict(inv.annotation_classes)
    if inv.label_downsample:
        plan.extra["label_downsample"] = dict(inv.label_downsample)
    if plan.extra["augment"].get("threshold_background_groundtruth") and target_axes:
        from instantdl_ray.io.annotations import is_annotation

        plan.extra["target_threshold"] = {str(s.image): target_thresholds(s.groundtruth, target_axes) for s in samples
                                          if isinstance(s.groundtruth, (str, Path)) and not is_annotation(Path(s.groundtruth))}
    if task.target_statistics:
        stats = [_target_stats(s, target_axes, plan.extra) for s in inv.samples.get("train", [])[:64]]
        if stats:
            n = np.sum([c for c, _, _ in stats], axis=0)
            mean = np.sum([m * c for c, m, _ in stats], axis=0) / n
            ex2 = np.sum([(v + m**2) * c for c, m, v in stats], axis=0) / n
            std = np.sqrt(np.maximum(ex2 - mean**2, 1e-12))
            plan.target_mean = [float(x) for x in np.atleast_1d(mean)]
            plan.target_std = [float(x) for x in np.maximum(np.atleast_1d(std), 1e-6)]
            plan.out_channels = len(plan.target_mean)
        else:  # predict-only: statistics come from the trained run's plan
            plan.target_mean, plan.target_std = [0.0], [1.0]
    if task.whole_objects(plan):
        extent = object_extents(inv.samples.get("train", []), target_axes, downsample=inv.label_downsample)
        if extent is not None:
            plan.extra["object_extent"] = extent
            plan.extra["min_overlap"] = required_overlap(extent)
            if any(m > t // 2 for m, t in zip(plan.extra["min_overlap"], plan.tile_shape)):
                import warnings

                warnings.warn(f"training objects extend up to {extent} pixels, more than half the tile "
                              f"{plan.tile_shape}: objects that large are stitched from pieces; a larger "
                              f"image_size keeps them whole")
    return plan


def _target_stats(sample, target_axes: str, extra: dict):
    """(pixels, mean, variance) per channel of one training target after the raw-target clean-up
    (``augment.clean_target``), which is what the scaled training targets are made from."""
    from instantdl_ray.data.augment import AugmentParams, clean_target

    arr = read.to_channel_first(_subsample(read.open_array(sample.groundtruth), target_axes), target_axes)
    arr = clean_target(arr, AugmentParams.from_dict(extra.get("augment")),
                       extra.get("target_threshold", {}).get(str(sample.image)))
    flat = arr.reshape(arr.shape[0], -1).astype(np.float64)
    return flat.shape[1], flat.mean(1), flat.var(1)
