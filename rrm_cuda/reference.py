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


def _lattice_reference(features: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
    """One image's lattice by dense tensor ops: features (d, N) ->
    (vertex (N, d+1) long, weight (N, d+1), neighbours (d+1, M, 2) long with -1 for none, M).

    Same arithmetic as densecrf's Permutohedral::init (elevation, rounding with ties down, ranking
    with its tie rule, the wrap-around barycentric term), but vertices are found with torch.unique
    instead of a hash table.
    """
    d, N = features.shape
    dt = features.dtype
    dev = features.device
    k = torch.arange(d, dtype=torch.float64)
    scale = (math.sqrt(2.0 / 3.0) * (d + 1) / torch.sqrt((k + 1) * (k + 2))).to(dt).to(dev)
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
