"""Training with Ray Train: ``train_loop_per_worker`` (runs in each worker) and ``fit`` (driver).

One streaming pass over a Ray Dataset of tile specs for all epochs (rows carry per-epoch
augmentation seeds), Adam, validation each epoch, early stopping on the validation loss (as
InstantDL), the best model kept, a checkpoint every epoch so a worker failure or an
interrupted run continues where it stopped.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from instantdl_ray.errors import TrainingError
from instantdl_ray.config.plan import Plan
from instantdl_ray.io import write
from instantdl_ray.io.write import atomic_path

MODEL_FILE = "model.pt"  # current weights
BEST_FILE = "best.pt"  # best weights so far
STATE_FILE = "state.pt"  # optimizer, epoch, early-stopping state, history


def _all_reduce(sums: dict[str, float]) -> dict[str, float]:
    """Sum ``sums`` over all ranks; the key sets may differ (a rank without validation rows
    passes ``{}``). A collective: every rank must call it, with or without statistics."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(sums)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {k: float(v) for k, v in sums.items()})
    total: dict[str, float] = {}
    for part in gathered:
        for k, v in part.items():
            total[k] = total.get(k, 0.0) + v
    return total


def _sum_over_ranks(value: float) -> float:
    """``value`` summed over all ranks (itself without DDP): non-finite when any rank's is."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return float(t.item())


NON_FINITE_CAUSES = (
    "usual causes: learning_rate too high (try 10x lower), unnormalised targets (regression values "
    "far from 0..1 without their scaling), empty masks or wrong groundtruth (all-background or "
    "mismatched label images)"
)


def non_finite_message(what: str, value: float, epoch: int, step: int | None = None) -> str:
    """The message of a run stopped by a NaN/inf loss; ``epoch`` and ``step`` are 0-based."""
    where = f"epoch {epoch + 1}" + (f", step {step + 1}" if step is not None else "")
    return (f"the {what} is {value} at {where}; training stopped there, nothing of this epoch was saved "
            f"(checkpoints of earlier epochs are kept: after fixing the cause, --resume RUN_DIR, e.g. with "
            f"--set learning_rate=..., continues from the last one); {NON_FINITE_CAUSES}")


def _unwrap(model):
    return getattr(model, "module", model)


def _fmt_time(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{(s % 3600) // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class EarlyStopping:
    """Stop after ``patience`` epochs without a lower monitored loss; remembers the best."""

    def __init__(self, patience: int, best: float = math.inf, bad_epochs: int = 0, best_epoch: int = -1):
        self.patience, self.best, self.bad_epochs, self.best_epoch = patience, best, bad_epochs, best_epoch

    def step(self, value: float, epoch: int) -> bool:
        """Record ``value``; returns True when it is a new best."""
        if value < self.best - 1e-7:
            self.best, self.bad_epochs, self.best_epoch = value, 0, epoch
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def state(self) -> dict:
        return {"best": self.best, "bad_epochs": self.bad_epochs, "best_epoch": self.best_epoch}


def _console(msg: str) -> None:
    """One line to the worker's stdout, which Ray streams to the driver's console.

    Not ``print``: Ray Train patches it in workers to go to its logger *and*, when Ray has
    wrapped ``sys.stdout``, to the stream as well, so every line showed twice."""
    import sys

    stream = sys.__stdout__ or sys.stdout
    stream.write(msg + "\n")
    stream.flush()


def train_epoch(model, batches, steps: int, task, loss_fn, opt, to_dev, scaler=None, *, epoch: int = 0,
                check_finite: bool = False) -> tuple[float, int, bool]:
    """``steps`` optimiser steps on batches drawn from the iterator ``batches`` (mixed precision
    when a CUDA ``scaler`` is given). Returns (sum of loss x batch size, samples seen, whether
    the iterator ran dry). Shared by training and by the tuning trials.

    With ``check_finite``, a NaN/inf loss on any rank raises ``TrainingError`` naming ``epoch``
    (0-based) and the step, on every rank at the same step and before that step's update, so
    the weights stay finite and no rank is left waiting in DDP's gradient all-reduce."""
    import torch

    model.train()
    loss_sum, n_seen = 0.0, 0
    for step in range(steps):
        try:
            batch = to_dev(next(batches))
        except StopIteration:
            return loss_sum, n_seen, True
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            with torch.autocast("cuda", dtype=torch.float16):
                loss = task.loss(model, batch, loss_fn)
        else:
            loss = task.loss(model, batch, loss_fn)
        value = float(loss.detach())
        if check_finite:
            total = _sum_over_ranks(value)
            if not math.isfinite(total):
                raise TrainingError([non_finite_message("training loss", total, epoch, step)])
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        b = batch["image"].shape[0]
        loss_sum += value * b
        n_seen += b
    return loss_sum, n_seen, False


def val_sums(model, batches, task, loss_fn, to_dev) -> dict[str, float]:
    """The task's summable validation statistics over ``batches`` (eval mode, no gradients)."""
    import torch

    model.eval()
    sums: dict[str, float] = {}
    with torch.no_grad():
        for vb in batches:
            for k, v in task.val_sums(model, to_dev(vb), loss_fn).items():
                sums[k] = sums.get(k, 0.0) + v
    return sums


def val_dataset_name(rank: int) -> str:
    return f"val_{rank}"


def split_rows(rows: list, world: int) -> dict[str, list]:
    """Validation rows round-robin over ``world`` ranks: every row exactly once, shards differ by
    at most one row; ranks without rows get no dataset (``{"val_0": [...], "val_1": [...]}``)."""
    shards = {val_dataset_name(r): rows[r::world] for r in range(max(1, world))}
    return {name: part for name, part in shards.items() if part}


def steps_per_epoch(rows_per_epoch: int, batch_size: int, world: int) -> int:
    """Optimiser steps per epoch: whole batches only (the planner makes an epoch's rows a multiple
    of batch size x workers), at least one."""
    return max(1, rows_per_epoch // (batch_size * world))


def endless_batches(shard, batch_size: int):
    """Whole training batches from ``shard`` (a Ray ``DataIterator`` or ``Dataset``): a last partial
    batch is dropped, as a batch of one fails in BatchNorm. The spec stream covers the planned
    epochs; after a worker-group restart Ray may hand over only what was left of it, so a new pass
    starts when it runs dry (never on a set without a whole batch)."""
    while True:
        n = 0
        for b in shard.iter_torch_batches(batch_size=batch_size, drop_last=True, prefetch_batches=2):
            n += 1
            yield b
        if n == 0:
            return


def _plain(metrics: dict) -> dict:
    """Metrics as Python numbers (a task may return numpy scalars, which ``weights_only`` refuses)."""
    return {k: v.item() if hasattr(v, "item") else v for k, v in metrics.items()}


def save_checkpoint(folder: Path, model, best_state: dict | None, *, epoch: int, history: list[dict], opt,
                    stopper: EarlyStopping, stopped_early: bool) -> None:
    """The run's checkpoint files, all loadable with ``torch.load(weights_only=True)`` (tensors and
    plain data): ``model.pt`` (current weights), ``best.pt`` and ``state.pt`` (epoch, history,
    optimizer, early stopping)."""
    import torch

    torch.save(_unwrap(model).state_dict(), folder / MODEL_FILE)
    torch.save(best_state, folder / BEST_FILE)
    torch.save({"epoch": int(epoch), "history": [_plain(h) for h in history], "optimizer": opt.state_dict(),
                "early_stopping": _plain(stopper.state()), "stopped_early": bool(stopped_early)},
               folder / STATE_FILE)


def train_loop_per_worker(config: dict[str, Any]) -> dict | None:
    """Runs inside every Ray Train worker. ``config`` is plain JSON-able data.

    Returns None, or ``{"failed": message, "kind": ...}`` when training cannot succeed on a retry:
    a non-finite loss, or an error that ``errors.permanent_failure`` classifies as the input's,
    the disk's or the code's (a bad weights file, a full disk, a bug). Those are not lost workers
    for Ray Train's ``max_failures``: the loop writes the traceback to ``train.log`` and returns
    (no checkpoint: the last good one stays); ``fit`` raises the message at once. Anything else (a
    dead peer's aborted collective, a lost node's objects) is raised for Ray Train to retry."""
    try:
        return _train_loop(config)
    except Exception as e:
        from instantdl_ray.errors import permanent_failure

        kind = permanent_failure(e)
        if kind is None:
            raise
        return _give_up(config, e, kind)


def _give_up(config: dict[str, Any], e: Exception, kind: str) -> dict:
    """The traceback to ``train.log``, one line to the console, peers released; the failure dict."""
    import traceback

    import ray.train

    from instantdl_ray.errors import InstantDLError

    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    msg = "; ".join(e.problems) if isinstance(e, InstantDLError) else f"{type(e).__name__}: {e}"
    msg = msg.splitlines()[0] if msg else type(e).__name__
    log_file = Path(config["log_file"]) if config.get("log_file") else None
    if log_file is not None and log_file.parent.exists():
        with open(log_file, "a") as f:
            f.write(f"rank {rank}: training failed ({kind}), not retried:\n")
            f.write("".join(traceback.format_exception(type(e), e, e.__traceback__)))
    _console(f"rank {rank}: training failed, not retried: {msg[:300]}")
    if world > 1:  # peers waiting for this rank in a collective fail at once instead of timing out
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return {"failed": msg, "kind": kind}


def _train_loop(config: dict[str, Any]) -> dict | None:
    import tempfile

    import ray
    import ray.train
    import ray.train.torch
    import torch

    from instantdl_ray.tasks import get_task

    plan = Plan.from_json(config["plan"])
    task = get_task(plan.task)
    torch.set_num_threads(int(config["torch_threads"]))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(int(config["seed"]) + rank)
    device = ray.train.torch.get_device()

    model = task.build_model(plan)
    log_path = Path(config["log_file"]) if config.get("log_file") else None

    def log(msg: str) -> None:
        if rank != 0:
            return
        _console(msg)
        if log_path is not None and log_path.parent.exists():
            with open(log_path, "a") as f:
                f.write(msg + "\n")

    node = ray.get_runtime_context().get_node_id()
    _console(f"worker {rank}/{world} on node {node[:12]} ({device})")
    if log_path is not None and log_path.parent.exists():
        with open(log_path, "a") as f:  # every rank: shows where training ran
            f.write(f"worker {rank}/{world} on node {node}\n")

    stopper = EarlyStopping(int(config["patience"]))
    start_epoch, history, opt_state = 0, [], None
    ckpt = ray.train.get_checkpoint()  # set after a worker failure (or by Ray's own run restoration)
    if config.get("resume_from"):
        # --resume of an interrupted run: the driver planned the data from this checkpoint's epoch;
        # Ray's own restoration may offer an older one (registered before the last copy finished)
        planned = ray.train.Checkpoint(config["resume_from"])
        if ckpt is None or _ckpt_epoch(ckpt) < _ckpt_epoch(planned):
            ckpt = planned
    if ckpt is not None:
        with ckpt.as_directory() as d:
            model.load_state_dict(torch.load(Path(d) / MODEL_FILE, map_location="cpu", weights_only=True))
            st = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
            best_state = torch.load(Path(d) / BEST_FILE, map_location="cpu", weights_only=True)
        start_epoch, history, opt_state = st["epoch"] + 1, st["history"], st["optimizer"]
        stopper = EarlyStopping(int(config["patience"]), **st["early_stopping"])
        log(f"resumed from checkpoint after epoch {start_epoch} (best val loss {stopper.best:.4g})")
    else:
        best_state = None
        if config.get("pretrained_weights"):
            from instantdl_ray.models.weights import load_pretrained

            info = load_pretrained(model, config["pretrained_weights"], model_name=plan.model, log=log,
                                   trust=bool(config.get("trust_pretrained_weights")))
            log(f"pretrained weights: {len(info['loaded'])} tensors loaded, {len(info['skipped'])} skipped")

    model = ray.train.torch.prepare_model(
        model, parallel_strategy_kwargs={"find_unused_parameters": task.unused_parameters(plan)}
    )
    opt = torch.optim.Adam(model.parameters(), lr=float(config["lr"]))
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    loss_fn = task.make_loss(plan)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp else None

    bs = int(config["batch_size"])
    epochs = int(config["epochs"])
    steps = steps_per_epoch(int(config["rows_per_epoch"]), bs, world)
    train_shard = ray.train.get_dataset_shard("train")
    # the driver split the validation tiles round-robin, one dataset per rank that got any
    has_val = bool(config.get("val_datasets"))
    val_name = val_dataset_name(rank)
    val_shard = ray.train.get_dataset_shard(val_name) if val_name in config.get("val_datasets", []) else None
    writer = None
    if rank == 0 and config.get("tensorboard_dir"):
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(config["tensorboard_dir"])
        except Exception as e:  # tensorboard is optional for a run to succeed
            log(f"TensorBoard disabled: {e}")

    def to_dev(batch: dict) -> dict:
        return {k: v.to(device) for k, v in batch.items() if k in ("image", "target", "label")}

    it = endless_batches(train_shard, bs)
    epoch = start_epoch
    t_epochs: list[float] = []
    exhausted = False
    failure: str | None = None
    while epoch < epochs and not exhausted:
        t0 = time.time()
        # dropout's random numbers from (seed, rank, epoch): a run resumed after epoch k continues
        # exactly as the uninterrupted run would (the data rows carry their own seeds)
        torch.manual_seed(int(np.random.SeedSequence([int(config["seed"]), rank, epoch]).generate_state(1)[0]))
        try:
            loss_sum, n_seen, exhausted = train_epoch(model, it, steps, task, loss_fn, opt, to_dev, scaler,
                                                      epoch=epoch, check_finite=True)
        except TrainingError as e:  # raised on every rank at the same step
            failure = e.problems[0]
            break
        # every rank takes part in every collective, whatever its own shard held
        tr = _all_reduce({"loss_sum": loss_sum, "n": n_seen, "dry": float(exhausted)})
        exhausted = tr["dry"] > 0
        if tr["n"] == 0:
            break
        metrics = {"epoch": epoch, "loss": tr["loss_sum"] / max(tr["n"], 1)}
        if has_val:
            sums = {} if val_shard is None else val_sums(
                model, val_shard.iter_torch_batches(batch_size=bs), task, loss_fn, to_dev)
            sums = _all_reduce(sums)
            if sums.get("n", 0) > 0:
                metrics.update(task.val_summary(sums), val_n=sums["n"])
                if not math.isfinite(metrics["val_loss"]):  # same sums on every rank: same decision
                    failure = non_finite_message("validation loss", metrics["val_loss"], epoch)
                    break
        monitored = metrics.get("val_loss", metrics["loss"])
        improved = stopper.step(monitored, epoch)
        t_epochs.append(time.time() - t0)
        metrics.update(best_val_loss=stopper.best, best_epoch=stopper.best_epoch, epoch_time_s=t_epochs[-1])
        metrics = _plain(metrics)
        history.append(metrics)
        left = (epochs - epoch - 1) * float(np.mean(t_epochs[-3:]))
        shown = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k.startswith(("loss", "val_")))
        log(f"epoch {epoch + 1}/{epochs}  {shown}  {t_epochs[-1]:.1f}s{'  *best' if improved else ''}  "
            f"~{_fmt_time(left)} left (at most)")
        if writer is not None:
            for k, v in metrics.items():
                if k != "epoch":
                    writer.add_scalar(k, v, epoch)
            writer.flush()
        if improved:
            best_state = {k: v.detach().cpu().clone() for k, v in _unwrap(model).state_dict().items()}
        stop = stopper.should_stop
        with tempfile.TemporaryDirectory() as tmp:
            ckpt_out = None
            if rank == 0:
                save_checkpoint(Path(tmp), model, best_state, epoch=epoch, history=history, opt=opt,
                                stopper=stopper, stopped_early=stop)
                ckpt_out = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt_out)
        epoch += 1
        if stop:
            log(f"early stopping: no lower validation loss for {stopper.patience} epochs "
                f"(best epoch {stopper.best_epoch + 1})")
            break
    if writer is not None:
        writer.close()
    if failure is not None:
        log(f"training stopped: {failure}")
        ray.train.report({"epoch": epoch, "failed": failure})  # every rank; no checkpoint: the last good one stays
        return {"failed": failure}
    return None


def _failure(result) -> tuple[str, str] | None:
    """``(message, kind)`` of a run that ``train_loop_per_worker`` stopped: its rank-0 return
    value (Ray Train v2), else the last reported metrics (v1 keeps those without a checkpoint)."""
    for found in (getattr(result, "return_value", None), getattr(result, "metrics", None)):
        if isinstance(found, dict) and found.get("failed"):
            return str(found["failed"]), str(found.get("kind", "input"))
    return None


def _download(uri: str) -> Path | None:
    import tempfile

    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(uri)
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        return None
    local = Path(tempfile.mkdtemp(prefix="instantdl-resume-"))
    pafs.copy_files(root, str(local), source_filesystem=fs)
    return local


def _ckpt_epoch(ckpt) -> int:
    with ckpt.as_directory() as d:
        return _read_epoch(Path(d))


def latest_checkpoint(storage: str | Path) -> Path | None:
    """The newest checkpoint folder (holding ``state.pt``) under a Ray Train storage folder.

    Remote storage (``s3://...``) is first mirrored to a local temporary folder with pyarrow.
    """
    if isinstance(storage, str) and "://" in storage:
        storage = _download(storage)
        if storage is None:
            return None
    # a kill during Ray's copy into storage can leave a checkpoint folder without all its files
    found = [p.parent for p in Path(storage).rglob(STATE_FILE)
             if (p.parent / MODEL_FILE).exists() and (p.parent / BEST_FILE).exists() and _read_epoch(p.parent) >= 0]
    if not found:
        return None
    return max(found, key=lambda p: _read_epoch(p))


def _read_epoch(ckpt_dir: Path) -> int:
    import torch

    try:
        return int(torch.load(ckpt_dir / STATE_FILE, map_location="cpu", weights_only=True)["epoch"])
    except Exception:
        return -1


def fit(cfg, plan: Plan, inv, run_dir: Path, resources, augment_params, resume: bool = False, log=print) -> Path:
    """Train on the cluster; returns the path of the best model's state dict in ``run_dir``."""
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    import torch

    from instantdl_ray.data.dataset import (region_maps, region_tiles, coverage_cell, grid_rows, ray_dataset,
                                            training_rows)

    storage: str | Path
    if cfg.ray.storage_path and "://" in cfg.ray.storage_path:
        storage = cfg.ray.storage_path.rstrip("/") + "/" + run_dir.name  # s3://, gs://: Ray's pyarrow filesystems
    elif cfg.ray.storage_path:
        storage = (Path(cfg.ray.storage_path).expanduser() / run_dir.name).resolve()
    else:
        storage = (run_dir / "checkpoints" / "ray").resolve()
    resume_ckpt: Path | None = None
    start_epoch = 0
    if resume:
        last = latest_checkpoint(storage)
        if last is not None:
            st = torch.load(last / STATE_FILE, map_location="cpu", weights_only=True)
            if st.get("stopped_early"):
                log(f"training had already stopped early at epoch {st['epoch'] + 1}; using its best model")
                return _export_best(last, run_dir, st["history"])
            start_epoch = st["epoch"] + 1
            resume_ckpt = last
            log(f"resuming training from epoch {start_epoch + 1} ({last})")
    by_name = {str(s.image): s for s in inv.samples["train"]}
    train_samples = [by_name[n] for n in plan.train_names]
    val_samples = [by_name[n] for n in plan.val_names]
    epochs = cfg.iterations_over_dataset
    if start_epoch >= epochs:
        return _export_best(latest_checkpoint(storage), run_dir, [])
    fg = None
    if cfg.foreground_sampling > 0:
        from instantdl_ray.data.dataset import foreground_maps

        t = time.time()
        fg = foreground_maps(train_samples, inv.image_shapes, plan)
        log(f"foreground maps of {len(fg)} label images in {time.time() - t:.1f} s: "
            f"{cfg.foreground_sampling:.0%} of the training tiles centred on labelled pixels")
    # GeoJSON groundtruth: its annotated regions; a whole slide with a label image: its tissue
    regions = region_maps(train_samples + val_samples, inv.image_shapes, plan, cfg.tissue_mask)
    if regions:
        from instantdl_ray.io.annotations import is_annotation

        n_ann = sum(1 for s in train_samples + val_samples if isinstance(s.groundtruth, Path) and is_annotation(s.groundtruth))
        log(f"tiles of {len(regions)} slide(s) come from their annotated regions ({n_ann} annotated with GeoJSON) "
            f"or their tissue: {sum(int(np.count_nonzero(m)) for m in regions.values())} cells of {coverage_cell(plan)} px")
    rows = training_rows(train_samples, inv.image_shapes, plan, cfg.seed, range(start_epoch, epochs), cfg.tiles_per_image,
                         foreground=fg, foreground_fraction=cfg.foreground_sampling,
                         multiple=cfg.batchsize * resources.num_workers,  # full batches on every worker
                         regions=regions)
    rows_per_epoch = len(rows) // max(1, epochs - start_epoch)
    datasets = {"train": ray_dataset(rows, plan, augment_params)}
    # validation is split here, not by Ray Train's equal split (which drops rows so that every
    # rank gets as many): each rank validates its own dataset, every tile exactly once
    val_shards = split_rows(grid_rows(val_samples, inv.image_shapes, plan, 0.0,
                                      keep=region_tiles(val_samples, inv.image_shapes, plan, regions)),
                            resources.num_workers)
    for name, part in val_shards.items():
        datasets[name] = ray_dataset(part, plan)
    log(f"training {plan.model} on {len(train_samples)} images ({rows_per_epoch} tiles/epoch of {plan.tile_shape}), "
        f"validating on {len(val_samples)}; {resources.num_workers} worker(s) x {resources.cpus_per_worker:g} CPU"
        f"{' + GPU' if resources.use_gpu else ''}, batch size {cfg.batchsize} per worker")
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    loop_config = {
        "plan": plan.to_dict(),
        "seed": cfg.seed,
        "lr": cfg.learning_rate,
        "batch_size": cfg.batchsize,
        "epochs": epochs,
        "patience": cfg.early_stopping_patience,
        "rows_per_epoch": rows_per_epoch,
        "val_datasets": sorted(val_shards),
        "torch_threads": resources.torch_threads,
        "pretrained_weights": None if resume_ckpt or not cfg.pretrained_weights else str(cfg.pretrained_weights),
        "trust_pretrained_weights": bool(cfg.trust_pretrained_weights),
        "log_file": str(run_dir / "logs" / "train.log"),
        "tensorboard_dir": str(run_dir / "logs" / "tensorboard"),
        "resume_from": str(resume_ckpt) if resume_ckpt else None,
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=resources.num_workers,
            use_gpu=resources.use_gpu,
            resources_per_worker={"CPU": resources.cpus_per_worker, **({"GPU": 1} if resources.use_gpu else {})},
            placement_strategy=cfg.ray.placement_strategy,
        ),
        run_config=RunConfig(
            name="train",
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # our own epoch lines are enough
        ),
        datasets=datasets,
        dataset_config=_data_config(plan, cfg.batchsize, list(datasets), split=["train"]),
    )
    result = trainer.fit()
    failure = _failure(result)
    if failure is not None:
        message, kind = failure
        log(f"training stopped: {message}")  # run.log; the worker's own line went to train.log
        if kind == "input":
            raise TrainingError([message])
        from instantdl_ray.errors import RunFailed

        why = {"disk": "the file system refused a write (free space or fix permissions)",
               "code": "an error in the program, not in a lost worker"}.get(kind, kind)
        raise RunFailed([f"train: {message}", f"not retried: {why}; traceback in {run_dir / 'logs' / 'train.log'}"])
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint; see the log above")
    with result.checkpoint.as_directory() as d:
        st = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
        return _export_best(Path(d), run_dir, st["history"])


READ_AHEAD_BATCHES = 16
READ_AHEAD_MIN = 32 * 2**20
READ_AHEAD_MAX = 512 * 2**20


def read_ahead_bytes(plan: Plan, batch_size: int) -> int:
    """Object store budget of a training stream: 16 batches of tiles, within [32, 512] MiB (and
    never under 2 batches).

    Ray Data otherwise reads ahead up to its whole object store share; a run's stream holds every
    epoch's rows, so it would read and augment many epochs ahead of the trainer, taking CPU from
    training and holding (or spilling) GBs of tiles — see ``benchmarks/train_overhead.py``.
    """
    from instantdl_ray.tasks import get_task

    target_ch = max(1, plan.out_channels) if get_task(plan.task).pixelwise else 0  # else a label per image
    batch = 4 * batch_size * (plan.in_channels + target_ch) * int(np.prod(plan.tile_shape))
    return int(max(np.clip(READ_AHEAD_BATCHES * batch, READ_AHEAD_MIN, READ_AHEAD_MAX), 2 * batch))


def _data_config(plan: Plan, batch_size: int, names: list[str], split: list[str] | None = None):
    """Read-ahead limits for every dataset in ``names``; Ray Train splits only those in ``split``
    (all when None) over the workers, the others go whole to every worker."""
    from ray.data import ExecutionResources
    from ray.train import DataConfig

    opts = {}
    for name in names:
        o = DataConfig.default_ingest_options()
        o.resource_limits = ExecutionResources(
            cpu=o.resource_limits.cpu, gpu=o.resource_limits.gpu,
            object_store_memory=read_ahead_bytes(plan, batch_size),
        )
        # rows in the planned order: with per-row seeds, the same config and seed give the same
        # batches, hence the same weights (Ray Data otherwise yields blocks as tasks finish)
        o.preserve_order = True
        opts[name] = o
    return DataConfig(datasets_to_split="all" if split is None else list(split), execution_options=opts)


def _export_best(ckpt_dir: Path, run_dir: Path, history: list[dict]) -> Path:
    """Copy the best weights to ``run_dir/checkpoints/best/model.pt`` and the history to logs/."""
    best_dir = run_dir / "checkpoints" / "best"
    best_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(best_dir / MODEL_FILE) as tmp:
        shutil.copy(ckpt_dir / BEST_FILE, tmp)
    if history:
        import pandas as pd

        write.write_dataframe(run_dir / "logs" / "history.csv", pd.DataFrame(history))
        write.write_json(run_dir / "logs" / "history.json", history, indent=1)
    return best_dir / MODEL_FILE
