"""``run(cfg)``: the table of contents of the package, one call per stage.

validate -> run directory -> plan -> Ray -> train -> predict (MC dropout) -> evaluate -> report
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from instantdl_ray.config import schema as config_mod
from instantdl_ray.config.schema import Config
from instantdl_ray.errors import ConfigError, InstantDLError, RunFailed
from instantdl_ray.config.plan import Plan, make_plan
from instantdl_ray.io import write
from instantdl_ray.io.write import atomic_path
from instantdl_ray.config.validate import Inventory, validate

RUN_STATE = "run.json"


class RunLog:
    """Prints and appends to ``<run_dir>/logs/run.log``, with time since start."""

    def __init__(self, path: Path | None = None):
        self.path = path
        self.t0 = time.time()
        self.stages: dict[str, float] = {}

    def __call__(self, msg: str) -> None:
        line = f"[{time.time() - self.t0:7.1f}s] {msg}"
        print(line, flush=True)
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a") as f:
                    f.write(line + "\n")
            except OSError as e:  # a full disk must not turn a recorded failure into a traceback
                print(f"(cannot write {self.path}: {e}; the log continues here only)", flush=True)
                self.path = None

    def stage(self, name: str, t_start: float) -> None:
        self.stages[name] = round(time.time() - t_start, 2)


def make_run_dir(cfg: Config, out: str | Path | None) -> Path:
    if out:
        run_dir = Path(out).expanduser().resolve()
    else:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path(cfg.path) / "runs" / stamp
        if not os.access(cfg.path, os.W_OK):  # read-only data (a shared drive): runs go to ./runs
            run_dir = Path.cwd() / "runs" / f"{Path(cfg.path).name}-{stamp}"
    if (run_dir / RUN_STATE).exists():
        state = json.loads((run_dir / RUN_STATE).read_text())
        raise FileExistsError(
            f"{run_dir} already holds a run (status: {state.get('status')}); choose another --out, "
            f"or continue it with: {resume_command(run_dir)}"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _set_state(run_dir: Path, **kw) -> None:
    path = run_dir / RUN_STATE
    state = json.loads(path.read_text()) if path.exists() else {}
    state.update(kw)
    text = json.dumps(state, indent=1)
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT) or not path.exists():
            raise
        # a full disk (the likely reason a run failed): the state is rewritten in place, in the
        # blocks the file already has, so the run still says "failed", not "running"
        with open(path, "r+") as f:
            f.write(text)
            f.truncate()


def resume_command(run_dir: Path) -> str:
    return f"python -m instantdl_ray run --resume {run_dir}"


def _now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


def read_state(run_dir: Path) -> dict:
    path = Path(run_dir) / RUN_STATE
    return json.loads(path.read_text()) if path.exists() else {}


# the signals that interrupted the current run: Ray's driver turns the KeyboardInterrupt the
# handler raises inside ray.get into SystemExit(1), which no longer says which signal it was
_SIGNALS_RECEIVED: list[str] = []


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (a cluster scheduler's preemption, ``kill``) ends a run like Ctrl-C: recorded as
    interrupted, resumable. Only in the main thread, where Python can install handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _SIGNALS_RECEIVED.clear()

    def handler(signum, frame):
        _SIGNALS_RECEIVED.append(signal.Signals(signum).name)
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run(cfg: Config, out: str | Path | None = None, address: str | None = None, resume: str | Path | None = None,
        num_cpus: int | None = None, force: bool = False) -> Path:
    """Run every stage for ``cfg``; returns the run directory.

    Any failure after validation is recorded in ``run.json`` (``status`` ``failed``, or
    ``interrupted`` for Ctrl-C / SIGTERM, with the stage, the error, the time and the command that
    resumes) and in ``logs/run.log`` (with the traceback). ``resume`` of a complete run does
    nothing unless ``force`` (prediction and evaluation again); each resume is appended to the
    state's ``history``.
    """
    t = time.time()
    inv = validate(cfg)  # every data problem reported before anything is written or started
    from instantdl_ray import _ray

    if problems := _ray.local_gpu_problems(cfg.ray, address):
        raise ConfigError(problems)
    if resume:
        run_dir = Path(resume).resolve()
        prev = read_state(run_dir)
        if prev.get("status") == "complete" and not force:
            print(f"{run_dir} is complete (finished {prev.get('finished')}): nothing to do. "
                  f"--force predicts and evaluates it again.", flush=True)
            return run_dir
    else:
        run_dir = make_run_dir(cfg, out)
        prev = {}
    log = RunLog(run_dir / "logs" / "run.log")
    log.stage("validate", t)
    log(f"{cfg.use_algorithm} on {cfg.path}: {len(inv.samples.get('train', []))} train / "
        f"{len(inv.samples.get('test', []))} test images, axes {inv.axes}")
    for w in inv.warnings:
        log(f"warning: {w}")
    if inv.empty_masks:
        log(f"{len(inv.empty_masks)} training mask(s) hold background only, e.g. {inv.empty_masks[0]}")
    history = prev.get("history", [])
    if prev:
        history = history + [{k: prev.get(k) for k in ("status", "stage", "error", "ended") if prev.get(k)} | {"resumed": _now()}]
    _set_state(run_dir, status="running", started=prev.get("started", _now()), history=history,
               stage=None, error=None, ended=None, resume_command=None)
    config_mod.dump(cfg, run_dir / "config.yaml")
    progress = {"stage": "plan"}
    local_ray = _ray.is_local(cfg.ray, address)
    with _sigterm_as_interrupt():
        try:
            _stages(cfg, inv, run_dir, log, address, resume, num_cpus, progress, force, local_ray)
        except BaseException as e:
            _record_failure(run_dir, log, progress["stage"], e)
            if isinstance(e, (KeyboardInterrupt, SystemExit)) and local_ray:
                import ray  # the local Ray this run started: its workers go with it

                ray.shutdown()
            if isinstance(e, (InstantDLError, KeyboardInterrupt)) or not isinstance(e, Exception):
                raise
            raise RunFailed([f"{progress['stage']}: {type(e).__name__}: {str(e).splitlines()[0][:500] if str(e) else ''}",
                             f"details (traceback) in {log.path}",
                             f"after fixing the cause, continue with: {resume_command(run_dir)}"]) from e
        finally:
            if not local_ray:
                _ray.release_demand()  # a grown cluster's autoscaler may remove the idle nodes again
    return run_dir


def _record_failure(run_dir: Path, log: RunLog, stage: str, e: BaseException) -> None:
    import traceback

    # Ray's driver turns a Ctrl-C that lands inside ray.get into SystemExit(1): an interrupt too
    interrupted = isinstance(e, (KeyboardInterrupt, SystemExit))
    msg = str(e) or type(e).__name__
    if interrupted:  # Ray's SystemExit(1) says "1": say what happened instead
        if _SIGNALS_RECEIVED:
            msg = f"interrupted (signal {_SIGNALS_RECEIVED[-1]})"
        else:
            msg = f"interrupted ({e})" if isinstance(e, KeyboardInterrupt) and str(e) else "interrupted (Ctrl-C)"
    elif not isinstance(e, InstantDLError):
        msg = f"{type(e).__name__}: {msg}"
    resume_cmd = resume_command(run_dir)
    _set_state(run_dir, status="interrupted" if interrupted else "failed", stage=stage, error=msg.splitlines()[0][:2000],
               ended=_now(), resume_command=resume_cmd)
    if log.path is not None:  # the whole story goes to the log, not to the console
        try:
            with open(log.path, "a") as f:
                f.write("".join(traceback.format_exception(type(e), e, e.__traceback__)))
        except OSError:
            pass  # the disk is full: run.json and the console say what happened
    log(f"{'interrupted' if interrupted else 'failed'} during {stage}: {msg.splitlines()[0][:500]}")
    log(f"details in {log.path}; continue with: {resume_cmd}")


def _stages(cfg: Config, inv: Inventory, run_dir: Path, log: RunLog, address, resume, num_cpus, progress: dict,
            force: bool = False, local_ray: bool = True) -> None:
    t = time.time()
    plan = _plan(cfg, inv, run_dir, resume)
    log.stage("plan", t)
    log(f"plan: model {plan.model}, {plan.in_channels} input channel(s), tile {plan.tile_shape}, "
        f"loss {plan.loss}, {len(plan.train_names)} train / {len(plan.val_names)} validation images")

    from instantdl_ray.config import diskspace

    test = inv.samples.get("test", [])
    # checkpoints and predictions fit, or the run stops now with the numbers, not hours later
    diskspace.check(diskspace.run_needs(cfg, plan, test, inv.image_shapes, run_dir, cfg.iterations_over_dataset > 0))
    if cfg.pretrained_weights and cfg.iterations_over_dataset > 0 and not resume:
        check_pretrained(cfg, plan)  # a file of another model: said now, not by a worker after Ray started
    elif cfg.iterations_over_dataset == 0:  # predict only: the weights are loaded here, without Ray
        progress["stage"] = "load_weights"
        model_path = _predict_only_model(cfg, plan, run_dir, log)

    t = time.time()
    progress["stage"] = "ray_start"
    from instantdl_ray import _ray

    dashboard = cfg.ray.dashboard if cfg.ray.dashboard is not None else cfg.iterations_over_dataset > 0
    _ray.init(address or cfg.ray.address, num_cpus=num_cpus, dashboard=dashboard)
    # a joined cluster too small for the run is asked to grow (Ray's autoscaler) and waited for;
    # run() withdraws the request at the end
    resources = _ray.plan_on_cluster(cfg.ray, log, local=local_ray)
    log.stage("ray_start", t)
    log(f"Ray: {resources.cluster_cpus:g} CPU(s), {resources.cluster_gpus:g} GPU(s)")

    if cfg.iterations_over_dataset > 0:
        t = time.time()
        progress["stage"] = "train"
        model_path = _train(cfg, plan, inv, run_dir, resources, bool(resume), log)
        log.stage("train", t)
    decide(cfg, plan, run_dir, log)

    t = time.time()
    progress["stage"] = "predict"
    from instantdl_ray.predict.inputs import run_test_slides
    from instantdl_ray.predict.pool import finish_records, predict

    masks = run_test_slides(test, inv.image_shapes, plan, cfg.tissue_mask, run_dir, log)  # whole slides: tissue only
    # a resumed run keeps the images an interrupted prediction finished; --force predicts all again
    records = predict(cfg, plan, test, inv.image_shapes, model_path, run_dir, resources, log=log,
                      reuse=bool(resume) and not force, masks=masks)
    finish_records(run_dir / "predictions", records)
    log.stage("predict", t)
    log(f"predictions: {run_dir / 'predictions'}")

    if cfg.evaluation:
        t = time.time()
        progress["stage"] = "evaluate"
        summary = evaluate_run(run_dir, cfg, plan, records, log)
        log.stage("evaluate", t)
        if summary:
            log("results: " + ", ".join(f"{k} {v:.4f}" for k, v in summary.items() if isinstance(v, (int, float))))
    _set_state(run_dir, status="complete", finished=_dt.datetime.now().isoformat(timespec="seconds"),
               stage_seconds=log.stages)
    log(f"done. Results in {run_dir}")
    return run_dir


def _plan(cfg: Config, inv: Inventory, run_dir: Path, resume) -> Plan:
    path = run_dir / "plan.json"
    if resume and path.exists():
        plan = Plan.from_json(path)
        # test images may have been added; their normalisation comes from this data set
        fresh = make_plan(cfg, inv)
        plan.image_norm.update({k: v for k, v in fresh.image_norm.items() if k not in plan.image_norm})
        return plan
    plan = make_plan(cfg, inv)
    w = cfg.pretrained_weights
    if cfg.iterations_over_dataset == 0 and isinstance(w, str) and (Path(w) / "plan.json").exists():
        # predict-only from a trained run: its target scaling and split apply
        old = Plan.from_json(Path(w) / "plan.json")
        plan.target_mean, plan.target_std = old.target_mean, old.target_std
        for key in ("decision", "min_overlap", "object_extent"):  # post-processing and stitching of that run
            if key in old.extra:
                plan.extra[key] = old.extra[key]
    plan.to_json(path)
    return plan


def check_pretrained(cfg: Config, plan: Plan) -> None:
    """``pretrained_weights`` loaded into the model the plan builds, on the driver, before Ray
    starts: a file of another model (no tensor fits) raises ``WeightsError`` now."""
    from instantdl_ray.tasks import get_task
    from instantdl_ray.models.weights import load_pretrained

    load_pretrained(get_task(plan.task).build_model(plan), cfg.pretrained_weights, model_name=plan.model,
                    log=lambda msg: None, trust=cfg.trust_pretrained_weights)


def _train(cfg, plan, inv, run_dir: Path, resources, resume: bool, log: Callable) -> Path:
    from instantdl_ray.data.augment import AugmentParams
    from instantdl_ray.train.loop import fit

    params = AugmentParams.from_dict(cfg.data_gen_args.model_dump())
    if params.save_augmented_images and not resume:
        paths = save_augmented(cfg, plan, inv, params, run_dir / "augmented")
        log(f"augmented examples: {len(paths)} in {run_dir / 'augmented'}")
    return fit(cfg, plan, inv, run_dir, resources, params, resume=resume, log=log)


def _predict_only_model(cfg, plan, run_dir: Path, log: Callable) -> Path:
    """InstantDL's ``iterations_over_dataset: 0`` with pretrained weights: the weights become the
    run's best model."""
    from instantdl_ray.tasks import get_task
    from instantdl_ray.models.weights import load_pretrained

    model = get_task(plan.task).build_model(plan)
    info = load_pretrained(model, cfg.pretrained_weights, model_name=plan.model, log=log,
                           trust=cfg.trust_pretrained_weights)
    log(f"predict only: {len(info['loaded'])} tensors loaded from {cfg.pretrained_weights}")
    best = run_dir / "checkpoints" / "best" / "model.pt"
    best.parent.mkdir(parents=True, exist_ok=True)
    write.write_torch(model.state_dict(), best)
    return best


def save_augmented(cfg: Config, plan: Plan, inv: Inventory, params, out_dir: Path, n: int = 8) -> list[Path]:
    """InstantDL's ``save_augmented_images``: PNGs of the first ``n`` training tiles of epoch 1,
    read and augmented exactly as the training stream does (``ReadTiles`` + ``augment_batch``, same
    seeds), image | target side by side."""
    from instantdl_ray.data.augment import augment_batch, save_examples
    from instantdl_ray.data.dataset import ReadTiles, training_rows
    from instantdl_ray.tasks import get_task

    by_name = {str(s.image): s for s in inv.samples["train"]}
    rows = training_rows([by_name[x] for x in plan.train_names], inv.image_shapes, plan, cfg.seed, range(1),
                         cfg.tiles_per_image)[:n]
    batch = {k: np.asarray([r[k] for r in rows]) for k in ("image", "target", "origin", "seed")}
    if "label" in rows[0]:
        batch["label"] = np.asarray([r["label"] for r in rows])
    kind = get_task(plan.task).target_kind or "none"
    out = augment_batch(ReadTiles(plan)(batch), params, kind)
    targets = out.get("target", out.get("label"))
    return save_examples(out["image"], list(targets) if targets is not None else None, out_dir, n=n)


THRESHOLDS = "thresholds.json"


def decide(cfg: Config, plan: Plan, run_dir: Path, log: Callable) -> dict:
    """The task's post-processing decision (``Task.decision``: e.g. the binary threshold that was
    best on the validation split at the kept epoch), put in ``plan.extra["decision"]`` and written
    to ``thresholds.json`` and ``plan.json``, so ``predict`` of this run uses the same rule."""
    from instantdl_ray.tasks import get_task

    hist_path = run_dir / "logs" / "history.json"
    history = json.loads(hist_path.read_text()) if hist_path.exists() and cfg.iterations_over_dataset > 0 else []
    decision = get_task(plan.task).decision(cfg, plan, history)
    if not decision:
        return {}
    plan.extra["decision"] = decision
    write.write_json(run_dir / THRESHOLDS, decision, indent=1)
    plan.to_json(run_dir / "plan.json")
    log("decision: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in decision.items()))
    return decision


def slide_groundtruth(run_dir: Path, plan: Plan, record: dict, log: Callable) -> Any:
    """The groundtruth of a test record as evaluation reads it: GeoJSON annotations rasterised onto
    the image's pixels, or a slide's label stored at a downsample read upsampled, written block by
    block as ``evaluation/groundtruth/<name>.zarr`` (napari and Fiji open it beside the prediction);
    any other groundtruth as it is."""
    from instantdl_ray.data.dataset import slide_label

    gt = record["groundtruth"]
    if isinstance(gt, (list, tuple)):
        return gt
    labels = slide_label(gt, record["image"], plan)
    if labels is None:
        return gt
    out = run_dir / "evaluation" / "groundtruth" / f"{record['name']}.zarr"
    write.write_zarr(out, labels)
    log(f"{Path(gt).name}: groundtruth on the image's pixels in {out.relative_to(run_dir)} for evaluation")
    return str(out)


def evaluate_run(run_dir: Path, cfg: Config, plan: Plan, records: list[dict], log: Callable) -> dict:
    """Evaluate predictions against test groundtruth, when the test split has it."""
    from instantdl_ray.evaluation.evaluate import evaluate
    from instantdl_ray.tasks import get_task

    items = [r for r in records if r.get("groundtruth") is not None]
    if not items:
        log("evaluation skipped: the test split has no groundtruth")
        return {}
    task = get_task(plan.task)
    items = [{**r, "groundtruth": slide_groundtruth(run_dir, plan, r, log)} if task.pixelwise else r for r in items]
    if not task.pixelwise:
        items = [{"name": r["name"], "groundtruth": r["groundtruth"]} for r in items]
    else:
        aug = plan.extra.get("augment", {})
        thresholds = plan.extra.get("target_threshold", {})
        items = [{"name": r["name"], "prediction": r["prediction"], "image": r["image"],
                  "groundtruth": r["groundtruth"], "uncertainty": r.get("uncertainty"),
                  "target_clean": {"threshold": thresholds.get(str(r["image"])) if aug.get("threshold_background_groundtruth") else None,
                                   "binarize": bool(aug.get("binarize_mask"))}} for r in items]
    names = None if task.pixelwise else dict(enumerate(plan.class_names))
    results = evaluate(run_dir, task, items, num_classes=task.evaluation_classes(plan), class_names=names)
    log(f"evaluation: {run_dir / 'evaluation'}")
    return results.get("summary", {})


def predict_new(run_dir: str | Path, inputs: str | Path, out: str | Path | None = None,
                overrides: list[str] | None = None, address: str | None = None) -> Path:
    """Predict new images or slides (a folder, one file, a zarr, or a manifest CSV) with a trained
    run; returns the output folder."""
    from instantdl_ray import _ray
    from instantdl_ray.errors import DataError
    from instantdl_ray.config.validate import tissue_mask_problems
    from instantdl_ray.io import read, slide
    from instantdl_ray.predict.inputs import gather, prepare, write_table
    from instantdl_ray.predict.pool import done_records, finish_records, predict

    run_dir = Path(run_dir).resolve()
    cfg = config_mod.load(run_dir / "config.yaml", overrides or [])
    plan = Plan.from_json(run_dir / "plan.json")
    from instantdl_ray.tasks import get_task

    decision = get_task(plan.task).decision(cfg, plan, [])  # the run's own, unless --set overrides it
    if decision:
        plan.extra["decision"] = decision
    model_path = run_dir / "checkpoints" / "best" / "model.pt"
    problems = []
    if not model_path.exists():
        problems.append(f"{model_path}: missing; {run_dir} holds no trained model (did its training finish?)")
    early: list[str] = []  # printed now, written to predict.log once the inputs are known to be good

    def log(msg: str) -> None:
        early.append(msg)
        print(msg, flush=True)

    found, more = gather(Path(inputs), log=log)
    problems += more + tissue_mask_problems(cfg.tissue_mask)
    # the same command writes to the same folder, so running it again finishes what is missing
    out_dir = Path(out) if out else run_dir / "predict" / read._stem(Path(inputs).resolve())
    if problems:
        raise DataError(problems)
    # what an earlier prediction into out_dir finished is kept, if the model and settings are the same
    fingerprint = {"model": [model_path.stat().st_size, model_path.stat().st_mtime_ns],
                   "settings": sorted(overrides or []), "run": str(run_dir)}
    stamp = out_dir / "predict.json"
    same = not stamp.exists() or json.loads(stamp.read_text()) == fingerprint
    done = done_records(out_dir / "predictions", {i.name: i.path for i in found}) if same else {}
    if not same:
        log(f"{out_dir}: the model or the settings changed since its last prediction: predicting everything again")
    todo = [i for i in found if i.name not in done]
    if done:
        log(f"{len(done)} of {len(found)} inputs were predicted into {out_dir} before: kept")
    samples, shapes, masks, problems = prepare(todo, plan, cfg.tissue_mask, out_dir, log=log)
    if gpu := _ray.local_gpu_problems(cfg.ray, address):
        raise ConfigError(gpu)
    if problems and (len(found) == 1 or not samples and not done):
        raise DataError(problems)  # nothing to predict: a problem with the input, said before any work
    from instantdl_ray.config import diskspace

    diskspace.check(diskspace.run_needs(cfg, plan, samples, shapes, out_dir, train=False))
    out_dir.mkdir(parents=True, exist_ok=True)
    write.write_json(stamp, fingerprint)
    log = RunLog(out_dir / "predict.log")
    with open(out_dir / "predict.log", "a") as f:
        f.write("".join(m + "\n" for m in early))
    # a table for slides: a manifest, or a slide prepared now, done before (its OME-Zarr) or failed;
    # only the failed ones are opened again to tell
    collection = (Path(inputs).suffix.lower() == ".csv" or bool(plan.extra.get("slides"))
                  or any("ome_zarr" in r for r in done.values()) or any(i.error and slide.is_pyramid(i.path) for i in found))
    table = out_dir / "slides.csv"
    finished = dict(done)

    def on_record(rec: dict) -> None:
        for k, v in next((i.info for i in found if i.name == rec["name"]), {}).items():
            rec.setdefault(k, v)  # level, pixel size, tissue: kept in the record for a later re-run's table
        finished[rec["name"]] = rec
        if collection:
            write_table(table, found, finished)

    if collection:
        write_table(table, found, finished)
    for inp in found:
        if inp.error:
            log(f"{inp.name}: FAILED, {inp.error}")
    if samples:
        _ray.init(address or cfg.ray.address, dashboard=bool(cfg.ray.dashboard))  # prediction: no Ray Train
        resources = _ray.plan_now(cfg.ray)
        records = predict(cfg, plan, samples, shapes, model_path, out_dir, resources, log=log, masks=masks,
                          reuse=True, on_record=on_record)
        for rec in records:  # classification: one record per image, none streamed through on_record
            finished.setdefault(rec["name"], rec)
    finish_records(out_dir / "predictions", sorted(finished.values(), key=lambda r: r["name"]))
    failed = [i for i in found if i.error]
    if collection:
        log(f"{len(finished)} of {len(found)} done, {len(failed)} failed: {table}")
    if failed:
        raise RunFailed([i.error for i in failed],  # each names its file
                        title=f"{len(failed)} of {len(found)} inputs failed (the others are in {out_dir}; "
                              "fix these and run the same command again to predict only them)")
    log(f"done. Predictions in {out_dir}")
    return out_dir
