"""Every output file of the package is written here, and every one through ``atomic_path``: a
temporary file next to the target, renamed into place when complete, so a crash or a preempted job
never leaves a half-written file that looks finished.

TIFF (``write_tiff``: ImageJ flavour with pixel size and a binary LUT; ``write_tiff_tiles``: tiled
BigTIFF streamed from a zarr; ``write_stack``: predictions as one stack), zarr (``output_zarr``,
the chunked arrays that large predictions are finalised into), JSON (``write_json``, NaN as null),
text (``write_text``) and CSV (``write_csv``, ``write_dataframe``).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

STACK_TILE_FROM = 4096 * 4096  # planes above this many pixels go into a stack as tiles
STACK_TILE = 1024


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ""):
    """Yield a temporary path next to ``path``; on success it becomes ``path`` (rename, with the
    usual permissions), on an exception it is removed. A crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=suffix or path.suffix, dir=path.parent, prefix=".tmp-")
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ImageJ's own TIFF flavour holds its unit, spacing and LUTs; it takes these pixel types only
IMAGEJ_DTYPES = (np.uint8, np.uint16, np.float32)


def binary_lut() -> np.ndarray:
    """An ImageJ LUT (3 x 256, uint8) that shows 0 black and every other value white, so a 0/1
    mask is visible in Fiji without changing its values."""
    lut = np.full((3, 256), 255, np.uint8)
    lut[:, 0] = 0
    return lut


def tiff_metadata(dtype, ndim: int, size: dict[str, float] | None, binary: bool = False,
                  imagej: bool = True) -> dict[str, Any]:
    """``tifffile.imwrite`` keywords that carry ``size`` (µm, from ``pixel_size``) and, for a
    binary mask, a black/white LUT: ImageJ's format (unit µm, Z spacing) where its pixel types
    allow, else the standard resolution tags in pixels per centimetre."""
    kw: dict[str, Any] = {}
    if imagej and np.dtype(dtype).type in IMAGEJ_DTYPES and ndim in (2, 3):
        meta: dict[str, Any] = {"axes": "YX" if ndim == 2 else "ZYX"}
        if size:
            kw["resolution"] = (1.0 / size["x"], 1.0 / size["y"])
            meta["unit"] = "um"
            if ndim == 3 and size.get("z"):
                meta["spacing"] = size["z"]
        if binary:
            meta["LUTs"] = [binary_lut()]
        kw.update(imagej=True, metadata=meta)
    elif size:
        kw.update(resolution=(1e4 / size["x"], 1e4 / size["y"]), resolutionunit="CENTIMETER")
    return kw


def write_tiff(path: str | Path, array: np.ndarray, pixel_size: dict[str, float] | None = None,
               binary: bool = False, **kwargs: Any) -> Path:
    """Write atomically (temp file + rename), so a crash never leaves a half-written TIFF; with
    the pixel size (µm) and, for a 0/1 mask (``binary``), a LUT that Fiji shows (``tiff_metadata``)."""
    import tifffile

    path = Path(path)
    array = np.asarray(array)
    meta = tiff_metadata(array.dtype, array.ndim, pixel_size, binary) if (pixel_size or binary) else {}
    with atomic_path(path, ".tif") as tmp:
        tifffile.imwrite(tmp, array, **{**meta, **kwargs})
    return path


# ---------------------------------------------------------------- large outputs

TIFF_TILE = 512  # tiles of the BigTIFFs written for large images (= stitch.STREAM_BLOCK in-plane)

def output_zarr(path: Path, lead: tuple[int, ...], spatial: tuple[int, ...], dtype):
    """A chunked zarr for a prediction ``(*lead, *spatial)``: one TIFF tile per chunk (z = 1)."""
    import zarr

    chunks = (1,) * len(lead) + (1,) * (len(spatial) - 2) + tuple(min(TIFF_TILE, n) for n in spatial[-2:])
    if path.exists():
        import shutil

        shutil.rmtree(path)
    return zarr.create_array(store=str(path), shape=lead + spatial, chunks=chunks, dtype=dtype,
                             fill_value=0, overwrite=True)


def write_tiff_tiles(path: Path, arr, pixel_size: dict[str, float] | None = None) -> Path:
    """Write a lazily sliceable array ``(..., Y, X)`` (zarr) as a tiled BigTIFF from an iterator
    of ``TIFF_TILE``² tiles (one plane at a time, rows of tiles in order), atomically like
    ``write_tiff``: the file never holds more than one tile in RAM on the way. The pixel size
    (µm) goes into the standard resolution tags (ImageJ's own format has no tiles)."""
    import tifffile

    shape = tuple(arr.shape)
    ny, nx = shape[-2:]

    def tiles():
        for lead in np.ndindex(*shape[:-2]):
            for y in range(0, ny, TIFF_TILE):
                for x in range(0, nx, TIFF_TILE):
                    yield np.asarray(arr[lead + (slice(y, y + TIFF_TILE), slice(x, x + TIFF_TILE))])

    with atomic_path(path, ".tif") as tmp:
        tifffile.imwrite(tmp, tiles(), shape=shape, dtype=arr.dtype, tile=(TIFF_TILE, TIFF_TILE), bigtiff=True,
                         **tiff_metadata(arr.dtype, len(shape), pixel_size, imagej=False))
    return path


# ---------------------------------------------------------------- tables and stacks


def jsonable(x: Any) -> Any:
    # strict JSON has no NaN: undefined metrics become null
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    with atomic_path(path, ".json") as tmp:
        tmp.write_text(json.dumps(jsonable(obj), indent=indent, default=str))
    return Path(path)


def write_stack(path: str | Path, arrays_in: Sequence[Any]) -> Path:
    """Arrays (lazily sliceable: zarr, TIFF memory maps, numpy) as one ``(N, [C|Z,] Y, X)`` TIFF,
    singleton axes dropped, zero-padded to a common shape (Fiji / napari).

    Written plane by plane; planes over ``STACK_TILE_FROM`` pixels are written as 1024^2 tiles from
    1024-row bands, so a whole-slide prediction never sits in memory at once (tiled TIFFs open in
    napari and in Fiji through Bio-Formats).
    """
    import tifffile

    path = Path(path)
    arrays = []
    for a in arrays_in:
        keep = [i for i, s in enumerate(a.shape) if s != 1] or [a.ndim - 1]
        arrays.append((a, keep, tuple(a.shape[i] for i in keep)))
    nd = max(2, max(len(s) for _, _, s in arrays))
    shapes = [(1,) * (nd - len(s)) + s for _, _, s in arrays]
    common = tuple(max(s[i] for s in shapes) for i in range(nd))
    dtype = np.result_type(*[a.dtype for a, _, _ in arrays])
    ny, nx = common[-2:]
    tiled = ny * nx > STACK_TILE_FROM
    tile = STACK_TILE

    def rows(a: Any, keep: list[int], s: tuple, full: tuple, lead: tuple, y0: int, y1: int) -> np.ndarray | None:
        """Rows ``y0:y1`` of one plane of a file, or None where the plane is padding."""
        if not all(i < n for i, n in zip(lead, full[:-2])) or y0 >= full[-2]:
            return None
        idx: list[Any] = [0] * a.ndim
        # map the padded leading index back onto the file's own (squeezed) axes
        own = lead[len(lead) - (len(s) - 2):] if len(s) > 2 else ()
        for ax, i in zip(keep[:-2], own):
            idx[ax] = i
        if len(keep) >= 2:
            idx[keep[-2]] = slice(y0, min(y1, full[-2]))
        idx[keep[-1]] = slice(None)
        return np.asarray(a[tuple(idx)]).reshape(-1, full[-1])

    def chunks():
        for (a, keep, s), full in zip(arrays, shapes):
            for lead in np.ndindex(*common[:-2]):
                for y0 in range(0, ny, tile if tiled else ny):
                    y1 = min(y0 + (tile if tiled else ny), ny)
                    band = np.zeros((y1 - y0, nx), dtype=dtype)
                    got = rows(a, keep, s, full, lead, y0, y1)
                    if got is not None:
                        band[: got.shape[0], : got.shape[1]] = got
                    if not tiled:
                        yield band
                        continue
                    for x0 in range(0, nx, tile):
                        yield band[:, x0 : x0 + tile]

    shape = (len(arrays),) + common
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    with atomic_path(path, ".tif") as tmp:
        tifffile.imwrite(
            tmp,
            data=chunks(),
            shape=shape,
            dtype=dtype,
            photometric="minisblack",
            bigtiff=nbytes > 2**31,
            tile=(tile, tile) if tiled else None,
            metadata={"axes": "Q" * (len(shape) - 2) + "YX"},
        )
    return path


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_ome_pyramid(path: str | Path, image: np.ndarray, mpp: float | None = None, downsamples=(2, 4),
                      tile: int = 256, compression: str = "zlib") -> Path:
    """A tiled pyramidal OME-TIFF (BigTIFF): ``image`` ``(Y, X)`` grey or ``(Y, X, 3)`` RGB at
    level 0, the reduced levels (block means, ``downsamples`` x) as sub-IFDs, and the pixel size
    ``mpp`` (µm) as ``PhysicalSizeX/Y``: what QuPath, Fiji (Bio-Formats) and OpenSlide-less readers open."""
    import tifffile

    rgb = image.ndim == 3
    meta: dict[str, Any] = {"axes": "YXS" if rgb else "YX"}
    if mpp is not None:
        meta.update(PhysicalSizeX=mpp, PhysicalSizeXUnit="µm", PhysicalSizeY=mpp, PhysicalSizeYUnit="µm")
    kw = {"tile": (tile, tile), "photometric": "rgb" if rgb else "minisblack", "compression": compression}
    with atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tw:
            tw.write(image, subifds=len(downsamples), metadata=meta, **kw)
            for k in downsamples:
                h, w = image.shape[0] // k, image.shape[1] // k
                lv = image[: h * k, : w * k].reshape(h, k, w, k, *image.shape[2:]).mean(axis=(1, 3))
                tw.write(np.rint(lv).astype(image.dtype), subfiletype=1, **kw)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary folder next to ``path``; on success it replaces ``path`` (a zarr store is a
    folder: it appears under its final name only when complete), on an exception it is removed."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_zarr(path: str | Path, array: Any, chunk: int = 2048) -> Path:
    """A (lazily sliceable) array as a zarr array, read and written block by block through dask;
    it appears under ``path`` only when complete."""
    import dask.array as da

    with atomic_dir(path) as tmp:
        da.from_array(array, chunks=chunk).to_zarr(str(tmp), overwrite=True)
    return Path(path)


OME_ZARR_CHUNK = 512


def write_ome_zarr(path: str | Path, image: Any, channel_names: Sequence[str], mpp: float | None = None,
                   labels: dict[str, Any] | None = None) -> Path:
    """An OME-Zarr (NGFF 0.4) image: ``image`` ``(C, Y, X)`` (numpy, or any lazily sliceable array:
    it is read chunk by chunk through dask) as a multiscale pyramid with the pixel size ``mpp`` (µm)
    in its coordinate transformations, and each of ``labels`` (``(Y, X)`` integer images) under
    ``labels/<name>``, as napari (napari-ome-zarr), QuPath and Fiji (OME-Zarr readers) open them.
    Written with ``ome-zarr``'s writer; the store appears only when complete."""
    import dask.array as da
    import zarr
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_image, write_labels

    fmt = FormatV04()
    scale = {"y": float(mpp), "x": float(mpp)} if mpp else None
    units = {"y": "micrometer", "x": "micrometer"} if mpp else None
    ny, nx = (int(n) for n in image.shape[-2:])
    levels = max(0, int(math.floor(math.log2(max(ny, nx) / OME_ZARR_CHUNK))) + 1) if max(ny, nx) > OME_ZARR_CHUNK else 0
    factors = tuple(2 ** k for k in range(1, min(levels, 6) + 1))
    chunk = (1, min(OME_ZARR_CHUNK, ny), min(OME_ZARR_CHUNK, nx))

    def lazy(a, chunks):
        return a if isinstance(a, (np.ndarray, da.Array)) else da.from_array(a, chunks=chunks)

    with atomic_dir(path) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=2)
        kw = {"scale": scale, "axes_units": units} if scale else {}
        write_image(lazy(image, chunk), group=root, axes="cyx", scale_factors=factors, fmt=fmt,
                    storage_options={"chunks": chunk}, **({"scale": {"c": 1.0, **scale}, "axes_units": units} if scale else {}))
        root.attrs["omero"] = {"channels": [{"label": str(n), "active": True} for n in channel_names],
                               "version": "0.4"}
        for name, lab in (labels or {}).items():
            write_labels(lazy(lab, chunk[1:]), group=root, name=name, axes="yx", scaler=None, scale_factors=factors, fmt=fmt,
                         storage_options={"chunks": chunk[1:]}, **kw)
    return Path(path)


def write_png(path: str | Path, array: np.ndarray) -> Path:
    """A uint8 ``(y, x)`` or ``(y, x, 3)`` image as PNG (masks and thumbnails)."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(tmp, format="PNG")
    return Path(path)


def write_figure(fig: Any, path: str | Path, **kwargs: Any) -> Path:
    """A matplotlib figure (format from the suffix)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, **kwargs)
    return Path(path)


def write_torch(obj: Any, path: str | Path) -> Path:
    """A state dict (tensors and plain data, loadable with ``weights_only=True``)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """A CSV (header + rows) that Excel and pandas read."""
    with atomic_path(path, ".csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(list(header))
        w.writerows(rows)
    return Path(path)


def write_dataframe(path: str | Path, df: Any) -> Path:
    """A pandas DataFrame as CSV, without its index."""
    with atomic_path(path, ".csv") as tmp:
        df.to_csv(tmp, index=False)
    return Path(path)
