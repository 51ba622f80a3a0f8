"""Benchmark of ``rrm_cuda.permutohedral_filter`` and its two gradients, on bundled photographs.

    python benchmarks/filter_bench.py            # 500x375 and 512x512, 21 channels; CPU 1 / all threads; CUDA
    python benchmarks/filter_bench.py --quick    # CI-sized

The bilateral lattice of dense-CRF inference (d = 5: x/80, y/80, RGB/13, pydensecrf's setting) filters
21 channels (a label distribution). Modes: ``fwd`` (no graph), ``fwd+bwd values`` (the values'
gradient: the exact adjoint) and ``fwd+bwd values+features`` (also the features', the learnable-
bandwidth case). Methods, timed in the same run:

- ``rrm_cuda``: the op as shipped; its forward hands its lattice (and, when the features need a
  gradient, its blurred rows) to the backward;
- ``rebuild in backward``: the same op with knob ``lattice_to_backward`` 0, whose backward builds
  the lattice again (and splats and blurs the values again for the features' gradient), as before
  session 29: the baseline of the ratios;
- ``cache=True``: the lattice taken from the lattice cache (constant features built once; a lower
  bound: no build at all per call);
- ``reference``: the pure-PyTorch lattice (``rrm_cuda.reference``) through autograd, quick sizes only.

Before timing, every method's output and gradients are checked: the handed-over path against the
rebuilding one bit for bit, and both against the reference (float64, small size). Writes
benchmarks/results/filter_<device-tag>.json and .png (helpers: benchmarks/_common.py).
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
    photo,
    print_table,
    time_fn,
    tuned,
    write_results,
)

# isort: split
import rrm_cuda  # noqa: E402
from rrm_cuda import _C  # noqa: E402
from rrm_cuda import reference as R  # noqa: E402

SIZES = {"500x375 C21": ("chelsea", 375, 500, 21), "512x512 C21": ("astronaut", 512, 512, 21)}
QUICK_SIZES = {"96x64 C21": ("chelsea", 64, 96, 21), "128x128 C8": ("astronaut", 128, 128, 8)}
SXY, SRGB = 80.0, 13.0
MODES = ("fwd", "fwd+bwd values", "fwd+bwd values+features")
BASELINE = "rebuild in backward"
REFERENCE_MAX_PIXELS = 128 * 128


def make_inputs(spec, device, dtype=torch.float32):
    name, H, W, C = spec
    image = torch.from_numpy(photo(name, H, W)).permute(2, 0, 1)[None].to(device, dtype)
    features = rrm_cuda.bilateral_features(image, SXY, SRGB).contiguous()  # (1, 5, H*W)
    g = torch.Generator().manual_seed(0)
    values = torch.softmax(torch.randn(1, C, H * W, generator=g) * 3, 1).to(device, dtype)
    weights = torch.rand(1, C, H * W, generator=g).to(device, dtype)  # d loss / d output
    return values, features, weights


def run(method: str, mode: str, values, features, weights):
    """One call of `method` in `mode`: the output, and the gradients the mode asks for."""
    want_v, want_f = mode != "fwd", mode.endswith("features")
    v = values.detach().requires_grad_(want_v)
    f = features.detach().requires_grad_(want_f)
    with torch.set_grad_enabled(want_v):
        if method == "reference":
            out = R.permutohedral_filter_reference(v, f)
        else:
            out = rrm_cuda.permutohedral_filter(v, f, cache=method == "cache=True")
        if not want_v:
            return out, None, None
        grads = torch.autograd.grad((out * weights).sum(), [v, f] if want_f else [v])
    return out, grads[0], grads[1] if want_f else None


def call(method: str, mode: str, values, features, weights):
    if method == BASELINE:
        with tuned(lattice_to_backward=0):
            return run(method, mode, values, features, weights)
    return run(method, mode, values, features, weights)


def check(spec, device) -> dict:
    """The handed-over lattice against the rebuilt one (bitwise), both against the reference."""
    out = {}
    values, features, weights = make_inputs(spec, device)
    for mode in MODES[1:]:
        a = call("rrm_cuda", mode, values, features, weights)
        b = call(BASELINE, mode, values, features, weights)
        for x, y in zip(a, b):
            if x is not None and not torch.equal(x, y):
                raise SystemExit(f"{spec} {device} {mode}: the handed-over lattice changed the result")
    if spec[1] * spec[2] <= REFERENCE_MAX_PIXELS:
        v64, f64, w64 = (t.double() for t in (values, features, weights))
        got = call("rrm_cuda", MODES[2], v64, f64, w64)
        ref = call("reference", MODES[2], v64, f64, w64)
        for name, x, y in zip(("out", "grad_values", "grad_features"), got, ref):
            err = float((x - y).abs().max() / y.abs().max().clamp_min(1e-30))
            out[f"{name}_max_rel_err"] = err
            if err > 1e-8:
                raise SystemExit(f"{spec} {device}: {name} differs from the reference by {err:.3g}")
    return out


def bench_one(name, spec, device, n_threads, args, rows, methods):
    values, features, weights = make_inputs(spec, device)
    where = f"cpu t={n_threads}" if device.type == "cpu" else "cuda"
    for mode in MODES:
        for method in methods:
            if method == BASELINE and mode == "fwd":
                continue  # the forward does not depend on the knob
            if method == "reference" and spec[1] * spec[2] > REFERENCE_MAX_PIXELS:
                continue
            fn = lambda: call(method, mode, values, features, weights)  # noqa: E731
            fn()  # cache=True builds on its first call only
            before = _C.lattice_builds()
            fn()
            builds = _C.lattice_builds() - before
            med, iqr, runs = time_fn(fn, device, args.min_run_time)
            workload = f"{name} {mode} {where}"
            extra = {"mode": mode, "builds_per_call": builds, "size": dict(zip("photo H W C".split(), spec))}
            rows.append(Row(workload, method, med, iqr, n_threads, device.type, extra, runs=runs))
            print(f"  {workload:<44} {method:<22} {med:10.2f} ms (IQR {iqr:.2f}, {builds} builds)", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_args(p, "filter")
    args = p.parse_args(argv)
    devices = bench_setup(args)
    sizes = QUICK_SIZES if args.quick else SIZES
    methods = ["rrm_cuda", BASELINE, "cache=True"] + (["reference"] if args.quick else [])
    rows: list[Row] = []
    checks = for_each_size(
        sizes,
        devices,
        check,
        lambda name, spec, device, n: bench_one(name, spec, device, n, args, rows, methods),
        args.skip_cpu,
    )
    print()
    print_table(rows, BASELINE)
    dev = devices[-1]
    meta = metadata(dev)
    meta.update(
        sizes={k: dict(zip("photo H W C".split(), v)) for k, v in sizes.items()},
        features=f"bilateral, d = 5 (x, y / {SXY:g}, RGB / {SRGB:g})",
        dtype="float32",
        quick=args.quick,
        checks=checks,
        min_run_time_s=args.min_run_time,
    )
    tag = device_tag(dev) + ("-quick" if args.quick else "")
    title = f"permutohedral_filter and its gradients, d=5, float32 ({meta['cpu'][:30]}, {dev})"
    paths = write_results("filter", tag, meta, rows, BASELINE, out_dir=args.out_dir, title=title)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
