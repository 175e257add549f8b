"""Distributed prediction with Monte-Carlo dropout on a pool of Ray actors, stitched per image.

``Predictor`` is a plain callable class (testable on one batch without Ray); Ray's
``map_batches`` runs it on an actor pool, each actor loading the weights once.
"""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import read
from .plan import Plan


class Predictor:
    """``map_batches`` class: image tiles ``(B, C, *tile)`` -> task outputs, T MC passes each."""

    def __init__(self, plan: dict, state_dict: Any, passes: int, torch_threads: int = 1, use_gpu: bool = False):
        import torch

        from .tasks import get_task

        torch.set_num_threads(max(1, int(torch_threads)))
        if isinstance(state_dict, list):  # [ObjectRef]: nested, so Ray hands the reference over untouched
            import ray

            state_dict = ray.get(state_dict[0])
        self.plan = Plan.from_json(plan)
        self.task = get_task(self.plan.task)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = self.task.build_model(self.plan)
        self.model.load_state_dict(state_dict)
        self.model.to(self.device).eval()
        self.passes = int(passes)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(batch["image"])).to(self.device)
        out = self.task.predict_batch(self.model, x, self.passes)
        out["image_index"] = np.asarray(batch["image_index"])
        out["tile_index"] = np.asarray(batch["tile_index"])
        return out


def load_state_dict(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu")


def predict(cfg, plan: Plan, samples: list[read.Sample], shapes: dict, model_path: Path, out_dir: Path,
            resources, log=print) -> list[dict]:
    """Predict ``samples`` with the model at ``model_path``; write outputs under ``out_dir``.

    Returns one record per image: name, prediction/uncertainty paths (pixel tasks) or the
    class, probabilities and uncertainty (classification).
    """
    import ray

    from .dataset import grid_rows, ray_dataset, spatial_shape
    from .stitch import ImageAccumulator
    from .tasks import get_task
    from .tile import tile_grid

    task = get_task(plan.task)
    passes = cfg.mc_passes if cfg.calculate_uncertainty and not plan.model.startswith("maskrcnn") else 1
    rows = grid_rows(samples, shapes, plan, cfg.tile_overlap)
    ds = ray_dataset(rows, plan, with_target=False, rows_per_block=4)
    state_ref = ray.put(load_state_dict(model_path))
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
        num_cpus=1 if not resources.use_gpu else 0,
    )
    log(f"predicting {len(samples)} images ({len(rows)} tiles) on {n_actors} actor(s), "
        f"{passes} Monte-Carlo pass{'es' if passes > 1 else ''} per tile")
    pred_dir, unc_dir = out_dir / "predictions", out_dir / "uncertainty"
    pred_dir.mkdir(parents=True, exist_ok=True)
    accs: dict[int, ImageAccumulator] = {}
    records: list[dict] = []
    done_tiles, t0, last = 0, time.time(), 0.0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for j in range(len(batch["image_index"])):
            idx, t_idx = int(batch["image_index"][j]), int(batch["tile_index"][j])
            s = samples[idx]
            outputs = {k: v[j] for k, v in batch.items() if k not in ("image_index", "tile_index")}
            if not task.pixelwise:
                records.append(_write_classification(s, task.finalize(outputs, plan)))
                done_tiles += 1
                continue
            if idx not in accs:
                sp = tuple(spatial_shape(shapes[str(s.image)], plan.axes))
                ov = tuple(int(t * cfg.tile_overlap) for t in plan.tile_shape)
                accs[idx] = ImageAccumulator(sp, tile_grid(sp, tuple(plan.tile_shape), ov), tuple(plan.tile_shape),
                                             scratch=out_dir / ".scratch" / s.stem)
            done_tiles += 1
            if accs[idx].add(t_idx, outputs):
                records.append(_write_pixel(s, task.finalize(accs.pop(idx).result(), plan), pred_dir, unc_dir))
        if time.time() - last > 10 or done_tiles == len(rows):
            last = time.time()
            rate = done_tiles / max(last - t0, 1e-9)
            log(f"  predicted {done_tiles}/{len(rows)} tiles ({rate:.1f} tiles/s), {len(records)}/{len(samples)} images")
    if not task.pixelwise:
        _write_predictions_csv(records, plan, pred_dir / "predictions.csv")
    return sorted(records, key=lambda r: r["name"])


def _write_pixel(s: read.Sample, out: dict, pred_dir: Path, unc_dir: Path) -> dict:
    pred = out["prediction"]
    path = read.write_tiff(pred_dir / f"{s.stem}.tif", pred)
    rec = {"name": s.stem, "image": str(s.image), "prediction": str(path), "uncertainty": None,
           "groundtruth": s.groundtruth}
    if out.get("uncertainty") is not None:
        u = out["uncertainty"]
        rec["uncertainty"] = str(read.write_tiff(unc_dir / f"{s.stem}.tif", u.astype(np.float32)))
        rec["mean_uncertainty"] = float(np.mean(u))
    if out.get("threshold") is not None:
        rec["threshold"] = out["threshold"]
    if "scores" in out and pred.ndim >= 2:
        _write_objects_csv(pred, out.get("scores") or {}, pred_dir / f"{s.stem}_objects.csv")
    elif pred.dtype == np.uint16:
        _write_objects_csv(pred, {}, pred_dir / f"{s.stem}_objects.csv")
    return rec


def _write_objects_csv(labels: np.ndarray, scores: dict, path: Path) -> None:
    """One row per object: id, score, area, bounding box (InstantDL users read these in Excel)."""
    from skimage.measure import regionprops

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        nd = labels.ndim
        axes = "zyx"[-nd:]
        w.writerow(["id", "score", "area"] + [f"{a}_min" for a in axes] + [f"{a}_max" for a in axes])
        for r in regionprops(labels.astype(np.int64)):
            w.writerow([r.label, f"{scores.get(r.label, float('nan')):.4f}", int(r.area), *r.bbox])


def _write_classification(s: read.Sample, out: dict) -> dict:
    return {"name": s.image.name, "image": str(s.image), "prediction": out["prediction"],
            "prob": [float(p) for p in out["prob"]], "uncertainty": out.get("uncertainty"),
            "groundtruth": s.groundtruth}


def _write_predictions_csv(records: list[dict], plan: Plan, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "prediction"] + [f"prob_{c}" for c in plan.class_names]
                   + (["uncertainty"] if any(r["uncertainty"] is not None for r in records) else []))
        for r in sorted(records, key=lambda r: r["name"]):
            row = [r["name"], r["prediction"]] + [f"{p:.6f}" for p in r["prob"]]
            if r["uncertainty"] is not None:
                row.append(f"{r['uncertainty']:.6f}")
            w.writerow(row)
    tmp.replace(path)
