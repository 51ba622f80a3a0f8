"""Benchmark of the BCD loss (SPEC §4): rrm_cuda's fused ops against the pure-PyTorch references.

    python benchmarks/bcd_bench.py            # authors' and large shape; CPU 1 / all threads; CUDA
    python benchmarks/bcd_bench.py --quick    # CI-sized

Methods: ``rrm_cuda.bcd_loss`` (fused reductions), ``reference_vectorized`` (one-hot einsums: the fast
pure-PyTorch baseline) and ``reference_loop`` (the authors' loops over images and classes), forward and
forward+backward, timed by torch.utils.benchmark (median, IQR) in the same run; correctness is checked
against the references before anything is timed. Writes benchmarks/results/bcd_<device-tag>.json/.png.
On CUDA, rows of rrm_cuda also report the memory-bandwidth bound: one read of the features per pass
(2 passes forward; 9 feature-sized reads/writes forward+backward) at ``--peak-gbps``. Timing,
metadata, table and chart helpers: benchmarks/_common.py.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402  (first: it makes rrm_cuda importable from a checkout)
    Row,
    add_bench_args,
    bench_setup,
    device_tag,
    for_each_size,
    metadata,
    print_table,
    time_fn,
    write_results,
)

# isort: split
import rrm_cuda  # noqa: E402
from rrm_cuda import reference as R  # noqa: E402

SIZES = {  # name: (B, C, h, w, K)
    "authors B8 C1024 41x41 K21": (8, 1024, 41, 41, 21),
    "large B16 C2048 64x64 K21": (16, 2048, 64, 64, 21),
}
QUICK_SIZES = {
    "quick B2 C64 16x16 K21": (2, 64, 16, 16, 21),
    "quick B4 C128 24x24 K21": (4, 128, 24, 24, 21),
}
METHODS = {
    "rrm_cuda": rrm_cuda.bcd_loss,
    "reference_vectorized": R.bcd_loss_reference_vectorized,
    "reference_loop": R.bcd_loss_reference_loop,
}
BASELINE = "reference_vectorized"
# Feature-sized memory transfers of rrm_cuda.bcd_loss (one op, rrm_cuda::bcd_loss): forward = sums
# (1 read) + cosine (1 read); backward (rrm_cuda::bcd_loss_backward) = cosine backward (2 reads,
# 1 write) + gather of the centres' gradient (1 write) + the in-place sum of the two (2 reads, 1 write).
PASSES = {"fwd": 2, "fwd+bwd": 9}


# ---- the benchmark ----------------------------------------------------------------------------------


def make_inputs(shape, device):
    B, C, h, w, K = shape
    g = torch.Generator().manual_seed(0)
    seg = torch.randn(B, K, h, w, generator=g)
    seg[:, 0] += 1.5  # about half the pixels background, as in VOC
    f = torch.randn(B, C, h, w, generator=g)
    return seg.to(device), f.to(device)


def check(shape, device) -> dict:
    """rrm_cuda against both references (loss and gradient) before anything is timed."""
    seg, f = make_inputs(shape, device)
    out = {}
    fr = f.double().requires_grad_()
    ref = R.bcd_loss_reference_vectorized(seg, fr)
    (g_ref,) = torch.autograd.grad(ref, fr)
    fo = f.clone().requires_grad_()
    loss = rrm_cuda.bcd_loss(seg, fo)
    (g,) = torch.autograd.grad(loss, fo)
    out["loss_rel_err"] = abs(loss.item() - ref.item()) / abs(ref.item())
    out["grad_max_rel_err"] = float((g.double() - g_ref).abs().max() / g_ref.abs().max())
    if out["loss_rel_err"] > 1e-5 or out["grad_max_rel_err"] > 1e-4:
        raise SystemExit(f"rrm_cuda.bcd_loss disagrees with the reference on {shape} ({device}): {out}")
    if shape[0] * shape[1] * shape[2] * shape[3] <= 2**24:  # the loop reference is slow: moderate sizes only
        loop = R.bcd_loss_reference_loop(seg, f.double())
        out["loop_vs_vectorized_rel"] = abs(loop.item() - ref.item()) / abs(ref.item())
        if out["loop_vs_vectorized_rel"] > 1e-9:
            raise SystemExit(f"the two references disagree on {shape}: {out}")
    return out


def bench_one(name, shape, device, n_threads, args, rows):
    seg, f = make_inputs(shape, device)
    fg = f.clone().requires_grad_()
    feature_bytes = f.numel() * f.element_size()
    where = f"cpu t={n_threads}" if device.type == "cpu" else "cuda"
    for method, fn in METHODS.items():
        if method in args.skip:
            continue
        if method == "reference_loop" and f.numel() > args.loop_max_elements:
            print(f"  {name}: reference_loop not timed (B*C*h*w > --loop-max-elements)", flush=True)
            continue
        for mode in ("fwd", "fwd+bwd"):
            if mode == "fwd":

                def call(fn=fn):
                    with torch.no_grad():
                        return fn(seg, f)

            else:

                def call(fn=fn):
                    fg.grad = None
                    fn(seg, fg).backward()

            # the authors' loops take up to ~100 s per call at the large shapes: timed once there
            med, iqr, runs = time_fn(call, device, args.min_run_time, 1 if method == "reference_loop" else 5)
            extra = {"mode": mode, "shape": dict(zip("B C h w K".split(), shape))}
            if device.type == "cuda" and method == "rrm_cuda":
                bound = PASSES[mode] * feature_bytes / (args.peak_gbps * 1e9) * 1e3
                extra.update(bandwidth_bound_ms=bound, x_of_bandwidth_bound=med / bound)
            workload = f"{' '.join(name.split()[:2])} {mode} {where}"
            rows.append(Row(workload, method, med, iqr, n_threads, device.type, extra, runs=runs))
            print(f"  {workload:<26} {method:<22} {med:10.2f} ms (IQR {iqr:.2f}, {runs} runs)", flush=True)


def peak_gbps(gpu: str) -> float:
    """The datasheet memory bandwidth (GB/s) of a GPU by its name: H200 4800, else the H100 SXM's 3350."""
    return 4800.0 if "H200" in gpu else 3350.0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_args(p, "bcd")
    p.add_argument("--skip", nargs="*", default=[], choices=list(METHODS), help="methods not to time")
    p.add_argument(
        "--peak-gbps",
        type=float,
        default=None,
        help="GPU memory bandwidth for the bound in GB/s (default: the datasheet's for the GPU's name, "
        "H200 4800, H100 SXM 3350, else 3350)",
    )
    p.add_argument(
        "--loop-max-elements",
        type=int,
        default=2**31,
        help="time the (slow) loop reference only up to this many feature elements (default: always)",
    )
    args = p.parse_args(argv)
    devices = bench_setup(args)
    if args.peak_gbps is None:
        args.peak_gbps = peak_gbps(torch.cuda.get_device_name() if torch.cuda.is_available() else "")
    sizes = QUICK_SIZES if args.quick else SIZES
    rows: list[Row] = []
    checks = for_each_size(
        sizes,
        devices,
        check,
        lambda name, shape, device, n: bench_one(name, shape, device, n, args, rows),
        args.skip_cpu,
    )
    print()
    print_table(rows, BASELINE)
    for r in rows:
        if "x_of_bandwidth_bound" in r.extra:
            print(
                f"{r.workload}: {r.extra['x_of_bandwidth_bound']:.2f}x the bandwidth bound "
                f"({r.extra['bandwidth_bound_ms']:.3f} ms at {args.peak_gbps:.0f} GB/s)"
            )
    dev = devices[-1]
    meta = metadata(dev)
    meta.update(
        sizes={k: dict(zip("B C h w K".split(), v)) for k, v in sizes.items()},
        dtype="float32",
        quick=args.quick,
        checks=checks,
        min_run_time_s=args.min_run_time,
        passes_per_mode=PASSES,
        peak_gbps_assumed=args.peak_gbps if dev.type == "cuda" else None,
    )
    tag = device_tag(dev) + ("-quick" if args.quick else "")
    paths = write_results(
        "bcd", tag, meta, rows, BASELINE, out_dir=args.out_dir, title=f"BCD loss, float32 ({meta['cpu'][:30]}, {dev})"
    )
    print("wrote", *paths)


if __name__ == "__main__":
    main()
