"""Readers and writers at the edge of the package, and InstantDL folder-layout discovery.

Everything inside the package uses one axis convention: ``(C, [Z,] Y, X)`` float32.
Files are read in their own order (``read_raw``) and converted once (``to_channel_first``).

Supported layouts (``<root>/<split>/`` with split in ``train`` / ``test``):

* InstantDL default: ``image/<name>`` and ``groundtruth/<name>`` (same file name).
* Classification: ``image/<name>`` and ``groundtruth/groundtruth.csv`` (``filename,groundtruth``).
* InstantDL instance layout: ``<id>/image/<id>.png`` and ``<id>/mask/*.png`` (one binary mask per object).
"""

from __future__ import annotations

import contextlib

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from instantdl_ray.io.slide import DICOM_SUFFIX, SLIDE_SUFFIXES, is_dicom_folder, is_slide  # noqa: E402

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".npy", ".zarr", *SLIDE_SUFFIXES, DICOM_SUFFIX)
SPLITS = ("train", "test")
CSV_NAME = "groundtruth.csv"
# A classification CSV with this many times more rows than images is a master list: extra rows are ignored.
MASTER_LIST_FACTOR = 2


def is_image(path: Path) -> bool:
    """An image file of a supported type, a ``.zarr`` store or a DICOM WSI folder."""
    if path.name.startswith("."):
        return False
    return path.suffix.lower() in IMAGE_SUFFIXES or is_dicom_folder(path)


def open_array(path: str | Path, level: int | str = 0) -> Any:
    """A lazily sliceable array for ``path`` (zarr / TIFF / whole-slide image), or a numpy array
    for small formats.

    zarr groups (OME-Zarr multiscales) and pyramidal TIFFs resolve to the array at ``level``; a
    slide in a vendor format (``io.slide``) to that pyramid level, ``(Y, X, 3)`` uint8.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if is_slide(path):
        from instantdl_ray.io.slide import SlideLevel

        return SlideLevel(path, int(level))
    if suffix == ".zarr":
        import zarr

        node = zarr.open(str(path), mode="r")
        if isinstance(node, zarr.Array):
            return node
        keys = sorted(node.array_keys())
        key = str(level)
        if key not in keys:
            # OME-Zarr: datasets listed in multiscales metadata
            ms = node.attrs.get("multiscales") or node.attrs.get("ome", {}).get("multiscales")
            if ms:
                key = ms[0]["datasets"][int(level)]["path"]
            elif keys:
                key = keys[0]
        return node[key]
    if suffix in (".tif", ".tiff"):
        import tifffile
        import zarr

        store = tifffile.imread(str(path), aszarr=True)
        node = zarr.open(store, mode="r")
        if isinstance(node, zarr.Array):
            return node
        return node[str(level)]
    return read_raw(path)


def read_raw(path: str | Path) -> np.ndarray:
    """Read a whole image file as stored (no axis change, original dtype). A whole-slide image is
    read whole only when it is small (``FULL_DECODE_BYTES``); larger ones are read by region."""
    path = Path(path)
    suffix = path.suffix.lower()
    if is_slide(path):
        arr = open_array(path)
        if int(np.prod(arr.shape)) > FULL_DECODE_BYTES:
            raise ValueError(f"{path}: a whole-slide image of {arr.shape[0]} x {arr.shape[1]} pixels is read "
                             "region by region, never whole; this step needs a smaller image")
        return np.asarray(arr[...])
    if suffix in (".tif", ".tiff"):
        import tifffile

        return np.asarray(tifffile.imread(str(path)))
    if suffix == ".npy":
        return np.load(str(path), allow_pickle=False)
    if suffix == ".zarr":
        return np.asarray(open_array(path)[...])
    if suffix in (".png", ".jpg", ".jpeg"):
        from PIL import Image

        with Image.open(path) as im:
            if im.mode in ("P", "CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("RGB")
            return np.asarray(im)
    raise ValueError(f"{path}: unsupported file type '{suffix}'; use one of {', '.join(IMAGE_SUFFIXES)}")


# Validation decodes a file whole up to this size, and a sample of its chunks beyond it.
FULL_DECODE_BYTES = 256 * 2**20
SAMPLE_CHUNKS = 16
# deflate (PNG) compresses at most ~1032:1: a header that claims more pixels than that per byte of
# file is lying (a truncated or forged file), and is refused before anything is allocated
MAX_COMPRESSION = 2000
# the U-Net halves a tile 4 times; a thinner image (a 1 x N line, a thumbnail strip) is no image
MIN_IMAGE_SIDE = 16
MIN_CLASSIFIED_SIDE = 4  # classification resizes images to the network's size; below this nothing is left


def check_pixels(path: str | Path) -> str | None:
    """None when the pixels of ``path`` decode; otherwise why not, in a few words.

    Cheap enough for every file of a data set: small files are decoded whole, large chunked ones
    (tiled TIFF, zarr) in ``SAMPLE_CHUNKS`` chunks spread over the image, the last included; every
    TIFF strip or tile must lie inside the file, an uncompressed one must hold its bytes, and a
    header must not claim more pixels than the file's bytes can encode (no 18 GiB allocation for a
    50-byte file)."""
    path = Path(path)
    try:
        suffix = path.suffix.lower()
        if suffix in (".tif", ".tiff"):
            return _check_tiff(path)
        if suffix in (".png", ".jpg", ".jpeg"):
            return _check_pil(path)
        if suffix == ".npy":
            return _check_npy(path)
        if suffix == ".zarr" or is_slide(path):
            if suffix in TIFF_SLIDE_SUFFIXES:  # a truncated scan: tiles claimed past the end of the file
                why = _tiff_offsets_problem(path)
                if why:
                    return why
            _read_sample_chunks(open_array(path))
            return None
        read_raw(path)
    except Exception as e:  # whatever the decoder raises is the answer
        return f"{type(e).__name__}: {e}".splitlines()[0][:300]
    return None


TIFF_SLIDE_SUFFIXES = (".svs", ".ndpi", ".scn", ".bif", ".svslide")  # vendor slides stored as TIFF


@contextlib.contextmanager
def _quiet_tifffile():
    """Holds back tifffile's own log lines (a damaged tag): the checks below say what is wrong."""
    import logging

    logger = logging.getLogger("tifffile")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _tiff_offsets_problem(path: Path) -> str | None:
    """Why the TIFF's strips or tiles cannot all be read (one lies past the end of the file), or None."""
    import tifffile

    with _quiet_tifffile(), tifffile.TiffFile(str(path)) as tf:
        return _offsets_past_end(tf, path.stat().st_size)


def _offsets_past_end(tf: Any, size: int) -> str | None:
    for page in tf.pages:
        ends = [o + c for o, c in zip(page.dataoffsets, page.databytecounts) if c]
        if ends and max(ends) > size:
            return f"image data up to byte {max(ends)} claimed, the file has {size} bytes (truncated?)"
    return None


def _check_tiff(path: Path) -> str | None:
    import tifffile

    with _quiet_tifffile(), tifffile.TiffFile(str(path)) as tf:  # parsed once: offsets, sizes, small pixels
        why = _offsets_past_end(tf, path.stat().st_size)
        if why:
            return why
        for page in tf.pages:
            counts = page.databytecounts
            nbytes = int(np.prod(page.shape)) * page.dtype.itemsize if page.dtype is not None else 0
            if page.compression == 1 and sum(counts) < nbytes:
                return f"{page.shape} uncompressed pixels need {nbytes} bytes, the file holds {sum(counts)}"
            if nbytes > MAX_COMPRESSION * max(sum(counts), 1):
                return f"{page.shape} pixels claimed in {sum(counts)} bytes of image data"
        if tf.series and tf.series[0].nbytes <= FULL_DECODE_BYTES:
            tf.series[0].asarray()
            return None
    _read_sample_chunks(open_array(path))
    return None


def _check_pil(path: Path) -> str | None:
    from PIL import Image

    size = path.stat().st_size
    with Image.open(path) as im:
        w, h = im.size
        claimed = w * h * len(im.getbands())
        if claimed > MAX_COMPRESSION * size:
            return f"its header claims {w}x{h} pixels, more than its {size} bytes can hold"
        im.load()  # PIL raises on a truncated stream
    return None


def _check_npy(path: Path) -> str | None:
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = header(f)
        need = f.tell() + int(np.prod(shape)) * dtype.itemsize
    have = path.stat().st_size
    if have < need:
        return f"its header claims {shape} {dtype} ({need} bytes), the file has {have}"
    return None


def _read_sample_chunks(arr: Any) -> None:
    """Decode ``SAMPLE_CHUNKS`` chunks of a chunked array, spread evenly, first and last included."""
    chunks = getattr(arr, "chunks", None) or arr.shape
    grid = [max(1, -(-s // c)) for s, c in zip(arr.shape, chunks)]
    n = int(np.prod(grid))
    for flat in sorted({int(round(i)) for i in np.linspace(0, n - 1, min(SAMPLE_CHUNKS, n))}):
        idx = np.unravel_index(flat, grid)
        np.asarray(arr[tuple(slice(i * c, (i + 1) * c) for i, c in zip(idx, chunks))])


def infer_axes(image_shape: Sequence[int], target_shape: Sequence[int] | None, spatial_dims: int | None = None) -> str:
    """Guess the axis order of an image from its shape and its pixel target's shape.

    Returns a string over ``CZYX`` (e.g. ``"YX"``, ``"YXC"``, ``"CYX"``, ``"ZYX"``).
    Rules: a trailing axis of length <= 4 is colour; a leading axis of an image whose
    target lacks it is channels (e.g. 13 phase-contrast slices -> 13 channels); an image whose
    target has the same 3-D shape is a volume. ``spatial_dims`` (2 or 3) settles the rest.
    """
    shape = tuple(image_shape)
    tshape = tuple(target_shape) if target_shape is not None else None
    if len(shape) == 2:
        return "YX"
    if len(shape) == 3:
        if tshape is not None and len(tshape) == 3 and tshape == shape:
            if spatial_dims != 3 and shape[-1] <= 4 and shape[0] > 4:
                return "YXC"  # RGB image -> RGB target (e.g. virtual staining), not a 3-slice volume
            return "ZYX" if spatial_dims != 2 else "CYX"
        if tshape is not None and tuple(tshape[-2:]) == shape[1:] and len(tshape) == 2:
            return "CYX"
        if shape[-1] <= 4 and shape[0] > 4:
            return "YXC"
        if spatial_dims == 3:
            return "ZYX"
        return "CYX"
    if len(shape) == 4:
        if shape[-1] <= 4 and shape[1] > 4:
            return "ZYXC"
        return "CZYX"
    raise ValueError(f"cannot infer axes for an image of shape {shape}; set 'axes' in the config (e.g. 'CZYX')")


def image_axes(shape: Sequence[int], axes: str) -> str:
    """``axes`` for one image: a grey image among colour ones (one axis fewer) lacks ``C``."""
    if len(shape) == len(axes) - 1 and "C" in axes:
        return axes.replace("C", "")
    return axes


def to_channel_first(array: np.ndarray, axes: str) -> np.ndarray:
    """Reorder ``array`` with axis string ``axes`` to ``(C, [Z,] Y, X)`` float32.

    A 4-channel colour image (RGBA PNG) drops its alpha channel.
    """
    axes = axes.upper()
    if array.ndim != len(axes):
        raise ValueError(f"array of shape {array.shape} does not match axes '{axes}'")
    if "C" not in axes:
        array = array[None]
        axes = "C" + axes
    order = [axes.index(a) for a in "CZYX" if a in axes]
    out = np.transpose(array, order)
    if axes.endswith("C") and out.shape[0] == 4:
        out = out[:3]
    return np.ascontiguousarray(out, dtype=np.float32)


# ---------------------------------------------------------------- layout discovery


@dataclass
class Sample:
    """One training/test example as found on disk (no pixels loaded)."""

    name: str
    image: Path
    groundtruth: Path | list[Path] | int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def stem(self) -> str:
        """The name outputs take: the image's file name without its suffix, or the output name a
        prediction manifest gave (``extra["stem"]``)."""
        return self.extra.get("stem") or _stem(self.image)


def _stem(path: Path) -> str:
    name = path.name
    if is_dicom_folder(path):  # a DICOM WSI folder is named by its folder, dots and all
        return name
    for suf in (".ome.tif", ".ome.tiff", ".ome.zarr", *IMAGE_SUFFIXES):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return path.stem


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if np.isfinite(value) else None


def read_label_csv(path: Path) -> dict[str, int]:
    """``filename,groundtruth`` rows -> {filename: class}. Raises ValueError naming bad rows."""
    out: dict[str, int] = {}
    bad: list[str] = []
    with open(path, newline="") as f:
        reader = csv.reader(f)
        rows = list(reader)
    if not rows:
        raise ValueError(f"{path}: empty file; expected a header 'filename,groundtruth' and one row per image")
    start = 1 if rows[0] and _number(rows[0][-1]) is None else 0  # a header row has no numeric label
    first_line: dict[str, int] = {}
    for i, row in enumerate(rows[start:], start=start + 1):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) < 2:
            bad.append(f"line {i}: {row!r} has no label column")
            continue
        value = _number(row[1])
        if value is None or not value.is_integer():  # '1.0' is class 1; '1.5' is no class
            bad.append(f"line {i}: label {row[1]!r} is not an integer class")
            continue
        name = row[0].strip()
        if name in out and out[name] != int(value):
            bad.append(f"line {i}: '{name},{int(value)}' conflicts with '{name},{out[name]}' on line {first_line[name]}; "
                       "keep one row per file")
            continue
        out[name] = int(value)
        first_line.setdefault(name, i)
    if bad:
        raise ValueError(f"{path}: " + "; ".join(bad))
    return out


def read_class_names(root: Path) -> dict[int, str] | None:
    """``classes.txt`` beside the splits: ``<index><tab or space><name>`` per line."""
    path = Path(root) / "classes.txt"
    if not path.exists():
        return None
    names: dict[int, str] = {}
    for line in path.read_text().splitlines():
        parts = line.strip().split(None, 1)
        if len(parts) == 2 and parts[0].isdigit():
            names[int(parts[0])] = parts[1].strip()
    return names or None


def has_instance_folder_layout(split_dir: Path) -> bool:
    if not split_dir.is_dir() or (split_dir / "image").is_dir():
        return False
    return any((d / "image").is_dir() and (d / "mask").is_dir() for d in split_dir.iterdir() if d.is_dir())


def discover(root: str | Path, split: str, task: str) -> tuple[list[Sample], list[str]]:
    """List the samples of ``<root>/<split>`` for ``task``; returns (samples, problems).

    Problems are human-readable strings naming the file and the fix; pixel data is not read.
    """
    root = Path(root)
    split_dir = root / split
    problems: list[str] = []
    samples: list[Sample] = []
    if not split_dir.is_dir():
        return [], [f"{split_dir}: folder missing; expected {split_dir}/image/ (and groundtruth/)"]

    from instantdl_ray.tasks import get_task

    task = get_task(task)
    if task.groundtruth_masks and has_instance_folder_layout(split_dir):
        for d in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            imgs = sorted(p for p in (d / "image").glob("*") if is_image(p)) if (d / "image").is_dir() else []
            if len(imgs) != 1:
                problems.append(f"{d}/image: expected exactly one image, found {len(imgs)}")
                continue
            masks = sorted(p for p in (d / "mask").glob("*") if is_image(p)) if (d / "mask").is_dir() else []
            if not masks and split == "train":
                problems.append(f"{d}/mask: no mask files; put one binary PNG per object there")
            samples.append(Sample(d.name, imgs[0], masks or None))
        return samples, problems

    image_dir = split_dir / "image"
    gt_dir = split_dir / "groundtruth"
    if not image_dir.is_dir():
        return [], [f"{image_dir}: folder missing; put the {split} images there"]
    images = sorted(p for p in image_dir.iterdir() if is_image(p))
    skipped = sorted(p.name for p in image_dir.iterdir() if not is_image(p) and not p.name.startswith("."))
    if skipped:
        problems.append(
            f"{image_dir}: {len(skipped)} file(s) with an unsupported type ({', '.join(skipped[:5])}); "
            f"supported: {', '.join(IMAGE_SUFFIXES)}"
        )
    if not images:
        problems.append(f"{image_dir}: no images found (supported: {', '.join(IMAGE_SUFFIXES)})")
        return [], problems

    if task.pixelwise:  # outputs are <stem>.tif: two images of one stem would overwrite each other
        by_stem: dict[str, list[Path]] = {}
        for p in images:
            by_stem.setdefault(_stem(p), []).append(p)
        for stem, same in by_stem.items():
            if len(same) > 1:
                problems.append(f"{image_dir}: {' and '.join(q.name for q in same)} share the name '{stem}' (their "
                                f"groundtruth and predictions would be one file); rename or remove all but one")
    need_gt = split == "train"
    if not task.pixelwise:  # one class per image, from groundtruth/groundtruth.csv
        csv_path = gt_dir / CSV_NAME
        if not csv_path.exists():
            if need_gt:
                problems.append(f"{csv_path}: missing; write one row 'filename,groundtruth' per image")
            return [Sample(_stem(p), p, None) for p in images], problems
        try:
            labels = read_label_csv(csv_path)
        except ValueError as e:
            return [Sample(_stem(p), p, None) for p in images], [*problems, str(e)]
        names = {p.name for p in images}
        for p in images:
            if p.name not in labels:
                problems.append(f"{p}: no row in {csv_path}; add '{p.name},<class>'")
        extra = [f for f in labels if f not in names]
        if extra and len(labels) <= MASTER_LIST_FACTOR * len(images):
            for fname in extra:
                problems.append(f"{csv_path}: row '{fname}' names a file missing from {image_dir}; "
                                "add the image or delete the row")
        # else: the CSV is a master list for a larger collection (InstantDL's own example ships
        # a 10,000-row CSV with 40 images); rows without files are ignored, images without rows are not
        return [Sample(_stem(p), p, labels.get(p.name)) for p in images], problems

    if not gt_dir.is_dir():
        if need_gt:
            problems.append(f"{gt_dir}: folder missing; put one groundtruth file per image there, same file name")
        return [Sample(_stem(p), p, None) for p in images], problems
    from instantdl_ray.io.annotations import is_annotation

    gts = {p.name: p for p in gt_dir.iterdir() if is_image(p) or (is_annotation(p) and task.target_kind == "label")}
    if task.target_kind != "label":
        for p in sorted(q for q in gt_dir.iterdir() if is_annotation(q)):
            problems.append(f"{p}: GeoJSON annotations give label images (SemanticSegmentation, "
                            f"InstanceSegmentation); {task.display} needs an image as groundtruth")
    gts_by_stem = {_stem(p): p for p in gts.values()}
    used: set[str] = set()
    for p in images:
        gt = gts.get(p.name) or gts_by_stem.get(_stem(p))
        if gt is None:
            if need_gt or gts:
                problems.append(f"{p}: no groundtruth partner; expected {gt_dir / p.name}")
        else:
            used.add(gt.name)
        samples.append(Sample(_stem(p), p, gt))
    for name in sorted(set(gts) - used):
        problems.append(f"{gt_dir / name}: groundtruth without an image; expected {image_dir / name}")
    return samples, problems


def read_instance_masks(masks: Sequence[Path]) -> np.ndarray:
    """Per-object binary masks -> uint16 label image (later objects win on overlap)."""
    label = None
    for i, p in enumerate(masks, start=1):
        m = read_raw(p)
        if m.ndim == 3:
            m = m[..., 0]
        if label is None:
            label = np.zeros(m.shape, dtype=np.uint16)
        label[m > 0] = i
    if label is None:
        raise ValueError("no masks given")
    return label


# ---------------------------------------------------------------- pixel size

_UM_PER_UNIT = {"m": 1e6, "cm": 1e4, "mm": 1e3, "um": 1.0, "µm": 1.0, "micron": 1.0, "microns": 1.0,
                "nm": 1e-3, "inch": 25400.0, "in": 25400.0, "\\u00B5m": 1.0}


def pixel_size(path: str | Path) -> dict[str, float] | None:
    """The physical pixel size of an image file in µm, ``{"y": .., "x": .., ["z": ..]}``, from
    its metadata (OME-XML, ImageJ's unit and spacing, TIFF resolution tags, PNG pHYs / JPEG
    density), or None when the file states none."""
    path = Path(path)
    try:
        suffix = path.suffix.lower()
        if is_slide(path):
            from instantdl_ray.io.slide import slide_info

            return slide_info(path).mpp
        if suffix in (".tif", ".tiff"):
            return _tiff_pixel_size(path)
        if suffix in (".png", ".jpg", ".jpeg"):
            from PIL import Image

            with Image.open(path) as im:
                dpi = im.info.get("dpi")
            if dpi and all(float(d) > 0 for d in dpi[:2]):
                return {"y": 25400.0 / float(dpi[1]), "x": 25400.0 / float(dpi[0])}
    except Exception:  # metadata is a nicety: an odd tag never stops a run
        return None
    return None


def _tiff_pixel_size(path: Path) -> dict[str, float] | None:
    import tifffile

    with tifffile.TiffFile(str(path)) as tf:
        if tf.is_ome and tf.ome_metadata:
            import xml.etree.ElementTree as ET

            root = ET.fromstring(tf.ome_metadata)
            px = next((e for e in root.iter() if e.tag.endswith("Pixels")), None)
            if px is not None and px.get("PhysicalSizeX"):
                out = {}
                for ax in ("Z", "Y", "X"):
                    v = px.get(f"PhysicalSize{ax}")
                    if v:
                        out[ax.lower()] = float(v) * _UM_PER_UNIT.get(px.get(f"PhysicalSize{ax}Unit", "µm"), 1.0)
                return out if "y" in out else {**out, "y": out["x"]}
        page = tf.pages[0]
        tags = page.tags
        if "XResolution" not in tags or "YResolution" not in tags:
            return None
        xr, yr = (tags[k].value for k in ("XResolution", "YResolution"))
        xres, yres = xr[0] / xr[1], yr[0] / yr[1]
        if xres <= 0 or yres <= 0:
            return None
        ij = tf.imagej_metadata or {}
        if ij.get("unit"):
            um = _UM_PER_UNIT.get(str(ij["unit"]).lower())
            if um is None:
                return None
            out = {"y": um / yres, "x": um / xres}
            if ij.get("spacing"):
                out["z"] = um * float(ij["spacing"])
            return out
        unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2
        um = {2: 25400.0, 3: 1e4}.get(unit)  # 1 = no unit: a ratio, no size
        return None if um is None else {"y": um / yres, "x": um / xres}
