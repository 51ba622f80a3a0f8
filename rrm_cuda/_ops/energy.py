"""Fake kernels and autograd for the dense-CRF energy op (schema: csrc/rrm.cpp, kernels: csrc/energy).

The op returns, next to the per-image energy, the gradient direction ``d energy_b / d probs`` of the
requested mode (computed in the forward pass on the lattice it already built), so the backward is a
product with the incoming per-image gradient: no lattice rebuild and no filtering in the backward.
"""

from __future__ import annotations

import torch

from .. import _ext  # noqa: F401  (loads the extension, which registers the schemas)


def _energy_fake(probs, gate, features, mass=None, grad_mode=0):
    torch._check(probs.dim() == 3 and gate.dim() == 2 and features.dim() == 3)
    energy = probs.new_empty((probs.shape[0],))
    grad_dir = probs.new_empty(probs.shape) if grad_mode != 0 else probs.new_empty((0,))
    return energy, grad_dir


torch.library.register_fake("rrm_cuda::dense_energy")(_energy_fake)
torch.library.register_fake("rrm_cuda::_dense_energy_emulated")(_energy_fake)


def _energy_setup_context(ctx, inputs, output):
    grad_mode = inputs[4]
    _, grad_dir = output
    ctx.grad_mode = grad_mode
    ctx.mark_non_differentiable(grad_dir)
    # grad_dir is an output without a gradient: no (B, K, N) zeros for it in the backward
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad_dir)


def _energy_backward(ctx, grad_energy, _grad_dir_unused):
    (grad_dir,) = ctx.saved_tensors
    if grad_energy is None:  # only grad_dir was used: nothing flows back
        return None, None, None, None, None
    if ctx.grad_mode == 0:
        raise RuntimeError(
            "rrm_cuda::dense_energy was called with grad_mode=0 (no gradient direction computed); "
            "call it with grad_mode=1 (rloss) or 2 (exact) to differentiate it"
        )
    grad_probs = grad_dir * grad_energy.reshape(-1, 1, 1).to(grad_dir.dtype)
    # gate, features and mass are constants of the loss (the gate is held constant, as in rloss).
    return grad_probs, None, None, None, None


for _name in ("rrm_cuda::dense_energy", "rrm_cuda::_dense_energy_emulated"):
    torch.library.register_autograd(_name, _energy_backward, setup_context=_energy_setup_context)


# ---- the energy's inputs at its working scale (downscale, ROI product and gate in one pass) ----


def _inputs_fake(segmentations, rois=None, unlabelled=None, stride=1, gate=True, tile=0):
    torch._check(segmentations.dim() == 4 and stride in (1, 2) and tile >= 0)
    B, K, H, W = segmentations.shape
    probs = segmentations.new_empty((B, K, H // stride, W // stride))
    g = segmentations.new_empty((B, H // stride, W // stride)) if gate else segmentations.new_empty((0,))
    return probs, g


def _inputs_backward_fake(grad, rois, height, width, stride, tile=0):
    torch._check(grad.dim() == 4 and tile >= 0)
    return grad.new_empty((grad.shape[0], grad.shape[1], height, width))


def _inputs_setup_context(ctx, inputs, output):
    segmentations, rois, _unlabelled, stride, _gate, *tile = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.stride = stride
    ctx.tile = tile[0] if tile else 0
    ctx.size = (segmentations.shape[2], segmentations.shape[3])
    ctx.save_for_backward(rois)


def _inputs_backward(backward_op):
    def backward(ctx, grad_probs, _grad_gate):
        if grad_probs is None:
            return None, None, None, None, None, None
        (rois,) = ctx.saved_tensors
        if ctx.stride == 1 and rois is None and (ctx.tile == 0 or ctx.tile >= ctx.size[1]):  # the identity
            return grad_probs, None, None, None, None, None
        grad = backward_op(grad_probs, rois, ctx.size[0], ctx.size[1], ctx.stride, ctx.tile)
        return grad, None, None, None, None, None

    return backward


for _name, _bwd in (
    ("rrm_cuda::dense_energy_inputs", "dense_energy_inputs_backward"),
    ("rrm_cuda::_dense_energy_inputs_emulated", "_dense_energy_inputs_backward_emulated"),
):
    torch.library.register_fake(_name)(_inputs_fake)
    torch.library.register_fake(f"rrm_cuda::{_bwd}")(_inputs_backward_fake)
    torch.library.register_autograd(
        _name, _inputs_backward(getattr(torch.ops.rrm_cuda, _bwd)), setup_context=_inputs_setup_context
    )


# ---- the value checks' statistics, one pass (no autograd: a check, not a function of the loss) ----


def _input_stats_fake(images, segmentations, rois=None, labels=None, ignore_index=255.0, distribution=False):
    torch._check(images.dim() == 4 and segmentations.dim() == 4)
    return segmentations.new_empty((8,), dtype=torch.float64)


for _name in ("rrm_cuda::dense_energy_input_stats", "rrm_cuda::_dense_energy_input_stats_emulated"):
    torch.library.register_fake(_name)(_input_stats_fake)
