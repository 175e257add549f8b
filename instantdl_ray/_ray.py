"""The one place that starts or joins Ray and decides how many CPUs each part may take.

A laptop run must never hang: Ray Train workers that take every CPU leave none for the Ray Data
tasks feeding them (measured: 2 one-CPU workers + a dataset on 2 CPUs waits forever). So on CPU
we always leave at least one CPU slot for data, and give workers fractions of the rest.
Torch thread counts are set from the physical cores, not from the scheduling slots.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
import warnings
from dataclasses import asdict, dataclass

from instantdl_ray.errors import ConfigError


@dataclass
class Resources:
    num_workers: int
    cpus_per_worker: float
    use_gpu: bool
    torch_threads: int
    data_cpus: float
    predict_actors: int
    cluster_cpus: float
    cluster_gpus: float

    def to_dict(self) -> dict:
        return asdict(self)


def worker_setup() -> None:
    """Runs in every worker process of a run (Ray's ``worker_process_setup_hook``): points
    ``RAY_ADDRESS`` at the cluster the worker belongs to. Ray Train's placement-group cleaner
    queries Ray's state API with no address, which otherwise searches the machine for Ray
    instances and fails with "Found multiple active Ray instances" when two runs (or any other
    Ray) share a machine."""
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    quiet_ray_loggers()


# Ray's own per-step INFO lines ("Reporting training result N: TrainingReport(...)" every epoch,
# "Dataset ... execution finished", "Progress bars disabled") drown the package's lines; its
# warnings and errors still show
QUIET_LOGGERS = ("ray.train", "ray.data", "ray.tune")


def quiet_ray_loggers() -> None:
    import ray.data  # noqa: F401  (configures Ray Data's logging on import: quieten after it)
    from ray.util.debug import log_once

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # the package turns Ray Data's progress bars off on purpose (its own lines report progress):
    # use up the once-per-process "Progress bars disabled. To enable, ..." warning
    log_once("ray_data_progress_manager_disabled")
    try:  # Ray Train v2 logs "Reporting training result N: ..." under the module's file path
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:  # another Ray version: tests/test_console.py says so if the line is back
        pass


def init(address: str | None = None, num_cpus: int | None = None, dashboard: bool = False) -> None:
    """Join ``address`` / ``$RAY_ADDRESS``, or start a local Ray sized to this machine, with Ray's
    dashboard only when ``dashboard`` (~200 MiB). Training needs it: Ray Train's placement-group
    cleaner polls Ray's state API, which the dashboard serves, and warns every second without it."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    # ray.init replaces the SIGTERM handler by sys.exit(15), so a run preempted by a scheduler would
    # be recorded as a Ctrl-C; the handler a run installed (pipeline._sigterm_as_interrupt) stays
    keep = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    # a local Ray of ours enables token authentication by default and says so on every start
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # Ray Train builds its Ray Data options with a field Ray itself deprecated: not the user's concern
    warnings.filterwarnings("ignore", message=".*exclude_resources.*is deprecated")
    kwargs = dict(logging_level=logging.WARNING, log_to_driver=True,
                  runtime_env={"worker_process_setup_hook": "instantdl_ray._ray.worker_setup"})
    if address:
        ray.init(address=address, **kwargs)
    else:
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
        ray.init(num_cpus=num_cpus, include_dashboard=dashboard, **kwargs)
    if callable(keep):
        signal.signal(signal.SIGTERM, keep)
    quiet_ray_loggers()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def is_local(ray_cfg, address: str | None = None) -> bool:
    """Whether a run starts its own local Ray (no ``--address``, ``ray.address`` or ``$RAY_ADDRESS``)
    instead of joining a cluster: the same test ``init`` makes."""
    return not (address or ray_cfg.address or os.environ.get("RAY_ADDRESS"))


def local_gpu_problems(ray_cfg, address: str | None = None) -> list[str]:
    """``ray.use_gpu`` on a run that starts its own local Ray needs a GPU that PyTorch sees on this
    machine; said before anything starts (a cluster's GPUs are counted when planning)."""
    if not ray_cfg.use_gpu or not is_local(ray_cfg, address):
        return []
    import torch

    if torch.cuda.is_available():
        return []
    return ["ray.use_gpu: true, but this machine has no GPU that PyTorch can use (torch.cuda.is_available() "
            "is False) and no Ray cluster is named (ray.address, --address or $RAY_ADDRESS). Set "
            "ray.use_gpu=false to run on the CPU, or name a Ray cluster that has GPUs"]


def gpu_worker_cpus(nodes: list[tuple[float, float]]) -> float:
    """CPUs for each GPU training worker: half of what a GPU node has per GPU (after one CPU for Ray
    itself), between 1 and 4; the other half stays with Ray Data, which reads and augments the
    tiles that feed the GPUs. Sized by the GPU node with the fewest CPUs per GPU (Ray Train gives
    every worker the same bundle)."""
    per_gpu = min((cpus - 1) / gpus for cpus, gpus in nodes if gpus >= 1)
    return float(min(4, max(1, math.floor(per_gpu / 2))))


def plan_resources(ray_cfg, cluster_cpus: float, cluster_gpus: float, node_cores: int | None = None,
                   nodes: list[tuple[float, float]] | None = None) -> Resources:
    """Decide workers, CPUs per worker and actor counts so that data always has a CPU.

    ``ray_cfg`` is ``Config.ray``; ``nodes`` the (CPUs, GPUs) of each node (default: one node with
    the cluster's totals). On GPUs: one training worker per GPU, each with ``gpu_worker_cpus``, and
    one prediction actor per GPU of the cluster. Raises ``ConfigError`` when explicit settings
    cannot fit.
    """
    node_cores = node_cores or os.cpu_count() or 1
    nodes = nodes or [(cluster_cpus, cluster_gpus)]
    n = ray_cfg.num_workers
    use_gpu = bool(ray_cfg.use_gpu)
    problems = []
    if use_gpu and cluster_gpus < n:
        problems.append(
            f"ray.use_gpu: {n} worker(s) need {n} GPU(s) but the cluster has {cluster_gpus:g}; "
            "set ray.use_gpu=false or lower ray.num_workers"
        )
    reserve = 1.0 if cluster_cpus <= 8 else max(1.0, math.floor(cluster_cpus * 0.1))
    available = cluster_cpus - reserve
    if ray_cfg.cpus_per_worker is not None:
        cpw = float(ray_cfg.cpus_per_worker)
    elif use_gpu:
        cpw = gpu_worker_cpus(nodes) if cluster_gpus >= 1 else 1.0
    else:
        cpw = min(available / n, 8.0)
        cpw = math.floor(cpw) if cpw >= 1 else round(cpw, 3)
    if cpw <= 0 or n * cpw > available + 1e-9:
        problems.append(
            f"ray.num_workers={n} x ray.cpus_per_worker={cpw:g} needs {n * cpw:g} CPUs for training, but the "
            f"cluster has {cluster_cpus:g} and at least {reserve:g} must stay free for data loading (else Ray "
            f"Data waits forever); lower ray.num_workers, set ray.cpus_per_worker to at most "
            f"{max(available, 0) / n:.2g}, or leave it unset"
        )
    if not problems and len(nodes) > 1 and not _data_cpu_left(nodes, n, cpw, ray_cfg.placement_strategy):
        problems.append(
            f"ray.placement_strategy={ray_cfg.placement_strategy}: {n} worker(s) x {cpw:g} CPU over nodes with "
            f"{', '.join(f'{c:g}' for c, _ in nodes)} CPUs leave no node with a whole CPU for data loading (a Ray "
            "Data task needs one; training would wait forever); use PACK, fewer workers or lower "
            "ray.cpus_per_worker, or nodes with more CPUs"
        )
    if problems:
        raise ConfigError(problems, title="Cannot plan Ray resources")
    per_node_workers = max(1, min(n, int(cluster_cpus // max(cpw, 1e-9)) or 1))
    torch_threads = max(1, node_cores // min(per_node_workers, node_cores)) if not use_gpu else max(1, int(cpw))
    actors = ray_cfg.predict_actors or (int(cluster_gpus) if use_gpu else max(1, int(cluster_cpus - 1)))
    return Resources(
        num_workers=n,
        cpus_per_worker=cpw,
        use_gpu=use_gpu,
        torch_threads=torch_threads,
        data_cpus=cluster_cpus - n * cpw,
        predict_actors=actors,
        cluster_cpus=cluster_cpus,
        cluster_gpus=cluster_gpus,
    )


def _data_cpu_left(nodes: list[tuple[float, float]], n: int, cpw: float, strategy: str) -> bool:
    """Whether, after Ray places ``n`` worker bundles of ``cpw`` CPUs by ``strategy`` (PACK: as
    few nodes as possible, the largest first; SPREAD: one node after the other), some node still
    has a whole CPU free: the CPUs kept for data are no use split in halves over two nodes."""
    free = sorted((c for c, _ in nodes), reverse=True)
    placed = [0] * len(free)
    for _ in range(n):
        fits = [i for i in range(len(free)) if free[i] >= cpw - 1e-9]
        if not fits:
            return True  # does not fit at all: said by the CPU check, not here
        i = min(fits, key=lambda j: (placed[j], -free[j])) if "SPREAD" in strategy else fits[0]
        free[i] -= cpw
        placed[i] += 1
    return max(free) >= 1 - 1e-9


def node_resources() -> list[tuple[float, float]]:
    """(CPUs, GPUs) of every live node of the cluster Ray is connected to."""
    import ray

    return [(float(n["Resources"].get("CPU", 0)), float(n["Resources"].get("GPU", 0)))
            for n in ray.nodes() if n.get("Alive")]


def totals(nodes: list[tuple[float, float]]) -> tuple[float, float]:
    """CPUs and GPUs of ``nodes`` (``node_resources``) together."""
    return sum(c for c, _ in nodes), sum(g for _, g in nodes)


def plan_now(ray_cfg) -> Resources:
    """``plan_resources`` for the nodes the cluster has at this moment."""
    nodes = node_resources()
    return plan_resources(ray_cfg, *totals(nodes), nodes=nodes)


def cluster_resources() -> tuple[float, float]:
    import ray

    res = ray.cluster_resources()
    return float(res.get("CPU", 0)), float(res.get("GPU", 0))


def demand(ray_cfg) -> list[dict]:
    """The resource bundles a run needs: one per training worker (``cpus_per_worker``, default 1
    CPU, plus a GPU with ``use_gpu``) and one CPU for the data loading that feeds them."""
    worker = {"CPU": float(ray_cfg.cpus_per_worker or 1)} | ({"GPU": 1.0} if ray_cfg.use_gpu else {})
    return [dict(worker) for _ in range(ray_cfg.num_workers)] + [{"CPU": 1.0}]


def plan_on_cluster(ray_cfg, log=print, local: bool = True, poll_s: float = 2.0) -> Resources:
    """``plan_resources`` for the cluster Ray is connected to. A joined cluster that is too small
    for ``ray.num_workers`` is asked to grow (``ray.autoscaler.sdk.request_resources``: Ray's
    autoscaler adds nodes of a type that fits) and the plan waits up to ``ray.autoscale_wait_s``
    for them; ``release_demand`` withdraws the request after training, so idle nodes go again.
    A local Ray cannot grow: its shortfall is reported at once."""
    try:
        return plan_now(ray_cfg)
    except ConfigError as short:
        wait_s = 0 if local else float(ray_cfg.autoscale_wait_s)
        if wait_s <= 0:
            raise
        first = short
    from ray.autoscaler.sdk import request_resources

    bundles = demand(ray_cfg)
    request_resources(bundles=bundles)
    want_cpu = sum(b["CPU"] for b in bundles)
    want_gpu = sum(b.get("GPU", 0) for b in bundles)
    nodes = node_resources()
    cpus, gpus = totals(nodes)
    log(f"the cluster has {cpus:g} CPU(s), {gpus:g} GPU(s); asked Ray's autoscaler for {len(bundles) - 1} "
        f"worker bundle(s) (~{want_cpu:g} CPUs{f', {want_gpu:g} GPUs' if want_gpu else ''} in all), "
        f"waiting up to {wait_s:g} s (ray.autoscale_wait_s)")
    deadline, seen = time.time() + wait_s, len(nodes)
    while time.time() < deadline:  # until the cluster holds what was asked for
        time.sleep(poll_s)
        nodes = node_resources()
        have_cpu, have_gpu = totals(nodes)
        if len(nodes) != seen:
            seen = len(nodes)
            log(f"cluster: {seen} node(s), {have_cpu:g} CPU(s), {have_gpu:g} GPU(s)")
        if have_cpu >= want_cpu and have_gpu >= want_gpu:
            return plan_resources(ray_cfg, have_cpu, have_gpu, nodes=nodes)
    try:  # it grew less than asked, yet enough for a plan (e.g. its max_workers reached)
        res = plan_now(ray_cfg)
        log(f"the cluster did not grow to what was asked in {wait_s:g} s; training with what it has")
        return res
    except ConfigError:
        pass
    release_demand()
    raise ConfigError(first.problems + [
        f"waited {wait_s:g} s (ray.autoscale_wait_s) for the cluster to grow to the "
        f"{len(bundles)} bundle(s) above; it did not: no autoscaler (a fixed cluster: lower ray.num_workers), "
        "its max_workers reached, or nodes slow to start (raise ray.autoscale_wait_s)"], title=first.title)


def release_demand() -> None:
    """Withdraw ``plan_on_cluster``'s request, so the autoscaler may remove idle nodes again."""
    import ray

    if not ray.is_initialized():
        return
    from ray.autoscaler.sdk import request_resources

    try:
        request_resources(bundles=[])
    except Exception as e:  # the cluster is gone or unreachable: nothing left to release
        logging.getLogger(__name__).warning("could not withdraw the autoscaler request: %s", e)
