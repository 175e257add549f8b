"""Autoscaling: a cluster that starts with its head only grows when a run asks for workers, and
shrinks when the run is over. Ray's fake multi-node provider (`RAY_FAKE_CLUSTER=1 ray start
--head --autoscaling-config=...`) runs Ray's real autoscaler; the nodes it "launches" are real
raylets on this machine.

Run: python -m pytest -m slow tests/test_cluster_autoscale.py -v
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

from conftest import make_run_config
from test_fault_tolerance import _processes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

PORT = 6452
RAY = str(Path(sys.executable).parent / "ray")


def autoscaling_config(idle_minutes: float) -> dict:
    """A head with 1 CPU that runs nothing itself, and up to two 1-CPU worker nodes on demand."""
    return {
        "cluster_name": "instantdl-autoscale-test",
        "max_workers": 2,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_minutes,
        # as in Ray's own fake-cluster harness (ray.cluster_utils.AutoscalingCluster, autoscaler v2):
        # its nodes need no SSH updater and have no launch config. Named as an "external" provider:
        # Ray 2.60's wheel lacks the defaults file (fake_multi_node/example.yaml) that autoscaler
        # v2 loads for the "fake_multinode" type.
        "provider": {"type": "external", "gcs_address": f"127.0.0.1:{PORT}",
                     "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
                     "disable_node_updaters": True, "disable_launch_config_check": True,
                     "launch_multiple": True, "head_node_id": FAKE_HEAD_NODE_ID},
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "cpu_worker": {"resources": {"CPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2},
        },
        "head_node_type": "ray.head.default",
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def _alive_nodes(env: dict) -> int:
    code = ("import ray; ray.init(address='127.0.0.1:%d', logging_level='ERROR'); "
            "print(sum(n['Alive'] for n in ray.nodes()))" % PORT)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    return int(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 and r.stdout.strip() else -1


def _this_clusters_processes() -> list[int]:
    """Ray processes that belong to this test's cluster (its GCS port is in their command line)."""
    _, args = _processes()
    return [pid for pid, cmd in args.items()
            if re.search(rf"[\d.]+:{PORT}\b", cmd) and "pytest" not in cmd and pid != os.getpid()]


def test_head_only_cluster_grows_for_a_run_and_shrinks_after(tmp_path):
    cfg_file = tmp_path / "autoscaling.json"
    cfg_file.write_text(json.dumps(autoscaling_config(idle_minutes=0.25)))
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_AUTH_MODE": "token",
           # autoscaler v2, as Ray's harness runs the fake provider (v1 never marks its nodes up to date)
           "RAY_enable_autoscaler_v2": "1", "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
           "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--port", str(PORT), "--num-cpus", "1",
         f"--autoscaling-config={cfg_file}", "--dashboard-port", "8452", "--ray-client-server-port", "10452",
         "--dashboard-agent-listen-port", "52452", "--metrics-export-port", "8552",
         "--min-worker-port", "27000", "--max-worker-port", "27999",
         "--temp-dir", tempfile.mkdtemp(prefix="ras", dir="/tmp")],  # AF_UNIX paths: < 108 bytes
        env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.time()
    try:
        deadline = time.time() + 90
        while _alive_nodes(env) != 1:
            assert time.time() < deadline, (tmp_path / "head.log").read_text()[-2000:]
            time.sleep(2)
        cfg = make_run_config(tmp_path, 3)
        run_dir, log = tmp_path / "run", tmp_path / "run.log"
        r = subprocess.run(
            [sys.executable, "-m", "instantdl_ray", "run", str(cfg), "--out", str(run_dir), "--address",
             f"127.0.0.1:{PORT}", "--set", "ray.num_workers=2", "--set", "ray.autoscale_wait_s=300"],
            env={k: v for k, v in env.items() if k in os.environ or k == "RAY_AUTH_MODE"},
            stdout=open(log, "w"), stderr=subprocess.STDOUT, timeout=900)
        text = log.read_text()
        assert r.returncode == 0, text[-4000:]
        t_run = time.time() - t0
        # the run found 1 CPU, asked the autoscaler, and trained once two worker nodes had joined
        assert "asked Ray's autoscaler for 2 worker bundle(s)" in text, text[-3000:]
        assert re.search(r"cluster: 3 node\(s\), 3 CPU\(s\)", text), text[-3000:]
        assert json.loads((run_dir / "run.json").read_text())["status"] == "complete"
        assert "2 worker(s) x 1 CPU" in text, text[-3000:]
        res = json.loads((run_dir / "evaluation" / "results.json").read_text())
        assert 0 <= res["summary"]["jaccard"] <= 1
        # the request is withdrawn at the end of the run: the idle workers go (idle timeout 15 s)
        deadline = time.time() + 180
        while (n := _alive_nodes(env)) != 1:
            assert time.time() < deadline, f"{n} nodes still alive 3 min after the run"
            time.sleep(3)
        print(f"run with autoscaling {t_run:.0f} s, back to the head only {time.time() - t0:.0f} s after the start")
    finally:
        os.killpg(head.pid, signal.SIGINT)  # `ray start --block` stops its own node on Ctrl-C
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        for pid in _this_clusters_processes():  # worker nodes the autoscaler started, if any is left
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
