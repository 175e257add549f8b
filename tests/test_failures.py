"""Errors that cannot succeed are not retried, and weights are checked before Ray starts (issue 17
items 2 and 3)."""

from __future__ import annotations

import errno

import pytest
import torch

from conftest import make_semantic_set
from instantdl_ray import _ray, cli, pipeline
from instantdl_ray.config import schema as config
from instantdl_ray.errors import DataError, TrainingError, WeightsError, permanent_failure


def _cfg(data, **extra):
    return config.from_dict({"use_algorithm": "semantic", "path": str(data), "iterations_over_dataset": 1,
                             "batchsize": 2, "calculate_uncertainty": False, "evaluation": False, **extra})


def test_permanent_failures_are_classified():
    assert permanent_failure(WeightsError("bad file")) == "input"
    assert permanent_failure(OSError(errno.ENOSPC, "No space left on device")) == "disk"
    assert permanent_failure(PermissionError(errno.EACCES, "Permission denied")) == "disk"
    assert permanent_failure(TypeError("a bug")) == "code"
    # what a lost worker or a dead peer looks like: Ray Train's max_failures is for these
    assert permanent_failure(RuntimeError("Connection closed by peer")) is None
    assert permanent_failure(ConnectionResetError(errno.ECONNRESET, "reset")) is None
    import ray.exceptions

    assert permanent_failure(ray.exceptions.ObjectLostError("00" * 28, "", "")) is None


@pytest.mark.timeout(300)
def test_an_error_in_the_worker_that_cannot_succeed_is_not_retried(ray_session, tmp_path):
    """A weights file that fails in the training worker (here: checked only there, as ``fit`` is
    called directly): one attempt, the package's message, the traceback in train.log (not three
    worker-group starts and Ray's TrainingFailedError)."""
    from instantdl_ray.data.augment import AugmentParams
    from instantdl_ray.config.plan import make_plan
    from instantdl_ray.train.loop import fit
    from instantdl_ray.config.validate import validate

    data = make_semantic_set(tmp_path / "data", n_train=4, n_test=1)
    bad = tmp_path / "weights.pt"
    torch.save({"linear.weight": torch.zeros(3, 3)}, bad)  # a checkpoint of another model
    cfg = _cfg(data, pretrained_weights=str(bad), ray={"max_failures": 2})
    inv = validate(cfg)
    plan = make_plan(cfg, inv)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    resources = _ray.plan_resources(cfg.ray, *_ray.cluster_resources())
    with pytest.raises(TrainingError) as e:
        fit(cfg, plan, inv, run_dir, resources, AugmentParams.from_dict(cfg.data_gen_args.model_dump()),
            log=lambda msg: None)
    assert "no tensor of" in str(e.value) and str(bad) in str(e.value)
    train_log = (run_dir / "logs" / "train.log").read_text()
    assert train_log.count("worker 0/1") == 1, "retried by Ray Train's max_failures"
    assert "not retried" in train_log and "Traceback (most recent call last)" in train_log


def test_weights_of_another_model_are_refused_before_ray_starts(tmp_path, monkeypatch):
    data = make_semantic_set(tmp_path / "data", n_train=4, n_test=1)
    bad = tmp_path / "other_model.pt"
    torch.save(torch.nn.Linear(4, 2).state_dict(), bad)

    def no_ray(*a, **k):
        raise AssertionError("Ray was started before the weights were checked")

    monkeypatch.setattr(_ray, "init", no_ray)
    with pytest.raises(WeightsError) as e:
        pipeline.run(_cfg(data, pretrained_weights=str(bad)), out=tmp_path / "run")
    assert "no tensor of" in str(e.value) and "another model" in str(e.value)
    st = pipeline.read_state(tmp_path / "run")
    assert st["status"] == "failed" and st["stage"] == "plan"


def test_a_file_that_is_not_pytorch_is_a_validation_problem(tmp_path, capsys):
    data = make_semantic_set(tmp_path / "data", n_train=4, n_test=1)
    bad = tmp_path / "weights.pt"
    bad.write_text("this is not a checkpoint")
    with pytest.raises(DataError) as e:
        pipeline.run(_cfg(data, pretrained_weights=str(bad)), out=tmp_path / "run")
    assert f"cannot read '{bad}' as a PyTorch file" in str(e.value)
    assert not (tmp_path / "run").exists()  # refused before anything was written
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"use_algorithm: SemanticSegmentation\npath: {data}\npretrained_weights: {bad}\n")
    assert cli.main(["validate", str(cfg_file)]) == 2
    assert "as a PyTorch file" in capsys.readouterr().err


# ------------------------------------------------------------------ item 4: a corrupt checkpoint


def _fake_run(tmp_path, model_bytes: bytes | None = None, state_dict=None):
    """A run directory as training leaves it (config, plan, best model), with the given model file."""
    from instantdl_ray.models import build_model
    from instantdl_ray.config.plan import Plan

    data = make_semantic_set(tmp_path / "data", n_train=2, n_test=2)
    run_dir = tmp_path / "run"
    best = run_dir / "checkpoints" / "best" / "model.pt"
    best.parent.mkdir(parents=True)
    config.dump(_cfg(data), run_dir / "config.yaml")
    features = [4, 4, 8, 8, 16, 4]
    Plan(task="semantic", spatial_dims=2, axes="YX", target_axes="YX", in_channels=1, out_channels=1, num_classes=1,
         class_names=["background", "foreground"], tile_shape=[64, 64], image_size=None, model="unet",
         loss="dice_crossentropy", dropout=0.2, extra={"model_options": {"features": features}}).to_json(run_dir / "plan.json")
    if state_dict is None:
        state_dict = build_model("unet", in_channels=1, out_channels=1, spatial_dims=2, dropout=0.2,
                                 features=features).state_dict()
    torch.save(state_dict, best)
    if model_bytes is not None:
        best.write_bytes(model_bytes(best.read_bytes()))
    return run_dir, data, best


@pytest.mark.timeout(300)
@pytest.mark.parametrize("damage", ["truncated", "flipped", "other_model"])
def test_a_corrupt_checkpoint_in_predict_names_the_file_and_leaves_no_predictions(ray_session, tmp_path, damage):
    """Truncated, bit-flipped, or a checkpoint of another model: the file and what to do are
    named before any actor starts (no actor restarts), and no empty predictions/ is left."""
    if damage == "truncated":
        run_dir, data, best = _fake_run(tmp_path, model_bytes=lambda b: b[: len(b) // 2])
    elif damage == "flipped":
        def flip(b: bytes) -> bytes:
            b = bytearray(b)
            b[len(b) // 2: len(b) // 2 + 64] = bytes(64)  # zeroed bytes inside a tensor's data
            return bytes(b)
        run_dir, data, best = _fake_run(tmp_path, model_bytes=flip)
    else:
        run_dir, data, best = _fake_run(tmp_path, state_dict=torch.nn.Linear(3, 2).state_dict())
    out = tmp_path / "out"
    with pytest.raises(WeightsError) as e:
        pipeline.predict_new(run_dir, data / "test" / "image", out=out)
    text = str(e.value)
    assert str(best) in text and "retrain" in text and "--resume" in text, text
    assert not (out / "predictions").exists()


def test_checkpoint_problem_accepts_a_good_file(tmp_path):
    from instantdl_ray.predict.pool import checkpoint_problem

    *_, best = _fake_run(tmp_path)
    assert checkpoint_problem(best) is None


# ------------------------------------------------------------------ item 5: disk space


def test_too_little_disk_space_is_refused_before_training_with_the_numbers(tmp_path, monkeypatch):
    from instantdl_ray.config import diskspace

    data = make_semantic_set(tmp_path / "data", n_train=4, n_test=2)
    monkeypatch.setattr(diskspace, "free_bytes", lambda path: 5 * 2**20)

    def no_ray(*a, **k):
        raise AssertionError("Ray was started although the run cannot fit on the disk")

    monkeypatch.setattr(_ray, "init", no_ray)
    with pytest.raises(diskspace.DiskSpaceError) as e:
        pipeline.run(_cfg(data), out=tmp_path / "run")
    text = str(e.value)
    assert "5.0 MiB free" in text and "checkpoints ~" in text and "predictions ~" in text and "--out" in text, text
    st = pipeline.read_state(tmp_path / "run")
    assert st["status"] == "failed" and "disk space" in st["error"].lower() + text.lower()
    assert "--resume" in st["resume_command"]


def test_estimates_grow_with_the_model_and_the_images():
    from instantdl_ray.config import diskspace

    assert diskspace.training_bytes(2_000_000) > diskspace.training_bytes(1_000_000) > 1_000_000 * 4
    small = diskspace.prediction_bytes([256 * 256] * 10, 1, uncertainty=False)
    assert small >= 10 * 256 * 256 * 4
    assert diskspace.prediction_bytes([256 * 256] * 10, 1, uncertainty=True) > small
    assert diskspace.prediction_bytes([256 * 256] * 20, 1, uncertainty=False) == 2 * small


def test_predict_new_checks_the_space_of_its_output_folder(ray_session, tmp_path, monkeypatch):
    from instantdl_ray.config import diskspace

    run_dir, data, _ = _fake_run(tmp_path)
    monkeypatch.setattr(diskspace, "free_bytes", lambda path: 1024)
    with pytest.raises(diskspace.DiskSpaceError) as e:
        pipeline.predict_new(run_dir, data / "test" / "image", out=tmp_path / "out")
    assert "predictions ~" in str(e.value) and "1.0 KiB free" in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # the default suite covers the same with tests/test_run_state.py's full-disk state test
@pytest.mark.timeout(600)
def test_a_full_disk_during_prediction_fails_the_run_cleanly_and_resume_finishes_it(ray_session, tmp_path, monkeypatch):
    """ENOSPC while writing predictions: run.json says failed at predict with the error; after
    space is freed, --resume predicts without training again and completes."""
    from instantdl_ray.io import write

    data = make_semantic_set(tmp_path / "data", n_train=4, n_test=2)
    real_write = write.write_tiff

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(write, "write_tiff", full)
    run_dir = tmp_path / "run"
    cfg = _cfg(data)
    with pytest.raises(Exception) as e:
        pipeline.run(cfg, out=run_dir)
    assert "No space left on device" in str(e.value)
    st = pipeline.read_state(run_dir)
    assert st["status"] == "failed" and st["stage"] == "predict" and "No space left" in st["error"]
    monkeypatch.setattr(write, "write_tiff", real_write)
    pipeline.run(cfg, resume=run_dir)
    st = pipeline.read_state(run_dir)
    assert st["status"] == "complete"
    assert len(list((run_dir / "predictions").glob("*.tif"))) == 2
    assert (run_dir / "logs" / "train.log").read_text().count("epoch 1/1") == 1  # the resume did not train again
