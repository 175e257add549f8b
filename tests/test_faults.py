"""Faults a run survives (issue 17 item 12): a signal during prediction or training, a full file
system, two runs at once on one machine. Each run is resumed and must end as an uninterrupted one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import make_semantic_set
from instantdl_ray import pipeline
from instantdl_ray.config import schema as config

REPO = Path(__file__).resolve().parents[1]


def _cfg_dict(data: Path, **extra) -> dict:
    return {"use_algorithm": "semantic", "path": str(data), "iterations_over_dataset": 1, "batchsize": 2,
            "calculate_uncertainty": False, "seed": 3, **extra}


@pytest.mark.timeout(600)
def test_sigterm_during_prediction_then_resume_predicts_only_the_missing_images(ray_session, tmp_path, monkeypatch):
    """SIGTERM (a scheduler's preemption) after 2 of 5 test images: run.json says interrupted at
    predict; --resume keeps the 2 finished images and predicts the other 3 only."""
    from instantdl_ray.predict import pool as predict_mod

    data = make_semantic_set(tmp_path / "data", n_train=4, n_test=5)
    cfg = config.from_dict(_cfg_dict(data))
    address = ray_session.get_runtime_context().gcs_address  # the shared Ray: the run must not shut it down
    real = predict_mod.write_image
    calls: list[str] = []

    def write_then_preempt(s, *a, **k):
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # delivered to this (main) thread now
            time.sleep(5)  # the handler raises before this returns
        calls.append(s.stem)
        return real(s, *a, **k)

    monkeypatch.setattr(predict_mod, "write_image", write_then_preempt)
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(cfg, out=run_dir, address=address)
    st = pipeline.read_state(run_dir)
    assert st["status"] == "interrupted" and st["stage"] == "predict" and "SIGTERM" in st["error"], st
    first = list(calls)
    assert len(first) == 2 and not (run_dir / "predictions" / "index.json").exists()

    calls.clear()
    monkeypatch.setattr(predict_mod, "write_image", lambda s, *a, **k: (calls.append(s.stem), real(s, *a, **k))[1])
    pipeline.run(cfg, resume=run_dir, address=address)
    assert pipeline.read_state(run_dir)["status"] == "complete"
    assert len(calls) == 3 and not set(calls) & set(first), (first, calls)
    index = json.loads((run_dir / "predictions" / "index.json").read_text())
    assert sorted(r["name"] for r in index) == sorted(first + calls)
    assert not (run_dir / "predictions" / ".records").exists()
    assert (run_dir / "evaluation" / "results.json").exists()


def _run_cli(args: list[str], log: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)  # each run starts its own local Ray, as on a laptop
    return subprocess.Popen([sys.executable, "-m", "instantdl_ray", "run", *args], cwd=REPO, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True, **kw)


def _wait(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # only what this test started
        raise


def _weights(run_dir: Path):
    import torch

    return torch.load(run_dir / "checkpoints" / "best" / "model.pt", map_location="cpu", weights_only=True)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_sigint_during_training_then_resume_ends_as_the_uninterrupted_run(tmp_path):
    """Ctrl-C after the first of 3 epochs: exit 130, run.json interrupted at train; --resume
    continues from the checkpoint and ends with the same history and weights as a run that was
    never interrupted (same config and seed, one worker)."""
    import torch

    data = make_semantic_set(tmp_path / "data", n_train=6, n_test=2)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump(_cfg_dict(data, iterations_over_dataset=3)))

    whole = tmp_path / "whole"
    assert _wait(_run_cli([str(cfg_file), "--out", str(whole)], tmp_path / "whole.log"), 600) == 0

    cut = tmp_path / "cut"
    proc = _run_cli([str(cfg_file), "--out", str(cut)], tmp_path / "cut.log")
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if list((cut / "checkpoints" / "ray").rglob("state.pt")):  # epoch 1 is saved
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    os.kill(proc.pid, signal.SIGINT)
    assert _wait(proc, 300) == 130, (tmp_path / "cut.log").read_text()[-3000:]
    st = pipeline.read_state(cut)
    assert st["status"] == "interrupted" and st["stage"] == "train", st

    resumed = _run_cli(["--resume", str(cut)], tmp_path / "resume.log")
    assert _wait(resumed, 600) == 0, (tmp_path / "resume.log").read_text()[-3000:]
    assert pipeline.read_state(cut)["status"] == "complete"
    assert "resumed from checkpoint" in (cut / "logs" / "train.log").read_text()
    h_whole = json.loads((whole / "logs" / "history.json").read_text())
    h_cut = json.loads((cut / "logs" / "history.json").read_text())
    drop = ("epoch_time_s",)
    assert [{k: v for k, v in h.items() if k not in drop} for h in h_cut] == \
           [{k: v for k, v in h.items() if k not in drop} for h in h_whole]
    a, b = _weights(whole), _weights(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}): the container lacks CAP_SYS_ADMIN")


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_full_file_system_during_prediction_is_recorded_and_resumed_after_space_is_freed(tmp_path):
    """The run directory on a 100 MiB tmpfs that a ballast file fills up once training is done:
    the run fails at predict with ENOSPC recorded; after the ballast is deleted, --resume
    completes it."""
    data = make_semantic_set(tmp_path / "data", n_train=4, n_test=6, shape=(256, 256))
    mnt = tmp_path / "small"
    _tmpfs(mnt, "100m")
    try:
        run_dir = mnt / "run"
        cfg_file = tmp_path / "c.yaml"
        # checkpoints elsewhere: the tmpfs holds only the run's own files and the predictions
        cfg_file.write_text(yaml.safe_dump(_cfg_dict(data, ray={"storage_path": str(tmp_path / "ckpt")})))
        proc = _run_cli([str(cfg_file), "--out", str(run_dir)], tmp_path / "full.log")
        ballast = mnt / "ballast"
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            if (run_dir / "thresholds.json").exists():  # training and the decision are done
                with open(ballast, "wb") as f:  # fill the file system up to the last few KiB
                    try:
                        while True:
                            f.write(b"\0" * 2**20)
                            f.flush()
                    except OSError:
                        pass
                break
            time.sleep(0.05)
        rc = _wait(proc, 600)
        log = (tmp_path / "full.log").read_text()
        if rc == 0:
            pytest.skip("prediction finished before the file system filled up")
        st = pipeline.read_state(run_dir)
        assert st["status"] == "failed" and st["stage"] in ("predict", "evaluate") and "No space left" in st["error"], (st, log[-2000:])
        assert "Traceback" not in log, log[-3000:]
        ballast.unlink()
        resumed = _run_cli(["--resume", str(run_dir)], tmp_path / "resume.log")
        assert _wait(resumed, 600) == 0, (tmp_path / "resume.log").read_text()[-3000:]
        assert pipeline.read_state(run_dir)["status"] == "complete"
        assert len(list((run_dir / "predictions").glob("*.tif"))) == 6
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_two_runs_at_once_each_with_its_own_local_ray(tmp_path):
    """Two `run`s started together on one machine, each starting a local Ray: both complete, and
    neither console shows Ray's 'multiple active Ray instances' error."""
    procs = []
    for name in ("a", "b"):
        data = make_semantic_set(tmp_path / f"data_{name}", n_train=4, n_test=2)
        cfg_file = tmp_path / f"{name}.yaml"
        cfg_file.write_text(yaml.safe_dump(_cfg_dict(data, iterations_over_dataset=2)))
        procs.append((name, _run_cli([str(cfg_file), "--out", str(tmp_path / f"run_{name}")], tmp_path / f"{name}.log")))
    for name, p in procs:
        rc = _wait(p, 1200)
        log = (tmp_path / f"{name}.log").read_text()
        assert rc == 0, log[-3000:]
        assert "multiple active ray instances" not in log.lower(), log[-3000:]
        assert pipeline.read_state(tmp_path / f"run_{name}")["status"] == "complete"
