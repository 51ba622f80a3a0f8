"""The workload for Nsight Compute: one dense_crf call (512x512 astronaut, 21 labels) and one energy
loss forward+backward (8 x 21 x 160^2), each run once to warm up and once between
cudaProfilerStart/Stop, so that ncu measures only the second calls' kernels.

    ncu --profile-from-start off --kernel-name-base demangled \\
        --kernel-name regex:"Embed|SplatChunk|SplatReduce|Blur|MeanFieldSlice|Insert|EnergySlice" \\
        --launch-count 30 --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \\
        python benchmarks/ncu_kernels.py --iterations 1

(every kernel is an instance of for_each_item_kernel<Functor>: without --kernel-name-base demangled
the regex sees only that name and matches nothing). The energy part takes photographs (astronaut and
coffee, 321x321); ``--noise`` takes random-noise images instead, whose lattice has about a vertex per
pixel (a stress case for the build, not RRM's).

Without ncu it just runs (and prints the lattices' vertex counts). Needs a CUDA device and build.
``python benchmarks/ncu_kernels.py --table ncu.txt`` (no GPU needed) condenses ncu's text report
into one row per kernel: duration, DRAM / L2 / L1 / SM throughput, hit rates, occupancy, registers
(`bash benchmarks/gpu_check.sh ncu` runs both).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rrm_cuda  # noqa: E402

ops = torch.ops.rrm_cuda


# ncu metric name -> table column
_METRICS = {
    "Duration": "us",
    "DRAM Throughput": "dram%",
    "L2 Cache Throughput": "l2%",
    "L1/TEX Cache Throughput": "l1%",
    "Compute (SM) Throughput": "sm%",
    "L1/TEX Hit Rate": "l1hit",
    "L2 Hit Rate": "l2hit",
    "Theoretical Occupancy": "theo%",
    "Achieved Occupancy": "ach%",
    "Registers Per Thread": "regs",
}
_UNIT_TO_US = {"ns": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3, "s": 1e6, "second": 1e6}


def parse_ncu(text: str) -> list[dict[str, float | str]]:
    """One dict per kernel of ncu's text report: 'kernel' (the functor's name for rrm_cuda's
    for_each_item_kernel<F>, else the function's) and the columns of _METRICS it reports."""
    rows: list[dict[str, float | str]] = []
    for line in text.splitlines():
        head = re.match(r"\s{2}(?:void\s+)?(\S.*?)\(.*\) \(\d+, \d+, \d+\)x\(\d+, \d+, \d+\)", line)
        if head:
            name = head.group(1)
            inner = re.match(r"(?:rrm::)?for_each(?:_item)?_kernel<(.*)>$", name)
            name = re.sub(r"rrm::|lattice::|energy::|bcd::|\(int\)", "", inner.group(1) if inner else name)
            rows.append({"kernel": name})
            continue
        if not rows:
            continue
        for metric, col in _METRICS.items():
            m = re.match(r"\s+" + re.escape(metric) + r"\s+(\S+)\s+([\d.,]+)\s*$", line)
            if m and col not in rows[-1]:
                value = float(m.group(2).replace(",", ""))
                rows[-1][col] = value * _UNIT_TO_US.get(m.group(1), 1.0) if col == "us" else value
    return rows


def format_table(rows: list[dict[str, float | str]], width: int = 48) -> str:
    cols = list(_METRICS.values())
    out = [f"{'kernel':<{width}} " + " ".join(f"{c:>6}" for c in cols)]
    for r in rows:
        vals = [r.get(c, math.nan) for c in cols]
        out.append(f"{str(r['kernel'])[:width]:<{width}} " + " ".join(f"{float(v):6.1f}" for v in vals))
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512, help="image side of the profiled dense CRF (default: 512)")
    ap.add_argument("--labels", type=int, default=21, help="labels (default: 21)")
    ap.add_argument("--iterations", type=int, default=2, help="mean-field steps of the profiled CRF call")
    ap.add_argument("--skip-energy", action="store_true", help="profile the dense CRF's kernels only")
    ap.add_argument("--noise", action="store_true", help="random-noise images for the energy loss")
    ap.add_argument("--table", metavar="NCU_TXT", help="print the per-kernel table of an ncu text report and exit")
    args = ap.parse_args()
    if args.table:
        with open(args.table) as f:
            print(format_table(parse_ncu(f.read())))
        return
    if not torch.cuda.is_available():
        raise SystemExit("ncu_kernels.py needs a CUDA device")
    from skimage import data

    dev = torch.device("cuda")
    S, L = args.size, args.labels
    g = torch.Generator().manual_seed(0)
    img = torch.from_numpy(data.astronaut()[:S, :S].copy()).permute(2, 0, 1)[None].to(dev)
    probs = torch.softmax(torch.randn(1, L, S // 8, S // 8, generator=g) * 3, 1)
    probs = torch.nn.functional.interpolate(probs, size=(S, S), mode="bilinear").to(dev)
    for name, f in (
        ("bilateral (sxy 80, srgb 13)", rrm_cuda.bilateral_features(img, 80.0, 13.0)),
        ("positions (sxy 3)", rrm_cuda.position_features(1, (S, S), 3.0, device=dev)),
    ):
        print(f"{name}: {int(ops.lattice_num_vertices(f)[0])} vertices for {S * S} pixels")

    def crf() -> None:
        rrm_cuda.dense_crf(probs, img, iterations=args.iterations, check_inputs=False)

    B, K, H = 8, 21, 321
    if args.noise:
        images = torch.randint(0, 256, (B, 3, H, H), generator=g).float().to(dev)
    else:
        photos = [torch.from_numpy(f().copy()).permute(2, 0, 1)[None].float() for f in (data.astronaut, data.coffee)]
        photos = [torch.nn.functional.interpolate(p, size=(H, H), mode="bilinear") for p in photos]
        images = torch.cat([photos[b % 2] for b in range(B)]).round().clamp(0, 255).to(dev)
    seg = torch.softmax(torch.randn(B, K, H, H, generator=g), 1).to(dev)
    rois = torch.ones(B, H, H, device=dev)
    labels = torch.full((B, 1, H, H), 255.0, device=dev)
    loss = rrm_cuda.DenseEnergyLoss(1e-7, 15.0, 100.0, 0.5, check_inputs=False)

    def energy() -> None:
        p = seg.detach().requires_grad_()
        loss(images, p, rois, labels).backward()

    work = [crf] if args.skip_energy else [crf, energy]
    for fn in work:  # warm-up: allocator, lattice cache, kernels loaded
        fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for fn in work:
        fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print("done")


if __name__ == "__main__":
    main()
