"""Benchmark of the dense-CRF energy loss (forward, forward+backward) against the ways it is computed
today. Standalone: ``python benchmarks/energy_bench.py [--quick]``.

Settings (RRM's): batch 8, 21 classes, 321×321 crops downscaled by 0.5 to 160×160 (sigma_rgb 15,
sigma_xy 100); the same loss at its working resolution (160×160 inputs at scale 1, sigma_xy 50:
what is left with the downscaling of the 321×321 inputs and its backward taken out, for both
sides); and the full 513×513 crop at scale 1. Inputs are real photographs from
scikit-image (the bilateral lattice's occupancy depends on colour edges; noise would inflate it).

Compared, in the same run on the same machine:
  * rrm_cuda: ``rrm_cuda.DenseEnergyLoss`` (rloss and exact gradients), 1 thread and all threads;
    CUDA (synchronised) when a GPU is present.
  * baseline: the way the original rloss/RRM extension works (``_common.rloss_baseline_loss``, shared
    with rrm_bench.py): per image one lattice, built once, and one filter per channel
    (``torch.ops.rrm_cuda.permutohedral_filter`` on (1, 1, N), the lattice kept by its cache from
    the first channel to the last), images spread over threads (threads only across images, as
    rloss's ``omp parallel for``; the op releases the GIL), each filter single-threaded; the
    backward is the original's −2·S·AS·ROI/B. rloss's own forward takes ≈105–115 ms at this
    setting on the reference 2-core machine (SPEC §7).
  * reference: the original module re-stated line by line in pure PyTorch
    (``rrm_cuda.reference.dense_energy_loss_module_reference``).

On a GPU also: the loss replayed from a CUDA graph and through ``make_graphed_callables``, and
"behind GPU work": what the loss fwd+bwd adds to a training step whose GPU queue is already full
(5 ms of ``torch.cuda._sleep`` queued first; the time of both less that of the sleep alone), as
checked by default, unchecked, and unchecked with a counted lattice (no host wait at all).

Medians and IQRs from ``torch.utils.benchmark.Timer.blocked_autorange``; correctness is checked
before timing. Writes ``benchmarks/results/energy_<device-tag>.json`` and ``.png`` (benchmarks/_common.py helpers).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Measurement, Timer

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

sys.path.insert(0, HERE)

import _common as C  # noqa: E402

import rrm_cuda  # noqa: E402
from rrm_cuda import reference as R  # noqa: E402

PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "cat",
)
WEIGHT, SIGMA_RGB, SIGMA_XY = 1e-7, 15.0, 100.0
SLOW_S = 3.0
RTOL = 1e-3  # float32 sums of ~4M lattice terms in different orders (measured up to ~1.2e-4)


# ---------------------------------------------------------------------------------------------
# inputs


def make_inputs(batch: int, classes: int, size: int, seed: int = 0):
    import skimage.data

    g = torch.Generator().manual_seed(seed)
    imgs = []
    for b in range(batch):
        a = getattr(skimage.data, PHOTOS[b % len(PHOTOS)])()
        t = torch.from_numpy(a[..., :3].copy()).permute(2, 0, 1)[None].float()
        imgs.append(F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False))
    images = torch.cat(imgs).clamp(0, 255).round()
    logits = torch.randn(batch, classes, 12, 12, generator=g) * 4
    probs = torch.softmax(F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False), 1)
    rois = torch.ones(batch, size, size)
    rois[:, :, size - size // 8 :] = 0  # padded crop border
    labels = probs.argmax(1, keepdim=True).float()
    labels[probs.amax(1, keepdim=True) < 0.6] = 255
    return images, probs, rois, labels


# ---------------------------------------------------------------------------------------------
# timing


def measure(fn, min_run_time: float, sync: bool = False) -> dict:
    """Median and IQR by blocked_autorange; calls slower than ``SLOW_S`` are timed twice more with
    ``timeit(1)`` instead (their warm-up run already shows they would dominate the whole benchmark)."""

    def stmt():
        fn()
        if sync:
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    stmt()  # warm-up
    # num_threads: torch.utils.benchmark.Timer runs with 1 thread unless told otherwise
    timer = Timer(stmt="stmt()", globals={"stmt": stmt}, num_threads=torch.get_num_threads())
    warm = time.perf_counter() - t0
    if warm > SLOW_S:
        m = Measurement.merge([timer.timeit(1), timer.timeit(1)])[0]
    else:  # at least ~3 runs even when one call takes a large part of min_run_time
        m = timer.blocked_autorange(min_run_time=max(min_run_time, 3 * warm))
    return {"median_ms": m.median * 1e3, "iqr_ms": m.iqr * 1e3, "runs": len(m.times)}


def fwd_bwd(loss_fn, probs):
    def run():
        p = probs.detach().requires_grad_()
        loss_fn(p).sum().backward()

    return run


def fwd(loss_fn, probs):
    def run():
        with torch.no_grad():
            loss_fn(probs)

    return run


def busy_cycles(ms: float) -> int:
    """``torch.cuda._sleep`` cycles that keep the GPU busy for about ``ms`` milliseconds (calibrated)."""
    torch.cuda._sleep(1000)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(1_000_000)
    end.record()
    end.synchronize()
    return max(1, int(ms / (start.elapsed_time(end) / 1e6)))


def marginal(with_work: dict, work: dict) -> dict:
    """What a call adds to a step whose GPU queue is already full: the median of (work, then the
    call) less the median of the work alone; IQRs added (an upper bound of the difference's)."""
    return {
        "median_ms": with_work["median_ms"] - work["median_ms"],
        "iqr_ms": with_work["iqr_ms"] + work["iqr_ms"],
        "runs": min(with_work["runs"], work["runs"]),
    }


def behind_work(fn, cycles: int):
    """fn queued behind ``cycles`` of GPU work, as a loss is behind the network's kernels in a
    training step: the host launches it while the GPU is still busy, unless it waits for the device."""

    def run():
        torch.cuda._sleep(cycles)
        fn()

    return run


def graphed_fwd_bwd(loss_fn, probs):
    """fwd+bwd of ``loss_fn`` captured once in a CUDA graph (``torch.cuda.graph``) after an eager
    warm-up on a side stream; returns (replay, the captured probabilities, whose ``.grad`` each
    replay rewrites). A replay is what a training step whose loss sits in a captured region pays: no
    dispatch, no launches from the host (the energy loss's lattice is a counted one under capture,
    its size never read back)."""
    static = probs.detach().clone().requires_grad_()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            static.grad = None
            loss_fn(static).sum().backward()
    torch.cuda.current_stream().wait_stream(side)
    static.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss_fn(static).sum().backward()
    graph.replay()
    torch.cuda.synchronize()
    return graph.replay, static


def check_close(name, a, b, rtol):
    err = float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))
    if not err <= rtol:
        raise SystemExit(f"correctness check failed for {name}: relative error {err:.3g} > {rtol}")
    return err


def run_setting(name, B, K, size, scale, pool, all_threads, mrt, with_reference=True, skip_cpu=False, sigma_xy=None):  # noqa: N803
    torch.set_num_threads(all_threads)
    images, probs, rois, labels = make_inputs(B, K, size)
    h = int(size * scale)
    print(
        f"\n== {name}: batch {B}, {K} classes, {size}x{size} crops, scale {scale} -> {h}x{h}",
        flush=True,
    )
    sxy = SIGMA_XY if sigma_xy is None else sigma_xy
    mods = {g: rrm_cuda.DenseEnergyLoss(WEIGHT, SIGMA_RGB, sxy, scale, gradient=g) for g in ("rloss", "exact")}

    def ours(g):
        return lambda p: mods[g](images, p, rois, labels)

    def ref(p):
        return R.dense_energy_loss_module_reference(images, p, rois, labels, WEIGHT, SIGMA_RGB, sxy, scale)

    def base(p):
        return C.rloss_baseline_loss(images, p, rois, labels, WEIGHT, SIGMA_RGB, sxy, scale, pool)

    # correctness before timing: values and rloss gradients against the re-stated original
    # (the slow reference is skipped at full scale unless asked for: the baseline is then the check)
    grads, vals = {}, {}
    impls = [("rrm_cuda", ours("rloss")), ("baseline", base)] + ([("reference", ref)] if with_reference else [])
    for key, fn in impls:
        p = probs.clone().requires_grad_()
        v = fn(p)
        v.sum().backward()
        vals[key], grads[key] = v.detach().reshape(()), p.grad
    truth = "reference" if with_reference else "baseline"
    checks = {
        f"value rrm_cuda vs {truth}": check_close("value", vals["rrm_cuda"], vals[truth], RTOL),
        f"rloss grad rrm_cuda vs {truth}": check_close("grad", grads["rrm_cuda"], grads[truth], RTOL),
    }
    if with_reference:
        checks["value baseline vs reference"] = check_close("value", vals["baseline"], vals["reference"], RTOL)
    print("correctness:", {k: f"{v:.2e}" for k, v in checks.items()}, flush=True)

    rows = []

    def add(impl, threads, device, mode, timing):
        rows.append(dict(impl=impl, threads=threads, device=device, mode=mode, **timing))
        print(
            f"  {impl:<22} {device:<5} threads={threads:<3} {mode:<12} median {timing['median_ms']:9.2f} ms"
            f"  IQR {timing['iqr_ms']:7.2f} ms  ({timing['runs']} runs)",
            flush=True,
        )

    if not skip_cpu:
        add("baseline-per-channel", all_threads, "cpu", "fwd", measure(fwd(base, probs), mrt))
        add("baseline-per-channel", all_threads, "cpu", "fwd+bwd", measure(fwd_bwd(base, probs), mrt))
    if with_reference and not skip_cpu:
        add("pytorch-reference", all_threads, "cpu", "fwd", measure(fwd(ref, probs), mrt))
        add("pytorch-reference", all_threads, "cpu", "fwd+bwd", measure(fwd_bwd(ref, probs), mrt))
    for threads in [] if skip_cpu else sorted({1, all_threads}):
        torch.set_num_threads(threads)
        add("rrm_cuda", threads, "cpu", "fwd", measure(fwd(ours("rloss"), probs), mrt))
        for g in ("rloss", "exact"):
            add(f"rrm_cuda[{g}]", threads, "cpu", "fwd+bwd", measure(fwd_bwd(ours(g), probs), mrt))
    torch.set_num_threads(all_threads)
    if torch.cuda.is_available():
        ci, cp, cr, cl = (t.cuda() for t in (images, probs, rois, labels))
        gpu = {g: (lambda p, g=g: mods[g](ci, p, cr, cl)) for g in ("rloss", "exact")}
        pc = cp.clone().requires_grad_()
        gpu["rloss"](pc).sum().backward()
        checks["rloss grad cuda vs cpu"] = check_close("cuda grad", pc.grad.cpu(), grads["rrm_cuda"], 1e-3)
        add("rrm_cuda", 0, "cuda", "fwd", measure(fwd(gpu["rloss"], cp), mrt, sync=True))
        for g in ("rloss", "exact"):
            add(f"rrm_cuda[{g}]", 0, "cuda", "fwd+bwd", measure(fwd_bwd(gpu[g], cp), mrt, sync=True))
        # The CUDA-graph rows (session 14, written without a GPU): a failure is recorded and printed,
        # and the eager rows above still go into the results.
        try:
            # the same loss in a CUDA graph: its kernels' time, without the host's
            for g in ("rloss", "exact"):
                replay, static = graphed_fwd_bwd(gpu[g], cp)
                pe = cp.clone().requires_grad_()
                gpu[g](pe).sum().backward()
                checks[f"{g} grad cuda graph vs eager"] = check_close("graph grad", static.grad, pe.grad, 1e-5)
                add(f"rrm_cuda[{g}] graph", 0, "cuda", "fwd+bwd", measure(replay, mrt, sync=True))
            # the module through torch.cuda.make_graphed_callables (forward and backward graphs, autograd
            # between them): what a training step with an eager network gets
            for g in ("rloss", "exact"):
                graphed = torch.cuda.make_graphed_callables(mods[g], (ci, cp.clone().requires_grad_(), cr, cl))
                pm = cp.clone().requires_grad_()
                graphed(ci, pm, cr, cl).sum().backward()
                pe = cp.clone().requires_grad_()
                gpu[g](pe).sum().backward()
                err = check_close("graphed grad", pm.grad, pe.grad, 1e-5)
                checks[f"{g} grad make_graphed_callables vs eager"] = err
                timing = measure(fwd_bwd(lambda p, f=graphed: f(ci, p, cr, cl), cp), mrt, sync=True)
                add(f"rrm_cuda[{g}] graphed module", 0, "cuda", "fwd+bwd", timing)
        except (Exception, SystemExit) as exc:  # check_close exits on a mismatch
            checks["cuda graph rows"] = f"failed: {exc!r}"
            print(f"  CUDA graph rows failed: {exc!r}", flush=True)
        # What the loss adds to a training step whose GPU is busy (the network's kernels queued ahead
        # of it: 5 ms of torch.cuda._sleep here): its kernels, plus whatever host time it spends after
        # waiting for the device (the checked call reads its statistics and the lattice's size;
        # unchecked with a counted lattice, nothing). Rows "behind GPU work": marginal times.
        try:
            from rrm_cuda import _C

            cycles = busy_cycles(5.0)
            work = measure(lambda: torch.cuda._sleep(cycles), mrt, sync=True)
            unchecked = {
                g: rrm_cuda.DenseEnergyLoss(WEIGHT, SIGMA_RGB, sxy, scale, gradient=g, check_inputs=False)
                for g in ("rloss", "exact")
            }
            counted0 = _C.tuning()["counted_lattice"]
            for g in ("rloss", "exact"):
                variants = [
                    ("", gpu[g], 0),
                    (" unchecked", lambda p, g=g: unchecked[g](ci, p, cr, cl), 0),
                    (" unchecked, counted", lambda p, g=g: unchecked[g](ci, p, cr, cl), 1),
                ]
                for tag, fn, counted in variants:
                    _C.set_tuning("counted_lattice", counted)
                    try:
                        timing = measure(behind_work(fwd_bwd(fn, cp), cycles), mrt, sync=True)
                    finally:
                        _C.set_tuning("counted_lattice", counted0)
                    add(f"rrm_cuda[{g}]{tag} behind GPU work", 0, "cuda", "fwd+bwd", marginal(timing, work))
        except Exception as exc:
            checks["behind GPU work rows"] = f"failed: {exc!r}"
            print(f"  behind-GPU-work rows failed: {exc!r}", flush=True)

    def med(impl, mode, threads=all_threads, device="cpu"):
        for r in rows:
            if (r["impl"], r["mode"], r["threads"], r["device"]) == (impl, mode, threads, device):
                return r["median_ms"]
        return None

    ratios = {}
    for mode, impl in (
        ("fwd", "rrm_cuda"),
        ("fwd+bwd", "rrm_cuda[rloss]"),
        ("fwd+bwd", "rrm_cuda[exact]"),
    ):
        for t in [] if skip_cpu else sorted({1, all_threads}):
            ratios[f"baseline / {impl} {mode} ({t} thr)"] = med("baseline-per-channel", mode) / med(impl, mode, t)
            if with_reference:
                ratios[f"reference / {impl} {mode} ({t} thr)"] = med("pytorch-reference", mode) / med(impl, mode, t)
    print("  ratios (same run):")
    for k, v in ratios.items():
        print(f"    {k:<52} {v:7.2f}x")
    return dict(
        setting=name,
        batch=B,
        classes=K,
        crop=size,
        scale=scale,
        filtered=[h, h],
        lattice_vertices=rrm_cuda.lattice_num_vertices(
            rrm_cuda.bilateral_features(F.interpolate(images, scale_factor=scale), sxy * scale, SIGMA_RGB)
        ).tolist(),
        correctness=checks,
        rows=rows,
        ratios=ratios,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes and short timing (smoke test)")
    ap.add_argument("--batch", type=int, default=8, help="images per batch at RRM's setting (default: 8)")
    ap.add_argument("--classes", type=int, default=21, help="classes K (default: 21)")
    ap.add_argument(
        "--min-run-time", type=float, default=None, help="seconds per blocked_autorange (default: 1; --quick: 0.2)"
    )
    ap.add_argument(
        "--no-working", action="store_true", help="skip the 160x160 setting at scale 1 (RRM's working resolution)"
    )
    ap.add_argument("--no-full", action="store_true", help="skip the full 513x513 setting")
    ap.add_argument("--full-batch", type=int, default=4, help="batch of the 513x513 setting (default: 4)")
    ap.add_argument(
        "--reference-full", action="store_true", help="also time the (slow) pure-PyTorch reference at 513x513"
    )
    ap.add_argument("--skip-cpu", action="store_true", help="time CUDA only (CPU results are still checked)")
    ap.add_argument("--out-dir", "--out", dest="out_dir", default=C.RESULTS, help="where the JSON/PNG go")
    args = ap.parse_args()

    all_threads = torch.get_num_threads()
    load_start = os.getloadavg()  # the machine may be shared: record how busy it was
    if args.quick:
        settings = [("rrm-quick", 2, args.classes, 81, 0.5, True)]
        mrt = args.min_run_time or 0.2
    else:
        settings = [("rrm-321-s0.5", args.batch, args.classes, 321, 0.5, True)]
        if not args.no_working:
            settings.append(("rrm-160-s1", args.batch, args.classes, 160, 1.0, False, SIGMA_XY * 0.5))
        if not args.no_full:
            settings.append(("full-513-s1", args.full_batch, args.classes, 513, 1.0, args.reference_full))
        mrt = args.min_run_time or 1.0

    pool = C.rloss_baseline_pool(all_threads)
    try:
        results = [
            run_setting(
                *st[:5],
                pool,
                all_threads,
                mrt,
                with_reference=st[5],
                skip_cpu=args.skip_cpu,
                sigma_xy=(st[6:] or [None])[0],
            )
            for st in settings
        ]
    finally:
        pool.close()
        pool.join()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meta = C.metadata(device)
    meta.update(
        benchmark="energy",
        loadavg_start=load_start,
        loadavg_end=os.getloadavg(),
        quick=args.quick,
        settings=[{k: v for k, v in r.items() if k != "rows"} for r in results],
    )
    rows = [
        C.Row(
            workload=f"{r['setting']} {row['mode']}",
            method=_method(row),
            median_ms=row["median_ms"],
            iqr_ms=row["iqr_ms"],
            threads=row["threads"] or None,
            device=row["device"],
            extra={"runs": row["runs"]},
        )
        for r in results
        for row in r["rows"]
    ]
    baseline = _method({"impl": "baseline-per-channel", "device": "cpu", "threads": all_threads})
    print()
    C.print_table(rows, baseline)
    tag = C.device_tag(device) + ("-quick" if args.quick else "")
    for path in C.write_results("energy", tag, meta, rows, baseline, args.out_dir, "dense energy loss, fwd / fwd+bwd"):
        print(f"wrote {path}")


def _method(row: dict) -> str:
    return f"{row['impl']} {row['device']}" + (f" {row['threads']}thr" if row["device"] == "cpu" else "")


if __name__ == "__main__":
    main()
