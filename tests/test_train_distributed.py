"""Ray Train runs with two CPU workers on the 2-CPU test Ray (2 x 0.5 CPU leaves one for data)."""

from __future__ import annotations

import json
import re

import pytest

from conftest import make_semantic_set
from instantdl_ray.config import schema as config

TWO_WORKERS = {"num_workers": 2, "cpus_per_worker": 0.5}


def _cfg(data, **extra):
    return config.from_dict({
        "use_algorithm": "semantic", "path": str(data), "batchsize": 2, "iterations_over_dataset": 2,
        "calculate_uncertainty": False, "evaluation": False, "ray": TWO_WORKERS, **extra,
    })


def _fit(cfg, run_dir):
    """``train.fit`` as ``pipeline.run`` calls it, without the prediction stage."""
    from instantdl_ray import _ray
    from instantdl_ray.data.augment import AugmentParams
    from instantdl_ray.config.plan import make_plan
    from instantdl_ray.train.loop import fit
    from instantdl_ray.config.validate import validate

    inv = validate(cfg)
    plan = make_plan(cfg, inv)
    resources = _ray.plan_resources(cfg.ray, *_ray.cluster_resources())
    assert resources.num_workers == 2
    run_dir.mkdir(parents=True)
    best = fit(cfg, plan, inv, run_dir, resources, AugmentParams.from_dict(cfg.data_gen_args.model_dump()),
               log=lambda msg: None)
    return plan, best


@pytest.mark.timeout(300)
@pytest.mark.parametrize("n_train,split,n_val", [(4, 0.2, 1), pytest.param(6, 0.5, 3, marks=pytest.mark.slow)])
def test_two_workers_validate_every_tile_exactly_once(ray_session, tmp_path, n_train, split, n_val):
    """1 validation tile (fewer than the workers) and 3 (not divisible by 2): no rank may wait alone
    in a collective, and no tile may be dropped by an equal split or counted twice."""
    data = make_semantic_set(tmp_path / "data", n_train=n_train, n_test=1)
    # 3 training images x 4 tiles: 12 rows per epoch, 3 batches of 2 per worker
    cfg = _cfg(data, validation_split=split, tiles_per_image=4)
    plan, best = _fit(cfg, tmp_path / "run")
    assert best.exists()
    assert len(plan.val_names) == n_val and plan.tile_shape == [64, 64]  # one tile per 64x64 image
    history = json.loads((tmp_path / "run" / "logs" / "history.json").read_text())
    assert len(history) == 2
    assert [h.get("val_n") for h in history] == [n_val, n_val]
    assert all("val_loss" in h for h in history)


@pytest.mark.timeout(300)
def test_non_finite_loss_stops_the_run_with_a_message_at_once(ray_session, tmp_path):
    """A diverging learning rate: the run ends with the package's error naming epoch and step (not
    Ray Train's retries and then an unrelated error about a missing best model)."""
    from instantdl_ray import pipeline
    from instantdl_ray.errors import TrainingError

    data = make_semantic_set(tmp_path / "data", n_train=4, n_test=1)
    cfg = config.from_dict({
        "use_algorithm": "semantic", "path": str(data), "batchsize": 2, "iterations_over_dataset": 20,
        "learning_rate": 1e30, "tiles_per_image": 8, "calculate_uncertainty": False, "evaluation": False,
        "ray": {"max_failures": 2},
    })
    with pytest.raises(TrainingError) as e:
        pipeline.run(cfg, out=tmp_path / "run")
    msg = str(e.value)
    assert "training loss is nan" in msg or "training loss is inf" in msg
    assert re.search(r"at epoch 1, step \d+;", msg), msg
    assert "learning_rate" in msg and "empty masks" in msg and "--resume" in msg
    train_log = (tmp_path / "run" / "logs" / "train.log").read_text()
    assert train_log.count("worker 0/1") == 1, "retried by Ray Train's max_failures"
    # raised at once: at the NaN step itself, not after 20 epochs on NaN weights or 3 worker-group
    # starts (a wall-clock bound would be flaky on a shared 2-core machine; the timeout caps it)
    assert "epoch 1/20" not in train_log  # no epoch finished, so nothing was saved with NaN weights
    assert not list((tmp_path / "run" / "checkpoints" / "ray").rglob("state.pt"))
