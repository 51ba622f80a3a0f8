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
true gradient of the value. The AFA / ToCo copies pass ``recompute_scale_factor=True`` to their
``F.interpolate`` calls: construct with ``recompute_scale_factor=True`` for them (the same value at
even crop sides, a different one at odd sides).

rloss's own module, ``from DenseCRFLoss import DenseCRFLoss`` (the scribble- and box-supervised
repositories built on rloss), is here too: ``from rrm_cuda.compat.rloss import DenseCRFLoss``, same
``DenseCRFLoss(weight, sigma_rgb, sigma_xy, scale_factor)`` and ``forward(images, segmentations, ROIs)``
(the energy without RRM's gate and labels).

Both modules take images, ROIs and labels on the CPU with the segmentations on a GPU, as the originals
are called (they are moved to the segmentations' device).
"""

from ..energy import DenseCRFLoss, DenseEnergyLoss, DenseEnergyLossFunction

__all__ = ["DenseCRFLoss", "DenseEnergyLoss", "DenseEnergyLossFunction"]
