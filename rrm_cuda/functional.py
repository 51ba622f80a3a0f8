"""Public functional API of rrm_cuda.

Shapes: B batch, C channels, L labels, d feature dimension, ``*S`` spatial dimensions (H, W for
images; any number, flattened to N internally).
"""

from __future__ import annotations

import math
import operator
import threading
import warnings
from collections.abc import Sequence
from typing import Union

import torch
from torch import Tensor

from . import _validate as V
from ._ext import ops

Compat = Union[float, int, Tensor, None]

_NORMALIZATIONS = {"symmetric": 0, "after": 1, "before": 2, "none": 3}
_COMPUTE_DTYPES = (torch.float32, torch.float64)
# On a GPU, dense_crf reads its value checks of the scores (NaN/Inf, negative probabilities) after
# the op is queued when nothing before the op needs a value (uint8 images, bounded positions): the
# read then waits for nothing (the op's own lattice-size read has passed the copy), where reading
# first drains the queue and idles the GPU while the host prepares the op. Bad scores then raise the
# same error after the op ran on them (NaN in, NaN out: harmless). _DEFER_CHECKS_ON_CPU: tests.
_DEFER_CHECKS = True
_DEFER_CHECKS_ON_CPU = False


def _flat(x: Tensor) -> Tensor:
    """(B, C, *S) -> (B, C, N), also for empty tensors."""
    return x.reshape(x.shape[0], x.shape[1], math.prod(x.shape[2:]))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in _COMPUTE_DTYPES else torch.float32


#: the largest |feature| taken in float32 (2^16: relative filter errors up to a few 1e-4 below it on
#: images, several per cent a decade above; benchmarks/NOTES.md §18)
_FLOAT32_FMAX = 65536.0


def _check_key_range(features: Tensor, name: str, fmax: float | None = None, dtype: torch.dtype | None = None) -> None:
    """Lattice keys are int32: refuse features whose elevated coordinates could overflow them, and
    float32 features beyond _FLOAT32_FMAX. ``fmax``: max |features| when already known; ``dtype``:
    the dtype the lattice is built in (default: the features')."""
    d = features.shape[1]
    if features.numel() == 0:
        return
    if fmax is None:
        fmax = float(features.detach().abs().amax())
    bound = 2 * d * math.sqrt(2.0 / 3.0) * (d + 1) / math.sqrt(2.0) * fmax
    if bound > 2**30:
        raise ValueError(
            f"{name}: feature values up to {fmax:.3g} overflow the lattice's integer keys "
            f"(|f| * {2 * d * math.sqrt(2.0 / 3.0) * (d + 1) / math.sqrt(2.0):.3g} must stay below 2^30); "
            "a standard deviation (sigma) is probably far too small for the coordinates"
        )
    if (dtype or features.dtype) != torch.float64 and fmax > _FLOAT32_FMAX:
        # float32 features keep too few fractional bits there: the embedding's barycentric weights
        # (differences of large elevated coordinates) err by several per cent, and by far more as
        # |f| grows (a filter of ones reached 260 instead of <= 1 at 1.5e8)
        raise ValueError(
            f"{name}: feature values up to {fmax:.3g} exceed {_FLOAT32_FMAX:g}, beyond which float32 lattice "
            "weights lose their precision; use float64 inputs, or a larger standard deviation (sigma)"
        )


def _lattice_bytes(B: int, N: int, d: int, C: int, itemsize: int, device: torch.device) -> int:
    E = N * (d + 1)
    chunk = B if device.type == "cuda" else 1
    per_entry = 4 + itemsize + 4  # vertex, weight, splat list
    workspace = chunk * E * (4 * d + 4 + 4 + 8 + 4) + chunk * 2 * E * 4 * 2  # keys, slot, owner, table
    worst_vertices = E  # M <= E
    neighbors = B * (d + 1) * worst_vertices * 2 * 4 + B * (worst_vertices + 1) * 8
    buffers = 2 * B * worst_vertices * C * itemsize + 2 * B * N * C * itemsize
    return B * E * per_entry + workspace + neighbors + buffers


def _check_lattice_features(
    features: Tensor,
    name: str,
    C: int,
    dtype: torch.dtype,
    batch: int | None = None,
    values: bool = True,
) -> None:
    """Features (B, d, N): dimension, size, memory, finiteness and integer-key range. ``batch``: the
    number of images the lattices serve when larger than B (shared lattices are repeated).
    ``values=False`` leaves finiteness and the key range to the caller (``_check_key_range`` on a
    range it read together with other tensors': one device synchronisation). The memory check asks
    for the free memory only for work that is not small (``V.small_bytes``)."""
    B, d, N = features.shape
    B = max(B, batch or 0)
    if d < 1 or d > 16:
        raise ValueError(f"{name} must have 1 <= d <= 16 feature channels; got shape {tuple(features.shape)}")
    if N * (d + 1) >= 2**30:
        raise ValueError(f"{name}: N * (d + 1) must be < 2^30 lattice entries per image; got N={N}, d={d}")
    itemsize = torch.finfo(dtype).bits // 8
    V.memory(_lattice_bytes(B, N, d, C, itemsize, features.device), features.device, f"the lattice of {name}")
    if not values:
        return
    rng = V.finite_range(features, name)  # one synchronisation for finiteness and the key range
    if rng is not None:
        _check_key_range(features, name, max(abs(rng[0]), abs(rng[1])), dtype)


def permutohedral_filter(values: Tensor, features: Tensor, *, reverse: bool = False, cache: bool = False) -> Tensor:
    r"""Gaussian filtering on the permutohedral lattice, one lattice per image.

    ``out[b, :, i] ≈ Σ_j exp(-½‖f_i − f_j‖²) · values[b, :, j]`` with ``f = features[b, :, ·]``
    (already divided by their standard deviations), computed in O(N·d·C) by splatting onto the
    lattice, blurring along its d+1 axes and slicing, exactly as densecrf does (no normalisation,
    self term included). Differentiable w.r.t. ``values``: the backward is the exact adjoint (the
    same filter with the blur order reversed, ``reverse=True``). And w.r.t. ``features`` (learnable
    positions or feature scales): the lattice's simplices are piecewise constant in the features and
    its barycentric weights linear, so the gradient is the weights' derivative, exact almost
    everywhere (both gradients from one lattice, rebuilt unless ``cache``: two splats and blurs and
    two passes over the pixels; not differentiable again: a double backward that needs it raises).

    Args:
        values: (B, C, *S) floating tensor, any C >= 1.
        features: (B, d, *S) positions, 1 <= d <= 16, same spatial size as ``values``.
        reverse: blur the axes in reverse order (the adjoint of the forward filter).
        cache: ``features`` is a tensor you will not change: its lattice is built at the first call
            and kept for later calls with this very tensor (filtering many signals over one image,
            step-wise mean field), and by the backward. Kept per storage, shape, strides and
            version, so an in-place change of ``features`` through torch builds anew (writes that
            torch does not count, through ``.data`` or a numpy array sharing the memory, are not
            seen); only a contiguous tensor of the compute dtype is kept (any other is converted
            anew by every call). The entry holds on to the tensor's memory until it is evicted (the
            least recently used beyond 8 entries) or ``rrm_cuda.clear_lattice_cache()``; see also
            ``lattice_cache_info`` and ``set_lattice_cache_capacity``.

    Returns:
        (B, C, *S) tensor of ``values``' dtype (fp16/bf16 are computed in fp32).

    Example:
        >>> v = torch.ones(1, 1, 4, 4)
        >>> yy, xx = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
        >>> f = torch.stack([xx, yy])[None] / 2.0
        >>> permutohedral_filter(v, f).shape
        torch.Size([1, 1, 4, 4])
    """
    V.tensor(values, "values", dtypes=V.FLOAT_DTYPES, finite=False)
    V.tensor(features, "features", dtypes=V.FLOAT_DTYPES, finite=False)
    if values.dim() < 3:
        raise ValueError(f"values must have shape (B, C, *S); got {tuple(values.shape)}")
    if features.dim() != values.dim():
        raise ValueError(
            f"features must have shape (B, d, *S) matching values (B, C, *S) = {tuple(values.shape)}; "
            f"got {tuple(features.shape)}"
        )
    if features.shape[0] != values.shape[0] or features.shape[2:] != values.shape[2:]:
        raise ValueError(f"values {tuple(values.shape)} and features {tuple(features.shape)} must agree in B and *S")
    V.same_device({"values": values, "features": features})
    dtype = _compute_dtype(values.dtype)
    B, C = values.shape[:2]
    f = _flat(features)
    _check_lattice_features(f, "features", C, dtype, values=False)  # shapes and memory
    # the values of both, finite and within the lattice's key range: one device read for the two
    frng, _ = V.finite_ranges([("features", f), ("values", values)])
    if frng is not None:
        _check_key_range(f, "features", max(abs(frng[0]), abs(frng[1])), dtype)  # (f: not yet converted)
    v = _flat(values).to(dtype)
    keep = cache and features.is_contiguous() and features.dtype == dtype  # f is then a view of features
    f = f.to(dtype)
    out = ops.permutohedral_filter(v, f, reverse, keep)
    return out.reshape(values.shape).to(values.dtype)


def lattice_num_vertices(features: Tensor) -> Tensor:
    """Number of lattice points of each image: (B, d, *S) -> (B,) int64 (occupancy diagnostics)."""
    V.tensor(features, "features", dtypes=V.FLOAT_DTYPES)
    if features.dim() < 3:
        raise ValueError(f"features must have shape (B, d, *S); got {tuple(features.shape)}")
    f = _flat(features).to(_compute_dtype(features.dtype))
    _check_lattice_features(f, "features", 1, f.dtype)
    return ops.lattice_num_vertices(f)


# ---------------------------------------------------------------------------------------------
# Dense CRF


# Constant tensors of the dense CRF (position features, Potts matrices, sigma divisors on a GPU) are
# built once per configuration and reused: each saves several small ATen ops (host launch time) per
# call. Keyed by device and, on CUDA, by the current stream (a cached tensor is only ever freed,
# by eviction, on the stream it was made and used on); at most _CONST_CACHE_SIZE entries.
_CONST_CACHE: dict[tuple, Tensor] = {}
_CONST_LOCK = threading.Lock()
# A 2-D size takes up to 6 entries: positions raster and tiled, the pixel order and its inverse, the
# energy loss's sample index.
_CONST_CACHE_SIZE = 32


def _cached(key: tuple, make) -> Tensor:
    """``make()`` for ``key`` (device in it), made once; not cached under tensor subclasses (fake
    or traced tensors, nor while torch.compile traces: dynamo's stream objects have no handle, and
    the graph makes its own constants), nor while a CUDA graph is captured: a tensor made in a
    capture holds its values only once the graph replays, and a cached tensor used by a graph
    would be freed under it by a later eviction; the graph makes its own."""
    if torch.compiler.is_compiling():
        return make()
    device = key[-1]
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return make()
        key = (*key, torch.cuda.current_stream(device).cuda_stream)
    t = _CONST_CACHE.get(key)
    if t is None:
        with torch.inference_mode(False), torch.no_grad():  # usable outside inference mode later
            t = make()
        if type(t) is Tensor:
            with _CONST_LOCK:  # calls from several threads: one evicts at a time
                while len(_CONST_CACHE) >= _CONST_CACHE_SIZE:
                    _CONST_CACHE.pop(next(iter(_CONST_CACHE)))
                _CONST_CACHE[key] = t
    return t


def _per_image(sigma: float | Tensor, B: int, like: Tensor) -> Tensor | float:
    """A divisor for features of ``like``: (B, 1, 1) per-image sigmas, or a number.

    On CUDA a number becomes a device tensor: PyTorch divides a CUDA tensor by a Python number as
    a multiplication by its reciprocal, which rounds differently from the CPU's (and densecrf's)
    true division; a feature that then lands on a rounding tie of the lattice embedding (integer
    colours and positions do) moves to another simplex, and CPU and CUDA results differ.
    """
    if isinstance(sigma, Tensor):
        return sigma.to(device=like.device, dtype=like.dtype).reshape(B, 1, 1)
    if like.device.type != "cpu":
        dtype, device = like.dtype, like.device
        return _cached(("sigma", sigma, dtype, device), lambda: torch.full((), sigma, dtype=dtype, device=device))
    return sigma


def _positions(batch: int, spatial: Sequence[int], sxy: float | Tensor, dtype: torch.dtype, device) -> Tensor:
    """(batch, len(S), N) pixel positions / ``sxy`` (x first), for a validated ``sxy``. For a
    number, a view of a cached (1, len(S), N) tensor expanded over the batch: each axis is divided
    once (the same true divisions, element by element, as dividing the whole grid)."""
    if isinstance(sxy, Tensor):  # per-image sigmas
        grids = torch.meshgrid(*[torch.arange(s, dtype=dtype, device=device) for s in spatial], indexing="ij")
        pos = torch.stack([g.reshape(-1) for g in reversed(grids)]).unsqueeze(0).expand(batch, -1, -1)
        return pos / _per_image(sxy, batch, pos)
    device = torch.device("cpu") if device is None else torch.device(device)
    spatial = tuple(int(s) for s in spatial)

    def make() -> Tensor:
        axes = [torch.arange(s, dtype=dtype, device=device) for s in spatial]
        div = _per_image(sxy, 1, axes[0])
        grids = torch.meshgrid(*[a / div for a in axes], indexing="ij")
        return torch.stack(grids[::-1]).view(1, len(spatial), -1)

    return _cached(("positions", spatial, sxy, dtype, device), make).expand(batch, -1, -1)


# Pixel order of the lattice ops of dense_crf and of the energy loss (energy.py) for 2-D images:
# 16 x 16 tiles, row-major inside each tile and across the tiles, instead of the raster order. The
# whole tiles come first, so that each starts at a multiple of 256 whatever the image's size (the
# tiled mean field's blocks of P = 256 consecutive pixels are then squares, NOTES section 15); then
# the columns right of them and the rows below them, each in raster order (energy_common.h's
# tile_position is the same order). The op is indifferent to the order of its
# points; what changes is locality. Each GPU block of 256 threads slices one tile, and each pixel
# gathers d + 1 vertex rows per term: over a tile of a 512 x 512 photo those are 137 distinct
# bilateral and 52 position rows, against 391 and 183 over 256 pixels of a row. The splat's chunks,
# which hold a vertex's pixels in increasing order, gather each distinct row of Q 2.1x per block
# instead of 1.5x and 1.0x (benchmarks/NOTES.md section 11). Results differ from the raster order's
# only in the summation order of the splat lists (the last bits). Per device type: the tile side, or
# 0 for the raster order. On the CPU the op gains 3-7 % (a core's caches hold a 512 x 512 photo's
# lattice anyway), less than the two gathers of the scores cost there: raster order. On an H100
# (session 13, three A/B runs, benchmarks/cuda_profile.py) the tiles did not pay either: the public
# 512 x 512 CRF 1.8-3.3 % slower than raster in every run (its two gathers take ~60 us), RRM's
# pseudo-label CRFs and the energy loss within +-3 % either way. Raster order on both; the tile
# order stays a switch (tested on both devices) for other GPUs.
_PIXEL_TILE = {"cuda": 0, "cpu": 0}


class _Gather(torch.autograd.Function):
    """``x[..., index]`` whose gradient is ``g[..., inverse]``: a gather both ways (deterministic;
    index_select's own backward is a scatter-add)."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, inverse: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(inverse)
        return x.index_select(-1, index)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        (inverse,) = ctx.saved_tensors
        return g.index_select(-1, inverse), None, None


def _gather(x: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
    """``x[..., index]``, through _Gather only when a gradient is wanted (an autograd.Function costs
    about 4 us more host time per call than the bare index_select)."""
    if x.requires_grad and torch.is_grad_enabled():
        return _Gather.apply(x, index, inverse)
    return x.index_select(-1, index)


def _pixel_tile(spatial: Sequence[int], device) -> int:
    """The tile side of the pixel order on ``device`` (see _PIXEL_TILE), or 0: the raster order
    (other dimensions, images no larger than a tile, tiles switched off)."""
    T = _PIXEL_TILE.get(torch.device(device).type, 0)
    return T if T > 0 and len(spatial) == 2 and spatial[0] > T and spatial[1] > T else 0


def _pixel_order(spatial: Sequence[int], device) -> tuple[Tensor, Tensor] | None:
    """(order, inverse) int64 on ``device`` for the tile order of 2-D images (see _PIXEL_TILE),
    or None (the raster order, see _pixel_tile)."""
    device = torch.device(device)
    T = _pixel_tile(spatial, device)
    if T == 0:
        return None
    H, W = int(spatial[0]), int(spatial[1])

    def make(which: int) -> Tensor:
        y = torch.arange(H, device=device).repeat_interleave(W)
        x = torch.arange(W, device=device).repeat(H)
        hw, ww = H // T * T, W // T * T  # the whole tiles' rows and columns
        key = torch.where(  # each pixel's position (a permutation of 0..H W - 1)
            (y < hw) & (x < ww),
            ((y // T) * (W // T) + x // T) * (T * T) + (y % T) * T + (x % T),
            torch.where(y < hw, hw * ww + y * (W - ww) + (x - ww), y * W + x),
        )
        return torch.argsort(key) if which == 0 else key

    return (
        _cached(("pixel_order", H, W, T, 0, device), lambda: make(0)),
        _cached(("pixel_order", H, W, T, 1, device), lambda: make(1)),
    )


def _tiled_positions(spatial: Sequence[int], sxy: float, dtype: torch.dtype, device, order: Tensor) -> Tensor:
    """The cached (1, 2, N) positions of a number ``sxy`` in the pixel order ``order``, cached as
    such (the op keeps the lattice of a cached, unchanged tensor)."""
    device = torch.device(device)
    spatial = tuple(int(s) for s in spatial)
    key = ("positions_tiled", spatial, _pixel_tile(spatial, device), sxy, dtype, device)  # the order's tile side
    return _cached(key, lambda: _positions(1, spatial, sxy, dtype, device).index_select(2, order).contiguous())


def _position_fmax(spatial: Sequence[int], sxy: float) -> float:
    """The largest |position feature| for a number ``sxy`` (positions are >= 0)."""
    return max([s - 1 for s in spatial] + [0]) / sxy


def position_features(
    batch: int, spatial: Sequence[int], sxy: float | Tensor, *, dtype=torch.float32, device=None
) -> Tensor:
    """(B, len(S), N) pixel positions divided by ``sxy``, in densecrf's order: x (the last, column
    axis) first, then y (rows), then z. ``sxy``: a number or a tensor, 0-dim or per-image (B,); one
    that requires grad gets it through the positions."""
    try:
        batch, spatial = operator.index(batch), tuple(operator.index(n) for n in spatial)
    except TypeError:
        raise TypeError(f"batch and spatial must be an int and ints; got {batch!r}, {spatial!r}") from None
    if batch < 0 or not spatial or min(spatial) < 0:
        raise ValueError(f"batch must be >= 0 and spatial a non-empty sequence of sizes >= 0; got {batch}, {spatial}")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64; got {dtype}")
    sxy = V.positive(sxy, "sxy", batch, keep_grad=True)
    pos = _positions(batch, spatial, sxy, dtype, device)
    return pos if isinstance(sxy, Tensor) else pos.clone()  # a fresh tensor, not the cached one


def bilateral_features(image: Tensor, sxy: float | Tensor, srgb: float | Tensor, *, dtype=torch.float32) -> Tensor:
    """(B, len(S) + c, N) features ``(x/sxy, y/sxy, I_1/srgb, …, I_c/srgb)`` of pydensecrf's
    addPairwiseBilateral, for an image (B, c, *S) of any channel count on the 0–255 scale.
    ``sxy``/``srgb``: numbers, or tensors (0-dim or per-image (B,)); tensors that require grad get
    it through the features (learnable bandwidths of :func:`permutohedral_filter`), as does the
    image."""
    if not isinstance(image, Tensor):  # (plain torch: any device)
        raise TypeError(f"image must be a torch.Tensor; got {type(image).__name__}")
    if image.dim() < 3 or image.is_complex() or image.dtype == torch.bool:
        raise ValueError(f"image must be a real (B, c, *S) tensor; got {image.dtype} of shape {tuple(image.shape)}")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64; got {dtype}")
    return _bilateral_features(_flat(image), image.shape[2:], sxy, srgb, dtype)


def _bilateral_features(
    colours: Tensor,
    spatial: Sequence[int],
    sxy: float | Tensor,
    srgb: float | Tensor,
    dtype: torch.dtype,
    order: Tensor | None = None,
) -> Tensor:
    """bilateral_features of the (B, c, N) pixels ``colours`` of images of size ``spatial``, taken in
    the pixel order ``order`` (``colours[..., p]`` is pixel ``order[p]``; None: the raster order). The
    same values as the raster features gathered by ``order``."""
    B = colours.shape[0]
    srgb = V.positive(srgb, "srgb", B, keep_grad=True)
    sxy = V.positive(sxy, "sxy", B, keep_grad=True)
    if order is None:
        pos = _positions(B, spatial, sxy, dtype, colours.device)
    elif isinstance(sxy, Tensor):
        pos = _positions(B, spatial, sxy, dtype, colours.device).index_select(2, order)
    else:
        pos = _tiled_positions(spatial, sxy, dtype, colours.device, order).expand(B, -1, -1)
    col = colours.to(dtype)
    return torch.cat([pos, col / _per_image(srgb, B, col)], dim=1)


def _divides(b_img: int, b: int) -> bool:
    """A batch of b_img images serves b unaries (item i uses image i % b_img)."""
    return b_img == b or (b_img >= 1 and b % b_img == 0)


def unary_from_probs(probs: Tensor, clip: float | None = 1e-5) -> Tensor:
    """``-log(clip(p, clip, 1))``: pydensecrf.utils.unary_from_softmax on tensors (any shape)."""
    u = probs.clamp(min=clip, max=1.0)
    if u.requires_grad:
        return -torch.log(u)
    # without autograd: one new tensor instead of three (fresh pages cost as much as the passes)
    return torch.log_(u).neg_()


def _compat_matrix(
    compat: Compat, L: int, name: str, dtype, device, pending: list | None = None
) -> tuple[Tensor, bool] | None:
    """-> ((L, L) energy-convention matrix, is_diagonal), or None when the term is switched off.
    A device tensor's finiteness check is appended to ``pending`` (checked with the other inputs)
    when given, instead of synchronising here."""
    if compat is None:
        return None
    if isinstance(compat, Tensor):
        # values are not read where they cannot be: while torch.compile traces (any device), and a device
        # tensor's inside a CUDA graph capture
        readable = not torch.compiler.is_compiling() and (compat.device.type == "cpu" or V.checking_values(compat))
        if pending is not None and compat.device.type != "cpu" and compat.dim() > 0:
            pending.append((name, compat))
        elif readable and not bool(torch.isfinite(compat).all()):
            raise ValueError(f"{name} contains NaN or Inf")
        c = compat.to(device=device, dtype=dtype)
        if c.dim() == 0 and (c.requires_grad or not readable):
            # a learnable Potts weight (kept as a tensor, even at 0, so that it gets a gradient), or
            # one that cannot be read now: the matrix -w I from the tensor
            return -c * torch.eye(L, dtype=dtype, device=device), True
        if c.dim() == 0:
            compat = float(c)
        elif c.dim() == 1:
            if c.shape[0] != L:
                raise ValueError(f"{name} as a vector must have shape (L,) = ({L},); got {tuple(c.shape)}")
            return torch.diag(c), True
        elif c.dim() == 2:
            if tuple(c.shape) != (L, L):
                raise ValueError(f"{name} as a matrix must have shape (L, L) = ({L}, {L}); got {tuple(c.shape)}")
            return 0.5 * (c + c.T), False
        else:
            raise ValueError(f"{name} must be a number, (L,) or (L, L); got shape {tuple(c.shape)}")
    w = _potts_weight(compat, name)
    if w is None:
        return None
    return _potts_matrix(w, L, dtype, device), True


def _potts_weight(compat: object, name: str) -> float | None:
    """The weight of a Potts compatibility given as a number (None: the term is off)."""
    try:
        w = float(compat)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, a tensor or None; got {type(compat).__name__}") from None
    if V.checking_values() and not math.isfinite(w):  # (a symbolic float while torch.compile traces)
        raise ValueError(f"{name} must be finite; got {compat}")
    return None if w == 0 else w


def _potts_matrix(w: float, L: int, dtype, device) -> Tensor:
    # Potts: a reward w for agreeing labels, i.e. the energy -w * I (densecrf's PottsCompatibility).
    return -w * torch.eye(L, dtype=dtype, device=device)


def _potts_stack(ws: tuple[float, ...], L: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(T, L, L) Potts matrices of the weights ``ws``, cached (the same values as stacking
    ``_potts_matrix`` of each)."""
    return _cached(
        ("potts", ws, L, dtype, device), lambda: torch.stack([_potts_matrix(w, L, dtype, device) for w in ws])
    )


def dense_crf(
    unary: Tensor | None = None,
    image: Tensor | None = None,
    *,
    probs: Tensor | None = None,
    iterations: int = 10,
    gaussian_sxy: float | Tensor = 3.0,
    gaussian_compat: Compat = 3.0,
    bilateral_sxy: float | Tensor = 80.0,
    bilateral_srgb: float | Tensor = 13.0,
    bilateral_compat: Compat = 10.0,
    pairwise: Sequence[tuple[Tensor, Compat]] = (),
    normalization: str = "symmetric",
    clip: float | None = 1e-5,
    check_inputs: bool = True,
) -> Tensor:
    r"""Fully connected CRF mean-field inference (Krähenbühl & Koltun 2011) with pydensecrf's semantics.

    ``Q⁰ = softmax(−U)``; each iteration ``Q = softmax(−U − Σ_k C_k m_k)`` with messages
    ``m_k = D_k^{-½} K_k D_k^{-½} Q`` (``normalization="symmetric"``, pydensecrf's default) or
    ``D_k^{-1} K_k Q`` (``"after"``), ``K_k`` a Gaussian kernel over the term's features computed on
    the permutohedral lattice, ``D_k = diag(K_k 1)``. Each lattice is built once per image and term
    and reused by every iteration.

    Compatibilities ``C_k``: a number ``w`` is Potts, a *reward* ``w`` for agreeing labels
    (``C = −w·I``, pydensecrf's ``compat=w``); an (L,) vector is a per-label energy ``diag(c)``; an
    (L, L) matrix is an energy (symmetrised). ``0`` or ``None`` switches a term off.

    Args:
        unary: (B, L, *S) energies (−log p). Give this or ``probs``. ``+inf`` forbids a label
            (Q < 1e-37 there; pydensecrf's is exactly 0), not NaN or ``−inf``, and not every label
            of one pixel (checked with ``check_inputs``; unchecked, such a pixel gets the uniform
            distribution).
        image: (B, c, *S) colours on the 0–255 scale (uint8 or float; a checked float image within
            [0, 1] gets a warning: ``bilateral_srgb`` is in 0–255 units), any c with len(S) + c <= 16
            lattice features (RGB, grey, multispectral: up to 14 channels for a 2-D image); needed by
            the bilateral term. Its batch may also be a divisor B' of B: item b then uses image
            ``b % B'`` and the lattice of each image is built once and shared
            (several unaries per image, e.g. RRM's two pseudo-label CRFs, as
            ``torch.cat([u_1, u_2])`` with ``image`` of batch B/2).
        probs: (B, L, *S) scores; the unary is ``−log(clip(probs, clip, 1))`` (pydensecrf's
            ``unary_from_softmax``; scores need not sum to 1).
        clip: the smallest probability, in (0, 1]; None: no clipping (a score of 0 is then an
            energy of +inf, a forbidden label, as ``unary_from_softmax(p, clip=None)``; a pixel
            scoring 0 for every label is refused, as for ``unary``).
        iterations: mean-field iterations (pydensecrf's ``inference(n)``).
        gaussian_sxy, gaussian_compat: the smoothness kernel over positions (``addPairwiseGaussian``).
        bilateral_sxy, bilateral_srgb, bilateral_compat: the appearance kernel over positions and
            colours (``addPairwiseBilateral``). Sigmas may be per-image (B,) tensors.
        pairwise: extra terms ``(features, compat)`` with features (B, d, *S) already divided by
            their standard deviations (depth, 3-D coordinates, other modalities); batch B or a
            divisor of it, as for ``image``. When ``gaussian_sxy`` is a number, the Gaussian term's
            lattice is built once and kept across calls (``rrm_cuda.lattice_cache_info``).
        normalization: ``"symmetric"`` | ``"after"`` | ``"before"`` | ``"none"``.
        check_inputs: check the values (NaN/Inf, negative ``probs``, features overflowing the
            lattice's integer keys) at the price of one device synchronisation; shapes, dtypes,
            devices, sigmas and memory are always checked. Unchecked (also while ``torch.compile``
            traces), nothing is read back: images are taken to be on the 0–255 scale, NaN/Inf inputs
            give meaningless probabilities instead of an error, and pixels whose features fall
            outside the key range get no lattice weight (in a training loop, check the inputs
            where the step reads its logged values anyway).

    Returns:
        Q: (B, L, *S) probabilities (float32 unless the input is float64), differentiable w.r.t.
        ``unary``/``probs`` and tensor compatibilities, not the image/features (backpropagation
        through the mean-field iterations, CRF-as-RNN style: the backward rebuilds the lattices,
        reruns the forward and keeps every iteration's Q, ``(iterations + 1)·B·L·N`` values).

    Example:
        >>> probs = torch.softmax(torch.randn(1, 3, 8, 8), 1)
        >>> image = torch.randint(0, 256, (1, 3, 8, 8), dtype=torch.uint8)
        >>> q = dense_crf(probs=probs, image=image, iterations=5)
        >>> q.shape, bool(torch.allclose(q.sum(1), torch.ones(1, 8, 8)))
        (torch.Size([1, 3, 8, 8]), True)
    """
    if (unary is None) == (probs is None):
        raise ValueError("give exactly one of unary (energies) and probs (scores)")
    # Values (finiteness, ranges) of every input are checked together at the end: one device
    # synchronisation per call (each one stalls the host until the GPU queue drains).
    pending: list[tuple[str, Tensor]] = []
    if probs is not None:
        V.tensor(probs, "probs", dtypes=V.FLOAT_DTYPES, finite=False)
        src_name, src = "probs", probs
    else:
        V.tensor(unary, "unary", dtypes=V.FLOAT_DTYPES, finite=False)
        src_name, src = "unary", unary
    pending.append((src_name, src))
    if src.dim() < 3:
        raise ValueError(f"{src_name} must have shape (B, L, *S); got {tuple(src.shape)}")
    B, L = src.shape[:2]
    spatial = tuple(src.shape[2:])
    if L < 2:
        raise ValueError(f"{src_name} must have at least 2 labels (dimension 1); got shape {tuple(src.shape)}")
    if probs is not None and clip is not None:  # unary_from_softmax's clip: the smallest probability
        try:
            if isinstance(clip, (bool, str, bytes)):
                raise TypeError
            clip = float(clip)
        except (TypeError, ValueError):
            raise ValueError(f"clip must be a number in (0, 1] or None; got {clip!r}") from None
        if not 0 < clip <= 1:
            raise ValueError(f"clip must be a number in (0, 1] or None (no clipping); got {clip!r}")
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 0:
        raise ValueError(f"iterations must be a non-negative int; got {iterations!r}")
    if normalization not in _NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {sorted(_NORMALIZATIONS)}; got {normalization!r}")
    dtype = _compute_dtype(src.dtype)
    device = src.device
    u = unary_from_probs(probs.to(dtype), clip) if probs is not None else unary.to(dtype)
    u = _flat(u)
    N = u.shape[2]
    tiles = _pixel_order(spatial, device) if N > 0 else None

    feats: list[Tensor] = []
    compats: list[Tensor | float] = []  # a float: a Potts weight (its matrix is built, cached, below)
    diags: list[bool] = []
    # features whose key range is bounded from known ranges instead of read: name -> (max |position|,
    # srgb or None): max |feature| = max(max |position|, max |image| / srgb)
    bounds: dict[str, tuple[float, float | None]] = {}
    feat_names: list[str] = []
    keep: list[bool] = []  # per term: constant features (the cached positions), lattice cached by the op

    def add(
        features: Tensor,
        compat: Compat,
        name: str,
        fmax: tuple[float, float | None] | None = None,
        constant: bool = False,
        ordered: bool = False,
    ) -> None:
        if compat is None:  # the term is off (as 0 is)
            return
        if isinstance(compat, Tensor):
            cm = _compat_matrix(compat, L, name, dtype, device, pending)
            if cm is None:
                return
            c, diag = cm
        else:
            c, diag = _potts_weight(compat, name), True
            if c is None:
                return
        f = _flat(features).to(dtype)
        if tiles is not None and not ordered:
            f = f.index_select(2, tiles[0])
        fname = name.replace("compat", "features")
        _check_lattice_features(f, fname, L, dtype, batch=B, values=False)
        if fmax is None:
            pending.append((fname, f))
        else:
            bounds[fname] = fmax
        feat_names.append(fname)
        feats.append(f.contiguous())
        keep.append(constant)
        compats.append(c)
        diags.append(diag)

    if gaussian_compat is not None and not (isinstance(gaussian_compat, (int, float)) and gaussian_compat == 0):
        gsxy = V.positive(gaussian_sxy, "gaussian_sxy", B)
        # One position lattice for the whole batch unless the sigma is per image.
        nb = B if isinstance(gsxy, Tensor) else min(B, 1)
        fmax = None if isinstance(gsxy, Tensor) else (_position_fmax(spatial, gsxy), None)
        # A number sigma: the cached position tensor (in the pixel order), the same every call, and
        # so is its lattice, which the op then keeps (csrc/lattice/lattice_cache.h) instead of
        # rebuilding it per call.
        if tiles is not None and not isinstance(gsxy, Tensor):
            pos = _tiled_positions(spatial, gsxy, dtype, device, tiles[0]).expand(nb, -1, -1)
            add(pos, gaussian_compat, "gaussian_compat", fmax, constant=True, ordered=True)
        else:
            pos = _positions(nb, spatial, gsxy, dtype, device)
            add(pos, gaussian_compat, "gaussian_compat", fmax, constant=not isinstance(gsxy, Tensor))
    if bilateral_compat is not None and not (isinstance(bilateral_compat, (int, float)) and bilateral_compat == 0):
        if image is None:
            raise ValueError("image is required by the bilateral term; pass bilateral_compat=0 to switch it off")
        V.tensor(image, "image", finite=False)
        if image.dim() != len(spatial) + 2 or not _divides(image.shape[0], B) or tuple(image.shape[2:]) != spatial:
            raise ValueError(
                f"image must have shape (B', c, *S) = (B', c, {', '.join(map(str, spatial))}) with B' = {B} or a "
                f"divisor of it (item b then uses image b % B'); got {tuple(image.shape)}"
            )
        if image.dtype == torch.bool or image.is_complex():
            raise TypeError(f"image must be uint8 or floating; got {image.dtype}")
        if len(spatial) + image.shape[1] > 16:  # the lattice's d: positions and channels
            raise ValueError(
                f"image must have at most {16 - len(spatial)} channels: the bilateral term's features are "
                f"{len(spatial)} positions and the channels, at most 16 in all; got {image.shape[1]} channels"
            )
        V.same_device({src_name: src, "image": image})
        pending.append(("image", image))
        bsxy = V.positive(bilateral_sxy, "bilateral_sxy", B)
        bsrgb = V.positive(bilateral_srgb, "bilateral_srgb", B)
        if image.shape[0] < B and (isinstance(bsxy, Tensor) or isinstance(bsrgb, Tensor)):
            image = image.repeat(B // image.shape[0], *([1] * (image.dim() - 1)))  # per-image sigmas
        fmax = None
        if (
            not isinstance(bsxy, Tensor)
            and not isinstance(bsrgb, Tensor)
            and (image.dtype == torch.uint8 or image.is_floating_point())
        ):
            # max |feature| from the positions' bound and the image's range (read with the other
            # values, or 255 for uint8): no pass over the features
            fmax = (_position_fmax(spatial, bsxy), bsrgb)
        if tiles is None and len(spatial) == 2 and fmax is not None:
            # number sigmas, 2-D: the features in one pass (the same values as bilateral_features)
            bil = ops.bilateral_features_2d(image, 1, spatial[0], spatial[1], bsxy, bsrgb, dtype)
        else:
            bil = bilateral_features(image, bsxy, bsrgb, dtype=dtype)
        add(bil, bilateral_compat, "bilateral_compat", fmax)
    for k, item in enumerate(pairwise):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise TypeError(f"pairwise[{k}] must be a (features, compat) pair")
        f, c = item
        V.tensor(f, f"pairwise[{k}] features", dtypes=V.FLOAT_DTYPES, finite=False)
        # (B', d, *S), or flattened (B', d, N): not another arrangement of N pixels (a transpose)
        shape_ok = tuple(f.shape[2:]) == spatial or (f.dim() == 3 and f.shape[2] == N)
        if f.dim() < 3 or not _divides(f.shape[0], B) or not shape_ok:
            raise ValueError(
                f"pairwise[{k}] features must have shape (B', d, *S) or (B', d, N) with B' = {B} or a divisor "
                f"of it, S={spatial}, N={N}; got {tuple(f.shape)}"
            )
        V.same_device({src_name: src, f"pairwise[{k}] features": f})
        add(f, c, f"pairwise[{k}] compat")

    ranges: dict[str, tuple[float, float] | None] = {}
    finish_checks = None  # the deferred value checks (see _DEFER_CHECKS)

    def judge(r: dict[str, tuple[float, float] | None]) -> None:
        rng = r.get(src_name)
        if probs is not None and rng is not None and rng[0] < 0:
            raise ValueError("probs must be non-negative scores (got negative values)")
        # +inf energies forbid a label (pydensecrf's unary_from_softmax(p, clip=None) at p = 0); a
        # pixel with every label forbidden has no distribution (pydensecrf: NaN). Looked for only
        # when some energy is +inf: one more pass and read, never on the usual path.
        if rng is not None and (rng[1] == math.inf if probs is None else clip is None and rng[0] == 0):
            # (from the caller's tensor: u's +inf are probs' zeros; no copy of u kept for this)
            blocked = (probs == 0 if probs is not None else torch.isposinf(unary)).reshape(B, L, -1).all(1)
            if bool(blocked.any()):
                b, i = (int(v) for v in blocked.nonzero()[0])
                where = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), spatial)) if spatial else ()
                why = "a score of 0 for every label (clip=None)" if probs is not None else "an energy of +inf"
                raise ValueError(
                    f"{src_name} leaves no label at item {b}, pixel {where}: {why} forbids every label "
                    "(pydensecrf gives NaN there); give at least one finite energy per pixel"
                    + (" or a clip" if probs is not None else "")
                )
        rng = r.get("image")
        if rng is not None and image.is_floating_point() and 0 <= rng[0] < rng[1] <= 1:
            warnings.warn(
                f"image values lie in [{rng[0]:.3g}, {rng[1]:.3g}], but bilateral_srgb is in units of the 0-255 scale "
                "(pydensecrf's), so a [0, 1] image makes the bilateral kernel nearly colour-blind; pass image * 255 "
                "(or bilateral_srgb / 255)",
                UserWarning,
                stacklevel=3,
            )

    if check_inputs and V.checking_values(src):
        read = V.finite_ranges_later(pending, posinf_ok=("unary",))  # raises on NaN/Inf when read
        names = [n for n, _ in pending]
        # Only the scores' values are needed after the op (not before it, unlike a float image's or
        # free features' ranges, which bound the lattice keys): read them then, on a GPU.
        later = (device.type != "cpu" or _DEFER_CHECKS_ON_CPU) and _DEFER_CHECKS
        if later and all(n == src_name or not x.is_floating_point() for n, x in pending):
            finish_checks = lambda: judge(dict(zip(names, read())))  # noqa: E731
        else:
            ranges = dict(zip(names, read()))
            judge(ranges)
    # (unchecked: nothing read back; images on the 0-255 scale, other features unbounded: the op's guard)
    for fname, f in zip(feat_names, feats):
        if fname in bounds:
            pmax, srgb = bounds[fname]
            if srgb is not None:
                rng = ranges.get("image")
                imax = 255.0 if rng is None else max(abs(rng[0]), abs(rng[1]))  # None: uint8 or unchecked
                pmax = max(pmax, imax / srgb)
            _check_key_range(f, fname, pmax)
        elif ranges.get(fname) is not None:
            _check_key_range(f, fname, max(abs(ranges[fname][0]), abs(ranges[fname][1])))
    if B == 0 or N == 0:  # an empty result, still part of the graph (backward gives empty gradients)
        return (src.to(dtype) * 0).reshape(B, L, *spatial)
    if not feats:
        if finish_checks is not None:
            finish_checks()
        return torch.softmax(-u, dim=1).reshape(B, L, *spatial)
    if all(isinstance(c, float) for c in compats):
        compat = _potts_stack(tuple(compats), L, dtype, device)
    else:
        compat = torch.stack([_potts_matrix(c, L, dtype, device) if isinstance(c, float) else c for c in compats])
    norms = [_NORMALIZATIONS[normalization]] * len(feats)
    if torch.is_grad_enabled() and (u.requires_grad or compat.requires_grad):
        _check_crf_backward_memory(B, L, N, iterations, dtype, device)
    if tiles is not None:
        u = _gather(u, tiles[0], tiles[1])
    q = ops.dense_crf(
        u.contiguous(),
        [f.detach() if f.requires_grad else f for f in feats],
        compat,
        diags,
        norms,
        iterations,
        keep if any(keep) else [],
    )
    if finish_checks is not None:
        finish_checks()
    if tiles is not None:
        q = _gather(q, tiles[1], tiles[0])
    return q.reshape(B, L, *spatial)


def _check_crf_backward_memory(B: int, L: int, N: int, iterations: int, dtype: torch.dtype, device) -> None:
    """dense_crf's backward keeps Q of every iteration, (iterations + 1)·B·L·N values, plus ~7 (B, N, L)
    work arrays (its lattices are those the forward's check counted)."""
    itemsize = torch.finfo(dtype).bits // 8
    V.memory((iterations + 8) * B * L * N * itemsize, torch.device(device), "dense_crf's backward")
