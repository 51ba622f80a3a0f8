"""Thin wrappers over ``torch.ops.rrm_cuda.*``: fake (meta) kernels and autograd registrations."""

from . import energy, lattice  # noqa: F401
