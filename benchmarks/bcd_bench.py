"""Benchmark of the BCD loss (SPEC §4): rrm_cuda's fused ops against the pure-PyTorch references.

    python benchmarks/bcd_bench.py            # authors' and large shape; CPU 1 / all threads; CUDA
    python benchmarks/bcd_bench.py --quick    # CI-sized

Methods: ``rrm_cuda.bcd_loss`` (fused reductions), ``reference_vectorized`` (one-hot einsums: the fast
pure-PyTorch baseline) and ``reference_loop`` (the authors' loops over images and classes), forward and
forward+backward, timed by torch.utils.benchmark (median, IQR) in the same run; correctness is checked
against the references before anything is timed. Writes benchmarks/results/bcd_<device-tag>.json/.png.
On CUDA, rows of rrm_cuda also report the memory-bandwidth bound: one read of the features per pass
(2 passes forward; 9 feature-sized reads/writes forward+backward) at ``--peak-gbps``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field

import torch
import torch.utils.benchmark as tbench

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

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
# Feature-sized memory transfers of rrm_cuda.bcd_loss: forward = sums (1 read) + cosine (1 read);
# backward = cosine backward (2 reads, 1 write) + sums backward (1 write) + autograd's sum of the two
# gradients (2 reads, 1 write).
PASSES = {"forward": 2, "forward+backward": 9}


@dataclass
class Row:
    workload: str
    method: str
    mode: str
    median_ms: float
    iqr_ms: float
    threads: int | None
    device: str
    extra: dict = field(default_factory=dict)


# ---- helpers (local: benchmarks/_common.py is not on this branch) -----------------------------------


def _git(*args: str) -> str:
    try:
        return subprocess.check_output(["git", *args], cwd=HERE, text=True, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_tag(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace("NVIDIA ", "").replace(" ", "-").lower()
    return f"cpu-{os.cpu_count()}c"


def metadata(devices: list[torch.device], sizes: dict, args: argparse.Namespace) -> dict:
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": _git("status", "--porcelain", "--untracked-files=no") != "",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads_all": torch.get_num_threads(),
        "devices": [str(d) for d in devices],
        "sizes": {k: dict(zip("B C h w K".split(), v)) for k, v in sizes.items()},
        "dtype": "float32",
        "rrm_cuda_build": rrm_cuda.build_info(),
        "command": " ".join(sys.argv),
        "min_run_time_s": args.min_run_time,
    }
    if any(d.type == "cuda" for d in devices):
        props = torch.cuda.get_device_properties(0)
        meta["gpu"] = props.name
        meta["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        meta["cuda"] = torch.version.cuda
        meta["peak_gbps_assumed"] = args.peak_gbps
    return meta


def time_fn(fn, device: torch.device, min_run_time: float) -> tuple[float, float]:
    """Median and IQR in ms of ``fn()`` (CUDA synchronised), after one warm-up call."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def run():
        fn()
        sync()

    run()
    m = tbench.Timer(
        stmt="run()", globals={"run": run}, num_threads=torch.get_num_threads()
    ).blocked_autorange(min_run_time=min_run_time)
    return m.median * 1e3, m.iqr * 1e3


class threads:  # noqa: N801 - a context manager
    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self):
        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


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
    for method, fn in METHODS.items():
        if method in args.skip:
            continue
        if method == "reference_loop" and f.numel() > args.loop_max_elements:
            print(f"  {name}: reference_loop not timed (B*C*h*w > --loop-max-elements)", flush=True)
            continue
        for mode in ("forward", "forward+backward"):
            if mode == "forward":

                def call(fn=fn):
                    with torch.no_grad():
                        return fn(seg, f)

            else:

                def call(fn=fn):
                    fg.grad = None
                    fn(seg, fg).backward()

            med, iqr = time_fn(call, device, args.min_run_time)
            extra = {}
            if device.type == "cuda" and method == "rrm_cuda":
                bound = PASSES[mode] * feature_bytes / (args.peak_gbps * 1e9) * 1e3
                extra = {"bandwidth_bound_ms": bound, "x_of_bound": med / bound}
            rows.append(Row(name, method, mode, med, iqr, n_threads, str(device), extra))
            print(
                f"  {name:<30} {str(device):<6} threads={n_threads!s:<4} {mode:<17} {method:<22} "
                f"{med:10.2f} ms (IQR {iqr:.2f})",
                flush=True,
            )


def print_table(rows):
    base = {(r.workload, r.mode, r.threads, r.device): r.median_ms for r in rows if r.method == BASELINE}
    head = (
        f"{'workload':<30} {'device':<7} {'thr':>4} {'mode':<17} {'method':<22} {'median ms':>10} "
        f"{'IQR ms':>8} {'speed-up vs ' + BASELINE:>34}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        key = (r.workload, r.mode, r.threads, r.device)
        ratio = f"{base[key] / r.median_ms:.2f}x" if key in base else ""
        note = f"  ({r.extra['x_of_bound']:.2f}x the bandwidth bound)" if "x_of_bound" in r.extra else ""
        print(
            f"{r.workload:<30} {r.device:<7} {r.threads!s:>4} {r.mode:<17} {r.method:<22} "
            f"{r.median_ms:>10.2f} {r.iqr_ms:>8.2f} {ratio:>34}{note}"
        )


def chart(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r.workload, r.device, r.threads, r.mode) for r in rows))
    methods = list(dict.fromkeys(r.method for r in rows))
    fig, ax = plt.subplots(figsize=(2.0 + 1.3 * len(groups), 4.2), dpi=110)
    width = 0.8 / max(1, len(methods))
    for k, m in enumerate(methods):
        xs, ys = [], []
        for i, gkey in enumerate(groups):
            for r in rows:
                if (r.workload, r.device, r.threads, r.mode) == gkey and r.method == m:
                    xs.append(i + (k - (len(methods) - 1) / 2) * width)
                    ys.append(r.median_ms)
        ax.bar(xs, ys, width, label=m)
    ax.set_yscale("log")
    ax.set_ylabel("median ms (log)")
    labels = [
        f"{w.split()[0]}\n{d} t={t}\n{'fwd' if mo == 'forward' else 'fwd+bwd'}" for w, d, t, mo in groups
    ]
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI-sized shapes and short timings")
    p.add_argument("--cpu-only", action="store_true", help="skip CUDA even when available")
    p.add_argument(
        "--min-run-time", type=float, default=None, help="seconds per timing (default 1.0; quick 0.2)"
    )
    p.add_argument("--skip", nargs="*", default=[], choices=list(METHODS), help="methods not to time")
    p.add_argument(
        "--peak-gbps",
        type=float,
        default=3350.0,
        help="GPU memory bandwidth for the bound (default 3350: H100 SXM HBM3)",
    )
    p.add_argument(
        "--loop-max-elements",
        type=int,
        default=2**31,
        help="time the (slow) loop reference only up to this many feature elements (default: always)",
    )
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    args = p.parse_args(argv)
    if args.min_run_time is None:
        args.min_run_time = 0.2 if args.quick else 1.0
    sizes = QUICK_SIZES if args.quick else SIZES
    devices = [torch.device("cpu")]
    if torch.cuda.is_available() and not args.cpu_only:
        devices.append(torch.device("cuda"))
    all_threads = torch.get_num_threads()
    rows: list[Row] = []
    checks = {}
    for name, shape in sizes.items():
        for device in devices:
            checks[f"{name} {device}"] = check(shape, device)
            print(f"correct: {name} on {device}: {checks[f'{name} {device}']}", flush=True)
            thread_counts = sorted({1, all_threads}) if device.type == "cpu" else [None]
            for n in thread_counts:
                if n is None:
                    bench_one(name, shape, device, None, args, rows)
                else:
                    with threads(n):
                        bench_one(name, shape, device, n, args, rows)
    print()
    print_table(rows)
    meta = metadata(devices, sizes, args)
    meta["checks"] = checks
    tag = device_tag(devices[-1]) + ("-quick" if args.quick else "")
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, f"bcd_{tag}")
    with open(path + ".json", "w") as fh:
        json.dump({"meta": meta, "baseline": BASELINE, "rows": [asdict(r) for r in rows]}, fh, indent=1)
    chart(rows, path + ".png", f"BCD loss, float32 ({tag}; {meta['cpu']})")
    print(f"\nwrote {path}.json and {path}.png")


if __name__ == "__main__":
    main()
