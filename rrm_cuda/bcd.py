"""BCD (batch-based class distance) loss of RRM (Pattern Recognition 2022), SPEC §4, and the fused
feature-centre reductions it is built from.

Shapes: B images, C feature channels, K classes (class 0 is the background), ``*S`` spatial
dimensions (h, w; flattened to N internally). Reductions are returned in the compute dtype: float64
for float64 features, float32 otherwise (float16 / bfloat16 features accumulate in float32).

Passes over the features: :func:`masked_feature_sums` one read (backward: one write);
:func:`feature_center_cosine` one read (backward: two reads and one write). On the CPU every sum
runs in a fixed order, so the results do not depend on the number of threads; the CUDA kernels use
no floating-point atomics either (fixed chunks of each class's pixels are summed in a fixed order,
then the chunks in order), so they are bitwise reproducible on a given GPU, and differ from the CPU in
rounding only.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from . import _validate as V
from ._ext import ops

__all__ = ["BCDLoss", "bcd_loss", "feature_center_cosine", "masked_feature_centers", "masked_feature_sums"]

#: the authors' epsilon, in the centres ``Σ F / (n + eps)`` and the cosine ``a.b / (|a||b| + eps)``
EPS = 1e-7

# Stands for "no ignore_index" in the ops (which refuse an ignore_index inside [0, K)).
_NO_IGNORE = -(2**63)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _flat_features(features: Tensor, name: str = "features") -> Tensor:
    if V.checking_values():
        # NaN/Inf are detected on the reductions' outputs (cheap), not by an extra pass here.
        V.tensor(features, name, dtypes=V.FLOAT_DTYPES, finite=False, nonempty=True)
        if features.dim() < 3:
            raise ValueError(f"{name} must have shape (B, C, *S); got {tuple(features.shape)}")
    return features.reshape(features.shape[0], features.shape[1], -1)  # a view for NCHW and channels-last


def _flat_labels(labels: Tensor, features: Tensor, num_classes: int, ignore_index: int | None) -> tuple[Tensor, int]:
    if V.checking_values():
        V.tensor(labels, "labels")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(
                f"labels must have an integer dtype (or be soft masks (B, K, *S) of a float dtype); got "
                f"{str(labels.dtype).replace('torch.', '')}"
            )
        if (
            labels.dim() != features.dim() - 1
            or labels.shape[0] != features.shape[0]
            or (labels.shape[1:] != features.shape[2:])
        ):
            raise ValueError(
                f"labels must have shape (B, *S) = {(features.shape[0], *features.shape[2:])} to match "
                f"features {tuple(features.shape)}; got {tuple(labels.shape)}"
            )
        V.same_device({"features": features, "labels": labels})
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int; got {num_classes!r}")
        if ignore_index is not None and 0 <= V.int64(ignore_index, "ignore_index") < num_classes:
            raise ValueError(f"ignore_index ({ignore_index}) must not be a class in [0, num_classes = {num_classes})")
    return labels.reshape(labels.shape[0], -1), _NO_IGNORE if ignore_index is None else int(ignore_index)


def _check_finite(sums: Tensor, name: str = "features", inputs: Sequence[Tensor] = ()) -> None:
    """NaN/Inf in the op's output ``sums``: NaN/Inf inputs, or finite ones whose sums overflow (told
    apart by a pass over ``inputs``, only then)."""
    if V.checking_values(sums) and not bool(torch.isfinite(sums).all()):
        if inputs and all(bool(torch.isfinite(x).all()) for x in inputs):
            raise _too_large(name, sums.dtype, inputs[0])
        raise ValueError(f"{name} contains NaN or Inf values (in pixels that are not ignored)")


def _too_large(name: str, dtype: torch.dtype, features: Tensor) -> ValueError:
    big = float(features.detach().abs().amax())
    fix = "pass float64 features or scale them down" if dtype != torch.float64 else "scale them down"
    return ValueError(
        f"{name} are too large for {dtype}: their sums or dot products overflow (largest |feature| {big:.3g}); {fix}"
    )


def masked_feature_sums(
    features: Tensor, labels: Tensor, num_classes: int, *, ignore_index: int | None = None
) -> tuple[Tensor, Tensor]:
    r"""Per-(image, class) feature sums and pixel counts, in one pass over the features.

    ``sums[b, k] = Σ_{p: labels[b, p] = k} features[b, :, p]``, ``counts[b, k] = #{p: labels[b, p] = k}``.
    Differentiable w.r.t. ``features`` (the backward is a gather: one write of the features' gradient).

    Args:
        features: (B, C, *S) float32 / float64 / float16 / bfloat16, any memory layout (NCHW,
            channels-last and sliced tensors are read in place).
        labels: (B, *S) integer; every entry in [0, num_classes) or equal to ``ignore_index``.
        num_classes: K.
        ignore_index: label of pixels to leave out (must not be a class index); None: none.

    Returns:
        ``(sums (B, K, C), counts (B, K))`` of the compute dtype.

    Example:
        >>> f = torch.arange(8.0).reshape(1, 2, 2, 2)
        >>> s, n = masked_feature_sums(f, torch.tensor([[[0, 1], [1, 1]]]), 2)
        >>> s, n
        (tensor([[[ 0.,  4.],
                 [ 6., 18.]]]), tensor([[1., 3.]]))
    """
    f = _flat_features(features)
    lab, ignore = _flat_labels(labels, features, num_classes, ignore_index)
    sums, counts = ops.masked_feature_sums(f, lab, num_classes, ignore)
    _check_finite(sums, inputs=(features,))
    return sums, counts


def masked_feature_centers(
    features: Tensor,
    labels: Tensor,
    num_classes: int | None = None,
    *,
    ignore_index: int | None = None,
    reduction: str = "mean",
    eps: float = EPS,
) -> tuple[Tensor, Tensor]:
    r"""Per-(image, class) feature centres: ``Σ_{p: M=k} F_p / (n_k + eps)`` (the authors' form; an
    absent class gets a zero centre), or the plain sums with ``reduction="sum"``.

    ``labels`` may be hard labels (B, *S) (fused kernel, one pass over the features) or soft masks
    (B, K, *S) of a float dtype, where ``sums[b, k] = Σ_p masks[b, k, p] F[b, :, p]`` and
    ``counts[b, k] = Σ_p masks[b, k, p]`` (a batched matrix product; differentiable w.r.t. the masks too).

    Args:
        features: (B, C, *S) float32 / float64 / float16 / bfloat16.
        labels: (B, *S) integer labels or (B, K, *S) soft masks.
        num_classes: K (required for hard labels; taken from the masks otherwise).
        ignore_index: hard labels only: label of pixels to leave out; None: none.
        reduction: ``"mean"`` (centres) or ``"sum"``.
        eps: added to the counts in the mean (1e-7 as in the authors' code), a finite number >= 0
            (0: exact means; an absent class still gets a zero centre).

    Returns:
        ``(centers (B, K, C), counts (B, K))`` of the compute dtype; differentiable w.r.t. ``features``.

    Example:
        >>> f = torch.arange(8.0).reshape(1, 2, 2, 2)
        >>> c, n = masked_feature_centers(f, torch.tensor([[[0, 1], [1, 1]]]), 2, eps=0.0)
        >>> c
        tensor([[[0., 4.],
                 [2., 6.]]])
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum'; got {reduction!r}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0; got {eps!r}")
    if isinstance(labels, Tensor) and labels.is_floating_point():
        f = _flat_features(features)
        if V.checking_values():
            V.tensor(labels, "labels", dtypes=V.FLOAT_DTYPES, finite=V.checking_values(labels))
            if (
                labels.dim() != features.dim()
                or labels.shape[0] != features.shape[0]
                or (labels.shape[2:] != features.shape[2:])
            ):
                raise ValueError(
                    f"soft masks (labels) must have shape (B, K, *S) with B, *S of features "
                    f"{tuple(features.shape)}; got {tuple(labels.shape)}"
                )
            if num_classes is not None and labels.shape[1] != num_classes:
                raise ValueError(f"labels has {labels.shape[1]} classes but num_classes = {num_classes}")
            if ignore_index is not None:
                raise ValueError("ignore_index applies to integer labels only, not to soft masks")
            V.same_device({"features": features, "labels": labels})
        ct = _compute_dtype(features.dtype)
        m = labels.reshape(labels.shape[0], labels.shape[1], -1).to(ct)
        sums = torch.bmm(m, f.to(ct).transpose(1, 2))
        counts = m.sum(-1)
        _check_finite(sums, inputs=(features, labels))
    else:
        if num_classes is None:
            raise ValueError("num_classes is required with integer labels")
        sums, counts = masked_feature_sums(features, labels, num_classes, ignore_index=ignore_index)
    if reduction == "sum":
        return sums, counts
    # eps = 0: exact means, and still a zero centre (not 0/0) for an absent class
    denom = counts + eps if eps > 0 else counts.masked_fill(counts == 0, 1)
    return sums / denom.unsqueeze(-1), counts


def feature_center_cosine(
    features: Tensor, labels: Tensor, centers: Tensor, *, ignore_index: int | None = None
) -> Tensor:
    r"""Per-(image, class) sums of the cosine between each pixel's feature and its class centre,
    in one pass over the features:
    ``out[b, k] = Σ_{p: labels[b, p] = k} cos(F[b, :, p], centers[b, k])``,
    ``cos(a, b) = a·b / (‖a‖‖b‖ + 1e-7)``. Differentiable w.r.t. ``features`` and ``centers``.

    Args:
        features: (B, C, *S) float32 / float64 / float16 / bfloat16, any memory layout.
        labels: (B, *S) integer; every entry in [0, K) or equal to ``ignore_index``.
        centers: (B, K, C); cast to the compute dtype.
        ignore_index: label of pixels to leave out (must not be a class index); None: none.

    Returns:
        (B, K) of the compute dtype.

    Example:
        >>> f = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # two pixels: (1, 0) and (0, 1)
        >>> c = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
        >>> feature_center_cosine(f, torch.tensor([[0, 1]]), c)
        tensor([[1.0000, 0.7071]])
    """
    f = _flat_features(features)
    if V.checking_values():
        V.tensor(centers, "centers", ndim=3, dtypes=V.FLOAT_DTYPES, finite=False)  # checked on the output
        if centers.shape[0] != features.shape[0] or centers.shape[2] != features.shape[1]:
            raise ValueError(
                f"centers must have shape (B, K, C) with B, C of features {tuple(features.shape)}; "
                f"got {tuple(centers.shape)}"
            )
        if centers.shape[1] < 1:
            raise ValueError(f"centers must have at least one class; got shape {tuple(centers.shape)}")
        V.same_device({"features": features, "centers": centers})
    lab, ignore = _flat_labels(labels, features, centers.shape[1], ignore_index)
    out = ops.feature_center_cosine(f, lab, centers.to(_compute_dtype(features.dtype)), ignore)[0]
    _check_finite(out, "features or centers", inputs=(features, centers))
    return out


def bcd_loss(seg_logits: Tensor, features: Tensor, *, check_inputs: bool = True) -> Tensor:
    r"""The BCD loss of RRM (Pattern Recognition 2022), exactly as the authors compute it (SPEC §4).

    With ``M = argmax_k seg_logits`` (no gradient through M) and ``cos(a, b) = a·b / (‖a‖‖b‖ + 1e-7)``:

    - background centre per image ``c_b = Σ_{M=0} F / (n_b + 1e-7)``; foreground centres pooled over
      the batch ``c_k = Σ_{(b, p): M=k} F / (n_k + 1e-7)`` for the classes present, 𝒦 = {k ≥ 1: n_k ≥ 1};
    - compactness ``(T₁ + T₂) / (|𝒦| + B)`` with ``T₁ = Σ_b mean_{M=0}(1 − cos(F, c_b))`` (2 for an
      image without background) and ``T₂ = Σ_{k∈𝒦} mean_{M=k}(1 − cos(F, c_k))``;
    - separation ``½ L_ff + ½ L_fb``: ``L_ff`` the mean of ``1 + cos(c_k, c_l)`` over ordered pairs
      k ≠ l of 𝒦 (0 if |𝒦| ≤ 1), ``L_fb`` the mean of ``1 + cos(c_k, c_b)`` over 𝒦 × images;
      ``½ L_ff + 1`` if the batch has no background pixel, 0 if it has no foreground pixel;
    - ``L = separation + compactness``; gradients flow through the centres into ``features``.

    One op and one autograd node (``torch.ops.rrm_cuda.bcd_loss``): two fused passes over the features
    (sums and counts; cosines) on labels sorted once, and the epilogue on the (B, K, C)-sized results;
    its backward (``bcd_loss_backward``) is the epilogue's adjoint, one cosine backward and one gather.

    Args:
        seg_logits: (B, K, *S) segmentation scores at the features' resolution (K ≥ 1, class 0 the
            background); only their argmax is used.
        features: (B, C, *S) float32 / float64 / float16 / bfloat16, any memory layout.
        check_inputs: raise on NaN/Inf in ``seg_logits`` or the features, and on float32 features so
            large (≳ 1e19) that the loss's dot products overflow (the op reports them; one device
            synchronisation to read its flags). Unchecked, nothing is read back and such values give
            a NaN or infinite loss (a training loop's own finiteness check of the loss sees them).

    Returns:
        A scalar of the compute dtype (float64 for float64 features, float32 otherwise).

    Example:
        >>> seg = torch.tensor([[[[5.0, 0.0]], [[0.0, 5.0]]]])  # (1, 2, 1, 2): pixel 0 bg, pixel 1 class 1
        >>> f = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # orthogonal features
        >>> bcd_loss(seg, f)
        tensor(0.5000)
    """
    if V.checking_values():
        # NaN/Inf in seg_logits and features are reported by the op (one host synchronisation).
        V.tensor(seg_logits, "seg_logits", dtypes=V.FLOAT_DTYPES, finite=False, nonempty=True)
        V.tensor(features, "features", dtypes=V.FLOAT_DTYPES, finite=False, nonempty=True)
        if seg_logits.dim() < 3:
            raise ValueError(f"seg_logits must have shape (B, K, *S); got {tuple(seg_logits.shape)}")
        if (
            features.dim() != seg_logits.dim()
            or features.shape[0] != seg_logits.shape[0]
            or (features.shape[2:] != seg_logits.shape[2:])
        ):
            raise ValueError(
                f"features must have shape (B, C, *S) with B, *S of seg_logits {tuple(seg_logits.shape)}; "
                f"got {tuple(features.shape)}"
            )
        V.same_device({"seg_logits": seg_logits, "features": features})
    B, K = seg_logits.shape[:2]
    loss, *_, finite = ops.bcd_loss(seg_logits.detach().reshape(B, K, -1), features.reshape(B, features.shape[1], -1))
    if check_inputs and V.checking_values(seg_logits, features):
        # the one host synchronisation
        seg_finite, sums_finite, loss_finite = torch.cat([finite, torch.isfinite(loss).reshape(1)]).tolist()
        if not seg_finite:
            V.check_finite(seg_logits, "seg_logits")  # raises, naming NaN or Inf
        if not sums_finite and not bool(torch.isfinite(features).all()):
            raise ValueError("features contains NaN or Inf values")
        if not (sums_finite and loss_finite):  # finite features whose sums or products overflow
            raise _too_large("features", loss.dtype, features)
    return loss


class BCDLoss(nn.Module):
    """Module form of :func:`bcd_loss`: ``BCDLoss()(seg_logits, features)`` -> scalar.

    Example:
        >>> seg = torch.tensor([[[[5.0, 0.0]], [[0.0, 5.0]]]])
        >>> f = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
        >>> BCDLoss()(seg, f)
        tensor(0.5000)
    """

    def __init__(self, check_inputs: bool = True) -> None:
        super().__init__()
        self.check_inputs = check_inputs

    def forward(self, seg_logits: Tensor, features: Tensor) -> Tensor:
        return bcd_loss(seg_logits, features, check_inputs=self.check_inputs)
