"""A run's own state: failures and interrupts are recorded, resumable, never left 'running' (issue 17 item 1)."""

from __future__ import annotations

import json
import os
import signal

import pytest

from conftest import make_semantic_set
from instantdl_ray import cli, pipeline
from instantdl_ray.config import schema as config
from instantdl_ray.errors import RunFailed


def _cfg(data):
    return config.from_dict({"use_algorithm": "semantic", "path": str(data), "iterations_over_dataset": 1})


def _state(run_dir):
    return json.loads((run_dir / "run.json").read_text())


def test_an_error_after_validation_is_recorded_with_stage_and_resume_command(tmp_path, monkeypatch):
    data = make_semantic_set(tmp_path / "data")

    def broken_plan(*a, **k):
        raise ZeroDivisionError("a programming error inside a stage")

    monkeypatch.setattr(pipeline, "_plan", broken_plan)
    with pytest.raises(RunFailed) as e:
        pipeline.run(_cfg(data), out=tmp_path / "run")
    run_dir = (tmp_path / "run").resolve()
    st = _state(run_dir)
    assert st["status"] == "failed" and st["stage"] == "plan"
    assert "ZeroDivisionError: a programming error inside a stage" in st["error"]
    assert st["resume_command"] == f"python -m instantdl_ray run --resume {run_dir}" and st["ended"]
    text = e.value.format()
    assert "run.log" in text and "--resume" in text and "ZeroDivisionError" in text
    log = (run_dir / "logs" / "run.log").read_text()
    assert "Traceback (most recent call last)" in log and "failed during plan" in log


def test_a_system_exit_inside_a_stage_is_an_interrupt(tmp_path, monkeypatch):
    """A Ctrl-C that lands in ray.get reaches the driver as SystemExit(1) (seen in a DSB run)."""
    data = make_semantic_set(tmp_path / "data")

    def exits(*a, **k):
        raise SystemExit(1)

    monkeypatch.setattr(pipeline, "_plan", exits)
    with pytest.raises(SystemExit):
        pipeline.run(_cfg(data), out=tmp_path / "run")
    st = _state(tmp_path / "run")
    assert st["status"] == "interrupted" and st["error"] == "interrupted (Ctrl-C)"  # not Ray's "1"


def test_a_sigterm_that_ray_turns_into_system_exit_is_recorded_as_the_signal(tmp_path, monkeypatch):
    """SLURM's requeue (SIGTERM) while the driver waits in ray.get: Ray turns the handler's
    KeyboardInterrupt into SystemExit(1); run.json must still say it was SIGTERM, not Ctrl-C."""
    data = make_semantic_set(tmp_path / "data")

    def preempted_in_ray_get(*a, **k):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except KeyboardInterrupt:
            raise SystemExit(1) from None  # what ray.get does with it

    monkeypatch.setattr(pipeline, "_plan", preempted_in_ray_get)
    with pytest.raises(SystemExit):
        pipeline.run(_cfg(data), out=tmp_path / "run")
    st = _state(tmp_path / "run")
    assert st["status"] == "interrupted" and st["error"] == "interrupted (signal SIGTERM)"
    # a later Ctrl-C of another run is not labelled with this run's signal
    monkeypatch.setattr(pipeline, "_plan", lambda *a, **k: (_ for _ in ()).throw(SystemExit(1)))
    with pytest.raises(SystemExit):
        pipeline.run(_cfg(data), out=tmp_path / "run2")
    assert _state(tmp_path / "run2")["error"] == "interrupted (Ctrl-C)"


def test_the_command_line_exits_130_when_ray_turns_ctrl_c_into_system_exit(tmp_path, monkeypatch, capsys):
    data = make_semantic_set(tmp_path / "data")
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"use_algorithm: semantic\npath: {data}\n")

    def exits(*a, **k):
        raise SystemExit(1)

    monkeypatch.setattr(pipeline, "_plan", exits)
    assert cli.main(["run", str(cfg_file), "--out", str(tmp_path / "run")]) == 130
    assert "interrupted" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_an_interrupt_is_recorded_as_interrupted(tmp_path, monkeypatch, how):
    data = make_semantic_set(tmp_path / "data")

    def interrupted_plan(*a, **k):
        if how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's preemption
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_plan", interrupted_plan)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(_cfg(data), out=tmp_path / "run")
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is the run's only
    st = _state(tmp_path / "run")
    assert st["status"] == "interrupted" and st["stage"] == "plan"
    # the command line: one line, exit 130
    assert cli.main(["run", "--resume", str(tmp_path / "run")]) == 130
    st2 = _state(tmp_path / "run")
    assert st2["status"] == "interrupted" and st2["started"] == st["started"]  # `started` is kept
    assert [h["status"] for h in st2["history"]] == ["interrupted"]  # each resume is appended


def test_resume_of_a_complete_run_does_nothing(tmp_path, monkeypatch, capsys):
    data = make_semantic_set(tmp_path / "data")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"status": "complete", "finished": "2026-12-01T10:00:00"}))
    config.dump(_cfg(data), run_dir / "config.yaml")

    def must_not_run(*a, **k):
        raise AssertionError("a complete run was started again")

    monkeypatch.setattr(pipeline, "_stages", must_not_run)
    assert cli.main(["run", "--resume", str(run_dir)]) == 0
    assert "is complete" in capsys.readouterr().out and _state(run_dir)["status"] == "complete"
    with pytest.raises(RunFailed, match="started again"):  # --force does run (prediction, evaluation)
        pipeline.run(_cfg(data), resume=run_dir, force=True)


def test_the_state_is_recorded_on_a_full_disk(tmp_path, monkeypatch):
    """A run that fails because the disk is full must still say "failed" in run.json: the atomic
    write (a new temp file) cannot get space, so the file is rewritten in its own blocks."""
    import errno
    import json

    from instantdl_ray import pipeline

    pipeline._set_state(tmp_path, status="running", stage="predict")

    class Full:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __exit__(self, *a):
            return False

    monkeypatch.setattr(pipeline, "atomic_path", Full)
    pipeline._set_state(tmp_path, status="failed", error="OSError: [Errno 28] No space left on device")
    st = json.loads((tmp_path / "run.json").read_text())
    assert st["status"] == "failed" and st["stage"] == "predict" and "No space" in st["error"]
    log = pipeline.RunLog(tmp_path / "logs" / "run.log")
    monkeypatch.setattr("builtins.open", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    log("still printed")  # no exception: the line goes to the console only
    assert log.path is None


@pytest.mark.timeout(180)
def test_starting_ray_keeps_the_runs_sigterm_handler():
    """ray.init installs its own SIGTERM handler (sys.exit(15)): a run preempted by a scheduler was
    then recorded as "interrupted (Ctrl-C)". Starting Ray keeps the handler the run installed. In
    a fresh process, since this one's Ray may already run."""
    import subprocess
    import sys

    code = ("import signal\n"
            "from instantdl_ray import _ray\n"
            "def mine(signum, frame): pass\n"
            "signal.signal(signal.SIGTERM, mine)\n"
            "_ray.init(num_cpus=1)\n"
            "print('kept' if signal.getsignal(signal.SIGTERM) is mine else 'replaced')\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=150, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "kept", r.stdout
