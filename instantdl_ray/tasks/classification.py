"""Image classification: ResNet50 with dropout before the classifier; one prediction per image."""

from __future__ import annotations

import numpy as np

from instantdl_ray.tasks import TASKS, Task, mc_samples
from instantdl_ray.tasks.semantic import categorical_entropy


@TASKS.register("classification")
class Classification(Task):
    name = "classification"
    display = "Classification"
    target_kind = None
    models = ("resnet50", "resnet18")
    losses = ("categorical_crossentropy", "binary_crossentropy", "focal")
    default_loss = "categorical_crossentropy"
    default_dropout = 0.5
    pixelwise = False
    headline = "accuracy"
    metric_names = {"correct": "accuracy"}

    def check_labels(self, cfg, inv):
        from instantdl_ray.config.validate import check_class_labels

        return check_class_labels(cfg, inv)

    def plan_fields(self, cfg, inv):
        named = set((inv.class_names or {}).keys())  # classes.txt may name classes with no image yet
        known = set(inv.label_values) | named
        n = cfg.num_classes or (max(known) + 1 if known else 2)
        n = max(n, 2)
        names = inv.class_names or {}
        return dict(
            out_channels=n,
            num_classes=n,
            class_names=[names.get(i, str(i)) for i in range(n)],
            loss=(cfg.loss_function or self.default_loss).lower(),
        )

    def loss(self, model, batch, loss_fn):
        return loss_fn(model(batch["image"]), batch["label"])

    def val_sums(self, model, batch, loss_fn):
        out = model(batch["image"])
        y = batch["label"]
        n = out.shape[0]
        return {
            "loss_sum": float(loss_fn(out, y)) * n,
            "n": n,
            "correct": float((out.argmax(1) == y).sum()),
        }

    def val_summary(self, sums):
        n = max(sums["n"], 1)
        return {"val_loss": sums["loss_sum"] / n, "val_accuracy": sums["correct"] / n}

    def predict_batch(self, model, x, passes):
        import torch

        p = torch.softmax(mc_samples(model, x, passes), 2)  # (T, B, K)
        mean = p.mean(0)
        out = {"prob": mean.cpu().numpy()}
        if passes > 1:
            # InstantDL's score: near 0 certain, near 1 uncertain -> normalised predictive entropy
            out["uncertainty"] = categorical_entropy(mean, 1)[:, 0].cpu().numpy()
        return out

    def finalize(self, stitched, plan):
        prob = np.asarray(stitched["prob"], dtype=np.float32)
        out = {"prediction": int(prob.argmax()), "prob": prob}
        if "uncertainty" in stitched:
            out["uncertainty"] = float(stitched["uncertainty"])
        return out
