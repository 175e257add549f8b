"""Peak memory of training on a whole-slide zarr: 32768^2 vs 8192^2 (issue 4).

Run (from the repository root, venv active)::

    python benchmarks/slide_train_memory.py            # full: 8192^2 and 32768^2 slides (~15 min, 2 cores)
    python benchmarks/slide_train_memory.py --quick    # smoke: 1024^2 and 4096^2 slides, 1 epoch (~2 min)

For each size, a synthetic uint8 slide with a 0/1 label slide (zarr, chunks 512, flat blobs so
a 32768^2 slide takes a few MB of disk; written chunk by chunk, cached in
``$TMPDIR/instantdl-bench-slides/<side>``) in InstantDL layout (``train/image/slide.zarr``,
``train/groundtruth/slide.zarr``, and a small ``test/image/small.zarr``) is trained through

    python -m instantdl_ray run slide.yaml --out RUN --set evaluation=false --set calculate_uncertainty=false
        --set iterations_over_dataset=2 --set tiles_per_image=16 --set batchsize=4

(semantic U-Net, 256^2 tiles). Reported per size: wall time, ``stage_seconds`` from ``run.json``,
and the peak memory of the run (driver + all descendants as PSS + the Ray object store's resident
pages, sampled every 0.5 s; RSS sum as an upper bound). Goal: under 3 GB and not growing with
the slide.

It also times, in this process, the planning stage's per-image statistics on each slide
(``plan.image_percentiles``: a bounded sample of whole chunks, so the same cost for any slide).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

GOAL_BYTES = 3 * 10**9


def probe_plan(image: Path) -> dict:
    """Time the plan's statistics of one slide (``plan.image_percentiles``)."""
    from instantdl_ray.config.plan import image_percentiles

    t = time.time()
    lohi = image_percentiles(image, "YX")
    return {"plan_stats_s": round(time.time() - t, 2), "lohi": [round(v, 1) for v in lohi[0]]}


def run_size(side: int, args, work: Path) -> dict:
    cache = Path(os.environ.get("TMPDIR", "/tmp")) / "instantdl-bench-slides" / str(side)
    t = time.time()
    fresh = not (cache / ".complete").exists()
    data = _common.make_slide_set(cache, side, test_side=args.test_side)
    made_s = time.time() - t
    cfg_path = work / f"slide{side}.yaml"
    cfg_path.write_text(f"use_algorithm: SemanticSegmentation\npath: {data}\n")
    run_dir = work / f"run{side}"
    sets = ["evaluation=false", "calculate_uncertainty=false", f"iterations_over_dataset={args.epochs}",
            f"tiles_per_image={args.tiles}", "batchsize=4"]
    cli = ["run", str(cfg_path), "--out", str(run_dir)] + [a for s in sets for a in ("--set", s)]
    print(f"\n=== slide {side}x{side} uint8 ({side * side / 2**30:.2f} GiB of pixels, "
          f"{_common.du(data) / 2**20:.1f} MiB on disk, {'written' if fresh else 'reused'} in {made_s:.0f} s)", flush=True)
    probe = probe_plan(data / "train" / "image" / "slide.zarr")
    print(f"  plan statistics of the slide: {probe['plan_stats_s']} s (lo/hi {probe['lohi']})", flush=True)
    load_before = os.getloadavg()[0]
    res = _common.run_cli(cli, work / f"run{side}.log", timeout=args.timeout)
    if res["rc"] != 0:
        print(_common.tail(work / f"run{side}.log", 40))
        raise SystemExit(f"run on the {side}^2 slide failed (exit {res['rc']}); log: {work / f'run{side}.log'}")
    stages = _common.run_json(run_dir).get("stage_seconds", {})
    peak = res["peak"]
    print(f"  command: {res['cmd'].replace(str(work), '<tmp>')}")
    print(f"  wall {res['wall_s']} s; stages {stages}")
    print(f"  peak memory {_common.fmt_mib(peak.total)} (PSS {_common.fmt_mib(peak.pss)} + object store "
          f"{_common.fmt_mib(peak.object_store)}; RSS sum {_common.fmt_mib(peak.rss_sum)}; "
          f"driver RSS {_common.fmt_mib(peak.driver_rss)}; {peak.processes} processes)", flush=True)
    print(f"  at the peak, MiB by process: {res['peak_breakdown']}", flush=True)
    return {"side": side, "disk_mib": round(_common.du(data) / 2**20, 1), "wall_s": res["wall_s"],
            "stage_seconds": stages, "command": res["cmd"].replace(str(work), "<tmp>"),
            "peak_bytes": {k: getattr(peak, k) for k in ("total", "pss", "object_store", "rss_sum", "driver_rss")},
            "peak_breakdown_mib": res["peak_breakdown"], "memory_timeline": res["timeline"][::4],
            "plan_probe": probe, "load_before": load_before, "load_after": os.getloadavg()[0]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sides", help="comma list of slide sides (default 8192,32768; quick 1024,4096)")
    p.add_argument("--epochs", type=int, help="default 2 (quick 1)")
    p.add_argument("--tiles", type=int, help="tiles_per_image (default 16, quick 4)")
    p.add_argument("--test-side", type=int, help="side of the test image (default 1024, quick 512)")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--json", help="write the numbers to this file")
    args = p.parse_args(argv)
    sides = [int(s) for s in (args.sides or ("1024,4096" if args.quick else "8192,32768")).split(",")]
    args.epochs = args.epochs or (1 if args.quick else 2)
    args.tiles = args.tiles or (4 if args.quick else 16)
    args.test_side = args.test_side or (512 if args.quick else 1024)

    load_before = _common.uptime()
    print(f"machine: {_common.machine()}\nload before: {load_before}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-slide-"))
    out = {"machine": _common.machine(), "args": vars(args), "load_before": load_before, "runs": []}
    try:
        for side in sides:
            out["runs"].append(run_size(side, args, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out["load_after"] = _common.uptime()
    print(f"\nload after: {out['load_after']}")
    peaks = [r["peak_bytes"]["total"] for r in out["runs"]]
    growth = peaks[-1] / peaks[0] if peaks[0] else float("nan")
    ok = max(peaks) < GOAL_BYTES and growth < 1.25
    for r in out["runs"]:
        print(f"side={r['side']} peak_total_mib={r['peak_bytes']['total'] / 2**20:.0f} wall_s={r['wall_s']} "
              f"plan_s={r['stage_seconds'].get('plan')}")
    print(f"growth={growth:.2f} goal_under_3GB_and_flat={'yes' if ok else 'no'}")
    out.update(growth=round(growth, 3), goal_met=ok)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
