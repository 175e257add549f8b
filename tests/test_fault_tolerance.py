"""Faults that long runs meet: a training worker killed with SIGKILL, the whole driver killed and resumed.

Each test runs the real command line in a subprocess with its own local Ray (2 CPUs), so killing
processes cannot disturb the session's Ray instance.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import make_run_config

EPOCHS = 8


def _config(tmp_path: Path) -> Path:
    return make_run_config(tmp_path, EPOCHS, "evaluation: false\n")


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "instantdl_ray", *args, "--num-cpus", "2"],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _checkpoint_epochs(run_dir: Path) -> int:
    """Number of epochs with a finished checkpoint."""
    import torch

    best = -1
    for p in (run_dir / "checkpoints" / "ray").rglob("state.pt"):
        try:
            best = max(best, torch.load(p, map_location="cpu", weights_only=False)["epoch"])
        except Exception:
            pass  # being written
    return best + 1


def _wait(pred, timeout: float, proc: subprocess.Popen, log: Path):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}):\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    raise AssertionError(f"timed out:\n{log.read_text()[-3000:]}")


def _processes() -> tuple[dict[int, int], dict[int, str]]:
    """``ps``: pid -> parent pid, pid -> command line."""
    out = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout
    parent, args = {}, {}
    for line in out.splitlines()[1:]:
        parts = line.strip().split(None, 2)
        if len(parts) >= 2:
            parent[int(parts[0])], args[int(parts[0])] = int(parts[1]), parts[2] if len(parts) == 3 else ""
    return parent, args


def _descendants(root_pid: int, parent: dict[int, int] | None = None) -> list[int]:
    """All processes descending from ``root_pid``."""
    parent = parent if parent is not None else _processes()[0]

    def descends(pid: int) -> bool:
        while pid > 1:
            if pid == root_pid:
                return True
            pid = parent.get(pid, 0)
        return False

    return [p for p in parent if p != root_pid and descends(p)]


def _worker_pids(root_pid: int) -> list[int]:
    """PIDs of Ray Train worker processes descending from ``root_pid`` (the driver we started)."""
    parent, args = _processes()
    return [p for p in _descendants(root_pid, parent) if "RayTrainWorker" in args[p]]


@pytest.mark.slow  # fault injection, minutes (issue 17: slow where they need minutes)
@pytest.mark.timeout(420)
def test_killed_training_worker_is_replaced_and_training_finishes(tmp_path):
    cfg, run_dir, log = _config(tmp_path), tmp_path / "run", tmp_path / "log.txt"
    proc = _start(["run", str(cfg), "--out", str(run_dir)], log)
    try:
        _wait(lambda: _checkpoint_epochs(run_dir) >= 2 and _worker_pids(proc.pid), 240, proc, log)
        for pid in _worker_pids(proc.pid):
            os.kill(pid, signal.SIGKILL)
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    state = json.loads((run_dir / "run.json").read_text())
    assert state["status"] == "complete"
    hist = pd.read_csv(run_dir / "logs" / "history.csv")
    assert list(hist["epoch"]) == list(range(EPOCHS))  # continued from the checkpoint, no epoch lost or repeated
    assert len(list((run_dir / "predictions").glob("*.tif"))) == 2


@pytest.mark.slow  # fault injection, minutes
@pytest.mark.timeout(480)
def test_resume_after_kill_9_of_the_driver_continues_from_last_checkpoint(tmp_path):
    cfg, run_dir, log = _config(tmp_path), tmp_path / "run", tmp_path / "log.txt"
    proc = _start(["run", str(cfg), "--out", str(run_dir)], log)
    try:
        _wait(lambda: _checkpoint_epochs(run_dir) >= 2, 240, proc, log)
    finally:
        # the driver, the local Ray it started and its workers (some leave the process group)
        family = _descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in family:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=60)
        time.sleep(1)
    done_before = _checkpoint_epochs(run_dir)
    assert 2 <= done_before < EPOCHS
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"  # not looking complete
    assert not (run_dir / "predictions").exists()

    log2 = tmp_path / "log2.txt"
    proc = _start(["run", "--resume", str(run_dir)], log2)
    try:
        assert proc.wait(timeout=360) == 0, log2.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log2.read_text()
    assert f"resuming training from epoch {done_before + 1}" in text
    hist = pd.read_csv(run_dir / "logs" / "history.csv")
    assert list(hist["epoch"]) == list(range(EPOCHS))  # same total number of epochs
    assert json.loads((run_dir / "run.json").read_text())["status"] == "complete"
