"""Shared helpers of the benchmark scripts: timing, metadata, result files and charts."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.utils.benchmark as tbench

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


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
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta["gpu"] = props.name
        meta["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        meta["cuda"] = torch.version.cuda
    return meta


def time_fn(fn: Callable[[], object], device: torch.device, min_run_time: float = 1.0) -> tuple[float, float]:
    """Median and IQR in ms of ``fn()`` by torch.utils.benchmark (CUDA synchronised)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def run():
        fn()
        sync()

    run()  # warm-up (allocations, lazy init)
    m = tbench.Timer(stmt="run()", globals={"run": run}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time
    )
    return m.median * 1e3, m.iqr * 1e3


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
            ax.text(x, y, f"{y:.3g}", ha="center", va="bottom", fontsize=6, rotation=90)
        del bars
    ax.set_xticks(range(len(workloads)))
    ax.set_xticklabels(workloads, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("median ms (log)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
