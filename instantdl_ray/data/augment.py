"""Data augmentation: pure numpy functions, InstantDL's ``data_gen_args``, and a Ray batch wrapper.

Layout of this module, from the bottom up:

1. One pure function per augmentation (``flip``, ``rotate``, ``zoom``, ``gaussian_blur``,
   ``adjust_contrast``, ``adjust_brightness``, ``gamma_shift``, ``poisson_noise``,
   ``threshold_background``, ``binarize``).
   Arrays follow the package convention: image ``(C, Y, X)`` or ``(C, Z, Y, X)`` float32, target
   ``(Ct, <same spatial>)`` or ``None``. Every random quantity is an argument, so these functions
   are deterministic.
2. ``AugmentParams``: InstantDL's ``data_gen_args`` keys (its spelling, ``poission_noise`` typo
   included) parsed once into a frozen dataclass.
3. ``clean_target`` (deterministic
   target clean-up, also used at evaluation time) and ``augment`` (random, training only; draws
   everything from an explicit ``np.random.Generator``).
4. ``augment_batch``: what Ray Data's ``map_batches(batch_format="numpy")``
   calls. Each row carries its own seed, so results do not depend on how Ray cuts batches.
5. ``save_examples``: PNG previews for ``save_augmented_images``.

What each InstantDL key means here (``0``/``False`` switches a key off; ``True`` on a numeric key
means the value in ``ON_VALUES``):

=================================  ==============================================================
key                                 meaning
=================================  ==============================================================
``horizontal_flip``                 flip X (last axis) with probability ``prob``
``vertical_flip``                   flip Y with probability ``prob``
``rotation_range`` r (degrees)      rotate in the YX plane by an angle ~ U[-r, r]
``zoom_range`` z                    z >= 1: scale ~ log-uniform in [1/z, z] (InstantDL used e.g. 2);
                                    0 < z < 1: scale ~ U[1-z, 1+z] (Keras). scale > 1 magnifies.
                                    Zoom is about the centre and keeps the shape (crop / fill).
``poission_noise`` lam              Poisson (shot) noise; strength ~ U(0, lam]; strength 1 means
                                    the channel's intensity range holds 255 photons
``contrast_range`` c                (x - mean) * f + mean per channel, f ~ U[max(0, 1-c), 1+c]
``brightness_range`` b              x + u * b * (max - min) per channel, u ~ U[-1, 1]
``gamma_shift`` g                   per channel min-max to [0, 1], ** gamma, range restored;
                                    gamma ~ U[max(0.1, 1-g), 1+g]
``gaussian_blur`` s (new key)       Gaussian blur in YX, sigma ~ U[0, s]
``threshold_background_image``      image values below the channel mean set to 0 (InstantDL),
                                    random with probability ``prob`` (an augmentation, as in
                                    InstantDL; the raw image is used at prediction)
``threshold_background_groundtruth`` target values below 0.8 * channel mean set to 0 (InstantDL's
                                    0.8 of the whole image's mean); see ``clean_target``
``binarize_mask``                   target > 0 -> 1; see ``clean_target``; also
                                    forces nearest-neighbour interpolation of the target
``std_normalization``               per image and channel: zero mean, unit std (statistics of the
                                    whole image from the plan, ``plan.image_percentiles``)
``feature_scaling``                 per image and channel: min-max to [0, 1] (likewise)
``resample_images``                 refused at validation unless off (tiles are read at the images'
                                    own resolution)
``save_augmented_images``           kept; the caller writes previews with ``save_examples``
=================================  ==============================================================

Every random augmentation fires independently with probability ``AugmentParams.prob`` (0.5),
so the network also sees unaugmented samples (InstantDL used 1/3 or 1/2 per key).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from scipy import ndimage

from instantdl_ray.config.schema import AugmentConfig
from instantdl_ray.io import write

# InstantDL's data_gen_args keys and defaults, in InstantDL's order, typo included
# (``poission_noise``): one list, the config schema's (flips on, as in InstantDL's example config).
AUGMENT_KEYS: tuple[str, ...] = tuple(AugmentConfig.model_fields)
DEFAULTS: dict[str, Any] = AugmentConfig().model_dump()

# What ``True`` means for a numeric key. Python would read True as 1.0, i.e. a 1-degree rotation
# or a zoom of exactly 1 (no-op); these are the magnitudes a user switching a key "on" expects.
ON_VALUES: dict[str, float] = {
    "rotation_range": 180.0,  # microscopy has no preferred orientation
    "zoom_range": 1.25,
    "poission_noise": 1.0,
    "contrast_range": 0.2,
    "brightness_range": 0.2,
    "gamma_shift": 0.2,
    "gaussian_blur": 1.0,
}

_BOOL_KEYS = (
    "save_augmented_images",
    "std_normalization",
    "feature_scaling",
    "horizontal_flip",
    "vertical_flip",
    "threshold_background_image",
    "threshold_background_groundtruth",
    "binarize_mask",
)

TARGET_KINDS: tuple[str, ...] = ("label", "continuous", "none")
"""``label``: integer maps (semantic / instance), nearest-neighbour interpolation.
``continuous``: regression maps, linear interpolation.
``none``: the target is not an image (classification: a class index) and passes through."""

# Photons in a channel's full intensity range at Poisson strength 1 (an 8-bit camera's range).
POISSON_PEAK = 255.0
# InstantDL thresholded the groundtruth at 0.8 * mean (and the image at the mean).
GROUNDTRUTH_THRESHOLD_FACTOR = 0.8
_EPS = 1e-8


# ---------------------------------------------------------------------------------------------
# helpers


def _as_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, dtype=np.float32)
    if image.ndim not in (3, 4):
        raise ValueError(
            f"image must be (C, Y, X) or (C, Z, Y, X), got shape {image.shape}; "
            "add a channel axis at the reader"
        )
    return image


def _check_pair(image: np.ndarray, target: Optional[np.ndarray]) -> None:
    if target is not None and target.shape[1:] != image.shape[1:]:
        raise ValueError(
            f"target spatial shape {target.shape[1:]} != image spatial shape {image.shape[1:]} "
            f"(image {image.shape}, target {target.shape}); both must be (C, [Z,] Y, X)"
        )


def _yx_axes(ndim: int) -> tuple[int, int]:
    return (ndim - 2, ndim - 1)


def _channel_stat(x: np.ndarray, fn) -> np.ndarray:
    """fn over all axes but the channel axis, shaped to broadcast against x: (C, 1, 1[, 1])."""
    return fn(x, axis=tuple(range(1, x.ndim)), keepdims=True)


def _fill_value(x: np.ndarray, kind: str) -> np.ndarray:
    """What geometric transforms put where no data was: 0 for labels (background), else the
    per-channel median, which is the background level of most microscopy images (dark in
    fluorescence, bright in bright-field) and avoids the fake edges a 0 fill draws."""
    if kind == "label":
        return np.zeros((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype)
    return _channel_stat(x, np.median).astype(x.dtype)


def interp_order(target_kind: str, params: Optional["AugmentParams"] = None) -> int:
    """Spline order for resampling a target: 0 (nearest) for labels and binarized masks, else 1."""
    if target_kind not in TARGET_KINDS:
        raise ValueError(f"target_kind must be one of {TARGET_KINDS}, got {target_kind!r}")
    if target_kind == "label" or (params is not None and params.binarize_mask):
        return 0
    return 1


def _map_spatial(x: np.ndarray, kind: str, order: int, fn) -> np.ndarray:
    """Apply a constant-fill geometric ``fn(array, order)`` with the fill value of ``kind``.

    scipy only takes one scalar ``cval``; shifting by the per-channel fill, transforming with
    cval=0 and shifting back gives per-channel fills, exactly for spline orders 0 and 1 (their
    weights sum to one).
    """
    fill = _fill_value(x, kind)
    if not np.any(fill):
        return fn(x, order)
    work = x.astype(np.float32) - fill
    return (fn(work, order) + fill).astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# geometric augmentations (image and target together)


def flip(
    image: np.ndarray, target: Optional[np.ndarray], axis: int
) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Mirror image and target along one spatial axis.

    image (C, [Z,] Y, X), target (Ct, [Z,] Y, X) or None; ``axis`` counts from the end:
    -1 = X (horizontal flip), -2 = Y (vertical flip), -3 = Z (3D only). Returns contiguous copies
    (torch refuses negative strides).
    """
    n_spatial = image.ndim - 1
    if not -n_spatial <= axis <= -1:
        raise ValueError(f"axis must be in [-{n_spatial}, -1] (a spatial axis), got {axis}")
    out_img = np.ascontiguousarray(np.flip(image, axis))
    out_tgt = None if target is None else np.ascontiguousarray(np.flip(target, axis))
    return out_img, out_tgt


def rotate(
    image: np.ndarray,
    target: Optional[np.ndarray],
    angle: float,
    target_order: int = 0,
) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Rotate image and target by ``angle`` degrees in the YX plane (every Z slice alike).

    image (C, [Z,] Y, X) -> same shape (``reshape=False``), linear interpolation; target
    (Ct, [Z,] Y, X) -> same shape with spline order ``target_order`` (0 for labels keeps them
    integer-valued, 1 for continuous maps). Corners that come from outside the image are filled
    with 0 for labels (``target_order == 0``) and with the per-channel median otherwise.
    """
    image = _as_image(image)
    _check_pair(image, target)
    axes = _yx_axes(image.ndim)

    def rot(x: np.ndarray, order: int) -> np.ndarray:
        return ndimage.rotate(
            x, angle, axes=axes, reshape=False, order=order, mode="constant", cval=0.0
        )

    out_img = _map_spatial(image, "image", 1, rot)
    out_tgt = None
    if target is not None:
        kind = "label" if target_order == 0 else "continuous"
        out_tgt = _map_spatial(target, kind, target_order, rot)
    return out_img, out_tgt


def zoom(
    image: np.ndarray,
    target: Optional[np.ndarray],
    factor: float,
    target_order: int = 0,
) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Scale image and target by ``factor`` in YX about the centre, keeping the shape.

    factor > 1 magnifies (the centre is cropped out of the magnified image), factor < 1 shrinks
    (the border is filled: 0 for labels, per-channel median otherwise). One affine resampling,
    equivalent to ``scipy.ndimage.zoom`` followed by a centre crop / pad but without rounding the
    intermediate shape. image (C, [Z,] Y, X) linear; target (Ct, [Z,] Y, X) with ``target_order``.
    """
    if factor <= 0:
        raise ValueError(f"zoom factor must be > 0, got {factor}")
    image = _as_image(image)
    _check_pair(image, target)

    def scale(x: np.ndarray, order: int) -> np.ndarray:
        # output pixel o samples input at o / f + offset; the centre c must map to itself.
        matrix = np.ones(x.ndim)
        offset = np.zeros(x.ndim)
        for ax in _yx_axes(x.ndim):
            c = (x.shape[ax] - 1) / 2.0
            matrix[ax] = 1.0 / factor
            offset[ax] = c - c / factor
        return ndimage.affine_transform(
            x, matrix, offset=offset, order=order, mode="constant", cval=0.0
        )

    out_img = _map_spatial(image, "image", 1, scale)
    out_tgt = None
    if target is not None:
        kind = "label" if target_order == 0 else "continuous"
        out_tgt = _map_spatial(target, kind, target_order, scale)
    return out_img, out_tgt


# ---------------------------------------------------------------------------------------------
# intensity augmentations (image only)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with ``sigma`` pixels in Y and X (not across channels, not along Z, whose
    spacing usually differs). image (C, [Z,] Y, X) -> same shape."""
    image = _as_image(image)
    if sigma <= 0:
        return image.copy()
    sigmas = [0.0] * (image.ndim - 2) + [float(sigma)] * 2
    return ndimage.gaussian_filter(image, sigma=sigmas, mode="reflect")


def adjust_contrast(image: np.ndarray, factor: float) -> np.ndarray:
    """Stretch (factor > 1) or flatten (factor < 1) each channel about its mean.
    image (C, [Z,] Y, X) -> same shape; the channel means are unchanged."""
    image = _as_image(image)
    mean = _channel_stat(image, np.mean)
    return ((image - mean) * np.float32(factor) + mean).astype(np.float32)


def adjust_brightness(image: np.ndarray, shift: float) -> np.ndarray:
    """Add ``shift`` times each channel's intensity range (max - min), so the same value means
    the same relative change for 8-bit, 16-bit and normalised images. image (C, [Z,] Y, X)."""
    image = _as_image(image)
    rng_ = _channel_stat(image, np.max) - _channel_stat(image, np.min)
    return (image + np.float32(shift) * rng_).astype(np.float32)


def gamma_shift(image: np.ndarray, gamma: float) -> np.ndarray:
    """Gamma correction on per-channel min-max normalised intensities; the original min and max
    are restored afterwards so only the shape of the intensity curve changes.
    image (C, [Z,] Y, X) -> same shape. gamma < 1 brightens mid-tones, > 1 darkens them."""
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    image = _as_image(image)
    lo = _channel_stat(image, np.min)
    span = _channel_stat(image, np.max) - lo
    unit = np.clip((image - lo) / np.maximum(span, _EPS), 0.0, 1.0)
    return (unit ** np.float32(gamma) * span + lo).astype(np.float32)


def poisson_noise(image: np.ndarray, lam: float, rng: np.random.Generator) -> np.ndarray:
    """Shot noise: each channel is scaled to photon counts, Poisson-sampled, and scaled back.

    A channel's range (max - min) holds ``POISSON_PEAK / lam`` photons, so larger ``lam`` means
    fewer photons and more noise (lam 1: an 8-bit camera's 255 photons). Constant channels are
    returned unchanged. image (C, [Z,] Y, X) -> same shape float32.
    """
    if lam <= 0:
        return _as_image(image).copy()
    image = _as_image(image)
    lo = _channel_stat(image, np.min)
    span = _channel_stat(image, np.max) - lo
    peak = POISSON_PEAK / float(lam)
    counts = (image - lo) / np.maximum(span, _EPS) * peak
    noisy = rng.poisson(counts.astype(np.float64)).astype(np.float32)
    return (noisy / np.float32(peak) * span + lo).astype(np.float32)


def threshold_background(x: np.ndarray, factor: float = 1.0) -> np.ndarray:
    """Set values below ``factor`` times the per-channel mean to 0 (InstantDL's background
    removal: factor 1 for images, 0.8 for groundtruth). x (C, [Z,] Y, X) -> same shape/dtype."""
    mean = _channel_stat(np.asarray(x, dtype=np.float64), np.mean) * factor
    return np.where(x < mean, np.zeros((), dtype=x.dtype), x)


def binarize(target: np.ndarray) -> np.ndarray:
    """target > 0 -> 1, else 0; same shape and dtype (NaN counts as background)."""
    target = np.asarray(target)
    return (np.nan_to_num(target) > 0).astype(target.dtype)


# ---------------------------------------------------------------------------------------------
# parameters


@dataclasses.dataclass(frozen=True)
class AugmentParams:
    """InstantDL's ``data_gen_args``, parsed. Build with ``AugmentParams.from_dict(d)``.

    Numeric fields are magnitudes (0 = off), see the module docstring for their meaning.
    ``prob`` is ours (not a data_gen_args key): the chance each random augmentation fires.
    """

    save_augmented_images: bool = False
    resample_images: Union[bool, int, tuple[int, ...]] = False
    std_normalization: bool = False
    feature_scaling: bool = False
    horizontal_flip: bool = True
    vertical_flip: bool = True
    poission_noise: float = 0.0
    rotation_range: float = 0.0
    zoom_range: float = 0.0
    contrast_range: float = 0.0
    brightness_range: float = 0.0
    gamma_shift: float = 0.0
    gaussian_blur: float = 0.0
    threshold_background_image: bool = False
    threshold_background_groundtruth: bool = False
    binarize_mask: bool = False
    prob: float = 0.5

    @classmethod
    def from_dict(
        cls, d: Optional[Mapping[str, Any]] = None, *, prob: float = 0.5
    ) -> "AugmentParams":
        """Parse a ``data_gen_args`` mapping; missing keys take ``DEFAULTS``.

        Raises ValueError listing every unknown key and every bad value at once (the config layer
        should have caught them; this keeps the module safe to call on its own).
        """
        d = dict(d or {})
        problems = []
        unknown = sorted(set(d) - set(AUGMENT_KEYS))
        if unknown:
            problems.append(f"unknown keys {unknown}; allowed: {list(AUGMENT_KEYS)}")
        merged = {**DEFAULTS, **{k: v for k, v in d.items() if k in AUGMENT_KEYS}}
        values: dict[str, Any] = {}
        for key in _BOOL_KEYS:
            v = merged[key]
            if not isinstance(v, (bool, np.bool_)) and v not in (0, 1):
                problems.append(f"{key}={v!r}: expected true/false")
            values[key] = bool(v)
        for key in ON_VALUES:
            v = merged[key]
            if v is None or v is False:
                values[key] = 0.0
            elif v is True:
                values[key] = ON_VALUES[key]
            elif isinstance(v, (int, float, np.number)) and math.isfinite(v) and v >= 0:
                values[key] = float(v)
            else:
                problems.append(f"{key}={v!r}: expected false or a number >= 0")
                values[key] = 0.0
        res = merged["resample_images"]
        if isinstance(res, (list, tuple)):
            res = tuple(int(s) for s in res)
        values["resample_images"] = res
        if not 0.0 <= prob <= 1.0:
            problems.append(f"prob={prob!r}: expected a probability in [0, 1]")
        if problems:
            raise ValueError("invalid data_gen_args:\n  " + "\n  ".join(problems))
        return cls(**values, prob=float(prob))

    def to_dict(self) -> dict[str, Any]:
        """The data_gen_args view (``AUGMENT_KEYS`` only), e.g. for writing the resolved config."""
        return {k: getattr(self, k) for k in AUGMENT_KEYS}


def sample_zoom(zoom_range: float, rng: np.random.Generator) -> float:
    """Draw a zoom factor: zoom_range >= 1 -> log-uniform in [1/z, z] (zooming in and out equally
    likely); 0 < z < 1 -> uniform in [1-z, 1+z] (Keras); 0 -> 1."""
    z = float(zoom_range)
    if z <= 0:
        return 1.0
    if z >= 1:
        return float(math.exp(rng.uniform(-math.log(z), math.log(z))))
    return float(rng.uniform(1.0 - z, 1.0 + z))


# ---------------------------------------------------------------------------------------------
# composed transforms


def clean_target(target: np.ndarray, params: AugmentParams, thresholds: Optional[Sequence[float]] = None) -> np.ndarray:
    """The deterministic clean-up of a *raw* groundtruth (``threshold_background_groundtruth``,
    ``binarize_mask``), in the groundtruth's own units, before any task scaling (z-scoring of
    regression targets, label encodings). Applied identically wherever a target is read: training
    and validation tiles (``dataset.ReadTiles``), the target statistics of the plan, and the
    groundtruth at evaluation.

    target (Ct, [Z,] Y, X) -> same shape and dtype. ``thresholds``: per-channel background levels
    of the whole image (``plan.target_thresholds``, 0.8 x its mean); without them the mean of
    ``target`` itself is used (exact only when ``target`` is the whole image).
    """
    target = np.asarray(target)
    if params.threshold_background_groundtruth:
        if thresholds is None:
            target = threshold_background(target, GROUNDTRUTH_THRESHOLD_FACTOR)
        else:
            t = np.asarray(thresholds, np.float64).reshape((-1,) + (1,) * (target.ndim - 1))
            target = np.where(target < t, np.zeros((), dtype=target.dtype), target)
    if params.binarize_mask:
        target = binarize(target)
    return target


def augment(
    image: np.ndarray,
    target: Optional[np.ndarray],
    params: AugmentParams,
    rng: np.random.Generator,
    target_kind: str = "label",
) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Apply the enabled random augmentations in a fixed order.

    image (C, [Z,] Y, X) -> float32 same shape. target (Ct, [Z,] Y, X) for ``label`` /
    ``continuous`` (same spatial shape as the image) -> same shape and dtype; for ``none``
    (classification) or None it is returned untouched. Images arrive normalised: callers
    normalise first so brightness/contrast act on the normalised scale the model sees.

    The target arrives cleaned (``clean_target``, applied by the reader on the raw target).
    Order: geometry (horizontal flip, vertical flip,
    rotation, zoom) on image and target; intensity on the image only (blur, gamma, contrast,
    brightness, Poisson noise, background threshold). Each random step fires with probability
    ``params.prob``; random numbers are drawn only for enabled steps.
    """
    image = _as_image(image)
    order = interp_order(target_kind, params)
    spatial = target is not None and target_kind != "none"
    tgt: Optional[np.ndarray] = None
    if spatial:
        tgt = np.asarray(target)
        if tgt.ndim != image.ndim:
            raise ValueError(
                f"target shape {tgt.shape} must be (Ct, [Z,] Y, X) like image {image.shape}; "
                "use target_kind='none' for per-image labels"
            )
        _check_pair(image, tgt)
    p = params.prob

    def fires() -> bool:
        return bool(rng.random() < p)

    # geometry
    if params.horizontal_flip and fires():
        image, tgt = flip(image, tgt, -1)
    if params.vertical_flip and fires():
        image, tgt = flip(image, tgt, -2)
    if params.rotation_range > 0 and fires():
        angle = rng.uniform(-params.rotation_range, params.rotation_range)
        image, tgt = rotate(image, tgt, angle, order)
    if params.zoom_range > 0 and fires():
        image, tgt = zoom(image, tgt, sample_zoom(params.zoom_range, rng), order)

    # intensity
    if params.gaussian_blur > 0 and fires():
        image = gaussian_blur(image, rng.uniform(0.0, params.gaussian_blur))
    if params.gamma_shift > 0 and fires():
        g = params.gamma_shift
        image = gamma_shift(image, rng.uniform(max(0.1, 1.0 - g), 1.0 + g))
    if params.contrast_range > 0 and fires():
        c = params.contrast_range
        image = adjust_contrast(image, rng.uniform(max(0.0, 1.0 - c), 1.0 + c))
    if params.brightness_range > 0 and fires():
        image = adjust_brightness(image, rng.uniform(-1.0, 1.0) * params.brightness_range)
    if params.poission_noise > 0 and fires():
        # 1 - U[0, 1) is in (0, 1]: never a zero strength
        image = poisson_noise(image, params.poission_noise * (1.0 - rng.random()), rng)
    if params.threshold_background_image and fires():
        image = threshold_background(image, 1.0)

    return image.astype(np.float32, copy=False), (tgt if spatial else target)


# ---------------------------------------------------------------------------------------------
# Ray batch wrappers


def _rows(column: Any) -> list:
    """Per-sample arrays of a numpy batch column: (B, ...) array or object array / list."""
    if isinstance(column, np.ndarray) and column.dtype != object:
        return [column[i] for i in range(column.shape[0])]
    return [np.asarray(x) for x in column]


def _pack(rows: list, like: Any) -> np.ndarray:
    """Back into the input's batch form: a stacked array if the input was one, else object."""
    if isinstance(like, np.ndarray) and like.dtype != object:
        return np.stack(rows, axis=0)
    out = np.empty(len(rows), dtype=object)
    for i, r in enumerate(rows):
        out[i] = r
    return out


def augment_batch(
    batch: dict[str, np.ndarray],
    params: AugmentParams,
    target_kind: str = "label",
    seed_key: str = "seed",
) -> dict[str, np.ndarray]:
    """``map_batches(batch_format="numpy")`` training transform: augment tiles that the reader
    has already normalised (``dataset.ReadTiles``, with per-image statistics from the plan).

    batch["image"]: (B, C, [Z,] Y, X) array, or an object array of B per-sample (C, ...) arrays
    when shapes differ; batch["target"]: the same for pixel tasks, (B,) class indices for
    ``target_kind="none"``, or absent; batch[seed_key]: (B,) int64. Sample i uses
    ``np.random.default_rng(int(seed[i]))``, so the output of a row does not depend on which
    other rows share its batch. Returns a new dict with the same keys; other columns pass through.
    """
    if seed_key not in batch:
        raise KeyError(
            f"batch has no {seed_key!r} column (columns: {sorted(batch)}); add per-row seeds, "
            "as dataset.training_rows gives every row"
        )
    images = batch["image"]
    seeds = np.asarray(batch[seed_key]).reshape(-1)
    img_rows = _rows(images)
    if len(img_rows) != len(seeds):
        raise ValueError(f"{len(img_rows)} images but {len(seeds)} seeds in the batch")
    has_target = "target" in batch and batch["target"] is not None
    pass_target = not has_target or target_kind == "none"
    tgt_rows = [None] * len(img_rows) if pass_target else _rows(batch["target"])

    out_imgs, out_tgts = [], []
    for img, tgt, seed in zip(img_rows, tgt_rows, seeds):
        rng = np.random.default_rng(int(seed))
        img, tgt = augment(img, tgt, params, rng, target_kind)
        out_imgs.append(img)
        out_tgts.append(tgt)

    out = dict(batch)
    out["image"] = _pack(out_imgs, images)
    if not pass_target:
        out["target"] = _pack(out_tgts, batch["target"])
    return out


# ---------------------------------------------------------------------------------------------
# previews


def _display(x: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """(C, [Z,] Y, X) -> a 2D (Y, X) or RGB (Y, X, 3) array for imshow; middle Z slice for 3D."""
    if x is None:
        return None
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 4:
        x = x[:, x.shape[1] // 2]
    if x.ndim != 3:
        return None
    if x.shape[0] == 3:
        lo = x.min(axis=(1, 2), keepdims=True)
        span = np.maximum(x.max(axis=(1, 2), keepdims=True) - lo, _EPS)
        return np.moveaxis((x - lo) / span, 0, -1)
    if x.shape[0] > 1:
        return np.argmax(x, axis=0).astype(np.float32)  # one-hot / per-class maps
    return x[0]


def save_examples(
    images: Sequence[np.ndarray],
    targets: Optional[Sequence[Optional[np.ndarray]]],
    out_dir: Union[str, Path],
    n: int = 8,
) -> list[Path]:
    """Write up to ``n`` PNGs ``augmented_000.png`` ... showing image | target side by side.

    images: sequence (or (B, ...) array) of (C, [Z,] Y, X); targets: the same, per-image class
    values (shown in the title), or None. 3D shows the middle Z slice; 3 channels show as RGB,
    other multi-channel arrays show channel 0 (images) or the argmax (targets).
    Returns the written paths.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(min(n, len(images))):
        img = np.asarray(images[i])
        if img.ndim in (3, 4) and img.shape[0] not in (1, 3):
            img = img[:1]
        tgt = None if targets is None else targets[i]
        tgt_map = _display(tgt) if tgt is not None and np.ndim(tgt) >= 3 else None
        ncols = 2 if tgt_map is not None else 1
        fig, axes = plt.subplots(1, ncols, figsize=(4 * ncols, 4), squeeze=False)
        axes[0, 0].imshow(_display(img), cmap="gray")
        title = "image"
        if tgt is not None and tgt_map is None:
            title += f" (target {np.asarray(tgt).tolist()})"
        axes[0, 0].set_title(title)
        if tgt_map is not None:
            axes[0, 1].imshow(tgt_map, cmap="viridis", interpolation="nearest")
            axes[0, 1].set_title("target")
        for ax in axes.ravel():
            ax.axis("off")
        path = out_dir / f"augmented_{i:03d}.png"
        write.write_figure(fig, path, dpi=80, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths
