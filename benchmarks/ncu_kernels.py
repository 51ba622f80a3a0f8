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
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rrm_cuda  # noqa: E402

ops = torch.ops.rrm_cuda


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--labels", type=int, default=21)
    ap.add_argument("--iterations", type=int, default=2, help="mean-field steps of the profiled CRF call")
    ap.add_argument("--skip-energy", action="store_true")
    ap.add_argument("--noise", action="store_true", help="random-noise images for the energy loss")
    args = ap.parse_args()
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
