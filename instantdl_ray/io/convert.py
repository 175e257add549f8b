"""Data set converters: binary masks -> instance labels, and images -> chunked zarr.

Both write into a hidden temp folder beside ``dst`` and rename it to ``dst`` at the end, so a crash
leaves no half-written data set, and both refuse a ``dst`` that exists and is not empty.

* ``instances_from_binary``: InstantDL's semantic layout (``<split>/image``, ``<split>/groundtruth``
  with binary masks) -> the same layout with uint16 label TIFFs (connected components, optional
  watershed split of touching objects). InstantDL shipped this as a notebook.
* ``to_zarr``: one image file, an InstantDL data set, or a folder of images -> zarr v3 arrays chunked
  for tiled streaming, copied block by block so large TIFFs never sit in memory whole.

Pure Python (no Ray). Arrays keep their stored axis order and dtype; nothing here uses the package's
internal ``(C, [Z,] Y, X)`` float32 convention.
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Union

import numpy as np

from instantdl_ray.io import read, write
from instantdl_ray.io.annotations import is_annotation

Progress = Callable[[int, int], None]  # progress(done, total)
Chunks = Union[int, Sequence[Union[int, None]]]

PROGRESS_EVERY_S = 2.0
DEPTH_CHUNK = 32  # chunk along Z / unknown leading axes: plan.default_tile's 3-D tile depth
BLOCK_BYTES = 16 * 2**20  # copy window grows to whole source chunks (e.g. TIFF strips) up to this
MAX_LABEL = int(np.iinfo(np.uint16).max)
_COLOUR_SUFFIXES = (".png", ".jpg", ".jpeg")


# ---------------------------------------------------------------- shared helpers


class _Printer:
    """Default progress: one line ``<verb> 12/50 <unit>`` at most every ``PROGRESS_EVERY_S`` and at the end."""

    def __init__(self, verb: str, unit: str):
        self.verb, self.unit = verb, unit
        self.last = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done >= total or now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            print(f"{self.verb} {done}/{total} {self.unit}", flush=True)


def _progress(progress: Progress | None | bool, verb: str, unit: str) -> Progress:
    if progress is None or progress is True:
        return _Printer(verb, unit)
    if progress is False:
        return lambda done, total: None
    return progress


def _check_dst(dst: Path) -> None:
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst}: exists and is not empty; choose a new destination or remove it first")


@contextmanager
def _atomic_dir(dst: Path) -> Iterator[Path]:
    """Yield a temp folder beside ``dst``; rename it to ``dst`` on success, delete it on error."""
    _check_dst(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        yield tmp
        _check_dst(dst)  # someone may have filled it meanwhile
        if dst.exists():
            dst.rmdir()
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _has_splits(root: Path) -> bool:
    return any((root / s).is_dir() for s in read.SPLITS)


# ---------------------------------------------------------------- binary masks -> instance labels


def binary_to_labels(mask: np.ndarray, *, watershed: bool = False, min_distance: int = 5,
                     min_size: int = 8) -> np.ndarray:
    """Binary mask ``([Z,] Y, X)`` (any dtype, foreground ``> 0``) -> uint16 labels, same shape.

    Connected components with full connectivity (8 in 2D, 26 in 3D); with ``watershed``, touching
    objects are split at the necks of the distance transform (one marker per local maximum at least
    ``min_distance`` apart). Objects under ``min_size`` pixels are dropped; labels are 1..N in order.
    """
    from scipy import ndimage as ndi
    from skimage.segmentation import relabel_sequential

    fg = np.asarray(mask) > 0
    if fg.ndim not in (2, 3):
        raise ValueError(f"mask of shape {fg.shape}: expected (Y, X) or (Z, Y, X)")
    structure = np.ones((3,) * fg.ndim, bool)
    labels, n = ndi.label(fg, structure=structure)
    if watershed and n:
        labels = _watershed_split(fg, labels, min_distance, structure)
    if min_size > 1 and labels.max():
        sizes = np.bincount(labels.ravel())
        small = sizes < min_size
        small[0] = False
        labels[small[labels]] = 0
    labels, _, _ = relabel_sequential(labels)
    if labels.max() > MAX_LABEL:
        raise ValueError(f"{int(labels.max())} objects do not fit uint16 labels (at most {MAX_LABEL})")
    return labels.astype(np.uint16)


def _watershed_split(fg: np.ndarray, components: np.ndarray, min_distance: int, structure: np.ndarray) -> np.ndarray:
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    distance = ndi.distance_transform_edt(fg)
    peaks = peak_local_max(distance, min_distance=max(1, int(min_distance)), labels=components,
                           exclude_border=False)
    markers = np.zeros(fg.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = watershed(-distance, markers, mask=fg)
    # a component that received no marker stays whole rather than vanishing
    missed = fg & (labels == 0)
    if missed.any():
        extra, _ = ndi.label(missed, structure=structure)
        labels[missed] = extra[missed] + labels.max()
    return labels


def _mask_array(path: Path) -> np.ndarray:
    """A groundtruth file as a spatial ``([Z,] Y, X)`` array (colour PNG/JPG masks: any RGB channel)."""
    arr = read.read_raw(path)
    colour = arr.ndim == 3 and (
        path.suffix.lower() in _COLOUR_SUFFIXES
        or (path.suffix.lower() in (".tif", ".tiff") and _tiff_axes(path) == "YXC")
    )
    if colour:
        arr = arr[..., :3] if arr.shape[-1] in (3, 4) else arr[..., :1]  # drop alpha
        arr = arr.max(axis=-1)
    return arr


def instances_from_binary(src: Path, dst: Path, *, watershed: bool = False, min_distance: int = 5,
                          min_size: int = 8, progress: Progress | None = None) -> dict:
    """Semantic data set (binary masks) -> instance data set (uint16 label TIFFs), same InstantDL layout.

    ``<src>/<split>/image/<name>`` is copied unchanged to ``<dst>/<split>/image/<name>``;
    ``<src>/<split>/groundtruth/<name>`` (0/1 or 0/255, PNG/TIFF, 2D or 3D) becomes
    ``<dst>/<split>/groundtruth/<stem>.tif`` (0 background, 1..N objects; see ``binary_to_labels``).
    Images without groundtruth (e.g. test) are copied alone. ``progress(done, total)`` is called after
    each image; the default prints ``converted 12/50 images`` at most every 2 s and at the end.

    Returns ``{split: {"images": n, "groundtruth": n, "objects": n}}``. Raises ``FileExistsError`` for a
    non-empty ``dst`` and ``ValueError`` listing every pairing problem before anything is written.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: not a folder; expected an InstantDL data set with train/ and/or test/")
    _check_dst(dst)
    if not _has_splits(src):
        raise ValueError(f"{src}: no {' or '.join(read.SPLITS)} folder; expected <src>/train/image and <src>/train/groundtruth")

    plan: dict[str, list[read.Sample]] = {}
    problems: list[str] = []
    for split in read.SPLITS:
        if not (src / split).is_dir():
            continue
        samples, probs = read.discover(src, split, "semantic")
        # files of other types are left behind, not an error
        problems += [p for p in probs if "unsupported type" not in p]
        by_stem: dict[str, Path] = {}
        for s in samples:
            if isinstance(s.groundtruth, Path) and is_annotation(s.groundtruth):
                problems.append(f"{s.groundtruth}: GeoJSON polygons are objects already; train "
                                "InstanceSegmentation on it as it is (each polygon is one object)")
            if s.stem in by_stem:
                problems.append(f"{s.image} and {by_stem[s.stem]} would share the groundtruth {s.stem}.tif; rename one")
            by_stem[s.stem] = s.image
        plan[split] = samples
    if problems:
        raise ValueError(f"{src}: cannot convert:\n  " + "\n  ".join(problems))

    total = sum(len(s) for s in plan.values())
    report = _progress(progress, "converted", "images")
    counts: dict[str, dict[str, int]] = {}
    done = 0
    with _atomic_dir(dst) as tmp:
        for split, samples in plan.items():
            c = counts[split] = {"images": 0, "groundtruth": 0, "objects": 0}
            (tmp / split / "image").mkdir(parents=True)
            if any(s.groundtruth is not None for s in samples):
                (tmp / split / "groundtruth").mkdir()
            for s in samples:
                shutil.copy2(s.image, tmp / split / "image" / s.image.name)
                c["images"] += 1
                if isinstance(s.groundtruth, Path):
                    labels = binary_to_labels(_mask_array(s.groundtruth), watershed=watershed,
                                              min_distance=min_distance, min_size=min_size)
                    write.write_tiff(tmp / split / "groundtruth" / f"{s.stem}.tif", labels)
                    c["groundtruth"] += 1
                    c["objects"] += int(labels.max())
                done += 1
                report(done, total)
    return counts


# ---------------------------------------------------------------- images -> chunked zarr


def _tiff_axes(path: Path) -> str | None:
    """Axes of a TIFF's first series in ``CZYX`` letters (RGB samples -> C), or None if not all known."""
    import tifffile

    try:
        with tifffile.TiffFile(str(path)) as tif:
            axes = tif.series[0].axes.upper()
    except Exception:
        return None
    axes = axes.replace("S", "C")
    return axes if set(axes) <= set("CZYX") and len(set(axes)) == len(axes) else None


def _known_axes(path: Path, shape: tuple[int, ...]) -> str | None:
    """Axes when the file or its shape settles them; None when ambiguous (e.g. ``(3, 64, 64)`` NPY)."""
    nd = len(shape)
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        axes = _tiff_axes(path)
        if axes is not None and len(axes) == nd:
            return axes
    if nd == 2:
        return "YX"
    if suffix in _COLOUR_SUFFIXES and nd == 3:
        return "YXC"
    if nd == 3 and shape[-1] <= 4 < shape[0]:
        return "YXC"
    return None


def _check_axes(axes: str, shape: tuple[int, ...], path: Path) -> str:
    axes = axes.upper()
    if len(axes) != len(shape) or not set(axes) <= set("CZYX") or len(set(axes)) != len(axes) \
            or "Y" not in axes or "X" not in axes:
        raise ValueError(f"{path}: axes '{axes}' do not fit shape {shape}; give one letter per axis from "
                         f"CZYX, each once, with Y and X (e.g. 'YX', 'YXC', 'ZYX', 'CZYX')")
    return axes


def zarr_chunks(shape: Sequence[int], axes: str | None, chunks: Chunks = 512) -> tuple[int, ...]:
    """Chunk shape for an array ``shape`` stored in order ``axes`` (None: unknown).

    ``chunks``: an int (Y and X chunk edge), a pair ``(Y, X)``, or one entry per axis (``None``/-1 =
    whole axis). Y and X are taken from ``axes``, else the last two axes. Channel axes (``C`` or
    length <= 4) are kept whole; Z and other axes are chunked by ``DEPTH_CHUNK``.
    """
    shape = tuple(int(s) for s in shape)
    nd = len(shape)
    if isinstance(chunks, (int, np.integer)):
        chunks = (int(chunks), int(chunks))
    chunks = tuple(chunks)
    if any(c is not None and int(c) != -1 and int(c) < 1 for c in chunks):
        raise ValueError(f"chunks {chunks}: sizes must be positive (None or -1 = whole axis)")
    if len(chunks) == nd:
        return tuple(n if c is None or int(c) == -1 else min(int(c), n) for c, n in zip(chunks, shape))
    if len(chunks) != 2:
        raise ValueError(f"chunks {chunks}: give an int, a (Y, X) pair, or {nd} entries for shape {shape}")
    y, x = (axes.index("Y"), axes.index("X")) if axes else (nd - 2, nd - 1)
    out = []
    for i, n in enumerate(shape):
        if i in (y, x):
            c = chunks[0] if i == y else chunks[1]
            out.append(n if c is None or int(c) == -1 else min(int(c), n))
        elif (axes and axes[i] == "C") or n <= 4:
            out.append(n)
        else:
            out.append(min(n, DEPTH_CHUNK))
    return tuple(out)


def _open_source(path: Path) -> Any:
    """Sliceable view of an image that reads only what is sliced, where the format allows it."""
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        import tifffile

        try:
            # contiguous uncompressed TIFFs are a single zarr chunk through open_array; a memmap is not
            return tifffile.memmap(str(path), mode="r")
        except (ValueError, OSError):
            return read.open_array(path)
    if suffix == ".npy":
        return np.load(str(path), mmap_mode="r", allow_pickle=False)
    if suffix == ".zarr" or read.is_slide(path):  # a slide: one pyramid level, read by region
        return read.open_array(path)
    return read.read_raw(path)


def _block_shape(shape: tuple[int, ...], dst_chunks: tuple[int, ...], src_chunks: Any, itemsize: int) -> tuple[int, ...]:
    """Copy window: the destination chunk, grown along axes (last first) to whole source chunks while
    it stays under ``BLOCK_BYTES``, so a strip-chunked TIFF is not decoded once per column of blocks."""
    block = list(dst_chunks)
    if not isinstance(src_chunks, tuple) or len(src_chunks) != len(shape):
        return tuple(block)
    for ax in reversed(range(len(shape))):
        want = min(math.ceil(int(src_chunks[ax]) / block[ax]) * block[ax], shape[ax])
        trial = block[:ax] + [want] + block[ax + 1:]
        if math.prod(trial) * itemsize <= BLOCK_BYTES:
            block = trial
    return tuple(block)


def _write_zarr(src: Path, out: Path, chunks: Chunks, axes: str | None, report: Progress | None) -> Path:
    """Copy one image file into a new zarr v3 array at ``out``, one block at a time."""
    import zarr

    arr = _open_source(src)
    shape = tuple(int(s) for s in arr.shape)
    if len(shape) < 2:
        raise ValueError(f"{src}: shape {shape}; an image needs at least two axes (Y, X)")
    if axes is not None and len(axes) == len(shape):
        axes = _check_axes(axes, shape, src)
    else:
        axes = _known_axes(src, shape)
    dtype = np.dtype(arr.dtype).newbyteorder("=")
    chunk_shape = zarr_chunks(shape, axes, chunks)
    attrs = {"axes": axes} if axes else {}
    z = zarr.create_array(store=str(out), shape=shape, chunks=chunk_shape, dtype=dtype, attributes=attrs,
                          dimension_names=list(axes) if axes else None, zarr_format=3)
    block = _block_shape(shape, chunk_shape, getattr(arr, "chunks", None), dtype.itemsize)
    starts = [range(0, n, b) for n, b in zip(shape, block)]
    total = math.prod(len(r) for r in starts)
    for i, origin in enumerate(itertools.product(*starts), start=1):
        window = tuple(slice(o, min(o + b, n)) for o, b, n in zip(origin, block, shape))
        z[window] = np.asarray(arr[window], dtype=dtype)
        if report is not None:
            report(i, total)
    return out


def to_zarr(src: Path, dst: Path, *, chunks: Chunks = 512, axes: str | None = None,
            progress: Progress | None = None) -> list[Path]:
    """Images -> zarr v3 arrays (stored axis order and dtype, pixel-exact), chunked for tiled streaming.

    * ``src`` an image file (PNG/JPG/TIFF/BigTIFF/NPY/zarr): ``dst`` (ending in ``.zarr``) is one array.
    * ``src`` a folder (InstantDL layout with ``train/``/``test/``, or a plain folder of images): the tree
      is mirrored; each image ``<dir>/<stem>.<ext>`` becomes ``<dst>/<dir>/<stem>.zarr``, other files
      (``groundtruth.csv``, ``classes.txt``) and existing ``.zarr`` folders are copied as they are;
      hidden files are skipped.

    Chunks follow ``zarr_chunks`` (default 512 along Y and X, channels whole). ``axes`` (``CZYX``
    letters in stored order) is used for every array with that many dimensions; otherwise axes come
    from the TIFF metadata or an unambiguous shape, and are stored as ``attrs["axes"]`` (and zarr
    dimension names) when known. Data is copied one block at a time; TIFFs and NPYs are read lazily, so
    a large image never sits in memory whole (PNG/JPG are decoded whole: their formats allow no less).
    ``progress(done, total)`` counts blocks for a file and images for a folder; the default prints at
    most every 2 s and at the end. Returns the zarr arrays written, at their final paths.
    """
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or folder")
    _check_dst(dst)

    if not src.is_dir() or src.suffix.lower() == ".zarr":
        if not read.is_image(src):
            raise ValueError(f"{src}: unsupported file type '{src.suffix}'; use one of {', '.join(read.IMAGE_SUFFIXES)}")
        if dst.suffix.lower() != ".zarr":
            raise ValueError(f"{dst}: the destination of a single image must end with '.zarr'")
        with _atomic_dir(dst) as tmp:
            shutil.rmtree(tmp)  # zarr creates the store folder itself
            _write_zarr(src, tmp, chunks, axes, _progress(progress, "converted", "blocks"))
        return [dst]

    images, others, stores = _walk(src)
    outs = [rel.parent / f"{read._stem(rel)}.zarr" for rel in images]
    clashes = _clashes(images, outs, stores)
    if clashes:
        raise ValueError(f"{src}: files would share one zarr name:\n  " + "\n  ".join(clashes))
    if not images and not stores:
        raise ValueError(f"{src}: no images found (supported: {', '.join(read.IMAGE_SUFFIXES)})")

    report = _progress(progress, "converted", "images")
    with _atomic_dir(dst) as tmp:
        for rel in others:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, tmp / rel)
        for rel in stores:
            shutil.copytree(src / rel, tmp / rel)
        for i, (rel, out) in enumerate(zip(images, outs), start=1):
            (tmp / out).parent.mkdir(parents=True, exist_ok=True)
            _write_zarr(src / rel, tmp / out, chunks, axes, None)
            report(i, len(images))
    return [dst / out for out in outs]


def _walk(root: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """Relative paths under ``root``: image files, other files, ``.zarr`` folders (hidden names skipped)."""
    images: list[Path] = []
    others: list[Path] = []
    stores: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        keep = []
        for d in sorted(dirnames):
            if d.startswith("."):
                continue
            if d.lower().endswith(".zarr"):
                stores.append((here / d).relative_to(root))
            else:
                keep.append(d)
        dirnames[:] = keep
        for f in sorted(filenames):
            if f.startswith("."):
                continue
            rel = (here / f).relative_to(root)
            (images if read.is_image(here / f) else others).append(rel)
    return images, others, stores


def _clashes(images: list[Path], outs: list[Path], stores: list[Path]) -> list[str]:
    seen: dict[Path, Path] = {s: s for s in stores}
    problems = []
    for rel, out in zip(images, outs):
        if out in seen:
            problems.append(f"{rel} and {seen[out]} both become {out}; rename one")
        else:
            seen[out] = rel
    return problems
