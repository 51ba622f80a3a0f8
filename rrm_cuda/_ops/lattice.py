"""Fake kernels for the permutohedral-lattice ops (schemas: csrc/rrm.cpp; autograd:
csrc/lattice/lattice_autograd.cpp)."""

from __future__ import annotations

import torch

from .._ext import ops


@torch.library.register_fake("rrm_cuda::permutohedral_filter")
def _filter_fake(values, features, reverse=False, cache=False):
    torch._check(values.dim() == 3 and features.dim() == 3)
    return values.new_empty(values.shape)


@torch.library.register_fake("rrm_cuda::_permutohedral_filter_emulated")
def _filter_emulated_fake(values, features, reverse=False, cache=False):
    return values.new_empty(values.shape)


@torch.library.register_fake("rrm_cuda::_permutohedral_filter_backward")
def _filter_backward_fake(values, features, grad, reverse=False, cache=False):
    torch._check(values.dim() == 3 and features.dim() == 3 and grad.shape == values.shape)
    return values.new_empty(values.shape), features.new_empty(features.shape)


@torch.library.register_fake("rrm_cuda::_permutohedral_filter_backward_emulated")
def _filter_backward_emulated_fake(values, features, grad, reverse=False, cache=False):
    return values.new_empty(values.shape), features.new_empty(features.shape)


@torch.library.register_fake("rrm_cuda::lattice_num_vertices")
def _num_vertices_fake(features):
    return features.new_empty((features.shape[0],), dtype=torch.long)


@torch.library.register_fake("rrm_cuda::_lattice_tables")
def _tables_fake(features, emulated=False):
    B, d, N = features.shape
    m = torch.library.get_ctx().new_dynamic_size()
    int_entries = features.new_empty((B, N, d + 1), dtype=torch.int32)
    return int_entries, features.new_empty((B, N, d + 1)), features.new_empty((B, d + 1, m, 2), dtype=torch.int32)


@torch.library.register_fake("rrm_cuda::dense_crf")
def _crf_fake(unary, features, compat, diagonal, normalization, iterations, cache=()):
    return unary.new_empty(unary.shape)


@torch.library.register_fake("rrm_cuda::_dense_crf_emulated")
def _crf_emulated_fake(unary, features, compat, diagonal, normalization, iterations, cache=()):
    return unary.new_empty(unary.shape)


@torch.library.register_fake("rrm_cuda::dense_crf_backward")
def _crf_backward_fake(grad, unary, features, compat, diagonal, normalization, iterations, compat_grad=True, cache=()):
    return unary.new_empty(unary.shape), compat.new_empty(compat.shape)


@torch.library.register_fake("rrm_cuda::_dense_crf_backward_emulated")
def _crf_backward_emulated_fake(
    grad, unary, features, compat, diagonal, normalization, iterations, compat_grad=True, cache=()
):
    return unary.new_empty(unary.shape), compat.new_empty(compat.shape)


def _filter_setup_context(ctx, inputs, output):
    values, features, reverse = inputs[0], inputs[1], inputs[2]
    ctx.save_for_backward(features, values if features.requires_grad else None)
    ctx.reverse = reverse
    ctx.cache = inputs[3] if len(inputs) > 3 else False


def _filter_backward(ctx, grad):
    features, values = ctx.saved_tensors
    grad = grad.contiguous()
    grad_values = grad_features = None
    if ctx.needs_input_grad[1]:  # both from one lattice; the features': the barycentric weights' derivative
        if torch.is_grad_enabled():
            raise RuntimeError(
                "rrm_cuda::permutohedral_filter (with a gradient w.r.t. features): its backward is not "
                "differentiable, so a double backward (create_graph=True through this op) is not supported"
            )
        grad_values, grad_features = ops._permutohedral_filter_backward(values, features, grad, ctx.reverse, ctx.cache)
        return (grad_values if ctx.needs_input_grad[0] else None), grad_features, None, None
    if ctx.needs_input_grad[0]:
        # K = alpha S^T B_d..B_0 S; each B_j is symmetric, so K^T blurs the axes in reverse order.
        grad_values = ops.permutohedral_filter(grad, features, not ctx.reverse, ctx.cache)
    return grad_values, grad_features, None, None


# permutohedral_filter's and dense_crf's autograd is C++ (csrc/lattice/lattice_autograd.cpp: host time
# per call). The helpers here serve PermutohedralFilterFunction, the autograd.Function form.


class PermutohedralFilterFunction(torch.autograd.Function):
    """``torch.autograd.Function`` form of :func:`rrm_cuda.permutohedral_filter` (the values' gradient
    is the exact adjoint: the same filter with the blur order reversed; the features' is the
    barycentric weights' derivative, as the op's C++ autograd). Unlike the op's C++ autograd, its
    backward builds the lattice again (unless ``cache``): the hand-over of the forward's lattice is
    C++ only."""

    @staticmethod
    def forward(values, features, reverse=False, cache=False):
        return ops.permutohedral_filter(values, features, reverse, cache)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _filter_setup_context(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad):
        return _filter_backward(ctx, grad)
