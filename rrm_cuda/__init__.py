"""rrm_cuda: batched, differentiable CPU/CUDA torch ops for weakly supervised semantic segmentation.

Dense-CRF mean-field inference on the permutohedral lattice, the dense-CRF energy loss and the BCD
feature-centre loss of RRM (Zhang et al., AAAI 2020 / Pattern Recognition 2022). The ops live under
``torch.ops.rrm_cuda``; this package adds validation, autograd and nn.Module forms.
"""

from . import _ops  # noqa: F401  (fake kernels, autograd)
from ._ext import build_info, clear_lattice_cache, lattice_cache_info, set_lattice_cache_capacity
from .bcd import BCDLoss, bcd_loss, feature_center_cosine, masked_feature_centers, masked_feature_sums
from .energy import DenseEnergyLoss, DenseEnergyLossFunction, dense_energy_loss
from .functional import (
    bilateral_features,
    dense_crf,
    lattice_num_vertices,
    permutohedral_filter,
    position_features,
    unary_from_probs,
)
from .nn import DenseCRF, PermutohedralFilter

__version__ = "0.1.0"

__all__ = [
    "BCDLoss",
    "bcd_loss",
    "feature_center_cosine",
    "masked_feature_centers",
    "masked_feature_sums",
    "DenseCRF",
    "DenseEnergyLoss",
    "DenseEnergyLossFunction",
    "PermutohedralFilter",
    "bilateral_features",
    "build_info",
    "clear_lattice_cache",
    "dense_crf",
    "dense_energy_loss",
    "lattice_cache_info",
    "lattice_num_vertices",
    "permutohedral_filter",
    "position_features",
    "set_lattice_cache_capacity",
    "unary_from_probs",
]
