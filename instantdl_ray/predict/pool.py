"""Distributed prediction with Monte-Carlo dropout on a pool of Ray actors, stitched per image.

``Predictor`` is a plain callable class (testable on one batch without Ray); Ray's
``map_batches`` runs it on an actor pool, each actor loading the weights once.

Memory: the driver consumes tiles as Ray Data streams them (``iter_batches``; Ray Data's
backpressure bounds what waits in the object store) and adds each to its image's accumulator.
Images above ``stitch.IN_MEMORY_LIMIT`` pixels are stitched, finalised and written block by
block (``_write_blockwise``): ``predictions/<stem>.zarr`` plus a tiled BigTIFF
``predictions/<stem>.tif`` (and the same under ``uncertainty/``), so no whole-image array is
ever in RAM. Tasks opt in with ``finalize_stats`` / ``finalize_block`` (semantic, regression);
Mask R-CNN label images are merged in zarr and written blockwise too. The U-Net instance task
(watershed over the whole image) still finalises whole images: its RAM grows with the image.
Small images keep the in-memory path (``_write_pixel``: one plain TIFF each).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np

from instantdl_ray.io import read, write
from instantdl_ray.config.plan import Plan
from instantdl_ray.predict.inputs import OUTPUT_KEYS, output_pixel_size


class Predictor:
    """``map_batches`` class: image tiles ``(B, C, *tile)`` -> task outputs, T MC passes each."""

    def __init__(self, plan: dict, state_dict: Any, passes: int, torch_threads: int = 1, use_gpu: bool = False):
        if "torch" not in sys.modules:
            # The actor's torch threads share the cores with the driver's stitching and the tile
            # reads. With OpenMP's default spinning barriers, 2 threads on a busy 2-core machine
            # ran a forward pass 10-30x slower than 1 thread; PASSIVE waits remove that. libgomp
            # reads this when torch loads it, so only before the first torch import counts.
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        import torch

        from instantdl_ray.tasks import get_task

        torch.set_num_threads(max(1, int(torch_threads)))
        if isinstance(state_dict, list):  # [ObjectRef]: nested, so Ray hands the reference over untouched
            import ray

            state_dict = ray.get(state_dict[0])
        if isinstance(state_dict, (bytes, bytearray, memoryview)):  # the checkpoint file's bytes
            import io

            state_dict = load_state_dict(io.BytesIO(state_dict))
        self.plan = Plan.from_json(plan)
        self.task = get_task(self.plan.task)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = self.task.build_model(self.plan)
        try:
            self.model.load_state_dict(state_dict)
        except Exception as e:  # a user's error, not a lost actor: raised as such, never retried
            from instantdl_ray.errors import WeightsError

            raise WeightsError([f"{MODEL_MARK}{e}".splitlines()[0][:500]]) from None
        self.model.to(self.device).eval()
        self.passes = int(passes)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        # batches from the object store are read-only views; torch wants writable memory
        x = torch.from_numpy(np.require(batch["image"], np.float32, ["C", "W"])).to(self.device)
        if self.device.type == "cuda":  # mixed precision on GPU, as in training; stitching stays float32
            with torch.autocast("cuda", dtype=torch.float16):
                out = self.task.predict_batch(self.model, x, self.passes)
            out = {k: v.astype(np.float32) if getattr(v, "dtype", None) == np.float16 else v for k, v in out.items()}
        else:
            out = self.task.predict_batch(self.model, x, self.passes)
        out["image_index"] = np.asarray(batch["image_index"])
        out["tile_index"] = np.asarray(batch["tile_index"])
        return out


MODEL_MARK = "the checkpoint does not fit the planned model: "


def checkpoint_problem(path: Path) -> str | None:
    """Why the model file ``path`` cannot be loaded, or None; read without torch. ``torch.save``
    writes a zip archive: a truncated file has no readable directory, a damaged one fails a
    member's CRC. (Whether its tensors fit the model shows when the actors load it.)"""
    import zipfile

    path = Path(path)
    if not path.is_file():
        return "missing"
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
            if bad is not None:
                return f"damaged: member '{bad}' fails its checksum"
            if not any(n.endswith("data.pkl") for n in z.namelist()):
                return "not a PyTorch checkpoint (no data.pkl)"
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"truncated or not a PyTorch checkpoint ({type(e).__name__}: {e})"
    return None


def model_file_error(path: Path, why: str):
    """The ``WeightsError`` for a run's unusable model file: the file, why, and what to do."""
    from instantdl_ray.errors import WeightsError

    run_dir = Path(path).parents[2] if len(Path(path).parents) > 2 else Path(path).parent
    return WeightsError([f"{path}: {why}; 'python -m instantdl_ray run --resume {run_dir} --force' exports it "
                         "again from the last training checkpoint, else retrain, or predict with another run's model"],
                        title="Cannot use the trained model")


def load_state_dict(path: Path | BinaryIO) -> dict:
    """A saved state dict (a path or an open binary file), onto the CPU."""
    import torch

    return torch.load(path, map_location="cpu")


RECORDS = ".records"  # predictions/.records/<stem>.json: one per image written, until index.json


def _done_records(pred_dir: Path, samples: list[read.Sample]) -> dict[str, dict]:
    """Records of ``samples`` whose outputs an earlier prediction into ``pred_dir`` finished."""
    return done_records(pred_dir, {s.stem: s.image for s in samples})


def done_records(pred_dir: Path, images: dict[str, Path]) -> dict[str, dict]:
    """Records of ``images`` (output name -> input file) whose outputs an earlier prediction into
    ``pred_dir`` wrote completely, from the same input file: an interrupted one's per-image marks,
    or a finished one's ``index.json``."""
    index = pred_dir / "index.json"
    finished = {r.get("name"): r for r in json.loads(index.read_text())} if index.exists() else {}
    done = {}
    for name, image in images.items():
        path = pred_dir / RECORDS / f"{name}.json"
        rec = json.loads(path.read_text()) if path.exists() else finished.get(name)
        if (rec and Path(rec.get("image", "")).resolve() == Path(image).resolve()
                and all(Path(rec[k]).exists() for k in OUTPUT_KEYS if isinstance(rec.get(k), str))):
            done[name] = rec
    return done


def _save_record(pred_dir: Path, rec: dict) -> None:
    """After all of an image's files: its record, the mark that it is done (atomic)."""
    write.write_json(pred_dir / RECORDS / f"{rec['name']}.json", rec, indent=None)


def finish_records(pred_dir: Path, records: list[dict]) -> None:
    """``predictions/index.json`` for the whole set; the per-image marks are then dropped."""
    import shutil

    write.write_json(pred_dir / "index.json", records, indent=1)
    shutil.rmtree(pred_dir / RECORDS, ignore_errors=True)


def predict(cfg, plan: Plan, samples: list[read.Sample], shapes: dict, model_path: Path, out_dir: Path,
            resources, log=print, reuse: bool = False, masks: dict | None = None,
            on_record: Callable[[dict], None] | None = None) -> list[dict]:
    """Predict ``samples`` with the model at ``model_path``; write outputs under ``out_dir``.

    ``masks``: per image path, a slide's tissue mask (``data.tissue.TissueMask``): only the tiles
    that touch tissue are predicted, and background pixels get the background value.
    ``on_record``: called with each image's record once its outputs are written (records carry
    the tiles predicted and the seconds from its first tile to its last file).

    Returns one record per image: name, prediction/uncertainty paths (pixel tasks) or the
    class, probabilities and uncertainty (classification). With ``reuse`` (a resumed run), images
    whose outputs an interrupted prediction already wrote are kept, not predicted again.
    """
    import ray

    from instantdl_ray.data.dataset import grid_rows, patch_grid, ray_dataset, spatial_shape
    from instantdl_ray.predict.stitch import ImageAccumulator
    from instantdl_ray.predict.tilemap import TileMap, write_tile_map
    from instantdl_ray.tasks import get_task
    from instantdl_ray.data.tile import grid_overlap, tile_grid

    why = checkpoint_problem(model_path)
    if why is not None:  # said before any actor starts, and before predictions/ exists
        raise model_file_error(model_path, why)
    task = get_task(plan.task)
    pred_dir, unc_dir = out_dir / "predictions", out_dir / "uncertainty"
    slides = plan.extra.get("slides", {})
    mapped = {str(s.image) for s in samples if not task.pixelwise and str(s.image) in slides}  # tile maps
    done = _done_records(pred_dir, [s for s in samples if task.pixelwise or str(s.image) in mapped]) if reuse else {}
    records: list[dict] = list(done.values())
    if done:
        log(f"{len(done)} of {len(samples)} images were predicted before the interruption: kept")
    samples = [s for s in samples if s.stem not in done]
    if not samples:
        return sorted(records, key=lambda r: r["name"])
    passes = cfg.mc_passes if cfg.calculate_uncertainty and get_task(plan.task).mc_dropout(plan) else 1
    masks = masks or {}
    ov = grid_overlap(plan, cfg.tile_overlap)
    grids = {str(s.image): tile_grid(tuple(spatial_shape(shapes[str(s.image)], plan.axes)), tuple(plan.tile_shape), ov)
             for s in samples if task.pixelwise}
    grids.update({str(s.image): patch_grid(plan, shapes[str(s.image)]) for s in samples if str(s.image) in mapped})
    keep = {k: m.tiles(grids[k]) or list(range(len(grids[k]))) for k, m in masks.items() if k in grids}
    for s in samples:
        if str(s.image) in keep:
            log(f"{s.stem}: {len(keep[str(s.image)])} of {len(grids[str(s.image)])} tiles touch tissue")
    rows = grid_rows(samples, shapes, plan, cfg.tile_overlap, keep=keep, grids=grids)
    ds = ray_dataset(rows, plan, with_target=False, rows_per_block=4)
    # the checkpoint's bytes, not a loaded state dict: the driver never imports torch for this
    # (~300 MB of RSS), and the actors on any node load it from the object store
    state_ref = ray.put(Path(model_path).read_bytes())
    n_actors = max(1, min(resources.predict_actors, len(rows)))
    # each actor gets its share of this node's cores (GPU actors: the worker thread count)
    threads = resources.torch_threads if resources.use_gpu else max(1, (os.cpu_count() or 1) // n_actors)
    bs = max(1, cfg.batchsize if passes == 1 else max(1, 32 // passes))
    ds = ds.map_batches(
        Predictor,
        fn_constructor_args=(plan.to_dict(), [state_ref], passes, threads, resources.use_gpu),
        batch_size=bs,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=n_actors),
        num_gpus=1 if resources.use_gpu else 0,
        num_cpus=0 if resources.use_gpu else actor_cpus(n_actors, resources.cluster_cpus),
    )
    log(f"predicting {len(samples)} images ({len(rows)} tiles) on {n_actors} actor(s), "
        f"{passes} Monte-Carlo pass{'es' if passes > 1 else ''} per tile")
    accs: dict[int, ImageAccumulator] = {}
    maps: dict[int, TileMap] = {}
    started: dict[int, float] = {}

    def _finish(rec: dict, seconds: float) -> None:  # a slide or pixel image, all its files written
        rec["seconds"] = round(seconds, 1)
        records.append(rec)
        if on_record is not None:
            on_record(rec)
        _save_record(pred_dir, rec)
    done_tiles, t0, last = 0, time.time(), 0.0
    for batch in _batches(ds, model_path):
        pred_dir.mkdir(parents=True, exist_ok=True)  # with the first outputs: a failed start leaves none
        for j in range(len(batch["image_index"])):
            idx, t_idx = int(batch["image_index"][j]), int(batch["tile_index"][j])
            s = samples[idx]
            outputs = {k: v[j] for k, v in batch.items() if k not in ("image_index", "tile_index")}
            if not task.pixelwise and str(s.image) not in mapped:
                records.append(_write_classification(s, task.finalize(outputs, plan)))
                done_tiles += 1
                continue
            if str(s.image) in mapped:  # one patch of a slide's class map
                if idx not in maps:
                    started[idx] = time.time()
                    maps[idx] = TileMap(grids[str(s.image)], keep.get(str(s.image)), plan.num_classes)
                done_tiles += 1
                if maps[idx].add(t_idx, outputs):
                    rec = write_tile_map(s, maps.pop(idx), plan, pred_dir, slides[str(s.image)])
                    _finish(rec, time.time() - started.pop(idx))
                continue
            if idx not in accs:
                started[idx] = time.time()
                sp = tuple(spatial_shape(shapes[str(s.image)], plan.axes))
                accs[idx] = ImageAccumulator(sp, grids[str(s.image)], tuple(plan.tile_shape),  # the grid grid_rows read
                                             scratch=out_dir / ".scratch" / s.stem,
                                             keys=getattr(task, "finalize_inputs", None),
                                             active=keep.get(str(s.image)), mask=masks.get(str(s.image)))
            done_tiles += 1
            if accs[idx].add(t_idx, outputs):
                rec = write_image(s, accs.pop(idx), task, plan, pred_dir, unc_dir)
                rec["tiles"] = len(keep.get(str(s.image), grids[str(s.image)]))
                _finish(rec, time.time() - started.pop(idx))
        if time.time() - last > 10 or done_tiles == len(rows):
            last = time.time()
            rate = done_tiles / max(last - t0, 1e-9)
            log(f"  predicted {done_tiles}/{len(rows)} tiles ({rate:.1f} tiles/s), {len(records) - len(done)}/{len(samples)} images")
    pred_dir.mkdir(parents=True, exist_ok=True)  # also for an empty test set
    if not task.pixelwise:
        _write_predictions_csv(records, plan, pred_dir / "predictions.csv")
    try:
        (out_dir / ".scratch").rmdir()  # large images' stitching scratch, empty once they are written
    except OSError:
        pass
    return sorted(records, key=lambda r: r["name"])


def _batches(ds, model_path: Path):
    """``ds``'s output batches; an actor that could not load the model (its constructor raised
    ``MODEL_MARK``) becomes the package's ``WeightsError`` naming the file, not Ray's traceback."""
    try:
        yield from ds.iter_batches(batch_size=None, batch_format="numpy")
    except Exception as e:
        text = str(e)
        if MODEL_MARK not in text:
            raise
        detail = text[text.index(MODEL_MARK):].splitlines()[0]
        raise model_file_error(model_path, detail) from None


def actor_cpus(n_actors: int, cluster_cpus: float) -> float:
    """CPUs each prediction actor reserves: 1, unless that would leave no CPU for the Ray Data
    tasks that read the tiles (``ray.predict_actors`` >= the cluster's CPUs would then hang)."""
    if cluster_cpus <= 0 or cluster_cpus - n_actors >= 1:
        return 1.0
    return round(max(cluster_cpus - 1, cluster_cpus / 2) / n_actors, 3)


def write_image(s: read.Sample, acc, task, plan: Plan, pred_dir: Path, unc_dir: Path) -> dict:
    """Finalise one complete image and write its files; returns its record.

    Streaming accumulators (large images) are finalised block by block when the task supports
    it (``finalize_block``) or when they hold merged labels; anything else is finalised whole.
    """
    if acc.streaming and acc.labels is not None:
        rec = _write_labels_blockwise(s, acc, plan, pred_dir)
    elif acc.streaming and hasattr(task, "finalize_block") and acc.stitched():
        rec = _write_blockwise(s, acc, task, plan, pred_dir, unc_dir)
    else:
        rec = _write_pixel(s, task.finalize(acc.result(), plan), plan, pred_dir, unc_dir)
    acc.cleanup()
    if str(s.image) in plan.extra.get("slides", {}):
        rec.update(write_slide_outputs(s, rec, task, plan, pred_dir))
    return rec


def write_slide_outputs(s: read.Sample, rec: dict, task, plan: Plan, pred_dir: Path) -> dict:
    """A slide's outputs for pathology tools, read back lazily from its written predictions:
    ``<stem>.ome.zarr`` (NGFF 0.4: prediction and uncertainty channels with the pixel size, the
    segmentation under ``labels/prediction``) and, for segmentations, ``<stem>.geojson`` in the
    slide's level-0 pixel coordinates (``predict.shapes``)."""
    import dask.array as da

    from instantdl_ray.predict import shapes

    meta = plan.extra["slides"][str(s.image)]
    pred = read.open_array(rec["prediction"])
    unc = read.open_array(rec["uncertainty"]) if rec.get("uncertainty") else None
    channels, names = [], []
    for arr, name in ((pred, "prediction"), (unc, "uncertainty")):
        if arr is None:
            continue
        a = da.from_array(arr, chunks=(1,) * (arr.ndim - 2) + (512, 512)).astype(np.float32)
        a = a.reshape((-1,) + a.shape[-2:])
        channels.append(a)
        names += [name] if a.shape[0] == 1 else [f"{name} {k}" for k in range(a.shape[0])]
    labelled = task.target_kind == "label" and pred.ndim == 2
    out = {"ome_zarr": str(write.write_ome_zarr(pred_dir / f"{s.stem}.ome.zarr", da.concatenate(channels), names,
                                                 mpp=meta.get("mpp"), labels={"prediction": pred} if labelled else None))}
    if labelled:
        unc2d = unc if unc is not None and unc.ndim == 2 else None
        if task.label_kind == "instances":
            feats = shapes.instance_features(pred, pred_dir / f"{s.stem}_objects.csv", meta["factor"], meta.get("mpp"),
                                             plan.class_names[-1] if plan.class_names else "object", unc2d)
        else:
            feats = shapes.class_features(pred, list(plan.class_names), meta["factor"], meta.get("mpp"))
        out["geojson"] = str(shapes.write_geojson(pred_dir / f"{s.stem}.geojson", feats))
    return out


def _write_pixel(s: read.Sample, out: dict, plan: Plan, pred_dir: Path, unc_dir: Path) -> dict:
    pred = out["prediction"]
    size = output_pixel_size(s, plan)  # outputs keep the input's scale (Fiji, napari)
    # a thresholded prediction is a 0/1 mask: written with a LUT that shows it in Fiji
    path = write.write_tiff(pred_dir / f"{s.stem}.tif", pred, pixel_size=size, binary=out.get("threshold") is not None)
    rec = {"name": s.stem, "image": str(s.image), "prediction": str(path), "uncertainty": None,
           "groundtruth": s.groundtruth}
    if out.get("uncertainty") is not None:
        u = out["uncertainty"]
        rec["uncertainty"] = str(write.write_tiff(unc_dir / f"{s.stem}.tif", u.astype(np.float32), pixel_size=size))
        rec["mean_uncertainty"] = float(np.mean(u))
    if out.get("mutual_information") is not None:
        path = unc_dir / f"{s.stem}{MI_SUFFIX}.tif"
        rec["mutual_information"] = str(write.write_tiff(path, out["mutual_information"].astype(np.float32), pixel_size=size))
    if out.get("threshold") is not None:
        rec["threshold"] = out["threshold"]
    if "scores" in out and pred.ndim >= 2:
        _write_objects_csv(pred, out.get("scores") or {}, pred_dir / f"{s.stem}_objects.csv")
    elif pred.dtype == np.uint16:
        _write_objects_csv(pred, {}, pred_dir / f"{s.stem}_objects.csv")
    return rec


# ---------------------------------------------------------------- large images, block by block

MI_SUFFIX = "_mutual_information"  # uncertainty/<stem>.tif: predictive entropy; <stem>_mutual_information.tif: BALD


def _write_blockwise(s: read.Sample, acc, task, plan: Plan, pred_dir: Path, unc_dir: Path) -> dict:
    """Large image: ``task.finalize_stats`` over the stitched zarr arrays, then ``finalize_block``
    per block into ``predictions/<stem>.zarr`` (and ``uncertainty/``), then tiled BigTIFFs."""
    stitched = acc.stitched()
    blocks = acc.blocks()
    stats = task.finalize_stats(stitched, plan, blocks)
    pred_z = unc_z = mi_z = None
    u_sum, u_n = 0.0, 0
    for b in blocks:
        out = task.finalize_block({k: np.asarray(v[(slice(None),) + b]) for k, v in stitched.items()}, plan, stats)
        p = out["prediction"]
        lead = p.shape[: p.ndim - len(b)]
        if pred_z is None:
            pred_z = write.output_zarr(pred_dir / f"{s.stem}.zarr", lead, acc.shape, p.dtype)
        pred_z[(slice(None),) * len(lead) + b] = p
        u = out.get("uncertainty")
        if u is not None:
            ulead = u.shape[: u.ndim - len(b)]
            if unc_z is None:
                unc_z = write.output_zarr(unc_dir / f"{s.stem}.zarr", ulead, acc.shape, np.float32)
            unc_z[(slice(None),) * len(ulead) + b] = u
            u_sum += float(np.sum(u, dtype=np.float64))
            u_n += u.size
        mi = out.get("mutual_information")
        if mi is not None:
            if mi_z is None:
                mi_z = write.output_zarr(unc_dir / f"{s.stem}{MI_SUFFIX}.zarr", (), acc.shape, np.float32)
            mi_z[b] = mi
    size = output_pixel_size(s, plan)
    rec = {"name": s.stem, "image": str(s.image), "prediction": str(write.write_tiff_tiles(pred_dir / f"{s.stem}.tif", pred_z, size)),
           "uncertainty": None, "groundtruth": s.groundtruth, "prediction_zarr": str(pred_dir / f"{s.stem}.zarr")}
    if unc_z is not None:
        rec["uncertainty"] = str(write.write_tiff_tiles(unc_dir / f"{s.stem}.tif", unc_z, size))
        rec["uncertainty_zarr"] = str(unc_dir / f"{s.stem}.zarr")
        rec["mean_uncertainty"] = u_sum / max(u_n, 1)
    if mi_z is not None:
        rec["mutual_information"] = str(write.write_tiff_tiles(unc_dir / f"{s.stem}{MI_SUFFIX}.tif", mi_z, size))
    if stats.get("threshold") is not None:
        rec["threshold"] = stats["threshold"]
    return rec


def _write_labels_blockwise(s: read.Sample, acc, plan: Plan, pred_dir: Path) -> dict:
    """Large image with merged labels (Mask R-CNN): the label zarr block by block into
    ``predictions/<stem>.zarr`` (uint16, uint32 past 65535 objects), a tiled BigTIFF, and the
    objects table with areas and bounding boxes summed over blocks."""
    n = acc.next_label - 1
    dtype = np.uint16 if n <= np.iinfo(np.uint16).max else np.uint32
    pred_z = write.output_zarr(pred_dir / f"{s.stem}.zarr", (), acc.shape, dtype)
    nd = len(acc.shape)
    area = np.zeros(n + 1, np.int64)
    lo = np.full((nd, n + 1), np.iinfo(np.int64).max, np.int64)
    hi = np.zeros((nd, n + 1), np.int64)
    for b in acc.blocks():
        lab = np.asarray(acc.labels[b])
        pred_z[b] = lab.astype(dtype)
        coords = np.nonzero(lab)
        ids = lab[coords].astype(np.int64)
        if ids.size == 0:
            continue
        area += np.bincount(ids, minlength=n + 1)[: n + 1]
        for d in range(nd):
            c = coords[d].astype(np.int64) + b[d].start
            np.minimum.at(lo[d], ids, c)
            np.maximum.at(hi[d], ids, c + 1)
    path = write.write_tiff_tiles(pred_dir / f"{s.stem}.tif", pred_z, output_pixel_size(s, plan))
    write.write_csv(pred_dir / f"{s.stem}_objects.csv", _objects_header(nd),
                    ([int(i), f"{acc.object_scores.get(int(i), float('nan')):.4f}", int(area[i]),
                      *[int(x) for x in lo[:, i]], *[int(x) for x in hi[:, i]]] for i in np.nonzero(area)[0]))
    return {"name": s.stem, "image": str(s.image), "prediction": str(path), "uncertainty": None,
            "groundtruth": s.groundtruth, "prediction_zarr": str(pred_dir / f"{s.stem}.zarr")}


def _write_objects_csv(labels: np.ndarray, scores: dict, path: Path) -> None:
    """One row per object: id, score, area, bounding box (InstantDL users read these in Excel)."""
    from skimage.measure import regionprops

    write.write_csv(path, _objects_header(labels.ndim),
                    ([r.label, f"{scores.get(r.label, float('nan')):.4f}", int(r.area), *r.bbox]
                     for r in regionprops(labels.astype(np.int64))))


def _objects_header(nd: int) -> list[str]:
    axes = "zyx"[-nd:]
    return ["id", "score", "area"] + [f"{a}_min" for a in axes] + [f"{a}_max" for a in axes]


def _write_classification(s: read.Sample, out: dict) -> dict:
    return {"name": s.image.name, "image": str(s.image), "prediction": out["prediction"],
            "prob": [float(p) for p in out["prob"]], "uncertainty": out.get("uncertainty"),
            "groundtruth": s.groundtruth}


def _write_predictions_csv(records: list[dict], plan: Plan, path: Path) -> None:
    header = (["filename", "prediction"] + [f"prob_{c}" for c in plan.class_names]
              + (["uncertainty"] if any(r["uncertainty"] is not None for r in records) else []))
    write.write_csv(path, header, ([r["name"], r["prediction"]] + [f"{p:.6f}" for p in r["prob"]]
                                   + ([f"{r['uncertainty']:.6f}"] if r["uncertainty"] is not None else [])
                                   for r in sorted(records, key=lambda r: r["name"])))
