"""Thin wrappers over ``torch.ops.rrm_cuda.*``: fake (meta) kernels and autograd registrations."""

from . import lattice  # noqa: F401
from . import energy  # noqa: F401
