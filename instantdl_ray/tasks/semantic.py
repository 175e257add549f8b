"""Semantic segmentation: U-Net, binary (sigmoid + Otsu, as InstantDL) or multi-class (softmax + argmax)."""

from __future__ import annotations

import numpy as np

from . import TASKS, Task, mc_samples

# Otsu on a probability map of an image with (almost) no foreground splits noise; keep the
# threshold in a sane band around 0.5 so empty images stay empty.
OTSU_CLIP = (0.25, 0.75)


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


@TASKS.register("semantic")
class Semantic(Task):
    name = "semantic"
    target_kind = "label"
    models = ("unet",)
    headline = "val_jaccard"

    def plan_fields(self, cfg, inv):
        n = cfg.num_classes or 1
        from ..losses import DEFAULT_LOSS

        return dict(
            out_channels=n,
            num_classes=n,
            class_names=["background", "foreground"] if n == 1 else [str(i) for i in range(n)],
            loss=(cfg.loss_function or DEFAULT_LOSS["semantic"]).lower(),
            extra={"binary_values": sorted(inv.label_values)},
        )

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
        if out.shape[1] == 1:
            pred = (out > 0).float()
            fg = y > 0.5
        else:
            pred = out.argmax(1, keepdim=True) > 0
            fg = y > 0
            pred = pred.float()
        inter = float(torch.sum((pred > 0) & fg))
        union = float(torch.sum((pred > 0) | fg))
        return {"loss_sum": float(loss_fn(out, y)) * n, "n": n, "inter": inter, "union": union}

    def val_summary(self, sums):
        return {
            "val_loss": sums["loss_sum"] / max(sums["n"], 1),
            "val_jaccard": sums["inter"] / sums["union"] if sums["union"] > 0 else 1.0,
        }

    def predict_batch(self, model, x, passes):
        import torch

        logits = mc_samples(model, x, passes)  # (T, B, K, ...)
        if logits.shape[2] == 1:
            p = torch.sigmoid(logits)
            mean = p.mean(0)
            ent = binary_entropy(mean)
            mi = ent - binary_entropy(p).mean(0)
        else:
            p = torch.softmax(logits, 2)
            mean = p.mean(0)
            ent = categorical_entropy(mean, 1)
            mi = ent - categorical_entropy(p, 2).mean(0)
        out = {"prob": mean.cpu().numpy()}
        if passes > 1:
            out["entropy"] = ent.cpu().numpy()
            out["mutual_information"] = mi.clamp_min(0).cpu().numpy()
        return out

    def finalize(self, stitched, plan):
        prob = stitched["prob"]
        if prob.shape[0] == 1:
            from skimage.filters import threshold_otsu

            p = prob[0]
            t = 0.5
            if p.max() > p.min():
                t = float(np.clip(threshold_otsu(p), *OTSU_CLIP))
            pred = (p > t).astype(np.uint8)
        else:
            pred = prob.argmax(0).astype(np.uint8)
            t = None
        out = {"prediction": pred, "threshold": t}
        if "entropy" in stitched:
            out["uncertainty"] = stitched["entropy"][0].astype(np.float32)
        return out

    # ---- blockwise finalisation (images stitched on the streaming path, stitch.ImageAccumulator)
    finalize_inputs = ("prob", "entropy")  # what finalize reads; the streaming path keeps only these

    def build_model(self, plan):
        from ..models import build_model

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
        out = {"prediction": pred}
        if "entropy" in stitched:
            out["uncertainty"] = stitched["entropy"][0].astype(np.float32)
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
