"""One decision rule from validation to test, and uncertainty maps stitched right (issue 12 items 4, 6)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from instantdl_ray.config.plan import Plan
from instantdl_ray.predict.stitch import ImageAccumulator
from instantdl_ray.tasks import get_task
from instantdl_ray.tasks.semantic import THRESHOLDS, binary_entropy_np, categorical_entropy_np, mc_outputs
from instantdl_ray.data.tile import tile_grid


def _plan(num_classes=1, tile=(32, 32), **extra):
    return Plan(task="semantic", spatial_dims=2, axes="YX", target_axes="YX", in_channels=1, out_channels=num_classes,
                num_classes=num_classes, class_names=[], tile_shape=list(tile), image_size=None, model="unet",
                loss="dice_crossentropy", dropout=0.2, extra=dict(extra))


def _under_confident(rng, shape=(2, 1, 48, 48)):
    """Ground truth discs and a model whose foreground probabilities sit at 0.3-0.45: the 0.5 rule
    misses every object, a lower threshold finds them all."""
    gt = np.zeros(shape, np.float32)
    gt[:, :, 10:30, 12:36] = 1
    prob = np.where(gt > 0, rng.uniform(0.3, 0.45, shape), rng.uniform(0.0, 0.2, shape)).astype(np.float32)
    return gt, prob


def _jaccard(pred, gt):
    return float(((pred > 0) & (gt > 0)).sum() / ((pred > 0) | (gt > 0)).sum())


def test_validation_rule_is_the_test_rule():
    """The threshold that gives the validation Jaccard of the kept epoch is the one test predictions use,
    and the Jaccard of the final masks equals that validation Jaccard."""
    task = get_task("semantic")
    rng = np.random.default_rng(0)
    gt, prob = _under_confident(rng)
    logits = torch.logit(torch.from_numpy(prob))
    batch = {"image": torch.zeros_like(logits), "target": torch.from_numpy(gt)}
    sums = task.val_sums(lambda x: logits, batch, lambda out, y: torch.tensor(0.0))
    summary = task.val_summary(sums)
    assert summary["val_jaccard_at_05"] == 0.0
    assert summary["val_jaccard"] == pytest.approx(1.0) and summary["val_threshold"] in THRESHOLDS
    assert 0.2 <= summary["val_threshold"] <= 0.3

    history = [{"epoch": 0, "best_epoch": 0, **task.val_summary({**sums, **{f"inter_{i}": 0.0 for i in range(17)}})},
               {"epoch": 1, "best_epoch": 1, **summary},
               {"epoch": 2, "best_epoch": 1, **{**summary, "val_threshold": 0.8}}]  # not the kept epoch
    cfg = SimpleNamespace(threshold="calibrated")
    plan = _plan()
    decision = task.decision(cfg, plan, history)
    assert decision["threshold"] == summary["val_threshold"] and decision["epoch"] == 2
    plan.extra["decision"] = decision
    masks = [task.finalize({"prob": prob[i]}, plan)["prediction"] for i in range(len(prob))]
    assert _jaccard(np.stack(masks), gt[:, 0]) == pytest.approx(summary["val_jaccard"])
    # the InstantDL rule and fixed values stay available
    assert task.decision(SimpleNamespace(threshold="otsu"), plan, history)["threshold"] == "otsu"
    assert task.decision(SimpleNamespace(threshold=0.35), plan, history)["threshold"] == 0.35
    otsu_plan = _plan(decision={"threshold": "otsu"})
    assert 0.25 <= task.finalize({"prob": prob[0]}, otsu_plan)["threshold"] <= 0.75
    # nothing calibrated (no validation split): 0.5, said so
    assert task.decision(cfg, _plan(), [{"epoch": 0, "best_epoch": 0, "val_loss": 1.0}])["threshold"] == 0.5
    assert task.decision(cfg, _plan(num_classes=3), history) == {}  # argmax: nothing to decide


def test_predict_keeps_the_runs_decision_unless_overridden():
    task = get_task("semantic")
    plan = _plan(decision={"threshold": 0.3, "rule": "calibrated on the validation split"})
    assert task.decision(SimpleNamespace(threshold="calibrated"), plan, [])["threshold"] == 0.3
    assert task.decision(SimpleNamespace(threshold="otsu"), plan, [])["threshold"] == "otsu"


@pytest.mark.parametrize("classes", [1, 3])
def test_stitched_entropy_is_the_entropy_of_the_stitched_probabilities(classes):
    """Two overlapping tiles that disagree: the blended map's entropy is H(mean p), not the mean of the
    tiles' entropies; mutual information is H(mean p) - mean H(p) >= 0 and is written too."""
    task = get_task("semantic")
    rng = np.random.default_rng(1)
    shape, tile = (32, 56), (32, 32)
    tiles = tile_grid(shape, tile, (0, 8))
    assert len(tiles) == 2
    acc = ImageAccumulator(shape, tiles, tile)
    outs = []
    for t_idx, p_fg in enumerate((0.9, 0.1)):  # confident, opposite predictions
        logits = torch.full((5, 1, classes) + tile, 0.0)
        if classes == 1:
            logits += float(np.log(p_fg / (1 - p_fg)))
        else:
            logits[:, :, 1] += 3.0 if p_fg > 0.5 else -3.0
        logits += torch.from_numpy(rng.normal(0, 0.3, logits.shape).astype(np.float32))  # MC passes differ
        out = mc_outputs(logits, passes=5)
        outs.append(out)
        acc.add(t_idx, {k: v[0] for k, v in out.items()})
    stitched = acc.result()
    final = task.finalize(stitched, _plan(num_classes=classes, tile=tile))
    prob = stitched["prob"]
    want = binary_entropy_np(prob[0]) if classes == 1 else categorical_entropy_np(prob, 0)[0]
    np.testing.assert_allclose(final["uncertainty"], want, rtol=1e-5, atol=1e-6)
    mid = slice(26, 30)  # blended region: both tiles are confident, the blend is not
    per_tile_ent = [binary_entropy_np(o["prob"][0, 0]) if classes == 1 else categorical_entropy_np(o["prob"][0], 0)[0]
                    for o in outs]
    assert final["uncertainty"][:, mid].mean() > max(e[:, :4].mean() for e in per_tile_ent) + 0.05
    mi = final["mutual_information"]
    assert mi.shape == shape and (mi >= 0).all()
    np.testing.assert_allclose(mi, np.maximum(want - stitched["expected_entropy"][0], 0), rtol=1e-5, atol=1e-6)
    assert mi[:, mid].mean() > mi[:, :4].mean()  # disagreement between passes/tiles is epistemic


def test_instance_unet_uncertainty_from_stitched_probabilities():
    task = get_task("instance")
    rng = np.random.default_rng(2)
    logits = torch.from_numpy(rng.normal(0, 1, (4, 1, 3, 16, 16)).astype(np.float32))
    out = {k: v[0] for k, v in mc_outputs(logits, passes=4).items()}
    final = task.finalize(out, SimpleNamespace())
    np.testing.assert_allclose(final["uncertainty"], categorical_entropy_np(out["prob"], 0)[0], rtol=1e-5)
    assert (final["mutual_information"] >= 0).all()
