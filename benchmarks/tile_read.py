"""Tile read throughput from a zarr slide: Ray Data path vs a plain loop, and 1 vs 2 CPUs (issue 4).

Run (from the repository root, venv active)::

    python benchmarks/tile_read.py            # full: 8192x8192 uint8 slide, 3000 tiles of 256x256 (~5 min)
    python benchmarks/tile_read.py --quick    # smoke: 2048x2048 slide, 200 tiles (~1 min)

One synthetic slide (uint8, chunks 512, image + 0/1 label zarr in InstantDL layout) is planned
with the package (``validate`` + ``make_plan``, as a run would), and the same spec rows (random
256x256 training tile origins from ``dataset.training_rows``) are read, image and target, by

* ``plain``: ``dataset.ReadTiles`` called directly in one process, batches of 8 rows;
* ``ray N``: ``dataset.ray_dataset(rows, plan)`` (no augmentation) consumed with
  ``iter_batches`` in a fresh local Ray with ``num_cpus=N`` (N = 1, 2), each in its own
  subprocess so no Ray state is shared.

Printed: tiles/s over the whole pass (Ray start-up excluded, Dataset planning and task launch
included) and after the first batch, the ratio ray/plain, and the speed-up from 1 to 2 CPUs.
Rounds alternate plain, ray 1, ray 2 to spread background load alike.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

BATCH = 8


def _setup(root: Path, n_tiles: int):
    from instantdl_ray.config import schema as cfgmod
    from instantdl_ray.data.dataset import training_rows
    from instantdl_ray.config.plan import make_plan
    from instantdl_ray.config.validate import validate

    cfg = cfgmod.from_dict({"use_algorithm": "SemanticSegmentation", "path": str(root), "tiles_per_image": n_tiles,
                            "iterations_over_dataset": 1, "validation_split": 0.0})
    inv = validate(cfg)
    t = time.time()
    plan = make_plan(cfg, inv)
    plan_s = time.time() - t
    samples = inv.samples["train"]
    rows = training_rows(samples, inv.image_shapes, plan, cfg.seed, range(1), n_tiles)
    return plan, rows, plan_s


def worker(args) -> dict:
    """One measurement in this process: ``--mode plain`` or ``--mode ray --num-cpus N``."""
    plan, rows, plan_s = _setup(Path(args.data), args.tiles)
    out = {"mode": args.mode, "num_cpus": args.num_cpus, "tiles": len(rows), "plan_s": round(plan_s, 2)}
    if args.mode == "plain":
        import numpy as np

        from instantdl_ray.data.dataset import ReadTiles

        reader = ReadTiles(plan)
        cpu = _common.CpuSampler().__enter__()
        t0 = time.time()
        t_first = None
        n = 0
        for i in range(0, len(rows), BATCH):
            chunk = rows[i:i + BATCH]
            batch = {"image": np.array([r["image"] for r in chunk]), "target": np.array([r["target"] for r in chunk]),
                     "origin": np.array([r["origin"] for r in chunk]), "seed": np.array([r["seed"] for r in chunk])}
            b = reader(batch)
            n += len(b["image"])
            if t_first is None:
                t_first = time.time()
        t1 = time.time()
    else:
        t = time.time()
        _common.start_ray(num_cpus=args.num_cpus)
        out["ray_start_s"] = round(time.time() - t, 1)
        from instantdl_ray.data.dataset import ray_dataset

        t0 = time.time()
        cpu = _common.CpuSampler().__enter__()
        ds = ray_dataset(rows, plan)
        t_first = None
        n = 0
        for b in ds.iter_batches(batch_size=BATCH, batch_format="numpy", prefetch_batches=2):
            n += len(b["image"])
            if t_first is None:
                t_first = time.time()
        t1 = time.time()
    cpu.__exit__(None, None, None)
    assert n == len(rows), (n, len(rows))
    out["cpu_s"] = cpu.by_role()
    out["tiles_per_s"] = round(n / (t1 - t0), 1)
    out["steady_tiles_per_s"] = round((n - BATCH) / max(t1 - t_first, 1e-9), 1)
    out["first_batch_s"] = round(t_first - t0, 2)
    out["load"] = round(os.getloadavg()[0], 1)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--side", type=int, help="slide side in pixels (default 8192, quick 2048)")
    p.add_argument("--tiles", type=int, help="tiles read per measurement (default 3000, quick 200)")
    p.add_argument("--rounds", type=int, help="rounds of plain, ray 1, ray 2 (default 2, quick 1)")
    p.add_argument("--noise", type=float, default=0.0,
                   help="Gaussian noise std added to the slide (0: flat blobs, ~50x compressible; 8: ~2x)")
    p.add_argument("--json", help="write the numbers to this file")
    # internal: one measurement
    p.add_argument("--mode", choices=("plain", "ray"), help=argparse.SUPPRESS)
    p.add_argument("--num-cpus", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.side = args.side or (2048 if args.quick else 8192)
    args.tiles = args.tiles or (200 if args.quick else 3000)
    args.rounds = args.rounds or (1 if args.quick else 2)
    if args.mode:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0

    print(f"machine: {_common.machine()}\nload before: {_common.uptime()}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-tile-read-"))
    try:
        t = time.time()
        data = _common.make_slide_set(tmp / "slide", args.side, test_side=512, noise=args.noise)
        print(f"slide {args.side}x{args.side} uint8, chunks 512, noise std {args.noise:g}: written in {time.time() - t:.1f} s, "
              f"{_common.du(data) / 2**20:.1f} MiB on disk", flush=True)
        runs = [("plain", 1), ("ray", 1), ("ray", 2)]
        results: dict[str, list[dict]] = {}
        for rnd in range(args.rounds):
            for mode, cpus in runs:
                key = "plain" if mode == "plain" else f"ray_{cpus}cpu"
                cmd = [sys.executable, __file__, "--mode", mode, "--num-cpus", str(cpus), "--data", str(data),
                       "--tiles", str(args.tiles)]
                env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
                env.pop("RAY_ADDRESS", None)
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if proc.returncode != 0 or line is None:
                    print(proc.stdout[-3000:], proc.stderr[-3000:])
                    raise SystemExit(f"{key} failed (rc {proc.returncode})")
                r = json.loads(line[7:])
                results.setdefault(key, []).append(r)
                print(f"  round {rnd + 1} {key:9s}: {r['tiles_per_s']:7.1f} tiles/s overall, "
                      f"{r['steady_tiles_per_s']:7.1f} after the first batch ({r['first_batch_s']} s), "
                      f"plan {r['plan_s']} s, cpu-s {r['cpu_s']}, load {r['load']}", flush=True)

        def mean(key, field):
            xs = [r[field] for r in results[key]]
            return round(sum(xs) / len(xs), 1)

        summary = {k: {"tiles_per_s": mean(k, "tiles_per_s"), "steady_tiles_per_s": mean(k, "steady_tiles_per_s"),
                       "first_batch_s": mean(k, "first_batch_s")} for k in results}
        print(f"\nslide {args.side}^2 (noise {args.noise:g}), {args.tiles} tiles of 256^2 (image + target), mean of {args.rounds} round(s):")
        for k, v in summary.items():
            print(f"  {k:9s} {v['tiles_per_s']:7.1f} tiles/s overall  {v['steady_tiles_per_s']:7.1f} steady  "
                  f"first batch {v['first_batch_s']} s")
        plain = summary["plain"]["tiles_per_s"]
        for k in ("ray_1cpu", "ray_2cpu"):
            summary[k]["ratio_vs_plain"] = round(summary[k]["tiles_per_s"] / plain, 2)
        scale = round(summary["ray_2cpu"]["tiles_per_s"] / summary["ray_1cpu"]["tiles_per_s"], 2)
        print(f"ratio ray_1cpu/plain={summary['ray_1cpu']['ratio_vs_plain']} ray_2cpu/plain="
              f"{summary['ray_2cpu']['ratio_vs_plain']} scaling_1_to_2_cpus={scale}")
        load_after = _common.uptime()
        print(f"load after: {load_after}")
        if args.json:
            Path(args.json).write_text(json.dumps({"machine": _common.machine(), "args": vars(args),
                                                   "runs": results, "summary": summary, "scaling": scale,
                                                   "load_after": load_after}, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
