"""Slow, faithful pure-PyTorch references shared by the tests and the benchmarks.

Each reference is written from the specification (../shared/SPEC.md) independently of the C++/CUDA
kernels: no hash table, no splat lists, only dense tensor operations.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# =============================================================================================
# Permutohedral lattice and dense CRF
# =============================================================================================


# =============================================================================================
# Dense energy loss
# =============================================================================================


def _energy_lattice_filter(values: Tensor, features: Tensor, reverse: bool = False) -> Tensor:
    """The lattice filter used by the energy references: the slow faithful lattice reference when this
    module has one (``permutohedral_filter_reference``), else the native op (differentiable, with the
    exact adjoint as its backward)."""
    ref = globals().get("permutohedral_filter_reference")
    if ref is not None:
        return ref(values, features, reverse=reverse)
    return torch.ops.rrm_cuda.permutohedral_filter(values, features, reverse)


def dense_gaussian_filter(values: Tensor, features: Tensor) -> Tensor:
    """Exact dense Gaussian filter: ``out[b, :, i] = Σ_j exp(−½‖f_i − f_j‖²) values[b, :, j]``.

    values (B, C, N), features (B, d, N) -> (B, C, N); O(N²) memory, for small images only.
    """
    f = features.transpose(1, 2)
    d2 = (f.unsqueeze(2) - f.unsqueeze(1)).pow(2).sum(-1)
    return values @ torch.exp(-0.5 * d2)


def rloss_features(images: Tensor, sigma_rgb: float, sigma_xy: float) -> Tensor:
    """(B, 2 + c, H·W) features of rloss's bilateral filter: ``(x/σxy, y/σxy, I_1/σrgb, …)``, x the
    column index (rloss's ``bilateral.cpp`` loops rows y, columns x and writes x first)."""
    B, c, H, W = images.shape
    ys, xs = torch.meshgrid(
        torch.arange(H, dtype=images.dtype, device=images.device),
        torch.arange(W, dtype=images.dtype, device=images.device),
        indexing="ij",
    )
    pos = torch.stack([xs.reshape(-1) / sigma_xy, ys.reshape(-1) / sigma_xy]).expand(B, 2, H * W)
    return torch.cat([pos, images.reshape(B, c, H * W) / sigma_rgb], 1)


def dense_energy_reference(
    probs: Tensor,
    gate: Tensor,
    features: Tensor,
    mass: Tensor | None = None,
    filter_fn=None,
) -> Tensor:
    """Per-image energies ``−Σ_{k,i} S ŝ_k (W ŝ_k)`` (``+ Σ_i S m (W 1)`` with a mass), written with
    a filter function (default: the lattice; :func:`dense_gaussian_filter` for the exact Gaussian).

    probs (B, K, N) ROI-masked probabilities, gate (B, N), features (B, d, N), mass (B, N) -> (B,).
    Differentiable w.r.t. ``probs`` through the filter: with the gate held constant, its gradient is
    the exact ``−[S·Wŝ + Wᵀ(S·ŝ)]`` when the filter's backward is its exact adjoint.
    """
    filt = filter_fn or _energy_lattice_filter
    AS = filt(probs, features)
    energy = -(gate.unsqueeze(1) * probs * AS).sum((1, 2))
    if mass is not None:
        w1 = filt(torch.ones_like(probs[:, :1]), features)[:, 0]
        energy = energy + (gate * mass * w1).sum(1)
    return energy


class _RlossDenseEnergyFunction(torch.autograd.Function):
    """RRM's ``DenseEnergyLossFunction`` re-stated line by line in pure PyTorch (the SWIG filter and
    the numpy round trip replaced by a lattice filter on tensors; same gate, masking, sums and the
    original's gradient ``−2·grad·AS/N·ROIs``)."""

    @staticmethod
    def forward(ctx, images, segmentations, sigma_rgb, sigma_xy, ROIs, unlabel_region, filter_fn):  # noqa: N803
        ctx.N, ctx.K, ctx.H, ctx.W = segmentations.shape
        Gate = ROIs.clone()  # noqa: N806
        ROIs = ROIs.unsqueeze(1).repeat(1, ctx.K, 1, 1)  # noqa: N806

        seg_max = torch.max(segmentations, dim=1)[0]
        Gate = Gate - seg_max  # noqa: N806
        Gate[unlabel_region] = 1
        Gate[Gate < 0] = 0
        Gate = Gate.unsqueeze(1).repeat(1, ctx.K, 1, 1)  # noqa: N806

        segmentations = torch.mul(segmentations, ROIs)
        ctx.ROIs = ROIs

        features = rloss_features(images, sigma_rgb, sigma_xy)
        AS = filter_fn(segmentations.reshape(ctx.N, ctx.K, -1), features).reshape(segmentations.shape)  # noqa: N806
        AS = torch.mul(AS, Gate)  # noqa: N806
        densecrf_loss = -torch.dot(segmentations.flatten(), AS.flatten())

        # averaged by the number of images
        densecrf_loss = densecrf_loss / ctx.N

        ctx.AS = AS
        return densecrf_loss.reshape(1)

    @staticmethod
    def backward(ctx, grad_output):
        grad_segmentation = -2 * grad_output * ctx.AS / ctx.N
        grad_segmentation = grad_segmentation * ctx.ROIs
        return None, grad_segmentation, None, None, None, None, None


def dense_energy_loss_module_reference(
    images: Tensor,
    segmentations: Tensor,
    ROIs: Tensor,  # noqa: N803
    seg_label: Tensor,
    weight: float,
    sigma_rgb: float,
    sigma_xy: float,
    scale_factor: float,
    filter_fn=None,
) -> Tensor:
    """RRM's ``DenseEnergyLoss.forward`` re-stated line by line (images (B,3,H,W) 0–255, softmax
    segmentations (B,K,H,W), ROIs (B,H,W), seg_label (B,1,H,W) with 255 unlabelled) -> (1,)."""
    import torch.nn.functional as F  # noqa: N812

    scaled_images = F.interpolate(images, scale_factor=scale_factor)
    scaled_segs = F.interpolate(
        segmentations, scale_factor=scale_factor, mode="bilinear", align_corners=False
    )
    scaled_ROIs = F.interpolate(ROIs.unsqueeze(1), scale_factor=scale_factor).squeeze(1)  # noqa: N806
    scaled_seg_label = F.interpolate(seg_label, scale_factor=scale_factor, mode="nearest")
    unlabel_region = (scaled_seg_label.long() == 255).squeeze(1)

    return weight * _RlossDenseEnergyFunction.apply(
        scaled_images,
        scaled_segs,
        sigma_rgb,
        sigma_xy * scale_factor,
        scaled_ROIs,
        unlabel_region,
        filter_fn or _energy_lattice_filter,
    )
