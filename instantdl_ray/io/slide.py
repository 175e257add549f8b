"""Whole-slide images, read by region: never a whole-slide decode.

Vendor formats (Aperio ``.svs``, Hamamatsu ``.ndpi``/``.vms``/``.vmu``, 3DHISTECH ``.mrxs``, Leica
``.scn``, Ventana ``.bif``, Philips-less ``.svslide``) and DICOM WSI (a folder of ``.dcm`` files,
one per pyramid level, or one of its files: OpenSlide 4's libdicom reader, uncompressed, JPEG or
JPEG 2000 frames, full or sparse tiling) go through OpenSlide (``openslide-python`` with the
``openslide-bin`` wheel: no system library to install). Pyramidal TIFF and OME-TIFF
(sub-IFD pyramids, BigTIFF) are read by ``io.read.open_array`` through tifffile's zarr view,
which OpenSlide would read as one level; ``slide_info`` describes both kinds.

A slide level is exposed as a lazily sliceable ``(Y, X, 3)`` uint8 array (``SlideLevel``): the
tile readers of ``data.dataset`` slice it like any zarr array, and only the sliced region is
decoded. Transparent pixels (outside a scanned region) come back white, the glass colour of a
bright-field slide, as OpenSlide recommends for display.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

SLIDE_SUFFIXES = (".svs", ".ndpi", ".vms", ".vmu", ".mrxs", ".scn", ".bif", ".svslide")
READ_CHUNK = 512  # the chunk shape the sampling checks (and dask) see; OpenSlide reads any region


@dataclass(frozen=True)
class SlideInfo:
    """What a slide holds: ``levels`` shapes ``(Y, X)`` from full resolution down, their
    ``downsamples`` (>= 1) relative to level 0, the level-0 pixel size in µm (``{"y", "x"}``, None
    when the file states none) and the ``vendor`` (OpenSlide's name, or ``"ome-tiff"`` /
    ``"tiff"``)."""

    path: str
    vendor: str
    levels: tuple[tuple[int, int], ...]
    downsamples: tuple[float, ...]
    mpp: dict[str, float] | None

    def level_for(self, mpp: float, base: float | None = None) -> int:
        """The coarsest level whose pixels are at most ``mpp`` µm (so resampling only shrinks);
        level 0 when the slide has no pixel size or every level is coarser. ``base``: the level-0
        pixel size to use instead of the file's (a manifest's ``mpp``)."""
        base = base or (float(self.mpp["x"]) if self.mpp else None)
        if not base:
            return 0
        fits = [k for k, d in enumerate(self.downsamples) if base * d <= float(mpp) * (1 + 1e-6)]
        return fits[-1] if fits else 0


DICOM_SUFFIX = ".dcm"


def is_dicom_folder(path: str | Path) -> bool:
    """A folder holding ``.dcm`` files: one DICOM WSI (its levels, label and overview)."""
    path = Path(path)
    return path.is_dir() and path.suffix.lower() != ".zarr" and next(path.glob(f"*{DICOM_SUFFIX}"), None) is not None


def is_slide(path: str | Path) -> bool:
    """A file (or DICOM folder) that OpenSlide reads as a whole-slide image."""
    suffix = Path(path).suffix.lower()
    return suffix in SLIDE_SUFFIXES or suffix == DICOM_SUFFIX or is_dicom_folder(path)


def openslide_path(path: str | Path) -> str:
    """The file OpenSlide opens for ``path``: a DICOM folder's largest ``.dcm`` (its full
    resolution level; OpenSlide finds the other levels of the series beside it), else ``path``."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob(f"*{DICOM_SUFFIX}"), key=lambda f: (-f.stat().st_size, f.name))
        if files:
            return str(files[0])
    return str(path)


def _openslide(path: str | Path):
    import openslide

    return openslide.OpenSlide(openslide_path(path))


def _openslide_mpp(props: Any) -> dict[str, float] | None:
    try:
        x, y = float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"])
    except (KeyError, ValueError, TypeError):
        return None
    return {"y": y, "x": x} if x > 0 and y > 0 else None


def slide_info(path: str | Path) -> SlideInfo:
    """Levels, downsamples, pixel size and vendor of a slide (a vendor format, or a pyramidal /
    OME-TIFF). Reads metadata only."""
    path = Path(path)
    if is_slide(path):
        s = _openslide(path)
        try:
            return SlideInfo(str(path), str(s.properties.get("openslide.vendor", "unknown")),
                             tuple((int(h), int(w)) for w, h in s.level_dimensions),
                             tuple(float(d) for d in s.level_downsamples), _openslide_mpp(s.properties))
        finally:
            s.close()
    import tifffile

    from instantdl_ray.io.read import pixel_size

    with tifffile.TiffFile(str(path)) as tf:
        series = tf.series[0]
        levels = series.levels or [series]
        axes = series.axes
        shapes = [tuple(int(lv.shape[axes.index(a)]) for a in "YX") for lv in levels]
        vendor = "ome-tiff" if tf.is_ome else "tiff"
    size = pixel_size(path)
    mpp = {"y": size["y"], "x": size["x"]} if size else None
    return SlideInfo(str(path), vendor, tuple(shapes),
                     tuple(shapes[0][1] / s[1] for s in shapes), mpp)


def expand_index(index: Any, ndim: int) -> tuple:
    """numpy's ``index`` of an array of ``ndim`` axes as one entry per axis: ``...`` expanded, the
    missing trailing axes taken whole."""
    index = index if isinstance(index, tuple) else (index,)
    if any(i is Ellipsis for i in index):
        k = index.index(Ellipsis)
        index = index[:k] + (slice(None),) * (ndim - len(index) + 1) + index[k + 1:]
    return index + (slice(None),) * (ndim - len(index))


def axis_span(i: Any, n: int, where: str = "") -> tuple[int, int, int, bool, bool]:
    """An int or a slice on an axis of ``n``: (first index, count, step >= 1, reversed, drop the
    axis). ``where`` prefixes the ``IndexError`` of anything else (e.g. the file's path)."""
    if isinstance(i, (int, np.integer)):
        j = int(i) + n if i < 0 else int(i)
        if not 0 <= j < n:
            raise IndexError(f"{where}index {i} out of range for an axis of {n}")
        return j, 1, 1, False, True
    if isinstance(i, slice):
        r = range(*i.indices(n))
        return (min(r[0], r[-1]) if len(r) else 0), len(r), abs(r.step), r.step < 0, False
    raise IndexError(f"{where}unsupported index {i!r} (ints and slices only)")


def read_2d(index: Any, shape: Sequence[int], window: Any) -> np.ndarray:
    """numpy's ``index`` on a lazy ``(Y, X)`` array of ``shape`` whose ``window(y0, x0, h, w)``
    reads a block: the block spanning the selection is read once, then stepped, reversed and
    squeezed as numpy would."""
    index = expand_index(index, 2)
    if len(index) != 2:
        raise IndexError(f"{len(index)} indices for a (Y, X) array")
    spans = [axis_span(i, int(n)) for i, n in zip(index, shape)]
    (y0, ny, sy, _, _), (x0, nx, sx, _, _) = spans
    block = window(y0, x0, (ny - 1) * sy + 1 if ny else 0, (nx - 1) * sx + 1 if nx else 0)[::sy, ::sx]
    return block[tuple(0 if drop else slice(None, None, -1 if rev else 1) for *_, rev, drop in spans)]


class SlideLevel:
    """One pyramid level of an OpenSlide slide as a lazily sliceable ``(Y, X, 3)`` uint8 array.

    Only what is sliced is decoded (``OpenSlide.read_region``). Steps other than 1, and integer
    indices, are applied to the region read. One OpenSlide handle per object, used under a lock
    (OpenSlide handles are thread-safe, the lock keeps one handle's cache coherent for readers
    that share it).
    """

    dtype = np.dtype(np.uint8)
    ndim = 3

    def __init__(self, path: str | Path, level: int = 0):
        self.path = str(path)
        self.level = int(level)
        self._slide = _openslide(path)
        n = self._slide.level_count
        if not 0 <= self.level < n:
            raise ValueError(f"{path}: level {level} requested, the slide has levels 0..{n - 1}")
        w, h = self._slide.level_dimensions[self.level]
        self.shape = (int(h), int(w), 3)
        self.downsample = float(self._slide.level_downsamples[self.level])
        self.chunks = (min(READ_CHUNK, self.shape[0]), min(READ_CHUNK, self.shape[1]), 3)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self):  # a handle does not pickle: reopen where it is used
        return {"path": self.path, "level": self.level}

    def __setstate__(self, state):
        self.__init__(state["path"], state["level"])

    def read_region(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """Pixels ``[y, y + h) x [x, x + w)`` of this level (level coordinates) -> ``(h, w, 3)``
        uint8; parts outside the slide are white."""
        h, w = max(int(h), 0), max(int(w), 0)
        if h == 0 or w == 0:
            return np.zeros((h, w, 3), np.uint8)
        origin = (int(round(x * self.downsample)), int(round(y * self.downsample)))  # level-0 (x, y)
        with self._lock:
            rgba = np.asarray(self._slide.read_region(origin, self.level, (w, h)))
        alpha = rgba[..., 3:4].astype(np.float32) / 255.0
        rgb = rgba[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
        return np.rint(rgb).astype(np.uint8)

    def __getitem__(self, index: Any) -> np.ndarray:
        index = expand_index(index, 3)
        if len(index) != 3:
            raise IndexError(f"{self.path}: {len(index)} indices for a (Y, X, 3) slide level")
        # per spatial axis: (first index, count, step >= 1, reversed, drop the axis)
        axes = [axis_span(i, n, f"{self.path}: ") for i, n in zip(index[:2], self.shape[:2])]
        (y0, ny, sy, _, _), (x0, nx, sx, _, _) = axes
        pick = tuple(0 if drop else slice(None, None, -1 if rev else 1) for *_, rev, drop in axes)
        return self._read_strided(y0, ny, sy, x0, nx, sx)[pick + (index[2],)]

    def _read_strided(self, y0: int, ny: int, sy: int, x0: int, nx: int, sx: int) -> np.ndarray:
        """Pixels ``y0 + sy * k`` (k < ny) by ``x0 + sx * k`` (k < nx) -> ``(ny, nx, 3)``. With
        steps > 1 (a subsampled view) the region is read ``READ_CHUNK`` pixels at a time and
        subsampled chunk by chunk, so a view of a whole slide never holds the slide in memory."""
        if sy == 1 and sx == 1:
            return self.read_region(y0, x0, ny, nx)
        out = np.empty((ny, nx, 3), np.uint8)
        by, bx = max(1, READ_CHUNK // sy), max(1, READ_CHUNK // sx)  # output rows / columns per chunk
        for oy in range(0, ny, by):
            ky = min(by, ny - oy)
            for ox in range(0, nx, bx):
                kx = min(bx, nx - ox)
                chunk = self.read_region(y0 + oy * sy, x0 + ox * sx, (ky - 1) * sy + 1, (kx - 1) * sx + 1)
                out[oy:oy + ky, ox:ox + kx] = chunk[::sy, ::sx]
        return out

    def close(self) -> None:
        self._slide.close()


# ---------------------------------------------------------------- pyramids and resolution


def level_count(path: str | Path) -> int:
    """Number of pyramid levels of an image file: vendor slides and pyramidal / OME-TIFF (sub-IFD
    levels) and OME-Zarr multiscales; 1 for anything else (or a file that cannot be opened)."""
    path = Path(path)
    try:
        if is_slide(path):
            return len(slide_info(path).levels)
        suffix = path.suffix.lower()
        if suffix in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(str(path)) as tf:
                return len(tf.series[0].levels or [tf.series[0]])
        if suffix == ".zarr":
            import zarr

            node = zarr.open(str(path), mode="r")
            if isinstance(node, zarr.Array):
                return 1
            ms = node.attrs.get("multiscales") or node.attrs.get("ome", {}).get("multiscales")
            return len(ms[0]["datasets"]) if ms else 1
    except Exception:
        return 1
    return 1


def is_pyramid(path: str | Path) -> bool:
    """A whole-slide input: a vendor slide, or a TIFF that holds a resolution pyramid (an
    OME-Zarr multiscale is read at its full resolution, as stored)."""
    return is_slide(path) or (Path(path).suffix.lower() in (".tif", ".tiff") and level_count(path) > 1)


MAX_MPP = 50.0  # µm; a larger "pixel size" is a print resolution (72 dpi = 353 µm), not a microscope's


def microscope_mpp(size: dict | None) -> float | None:
    """The in-plane pixel size in µm (x) of a ``read.pixel_size`` result, or None when there is
    none or it is a print resolution (above ``MAX_MPP``) that image editors write by default."""
    if not size or not size.get("x"):
        return None
    x = float(size["x"])
    return x if 0 < x <= MAX_MPP else None


SCALE_TOLERANCE = 0.02  # a level within 2 % of the wanted pixel size is read as it is


@dataclass(frozen=True)
class View:
    """How an input is read for a model: pyramid ``level``, then resampled by ``scale`` (output
    pixels per level pixel; 1 = as stored), giving pixels of ``mpp`` µm (None when unknown)."""

    level: int = 0
    scale: float = 1.0
    mpp: float | None = None

    def to_dict(self) -> dict:
        return {"level": self.level, "scale": self.scale, "mpp": self.mpp}


def choose_view(info: SlideInfo | None, input_mpp: float | None, model_mpp: float | None) -> View:
    """The level and resampling that give the model's pixel size ``model_mpp`` from an input whose
    level 0 has ``input_mpp`` µm pixels (``info``: its pyramid; None for a one-level image).

    The coarsest level that is still at least as fine as the model's pixels is read (so resampling
    only shrinks) and resampled when it differs by more than ``SCALE_TOLERANCE``. Without either
    pixel size the input is read as stored, at level 0."""
    if not input_mpp or not model_mpp:
        return View(0, 1.0, input_mpp or None)
    level, down = 0, 1.0
    if info is not None:
        level = info.level_for(model_mpp, base=input_mpp)
        down = float(info.downsamples[level])
    level_mpp = float(input_mpp) * down
    scale = level_mpp / float(model_mpp)
    if abs(scale - 1.0) <= SCALE_TOLERANCE:
        return View(level, 1.0, level_mpp)
    return View(level, scale, float(model_mpp))


class Resampled:
    """A lazily sliceable view of an array at ``scale`` times its resolution (``scale`` < 1
    shrinks). ``axes`` names the array's axes; only ``Y`` and ``X`` are resampled.

    Every output pixel is computed from the source alone (its centre maps to source coordinate
    ``(i + 0.5) / scale - 0.5``; linear interpolation after a Gaussian anti-aliasing blur of
    sigma ``(1 / scale - 1) / 2``, skimage's rule), with a margin read around each region, so
    overlapping tiles get identical values where they overlap: no seams from resampling.
    """

    def __init__(self, arr: Any, scale: float, axes: str):
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.arr, self.scale, self.axes = arr, float(scale), axes
        self.spatial = [k for k, a in enumerate(axes) if a in "YX"]
        shape = [int(s) for s in arr.shape]
        for k in self.spatial:
            shape[k] = max(1, int(round(shape[k] * self.scale)))
        self.shape = tuple(shape)
        self.ndim = len(shape)
        self.dtype = np.dtype(np.float32)
        self.sigma = max(0.0, (1.0 / self.scale - 1.0) / 2.0)

    def __len__(self) -> int:
        return self.shape[0]

    def _source_coords(self, start: int, stop: int, n_src: int) -> tuple[int, int, np.ndarray]:
        c = (np.arange(start, stop, dtype=np.float64) + 0.5) / self.scale - 0.5
        margin = int(np.ceil(4.0 * self.sigma)) + 2
        lo = max(0, int(np.floor(c.min())) - margin) if len(c) else 0
        hi = min(n_src, int(np.ceil(c.max())) + 2 + margin) if len(c) else 0
        return lo, hi, np.clip(c, 0, n_src - 1) - lo

    def __getitem__(self, index: Any) -> np.ndarray:
        index = expand_index(index, self.ndim)
        src_index: list[Any] = list(index)
        coords, after = {}, [slice(None)] * self.ndim
        for k in self.spatial:
            i = index[k]
            if isinstance(i, (int, np.integer)):
                n = self.shape[k]
                if not -n <= int(i) < n:
                    raise IndexError(f"index {i} out of range for an axis of {n}")
                j = int(i) % n
                i = slice(j, j + 1)
                after[k] = 0
            if not isinstance(i, slice):
                raise IndexError(f"unsupported index {index[k]!r} on a resampled axis (ints and slices only)")
            r = range(*i.indices(self.shape[k]))
            a, b = (min(r[0], r[-1]), max(r[0], r[-1]) + 1) if len(r) else (0, 0)
            if len(r) and r.step != 1:  # read the span, then step through it
                end = r[-1] - a + (1 if r.step > 0 else -1)
                after[k] = slice(r[0] - a, None if end < 0 else end, r.step)
            lo, hi, c = self._source_coords(a, b, int(self.arr.shape[k]))
            src_index[k] = slice(lo, hi)
            coords[k] = c
        # non-spatial axes: indexed in the source (the spatial axes keep their positions)
        keep = [k for k in range(self.ndim) if k in self.spatial or not isinstance(index[k], (int, np.integer))]
        region = np.asarray(self.arr[tuple(src_index)], dtype=np.float32)
        pos = {k: j for j, k in enumerate(keep)}
        if self.sigma > 0:
            from scipy.ndimage import gaussian_filter

            sig = [self.sigma if k in self.spatial else 0.0 for k in keep]
            region = gaussian_filter(region, sig, mode="nearest", truncate=4.0)
        for k, c in coords.items():
            ax = pos[k]
            if region.shape[ax] == 0:
                continue
            i0 = np.floor(c).astype(np.int64)
            f = (c - i0).astype(np.float32)
            i1 = np.minimum(i0 + 1, region.shape[ax] - 1)
            shape = [1] * region.ndim
            shape[ax] = -1
            f = f.reshape(shape)
            region = np.take(region, i0, axis=ax) * (1 - f) + np.take(region, i1, axis=ax) * f
        return region[tuple(after[k] for k in keep)]


def open_view(path: str | Path, view: View | dict | None, axes: str) -> Any:
    """The array the model reads for ``path``: its pyramid level ``view.level``, resampled by
    ``view.scale`` when that is not 1 (``axes``: the plan's image axes, for which axes are Y, X)."""
    from instantdl_ray.io.read import image_axes, open_array

    view = View(**view) if isinstance(view, dict) else (view or View())
    arr = open_array(path, view.level)
    if view.scale == 1.0:
        return arr
    return Resampled(arr, view.scale, image_axes(arr.shape, axes))


def label_downsample(image_yx: Sequence[int], label_yx: Sequence[int]) -> int | None:
    """The integer factor ``d`` >= 2 by which a label image of ``label_yx`` pixels is a downsample
    of a slide of ``image_yx`` (each axis ``ceil`` or ``floor`` of slide / d, as pyramid levels
    round), or None when there is none."""
    if len(image_yx) != 2 or len(label_yx) != 2 or min(label_yx) < 1:
        return None
    d = int(round(image_yx[1] / label_yx[1]))
    if d < 2 or any(not (n // d <= m <= -(-n // d)) for n, m in zip(image_yx, label_yx)):
        return None
    return d


class Upsampled:
    """A label image stored at ``1/factor`` of a slide, read on the slide's level-0 grid of
    ``shape`` (``(Y, X)``) by nearest neighbour: label pixel ``j`` covers slide pixels
    ``[j * factor, (j + 1) * factor)``. Lazy: a window reads only the label pixels under it."""

    def __init__(self, arr: Any, factor: int, shape: Sequence[int]):
        self.arr, self.factor = arr, int(factor)
        self.shape = (int(shape[0]), int(shape[1]))
        self.ndim, self.dtype = 2, np.dtype(arr.dtype)

    def __getitem__(self, index: Any) -> np.ndarray:
        return read_2d(index, self.shape, self.window)

    def window(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """Slide pixels ``[y0, y0 + h) x [x0, x0 + w)``: the label pixels under them, repeated."""
        if h <= 0 or w <= 0:
            return np.zeros((max(h, 0), max(w, 0)), self.dtype)
        src_r, src_c = np.arange(y0, y0 + h) // self.factor, np.arange(x0, x0 + w) // self.factor
        r0, c0, r1, c1 = int(src_r[0]), int(src_c[0]), int(src_r[-1]) + 1, int(src_c[-1]) + 1
        block = np.asarray(self.arr[r0:r1, c0:c1])
        block = block.reshape(block.shape[:2]) if block.ndim > 2 and block.size == block.shape[0] * block.shape[1] else block
        block = np.pad(block, ((0, max(0, r1 - r0 - block.shape[0])), (0, max(0, c1 - c0 - block.shape[1]))), mode="edge")
        return block[np.ix_(src_r - r0, src_c - c0)]

    def __array__(self, dtype=None, copy=None):
        out = self[:, :]
        return out if dtype is None else out.astype(dtype)
