"""Evaluation: a Dask graph over prediction / groundtruth pairs, reduced with ``+``.

Semantic segmentation and regression are evaluated **blockwise**: each pair is opened lazily
(``dask.array.from_zarr`` for zarr, memory-mapped or chunked TIFF reads for TIFF), every block
yields a small summable state (:mod:`instantdl_ray.evaluation.metrics`), and the states add up to the image's
state and then the dataset's. Memory stays at a few blocks per thread, so a 16384 x 16384 pair
evaluates like a 256 x 256 one, only longer (measured on 2 cores: a 16384^2 uint8 pair in ~6 s at
~340 MB peak RSS, outputs included). Regression SSIM is not summable: it runs as a second blockwise
pass, each block read with a margin of half the SSIM window, once the first pass knows each
groundtruth's value range; it equals skimage's SSIM of the whole image.

Instance segmentation is evaluated **per image**: matching objects needs the whole label image
(an object cut by a block border would be two objects). Whole slides are meant to be evaluated as
tiles later; until then each instance pair must fit in memory.

Classification reads ``predictions/predictions.csv`` of the run.

Outputs, under ``<run_dir>/evaluation/``: ``results.json``, ``per_image.csv``,
``predictions_stack.tif`` (pixel tasks), ``figures/`` and ``report.html`` (see :mod:`.report`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from instantdl_ray.evaluation import metrics as M
from instantdl_ray.errors import ConfigError, DataError
from instantdl_ray.io import write
from instantdl_ray.io.read import infer_axes, open_array, read_instance_masks, read_raw

SCHEDULERS = ("threads", "synchronous", "ray")

# Blocks of about CHUNK_EDGE x CHUNK_EDGE pixels (aligned to the stored chunks): regression SSIM
# makes ~15 float64 copies of a block, so 1024^2 keeps one thread near 150 MB (2048^2: ~0.5 GB).
CHUNK_EDGE = 1024
BLOCK_ELEMENTS = CHUNK_EDGE * CHUNK_EDGE
MIN_CHUNK = 16  # a trailing block is merged into its neighbour below this (SSIM needs >= its window)
MAX_FIGURES = 20
VIEW_EDGE = 512  # figure views are strided down to about this many pixels per side
NOT_BOOTSTRAPPED = ("n_gt", "n_pred")


# ---------------------------------------------------------------- public entry


def evaluate(
    run_dir: Path,
    task: str,
    items: list[dict],
    *,
    num_classes: int = 1,
    class_names: dict[int, str] | None = None,
    scheduler: str = "threads",
    bootstrap_draws: int = 100,
) -> dict:
    """Evaluate the test predictions of a run and write ``<run_dir>/evaluation/``.

    Pixel tasks (``semantic``, ``instance``, ``regression``): one item per test image,
    ``{"name", "prediction", "groundtruth", "image", "uncertainty"}``. ``prediction`` is a ``.tif`` or
    ``.zarr`` of shape ``([C|Z,] Y, X)`` (semantic: uint8 classes, instance: uint16 labels, regression:
    float32 in the groundtruth's range); ``groundtruth`` an image file, or for instance segmentation a
    list of per-object binary masks; ``image`` (figures) and ``uncertainty`` (a float map of the
    prediction's shape) may be None. Singleton axes are squeezed; a groundtruth stored channel-last
    is matched to a channel-first prediction; any other shape difference is a :class:`DataError`.
    ``num_classes == 1`` means binary masks (groundtruth 0/1 or 0/255, binarised with ``> 0``).

    Classification: items ``{"name": filename, "groundtruth": int}`` (optionally ``"image"``), scored
    against ``<run_dir>/predictions/predictions.csv`` (``filename, prediction, prob_<class>...,
    [uncertainty]``).

    ``scheduler``: ``"threads"`` / ``"synchronous"`` / ``"ray"`` (``ray.util.dask.ray_dask_get``).
    Returns the dict written to ``results.json`` (with ``nan`` where the file has ``null``).
    """
    run_dir = Path(run_dir)
    task = _task(task)
    compute_kw = _compute_kwargs(scheduler)
    if not items:
        raise DataError(f"{run_dir}: no test items to evaluate")
    if not task.pixelwise:
        ev = _evaluate_classification(run_dir, items, class_names)
    else:
        ev = _evaluate_pixels(task, items, num_classes, compute_kw)

    out = run_dir / "evaluation"
    out.mkdir(parents=True, exist_ok=True)
    results = _results(task, ev, bootstrap_draws)
    write.write_dataframe(out / "per_image.csv", ev.per_image)
    if task.pixelwise:
        write_prediction_stack(out / "predictions_stack.tif", [it["prediction"] for it in items])
        results["files"]["predictions_stack"] = "predictions_stack.tif"
    # metrics are on disk before plotting starts, so a figure problem never loses them
    write.write_json(out / "results.json", results)

    from instantdl_ray.evaluation.report import write_report

    figures = write_report(run_dir, results, ev.per_image, ev.figures)
    results["files"]["figures"] = [p.relative_to(out).as_posix() for p in figures]
    write.write_json(out / "results.json", results)
    return results


# ---------------------------------------------------------------- lazy arrays


@dataclass(frozen=True)
class Window:
    """A picklable handle on one file's aligned axes that reads any window of it where it runs.

    ``keep``: the file's axes in the aligned order (singleton axes dropped). Tasks get this handle
    instead of shared dask blocks, so a task that needs a window with a margin (SSIM) reads exactly
    that and holds nothing its neighbours need.
    """

    path: str
    keep: tuple[int, ...]
    ndim: int
    clean: tuple = ()  # groundtruth: the run's raw-target clean-up, see ``clean_groundtruth``

    def __dask_tokenize__(self):
        return (_file_token(Path(self.path)), self.keep, self.clean)

    def read(self, window: Sequence[slice]) -> np.ndarray:
        """``window``: one slice per aligned axis -> numpy array in the aligned axis order."""
        a = open_lazy(self.path)
        idx: list[Any] = [0] * self.ndim
        for sl, ax in zip(window, self.keep):
            idx[ax] = sl
        out = np.asarray(a[tuple(idx)])
        order = sorted(self.keep)
        return clean_groundtruth(out.transpose([order.index(ax) for ax in self.keep]), self.clean)


def clean_spec(target_clean: dict | None) -> tuple:
    """An evaluation item's ``target_clean`` (``{"threshold": [per channel] | None, "binarize": bool}``,
    from the run's ``data_gen_args``) as a hashable spec for ``clean_groundtruth``."""
    if not target_clean:
        return ()
    t = target_clean.get("threshold")
    return (tuple(float(v) for v in t) if t is not None else None, bool(target_clean.get("binarize")))


def clean_groundtruth(gt: Any, spec: tuple) -> Any:
    """``augment.clean_target`` on an aligned groundtruth (numpy or dask, ``([C|Z,] Y, X)``): the
    same raw-target clean-up as in training, so a model is scored against what it was taught.
    A per-channel threshold applies along a leading axis of that length, a single one everywhere."""
    if not spec:
        return gt
    thresholds, binarize = spec
    if thresholds is not None:
        t = np.asarray(thresholds, np.float64)
        if t.size > 1 and gt.ndim >= 3 and gt.shape[0] == t.size:
            t = t.reshape((-1,) + (1,) * (gt.ndim - 1))
        elif t.size > 1:
            raise DataError(f"{t.size} groundtruth thresholds for a groundtruth of shape {tuple(gt.shape)}")
        else:
            t = float(t[0])
        gt = (gt >= t) * gt
    if binarize:
        gt = (gt > 0).astype(gt.dtype)
    return gt


@dataclass
class Pair:
    """A prediction and its groundtruth aligned to one shape ``([C|Z,] Y, X)``: dask arrays with the
    same blocks (``pred``, ``gt``) and window readers (``pred_window``, ``gt_window``)."""

    pred: Any
    gt: Any
    pred_path: Path
    gt_path: Path
    pred_window: Window
    gt_window: Window


def open_lazy(path: str | Path) -> Any:
    """A sliceable array that reads only what is sliced: zarr array, TIFF memory map, or numpy.

    Uncompressed contiguous TIFFs (what ``tifffile.imwrite`` writes by default) are one zarr chunk
    through ``read.open_array``, so every block would decode the whole file; a memory map reads only
    the block. Compressed or tiled TIFFs fall back to ``open_array``'s chunked reads.
    """
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        try:
            return tifffile.memmap(str(path), mode="r")
        except (ValueError, OSError):
            pass
    return open_array(path)


def _stored_chunks(arr: Any) -> tuple[int, ...] | None:
    chunks = getattr(arr, "chunks", None)
    return tuple(int(c) for c in chunks) if isinstance(chunks, tuple) else None


def _split(n: int, c: int) -> tuple[int, ...]:
    sizes = [c] * (n // c) + ([n % c] if n % c else [])
    if len(sizes) > 1 and sizes[-1] < MIN_CHUNK:
        sizes[-2] += sizes.pop()
    return tuple(sizes) or (n,)


def plan_chunks(shape: Sequence[int], stored: Sequence[int] | None = None) -> tuple[tuple[int, ...], ...]:
    """Block sizes for an array ``([lead...,] Y, X)``: about ``CHUNK_EDGE`` per side in Y and X, as a
    multiple of the stored chunk (so no stored chunk is decoded twice), leading axes filled up to
    ``BLOCK_ELEMENTS``."""
    shape = tuple(int(s) for s in shape)
    nd = len(shape)
    if nd < 2:
        return tuple((max(s, 1),) for s in shape)
    out: list[tuple[int, ...]] = []
    edges = []
    for ax in (nd - 2, nd - 1):
        base = max(1, min(int(stored[ax]) if stored else 1, shape[ax]))
        c = max(base, (CHUNK_EDGE // base) * base)
        edges.append(_split(shape[ax], min(c, shape[ax])))
    plane = max(edges[0]) * max(edges[1])
    lead = max(1, BLOCK_ELEMENTS // plane)
    for ax in range(nd - 2):
        out.append(_split(shape[ax], min(shape[ax], lead)) if ax == nd - 3 else (1,) * shape[ax])
    return tuple(out) + tuple(edges)


def _kept_axes(shape: Sequence[int]) -> list[int]:
    return [i for i, s in enumerate(shape) if s != 1]


def _as_dask(arr: Any, axes: Sequence[int], chunks: Sequence[Sequence[int]], name: str) -> Any:
    """``arr`` with only ``axes`` kept (the others are singletons), in that order, as a dask array."""
    import dask.array as da
    from dask.base import tokenize

    raw_chunks: list[Any] = [1] * arr.ndim
    for final_ax, ax in enumerate(axes):
        raw_chunks[ax] = tuple(chunks[final_ax])
    token = tokenize(name, tuple(arr.shape), raw_chunks)
    if _is_zarr(arr):
        d = da.from_zarr(arr, chunks=tuple(raw_chunks), name=f"zarr-{token}")
    else:
        d = da.from_array(arr, chunks=tuple(raw_chunks), name=f"array-{token}")
    d = d[tuple(slice(None) if i in axes else 0 for i in range(arr.ndim))]
    order = sorted(axes)
    perm = [order.index(ax) for ax in axes]
    return d.transpose(perm) if perm != sorted(perm) else d


def _is_zarr(arr: Any) -> bool:
    return type(arr).__module__.split(".")[0] == "zarr"


def _file_token(path: Path) -> str:
    try:
        st = os.stat(path)
        return f"{path}-{st.st_mtime_ns}-{st.st_size}"
    except OSError:
        return str(path)


def _align(pshape: Sequence[int], gshape: Sequence[int], ppath: Any, gpath: Any) -> tuple[list[int], list[int]]:
    """Kept axes of prediction and groundtruth, in matching order (singletons squeezed)."""
    pk, gk = _kept_axes(pshape), _kept_axes(gshape)
    ps, gs = [pshape[i] for i in pk], [gshape[i] for i in gk]
    if ps == gs:
        return pk, gk
    if len(ps) == len(gs) >= 3 and gs[-1] == ps[0] and gs[:-1] == ps[1:]:
        return pk, gk[-1:] + gk[:-1]  # groundtruth stored channel-last, prediction channel-first
    raise DataError(
        f"prediction {ppath} has shape {tuple(pshape)} but groundtruth {gpath} has shape {tuple(gshape)}; "
        "they must match after dropping singleton axes (re-run predict on this image, or fix the groundtruth)"
    )


def open_pair(prediction: str | Path, groundtruth: str | Path, clean: tuple = ()) -> Pair:
    """Open a prediction / groundtruth pair lazily as aligned dask arrays with the same blocks;
    ``clean`` (``clean_spec``) is applied to the groundtruth."""
    ppath, gpath = Path(prediction), Path(groundtruth)
    p, g = open_lazy(ppath), open_lazy(gpath)
    pk, gk = _align(p.shape, g.shape, ppath, gpath)
    stored = _stored_chunks(p)
    chunks = plan_chunks([p.shape[i] for i in pk], [stored[i] for i in pk] if stored else None)
    return Pair(
        _as_dask(p, pk, chunks, _file_token(ppath)),
        clean_groundtruth(_as_dask(g, gk, chunks, _file_token(gpath)), clean),
        ppath,
        gpath,
        Window(str(ppath), tuple(pk), p.ndim),
        Window(str(gpath), tuple(gk), g.ndim, clean),
    )


def _open_like(path: str | Path, shape: Sequence[int], what: str, partner: Any) -> Any:
    """A map (e.g. uncertainty) of ``shape`` after squeezing, as a dask array."""
    path = Path(path)
    a = open_lazy(path)
    keep = _kept_axes(a.shape)
    if [a.shape[i] for i in keep] != [s for s in shape if s != 1]:
        raise DataError(
            f"{what} {path} has shape {tuple(a.shape)} but the prediction {partner} has shape {tuple(shape)}; "
            "they must match after dropping singleton axes"
        )
    stored = _stored_chunks(a)
    chunks = plan_chunks([a.shape[i] for i in keep], [stored[i] for i in keep] if stored else None)
    return _as_dask(a, keep, chunks, _file_token(path))


# ---------------------------------------------------------------- per-block / per-image work


def _block_state(p: np.ndarray, g: np.ndarray, task: Any, num_classes: int, where: str) -> Any:
    try:
        return task.block_state(p, g, num_classes)
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None


def _image_state(blocks: list) -> tuple[Any, dict]:
    state = sum(blocks)
    return state, state.finalize()


def _instance_image(prediction: Any, groundtruth: Any, want_views: bool) -> tuple[Any, dict, dict | None]:
    """Whole-image instance metrics (matching needs the whole label image, see module docstring)."""
    pred = np.squeeze(read_raw(prediction))
    gt = read_instance_masks([Path(p) for p in groundtruth]) if isinstance(groundtruth, (list, tuple)) else read_raw(groundtruth)
    gt = np.squeeze(gt)
    if pred.shape != gt.shape:
        gname = f"{len(groundtruth)} masks in {Path(groundtruth[0]).parent}" if isinstance(groundtruth, (list, tuple)) else groundtruth
        raise DataError(
            f"prediction {prediction} has shape {pred.shape} but groundtruth {gname} has shape {gt.shape}; "
            "they must match after dropping singleton axes"
        )
    try:
        ov = M.instance_iou(pred, gt)
    except ValueError as e:
        raise DataError(f"{prediction} / {groundtruth}: {e}") from None
    state = M.InstanceState.from_iou(ov)
    metrics = {**state.finalize(), "n_gt": float(state.n_gt), "n_pred": float(state.n_pred)}
    views = None
    if want_views:
        views = {k: _take_views(a) for k, a in (("prediction", pred), ("groundtruth", gt))}
    return state, metrics, views


def _ssim_block(pred: Window, gt: Window, core: tuple[slice, ...], shape: tuple[int, ...], data_range: float, win: int) -> np.ndarray:
    """``[sum, count]`` of the SSIM map over one block's core, read with a margin of half a window.

    The margin gives every core pixel its full window, so the block's map equals the whole image's
    map there; pixels within half a window of the image border are left out, as skimage does.
    """
    pad = (win - 1) // 2
    ext = list(core)
    for ax in (-2, -1):
        ext[ax] = slice(max(core[ax].start - pad, 0), min(core[ax].stop + pad, shape[ax]))
    smap = M.ssim_map(pred.read(ext), gt.read(ext), data_range, win)
    keep = [slice(None)] * (len(shape) - 2)
    for ax in (-2, -1):
        lo = max(core[ax].start, pad)
        hi = min(core[ax].stop, shape[ax] - pad)
        keep.append(slice(lo - ext[ax].start, max(hi - ext[ax].start, lo - ext[ax].start)))
    part = smap[tuple(keep)]
    return np.array([part.sum(dtype=np.float64), part.size], dtype=np.float64)


def _ratio(parts: list) -> float:
    total = np.sum(parts, axis=0)
    return float(total[0] / total[1]) if total[1] else math.nan


def _ssim_lazy(pair: Pair, data_range: float) -> Any:
    """Mean SSIM of a pair as a Delayed, block by block; equals :func:`metrics.ssim` of the whole arrays.

    Not ``dask.array.map_overlap``: its overlap tasks share source blocks with their neighbours, and
    at 16384^2 the scheduler then held ~1.7 GB; independent window reads keep to a few blocks.
    """
    from itertools import product

    from dask import delayed

    shape = tuple(pair.pred.shape)
    win = M.ssim_window(shape) if len(shape) >= 2 else 0
    if not win or not data_range or not math.isfinite(data_range):
        return delayed(math.nan)  # constant groundtruth or tiny planes: SSIM undefined
    bounds = [np.cumsum((0,) + c) for c in pair.pred.chunks]
    parts = [
        delayed(_ssim_block, pure=True)(
            pair.pred_window, pair.gt_window, tuple(slice(int(b[i]), int(b[i + 1])) for b, i in zip(bounds, idx)),
            shape, float(data_range), win,
        )
        for idx in product(*(range(len(c)) for c in pair.pred.chunks))
    ]
    return delayed(_ratio, pure=True)(parts)


# ---------------------------------------------------------------- figure views


def _view_index(shape: Sequence[int]) -> tuple[tuple, tuple | None]:
    """Index of a strided middle ``(Y, X)`` plane and, for 3-D arrays, of an x-z plane at mid Y."""
    nd = len(shape)
    if nd < 2:
        return (slice(None),) * nd, None
    s = max(1, math.ceil(max(shape[-2], shape[-1]) / VIEW_EDGE))
    yx = tuple(n // 2 for n in shape[:-2]) + (slice(None, None, s), slice(None, None, s))
    xz = None
    if nd == 3 and shape[0] > 1:
        xz = (slice(None), shape[1] // 2, slice(None, None, s))
    return yx, xz


def _take_views(a: Any) -> dict[str, Any]:
    yx, xz = _view_index(a.shape)
    out = {"yx": a[yx]}
    if xz is not None:
        out["xz"] = a[xz]
    return out


def _input_views(path: str | Path, target_shape: Sequence[int] | None) -> dict[str, Any] | None:
    """Strided display planes of an input image: RGB kept, else the first channel (middle one for
    many channels, e.g. z-slices stored as channels); a volume gives a middle slice and an x-z view."""
    try:
        a = open_lazy(path)
        tshape = [s for s in target_shape if s != 1] if target_shape is not None else None
        dims = len(tshape) if tshape is not None and len(tshape) in (2, 3) else None
        axes = infer_axes(a.shape, tshape, dims)
    except (ValueError, OSError):
        return None
    shape = dict(zip(axes, a.shape))
    s = max(1, math.ceil(max(shape["Y"], shape["X"]) / VIEW_EDGE))
    rgb = axes.endswith("C") and shape["C"] in (3, 4)

    def index(z: Any, y: Any) -> tuple:
        idx = []
        for ax in axes:
            if ax == "C":
                idx.append(slice(0, 3) if rgb else (shape["C"] // 2 if shape["C"] > 4 else 0))
            elif ax == "Z":
                idx.append(z)
            elif ax == "Y":
                idx.append(y)
            else:
                idx.append(slice(None, None, s))
        return tuple(idx)

    out = {"yx": np.asarray(a[index(shape.get("Z", 1) // 2, slice(None, None, s))])}
    if "Z" in shape and shape["Z"] > 1:
        out["xz"] = np.asarray(a[index(slice(None), shape["Y"] // 2)])
    return out


# ---------------------------------------------------------------- pixel tasks


@dataclass
class _Evaluation:
    summary: dict
    per_image: Any  # pandas.DataFrame
    metric_columns: list[str]
    uncertainty: dict | None
    figures: Any  # report.FigureInputs
    notes: list[str] = field(default_factory=list)


def _check_pixel_items(task: Any, items: list[dict]) -> None:
    problems: list[str] = []
    seen: set[str] = set()
    for i, it in enumerate(items):
        name = it.get("name")
        if not name:
            problems.append(f"item {i}: no 'name'")
        elif name in seen:
            problems.append(f"item {i}: name '{name}' used twice; names must be unique")
        seen.add(str(name))
        for key in ("prediction", "groundtruth"):
            v = it.get(key)
            if v is None:
                problems.append(f"{name}: no '{key}' path")
                continue
            paths = v if isinstance(v, (list, tuple)) else [v]
            if isinstance(v, (list, tuple)) and not (task.groundtruth_masks and key == "groundtruth"):
                problems.append(f"{name}: '{key}' is a list; only instance groundtruth may be per-object masks")
            if not paths:
                problems.append(f"{name}: '{key}' is an empty list of masks")
            for p in paths:
                if not Path(p).exists():
                    problems.append(f"{name}: {key} file {p} does not exist")
        for key in ("image", "uncertainty"):
            v = it.get(key)
            if v is not None and not Path(v).exists():
                problems.append(f"{name}: {key} file {v} does not exist")
    if problems:
        raise DataError(problems, title="Cannot evaluate")


def _evaluate_pixels(task: Any, items: list[dict], num_classes: int, compute_kw: dict) -> _Evaluation:
    import pandas as pd
    from dask import delayed

    from instantdl_ray.evaluation.report import FigureInputs, Panel

    _check_pixel_items(task, items)
    # shapes come from file headers: every mismatch is reported before any pixel is read
    opened: list[Pair | None] = []
    uncs: list[Any] = []
    problems: list[str] = []
    for it in items:
        pair, u = None, None
        try:
            if not task.whole_image_evaluation:
                pair = open_pair(it["prediction"], it["groundtruth"], clean_spec(it.get("target_clean")))
            ref_shape = pair.pred.shape if pair is not None else open_lazy(it["prediction"]).shape
            if it.get("uncertainty") is not None:
                u = _open_like(it["uncertainty"], ref_shape, "uncertainty", it["prediction"])
        except DataError as e:
            problems += e.problems
        opened.append(pair)
        uncs.append(u)
    if problems:
        raise DataError(problems, title="Cannot evaluate")

    jobs: list[dict] = []
    pairs: list[Pair | None] = []
    ref_shapes: list[tuple[int, ...]] = []  # squeezed prediction shapes, to orient the input image
    for i, (it, pair, u) in enumerate(zip(items, opened, uncs)):
        want = i < MAX_FIGURES
        job: dict[str, Any] = {}
        if task.whole_image_evaluation:
            job["result"] = delayed(_instance_image, pure=True)(it["prediction"], it["groundtruth"], want)
            ref_shape = open_lazy(it["prediction"]).shape
        else:
            ref_shape = pair.pred.shape
            where = f"{it['prediction']} / {it['groundtruth']}"
            blocks = [
                delayed(_block_state, pure=True)(pb, gb, task, num_classes, where)
                for pb, gb in zip(pair.pred.to_delayed().ravel(), pair.gt.to_delayed().ravel())
            ]
            job["result"] = delayed(_image_state, pure=True)(blocks)
            if want:
                job["views"] = {"prediction": _take_views(pair.pred), "groundtruth": _take_views(pair.gt)}
        if u is not None:
            job["uncertainty"] = u.mean(dtype=np.float64)
            if want:
                job["unc_views"] = _take_views(u)
        pairs.append(pair)
        ref_shapes.append(tuple(s for s in ref_shape if s != 1))
        jobs.append(job)

    done = _compute_all(jobs, compute_kw)

    states, rows = [], []
    for it, job in zip(items, done):
        state, m = job["result"][:2]
        states.append(state)
        rows.append({"name": it["name"], **m})

    notes: list[str] = list(task.evaluation_notes)
    if "ssim" in task.image_metrics:
        # second pass: SSIM needs each groundtruth's value range, known only after the first
        ssims = _compute_all([_ssim_lazy(p, s.data_range) for p, s in zip(pairs, states)], compute_kw)
        for row, v in zip(rows, ssims):
            row["ssim"] = float(v)
        notes.append("ssim: 2-D SSIM per (Y, X) plane (skimage, 7-pixel window, data_range from the groundtruth), mean over planes and images")

    has_unc = any("uncertainty" in j for j in done)
    if has_unc:
        for row, job in zip(rows, done):
            row["uncertainty"] = float(job["uncertainty"]) if "uncertainty" in job else math.nan

    per_image = pd.DataFrame(rows)
    metric_columns = [c for c in per_image.columns if c not in ("name", "uncertainty", *NOT_BOOTSTRAPPED)]
    summary = sum(states).finalize()
    if "ssim" in task.image_metrics:
        summary["ssim"] = _nanmean(per_image["ssim"])

    uncertainty = None
    err = np.array([task.per_image_error(r) for r in rows], dtype=np.float64)
    unc = per_image["uncertainty"].to_numpy(dtype=np.float64) if has_unc else None
    if has_unc:
        uncertainty = {
            "per_image_mean": _nanmean(unc),
            "spearman_uncertainty_vs_error": M.uncertainty_error_correlation(unc, err),
            "error": task.error_metric[1] + " per image",
            "n_images": int(np.isfinite(unc).sum()),
        }

    panels = []
    for it, job, ref_shape in zip(items, done, ref_shapes):
        if len(panels) >= MAX_FIGURES:
            break
        views = job["result"][2] if task.whole_image_evaluation else job.get("views")
        if views is None:
            continue
        pv, gv = task.display_views(views["prediction"], views["groundtruth"], num_classes)
        layers: dict[str, dict[str, np.ndarray]] = {}
        if it.get("image") is not None:
            iv = _input_views(it["image"], ref_shape)
            if iv is not None:
                layers["input"] = iv
        layers["groundtruth"] = gv
        layers["prediction"] = pv
        layers["error"] = {k: task.error_view(np.asarray(pv[k]), np.asarray(gv[k]), num_classes) for k in pv}
        if "unc_views" in job:
            layers["uncertainty"] = job["unc_views"]
        panels.append(Panel(name=str(it["name"]), layers=layers))

    figures = FigureInputs(
        panels=panels,
        uncertainty=unc,
        error=err if has_unc else None,
        error_label=task.error_metric[1],
        label_kind=task.label_kind,
        error_legend=task.error_legend(num_classes),
    )
    return _Evaluation(summary, per_image, metric_columns, uncertainty, figures, notes)


def _identity(x: Any) -> Any:
    return x


def _compute_all(objs: list, compute_kw: dict) -> list:
    """Compute a list of (nested) dask objects in one graph, one Delayed per entry.

    dask 2026.8 hands back results in the wrong places when one ``compute`` call gets nested
    containers that mix Delayed and Array collections; wrapping each entry in a Delayed keeps
    the call homogeneous (and still shares reads between entries).
    """
    import dask
    from dask import delayed

    (out,) = dask.compute([delayed(_identity, pure=True)(o) for o in objs], **compute_kw)
    return list(out)


def _nanmean(v: Any) -> float:
    a = np.asarray(v, dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else math.nan


# ---------------------------------------------------------------- classification


def _prob_columns(columns: Sequence[str], class_names: dict[int, str] | None) -> tuple[list[str], list[int], list[str]]:
    """``prob_<class>`` columns -> (columns, class index per column, problems).

    ``<class>`` is a class name from ``class_names`` or an integer index; otherwise columns are taken
    in order (class 0 first)."""
    cols = [c for c in columns if str(c).startswith("prob_")]
    by_name = {str(v): k for k, v in (class_names or {}).items()}
    idx: list[int] = []
    for c in cols:
        suffix = str(c)[len("prob_"):]
        if suffix in by_name:
            idx.append(by_name[suffix])
        elif suffix.lstrip("-").isdigit():
            idx.append(int(suffix))
        else:
            idx = list(range(len(cols)))
            break
    problems = []
    if sorted(idx) != list(range(len(cols))):
        problems.append(f"prob_ columns {cols} do not cover classes 0..{len(cols) - 1} once each")
    return cols, idx, problems


def _evaluate_classification(run_dir: Path, items: list[dict], class_names: dict[int, str] | None) -> _Evaluation:
    import pandas as pd

    from instantdl_ray.evaluation.report import FigureInputs

    csv_path = run_dir / "predictions" / "predictions.csv"
    if not csv_path.exists():
        raise DataError(f"{csv_path}: missing; run predict first (it writes filename, prediction, prob_<class>...)")
    df = pd.read_csv(csv_path)
    problems: list[str] = []
    if "filename" not in df.columns:
        problems.append(f"{csv_path}: no 'filename' column (columns: {list(df.columns)})")
    cols, col_class, col_problems = _prob_columns(list(df.columns), class_names)
    problems += [f"{csv_path}: {p}" for p in col_problems]
    if len(cols) < 2:
        problems.append(f"{csv_path}: needs one prob_<class> column per class (at least 2), found {cols}")
    if problems:
        raise DataError(problems, title="Cannot evaluate")

    k = len(cols)
    names = {c: (class_names or {}).get(c, str(cols[col_class.index(c)])[len("prob_"):]) for c in range(k)}
    rows_by_file = {str(f): i for i, f in enumerate(df["filename"])}
    rows_by_stem = {Path(str(f)).stem: i for i, f in enumerate(df["filename"])}
    order, labels = [], []
    for it in items:
        name = str(it.get("name"))
        r = rows_by_file.get(name, rows_by_file.get(Path(name).name, rows_by_stem.get(Path(name).stem)))
        if r is None:
            problems.append(f"{name}: no row in {csv_path}")
            continue
        try:
            y = int(it["groundtruth"])
        except (KeyError, TypeError, ValueError):
            problems.append(f"{name}: groundtruth {it.get('groundtruth')!r} is not an integer class")
            continue
        if not 0 <= y < k:
            problems.append(f"{name}: groundtruth class {y} outside 0..{k - 1} ({k} prob_ columns in {csv_path})")
            continue
        order.append(r)
        labels.append(y)
    if problems:
        raise DataError(problems, title="Cannot evaluate")

    prob = np.zeros((len(order), k), dtype=np.float64)
    for j, c in enumerate(cols):
        prob[:, col_class[j]] = df[c].to_numpy(dtype=np.float64)[order]
    y = np.asarray(labels, dtype=np.int64)
    summary = M.classification_metrics(y, prob, names)
    pred = prob.argmax(axis=1)
    onehot = np.eye(k)[y]
    p_true = prob[np.arange(y.size), y]
    per_image = pd.DataFrame(
        {
            "name": [str(it["name"]) for it in items],
            "groundtruth": y,
            "prediction": pred,
            "correct": (pred == y).astype(np.float64),
            "prob_true": p_true,
            "prob_mae": np.abs(onehot - prob).mean(axis=1),
            "prob_mse": ((onehot - prob) ** 2).mean(axis=1),
            **{f"prob_{names[c]}": prob[:, c] for c in range(k)},
        }
    )
    err = 1.0 - p_true
    uncertainty: dict[str, Any] = {"ece": M.expected_calibration_error(y, prob), "ece_bins": 10}
    unc = None
    if "uncertainty" in df.columns:
        unc = df["uncertainty"].to_numpy(dtype=np.float64)[order]
        per_image["uncertainty"] = unc
        correct = pred == y
        uncertainty.update(
            {
                "spearman_uncertainty_vs_error": M.uncertainty_error_correlation(unc, err),
                "error": "1 - probability of the true class",
                "mean_uncertainty_correct": _nanmean(unc[correct]),
                "mean_uncertainty_wrong": _nanmean(unc[~correct]),
            }
        )

    # ROC curves for the figure: the positive class only for K = 2, else one-vs-rest per class
    roc = {}
    for c in ([1] if k == 2 else range(k)):
        fpr, tpr = M.roc_curve(y == c, prob[:, c])
        if fpr.size:
            roc[names[c]] = (fpr, tpr)
    thumbs = []
    for it, yi, pi in zip(items, y, pred):
        if len(thumbs) >= MAX_FIGURES:
            break
        if it.get("image") is not None and Path(it["image"]).exists():
            v = _input_views(it["image"], None)
            if v is not None:
                thumbs.append((str(it["name"]), v["yx"], names[int(yi)], names[int(pi)]))
    figures = FigureInputs(
        uncertainty=unc,
        error=err if unc is not None else None,
        error_label="1 - probability of the true class",
        roc=roc,
        roc_auc=summary["roc_auc_per_class"],
        confusion=np.asarray(summary["confusion_matrix"]),
        class_names=[names[c] for c in range(k)],
        thumbnails=thumbs,
    )
    metric_columns = ["correct", "prob_mae", "prob_mse"]
    return _Evaluation(summary, per_image, metric_columns, uncertainty, figures)


# ---------------------------------------------------------------- results and files


def _results(task: Any, ev: _Evaluation, draws: int) -> dict:
    from instantdl_ray.evaluation.metrics import bootstrap

    name = task.metric_names.get
    per_image_mean = {name(c, c): _nanmean(ev.per_image[c]) for c in ev.metric_columns}
    boot = {name(c, c): bootstrap(ev.per_image[c].to_numpy(dtype=np.float64), n_draws=draws)
            for c in ev.metric_columns}
    metric = task.headline
    if task.headline_per_image:
        headline = {"metric": metric, "value": per_image_mean[metric], "aggregation": task.headline_aggregation}
    else:
        headline = {"metric": metric, "value": ev.summary.get(metric), "aggregation": "pooled over the test set"}
    out = {
        "task": task.name,
        "n_images": int(len(ev.per_image)),
        "headline": headline,
        "summary": ev.summary,
        "per_image_mean": per_image_mean,
        "bootstrap": boot,
        "bootstrap_settings": {"n_draws": int(draws), "frac": 0.5, "seed": 0, "statistic": "mean of a random half, without replacement"},
    }
    if ev.uncertainty is not None:
        out["uncertainty"] = ev.uncertainty
    if ev.notes:
        out["notes"] = ev.notes
    out["files"] = {"per_image": "per_image.csv", "report": "report.html"}
    return out


def write_prediction_stack(path: Path, predictions: Sequence[str | Path]) -> Path:
    """All predictions as one ``(N, [C|Z,] Y, X)`` TIFF (``write.write_stack``), read lazily."""
    return write.write_stack(path, [open_lazy(p) for p in predictions])


# ---------------------------------------------------------------- small helpers


def _task(task: Any) -> Any:
    """The task object of a name (any spelling a config may use) or the task itself."""
    from instantdl_ray.registry import UnknownNameError
    from instantdl_ray.tasks import Task, get_task

    if isinstance(task, Task):
        return task
    try:
        return get_task(task)
    except UnknownNameError as e:
        raise ConfigError(str(e)) from None


def _compute_kwargs(scheduler: str) -> dict:
    if scheduler in ("threads", "synchronous"):
        return {"scheduler": scheduler}
    if scheduler == "ray":
        # only when asked: Ray is heavy to import and needs a running (or startable) cluster
        from ray.util.dask import ray_dask_get

        return {"scheduler": ray_dask_get}
    raise ConfigError(f"evaluation scheduler '{scheduler}' is not one of {list(SCHEDULERS)}")
