"""Segmentation scores of the probe: confusion matrices, IoU, accuracy, mmseg's averages."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..core.errors import DitfError

__all__ = ["confusion_matrix", "iou_from_confusion", "summary"]


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """(num_classes, num_classes) int64 counts, rows = ground truth, columns = prediction.

    Pixels whose ground truth is `ignore_index` (or outside 0..num_classes-1) are skipped.
    """
    pred = np.asarray(pred).reshape(-1).astype(np.int64)
    gt = np.asarray(gt).reshape(-1).astype(np.int64)
    if pred.shape != gt.shape:
        raise DitfError(f"prediction has {pred.size} pixels, ground truth {gt.size}")
    valid = (gt != ignore_index) & (gt >= 0) & (gt < num_classes)
    if np.any((pred[valid] < 0) | (pred[valid] >= num_classes)):
        raise DitfError(f"prediction holds classes outside 0..{num_classes - 1}")
    counts = np.bincount(gt[valid] * num_classes + pred[valid], minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def iou_from_confusion(cm: np.ndarray) -> dict:
    """Per-class IoU (NaN for a class absent from both ground truth and prediction), mIoU
    (mean over the other classes, as mmseg), per-class accuracy and overall pixel accuracy."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    gt_count = cm.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt_count > 0, tp / gt_count, np.nan)
    total = cm.sum()
    return {
        "miou": float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else float("nan"),
        "iou": iou,
        "acc": acc,
        "macc": float(np.nanmean(acc)) if np.any(~np.isnan(acc)) else float("nan"),
        "aacc": float(tp.sum() / total) if total > 0 else float("nan"),
    }


def summary(cm: np.ndarray, names: Sequence[str]) -> dict:
    """What a report shows of `cm`: mIoU, mean and overall accuracy, per-class IoU and accuracy (percent)."""
    metrics = iou_from_confusion(cm)

    def plain(values):  # percent, full precision (rounding is for display only)
        return [None if np.isnan(v) else 100.0 * float(v) for v in values]

    return {
        "miou": 100.0 * metrics["miou"],
        "macc": 100.0 * metrics["macc"],
        "aacc": 100.0 * metrics["aacc"],
        "per_class_iou": dict(zip(names, plain(metrics["iou"]))),
        "per_class_acc": dict(zip(names, plain(metrics["acc"]))),
        "pixels": int(cm.sum()),
    }
