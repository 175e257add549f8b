"""Pixel-wise regression (e.g. a fluorescence stain from brightfield): U-Net 2D/3D, MSE/MAE.

Targets are z-scored with data-set statistics from the plan for training and written back in
their original range.
"""

from __future__ import annotations

import numpy as np

from instantdl_ray.tasks import TASKS, Task, mc_samples


def _shape_c(values, ndim):
    return np.asarray(values, dtype=np.float32).reshape((-1,) + (1,) * (ndim - 1))


@TASKS.register("regression")
class Regression(Task):
    name = "regression"
    display = "Regression"
    target_kind = "continuous"
    models = ("unet",)
    losses = ("mse", "mae")
    default_loss = "mse"
    target_statistics = True
    headline = "pearson"
    error_metric = ("mae", "mae")
    label_kind = "values"
    image_metrics = ("ssim",)

    def plan_fields(self, cfg, inv):
        return dict(
            out_channels=1,  # set from the target's channels when the plan is made
            num_classes=1,
            class_names=[],
            loss=(cfg.loss_function or self.default_loss).lower(),
        )

    # ---- evaluation
    def block_state(self, pred, gt, num_classes):
        from instantdl_ray.evaluation import metrics as M

        return M.RegressionState.from_arrays(pred, gt)

    def per_image_error(self, metrics):
        return metrics.get("mae", float("nan"))

    def error_view(self, pred, gt, num_classes):
        return pred.astype(np.float32) - gt.astype(np.float32)

    def error_legend(self, num_classes):
        return "prediction - groundtruth"

    def prepare_target(self, target, plan):
        mean = _shape_c(plan.target_mean, target.ndim)
        std = _shape_c(plan.target_std, target.ndim)
        return ((target - mean) / std).astype(np.float32)

    def val_sums(self, model, batch, loss_fn):
        import torch

        out = model(batch["image"])
        y = batch["target"]
        n = out.shape[0]
        return {
            "loss_sum": float(loss_fn(out, y)) * n,
            "n": n,
            "se": float(torch.sum((out - y) ** 2)),
            "px": float(y.numel()),
        }

    def val_summary(self, sums):
        mse = sums["se"] / max(sums["px"], 1)
        return {"val_loss": sums["loss_sum"] / max(sums["n"], 1), "val_mse": mse, "val_neg_mse": -mse}

    def predict_batch(self, model, x, passes):
        y = mc_samples(model, x, passes)  # (T, B, C, ...) in normalised units
        out = {"value": y.mean(0).cpu().numpy()}
        if passes > 1:
            out["std"] = y.std(0).cpu().numpy()
        return out

    def finalize(self, stitched, plan):
        v = stitched["value"]
        mean = _shape_c(plan.target_mean, v.ndim)
        std = _shape_c(plan.target_std, v.ndim)
        pred = (v * std + mean).astype(np.float32)
        out = {"prediction": pred[0] if pred.shape[0] == 1 else pred}
        if "std" in stitched:
            u = (stitched["std"] * std).astype(np.float32)
            out["uncertainty"] = u[0] if u.shape[0] == 1 else u
        return out

    # ---- blockwise finalisation (images stitched on the streaming path, stitch.ImageAccumulator)
    finalize_inputs = ("value", "std")

    def finalize_stats(self, stitched, plan, blocks) -> dict:
        return {}  # de-normalising is pixelwise: no whole-image numbers

    def finalize_block(self, stitched, plan, stats) -> dict:
        """``finalize`` for one block ``(C, *block)`` of the stitched outputs."""
        return self.finalize(stitched, plan)
