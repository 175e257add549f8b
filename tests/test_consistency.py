"""Training, validation, prediction and evaluation see the same image and target (issue 12).

* Normalisation statistics belong to the image, not to the tile: a linear model's tiled,
  stitched prediction equals its prediction of the whole image, with each normalisation option.
* Raw-target clean-up (``threshold_background_groundtruth``, ``binarize_mask``) runs on the raw
  target with whole-image statistics, before the task's scaling, in training, validation and
  evaluation alike.
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from instantdl_ray.io import read
from instantdl_ray.data.augment import AugmentParams, augment_batch
from instantdl_ray.data.dataset import ReadTiles, grid_rows
from instantdl_ray.config.plan import Plan, image_percentiles, target_thresholds
from instantdl_ray.predict.stitch import ImageAccumulator
from instantdl_ray.data.tile import tile_grid

SHAPE = (150, 203)  # not a multiple of the tile: edge tiles are padded
TILE = [64, 64]

NORM_OPTIONS = {
    "percentiles": {},
    "std_normalization": {"std_normalization": True},
    "feature_scaling": {"feature_scaling": True},
    "both": {"std_normalization": True, "feature_scaling": True},
}


def _image(tmp_path, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    img = 200 + 30 * np.sin(yy / 9.0) + 0.4 * xx + rng.normal(0, 5, SHAPE)  # a gradient: tiles differ
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, img.astype(np.float32))
    return path


def _plan(path, augment, tile=TILE, task="regression", target=None):
    plan = Plan(task=task, spatial_dims=2, axes="YX", target_axes="YX", in_channels=1, out_channels=1,
                num_classes=1, class_names=[], tile_shape=list(tile), image_size=None, model="unet", loss="mse",
                dropout=0.0, target_mean=[0.0], target_std=[1.0], extra={"augment": augment})
    plan.image_norm = {str(path): image_percentiles(path, "YX", augment)}
    if target is not None and augment.get("threshold_background_groundtruth"):
        plan.extra["target_threshold"] = {str(path): target_thresholds(target, "YX")}
    return plan


def _linear(x):
    return 2.5 * x - 0.75  # any affine per-pixel model: equal inputs give equal outputs


@pytest.mark.parametrize("option", list(NORM_OPTIONS))
def test_tiled_prediction_of_a_linear_model_equals_the_whole_image_prediction(tmp_path, option):
    path = _image(tmp_path)
    augment = NORM_OPTIONS[option]
    plan = _plan(path, augment)
    sample = read.Sample("img", path, None)
    rows = grid_rows([sample], {str(path): SHAPE}, plan, 0.25)
    assert len(rows) > 4
    reader = ReadTiles(plan, with_target=False)
    batch = {k: np.asarray([r[k] for r in rows]) for k in ("image", "origin", "image_index", "tile_index")}
    tiles = reader(batch)["image"]
    tiles_grid = tile_grid(SHAPE, tuple(TILE), tuple(int(t * 0.25) for t in TILE))
    acc = ImageAccumulator(SHAPE, tiles_grid, tuple(TILE))
    for j, t in enumerate(tiles):
        acc.add(int(batch["tile_index"][j]), {"value": _linear(t)})
    tiled = acc.result()["value"][0]

    # the whole image as one tile, read by the same reader
    whole_plan = _plan(path, augment, tile=SHAPE)
    whole = ReadTiles(whole_plan, with_target=False).read_image(str(path), [0, 0])
    np.testing.assert_allclose(tiled, _linear(whole[0]), rtol=1e-5, atol=1e-4)
    raw = tifffile.imread(path).astype(np.float64)
    if option in ("std_normalization", "both"):  # a z-score of the whole image
        assert abs(whole.mean()) < 1e-3 and abs(whole.std() - 1) < 1e-3
    elif option == "feature_scaling":
        assert abs(whole.min()) < 1e-5 and abs(whole.max() - 1) < 1e-5
    else:
        lo, hi = np.percentile(raw, [1.0, 99.8])
        np.testing.assert_allclose(whole[0], (raw - lo) / (hi - lo), rtol=1e-4, atol=1e-4)


def _regression_target(tmp_path):
    """A DAPI-like target: a large background offset (~14k) plus sparse signal."""
    rng = np.random.default_rng(3)
    t = 14000 + rng.normal(0, 50, SHAPE)
    t[40:80, 50:120] += 3000
    path = tmp_path / "target.tif"
    tifffile.imwrite(path, t.astype(np.uint16))
    return path, t.astype(np.uint16).astype(np.float64)


def test_groundtruth_threshold_acts_on_the_raw_target_before_scaling_in_training_and_validation(tmp_path):
    img = _image(tmp_path)
    tpath, raw = _regression_target(tmp_path)
    augment = {"threshold_background_groundtruth": True, "horizontal_flip": False, "vertical_flip": False}
    plan = _plan(img, augment, target=tpath)
    plan.target_mean, plan.target_std = [14500.0], [900.0]
    thr = 0.8 * raw.mean()
    expected_raw = np.where(raw < thr, 0, raw)
    assert (expected_raw > 0).mean() > 0.99  # InstantDL's 0.8 x mean keeps the offset background
    reader = ReadTiles(plan)
    origin = [60, 100]  # a tile whose own mean differs from the image's
    batch = {"image": np.asarray([str(img)]), "target": np.asarray([str(tpath)]), "origin": np.asarray([origin]),
             "seed": np.asarray([1])}
    window = expected_raw[60:124, 100:164]
    expected = (window - 14500.0) / 900.0
    val = reader(batch)  # validation: the reader alone
    np.testing.assert_allclose(val["target"][0, 0], expected, rtol=1e-5, atol=1e-5)
    train = augment_batch(reader(batch), AugmentParams.from_dict(augment), "continuous")  # training
    np.testing.assert_allclose(train["target"][0, 0], expected, rtol=1e-5, atol=1e-5)


def test_evaluation_scores_against_the_cleaned_groundtruth(tmp_path):
    from instantdl_ray.evaluation.evaluate import clean_spec, open_pair

    tpath, raw = _regression_target(tmp_path)
    pred = tmp_path / "pred.tif"
    tifffile.imwrite(pred, raw.astype(np.float32))
    thr = [float(0.8 * raw.mean()) + 2000]  # a threshold that clears the background
    pair = open_pair(pred, tpath, clean_spec({"threshold": thr, "binarize": False}))
    gt = np.asarray(pair.gt.compute(), np.float64)
    np.testing.assert_array_equal(gt, np.where(raw < thr[0], 0, raw))
    np.testing.assert_array_equal(pair.gt_window.read((slice(0, 10), slice(0, 10))), gt[:10, :10])
    binary = open_pair(pred, tpath, clean_spec({"threshold": None, "binarize": True}))
    assert set(np.unique(np.asarray(binary.gt.compute()))) == {1}
