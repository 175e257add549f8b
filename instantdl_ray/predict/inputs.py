"""What ``predict --input`` names, made ready for the model: images and whole slides.

``gather`` turns a folder, one file, or a manifest CSV (columns ``slide``, optional ``mpp`` and
``name``) into inputs; ``prepare`` opens each one as the model reads it: the pyramid level
nearest to the model's pixel size, resampled where the level differs (``io.slide.choose_view``),
the tissue mask of a slide (``data.tissue``, saved under ``tissue/``) and the intensity
statistics of the tissue only (the glass of a slide would otherwise set the normalisation).
Every problem of every input is collected and reported together, before any actor starts.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from instantdl_ray.config.plan import Plan, channel_stats, image_percentiles
from instantdl_ray.errors import DataError
from instantdl_ray.io import read, slide

MANIFEST_COLUMNS = ("slide", "mpp", "name")


@dataclass
class Input:
    path: Path
    name: str
    mpp: float | None = None  # the manifest's pixel size for this input (µm), overriding its metadata
    error: str | None = None  # why it cannot be predicted (set by ``prepare``)
    info: dict = field(default_factory=dict)  # level, mpp, tissue fraction: a collection's table


def gather(inputs: Path, log: Callable = print) -> tuple[list[Input], list[str]]:
    """The inputs ``--input`` names and the problems found. Files of a folder that are not of a
    supported type are listed in the log (never skipped silently)."""
    if inputs.suffix.lower() == ".csv" and inputs.is_file():
        return read_manifest(inputs)
    if inputs.is_dir() and inputs.suffix.lower() != ".zarr" and not slide.is_dicom_folder(inputs):  # else one slide
        folder = inputs / "test" / "image" if (inputs / "test" / "image").is_dir() else inputs
        files = sorted(p for p in folder.iterdir() if read.is_image(p))
        other = sorted(p.name for p in folder.iterdir() if p.is_file() and not read.is_image(p)
                       and not p.name.startswith("."))
        if other:
            log(f"{folder}: {len(other)} file(s) of an unsupported type not predicted: {', '.join(other[:5])}"
                + (" ..." if len(other) > 5 else "") + f" (supported: {', '.join(read.IMAGE_SUFFIXES)})")
    else:
        files = [inputs] if inputs.exists() else []
    if not files:
        return [], [f"--input {inputs}: no images found (supported: {', '.join(read.IMAGE_SUFFIXES)}, "
                    "or a manifest .csv with a 'slide' column)"]
    found = [Input(f, read._stem(f)) for f in files]
    return found, _same_names(found, str(inputs))


def _same_names(found: list[Input], where: str) -> list[str]:
    """Inputs whose outputs would be one file (``a.png`` and ``a.tif``; ``x.ome.tif`` and ``x.tif``)."""
    by: dict[str, list[Input]] = {}
    for i in found:
        by.setdefault(i.name, []).append(i)
    return [f"{where}: {' and '.join(i.path.name for i in same)} would write the same outputs '{n}'; rename one, "
            "or list them in a manifest CSV with distinct 'name's" for n, same in by.items() if len(same) > 1]


def read_manifest(path: Path) -> tuple[list[Input], list[str]]:
    """A manifest CSV: ``slide`` (a path, relative to the CSV's folder or absolute), optional
    ``mpp`` (µm per pixel, for slides whose files state none) and ``name`` (output name)."""
    out, problems = [], []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        cols = [c.strip().lower() for c in reader.fieldnames or []]
        if "slide" not in cols:
            return [], [f"{path}: a manifest needs a 'slide' column (found {cols or 'no header'}); "
                        f"columns: {', '.join(MANIFEST_COLUMNS)} (mpp and name optional)"]
        for n, row in enumerate(reader, start=2):
            row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
            if not row.get("slide"):
                continue
            p = Path(row["slide"]).expanduser()
            p = p if p.is_absolute() else path.parent / p
            mpp = None
            if row.get("mpp"):
                try:
                    mpp = float(row["mpp"])
                    assert mpp > 0
                except (ValueError, AssertionError):
                    problems.append(f"{path}, line {n}: mpp '{row['mpp']}' is not a positive number (µm per pixel)")
            if not p.exists():
                problems.append(f"{path}, line {n}: slide '{row['slide']}' not found ({p})")
                continue
            out.append(Input(p, row.get("name") or read._stem(p), mpp))
    names = [i.name for i in out]
    problems += [f"{path}: the name '{n}' is used for more than one slide; give each a distinct 'name'"
                 for n in sorted({n for n in names if names.count(n) > 1})]
    if not out and not problems:
        problems.append(f"{path}: the manifest lists no slides")
    return out, problems


def prepare(inputs: list[Input], plan: Plan, tissue_setting: str, out_dir: Path, log: Callable = print
            ) -> tuple[list[read.Sample], dict, dict, list[str]]:
    """Open every input as the model reads it. Returns samples, their shapes (as read), tissue
    masks (slides only) and the problems found; sets ``plan.extra["views"]`` (level, scale and
    pixel size per input read other than as stored) and ``plan.image_norm``. An input that
    cannot be predicted gets its ``error``; ``info`` collects what a collection's table shows."""
    samples, shapes, masks, problems = [], {}, {}, []
    views = plan.extra.setdefault("views", {})
    for inp in inputs:
        n_before = len(problems)
        try:
            _prepare_one(inp, plan, tissue_setting, out_dir, log, samples, shapes, masks, problems, views)
        except Exception as e:  # corrupt tiles in the thumbnail or the statistics: this input fails alone
            problems.append(f"{inp.path}: cannot be read ({type(e).__name__}: {e})".splitlines()[0][:500])
        if len(problems) > n_before:
            inp.error = "; ".join(problems[n_before:])
    return samples, shapes, masks, problems


def _prepare_one(inp: Input, plan: Plan, tissue_setting: str, out_dir: Path, log: Callable, samples: list,
                 shapes: dict, masks: dict, problems: list, views: dict) -> None:
    from instantdl_ray.data.tissue import mask_for

    f = inp.path
    why = read.check_pixels(f)
    if why is not None:
        problems.append(f"{f}: cannot be read ({why})")
        return
    try:
        pyramid = slide.is_pyramid(f)
        input_mpp = inp.mpp or slide.microscope_mpp(read.pixel_size(f))
        if pyramid and plan.mpp and not input_mpp:
            problems.append(
                f"{f}: this slide states no pixel size, so the level that matches the model's {plan.mpp:g} µm/px "
                "cannot be chosen. List it in a manifest CSV with its pixel size (columns: slide,mpp) and pass "
                "--input manifest.csv")
            return
        info = slide.slide_info(f) if pyramid else None
        # slides are read at the model's resolution; other images as stored (as the run's own test set)
        view = slide.choose_view(info, input_mpp, plan.mpp) if pyramid else slide.View(0, 1.0, input_mpp)
        arr = slide.open_view(f, view, plan.axes)
        shape = tuple(int(s) for s in arr.shape)
    except Exception as e:
        problems.append(f"{f}: cannot be read ({type(e).__name__}: {e})")
        return
    if len(shape) not in (len(plan.axes), len(plan.axes) - 1):
        problems.append(f"{f}: shape {shape} does not fit the trained model's axes '{plan.axes}'")
        return
    s = read.Sample(inp.name, f, None, {"stem": inp.name})
    if view.level or view.scale != 1:
        views[str(f)] = view.to_dict()
        log(f"{inp.name}: level {view.level}" + (f", resampled x{view.scale:.3f}" if view.scale != 1 else "")
            + f" -> {view.mpp:g} µm/px, {shape}")
    axes = read.image_axes(shape, plan.axes)
    spatial = tuple(n for n, a in zip(shape, axes) if a in "YX")
    mask = None
    inp.info.update(level=view.level, mpp=view.mpp)
    if pyramid:  # level-0 pixels per pixel of the model's grid: GeoJSON is in level-0 coordinates
        plan.extra.setdefault("slides", {})[str(f)] = {
            "factor": float(info.downsamples[view.level]) / view.scale, "mpp": view.mpp}
        try:
            mask = mask_for(f, spatial, tissue_setting, plan.tile_shape, out_dir / "tissue", inp.name)
        except DataError as e:
            problems += e.problems
            return
        if mask is not None and mask.fraction == 0:
            log(f"{inp.name}: no tissue found (see tissue/{inp.name}_thumbnail.png); predicting the whole slide")
            mask = None
        elif mask is not None:
            log(f"{inp.name}: tissue covers {100 * mask.fraction:.1f} % of the slide")
            inp.info["tissue_fraction"] = round(mask.fraction, 4)
    augment = plan.extra.get("augment")
    if mask is not None:
        masks[str(f)] = mask
        plan.image_norm[str(f)] = channel_stats(mask.sample(arr, axes), augment)
    else:
        plan.image_norm.setdefault(str(f), image_percentiles(f, plan.axes, augment))
    samples.append(s)
    shapes[str(f)] = shape


def run_test_slides(samples: list[read.Sample], shapes: dict, plan: Plan, tissue_setting: str, out_dir: Path,
                    log: Callable = print) -> dict:
    """The whole slides of a run's own test set, read as stored (their level 0, the grid their
    groundtruth is on): their tissue masks (saved under ``out_dir/tissue``; only tiles that touch
    tissue are predicted) and their entries in ``plan.extra["slides"]``, so they get the slide
    outputs (OME-Zarr, GeoJSON) as ``predict --input`` gives them. Returns the masks."""
    from instantdl_ray.data.tissue import mask_for, yx_shape

    masks = {}
    for s in samples:
        if not slide.is_pyramid(s.image):
            continue
        mpp = slide.microscope_mpp(read.pixel_size(s.image))
        if plan.mpp and mpp and abs(mpp / plan.mpp - 1) > slide.SCALE_TOLERANCE:
            log(f"{s.image.name}: {mpp:g} µm/px, the model works at {plan.mpp:g}; the test set is read as stored "
                "(predict --input reads a slide at the model's resolution)")
        plan.extra.setdefault("slides", {})[str(s.image)] = {"factor": 1.0, "mpp": mpp}
        mask = mask_for(s.image, yx_shape(shapes[str(s.image)]), tissue_setting, plan.tile_shape, out_dir / "tissue", s.stem)
        if mask is not None and mask.fraction > 0:
            masks[str(s.image)] = mask
            log(f"{s.stem}: tissue covers {100 * mask.fraction:.1f} % of the slide")
    return masks


def output_pixel_size(s: read.Sample, plan: Plan) -> dict | None:
    """The pixel size (µm) of an input's predictions: the model's grid where the input was
    resampled or read at a pyramid level, else the input file's own."""
    view = plan.extra.get("views", {}).get(str(s.image))
    if view and view.get("mpp"):
        return {"y": float(view["mpp"]), "x": float(view["mpp"])}
    return read.pixel_size(s.image)


TABLE_COLUMNS = ("slide", "name", "status", "level", "mpp", "tiles", "tissue_fraction", "seconds", "outputs", "error")
OUTPUT_KEYS = ("prediction", "uncertainty", "mutual_information", "ome_zarr", "geojson", "tile_table")


def write_table(path: Path, inputs: list[Input], records: dict[str, dict]) -> Path:
    """``slides.csv``: one row per input of a collection, its status (``done`` / ``failed`` /
    ``pending``), the level read, the pixel size, tiles predicted, tissue fraction, seconds, the
    output files (relative to the table's folder) and the error of a failed one."""
    from instantdl_ray.io import write

    rows = []
    for inp in inputs:
        rec = records.get(inp.name)
        status = "failed" if inp.error else "done" if rec else "pending"
        info = {**inp.info, **{k: rec[k] for k in ("level", "mpp", "tiles", "tissue_fraction", "seconds")
                               if rec and rec.get(k) is not None}}
        outs = [_relative(rec[k], path.parent) for k in OUTPUT_KEYS if rec and isinstance(rec.get(k), str)]
        rows.append([str(inp.path), inp.name, status] + ["" if info.get(k) is None else info[k]
                                                         for k in ("level", "mpp", "tiles", "tissue_fraction", "seconds")]
                    + [";".join(outs), inp.error or ""])
    return write.write_csv(path, TABLE_COLUMNS, rows)


def _relative(p: str, root: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(p)
