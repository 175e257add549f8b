"""Whole-slide images, read by region: never a whole-slide decode.

Vendor formats (Aperio ``.svs``, Hamamatsu ``.ndpi``/``.vms``/``.vmu``, 3DHISTECH ``.mrxs``, Leica
``.scn``, Ventana ``.bif``, Philips-less ``.svslide``) go through OpenSlide (``openslide-python``
with the ``openslide-bin`` wheel: no system library to install). Pyramidal TIFF and OME-TIFF
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
from typing import Any

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

    def level_for(self, mpp: float) -> int:
        """The coarsest level whose pixels are at most ``mpp`` µm (so resampling only shrinks);
        level 0 when the slide has no pixel size or every level is coarser."""
        if not self.mpp:
            return 0
        base = float(self.mpp["x"])
        fits = [k for k, d in enumerate(self.downsamples) if base * d <= float(mpp) * (1 + 1e-6)]
        return fits[-1] if fits else 0


def is_slide(path: str | Path) -> bool:
    return Path(path).suffix.lower() in SLIDE_SUFFIXES


def _openslide(path: str | Path):
    import openslide

    return openslide.OpenSlide(str(path))


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
        index = index if isinstance(index, tuple) else (index,)
        if any(i is Ellipsis for i in index):
            k = index.index(Ellipsis)
            index = index[:k] + (slice(None),) * (3 - len(index) + 1) + index[k + 1:]
        index = index + (slice(None),) * (3 - len(index))
        if len(index) != 3:
            raise IndexError(f"{self.path}: {len(index)} indices for a (Y, X, 3) slide level")
        axes = []  # per spatial axis: (first index, count, step >= 1, reversed, drop the axis)
        for i, n in zip(index[:2], self.shape[:2]):
            if isinstance(i, (int, np.integer)):
                j = int(i) + n if i < 0 else int(i)
                if not 0 <= j < n:
                    raise IndexError(f"{self.path}: index {i} out of range for an axis of {n}")
                axes.append((j, 1, 1, False, True))
            elif isinstance(i, slice):
                r = range(*i.indices(n))
                first = min(r[0], r[-1]) if len(r) else 0
                axes.append((first, len(r), abs(r.step), r.step < 0, False))
            else:
                raise IndexError(f"{self.path}: unsupported index {i!r} (ints and slices only)")
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
