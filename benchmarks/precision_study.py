"""Would 16-bit storage keep pydensecrf parity? A CPU study for the GPU mean field's bytes.

The GPU mean field's two large kernels gather rows of Q (the splat) and rows of the blurred lattice
(the slice) through L2; halving those bytes is the obvious way to make them faster. This script
answers, without a GPU, whether the result would still meet the dense CRF's contract (issue 2:
probabilities within 1e-3 of pydensecrf2 and >= 99.9 % of argmax labels equal on real photographs):
it runs the slow pure-PyTorch reference mean field (rrm_cuda.reference) in float32 with Q and/or
the lattice rows rounded to float16 or bfloat16 wherever a kernel would store them, with float32
arithmetic everywhere else, at the RRM settings of SPEC §5, and compares each variant with
pydensecrf2 and with the float32 reference.

    python benchmarks/precision_study.py            # six photographs and sizes, ~1 min
    python benchmarks/precision_study.py --quick    # one small case (CI)

Writes precision_cpu.json (precision_quick.json with --quick) and a PNG chart beside it to --out-dir.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import metadata  # noqa: E402
from crf_bench import photo, scores  # noqa: E402

from rrm_cuda.reference import _lattice_reference, dense_crf_reference  # noqa: E402

# photo, (H, W), labels, (gaussian sxy, compat), (bilateral sxy, srgb, compat): SPEC §5's
# pseudo-label and inference settings
CASES = [
    ("chelsea", (120, 160), 21, (3, 3), (80, 13, 10)),
    ("astronaut", (128, 128), 2, (3, 3), (80, 13, 10)),
    ("coffee", (96, 144), 21, (3, 3), (83, 5, 4)),
    ("rocket", (100, 75), 2, (3, 3), (83, 5, 4)),
    ("astronaut", (256, 256), 21, (3, 3), (80, 13, 10)),
    ("coffee", (200, 300), 21, (3, 3), (50, 5, 4)),
]
# name -> (dtype of the stored Q rows, dtype of the stored lattice rows); None: float32
VARIANTS = {
    "float32": (None, None),
    "Q fp16": (torch.float16, None),
    "Q + lattice fp16": (torch.float16, torch.float16),
    "Q bf16": (torch.bfloat16, None),
    "Q + lattice bf16": (torch.bfloat16, torch.bfloat16),
}
PROB_TOL, LABEL_TOL = 1e-3, 0.999


def rounded_filter(q_dtype: torch.dtype | None, lattice_dtype: torch.dtype | None, cache: dict):
    """The reference permutohedral filter with the splat's input rows and every stored lattice row
    (the splat's sums and each blur's output) rounded to the given dtypes. The normaliser's
    one-channel filter of ones stays in float32, as it is computed once per call."""

    def rnd(x: torch.Tensor, dt: torch.dtype | None) -> torch.Tensor:
        return x if dt is None else x.to(dt).to(x.dtype)

    def filt(values: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        B, C, _ = values.shape
        d = features.shape[1]
        rows = C > 1
        out = torch.empty_like(values)
        alpha = 1.0 / (1.0 + 2.0 ** (-d))
        for b in range(B):
            key = (features[b].data_ptr(), tuple(features[b].shape))
            if key not in cache:
                cache[key] = _lattice_reference(features[b])
            vertex, weight, nbr, M = cache[key]
            x = rnd(values[b].T, q_dtype if rows else None)
            lat = torch.zeros(M + 1, C, dtype=values.dtype)
            lat.index_add_(0, vertex.reshape(-1), (weight.unsqueeze(2) * x.unsqueeze(1)).reshape(-1, C))
            lat = rnd(lat, lattice_dtype if rows else None)
            for j in range(d + 1):
                n1 = torch.where(nbr[j, :, 0] < 0, M, nbr[j, :, 0])
                n2 = torch.where(nbr[j, :, 1] < 0, M, nbr[j, :, 1])
                new = lat.clone()
                new[:M] = lat[:M] + 0.5 * (lat[n1] + lat[n2])
                lat = rnd(new, lattice_dtype if rows else None)
            out[b] = (alpha * (weight.unsqueeze(2) * lat[vertex]).sum(1)).T
        return out

    return filt


def pydensecrf_q(probs: np.ndarray, img: np.ndarray, gauss, bil) -> np.ndarray:
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    L, H, W = probs.shape
    d = dcrf.DenseCRF2D(W, H, L)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    d.addPairwiseGaussian(sxy=gauss[0], compat=gauss[1])
    d.addPairwiseBilateral(sxy=bil[0], srgb=bil[1], rgbim=np.ascontiguousarray(img), compat=bil[2])
    return np.array(d.inference(10)).reshape(L, H, W)


def run_case(name: str, size: tuple[int, int], L: int, gauss, bil) -> list[dict]:
    H, W = size
    img = photo(name, H, W)
    probs = scores(L, H, W, seed=L + H)
    ref = pydensecrf_q(probs, img, gauss, bil)
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    pos = torch.stack([xs, ys]).reshape(2, -1)
    rgb = torch.from_numpy(img).float().permute(2, 0, 1).reshape(3, -1)
    feats = [(pos / gauss[0])[None].contiguous(), torch.cat([pos / bil[0], rgb / bil[1]])[None].contiguous()]
    unary = -torch.log(torch.from_numpy(probs).clamp(1e-5, 1)).reshape(1, L, -1)  # unary_from_softmax
    compat = [-gauss[1] * torch.eye(L), -bil[2] * torch.eye(L)]
    cache: dict = {}
    rows, base = [], None
    for vname, (qdt, ldt) in VARIANTS.items():
        t0 = time.perf_counter()
        q = dense_crf_reference(unary, feats, compat, 10, filter_fn=rounded_filter(qdt, ldt, cache))
        q = q[0].reshape(L, H, W).numpy()
        base = q if base is None else base
        row = {
            "case": f"{name} {H}x{W} L={L}",
            "variant": vname,
            "max_dq_vs_pydensecrf": float(np.abs(q - ref).max()),
            "labels_vs_pydensecrf": float((q.argmax(0) == ref.argmax(0)).mean()),
            "max_dq_vs_float32": float(np.abs(q - base).max()),
            "labels_vs_float32": float((q.argmax(0) == base.argmax(0)).mean()),
            "seconds": time.perf_counter() - t0,
        }
        row["meets_parity"] = row["max_dq_vs_pydensecrf"] < PROB_TOL and row["labels_vs_pydensecrf"] >= LABEL_TOL
        print(
            f"{row['case']:<26} {vname:<17} vs pydensecrf2: max|dQ| {row['max_dq_vs_pydensecrf']:.2e}, "
            f"labels {100 * row['labels_vs_pydensecrf']:.3f} %  {'ok' if row['meets_parity'] else 'FAILS'}",
            flush=True,
        )
        rows.append(row)
    return rows


def chart(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r["case"] for r in rows))
    names = [v for v in VARIANTS if v != "float32"]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    w = 0.8 / len(names)
    for k, v in enumerate(names):
        ys = [next(r["max_dq_vs_pydensecrf"] for r in rows if r["case"] == c and r["variant"] == v) for c in cases]
        ax.bar(np.arange(len(cases)) + k * w, ys, w, label=v)
    ax.axhline(PROB_TOL, color="k", ls="--", lw=1, label="parity tolerance 1e-3")
    ax.set_yscale("log")
    ax.set_xticks(np.arange(len(cases)) + 0.4 - w / 2, cases, rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("max |Q - Q_pydensecrf2|")
    ax.set_title("16-bit storage of Q / lattice rows in the mean field (10 iterations)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one small case (CI)")
    ap.add_argument(
        "--out-dir",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
        help="folder for precision_cpu.json and .png (precision_quick.* with --quick; default: benchmarks/results)",
    )
    args = ap.parse_args()
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        print("pydensecrf2 is not installed (pip install pydensecrf2): nothing to compare with")
        return
    torch.manual_seed(0)
    rows = []
    for case in CASES[3:4] if args.quick else CASES:
        rows += run_case(*case)
    os.makedirs(args.out_dir, exist_ok=True)
    meta = metadata(torch.device("cpu"))
    stem = os.path.join(args.out_dir, "precision_" + ("quick" if args.quick else "cpu"))
    with open(stem + ".json", "w") as fh:
        json.dump({"meta": meta, "tolerance": {"prob": PROB_TOL, "labels": LABEL_TOL}, "rows": rows}, fh, indent=1)
    chart(rows, stem + ".png")
    for v in VARIANTS:
        ok = all(r["meets_parity"] for r in rows if r["variant"] == v)
        worst = max(r["max_dq_vs_pydensecrf"] for r in rows if r["variant"] == v)
        print(f"{v:<17} worst max|dQ| {worst:.2e}: {'meets' if ok else 'breaks'} the parity contract")
    print(f"wrote {stem}.json {stem}.png")


if __name__ == "__main__":
    main()
