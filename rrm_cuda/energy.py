"""Dense-CRF energy loss with RRM / rloss semantics (SPEC §3), fused on the permutohedral lattice.

``E = −(1/B) Σ_{b,k,i} ŝ_k(i) · S(i) · (W ŝ_k)(i)``, ``ŝ = probs · roi``, ``W`` the unnormalised
bilateral lattice filter over ``(x/σxy, y/σxy, I/σrgb)`` (one lattice per image, shared by all K
channels), ``S`` the gate of RRM (held constant for the gradient). ``loss = weight · E``.

Public API: :func:`dense_energy_loss` (functional, exact gradient by default), :class:`DenseEnergyLoss`
(``nn.Module`` with the original module's constructor and ``forward`` signature, rloss gradient by
default) and :class:`DenseEnergyLossFunction` (a thin ``torch.autograd.Function`` over
``torch.ops.rrm_cuda.dense_energy``, with the original's name).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _validate as V
from ._ext import ops
from .functional import (
    _bilateral_features,
    _cached,
    _check_key_range,
    _check_lattice_features,
    _gather,
    _pixel_order,
    _pixel_tile,
    _position_fmax,
    bilateral_features,
)

_GRAD_MODES = {"rloss": 1, "exact": 2}
_COMPUTE_DTYPES = (torch.float32, torch.float64)
# scale_factor -> stride of ops.dense_energy_inputs (other scales go through F.interpolate)
_FUSED_STRIDES = {1.0: 1, 0.5: 2}


def _stats_aten(
    images: Tensor, probs: Tensor, rois: Tensor | None, seg_label: Tensor | None, distribution: bool, ignore_index: int
) -> dict[str, float]:
    """The check statistics by ATen reductions, one read (the CPU's path while ``_STATS_OP_ON_CPU``
    is False: at 8 x 21 x 321^2 on 2 cores about 5.4 ms, the one-pass op 2.8)."""
    K = probs.shape[1]
    st: dict[str, Tensor] = {}
    if images.numel():
        st["img_lo"], st["img_hi"] = torch.aminmax(images)
    if probs.numel():
        st["p_lo"], st["p_hi"] = torch.aminmax(probs)
        if distribution:
            st["sum_lo"], st["sum_hi"] = torch.aminmax(probs.sum(1, dtype=torch.float32))
    if rois is not None and rois.numel() and rois.dtype != torch.bool:
        # r (1 - r) is 0 exactly for r in {0, 1} -- also in uint8/int arithmetic, where r (r - 1) is
        # a multiple of 2^k only for r = 0, 1 -- and nonzero, NaN or -Inf for any other value.
        st["roi_lo"], st["roi_hi"] = torch.aminmax(rois.addcmul(rois, rois, value=-1))
    if seg_label is not None and seg_label.numel():
        lab = seg_label.to(torch.uint8) if seg_label.dtype == torch.bool else seg_label
        if K:  # unlabelled pixels read as class 0: then every value is an integer in [0, K - 1]
            v = lab.masked_fill(lab == ignore_index, 0)
            st["lab_lo"], st["lab_hi"] = torch.aminmax(v)
            if v.is_floating_point():  # v >= 0 once the range holds, so frac(v) >= 0: its max suffices
                st["lab_frac"] = torch.frac(v).amax()
        else:  # no class: every pixel must be unlabelled
            st["lab_lo"], st["lab_hi"] = torch.aminmax(lab)
    if not st:
        return {}
    # One stack into float64 (exact for the values that matter here, whatever the inputs' dtypes)
    # and one read.
    out = torch.empty(len(st), dtype=torch.float64, device=probs.device)
    v = dict(zip(st, torch.stack(list(st.values()), out=out).tolist()))
    if "roi_lo" in v:
        v["roi_bad"] = float(not (v.pop("roi_lo") == 0 and v.pop("roi_hi") == 0))
    if "lab_lo" in v:
        lo, hi, frac = v.pop("lab_lo"), v.pop("lab_hi"), v.pop("lab_frac", 0.0)
        ok = (lo >= 0 and hi < K and frac == 0) if K else (lo == ignore_index and hi == ignore_index)
        v["lab_bad"] = float(not ok)
    return v


# How far outside [0, 255] the images may stray: half a grey level. Denormalised images (x * std + mean,
# as AFA / ToCo hand them to the loss) come back from float rounding a few 1e-5 outside the range; a
# normalised image (about [-2.1, 2.6]) still fails.
_IMAGE_SLACK = 0.5

# dtypes the one-pass statistics op reads (others, e.g. uint16 images, are converted first)
_STATS_DTYPES = {
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.bool,
}
# The one-pass op on the CPU too: its CPU form reads the inputs row by row in AVX2 registers
# (csrc/energy/input_stats_cpu.h), 2.8 ms against the ATen reductions' 5.4 at 8 x 21 x 321^2 on the
# 2-core VM (benchmarks/NOTES.md §21). False: the ATen reductions (tests: both make the same decisions).
_STATS_OP_ON_CPU = True
# Where the one-pass op runs (GPUs), the checked loss reads its statistics after ops.dense_energy is
# queued: the copy to the host is queued behind the statistics, and by the time the op returns (it
# reads its lattice's size) the copy is done, so the read costs no wait of its own. Reading first
# would drain the queue and leave the GPU idle while the host prepares the op. A bad input then
# raises after the op ran on it, which is safe: the lattice's embedding gives NaN, Inf or
# out-of-range features no weight (the unchecked path relies on the same). The images' range is
# taken as [0, 255] for the lattice-key bound meanwhile; if that bound fails, the statistics are
# read first, as without deferral.
_DEFER_CHECKS = True
# On the CPU the statistics are ready when the op returns: nothing to gain by deferring (tests: True)
_DEFER_CHECKS_ON_CPU = False


def _stats_op(
    images: Tensor,
    probs: Tensor,
    rois: Tensor | None,
    seg_label: Tensor | None,
    distribution: bool,
    ignore_index: int,
    prob_stats: Tensor | None = None,
) -> Callable[[], dict[str, float]]:
    """The check statistics in one pass over all four inputs (``ops.dense_energy_input_stats``: on a
    GPU one kernel and one reduction instead of about ten ATen reductions), one read.

    ``prob_stats``: the probabilities' entries already computed (``ops.dense_energy_inputs`` with
    ``stats``); the op then reads the images, ROIs and labels only.

    Queues the work and returns a function that reads and names the statistics (``V.host_later``:
    the read can wait until after the loss's own op is queued, see ``_DEFER_CHECKS``)."""
    B, K, H, W = probs.shape
    if B * H * W == 0:  # no pixel: the images' range alone (the images may still have pixels)
        return lambda: _stats_aten(images, probs, None, None, False, ignore_index)
    img = images if images.dtype in _STATS_DTYPES else images.double()
    roi = rois if rois is not None and rois.numel() and rois.dtype != torch.bool else None
    if roi is not None and roi.dtype not in _STATS_DTYPES:
        roi = roi.double()
    lab = seg_label.reshape(B, H, W) if seg_label is not None and seg_label.numel() else None
    if lab is not None and lab.dtype not in _STATS_DTYPES:
        lab = lab.double()
    st = ops.dense_energy_input_stats(img, probs, roi, lab, float(ignore_index), distribution, prob_stats is None)
    if prob_stats is not None:  # entries 2-5 from the downscaling's pass
        st = torch.cat([st[:2], prob_stats, st[6:]])
        if not distribution:
            st[4:6] = -math.inf
    get = V.host_later(st)

    def read() -> dict[str, float]:
        vals = get()
        v = {"img_lo": -vals[0], "img_hi": vals[1]}
        if K:
            v.update(p_lo=-vals[2], p_hi=vals[3])
            if distribution:
                v.update(sum_lo=-vals[4], sum_hi=vals[5])
        if roi is not None:
            v["roi_bad"] = vals[6]
        if lab is not None:
            v["lab_bad"] = vals[7]
        return v

    return read


def _start_checks(
    images: Tensor,
    probs: Tensor,
    rois: Tensor | None,
    seg_label: Tensor | None,
    distribution: bool,
    ignore_index: int,
    prob_stats: Tensor | None = None,
) -> Callable[[], float | None]:
    """Data-dependent checks (skipped while torch.compile traces: they would break the graph), in two
    halves: queues the statistics and returns the function that reads them, raises on a bad value
    and returns the images' maximum (None when they are empty: it bounds the bilateral features'
    colours).

    One pass over the inputs (``ops.dense_energy_input_stats``: one kernel and one reduction on a GPU,
    row blocks in AVX2 registers on the CPU; ``prob_stats``: the probabilities' part already read by
    ``ops.dense_energy_inputs``), or ATen reductions while ``_STATS_OP_ON_CPU`` is False; read back
    with a single device synchronisation (on a GPU each read stalls the host until the queue drains,
    hence ``_DEFER_CHECKS``). NaN propagates into the ranges
    and ±Inf falls outside them, so the finiteness checks cost nothing extra on valid inputs.
    """
    K = probs.shape[1]

    def nonfinite(name: str, t: Tensor) -> None:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains {'NaN' if bool(torch.isnan(t).any()) else 'Inf'} values")

    with torch.no_grad():
        if _uses_stats_op(probs):
            read = _stats_op(images, probs, rois, seg_label, distribution, ignore_index, prob_stats)
        else:
            stats = _stats_aten(images, probs, rois, seg_label, distribution, ignore_index)
            read = lambda: stats  # noqa: E731

    def judge() -> float | None:
        """Raises on the first bad statistic (finding an offending value where that helps the
        message); returns the images' maximum."""
        v = read()
        if not v:
            return None

        if "img_lo" in v and not (v["img_lo"] >= -_IMAGE_SLACK and v["img_hi"] <= 255 + _IMAGE_SLACK):
            nonfinite("images", images)
            raise ValueError(
                f"images must be on the 0-255 scale (RGB as the original module expects, not normalised); got "
                f"values in [{v['img_lo']:.6g}, {v['img_hi']:.6g}]"
            )
        if "img_lo" in v and images.is_floating_point() and 0 <= v["img_lo"] < v["img_hi"] <= 1:
            warnings.warn(
                f"images lie in [{v['img_lo']:.3g}, {v['img_hi']:.3g}], but sigma_rgb is in units of the 0-255 scale "
                "(as the original module expects), so [0, 1] images make the kernel nearly colour-blind; pass "
                "images * 255 (or sigma_rgb / 255)",
                UserWarning,
                stacklevel=3,
            )
        if "p_lo" in v:
            if not (v["p_lo"] >= 0 and v["p_hi"] <= 1):
                nonfinite("segmentations", probs)
                raise ValueError(
                    f"segmentations must be probabilities in [0, 1] (softmax outputs, not logits); got values in "
                    f"[{v['p_lo']:.4g}, {v['p_hi']:.4g}]"
                )
            if distribution:
                # 1e-2 for every dtype: a softmax rounded to bfloat16 and cast back to float32 (a mixed-
                # precision network's output) sums to 1 within about 3e-3 at 21 classes
                tol = 1e-2
                dev = max(abs(v["sum_lo"] - 1), abs(v["sum_hi"] - 1))
                if dev > tol:
                    raise ValueError(
                        "segmentations must be a probability distribution over dimension 1 (softmax) for the "
                        f"gate and the non-negative form; its sums deviate from 1 by up to {dev:.3g}"
                    )
        if v.get("roi_bad", 0.0) != 0:
            nonfinite("ROIs", rois)
            raise ValueError("ROIs must be a 0/1 crop mask; got values other than 0 and 1")
        if "lab_bad" in v:
            if v["lab_bad"] != 0:  # the error path: find an offending value
                lab = seg_label if seg_label.is_floating_point() else seg_label.long()
                nonfinite("seg_label", lab)
                good = (lab == lab.round()) & (((lab >= 0) & (lab < K)) | (lab == ignore_index))
                raise ValueError(
                    f"seg_label must hold class indices 0..{K - 1} or {ignore_index} (unlabelled); got other "
                    f"values (e.g. {float(lab[~good][0]):g})"
                )
        return v.get("img_hi")

    return judge


def _sample_index(H: int, W: int, stride: int, tile: int, order: Tensor) -> Tensor:
    """(h w,) int64: the full-resolution pixel (flat index) of each point of the downscaled h x w
    image in the pixel order ``order`` (nearest downscaling by ``stride``: pixel (y, x) samples
    (stride y, stride x)); cached."""
    w = W // stride

    def make() -> Tensor:
        return (order // w) * (stride * W) + (order % w) * stride

    return _cached(("energy_sample_index", H, W, stride, tile, order.device), make)


def _uses_stats_op(probs: Tensor) -> bool:
    return probs.device.type != "cpu" or _STATS_OP_ON_CPU


def _min(x: float | Tensor) -> float:
    return float(x.min()) if isinstance(x, Tensor) else x


def dense_energy_loss(
    images: Tensor,
    segmentations: Tensor,
    rois: Tensor | None = None,
    seg_label: Tensor | None = None,
    *,
    sigma_rgb: float | Tensor = 15.0,
    sigma_xy: float | Tensor = 100.0,
    scale_factor: float = 1.0,
    weight: float = 1.0,
    gradient: str = "exact",
    gate: bool = True,
    nonnegative: bool = False,
    ignore_index: int = 255,
    check_inputs: bool = True,
    recompute_scale_factor: bool = False,
) -> Tensor:
    r"""Dense-CRF energy loss of RRM / rloss on the permutohedral lattice (CPU and CUDA, fused).

    1. If ``scale_factor != 1``, downscale as the original module does: images, ROIs and labels
       nearest, probabilities bilinear (``align_corners=False``); the filter then uses
       ``sigma_xy · scale_factor``. ``recompute_scale_factor=True`` passes that argument of
       ``F.interpolate`` on, as the AFA / ToCo copies of the module do: the sampling then uses
       the ratio of the sizes instead of ``1 / scale_factor``, which differs where ``H · scale_factor``
       or ``W · scale_factor`` is not a whole number (odd sizes at 0.5).
    2. ``ŝ = segmentations · roi``; gate ``S = 1`` where ``seg_label == ignore_index``, elsewhere
       ``S = max(0, roi − max_k segmentations_k)`` (``gate=False``: ``S = 1``, plain rloss Potts).
    3. ``E = −(1/B) Σ_{b,k,i} S ŝ_k W ŝ_k`` with ``W`` the bilateral lattice filter over
       ``(x/σxy, y/σxy, I_1/σrgb, …, I_c/σrgb)``; returns ``weight · E``.

    ``nonnegative=True`` adds the constant the original drops, ``(1/B) Σ_i S roi (W 1)``, so that
    the value is the gated Potts relaxation ``(1/B) Σ_k (S ŝ_k)ᵀ W (roi − ŝ_k) ≥ 0`` (it needs
    ``segmentations`` to sum to 1); the gradient is unchanged.

    Gradients flow to ``segmentations`` only (through the ROI mask and the downscaling); the gate is
    a constant. ``gradient="exact"``: the true gradient of the value,
    ``−(1/B)[S·Wŝ + Wᵀ(S·ŝ)]`` (``Wᵀ``: the lattice with the blur order reversed);
    ``gradient="rloss"``: the original ``−(2/B)·S·Wŝ`` (which treats W as symmetric), to reproduce
    old runs. Both are computed in the forward pass on the lattice already built; the backward only
    scales them.

    Args:
        images: (B, c, H, W) images on the 0–255 scale (half a grey level of rounding outside it is
            accepted, as denormalised images have), any channel count c up to 14 (RGB, grey,
            multispectral: 2 + c lattice features), float or any integer dtype.
        segmentations: (B, K, H, W) softmax probabilities (float16/bfloat16 are computed in float32).
        rois: (B, H, W) crop-validity mask of 0/1 (None: all ones).
        seg_label: (B, 1, H, W) or (B, H, W) pseudo labels 0..K−1, ``ignore_index`` = unlabelled
            (None: every pixel labelled).
        sigma_rgb, sigma_xy: the bilateral kernel's standard deviations (RRM: 15, 100); numbers or
            per-image (B,) tensors.
        scale_factor: downscaling factor in (0, 1] (RRM: 0.5).
        weight: the loss weight (RRM: 1e-7).
        gradient: ``"exact"`` or ``"rloss"``.
        gate: use RRM's gate S (False: plain rloss, S = 1).
        nonnegative: add back the dropped constant (see above).
        ignore_index: the unlabelled value of ``seg_label``.
        recompute_scale_factor: ``F.interpolate``'s argument for the downscaling (see 1.).
        check_inputs: check the values (ranges, labels, ROI, distribution, NaN/Inf) at the price of a
            few passes over the inputs and one device synchronisation; shapes, dtypes and devices
            are always checked. Unchecked (also while ``torch.compile`` traces), nothing is read
            back: the images are taken to be on the 0–255 scale, and pixels whose features fall
            outside the lattice's key range (NaN, Inf, huge values) get no lattice weight instead
            of an error.

    Returns:
        A 0-dim tensor, float64 for float64 segmentations and float32 otherwise.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> images = torch.randint(0, 256, (2, 3, 16, 16)).float()
        >>> probs = torch.softmax(torch.randn(2, 4, 16, 16), 1).requires_grad_()
        >>> rois = torch.ones(2, 16, 16)
        >>> labels = torch.full((2, 1, 16, 16), 255.0)
        >>> loss = dense_energy_loss(images, probs, rois, labels, sigma_rgb=15, sigma_xy=100)
        >>> loss.backward()
        >>> bool(loss < 0), probs.grad.shape
        (True, torch.Size([2, 4, 16, 16]))
    """
    V.tensor(images, "images", ndim=4, finite=False)
    if images.dtype == torch.bool or images.is_complex():
        raise TypeError(f"images must be uint8 or floating; got {images.dtype}")
    V.tensor(segmentations, "segmentations", ndim=4, dtypes=V.FLOAT_DTYPES, finite=False)
    B, K, H, W = segmentations.shape
    if images.shape[0] != B or images.shape[2:] != segmentations.shape[2:]:
        raise ValueError(
            f"images must have shape (B, c, H, W) = ({B}, c, {H}, {W}) like segmentations; got {tuple(images.shape)}"
        )
    if images.shape[1] < 1 or images.shape[1] > 14:
        raise ValueError(f"images must have 1 to 14 channels (2 + c <= 16 lattice features); got {images.shape[1]}")
    if rois is not None:
        V.tensor(rois, "ROIs", finite=False)
        if tuple(rois.shape) != (B, H, W):
            raise ValueError(f"ROIs must have shape (B, H, W) = ({B}, {H}, {W}); got {tuple(rois.shape)}")
    if seg_label is not None:
        V.tensor(seg_label, "seg_label", finite=False)
        if tuple(seg_label.shape) not in ((B, 1, H, W), (B, H, W)):
            raise ValueError(
                f"seg_label must have shape (B, 1, H, W) = ({B}, 1, {H}, {W}) or (B, H, W); "
                f"got {tuple(seg_label.shape)}"
            )
    V.same_device({"segmentations": segmentations, "images": images, "ROIs": rois, "seg_label": seg_label})
    if gradient not in _GRAD_MODES:
        raise ValueError(f"gradient must be 'exact' or 'rloss'; got {gradient!r}")
    ignore_index = V.int64(ignore_index, "ignore_index")
    if seg_label is not None and 0 <= ignore_index < K:
        raise ValueError(f"ignore_index ({ignore_index}) must not be a class in [0, K = {K})")
    if seg_label is not None and not seg_label.is_floating_point() and seg_label.dtype != torch.int64:
        # compared in int64: a uint8 label map compared with ignore_index -1 would wrap it to 255
        info = torch.iinfo(seg_label.dtype) if seg_label.dtype != torch.bool else None
        if info is None or not info.min <= ignore_index <= info.max:
            seg_label = seg_label.to(torch.int64)
    # integer dtypes the reductions and ops do not take (uint16, uint32, uint64): as int64 / float64
    if images.dtype not in _STATS_DTYPES:
        images = images.to(torch.float64)
    if rois is not None and rois.dtype not in _STATS_DTYPES and rois.dtype != torch.bool:
        rois = rois.to(torch.float64)
    if seg_label is not None and seg_label.dtype not in _STATS_DTYPES and seg_label.dtype != torch.bool:
        seg_label = seg_label.to(torch.int64)
    sigma_rgb = V.positive(sigma_rgb, "sigma_rgb", B)
    sigma_xy = V.positive(sigma_xy, "sigma_xy", B)
    scale_factor = V.positive(scale_factor, "scale_factor")
    if scale_factor > 1:
        raise ValueError(f"scale_factor must be in (0, 1]; got {scale_factor}")
    hs, ws = math.floor(H * scale_factor), math.floor(W * scale_factor)  # F.interpolate's output size
    if H * W > 0 and hs * ws == 0:
        raise ValueError(
            f"scale_factor={scale_factor} shrinks the {H}x{W} images to {hs}x{ws} pixels; use a larger scale_factor "
            f"(at least {max(1 / H, 1 / W):.3g}) or larger images"
        )
    try:
        weight = float(weight)
    except (TypeError, ValueError):
        raise TypeError(f"weight must be a number; got {type(weight).__name__}") from None
    if weight != weight or weight in (float("inf"), float("-inf")):
        raise ValueError(f"weight must be finite; got {weight}")

    dtype = segmentations.dtype if segmentations.dtype in _COMPUTE_DTYPES else torch.float32
    probs = segmentations.to(dtype)
    roi = rois.detach().to(dtype) if rois is not None else None  # a constant mask, on every path
    # RRM's scale 0.5 (and 1): the downscaling, the ROI product and the gate in one pass over the
    # full-resolution probabilities (ops.dense_energy_inputs, with F.interpolate's arithmetic), and
    # its backward in one pass too: no bilinear kernels, zero fills or (B, K, h, w) temporaries.
    if not isinstance(recompute_scale_factor, bool):
        raise TypeError(f"recompute_scale_factor must be a bool; got {type(recompute_scale_factor).__name__}")
    # With recompute_scale_factor the sampling uses (size in) / (size out): 1 / scale_factor exactly
    # where the sizes divide, otherwise F.interpolate's general path below.
    recompute = recompute_scale_factor and scale_factor != 1.0 and (H * scale_factor != hs or W * scale_factor != ws)
    stride = 0 if recompute else _FUSED_STRIDES.get(scale_factor, 0)
    fused = stride > 0 and B * K * (H // stride) * (W // stride) > 0
    order = None  # the fused path's pixel order, if not raster (see below)
    prob_stats = None  # the fused path's statistics of the probabilities (the CPU's checks)
    if fused:
        h, w = H // stride, W // stride
        unl = seg_label.reshape(B, H, W) == ignore_index if (gate and seg_label is not None) else None
        # The op's points in dense_crf's pixel order (raster by default; with tiles, functional._PIXEL_TILE:
        # a block of the lattice op's slice gathers 2-2.4x fewer distinct vertex rows at RRM's
        # 160 x 160). The inputs op writes its outputs in that order (and its backward reads them so),
        # and the images and ROIs are sampled in it: no gather of the (B, K, h w) probabilities.
        tile = _pixel_tile((h, w), probs.device)
        # On the CPU the value checks' statistics of the probabilities come from this pass, which
        # reads every value anyway (one read of them instead of two); GPUs take them from the
        # one-pass statistics op with the other inputs'.
        want = (
            check_inputs
            and probs.device.type == "cpu"
            and _uses_stats_op(probs)
            and V.checking_values(images, segmentations)
        )
        # In raster order without the CPU's statistics, the inputs op runs inside the loss's own op
        # (ops.dense_energy_loss_fused, below: one autograd node for both, its backward one pass).
        late = not tile and not want
        roi_full = roi
        if late:
            s_hat = g = None
        else:
            s_hat, g, prob_stats = ops.dense_energy_inputs(probs, roi, unl, stride, gate, tile, want)
            prob_stats = prob_stats if want else None
        if tile:
            order = _pixel_order((h, w), probs.device)[0]
            src = _sample_index(H, W, stride, tile, order)
            img = images.reshape(B, -1, H * W).index_select(2, src)  # nearest: the blocks' first pixels
            roi = roi.reshape(B, H * W).index_select(1, src) if (roi is not None and nonnegative) else None
        else:
            img = None  # the features in one pass (ops.bilateral_features_2d), below
            # the ROI at the working scale is needed only for the mass (nearest: the blocks' first pixels)
            roi = roi[:, ::stride, ::stride][:, :h, :w] if (roi is not None and nonnegative) else None
    else:
        late = False
        img = images.to(dtype)
        lab = seg_label.reshape(B, 1, H, W) if seg_label is not None else None
        if scale_factor != 1.0 and probs.numel():  # (empty: F.interpolate refuses it; the sum is 0)
            kw = {"scale_factor": scale_factor, "recompute_scale_factor": recompute or None}
            img = F.interpolate(img, **kw)
            probs = F.interpolate(probs, mode="bilinear", align_corners=False, **kw)
            roi = F.interpolate(roi.unsqueeze(1), **kw).squeeze(1) if roi is not None else None
            lab = F.interpolate(lab.to(dtype), mode="nearest", **kw) if lab is not None else None
        h, w = probs.shape[2:]
        s_hat = probs * roi.unsqueeze(1) if roi is not None else probs
    if not late and s_hat.numel() == 0:  # no image, class or pixel: the energy is an empty sum
        if check_inputs and V.checking_values(images, segmentations):
            _start_checks(images, segmentations, rois, seg_label, gate or nonnegative, ignore_index)()
        return s_hat.sum() * weight
    fname = "images (bilateral features)"
    checked = check_inputs and V.checking_values(images, segmentations)
    finish_checks = None  # the deferred value checks (see _DEFER_CHECKS)
    if checked:  # the value checks: one device synchronisation
        finish_checks = _start_checks(
            images, segmentations, rois, seg_label, gate or nonnegative, ignore_index, prob_stats
        )
        defer = segmentations.device.type != "cpu" or _DEFER_CHECKS_ON_CPU
        if not (_DEFER_CHECKS and defer and _uses_stats_op(segmentations)):
            img_max, finish_checks = finish_checks(), None
        else:
            img_max = 255.0 + _IMAGE_SLACK  # until read: the range the checks enforce
    else:
        img_max = 255.0 + _IMAGE_SLACK  # unchecked: images are taken to be on the 0-255 scale
    with torch.no_grad():  # the gate, the features and the mass are constants of the op
        if not gate and not late:  # (the fused op makes its own)
            g = probs.new_ones((B, h, w))
        elif not fused:  # S = max(0, roi - max_k p_k), 1 where unlabelled
            g = probs.amax(1)
            g = roi - g if roi is not None else torch.rsub(g, 1)
            if lab is not None:
                g.masked_fill_((lab == ignore_index).reshape(B, h, w), 1)
            g.clamp_(min=0)
        # Unchecked images may hold anything: the lattice's embedding gives a pixel whose features
        # are NaN, Inf or beyond its integer keys no weight (it neither sends nor receives), without
        # a read or an extra pass here.
        if order is not None:  # img: (B, c, h w) in the order
            feats = _bilateral_features(img, (h, w), sigma_xy * scale_factor, sigma_rgb, dtype, order)
        elif img is None and not isinstance(sigma_xy, Tensor) and not isinstance(sigma_rgb, Tensor):
            # one pass from the full-resolution images: no slices, conversion, division and cat
            feats = ops.bilateral_features_2d(images, stride, h, w, sigma_xy * scale_factor, sigma_rgb, dtype)
        else:
            if img is None:  # per-image sigmas: the sampled pixels through ATen ops
                img = images[:, :, ::stride, ::stride][:, :, :h, :w].to(dtype)  # nearest: the blocks' first pixels
            feats = bilateral_features(img, sigma_xy * scale_factor, sigma_rgb, dtype=dtype)  # cached positions
        mass = None
        if nonnegative:
            mass = roi.reshape(B, -1) if roi is not None else probs.new_ones((B, h * w))
    if V.checking_values():
        _check_lattice_features(feats, fname, K + 1, dtype, values=False)
        # The lattice keys are int32: bound |features| from the positions' and colours' ranges (the
        # images are checked, or taken, to lie in [0, img_max]) instead of reading the features.
        pos_fmax = _position_fmax((h, w), _min(sigma_xy * scale_factor))
        try:
            _check_key_range(feats, fname, max(pos_fmax, (img_max or 0.0) / _min(sigma_rgb)))
        except ValueError:
            if finish_checks is None:
                raise
            img_max, finish_checks = finish_checks(), None  # the images' real range (or their error)
            _check_key_range(feats, fname, max(pos_fmax, (img_max or 0.0) / _min(sigma_rgb)))
    differentiable = (probs if late else s_hat).requires_grad and torch.is_grad_enabled()
    mode = _GRAD_MODES[gradient] if differentiable else 0
    factor = weight / max(B, 1)
    if late:  # the inputs op, the energy, its sum and weight / B in one op and one autograd node
        loss = ops.dense_energy_loss_fused(probs, roi_full, unl, stride, gate, feats, mass, mode, factor)
    else:
        s_hat, g = s_hat.reshape(B, K, -1), g.reshape(B, -1)
        # Other scales: the op's points into the pixel order by gathers (a sum over the pixels is
        # what comes back; the gradient returns to the raster order through _Gather).
        tiles = _pixel_order((h, w), s_hat.device) if not fused else None
        if tiles is not None:
            s_hat = _gather(s_hat, tiles[0], tiles[1])
            g = g.index_select(1, tiles[0]) if gate else g  # without the gate: ones in any order
            feats = feats.index_select(2, tiles[0])
            mass = mass.index_select(1, tiles[0]) if mass is not None else None
        # weight * the energies' sum / B in the op, as one autograd node (the same values as
        # dense_energy(...)[0].sum() * (weight / B), two nodes and two Python ops fewer per call)
        loss = ops.dense_energy_sum(s_hat, g, feats, mass, mode, factor)
    if finish_checks is not None:
        finish_checks()
    return loss


class DenseEnergyLossFunction(torch.autograd.Function):
    """Thin ``torch.autograd.Function`` over ``torch.ops.rrm_cuda.dense_energy`` (the original's name).

    ``apply(probs, gate, features, mass, gradient)`` with probs (B, K, N) ROI-masked probabilities,
    gate (B, N), features (B, d, N) already divided by their sigmas, mass (B, N) or None, gradient
    ``"exact"`` | ``"rloss"`` -> (B,) per-image energies ``−Σ S ŝ W ŝ`` (``+ Σ S m W1`` with a mass).
    The loss of the original module is ``weight · energies.sum() / B``.
    """

    @staticmethod
    def forward(probs, gate, features, mass, gradient="exact"):
        if gradient not in _GRAD_MODES:
            raise ValueError(f"gradient must be 'exact' or 'rloss'; got {gradient!r}")
        energy, grad_dir = ops.dense_energy(probs, gate, features, mass, _GRAD_MODES[gradient])
        return energy, grad_dir

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # no (B, K, N) zeros for the direction's gradient
        ctx.save_for_backward(output[1])

    @staticmethod
    def backward(ctx, grad_energy, _grad_dir):
        if torch.is_grad_enabled():  # create_graph=True: the direction is a constant, no second derivative
            raise RuntimeError(
                "rrm_cuda::dense_energy: its backward is not differentiable, so a double backward "
                "(create_graph=True through this op) is not supported"
            )
        (grad_dir,) = ctx.saved_tensors
        if grad_energy is None:
            return None, None, None, None, None
        return grad_dir * grad_energy.reshape(-1, 1, 1), None, None, None, None


class DenseEnergyLoss(nn.Module):
    """RRM's / rloss's ``DenseEnergyLoss`` module, fused (drop-in: same constructor and ``forward``).

    ``DenseEnergyLoss(weight, sigma_rgb, sigma_xy, scale_factor)`` (RRM: 1e-7, 15, 100, 0.5);
    ``forward(images, segmentations, ROIs, seg_label)`` with images (B, 3, H, W) RGB on 0–255,
    segmentations (B, K, H, W) softmax probabilities, ROIs (B, H, W) 0/1 crop mask, seg_label
    (B, 1, H, W) pseudo labels with 255 = unlabelled. Returns ``weight · E`` as a tensor of shape
    (1,), as the original does (on the inputs' device rather than always on the CPU).

    ``gradient="rloss"`` by default here: the original's ``−(2/B)·S·AS·ROI``, so that old runs
    reproduce; pass ``gradient="exact"`` for the true gradient. ``gate``, ``nonnegative``, ``check_inputs``,
    ``recompute_scale_factor`` (True for the AFA / ToCo copies of the module, which pass it to
    ``F.interpolate``: the same value at even sizes, not at odd ones) and ``image_channels`` (3 as the
    original; None accepts any channel count) as in :func:`dense_energy_loss`.

    As the original is called, images, ROIs and labels may be CPU tensors while the segmentations
    are on a GPU: they are moved to the segmentations' device (the functional form refuses mixed
    devices instead).
    """

    def __init__(
        self,
        weight: float,
        sigma_rgb: float | Tensor,
        sigma_xy: float | Tensor,
        scale_factor: float,
        *,
        gradient: str = "rloss",
        gate: bool = True,
        nonnegative: bool = False,
        image_channels: int | None = 3,
        check_inputs: bool = True,
        recompute_scale_factor: bool = False,
    ) -> None:
        super().__init__()
        if gradient not in _GRAD_MODES:
            raise ValueError(f"gradient must be 'exact' or 'rloss'; got {gradient!r}")
        if not isinstance(recompute_scale_factor, bool):
            raise TypeError(f"recompute_scale_factor must be a bool; got {type(recompute_scale_factor).__name__}")
        self.weight = weight
        self.sigma_rgb = V.positive(sigma_rgb, "sigma_rgb")
        self.sigma_xy = V.positive(sigma_xy, "sigma_xy")
        self.scale_factor = V.positive(scale_factor, "scale_factor")
        self.gradient = gradient
        self.gate = gate
        self.nonnegative = nonnegative
        self.image_channels = image_channels
        self.check_inputs = check_inputs
        self.recompute_scale_factor = recompute_scale_factor

    def forward(self, images: Tensor, segmentations: Tensor, ROIs: Tensor, seg_label: Tensor) -> Tensor:  # noqa: N803
        images, ROIs, seg_label = _to_device_of(segmentations, images, ROIs, seg_label)  # noqa: N806
        if self.image_channels is not None and isinstance(images, Tensor) and images.dim() == 4:
            if images.shape[1] != self.image_channels:
                raise ValueError(
                    f"images must have {self.image_channels} channels (RGB); got shape {tuple(images.shape)} "
                    "(pass image_channels=None for greyscale or multispectral images)"
                )
        loss = dense_energy_loss(
            images,
            segmentations,
            ROIs,
            seg_label,
            sigma_rgb=self.sigma_rgb,
            sigma_xy=self.sigma_xy,
            scale_factor=self.scale_factor,
            weight=self.weight,
            gradient=self.gradient,
            gate=self.gate,
            nonnegative=self.nonnegative,
            check_inputs=self.check_inputs,
            recompute_scale_factor=self.recompute_scale_factor,
        )
        return loss.reshape(1)

    def extra_repr(self) -> str:
        return (
            f"weight={self.weight}, sigma_rgb={self.sigma_rgb}, sigma_xy={self.sigma_xy}, "
            f"scale_factor={self.scale_factor}, gradient={self.gradient!r}, gate={self.gate}, "
            f"nonnegative={self.nonnegative}" + (", recompute_scale_factor=True" if self.recompute_scale_factor else "")
        )


class DenseCRFLoss(DenseEnergyLoss):
    """rloss's own ``DenseCRFLoss`` module (Tang et al., ECCV 2018; the scribble- and box-supervised
    repositories built on rloss), fused (drop-in: same constructor and ``forward``).

    ``DenseCRFLoss(weight, sigma_rgb, sigma_xy, scale_factor)``; ``forward(images, segmentations,
    ROIs)`` with images (B, 3, H, W) RGB on 0–255 (a CPU tensor, as the original needs, or on the
    segmentations' device), segmentations (B, K, H, W) softmax probabilities, ROIs (B, H, W) 0/1.
    Returns ``weight · E`` of shape (1,), ``E = −(1/B) Σ ŝ·Wŝ``, ``ŝ = segmentations·ROI``: RRM's
    energy without its gate and labels, with the original's gradient ``−(2/B)·AS·ROI`` by default
    (``gradient="exact"``: the true gradient). The keyword options (``gradient``, ``nonnegative``,
    ``image_channels``, ``check_inputs``, ``recompute_scale_factor``) as in :class:`DenseEnergyLoss`.
    """

    def __init__(
        self, weight: float, sigma_rgb: float | Tensor, sigma_xy: float | Tensor, scale_factor: float, **options
    ) -> None:
        if "gate" in options:
            raise TypeError("DenseCRFLoss has no gate (it is rloss's ungated energy); use DenseEnergyLoss")
        super().__init__(weight, sigma_rgb, sigma_xy, scale_factor, gate=False, **options)

    def forward(self, images: Tensor, segmentations: Tensor, ROIs: Tensor) -> Tensor:  # type: ignore[override]  # noqa: N803
        return super().forward(images, segmentations, ROIs, None)

    def extra_repr(self) -> str:
        return (
            f"weight={self.weight}, sigma_rgb={self.sigma_rgb}, sigma_xy={self.sigma_xy}, "
            f"scale_factor={self.scale_factor}, gradient={self.gradient!r}, nonnegative={self.nonnegative}"
        )


def _to_device_of(like: Tensor, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """``tensors`` on ``like``'s device where they are CPU tensors and ``like`` is not (the original
    modules are called with images, ROIs and labels on the host); anything else unchanged."""
    if not isinstance(like, Tensor) or like.device.type == "cpu":
        return tensors
    return tuple(t.to(like.device) if isinstance(t, Tensor) and t.device.type == "cpu" else t for t in tensors)


__all__ = ["DenseCRFLoss", "DenseEnergyLoss", "DenseEnergyLossFunction", "dense_energy_loss"]
