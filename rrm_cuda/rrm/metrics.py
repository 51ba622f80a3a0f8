"""Segmentation metrics: confusion matrix, per-class IoU and mIoU (PASCAL VOC: 21 classes, ignore 255)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

VOC_CLASSES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


def confusion_matrix(
    pred: Tensor | np.ndarray, target: Tensor | np.ndarray, num_classes: int = 21, ignore_index: int = 255
) -> np.ndarray:
    """Confusion matrix ``M[t, p]`` = number of pixels of true class t predicted p.

    Pixels whose target is ``ignore_index`` or outside [0, num_classes) are skipped, and so are pixels
    whose prediction is ``ignore_index`` (an unlabelled pseudo label makes no claim).

    Args:
        pred, target: integer arrays of the same shape (any, e.g. (B, H, W)).

    Returns:
        (num_classes, num_classes) int64 numpy array.

    Example:
        >>> confusion_matrix(np.array([0, 1, 1, 255]), np.array([0, 1, 0, 1]), num_classes=2).tolist()
        [[1, 1], [0, 1]]
    """
    p = pred.detach().cpu().numpy() if isinstance(pred, Tensor) else np.asarray(pred)
    t = target.detach().cpu().numpy() if isinstance(target, Tensor) else np.asarray(target)
    if p.shape != t.shape:
        raise ValueError(f"pred and target must have the same shape; got {p.shape} and {t.shape}")
    p = p.astype(np.int64).ravel()
    t = t.astype(np.int64).ravel()
    keep = (t >= 0) & (t < num_classes) & (t != ignore_index) & (p != ignore_index)
    if bool(((p[keep] < 0) | (p[keep] >= num_classes)).any()):
        raise ValueError(f"pred has labels outside [0, {num_classes}) other than {ignore_index}")
    return np.bincount(t[keep] * num_classes + p[keep], minlength=num_classes**2).reshape(num_classes, num_classes)


def iou_from_confusion(conf: np.ndarray) -> np.ndarray:
    """Per-class IoU ``TP / (TP + FP + FN)`` from a confusion matrix; NaN for a class absent from both
    prediction and ground truth (union 0)."""
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)


def mean_iou(conf: np.ndarray) -> float:
    """mIoU: the mean of the per-class IoUs over classes with a non-empty union (all 21 on VOC val)."""
    iou = iou_from_confusion(conf)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


def pixel_accuracy(conf: np.ndarray) -> float:
    """Overall pixel accuracy ``trace / total``."""
    total = conf.sum()
    return float(np.trace(conf) / total) if total else float("nan")


def as_long(x: Tensor | np.ndarray) -> Tensor:
    """Integer label map to an int64 tensor (helper for callers mixing numpy and torch)."""
    return torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).long()
