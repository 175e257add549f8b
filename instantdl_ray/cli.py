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
    r.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted or failed run from its last checkpoint")
    r.add_argument("--force", action="store_true", help="with --resume of a complete run: predict and evaluate again")
    r.add_argument("--num-cpus", type=int, help="CPUs for a local Ray instance (default: all)")

    v = sub.add_parser("validate", help="check a config and its data; exit 2 on problems")
    v.add_argument("config")
    v.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    pr = sub.add_parser("predict", help="predict new images with a trained run")
    pr.add_argument("run_dir")
    pr.add_argument("--input", required=True, help="a folder of images, one image, or a zarr")
    pr.add_argument("--out", help="output folder (default: RUN_DIR/predict/<timestamp>)")
    pr.add_argument("--address", help="join a Ray cluster at HOST:PORT")
    pr.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="e.g. --set calculate_uncertainty=false")

    c = sub.add_parser("convert", help="images -> chunked zarr, or binary masks -> instance label images")
    c.add_argument("src", help="an image, a folder of images, or an InstantDL data folder")
    c.add_argument("dst", help="DST.zarr (one image) or a folder")
    c.add_argument("--instances-from-binary", action="store_true",
                   help="turn a semantic data set (binary masks) into instance label images")
    c.add_argument("--watershed", action="store_true", help="split touching objects (with --instances-from-binary)")
    c.add_argument("--min-distance", type=int, default=5, help="watershed seed distance in pixels")
    c.add_argument("--min-size", type=int, default=8, help="drop objects smaller than this (pixels)")
    c.add_argument("--chunks", type=int, default=512, help="zarr chunk edge along Y and X")
    c.add_argument("--axes", help="axis order of the images, e.g. YXC or CZYX (default: inferred)")

    t = sub.add_parser("tune", help="Ray Tune search (ASHA) over learning rate, batch size, dropout, augmentation")
    t.add_argument("config")
    t.add_argument("--samples", type=int, default=8, help="number of trials")
    t.add_argument("--max-epochs", type=int, help="epochs per trial (default: iterations_over_dataset)")
    t.add_argument("--out", help="output folder (default: <path>/tune/<timestamp>)")
    t.add_argument("--address", help="join a Ray cluster at HOST:PORT")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    e = sub.add_parser("evaluate", help="re-run evaluation and report of a finished run")
    e.add_argument("run_dir")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from instantdl_ray.errors import InstantDLError

    try:
        return {"run": _run, "validate": _validate, "evaluate": _evaluate, "predict": _predict, "convert": _convert, "tune": _tune}[args.command](args)
    except InstantDLError as e:
        print(e.format(), file=sys.stderr)
        return e.exit_code
    except (KeyboardInterrupt, SystemExit):  # Ray turns a Ctrl-C inside ray.get into SystemExit(1)
        print("interrupted (the run directory records where; `run --resume RUN_DIR` continues it)", file=sys.stderr)
        return 130
    except (FileExistsError, ValueError) as e:
        if not isinstance(e, FileExistsError) and args.command != "convert":
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


def _load(config: str, overrides: list[str]):
    from instantdl_ray.config import schema as cfgmod

    return cfgmod.load(config, overrides)


def _run(args) -> int:
    from instantdl_ray.errors import ConfigError
    from instantdl_ray.pipeline import run

    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").exists():
            raise ConfigError([f"--resume {run_dir}: no config.yaml there; give the folder of an earlier run"])
        cfg = _load(str(run_dir / "config.yaml"), args.overrides)
    elif args.config:
        cfg = _load(args.config, args.overrides)
    else:
        raise ConfigError(["run: give a CONFIG file (or --resume RUN_DIR)"])
    run(cfg, out=args.out, address=args.address, resume=args.resume, num_cpus=args.num_cpus, force=args.force)
    return 0


def _validate(args) -> int:
    from instantdl_ray.config.validate import validate

    cfg = _load(args.config, args.overrides)
    inv = validate(cfg)
    n = {k: len(v) for k, v in inv.samples.items()}
    for w in inv.warnings:
        print(f"warning: {w}")
    print(f"OK: {cfg.use_algorithm}, {n.get('train', 0)} train / {n.get('test', 0)} test images, axes {inv.axes}")
    return 0


def _evaluate(args) -> int:
    import json

    from instantdl_ray.config import schema as cfgmod
    from instantdl_ray.pipeline import RunLog, evaluate_run
    from instantdl_ray.config.plan import Plan

    from instantdl_ray.errors import ConfigError
    from instantdl_ray.pipeline import resume_command

    run_dir = Path(args.run_dir)
    index = run_dir / "predictions" / "index.json"
    if (run_dir / "config.yaml").exists() and not index.exists():
        raise ConfigError([f"{run_dir}: no predictions yet ({index} missing); run prediction first: "
                           f"{resume_command(run_dir)}"], title="Cannot evaluate")
    cfg = cfgmod.load(run_dir / "config.yaml")
    plan = Plan.from_json(run_dir / "plan.json")
    records = json.loads(index.read_text())
    summary = evaluate_run(run_dir, cfg, plan, records, RunLog(run_dir / "logs" / "run.log"))
    print(json.dumps(summary, indent=1))
    return 0


def _predict(args) -> int:
    from instantdl_ray.pipeline import predict_new

    predict_new(args.run_dir, args.input, out=args.out, overrides=args.overrides, address=args.address)
    return 0


def _convert(args) -> int:
    from instantdl_ray.io import convert

    if args.instances_from_binary:
        counts = convert.instances_from_binary(Path(args.src), Path(args.dst), watershed=args.watershed,
                                               min_distance=args.min_distance, min_size=args.min_size)
        for split, c in counts.items():
            print(f"{split}: {c['images']} images, {c['objects']} objects")
    else:
        written = convert.to_zarr(Path(args.src), Path(args.dst), chunks=args.chunks, axes=args.axes)
        print(f"wrote {len(written)} zarr array(s) under {args.dst}")
    return 0


def _tune(args) -> int:
    from instantdl_ray.train.tune import tune

    out = tune(args.config, args.overrides, num_samples=args.samples, out=args.out, max_epochs=args.max_epochs,
               address=args.address)
    print(f"best config: {Path(out) / 'best_config.yaml'}")
    return 0
