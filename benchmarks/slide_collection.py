"""A collection of slides through ``predict`` (issue 14, item 8): slides per hour, tiles/s, what
tissue detection saves, memory, and the driver's cost per tile.

    python benchmarks/slide_collection.py --run RUN_DIR [--slides 4] [--side 16384] [--tissue 0.2]
                                          [--mpp 0.5] [--out DIR] [--json PATH]

``RUN_DIR``: a semantic run on the DSB fluorescence set (``configs/dsb2018_semantic.yaml``). The
slides are grey OME-TIFF pyramids (levels 1 .. 1/16, ``mpp`` µm/px) of camera noise with real DSB
test images pasted on ``--tissue`` of their area (``slide_quality.build_slide``).

1. The collection (a manifest CSV) in one ``predict`` call, in this process, with the defaults
   (``tissue_mask: auto``) and one deterministic pass: wall time, slides per hour, tiles predicted
   and tiles/s; the peak memory of the process tree (``_common.MemorySampler``: driver, Ray's
   processes and workers, object store); the driver process's CPU seconds (user + system,
   ``getrusage``) per tile, and the tile rate one driver could sustain at that cost (the ceiling
   it puts on a GPU cluster that predicts faster than that).
2. The first slide again with ``tissue_mask=none``: the ratio of the two times (same slide).
3. The first slide alone with the defaults: peak memory of one slide vs the collection (flat in
   the number of slides when the two agree).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MiB, SHARED_DATA, MemorySampler, machine, uptime  # noqa: E402
from slide_quality import build_slide, tiles_predicted  # noqa: E402


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(run: Path, inputs: Path, out: Path, *sets: str) -> dict:
    from instantdl_ray import pipeline

    shutil.rmtree(out, ignore_errors=True)
    c0, t0 = _cpu(), time.time()
    with MemorySampler(os.getpid(), interval=1.0) as mem:
        pipeline.predict_new(run, inputs, out=out, overrides=["calculate_uncertainty=false", *sets])
    wall, cpu = time.time() - t0, _cpu() - c0
    tiles = tiles_predicted((out / "predict.log").read_text())
    return {"seconds": round(wall, 1), "tiles": tiles, "tiles_per_s": round(tiles / wall, 2),
            "driver_cpu_s": round(cpu, 1), "driver_cpu_s_per_tile": round(cpu / max(tiles, 1), 4),
            "peak_tree_mib": round(mem.peak.total / MiB), "peak_driver_rss_mib": round(mem.peak.driver_rss / MiB)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, type=Path)
    ap.add_argument("--data", type=Path, default=SHARED_DATA / "dsb2018_fluo256" / "semantic")
    ap.add_argument("--slides", type=int, default=4)
    ap.add_argument("--side", type=int, default=16384)
    ap.add_argument("--tissue", type=float, default=0.2)
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    import ray

    out = args.out or Path(tempfile.mkdtemp(prefix="idl_slide_collection_"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}; {uptime()}")
    n = int(round(args.tissue * args.side**2 / 256**2))
    rows = ["slide,name"]
    for k in range(args.slides):
        path, *_ = build_slide(args.data, out, args.side, n, args.mpp, seed=k, name=f"slide{k}", plain_copies=False)
        rows.append(f"{path.name},slide{k}")
    manifest = out / "collection.csv"
    manifest.write_text("\n".join(rows) + "\n")
    first = out / "first.csv"
    first.write_text("\n".join(rows[:2]) + "\n")
    print(f"{args.slides} slides of {args.side}², {n} pasted images each ({100 * n * 256**2 / args.side**2:.0f} %)")
    try:
        timed(args.run, first, out / "warmup", "tissue_mask=none")  # pays Ray's start, not measured
        coll = timed(args.run, manifest, out / "auto")
        one = timed(args.run, first, out / "one")
        whole = timed(args.run, first, out / "none", "tissue_mask=none")
    finally:
        ray.shutdown()
    res = {"machine": machine(), "load": uptime(), "slides": args.slides, "side": args.side,
           "tissue": args.tissue, "collection": coll, "one_slide": one, "one_slide_no_mask": whole,
           "slides_per_hour": round(3600 * args.slides / coll["seconds"], 1),
           "time_ratio_no_mask_over_mask": round(whole["seconds"] / one["seconds"], 2),
           "tile_ratio_no_mask_over_mask": round(whole["tiles"] / max(one["tiles"], 1), 2),
           "driver_tiles_per_s_ceiling": round(1 / max(coll["driver_cpu_s_per_tile"], 1e-9), 1),
           "peak_ratio_collection_over_one": round(coll["peak_tree_mib"] / max(one["peak_tree_mib"], 1), 2)}
    print(json.dumps(res, indent=1))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
