"""Metrics against hand-computed values and reference implementations (sklearn, scipy, skimage,
and a direct per-object loop for the instance metrics)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy import stats
from skimage.metrics import structural_similarity
from sklearn import metrics as skm

from instantdl_ray.evaluation import metrics as M

# ---------------------------------------------------------------- semantic


def test_segmentation_hand_computed():
    pred = np.array([[1, 1, 0], [0, 1, 0]])
    gt = np.array([[1, 0, 0], [0, 1, 1]])
    # tp = 2, fp = 1, fn = 1, tn = 2
    m = M.segmentation_image_metrics(pred, gt, num_classes=1)
    assert m["jaccard"] == pytest.approx(2 / 4)
    assert m["dice"] == pytest.approx(4 / 6)
    assert m["accuracy"] == pytest.approx(4 / 6)


def test_binary_groundtruth_0_255_is_binarised():
    pred = np.array([[1, 0], [1, 1]], dtype=np.uint8)
    gt = np.array([[255, 0], [0, 255]], dtype=np.uint8)
    m = M.segmentation_image_metrics(pred, gt, num_classes=1)
    assert m["jaccard"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="outside"):
        M.segmentation_image_metrics(pred, gt, num_classes=2)


def test_segmentation_binary_matches_sklearn():
    rng = np.random.default_rng(1)
    gt = rng.random((37, 41)) > 0.6
    pred = gt ^ (rng.random(gt.shape) > 0.8)
    m = M.segmentation_image_metrics(pred, gt, 1)
    assert m["jaccard"] == pytest.approx(skm.jaccard_score(gt.ravel(), pred.ravel()))
    assert m["dice"] == pytest.approx(skm.f1_score(gt.ravel(), pred.ravel()))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(gt.ravel(), pred.ravel()))


def test_segmentation_multiclass_matches_sklearn():
    rng = np.random.default_rng(2)
    gt = rng.integers(0, 4, (30, 20))
    pred = np.where(rng.random(gt.shape) > 0.3, gt, rng.integers(0, 4, gt.shape))
    m = M.segmentation_image_metrics(pred, gt, 4)
    per_class = skm.jaccard_score(gt.ravel(), pred.ravel(), average=None, labels=range(4))
    f1 = skm.f1_score(gt.ravel(), pred.ravel(), average=None, labels=range(4))
    for c in range(4):
        assert m[f"jaccard_{c}"] == pytest.approx(per_class[c])
        assert m[f"dice_{c}"] == pytest.approx(f1[c])
    assert m["jaccard"] == pytest.approx(per_class.mean())
    assert m["dice"] == pytest.approx(f1.mean())
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(gt.ravel(), pred.ravel()))
    np.testing.assert_array_equal(
        M.confusion_matrix(pred, gt, 4), skm.confusion_matrix(gt.ravel(), pred.ravel(), labels=range(4))
    )


def test_segmentation_absent_class_is_nan_and_skipped_in_mean():
    gt = np.array([0, 0, 1, 1])
    pred = np.array([0, 1, 1, 1])
    m = M.segmentation_image_metrics(pred, gt, 3)
    assert math.isnan(m["jaccard_2"])
    assert m["jaccard"] == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_segmentation_empty_foreground_is_nan():
    z = np.zeros((4, 4), dtype=np.uint8)
    m = M.segmentation_image_metrics(z, z, 1)
    assert math.isnan(m["jaccard"]) and m["accuracy"] == 1.0


def test_segmentation_state_sum_of_chunks_equals_whole():
    rng = np.random.default_rng(3)
    gt = rng.integers(0, 3, (64, 48))
    pred = rng.integers(0, 3, (64, 48))
    whole = M.SegmentationState.from_arrays(pred, gt, 3)
    parts = [
        M.SegmentationState.from_arrays(pred[y : y + 16, x : x + 24], gt[y : y + 16, x : x + 24], 3)
        for y in range(0, 64, 16)
        for x in range(0, 48, 24)
    ]
    total = sum(parts)
    np.testing.assert_array_equal(total.confusion, whole.confusion)
    assert total.finalize() == whole.finalize()
    assert (M.SegmentationState.zero(3) + whole).finalize() == whole.finalize()
    assert sum([whole]) is whole


# ---------------------------------------------------------------- regression


def test_regression_hand_computed():
    m = M.regression_image_metrics(np.array([[1.0, 2.0, 3.0]] * 7), np.array([[1.0, 2.0, 5.0]] * 7))
    assert m["mae"] == pytest.approx(2 / 3)
    assert m["mse"] == pytest.approx(4 / 3)
    assert m["mean_relative_error"] == pytest.approx((2 / 5) / 3)
    assert m["pearson"] == pytest.approx(stats.pearsonr([1, 2, 3], [1, 2, 5])[0])


def test_regression_matches_scipy_sklearn_skimage():
    rng = np.random.default_rng(4)
    gt = rng.random((40, 33)) * 100
    gt[0, :5] = 0  # relative error skips zeros
    pred = gt + rng.normal(0, 10, gt.shape)
    m = M.regression_image_metrics(pred, gt)
    assert m["pearson"] == pytest.approx(stats.pearsonr(pred.ravel(), gt.ravel())[0], rel=1e-10)
    assert m["mae"] == pytest.approx(skm.mean_absolute_error(gt.ravel(), pred.ravel()))
    assert m["mse"] == pytest.approx(skm.mean_squared_error(gt.ravel(), pred.ravel()))
    nz = gt != 0
    assert m["mean_relative_error"] == pytest.approx(np.mean(np.abs(pred - gt)[nz] / np.abs(gt[nz])))
    ref = structural_similarity(pred, gt, data_range=gt.max() - gt.min())
    assert m["ssim"] == pytest.approx(ref, rel=1e-12)


def test_ssim_3d_is_mean_of_planes():
    rng = np.random.default_rng(5)
    gt = rng.random((3, 20, 25))
    pred = gt + rng.normal(0, 0.1, gt.shape)
    r = gt.max() - gt.min()
    ref = np.mean([structural_similarity(pred[z], gt[z], data_range=r) for z in range(3)])
    assert M.ssim(pred, gt) == pytest.approx(ref, rel=1e-12)
    assert math.isnan(M.ssim(pred, np.ones_like(gt)))  # no data range


def test_regression_state_sum_of_chunks_equals_whole():
    rng = np.random.default_rng(6)
    gt = rng.random((50, 30)) * 1000 + 14000  # background offset as in isl_dapi
    pred = gt + rng.normal(0, 30, gt.shape)
    whole = M.RegressionState.from_arrays(pred, gt)
    total = sum(M.RegressionState.from_arrays(pred[i : i + 7], gt[i : i + 7]) for i in range(0, 50, 7))
    for k, v in whole.finalize().items():
        assert total.finalize()[k] == pytest.approx(v, rel=1e-9)
    assert total.data_range == pytest.approx(gt.max() - gt.min())
    assert total.finalize()["pearson"] == pytest.approx(stats.pearsonr(pred.ravel(), gt.ravel())[0], rel=1e-8)
    assert math.isnan(M.RegressionState().finalize()["pearson"])


# ---------------------------------------------------------------- instance


def _reference_instance(pred: np.ndarray, gt: np.ndarray) -> dict:
    """Direct per-object version: explicit masks and loops, no joint histogram."""
    g_ids = [i for i in np.unique(gt) if i]
    p_ids = [i for i in np.unique(pred) if i]
    iou = np.zeros((len(g_ids), len(p_ids)))
    inter = np.zeros_like(iou)
    for a, gi in enumerate(g_ids):
        gm = gt == gi
        for b, pi in enumerate(p_ids):
            pm = pred == pi
            inter[a, b] = np.logical_and(gm, pm).sum()
            iou[a, b] = inter[a, b] / np.logical_or(gm, pm).sum()
    out = {}
    aps = []
    for t in M.IOU_THRESHOLDS:
        # greedy one-to-one matching, best IoU first
        pairs = sorted(((iou[a, b], a, b) for a in range(len(g_ids)) for b in range(len(p_ids))), reverse=True)
        used_g, used_p, tp = set(), set(), 0
        for v, a, b in pairs:
            if v > t and a not in used_g and b not in used_p:
                used_g.add(a)
                used_p.add(b)
                tp += 1
        fp, fn = len(p_ids) - tp, len(g_ids) - tp
        ap = tp / (tp + fp + fn) if tp + fp + fn else math.nan
        out[f"ap_{round(t * 100)}"] = ap
        aps.append(ap)
        if t == 0.5:
            out["f1_50"] = 2 * tp / (2 * tp + fp + fn)
            out["precision_50"] = tp / (tp + fp) if tp + fp else math.nan
            out["recall_50"] = tp / (tp + fn) if tp + fn else math.nan
            matched = [(a, b) for v, a, b in pairs if v > 0.5]
            out["pq"] = sum(iou[a, b] for a, b in matched) / (tp + 0.5 * fp + 0.5 * fn)
    out["ap_mean"] = float(np.mean(aps))
    # AJI, Kumar et al. 2017
    c = u = 0.0
    used = set()
    for a, gi in enumerate(g_ids):
        gm = gt == gi
        if len(p_ids) and iou[a].max() > 0:
            b = int(np.argmax(iou[a]))
            pm = pred == p_ids[b]
            c += np.logical_and(gm, pm).sum()
            u += np.logical_or(gm, pm).sum()
            used.add(b)
        else:
            u += gm.sum()
    for b, pi in enumerate(p_ids):
        if b not in used:
            u += (pred == pi).sum()
    out["aji"] = c / u
    out["pixel_jaccard"] = np.logical_and(pred > 0, gt > 0).sum() / np.logical_or(pred > 0, gt > 0).sum()
    return out


def _random_labels(rng, shape=(48, 56), n=9, offset=0):
    lab = np.zeros(shape, dtype=np.int64)
    for i in range(1, n + 1):
        y, x = rng.integers(0, shape[0] - 8), rng.integers(0, shape[1] - 8)
        h, w = rng.integers(3, 12, 2)
        lab[y : y + h, x : x + w] = i + offset  # later objects overwrite, like touching nuclei
    return lab


def test_instance_hand_computed():
    gt = np.zeros((20, 20), np.uint16)
    gt[2:8, 2:8] = 1  # 36 px
    gt[10:18, 10:18] = 5  # 64 px
    pred = np.zeros_like(gt)
    pred[2:8, 3:9] = 3  # IoU 30/42 = 0.714
    pred[12:18, 10:18] = 7  # IoU 48/64 = 0.75
    pred[0:2, 15:20] = 9  # false positive
    m = M.instance_image_metrics(pred, gt)
    # matched at 0.5..0.70 (both), none at 0.75 (IoU must exceed t)
    for t in (50, 55, 60, 65, 70):
        assert m[f"ap_{t}"] == pytest.approx(2 / 3)
    for t in (75, 80, 85, 90, 95):
        assert m[f"ap_{t}"] == 0.0
    assert m["ap_mean"] == pytest.approx(1 / 3)
    assert m["f1_50"] == pytest.approx(0.8)
    assert m["precision_50"] == pytest.approx(2 / 3)
    assert m["recall_50"] == 1.0
    assert m["aji"] == pytest.approx((30 + 48) / (42 + 64 + 10))
    assert m["pq"] == pytest.approx((30 / 42 + 0.75) / (2 + 0.5))
    assert m["pixel_jaccard"] == pytest.approx(78 / 116)
    assert (m["n_gt"], m["n_pred"]) == (2, 3)


@pytest.mark.parametrize("seed", range(6))
def test_instance_matches_direct_loops(seed):
    rng = np.random.default_rng(seed)
    gt = _random_labels(rng, offset=100 * seed)
    pred = gt.copy()
    # perturb: shift some objects, drop one, add one
    pred = np.roll(pred, rng.integers(-2, 3), axis=int(rng.integers(0, 2)))
    pred[pred == pred.max()] = 0
    pred[0:4, 0:5] = 999
    ref = _reference_instance(pred, gt)
    m = M.instance_image_metrics(pred, gt)
    for k, v in ref.items():
        assert m[k] == pytest.approx(v, nan_ok=True), k


def test_instance_iou_large_ids_and_3d():
    rng = np.random.default_rng(7)
    gt = np.stack([_random_labels(rng, (20, 24), 4) for _ in range(3)])
    pred = np.where(gt > 0, gt + 2**30, 0)  # ids beyond the lookup-table path
    m = M.instance_image_metrics(pred, gt)
    assert m["ap_mean"] == 1.0 and m["aji"] == 1.0 and m["pq"] == 1.0
    ov = M.instance_iou(pred, gt)
    assert ov["iou"].shape == (len(np.unique(gt)) - 1, len(np.unique(pred)) - 1)


def test_instance_empty_cases():
    z = np.zeros((8, 8), np.uint16)
    one = z.copy()
    one[2:5, 2:5] = 1
    assert math.isnan(M.instance_image_metrics(z, z)["ap_mean"])
    m = M.instance_image_metrics(z, one)
    assert m["ap_mean"] == 0.0 and m["recall_50"] == 0.0 and m["aji"] == 0.0
    assert math.isnan(m["precision_50"])


def test_instance_state_pools_counts():
    rng = np.random.default_rng(8)
    pairs = []
    for _ in range(4):
        gt = _random_labels(rng)
        pairs.append((np.roll(gt, 1, axis=0), gt))
    states = [M.InstanceState.from_arrays(p, g) for p, g in pairs]
    total = sum(states)
    assert total.n_gt == sum(s.n_gt for s in states)
    np.testing.assert_array_equal(total.tp, np.sum([s.tp for s in states], axis=0))
    f = total.finalize()
    tp, fp, fn = total.tp[0], total.n_pred - total.tp[0], total.n_gt - total.tp[0]
    assert f["ap_50"] == pytest.approx(tp / (tp + fp + fn))
    assert f["aji"] == pytest.approx(sum(s.aji_inter for s in states) / sum(s.aji_union for s in states))


# ---------------------------------------------------------------- classification


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_classification_matches_sklearn_multiclass():
    rng = np.random.default_rng(9)
    y = rng.integers(0, 4, 80)
    prob = _softmax(rng.normal(size=(80, 4)) + 2 * np.eye(4)[y])
    m = M.classification_metrics(y, prob, {0: "a", 1: "b", 2: "c", 3: "d"})
    pred = prob.argmax(1)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["roc_auc_macro"] == pytest.approx(skm.roc_auc_score(y, prob, multi_class="ovr", average="macro"))
    assert m["roc_auc_weighted"] == pytest.approx(skm.roc_auc_score(y, prob, multi_class="ovr", average="weighted"))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=range(4)).tolist()
    onehot = np.eye(4)[y]
    assert m["prob_mae"] == pytest.approx(skm.mean_absolute_error(onehot, prob))
    assert m["prob_mse"] == pytest.approx(skm.mean_squared_error(onehot, prob))
    assert list(m["roc_auc_per_class"]) == ["a", "b", "c", "d"]
    assert "roc_auc_note" not in m


def test_classification_binary_uses_prob_1():
    y = np.array([0, 0, 1, 1, 1])
    prob = np.array([[0.9, 0.1], [0.4, 0.6], [0.35, 0.65], [0.2, 0.8], [0.7, 0.3]])
    m = M.classification_metrics(y, prob)
    # positives 0.65, 0.8, 0.3 vs negatives 0.1, 0.6: 5 of 6 pairs ordered right
    assert m["roc_auc_macro"] == pytest.approx(5 / 6) == skm.roc_auc_score(y, prob[:, 1])
    assert m["roc_auc_weighted"] == m["roc_auc_macro"]
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["confusion_matrix"] == [[1, 1], [1, 2]]


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_classification_absent_class():
    rng = np.random.default_rng(10)
    y = rng.integers(0, 2, 40)  # class 2 never occurs
    prob = _softmax(rng.normal(size=(40, 3)))
    m = M.classification_metrics(y, prob, ["x", "y", "z"])
    per = [skm.roc_auc_score(y == c, prob[:, c]) for c in (0, 1)]
    assert m["roc_auc_macro"] == pytest.approx(np.mean(per))
    w = np.bincount(y)
    assert m["roc_auc_weighted"] == pytest.approx((per[0] * w[0] + per[1] * w[1]) / w.sum())
    assert "z" in m["roc_auc_note"]
    assert math.isnan(m["roc_auc_per_class"]["z"])
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, prob.argmax(1)))


def test_roc_curve_matches_sklearn():
    rng = np.random.default_rng(11)
    y = rng.integers(0, 2, 60).astype(bool)
    s = np.round(rng.random(60), 1)  # ties
    fpr, tpr = M.roc_curve(y, s)
    rf, rt, _ = skm.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, rf)
    np.testing.assert_allclose(tpr, rt)
    assert M.roc_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s))


# ---------------------------------------------------------------- statistics and uncertainty


def test_bootstrap_deterministic_and_sane():
    v = np.arange(20, dtype=float)
    a = M.bootstrap(v, n_draws=50, seed=3)
    assert a == M.bootstrap(v, n_draws=50, seed=3)
    assert a != M.bootstrap(v, n_draws=50, seed=4)
    assert a["p25"] <= a["median"] <= a["p75"]
    assert abs(a["median"] - v.mean()) < 2
    assert M.bootstrap(np.full(10, 0.7)) == {"median": pytest.approx(0.7), "p25": pytest.approx(0.7), "p75": pytest.approx(0.7)}
    # each draw is the mean of half the set: with two values, each draw is one of them
    b = M.bootstrap(np.array([0.0, 1.0, np.nan]), n_draws=200)
    assert b["p25"] == 0.0 and b["p75"] == 1.0
    assert math.isnan(M.bootstrap(np.array([]))["median"])


def test_uncertainty_error_correlation_is_spearman():
    rng = np.random.default_rng(12)
    u = rng.random(30)
    e = u**3 + rng.normal(0, 0.05, 30)
    assert M.uncertainty_error_correlation(u, e) == pytest.approx(stats.spearmanr(u, e)[0])
    assert M.uncertainty_error_correlation([1, 2, 3], [3, 9, 27]) == pytest.approx(1.0)
    assert math.isnan(M.uncertainty_error_correlation([1.0], [2.0]))


def test_expected_calibration_error_hand_computed():
    y = np.array([0, 1, 1, 0])
    prob = np.array([[0.95, 0.05], [0.3, 0.7], [0.8, 0.2], [0.55, 0.45]])
    # confidences .95 (right), .7 (right), .8 (wrong), .55 (right); one sample per bin
    expected = (abs(1 - 0.95) + abs(1 - 0.7) + abs(0 - 0.8) + abs(1 - 0.55)) / 4
    assert M.expected_calibration_error(y, prob, n_bins=10) == pytest.approx(expected)
    # two samples sharing a bin average before the difference is taken
    y2 = np.array([0, 1])
    p2 = np.array([[0.62, 0.38], [0.68, 0.32]])
    assert M.expected_calibration_error(y2, p2) == pytest.approx(abs(0.5 - 0.65))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_panoptic_quality_agrees_with_monai(seed):
    """Our summable instance state gives the panoptic quality MONAI computes (monai.metrics)."""
    import torch
    from monai.metrics import compute_panoptic_quality
    from skimage.measure import label

    rng = np.random.default_rng(seed)
    gt = label(ndi.gaussian_filter(rng.random((96, 96)), 3) > 0.52).astype(np.int32)
    pred = label(ndi.gaussian_filter(rng.random((96, 96)) * 0.3 + (gt > 0), 2) > 0.6).astype(np.int32)
    assert gt.max() > 3 and pred.max() > 3
    ours = M.instance_image_metrics(pred, gt)
    theirs = {name: float(compute_panoptic_quality(torch.from_numpy(pred), torch.from_numpy(gt), metric_name=name,
                                                   smooth_numerator=0.0))
              for name in ("pq", "sq", "rq")}
    for name in ("pq", "sq", "rq"):
        assert ours[name] == pytest.approx(theirs[name], abs=1e-6), name


def test_classification_with_a_nan_probability_is_scored_not_crashed():
    """A diverged model's NaN probabilities: AUC and ROC curve undefined (nan / empty), the rest scored."""
    y = np.array([0, 1, 1, 1])
    prob = np.array([[0.9, 0.1], [0.2, 0.8], [np.nan, np.nan], [0.3, 0.7]])  # the NaN row counts as class 0
    m = M.classification_metrics(y, prob)
    assert math.isnan(m["roc_auc_macro"])
    assert m["accuracy"] == pytest.approx(0.75)
    fpr, tpr = M.roc_curve(y == 1, prob[:, 1])
    assert fpr.size == 0 and tpr.size == 0
