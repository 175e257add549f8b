"""evaluate(): tiny run folders per task; results must equal the metrics computed directly."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr
from PIL import Image

from instantdl_ray.evaluation import evaluate as E
from instantdl_ray.evaluation import metrics as M
from instantdl_ray.io import write
from instantdl_ray.errors import ConfigError, DataError


def _zarr(path: Path, a: np.ndarray, chunks) -> Path:
    z = zarr.create_array(str(path), shape=a.shape, chunks=chunks, dtype=a.dtype)
    z[...] = a
    return path


def _check_outputs(run: Path, results: dict, n: int) -> None:
    ev = run / "evaluation"
    on_disk = json.loads((ev / "results.json").read_text())
    assert on_disk["task"] == results["task"] and on_disk["n_images"] == n
    for key in ("task", "n_images", "headline", "summary", "per_image_mean", "bootstrap", "files"):
        assert key in on_disk
    assert set(on_disk["headline"]) == {"metric", "value", "aggregation"}
    assert len(pd.read_csv(ev / "per_image.csv")) == n
    for f in results["files"]["figures"]:
        assert (ev / f).is_file()
    html = (ev / "report.html").read_text()
    refs = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", html)
    assert refs
    for ref in refs:
        assert (ev / unquote(ref)).is_file(), ref
    for f in results["files"]["figures"]:
        assert f in [unquote(r) for r in refs]


def _close(a: dict, b: dict, keys=None) -> None:
    for k in keys or b:
        assert a[k] == pytest.approx(b[k], rel=1e-9, abs=1e-12, nan_ok=True), k


# ---------------------------------------------------------------- semantic


@pytest.fixture
def semantic_run(tmp_path):
    rng = np.random.default_rng(0)
    run = tmp_path / "run"
    (run / "predictions").mkdir(parents=True)
    data = tmp_path / "test"
    for d in ("image", "groundtruth"):
        (data / d).mkdir(parents=True)
    items, arrays = [], []
    for i, shape in enumerate([(40, 50), (33, 47), (40, 50)]):
        gt = (rng.random(shape) > 0.55).astype(np.uint8) * 255
        pred = ((gt > 0) ^ (rng.random(shape) > 0.85)).astype(np.uint8)
        unc = rng.random(shape).astype(np.float32) * (i + 1)
        tifffile.imwrite(data / "image" / f"im{i}.tif", rng.random(shape).astype(np.float32))
        if i == 1:
            Image.fromarray(gt).save(data / "groundtruth" / f"im{i}.png")
            gpath = data / "groundtruth" / f"im{i}.png"
            ppath = _zarr(run / "predictions" / f"im{i}.zarr", pred, (16, 16))
        else:
            gpath = data / "groundtruth" / f"im{i}.tif"
            tifffile.imwrite(gpath, gt)
            ppath = run / "predictions" / f"im{i}.tif"
            tifffile.imwrite(ppath, pred[None] if i == 2 else pred)  # singleton channel is squeezed
        upath = run / "predictions" / f"im{i}_unc.tif"
        tifffile.imwrite(upath, unc)
        items.append({"name": f"im{i}", "prediction": ppath, "groundtruth": gpath, "image": data / "image" / f"im{i}.tif", "uncertainty": upath})
        arrays.append((pred, gt, unc))
    return run, items, arrays


def test_semantic_binary(semantic_run):
    run, items, arrays = semantic_run
    res = E.evaluate(run, "semantic", items, bootstrap_draws=20)
    _check_outputs(run, res, 3)

    states = [M.SegmentationState.from_arrays(p, g, 1) for p, g, _ in arrays]
    _close(res["summary"], sum(states).finalize())
    assert res["headline"]["metric"] == "jaccard"
    assert res["headline"]["value"] == pytest.approx(sum(states).finalize()["jaccard"])
    per = pd.read_csv(run / "evaluation" / "per_image.csv")
    assert list(per["name"]) == ["im0", "im1", "im2"]
    for row, (p, g, u) in zip(per.to_dict("records"), arrays):
        _close(row, M.segmentation_image_metrics(p, g, 1))
        assert row["uncertainty"] == pytest.approx(float(u.mean()), rel=1e-6)
    assert set(res["bootstrap"]) == {"jaccard", "dice", "accuracy"}
    assert res["bootstrap"]["jaccard"] == pytest.approx(M.bootstrap(per["jaccard"].to_numpy(), n_draws=20))
    unc = res["uncertainty"]
    err = 1 - per["jaccard"].to_numpy()
    assert unc["spearman_uncertainty_vs_error"] == pytest.approx(M.uncertainty_error_correlation(per["uncertainty"], err))
    figs = res["files"]["figures"]
    assert sum(f.startswith("figures/image_") for f in figs) == 3
    assert "figures/per_image_metrics.png" in figs and "figures/uncertainty_vs_error.png" in figs
    stack = tifffile.imread(run / "evaluation" / "predictions_stack.tif")
    assert stack.shape == (3, 40, 50)
    np.testing.assert_array_equal(stack[1, :33, :47], arrays[1][0])
    assert not stack[1, 33:].any()


def test_semantic_multiclass_and_synchronous(tmp_path):
    rng = np.random.default_rng(1)
    items, arrays = [], []
    for i in range(2):
        gt = rng.integers(0, 3, (24, 30)).astype(np.uint8)
        pred = np.where(rng.random(gt.shape) > 0.3, gt, rng.integers(0, 3, gt.shape)).astype(np.uint8)
        tifffile.imwrite(tmp_path / f"g{i}.tif", gt)
        tifffile.imwrite(tmp_path / f"p{i}.tif", pred)
        items.append({"name": f"x{i}", "prediction": tmp_path / f"p{i}.tif", "groundtruth": tmp_path / f"g{i}.tif", "image": None, "uncertainty": None})
        arrays.append((pred, gt))
    res = E.evaluate(tmp_path / "run", "SemanticSegmentation", items, num_classes=3, scheduler="synchronous")
    _check_outputs(tmp_path / "run", res, 2)
    _close(res["summary"], sum(M.SegmentationState.from_arrays(p, g, 3) for p, g in arrays).finalize())
    assert "jaccard_2" in res["summary"] and "uncertainty" not in res


def test_semantic_label_out_of_range_names_files(tmp_path):
    tifffile.imwrite(tmp_path / "g.tif", np.full((8, 8), 255, np.uint8))
    tifffile.imwrite(tmp_path / "p.tif", np.zeros((8, 8), np.uint8))
    items = [{"name": "a", "prediction": tmp_path / "p.tif", "groundtruth": tmp_path / "g.tif"}]
    with pytest.raises(DataError, match=r"g\.tif.*num_classes"):
        E.evaluate(tmp_path / "run", "semantic", items, num_classes=3)


# ---------------------------------------------------------------- instance


def _labels(rng, shape, n):
    lab = np.zeros(shape, np.uint16)
    for i in range(1, n + 1):
        y, x = rng.integers(0, shape[0] - 8), rng.integers(0, shape[1] - 8)
        lab[y : y + rng.integers(4, 10), x : x + rng.integers(4, 10)] = i
    return lab


def test_instance_label_tiff_and_mask_folder(tmp_path):
    rng = np.random.default_rng(2)
    run = tmp_path / "run"
    (run / "predictions").mkdir(parents=True)
    items, arrays = [], []
    for i in range(2):
        gt = _labels(rng, (48, 40), 7)
        pred = np.roll(gt, 1 + i, axis=1)
        pred[pred == 3] = 0
        ppath = run / "predictions" / f"n{i}.tif"
        tifffile.imwrite(ppath, pred)
        img = tmp_path / f"n{i}" / "image" / f"n{i}.png"
        img.parent.mkdir(parents=True)
        Image.fromarray((rng.random((48, 40, 3)) * 255).astype(np.uint8)).save(img)
        if i == 0:
            gpath = tmp_path / "gt0.tif"
            tifffile.imwrite(gpath, gt)
        else:  # InstantDL instance layout: one binary PNG per object
            (tmp_path / "n1" / "mask").mkdir()
            gpath = []
            for j, v in enumerate(v for v in np.unique(gt) if v):
                p = tmp_path / "n1" / "mask" / f"m{j:02d}.png"
                Image.fromarray(((gt == v) * 255).astype(np.uint8)).save(p)
                gpath.append(p)
        items.append({"name": f"n{i}", "prediction": ppath, "groundtruth": gpath, "image": img, "uncertainty": None})
        arrays.append((pred, gt))
    res = E.evaluate(run, "instance", items, bootstrap_draws=10)
    _check_outputs(run, res, 2)
    per = pd.read_csv(run / "evaluation" / "per_image.csv")
    for row, (p, g) in zip(per.to_dict("records"), arrays):
        _close(row, M.instance_image_metrics(p, g))
    pooled = sum(M.InstanceState.from_arrays(p, g) for p, g in arrays).finalize()
    _close(res["summary"], pooled)
    assert res["headline"]["value"] == pytest.approx(per["ap_mean"].mean())  # DSB2018: mean over images
    assert "n_gt" not in res["bootstrap"] and "ap_mean" in res["bootstrap"]


def test_instance_shape_mismatch_names_both_files(tmp_path):
    tifffile.imwrite(tmp_path / "p.tif", np.zeros((10, 12), np.uint16))
    tifffile.imwrite(tmp_path / "g.tif", np.zeros((10, 11), np.uint16))
    items = [{"name": "a", "prediction": tmp_path / "p.tif", "groundtruth": tmp_path / "g.tif"}]
    with pytest.raises(DataError, match=r"p\.tif.*g\.tif"):
        E.evaluate(tmp_path / "run", "instance", items)


# ---------------------------------------------------------------- regression


def test_regression_3d_and_channel_last_groundtruth(tmp_path):
    rng = np.random.default_rng(3)
    gt3 = (rng.random((5, 30, 36)) * 1000 + 200).astype(np.uint16)
    pred3 = (gt3 + rng.normal(0, 40, gt3.shape)).astype(np.float32)
    tifffile.imwrite(tmp_path / "g3.tif", gt3)
    tifffile.imwrite(tmp_path / "p3.tif", pred3[None])  # (1, Z, Y, X)
    gt2 = rng.random((30, 36, 2)).astype(np.float32)  # channel-last groundtruth
    pred2 = np.moveaxis(gt2, -1, 0) + rng.normal(0, 0.1, (2, 30, 36)).astype(np.float32)
    tifffile.imwrite(tmp_path / "g2.tif", gt2)
    tifffile.imwrite(tmp_path / "p2.tif", pred2)
    tifffile.imwrite(tmp_path / "u3.tif", rng.random((5, 30, 36)).astype(np.float32))
    items = [
        {"name": "vol", "prediction": tmp_path / "p3.tif", "groundtruth": tmp_path / "g3.tif", "image": tmp_path / "g3.tif", "uncertainty": tmp_path / "u3.tif"},
        {"name": "two", "prediction": tmp_path / "p2.tif", "groundtruth": tmp_path / "g2.tif", "image": None, "uncertainty": None},
    ]
    res = E.evaluate(tmp_path / "run", "regression", items, bootstrap_draws=10)
    _check_outputs(tmp_path / "run", res, 2)
    pairs = [(pred3, gt3), (pred2, np.moveaxis(gt2, -1, 0))]
    per = pd.read_csv(tmp_path / "run" / "evaluation" / "per_image.csv")
    for row, (p, g) in zip(per.to_dict("records"), pairs):
        _close(row, M.regression_image_metrics(p, g))
    pooled = sum(M.RegressionState.from_arrays(p, g) for p, g in pairs).finalize()
    _close(res["summary"], pooled)
    assert res["summary"]["ssim"] == pytest.approx(per["ssim"].mean())
    assert res["headline"]["metric"] == "pearson"
    assert math.isnan(per["uncertainty"][1]) and res["uncertainty"]["n_images"] == 1
    # the volume's figure has an x-z view row; both predictions in one padded stack
    stack = tifffile.imread(tmp_path / "run" / "evaluation" / "predictions_stack.tif")
    assert stack.shape == (2, 5, 30, 36)
    np.testing.assert_array_equal(stack[1, :2], pred2)


def test_regression_blockwise_ssim_equals_whole_image(tmp_path, monkeypatch):
    monkeypatch.setattr(E, "CHUNK_EDGE", 32)
    monkeypatch.setattr(E, "BLOCK_ELEMENTS", 32 * 32)
    rng = np.random.default_rng(4)
    gt = rng.random((100, 130)).astype(np.float32) * 50
    pred = gt + rng.normal(0, 5, gt.shape).astype(np.float32)
    _zarr(tmp_path / "p.zarr", pred, (16, 16))
    tifffile.imwrite(tmp_path / "g.tif", gt)
    pair = E.open_pair(tmp_path / "p.zarr", tmp_path / "g.tif")
    assert pair.pred.numblocks == (3, 4) and pair.gt.chunks == pair.pred.chunks  # last 4-px block merged
    items = [{"name": "a", "prediction": tmp_path / "p.zarr", "groundtruth": tmp_path / "g.tif"}]
    res = E.evaluate(tmp_path / "run", "regression", items, bootstrap_draws=5)
    direct = M.regression_image_metrics(pred, gt)
    assert res["summary"]["ssim"] == pytest.approx(direct["ssim"], rel=1e-10)
    _close(res["summary"], direct)


# ---------------------------------------------------------------- classification


def test_classification(tmp_path):
    rng = np.random.default_rng(5)
    run = tmp_path / "run"
    (run / "predictions").mkdir(parents=True)
    names = {0: "EO", 1: "LY", 2: "MO"}
    n = 30
    y = rng.integers(0, 2, n)  # class MO absent from the groundtruth
    logits = rng.normal(size=(n, 3)) + 1.5 * np.eye(3)[y]
    prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    unc = rng.random(n)
    files = [f"c{i}.png" for i in range(n)]
    for f in files[:4]:
        Image.fromarray((rng.random((28, 28, 3)) * 255).astype(np.uint8)).save(tmp_path / f)
    df = pd.DataFrame({"filename": files, "prediction": prob.argmax(1), **{f"prob_{names[c]}": prob[:, c] for c in range(3)}, "uncertainty": unc})
    df.iloc[::-1].to_csv(run / "predictions" / "predictions.csv", index=False)  # row order must not matter
    items = [{"name": f, "groundtruth": int(y[i]), "image": (tmp_path / f) if i < 4 else None} for i, f in enumerate(files)]
    res = E.evaluate(run, "classification", items, class_names=names, bootstrap_draws=10)
    _check_outputs(run, res, n)
    direct = M.classification_metrics(y, prob, names)
    for k, v in direct.items():
        if isinstance(v, float):
            assert res["summary"][k] == pytest.approx(v, nan_ok=True), k
        elif k != "roc_auc_per_class":
            assert res["summary"][k] == v, k
    assert "MO" in res["summary"]["roc_auc_note"]
    assert res["headline"] == {"metric": "accuracy", "value": pytest.approx(direct["accuracy"]), "aggregation": "pooled over the test set"}
    assert res["uncertainty"]["ece"] == pytest.approx(M.expected_calibration_error(y, prob))
    p_true = prob[np.arange(n), y]
    assert res["uncertainty"]["spearman_uncertainty_vs_error"] == pytest.approx(M.uncertainty_error_correlation(unc, 1 - p_true))
    assert set(res["bootstrap"]) == {"accuracy", "prob_mae", "prob_mse"}
    on_disk = json.loads((run / "evaluation" / "results.json").read_text())
    assert on_disk["summary"]["roc_auc_per_class"]["MO"] is None  # NaN -> null, strict JSON
    figs = res["files"]["figures"]
    for f in ("figures/roc.png", "figures/confusion_matrix.png", "figures/uncertainty_vs_error.png", "figures/examples.png"):
        assert f in figs
    assert not (run / "evaluation" / "predictions_stack.tif").exists()


def test_classification_missing_rows_listed_together(tmp_path):
    (tmp_path / "predictions").mkdir()
    pd.DataFrame({"filename": ["a.png"], "prediction": [0], "prob_0": [0.9], "prob_1": [0.1]}).to_csv(
        tmp_path / "predictions" / "predictions.csv", index=False
    )
    items = [{"name": "a.png", "groundtruth": 5}, {"name": "b.png", "groundtruth": 0}]
    with pytest.raises(DataError) as e:
        E.evaluate(tmp_path, "classification", items)
    assert len(e.value.problems) == 2


# ---------------------------------------------------------------- checks before any work


def test_bad_task_scheduler_and_missing_files(tmp_path):
    items = [{"name": "a", "prediction": tmp_path / "nope.tif", "groundtruth": tmp_path / "gone.tif", "image": tmp_path / "x.png"}]
    with pytest.raises(ConfigError, match="semantic"):
        E.evaluate(tmp_path, "semantik", items)
    with pytest.raises(ConfigError, match="threads"):
        E.evaluate(tmp_path, "semantic", items, scheduler="processes")
    with pytest.raises(DataError) as e:
        E.evaluate(tmp_path, "semantic", items)
    assert len(e.value.problems) == 3


# ---------------------------------------------------------------- large pair, blockwise


def test_large_zarr_pair_is_evaluated_blockwise(tmp_path):
    from dask.callbacks import Callback

    n = 4096
    rng = np.random.default_rng(6)
    gt = rng.random((n, n), dtype=np.float32) > 0.5
    pred = gt ^ (rng.random((n, n), dtype=np.float32) > 0.9)
    _zarr(tmp_path / "p.zarr", pred.astype(np.uint8), (1024, 1024))
    _zarr(tmp_path / "g.zarr", gt.astype(np.uint8) * 255, (1024, 1024))
    expected = M.SegmentationState.from_arrays(pred, gt, 1).finalize()
    del gt, pred

    pair = E.open_pair(tmp_path / "p.zarr", tmp_path / "g.zarr")
    assert pair.pred.numblocks == (4, 4) and pair.gt.chunks == pair.pred.chunks

    class Count(Callback):
        def __init__(self):
            super().__init__()
            self.blocks = 0

        def _pretask(self, key, dsk, state):
            name = key[0] if isinstance(key, tuple) else key
            self.blocks += str(name).startswith("_block_state")

    items = [{"name": "big", "prediction": tmp_path / "p.zarr", "groundtruth": tmp_path / "g.zarr"}]
    with Count() as c:
        res = E.evaluate(tmp_path / "run", "semantic", items, bootstrap_draws=5)
    assert c.blocks == 16  # one state per 1024^2 block, never the whole 16M-pixel image at once
    _close(res["summary"], expected)
    assert tifffile.imread(tmp_path / "run" / "evaluation" / "predictions_stack.tif").shape == (1, n, n)


def test_prediction_stack_tiled_and_padded(tmp_path, monkeypatch):
    monkeypatch.setattr(write, "STACK_TILE_FROM", 100)  # force the tiled path used for whole slides
    monkeypatch.setattr(write, "STACK_TILE", 16)
    a = np.arange(40 * 50, dtype=np.uint16).reshape(40, 50)
    b = np.arange(3 * 20 * 33, dtype=np.uint16).reshape(1, 3, 20, 33)
    tifffile.imwrite(tmp_path / "a.tif", a)
    _zarr(tmp_path / "b.zarr", b, (1, 1, 8, 8))
    E.write_prediction_stack(tmp_path / "s.tif", [tmp_path / "a.tif", tmp_path / "b.zarr"])
    with tifffile.TiffFile(tmp_path / "s.tif") as t:
        assert t.pages[0].is_tiled
        s = t.asarray()
    assert s.shape == (2, 3, 40, 50)
    np.testing.assert_array_equal(s[0, 0], a)
    assert not s[0, 1:].any()
    np.testing.assert_array_equal(s[1, :, :20, :33], b[0])
    assert not s[1, :, 20:].any() and not s[1, :, :, 33:].any()


def test_all_shape_mismatches_reported_at_once(tmp_path):
    for n, (ps, gs) in enumerate([((10, 12), (10, 11)), ((3, 8, 8), (8, 8))]):
        tifffile.imwrite(tmp_path / f"p{n}.tif", np.zeros(ps, np.float32), photometric="minisblack")
        tifffile.imwrite(tmp_path / f"g{n}.tif", np.zeros(gs, np.float32))
    tifffile.imwrite(tmp_path / "u.tif", np.zeros((9, 9), np.float32))
    items = [
        {"name": "a", "prediction": tmp_path / "p0.tif", "groundtruth": tmp_path / "g0.tif"},
        {"name": "b", "prediction": tmp_path / "p1.tif", "groundtruth": tmp_path / "g1.tif"},
        {"name": "c", "prediction": tmp_path / "g1.tif", "groundtruth": tmp_path / "g1.tif", "uncertainty": tmp_path / "u.tif"},
    ]
    with pytest.raises(DataError) as e:
        E.evaluate(tmp_path / "run", "regression", items)
    assert len(e.value.problems) == 3
    assert "p0.tif" in e.value.problems[0] and "g0.tif" in e.value.problems[0]
    assert "u.tif" in e.value.problems[2]
