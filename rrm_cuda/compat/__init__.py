"""Drop-in shims for the APIs WSSS code already calls.

- ``rrm_cuda.compat.pydensecrf.densecrf`` / ``.utils``: pydensecrf's ``DenseCRF2D``/``DenseCRF`` and
  its utils, numpy in and out; change ``import pydensecrf.densecrf as dcrf`` to
  ``import rrm_cuda.compat.pydensecrf.densecrf as dcrf``.
- ``rrm_cuda.compat.rloss.DenseEnergyLoss``: RRM's / rloss's ``DenseEnergyLoss`` module (same
  constructor, forward and gradient); change ``from DenseEnergyLoss import DenseEnergyLoss`` to
  ``from rrm_cuda.compat.rloss import DenseEnergyLoss``. Also ``rrm_cuda.compat.rloss.DenseCRFLoss``,
  rloss's own ungated module (``forward(images, segmentations, ROIs)``).
"""

import sys
from types import ModuleType


def install_pydensecrf_alias() -> ModuleType:
    """Make ``import pydensecrf.densecrf`` / ``pydensecrf.utils`` resolve to rrm_cuda's shim (for code
    you cannot edit). Returns the shim package."""
    from . import pydensecrf
    from .pydensecrf import densecrf, utils

    sys.modules["pydensecrf"] = pydensecrf
    sys.modules["pydensecrf.densecrf"] = densecrf
    sys.modules["pydensecrf.utils"] = utils
    return pydensecrf
