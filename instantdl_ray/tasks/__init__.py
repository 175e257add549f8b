"""The four InstantDL tasks behind one small interface.

Only what differs between tasks lives here (targets, loss, model outputs, post-processing);
the pipeline owns everything else. Numbers come from the config/plan, never from subclasses.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from instantdl_ray.registry import Registry

TASKS = Registry("task")


class Task:
    """Base class. Arrays are ``(C, [Z,] Y, X)``; batches ``(B, C, [Z,] Y, X)``."""

    name: str = ""
    target_kind: str | None = None  # "label" | "continuous" | None, for augmentation
    models: tuple[str, ...] = ()  # allowed model names, the first is the default
    default_dropout: float = 0.2
    headline: str = ""  # validation metric used for early stopping (higher is better)
    pixelwise: bool = True

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


def get_task(name: str) -> Task:
    return TASKS.get(name)()


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
