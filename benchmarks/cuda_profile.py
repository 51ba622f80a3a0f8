"""Where the GPU time of rrm_cuda's ops goes: CUDA-event timings of the parts (lattice build, one
filter, the whole dense CRF, the energy loss) and torch.profiler's table of the kernels they launch.

    python benchmarks/cuda_profile.py                # 512x512, 21 labels, 10 iterations; energy 8 x 21 x 160^2
    python benchmarks/cuda_profile.py --out-dir DIR  # also writes cuda_profile_<gpu>.json

Needs a CUDA device and a CUDA build. Reports only (no speed assertions).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rrm_cuda  # noqa: E402

ops = torch.ops.rrm_cuda


def event_ms(fn, reps: int = 20) -> float:
    """Median milliseconds of fn() by CUDA events, after a warm-up."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def pipelined_ms(fn, reps: int = 20) -> float:
    """Milliseconds per call of fn() run back to back with one synchronisation at the end (a training
    loop: the host prepares call i+1 while the GPU still runs call i), best of 3 batches."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            fn()
        b.record()
        b.synchronize()
        best = min(best, a.elapsed_time(b) / reps)
    return best


def ab_group(
    res: dict[str, float],
    group: str,
    settings: list[tuple[str, Callable[[], None]]],
    workloads: dict[str, Callable[[], None]],
    default: str,
    rounds: int = 15,
) -> list[str]:
    """Times every (setting, workload) pair with the settings taking turns: each round applies each
    setting, makes one untimed call (a lattice cache refilled) and one timed call of each workload,
    so that clock and thermal drift fall on all settings alike. Stores the medians in ``res`` as
    "A/B {group} {setting}: {workload}" and returns summary lines: per workload, each setting's
    median against the default's, the fastest marked."""
    times: dict[tuple[str, str], list[float]] = {(s, w): [] for s, _ in settings for w in workloads}
    for _ in range(rounds):
        for label, apply in settings:
            apply()
            for wname, fn in workloads.items():
                fn()
                torch.cuda.synchronize()
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times[label, wname].append(a.elapsed_time(b))
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    lines = []
    for wname in workloads:
        base = med[default, wname]
        best = min((med[s, wname], s) for s, _ in settings)[1]
        cells = []
        for label, _ in settings:
            ms = med[label, wname]
            res[f"A/B {group} {label}: {wname}"] = ms
            mark = "*" if label == best else ""
            cells.append(f"{label}{mark} {ms:.3f} ms ({100 * (ms / base - 1):+.1f}%)")
        lines.append(f"  {group} | {wname}: " + "; ".join(cells))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512, help="image side of the profiled dense CRF (default: 512)")
    ap.add_argument("--labels", type=int, default=21, help="labels (default: 21)")
    ap.add_argument("--iterations", type=int, default=10, help="mean-field iterations (default: 10)")
    ap.add_argument("--out-dir", default=None, help="also write cuda_profile_<device>.json there")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("cuda_profile.py needs a CUDA device")
    dev = torch.device("cuda")
    g = torch.Generator(device="cpu").manual_seed(0)
    S, L = args.size, args.labels
    from skimage import data

    img = torch.from_numpy(data.astronaut()[:S, :S].copy()).permute(2, 0, 1)[None].to(dev)
    probs = torch.softmax(torch.randn(1, L, S // 8, S // 8, generator=g) * 3, 1)
    probs = torch.nn.functional.interpolate(probs, size=(S, S), mode="bilinear").to(dev)
    pos = rrm_cuda.position_features(1, (S, S), 3.0, device=dev)
    bil = rrm_cuda.bilateral_features(img, 80.0, 13.0)
    vals = torch.rand(1, L, S * S, device=dev)
    res: dict[str, float] = {}
    res["build bilateral (d=5)"] = event_ms(lambda: ops.lattice_num_vertices(bil))
    res["build positions (d=2)"] = event_ms(lambda: ops.lattice_num_vertices(pos))
    res["build + 1 filter, d=5, 21 ch"] = event_ms(lambda: ops.permutohedral_filter(vals, bil, False))
    res["build + 1 filter, d=2, 21 ch"] = event_ms(lambda: ops.permutohedral_filter(vals, pos, False))
    crf = lambda: rrm_cuda.dense_crf(probs=probs, image=img, iterations=args.iterations)  # noqa: E731
    res[f"dense_crf {S}x{S}x{L}x{args.iterations} (public API)"] = event_ms(crf)
    u = rrm_cuda.unary_from_probs(probs).reshape(1, L, -1).contiguous()
    eye = torch.eye(L, device=dev)
    compat = torch.stack([-3 * eye, -10 * eye])
    raw = lambda: ops.dense_crf(u, [pos, bil], compat, [True, True], [0, 0], args.iterations)  # noqa: E731
    res["dense_crf op alone (no Python checks)"] = event_ms(raw)
    # the Gaussian term's lattice and normaliser from the lattice cache (what the public API does)
    cached = lambda: ops.dense_crf(u, [pos, bil], compat, [True, True], [0, 0], args.iterations, [True, False])  # noqa: E731
    res["dense_crf op alone, position lattice cached"] = event_ms(cached)
    for B in (1, 8):
        ub = u.expand(B, -1, -1).contiguous()
        pb, bb = pos.expand(B, -1, -1).contiguous(), bil.expand(B, -1, -1).contiguous()
        res[f"dense_crf op batch {B}"] = event_ms(
            lambda: ops.dense_crf(ub, [pb, bb], compat, [True, True], [0, 0], args.iterations), reps=10
        )
    # batch 8 with shared lattices: one position lattice, one bilateral lattice per image
    ub = u.expand(8, -1, -1).contiguous()
    res["dense_crf op batch 8, lattices shared (1 image)"] = event_ms(
        lambda: ops.dense_crf(ub, [pos, bil], compat, [True, True], [0, 0], args.iterations), reps=10
    )
    # RRM's pseudo-label CRFs: 2 x 4 unaries (alpha 4 and 32) of 3 labels over 4 crops of 321^2
    c = min(321, S)
    crop = img[..., :c, :c].expand(4, -1, -1, -1).contiguous()
    p3 = torch.softmax(torch.randn(8, 3, 40, 40, generator=g) * 3, 1)
    p3 = torch.nn.functional.interpolate(p3, size=(c, c), mode="bilinear").to(dev)
    res["pseudo-label CRFs 8 x 3 x 321^2 over 4 crops"] = event_ms(
        lambda: rrm_cuda.dense_crf(probs=p3, image=crop, iterations=args.iterations), reps=10
    )
    # backward through the mean field (CRF-as-RNN), w.r.t. the unary
    ug = u.clone().requires_grad_()
    res[f"dense_crf fwd+bwd {S}x{S}x{L}x{args.iterations} (unary grad)"] = event_ms(
        lambda: ops.dense_crf(ug, [pos, bil], compat, [True, True], [0, 0], args.iterations).sum().backward(),
        reps=5,
    )
    # energy loss at RRM's setting, on the energy benchmark's photographs
    from benchmarks.energy_bench import make_inputs

    images, p, rois, labels = (t.to(dev) for t in make_inputs(8, 21, 321))
    p.requires_grad_()

    def energy_fb(mod) -> None:
        # autograd.grad, as energy_bench's fresh leaf: no accumulation into p.grad (a 69 MB add per
        # call that a training step, whose probabilities come from a network, never makes)
        torch.autograd.grad(mod(images, p, rois, labels).sum(), p)

    for grad in ("rloss", "exact"):
        m = rrm_cuda.DenseEnergyLoss(1e-7, 15.0, 100.0, 0.5, gradient=grad)
        res[f"energy fwd+bwd 8x21x160^2 [{grad}]"] = event_ms(lambda: energy_fb(m))
        m2 = rrm_cuda.DenseEnergyLoss(1e-7, 15.0, 100.0, 0.5, gradient=grad, check_inputs=False)
        res[f"energy fwd+bwd [{grad}], check_inputs=False"] = event_ms(lambda: energy_fb(m2))
    # A/B in the same process: the loss with F.interpolate's downscaling, ROI product and gate as
    # separate ATen ops (the path other scales take) instead of ops.dense_energy_inputs
    from rrm_cuda import energy as E

    m3 = rrm_cuda.DenseEnergyLoss(1e-7, 15.0, 100.0, 0.5, gradient="rloss", check_inputs=False)
    saved = dict(E._FUSED_STRIDES)
    E._FUSED_STRIDES.clear()
    try:
        res["energy fwd+bwd [rloss], check_inputs=False, F.interpolate path"] = event_ms(lambda: energy_fb(m3))
    finally:
        E._FUSED_STRIDES.update(saved)
    # A/B in the same process: the public dense CRF (uint8 image) reading its score checks before
    # queuing the op (the old order) against after it (functional._DEFER_CHECKS)
    from rrm_cuda import functional as FN

    for defer in (False, True):
        FN._DEFER_CHECKS = defer
        tag = "deferred" if defer else "read first"
        res[f"A/B dense_crf public API, checks {tag}"] = event_ms(crf)
        res[f"A/B dense_crf public API, checks {tag}, back to back"] = pipelined_ms(crf)
    FN._DEFER_CHECKS = True
    # A/B in the same process: the checked loss reading its statistics before queuing the op (the
    # old order) against after it (E._DEFER_CHECKS)
    for defer in (False, True):
        E._DEFER_CHECKS = defer
        m4 = rrm_cuda.DenseEnergyLoss(1e-7, 15.0, 100.0, 0.5, gradient="rloss")
        tag = "deferred" if defer else "read first"
        res[f"A/B energy fwd+bwd [rloss], checked, checks {tag}"] = event_ms(lambda: energy_fb(m4))
        res[f"A/B energy fwd+bwd [rloss], checked, checks {tag}, back to back"] = pipelined_ms(lambda: energy_fb(m4))
    E._DEFER_CHECKS = True
    # A/B in the same process of the CUDA launch-configuration knobs (common/tuning.h; the results
    # are bitwise the same for every setting): the splat chunks launched in vertex order (tile 0) and
    # by pixel tiles of several sizes; the fused slice's vertex rows whole or four channels at a time;
    # the energy loss's rows of 4 channels (four per thread) or one channel per thread, its slice's
    # loads a float4 or one channel at a time, its exact gradient's two splats in one pass or two.
    # Lattices are built per call, except the cached position lattice: the cache is cleared around
    # each switch.
    from rrm_cuda import _C

    knobs = _C.tuning()

    def knob(name: str, value: int) -> None:
        _C.set_tuning(name, value)
        rrm_cuda.clear_lattice_cache()

    # Each group's settings take turns (ab_group); the defaults are those of common/tuning.cpp.
    # ub, pb, bb: the batch-8 inputs above.
    batch8 = lambda: ops.dense_crf(ub, [pb, bb], compat, [True, True], [0, 0], args.iterations)  # noqa: E731
    m5 = rrm_cuda.DenseEnergyLoss(1e-7, 15.0, 100.0, 0.5, gradient="exact", check_inputs=False)
    summary: list[str] = []

    def setting(**values: int) -> Callable[[], None]:
        def apply() -> None:
            for name, value in values.items():
                knob(name, value)

        return apply

    tiles = sorted({0, 16, knobs["splat_tile"], 256})
    summary += ab_group(
        res,
        "splat",
        [(f"tile {t}" if t else "vertex order", setting(splat_tile=t)) for t in tiles],
        {
            "dense_crf op alone": raw,
            "dense_crf op batch 8": batch8,
            "energy fwd+bwd [rloss], unchecked": lambda: energy_fb(m3),
        },
        default=f"tile {knobs['splat_tile']}" if knobs["splat_tile"] else "vertex order",
    )
    knob("splat_tile", knobs["splat_tile"])

    def switch(group: str, name: str, off: str, on: str, workloads: dict[str, Callable[[], None]]) -> list[str]:
        """ab_group of a 0/1 knob (off, on), then the knob back to its default."""
        lines = ab_group(
            res, group, [(off, setting(**{name: 0})), (on, setting(**{name: 1}))], workloads, on if knobs[name] else off
        )
        knob(name, knobs[name])
        return lines

    energy_rloss, energy_exact = lambda: energy_fb(m3), lambda: energy_fb(m5)
    crf_ops = {"dense_crf op alone": raw, "dense_crf op batch 8": batch8}
    # the fused slice: vertex rows whole (96 registers at 21 labels) or 4 channels at a time (64)
    summary += switch("slice", "slice_group4", "whole rows", "4 channels at a time", crf_ops)
    # the mean field's float4 splat and four-channel slice compiled for 5 or 6 resident blocks per SM
    # (at most 48 or 40 registers, with spills) or as the compiler likes (56 and 64 registers, 50 % occupancy on
    # the H200 of session 30, latency-bound): do more warps in flight beat the spills? The energy
    # loss's float4 splats and the filter's take the cap too.
    caps = [(f"min {c} blocks" if c else "uncapped", setting(item_min_blocks=c)) for c in (0, 5, 6)]
    summary += ab_group(
        res,
        "register cap",
        caps,
        {**crf_ops, "energy fwd+bwd [rloss], unchecked": energy_rloss},
        default=f"min {knobs['item_min_blocks']} blocks" if knobs["item_min_blocks"] else "uncapped",
    )
    knob("item_min_blocks", knobs["item_min_blocks"])
    # the generic filter's lattice rows (permutohedral_filter, its gradients, dense_crf's backward): one
    # channel per thread, or padded to rows of four taken four at a time (session 30, not yet timed)
    vg = vals.clone().requires_grad_()
    summary += switch(
        "filter rows",
        "filter_rows4",
        "one channel per thread",
        "rows of four",
        {
            "build + 1 filter, d=5, 21 ch": lambda: ops.permutohedral_filter(vals, bil, False),
            "filter fwd+bwd (values), d=5, 21 ch": lambda: rrm_cuda.permutohedral_filter(vg, bil).sum().backward(),
            "dense_crf fwd+bwd (unary grad)": lambda: (
                ops.dense_crf(ug, [pos, bil], compat, [True, True], [0, 0], args.iterations).sum().backward()
            ),
        },
    )

    def counted(fn: Callable[[], None]) -> Callable[[], None]:
        """fn with its lattices counted (knob counted_lattice), as a CUDA graph builds them."""

        def run() -> None:
            _C.set_tuning("counted_lattice", 1)
            try:
                fn()
            finally:
                _C.set_tuning("counted_lattice", knobs["counted_lattice"])

        return run

    counted_crf = counted(raw)

    # the splats' per-vertex sums of the chunk sums: by the last chunk in the splat's launch, or a
    # second launch (counted lattices in the mean field: since session 25 in the splat's launch too)
    summary += switch(
        "chunk sums",
        "splat_fused_reduce",
        "second launch",
        "in the splat launch",
        {
            **crf_ops,
            "dense_crf op alone, counted lattices": counted_crf,
            "energy fwd+bwd [rloss], unchecked": energy_rloss,
            "energy fwd+bwd [exact], unchecked": energy_exact,
        },
    )
    # the blurs: one lattice axis per launch, or two (BlurPairFunctor: 3 of the first axis's rows per thread)
    summary += switch(
        "blur",
        "blur_pairs",
        "one axis per launch",
        "two axes per launch",
        {**crf_ops, "energy fwd+bwd [exact], unchecked": energy_exact},
    )
    # the energy loss's lattice: its vertex count read back mid-op (buffers sized to it), or counted (no host
    # wait; buffers for N (d+1) vertices, launches over the counts in device memory)
    m6 = rrm_cuda.DenseEnergyLoss(1e-7, 15.0, 100.0, 0.5, gradient="rloss")
    summary += switch(
        "energy lattice",
        "counted_lattice",
        "count read back",
        "counted (no host wait)",
        {
            "energy fwd+bwd [rloss], unchecked": energy_rloss,
            "energy fwd+bwd [exact], unchecked": energy_exact,
            "energy fwd+bwd [rloss], checked": lambda: energy_fb(m6),
        },
    )

    counted_energy = counted(energy_rloss)

    # the lattice build's hash insert: threads over the entries pixel by pixel (all d + 1 corners of a
    # pixel side by side) or corner-major (a warp inserts one corner of 32 neighbouring pixels: mostly
    # the same few keys, whose probes share their loads)
    summary += switch(
        "hash insert",
        "insert_corner_major",
        "entry order",
        "corner-major",
        {
            "build bilateral (d=5)": lambda: ops.lattice_num_vertices(bil),
            "build positions (d=2)": lambda: ops.lattice_num_vertices(pos),
            "dense_crf op alone": raw,
            "energy fwd+bwd [rloss], unchecked": energy_rloss,
        },
    )

    # the hash insert's claim counters (knob insert_shards): one per image on every table, on which
    # every claim and every probe that met an empty slot serialised (0, before session 25), against
    # up to 32 per image on 128-byte lines of their own and none on tables of 2E slots (the counted
    # lattices of a CUDA graph). Session 13-24 profiles: 90-100 us per insert, for 0.8-1.6 M entries.
    def shards_label(s: int) -> str:
        return f"up to {s} per image" if s else "one per image, every table"

    summary += ab_group(
        res,
        "insert counters",
        [(shards_label(s), setting(insert_shards=s)) for s in sorted({0, 32, knobs["insert_shards"]})],
        {
            "build bilateral (d=5)": lambda: ops.lattice_num_vertices(bil),
            "build positions (d=2)": lambda: ops.lattice_num_vertices(pos),
            "dense_crf op alone": raw,
            "energy fwd+bwd [rloss], unchecked": energy_rloss,
            "energy fwd+bwd [rloss], unchecked, counted lattice": counted_energy,
        },
        default=shards_label(knobs["insert_shards"]),
    )
    knob("insert_shards", knobs["insert_shards"])
    # the build's per-image scans of chunk counts (rows of M + 1; a counted lattice's N (d + 1) + 1)
    # in a batch: ATen's row kernel (one block per row, 1024 elements a round) or one flat cub scan
    # rebased per row (knob flat_scan_min: rows at least this long go flat)
    summary += ab_group(
        res,
        "row scans",
        [
            ("row kernel", setting(flat_scan_min=10**9)),
            (f"flat from {knobs['flat_scan_min']}", setting(flat_scan_min=knobs["flat_scan_min"])),
            ("always flat", setting(flat_scan_min=1)),
        ],
        {
            "dense_crf op batch 8": batch8,
            "energy fwd+bwd [rloss], unchecked": energy_rloss,
            "energy fwd+bwd [rloss], unchecked, counted lattice": counted_energy,
        },
        default=f"flat from {knobs['flat_scan_min']}",
    )
    knob("flat_scan_min", knobs["flat_scan_min"])
    # the energy loss's packing of its (B, K, N) probabilities into lattice rows: one thread per
    # (pixel, channel), or a transpose through shared memory (session 24's profile: 34 us, 37 MB)
    summary += switch(
        "pack",
        "energy_pack_blocks",
        "thread per (pixel, channel)",
        "shared-memory transpose",
        {
            "energy fwd+bwd [rloss], unchecked": energy_rloss,
            "energy fwd+bwd [exact], unchecked": energy_exact,
        },
    )
    # the energy loss inputs' backward (the (B, K, 321, 321) gradient from the (B, K, 160, 160) one):
    # a thread per input column pair and class, or a thread per gradient pixel writing the 2 x 2
    # input block of every class (session 24's profile: 92 us for 86 MB moved)
    summary += switch(
        "inputs backward",
        "energy_backward_blocks",
        "column pairs",
        "2x2 blocks, all classes",
        {
            "energy fwd+bwd [rloss], unchecked": energy_rloss,
            "energy fwd+bwd [exact], unchecked": energy_exact,
            "energy fwd+bwd [rloss], unchecked, counted lattice": counted_energy,
        },
    )
    # the pixel order of the public dense CRF and energy loss: 16 x 16 tiles (functional._PIXEL_TILE) or raster
    tile_saved = FN._PIXEL_TILE["cuda"]

    def pixel_tile(t: int) -> Callable[[], None]:
        def apply() -> None:
            FN._PIXEL_TILE["cuda"] = t

        return apply

    summary += ab_group(
        res,
        "pixel order",
        [("raster", pixel_tile(0)), ("16x16 tiles", pixel_tile(16))],
        {
            f"dense_crf {S}x{S}x{L} public API": crf,
            "pseudo-label CRFs 8 x 3 x 321^2 over 4 crops": lambda: rrm_cuda.dense_crf(
                probs=p3, image=crop, iterations=args.iterations
            ),
            "energy fwd+bwd [rloss], unchecked": lambda: energy_fb(m3),
            "energy fwd+bwd [exact], unchecked": lambda: energy_fb(m5),
        },
        default="16x16 tiles" if tile_saved else "raster",
    )
    FN._PIXEL_TILE["cuda"] = tile_saved
    # the tiled mean field (knobs mean_field_tile, mean_field_tile_kernel): chunks cut by tiles of P
    # pixels, the splat one block per tile from shared memory (kernel 1), the slice in that block too
    # (kernel 2); kernel 0 is the chunk splat over the cut chunks (the cut's own cost). Tiles of 256
    # consecutive pixels are half rows of a 512-wide image in raster order, 16 x 16 squares in the
    # public API's tile order (_PIXEL_TILE 16), which cuts fewer chunks; 1024 pixels in 32 x 32
    # order cut fewer still (the bilateral lattice's vertices span many small tiles), with 96 KiB of
    # shared memory per block (two blocks per SM).

    def mean_field(tile: int, kernel: int, pixel: int = 0, counted: int = 0) -> Callable[[], None]:
        def apply() -> None:
            knob("mean_field_tile_kernel", kernel)
            knob("mean_field_tile", tile)
            knob("counted_lattice", counted)
            FN._PIXEL_TILE["cuda"] = pixel

        return apply

    summary += ab_group(
        res,
        "mean field tiles",
        [
            ("untiled", mean_field(0, knobs["mean_field_tile_kernel"])),
            ("P 256, chunk splat", mean_field(256, 0)),
            ("P 256, block splat", mean_field(256, 1)),
            ("P 256, block slice + splat", mean_field(256, 2)),
            ("P 256, block slice + splat, 16x16 pixel tiles", mean_field(256, 2, 16)),
            ("P 256, block rows + slice + splat, 16x16 pixel tiles", mean_field(256, 3, 16)),
            ("P 1024, block slice + splat, 32x32 pixel tiles", mean_field(1024, 2, 32)),
            # the same as the 16x16 kernel 3 row, its lattices counted (no host read of their sizes)
            ("P 256, block rows + slice + splat, 16x16 pixel tiles, counted", mean_field(256, 3, 16, 1)),
            ("untiled, counted", mean_field(0, knobs["mean_field_tile_kernel"], 0, 1)),
        ],
        {
            f"dense_crf {S}x{S}x{L} public API": crf,
            "dense_crf op alone": raw,
            "dense_crf op batch 8": batch8,
        },
        default="untiled",
    )
    knob("mean_field_tile", knobs["mean_field_tile"])
    knob("mean_field_tile_kernel", knobs["mean_field_tile_kernel"])
    knob("counted_lattice", knobs["counted_lattice"])
    FN._PIXEL_TILE["cuda"] = tile_saved

    def energy_label(rows4: int, slice4: int, pair: int) -> str:
        return (
            f"rows {'4 ch/thread' if rows4 else '1 ch/thread'}, slice {'float4' if slice4 else 'scalar'}, "
            f"splats {'paired' if pair else 'separate'}"
        )

    combos = ((0, 0, 0), (1, 0, 0), (1, 1, 0), (0, 0, 1), (1, 0, 1), (1, 1, 1))  # the slice's float4 needs rows of 4
    energy_settings = [
        (energy_label(*c), setting(energy_rows4=c[0], energy_slice4=c[1], energy_pair_splat=c[2])) for c in combos
    ]
    rows4 = int(knobs["energy_rows4"] != 0)
    default_energy = energy_label(
        rows4, int(rows4 and knobs["energy_slice4"] != 0), int(knobs["energy_pair_splat"] != 0)
    )
    summary += ab_group(
        res,
        "energy",
        energy_settings,
        {"fwd+bwd [rloss], unchecked": lambda: energy_fb(m3), "fwd+bwd [exact], unchecked": lambda: energy_fb(m5)},
        default=default_energy,
    )
    for name, value in knobs.items():
        knob(name, value)
    # BCD loss at RRM's ResNet-38 setting: batch 4, 4096-channel features at 41x41, 21 classes
    gb = torch.Generator(device=dev).manual_seed(0)
    seg = torch.randn(4, 21, 41, 41, device=dev, generator=gb)
    feats = torch.randn(4, 4096, 41, 41, device=dev, generator=gb).relu_().requires_grad_()

    def bcd_fb() -> None:
        rrm_cuda.bcd_loss(seg, feats).backward()

    res["BCD fwd+bwd 4x4096x41^2, K=21"] = event_ms(bcd_fb)
    name = torch.cuda.get_device_name(dev)
    print(f"device: {name}, torch {torch.__version__}")
    for k, v in res.items():
        print(f"  {k:<72} {v:9.3f} ms")
    print("\nknob A/B (settings taking turns; % against the current default, * the fastest):")
    print("\n".join(summary))
    from torch.profiler import ProfilerActivity, profile

    # Each table is of a warm call: the knob switches above cleared the lattice cache, and a cold
    # public dense_crf call also builds the cached position lattice and its normaliser (the session
    # 24 table counted two builds where a warm call makes one).
    crf()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        crf()
        torch.cuda.synchronize()
    print("\nkernels of one dense_crf call (position lattice cached):")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=110))
    # the same call with the tiled mean field (P 256, block slice + splat, 16 x 16 pixel tiles)
    mean_field(256, 2, 16)()
    crf()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        crf()
        torch.cuda.synchronize()
    mean_field(knobs["mean_field_tile"], knobs["mean_field_tile_kernel"], tile_saved)()
    print("\nkernels of one dense_crf call, tiled mean field (P 256, block slice + splat, 16x16 pixel tiles):")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=110))
    rrm_cuda.dense_crf(probs=p3, image=crop, iterations=args.iterations)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        rrm_cuda.dense_crf(probs=p3, image=crop, iterations=args.iterations)
        torch.cuda.synchronize()
    print("\nkernels of RRM's pseudo-label CRFs (8 x 3 labels over 4 crops of 321^2):")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=110))
    energy_fb(m)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        energy_fb(m)
        torch.cuda.synchronize()
    print("\nkernels of one energy-loss fwd+bwd (exact):")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=32, max_name_column_width=110))
    # the same loss (rloss) on a counted lattice, as a CUDA graph replays it: buffers and scans sized
    # by the bound N (d + 1) (benchmarks/NOTES.md §26: the per-image scans, the insert's counters)
    counted_energy()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        counted_energy()
        torch.cuda.synchronize()
    print("\nkernels of one energy-loss fwd+bwd (rloss), counted lattice:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=32, max_name_column_width=110))
    bcd_fb()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        bcd_fb()
        torch.cuda.synchronize()
    print("\nkernels of one BCD-loss fwd+bwd (B4, C4096, 41x41, K21):")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=110))
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        tag = name.replace("NVIDIA ", "").replace(" ", "-").lower()
        with open(os.path.join(args.out_dir, f"cuda_profile_{tag}.json"), "w") as f:
            json.dump(dict(device=name, torch=torch.__version__, ms=res), f, indent=1)


if __name__ == "__main__":
    main()
