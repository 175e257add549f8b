"""Loss registry: InstantDL's ``loss_function`` names, as PyTorch/MONAI losses on raw logits.

Each entry is a factory ``(num_classes) -> loss_fn`` and ``loss_fn(pred, target)`` returns a
scalar tensor. Shape conventions (K = ``num_classes`` = model output channels):

- segmentation: ``pred (N, K, [Z,] Y, X)`` logits.
  K == 1 (binary): ``target (N, 1, [Z,] Y, X)`` float 0/1, sigmoid inside the loss.
  K > 1 (multi-class): ``target (N, 1, [Z,] Y, X)`` integer class indices (a target without the
  channel axis is accepted too), softmax inside the loss.
- classification: ``pred (N, K)`` logits, ``target (N,)`` long class indices (float 0/1 for K == 1).
- regression: ``pred`` and ``target`` ``(N, C, [Z,] Y, X)`` float, same shape.
- Mask R-CNN (``maskrcnn``): ``pred`` is the loss dict the model returns in train mode; the
  target is ignored (the model already used it).

Segmentation vs classification is decided by ``pred.ndim`` (2 = one prediction per image), so
the same entry serves both tasks where that makes sense.

Use :func:`make_loss` from the pipeline: it checks the name against the task and raises a
``ConfigError`` a user can act on.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from instantdl_ray.errors import ConfigError
from instantdl_ray.registry import Registry, did_you_mean

LossFn = Callable[[object, torch.Tensor], torch.Tensor]

LOSSES = Registry("loss")



def _seg_target(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``(N, [Z,] Y, X)`` or ``(N, 1, [Z,] Y, X)`` -> ``(N, 1, [Z,] Y, X)``."""
    return target.unsqueeze(1) if target.ndim == pred.ndim - 1 else target


def _same_shape(pred: torch.Tensor, target: torch.Tensor, name: str) -> None:
    # F.mse_loss would broadcast (N, 1) against (N,) into an (N, N) loss without failing.
    if pred.shape != target.shape:
        raise ValueError(f"{name}: prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")


def _bce_binary(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """K == 1: sigmoid BCE, for segmentation ``(N, 1, ...)`` and classification ``(N, 1)``."""
    if pred.ndim == 2:
        return F.binary_cross_entropy_with_logits(pred[:, 0], target.to(pred.dtype).reshape(-1))
    return F.binary_cross_entropy_with_logits(pred, _seg_target(pred, target).to(pred.dtype))


def _ce(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """K > 1: softmax cross-entropy on class indices."""
    if pred.ndim == 2:
        return F.cross_entropy(pred, target.long().reshape(-1))
    return F.cross_entropy(pred, _seg_target(pred, target)[:, 0].long())


def _one_hot(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Class indices ``(N, 1, ...)`` or ``(N,)`` -> one-hot like ``pred`` ``(N, K, ...)``."""
    if pred.ndim == 2:
        idx = target.long().reshape(-1)
        return F.one_hot(idx, pred.shape[1]).to(pred.dtype)
    idx = _seg_target(pred, target)[:, 0].long()
    return F.one_hot(idx, pred.shape[1]).movedim(-1, 1).to(pred.dtype)


# ---------------------------------------------------------------- regression


@LOSSES.register("mse", aliases=("mean_squared_error", "l2"))
def mse(num_classes: int) -> LossFn:
    """Mean squared error, ``pred``/``target`` ``(N, C, ...)`` float of the same shape."""

    def loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.to(pred.dtype)
        _same_shape(pred, target, "mse")
        return F.mse_loss(pred, target)

    return loss


@LOSSES.register("mae", aliases=("mean_absolute_error", "l1"))
def mae(num_classes: int) -> LossFn:
    """Mean absolute error, ``pred``/``target`` ``(N, C, ...)`` float of the same shape."""

    def loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.to(pred.dtype)
        _same_shape(pred, target, "mae")
        return F.l1_loss(pred, target)

    return loss


# ---------------------------------------------------------------- segmentation / classification


@LOSSES.register("binary_crossentropy", aliases=("bce", "binary_cross_entropy"))
def binary_crossentropy(num_classes: int) -> LossFn:
    """Binary cross-entropy on logits.

    K == 1: sigmoid BCE (segmentation and classification). K > 1 segmentation: per-class
    sigmoid BCE against one-hot targets (Keras' ``binary_crossentropy`` on one-hot masks).
    K >= 2 classification: softmax cross-entropy -- with one label per image and K == 2 logits
    this *is* binary cross-entropy (sigmoid of the logit difference), and for K > 2 it keeps
    the probabilities a distribution, which the argmax post-processing assumes.
    """

    def loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.shape[1] == 1:
            return _bce_binary(pred, target)
        if pred.ndim == 2:
            return _ce(pred, target)
        return F.binary_cross_entropy_with_logits(pred, _one_hot(pred, target))

    return loss


@LOSSES.register("categorical_crossentropy", aliases=("crossentropy", "cross_entropy", "ce"))
def categorical_crossentropy(num_classes: int) -> LossFn:
    """Softmax cross-entropy on class indices (K > 1); sigmoid BCE when K == 1."""

    def loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return _bce_binary(pred, target) if pred.shape[1] == 1 else _ce(pred, target)

    return loss


def _monai_seg(cls, num_classes: int, **kwargs) -> LossFn:
    """Wrap a MONAI segmentation loss: sigmoid for K == 1, softmax + one-hot for K > 1."""
    if num_classes == 1:
        fn = cls(sigmoid=True, **kwargs)
    else:
        fn = cls(softmax=True, to_onehot_y=True, **kwargs)

    def loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = _seg_target(pred, target)
        # MONAI's one-hot needs integer-valued labels, the sigmoid branch float ones.
        return fn(pred, target.to(pred.dtype))

    return loss


@LOSSES.register("dice", aliases=("dice_loss", "dice loss"))
def dice(num_classes: int) -> LossFn:
    """Soft Dice loss (MONAI ``DiceLoss``), segmentation only."""
    from monai.losses import DiceLoss  # MONAI on first use: validating a config needs only the names

    return _monai_seg(DiceLoss, num_classes)


@LOSSES.register(
    "dice_crossentropy", aliases=("dice_ce", "dice+crossentropy", "dicece", "bce_dice_loss", "dice_bce")
)
def dice_crossentropy(num_classes: int) -> LossFn:
    """Dice + cross-entropy, equally weighted (MONAI ``DiceCELoss``; BCE when K == 1).

    The default for semantic segmentation: cross-entropy gives stable early gradients,
    Dice counters the foreground/background imbalance of microscopy masks.
    """
    from monai.losses import DiceCELoss

    return _monai_seg(DiceCELoss, num_classes)


@LOSSES.register("tversky", aliases=("tversky_loss",))
def tversky(num_classes: int) -> LossFn:
    """Tversky loss (MONAI ``TverskyLoss``) with alpha = 0.3 (FP), beta = 0.7 (FN).

    At alpha = beta = 0.5 it would equal Dice; weighting false negatives more is why one picks
    Tversky (small structures, Salehi et al. 2017, whose recommended values these are).
    """
    from monai.losses import TverskyLoss

    return _monai_seg(TverskyLoss, num_classes, alpha=0.3, beta=0.7)


@LOSSES.register("focal", aliases=("focal_loss",))
def focal(num_classes: int) -> LossFn:
    """Focal loss, gamma = 2 (MONAI ``FocalLoss``): sigmoid for K == 1, softmax for K > 1.

    Works for segmentation ``(N, K, ...)`` and classification ``(N, K)``.
    """
    from monai.losses import FocalLoss

    if num_classes == 1:
        fn = FocalLoss(gamma=2.0, use_softmax=False)
    else:
        fn = FocalLoss(gamma=2.0, use_softmax=True, to_onehot_y=True)

    def loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.ndim == 2:
            target = target.reshape(-1, 1)  # (N,) -> (N, 1): MONAI's "one channel of labels"
        else:
            target = _seg_target(pred, target)
        return fn(pred, target.to(pred.dtype))

    return loss


@LOSSES.register("maskrcnn", aliases=("mask_rcnn",))
def maskrcnn(num_classes: int) -> LossFn:
    """Sum of the losses Mask R-CNN returns in train mode (``pred``: dict name -> scalar)."""

    def loss(pred, target=None) -> torch.Tensor:
        return sum(pred.values())

    return loss


# ---------------------------------------------------------------- task table

# Which losses fit which task is the task's choice (``Task.losses``, ``default_loss``,
# ``probability_losses``, ``own_loss``); these tables are read off the task registry.
from instantdl_ray.tasks import TASKS as _TASK_REGISTRY  # noqa: E402
from instantdl_ray.tasks import get_task  # noqa: E402

TASKS = tuple(_TASK_REGISTRY.names())


def _task_losses(task: str) -> tuple[str, ...]:
    t = get_task(task)
    if t.losses is None:  # any registered loss, its own first
        first = t.own_loss or t.default_loss
        return (first, *[n for n in LOSSES.names() if n != first])
    return tuple(t.losses)


_CANONICAL = {task: _task_losses(task) for task in TASKS}


def _with_aliases(names: tuple[str, ...]) -> tuple[str, ...]:
    aliases = [a for a, target in sorted(LOSSES._aliases.items()) if target in names]
    return (*names, *aliases)


# Every spelling accepted per task (canonical names first, then aliases), so a plain
# ``name.lower() in ALLOWED_LOSSES[task]`` check agrees with make_loss.
ALLOWED_LOSSES: dict[str, tuple[str, ...]] = {task: _with_aliases(n) for task, n in _CANONICAL.items()}

DEFAULT_LOSS: dict[str, str] = {task: get_task(task).default_loss for task in TASKS}


def _on_probabilities(base: LossFn) -> LossFn:
    """Apply ``base`` to sigmoid/softmax outputs and 0/1 (one-hot) targets, as Keras did."""

    def loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.shape[1] == 1:
            return base(torch.sigmoid(pred), _seg_target(pred, target).to(pred.dtype))
        return base(torch.softmax(pred, dim=1), _one_hot(pred, target))

    return loss


def make_loss(name: str | None, task: str, num_classes: int) -> LossFn:
    """The loss ``name`` for ``task`` with ``num_classes`` output channels.

    Args:
        name: a registered loss name or alias (case-insensitive); None picks ``DEFAULT_LOSS[task]``.
        task: ``semantic``, ``instance``, ``regression`` or ``classification``.
        num_classes: model output channels K (1 = binary segmentation).

    Returns:
        ``loss_fn(pred, target) -> scalar tensor`` (shapes in the module docstring). For
        ``instance`` it is always the Mask R-CNN loss sum, whatever ``name`` says.

    Raises:
        ConfigError: naming ``loss_function``, the bad value, the allowed names for the task
            and a did-you-mean.
    """
    if task not in ALLOWED_LOSSES:
        raise ConfigError(
            [f"task '{task}' has no losses; choose one of {list(TASKS)}." + did_you_mean(str(task), TASKS)]
        )
    if name is None:
        name = DEFAULT_LOSS[task]
    allowed = _CANONICAL[task]
    if name not in LOSSES:
        raise ConfigError([
            f"loss_function: '{name}' is not a known loss; for {task} choose one of {list(allowed)}."
            + did_you_mean(str(name), ALLOWED_LOSSES[task])
        ])
    if LOSSES.canonical(name) not in allowed:
        # A real loss in the wrong task: a spelling suggestion would mislead, so say where it fits.
        fits = [t for t in TASKS if get_task(t).losses is not None and LOSSES.canonical(name) in _CANONICAL[t]]
        raise ConfigError([
            f"loss_function: '{name}' does not fit the {task} task (it is for {', '.join(fits)}); "
            f"choose one of {list(allowed)}."
        ])
    if int(num_classes) < 1:
        raise ConfigError([f"num_classes: must be >= 1, got {num_classes}."])
    t = get_task(task)
    canonical = t.own_loss or LOSSES.canonical(name)
    fn = LOSSES.get(canonical)(int(num_classes))
    if canonical in t.probability_losses:
        fn = _on_probabilities(fn)
    return fn


__all__ = ["ALLOWED_LOSSES", "DEFAULT_LOSS", "LOSSES", "make_loss"]
