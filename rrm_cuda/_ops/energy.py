"""Fake kernels for the dense-CRF energy ops (schemas: csrc/rrm.cpp, kernels: csrc/energy, autograd:
csrc/energy/energy_autograd.cpp).

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


def _energy_sum_fake(probs, gate, features, mass=None, grad_mode=0, factor=1.0):
    torch._check(probs.dim() == 3 and gate.dim() == 2 and features.dim() == 3)
    return probs.new_empty(())


torch.library.register_fake("rrm_cuda::dense_energy_sum")(_energy_sum_fake)
torch.library.register_fake("rrm_cuda::_dense_energy_sum_emulated")(_energy_sum_fake)


def _loss_fused_fake(segmentations, rois, unlabelled, stride, gate, features, mass=None, grad_mode=0, factor=1.0):
    torch._check(segmentations.dim() == 4 and features.dim() == 3 and stride in (1, 2))
    return segmentations.new_empty(())


torch.library.register_fake("rrm_cuda::dense_energy_loss_fused")(_loss_fused_fake)
torch.library.register_fake("rrm_cuda::_dense_energy_loss_fused_emulated")(_loss_fused_fake)


# The autograd of dense_energy, dense_energy_sum and dense_energy_inputs (and their emulated twins) is C++:
# csrc/energy/energy_autograd.cpp (host time per call; see there).


# ---- the energy's inputs at its working scale (downscale, ROI product and gate in one pass) ----


def _inputs_fake(segmentations, rois=None, unlabelled=None, stride=1, gate=True, tile=0, stats=False):
    torch._check(segmentations.dim() == 4 and stride in (1, 2) and tile >= 0)
    B, K, H, W = segmentations.shape
    probs = segmentations.new_empty((B, K, H // stride, W // stride))
    g = segmentations.new_empty((B, H // stride, W // stride)) if gate else segmentations.new_empty((0,))
    st = segmentations.new_empty((4 if stats else 0,), dtype=torch.float64)
    return probs, g, st


def _inputs_backward_fake(grad, rois, height, width, stride, tile=0, scale=None):
    torch._check(grad.dim() == 4 and tile >= 0)
    return grad.new_empty((grad.shape[0], grad.shape[1], height, width))


for _name, _bwd in (
    ("rrm_cuda::dense_energy_inputs", "dense_energy_inputs_backward"),
    ("rrm_cuda::_dense_energy_inputs_emulated", "_dense_energy_inputs_backward_emulated"),
):
    torch.library.register_fake(_name)(_inputs_fake)
    torch.library.register_fake(f"rrm_cuda::{_bwd}")(_inputs_backward_fake)


# ---- the bilateral features at the working scale (no autograd: a constant of the loss) ----


def _features_fake(images, stride, height, width, sxy, srgb, dtype):
    torch._check(images.dim() == 4 and stride in (1, 2))
    return images.new_empty((images.shape[0], 2 + images.shape[1], height * width), dtype=dtype)


for _name in ("rrm_cuda::bilateral_features_2d", "rrm_cuda::_bilateral_features_2d_emulated"):
    torch.library.register_fake(_name)(_features_fake)


# ---- the value checks' statistics, one pass (no autograd: a check, not a function of the loss) ----


def _input_stats_fake(
    images, segmentations, rois=None, labels=None, ignore_index=255.0, distribution=False, probabilities=True
):
    torch._check(images.dim() == 4 and segmentations.dim() == 4)
    return segmentations.new_empty((8,), dtype=torch.float64)


for _name in ("rrm_cuda::dense_energy_input_stats", "rrm_cuda::_dense_energy_input_stats_emulated"):
    torch.library.register_fake(_name)(_input_stats_fake)
