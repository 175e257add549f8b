"""Loss registry: every loss is a finite scalar that training can lower; task checks."""

from __future__ import annotations

import pytest
import torch

from instantdl_ray.errors import ConfigError
from instantdl_ray.losses import ALLOWED_LOSSES, DEFAULT_LOSS, LOSSES, make_loss

torch.set_num_threads(1)


def _segmentation(k: int, gen: torch.Generator):
    """Logit parameters (2, K, 8, 8) and a target the convention expects."""
    if k == 1:
        target = (torch.rand(2, 1, 8, 8, generator=gen) > 0.6).float()
    else:
        target = torch.randint(0, k, (2, 1, 8, 8), generator=gen)
    return torch.randn(2, k, 8, 8, generator=gen), target


def _classification(k: int, gen: torch.Generator):
    if k == 1:
        return torch.randn(6, 1, generator=gen), torch.tensor([0.0, 1, 1, 0, 1, 0])
    return torch.randn(6, k, generator=gen), torch.randint(0, k, (6,), generator=gen)


def _regression(k: int, gen: torch.Generator):
    return torch.randn(2, k, 8, 8, generator=gen), torch.rand(2, k, 8, 8, generator=gen)


DATA = {"semantic": _segmentation, "classification": _classification, "regression": _regression}
CASES = [
    (task, name, k)
    for task, ks in (("semantic", (1, 3)), ("classification", (1, 2, 4)), ("regression", (1, 2)))
    for name in sorted({LOSSES.canonical(n) for n in ALLOWED_LOSSES[task]})
    for k in ks
]


@pytest.mark.parametrize("task,name,k", CASES, ids=[f"{t}-{n}-{k}" for t, n, k in CASES])
def test_loss_is_finite_scalar_and_trainable(task, name, k):
    gen = torch.Generator().manual_seed(0)
    init, target = DATA[task](k, gen)
    pred = torch.nn.Parameter(init)
    loss_fn = make_loss(name, task, k)
    first = loss_fn(pred, target)
    assert first.ndim == 0 and torch.isfinite(first)
    opt = torch.optim.Adam([pred], lr=0.1)
    for _ in range(15):
        opt.zero_grad()
        loss = loss_fn(pred, target)
        loss.backward()
        opt.step()
    assert loss_fn(pred, target).item() < first.item()


def test_segmentation_target_without_channel_axis():
    gen = torch.Generator().manual_seed(1)
    pred, target = _segmentation(3, gen)
    fn = make_loss("dice_ce", "semantic", 3)
    assert torch.allclose(fn(pred, target), fn(pred, target[:, 0]))


def test_binary_crossentropy_equals_cross_entropy_for_two_classes():
    pred = torch.tensor([[0.3, -1.0], [2.0, 0.5]])
    target = torch.tensor([1, 0])
    bce = make_loss("binary_crossentropy", "classification", 2)(pred, target)
    assert torch.allclose(bce, torch.nn.functional.cross_entropy(pred, target))


def test_maskrcnn_loss_sums_the_dict():
    fn = make_loss(None, "instance", 2)
    losses = {"a": torch.tensor(1.0), "b": torch.tensor(2.5)}
    assert fn(losses, None).item() == pytest.approx(3.5)
    # any name is accepted for instance: Mask R-CNN trains on its own losses
    assert make_loss("dice", "instance", 2)(losses, None).item() == pytest.approx(3.5)


def test_defaults_are_allowed():
    for task, name in DEFAULT_LOSS.items():
        assert name in ALLOWED_LOSSES[task]
        make_loss(name, task, 2)


def test_aliases_accepted():
    assert "dice_ce" in ALLOWED_LOSSES["semantic"] and "dice+crossentropy" in ALLOWED_LOSSES["semantic"]
    make_loss("Dice+CrossEntropy", "semantic", 1)


def test_wrong_task_combination_is_config_error():
    with pytest.raises(ConfigError) as e:
        make_loss("mse", "classification", 3)
    msg = str(e.value)
    assert "loss_function" in msg and "'mse'" in msg
    assert "categorical_crossentropy" in msg and "focal" in msg


def test_typo_gets_did_you_mean():
    with pytest.raises(ConfigError) as e:
        make_loss("dice_crossentrpy", "semantic", 1)
    assert "Did you mean 'dice_crossentropy'" in str(e.value)


def test_unknown_task():
    with pytest.raises(ConfigError, match="semantic"):
        make_loss("mse", "segmentashun", 1)
