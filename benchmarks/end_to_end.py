"""Wall time per stage and peak memory of one ``python -m instantdl_ray run`` (issue 8).

Run (from the repository root, venv active)::

    python benchmarks/end_to_end.py            # full: configs/example_dsb2018_small.yaml as shipped (40 epochs)
    python benchmarks/end_to_end.py --quick    # the same with --set iterations_over_dataset=2

Runs the README's example, ``python -m instantdl_ray run configs/example_dsb2018_small.yaml
--out <tmp>``, as a subprocess and reports

* its wall time, and the ``stage_seconds`` the run writes to ``run.json`` (validate, plan,
  ray_start, train, predict, evaluate); "outside stages" = wall - sum of stages (interpreter
  start, imports, config load, Ray shutdown at exit);
* the fixed start-up cost = wall - train - predict, and whether it is under 20 s;
  within training, the part that is not epochs = train stage - sum of the epochs' own times
  (``logs/history.json`` ``epoch_time_s``: Ray Train start-up, checkpoints, shut-down);
* peak machine memory of the run: driver + every descendant process (Ray's GCS, raylet,
  workers, actors), summed as PSS (shared pages split, not double counted) plus the Ray object
  store's resident pages, sampled every 0.5 s (see ``_common.py``); the RSS sum is shown as an
  upper bound.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

STAGES = ("validate", "plan", "ray_start", "train", "predict", "evaluate")
GOAL_S = 20.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="--set iterations_over_dataset=2")
    p.add_argument("--config", default="configs/example_dsb2018_small.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="extra --set KEY=VALUE")
    p.add_argument("--json", help="write the numbers to this file")
    p.add_argument("--keep", action="store_true", help="keep the run directory")
    args = p.parse_args(argv)
    overrides = (["iterations_over_dataset=2"] if args.quick else []) + args.overrides

    load_before = _common.uptime()
    print(f"machine: {_common.machine()}\nload before: {load_before}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    run_dir = tmp / "run"
    cli = ["run", args.config, "--out", str(run_dir)] + [a for o in overrides for a in ("--set", o)]
    print("command: python -m instantdl_ray " + " ".join(cli).replace(str(run_dir), "<tmp>/run"), flush=True)
    res = _common.run_cli(cli, tmp / "run.log", timeout=3600)
    load_after = _common.uptime()
    if res["rc"] != 0:
        print(_common.tail(tmp / "run.log", 40))
        raise SystemExit(f"run failed with exit code {res['rc']} (log kept in {tmp})")
    state = _common.run_json(run_dir)
    stages = state.get("stage_seconds", {})
    wall = res["wall_s"]
    outside = wall - sum(stages.values())
    fixed = wall - stages.get("train", 0.0) - stages.get("predict", 0.0)
    history = []
    if (run_dir / "logs" / "history.json").exists():
        history = json.loads((run_dir / "logs" / "history.json").read_text())
    epoch_sum = sum(h.get("epoch_time_s", 0.0) for h in history)
    train_overhead = stages.get("train", 0.0) - epoch_sum
    results = {}
    if (run_dir / "evaluation" / "results.json").exists():
        results = json.loads((run_dir / "evaluation" / "results.json").read_text()).get("summary", {})
    peak = res["peak"]

    print(f"\nwall {wall:.1f} s")
    for s in STAGES:
        if s in stages:
            print(f"  {s:10s} {stages[s]:7.1f} s")
    print(f"  {'outside':10s} {outside:7.1f} s   (interpreter start, imports, config, exit)")
    print(f"  epochs: {len(history)}, sum of epoch times {epoch_sum:.1f} s -> train stage beyond epochs "
          f"{train_overhead:.1f} s (Ray Train start-up, checkpoints, shut-down)")
    print(f"peak memory: {_common.fmt_mib(peak.total)} (PSS {_common.fmt_mib(peak.pss)} + object store "
          f"{_common.fmt_mib(peak.object_store)}; RSS sum {_common.fmt_mib(peak.rss_sum)}; "
          f"{peak.processes} processes at most; {res['samples']} samples)")
    print(f"  at the peak, MiB by process: {res['peak_breakdown']}")
    if results:
        print("results: " + ", ".join(f"{k} {v:.3f}" for k, v in results.items() if isinstance(v, (int, float))))
    print(f"load after: {load_after}")
    print(f"fixed_startup_s={fixed:.1f} goal_under_{GOAL_S:.0f}s={'yes' if fixed < GOAL_S else 'no'}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": _common.machine(), "command": res["cmd"].replace(str(run_dir), "<tmp>/run"),
            "wall_s": wall, "stage_seconds": stages, "outside_stages_s": round(outside, 1),
            "fixed_startup_s": round(fixed, 1), "epochs": len(history), "epoch_sum_s": round(epoch_sum, 1),
            "train_beyond_epochs_s": round(train_overhead, 1),
            "peak_memory_bytes": {k: getattr(peak, k) for k in ("total", "pss", "object_store", "rss_sum", "driver_rss")},
            "peak_breakdown_mib": res["peak_breakdown"], "memory_timeline": res["timeline"][::4],
            "results": results, "load_before": load_before, "load_after": load_after,
        }, indent=1))
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"run kept in {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
