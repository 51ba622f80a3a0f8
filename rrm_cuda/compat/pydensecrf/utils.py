"""Drop-in for ``pydensecrf.utils`` (same names, arguments and numpy results)."""

from __future__ import annotations

import logging
import numbers

import numpy as np


class ArgumentError(ValueError, AssertionError):
    """A bad ``scale`` or ``gt_prob``: pydensecrf.utils asserts these (AssertionError); code that
    catches either class keeps working."""


def unary_from_softmax(sm, scale=None, clip=1e-5) -> np.ndarray:
    """(M, *S) probabilities -> float32 (M, prod S) energies ``-log(clip(p, clip, 1))``."""
    sm = np.asarray(sm)
    if scale is not None:
        if not 0 < scale <= 1:
            raise ArgumentError(f"scale must be in (0, 1]; got {scale}")
        # pydensecrf's arithmetic: its uniform array is float64, so the mix is float64 (bitwise its energies)
        sm = scale * sm + (1 - scale) * (np.ones(sm.shape) / sm.shape[0])
    if clip is not None:
        sm = np.clip(sm, clip, 1.0)
    return -np.log(sm).reshape([sm.shape[0], -1]).astype(np.float32)


def unary_from_labels(labels, n_labels: int, gt_prob: float, zero_unsure: bool = True) -> np.ndarray:
    """Energies from a label map (0 = unsure when ``zero_unsure``), as pydensecrf.utils."""
    if not 0 < gt_prob < 1:
        raise ArgumentError(f"gt_prob must be in (0, 1); got {gt_prob}")
    labels = np.asarray(labels)
    flat = labels.flatten()
    if zero_unsure:
        if n_labels < 1 or flat.size and (flat.min() < 0 or flat.max() > n_labels):
            raise ValueError(
                f"labels must be in 0..n_labels={n_labels} (0 = unsure); got range {flat.min()}..{flat.max()}"
            )
        flat = flat - 1  # unsure -> -1
    elif flat.size and (flat.min() < 0 or flat.max() >= n_labels):
        raise ValueError(f"labels must be in 0..n_labels-1={n_labels - 1}; got range {flat.min()}..{flat.max()}")
    n_energy = -np.log((1.0 - gt_prob) / (n_labels - 1))
    p_energy = -np.log(gt_prob)
    U = np.full((n_labels, flat.size), n_energy, dtype="float32")
    U[flat, np.arange(flat.size)] = p_energy
    if zero_unsure:
        U[:, flat == -1] = -np.log(1.0 / n_labels)
    return U


def compute_unary(labels, M, GT_PROB=0.5) -> np.ndarray:  # noqa: N803 (pydensecrf's names)
    """Deprecated in pydensecrf (kept there and here for old scripts): ``unary_from_labels(labels, M,
    GT_PROB)``."""
    logging.warning("pydensecrf.compute_unary is deprecated, use unary_from_labels instead.")
    return unary_from_labels(labels, M, GT_PROB)


def softmax_to_unary(sm, GT_PROB=1) -> np.ndarray:  # noqa: N803
    """Deprecated in pydensecrf (kept there and here for old scripts): ``unary_from_softmax`` with
    ``scale=GT_PROB`` (None for 1) and no clipping, so a probability of 0 gives an energy of +inf
    (a forbidden label, which ``DenseCRF.setUnaryEnergy`` accepts)."""
    logging.warning("pydensecrf.softmax_to_unary is deprecated, use unary_from_softmax instead.")
    return unary_from_softmax(sm, None if GT_PROB == 1 else GT_PROB, clip=None)


def create_pairwise_gaussian(sdims, shape) -> np.ndarray:
    """(len(shape), prod shape) float32 positions divided by ``sdims``; pydensecrf's order is the
    *array* axis order (y first for a 2-D shape), as in its utils."""
    hcord_range = [range(s) for s in shape]
    mesh = np.array(np.meshgrid(*hcord_range, indexing="ij"), dtype=np.float32)
    for i, s in enumerate(sdims):
        if not s > 0:
            raise ValueError(f"sdims must be positive; got {sdims}")
        mesh[i] /= s
    return mesh.reshape([len(sdims), -1])


def create_pairwise_bilateral(sdims, schan, img, chdim: int = -1) -> np.ndarray:
    """Positions / ``sdims`` stacked with the image channels / ``schan`` (pydensecrf.utils)."""
    img = np.asarray(img)
    if chdim == -1:
        im_feat = img[np.newaxis].astype(np.float32)
    else:
        im_feat = np.rollaxis(img, chdim).astype(np.float32)
    schans = [schan] * im_feat.shape[0] if isinstance(schan, numbers.Number) else list(schan)
    for s in (*schans, *sdims):
        if not s > 0:
            raise ValueError(f"sdims and schan must be positive; got sdims={sdims}, schan={schan}")
    for i, s in enumerate(schans):
        im_feat[i] /= s
    cord_range = [range(s) for s in im_feat.shape[1:]]
    mesh = np.array(np.meshgrid(*cord_range, indexing="ij"), dtype=np.float32)
    for i, s in enumerate(sdims):
        mesh[i] /= s
    feats = np.concatenate([mesh, im_feat])
    return feats.reshape([feats.shape[0], -1])
