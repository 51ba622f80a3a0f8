"""Shared helpers of the benchmark scripts: timing, metadata, result files and charts."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
import torch.utils.benchmark as tbench

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

# The scripts import rrm_cuda after this module: the installed package, or else a development
# checkout built in place (python setup.py build_ext --inplace), whose root is put on the path here.
try:
    import rrm_cuda  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.dirname(HERE))


@dataclass
class Row:
    """One timed configuration."""

    workload: str
    method: str
    median_ms: float
    iqr_ms: float
    threads: int | None = None
    device: str = "cpu"
    extra: dict = field(default_factory=dict)
    runs: int | None = None  # timed calls behind the median


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


def metadata(device: torch.device) -> dict:
    import rrm_cuda

    try:
        commit = subprocess.check_output(
            ["git", "rev-parse", "HEAD"], cwd=HERE, text=True, stderr=subprocess.DEVNULL
        ).strip()
        dirty = bool(
            subprocess.check_output(
                ["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE, text=True
            ).strip()
        )
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", None
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "git_dirty": dirty,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "rrm_cuda_build": rrm_cuda.build_info(),
        "command": " ".join(sys.argv),
        # the machine's load when the results are written (1, 5, 15 min): 15 min covers most runs;
        # above the cores used, other work shared them
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta["gpu"] = props.name
        meta["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        meta["cuda"] = torch.version.cuda
        from rrm_cuda import _C

        meta["tuning"] = _C.tuning()  # CUDA launch-configuration knobs (common/tuning.h; results do not depend on them)
    from rrm_cuda import functional

    meta["pixel_tile"] = dict(functional._PIXEL_TILE)  # dense_crf's pixel order per device type (0: raster)
    return meta


MIN_RUNS = 5


def time_fn(
    fn: Callable[[], object], device: torch.device, min_run_time: float = 1.0, min_runs: int = MIN_RUNS
) -> tuple[float, float, int]:
    """(median ms, IQR ms, number of timed calls) of ``fn()`` (CUDA synchronised).

    Fast calls: torch.utils.benchmark's ``blocked_autorange`` (blocks of many calls for at least
    ``min_run_time`` s). It stops once that time is spent, so a call longer than ``min_run_time``
    would be timed once: slow calls (``min_runs`` of them would exceed it) are timed one by one,
    ``min_runs`` times at least."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def run():
        fn()
        sync()

    t0 = time.perf_counter()
    run()  # warm-up (allocations, lazy init, caches)
    first = time.perf_counter() - t0
    if first * min_runs >= min_run_time:
        times = []
        while len(times) < min_runs or sum(times) < min_run_time:
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        q = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
        return float(q[1]) * 1e3, float(q[2] - q[0]) * 1e3, len(times)
    m = tbench.Timer(stmt="run()", globals={"run": run}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time
    )
    return m.median * 1e3, m.iqr * 1e3, m.number_per_run * len(m.times)


class threads:  # noqa: N801 - used as a context manager
    """Temporarily set torch's intra-op thread count."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self):
        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


@contextlib.contextmanager
def tuned(**knobs: int):
    """The extension's tuning knobs (rrm_cuda._C.set_tuning) set for the block, restored after."""
    from rrm_cuda import _C

    saved, done = _C.tuning(), []
    try:
        for name, value in knobs.items():
            _C.set_tuning(name, value)  # an unknown name raises, naming the known ones
            done.append(name)
        yield
    finally:
        for name in done:
            _C.set_tuning(name, saved[name])


def add_bench_args(p, name: str) -> None:
    """The options the per-op benchmarks share: --quick, --cpu-only, --skip-cpu, --min-run-time and
    --out-dir (for <name>_<machine>.json and .png)."""
    p.add_argument("--quick", action="store_true", help="CI-sized inputs and short timings")
    p.add_argument("--cpu-only", action="store_true", help="skip CUDA even when available")
    p.add_argument("--skip-cpu", action="store_true", help="time CUDA only (CPU results are still checked)")
    p.add_argument("--min-run-time", type=float, default=None, help="seconds per timing (default 1.0; quick 0.2)")
    p.add_argument(
        "--out-dir", default=RESULTS, help=f"folder for {name}_<machine>.json and .png (default: benchmarks/results)"
    )


def bench_setup(args) -> list[torch.device]:
    """Fills in --min-run-time's default; returns the devices to run on (the CPU, CUDA when present)."""
    if args.min_run_time is None:
        args.min_run_time = 0.2 if args.quick else 1.0
    devices = [torch.device("cpu")]
    if torch.cuda.is_available() and not args.cpu_only:
        devices.append(torch.device("cuda"))
    return devices


def photo(name: str, H: int, W: int):
    """A scikit-image bundled photograph (uint8 (H, W, 3) numpy array), upscaled when smaller than
    H x W, centre-cropped to it."""
    import numpy as np
    from skimage import data, transform

    img = getattr(data, name)()[..., :3]
    if img.shape[0] < H or img.shape[1] < W:
        s = max(H / img.shape[0], W / img.shape[1])
        img = (transform.rescale(img, s, channel_axis=-1, anti_aliasing=True) * 255).astype(np.uint8)
    y0, x0 = (img.shape[0] - H) // 2, (img.shape[1] - W) // 2
    return np.ascontiguousarray(img[y0 : y0 + H, x0 : x0 + W])


def for_each_size(
    sizes: dict,
    devices: Sequence[torch.device],
    check: Callable[[object, torch.device], dict],
    bench: Callable[[str, object, torch.device, int | None], None],
    skip_cpu: bool = False,
) -> dict:
    """Every size on every device: ``check(spec, device)`` first (printed, and returned by
    "<name> <device>"), then ``bench(name, spec, device, threads)`` on the CPU with 1 thread and with
    all of torch's threads (not with ``skip_cpu``), once on CUDA (threads None)."""
    all_threads = torch.get_num_threads()
    checks = {}
    for name, spec in sizes.items():
        for device in devices:
            checks[f"{name} {device}"] = check(spec, device)
            print(f"correct: {name} on {device}: {checks[f'{name} {device}']}", flush=True)
            if device.type == "cpu" and skip_cpu:
                continue
            if device.type != "cpu":
                bench(name, spec, device, None)
                continue
            for n in sorted({1, all_threads}):
                with threads(n):
                    bench(name, spec, device, n)
    return checks


def print_table(rows: Sequence[Row], baseline: str | None) -> None:
    base = {r.workload: r.median_ms for r in rows if r.method == baseline}
    head = f"{'workload':<34} {'method':<34} {'median ms':>10} {'IQR ms':>8}"
    if baseline:
        head += f" {'vs ' + baseline:>18}"
    print(head)
    print("-" * len(head))
    for r in rows:
        line = f"{r.workload:<34} {r.method:<34} {r.median_ms:>10.2f} {r.iqr_ms:>8.2f}"
        if baseline and r.workload in base:
            line += f" {base[r.workload] / r.median_ms:>17.2f}x"
        print(line)


def write_results(
    name: str,
    tag: str,
    meta: dict,
    rows: Sequence[Row],
    baseline: str | None,
    out_dir: str = RESULTS,
    title: str = "",
) -> tuple[str, str]:
    """Writes ``<name>_<tag>.json`` and a bar chart ``<name>_<tag>.png``; returns both paths."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}_{tag}")
    with open(path + ".json", "w") as fh:
        json.dump({"meta": meta, "baseline": baseline, "rows": [asdict(r) for r in rows]}, fh, indent=1)
    chart(rows, path + ".png", title or f"{name} ({tag})", baseline)
    return path + ".json", path + ".png"


def chart(rows: Sequence[Row], path: str, title: str, baseline: str | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r.workload for r in rows))
    methods = list(dict.fromkeys(r.method for r in rows))
    fig, ax = plt.subplots(figsize=(1.6 + 1.9 * len(workloads), 3.6), dpi=110)
    width = 0.8 / max(1, len(methods))
    for k, m in enumerate(methods):
        xs, ys = [], []
        for i, w in enumerate(workloads):
            for r in rows:
                if r.workload == w and r.method == m:
                    xs.append(i + (k - (len(methods) - 1) / 2) * width)
                    ys.append(r.median_ms)
        bars = ax.bar(xs, ys, width, label=m)
        for x, y in zip(xs, ys):
            ax.text(x, y, f"{y:.0f}" if y >= 100 else f"{y:.3g}", ha="center", va="bottom", fontsize=6, rotation=90)
        del bars
    ax.set_xticks(range(len(workloads)))
    ax.set_xticklabels([textwrap.fill(w, 18) for w in workloads], fontsize=7)  # long names side by side
    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi * 6)  # room above the tallest bar for its label and the legend
    ax.set_ylabel("median ms (log)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---- the original rloss / RRM energy-loss filter: the baseline of energy_bench.py and rrm_bench.py


def _rloss_filter_image(args: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """One image: its lattice built once, then one filter per channel, as rloss's ``bilateralfilter``
    does (``lattice.init`` once, ``lattice.compute(out_k, in_k, 1)`` for each of the K channels).
    The op's lattice cache (``cache=True``) holds the lattice from the first channel to the last."""
    s_hat, feats = args  # (K, N), (d, N)
    f = feats.unsqueeze(0).contiguous()
    out = torch.empty_like(s_hat)
    for k in range(s_hat.shape[0]):
        v = s_hat[k].reshape(1, 1, -1).contiguous()
        out[k] = torch.ops.rrm_cuda.permutohedral_filter(v, f, False, True)[0, 0]
    return out


class RlossBaselinePool:
    """Threads across images for :func:`rloss_baseline_loss`, as rloss's ``bilateralfilter_batch``
    (``omp parallel for`` over the N images, min(N, cores) threads), each filter single-threaded.
    The op releases the GIL, so the threads run in parallel, over shared memory as OpenMP's do.
    Close it when done (``close``/``join``, as a process pool)."""

    def __init__(self, threads: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.threads = max(1, int(threads))
        self._pool = ThreadPoolExecutor(self.threads)

    def map(self, fn, jobs: Sequence) -> list:
        prev = torch.get_num_threads()
        torch.set_num_threads(1)  # no intra-op threads inside a worker: one core per image
        try:
            return list(self._pool.map(fn, jobs))
        finally:
            torch.set_num_threads(prev)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def join(self) -> None:
        pass


def rloss_baseline_pool(threads: int) -> RlossBaselinePool:
    """The worker threads of :func:`rloss_baseline_loss` (see :class:`RlossBaselinePool`)."""
    return RlossBaselinePool(threads)


class _RlossBaselineFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, images, segs, rois, unlabel, sigma_rgb, sigma_xy, pool):
        from rrm_cuda import reference as R

        # The original copies everything to the CPU (numpy) and filters there.
        device = segs.device
        images, segs, rois, unlabel = (t.detach().cpu() for t in (images, segs, rois, unlabel))
        B, K, H, W = segs.shape
        gate = (rois - segs.amax(1)).masked_fill(unlabel, 1.0).clamp(min=0).unsqueeze(1)
        s_hat = segs * rois.unsqueeze(1)
        feats = R.rloss_features(images, sigma_rgb, sigma_xy)
        jobs = [(s_hat[b].reshape(K, -1), feats[b]) for b in range(B)]
        AS = torch.stack(pool.map(_rloss_filter_image, jobs)).reshape(B, K, H, W) * gate  # noqa: N806
        ctx.save_for_backward(AS, rois)
        ctx.device = device
        return (-(s_hat * AS).sum().reshape(1) / B).to(device)

    @staticmethod
    def backward(ctx, grad):
        AS, rois = ctx.saved_tensors  # noqa: N806
        g = -2 * grad.cpu() * AS / AS.shape[0] * rois.unsqueeze(1)  # the original's gradient, copied back
        return None, g.to(ctx.device), None, None, None, None, None


def rloss_baseline_loss(
    images: torch.Tensor,
    probs: torch.Tensor,
    rois: torch.Tensor,
    labels: torch.Tensor,
    weight: float,
    sigma_rgb: float,
    sigma_xy: float,
    scale: float,
    pool,
) -> torch.Tensor:
    """The dense-CRF energy loss computed the way the original rloss / RRM extension does: inputs
    downscaled by ``scale``, copied to the CPU, one lattice per image and one filter per channel
    (images spread over ``pool``'s threads, see :func:`rloss_baseline_pool`), the original's gradient
    ``−2·S·AS·ROI/B`` copied back to the inputs' device. Arguments as ``rrm_cuda.DenseEnergyLoss``:
    images (B, 3, H, W) 0–255, probs (B, K, H, W), rois (B, H, W), labels (B, 1, H, W) with 255 =
    unlabelled. Returns a (1,) tensor on the inputs' device (already multiplied by ``weight``)."""
    si = F.interpolate(images, scale_factor=scale)
    sp = F.interpolate(probs, scale_factor=scale, mode="bilinear", align_corners=False)
    sr = F.interpolate(rois.unsqueeze(1), scale_factor=scale).squeeze(1)
    sl = F.interpolate(labels, scale_factor=scale, mode="nearest")
    unlabel = (sl.long() == 255).squeeze(1)
    return weight * _RlossBaselineFunction.apply(si, sp, sr, unlabel, sigma_rgb, sigma_xy * scale, pool)
