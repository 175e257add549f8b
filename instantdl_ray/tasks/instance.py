"""Instance segmentation: torchvision Mask R-CNN (as InstantDL), or a U-Net with an
interior/boundary encoding split into objects by watershed after stitching (scales to slides).

Mask R-CNN outputs are not averageable: each tile yields a label tile, and stitching keeps each
object from one tile that holds it whole (``stitch``; the prediction overlap is made larger than
the training objects, ``plan.required_overlap``), so a nucleus on a tile border comes out once.
Mask R-CNN has no dropout; its uncertainty is the per-object detection score (documented).
"""

from __future__ import annotations

import contextlib

import numpy as np

from instantdl_ray.tasks import TASKS, Task, mc_samples
from instantdl_ray.tasks.semantic import mc_outputs, uncertainty_maps

MAX_OBJECTS = 512  # per tile; DSB images hold up to ~400 nuclei
SCORE_THRESHOLD = 0.5
MIN_OBJECT_SIZE = 8  # pixels (voxels): smaller fragments are noise


def encode_interior_boundary(labels: np.ndarray) -> np.ndarray:
    """Label image ``(..., Y, X)`` -> classes 0 background, 1 interior, 2 boundary (uint8)."""
    from skimage.segmentation import find_boundaries

    lab = labels.astype(np.int64)
    out = (lab > 0).astype(np.uint8)
    out[find_boundaries(lab, mode="inner") & (lab > 0)] = 2
    return out


def split_objects(prob: np.ndarray, min_size: int = MIN_OBJECT_SIZE) -> np.ndarray:
    """Class probabilities ``(3, ...)`` -> uint16 labels: seeds from interiors, watershed to the foreground."""
    from scipy import ndimage as ndi
    from skimage.segmentation import watershed

    fg = prob[0] < 0.5
    seeds, _ = ndi.label((prob[1] > 0.5) & fg)
    if seeds.max() == 0:
        return np.zeros(prob.shape[1:], np.uint16)
    lab = watershed(-prob[1], markers=seeds, mask=fg)
    sizes = np.bincount(lab.ravel())
    small = np.nonzero(sizes < min_size)[0]
    lab[np.isin(lab, small[small > 0])] = 0
    from skimage.segmentation import relabel_sequential

    return relabel_sequential(lab)[0].astype(np.uint16)


def labels_to_targets(label_tile: np.ndarray) -> dict:
    """``(Y, X)`` label tile -> Mask R-CNN target dict (boxes xyxy, labels, masks)."""
    import torch

    ids = np.unique(label_tile)
    ids = ids[ids > 0]
    masks, boxes = [], []
    for i in ids:
        m = label_tile == i
        ys, xs = np.nonzero(m)
        if len(ys) < 2 or ys.min() == ys.max() or xs.min() == xs.max():
            continue  # degenerate boxes break the box regression
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        masks.append(m)
    h, w = label_tile.shape
    return {
        "boxes": torch.tensor(np.asarray(boxes, np.float32).reshape(-1, 4)),
        "labels": torch.ones(len(boxes), dtype=torch.int64),
        "masks": torch.tensor(np.asarray(masks, np.uint8).reshape(-1, h, w)),
    }


@contextlib.contextmanager
def _losses_mode(model):
    """torchvision detection models return their losses only in train mode, but train mode also
    makes every trainable BatchNorm normalise with batch statistics and update its running
    statistics; with random weights (``weights=None``) both Mask R-CNN builders have such
    BatchNorm. For validation: train mode with every BatchNorm held in eval, so the losses come
    from the model as it predicts and no parameter or buffer changes. Restores every module's
    mode on exit."""
    from torch.nn.modules.batchnorm import _BatchNorm

    modes = {m: m.training for m in model.modules()}
    try:
        model.train()
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.eval()
        yield model
    finally:
        for m, flag in modes.items():
            m.train(flag)


def _rgb(x):
    return x if x.shape[1] == 3 else x[:, :1].repeat(1, 3, 1, 1)


@TASKS.register("instance", aliases=("instancesegmentation",))
class Instance(Task):
    name = "instance"
    display = "InstanceSegmentation"
    target_kind = "label"
    models = ("maskrcnn", "maskrcnn_resnet18_fpn", "unet")
    losses = None  # any registered loss: Mask R-CNN trains on its own; the U-Net on the one named
    default_loss = "maskrcnn"
    own_loss = "maskrcnn"  # make_loss(..., "instance", ...) is always Mask R-CNN's loss sum
    headline = "ap_mean"
    headline_per_image = True
    headline_aggregation = "mean over images (DSB2018 score)"
    error_metric = ("ap_mean", "1 - ap_mean")
    label_kind = "instances"
    whole_image_evaluation = True
    groundtruth_masks = True
    evaluation_notes = ("instance metrics are computed per whole image (object matching needs whole label images)",)

    def evaluation_classes(self, plan) -> int:
        return 1  # labels: evaluated as objects, never as classes

    @staticmethod
    def is_maskrcnn(plan) -> bool:
        return plan.model.startswith("maskrcnn")

    def mc_dropout(self, plan) -> bool:
        return not self.is_maskrcnn(plan)  # detections carry scores, not dropout samples

    def unused_parameters(self, plan) -> bool:
        return self.is_maskrcnn(plan)  # heads without a target in a batch get no gradient

    def whole_objects(self, plan) -> bool:
        return self.is_maskrcnn(plan)  # detections are whole objects; the watershed path merges pieces

    def plan_fields(self, cfg, inv):
        model = cfg.model or self.models[0]
        if cfg.loss_function and model.startswith("maskrcnn"):
            import warnings

            warnings.warn(f"loss_function '{cfg.loss_function}' is ignored: Mask R-CNN trains with its own losses")
        if model.startswith("maskrcnn"):
            return dict(out_channels=2, num_classes=1, class_names=["background", "object"], loss="maskrcnn")
        return dict(out_channels=3, num_classes=3, class_names=["background", "interior", "boundary"], loss="dice_crossentropy")

    def prepare_target(self, target, plan):
        lab = target[:1]
        if self.is_maskrcnn(plan):
            return lab.astype(np.float32)
        return encode_interior_boundary(lab).astype(np.float32)

    def build_model(self, plan):
        from instantdl_ray.models import build_model

        return build_model(
            plan.model,
            in_channels=3 if self.is_maskrcnn(plan) else plan.in_channels,
            out_channels=plan.out_channels,
            spatial_dims=plan.spatial_dims,
            dropout=plan.dropout,
        )

    def make_loss(self, plan):
        if self.is_maskrcnn(plan):
            return None
        from instantdl_ray.losses import make_loss

        return make_loss(plan.loss, "semantic", 3)

    def _mrcnn_inputs(self, batch):
        x = _rgb(batch["image"])
        device = x.device
        targets = []
        for t in batch["target"][:, 0].cpu().cpu().numpy().astype(np.int64):
            d = labels_to_targets(t)
            targets.append({k: v.to(device) for k, v in d.items()})
        return list(x), targets

    def loss(self, model, batch, loss_fn):
        if loss_fn is not None:
            return loss_fn(model(batch["image"]), batch["target"])
        images, targets = self._mrcnn_inputs(batch)
        model.train()
        losses = model(images, targets)
        return sum(losses.values())

    def val_sums(self, model, batch, loss_fn):
        import torch

        n = batch["image"].shape[0]
        if loss_fn is not None:
            out = model(batch["image"])
            y = batch["target"]
            pred_fg = out.argmax(1, keepdim=True) > 0
            fg = y > 0
            loss = float(loss_fn(out, y))
        else:
            images, targets = self._mrcnn_inputs(batch)
            was_training = {m: m.training for m in model.modules()}
            try:
                with _losses_mode(model):
                    loss = float(sum(model(images, targets).values()))
                model.eval()
                dets = model(images)
            finally:
                for m, flag in was_training.items():  # the caller's modes (train.val_sums: eval)
                    m.train(flag)
            pred_fg = torch.stack([self._paint(d, images[0].shape[-2:]) > 0 for d in dets])[:, None]
            fg = batch["target"] > 0
        inter = float(torch.sum(pred_fg & fg))
        union = float(torch.sum(pred_fg | fg))
        return {"loss_sum": loss * n, "n": n, "inter": inter, "union": union}

    def val_summary(self, sums):
        return {
            "val_loss": sums["loss_sum"] / max(sums["n"], 1),
            "val_jaccard": sums["inter"] / sums["union"] if sums["union"] > 0 else 1.0,
        }

    @staticmethod
    def _paint(det: dict, hw) -> "torch.Tensor":
        """Detections -> label image; higher scores painted last so they win overlaps."""
        import torch

        lab = torch.zeros(tuple(hw), dtype=torch.int32, device=det["scores"].device)
        keep = torch.nonzero(det["scores"] >= SCORE_THRESHOLD).flatten()[:MAX_OBJECTS]
        order = keep[torch.argsort(det["scores"][keep])]
        for j, k in enumerate(order.tolist()):
            lab[det["masks"][k, 0] > 0.5] = int(torch.nonzero(keep == k)[0]) + 1
        return lab

    def predict_batch(self, model, x, passes):
        import torch

        if not self.is_maskrcnn_model(model):
            return mc_outputs(mc_samples(model, x, passes), passes)  # softmax over the 3 classes
        model.eval()
        with torch.no_grad():
            dets = model(list(_rgb(x)))
        labels = np.zeros((x.shape[0], 1) + tuple(x.shape[-2:]), np.int32)
        scores = np.zeros((x.shape[0], MAX_OBJECTS), np.float32)
        for i, d in enumerate(dets):
            labels[i, 0] = self._paint(d, x.shape[-2:]).cpu().numpy()
            keep = d["scores"][d["scores"] >= SCORE_THRESHOLD][:MAX_OBJECTS].cpu().numpy()
            scores[i, : len(keep)] = keep
        return {"labels": labels, "scores": scores}

    @staticmethod
    def is_maskrcnn_model(model) -> bool:
        from torchvision.models.detection import MaskRCNN

        return isinstance(getattr(model, "module", model), MaskRCNN)

    def finalize(self, stitched, plan):
        if "labels" in stitched:
            return {"prediction": stitched["labels"].astype(np.uint16), "scores": stitched.get("object_scores")}
        return {"prediction": split_objects(stitched["prob"]), **uncertainty_maps(stitched)}
