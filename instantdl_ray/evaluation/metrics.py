"""Metrics of the four tasks: summable states plus per-image and per-set functions.

Pixel metrics are *states*: small dataclasses of counts and sums that add with ``+`` (and
``sum()``, thanks to ``__radd__`` with 0), so the evaluation can compute one state per block
or per image and reduce them in any order (torchvision's ``ConfusionMatrix`` idea). ``finalize()``
turns a state into ``{metric: float}``. Per-image functions are the state of one image,
finalized, so per-image and dataset numbers can never disagree in their definitions.

Conventions
-----------
* ``pred`` / ``gt`` are arrays of the same shape ``([Z,] Y, X)`` (any leading axes are fine).
* Undefined values (an empty union, a constant image, no objects at all) are ``nan``, never a
  made-up 0 or 1; aggregations skip them.
* Pure numpy (+ scipy/skimage for ranks and SSIM); no dask here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

__all__ = [
    "IOU_THRESHOLDS",
    "SegmentationState",
    "RegressionState",
    "InstanceState",
    "confusion_matrix",
    "segmentation_image_metrics",
    "regression_image_metrics",
    "ssim_map",
    "ssim",
    "ssim_window",
    "instance_iou",
    "instance_image_metrics",
    "classification_metrics",
    "roc_auc",
    "roc_curve",
    "bootstrap",
    "uncertainty_error_correlation",
    "expected_calibration_error",
]

# DSB2018 / COCO thresholds 0.50, 0.55, ..., 0.95 (rounded so keys read ap_50 ... ap_95).
IOU_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


def _div(num: float, den: float) -> float:
    return float(num) / float(den) if den else math.nan


def _radd(self, other):
    # sum() starts from the integer 0
    if isinstance(other, (int, float)) and other == 0:
        return self
    return NotImplemented


# ---------------------------------------------------------------- semantic segmentation


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> np.ndarray:
    """``(K, K)`` int64 counts; rows are groundtruth classes, columns predicted classes.

    ``pred`` and ``gt`` hold integer labels in ``[0, K)`` and have the same shape.
    One ``bincount`` over ``gt * K + pred``: a single pass, no per-class loops.
    """
    k = int(num_classes)
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != groundtruth shape {gt.shape}")
    for what, a in (("prediction", pred), ("groundtruth", gt)):
        if a.size and (a.min() < 0 or a.max() >= k):
            raise ValueError(
                f"{what} holds label values {_value_summary(a)} outside [0, {k - 1}] for {k} classes; "
                f"set num_classes to the number of classes (1 for binary masks such as 0/255)"
            )
    idx = gt.astype(np.int64, copy=False).ravel() * k + pred.astype(np.int64, copy=False).ravel()
    return np.bincount(idx, minlength=k * k).reshape(k, k).astype(np.int64)


def _value_summary(a: np.ndarray) -> str:
    u = np.unique(a)
    return str(u.tolist()) if u.size <= 8 else f"{u[:4].tolist()} ... {u[-2:].tolist()}"


def _classes(num_classes: int) -> int:
    """``num_classes == 1`` means binary masks (foreground vs background): 2 confusion classes."""
    return 2 if int(num_classes) <= 1 else int(num_classes)


def _as_labels(a: np.ndarray, num_classes: int) -> np.ndarray:
    # binary masks come as 0/1, 0/255 or even probabilities-thresholded floats: anything > 0 is foreground
    return (np.asarray(a) > 0).view(np.uint8) if int(num_classes) <= 1 else np.asarray(a)


@dataclass
class SegmentationState:
    """Confusion matrix of a semantic segmentation, summable over blocks / images.

    ``confusion``: ``(K, K)`` int64, rows groundtruth, columns prediction. Binary masks use K = 2.
    """

    confusion: np.ndarray

    @classmethod
    def zero(cls, num_classes: int) -> "SegmentationState":
        k = _classes(num_classes)
        return cls(np.zeros((k, k), dtype=np.int64))

    @classmethod
    def from_arrays(cls, pred: np.ndarray, gt: np.ndarray, num_classes: int) -> "SegmentationState":
        """State of one array pair of shape ``([Z,] Y, X)``.

        ``num_classes == 1``: binary, both arrays are binarised with ``> 0`` (gt may be 0/255).
        ``num_classes >= 2``: integer class labels in ``[0, num_classes)``.
        """
        k = _classes(num_classes)
        return cls(confusion_matrix(_as_labels(pred, num_classes), _as_labels(gt, num_classes), k))

    @property
    def num_classes(self) -> int:
        return int(self.confusion.shape[0])

    def __add__(self, other: "SegmentationState") -> "SegmentationState":
        if not isinstance(other, SegmentationState):
            return NotImplemented
        if other.confusion.shape != self.confusion.shape:
            raise ValueError(f"cannot add states over {self.num_classes} and {other.num_classes} classes")
        return SegmentationState(self.confusion + other.confusion)

    __radd__ = _radd

    def finalize(self) -> dict[str, float]:
        """Jaccard (IoU), Dice and pixel accuracy.

        Binary (K = 2): ``jaccard`` / ``dice`` of the foreground class 1.
        K > 2: ``jaccard`` / ``dice`` are the mean over classes (background included) that occur in the
        groundtruth or the prediction, plus ``jaccard_<k>`` / ``dice_<k>`` per class.
        """
        cm = self.confusion.astype(np.float64)
        tp = np.diag(cm)
        fp = cm.sum(axis=0) - tp
        fn = cm.sum(axis=1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(tp + fp + fn > 0, tp / (tp + fp + fn), np.nan)
            dice = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
        out = {"accuracy": _div(tp.sum(), cm.sum())}
        if self.num_classes == 2:
            out["jaccard"] = float(iou[1])
            out["dice"] = float(dice[1])
            return out
        out["jaccard"] = float(np.nanmean(iou)) if np.isfinite(iou).any() else math.nan
        out["dice"] = float(np.nanmean(dice)) if np.isfinite(dice).any() else math.nan
        for c in range(self.num_classes):
            out[f"jaccard_{c}"] = float(iou[c])
        for c in range(self.num_classes):
            out[f"dice_{c}"] = float(dice[c])
        return out


def segmentation_image_metrics(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> dict[str, float]:
    """``jaccard``, ``dice``, ``accuracy`` (and per-class values for K > 2) of one image.

    ``pred``, ``gt``: ``([Z,] Y, X)`` label arrays; ``num_classes == 1`` means binary (``> 0``).
    """
    return SegmentationState.from_arrays(pred, gt, num_classes).finalize()


# ---------------------------------------------------------------- pixel regression


@dataclass
class RegressionState:
    """Running sums of a pixel regression (x = prediction, y = groundtruth, e = x - y).

    All float64. ``n_rel`` / ``sum_rel_err`` cover only pixels with ``y != 0`` (relative error is
    undefined there). ``y_min`` / ``y_max`` add by min/max; they give SSIM its data range.
    Pearson's r comes from raw moments; in float64 this loses a few of 16 digits when the mean is
    large against the spread (e.g. a 14k background offset), which is far below what we report.
    """

    n: float = 0.0
    sum_x: float = 0.0
    sum_y: float = 0.0
    sum_xx: float = 0.0
    sum_yy: float = 0.0
    sum_xy: float = 0.0
    sum_abs_err: float = 0.0
    sum_sq_err: float = 0.0
    sum_rel_err: float = 0.0
    n_rel: float = 0.0
    y_min: float = math.inf
    y_max: float = -math.inf

    @classmethod
    def from_arrays(cls, pred: np.ndarray, gt: np.ndarray) -> "RegressionState":
        """State of one pair of same-shaped arrays (any shape)."""
        x = np.asarray(pred, dtype=np.float64).ravel()
        y = np.asarray(gt, dtype=np.float64).ravel()
        if x.shape != y.shape:
            raise ValueError(f"prediction size {x.size} != groundtruth size {y.size}")
        if x.size == 0:
            return cls()
        e = x - y
        ae = np.abs(e)
        nz = y != 0
        return cls(
            n=float(x.size),
            sum_x=float(x.sum()),
            sum_y=float(y.sum()),
            sum_xx=float(np.dot(x, x)),
            sum_yy=float(np.dot(y, y)),
            sum_xy=float(np.dot(x, y)),
            sum_abs_err=float(ae.sum()),
            sum_sq_err=float(np.dot(e, e)),
            sum_rel_err=float((ae[nz] / np.abs(y[nz])).sum()),
            n_rel=float(nz.sum()),
            y_min=float(y.min()),
            y_max=float(y.max()),
        )

    def __add__(self, other: "RegressionState") -> "RegressionState":
        if not isinstance(other, RegressionState):
            return NotImplemented
        return RegressionState(
            n=self.n + other.n,
            sum_x=self.sum_x + other.sum_x,
            sum_y=self.sum_y + other.sum_y,
            sum_xx=self.sum_xx + other.sum_xx,
            sum_yy=self.sum_yy + other.sum_yy,
            sum_xy=self.sum_xy + other.sum_xy,
            sum_abs_err=self.sum_abs_err + other.sum_abs_err,
            sum_sq_err=self.sum_sq_err + other.sum_sq_err,
            sum_rel_err=self.sum_rel_err + other.sum_rel_err,
            n_rel=self.n_rel + other.n_rel,
            y_min=min(self.y_min, other.y_min),
            y_max=max(self.y_max, other.y_max),
        )

    __radd__ = _radd

    @property
    def data_range(self) -> float:
        """``y_max - y_min`` of the groundtruth (SSIM's ``data_range``); nan when empty."""
        return self.y_max - self.y_min if self.n else math.nan

    def finalize(self) -> dict[str, float]:
        """``pearson`` (pooled over all pixels), ``mae``, ``mse``, ``mean_relative_error``."""
        n = self.n
        if not n:
            return {"pearson": math.nan, "mae": math.nan, "mse": math.nan, "mean_relative_error": math.nan}
        cov = self.sum_xy - self.sum_x * self.sum_y / n
        vx = self.sum_xx - self.sum_x**2 / n
        vy = self.sum_yy - self.sum_y**2 / n
        r = cov / math.sqrt(vx * vy) if vx > 0 and vy > 0 else math.nan
        return {
            "pearson": float(np.clip(r, -1.0, 1.0)) if not math.isnan(r) else math.nan,
            "mae": self.sum_abs_err / n,
            "mse": self.sum_sq_err / n,
            "mean_relative_error": _div(self.sum_rel_err, self.n_rel),
        }


def ssim_window(shape: Sequence[int], win_size: int = 7) -> int:
    """skimage's default 7-pixel window, shrunk (odd) for planes smaller than 7; 0 if below 3."""
    m = min(int(shape[-1]), int(shape[-2]), int(win_size))
    w = m if m % 2 else m - 1
    return w if w >= 3 else 0


def ssim_map(pred: np.ndarray, gt: np.ndarray, data_range: float, win_size: int) -> np.ndarray:
    """skimage's full SSIM map of every ``(Y, X)`` plane: float64 of the input's shape.

    Planes are taken over the last two axes (Z slices or channels in front), so the same function
    serves whole images and overlapping blocks of one (the evaluation's blockwise SSIM).
    """
    from skimage.metrics import structural_similarity

    p = np.asarray(pred, dtype=np.float64)
    g = np.asarray(gt, dtype=np.float64)
    out = np.empty(p.shape, dtype=np.float64)
    for idx in np.ndindex(p.shape[:-2]):
        out[idx] = structural_similarity(p[idx], g[idx], win_size=win_size, data_range=data_range, full=True)[1]
    return out


def ssim(pred: np.ndarray, gt: np.ndarray, data_range: float | None = None) -> float:
    """Mean SSIM over ``(Y, X)`` planes (2D SSIM per Z slice / channel, then the mean).

    ``data_range`` defaults to ``gt.max() - gt.min()``. For a 2D pair this is exactly
    ``skimage.metrics.structural_similarity(pred, gt, data_range=...)``. nan for a constant
    groundtruth (no range) or planes under 3 pixels.
    """
    gt = np.asarray(gt)
    if data_range is None:
        data_range = float(gt.max() - gt.min()) if gt.size else math.nan
    win = ssim_window(gt.shape)
    if not win or not data_range or not np.isfinite(data_range):
        return math.nan
    pad = (win - 1) // 2
    m = ssim_map(pred, gt, data_range, win)
    crop = (Ellipsis, slice(pad, m.shape[-2] - pad), slice(pad, m.shape[-1] - pad))
    return float(m[crop].mean(dtype=np.float64))


def regression_image_metrics(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """``pearson``, ``mae``, ``mse``, ``mean_relative_error``, ``ssim`` of one pair.

    ``pred``, ``gt``: same-shaped float arrays ``([C|Z,] Y, X)`` in the groundtruth's value range;
    SSIM uses ``data_range = gt.max() - gt.min()``.
    """
    state = RegressionState.from_arrays(pred, gt)
    return {**state.finalize(), "ssim": ssim(pred, gt, state.data_range)}


# ---------------------------------------------------------------- instance segmentation


def _relabel(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels -> consecutive indices with background at 0; returns (index image, ids incl. 0)."""
    lab = np.asarray(labels)
    if lab.dtype.kind not in "iu":
        if not np.all(np.mod(lab, 1) == 0):
            raise ValueError("instance label images must hold integer ids")
        lab = lab.astype(np.int64)
    if lab.size and lab.min() < 0:
        raise ValueError("instance label images must not hold negative ids")
    mx = int(lab.max()) if lab.size else 0
    if mx < 2**24:
        # O(n) lookup table instead of np.unique's sort
        present = np.bincount(lab.ravel(), minlength=1) > 0
        present[0] = True
        ids = np.flatnonzero(present)
        lut = np.zeros(mx + 1, dtype=np.int64)
        lut[ids] = np.arange(ids.size)
        return lut[lab], ids
    ids, inv = np.unique(np.concatenate([[0], lab.ravel()]), return_inverse=True)
    return inv[1:].reshape(lab.shape), ids


def instance_iou(pred_labels: np.ndarray, gt_labels: np.ndarray) -> dict[str, np.ndarray]:
    """Overlaps of all object pairs from one joint histogram of label pairs.

    ``pred_labels``, ``gt_labels``: same-shaped integer label images (0 = background).
    Returns ``iou`` ``(G, P)``, ``intersection`` ``(G, P)``, ``gt_area`` ``(G,)``, ``pred_area`` ``(P,)``,
    ``gt_ids`` ``(G,)``, ``pred_ids`` ``(P,)`` and ``joint`` ``(G+1, P+1)`` (row/column 0 = background).
    A single ``bincount`` over the pixels, so cost is one pass plus a dense ``G x P`` table.
    """
    pred_labels = np.asarray(pred_labels)
    gt_labels = np.asarray(gt_labels)
    if pred_labels.shape != gt_labels.shape:
        raise ValueError(f"prediction shape {pred_labels.shape} != groundtruth shape {gt_labels.shape}")
    p_idx, p_ids = _relabel(pred_labels)
    g_idx, g_ids = _relabel(gt_labels)
    n_p, n_g = p_ids.size, g_ids.size
    joint = np.bincount((g_idx * n_p + p_idx).ravel(), minlength=n_g * n_p).reshape(n_g, n_p)
    inter = joint[1:, 1:].astype(np.float64)
    gt_area = joint[1:, :].sum(axis=1).astype(np.float64)
    pred_area = joint[:, 1:].sum(axis=0).astype(np.float64)
    union = gt_area[:, None] + pred_area[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / union, 0.0)
    return {
        "iou": iou,
        "intersection": inter,
        "gt_area": gt_area,
        "pred_area": pred_area,
        "gt_ids": g_ids[1:],
        "pred_ids": p_ids[1:],
        "joint": joint,
    }


@dataclass
class InstanceState:
    """Matching counts of instance segmentations, summable over images.

    ``tp``: ``(T,)`` true positives at each of ``IOU_THRESHOLDS`` (matches at IoU > t; for t >= 0.5 a
    match is unique because objects in a label image do not overlap, so no assignment is needed).
    ``n_gt`` / ``n_pred``: object counts (FN = n_gt - tp, FP = n_pred - tp).
    ``aji_inter`` / ``aji_union``: the aggregated Jaccard index's numerator / denominator.
    ``iou_sum_50``: IoU summed over the matches at 0.5 (panoptic quality).
    ``fg_inter`` / ``fg_union``: foreground pixel overlap (pixel Jaccard).
    """

    tp: np.ndarray = field(default_factory=lambda: np.zeros(len(IOU_THRESHOLDS), dtype=np.int64))
    n_gt: int = 0
    n_pred: int = 0
    aji_inter: float = 0.0
    aji_union: float = 0.0
    iou_sum_50: float = 0.0
    fg_inter: float = 0.0
    fg_union: float = 0.0

    @classmethod
    def from_iou(cls, ov: dict[str, np.ndarray]) -> "InstanceState":
        """State of one image from :func:`instance_iou`'s output."""
        iou, inter = ov["iou"], ov["intersection"]
        gt_area, pred_area = ov["gt_area"], ov["pred_area"]
        n_g, n_p = iou.shape
        tp = np.array([int((iou > t).sum()) for t in IOU_THRESHOLDS], dtype=np.int64)

        # AJI (Kumar et al. 2017): each gt object takes its best-IoU prediction (reuse allowed);
        # unmatched gt objects add their area to the union, unused predictions add theirs.
        if n_g and n_p:
            best = iou.argmax(axis=1)
            rows = np.arange(n_g)
            hit = iou[rows, best] > 0
            aji_inter = float(inter[rows, best][hit].sum())
            aji_union = float((gt_area[hit] + pred_area[best[hit]] - inter[rows, best][hit]).sum())
            aji_union += float(gt_area[~hit].sum())
            used = np.zeros(n_p, dtype=bool)
            used[best[hit]] = True
            aji_union += float(pred_area[~used].sum())
        else:
            aji_inter = 0.0
            aji_union = float(gt_area.sum() + pred_area.sum())

        joint = ov["joint"]
        total = float(joint.sum())
        bg = float(joint[0, 0])
        fg_union = total - bg
        fg_inter = total - float(joint[0, :].sum()) - float(joint[:, 0].sum()) + bg
        return cls(
            tp=tp,
            n_gt=int(n_g),
            n_pred=int(n_p),
            aji_inter=aji_inter,
            aji_union=aji_union,
            iou_sum_50=float(iou[iou > 0.5].sum()),
            fg_inter=fg_inter,
            fg_union=fg_union,
        )

    @classmethod
    def from_arrays(cls, pred_labels: np.ndarray, gt_labels: np.ndarray) -> "InstanceState":
        return cls.from_iou(instance_iou(pred_labels, gt_labels))

    def __add__(self, other: "InstanceState") -> "InstanceState":
        if not isinstance(other, InstanceState):
            return NotImplemented
        return InstanceState(
            tp=self.tp + other.tp,
            n_gt=self.n_gt + other.n_gt,
            n_pred=self.n_pred + other.n_pred,
            aji_inter=self.aji_inter + other.aji_inter,
            aji_union=self.aji_union + other.aji_union,
            iou_sum_50=self.iou_sum_50 + other.iou_sum_50,
            fg_inter=self.fg_inter + other.fg_inter,
            fg_union=self.fg_union + other.fg_union,
        )

    __radd__ = _radd

    def finalize(self) -> dict[str, float]:
        """``ap_50`` ... ``ap_95`` (TP / (TP + FP + FN), DSB2018), ``ap_mean``, ``f1_50``,
        ``precision_50``, ``recall_50``, ``aji``, ``pq`` / ``sq`` / ``rq`` at 0.5, ``pixel_jaccard``.

        Over several images this pools the counts (a dataset-level score); the DSB2018 leaderboard
        score is instead the mean of the per-image ``ap_mean``.
        """
        out: dict[str, float] = {}
        tp = self.tp.astype(np.float64)
        fp = self.n_pred - tp
        fn = self.n_gt - tp
        aps = [_div(tp[i], tp[i] + fp[i] + fn[i]) for i in range(len(IOU_THRESHOLDS))]
        for t, ap in zip(IOU_THRESHOLDS, aps):
            out[f"ap_{round(t * 100):d}"] = ap
        out["ap_mean"] = float(np.mean(aps)) if not any(math.isnan(a) for a in aps) else math.nan
        tp50, fp50, fn50 = tp[0], fp[0], fn[0]
        out["f1_50"] = _div(2 * tp50, 2 * tp50 + fp50 + fn50)
        out["precision_50"] = _div(tp50, tp50 + fp50)
        out["recall_50"] = _div(tp50, tp50 + fn50)
        out["aji"] = _div(self.aji_inter, self.aji_union)
        rq_den = tp50 + 0.5 * fp50 + 0.5 * fn50
        out["pq"] = _div(self.iou_sum_50, rq_den)
        out["sq"] = _div(self.iou_sum_50, tp50)
        out["rq"] = _div(tp50, rq_den)
        out["pixel_jaccard"] = _div(self.fg_inter, self.fg_union)
        return out


def instance_image_metrics(pred_labels: np.ndarray, gt_labels: np.ndarray) -> dict[str, float]:
    """Instance metrics of one image: :meth:`InstanceState.finalize` plus ``n_gt`` / ``n_pred``.

    ``pred_labels``, ``gt_labels``: same-shaped integer label images ``([Z,] Y, X)``, 0 = background.
    ``ap_mean`` of one image is its DSB2018 score.
    """
    state = InstanceState.from_arrays(pred_labels, gt_labels)
    return {**state.finalize(), "n_gt": float(state.n_gt), "n_pred": float(state.n_pred)}


# ---------------------------------------------------------------- classification


def _scorable(y_binary: np.ndarray, score: np.ndarray) -> bool:
    """Both classes present and every score finite (a diverged model's NaN probabilities make
    the curve undefined, not an error)."""
    y = np.asarray(y_binary).astype(bool)
    return bool(y.any() and not y.all() and np.all(np.isfinite(np.asarray(score, dtype=np.float64))))


def roc_auc(y_binary: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve of scores ``(N,)`` for binary labels ``(N,)`` (scikit-learn's
    ``roc_auc_score``); nan when only one of the two classes is present or a score is not finite."""
    from sklearn.metrics import roc_auc_score

    if not _scorable(y_binary, score):
        return math.nan
    return float(roc_auc_score(np.asarray(y_binary).astype(bool), np.asarray(score, dtype=np.float64)))


def roc_curve(y_binary: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` at every distinct score, starting at (0, 0): scikit-learn's
    ``roc_curve(drop_intermediate=False)``. Empty arrays when a class is missing or a score is
    not finite."""
    from sklearn.metrics import roc_curve as sk_roc_curve

    if not _scorable(y_binary, score):
        return np.empty(0), np.empty(0)
    fpr, tpr, _ = sk_roc_curve(np.asarray(y_binary).astype(bool), np.asarray(score, dtype=np.float64),
                               drop_intermediate=False)
    return fpr, tpr


def _balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """scikit-learn's balanced accuracy: mean recall over the classes present in ``y`` (a
    prediction of a class absent from ``y`` is an error, not a warning)."""
    import warnings

    from sklearn.metrics import balanced_accuracy_score

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        return float(balanced_accuracy_score(y, pred))


def _class_name(c: int, class_names: dict[int, str] | Sequence[str] | None) -> str:
    if class_names is None:
        return str(c)
    if isinstance(class_names, dict):
        return str(class_names.get(c, c))
    return str(class_names[c]) if c < len(class_names) else str(c)


def classification_metrics(
    y_true: np.ndarray, prob: np.ndarray, class_names: dict[int, str] | Sequence[str] | None = None
) -> dict[str, Any]:
    """Metrics of a classifier from labels ``(N,)`` in ``[0, K)`` and probabilities ``(N, K)``.

    Returns ``accuracy``, ``balanced_accuracy`` (mean recall over classes present in ``y_true``),
    ``roc_auc_macro`` / ``roc_auc_weighted`` (one-vs-rest; K = 2 uses ``prob[:, 1]`` and both equal the
    binary AUC), ``roc_auc_per_class`` ``{name: auc}``, ``prob_mae`` / ``prob_mse`` (probabilities vs
    one-hot, as InstantDL reported), ``confusion_matrix`` (K x K list, rows = truth) and
    ``roc_auc_note`` when some classes could not be scored (absent from, or the only class in,
    ``y_true``): the AUC averages then run over the classes that could.
    """
    y = np.asarray(y_true).astype(np.int64).ravel()
    p = np.asarray(prob, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != y.size:
        raise ValueError(f"prob must be (N, K) with N = {y.size}, got {p.shape}")
    n, k = p.shape
    if n and (y.min() < 0 or y.max() >= k):
        raise ValueError(f"labels {_value_summary(y)} outside [0, {k - 1}] for {k} probability columns")
    pred = p.argmax(axis=1)
    cm = np.bincount(y * k + pred, minlength=k * k).reshape(k, k)
    support = cm.sum(axis=1)
    onehot = np.eye(k)[y]

    out: dict[str, Any] = {
        "accuracy": _div(np.diag(cm).sum(), n),
        # mean recall over the classes present in y_true
        "balanced_accuracy": _balanced_accuracy(y, pred) if n else math.nan,
    }
    per_class: dict[str, float] = {}
    if k == 2:
        auc = roc_auc(y == 1, p[:, 1])
        out["roc_auc_macro"] = out["roc_auc_weighted"] = auc
        per_class[_class_name(1, class_names)] = auc
        if math.isnan(auc):
            out["roc_auc_note"] = "ROC AUC undefined: y_true holds only one class"
    else:
        aucs = {c: roc_auc(y == c, p[:, c]) for c in range(k)}
        scored = [c for c in range(k) if not math.isnan(aucs[c])]
        per_class = {_class_name(c, class_names): aucs[c] for c in range(k)}
        if scored:
            w = support[scored].astype(np.float64)
            vals = np.array([aucs[c] for c in scored])
            out["roc_auc_macro"] = float(vals.mean())
            out["roc_auc_weighted"] = float((vals * w).sum() / w.sum())
        else:
            out["roc_auc_macro"] = out["roc_auc_weighted"] = math.nan
        skipped = [c for c in range(k) if c not in scored]
        if skipped:
            out["roc_auc_note"] = (
                f"one-vs-rest AUC over {len(scored)} of {k} classes; not scored (absent from the "
                f"groundtruth or its only class): {', '.join(_class_name(c, class_names) for c in skipped)}"
            )
    out["roc_auc_per_class"] = per_class
    out["prob_mae"] = float(np.abs(onehot - p).mean()) if n else math.nan
    out["prob_mse"] = float(((onehot - p) ** 2).mean()) if n else math.nan
    out["confusion_matrix"] = cm.tolist()
    out["class_names"] = [_class_name(c, class_names) for c in range(k)]
    return out


# ---------------------------------------------------------------- statistics and uncertainty


def bootstrap(values: np.ndarray, n_draws: int = 100, frac: float = 0.5, seed: int = 0) -> dict[str, float]:
    """Spread of the mean over ``n_draws`` random subsets of ``frac`` of the values (InstantDL paper).

    ``values``: ``(N,)`` per-image metric; nan entries are dropped first. Each draw takes
    ``max(1, round(frac * N))`` values without replacement. Returns ``median``, ``p25``, ``p75`` of the
    draw means (all nan for no values); deterministic for a given ``seed``.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if not v.size or n_draws < 1:
        return {"median": math.nan, "p25": math.nan, "p75": math.nan}
    rng = np.random.default_rng(seed)
    m = max(1, int(round(frac * v.size)))
    means = np.array([v[rng.choice(v.size, size=m, replace=False)].mean() for _ in range(int(n_draws))])
    p25, med, p75 = np.percentile(means, [25, 50, 75])
    return {"median": float(med), "p25": float(p25), "p75": float(p75)}


def uncertainty_error_correlation(unc: np.ndarray, err: np.ndarray) -> float:
    """Spearman rank correlation of uncertainty ``(N,)`` with error ``(N,)``; nan pairs dropped.

    High values mean the model knows when it is wrong. nan for fewer than 2 pairs or constant input.
    """
    u = np.asarray(unc, dtype=np.float64).ravel()
    e = np.asarray(err, dtype=np.float64).ravel()
    ok = np.isfinite(u) & np.isfinite(e)
    u, e = u[ok], e[ok]
    if u.size < 2 or np.all(u == u[0]) or np.all(e == e[0]):
        return math.nan
    from scipy.stats import spearmanr

    return float(spearmanr(u, e).statistic)


def expected_calibration_error(y_true: np.ndarray, prob: np.ndarray, n_bins: int = 10) -> float:
    """Top-label ECE: sum over confidence bins of ``|accuracy - confidence| * n_bin / N``.

    ``y_true``: ``(N,)``; ``prob``: ``(N, K)``. Bins split (0, 1] into ``n_bins`` equal intervals
    ``(lo, hi]`` (Guo et al. 2017).
    """
    y = np.asarray(y_true).astype(np.int64).ravel()
    p = np.asarray(prob, dtype=np.float64)
    if not y.size:
        return math.nan
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    b = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    acc = np.bincount(b, weights=correct, minlength=n_bins)
    cf = np.bincount(b, weights=conf, minlength=n_bins)
    return float(np.abs(acc - cf).sum() / y.size)
