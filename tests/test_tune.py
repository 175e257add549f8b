"""Ray Tune search: a tiny 2-trial x 2-epoch search on synthetic data, and the pure helpers."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import yaml

from conftest import make_semantic_set
from instantdl_ray.config import schema as config
from instantdl_ray.train import tune as tune_mod
from instantdl_ray.errors import ConfigError


def _write_cfg(tmp_path, data, **extra):
    cfg = {"use_algorithm": "SemanticSegmentation", "path": "data", "iterations_over_dataset": 5,
           "batchsize": 2, "early_stopping_patience": 3, **extra}
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _in_space(cfg: config.Config) -> None:
    assert tune_mod.LR_RANGE[0] <= cfg.learning_rate <= tune_mod.LR_RANGE[1]
    assert cfg.batchsize in tune_mod.BATCH_SIZES
    assert tune_mod.DROPOUT_RANGE[0] <= cfg.dropout <= tune_mod.DROPOUT_RANGE[1]
    assert cfg.data_gen_args.rotation_range in tune_mod.ROTATION_CHOICES
    assert cfg.data_gen_args.zoom_range in tune_mod.ZOOM_CHOICES


@pytest.mark.timeout(300)
def test_tune_two_trials_writes_best_config(ray_session, tmp_path):
    data = make_semantic_set(tmp_path / "data", n_train=5, n_test=1, shape=(48, 48))
    cfg_path = _write_cfg(tmp_path, data, data_gen_args={"horizontal_flip": True, "vertical_flip": False})
    out = tune_mod.tune(str(cfg_path), ["seed=3"], num_samples=2, out=str(tmp_path / "tune"), max_epochs=2)

    assert out == (tmp_path / "tune").resolve()
    best = config.load(out / "best_config.yaml")
    _in_space(best)
    assert best.path == str(data.resolve())
    # the user's own keys and --set overrides survive; the tuned ones are set
    assert best.seed == 3 and best.iterations_over_dataset == 5 and best.early_stopping_patience == 3
    assert best.data_gen_args.horizontal_flip is True and best.data_gen_args.vertical_flip is False

    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 2
    assert set(tune_mod.TUNED_KEYS) <= set(trials.columns)
    assert trials["epochs_run"].between(1, 2).all()
    assert trials["best_val_loss"].map(math.isfinite).all()
    # the best config is the trial with the lowest validation loss
    top = trials.sort_values("best_val_loss").iloc[0]
    assert best.learning_rate == pytest.approx(top["learning_rate"])
    assert best.batchsize == int(top["batchsize"])
    assert "best:" in (out / "tune.log").read_text()


def test_apply_trial_and_space_bounds():
    raw = {"use_algorithm": "semantic", "path": "/x", "data_gen_args": {"vertical_flip": False}}
    out = tune_mod.apply_trial(raw, {"learning_rate": 3e-3, "batchsize": 4, "dropout": 0.123456,
                                     "rotation_range": 15, "zoom_range": False})
    assert raw == {"use_algorithm": "semantic", "path": "/x", "data_gen_args": {"vertical_flip": False}}
    assert out["data_gen_args"] == {"vertical_flip": False, "rotation_range": 15, "zoom_range": False}
    assert out["dropout"] == 0.1235 and out["batchsize"] == 4
    _in_space(config.from_dict(out))
    space = tune_mod.search_space()
    assert set(space) == set(tune_mod.TUNED_KEYS)
    for _ in range(20):
        sample = {k: v.sample() for k, v in space.items()}
        _in_space(config.from_dict(tune_mod.apply_trial(raw, sample)))


@pytest.mark.parametrize("cpus,gpus,use_gpu,concurrent", [
    (2, 0, False, 1), (1, 0, False, 1), (4, 0, False, 3), (32, 0, False, 29), (16, 2, True, 2),
])
def test_trial_plan_leaves_a_cpu_for_data(cpus, gpus, use_gpu, concurrent):
    per_trial, n = tune_mod.trial_plan(cpus, gpus, use_gpu)
    assert n == concurrent and per_trial["cpu"] == 1
    assert ("gpu" in per_trial) == use_gpu
    if cpus > 1:
        assert n * per_trial["cpu"] <= cpus - 1


def test_tune_refuses_without_validation(tmp_path):
    data = make_semantic_set(tmp_path / "data", n_train=3, n_test=1)
    cfg_path = _write_cfg(tmp_path, data, validation_split=0.0)
    with pytest.raises(ConfigError, match="validation_split"):
        tune_mod.tune(str(cfg_path), [], num_samples=1, out=str(tmp_path / "t"))
