"""Semantic segmentation: U-Net, binary (sigmoid + Otsu, as InstantDL) or multi-class (softmax + argmax)."""

from __future__ import annotations

import math

import numpy as np

from instantdl_ray.tasks import TASKS, Task, mc_samples

# Otsu on a probability map of an image with (almost) no foreground splits noise; keep the
# threshold in a sane band around 0.5 so empty images stay empty.
OTSU_CLIP = (0.25, 0.75)
# Candidate thresholds of the binary decision, scored on the validation split every epoch (summable
# intersection / union per candidate); the best one at the kept epoch is the run's threshold.
THRESHOLDS = tuple(round(0.1 + 0.05 * i, 2) for i in range(17))  # 0.10 ... 0.90


def binary_entropy_np(p: np.ndarray) -> np.ndarray:
    """``binary_entropy`` for numpy arrays (after stitching)."""
    p = np.clip(p.astype(np.float64), 1e-6, 1 - 1e-6)
    return (-(p * np.log2(p) + (1 - p) * np.log2(1 - p))).astype(np.float32)


def categorical_entropy_np(p: np.ndarray, axis: int = 0) -> np.ndarray:
    """``categorical_entropy`` for numpy arrays ``(K, ...)`` (after stitching), keeps the axis."""
    k = p.shape[axis]
    q = np.clip(p.astype(np.float64), 1e-8, None)
    return (-(q * np.log(q)).sum(axis, keepdims=True) / np.log(max(k, 2))).astype(np.float32)


def uncertainty_maps(stitched: dict) -> dict:
    """Predictive entropy and mutual information (BALD) from stitched averageable outputs.

    Entropy is not linear in the probabilities, so tiles are blended as mean probabilities
    (``prob``) and expected per-pass entropy (``expected_entropy``), and the non-linear summaries
    are computed here, after stitching: ``uncertainty`` = H(mean p) (total predictive
    uncertainty, in [0, 1]), ``mutual_information`` = H(mean p) - mean H(p) (the model's own,
    epistemic part). ``prob`` ``(K, ...)``: K = 1 sigmoid, else softmax classes.
    """
    if "expected_entropy" not in stitched:
        return {}
    prob = np.asarray(stitched["prob"])
    ent = binary_entropy_np(prob[0]) if prob.shape[0] == 1 else categorical_entropy_np(prob, 0)[0]
    mi = np.maximum(ent - np.asarray(stitched["expected_entropy"])[0], 0).astype(np.float32)
    return {"uncertainty": ent, "mutual_information": mi}


def decision_threshold(plan) -> float | str:
    """The binary decision rule of a run: ``plan.extra["decision"]["threshold"]`` (``Task.decision``,
    also in the run's ``thresholds.json``), a probability or ``"otsu"``; 0.5 without one."""
    return plan.extra.get("decision", {}).get("threshold", 0.5)


def binary_entropy(p):
    """Entropy in bits of Bernoulli(p), elementwise; in [0, 1]."""
    import torch

    p = p.clamp(1e-6, 1 - 1e-6)
    return -(p * torch.log2(p) + (1 - p) * torch.log2(1 - p))


def categorical_entropy(p, dim: int):
    """Entropy of categorical ``p`` along ``dim``, normalised by log(K) to [0, 1]."""
    import math

    import torch

    k = p.shape[dim]
    p = p.clamp_min(1e-8)
    return -(p * torch.log(p)).sum(dim, keepdim=True) / math.log(max(k, 2))


SEGMENTATION_LOSSES = (
    "dice_crossentropy", "dice", "binary_crossentropy", "categorical_crossentropy", "tversky", "focal",
    # InstantDL compatibility: its semantic default was mse on sigmoid outputs; make_loss applies
    # the same sigmoid/softmax first (``probability_losses``).
    "mse", "mae",
)


@TASKS.register("semantic", aliases=("semanticsegmentation", "segmentation"))
class Semantic(Task):
    name = "semantic"
    display = "SemanticSegmentation"
    target_kind = "label"
    models = ("unet",)
    losses = SEGMENTATION_LOSSES
    default_loss = "dice_crossentropy"
    probability_losses = ("mse", "mae")
    headline = "jaccard"
    error_metric = ("jaccard", "1 - jaccard")

    def plan_fields(self, cfg, inv):
        from instantdl_ray.config.validate import annotation_num_classes

        n = cfg.num_classes or annotation_num_classes(inv)
        # GeoJSON annotations name their classes (classes.txt may give the indices)
        named = {0: "background", **{v: k for k, v in inv.annotation_classes.items()}} if inv.annotation_classes else {}
        return dict(
            out_channels=n,
            num_classes=n,
            class_names=(["background", named.get(1, "foreground")] if n == 1
                         else [named.get(i, str(i)) for i in range(n)]),
            loss=(cfg.loss_function or self.default_loss).lower(),
            extra={"binary_values": sorted(inv.label_values)},
        )

    def check_labels(self, cfg, inv):
        from instantdl_ray.config.validate import check_label_values

        return check_label_values(cfg, inv)

    # ---- evaluation
    def block_state(self, pred, gt, num_classes):
        from instantdl_ray.evaluation import metrics as M

        return M.SegmentationState.from_arrays(pred, gt, num_classes)

    def error_view(self, pred, gt, num_classes):
        if num_classes > 1:
            return (pred != gt).astype(np.int8)  # 1 where the classes differ
        return super().error_view(pred, gt, num_classes)

    def error_legend(self, num_classes):
        return "wrong class" if num_classes > 1 else super().error_legend(num_classes)

    def display_views(self, pred_views, gt_views, num_classes):
        if num_classes > 1:
            return pred_views, gt_views
        binary = lambda views: {k: (v > 0).astype(np.uint8) for k, v in views.items()}  # noqa: E731
        return binary(pred_views), binary(gt_views)

    def prepare_target(self, target, plan):
        t = target[:1]
        if plan.num_classes == 1:
            return (t > 0).astype(np.float32)
        return t.astype(np.float32)

    def loss(self, model, batch, loss_fn):
        return loss_fn(model(batch["image"]), batch["target"])

    def val_sums(self, model, batch, loss_fn):
        import torch

        out = model(batch["image"])
        y = batch["target"]
        n = out.shape[0]
        sums = {"loss_sum": float(loss_fn(out, y)) * n, "n": n}
        if out.shape[1] == 1:  # binary: Jaccard at every candidate threshold of the probability
            p, fg = torch.sigmoid(out), y > 0.5
            for i, t in enumerate(THRESHOLDS):
                sums[f"inter_{i}"] = float(torch.sum((p > t) & fg))
                sums[f"union_{i}"] = float(torch.sum((p > t) | fg))
        else:
            pred, fg = out.argmax(1, keepdim=True) > 0, y > 0
            sums["inter"] = float(torch.sum(pred & fg))
            sums["union"] = float(torch.sum(pred | fg))
        return sums

    def val_summary(self, sums):
        out = {"val_loss": sums["loss_sum"] / max(sums["n"], 1)}
        if "inter" in sums:
            out["val_jaccard"] = sums["inter"] / sums["union"] if sums["union"] > 0 else 1.0
            return out
        # the decision rule used for the test images too: the best threshold on validation
        jac = [sums[f"inter_{i}"] / sums[f"union_{i}"] if sums[f"union_{i}"] > 0 else 1.0 for i in range(len(THRESHOLDS))]
        best = int(np.argmax(jac))
        out.update(val_jaccard=jac[best], val_threshold=THRESHOLDS[best],
                   val_jaccard_at_05=jac[THRESHOLDS.index(0.5)])
        return out

    def decision(self, cfg, plan, history):
        """Binary masks: the threshold. ``threshold: calibrated`` (default) takes the one that gave
        the best validation Jaccard at the kept (best) epoch — the rule the model was validated
        with, as StarDist's ``thresholds.json``; ``otsu`` (InstantDL: per image) or a number as
        configured. Multi-class: argmax, nothing to decide."""
        if plan.num_classes != 1:
            return {}
        if cfg.threshold != "calibrated":
            return {"threshold": cfg.threshold, "rule": "config"}
        if not history:  # predict only / a new config on a trained run: keep what was decided
            return plan.extra.get("decision") or {"threshold": 0.5, "rule": "default (nothing to calibrate on)"}
        best = history[-1].get("best_epoch", -1)
        row = next((h for h in history if h.get("epoch") == best and "val_threshold" in h), None)
        if row is None:
            return {"threshold": 0.5, "rule": "default (no validation split)"}
        return {"threshold": float(row["val_threshold"]), "rule": "calibrated on the validation split",
                "val_jaccard": float(row["val_jaccard"]), "val_jaccard_at_0.5": float(row.get("val_jaccard_at_05", math.nan)),
                "epoch": int(best) + 1}

    def predict_batch(self, model, x, passes):
        logits = mc_samples(model, x, passes)  # (T, B, K, ...)
        return mc_outputs(logits, passes)

    def finalize(self, stitched, plan):
        prob = stitched["prob"]
        if prob.shape[0] == 1:
            p = prob[0]
            t = decision_threshold(plan)
            if t == "otsu":
                from skimage.filters import threshold_otsu

                t = float(np.clip(threshold_otsu(p), *OTSU_CLIP)) if p.max() > p.min() else 0.5
            pred = (p > t).astype(np.uint8)
        else:
            pred = prob.argmax(0).astype(np.uint8)
            t = None
        return {"prediction": pred, "threshold": t, **uncertainty_maps(stitched)}

    # ---- blockwise finalisation (images stitched on the streaming path, stitch.ImageAccumulator)
    finalize_inputs = ("prob", "expected_entropy")  # what finalize reads; the streaming path keeps only these

    def build_model(self, plan):
        from instantdl_ray.models import build_model

        # plan.extra["model_options"] (e.g. {"features": [4, 4, 8, 8, 16, 4]}) reaches the builder
        return build_model(plan.model, in_channels=plan.in_channels, out_channels=plan.out_channels,
                           spatial_dims=plan.spatial_dims, dropout=plan.dropout,
                           **plan.extra.get("model_options", {}))

    def finalize_stats(self, stitched, plan, blocks) -> dict:
        """Whole-image numbers ``finalize_block`` needs, read block by block from lazily sliceable
        stitched arrays ``(C, *shape)`` (zarr): the binary Otsu threshold. The 256-bin histogram
        over the probability map's [min, max] is summed over blocks, so the threshold is the one
        ``finalize`` computes on the whole image (same bins, same counts)."""
        prob = stitched["prob"]
        if prob.shape[0] != 1:
            return {"threshold": None}
        if decision_threshold(plan) != "otsu":
            return {"threshold": decision_threshold(plan)}
        lo, hi = _value_range(prob, blocks)
        if not hi > lo:
            return {"threshold": 0.5}
        from skimage.filters import threshold_otsu

        counts = np.zeros(OTSU_BINS, np.int64)
        edges = None
        for b in blocks:
            c, edges = np.histogram(np.asarray(prob[(0,) + tuple(b)]), bins=OTSU_BINS, range=(lo, hi))
            counts += c
        centers = (edges[:-1] + edges[1:]) / 2.0
        return {"threshold": float(np.clip(threshold_otsu(hist=(counts, centers)), *OTSU_CLIP))}

    def finalize_block(self, stitched, plan, stats) -> dict:
        """``finalize`` for one block ``(C, *block)`` of the stitched outputs, given ``finalize_stats``."""
        prob = stitched["prob"]
        if prob.shape[0] == 1:
            pred = (prob[0] > stats["threshold"]).astype(np.uint8)
        else:
            pred = prob.argmax(0).astype(np.uint8)
        return {"prediction": pred, **uncertainty_maps(stitched)}


def mc_outputs(logits, passes: int) -> dict:
    """Averageable outputs of ``passes`` MC logits ``(T, B, K, ...)`` (sigmoid for K = 1, else
    softmax): mean probabilities ``prob`` and, with passes > 1, the expected per-pass entropy
    ``expected_entropy`` ``(B, 1, ...)``; ``uncertainty_maps`` turns them into entropy and mutual
    information after stitching."""
    import torch

    if logits.shape[2] == 1:
        p = torch.sigmoid(logits)
        per_pass = binary_entropy(p)
    else:
        p = torch.softmax(logits, 2)
        per_pass = categorical_entropy(p, 2)
    out = {"prob": p.mean(0).cpu().numpy()}
    if passes > 1:
        out["expected_entropy"] = per_pass.mean(0).cpu().numpy()
    return out


OTSU_BINS = 256  # skimage threshold_otsu's default


def _value_range(arr, blocks) -> tuple[np.float32, np.float32]:
    """(min, max) of channel 0: from the zarr attrs the streaming accumulator writes, else a pass."""
    attrs = getattr(arr, "attrs", None)
    if attrs is not None and "min" in attrs and "max" in attrs:
        return np.float32(attrs["min"][0]), np.float32(attrs["max"][0])
    lo, hi = np.float32(np.inf), np.float32(-np.inf)
    for b in blocks:
        x = np.asarray(arr[(0,) + tuple(b)])
        lo, hi = min(lo, x.min()), max(hi, x.max())
    return np.float32(lo), np.float32(hi)
