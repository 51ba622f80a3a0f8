"""Slow, faithful pure-PyTorch references shared by the tests and the benchmarks.

Each reference is written from the specification (../shared/SPEC.md) independently of the C++/CUDA
kernels: no hash table, no splat lists, only dense tensor operations.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# =============================================================================================
# Permutohedral lattice and dense CRF
# =============================================================================================
