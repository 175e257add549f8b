"""A real two-node Ray cluster on this machine: `ray start --head` + `ray start --address`.

Run: python -m pytest -m slow tests/test_multinode.py
Separate raylets on loopback; token authentication on (Ray's default for `ray start`).
Checks that training uses both nodes, and that a training worker killed with SIGKILL mid-run is
replaced and the run still ends with complete, correct outputs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import make_run_config
from test_fault_tolerance import _checkpoint_epochs, _wait

pytestmark = pytest.mark.slow

PORT = 6412
RAY = str(Path(sys.executable).parent / "ray")


def _node(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([RAY, "start", "--block", *args], env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture
def two_node_cluster(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    head = _node(["--head", "--port", str(PORT), "--num-cpus", "2", "--dashboard-port", "8412",
                  "--ray-client-server-port", "10412", "--dashboard-agent-listen-port", "52412",
                  "--metrics-export-port", "8512", "--min-worker-port", "23000", "--max-worker-port", "23999",
                  "--temp-dir", tempfile.mkdtemp(prefix="rmn", dir="/tmp")],  # AF_UNIX paths: <108 bytes
                 env, tmp_path / "head.log")
    time.sleep(8)
    worker = _node(["--address", f"127.0.0.1:{PORT}", "--num-cpus", "2", "--dashboard-agent-listen-port", "52413",
                    "--metrics-export-port", "8513", "--min-worker-port", "24000", "--max-worker-port", "24999"],
                   env, tmp_path / "worker.log")
    try:
        t0 = time.time()
        while time.time() - t0 < 90:
            out = subprocess.run([RAY, "status", "--address", f"127.0.0.1:{PORT}"], env=env,
                                 capture_output=True, text=True).stdout
            if out.count("node_") >= 2:
                break
            time.sleep(2)
        else:
            pytest.fail("two-node cluster did not come up:\n" + (tmp_path / "head.log").read_text()[-2000:])
        yield env, (head.pid, worker.pid)
    finally:
        for p in (worker, head):
            os.killpg(p.pid, signal.SIGINT)  # `ray start --block` stops its own node on Ctrl-C
        for p in (worker, head):
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


@pytest.mark.timeout(900)
def test_run_on_two_nodes_survives_a_killed_worker(two_node_cluster, tmp_path):
    from test_fault_tolerance import _worker_pids

    env, node_pids = two_node_cluster
    cfg = make_run_config(tmp_path, 8)
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "instantdl_ray", "run", str(cfg), "--out", str(run_dir), "--address",
         f"127.0.0.1:{PORT}", "--set", "ray.num_workers=2", "--set", "ray.placement_strategy=SPREAD"],
        env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait(lambda: _checkpoint_epochs(run_dir) >= 2, 400, proc, log)
        # only this cluster's workers (other Ray instances may run on the machine)
        victims = [p for root in node_pids for p in _worker_pids(root)]
        assert victims, "no training worker process found"
        os.kill(victims[0], signal.SIGKILL)
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    nodes = {line.split(" on node ")[1].strip() for line in (run_dir / "logs" / "train.log").read_text().splitlines()
             if " on node " in line}
    assert len(nodes) == 2, f"training ran on {nodes}"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "complete"
    hist = pd.read_csv(run_dir / "logs" / "history.csv")
    assert list(hist["epoch"]) == list(range(8))
    res = json.loads((run_dir / "evaluation" / "results.json").read_text())
    assert 0 <= res["summary"]["jaccard"] <= 1
