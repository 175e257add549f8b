"""Helpers shared by the benchmark scripts (not a benchmark itself).

* ``start_ray(num_cpus)``: a fresh in-process local Ray (never joins another instance on the
  machine), with the Data settings ``instantdl_ray._ray.init`` applies.
* ``TreeMemory`` / ``MemorySampler``: memory of a process and all its descendants, read from
  ``/proc`` (no psutil needed). What is summed, per process: ``Pss_Anon + Pss_File`` from
  ``smaps_rollup`` (proportional set size, so shared libraries are not counted once per Ray
  worker), plus, once, the pages allocated in the Ray object store (the raylet's
  ``/dev/shm/plasma*`` file: ``st_blocks`` of a tmpfs file is exactly the memory it holds).
  The plain RSS sum (which counts shared pages in every process) is kept as an upper bound.
* ``machine()`` / ``uptime()``: the lines every README table records.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
SHARED_DATA = REPO.parent / "shared" / "data"
EXAMPLE_DATA = REPO / "examples" / "dsb2018_small"
MiB = 2**20


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except Exception:
        return "load average: " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine() -> str:
    mem = 0
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception:
        pass
    return f"{os.cpu_count()} CPU cores, {mem / 2**30:.0f} GiB RAM, {gpu}"


def start_ray(num_cpus: int | None = None):
    """Start a new local Ray in this process (``address='local'``: never joins a running one)."""
    import logging

    import ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if not ray.is_initialized():
        # the same arguments as instantdl_ray._ray.init, plus address="local"
        ray.init(address="local", num_cpus=num_cpus, logging_level=logging.WARNING, log_to_driver=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    return ray


# ---------------------------------------------------------------- process-tree memory


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
            ppid = int(s[s.rindex(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    return kids


def descendants(pid: int, include_self: bool = True) -> list[int]:
    kids = _children_map()
    out, todo = ([pid] if include_self else []), [pid]
    while todo:
        p = todo.pop()
        for c in kids.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def _rollup(pid: int) -> dict[str, int]:
    vals = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[0].endswith(":"):
                    vals[parts[0][:-1]] = int(parts[1]) * 1024
    except OSError:
        pass
    return vals


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _plasma_bytes(pids: list[int]) -> int:
    """Bytes held by Ray object stores (tmpfs plasma files) opened by ``pids`` (raylets)."""
    seen, total = set(), 0
    for pid in pids:
        if _comm(pid) != "raylet":
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if "plasma" not in target:
                    continue
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


@dataclass
class TreeMemory:
    total: int = 0  # sum of Pss_Anon + Pss_File over the tree + object store pages
    pss: int = 0  # sum of Pss_Anon + Pss_File
    object_store: int = 0
    rss_sum: int = 0  # upper bound: shared pages counted in every process
    driver_rss: int = 0
    processes: int = 0

    @classmethod
    def of(cls, pid: int) -> "TreeMemory":
        pids = descendants(pid)
        m = cls(processes=len(pids))
        for p in pids:
            r = _rollup(p)
            m.pss += r.get("Pss_Anon", 0) + r.get("Pss_File", 0)
            m.rss_sum += r.get("Rss", 0)
            if p == pid:
                m.driver_rss = r.get("Rss", 0)
        m.object_store = _plasma_bytes(pids)
        m.total = m.pss + m.object_store
        return m


@dataclass
class MemorySampler:
    """Samples ``TreeMemory.of(pid)`` every ``interval`` s in a thread; keeps the peaks."""

    pid: int
    interval: float = 0.5
    peak: TreeMemory = field(default_factory=TreeMemory)
    samples: int = 0
    timeline: list = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        t0 = time.time()
        while not self._stop.is_set():
            m = TreeMemory.of(self.pid)
            self.samples += 1
            for k in ("total", "pss", "object_store", "rss_sum", "driver_rss", "processes"):
                setattr(self.peak, k, max(getattr(self.peak, k), getattr(m, k)))
            self.timeline.append((round(time.time() - t0, 1), round(m.total / MiB), round(m.object_store / MiB)))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=30)


def run_cli(args: list[str], log_path: Path, timeout: float, cwd: Path = REPO, env: dict | None = None,
            interval: float = 0.5) -> dict:
    """Run ``python -m instantdl_ray ARGS`` with its output in ``log_path``; wall time and peak memory."""
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1", **(env or {})}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "instantdl_ray", *args]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(cwd), env=env,
                                start_new_session=True)
        with MemorySampler(proc.pid, interval=interval) as sampler:
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)  # the process group this call started, nothing else
                rc = -9
    wall = time.time() - t0
    return {"cmd": " ".join(["python", "-m", "instantdl_ray", *args]), "rc": rc, "wall_s": round(wall, 1),
            "peak": sampler.peak, "samples": sampler.samples, "timeline": sampler.timeline}


def run_json(run_dir: Path) -> dict:
    p = Path(run_dir) / "run.json"
    return json.loads(p.read_text()) if p.exists() else {}


def tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text().splitlines()[-n:])
    except OSError:
        return ""


def fmt_mib(b: int) -> str:
    return f"{b / MiB:,.0f} MiB"


# ---------------------------------------------------------------- process-tree CPU time

_CLK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
        fields = s[s.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / _CLK  # utime + stime
    except (OSError, ValueError, IndexError):
        return None


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _title(pid: int) -> str:
    return _cmdline(pid).split(b"\0")[0].decode(errors="replace")[:80]


def cpu_category(title: str, is_root: bool) -> str:
    if is_root:
        return "driver"
    if title.startswith("ray::RayTrainWorker"):
        return "train_worker"
    if title.startswith("ray::SplitCoordinator"):
        return "split_coordinator"
    if title.startswith(("ray::MapBatches", "ray::ReadTiles", "ray::Map", "ray::FromItems")):
        return "data_tasks"
    return "ray_other"


class CpuSampler:
    """CPU seconds used by a process tree during a ``with`` block, grouped by role.

    Samples ``/proc/<pid>/stat`` every ``interval`` s; a process's share is its last reading
    minus its first (or 0 for one that existed before the block), so short-lived processes
    lose at most one interval. Ray workers are named by their process title
    (``ray::RayTrainWorker``, ``ray::SplitCoordinator``, ``ray::MapBatches(...)`` ...).
    """

    def __init__(self, pid: int | None = None, interval: float = 0.5):
        self.pid = pid or os.getpid()
        self.interval = interval
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.role: dict[int, str] = {}
        self.root_cmd = _cmdline(self.pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self):
        for p in descendants(self.pid):
            c = _cpu_seconds(p)
            if c is None:
                continue
            self.first.setdefault(p, c)
            self.last[p] = c
            if p != self.pid and _cmdline(p) == self.root_cmd:
                role = "loader_workers"  # forked copies of the driver (DataLoader workers)
            else:
                role = cpu_category(_title(p), p == self.pid)
            if self.role.get(p) in (None, "ray_other"):  # an idle worker that later ran data tasks
                self.role[p] = role

    def _loop(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=30)
        self._sample()

    def by_role(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for p, c in self.last.items():
            out[self.role.get(p, "ray_other")] = out.get(self.role.get(p, "ray_other"), 0.0) + c - self.first[p]
        return {k: round(v, 1) for k, v in sorted(out.items())}
