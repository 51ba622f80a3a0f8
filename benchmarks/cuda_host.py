"""Host side of rrm_cuda's GPU ops, measured on a GPU (benchmarks/host_overhead.py counts ops on the
CPU): per call, how many kernels are launched, how many synchronisations (stream, device, event)
and copies between host and device (cudaMemcpy*, either way; a device-to-host one drains the queue)
the host makes, how many ATen ops run (nested ones included), and how the wall time compares
with the kernels' time. Where the kernels are faster than the host can queue them, these counts
(times this machine's cost of a launch, printed as the floor) bound a call from below. Then the
host's timeline of one 512² dense CRF and one energy loss fwd+bwd: each top-level op in order with
its host time, the host's own time before it (Python, autograd), its nested launches and ATen ops,
and each wait on the device with the chain of ops that made it.

    python benchmarks/cuda_host.py                # prints the table
    python benchmarks/cuda_host.py --out-dir DIR  # also writes cuda_host_<gpu>.json

Needs a CUDA device and a CUDA build. Reports only (no speed assertions).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rrm_cuda  # noqa: E402
from benchmarks.cuda_profile import event_ms, pipelined_ms  # noqa: E402

_LAUNCH = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
_SYNC = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
_COPY = ("cudaMemcpy", "cudaMemcpyAsync")


def host_floor_us(reps: int = 2000) -> dict[str, float]:
    """Microseconds per back-to-back call of a one-element CUDA add (one launch, nothing else), and
    of a host-only tensor op (the dispatcher alone): this machine's floor per launch and per op."""
    x = torch.zeros(1, device="cuda")
    y = torch.zeros(1)
    out = {}
    for name, fn in (("cuda add_ (1 launch)", lambda: x.add_(1)), ("cpu add_ (dispatch only)", lambda: y.add_(1))):
        for _ in range(100):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        out[name] = (time.perf_counter() - t0) / reps * 1e6
    return out


def counts(fn: Callable[[], None]) -> dict[str, float]:
    """Runtime-API and op counts of one call of fn (after a warm-up), and its kernels' GPU time."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    launches = syncs = copies = aten = 0
    kernel_us = 0.0
    for e in prof.events():
        name = e.name
        if name in _LAUNCH:
            launches += 1
        elif name in _SYNC:
            syncs += 1
        elif name in _COPY:
            copies += 1
        elif name.startswith("aten::"):
            aten += 1
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernel_us += e.time_range.elapsed_us()
    return {
        "kernel launches": launches,
        "syncs": syncs,
        "copies": copies,
        "aten ops": aten,
        "kernels ms": kernel_us / 1e3,
    }


def timeline(fn: Callable[[], None], cuda: bool = True) -> list[dict[str, object]]:
    """Where one call of fn spends its host time: its top-level ops in order (host start and
    duration in µs, the launches, waits and ATen ops nested in each, and the host's own time before
    it: Python, autograd), each wait on the device with the chain of ops around it. Runtime calls
    (launches, waits, copies) go to the ops that enclose them in time, whatever thread the profiler
    gives them. Runs on the CPU too (cuda=False: no launches or waits; only the calling thread's ops,
    not those of a CPU op's workers), as the tests' dry run."""
    for _ in range(3):
        fn()
    if cuda:
        torch.cuda.synchronize()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        fn()
    cpu = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
    return timeline_rows(cpu, one_thread=not cuda)


def timeline_rows(cpu: list, one_thread: bool) -> list[dict[str, object]]:
    """timeline's table from the profiler's host-side events (name, thread, time_range, cpu_parent,
    cpu_children); one_thread: only the ops of the thread of the first op."""
    runtime_names = set(_LAUNCH) | set(_SYNC) | set(_COPY)
    ops = [e for e in cpu if not e.name.startswith("cu")]
    runtime = [e for e in cpu if e.name in runtime_names]
    if not ops:
        return []
    if one_thread:  # the CPU's parallel_for workers run nested ops on threads of their own
        first = min(ops, key=lambda e: e.time_range.start)
        ops = [e for e in ops if e.thread == first.thread]
    ops.sort(key=lambda e: (e.time_range.start, -e.time_range.end))

    def within(e, t: float) -> bool:
        return e.time_range.start <= t <= e.time_range.end

    def chain(t: float, top) -> str:  # the ops enclosing time t inside top, outermost first
        inner = [e for e in ops if e.thread == top.thread and within(e, t) and within(top, e.time_range.start)]
        inner.sort(key=lambda e: (e.time_range.start, -e.time_range.end))
        return " > ".join(e.name for e in inner) or "(no op)"

    tops = [e for e in ops if e.cpu_parent is None]
    t0 = min([tops[0].time_range.start] + [r.time_range.start for r in runtime])
    prev_end = t0
    rows: list[dict[str, object]] = []
    for e in tops:
        nested, stack = [], list(e.cpu_children)
        while stack:
            c = stack.pop()
            nested.append(c)
            stack.extend(c.cpu_children)
        mine = [r for r in runtime if within(e, r.time_range.start)]
        rows.append(
            {
                "op": e.name,
                "start us": e.time_range.start - t0,
                "host us": e.time_range.elapsed_us(),
                "gap before us": max(0.0, e.time_range.start - prev_end),
                "launches": sum(r.name in _LAUNCH for r in mine),
                "aten ops": sum(c.name.startswith("aten::") for c in [e, *nested]),
                "waits": [
                    (f"{chain(r.time_range.start, e)} > {r.name}", r.time_range.elapsed_us())
                    for r in mine
                    if r.name in _SYNC or r.name in _COPY
                ],
            }
        )
        prev_end = max(prev_end, e.time_range.end)
    # runtime calls outside every top-level op (a wait of the autograd engine's, say)
    for r in runtime:
        if not any(within(e, r.time_range.start) for e in tops):
            rows.append(
                {
                    "op": f"({r.name} outside the ops)",
                    "start us": r.time_range.start - t0,
                    "host us": r.time_range.elapsed_us(),
                    "gap before us": 0.0,
                    "launches": int(r.name in _LAUNCH),
                    "aten ops": 0,
                    "waits": [] if r.name in _LAUNCH else [(r.name, r.time_range.elapsed_us())],
                }
            )
    rows.sort(key=lambda r: r["start us"])
    return rows


def print_timeline(name: str, rows: list[dict[str, object]]) -> None:
    print(f"\nhost timeline of one call: {name}")
    print(f"{'start us':>9} {'gap us':>7} {'host us':>8} {'launch':>6} {'aten':>5}  op")
    for r in rows:
        print(
            f"{r['start us']:9.1f} {r['gap before us']:7.1f} {r['host us']:8.1f} {r['launches']:6d} "
            f"{r['aten ops']:5d}  {r['op']}"
        )
        for path, us in r["waits"]:
            print(f"{'':>33}  wait {us:8.1f} us  {path}")
    total = sum(r["host us"] + r["gap before us"] for r in rows)
    print(f"{'':>9} {'':>7} {total:8.1f}  (ops and gaps, µs)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default=None, help="also write cuda_host_<device>.json there")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("cuda_host.py needs a CUDA device")
    dev = torch.device("cuda")
    from skimage import data

    from benchmarks.energy_bench import make_inputs

    g = torch.Generator().manual_seed(0)
    work: dict[str, Callable[[], None]] = {}
    for S, name in ((512, "astronaut"), (60, "chelsea")):
        img = torch.from_numpy(getattr(data, name)()[:S, :S].copy()).permute(2, 0, 1)[None].to(dev)
        probs = torch.softmax(torch.randn(1, 21, S, img.shape[-1], generator=g) * 3, 1).to(dev)
        work[f"dense_crf {S}x{img.shape[-1]}x21x10"] = lambda p=probs, i=img: rrm_cuda.dense_crf(probs=p, image=i)
    images, p, rois, labels = (t.to(dev) for t in make_inputs(8, 21, 321))
    p.requires_grad_()
    for grad in ("rloss", "exact"):
        for checked in (True, False):
            m = rrm_cuda.DenseEnergyLoss(1e-7, 15.0, 100.0, 0.5, gradient=grad, check_inputs=checked)
            tag = f"energy fwd+bwd 8x21x160^2 [{grad}]{'' if checked else ', unchecked'}"
            work[tag] = lambda m=m: torch.autograd.grad(m(images, p, rois, labels).sum(), p)

    def counted(fn: Callable[[], None]) -> Callable[[], None]:
        # the energy loss's lattice built without the read of its size (knob counted_lattice)
        def run() -> None:
            saved = rrm_cuda._ext._C.tuning()["counted_lattice"]
            rrm_cuda._ext._C.set_tuning("counted_lattice", 1)
            try:
                fn()
            finally:
                rrm_cuda._ext._C.set_tuning("counted_lattice", saved)

        return run

    for grad in ("rloss", "exact"):
        tag = f"energy fwd+bwd 8x21x160^2 [{grad}], unchecked"
        work[f"{tag}, counted lattice"] = counted(work[tag])

    floor = host_floor_us()
    rows = {}
    for name, fn in work.items():
        row = counts(fn)
        row["wall ms"] = event_ms(fn)
        row["back to back ms"] = pipelined_ms(fn)
        rows[name] = row
    gpu = torch.cuda.get_device_name()
    print(f"device: {gpu}, torch {torch.__version__}")
    for k, v in floor.items():
        print(f"  floor: {k:<28} {v:7.2f} us per call")
    cols = ["wall ms", "back to back ms", "kernels ms", "kernel launches", "syncs", "copies", "aten ops"]
    print(f"\n{'workload':<44}" + "".join(f"{c:>17}" for c in cols))
    for name, row in rows.items():
        print(f"{name:<44}" + "".join(f"{row[c]:>17.3f}" if "ms" in c else f"{int(row[c]):>17d}" for c in cols))
    # where the host time of the two calls the issues time goes, op by op
    timelines = {}
    for name in ("dense_crf 512x512x21x10", "energy fwd+bwd 8x21x160^2 [rloss]"):
        timelines[name] = timeline(work[name])
        print_timeline(name, timelines[name])
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        slug = gpu.lower().replace("nvidia ", "").replace(" ", "-")
        path = os.path.join(args.out_dir, f"cuda_host_{slug}.json")
        out = {"device": gpu, "torch": torch.__version__, "floor_us": floor, "workloads": rows, "timelines": timelines}
        with open(path, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
