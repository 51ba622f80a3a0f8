"""pydensecrf-compatible API backed by rrm_cuda's permutohedral dense CRF (CPU or CUDA)."""

from . import densecrf, utils  # noqa: F401
