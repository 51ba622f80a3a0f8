"""Dense-CRF benchmark: rrm_cuda (CPU 1 thread / all threads, CUDA) against pydensecrf2 and the
pure-PyTorch reference, on bundled photographs (scikit-image), 21 labels, 10 mean-field iterations,
plus RRM's pseudo-label CRF (a 321x321 crop, background + 2 classes).

    python benchmarks/crf_bench.py            # full run (500x375, 512x512, batch 8, 321x321 L=3)
    python benchmarks/crf_bench.py --quick    # CI-sized

Prints a table of medians with speed-ups over pydensecrf2 measured in the same run, and writes
benchmarks/results/crf_<device>.json and .png. Every method's output is checked against
pydensecrf2 (label agreement) before it is timed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Row, device_tag, metadata, photo, print_table, threads, time_fn, tuned, write_results  # noqa: E402

# isort: split
import rrm_cuda  # noqa: E402  (after _common, which makes it importable from a checkout)
from rrm_cuda.reference import dense_crf_reference  # noqa: E402

GAUSS = dict(sxy=3, compat=3)
BIL = dict(sxy=80, srgb=13, compat=10)


def scores(L: int, H: int, W: int, seed: int) -> np.ndarray:
    """Smooth random class scores, like a network's softmax."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    lg = ndimage.gaussian_filter(rng.normal(size=(L, H, W)), (0, 8, 8)) * 20
    p = np.exp(lg - lg.max(0))
    return (p / p.sum(0)).astype(np.float32)


def pydensecrf_run(probs: np.ndarray, img: np.ndarray, iters: int):
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    L, H, W = probs.shape
    d = dcrf.DenseCRF2D(W, H, L)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    d.addPairwiseGaussian(**GAUSS)
    d.addPairwiseBilateral(rgbim=img, **BIL)
    return np.array(d.inference(iters)).reshape(L, H, W)


def kl_loop(module: str, probs: np.ndarray, img: np.ndarray, steps: int) -> np.ndarray:
    """pydensecrf's step-wise KL loop (its README): ``klDivergence(Q)`` then ``stepInference(Q)``,
    ``steps`` times, with pydensecrf (module "pydensecrf") or rrm_cuda's drop-in ("rrm_cuda.compat.pydensecrf")."""
    import importlib

    dcrf = importlib.import_module(module + ".densecrf")
    unary_from_softmax = importlib.import_module(module + ".utils").unary_from_softmax
    L, H, W = probs.shape
    d = dcrf.DenseCRF2D(W, H, L)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    d.addPairwiseGaussian(**GAUSS)
    d.addPairwiseBilateral(rgbim=img, **BIL)
    Q, tmp1, tmp2 = d.startInference()
    for _ in range(steps):
        d.klDivergence(Q)
        d.stepInference(Q, tmp1, tmp2)
    return np.array(Q).reshape(L, H, W)


def kl_loop_rows(rows: list, H: int, W: int, L: int, iters: int, mrt: float, have_pydensecrf: bool, n_all: int) -> None:
    """pydensecrf's KL loop at H x W with pydensecrf2 and with the drop-in on 1 and all threads."""
    wl = f"{W}x{H} coffee, L={L}, KL loop x{iters}"  # klDivergence + stepInference, {iters} times
    print(f"== {wl}", flush=True)
    img, probs_np = photo("coffee", H, W), scores(L, H, W, seed=0)
    ref_q = kl_loop("pydensecrf", probs_np, img, iters) if have_pydensecrf else None
    if have_pydensecrf:
        med, iqr, runs = time_fn(lambda: kl_loop("pydensecrf", probs_np, img, iters), torch.device("cpu"), mrt)
        rows.append(Row(wl, "pydensecrf2 (1 thread)", med, iqr, 1, runs=runs))
    for n in sorted({1, n_all}):
        with threads(n):
            q = kl_loop("rrm_cuda.compat.pydensecrf", probs_np, img, iters)
            if ref_q is not None:
                agree = float((q.argmax(0) == ref_q.argmax(0)).mean())
                print(f"   drop-in shim {n} thread(s): labels agree with pydensecrf2 on {100 * agree:.3f}% of pixels")
                if agree < 0.999:
                    raise SystemExit(f"the drop-in's KL loop disagrees with pydensecrf2 on {wl}")
            med, iqr, runs = time_fn(
                lambda: kl_loop("rrm_cuda.compat.pydensecrf", probs_np, img, iters), torch.device("cpu"), mrt
            )
        rows.append(Row(wl, f"rrm_cuda drop-in shim, CPU ({n} thread{'s' if n > 1 else ''})", med, iqr, n, runs=runs))


def ours(probs: torch.Tensor, image: torch.Tensor, iters: int) -> torch.Tensor:
    return rrm_cuda.dense_crf(
        probs=probs,
        image=image,
        iterations=iters,
        gaussian_sxy=GAUSS["sxy"],
        gaussian_compat=GAUSS["compat"],
        bilateral_sxy=BIL["sxy"],
        bilateral_srgb=BIL["srgb"],
        bilateral_compat=BIL["compat"],
    )


def cold(probs: torch.Tensor, image: torch.Tensor, iters: int) -> torch.Tensor:
    """``ours`` with the lattice cache emptied first: both lattices built in the call."""
    rrm_cuda.clear_lattice_cache()
    return ours(probs, image, iters)


def graphed_call(fn):
    """``fn`` captured once in a CUDA graph after an eager warm-up on a side stream: (replay, the
    captured output, which each replay rewrites). The inputs are the ones ``fn`` closes over."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


@contextlib.contextmanager
def tiled_mean_field(tile: int = 256, kernel: int = 3, pixel_tile: int = 16):
    """The tiled mean field's knobs and the public API's square pixel tiles for the block, restored after."""
    from rrm_cuda import functional

    saved_pixel = functional._PIXEL_TILE["cuda"]
    try:
        with tuned(mean_field_tile=tile, mean_field_tile_kernel=kernel):
            functional._PIXEL_TILE["cuda"] = pixel_tile
            yield
    finally:
        functional._PIXEL_TILE["cuda"] = saved_pixel


def reference(probs: torch.Tensor, image: torch.Tensor, iters: int) -> torch.Tensor:
    B, L, H, W = probs.shape
    pos = rrm_cuda.position_features(B, (H, W), GAUSS["sxy"])
    bil = rrm_cuda.bilateral_features(image, BIL["sxy"], BIL["srgb"])
    eye = torch.eye(L)
    u = rrm_cuda.unary_from_probs(probs).reshape(B, L, -1)
    return dense_crf_reference(u, [pos, bil], [-GAUSS["compat"] * eye, -BIL["compat"] * eye], iters).reshape(B, L, H, W)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes and short timing (CI)")
    ap.add_argument("--labels", type=int, default=21, help="labels of the 21-label workloads (default: 21)")
    ap.add_argument("--iterations", type=int, default=10, help="mean-field iterations (default: 10)")
    ap.add_argument("--batch", type=int, default=8, help="batch size of the batched workload (default: 8)")
    ap.add_argument(
        "--min-run-time",
        type=float,
        default=None,
        help="seconds of timing per measurement, at least 5 calls (default: 2; --quick: 0.2)",
    )
    ap.add_argument("--no-cuda", action="store_true", help="skip CUDA even when available")
    ap.add_argument(
        "--skip-cpu",
        action="store_true",
        help="time only pydensecrf2 and CUDA (the CPU result is still computed once, to check CUDA against)",
    )
    ap.add_argument("--out-dir", default=None, help="where to write JSON/PNG (default benchmarks/results)")
    args = ap.parse_args()

    L, iters = args.labels, args.iterations
    mrt = args.min_run_time if args.min_run_time is not None else (0.2 if args.quick else 2.0)
    if args.quick:
        workloads = [
            ("chelsea", 120, 160, 1, L),
            ("coffee", 120, 160, 2, L),
            ("astronaut", 48, 64, 1, L),
            ("coffee", 96, 96, 1, 3),
        ]
        ref_max_pixels = 48 * 64
    else:
        workloads = [
            ("coffee", 375, 500, 1, L),
            ("astronaut", 512, 512, 1, L),
            ("coffee", 375, 500, args.batch, L),
            ("coffee", 321, 321, 1, 3),  # RRM's pseudo-label CRFs: background + the crop's classes
            ("chelsea", 60, 80, 1, L),
        ]
        ref_max_pixels = 60 * 80
    try:
        import pydensecrf.densecrf  # noqa: F401

        have_pydensecrf = True
    except ImportError:
        have_pydensecrf = False
        print("pydensecrf2 not installed (pip install pydensecrf2): its rows are skipped")
    use_cuda = torch.cuda.is_available() and not args.no_cuda and rrm_cuda.build_info()["with_cuda"]
    n_all = os.cpu_count() or 1
    rows: list[Row] = []
    checks: list[dict] = []  # every result against pydensecrf2 (or the CPU op), kept in the JSON
    names = ["astronaut", "coffee", "chelsea"]
    for name, H, W, B, nl in workloads:
        wl = f"{W}x{H} {name} x{B}, L={nl}"
        imgs = [photo(names[(names.index(name) + b) % 3], H, W) for b in range(B)]
        probs_np = [scores(nl, H, W, seed=b) for b in range(B)]
        probs = torch.from_numpy(np.stack(probs_np))
        image = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
        print(f"== {wl}", flush=True)
        ref_q, ref_name = None, "pydensecrf2"
        if have_pydensecrf:
            ref_q = np.stack([pydensecrf_run(p, im, iters) for p, im in zip(probs_np, imgs)])
            med, iqr, runs = time_fn(
                lambda: [pydensecrf_run(p, im, iters) for p, im in zip(probs_np, imgs)],
                torch.device("cpu"),
                mrt,
            )
            rows.append(Row(wl, "pydensecrf2 (1 thread)", med, iqr, 1, runs=runs))

        def check(q: torch.Tensor, method: str) -> None:
            if ref_q is None:
                return
            agree = float((q.cpu().numpy().argmax(1) == ref_q.argmax(1)).mean())
            err = float(np.abs(q.cpu().numpy() - ref_q).max())
            print(f"   {method}: labels agree with {ref_name} on {100 * agree:.3f}% of pixels, max |dQ| {err:.2e}")
            checks.append(dict(workload=wl, method=method, against=ref_name, labels_agree=agree, max_abs_dq=err))
            if agree < 0.999:
                raise SystemExit(f"{method} disagrees with {ref_name} on {wl}")

        if ref_q is None and use_cuda:  # no pydensecrf2: CUDA is checked against the CPU op instead
            ref_q = ours(probs, image, iters).numpy()
            ref_name = "rrm_cuda CPU"
        for n in [] if args.skip_cpu else sorted({1, n_all}):
            with threads(n):
                check(ours(probs, image, iters), f"rrm_cuda CPU {n} thread(s)")
                med, iqr, runs = time_fn(lambda: ours(probs, image, iters), torch.device("cpu"), mrt)
            rows.append(Row(wl, f"rrm_cuda CPU ({n} thread{'s' if n > 1 else ''})", med, iqr, n, runs=runs))
        if not args.skip_cpu:
            # cold: the lattice cache emptied before every call, so that both lattices are built in
            # each (the rows above keep the Gaussian term's position lattice across calls, as a training
            # loop over images of one size does; pydensecrf2 builds both every call)
            with threads(n_all):
                med, iqr, runs = time_fn(lambda: cold(probs, image, iters), torch.device("cpu"), mrt)
            rows.append(Row(wl, f"rrm_cuda CPU ({n_all} threads), cold cache", med, iqr, n_all, runs=runs))
        if H * W * B <= ref_max_pixels and not args.skip_cpu:
            check(reference(probs, image, iters), "reference")
            med, iqr, runs = time_fn(lambda: reference(probs, image, iters), torch.device("cpu"), mrt)
            rows.append(Row(wl, f"pure-PyTorch reference ({n_all} threads)", med, iqr, n_all, runs=runs))
        if use_cuda:
            dev = torch.device("cuda")
            pc, ic = probs.to(dev), image.to(dev)
            check(ours(pc, ic, iters), "rrm_cuda CUDA")
            med, iqr, runs = time_fn(lambda: ours(pc, ic, iters), dev, mrt)
            rows.append(
                Row(wl, f"rrm_cuda CUDA ({torch.cuda.get_device_name(dev)})", med, iqr, None, "cuda", runs=runs)
            )
            med, iqr, runs = time_fn(lambda: cold(pc, ic, iters), dev, mrt)
            name = f"rrm_cuda CUDA, cold cache ({torch.cuda.get_device_name(dev)})"
            rows.append(Row(wl, name, med, iqr, None, "cuda", runs=runs))
            # the same call captured in a CUDA graph (counted lattices): its kernels without the host's
            # work. Session 14, written without a GPU: a failure is printed and the eager rows kept.
            try:
                replay, out = graphed_call(lambda: ours(pc, ic, iters))
                replay()
                check(out, "rrm_cuda CUDA graph")
                med, iqr, runs = time_fn(replay, dev, mrt)
                rows.append(
                    Row(
                        wl,
                        f"rrm_cuda CUDA graph ({torch.cuda.get_device_name(dev)})",
                        med,
                        iqr,
                        None,
                        "cuda",
                        runs=runs,
                    )
                )
            except (Exception, SystemExit) as exc:
                print(f"   CUDA graph row failed: {exc!r}", flush=True)
            # the experimental tiled mean field (knobs mean_field_tile 256, mean_field_tile_kernel 3, the
            # public API's pixels in 16 x 16 tiles; NOTES §15), eager; written without a GPU (session 15):
            # a failure is printed and the other rows kept
            try:
                with tiled_mean_field():
                    check(ours(pc, ic, iters), "rrm_cuda CUDA tiled mean field")
                    med, iqr, runs = time_fn(lambda: ours(pc, ic, iters), dev, mrt)
                name = f"rrm_cuda CUDA tiled mean field ({torch.cuda.get_device_name(dev)})"
                rows.append(Row(wl, name, med, iqr, None, "cuda", runs=runs))
            except (Exception, SystemExit) as exc:
                print(f"   tiled mean field row failed: {exc!r}", flush=True)
            # both: the tiled mean field captured in a CUDA graph (counted lattices cut by tiles; session 16,
            # written without a GPU: a failure is printed and the other rows kept)
            try:
                with tiled_mean_field():
                    replay, out = graphed_call(lambda: ours(pc, ic, iters))
                    replay()
                    check(out, "rrm_cuda CUDA graph, tiled mean field")
                    med, iqr, runs = time_fn(replay, dev, mrt)
                name = f"rrm_cuda CUDA graph, tiled mean field ({torch.cuda.get_device_name(dev)})"
                rows.append(Row(wl, name, med, iqr, None, "cuda", runs=runs))
            except (Exception, SystemExit) as exc:
                print(f"   CUDA graph tiled row failed: {exc!r}", flush=True)
    # pydensecrf's step-wise API (the KL loop of its README) through the drop-in shim: one
    # permutohedral_filter per term and step (lattices kept), against pydensecrf2's same loop; a CPU
    # workload, left out by --skip-cpu (a GPU run's time is for the GPU rows)
    if args.skip_cpu:
        kl_workloads = []
    else:
        kl_workloads = [(120, 160)] if args.quick else [(375, 500)]
    for H, W in kl_workloads:
        kl_loop_rows(rows, H, W, L, iters, mrt, have_pydensecrf, n_all)
    baseline = "pydensecrf2 (1 thread)" if have_pydensecrf else None
    print()
    print_table(rows, baseline)
    dev = torch.device("cuda") if use_cuda else torch.device("cpu")
    meta = metadata(dev)
    meta.update(
        labels=L,
        labels_note="per workload (L= in its name); the 321x321 L=3 row is RRM's pseudo-label CRF",
        iterations=iters,
        quick=args.quick,
        kernels={"gaussian": GAUSS, "bilateral": BIL},
        includes=(
            "lattice builds + all iterations; the Gaussian (positions) lattice is kept across calls by "
            "the lattice cache except in the 'cold cache' rows, which build both lattices every call"
        ),
        min_run_time_s=mrt,
        checks=checks,
    )
    tag = device_tag(dev) + ("-quick" if args.quick else "")
    kw = {"out_dir": args.out_dir} if args.out_dir else {}
    paths = write_results(
        "crf",
        tag,
        meta,
        rows,
        baseline,
        title=f"dense CRF, {L} labels, {iters} it. ({meta['cpu'][:30]}, {dev})",
        **kw,
    )
    print("wrote", *paths)


if __name__ == "__main__":
    main()
