"""Loads the compiled extension (which registers ``torch.ops.rrm_cuda.*``)."""

from __future__ import annotations

import os

import torch

try:
    from . import _C  # noqa: F401  (registers the ops)
except ImportError as exc:  # pragma: no cover - only when the package was not built
    raise ImportError(
        "rrm_cuda's compiled extension rrm_cuda._C could not be imported "
        f"({exc}). Build it against your installed torch with:\n"
        "    pip install --no-build-isolation --no-deps .\n"
        "(or `python setup.py build_ext --inplace` for a development checkout)."
    ) from exc

ops = torch.ops.rrm_cuda


def _apply_tuning_env() -> None:
    """``RRM_CUDA_TUNING="name=value,name=value"`` sets CUDA launch knobs (``_C.tuning()``; results never
    depend on them) at import, so that a GPU session can flip a default without rebuilding."""
    spec = os.environ.get("RRM_CUDA_TUNING", "")
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError("expected name=value")
            _C.set_tuning(name.strip(), int(value))
        except (ValueError, OverflowError) as exc:  # OverflowError: a value beyond int64
            raise ValueError(f"RRM_CUDA_TUNING: bad item {item!r} ({exc})") from None


_apply_tuning_env()


def _one_thread_after_fork() -> None:
    """In a child made by ``fork``, torch's intra-op threads go to 1, as in DataLoader workers. GNU
    OpenMP (torch's CPU threads) is not fork-safe: once the parent has run a parallel region (any
    sizeable torch op, or one of ours), the child's first parallel region waits forever
    (pytorch/pytorch#41197, #58962). pydensecrf is single-threaded, so the code that this package's
    drop-in replaces commonly runs it in ``multiprocessing.Pool`` workers, which fork on Linux; with
    one thread every op runs inline. A worker may raise the count again if the parent never ran a
    parallel region."""
    if torch.get_num_threads() > 1:
        torch.set_num_threads(1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_one_thread_after_fork)


def build_info() -> dict:
    """How the extension was built: ``with_cuda``, ``with_openmp``, ``openmp_version``, ``compiler``,
    plus the torch it was built against and whether CUDA is usable now."""
    info = dict(_C.build_info())
    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    return info


def lattice_cache_info() -> dict:
    """The cache of lattices of constant features (the dense CRF's Gaussian term over pixel
    positions, kept by the op instead of rebuilt every call): ``entries``, ``capacity``, ``hits``,
    ``misses`` (calls that built a lattice for a cacheable term) and ``bytes`` held."""
    return dict(_C.lattice_cache_info())


def set_lattice_cache_capacity(capacity: int) -> None:
    """Keep at most ``capacity`` lattices (default 8, one per image size, sigma, dtype, device and
    CUDA stream in use; 0 disables the cache). Least recently used ones are dropped first."""
    if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 0:
        raise ValueError(f"capacity must be an int >= 0; got {capacity!r}")
    _C.set_lattice_cache_capacity(capacity)


def clear_lattice_cache() -> None:
    """Drop every cached lattice (frees their memory) and zero the hit/miss counters."""
    _C.clear_lattice_cache()
