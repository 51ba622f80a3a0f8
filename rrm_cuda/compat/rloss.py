"""Drop-in for the ``DenseEnergyLoss.py`` that RRM, AFA, ToCo and other WSSS repositories copied from
rloss (Tang et al., ECCV 2018). Replace::

    from DenseEnergyLoss import DenseEnergyLoss        # or: from tool.DenseEnergyLoss import ...

with::

    from rrm_cuda.compat.rloss import DenseEnergyLoss

Same constructor ``DenseEnergyLoss(weight, sigma_rgb, sigma_xy, scale_factor)``, same
``forward(images, segmentations, ROIs, seg_label)`` and the same value (shape (1,)), with the
original's gradient (``gradient="rloss"``: ``−(2/B)·S·AS·ROI``) by default. Differences: it runs on
the inputs' device (CPU or CUDA, no numpy round trip, no SWIG module to build), validates its inputs,
and does not reproduce the original filter's padding bug (SPEC §3). Pass ``gradient="exact"`` for the
true gradient of the value.
"""

from ..energy import DenseEnergyLoss, DenseEnergyLossFunction

__all__ = ["DenseEnergyLoss", "DenseEnergyLossFunction"]
