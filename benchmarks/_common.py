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


def start_ray(num_cpus: int | None = None, dashboard: bool = False):
    """Start a new local Ray in this process (``address='local'``: never joins a running one), with
    the dashboard when the package would start one (``run`` with training: ``dashboard=True``)."""
    import logging

    import ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if not ray.is_initialized():
        # the same arguments as instantdl_ray._ray.init, plus address="local"
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, logging_level=logging.WARNING,
                 log_to_driver=True)
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
    by_title: dict = field(default_factory=dict)  # process title -> PSS bytes (summed over same titles)

    @classmethod
    def of(cls, pid: int) -> "TreeMemory":
        pids = descendants(pid)
        m = cls(processes=len(pids))
        for p in pids:
            r = _rollup(p)
            pss = r.get("Pss_Anon", 0) + r.get("Pss_File", 0)
            m.pss += pss
            title = "driver" if p == pid else (_title(p).split(" --")[0].split("/")[-1][:40] or "?")
            m.by_title[title] = m.by_title.get(title, 0) + pss
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
    peak_breakdown: dict = field(default_factory=dict)  # MiB per process title at the peak sample

    def __post_init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        t0 = time.time()
        while not self._stop.is_set():
            m = TreeMemory.of(self.pid)
            self.samples += 1
            if m.total > self.peak.total:
                self.peak_breakdown = dict(sorted(((k, round(v / MiB)) for k, v in m.by_title.items()),
                                                  key=lambda kv: -kv[1]))
                self.peak_breakdown["object store"] = round(m.object_store / MiB)
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
            "peak": sampler.peak, "samples": sampler.samples, "timeline": sampler.timeline,
            "peak_breakdown": sampler.peak_breakdown}


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

    def top_other(self, n: int = 6) -> dict[str, float]:
        """The ``ray_other`` processes that used most CPU, by process title."""
        out: dict[str, float] = {}
        for p, c in self.last.items():
            if self.role.get(p, "ray_other") == "ray_other":
                t = _title(p).split(" --")[0].split("/")[-1][:40] or str(p)
                out[t] = out.get(t, 0.0) + c - self.first[p]
        return {k: round(v, 1) for k, v in sorted(out.items(), key=lambda kv: -kv[1])[:n] if v >= 0.5}

    def by_role(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for p, c in self.last.items():
            out[self.role.get(p, "ray_other")] = out.get(self.role.get(p, "ray_other"), 0.0) + c - self.first[p]
        return {k: round(v, 1) for k, v in sorted(out.items())}


def ray_worker_niceness() -> int:
    """Ray starts its worker processes at this niceness (``RAY_worker_niceness``, default 15)."""
    try:
        return int(os.environ.get("RAY_worker_niceness", "15"))
    except ValueError:
        return 15


class Niceness:
    """Run a block at niceness ``value`` in every thread of this process (Linux nice is per
    thread; threads and processes started inside inherit it), restoring the old values after."""

    def __init__(self, value: int | None):
        self.value = value
        self.old: dict[int, int] = {}

    def __enter__(self):
        if self.value is None:
            return self
        for tid in os.listdir("/proc/self/task"):
            try:
                self.old[int(tid)] = os.getpriority(os.PRIO_PROCESS, int(tid))
                os.setpriority(os.PRIO_PROCESS, int(tid), self.value)
            except OSError:
                pass
        return self

    def __exit__(self, *exc):
        for tid, v in self.old.items():
            try:
                os.setpriority(os.PRIO_PROCESS, tid, v)  # lowering needs root (CAP_SYS_NICE)
            except OSError:
                pass


# ---------------------------------------------------------------- synthetic zarr slides


def _blob_chunk(rng, shape: tuple[int, int], n: int = 4, r: tuple[int, int] = (10, 40)):
    """One chunk of a slide: flat background with bright discs (compresses ~50x), and its 0/1 mask."""
    import numpy as np

    img = np.full(shape, 20, np.uint8)
    lab = np.zeros(shape, np.uint8)
    for _ in range(n):
        rad = int(rng.integers(*r))
        cy, cx = int(rng.integers(0, shape[0])), int(rng.integers(0, shape[1]))
        y0, y1, x0, x1 = max(cy - rad, 0), min(cy + rad + 1, shape[0]), max(cx - rad, 0), min(cx + rad + 1, shape[1])
        yy, xx = np.ogrid[y0:y1, x0:x1]
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= rad * rad
        img[y0:y1, x0:x1][disc] = 120 + (rad * 3) % 120
        lab[y0:y1, x0:x1][disc] = 1
    return img, lab


def write_slide(image_path: Path, label_path: Path | None, side: int, chunk: int = 512, seed: int = 0,
                noise: float = 0.0) -> None:
    """A ``side`` x ``side`` uint8 zarr (and its 0/1 label zarr), written chunk by chunk: memory
    is one chunk whatever the size, and the flat blobs keep the disk use small. ``noise`` > 0
    adds Gaussian noise of that std to the image (realistic compression ratios, more disk)."""
    import numpy as np
    import zarr

    kw = dict(shape=(side, side), chunks=(chunk, chunk), dtype="uint8", fill_value=0, overwrite=True)
    img = zarr.create_array(store=str(image_path), **kw)
    lab = zarr.create_array(store=str(label_path), **kw) if label_path else None
    for y in range(0, side, chunk):
        for x in range(0, side, chunk):
            rng = np.random.default_rng([seed, y, x])
            shape = (min(chunk, side - y), min(chunk, side - x))
            a, b = _blob_chunk(rng, shape)
            if noise > 0:
                a = np.clip(a + rng.normal(0, noise, shape), 0, 255).astype(np.uint8)
            img[y:y + shape[0], x:x + shape[1]] = a
            if lab is not None:
                lab[y:y + shape[0], x:x + shape[1]] = b


def make_slide_set(root: Path, side: int, test_side: int = 1024, chunk: int = 512, noise: float = 0.0) -> Path:
    """InstantDL layout with one slide: ``train/image/slide.zarr`` + ``train/groundtruth/slide.zarr``
    and a small ``test/image/small.zarr``. Reused when already complete (marker file)."""
    root = Path(root)
    done = root / ".complete"
    if done.exists():
        return root
    for sub in ("train/image", "train/groundtruth", "test/image", "test/groundtruth"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    write_slide(root / "train/image/slide.zarr", root / "train/groundtruth/slide.zarr", side, chunk, seed=1,
                noise=noise)
    write_slide(root / "test/image/small.zarr", root / "test/groundtruth/small.zarr", test_side, chunk, seed=2)
    done.write_text(f"{side}\n")
    return root


def du(path: Path) -> int:
    """Bytes on disk under ``path``."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except OSError:
                pass
    return total
