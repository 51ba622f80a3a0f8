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
# BCD loss
# =============================================================================================
# SPEC §4. M = argmax_k seg; cos(a, b) = a.b / (|a| |b| + 1e-7); norms by torch.linalg.vector_norm,
# whose gradient at 0 is 0 (an image without background has a zero background centre).

_BCD_EPS = 1e-7


def _bcd_cos(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine of a (..., C) and b (..., C) with the authors' epsilon."""
    na = torch.linalg.vector_norm(a, dim=-1)
    nb = torch.linalg.vector_norm(b, dim=-1)
    return (a * b).sum(-1) / (na * nb + _BCD_EPS)


def _bcd_cos_matrix(a: Tensor, b: Tensor) -> Tensor:
    """(P, C) x (Q, C) -> (P, Q) cosines with the authors' epsilon."""
    na = torch.linalg.vector_norm(a, dim=-1)
    nb = torch.linalg.vector_norm(b, dim=-1)
    return (a @ b.T) / (na[:, None] * nb[None, :] + _BCD_EPS)


def _bcd_float(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _bcd_one_hot(labels: Tensor, num_classes: int, ignore_index: int | None, dtype: torch.dtype) -> Tensor:
    """labels (B, N) -> (B, K, N) one-hot of ``dtype`` (all-zero columns for ignored pixels)."""
    lab = labels.long()
    valid = (lab >= 0) & (lab < num_classes)
    if ignore_index is not None:
        valid = valid & (lab != ignore_index)
    oh = torch.nn.functional.one_hot(torch.where(valid, lab, 0), num_classes).to(dtype)
    return (oh * valid.unsqueeze(-1).to(dtype)).transpose(1, 2)


def masked_feature_sums_reference(
    features: Tensor, labels: Tensor, num_classes: int, ignore_index: int | None = None
) -> tuple[Tensor, Tensor]:
    """features (B, C, N), labels (B, N) -> (sums (B, K, C), counts (B, K)) by a one-hot einsum."""
    f = _bcd_float(features)
    oh = _bcd_one_hot(labels, num_classes, ignore_index, f.dtype)
    return torch.einsum("bkn,bcn->bkc", oh, f), oh.sum(-1)


def feature_center_cosine_reference(
    features: Tensor, labels: Tensor, centers: Tensor, ignore_index: int | None = None
) -> Tensor:
    """features (B, C, N), labels (B, N), centers (B, K, C) -> (B, K):
    sum over the pixels of class k of cos(F[b, :, n], centers[b, k])."""
    f = _bcd_float(features)
    oh = _bcd_one_hot(labels, centers.shape[1], ignore_index, f.dtype)
    per_pixel = torch.einsum("bkn,bkc->bnc", oh, centers.to(f.dtype))  # each pixel's own centre
    cos = _bcd_cos(f.transpose(1, 2), per_pixel)  # (B, N)
    return torch.einsum("bkn,bn->bk", oh, cos)


def bcd_loss_reference_loop(seg_logits: Tensor, features: Tensor) -> Tensor:
    """The BCD loss written as the authors write it: Python loops over images and classes, boolean
    masks, data-dependent branches. seg_logits (B, K, h, w), features (B, C, h, w) -> scalar."""
    B, K = seg_logits.shape[:2]
    f = _bcd_float(features)
    M = seg_logits.detach().argmax(1)
    eps = _BCD_EPS
    bg_centers, t1 = [], f.new_zeros(())
    for b in range(B):
        mask = M[b] == 0
        pix = f[b][:, mask].T  # (n_b, C)
        c_b = pix.sum(0) / (pix.shape[0] + eps)
        bg_centers.append(c_b)
        if pix.shape[0] > 0:
            t1 = t1 + (1 - _bcd_cos(pix, c_b[None])).mean()
        else:
            t1 = t1 + 2
    fg_centers, t2 = [], f.new_zeros(())
    for k in range(1, K):
        pix = torch.cat([f[b][:, M[b] == k].T for b in range(B)], 0)  # (n_k, C)
        if pix.shape[0] < 1:
            continue
        c_k = pix.sum(0) / (pix.shape[0] + eps)
        fg_centers.append(c_k)
        t2 = t2 + (1 - _bcd_cos(pix, c_k[None])).mean()
    nk = len(fg_centers)
    compactness = (t1 + t2) / (nk + B)
    if nk == 0:
        return compactness
    l_ff = f.new_zeros(())
    if nk > 1:
        for i in range(nk):
            for j in range(nk):
                if i != j:
                    l_ff = l_ff + 1 + _bcd_cos(fg_centers[i], fg_centers[j])
        l_ff = l_ff / (nk * (nk - 1))
    if not bool((M == 0).any()):
        return 0.5 * l_ff + 1 + compactness
    l_fb = f.new_zeros(())
    for c_k in fg_centers:
        for c_b in bg_centers:
            l_fb = l_fb + 1 + _bcd_cos(c_k, c_b)
    l_fb = l_fb / (nk * B)
    return 0.5 * l_ff + 0.5 * l_fb + compactness


def bcd_loss_reference_vectorized(seg_logits: Tensor, features: Tensor) -> Tensor:
    """The BCD loss with dense tensor ops only (one-hot einsums, masks instead of branches): the fast
    pure-PyTorch baseline. seg_logits (B, K, h, w), features (B, C, h, w) -> scalar."""
    B, K = seg_logits.shape[:2]
    C = features.shape[1]
    f = _bcd_float(features).reshape(B, C, -1)
    labels = seg_logits.detach().argmax(1).reshape(B, -1)
    eps = _BCD_EPS
    sums, counts = masked_feature_sums_reference(f, labels, K)
    n_b = counts[:, 0]
    c_b = sums[:, 0] / (n_b + eps)[:, None]  # (B, C)
    n_k = counts[:, 1:].sum(0)  # (K-1,)
    c_k = sums[:, 1:].sum(0) / (n_k + eps)[:, None]  # (K-1, C)
    centers = torch.cat([c_b[:, None], c_k[None].expand(B, -1, -1)], 1)
    cos_sums = feature_center_cosine_reference(f, labels, centers)
    present = n_k >= 1
    nk = present.sum()
    has_bg = n_b >= 1
    t1 = torch.where(has_bg, 1 - cos_sums[:, 0] / n_b.clamp_min(1), 2.0).sum()
    t2 = torch.where(present, 1 - cos_sums[:, 1:].sum(0) / n_k.clamp_min(1), 0.0).sum()
    compactness = (t1 + t2) / (nk + B)
    eye = torch.eye(K - 1, dtype=torch.bool, device=f.device)
    pairs = present[:, None] & present[None, :] & ~eye
    l_ff = torch.where(pairs, 1 + _bcd_cos_matrix(c_k, c_k), 0.0).sum() / (nk * (nk - 1)).clamp_min(1)
    l_fb = torch.where(present[:, None], 1 + _bcd_cos_matrix(c_k, c_b), 0.0).sum() / (nk * B).clamp_min(1)
    center = torch.where(has_bg.any(), 0.5 * l_ff + 0.5 * l_fb, 0.5 * l_ff + 1)
    center = torch.where(nk > 0, center, 0.0)
    return center + compactness
