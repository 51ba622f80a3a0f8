"""Thin wrappers over ``torch.ops.rrm_cuda.*``: fake (meta) kernels and autograd registrations."""

from . import (
    bcd,  # noqa: F401
    energy,  # noqa: F401
    lattice,  # noqa: F401
)
