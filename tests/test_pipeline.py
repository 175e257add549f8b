"""End-to-end runs of the whole pipeline on tiny synthetic data, on a 2-CPU local Ray."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import tifffile

from conftest import RAY_CONSOLE_NOISE, make_classification_set, make_instance_set, make_regression_set, make_semantic_set
from instantdl_ray import pipeline
from instantdl_ray.config import schema as config

FAST = {"iterations_over_dataset": 2, "batchsize": 2, "mc_passes": 2}


def _run(tmp_path, data, task, **extra):
    cfg = config.from_dict({"use_algorithm": task, "path": str(data), **FAST, **extra})
    return pipeline.run(cfg, out=tmp_path / "run")


def _complete(run_dir, epochs=None):
    state = json.loads((run_dir / "run.json").read_text())
    assert state["status"] == "complete"
    assert (run_dir / "config.yaml").exists() and (run_dir / "plan.json").exists()
    assert (run_dir / "checkpoints" / "best" / "model.pt").exists()
    epochs = epochs or FAST["iterations_over_dataset"]
    lines = [ln for ln in (run_dir / "logs" / "train.log").read_text().splitlines() if ln.startswith("epoch ")]
    assert [ln.split()[1] for ln in lines] == [f"{k}/{epochs}" for k in range(1, epochs + 1)]  # one line per epoch
    hist = pd.read_csv(run_dir / "logs" / "history.csv")
    assert len(hist) == epochs and np.isfinite(hist["loss"]).all()
    assert list(hist["epoch"]) == list(range(epochs))
    return state


LEARN = {"iterations_over_dataset": 8, "learning_rate": 0.01, "tiles_per_image": 4}


@pytest.mark.timeout(400)
def test_semantic_run_end_to_end(ray_session, tmp_path, capfd):
    """Bright discs on noise are learnt in a few epochs: a broken pipeline (misaligned targets,
    wrong normalisation, a bad decision rule) cannot reach the stated Jaccard. What the run
    printed holds none of Ray's per-epoch lines (the whole console: tests/test_console.py, slow)."""
    data = make_semantic_set(tmp_path / "data", shape=(80, 72))
    run_dir = _run(tmp_path, data, "SemanticSegmentation", image_size=64, **LEARN)
    _complete(run_dir, epochs=LEARN["iterations_over_dataset"])
    decision = json.loads((run_dir / "thresholds.json").read_text())
    assert decision["rule"].startswith("calibrated") and 0.1 <= decision["threshold"] <= 0.9
    records = json.loads((run_dir / "predictions" / "index.json").read_text())
    assert {r["threshold"] for r in records} == {decision["threshold"]}  # the validated rule, on every test image
    for name in ("img00", "img01", "img02"):
        pred = tifffile.imread(run_dir / "predictions" / f"{name}.tif")
        assert pred.shape == (80, 72) and pred.dtype == np.uint8 and set(np.unique(pred)) <= {0, 1}
        unc = tifffile.imread(run_dir / "uncertainty" / f"{name}.tif")
        assert unc.shape == (80, 72) and unc.dtype == np.float32 and (unc >= 0).all() and (unc <= 1).all()
        assert (run_dir / "uncertainty" / f"{name}_mutual_information.tif").exists()
    res = json.loads((run_dir / "evaluation" / "results.json").read_text())
    assert res["summary"]["jaccard"] >= 0.6, res["summary"]
    per_image = pd.read_csv(run_dir / "evaluation" / "per_image.csv")
    assert len(per_image) == 3 and (per_image["jaccard"] > 0.4).all()
    printed = capfd.readouterr()
    noise = [ln for ln in (printed.out + printed.err).splitlines() if any(s in ln for s in RAY_CONSOLE_NOISE)]
    assert not noise, "\n".join(noise[:5])


@pytest.mark.timeout(400)
def test_same_config_and_seed_give_the_same_run(ray_session, tmp_path):
    """Issue 12 item 9: row order through Ray Data, seeded augmentation and initialisation."""
    data = make_semantic_set(tmp_path / "data", n_train=5, n_test=1)
    extra = {"data_gen_args": {"rotation_range": 20, "contrast_range": 0.2}, "calculate_uncertainty": False,
             "evaluation": False, "tiles_per_image": 3}
    runs = []
    for k in range(2):
        cfg = config.from_dict({"use_algorithm": "semantic", "path": str(data), **FAST, **extra})
        runs.append(pipeline.run(cfg, out=tmp_path / f"run{k}"))
    h0, h1 = (pd.read_csv(r / "logs" / "history.csv") for r in runs)
    cols = [c for c in h0.columns if c != "epoch_time_s"]
    pd.testing.assert_frame_equal(h0[cols], h1[cols])
    import torch

    w0, w1 = (torch.load(r / "checkpoints" / "best" / "model.pt", weights_only=True) for r in runs)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)


@pytest.mark.timeout(300)
def test_two_workers_on_two_cpus_do_not_hang(ray_session, tmp_path):
    """Measured: 2 one-CPU workers + a Ray Dataset on 2 CPUs waits forever; the planner must avoid it."""
    data = make_semantic_set(tmp_path / "data", n_train=6, n_test=1)
    run_dir = _run(tmp_path, data, "semantic", ray={"num_workers": 2}, calculate_uncertainty=False, evaluation=False)
    _complete(run_dir)


@pytest.mark.timeout(300)
def test_regression_run_writes_values_in_target_range(ray_session, tmp_path):
    data = make_regression_set(tmp_path / "data")
    run_dir = _run(tmp_path, data, "Regression")
    _complete(run_dir)
    pred = tifffile.imread(run_dir / "predictions" / "t00.tif")
    assert pred.dtype == np.float32 and pred.shape == (64, 64)
    # targets are ~1000..1020: predictions must come back in that range, not normalised units
    assert 900 < float(np.median(pred)) < 1100
    assert tifffile.imread(run_dir / "uncertainty" / "t00.tif").shape == (64, 64)
    res = json.loads((run_dir / "evaluation" / "results.json").read_text())
    assert "pearson" in res["summary"]


@pytest.mark.timeout(300)
def test_classification_run_writes_predictions_csv(ray_session, tmp_path):
    data = make_classification_set(tmp_path / "data")
    run_dir = _run(tmp_path, data, "Classification", model="resnet18")
    _complete(run_dir)
    df = pd.read_csv(run_dir / "predictions" / "predictions.csv")
    assert list(df.columns) == ["filename", "prediction", "prob_single", "prob_pair", "uncertainty"]
    assert len(df) == 4 and set(df["prediction"]) <= {0, 1}
    np.testing.assert_allclose(df[["prob_single", "prob_pair"]].sum(axis=1), 1, atol=1e-4)
    assert df["uncertainty"].between(0, 1).all()
    res = json.loads((run_dir / "evaluation" / "results.json").read_text())
    assert "accuracy" in res["summary"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("model", ["unet", "maskrcnn_resnet18_fpn"])
def test_instance_run_writes_label_images(ray_session, tmp_path, model):
    data = make_instance_set(tmp_path / "data", n_train=4 if model != "unet" else 6)
    extra = {"model": model}
    if model != "unet":
        extra.update(iterations_over_dataset=2, batchsize=2)
    run_dir = _run(tmp_path, data, "InstanceSegmentation", **extra)
    _complete(run_dir)
    pred = tifffile.imread(run_dir / "predictions" / "img00.tif")
    assert pred.dtype == np.uint16 and pred.shape == (64, 64)
    objects = pd.read_csv(run_dir / "predictions" / "img00_objects.csv")
    assert list(objects.columns[:3]) == ["id", "score", "area"]
    assert len(objects) == len(np.unique(pred[pred > 0]))
    res = json.loads((run_dir / "evaluation" / "results.json").read_text())
    assert "ap_mean" in res["summary"]


@pytest.mark.timeout(300)
def test_predict_only_with_weights_from_an_earlier_run(ray_session, tmp_path):
    data = make_semantic_set(tmp_path / "data", n_train=4, n_test=2)
    first = _run(tmp_path, data, "semantic", calculate_uncertainty=False, evaluation=False)
    cfg = config.from_dict({"use_algorithm": "semantic", "path": str(data), "iterations_over_dataset": 0,
                            "pretrained_weights": str(first), "calculate_uncertainty": False})
    second = pipeline.run(cfg, out=tmp_path / "second")
    assert (second / "predictions" / "img00.tif").exists()
    np.testing.assert_array_equal(tifffile.imread(second / "predictions" / "img00.tif"),
                                  tifffile.imread(first / "predictions" / "img00.tif"))
