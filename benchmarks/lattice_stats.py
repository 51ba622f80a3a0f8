"""Statistics of the permutohedral lattices behind the two GPU goals: what the GPU build's hash insert
and per-image scans meet (benchmarks/NOTES.md §26). Computed on the CPU from the reference lattice
(rrm_cuda.reference.lattice_keys_reference), not timed.

For each image's lattice: pixels N, features d, entries E = N (d + 1), vertices M (checked against
the C++ op's count), entries per vertex (mean, max), the GPU build's first hash table
(next_pow2(E / 8) slots) and its load M / cap, linear probing in it with the kernel's hash
(lattice_common.h's hash_key, restated in numpy; keys inserted in entry order): probes per entry
(mean, max), distinct keys among 32 consecutive entries (a warp) in entry and in corner-major order,
and the claims on the busiest of the insert's S claim counters (S = min(32, cap / 1024)). Per batch,
the per-image scans of chunk counts: rows of M + 1 (lattice size read back) or E + 1 (counted, as in
a CUDA graph), and the rounds ATen's row kernel takes (1024 elements a round) when B > 1.

    python benchmarks/lattice_stats.py                # the table
    python benchmarks/lattice_stats.py --out-dir DIR  # also lattice_stats.json and .png
    python benchmarks/lattice_stats.py --quick        # small sizes (CI)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rrm_cuda  # noqa: E402
from rrm_cuda.reference import lattice_keys_reference  # noqa: E402

_PRIME = 2531011  # lattice_common.h: kHashPrime
_MASK = 0xFFFFFFFF
WARP = 32
ROW_ROUND = 1024  # elements of a row per round of ATen's row scan kernel (512 threads, two each)


def hash_keys(keys: np.ndarray) -> np.ndarray:
    """lattice_common.h's hash_key of each row of keys (n, d) int64: hash_mix(hash_linear(key))."""
    h = np.zeros(len(keys), dtype=np.uint64)
    for i in range(keys.shape[1]):
        h = (h + (keys[:, i] & _MASK).astype(np.uint64)) & _MASK
        h = (h * _PRIME) & _MASK
    h ^= h >> np.uint64(16)
    h = (h * 0x85EBCA6B) & _MASK
    h ^= h >> np.uint64(13)
    return h


def next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def distinct_per_warp(seq: np.ndarray) -> float:
    """Mean number of distinct values among each WARP consecutive items of seq."""
    n = len(seq) // WARP * WARP
    if n == 0:
        return float(len(np.unique(seq)))
    g = np.sort(seq[:n].reshape(-1, WARP), axis=1)
    return float((1 + (np.diff(g, axis=1) != 0).sum(1)).mean())


def image_stats(features: torch.Tensor) -> dict:
    """The statistics of one image's lattice, features (d, N)."""
    keys, _ = lattice_keys_reference(features)  # in the features' dtype, as the kernels compute
    N, d1, d = keys.shape
    E = N * d1
    flat = keys.reshape(E, d).numpy()
    uniq, first, inverse = np.unique(flat, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    M = len(uniq)
    per_vertex = np.bincount(inverse, minlength=M)
    cap = next_pow2(max(64, E // 8))
    home = (hash_keys(uniq) & np.uint64(cap - 1)).astype(np.int64)
    table = np.full(cap, -1, dtype=np.int64)
    slot_of = np.zeros(M, dtype=np.int64)
    probes = np.zeros(M, dtype=np.int64)
    for u in np.argsort(first, kind="stable"):  # in the order the entries first meet each key
        s, p = home[u], 1
        while table[s] != -1:
            s, p = (s + 1) & (cap - 1), p + 1
        table[s], slot_of[u], probes[u] = u, s, p
        if p > cap:
            break
    shards = 1
    while shards * 2 <= min(32, cap // 1024):
        shards *= 2
    busiest = int(np.bincount(slot_of & (shards - 1), minlength=shards).max())
    vertex_of = inverse.reshape(N, d1)
    return {
        "N": N,
        "d": d,
        "E": E,
        "M": M,
        "occupancy": M / E,
        "entries_per_vertex_mean": float(per_vertex.mean()),
        "entries_per_vertex_max": int(per_vertex.max()),
        "first_table_slots": cap,
        "first_table_load": M / cap,
        "outgrows_first_table": M > cap // 2,
        "probes_per_entry_mean": float((probes * per_vertex).sum() / E),
        "probes_max": int(probes.max()),
        "distinct_keys_per_warp_entry_order": distinct_per_warp(vertex_of.reshape(-1)),
        "distinct_keys_per_warp_corner_major": distinct_per_warp(vertex_of.T.reshape(-1)),
        "claim_counters": shards,
        "claims_on_busiest_counter": busiest,
        "per_vertex_counts": per_vertex,
    }


def workloads(quick: bool) -> dict[str, torch.Tensor]:
    """(B, d, N) features of the goals' lattices: the dense CRF at 512² (crf_bench's photo, RRM's
    pseudo-label kernels) and the energy loss at RRM's 8 x 160² (energy_bench's images sampled as
    the loss samples them, sigma_xy 100 x 0.5, sigma_rgb 15)."""
    from skimage import data

    from benchmarks.energy_bench import make_inputs

    S = 128 if quick else 512
    img = torch.from_numpy(data.astronaut()[:S, :S].copy()).permute(2, 0, 1)[None]
    B, size = (2, 129) if quick else (8, 321)
    images = make_inputs(B, 21, size)[0]
    h = size // 2
    return {
        f"dense_crf {S}² bilateral (sxy 80, srgb 13)": rrm_cuda.bilateral_features(img, 80.0, 13.0),
        f"dense_crf {S}² positions (sxy 3)": rrm_cuda.position_features(1, (S, S), 3.0),
        f"energy {B} x {h}² bilateral (sxy 50, srgb 15)": rrm_cuda.bilateral_features(
            images[:, :, ::2, ::2][:, :, :h, :h], 50.0, 15.0
        ),
    }


def batch_stats(name: str, features: torch.Tensor) -> dict:
    B, d, N = features.shape
    images = [image_stats(features[b]) for b in range(B)]
    counts = rrm_cuda._ext.ops.lattice_num_vertices(features).tolist()
    assert counts == [s["M"] for s in images], (name, counts)  # the reference's points are the op's
    E = N * (d + 1)
    read_back, counted = max(counts) + 1, E + 1
    return {
        "lattice": name,
        "B": B,
        "images": images,
        "row_scan": {
            "rows": B,
            "read_back_row": read_back,
            "counted_row": counted,
            # ATen's row kernel when B > 1 (a single row takes cub's device-wide scan)
            "read_back_rounds": math.ceil(read_back / ROW_ROUND) if B > 1 else 0,
            "counted_rounds": math.ceil(counted / ROW_ROUND) if B > 1 else 0,
        },
    }


def print_table(results: list[dict]) -> None:
    cols = (
        ("M", "M", "d"),
        ("M/E", "occupancy", ".3f"),
        ("ent/v", "entries_per_vertex_mean", ".0f"),
        ("max", "entries_per_vertex_max", "d"),
        ("cap", "first_table_slots", "d"),
        ("load", "first_table_load", ".3f"),
        ("probes", "probes_per_entry_mean", ".2f"),
        ("pmax", "probes_max", "d"),
        ("keys/warp", "distinct_keys_per_warp_entry_order", ".1f"),
        ("corner", "distinct_keys_per_warp_corner_major", ".1f"),
        ("S", "claim_counters", "d"),
        ("busiest", "claims_on_busiest_counter", "d"),
    )
    print(f"{'lattice':<48}{'img':>4}" + "".join(f"{c[0]:>10}" for c in cols))
    for r in results:
        for b, s in enumerate(r["images"]):
            print(f"{r['lattice']:<48}{b:>4}" + "".join(f"{s[k]:>10{f}}" for _, k, f in cols))
        rs = r["row_scan"]
        print(
            f"{'':<48}    per-image scans: {rs['rows']} rows of {rs['read_back_row']} (read back) / "
            f"{rs['counted_row']} (counted): {rs['read_back_rounds']} / {rs['counted_rounds']} rounds of "
            f"ATen's row kernel"
        )


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.2))
    for ax, r in zip(np.atleast_1d(axes), results):
        counts = np.concatenate([s["per_vertex_counts"] for s in r["images"]])
        bins = np.logspace(0, math.log10(max(2, counts.max())) + 0.05, 30)
        ax.hist(counts, bins=bins, color="tab:blue")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(r["lattice"], fontsize=8)
        ax.set_xlabel("entries per vertex (pixels x corners)")
    np.atleast_1d(axes)[0].set_ylabel("vertices")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (CI)")
    ap.add_argument("--out-dir", default=None, help="also write lattice_stats[_quick].json and .png there")
    args = ap.parse_args(argv)
    results = [batch_stats(name, f) for name, f in workloads(args.quick).items()]
    print_table(results)
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        stem = os.path.join(args.out_dir, "lattice_stats_quick" if args.quick else "lattice_stats")
        plot(results, stem + ".png")
        clean = [
            {**r, "images": [{k: v for k, v in s.items() if k != "per_vertex_counts"} for s in r["images"]]}
            for r in results
        ]
        with open(stem + ".json", "w") as f:
            json.dump({"torch": torch.__version__, "results": clean}, f, indent=1)
        print(f"wrote {stem}.json and {stem}.png")
    return results


if __name__ == "__main__":
    main()
