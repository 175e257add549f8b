"""Peak machine memory of ``predict`` on a large image vs a small one: is memory independent of
the image size?

    python benchmarks/predict_memory.py            # 16384² vs 4096², uncertainty off and on
    python benchmarks/predict_memory.py --quick    # 2048² (forced onto the streaming path) vs 512²

Each prediction runs in a fresh child process with its own local Ray (2 CPUs, ``address="local"``:
never the Ray of another job on the machine); this process samples the child's whole process tree
every 0.2 s (``_common.MemorySampler``: proportional set size of the driver, raylet, GCS and every
Ray worker, plus the pages allocated in the Ray object store) and reports the peaks. The model is
an untrained tiny MONAI U-Net (features 4,4,8,8,16,4) with 256² tiles, 25 % overlap, as a trained
run would predict; the run directory is written by hand (config.yaml, plan.json, model.pt).
"Uncertainty on" uses ``mc_passes=2``: memory does not depend on the number of passes beyond the
batch (the MC batch is capped at 32 tiles either way), and 20 passes over a 16384² image would
take hours on 2 cores.

Goals (issue): peak <= 2 GB for 16384², and <= 1.3x the 4096² peak.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (MiB, MemorySampler, TreeMemory, _cmdline, _plasma_bytes, _rollup, descendants,  # noqa: E402
                     machine, uptime)  # noqa: E402

FEATURES = [4, 4, 8, 8, 16, 4]
TILE = 256
GOAL_BYTES = 2 * 10**9
GOAL_RATIO = 1.3


def make_image(path: Path, n: int, chunk: int = 1024) -> Path:
    """A uint8 ``n``² zarr with bright discs on noise, written one band of chunks at a time."""
    import numpy as np
    import zarr

    if path.exists():
        return path
    chunk = min(chunk, n)
    z = zarr.create_array(store=str(path), shape=(n, n), chunks=(chunk, chunk), dtype="uint8", overwrite=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:chunk, :n]
    disc = ((yy % 61 - 30) ** 2 + (xx % 53 - 26) ** 2) < 15**2
    for y0 in range(0, n, chunk):
        band = rng.integers(10, 40, size=(chunk, n), dtype=np.uint8)
        band[disc] = 200
        z[y0:y0 + chunk] = band[: n - y0]
    return path


def make_run(run_dir: Path, tile: int = TILE, features=FEATURES) -> Path:
    """A predict-ready run directory for an untrained tiny U-Net (semantic, binary)."""
    import torch

    from instantdl_ray.config import schema as config_mod
    from instantdl_ray.models import build_model
    from instantdl_ray.config.plan import Plan

    (run_dir / "checkpoints" / "best").mkdir(parents=True, exist_ok=True)
    data = run_dir / "data"
    (data / "train" / "image").mkdir(parents=True, exist_ok=True)
    cfg = config_mod.from_dict({"use_algorithm": "SemanticSegmentation", "path": str(data), "batchsize": 4,
                                "mc_passes": 2, "tile_overlap": 0.25})
    config_mod.dump(cfg, run_dir / "config.yaml")
    Plan(task="semantic", spatial_dims=2, axes="YX", target_axes="YX", in_channels=1, out_channels=1, num_classes=1,
         class_names=["background", "foreground"], tile_shape=[tile, tile], image_size=None, model="unet",
         loss="dice_crossentropy", dropout=0.2, extra={"model_options": {"features": list(features)}},
         ).to_json(run_dir / "plan.json")
    torch.manual_seed(0)
    model = build_model("unet", in_channels=1, out_channels=1, spatial_dims=2, dropout=0.2, features=features)
    torch.save(model.state_dict(), run_dir / "checkpoints" / "best" / "model.pt")
    return run_dir


def start_ray_retrying(start_ray, tries: int = 3) -> None:
    """Ray's 30 s raylet start-up wait can run out on a machine loaded by other jobs: retry."""
    import ray

    for i in range(tries):
        try:
            start_ray(num_cpus=2)
            return
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception here
            print(f"Ray start failed ({e}); retrying", flush=True)
            ray.shutdown()
            if i == tries - 1:
                raise


def child(args) -> None:
    """Runs in the measured process: a fresh local Ray, then ``pipeline.predict_new``."""
    import instantdl_ray.predict.stitch as stitch
    from _common import start_ray
    from instantdl_ray import pipeline

    if args.in_memory_limit:
        stitch.IN_MEMORY_LIMIT = args.in_memory_limit
    start_ray_retrying(start_ray)
    t0 = time.time()
    pipeline.predict_new(args.run_dir, args.image, out=args.out,
                         overrides=[f"calculate_uncertainty={'true' if args.uncertainty else 'false'}"])
    print(json.dumps({"predict_s": round(time.time() - t0, 1)}))


def role(pid: int, root: int) -> str:
    """Who a process is, for the breakdown at the peak."""
    if pid == root:
        return "driver"
    t = _cmdline(pid).replace(b"\0", b" ").decode(errors="replace")
    if "Predictor" in t or "read_tiles" in t:
        return "prediction actor"
    if "raylet" in t or "gcs_server" in t:
        return "raylet + GCS"
    if any(k in t for k in ("dashboard", "Dashboard", "RuntimeEnvAgent", "log_monitor", "monitor.py")):
        return "dashboard, agents, monitors"
    if t.startswith("ray::"):
        return "other Ray actors/workers"
    return "other"


class BreakdownSampler(MemorySampler):
    """``MemorySampler`` that also keeps, at the peak total, the PSS per role (driver, actor, ...)."""

    breakdown: dict = {}

    def _loop(self):
        t0 = time.time()
        while not self._stop.is_set():
            pids = descendants(self.pid)
            m = TreeMemory(processes=len(pids), object_store=_plasma_bytes(pids))
            parts: dict[str, int] = {"object store": m.object_store}
            for p in pids:  # one pass: the breakdown adds up to the total of the same sample
                r = _rollup(p)
                pss = r.get("Pss_Anon", 0) + r.get("Pss_File", 0)
                m.pss += pss
                m.rss_sum += r.get("Rss", 0)
                if p == self.pid:
                    m.driver_rss = r.get("Rss", 0)
                k = role(p, self.pid)
                parts[k] = parts.get(k, 0) + pss
            m.total = m.pss + m.object_store
            self.samples += 1
            if m.total > self.peak.total:
                self.breakdown = parts
            for k in ("total", "pss", "object_store", "rss_sum", "driver_rss", "processes"):
                setattr(self.peak, k, max(getattr(self.peak, k), getattr(m, k)))
            self.timeline.append((round(time.time() - t0, 1), round(m.total / MiB), round(m.object_store / MiB)))
            self._stop.wait(self.interval)


def measure(run_dir: Path, image: Path, out: Path, uncertainty: bool, in_memory_limit: int | None,
            timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--child", "--run-dir", str(run_dir), "--image", str(image), "--out", str(out)]
    if uncertainty:
        cmd.append("--uncertainty")
    if in_memory_limit:
        cmd += ["--in-memory-limit", str(in_memory_limit)]
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    log = out.with_suffix(".log")
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        with BreakdownSampler(proc.pid, interval=0.2) as sampler:
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)  # the process group this call started
                rc = -9
    wall = time.time() - t0
    predict_s = None
    for line in log.read_text().splitlines():
        if line.startswith("{") and "predict_s" in line:
            predict_s = json.loads(line)["predict_s"]
    if rc != 0:
        print(log.read_text()[-3000:])
        raise SystemExit(f"child failed (rc {rc}); log: {log}")
    p = sampler.peak
    return {"total": p.total, "pss": p.pss, "object_store": p.object_store, "rss_sum": p.rss_sum,
            "driver_rss": p.driver_rss, "processes": p.processes, "samples": sampler.samples,
            "wall_s": round(wall, 1), "predict_s": predict_s, "breakdown_at_peak": sampler.breakdown,
            "object_store_timeline": [(t, o) for t, _, o in sampler.timeline[:: max(1, len(sampler.timeline) // 60)]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="512² vs 2048² (streaming forced), seconds")
    ap.add_argument("--work", default="/tmp/idl_bench_predict_memory", help="images, run dir and outputs")
    ap.add_argument("--sizes", type=int, nargs=2, help="small and large image edge (default 4096 16384)")
    ap.add_argument("--timeout", type=float, default=7200)
    ap.add_argument("--only", choices=["off", "on"], help="only uncertainty off / on")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    ap.add_argument("--image", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--uncertainty", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--in-memory-limit", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    small, large = args.sizes or ((512, 2048) if args.quick else (4096, 16384))
    limit = 1024 * 1024 if args.quick else None  # quick: push the 2048² image onto the streaming path
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}")
    print(f"load before: {uptime()}")
    run_dir = make_run(work / "run")
    images = {n: make_image(work / f"image_{n}.zarr", n) for n in (small, large)}
    results = {}
    for unc in ([False, True] if args.only is None else [args.only == "on"]):
        for n in (small, large):
            name = f"{n}_unc{'on' if unc else 'off'}"
            r = measure(run_dir, images[n], work / "out" / name, unc, limit, args.timeout)
            results[name] = r
            print(f"{n}² uncertainty {'on ' if unc else 'off'}: peak {r['total'] / MiB:,.0f} MiB "
                  f"(PSS {r['pss'] / MiB:,.0f} + object store {r['object_store'] / MiB:,.0f}; RSS sum "
                  f"{r['rss_sum'] / MiB:,.0f}; driver RSS {r['driver_rss'] / MiB:,.0f}; {r['processes']} processes), "
                  f"predict {r['predict_s']} s", flush=True)
            print("    at the peak: " + ", ".join(f"{k} {v / MiB:,.0f}" for k, v in
                                                 sorted(r["breakdown_at_peak"].items(), key=lambda kv: -kv[1])) + " MiB")
        a, b = results[f"{small}_unc{'on' if unc else 'off'}"], results[f"{large}_unc{'on' if unc else 'off'}"]
        ratio = b["total"] / a["total"]
        print(f"uncertainty {'on' if unc else 'off'}: peak_{large}={b['total'] / MiB:,.0f}MiB "
              f"peak_{small}={a['total'] / MiB:,.0f}MiB ratio={ratio:.2f} "
              f"(goals: <= {GOAL_BYTES / 1e9:g} GB: {'yes' if b['total'] <= GOAL_BYTES else 'NO'}; "
              f"<= {GOAL_RATIO}x: {'yes' if ratio <= GOAL_RATIO else 'NO'})", flush=True)
    print(f"load after: {uptime()}")
    (work / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
