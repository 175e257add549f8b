"""Where the tissue is on a whole-slide image: predict (and normalise) there, not on the glass.

A slide is mostly empty glass. ``detect_tissue`` finds the tissue on a low-resolution level (a
thumbnail of ``THUMB_SIDE`` px on its long side, read from the pyramid), as TIAToolbox's and
CLAM's maskers do: an Otsu threshold on a smoothed "tissue score" (colour: HSV saturation, as
stain is coloured and glass is grey; one channel: the distance from the background's intensity,
whichever side of it the tissue lies), never below ``NOISE_SIGMAS`` times the background's noise
(so a slide of glass has no tissue, rather than half its noise), then a morphological clean-up
(closing, small specks removed, small holes filled) with scikit-image.

``TissueMask`` maps the mask onto the grid the model reads (any pyramid level, resampled): which
prediction tiles touch tissue, the mask for any block of the output (background pixels get the
background value), and tissue-only pixels for the normalisation statistics. The mask and a
thumbnail with its outline are saved per slide (``tissue/<slide>.png``, ``<slide>_thumbnail.png``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

THUMB_SIDE = 2048  # long side of the thumbnail the mask is computed on (px)
NOISE_SIGMAS = 5.0  # the threshold stays this many background standard deviations above the background
MIN_SATURATION = 0.04  # colour slides: below this saturation nothing is stain (JPEG noise on glass)
MIN_OBJECT_PX = 9  # thumbnail px: smaller specks are noise (a nucleus is kept at full resolution)
MARGIN = 32  # px of the model's grid the detected mask is grown by


def thumbnail(path: str | Path, side: int = THUMB_SIDE) -> np.ndarray:
    """A ``(y, x[, C])`` thumbnail of a slide or pyramid whose long side is about ``side`` px, read
    from the coarsest level that is still at least that large (strided when it is larger); only
    that level is opened."""
    from instantdl_ray.io import read
    from instantdl_ray.io.slide import slide_info

    levels = slide_info(path).levels  # (Y, X) per level, from the metadata
    pick = max((k for k, (h, w) in enumerate(levels) if max(h, w) >= side), default=0)
    arr = read.open_array(path, pick)
    step = max(1, int(max(levels[pick]) // side))
    ax = _yx_axes(arr.shape)
    index = tuple(slice(None, None, step) if k in ax else slice(None) for k in range(len(arr.shape)))
    out = np.asarray(arr[index])
    if out.ndim == 3 and ax == (1, 2):  # (C, Y, X) -> (Y, X, C)
        out = np.moveaxis(out, 0, -1)
    return out


def _yx_axes(shape: Sequence[int]) -> tuple[int, int]:
    """Positions of Y and X in a level's shape: the two longest axes (channels and samples are few)."""
    if len(shape) == 2:
        return (0, 1)
    order = sorted(range(len(shape)), key=lambda k: -int(shape[k]))[:2]
    return tuple(sorted(order))  # type: ignore[return-value]


def yx_shape(shape: Sequence[int]) -> tuple[int, int]:
    """(Y, X) of an image or level shape (its two longest axes)."""
    a, b = _yx_axes(shape)
    return int(shape[a]), int(shape[b])


GREY_SPREAD = 3 / 255  # channels this close (99th percentile of max - min): a grey image stored as RGB


def _unit_rgb(thumb: np.ndarray) -> np.ndarray:
    """The first three channels of a thumbnail in [0, 1] (8-bit, or any range above 1, over 255)."""
    rgb = thumb[..., :3].astype(np.float64)
    return rgb / (255.0 if thumb.dtype == np.uint8 or rgb.max() > 1 else 1.0)


def is_colour(thumb: np.ndarray) -> bool:
    """Whether a thumbnail ``(y, x[, C])`` holds colour: 3+ channels that differ (a grey scan
    saved as RGB, as fluorescence slides often are, has three equal channels and no saturation)."""
    if not (thumb.ndim == 3 and thumb.shape[-1] >= 3):
        return False
    rgb = _unit_rgb(thumb)
    return float(np.percentile(rgb.max(-1) - rgb.min(-1), 99)) > GREY_SPREAD


def tissue_score(thumb: np.ndarray, colour: bool | None = None) -> np.ndarray:
    """Per-pixel "how much like tissue", background near 0: saturation for colour (3+ channels
    that differ; ``colour``: ``is_colour`` when the caller knows it), else the distance from the
    background's intensity towards the side the tissue lies on (the background is the histogram's
    peak: dark on fluorescence, bright on bright-field)."""
    if is_colour(thumb) if colour is None else colour:
        from skimage.color import rgb2hsv

        return rgb2hsv(np.clip(_unit_rgb(thumb), 0, 1))[..., 1]
    grey = (thumb if thumb.ndim == 2 else thumb[..., :3].mean(-1)).astype(np.float64)
    hist, edges = np.histogram(grey, bins=256)
    mode = 0.5 * (edges[hist.argmax()] + edges[hist.argmax() + 1])
    return grey - mode if grey.mean() >= mode else mode - grey


def _grow(mask: np.ndarray, radius: int) -> np.ndarray:
    """``mask`` dilated by a disc of ``radius`` px (a distance transform: linear in the size)."""
    from scipy.ndimage import distance_transform_edt

    return distance_transform_edt(~mask) <= radius if mask.any() else mask


def detect_tissue(thumb: np.ndarray, min_object_px: int = MIN_OBJECT_PX) -> np.ndarray:
    """Boolean tissue mask of a thumbnail ``(y, x[, C])``; see the module docstring.
    ``min_object_px``: specks smaller than this (thumbnail px) are dropped, holes as large filled."""
    from scipy.ndimage import gaussian_filter
    from skimage.filters import threshold_otsu
    from skimage.morphology import closing, disk, remove_small_holes, remove_small_objects

    colour = is_colour(thumb)
    score = gaussian_filter(tissue_score(thumb, colour), 1.0)
    if not np.ptp(score) > 0:
        return np.zeros(score.shape, bool)
    t = float(threshold_otsu(score))
    # the background's noise from the side of its peak that holds no tissue (tissue scores higher)
    hist, edges = np.histogram(score, bins=512)
    mode = 0.5 * (edges[hist.argmax()] + edges[hist.argmax() + 1])
    # (the peak's lower side, and everything below Otsu's threshold: saturation noise is skewed)
    spreads = [1.4826 * float(np.median(np.abs(v - mode))) for v in (score[score <= mode], score[score <= t]) if v.size]
    if spreads:
        t = max(t, mode + NOISE_SIGMAS * max(spreads))
    if colour:
        t = max(t, MIN_SATURATION)
    mask = closing(score > t, disk(2))
    mask = remove_small_objects(mask, max_size=max(1, int(min_object_px)))
    return remove_small_holes(mask, max_size=max(1, int(min_object_px)))


@dataclass
class TissueMask:
    """A slide's tissue mask ``(y, x)`` over an image of ``shape`` (the grid the model reads)."""

    mask: np.ndarray
    shape: tuple[int, int]

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    def _rows_cols(self, ys: slice, xs: slice) -> tuple[np.ndarray, np.ndarray]:
        my, mx = self.mask.shape
        rows = ((np.arange(ys.start, ys.stop) + 0.5) * my / self.shape[0]).astype(np.int64)
        cols = ((np.arange(xs.start, xs.stop) + 0.5) * mx / self.shape[1]).astype(np.int64)
        return np.clip(rows, 0, my - 1), np.clip(cols, 0, mx - 1)

    def region(self, block: Sequence[slice]) -> np.ndarray:
        """The mask (nearest neighbour) over spatial ``block`` ``(ys, xs)`` of the model's grid."""
        rows, cols = self._rows_cols(*block[-2:])
        return self.mask[np.ix_(rows, cols)]

    def touches(self, block: Sequence[slice]) -> bool:
        """Whether any tissue lies in ``block``: the mask cells it overlaps, each counted whole."""
        ys, xs = block[-2:]
        my, mx = self.mask.shape
        r0, r1 = int(ys.start * my // self.shape[0]), int(-(-ys.stop * my // self.shape[0]))
        c0, c1 = int(xs.start * mx // self.shape[1]), int(-(-xs.stop * mx // self.shape[1]))
        return bool(self.mask[r0:max(r1, r0 + 1), c0:max(c1, c0 + 1)].any())

    def coverage(self, cell: Sequence[int]) -> np.ndarray:
        """A coarse map of the grid ``shape`` in cells of ``cell`` px: 1 where a cell touches tissue
        (each mask pixel it overlaps counted whole, as ``touches``), for sampling training tiles."""
        my, mx = self.mask.shape
        bounds = []
        for n, c, m in ((self.shape[0], int(cell[0]), my), (self.shape[1], int(cell[1]), mx)):
            k = np.arange(-(-n // c))
            lo = (k * c * m) // n
            hi = np.maximum(-(-np.minimum((k + 1) * c, n) * m // n), lo + 1)
            bounds.append((lo, np.minimum(hi, m)))
        (r0, r1), (c0, c1) = bounds
        s = np.pad(self.mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        total = s[np.ix_(r1, c1)] - s[np.ix_(r0, c1)] - s[np.ix_(r1, c0)] + s[np.ix_(r0, c0)]
        return (total > 0).astype(np.float32)

    def tiles(self, tiles: Sequence[Any]) -> list[int]:
        """Indices of the prediction tiles (``tile.Tile``) whose read window touches tissue."""
        return [k for k, t in enumerate(tiles) if self.touches(t.read)]

    def sample(self, arr: Any, axes: str, n: int = 16, size: int = 256, seed: int = 0) -> np.ndarray:
        """Up to ``n`` windows of ``size``² from the tissue of ``arr`` (same grid as the mask's
        ``shape``, axes ``axes``) -> ``(C, pixels)``: the tissue's pixels, for statistics."""
        from instantdl_ray.io import read

        ys, xs = np.nonzero(self.mask)
        rng = np.random.default_rng(seed)
        picks = rng.choice(len(ys), size=min(n, len(ys)), replace=False) if len(ys) else []
        parts = []
        spatial = [k for k, a in enumerate(axes) if a in "YX"]
        for p in picks:
            cy = int((ys[p] + 0.5) * self.shape[0] / self.mask.shape[0])
            cx = int((xs[p] + 0.5) * self.shape[1] / self.mask.shape[1])
            y0, x0 = max(0, cy - size // 2), max(0, cx - size // 2)
            block = (slice(y0, min(self.shape[0], y0 + size)), slice(x0, min(self.shape[1], x0 + size)))
            idx: list[Any] = [slice(None)] * len(axes)
            idx[spatial[0]], idx[spatial[1]] = block
            chw = read.to_channel_first(np.asarray(arr[tuple(idx)]), axes)
            keep = self.region(block)
            parts.append(chw[:, keep])
        if not parts:
            return np.zeros((0, 0))
        return np.concatenate(parts, axis=1)


def load_mask(path: Path, shape: tuple[int, int]) -> TissueMask:
    """A user's mask image (any size; nonzero = tissue) over an image of ``shape``."""
    from instantdl_ray.io import read

    m = np.asarray(read.read_raw(path))
    if m.ndim == 3:
        m = m.max(axis=-1) if m.shape[-1] <= 4 else m.max(axis=0)
    return TissueMask(m > 0, shape)


def mask_for(path: str | Path, shape: tuple[int, int], setting: str, tile_shape: Sequence[int],
             out_dir: Path | None = None, stem: str | None = None) -> TissueMask | None:
    """The tissue mask of the slide at ``path`` read on a grid of ``shape`` for the ``tissue_mask``
    setting (``auto`` / ``none`` / a folder of masks named like the slides), saved under
    ``out_dir`` (``<stem>.png`` and ``<stem>_thumbnail.png``). None: no masking."""
    if setting == "none":
        return None
    from instantdl_ray.io.read import _stem

    stem = stem or _stem(Path(path))
    thumb = None
    if setting == "auto":
        thumb = thumbnail(path)
        ty, _ = yx_shape(thumb.shape)
        mask = detect_tissue(thumb)
        # grown by MARGIN px of the model's grid (at least one thumbnail pixel): the mask of a
        # thumbnail is coarse, and an object at the edge of the tissue must not be cut
        mask = _grow(mask, max(1, int(np.ceil(MARGIN * ty / shape[0]))))
        mask = TissueMask(mask, shape)
    else:
        folder = Path(setting)
        found = sorted(p for p in folder.glob(f"{stem}.*") if p.is_file())
        if not found:
            from instantdl_ray.errors import DataError

            raise DataError([f"tissue_mask: {folder} holds no mask named '{stem}.*' for {path} "
                             "(a PNG/TIFF whose nonzero pixels are tissue, any size, named like the slide)"])
        mask = load_mask(found[0], shape)
    if out_dir is not None:  # a folder's mask: the thumbnail is read only to show it
        save_mask(mask, thumbnail(path) if thumb is None else thumb, out_dir, stem)
    return mask


def save_mask(mask: TissueMask, thumb: np.ndarray, out_dir: Path, stem: str) -> None:
    """``<stem>.png`` (0/255 mask) and ``<stem>_thumbnail.png`` (the thumbnail, mask outline in green)."""
    from skimage.segmentation import find_boundaries
    from skimage.transform import resize

    from instantdl_ray.io import write

    write.write_png(out_dir / f"{stem}.png", mask.mask.astype(np.uint8) * 255)
    rgb = thumb[..., :3] if thumb.ndim == 3 and thumb.shape[-1] >= 3 else np.repeat(
        (thumb if thumb.ndim == 2 else thumb.mean(-1))[..., None], 3, axis=-1)
    rgb = rgb.astype(np.float64)
    lo, hi = np.percentile(rgb, (0.5, 99.5))
    rgb = (np.clip((rgb - lo) / max(hi - lo, 1e-9), 0, 1) * 255).astype(np.uint8)
    m = mask.mask if mask.mask.shape == rgb.shape[:2] else resize(mask.mask, rgb.shape[:2], order=0) > 0
    edge = find_boundaries(m, mode="inner")
    rgb[edge] = (0, 220, 0)
    write.write_png(out_dir / f"{stem}_thumbnail.png", rgb)
