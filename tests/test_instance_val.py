"""Mask R-CNN validation must not change the model (issue 12, item 1).

``Instance.val_sums`` runs the model in train mode to get torchvision's losses; with random
weights the backbone has trainable BatchNorm, whose running statistics would otherwise be updated
by every validation batch (and the model kept as best would carry them).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from instantdl_ray.config.plan import Plan
from instantdl_ray.tasks import get_task
from instantdl_ray.train.loop import val_sums

# a Mask R-CNN built and run forward/backward on CPU several times: about a minute on 2 cores
pytestmark = pytest.mark.integration


def _plan() -> Plan:
    return Plan(task="instance", spatial_dims=2, axes="YX", target_axes="YX", in_channels=1, out_channels=2,
                num_classes=1, class_names=["background", "object"], tile_shape=[64, 64], image_size=None,
                model="maskrcnn_resnet18_fpn", loss="maskrcnn", dropout=0.0)


def _batch(n: int = 2, size: int = 64) -> dict:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    target = np.zeros((n, 1, size, size), np.float32)
    for b in range(n):
        for k, (cy, cx) in enumerate(rng.integers(12, size - 12, (3, 2)), start=1):
            target[b, 0][(yy - cy) ** 2 + (xx - cx) ** 2 <= 36] = k
    image = (target > 0).astype(np.float32) * 0.8 + rng.uniform(0, 0.2, target.shape).astype(np.float32)
    return {"image": torch.from_numpy(image), "target": torch.from_numpy(target)}


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _bn_modules(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


@pytest.fixture(scope="module")
def model_and_task():
    torch.manual_seed(0)
    task = get_task("instance")
    model = task.build_model(_plan())
    assert _bn_modules(model), "the ResNet-18-FPN backbone is built with trainable BatchNorm"
    return model, task


def test_maskrcnn_val_sums_leaves_every_parameter_and_buffer_unchanged(model_and_task):
    model, task = model_and_task
    batch = _batch()
    before = _state(model)
    model.eval()  # as train.val_sums does
    with torch.no_grad():
        sums = task.val_sums(model, batch, None)
    assert np.isfinite(sums["loss_sum"]) and sums["n"] == 2
    after = model.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    assert changed == [], f"validation changed {len(changed)} tensors, e.g. {changed[:3]}"
    # the caller's mode is restored: train.val_sums set eval, so every module is still in eval
    assert not any(m.training for m in model.modules())


def test_train_val_sums_helper_keeps_model_unchanged(model_and_task):
    model, task = model_and_task
    before = _state(model)
    val_sums(model, iter([_batch(1), _batch(2)]), task, None, lambda b: b)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_val_sums_restores_train_mode_when_called_in_train_mode(model_and_task):
    model, task = model_and_task
    model.train()
    with torch.no_grad():
        task.val_sums(model, _batch(1), None)
    assert all(m.training for m in model.modules())
    model.eval()


def test_maskrcnn_training_loss_still_updates_batchnorm(model_and_task):
    model, task = model_and_task
    bn = _bn_modules(model)[0]
    mean, count = bn.running_mean.clone(), int(bn.num_batches_tracked)
    loss = task.loss(model, _batch(), None)
    assert torch.isfinite(loss)
    assert int(bn.num_batches_tracked) == count + 1
    assert not torch.equal(bn.running_mean, mean)
    assert all(m.training for m in _bn_modules(model))
    model.eval()
