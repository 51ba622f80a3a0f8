"""RRM's training losses: classification, CE on background / foreground pseudo labels, and thin
wrappers of the dense-CRF energy loss and the BCD loss (rrm_cuda ops).

Shapes: B batch, K = 21 segmentation classes, H×W crop, h×w feature grid, C feature channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = 255


def classification_loss(cls_logits: Tensor, labels: Tensor) -> Tensor:
    """Multilabel soft-margin loss: cls_logits (B, 20), labels (B, 20) in {0, 1} -> scalar."""
    return F.multilabel_soft_margin_loss(cls_logits, labels.to(cls_logits.dtype))


def _masked_ce(logits: Tensor, target: Tensor) -> Tensor:
    if not bool((target != IGNORE).any()):  # no labelled pixel: the mean would be NaN
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target, ignore_index=IGNORE)


def seg_ce_losses(seg_up: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
    """RRM's split cross-entropy: ``(CE_bg, CE_fg)``, each the mean CE over the pixels labelled
    background / foreground (ignore 255); 0 (with a graph) when a part has no pixel.

    Args:
        seg_up: (B, K, H, W) segmentation logits at the label's resolution.
        label: (B, H, W) int64 pseudo labels in {0..K-1, 255}.
    """
    bg = torch.where(label == 0, label, torch.full_like(label, IGNORE))
    fg = torch.where(label == 0, torch.full_like(label, IGNORE), label)
    logits = seg_up.float()
    return _masked_ce(logits, bg), _masked_ce(logits, fg)


def _missing(op: str, flag: str) -> RuntimeError:
    return RuntimeError(
        f"rrm_cuda.{op} is not available in this build of rrm_cuda; disable the loss with {flag} "
        "(or set its weight to 0) or build a version of rrm_cuda that provides it"
    )


def check_available(energy: bool, bcd: bool) -> None:
    """Raise at start-up (not at the first pseudo-label iteration) if an enabled loss's op is missing."""
    import rrm_cuda

    if energy and not hasattr(rrm_cuda, "DenseEnergyLoss"):
        raise _missing("DenseEnergyLoss", "--energy-weight 0")
    if bcd and not hasattr(rrm_cuda, "bcd_loss"):
        raise _missing("bcd_loss", "--bcd-weight 0")


def energy_loss(
    images: Tensor,
    probs: Tensor,
    rois: Tensor,
    seg_label: Tensor,
    *,
    weight: float = 1e-7,
    sigma_rgb: float = 15.0,
    sigma_xy: float = 100.0,
    scale_factor: float = 0.5,
    check_inputs: bool = False,
) -> Tensor:
    """Dense-CRF energy loss via ``rrm_cuda.DenseEnergyLoss(weight, sigma_rgb, sigma_xy, scale_factor)``.

    images (B, 3, H, W) 0–255; probs (B, K, H, W) softmax; rois (B, H, W); seg_label (B, 1, H, W)
    float with 255 = unlabelled -> scalar (already multiplied by ``weight``). Unchecked by default:
    the training step makes these inputs itself (loader images and ROI, softmax, pseudo labels), so
    the value checks would only cost a device synchronisation; a NaN still shows in the loss, which
    the step checks in its one host read."""
    import rrm_cuda

    module = getattr(rrm_cuda, "DenseEnergyLoss", None)
    if module is None:
        raise _missing("DenseEnergyLoss", "--energy-weight 0")
    return module(weight, sigma_rgb, sigma_xy, scale_factor, check_inputs=check_inputs)(images, probs, rois, seg_label)


def bcd_loss(seg_logits: Tensor, features: Tensor, check_inputs: bool = False) -> Tensor:
    """BCD loss via ``rrm_cuda.bcd_loss``: seg_logits (B, K, h, w), features (B, C, h, w) -> scalar.
    Unchecked by default, as :func:`energy_loss` (NaN/Inf give a NaN loss, which the step sees)."""
    import rrm_cuda

    fn = getattr(rrm_cuda, "bcd_loss", None)
    if fn is None:
        raise _missing("bcd_loss", "--bcd-weight 0")
    return fn(seg_logits, features, check_inputs=check_inputs)
