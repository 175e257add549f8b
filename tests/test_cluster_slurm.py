"""`sbatch cluster/slurm/instantdl.sbatch` on a real SLURM: Debian's slurm-wlm and munge, configured
as a two-node cluster on this one machine (two `slurmd -N`, on 127.0.0.1 and 127.0.0.2).

Run: python -m pytest -m slow tests/test_cluster_slurm.py -v        (needs root and Debian's apt)

The job trains on both nodes (Ray head on the first, a Ray worker node on the second), is requeued
in the middle of training (`scontrol requeue`: what preemption does), and the requeued job
resumes the run from its checkpoint to the end. Only daemons this test starts are stopped; the
job's Ray lives under its own RAY_TMPDIR and ports, and SLURM ends it with the job's steps.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import make_run_config
from test_cluster_onprem import _free_port, _sh, need_debian_packages
from test_fault_tolerance import _checkpoint_epochs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "cluster" / "slurm" / "instantdl.sbatch"


@pytest.fixture
def slurm(tmp_path):
    """munged, slurmctld and two slurmd on this machine; yields the environment for sbatch & co."""
    need_debian_packages("slurm-wlm", "munge")
    d = Path(f"/tmp/slurm-test-{os.getpid()}")  # short: munge's socket path
    shutil.rmtree(d, ignore_errors=True)
    (d / "munge").mkdir(parents=True)
    for sub in ("state", "spool-n1", "spool-n2"):
        (d / sub).mkdir()
    d.chmod(0o755)
    shutil.chown(d / "munge", "munge", "munge")
    (d / "munge").chmod(0o755)
    host = socket.gethostname().split(".")[0]
    ctld, p1, p2 = _free_port(), _free_port(), _free_port()
    conf = d / "slurm.conf"
    conf.write_text(f"""ClusterName=instantdltest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld}
AuthType=auth/munge
AuthInfo=socket={d}/munge/munge.socket
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool-%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
KillWait=90
MinJobAge=3600
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=n1 NodeAddr=127.0.0.1 NodeHostname={host} Port={p1} CPUs=2 RealMemory=4000 State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.2 NodeHostname={host} Port={p2} CPUs=2 RealMemory=4000 State=UNKNOWN
PartitionName=test Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
""")
    pids = []
    try:
        r = _sh(["runuser", "-u", "munge", "--", "/usr/sbin/munged", f"--socket={d}/munge/munge.socket",
                 f"--pid-file={d}/munge/munged.pid", f"--log-file={d}/munge/munged.log", f"--seed-file={d}/munge/seed"])
        assert r.returncode == 0, r.stderr
        pids.append(d / "munge" / "munged.pid")
        _sh(["/usr/sbin/slurmctld", "-f", str(conf)]).check_returncode()
        pids.append(d / "slurmctld.pid")
        for n in ("n1", "n2"):
            _sh(["/usr/sbin/slurmd", "-f", str(conf), "-N", n]).check_returncode()
            pids.append(d / f"slurmd-{n}.pid")
        env = {**os.environ, "SLURM_CONF": str(conf),
               "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
        env.pop("RAY_ADDRESS", None)
        for _ in range(60):
            out = _sh(["sinfo", "-h", "-N", "-o", "%N %t"], env=env).stdout
            if out.count("idle") == 2:
                break
            time.sleep(1)
        else:
            pytest.fail(f"SLURM nodes not idle: {out}\n" + (d / "slurmctld.log").read_text()[-2000:])
        yield env, d
    finally:
        for pid_file in reversed(pids):  # only the daemons this fixture started
            try:
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
            except (OSError, ValueError):
                pass
        time.sleep(2)


def _job_state(job: str, env: dict) -> tuple[str, int]:
    out = _sh(["scontrol", "show", "job", job], env=env).stdout
    state = re.search(r"JobState=(\S+)", out)
    restarts = re.search(r"Restarts=(\d+)", out)
    return (state.group(1) if state else "UNKNOWN"), int(restarts.group(1)) if restarts else 0


def test_sbatch_trains_on_two_nodes_and_resumes_after_requeue(slurm):
    env, d = slurm
    work = d / "work"
    work.mkdir()
    cfg = make_run_config(work, 8)
    run_dir = work / "run"
    t0 = time.time()
    r = _sh(["sbatch", "--parsable", "--chdir", str(work), "--cpus-per-task=2", "--time=30",
             f"--export=ALL,RUN_DIR={run_dir}", str(SCRIPT), str(cfg),
             "--set", "ray.num_workers=2", "--set", "ray.placement_strategy=SPREAD"], env=env)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    out = work / f"instantdl-{job}.out"

    def log() -> str:
        return (out.read_text() if out.exists() else "(no job output)")[-4000:]

    # preempt it in the middle of training: `scontrol requeue` (what a preempting job does)
    deadline = time.time() + 600
    while _checkpoint_epochs(run_dir) < 2:
        state, _ = _job_state(job, env)
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {state} before the requeue:\n{log()}"
        assert time.time() < deadline, f"no 2 epochs in 10 min:\n{log()}"
        time.sleep(2)
    t_first = time.time() - t0
    _sh(["scontrol", "requeue", job], env=env).check_returncode()
    deadline = time.time() + 900
    while (st := _job_state(job, env))[0] != "COMPLETED":
        assert st[0] not in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"), \
            f"job {st}:\n{log()}"
        if st[0] in ("PENDING", "REQUEUE_HOLD") and "JobHeldAdmin" in _sh(["scontrol", "show", "job", job], env=env).stdout:
            _sh(["scontrol", "release", job], env=env)
        assert time.time() < deadline, f"job {st} after 15 min:\n{log()}"
        time.sleep(3)
    state, restarts = _job_state(job, env)
    assert restarts >= 1, f"the job was not requeued:\n{log()}"
    text = out.read_text()  # both attempts (--open-mode=append): the stop, then the resume
    assert "(restart 0)" in text and "(restart 1)" in text and "instantdl: SIGTERM" in text, text[-4000:]

    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "complete", run
    assert any(h.get("status") in ("interrupted", "failed", "running") for h in run.get("history", [])), \
        f"the requeued job did not resume the run: {run}"
    hist = pd.read_csv(run_dir / "logs" / "history.csv")
    assert list(hist["epoch"]) == list(range(8)), "each epoch exactly once across the requeue"
    nodes = {line.split(" on node ")[1].strip() for line in (run_dir / "logs" / "train.log").read_text().splitlines()
             if " on node " in line}
    # each attempt brings its own Ray (new node ids): two nodes before the requeue, two after
    assert len(nodes) == 4, f"training ran on {nodes}"
    res = json.loads((run_dir / "evaluation" / "results.json").read_text())
    assert 0 <= res["summary"]["jaccard"] <= 1
    # nothing of the job's Ray is left once SLURM ended its steps
    assert _sh(["pgrep", "-f", f"ray-[^ ]*-{job}"]).returncode != 0, "a Ray process of the job outlived it"
    print(f"2 epochs after {t_first:.0f} s, requeued, complete after {time.time() - t0:.0f} s; nodes {sorted(nodes)}")
