"""Command line: argument parsing only; heavy imports happen inside the commands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="instantdl-ray", description="InstantDL's biomedical deep learning on Ray.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="validate, train, predict and evaluate from a config file")
    r.add_argument("config", nargs="?", help="YAML or InstantDL JSON config")
    r.add_argument("--out", help="run directory (default: <path>/runs/<timestamp>)")
    r.add_argument("--address", help="join a Ray cluster at HOST:PORT (default: $RAY_ADDRESS or a local Ray)")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, value parsed as YAML (e.g. --set ray.num_workers=2)")
    r.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    r.add_argument("--num-cpus", type=int, help="CPUs for a local Ray instance (default: all)")

    v = sub.add_parser("validate", help="check a config and its data; exit 2 on problems")
    v.add_argument("config")
    v.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    e = sub.add_parser("evaluate", help="re-run evaluation and report of a finished run")
    e.add_argument("run_dir")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .errors import InstantDLError

    try:
        return {"run": _run, "validate": _validate, "evaluate": _evaluate}[args.command](args)
    except InstantDLError as e:
        print(e.format(), file=sys.stderr)
        return 2
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _load(config: str, overrides: list[str]):
    from . import config as cfgmod

    return cfgmod.load(config, overrides)


def _run(args) -> int:
    from .errors import ConfigError
    from .pipeline import run

    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").exists():
            raise ConfigError([f"--resume {run_dir}: no config.yaml there; give the folder of an earlier run"])
        cfg = _load(str(run_dir / "config.yaml"), args.overrides)
    elif args.config:
        cfg = _load(args.config, args.overrides)
    else:
        raise ConfigError(["run: give a CONFIG file (or --resume RUN_DIR)"])
    run(cfg, out=args.out, address=args.address, resume=args.resume, num_cpus=args.num_cpus)
    return 0


def _validate(args) -> int:
    from .validate import validate

    cfg = _load(args.config, args.overrides)
    inv = validate(cfg)
    n = {k: len(v) for k, v in inv.samples.items()}
    print(f"OK: {cfg.use_algorithm}, {n.get('train', 0)} train / {n.get('test', 0)} test images, axes {inv.axes}")
    return 0


def _evaluate(args) -> int:
    import json

    from . import config as cfgmod
    from .pipeline import RunLog, evaluate_run
    from .plan import Plan

    run_dir = Path(args.run_dir)
    cfg = cfgmod.load(run_dir / "config.yaml")
    plan = Plan.from_json(run_dir / "plan.json")
    records = json.loads((run_dir / "predictions" / "index.json").read_text())
    summary = evaluate_run(run_dir, cfg, plan, records, RunLog(run_dir / "logs" / "run.log"))
    print(json.dumps(summary, indent=1))
    return 0
