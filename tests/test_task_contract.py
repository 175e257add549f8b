"""The contract every registered task keeps, on tiny synthetic data (issue 3).

For each task and model: the model's outputs have the documented shapes and dtypes, the loss
falls on a small batch, and predictions are written in the documented format (TIFF of the
documented dtype per image, objects CSV for instances, ``predictions.csv`` for classification).
"""

from __future__ import annotations

import csv
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
import torch

from instantdl_ray.config.validate import Inventory
from instantdl_ray.io import read
from instantdl_ray.config.plan import Plan
from instantdl_ray.predict.pool import _write_classification, _write_pixel, _write_predictions_csv
from instantdl_ray.tasks import TASKS, get_task

pytestmark = pytest.mark.timeout(300)

# (task, model, spatial tile, classes): every registered task and model, 2D and 3D where supported
CASES = [
    ("semantic", "unet", (32, 32), 1),
    ("semantic", "unet", (32, 32), 3),
    ("semantic", "unet", (16, 32, 32), 1),
    ("instance", "unet", (32, 32), None),
    ("instance", "maskrcnn_resnet18_fpn", (64, 64), None),
    ("instance", "maskrcnn", (64, 64), None),
    ("regression", "unet", (32, 32), None),
    ("regression", "unet", (16, 32, 32), None),
    # the planner's smallest classification size (plan.MIN_CLASSIFICATION_SIZE): at 32 px a ResNet's
    # last stage sees 1x1 maps and a batch of two gives BatchNorm two values per channel
    ("classification", "resnet18", (64, 64), 3),
    ("classification", "resnet50", (64, 64), 3),
]
PREDICTION_DTYPE = {"semantic": np.uint8, "instance": np.uint16, "regression": np.float32}


def test_cases_cover_every_registered_task_and_model():
    covered = {(t, m) for t, m, _, _ in CASES}
    for name in TASKS.names():
        for model in get_task(name).models:
            assert (name, model) in covered, f"task {name} / model {model} has no contract case"


def _disc_labels(b: int, tile: tuple[int, ...], rng) -> np.ndarray:
    """(B, 1, *tile) label images with two objects each."""
    lab = np.zeros((b, 1) + tile, np.uint16)
    grid = np.indices(tile)
    for i in range(b):
        for k in (1, 2):
            c = [int(rng.integers(s // 4, 3 * s // 4)) for s in tile]
            r = max(2, min(tile[-2:]) // 6)
            d = sum((g - cc) ** 2 for g, cc in zip(grid, c)) <= r * r
            lab[i, 0][d] = k
    return lab


def _case(task_name, model, tile, classes):
    task = get_task(task_name)
    cfg = SimpleNamespace(num_classes=classes, loss_function=None, model=model)
    inv = Inventory(label_values={0, 1, 2}, class_names={})
    fields = task.plan_fields(cfg, inv)
    extra = fields.pop("extra", {})
    in_ch = 2 if task_name == "regression" else 1
    plan = Plan(task=task_name, spatial_dims=len(tile), axes="ZYX"[-len(tile):], target_axes="ZYX"[-len(tile):],
                in_channels=in_ch, tile_shape=list(tile), image_size=list(tile) if not task.pixelwise else None,
                model=model, dropout=task.default_dropout, extra=extra, **fields)
    if task_name == "regression":
        plan.target_mean, plan.target_std = [100.0], [20.0]
    rng = np.random.default_rng(0)
    b = 2
    lab = _disc_labels(b, tile, rng)
    image = (lab > 0).astype(np.float32) + rng.normal(0, 0.1, lab.shape).astype(np.float32)
    image = np.repeat(image, in_ch, axis=1)
    batch = {"image": torch.from_numpy(image)}
    if task_name == "classification":
        batch["label"] = torch.tensor([0, 2])
    else:
        raw = (100 + 20 * image[:, :1]) if task_name == "regression" else lab.astype(np.float32)
        batch["target"] = torch.from_numpy(np.stack([task.prepare_target(t, plan) for t in raw]))
    return task, plan, batch


def _tiered(case):
    """A full Mask R-CNN step takes about a minute and a half on 2 CPUs: it belongs to the
    integration tier; the ResNet-50 FPN variant (the same task code, a heavier backbone) to the
    slow suite, the default suite's time goes to the ResNet-18 FPN one."""
    if case[1] == "maskrcnn":
        return pytest.param(*case, marks=[pytest.mark.integration, pytest.mark.slow])
    return pytest.param(*case, marks=pytest.mark.integration) if case[1].startswith("maskrcnn") else case


@pytest.mark.parametrize("task_name,model,tile,classes", [_tiered(c) for c in CASES],
                         ids=lambda v: str(v).replace(" ", ""))
def test_task_contract(task_name, model, tile, classes, tmp_path):
    torch.manual_seed(0)
    torch.set_num_threads(2)
    task, plan, batch = _case(task_name, model, tile, classes)
    net = task.build_model(plan)
    loss_fn = task.make_loss(plan)

    def loss_now():
        torch.manual_seed(1)  # same dropout masks / proposal sampling for both measurements
        net.train()
        return float(task.loss(net, batch, loss_fn).detach())

    # -- the loss falls on a small batch
    before = loss_now()
    # a small step for the big pretrained-style backbones: with a batch of two, 1e-3 overshoots
    opt = torch.optim.Adam(net.parameters(), lr=1e-3 if model == "unet" else 1e-4)
    for _ in range(8):
        net.train()
        opt.zero_grad()
        loss = task.loss(net, batch, loss_fn)
        loss.backward()
        opt.step()
    after = loss_now()
    assert np.isfinite(before) and after < before, f"loss did not fall: {before:.4f} -> {after:.4f}"

    # -- outputs: averageable arrays with the batch first and the tile's spatial shape
    x = batch["image"]
    outs = task.predict_batch(net, x, passes=2)
    for k, v in outs.items():
        assert isinstance(v, np.ndarray) and v.shape[0] == x.shape[0], k
        if task.pixelwise and v.ndim > 2:
            assert v.shape[2:] == tuple(tile), (k, v.shape)
    if task_name == "semantic":
        assert outs["prob"].shape[1] == plan.out_channels and outs["prob"].dtype == np.float32
        assert 0 <= outs["prob"].min() and outs["prob"].max() <= 1
        if plan.num_classes > 1:
            np.testing.assert_allclose(outs["prob"].sum(1), 1, atol=1e-5)
    if task_name == "regression":
        assert set(outs) == {"value", "std"} and (outs["std"] >= 0).all()
    if task_name == "classification":
        assert outs["prob"].shape == (2, 3)
        np.testing.assert_allclose(outs["prob"].sum(1), 1, atol=1e-5)
        assert ((0 <= outs["uncertainty"]) & (outs["uncertainty"] <= 1)).all()

    # -- predictions written in the documented format
    pred_dir, unc_dir = tmp_path / "predictions", tmp_path / "uncertainty"
    pred_dir.mkdir()
    unc_dir.mkdir()
    sample = read.Sample(name="img0", image=tmp_path / "img0.tif", groundtruth=None)
    stitched = {k: v[0] for k, v in outs.items()}
    if "labels" in stitched:  # Mask R-CNN: labels merged across tiles, per-object scores
        stitched = {"labels": stitched["labels"][0], "object_scores": {}}  # the stitcher drops the channel
    out = task.finalize(stitched, plan)
    if task_name == "classification":
        rec = _write_classification(sample, out)
        _write_predictions_csv([rec], plan, pred_dir / "predictions.csv")
        with open(pred_dir / "predictions.csv") as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["filename", "prediction"] + [f"prob_{c}" for c in plan.class_names] + ["uncertainty"]
        assert rows[1][0] == "img0.tif" and int(rows[1][1]) in range(3)
        assert abs(sum(float(p) for p in rows[1][2:5]) - 1) < 1e-4
        return
    rec = _write_pixel(sample, out, plan, pred_dir, unc_dir)
    pred = tifffile.imread(rec["prediction"])
    assert pred.dtype == PREDICTION_DTYPE[task_name]
    assert pred.shape[-len(tile):] == tuple(tile)
    if task_name == "semantic":
        assert pred.max() < max(2, plan.num_classes)
    if task_name == "instance":
        with open(pred_dir / "img0_objects.csv") as f:
            header = next(csv.reader(f))
        assert header[:3] == ["id", "score", "area"] and header[3:] == ["y_min", "x_min", "y_max", "x_max"]
    if task_name in ("semantic", "regression") or model == "unet":
        u = tifffile.imread(rec["uncertainty"])
        assert u.dtype == np.float32 and u.shape[-len(tile):] == tuple(tile) and rec["mean_uncertainty"] >= 0
