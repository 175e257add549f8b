"""Hyper-parameter search with Ray Tune: learning rate, batch size, dropout, augmentation strength.

``tune(cfg_path, overrides)`` validates the data and makes the plan once on the driver, then runs
``num_samples`` trials. Each trial trains the task's own model with the package's own pieces
(``dataset.training_rows``/``grid_rows``/``ray_dataset`` for the data, ``tasks`` for model, loss and
validation statistics) in a plain single-process loop, reports ``val_loss`` once per epoch, and
the ASHA scheduler stops the unpromising trials early. It writes into the output folder:

    best_config.yaml   the user's config with the best trial's values (loads with ``config.load``)
    trials.csv         one row per trial: sampled values, epochs run, best / last validation loss
    tune.log           the driver's log

Trials must not starve the Ray Datasets feeding them (the same hang ``_ray.plan_resources`` guards
against in training): each trial takes one CPU (plus one GPU with ``ray.use_gpu``) and at least
one CPU stays free for data loading, so on a 2-CPU laptop trials run one at a time.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import time
from pathlib import Path
from typing import Any

from instantdl_ray.io import write

# --------------------------------------------------------------------------- search space

LR_RANGE = (1e-4, 1e-2)  # learning_rate ~ log-uniform
BATCH_SIZES = (2, 4, 8)  # batchsize ~ choice (per worker, as in a run)
DROPOUT_RANGE = (0.0, 0.5)  # dropout ~ uniform
ROTATION_CHOICES = (0, 15, 45)  # data_gen_args.rotation_range (degrees) ~ choice
ZOOM_CHOICES = (False, 1.2)  # data_gen_args.zoom_range ~ choice
TUNED_KEYS = ("learning_rate", "batchsize", "dropout", "rotation_range", "zoom_range")

METRIC, MODE = "val_loss", "min"


def search_space() -> dict[str, Any]:
    """The Ray Tune param space (flat; ``rotation_range``/``zoom_range`` go into ``data_gen_args``)."""
    from ray import tune as rt

    return {
        "learning_rate": rt.loguniform(*LR_RANGE),
        "batchsize": rt.choice(list(BATCH_SIZES)),
        "dropout": rt.uniform(*DROPOUT_RANGE),
        "rotation_range": rt.choice(list(ROTATION_CHOICES)),
        "zoom_range": rt.choice(list(ZOOM_CHOICES)),
    }


def apply_trial(raw: dict, trial: dict[str, Any]) -> dict:
    """A raw config dict with one trial's values set (returns a copy)."""
    import json

    out = json.loads(json.dumps(raw))
    out["learning_rate"] = float(trial["learning_rate"])
    out["batchsize"] = int(trial["batchsize"])
    out["dropout"] = round(float(trial["dropout"]), 4)
    aug = dict(out.get("data_gen_args") or {})
    aug["rotation_range"] = trial["rotation_range"]
    aug["zoom_range"] = trial["zoom_range"]
    out["data_gen_args"] = aug
    return out


# --------------------------------------------------------------------------- resources


def trial_plan(cluster_cpus: float, cluster_gpus: float, use_gpu: bool) -> tuple[dict[str, float], int]:
    """Resources per trial and the number of trials that may run at once.

    One CPU per trial, and (as ``_ray.plan_resources``) at least one CPU - 10 % on big clusters - is
    never given to trials so Ray Data always has a CPU: with <= 2 CPUs one trial at a time.
    """
    per_trial: dict[str, float] = {"cpu": 1.0}
    reserve = 1.0 if cluster_cpus <= 8 else max(1.0, math.floor(cluster_cpus * 0.1))
    concurrent = max(1, int(cluster_cpus - reserve))
    if use_gpu:
        per_trial["gpu"] = 1.0
        concurrent = max(1, min(concurrent, int(cluster_gpus)))
    return per_trial, concurrent


# --------------------------------------------------------------------------- one trial


def _trial(trial: dict[str, Any], *, setup: dict[str, Any]) -> None:
    """Ray Tune function trainable: train one configuration, ``tune.report`` after each epoch.

    ``setup`` (shared by all trials, put in the object store once by ``tune.with_parameters``):
    plan dict, train/val spec rows, seed, epochs, patience, augmentation dict, torch threads.
    """
    import ray
    import torch
    from ray import tune as rt

    from instantdl_ray.data.augment import AugmentParams
    from instantdl_ray.data.dataset import ray_dataset
    from instantdl_ray.config.plan import Plan
    from instantdl_ray.tasks import get_task
    from instantdl_ray.train.loop import EarlyStopping, train_epoch, val_sums

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    torch.set_num_threads(int(setup["torch_threads"]))
    torch.manual_seed(int(setup["seed"]))

    plan = Plan.from_json(dict(setup["plan"]))
    plan.dropout = float(trial["dropout"])
    task = get_task(plan.task)
    aug = dict(setup["augment"], rotation_range=trial["rotation_range"], zoom_range=trial["zoom_range"])
    params = AugmentParams.from_dict(aug)
    bs = int(trial["batchsize"])
    epochs = int(setup["epochs"])
    rows_per_epoch = int(setup["rows_per_epoch"])

    device = torch.device("cuda" if setup["use_gpu"] and torch.cuda.is_available() else "cpu")
    model = task.build_model(plan).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=float(trial["learning_rate"]))
    loss_fn = task.make_loss(plan)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None

    train_ds = ray_dataset(setup["train_rows"], plan, params)
    val_ds = ray_dataset(setup["val_rows"], plan)

    def to_dev(batch: dict) -> dict:
        return {k: v.to(device) for k, v in batch.items() if k in ("image", "target", "label")}

    it = iter(train_ds.iter_torch_batches(batch_size=bs, drop_last=True, prefetch_batches=2))
    steps = max(1, math.ceil(rows_per_epoch / bs))
    stopper = EarlyStopping(int(setup["patience"]))
    for epoch in range(epochs):
        t0 = time.time()
        loss_sum, n_seen, _ = train_epoch(model, it, steps, task, loss_fn, opt, to_dev, scaler)
        if n_seen == 0:
            break
        sums = val_sums(model, val_ds.iter_torch_batches(batch_size=bs), task, loss_fn, to_dev)
        metrics = {"epoch": epoch, "loss": loss_sum / n_seen, **task.val_summary(sums)}
        if not math.isfinite(metrics[METRIC]):
            metrics[METRIC] = float("inf")  # a diverged trial ranks last instead of failing the search
        stopper.step(metrics[METRIC], epoch)
        metrics.update(best_val_loss=stopper.best, epoch_time_s=time.time() - t0)
        rt.report(metrics)
        if stopper.should_stop or metrics[METRIC] == float("inf"):
            break


# --------------------------------------------------------------------------- driver


def _tune_log(path: Path):
    t0 = time.time()

    def log(msg: str) -> None:
        line = f"[{time.time() - t0:7.1f}s] {msg}"
        print(line, flush=True)
        with open(path, "a") as f:
            f.write(line + "\n")

    return log


def _storage(cfg, out_dir: Path) -> str:
    """Where Ray Tune keeps its experiment state: ``ray.storage_path`` (e.g. s3://...) or the out dir."""
    if cfg.ray.storage_path:
        sp = str(cfg.ray.storage_path)
        return sp if "://" in sp else str(Path(sp).expanduser().resolve())
    return str((out_dir / "ray").resolve())


def tune(
    cfg_path: str,
    overrides: list[str],
    num_samples: int = 8,
    out: str | None = None,
    max_epochs: int | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
) -> Path:
    """Search learning rate, batch size, dropout and augmentation strength; returns the out folder.

    ``max_epochs`` caps the epochs per trial (default: ``iterations_over_dataset``); ASHA stops
    poor trials after a grace period. Writes ``best_config.yaml`` and ``trials.csv`` into ``out``
    (default ``<path>/runs/tune-<timestamp>``).
    """
    import pandas as pd
    import yaml
    from ray import tune as rt
    from ray.tune.schedulers import ASHAScheduler

    from instantdl_ray import _ray
    from instantdl_ray.config import schema as config_mod
    from instantdl_ray.data.dataset import grid_rows, training_rows
    from instantdl_ray.errors import ConfigError
    from instantdl_ray.config.plan import make_plan
    from instantdl_ray.config.validate import validate

    raw = config_mod.apply_overrides(config_mod.load_raw(cfg_path), overrides or [])
    cfg = config_mod.load(cfg_path, overrides or [])
    problems = []
    if num_samples < 1:
        problems.append(f"--samples {num_samples}: need at least 1 trial")
    epochs = int(max_epochs if max_epochs is not None else cfg.iterations_over_dataset)
    if epochs < 1:
        problems.append(f"epochs per trial is {epochs}: set iterations_over_dataset (or --max-epochs) to at least 1")
    if cfg.validation_split <= 0:
        problems.append("validation_split: 0 leaves no validation images to rank trials by; use e.g. 0.2")
    if problems:
        raise ConfigError(problems, title="Cannot tune")
    inv = validate(cfg)
    plan = make_plan(cfg, inv)
    if not plan.val_names:
        raise ConfigError([f"{cfg.path}: too few training images to hold out a validation split (need >= 2)"],
                          title="Cannot tune")

    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = Path(out).expanduser().resolve() if out else Path(cfg.path) / "runs" / f"tune-{stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)
    log = _tune_log(out_dir / "tune.log")
    plan.to_json(out_dir / "plan.json")

    by_name = {str(s.image): s for s in inv.samples["train"]}
    train_samples = [by_name[n] for n in plan.train_names]
    val_samples = [by_name[n] for n in plan.val_names]
    rows = training_rows(train_samples, inv.image_shapes, plan, cfg.seed, range(epochs), cfg.tiles_per_image)

    _ray.init(address or cfg.ray.address, num_cpus=num_cpus, dashboard=bool(cfg.ray.dashboard))  # trials use Ray Tune + Ray Data, not Ray Train
    cpus, gpus = _ray.cluster_resources()
    if cfg.ray.use_gpu and gpus < 1:
        raise ConfigError([f"ray.use_gpu: the cluster has no GPU ({cpus:g} CPUs); set ray.use_gpu=false"],
                          title="Cannot tune")
    per_trial, concurrent = trial_plan(cpus, gpus, bool(cfg.ray.use_gpu))
    node_cores = os.cpu_count() or 1
    setup = {
        "plan": plan.to_dict(),
        "train_rows": rows,
        "val_rows": grid_rows(val_samples, inv.image_shapes, plan, 0.0),
        "rows_per_epoch": len(rows) // epochs,
        "augment": cfg.data_gen_args.model_dump(),
        "seed": cfg.seed,
        "epochs": epochs,
        "patience": cfg.early_stopping_patience,
        "use_gpu": bool(cfg.ray.use_gpu),
        "torch_threads": max(1, int(per_trial["cpu"])) if cfg.ray.use_gpu else max(1, node_cores // min(concurrent, node_cores)),
    }
    log(f"tuning {plan.task} ({plan.model}) on {len(train_samples)} train / {len(val_samples)} validation images: "
        f"{num_samples} trial(s) x up to {epochs} epoch(s), ASHA on {METRIC}; Ray {cpus:g} CPU(s), {gpus:g} GPU(s), "
        f"{concurrent} trial(s) at a time, {per_trial} each")

    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=epochs,
                              grace_period=max(1, min(epochs, max(1, epochs // 4))), reduction_factor=3)
    trainable = rt.with_resources(rt.with_parameters(_trial, setup=setup), per_trial)
    tuner = rt.Tuner(
        trainable,
        param_space=search_space(),
        tune_config=rt.TuneConfig(metric=METRIC, mode=MODE, scheduler=scheduler, num_samples=num_samples,
                                  max_concurrent_trials=concurrent),
        run_config=rt.RunConfig(name=f"tune-{stamp}", storage_path=_storage(cfg, out_dir), verbose=1,
                                failure_config=rt.FailureConfig(max_failures=0)),
    )
    t = time.time()
    grid = tuner.fit()
    log(f"search finished in {time.time() - t:.0f}s")

    table = []
    for res in grid:
        hist = res.metrics_dataframe
        vals = hist[METRIC].tolist() if hist is not None and METRIC in hist else []
        row = {"trial_id": (res.metrics or {}).get("trial_id", Path(res.path).name if res.path else "")}
        row.update({k: res.config.get(k) for k in TUNED_KEYS} if res.config else {})
        row.update(epochs_run=len(vals), best_val_loss=min(vals) if vals else float("nan"),
                   last_val_loss=vals[-1] if vals else float("nan"),
                   error=repr(res.error) if res.error else "")
        table.append(row)
    df = pd.DataFrame(table).sort_values("best_val_loss", na_position="last")
    write.write_dataframe(out_dir / "trials.csv", df)
    ok = df[df["epochs_run"] > 0]
    if ok.empty:
        raise RuntimeError(f"every trial failed; see {out_dir / 'trials.csv'} and the log above")
    best = ok.iloc[0]
    best_trial = {k: best[k] for k in TUNED_KEYS}
    best_trial["zoom_range"] = _plain(best_trial["zoom_range"])
    best_trial["rotation_range"] = _plain(best_trial["rotation_range"])
    best_raw = apply_trial(raw, best_trial)
    best_raw["path"] = str(cfg.path)  # absolute: the YAML lives in another folder than the original
    config_mod.from_dict(best_raw)  # what we write must load
    header = (f"# best of {len(df)} trial(s) by {METRIC} (min {float(best['best_val_loss']):.5g}, "
              f"trial {best['trial_id']}), from {Path(cfg_path).resolve()}\n"
              f"# run it with: python -m instantdl_ray run {out_dir / 'best_config.yaml'}\n")
    write.write_text(out_dir / "best_config.yaml", header + yaml.safe_dump(best_raw, sort_keys=False))
    log("best: " + ", ".join(f"{k} {best_trial[k]}" for k in TUNED_KEYS) + f"  ({METRIC} {float(best['best_val_loss']):.4g})")
    log(f"done. {out_dir / 'best_config.yaml'} and {out_dir / 'trials.csv'}")
    return out_dir


def _plain(v: Any) -> Any:
    """numpy / pandas scalars -> plain Python (bool stays bool) for YAML."""
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v
