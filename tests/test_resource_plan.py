"""Resource plans without a cluster: GPU clusters checked without a GPU (the plan of 1-8 GPUs per
node on 1-4 nodes, the refusal of ``ray.use_gpu`` on a machine that has none), and the wait for an
autoscaler to grow a cluster that is too small (issue 16, items 3 and 4)."""

from __future__ import annotations

import pytest

from instantdl_ray import _ray
from instantdl_ray.config.schema import RayConfig
from instantdl_ray.errors import ConfigError

# CPUs per GPU node as clouds and labs have them: 1 GPU with 4-8 vCPUs (g5.xlarge / a workstation),
# 4 GPUs with 32-48 vCPUs (g5.12xlarge), 8 GPUs with 64-96 vCPUs (p4d / DGX-like).
NODE_CPUS = {1: 8, 4: 48, 8: 96}


@pytest.mark.parametrize("gpus_per_node", [1, 4, 8])
@pytest.mark.parametrize("n_nodes", [1, 2, 3, 4])
@pytest.mark.parametrize("cpu_head", [False, True])
def test_gpu_cluster_plan(gpus_per_node, n_nodes, cpu_head):
    nodes = [(float(NODE_CPUS[gpus_per_node]), float(gpus_per_node))] * n_nodes
    if cpu_head:  # as in cluster/gpu_aws.yaml: a CPU-only head beside the GPU workers
        nodes = [(4.0, 0.0)] + nodes
    cpus = sum(c for c, _ in nodes)
    gpus = sum(g for _, g in nodes)
    res = _ray.plan_resources(RayConfig(num_workers=int(gpus), use_gpu=True), cpus, gpus, node_cores=16, nodes=nodes)
    assert res.use_gpu and res.num_workers == gpus  # one training worker per GPU
    assert res.predict_actors == gpus  # one prediction actor per GPU
    per_node = gpus_per_node * res.cpus_per_worker  # Ray Train packs one worker per GPU on each node
    assert per_node <= NODE_CPUS[gpus_per_node] - 1, "the workers of a node must fit its CPUs"
    # at least half of each GPU node's CPUs (after one for Ray) stay with Ray Data, which feeds the GPUs
    assert NODE_CPUS[gpus_per_node] - 1 - per_node >= (NODE_CPUS[gpus_per_node] - 1) / 2
    assert 1 <= res.cpus_per_worker <= 4 and res.torch_threads == int(res.cpus_per_worker)
    assert res.data_cpus == cpus - gpus * res.cpus_per_worker and res.data_cpus >= gpus


def test_gpu_worker_cpus_follow_the_tightest_gpu_node():
    # a 1-GPU node with 4 CPUs beside an 8-GPU node with 96: every worker gets the small node's share
    assert _ray.gpu_worker_cpus([(4.0, 1.0), (96.0, 8.0), (64.0, 0.0)]) == 1.0
    assert _ray.gpu_worker_cpus([(96.0, 8.0)]) == 4.0
    assert _ray.gpu_worker_cpus([(48.0, 4.0)]) == 4.0
    assert _ray.gpu_worker_cpus([(16.0, 4.0)]) == 1.0


def test_more_gpu_workers_than_gpus_is_refused():
    nodes = [(48.0, 4.0), (48.0, 4.0)]
    with pytest.raises(ConfigError) as e:
        _ray.plan_resources(RayConfig(num_workers=9, use_gpu=True), 96, 8, nodes=nodes)
    assert "9 worker(s) need 9 GPU(s) but the cluster has 8" in str(e.value)


def test_use_gpu_without_a_gpu_is_refused_before_anything_starts(tmp_path, monkeypatch):
    import torch

    from instantdl_ray import pipeline
    from instantdl_ray.config.schema import from_dict
    from conftest import make_semantic_set

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    data = make_semantic_set(tmp_path / "data")
    cfg = from_dict({"use_algorithm": "SemanticSegmentation", "path": str(data), "ray": {"use_gpu": True}})
    with pytest.raises(ConfigError) as e:
        pipeline.run(cfg, out=tmp_path / "runs")
    msg = str(e.value)
    assert "ray.use_gpu" in msg and "no GPU" in msg and "ray.use_gpu=false" in msg
    assert not (tmp_path / "runs").exists(), "nothing is written before the refusal"
    # on a named cluster the GPUs are the cluster's, counted when planning: no refusal here
    assert _ray.local_gpu_problems(cfg.ray, address="10.0.0.1:6379") == []
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert _ray.local_gpu_problems(cfg.ray) == []


class _FakeCluster:
    """What plan_on_cluster sees of a cluster: its nodes (CPUs, GPUs), growing after some polls."""

    def __init__(self, monkeypatch, stages: list[list[tuple[float, float]]]):
        import ray.autoscaler.sdk

        self.stages, self.polls, self.requests = stages, 0, []
        monkeypatch.setattr(_ray, "node_resources", self.nodes)
        monkeypatch.setattr(ray.autoscaler.sdk, "request_resources", lambda **kw: self.requests.append(kw))
        monkeypatch.setattr("ray.is_initialized", lambda: True)

    def nodes(self):
        self.polls += 1
        return self.stages[min(self.polls // 2, len(self.stages) - 1)]


def test_a_joined_cluster_too_small_is_asked_to_grow_and_waited_for(monkeypatch):
    cluster = _FakeCluster(monkeypatch, [[(1.0, 0.0)], [(1.0, 0.0), (1.0, 0.0)], [(1.0, 0.0), (1.0, 0.0), (1.0, 0.0)]])
    lines = []
    res = _ray.plan_on_cluster(RayConfig(num_workers=2), lines.append, local=False, poll_s=0)
    assert res.num_workers == 2 and res.cpus_per_worker == 1 and res.cluster_cpus == 3
    # two 1-CPU worker bundles and one for data: what Ray's autoscaler is asked for
    assert cluster.requests == [{"bundles": [{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 1.0}]}]
    assert "asked Ray's autoscaler for 2 worker bundle(s)" in lines[0]
    assert any(line.startswith("cluster: 3 node(s), 3 CPU(s)") for line in lines)
    _ray.release_demand()
    assert cluster.requests[-1] == {"bundles": []}


def test_gpu_bundles_ask_for_gpu_nodes():
    assert _ray.demand(RayConfig(num_workers=2, use_gpu=True)) == [{"CPU": 1.0, "GPU": 1.0}] * 2 + [{"CPU": 1.0}]
    assert _ray.demand(RayConfig(num_workers=1, cpus_per_worker=3)) == [{"CPU": 3.0}, {"CPU": 1.0}]


def test_a_cluster_that_does_not_grow_is_reported_with_the_wait(monkeypatch):
    cluster = _FakeCluster(monkeypatch, [[(1.0, 0.0)]])
    with pytest.raises(ConfigError) as e:
        _ray.plan_on_cluster(RayConfig(num_workers=2, autoscale_wait_s=0.05), lambda m: None, local=False, poll_s=0.01)
    msg = str(e.value)
    assert "ray.num_workers=2" in msg and "waited 0.05 s (ray.autoscale_wait_s)" in msg and "lower ray.num_workers" in msg
    assert cluster.requests[-1] == {"bundles": []}, "the request is withdrawn when the wait gives up"


def test_a_local_ray_that_is_too_small_is_refused_at_once(monkeypatch):
    cluster = _FakeCluster(monkeypatch, [[(2.0, 0.0)]])
    with pytest.raises(ConfigError, match="ray.cpus_per_worker"):
        _ray.plan_on_cluster(RayConfig(num_workers=2, cpus_per_worker=1), lambda m: None, local=True)
    assert cluster.requests == [], "a local Ray cannot grow: no autoscaler request"


def test_cpus_for_data_must_stay_whole_on_one_node():
    # two 1-CPU nodes, two workers: PACK puts both (0.5 CPU each) on one node and keeps the other
    # free for Ray Data; SPREAD would leave half a CPU on each, where no data task fits (a hang)
    nodes = [(1.0, 0.0), (1.0, 0.0)]
    res = _ray.plan_resources(RayConfig(num_workers=2), 2, 0, nodes=nodes)
    assert res.cpus_per_worker == 0.5
    with pytest.raises(ConfigError) as e:
        _ray.plan_resources(RayConfig(num_workers=2, placement_strategy="SPREAD"), 2, 0, nodes=nodes)
    assert "ray.placement_strategy=SPREAD" in str(e.value) and "whole CPU" in str(e.value)
    # two 2-CPU nodes: one CPU per worker, spread or not, a whole CPU stays on each node
    _ray.plan_resources(RayConfig(num_workers=2, placement_strategy="SPREAD"), 4, 0, nodes=[(2.0, 0.0)] * 2)
