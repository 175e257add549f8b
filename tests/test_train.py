"""Training helpers without Ray: early stopping, resource planning, checkpoint discovery."""

from __future__ import annotations

import pytest
import torch

from instantdl_ray import _ray
from instantdl_ray.config.schema import RayConfig
from instantdl_ray.errors import ConfigError
from instantdl_ray.train.loop import BEST_FILE, MODEL_FILE, STATE_FILE, EarlyStopping, latest_checkpoint


def test_early_stopping_keeps_best_and_stops_after_patience():
    es = EarlyStopping(patience=2)
    assert es.step(1.0, 0) and es.step(0.5, 1)
    assert not es.step(0.6, 2) and not es.should_stop
    assert not es.step(0.5, 3) and es.should_stop
    assert es.best == 0.5 and es.best_epoch == 1
    again = EarlyStopping(2, **es.state())
    assert again.should_stop and again.best_epoch == 1


@pytest.mark.parametrize("cpus,workers", [(2, 1), (2, 2), (4, 3), (16, 4), (64, 8)])
def test_planned_resources_always_leave_a_cpu_for_data(cpus, workers):
    res = _ray.plan_resources(RayConfig(num_workers=workers), cpus, 0, node_cores=cpus)
    assert res.num_workers == workers
    assert res.num_workers * res.cpus_per_worker <= cpus - 1 + 1e-9
    assert res.data_cpus >= 1 and res.torch_threads >= 1


def test_explicit_resources_that_would_hang_are_refused_before_start():
    with pytest.raises(ConfigError) as e:
        _ray.plan_resources(RayConfig(num_workers=2, cpus_per_worker=1), 2, 0)
    assert "ray.cpus_per_worker" in str(e.value) and "data loading" in str(e.value)
    with pytest.raises(ConfigError, match="GPU"):
        _ray.plan_resources(RayConfig(num_workers=2, use_gpu=True), 8, 1)


def _fake_checkpoint(folder, epoch):
    folder.mkdir(parents=True)
    torch.save({}, folder / MODEL_FILE)
    torch.save({}, folder / BEST_FILE)
    torch.save({"epoch": epoch}, folder / STATE_FILE)


def test_latest_checkpoint_picks_highest_epoch_and_skips_half_copied(tmp_path):
    _fake_checkpoint(tmp_path / "train" / "a", 1)
    _fake_checkpoint(tmp_path / "train" / "b", 3)
    half = tmp_path / "train" / "c"
    half.mkdir()
    torch.save({"epoch": 9}, half / STATE_FILE)  # killed while Ray copied it: no weights
    assert latest_checkpoint(tmp_path).name == "b"
    assert latest_checkpoint(tmp_path / "empty") is None


def test_latest_checkpoint_reads_remote_uri_storage(tmp_path):
    """``s3://``-style storage goes through pyarrow filesystems; ``file://`` exercises the same path."""
    _fake_checkpoint(tmp_path / "store" / "train" / "ck1", 2)
    found = latest_checkpoint(f"file://{tmp_path / 'store'}")
    assert found is not None and torch.load(found / STATE_FILE)["epoch"] == 2
    assert latest_checkpoint(f"file://{tmp_path / 'missing'}") is None


def test_training_stream_reads_a_bounded_amount_ahead():
    """The stream holds every epoch's rows; Ray Data must not read and augment epochs ahead."""
    from types import SimpleNamespace

    from instantdl_ray.train.loop import READ_AHEAD_MAX, READ_AHEAD_MIN, _data_config, read_ahead_bytes

    unet = SimpleNamespace(in_channels=1, out_channels=1, tile_shape=[256, 256], image_size=None, task="semantic")
    assert read_ahead_bytes(unet, 4) == 16 * 4 * 4 * 2 * 256 * 256  # 16 batches of image + target: 32 MiB
    tiny = SimpleNamespace(in_channels=1, out_channels=1, tile_shape=[32, 32], image_size=None, task="semantic")
    assert read_ahead_bytes(tiny, 4) == READ_AHEAD_MIN
    cls = SimpleNamespace(in_channels=3, out_channels=8, tile_shape=[128, 128], image_size=[128, 128], task="classification")
    assert read_ahead_bytes(cls, 16) == 16 * 16 * 4 * 3 * 128 * 128  # no pixel target for classification
    big = SimpleNamespace(in_channels=2, out_channels=2, tile_shape=[64, 256, 256], image_size=None, task="semantic")
    assert read_ahead_bytes(big, 2) == READ_AHEAD_MAX
    huge = SimpleNamespace(in_channels=2, out_channels=2, tile_shape=[128, 512, 512], image_size=None, task="semantic")
    assert read_ahead_bytes(huge, 8) == 2 * 8 * 4 * 4 * 128 * 512 * 512  # at least two batches
    dc = _data_config(unet, 4, ["train", "val_0", "val_1"], split=["train"])
    for name in ("train", "val_0", "val_1"):
        assert dc._resolve_execution_options(name).resource_limits.object_store_memory == read_ahead_bytes(unet, 4)
    assert dc._datasets_to_split == ["train"]  # validation shards are split by the driver, not again by Ray


@pytest.mark.parametrize("n_rows,world", [(1, 2), (3, 2), (7, 4), (4, 1), (0, 2)])
def test_validation_rows_split_round_robin_every_row_once(n_rows, world):
    from instantdl_ray.train.loop import split_rows

    rows = [{"tile_index": i} for i in range(n_rows)]
    shards = split_rows(rows, world)
    assert set(shards) == {f"val_{r}" for r in range(min(n_rows, world))}  # only ranks that get rows
    got = sorted(r["tile_index"] for part in shards.values() for r in part)
    assert got == list(range(n_rows))
    sizes = [len(p) for p in shards.values()]
    assert not sizes or max(sizes) - min(sizes) <= 1


def test_ray_datasets_carry_the_executor_step_rate_limit(ray_session):
    from instantdl_ray.data.dataset import StepRateLimit, ray_dataset
    from instantdl_ray.config.plan import Plan

    assert StepRateLimit is not None, "Ray's ExecutionCallback interface moved; the throttle is off"
    plan = Plan(task="semantic", spatial_dims=2, axes="YX", target_axes="YX", in_channels=1, out_channels=1,
                num_classes=1, class_names=[], tile_shape=[32, 32], image_size=None, model="unet",
                loss="binary_crossentropy", dropout=0.0)
    ds = ray_dataset([{"image": "x.tif", "target": "", "origin": [0, 0], "seed": 0}], plan, None)
    assert StepRateLimit in ds.context.custom_execution_callback_classes


def test_local_ray_starts_without_dashboard_unless_asked(monkeypatch):
    import ray

    from instantdl_ray.config.schema import from_dict

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    _ray.init(num_cpus=2)
    _ray.init(num_cpus=2, dashboard=True)
    _ray.init("127.0.0.1:6379")
    assert calls[0]["include_dashboard"] is False and calls[1]["include_dashboard"] is True
    assert "include_dashboard" not in calls[2] and calls[2]["address"] == "127.0.0.1:6379"
    cfg = from_dict({"use_algorithm": "semantic", "path": ".", "ray": {"dashboard": True}})
    assert cfg.ray.dashboard is True
    assert from_dict({"use_algorithm": "semantic", "path": "."}).ray.dashboard is None  # auto


def _all_reduce_rank(rank: int, init: str, out: str) -> None:
    import json

    import torch.distributed as dist

    from instantdl_ray.train.loop import _all_reduce

    dist.init_process_group("gloo", init_method=init, world_size=2, rank=rank)
    try:
        mine = {"loss_sum": 2.5, "n": 1, "inter": 3.0} if rank == 0 else {}  # rank 1: no validation rows
        with open(f"{out}.{rank}", "w") as f:
            json.dump(_all_reduce(mine), f)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_all_reduce_joins_ranks_without_statistics(tmp_path):
    """A rank without validation batches still takes part in the collective (else the others wait
    forever), and dicts with different key sets are summed."""
    import json

    import torch.multiprocessing as mp

    out = str(tmp_path / "sums")
    mp.spawn(_all_reduce_rank, args=(f"file://{tmp_path / 'pg'}", out), nprocs=2, join=True)
    for rank in (0, 1):
        assert json.loads(open(f"{out}.{rank}").read()) == {"loss_sum": 2.5, "n": 1.0, "inter": 3.0}


class _NaNAtStep:
    """A task whose loss turns NaN at the ``bad``-th call (1-based)."""

    def __init__(self, bad: int):
        self.bad, self.calls = bad, 0

    def loss(self, model, batch, loss_fn):
        self.calls += 1
        loss = model(batch["image"]).pow(2).mean()
        return loss * float("nan") if self.calls >= self.bad else loss


def test_train_epoch_stops_at_the_first_non_finite_loss():
    from instantdl_ray.errors import InstantDLError, TrainingError
    from instantdl_ray.train.loop import train_epoch

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    batches = iter([{"image": torch.randn(2, 3)} for _ in range(10)])
    task = _NaNAtStep(bad=3)
    train_epoch(model, batches, 1, task, None, opt, lambda b: b, epoch=0, check_finite=True)  # epoch 1: finite
    with pytest.raises(TrainingError) as e:
        train_epoch(model, batches, 5, task, None, opt, lambda b: b, epoch=1, check_finite=True)
    msg = str(e.value)
    assert isinstance(e.value, InstantDLError)
    assert "epoch 2" in msg and "step 2" in msg and "nan" in msg  # the 2nd step of the 2nd epoch
    assert "learning_rate" in msg and "normalis" in msg and "empty masks" in msg
    assert task.calls == 3  # stopped at once, no further batch drawn
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the NaN step never reached the weights


def test_train_epoch_without_the_check_keeps_going():
    """Tuning trials rank a diverged trial last themselves: the check is opt-in."""
    from instantdl_ray.train.loop import train_epoch

    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    batches = iter([{"image": torch.randn(2, 3)} for _ in range(3)])
    loss_sum, n, dry = train_epoch(model, batches, 3, _NaNAtStep(bad=2), None, opt, lambda b: b)
    assert n == 6 and not dry and loss_sum != loss_sum  # NaN summed, no error


def test_run_checkpoint_files_load_with_weights_only(tmp_path):
    """state.pt, model.pt and best.pt as the training loop writes them: tensors and plain data only
    (numpy scalars in the metrics would need the full unpickler)."""
    import math

    import numpy as np

    from instantdl_ray.train.loop import save_checkpoint

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 1, 8, 8)).mean().backward()
    opt.step()
    stopper = EarlyStopping(3)
    stopper.step(0.5, 0)
    history = [{"epoch": 0, "loss": np.float32(0.7), "val_loss": 0.5, "val_threshold": np.float64(0.45),
                "val_n": 3.0, "best_val_loss": stopper.best, "best_epoch": 0, "epoch_time_s": 1.5},
               {"epoch": 1, "loss": 0.6, "best_val_loss": math.inf, "best_epoch": -1}]
    best = {k: v.clone() for k, v in model.state_dict().items()}
    save_checkpoint(tmp_path, model, best, epoch=1, history=history, opt=opt, stopper=stopper, stopped_early=False)
    st = torch.load(tmp_path / STATE_FILE, map_location="cpu", weights_only=True)
    assert st["epoch"] == 1 and st["early_stopping"] == stopper.state() and st["stopped_early"] is False
    assert st["history"][0]["val_threshold"] == pytest.approx(0.45) and type(st["history"][0]["loss"]) is float
    assert st["history"][1]["best_val_loss"] == math.inf
    torch.optim.Adam(model.parameters(), lr=1e-3).load_state_dict(st["optimizer"])
    for name in (MODEL_FILE, BEST_FILE):
        loaded = torch.load(tmp_path / name, map_location="cpu", weights_only=True)
        assert set(loaded) == set(model.state_dict())


class _RunsCode:
    """Unpickling this writes a file: what a crafted state.pt could do with the full unpickler."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_discovery_never_unpickles_code(tmp_path):
    marker = tmp_path / "code_ran"
    folder = tmp_path / "train" / "evil"
    _fake_checkpoint(folder, 1)
    torch.save({"epoch": 5, "payload": _RunsCode(marker)}, folder / STATE_FILE)
    _fake_checkpoint(tmp_path / "train" / "good", 2)
    assert latest_checkpoint(tmp_path).name == "good"  # the unreadable one is not a checkpoint
    assert not marker.exists()


def test_steps_per_epoch_counts_only_whole_batches():
    from instantdl_ray.train.loop import steps_per_epoch

    assert steps_per_epoch(12, 2, 2) == 3
    assert steps_per_epoch(13, 2, 2) == 3  # a partial batch is dropped, never a step of its own
    assert steps_per_epoch(3, 4, 2) == 1  # at least one


@pytest.mark.timeout(120)
def test_training_batches_are_never_partial(ray_session):
    """BatchNorm fails on a batch of one: the stream drops a last partial batch, pass after pass."""
    import itertools

    import numpy as np
    import ray

    from instantdl_ray.train.loop import endless_batches

    ds = ray.data.from_items([{"image": np.full((1, 2, 2), i, np.float32)} for i in range(5)])
    sizes = [b["image"].shape[0] for b in itertools.islice(endless_batches(ds, 2), 6)]
    assert sizes == [2] * 6
    assert list(endless_batches(ray.data.from_items([{"image": np.zeros(1)}]), 2)) == []  # never spins
