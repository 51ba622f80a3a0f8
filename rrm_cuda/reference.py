"""Slow, faithful pure-PyTorch references shared by the tests and the benchmarks.

Each reference is written from the specification (../shared/SPEC.md) independently of the C++/CUDA
kernels: no hash table, no splat lists, only dense tensor operations.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

# =============================================================================================
# Permutohedral lattice and dense CRF
# =============================================================================================


def _lattice_reference(features: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
    """One image's lattice by dense tensor ops: features (d, N) ->
    (vertex (N, d+1) long, weight (N, d+1), neighbours (d+1, M, 2) long with -1 for none, M).

    Same arithmetic as densecrf's Permutohedral::init (elevation, rounding with ties down, ranking
    with its tie rule, the wrap-around barycentric term), but vertices are found with torch.unique
    instead of a hash table.
    """
    return _lattice_from_keys(*lattice_keys_reference(features))


def lattice_keys_reference(features: Tensor) -> tuple[Tensor, Tensor]:
    """The lattice points of one image's simplices: features (d, N) -> (keys (N, d+1, d) long: the
    first d coordinates of each pixel's d + 1 enclosing lattice points, the last being minus their
    sum; barycentric weights (N, d+1)), in densecrf's corner order (see ``_lattice_reference``)."""
    d, N = features.shape
    dt = features.dtype
    dev = features.device
    # In Python floats, as the kernels compute it (feature_scale: densecrf's rounding, sqrt(2/3)(d+1)
    # as a float32, the rest in double): a tensor division of a scalar by a tensor (a reciprocal,
    # then a product) can differ in the last bit, and on features whose residuals tie that bit
    # flips the simplex ranking.
    inv_std_dev = float(np.float32(math.sqrt(2.0 / 3.0) * (d + 1)))
    scale = torch.tensor(
        [1.0 / math.sqrt(float((k + 2) * (k + 1))) * inv_std_dev for k in range(d)], dtype=torch.float64
    )
    scale = scale.to(dt).to(dev)
    cf = features.T * scale  # (N, d)
    # e_j = sum_{k >= j} c_k - j c_{j-1}, accumulated from the last coordinate as densecrf does
    elevated = torch.zeros(N, d + 1, dtype=dt, device=dev)
    sm = torch.zeros(N, dtype=dt, device=dev)
    for j in range(d, 0, -1):
        c = cf[:, j - 1]
        elevated[:, j] = sm - j * c
        sm = sm + c
    elevated[:, 0] = sm
    down = torch.tensor(1.0 / (d + 1), dtype=dt, device=dev)
    up = float(d + 1)
    v = down * elevated
    hi = torch.ceil(v) * up
    lo = torch.floor(v) * up
    rem0 = torch.where(hi - elevated < elevated - lo, hi, lo).to(torch.long)
    total = (rem0 // (d + 1)).sum(1)
    resid = elevated - rem0.to(dt)
    # rank[k] = #{j > k: r_k < r_j} + #{j < k: not (r_j < r_k)}
    less = resid.unsqueeze(2) < resid.unsqueeze(1)  # [n, a, b] = r_a < r_b
    idx = torch.arange(d + 1, device=dev)
    upper = idx.unsqueeze(1) < idx.unsqueeze(0)  # a < b
    rank = (less & upper).sum(2) + ((~less).transpose(1, 2) & upper.T).sum(2)
    rank = rank + total.unsqueeze(1)
    neg = rank < 0
    big = rank > d
    rank = torch.where(neg, rank + d + 1, torch.where(big, rank - d - 1, rank))
    rem0 = torch.where(neg, rem0 + d + 1, torch.where(big, rem0 - d - 1, rem0))
    resid = (elevated - rem0.to(dt)) * down
    bary = torch.zeros(N, d + 2, dtype=dt, device=dev)
    bary.scatter_add_(1, d - rank, resid)
    bary.scatter_add_(1, d - rank + 1, -resid)
    bary[:, 0] += 1.0 + bary[:, d + 1]
    weight = bary[:, : d + 1]
    r = torch.arange(d + 1, device=dev).view(1, d + 1, 1)
    canon = torch.where(rank.unsqueeze(1) <= d - r, r, r - (d + 1))  # (N, d+1 corners, d+1 coords)
    keys = (rem0.unsqueeze(1) + canon)[:, :, :d]  # (N, d+1, d)
    return keys, weight


def _lattice_from_keys(keys: Tensor, weight: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
    """The lattice of ``lattice_keys_reference``'s points: vertices numbered by torch.unique."""
    N, _, d = keys.shape
    dev = keys.device
    uniq, inverse = torch.unique(keys.reshape(-1, d), dim=0, return_inverse=True)
    M = uniq.shape[0]
    vertex = inverse.reshape(N, d + 1)
    # Blur neighbours along axis j: key - 1 with key_j + d, and key + 1 with key_j - d.
    n1 = uniq.unsqueeze(0).repeat(d + 1, 1, 1) - 1
    n2 = uniq.unsqueeze(0).repeat(d + 1, 1, 1) + 1
    for j in range(d):
        n1[j, :, j] = uniq[:, j] + d
        n2[j, :, j] = uniq[:, j] - d
    cand = torch.cat([uniq, n1.reshape(-1, d), n2.reshape(-1, d)])
    u2, inv2 = torch.unique(cand, dim=0, return_inverse=True)
    owner = torch.full((u2.shape[0],), -1, dtype=torch.long, device=dev)
    owner[inv2[:M]] = torch.arange(M, device=dev)
    nb1 = owner[inv2[M : M + (d + 1) * M]].reshape(d + 1, M)
    nb2 = owner[inv2[M + (d + 1) * M :]].reshape(d + 1, M)
    return vertex, weight, torch.stack([nb1, nb2], dim=2), M


def permutohedral_filter_reference(values: Tensor, features: Tensor, reverse: bool = False) -> Tensor:
    """Faithful slow permutohedral filter: values (B, C, N), features (B, d, N) -> (B, C, N).

    Splat, blur along axes 0..d (d..0 when ``reverse``) with taps [1/2, 1, 1/2], slice with
    alpha = 1 / (1 + 2^-d); no normalisation, self term included (densecrf's Permutohedral::compute).
    """
    B, C, N = values.shape
    d = features.shape[1]
    out = torch.empty_like(values)
    alpha = 1.0 / (1.0 + 2.0 ** (-d))
    for b in range(B):
        vertex, weight, nbr, M = _lattice_reference(features[b])
        x = values[b].T  # (N, C)
        lat = torch.zeros(M + 1, C, dtype=values.dtype, device=values.device)  # row M: "no neighbour"
        lat.index_add_(0, vertex.reshape(-1), (weight.unsqueeze(2) * x.unsqueeze(1)).reshape(-1, C))
        axes = range(d, -1, -1) if reverse else range(d + 1)
        for j in axes:
            n1 = torch.where(nbr[j, :, 0] < 0, M, nbr[j, :, 0])
            n2 = torch.where(nbr[j, :, 1] < 0, M, nbr[j, :, 1])
            new = lat.clone()
            new[:M] = lat[:M] + 0.5 * (lat[n1] + lat[n2])
            lat = new
        out[b] = (alpha * (weight.unsqueeze(2) * lat[vertex]).sum(1)).T
    return out


def lattice_num_vertices_reference(features: Tensor) -> Tensor:
    """(B, d, N) -> (B,) number of distinct lattice points per image."""
    return torch.tensor([_lattice_reference(f)[3] for f in features], dtype=torch.long)


def gaussian_filter_exact(values: Tensor, features: Tensor) -> Tensor:
    """Exact dense Gaussian sum ``Σ_j exp(-½|f_i - f_j|²) v_j`` (O(N²); small inputs only)."""
    f = features.transpose(1, 2)  # (B, N, d)
    d2 = torch.cdist(f, f).pow(2)
    return torch.bmm(values, torch.exp(-0.5 * d2))  # K symmetric


def dense_crf_reference(
    unary: Tensor,
    features: list[Tensor],
    compat: list[Tensor],
    iterations: int,
    normalization: str = "symmetric",
    filter_fn=permutohedral_filter_reference,
) -> Tensor:
    """Mean field exactly as densecrf's DenseCRF::inference, with a pluggable filter.

    unary (B, L, N) energies; features: T tensors (B, d, N); compat: T (L, L) energy matrices (Potts
    w is -w I). Returns Q (B, L, N).
    """
    q = torch.softmax(-unary, dim=1)
    norms = []
    for f in features:
        ones = torch.ones(unary.shape[0], 1, unary.shape[2], dtype=unary.dtype, device=unary.device)
        n = filter_fn(ones, f)
        if normalization == "symmetric":
            norms.append(1.0 / torch.sqrt(n + 1e-20))
        elif normalization in ("after", "before"):
            norms.append(1.0 / (n + 1e-20))
        else:
            norms.append(None)
    for _ in range(iterations):
        acc = -unary
        for f, c, n in zip(features, compat, norms):
            x = q * n if normalization in ("symmetric", "before") else q
            m = filter_fn(x, f)
            if normalization in ("symmetric", "after"):
                m = m * n
            acc = acc - torch.einsum("lk,bkn->bln", c, m)
        q = torch.softmax(acc, dim=1)
    return q


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


# =============================================================================================
# Dense energy loss
# =============================================================================================


def _energy_lattice_filter(values: Tensor, features: Tensor, reverse: bool = False) -> Tensor:
    """The lattice filter of the energy references: the slow faithful lattice reference (pure PyTorch,
    differentiable; autograd through it gives the exact adjoint)."""
    return permutohedral_filter_reference(values, features, reverse=reverse)


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
    a filter function (default: the lattice; :func:`gaussian_filter_exact` for the exact Gaussian).

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
    original's gradient ``−2·grad·AS/N·ROIs``). ``unlabel_region=None``: rloss's own
    ``DenseCRFLossFunction``, the same without the gate."""

    @staticmethod
    def forward(ctx, images, segmentations, sigma_rgb, sigma_xy, ROIs, unlabel_region, filter_fn):  # noqa: N803
        ctx.N, ctx.K, ctx.H, ctx.W = segmentations.shape
        Gate = ROIs.clone()  # noqa: N806
        ROIs = ROIs.unsqueeze(1).repeat(1, ctx.K, 1, 1)  # noqa: N806

        if unlabel_region is None:  # rloss: no gate
            Gate = torch.ones_like(ROIs)  # noqa: N806
        else:
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
    seg_label: Tensor | None,
    weight: float,
    sigma_rgb: float,
    sigma_xy: float,
    scale_factor: float,
    filter_fn=None,
    recompute_scale_factor: bool | None = None,
) -> Tensor:
    """RRM's ``DenseEnergyLoss.forward`` re-stated line by line (images (B,3,H,W) 0–255, softmax
    segmentations (B,K,H,W), ROIs (B,H,W), seg_label (B,1,H,W) with 255 unlabelled) -> (1,).
    ``seg_label=None``: rloss's own ``DenseCRFLoss.forward(images, segmentations, ROIs)`` (Tang et al.,
    the module of scribble-supervised repositories), the same without labels and gate.
    ``recompute_scale_factor=True``: the AFA / ToCo copies, which pass it to all four interpolations."""
    import torch.nn.functional as F  # noqa: N812

    r = recompute_scale_factor
    scaled_images = F.interpolate(images, scale_factor=scale_factor, recompute_scale_factor=r)
    scaled_segs = F.interpolate(
        segmentations, scale_factor=scale_factor, mode="bilinear", align_corners=False, recompute_scale_factor=r
    )
    scaled_ROIs = F.interpolate(ROIs.unsqueeze(1), scale_factor=scale_factor, recompute_scale_factor=r).squeeze(1)  # noqa: N806
    unlabel_region = None
    if seg_label is not None:
        scaled_seg_label = F.interpolate(seg_label, scale_factor=scale_factor, mode="nearest", recompute_scale_factor=r)
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
