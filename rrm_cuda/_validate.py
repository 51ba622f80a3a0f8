"""Argument validation shared by the public API: every error names the argument and shows the value."""

from __future__ import annotations

import functools
import math
import operator
import os
import time
from collections.abc import Callable, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def checking_values(*tensors: object) -> bool:
    """Whether value checks (which read the device back) run: not while torch.compile traces, nor
    while the current CUDA stream is captured into a graph (a capture allows no reads; the eager
    warm-up calls before a capture are checked), nor for ``meta`` tensors among ``tensors`` (they
    have shapes, no values: the ops' fake kernels give the result's shape)."""
    if torch.compiler.is_compiling():
        return False
    if any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in tensors):
        return False
    return not (torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing())


def tensor(
    x: object,
    name: str,
    *,
    ndim: int | Sequence[int] | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    finite: bool = True,
    nonempty: bool = False,
) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    supported_device(x.device, name)
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.dim() not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(f"{name} must have {want} dimensions; got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}); got {str(x.dtype).replace('torch.', '')}")
    if nonempty and x.numel() == 0:
        raise ValueError(f"{name} must not be empty; got shape {tuple(x.shape)}")
    if finite:
        check_finite(x, name)
    return x


def int64(value: object, name: str) -> int:
    """An int (or an integer-like object: numpy, 0-dim integer tensor) that fits in int64, which
    the ops and tensor comparisons take; not a bool."""
    try:
        if isinstance(value, bool):
            raise TypeError
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int; got {type(value).__name__}") from None
    if not -(2**63) <= v < 2**63:
        raise ValueError(f"{name} must fit in int64; got {v}")
    return v


def finite_range(x: torch.Tensor, name: str) -> tuple[float, float] | None:
    """(min, max) of a floating tensor, raising on NaN/Inf; None for empty or non-float tensors.

    One pass (aminmax propagates NaN and sees Inf, without a mask of x's size) and one device
    synchronisation: on a GPU each ``.item()`` stalls the host until the queue drains.
    """
    return finite_ranges([(name, x)])[0]


def finite_ranges(items: Sequence[tuple[str, torch.Tensor]]) -> list[tuple[float, float] | None]:
    """``finite_range`` of several tensors with one device synchronisation for all of them; raises
    for the first (in order) that holds NaN or Inf. None for empty or non-float tensors.

    One ``aminmax`` per tensor and one ``stack`` per device (it promotes mixed dtypes exactly: the
    widest of them is float64 at most) before the single read."""
    return finite_ranges_later(items)()


def finite_ranges_later(
    items: Sequence[tuple[str, torch.Tensor]],
    posinf_ok: Sequence[str] = (),
) -> Callable[[], list[tuple[float, float] | None]]:
    """``finite_ranges`` in two halves: queues the reductions and returns the function that reads
    them (and raises). The tensors named in ``posinf_ok`` may hold ``+inf`` (not NaN or ``-inf``):
    their range's maximum is then ``inf``. On a GPU the values are copied to pinned host memory
    behind the reductions, with an event, so that the read can come after more work is queued: by then a synchronisation
    of that work has usually passed the copy, and the read waits for nothing. While torch.compile
    traces (:func:`checking_values`), nothing is read: every range is None."""
    if not checking_values():
        return lambda: [None] * len(items)
    todo = [
        (k, name, x)
        for k, (name, x) in enumerate(items)
        if x.is_floating_point() and x.numel() > 0 and x.device.type != "meta"
    ]
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for _, _, x in todo:
        by_device.setdefault(x.device, []).extend(torch.aminmax(x.detach() if x.requires_grad else x))
    stacked = {dev: host_later(torch.stack(ts)) for dev, ts in by_device.items()}

    def read() -> list[tuple[float, float] | None]:
        out: list[tuple[float, float] | None] = [None] * len(items)
        vals = {dev: iter(get()) for dev, get in stacked.items()}
        for k, name, x in todo:
            it = vals[x.device]
            lo, hi = next(it), next(it)
            inf_ok = name in posinf_ok
            if not (
                (math.isfinite(lo) or (inf_ok and lo == math.inf))
                and (math.isfinite(hi) or (inf_ok and hi == math.inf))
            ):
                bad = "NaN" if math.isnan(lo) or math.isnan(hi) else "-inf" if inf_ok else "Inf"
                raise ValueError(f"{name} contains {bad} values")
            out[k] = (lo, hi)
        return out

    return read


def host_later(x: torch.Tensor) -> Callable[[], list]:
    """Queues the copy of a small device tensor to the host and returns the function that reads it
    (``tolist()``). On a GPU the copy goes to pinned memory without blocking, behind the work queued
    so far, and an event marks it: the read waits for that event only, not for work queued later."""
    if not x.is_cuda:
        return x.tolist
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    host.copy_(x, non_blocking=True)
    event = torch.cuda.Event()
    event.record()

    def read() -> list:
        event.synchronize()
        return host.tolist()

    return read


def check_finite(x: torch.Tensor, name: str) -> None:
    finite_range(x, name)


@functools.cache
def _built_with_cuda() -> bool:
    from . import _ext

    return bool(_ext._C.build_info()["with_cuda"])


def supported_device(device: torch.device, name: str) -> None:
    """The ops have CPU and CUDA kernels (and fake ones for ``meta``). Anything else -- or a CUDA
    tensor given to a build without CUDA kernels, the usual result of ``pip install .`` on a
    cluster's login node, which has no GPU -- gets an error that says what to do, instead of the
    dispatcher's "Could not run 'rrm_cuda::...' with arguments from the 'CUDA' backend"."""
    kind = device.type
    if kind in ("cpu", "meta") or torch.compiler.is_compiling():  # (build_info cannot be traced)
        return
    if kind == "cuda":
        if not _built_with_cuda():
            raise RuntimeError(
                f"{name} is on {device}, but this rrm_cuda was built without CUDA kernels (torch had no visible "
                "GPU or no CUDA toolkit was found when it was built; rrm_cuda.build_info() says what was "
                "compiled in). Rebuild it, on any machine with the CUDA toolkit, with:\n"
                "    FORCE_CUDA=1 CUDA_HOME=/path/to/cuda pip install --no-build-isolation --no-deps "
                "--force-reinstall ."
            )
        return
    raise RuntimeError(f"{name} is on {device}: rrm_cuda's ops run on CPU and CUDA tensors only")


def same_device(tensors: dict[str, torch.Tensor | None]) -> torch.device:
    items = [(k, v) for k, v in tensors.items() if isinstance(v, torch.Tensor)]
    dev = items[0][1].device
    for k, v in items[1:]:
        if v.device != dev:
            raise ValueError(f"{items[0][0]} and {k} must be on the same device; got {dev} and {v.device}")
    return dev  # (each tensor's device kind was checked by ``tensor``)


def positive(
    value: float | torch.Tensor, name: str, batch: int | None = None, *, keep_grad: bool = False
) -> float | torch.Tensor:
    """A positive finite scalar, or a per-image tensor of shape (B,). A device tensor's values are
    not read while they cannot be (``checking_values``: a CUDA graph capture, torch.compile).
    ``keep_grad`` (with ``batch``): a 0-dim tensor that requires grad (a learnable sigma) comes back
    as that tensor expanded to (B,), so that the gradient reaches it; otherwise it is read as a
    number."""
    if isinstance(value, torch.Tensor):
        on_device = value.device.type != "cpu"
        if value.dim() == 0 and keep_grad and batch is not None and value.requires_grad:
            value = value.expand(batch)
        if value.dim() == 0:
            if on_device and torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
                raise ValueError(
                    f"{name}: a 0-dim {value.device} tensor is read as a number, which a CUDA graph capture does "
                    "not allow; pass a Python number or a (B,) tensor"
                )
            value = float(value)
        else:
            if value.dim() != 1 or (batch is not None and value.shape[0] != batch):
                raise ValueError(
                    f"{name} must be a number or a tensor of shape (B,) = ({batch},); got {tuple(value.shape)}"
                )
            # a CPU tensor is read even inside a CUDA graph capture, but not while torch.compile traces
            readable = not torch.compiler.is_compiling() and (not on_device or checking_values(value))
            if readable and (not bool(torch.isfinite(value).all()) or not bool((value > 0).all())):
                raise ValueError(f"{name} must be positive and finite; got {value.detach().tolist()}")
            return value
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number; got {type(value).__name__}") from None
    if not (v > 0 and v < float("inf")):
        raise ValueError(f"{name} must be positive and finite; got {value}")
    return v


def memory_limit(device: torch.device) -> int | None:
    """Bytes available to new work on ``device`` (free GPU memory; on the host, what the kernel
    reports available plus free swap, within the cgroup's limit, or else the physical memory);
    None when unknown, and while torch.compile traces (a host query it cannot trace). One query:
    callers checking several buffers read it once."""
    if not checking_values() or device.type == "meta":
        return None
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return _host_available()


_HOST_AVAILABLE: list = [-1.0, None]  # (time read, bytes): reread at most every 0.5 s (a read costs ~20 us)


def _host_available() -> int | None:
    now = time.monotonic()
    if now - _HOST_AVAILABLE[0] > 0.5:
        _HOST_AVAILABLE[:] = [now, _read_host_available()]
    return _HOST_AVAILABLE[1]


def _read_host_available() -> int | None:
    avail = None
    try:
        with open("/proc/meminfo", "rb") as fh:
            text = fh.read()
        kib = {k: int(text[text.index(k) + len(k) :].split(None, 1)[0]) for k in (b"MemAvailable:", b"SwapFree:")}
        avail = (kib[b"MemAvailable:"] + kib[b"SwapFree:"]) * 1024
    except (OSError, ValueError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # pragma: no cover
            return None
    try:  # a container's limit (cgroup v2), which /proc/meminfo does not show
        with open("/sys/fs/cgroup/memory.max") as fh:
            cap = fh.read().strip()
        if cap.isdigit():
            with open("/sys/fs/cgroup/memory.current") as fh:
                avail = min(avail, int(cap) - int(fh.read().strip()))
    except (OSError, ValueError):
        pass
    return max(avail, 0)


_SMALL_FRACTION = 16  # GPU work under 1/16 of the device's memory is not checked against its free memory


def small_bytes(device: torch.device) -> int:
    """Bytes of work on ``device`` small enough to skip the free-memory query: on a GPU 1/16 of its
    total memory (read once per device), where an allocation that does not fit raises PyTorch's own
    OutOfMemoryError anyway, and the query (``cudaMemGetInfo``, a driver call) costs host time on
    every call of the ops; on the host 0 (a process that outgrows it is killed, not told)."""
    if device.type != "cuda":
        return 0
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = _CUDA_TOTAL.get(index)
    if total is None:
        total = _CUDA_TOTAL[index] = int(torch.cuda.get_device_properties(index).total_memory)
    return total // _SMALL_FRACTION


_CUDA_TOTAL: dict[int, int] = {}


def memory(nbytes: int, device: torch.device, what: str, limit: int | None = None) -> None:
    """Refuse work whose buffers cannot fit, instead of letting the OS kill the process. ``limit``:
    the :func:`memory_limit` already read for ``device`` (queried here when None, unless the work is
    :func:`small_bytes`)."""
    if limit is None:
        if nbytes <= small_bytes(device):
            return
        limit = memory_limit(device)
        if limit is None:  # pragma: no cover
            return
    if nbytes > limit:
        raise MemoryError(
            f"{what} would need about {nbytes / 2**30:.1f} GiB of {device.type} memory, more than the "
            f"{limit / 2**30:.1f} GiB available; use smaller images or batches"
        )
