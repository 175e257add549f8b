"""The four InstantDL tasks behind one interface: everything that differs between tasks lives here.

A task is one class in one file of this package, registered with ``@TASKS.register(name,
aliases=...)`` (the aliases are the spellings a config may use, InstantDL's included) and imported
at the end of this module. It sets the class attributes below and implements

* planning: ``plan_fields`` (out_channels, classes, loss), ``check_labels`` (validation);
* data: ``prepare_target``;
* training: ``build_model`` / ``make_loss`` / ``loss`` / ``val_sums`` / ``val_summary``
  (defaults fit a dense network), ``decision`` (post-processing calibrated on validation);
* prediction: ``predict_batch`` (averageable outputs), ``finalize`` (one stitched image);
* evaluation: ``block_state`` (a summable metric state of one block; pixel tasks that are not
  ``whole_image_evaluation``), ``error_view`` / ``error_legend`` / ``display_views`` (figures),
  ``per_image_error``; ``headline`` names the metric of ``results.json``'s headline.

``tests/test_task_contract.py`` runs every registered task and model through this contract; a new
task passes it (and adds its cases there) before anything else. Numbers come from the config and
the plan, never from subclasses. The pipeline, evaluation and validation never test a task's name:
they ask the task.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from instantdl_ray.registry import Registry

TASKS = Registry("task")


class Task:
    """Base class. Arrays are ``(C, [Z,] Y, X)``; batches ``(B, C, [Z,] Y, X)``."""

    name: str = ""
    display: str = ""  # InstantDL's spelling (use_algorithm), e.g. "SemanticSegmentation"
    target_kind: str | None = None  # "label" | "continuous" | None, for augmentation
    models: tuple[str, ...] = ()  # allowed model names, the first is the default
    default_dropout: float = 0.2
    pixelwise: bool = True  # False: one label per image (rows are whole images, no tile grid)
    target_statistics: bool = False  # True: the plan measures the targets' mean/std (scaled targets)

    # ---- losses (losses.make_loss asks these)
    losses: tuple[str, ...] | None = ()  # canonical loss names allowed; None: any registered loss
    default_loss: str = ""
    probability_losses: tuple[str, ...] = ()  # applied to sigmoid/softmax outputs (InstantDL's Keras way)
    own_loss: str | None = None  # this loss whatever the config names (the model computes its own)

    # ---- evaluation (evaluation/evaluate.py asks these; it never tests the task's name)
    headline: str = ""  # the test metric of results.json's headline
    headline_per_image: bool = False  # headline = mean over images (else pooled over the test set)
    headline_aggregation: str = "pooled over the test set"
    error_metric: tuple[str, str] = ("", "")  # (per-image metric, the error shown against uncertainty)
    label_kind: str = "classes"  # how figures colour predictions: "classes" | "instances" | "values"
    whole_image_evaluation: bool = False  # metrics need whole label images (object matching)
    groundtruth_masks: bool = False  # groundtruth may be a list of per-object mask files
    image_metrics: tuple[str, ...] = ()  # per-image metrics needing a second pass (e.g. "ssim")
    evaluation_notes: tuple[str, ...] = ()
    metric_names: dict[str, str] = {}  # per-image column -> name in results.json

    def evaluation_classes(self, plan) -> int:
        """Classes the evaluation scores (1: a binary mask, foreground vs background)."""
        return plan.num_classes

    def block_state(self, pred: np.ndarray, gt: np.ndarray, num_classes: int):
        """A summable metric state (``evaluation.metrics``) of one block of one image."""
        raise NotImplementedError(f"task {self.name} is not evaluated block by block")

    def per_image_error(self, metrics: dict) -> float:
        """The error of one image, from its metrics (``error_metric``): 1 - score by default."""
        return 1.0 - metrics.get(self.error_metric[0], float("nan"))

    def error_view(self, pred: np.ndarray, gt: np.ndarray, num_classes: int) -> np.ndarray:
        """Signed error for display: +1 false positive, -1 false negative (foreground)."""
        return (pred > 0).astype(np.int8) - (gt > 0).astype(np.int8)

    def error_legend(self, num_classes: int) -> str:
        return "red: false pos., blue: false neg."

    def display_views(self, pred_views: dict, gt_views: dict, num_classes: int) -> tuple[dict, dict]:
        """Prediction and groundtruth views as the figures show them."""
        return pred_views, gt_views

    def mc_dropout(self, plan) -> bool:
        """Whether Monte-Carlo dropout passes give this model's uncertainty (else one pass)."""
        return True

    def unused_parameters(self, plan) -> bool:
        """Whether a training step may leave parameters without gradient (DDP must then look for them)."""
        return False

    def whole_objects(self, plan) -> bool:
        """True: each object must lie whole in some read window (the overlap of the prediction
        grid is derived from the training objects' extent, ``plan.required_overlap``)."""
        return False

    # ---- validation of the data
    def check_labels(self, cfg, inv) -> list[str]:
        """Problems with the groundtruth labels of this task's data (``config.validate``)."""
        return []

    # ---- planning
    def plan_fields(self, cfg, inv) -> dict[str, Any]:
        """out_channels, num_classes, class_names, loss for this task and data."""
        raise NotImplementedError

    # ---- data
    def prepare_target(self, target: np.ndarray, plan) -> np.ndarray:
        """Raw groundtruth ``(C, ...)`` as read -> training target ``(Ct, ...)`` float32."""
        return target.astype(np.float32)

    # ---- training (inside Ray Train workers)
    def build_model(self, plan):
        from instantdl_ray.models import build_model

        return build_model(
            plan.model,
            in_channels=plan.in_channels,
            out_channels=plan.out_channels,
            spatial_dims=plan.spatial_dims,
            dropout=plan.dropout,
        )

    def make_loss(self, plan):
        from instantdl_ray.losses import make_loss

        return make_loss(plan.loss, self.name, plan.num_classes)

    def loss(self, model, batch: dict, loss_fn):
        return loss_fn(model(batch["image"]), batch["target"])

    def val_sums(self, model, batch: dict, loss_fn) -> dict[str, float]:
        """Summable validation statistics of one batch (model in eval mode, no grad)."""
        out = model(batch["image"])
        n = out.shape[0]
        return {"loss_sum": float(loss_fn(out, batch["target"])) * n, "n": n}

    def val_summary(self, sums: dict[str, float]) -> dict[str, float]:
        return {"val_loss": sums["loss_sum"] / max(sums["n"], 1)}

    # ---- after training (driver)
    def decision(self, cfg, plan, history: list[dict]) -> dict:
        """Post-processing parameters for prediction, calibrated on the validation split from the
        training ``history`` (one dict per epoch, ``logs/history.json``) or taken from ``cfg``:
        stored in ``plan.extra["decision"]`` and the run's ``thresholds.json``. ``{}``: none."""
        return {}

    # ---- prediction (inside Ray actors)
    def predict_batch(self, model, x, passes: int) -> dict[str, np.ndarray]:
        """``x (B, C, ...)`` -> averageable outputs, e.g. {"prob": (B, K, ...), "expected_entropy": (B, 1, ...)};
        non-linear summaries of them (entropy, mutual information) are computed in ``finalize``,
        after stitching."""
        raise NotImplementedError

    def finalize(self, stitched: dict[str, np.ndarray], plan) -> dict[str, np.ndarray]:
        """Stitched outputs of one image -> {"prediction": ..., "uncertainty": ... (optional)}."""
        raise NotImplementedError


def task_key(name: str) -> str:
    """The registered name of a task spelled any way a config may spell it ("Semantic_Segmentation",
    "instance", "InstanceSegmentation" ...); an unknown name raises ``UnknownNameError``."""
    key = str(name).replace("_", "").replace("-", "").replace(" ", "").lower()
    return TASKS.canonical(key if key in TASKS else str(name))  # an unknown name: the user's spelling


def get_task(name: str) -> Task:
    return TASKS.get(task_key(name))()


MC_BATCH = {"cuda": 32, "cpu": 4}  # tile-passes per forward call


def mc_samples(model, x, passes: int, max_batch: int | None = None):
    """``passes`` stochastic forward passes of ``x (B, ...)``, batched: -> tensor ``(T, B, ...)``.

    Only dropout layers are stochastic: the model is put in eval mode (BatchNorm uses its
    running statistics and never updates them) and dropout modules alone are switched to train.
    ``passes == 1`` is one deterministic pass. Passes are stacked into batches of up to
    ``max_batch`` tile-passes: 32 on a GPU; 4 on CPU, where small batches stay in cache
    (``benchmarks/predict_throughput.py``: a U-Net on 256² tiles took 25 ms per tile-pass at
    batch 4 against 49 ms at batch 20).
    """
    import torch

    if max_batch is None:
        max_batch = MC_BATCH["cuda" if x.device.type == "cuda" else "cpu"]
    set_mc_dropout(model, passes > 1)
    b = x.shape[0]
    reps = max(1, max_batch // max(b, 1))
    outs = []
    with torch.no_grad():
        done = 0
        while done < passes:
            k = min(reps, passes - done)
            xx = x.repeat((k,) + (1,) * (x.dim() - 1))
            y = model(xx)
            outs.append(y.reshape((k, b) + tuple(y.shape[1:])))
            done += k
    return torch.cat(outs, 0)


def set_mc_dropout(model, enabled: bool) -> None:
    import torch.nn as nn

    model.eval()
    if enabled:
        for m in model.modules():
            if isinstance(m, (nn.Dropout, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)):
                m.train()


from instantdl_ray.tasks import classification, instance, regression, semantic  # noqa: E402,F401  (register)
