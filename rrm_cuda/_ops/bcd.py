"""Fake kernels and autograd for the BCD-loss reductions (schemas: csrc/rrm.cpp, SPEC §4).

``masked_feature_sums`` and ``masked_feature_gather`` are each other's adjoint, so each one's
backward is the other; ``feature_center_cosine`` has its own fused backward op, fed with the per-pixel
dots and norms its forward returned. ``bcd_loss`` (the whole loss, one autograd node) returns what its
backward op ``bcd_loss_backward`` needs: the labels, centres, per-pixel dots and norms, cosine sums
and counts (no gradient flows through any of them).
"""

from __future__ import annotations

import torch

from .._ext import ops


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _register_fakes(emulated: bool) -> None:
    def name(op: str) -> str:
        return f"rrm_cuda::_{op}_emulated" if emulated else f"rrm_cuda::{op}"

    @torch.library.register_fake(name("masked_feature_sums"))
    def _sums_fake(features, labels, num_classes, ignore_index=-1):
        B, C, _ = features.shape
        ct = _compute_dtype(features.dtype)
        return features.new_empty((B, num_classes, C), dtype=ct), features.new_empty((B, num_classes), dtype=ct)

    @torch.library.register_fake(name("masked_feature_gather"))
    def _gather_fake(values, labels, ignore_index=-1):
        B, _, C = values.shape
        return values.new_empty((B, C, labels.shape[1]))

    @torch.library.register_fake(name("feature_center_cosine"))
    def _cosine_fake(features, labels, centers, ignore_index=-1):
        B, _, N = features.shape
        K = centers.shape[1]
        return centers.new_empty((B, K)), centers.new_empty((B, N)), centers.new_empty((B, N))

    @torch.library.register_fake(name("feature_center_cosine_backward"))
    def _cosine_backward_fake(grad, features, labels, centers, dot, norm, ignore_index=-1):
        return features.new_empty(features.shape), centers.new_empty(centers.shape)

    @torch.library.register_fake(name("bcd_loss"))
    def _loss_fake(seg_logits, features):
        B, C, N = features.shape
        K = seg_logits.shape[1]
        ct = _compute_dtype(features.dtype)
        return (
            features.new_empty((), dtype=ct),
            features.new_empty((B, N), dtype=torch.int64),
            features.new_empty((B, K, C), dtype=ct),
            features.new_empty((B, N), dtype=ct),
            features.new_empty((B, N), dtype=ct),
            features.new_empty((B, K), dtype=ct),
            features.new_empty((B, K), dtype=ct),
            features.new_empty((2,), dtype=torch.bool),
        )

    @torch.library.register_fake(name("bcd_loss_backward"))
    def _loss_backward_fake(grad, features, labels, centers, dot, norm, cos_sums, counts):
        return features.new_empty(features.shape)


_register_fakes(emulated=False)
_register_fakes(emulated=True)


# ---- masked_feature_sums <-> masked_feature_gather ------------------------------------------------


def _sums_setup_context(ctx, inputs, output):
    features, labels, num_classes, ignore_index = inputs
    ctx.save_for_backward(labels)
    ctx.ignore_index = ignore_index
    ctx.features_dtype = features.dtype
    ctx.mark_non_differentiable(output[1])


def _sums_backward(ctx, grad_sums, grad_counts):
    (labels,) = ctx.saved_tensors
    grad_features = None
    if ctx.needs_input_grad[0]:
        grad = torch.zeros_like(grad_sums) if grad_sums is None else grad_sums
        grad_features = ops.masked_feature_gather(grad, labels, ctx.ignore_index).to(ctx.features_dtype)
    return grad_features, None, None, None


torch.library.register_autograd("rrm_cuda::masked_feature_sums", _sums_backward, setup_context=_sums_setup_context)


def _gather_setup_context(ctx, inputs, output):
    values, labels, ignore_index = inputs
    ctx.save_for_backward(labels)
    ctx.ignore_index = ignore_index
    ctx.num_classes = values.shape[1]
    ctx.values_dtype = values.dtype


def _gather_backward(ctx, grad):
    (labels,) = ctx.saved_tensors
    grad_values = None
    if ctx.needs_input_grad[0]:
        sums, _ = ops.masked_feature_sums(grad, labels, ctx.num_classes, ctx.ignore_index)
        grad_values = sums.to(ctx.values_dtype)
    return grad_values, None, None


torch.library.register_autograd(
    "rrm_cuda::masked_feature_gather", _gather_backward, setup_context=_gather_setup_context
)


# ---- feature_center_cosine ---------------------------------------------------------------------------


def _cosine_setup_context(ctx, inputs, output):
    features, labels, centers, ignore_index = inputs
    _, dot, norm = output
    ctx.save_for_backward(features, labels, centers, dot, norm)
    ctx.ignore_index = ignore_index
    ctx.mark_non_differentiable(dot, norm)


def _cosine_backward(ctx, grad, grad_dot, grad_norm):
    if torch.is_grad_enabled():  # create_graph=True: this backward is not differentiable
        raise RuntimeError(
            "rrm_cuda::feature_center_cosine: its backward is not differentiable, so a double backward "
            "(create_graph=True through this op) is not supported"
        )
    features, labels, centers, dot, norm = ctx.saved_tensors
    if grad is None:
        grad = centers.new_zeros(centers.shape[:2])
    grad_features, grad_centers = ops.feature_center_cosine_backward(
        grad.contiguous(), features, labels, centers, dot, norm, ctx.ignore_index
    )
    return (
        grad_features if ctx.needs_input_grad[0] else None,
        None,
        grad_centers if ctx.needs_input_grad[2] else None,
        None,
    )


torch.library.register_autograd(
    "rrm_cuda::feature_center_cosine", _cosine_backward, setup_context=_cosine_setup_context
)


# ---- bcd_loss: the whole loss --------------------------------------------------------------------------


# bcd_loss's autograd is C++ (csrc/bcd/bcd_autograd.cpp): the loss runs every training iteration with a
# gradient, where torch.library's Python wrapper cost about 25 us of host time per call.
