"""Training overhead of the pipeline (Ray Data + Ray Train) against a plain PyTorch loop (issue 8).

Run (from the repository root, venv active)::

    python benchmarks/train_overhead.py            # full: U-Net + ResNet50, runs a,b,a,b (~30 min on 2 idle cores)
    python benchmarks/train_overhead.py --quick    # smoke: tiny data, one a,b pair per model (~2 min)

Same model, data rows, batch size, epochs, seed and torch thread count, trained by

(a) ``plain``: a ``torch.utils.data.DataLoader`` loop (``--loader-workers`` 1 by default) whose
    dataset calls the package's own ``dataset.ReadTiles`` (same files, same percentile
    normalisation) and ``augment.augment_batch`` (same augmentations, same per-row seeds), and a
    training step of the package (``train.train_epoch``: ``task.loss``, Adam, ``float(loss)``
    per step) — no validation, no checkpoints;
(b) ``pipeline``: the package's training path itself, ``instantdl_ray.train.loop.fit`` (spec rows ->
    Ray Data ``ReadTiles`` -> ``augment_batch`` -> Ray Train ``TorchTrainer`` with one worker,
    resources from ``_ray.plan_resources``, a checkpoint every epoch as in a real run). The worker
    loop is wrapped only to time-stamp each ``ray.train.report`` (= end of an epoch, checkpoint
    included).

Both use ``validation_split: 0`` so the epoch is pure training in both. Runs alternate
(a, b, a, b, ...) so background load hits both alike. Printed per model: steady-state
images/s (epochs after the first), time from start (model/loader or ``fit`` call; Ray itself is
already up) to the end of the first epoch, CPU seconds per role (driver, train worker, the Ray
Data ``SplitCoordinator`` actor that runs the streaming executor, data tasks), and finally
``model=<m> ratio=<pipeline/plain steady-state throughput>`` (the median over rounds of the
ratio of the two runs of a round: background load drifts slowly, so neighbours see alike).

``--variants as_is,unfixed`` adds the package as it was before the fix found with this script
(see benchmarks/README.md): no cap on Ray Data's scheduling loop (``dataset.StepRateLimit``; without
it the streaming executor in the ``SplitCoordinator`` actor busy-spins a CPU whenever the trainer is
the bottleneck, i.e. always on CPU) and Ray Data's default read-ahead instead of
``train.read_ahead_bytes`` (by default it prefetches up to its whole object store budget: with small
rows, every epoch of the run in the first minutes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

# ---------------------------------------------------------------- set-ups


def make_synthetic_classification(root: Path, n: int = 64, side: int = 360, classes: int = 8) -> Path:
    """RGB JPEGs (~PBC size) with a class-dependent number of bright discs; InstantDL layout."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "train" / "image").mkdir(parents=True, exist_ok=True)
    (root / "train" / "groundtruth").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:side, :side]
    rows = ["filename,groundtruth"]
    for i in range(n):
        c = i % classes
        img = rng.normal(60, 10, (side, side, 3))
        for _ in range(c + 1):
            cy, cx = rng.integers(40, side - 40, 2)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < 30**2] += (150, 80, 120)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "train" / "image" / f"s{i:03d}.jpg")
        rows.append(f"s{i:03d}.jpg,{c}")
    (root / "train" / "groundtruth" / "groundtruth.csv").write_text("\n".join(rows) + "\n")
    (root / "test" / "image").mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((side, side, 3), np.uint8)).save(root / "test" / "image" / "t000.jpg")
    return root


class Setup:
    """Config, inventory (train split cut to ``images``), plan and spec rows for one model."""

    def __init__(self, model: str, quick: bool, images: int | None, epochs: int, dataset_epochs: int, tmp: Path):
        from instantdl_ray.config import schema as cfgmod
        from instantdl_ray.data.augment import AugmentParams
        from instantdl_ray.data.dataset import training_rows
        from instantdl_ray.config.plan import make_plan
        from instantdl_ray.tasks import get_task
        from instantdl_ray.config.validate import validate

        self.model = model
        if model == "unet":
            real = _common.SHARED_DATA / "dsb2018_fluo256" / "semantic"
            path = real if real.is_dir() and not quick else _common.EXAMPLE_DATA
            raw = {"use_algorithm": "SemanticSegmentation", "path": str(path), "batchsize": 4}
            default_images = 8 if quick else 60
        else:
            real = _common.SHARED_DATA / "pbc_blood"
            if real.is_dir() and not quick:
                path = real
            else:
                path = make_synthetic_classification(tmp / "synthetic_cls", n=16 if quick else 256)
            raw = {"use_algorithm": "Classification", "path": str(path), "batchsize": 8 if quick else 16,
                   "image_size": 64 if quick else 128, "data_gen_args": {"rotation_range": 180}}
            default_images = 16 if quick else 160
        # the data stream holds ``dataset_epochs`` epochs of rows, as in a real run (default 50 =
        # iterations_over_dataset's default); both paths stop after ``epochs``
        raw.update({"iterations_over_dataset": dataset_epochs, "validation_split": 0.0, "seed": 42,
                    "calculate_uncertainty": False, "evaluation": False})
        self.cfg = cfgmod.from_dict(raw, base_dir=_common.REPO)
        self.data = str(path)
        inv = validate(self.cfg)
        n = images or default_images
        inv.samples = {"train": inv.samples["train"][:n], "test": []}
        self.inv = inv
        self.plan = make_plan(self.cfg, inv)
        self.task = get_task(self.plan.task)
        self.params = AugmentParams.from_dict(self.cfg.data_gen_args.model_dump())
        self.epochs = epochs
        by_name = {str(s.image): s for s in inv.samples["train"]}
        samples = [by_name[n] for n in self.plan.train_names]
        self.rows = training_rows(samples, inv.image_shapes, self.plan, self.cfg.seed, range(dataset_epochs),
                                  self.cfg.tiles_per_image)
        self.rows_per_epoch = len(self.rows) // dataset_epochs
        self.dataset_epochs = dataset_epochs
        self.batch_size = self.cfg.batchsize

    def describe(self) -> str:
        return (f"{self.plan.model} ({self.plan.task}) on {self.data}: {self.rows_per_epoch} images/epoch of "
                f"{self.plan.tile_shape}, batch {self.batch_size}, {self.epochs} epochs timed (stream of "
                f"{self.dataset_epochs} epochs), "
                f"augment {[k for k, v in self.params.to_dict().items() if v and k in ('horizontal_flip', 'vertical_flip', 'rotation_range')]}")


# ---------------------------------------------------------------- (a) plain PyTorch


class RowsDataset:
    """``torch`` map-style dataset over the pipeline's spec rows, using the package's functions."""

    def __init__(self, setup: Setup):
        from instantdl_ray.data.dataset import ReadTiles

        self.rows = setup.rows
        self.reader = ReadTiles(setup.plan)
        self.params = setup.params
        self.kind = setup.task.target_kind or "none"

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        import torch

        from instantdl_ray.data.augment import augment_batch

        r = self.rows[i]
        batch = {"image": np.array([r["image"]]), "target": np.array([r["target"]]),
                 "origin": np.array([r["origin"]]), "seed": np.array([r["seed"]], dtype=np.int64)}
        if "label" in r:
            batch["label"] = np.array([r["label"]], dtype=np.int64)
        out = augment_batch(self.reader(batch), self.params, target_kind=self.kind)
        item = {"image": torch.from_numpy(np.ascontiguousarray(out["image"][0]))}
        if "target" in out:
            item["target"] = torch.from_numpy(np.ascontiguousarray(out["target"][0]))
        if "label" in out:
            item["label"] = torch.as_tensor(int(out["label"][0]))
        return item


def run_plain(setup: Setup, threads: int, loader_workers: int) -> dict:
    import torch

    from instantdl_ray.train.loop import train_epoch

    torch.set_num_threads(threads)
    t0 = time.time()
    torch.manual_seed(setup.cfg.seed)
    model = setup.task.build_model(setup.plan)
    opt = torch.optim.Adam(model.parameters(), lr=setup.cfg.learning_rate)
    loss_fn = setup.task.make_loss(setup.plan)
    loader = torch.utils.data.DataLoader(
        RowsDataset(setup), batch_size=setup.batch_size, shuffle=False, num_workers=loader_workers,
        prefetch_factor=2 if loader_workers else None,
    )
    bs = setup.batch_size
    steps = max(1, math.ceil(setup.rows_per_epoch / bs))
    it = iter(loader)
    ends = []
    for _ in range(setup.epochs):  # the package's own training step (train.train_epoch), no DDP
        loss_sum, n, _ = train_epoch(model, it, steps, setup.task, loss_fn, opt, lambda b: b)
        ends.append(time.time())
    del it, loader
    return {"t0": t0, "ends": ends, "last_loss": loss_sum / max(n, 1)}


# ---------------------------------------------------------------- (b) the pipeline


def timed_loop(stamp_path: str, stop_after: int):
    """``train_loop_per_worker`` wrapped to time-stamp every ``ray.train.report`` and to end
    training after ``stop_after`` epochs (as if the run were cut short; the stream still holds
    all configured epochs). Defined in ``__main__`` so Ray pickles it by value; the wrapped loop
    is the package's, unchanged."""

    def loop(config):
        import json as _json
        import time as _time

        import ray.train

        from instantdl_ray.train.loop import train_loop_per_worker

        orig = ray.train.report
        done = []

        class _Stop(Exception):
            pass

        def report(metrics, *args, **kwargs):
            t = _time.time()
            orig(metrics, *args, **kwargs)
            with open(stamp_path, "a") as f:
                f.write(_json.dumps({"epoch": metrics.get("epoch"), "epoch_time_s": metrics.get("epoch_time_s"),
                                     "loss": metrics.get("loss"), "t_report": t, "t_end": _time.time()}) + "\n")
            done.append(1)
            if len(done) >= stop_after:
                raise _Stop()

        ray.train.report = report
        with open(stamp_path, "a") as f:
            f.write(_json.dumps({"worker_start": _time.time()}) + "\n")
        try:
            train_loop_per_worker(config)
        except _Stop:
            pass
        finally:
            ray.train.report = orig

    return loop


def run_pipeline(setup: Setup, resources, variant: str, tmp: Path) -> dict:
    from instantdl_ray.train import loop as train_mod

    run_dir = Path(tempfile.mkdtemp(prefix="pipe-", dir=tmp))
    stamp = run_dir / "stamps.jsonl"
    from instantdl_ray.data import dataset as dataset_mod

    saved = dataset_mod.StepRateLimit, train_mod._data_config
    if variant == "unfixed":  # the package before the fix: no step-rate cap, Ray Data's default read-ahead
        dataset_mod.StepRateLimit = None
        train_mod._data_config = lambda *a, **k: None
    orig = train_mod.train_loop_per_worker
    train_mod.train_loop_per_worker = timed_loop(str(stamp), setup.epochs)
    try:
        t0 = time.time()
        train_mod.fit(setup.cfg, setup.plan, setup.inv, run_dir, resources, setup.params, log=lambda m: None)
        t_fit_end = time.time()
    finally:
        train_mod.train_loop_per_worker = orig
        dataset_mod.StepRateLimit, train_mod._data_config = saved
    recs = [json.loads(line) for line in stamp.read_text().splitlines()]
    epochs = [r for r in recs if "t_end" in r]
    out = {"t0": t0, "ends": [r["t_end"] for r in epochs],
           "worker_start": next((r["worker_start"] for r in recs if "worker_start" in r), None),
           "epoch_compute_s": [round(r["epoch_time_s"], 2) for r in epochs],
           "report_s": [round(r["t_end"] - r["t_report"], 2) for r in epochs],
           "fit_return_s": round(t_fit_end - epochs[-1]["t_end"], 1) if epochs else None,
           "last_loss": epochs[-1]["loss"] if epochs else None}
    shutil.rmtree(run_dir, ignore_errors=True)
    return out


# ---------------------------------------------------------------- measurement


def summarize(res: dict, images_per_epoch: int) -> dict:
    ends = res["ends"]
    first = ends[0] - res["t0"]
    steady = None
    if len(ends) >= 2:
        steady = images_per_epoch * (len(ends) - 1) / (ends[-1] - ends[0])
    return {"first_epoch_s": round(first, 1), "steady_img_s": round(steady, 2) if steady else None,
            "epoch_s": [round(b - a, 1) for a, b in zip([res["t0"]] + ends[:-1], ends)]}


def bench_model(model: str, args, tmp: Path) -> dict:
    from instantdl_ray import _ray

    setup = Setup(model, args.quick, args.images, args.epochs, args.dataset_epochs, tmp)
    cpus, gpus = _ray.cluster_resources()
    resources = _ray.plan_resources(setup.cfg.ray, cpus, gpus)
    if args.pipeline_threads:
        resources.torch_threads = args.pipeline_threads
    threads = args.plain_threads or resources.torch_threads
    nice = _common.ray_worker_niceness() if args.plain_nice is None else args.plain_nice
    print(f"\n=== {setup.describe()}", flush=True)
    print(f"    Ray: {cpus:g} CPUs; pipeline worker {resources.cpus_per_worker:g} CPU, torch_threads "
          f"{resources.torch_threads} (nice {_common.ray_worker_niceness()}); plain loop torch threads {threads}, "
          f"DataLoader workers {args.loader_workers}, nice {nice}",
          flush=True)
    variants = ["plain"] + [f"pipeline:{v}" for v in args.variants.split(",")]
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for rnd in range(args.rounds):
        for v in variants:
            print(f"  round {rnd + 1}/{args.rounds} {v} ...", flush=True)
            with _common.CpuSampler() as cpu:
                t_run = time.time()
                if v == "plain":
                    with _common.Niceness(nice):
                        raw = run_plain(setup, threads, args.loader_workers)
                else:
                    raw = run_pipeline(setup, resources, v.split(":")[1], tmp)
                wall = time.time() - t_run
            s = summarize(raw, setup.rows_per_epoch)
            s.update(wall_s=round(wall, 1), cpu_s=cpu.by_role(), cpu_s_ray_other=cpu.top_other(),
                     load=os.getloadavg()[0])
            if v != "plain":
                s.update({k: raw[k] for k in ("epoch_compute_s", "report_s", "fit_return_s")})
                s["worker_start_s"] = round(raw["worker_start"] - raw["t0"], 1) if raw["worker_start"] else None
            results[v].append(s)
            print(f"    {v}: steady {s['steady_img_s']} img/s, first epoch {s['first_epoch_s']} s, epochs {s['epoch_s']}, "
                  f"wall {s['wall_s']} s, cpu-s {s['cpu_s']} (ray_other: {s['cpu_s_ray_other']}), load {s['load']:.1f}"
                  + (f", worker-measured epoch compute {s['epoch_compute_s']} s, checkpoint+report {s['report_s']} s, "
                     f"worker up after {s['worker_start_s']} s" if v != "plain" else ""), flush=True)

    def mean(v, key):
        xs = [r[key] for r in results[v] if r[key] is not None]
        return round(float(np.mean(xs)), 2) if xs else None

    summary = {"model": model, "setup": setup.describe(), "torch_threads": threads, "plain_nice": nice,
               "loader_workers": args.loader_workers, "runs": results}
    print(f"\n  {model}: steady-state img/s (mean of {args.rounds}) and time to first finished epoch:")
    for v in variants:
        summary[v] = {"steady_img_s": mean(v, "steady_img_s"), "first_epoch_s": mean(v, "first_epoch_s")}
        print(f"    {v:20s} {summary[v]['steady_img_s']!s:>8} img/s   first epoch {summary[v]['first_epoch_s']} s")
    base = summary["plain"]["steady_img_s"]
    for v in variants[1:]:
        r = summary[v]["steady_img_s"] / base if base and summary[v]["steady_img_s"] else float("nan")
        summary[v]["ratio_of_means"] = round(r, 3)
        # paired by round (runs next to each other see similar background load), then the median
        paired = [b["steady_img_s"] / a["steady_img_s"] for a, b in zip(results["plain"], results[v])
                  if a["steady_img_s"] and b["steady_img_s"]]
        summary[v]["paired_ratios"] = [round(x, 3) for x in paired]
        summary[v]["ratio"] = round(float(np.median(paired)), 3) if paired else float("nan")
        print(f"    {v}: per-round ratios {summary[v]['paired_ratios']}, median {summary[v]['ratio']}, "
              f"ratio of means {summary[v]['ratio_of_means']}")
    main_v = variants[1]
    summary["ratio"] = summary[main_v]["ratio"]
    for v in variants[2:]:
        print(f"  model={model} variant={v.split(':')[1]} ratio={summary[v]['ratio']:.3f}")
    print(f"  model={model} ratio={summary['ratio']:.3f}", flush=True)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny data, 2 epochs, one a,b pair per model")
    p.add_argument("--models", default="unet,resnet50", help="comma list of unet, resnet50")
    p.add_argument("--images", type=int, help="training images per epoch (default 60 U-Net / 160 ResNet50)")
    p.add_argument("--epochs", type=int, help="epochs per run; the first is excluded from steady state (default 3)")
    p.add_argument("--rounds", type=int, help="a,b rounds (default 2)")
    p.add_argument("--dataset-epochs", type=int, default=50,
                   help="epochs of rows in the data stream (a real run's iterations_over_dataset; default 50)")
    p.add_argument("--plain-nice", type=int,
                   help="niceness of the plain loop (default: Ray's worker niceness, $RAY_worker_niceness or 15, "
                        "so both paths compete alike with background load)")
    p.add_argument("--loader-workers", type=int, default=1, help="DataLoader num_workers of the plain loop (0 or 1)")
    p.add_argument("--plain-threads", type=int, help="torch threads of the plain loop (default: the planned torch_threads)")
    p.add_argument("--pipeline-threads", type=int, help="override the planned torch_threads of the Ray worker")
    p.add_argument("--variants", default="as_is", help="pipeline variants: as_is (the package), unfixed (without the read-ahead bound and step cap)")
    p.add_argument("--json", help="write all numbers to this file")
    args = p.parse_args(argv)
    args.epochs = args.epochs or (2 if args.quick else 3)
    args.rounds = args.rounds or (1 if args.quick else 2)

    print(f"machine: {_common.machine()}")
    print(f"load before: {_common.uptime()}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-overhead-"))
    t = time.time()
    _common.start_ray(num_cpus=os.cpu_count(), dashboard=True)  # as `run` does for training
    print(f"Ray started in {time.time() - t:.1f} s (not counted in either path)", flush=True)
    out = {"machine": _common.machine(), "load_before": _common.uptime(), "args": vars(args), "models": {}}
    try:
        for m in args.models.split(","):
            out["models"][m] = bench_model(m.strip(), args, tmp)
    finally:
        out["load_after"] = _common.uptime()
        print(f"\nload after: {out['load_after']}")
        shutil.rmtree(tmp, ignore_errors=True)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    for m, s in out["models"].items():
        print(f"model={m} ratio={s['ratio']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
