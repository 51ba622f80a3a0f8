"""Loads the compiled extension (which registers ``torch.ops.rrm_cuda.*``)."""

from __future__ import annotations

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


def build_info() -> dict:
    """How the extension was built: ``with_cuda``, ``with_openmp``, ``openmp_version``, ``compiler``,
    plus the torch it was built against and whether CUDA is usable now."""
    info = dict(_C.build_info())
    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    return info
