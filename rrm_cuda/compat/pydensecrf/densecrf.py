"""Drop-in for ``pydensecrf.densecrf``: ``DenseCRF``, ``DenseCRF2D``, the unaries ``ConstUnary`` and
``LogisticUnary`` (for ``setUnary``) and the kernel / normalisation constants, numpy in and out, with
pydensecrf's semantics (checked against pydensecrf2 in the tests).

Step-wise inference (``startInference``, ``stepInference``, ``klDivergence``) filters Q through the
terms' lattices (built at the first step and kept); ``inference(n)`` runs n steps in one op and is
the fast path.

Differences from pydensecrf: ``device=`` picks CPU or CUDA; inputs are validated with errors that
name the argument (of the classes pydensecrf raises: a float64 array where float32 is required is
an error that is both a ``TypeError`` and pydensecrf's ``ValueError``); any number of labels;
feature dimensions up to 16 (pydensecrf: any). Energies may be ``+inf`` (a forbidden label, as
``unary_from_softmax(p, clip=None)`` gives for p = 0), not NaN or ``-inf``, and not ``+inf`` for
every label of a variable (pydensecrf's Q would be NaN there). Parameter learning (``kernel`` types
other than the diagonal one only matter there) is not offered; ``kernel`` is accepted for
compatibility and does not change inference.
"""

from __future__ import annotations

import math
import numbers
import operator
import weakref

import numpy as np
import torch

from ... import _ext
from ... import functional as F

# pydensecrf's enums (KernelType, NormalizationType)
CONST_KERNEL = 0
DIAG_KERNEL = 1
FULL_KERNEL = 2
NO_NORMALIZATION = 0
NORMALIZE_BEFORE = 1
NORMALIZE_AFTER = 2
NORMALIZE_SYMMETRIC = 3

_NORM_CODE = {NORMALIZE_SYMMETRIC: 0, NORMALIZE_AFTER: 1, NORMALIZE_BEFORE: 2, NO_NORMALIZATION: 3}


class DTypeError(TypeError, ValueError):
    """A numpy array of the wrong dtype. pydensecrf's typed buffers raise ``ValueError`` ("Buffer
    dtype mismatch") there: code that catches either class keeps working."""


def _int_arg(value, name: str) -> int:
    """An integer argument. pydensecrf's Cython signatures take C ints and convert a Python or
    numpy float by truncation (``DenseCRF2D(640.0, 480, 21)`` works there), so this does too; a
    string or a non-finite number is a TypeError, and a value beyond a C int an OverflowError (as
    there: ``inference(2**31)`` would otherwise run for hours)."""
    try:
        v = operator.index(value)
    except TypeError:
        if isinstance(value, (str, bytes)) or not isinstance(value, (numbers.Real, np.ndarray)):
            raise TypeError(f"{name} must be an integer; got {type(value).__name__} {value!r}") from None
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be an integer; got {type(value).__name__} {value!r}") from None
        if not math.isfinite(f):
            raise TypeError(f"{name} must be an integer; got {value!r}") from None
        v = int(f)
    if not -(2**31) <= v < 2**31:
        raise OverflowError(f"{name} must fit a C int (pydensecrf's type); got {v}")
    return v


def _check_energies(e: np.ndarray, name: str) -> None:
    """Energies (M, N) may be +inf (a forbidden label: Q < 1e-37 there, pydensecrf's exactly 0; its
    ``klDivergence`` is then NaN, as pydensecrf's: 0 * inf), not NaN or -inf,
    and not +inf for every label of one variable (no label left: pydensecrf gives NaN)."""
    if np.isnan(e).any() or np.isneginf(e).any():
        raise ValueError(f"{name} contains NaN or -inf")
    if np.isposinf(e).any():
        blocked = np.isposinf(e).all(axis=0)
        if blocked.any():
            raise ValueError(
                f"{name} is +inf for every label of variable {int(np.argmax(blocked))} (and "
                f"{int(blocked.sum()) - 1} more): no label is left there"
            )


def _compat_arg(compat, L: int):
    """Checked when the term is added (pydensecrf converts it there): a finite number, an (L,) vector
    or an (L, L) matrix."""
    what = f"compat must be a number, an ({L},) vector or an ({L}, {L}) matrix"
    if isinstance(compat, numbers.Real):
        if not math.isfinite(float(compat)):
            raise ValueError(f"compat must be finite; got {compat}")
        return float(compat)
    if compat is None or isinstance(compat, (str, bytes)):
        raise TypeError(f"{what}; got {type(compat).__name__}")
    try:
        arr = np.asarray(compat, dtype=np.float32)
    except (TypeError, ValueError):
        raise TypeError(f"{what}; got {type(compat).__name__}") from None
    if not np.isfinite(arr).all():
        raise ValueError("compat contains NaN or Inf")
    if arr.ndim == 0:
        return float(arr)
    if arr.ndim == 1 and arr.shape[0] == L:
        return torch.from_numpy(arr.copy())
    if arr.ndim == 2 and arr.shape == (L, L):
        return torch.from_numpy(arr.copy())
    raise ValueError(f"compat must be a number, an ({L},) vector or an ({L}, {L}) matrix; got shape {arr.shape}")


def _float32_matrix(x, name: str) -> np.ndarray:
    """A float32 2-D array, copied (pydensecrf's Cython signatures take ``float[:, ::1]``)."""
    a = np.asarray(x)
    if a.dtype != np.float32:
        raise DTypeError(f"{name} must be float32 (as pydensecrf requires); got {a.dtype}")
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array; got shape {a.shape}")
    return np.ascontiguousarray(a).copy()


class Unary:
    """pydensecrf's unary base class: :meth:`DenseCRF.setUnary` takes a :class:`ConstUnary` or a
    :class:`LogisticUnary`. ``energy()`` gives the (M, N) float32 energies."""

    def __init__(self) -> None:
        raise TypeError("Unary is abstract: use ConstUnary(u) or LogisticUnary(L, f)")

    def energy(self) -> np.ndarray:
        return self._energy


class ConstUnary(Unary):
    """``ConstUnary(u)``: the energies u, float32 (M, N) (as ``setUnaryEnergy(u)``)."""

    def __init__(self, u) -> None:
        self._energy = _float32_matrix(u, "u")
        _check_energies(self._energy, "u")


class LogisticUnary(Unary):
    """``LogisticUnary(L, f)``: the energies ``L @ f`` of a linear model, L float32 (M, K) weights and
    f float32 (K, N) per-pixel features, as densecrf's LogisticUnaryEnergy (the energy, not its
    negative: the first Q is ``softmax(-L f)``). Its parameter learning is not offered."""

    def __init__(self, L, f) -> None:  # noqa: N803 (pydensecrf's names)
        self._energy = _logistic_energy(L, f, "L", "f")


def _logistic_energy(L, f, lname: str, fname: str) -> np.ndarray:  # noqa: N803
    """``L @ f`` with errors that name the caller's arguments (LogisticUnary's, setUnaryEnergy's)."""
    weights, feats = _float32_matrix(L, lname), _float32_matrix(f, fname)
    if weights.shape[1] != feats.shape[0]:
        raise ValueError(
            f"{lname} (M, K) and {fname} (K, N) must agree in K; got {lname} {weights.shape} and {fname} {feats.shape}"
        )
    for name, a in ((lname, weights), (fname, feats)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name} contains NaN or Inf")
    e = weights @ feats
    if not np.isfinite(e).all():
        raise ValueError(f"the energies {lname} @ {fname} overflow float32")
    return e


class DenseCRF:
    """Fully connected CRF over ``N`` variables with ``M`` labels (pydensecrf's ``DenseCRF(N, M)``)."""

    def __init__(self, nvar: int, nlabels: int, device: str | torch.device = "cpu") -> None:
        self.N = _int_arg(nvar, "nvar")
        self.M = _int_arg(nlabels, "nlabels")
        if self.N < 1:
            raise ValueError(f"nvar must be >= 1; got {nvar}")
        if self.M < 1:
            raise ValueError(f"nlabels must be >= 1; got {nlabels}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available in this torch / on this machine")
        self._unary: torch.Tensor | None = None
        # (features (D, N), compat, normalisation code, constant: the features are a cached tensor whose
        # lattice the op may keep across calls)
        self._terms: list[tuple[torch.Tensor, object, int, bool]] = []
        # stepInference / klDivergence: per term, its features, compatibility matrix and normalisers on the
        # device (made once: terms never change); the unary on the device; the last Q's messages
        self._step_terms: dict[int, tuple] = {}
        self._step_unary: tuple[torch.Tensor, torch.Tensor] | None = None  # (host unary, its device copy)
        self._last_messages: tuple[int, np.ndarray, list[torch.Tensor]] | None = None  # (terms, Q, messages)

    # -- unary ------------------------------------------------------------------------------
    def setUnaryEnergy(self, u, f=None) -> None:  # noqa: N802 (pydensecrf's name)
        """``u``: float32 (M, N) energies (−log p), C-contiguous as pydensecrf requires. With ``f``:
        the logistic unary ``u @ f`` (:class:`LogisticUnary`; u (M, K) weights, f (K, N); pydensecrf
        itself only accepts K = N here)."""
        if f is not None:
            self._set_energy(_logistic_energy(u, f, "u", "f"))
            return
        a = np.asarray(u)
        if a.dtype != np.float32:
            raise DTypeError(f"u must be float32 (as pydensecrf requires); got {a.dtype}")
        if a.shape != (self.M, self.N):
            raise ValueError(f"u must have shape (M, N) = ({self.M}, {self.N}); got {a.shape}")
        _check_energies(a, "u")
        self._unary = torch.from_numpy(np.ascontiguousarray(a).copy())

    def setUnary(self, u: Unary) -> None:  # noqa: N802
        """``u``: a :class:`ConstUnary` or :class:`LogisticUnary` of (M, N) energies. Unlike
        pydensecrf's, which takes the object over, ``u`` may be set on several CRFs."""
        if not isinstance(u, Unary):
            raise TypeError(f"u must be a ConstUnary or a LogisticUnary; got {type(u).__name__}")
        self._set_energy(u.energy())

    def _set_energy(self, e: np.ndarray) -> None:
        if e.shape != (self.M, self.N):
            raise ValueError(f"the unary's energies must have shape (M, N) = ({self.M}, {self.N}); got {e.shape}")
        _check_energies(e, "the unary's energies")
        self._unary = torch.from_numpy(e.copy())

    # -- pairwise ---------------------------------------------------------------------------
    def addPairwiseEnergy(  # noqa: N802
        self, features, compat, kernel: int = DIAG_KERNEL, normalization: int = NORMALIZE_SYMMETRIC
    ) -> None:
        """``features``: float32 (D, N), already divided by their standard deviations."""
        f = np.asarray(features)
        if f.dtype != np.float32:
            raise DTypeError(f"features must be float32 (as pydensecrf requires); got {f.dtype}")
        if f.ndim != 2 or f.shape[1] != self.N:
            raise ValueError(f"features must have shape (D, N) with N = {self.N}; got {f.shape}")
        t = torch.from_numpy(np.ascontiguousarray(f).copy())
        # dimension (1..16), size, finiteness and the lattice's integer-key range, now (the arrays
        # are copies: they cannot change before inference)
        F._check_lattice_features(t.unsqueeze(0), "features", self.M, torch.float32)
        self._add_term(t, compat, kernel, normalization)

    def _add_term(self, f: torch.Tensor, compat, kernel: int, normalization: int, constant: bool = False) -> None:
        if kernel not in (CONST_KERNEL, DIAG_KERNEL, FULL_KERNEL):
            raise ValueError(f"kernel must be CONST_KERNEL, DIAG_KERNEL or FULL_KERNEL; got {kernel}")
        if normalization not in _NORM_CODE:
            raise ValueError(f"normalization must be one of the NORMALIZE_* constants; got {normalization}")
        self._terms.append((f, _compat_arg(compat, self.M), _NORM_CODE[normalization], constant))

    # -- inference --------------------------------------------------------------------------
    def inference(self, n_iterations: int) -> np.ndarray:
        """Returns Q as a float32 (M, N) array (pydensecrf returns the same values as a matrix). As in
        pydensecrf, a CRF without a unary has zero energies, and ``n_iterations <= 0`` gives the
        unary's softmax."""
        return self._run(max(0, _int_arg(n_iterations, "n_iterations")))

    def _unary_or_zeros(self) -> torch.Tensor:
        if self._unary is None:  # densecrf: no unary energy is a zero one
            self._unary = torch.zeros(self.M, self.N)
        return self._unary

    def _run(self, iterations: int) -> np.ndarray:
        if self.M == 1:  # one label: Q = 1 (the op needs two)
            return np.ones((1, self.N), np.float32)
        dev = self.device
        u = self._unary_or_zeros().to(dev).unsqueeze(0)
        if not self._terms:
            return torch.softmax(-u, 1)[0].cpu().numpy()
        feats, compats, diags, norms, keep = [], [], [], [], []
        for f, c, n, constant in self._terms:
            cm = F._compat_matrix(c, self.M, "compat", torch.float32, dev)
            if cm is None:
                continue
            f = f.to(dev).unsqueeze(0)
            # sizes and memory on the device; the values were checked when the term was added (the
            # cached positions are finite and in range by construction)
            F._check_lattice_features(f, "features", self.M, torch.float32, values=False)
            feats.append(f)
            compats.append(cm[0])
            diags.append(cm[1])
            norms.append(n)
            keep.append(constant)
        if not feats:
            return torch.softmax(-u, 1)[0].cpu().numpy()
        q = torch.ops.rrm_cuda.dense_crf(
            u, feats, torch.stack(compats), diags, norms, iterations, keep if any(keep) else []
        )
        return q[0].cpu().numpy()

    # -- step-wise inference (pydensecrf's startInference / stepInference / klDivergence) ---------
    def startInference(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # noqa: N802
        """``(Q, tmp1, tmp2)``: Q = softmax(−unary) as a float32 (M, N) array, for :meth:`stepInference`
        and :meth:`klDivergence`; tmp1 and tmp2 are pydensecrf's work matrices, kept for its
        signature (empty, as pydensecrf2's stay). pydensecrf returns ``MatrixXf`` objects;
        ``np.array(Q)`` works on either."""
        q = self.inference(0)
        empty = np.zeros((0, 0), np.float32)
        return q, empty, empty.copy()

    def stepInference(self, Q, tmp1=None, tmp2=None) -> None:  # noqa: N802
        """One mean-field step from ``Q``, in place, as pydensecrf's: ``Q = softmax(−unary − Σ_k C_k K_k Q)``
        over the labels (C_k the term's compatibility, K_k its normalised lattice filter). ``Q``: the
        writable float32 (M, N) array of :meth:`startInference`; ``tmp1``, ``tmp2`` are not used.

        Each call filters Q through every term's lattice (``permutohedral_filter``; the lattices and
        normalisers are built at the first step and kept), one filter op per term: :meth:`inference`,
        whose fused mean field does all terms in one pass, is the faster way to run several steps."""
        if not isinstance(Q, np.ndarray):
            raise TypeError(f"Q must be the float32 array startInference returned; got {type(Q).__name__}")
        if Q.dtype != np.float32 or Q.shape != (self.M, self.N) or not Q.flags.writeable:
            raise ValueError(
                f"Q must be a writable float32 array of shape (M, N) = ({self.M}, {self.N}); got {Q.dtype} "
                f"{Q.shape}{'' if Q.flags.writeable else ', read-only'}"
            )
        q = self._q_tensor(Q)
        acc = self._device_unary().neg()
        for msg in self._messages(Q, q):
            acc.sub_(msg)
        # densecrf's expAndNormalize: exp(x - max) over the labels, normalised (a reduction over
        # dim 0 here, which torch.softmax does slowly on the CPU)
        acc.sub_(acc.amax(0)).exp_()
        acc.div_(acc.sum(0))
        torch.from_numpy(Q).copy_(acc)

    def klDivergence(self, Q) -> float:  # noqa: N802
        """pydensecrf's KL divergence of ``Q`` (up to a constant): ``Σ Q log max(Q, 1e-20) + Σ unary Q
        + Σ_k Σ Q C_k K_k Q``, float32 products summed in float64 (as densecrf sums them)."""
        Q = np.asarray(Q)
        q = self._q_tensor(Q)
        # .double().sum(): on the CPU, sum(dtype=torch.float64) of a float32 tensor takes ~3x longer
        kl = q.clamp_min(1e-20).log_().mul_(q).double().sum()
        kl = kl + (self._device_unary() * q).double().sum()
        for msg in self._messages(Q, q):
            kl = kl + (q * msg).double().sum()
        return float(kl)

    def _q_tensor(self, q: np.ndarray) -> torch.Tensor:
        self._unary_or_zeros()
        if q.shape != (self.M, self.N):
            raise ValueError(f"Q must have shape (M, N) = ({self.M}, {self.N}); got {q.shape}")
        if not np.isfinite(q).all():
            raise ValueError("Q contains NaN or Inf")
        return torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32)).to(self.device)

    def _messages(self, Q: np.ndarray, q: torch.Tensor) -> list[torch.Tensor]:
        """Each active term's message ``C K Q`` (M, N): the term's lattice filter of Q with its
        normalisation (symmetric: n^-1/2 before and after; after / before: 1/n; n = K 1 + 1e-20, as the
        dense_crf op computes it, cached per term) and its energy-convention compatibility C. The
        last Q's messages are kept: pydensecrf's loop asks klDivergence(Q), then stepInference(Q)."""
        last = self._last_messages
        if last is not None and last[0] == len(self._terms) and np.array_equal(last[1], Q):
            return last[2]
        msgs = list(self._filter_terms(q))
        self._last_messages = (len(self._terms), np.array(Q, dtype=np.float32, copy=True), msgs)
        return msgs

    def _device_unary(self) -> torch.Tensor:
        if self._step_unary is None or self._step_unary[0] is not self._unary:  # set anew: copied anew
            self._step_unary = (self._unary, self._unary.to(self.device))
        return self._step_unary[1]

    def _filter_terms(self, q: torch.Tensor):
        for i, (f, c, code, constant) in enumerate(self._terms):
            if i not in self._step_terms:
                self._step_terms[i] = self._step_term(f, c, code, constant)
            fd, C, scale, pre = self._step_terms[i]
            if fd is None:  # the term is switched off
                continue
            v = q * pre if pre is not None else q
            k = torch.ops.rrm_cuda.permutohedral_filter(v.unsqueeze(0).contiguous(), fd, False, True)[0]
            # a diagonal compatibility (Potts, per label): one multiply by diag(C) times the
            # normaliser; a full matrix: C (post * k)
            yield k.mul_(scale) if C is None else C @ k.mul_(scale)

    def _step_term(self, f: torch.Tensor, c, code: int, constant: bool) -> tuple:
        """A term's step-wise pieces, made once: its features on the device (copies, or the cached
        positions: they never change, so the filter op keeps their lattice, cache=True; a copy's
        lattice is evicted when this CRF is collected, the shared positions' stays), its full
        compatibility matrix or None when diagonal, the scale applied after filtering ((L, N):
        diag(C) times the normaliser, or (1, N) / (1, 1)) and the scale before (None or (1, N))."""
        cm = F._compat_matrix(c, self.M, "compat", torch.float32, self.device)
        if cm is None:
            return None, None, None, None
        C = cm[0]
        fd = f.to(self.device).unsqueeze(0).contiguous()
        if not constant:
            # this CRF's own copy: its lattice leaves the (process-wide) cache with the CRF
            weakref.finalize(self, _ext._C.evict_lattice_cache, fd.data_ptr())
        norm = None
        if code != 3:
            n = torch.ops.rrm_cuda.permutohedral_filter(torch.ones(1, 1, self.N, device=self.device), fd, False, True)
            n = n[0, 0].double() + 1e-20
            norm = (n.rsqrt() if code == 0 else n.reciprocal()).float().unsqueeze(0)
        pre = norm if code in (0, 2) else None
        post = norm if code in (0, 1) else torch.ones(1, 1, device=self.device)
        diag = C.diagonal()
        if torch.equal(C, torch.diag(diag)):
            return fd, None, (diag.unsqueeze(1) * post).contiguous(), pre
        return fd, C, post, pre


class DenseCRF2D(DenseCRF):
    """``DenseCRF2D(W, H, M)``: a CRF over an image of width W and height H (pixel j*W + i)."""

    def __init__(self, W: int, H: int, nlabels: int, device: str | torch.device = "cpu") -> None:  # noqa: N803
        w, h = _int_arg(W, "W"), _int_arg(H, "H")
        if w < 1 or h < 1:
            raise ValueError(f"W and H must be >= 1; got W={W}, H={H}")
        super().__init__(w * h, nlabels, device)
        self.W = w
        self.H = h

    def addPairwiseGaussian(  # noqa: N802
        self, sxy, compat, kernel: int = DIAG_KERNEL, normalization: int = NORMALIZE_SYMMETRIC
    ) -> None:
        """Smoothness kernel over (x/sx, y/sy); ``sxy`` a number or an (sx, sy) pair."""
        sx, sy = (sxy, sxy) if np.isscalar(sxy) else sxy
        sx, sy = F.V.positive(sx, "sxy"), F.V.positive(sy, "sxy")
        if sx == sy:
            # rrm_cuda's cached position features (x / sxy, y / sxy: the same float32 divisions), on
            # the CRF's device: the op keeps their lattice across calls and images of this size
            pos = F._positions(1, (self.H, self.W), sx, torch.float32, self.device)[0]
            self._add_term(pos, compat, kernel, normalization, constant=True)
            return
        yy, xx = np.mgrid[0 : self.H, 0 : self.W].astype(np.float32)
        feats = np.stack([xx.reshape(-1) / np.float32(sx), yy.reshape(-1) / np.float32(sy)])
        self.addPairwiseEnergy(feats.astype(np.float32), compat, kernel, normalization)

    def addPairwiseBilateral(  # noqa: N802
        self, sxy, srgb, rgbim, compat, kernel: int = DIAG_KERNEL, normalization: int = NORMALIZE_SYMMETRIC
    ) -> None:
        """Appearance kernel over (x/sx, y/sy, r/sr, g/sg, b/sb); ``rgbim`` uint8 (H, W, 3)."""
        im = np.asarray(rgbim)
        if im.dtype != np.uint8:
            raise DTypeError(f"rgbim must be a uint8 array (as pydensecrf requires); got {im.dtype}")
        if im.shape != (self.H, self.W, 3):
            raise ValueError(f"rgbim must have shape (H, W, 3) = ({self.H}, {self.W}, 3); got {im.shape}")
        sx, sy = (sxy, sxy) if np.isscalar(sxy) else sxy
        sr, sg, sb = (srgb, srgb, srgb) if np.isscalar(srgb) else srgb
        for name, s in (("sxy", sx), ("sxy", sy), ("srgb", sr), ("srgb", sg), ("srgb", sb)):
            F.V.positive(s, name)
        yy, xx = np.mgrid[0 : self.H, 0 : self.W].astype(np.float32)
        col = im.reshape(-1, 3).astype(np.float32)
        feats = np.stack(
            [
                xx.reshape(-1) / np.float32(sx),
                yy.reshape(-1) / np.float32(sy),
                col[:, 0] / np.float32(sr),
                col[:, 1] / np.float32(sg),
                col[:, 2] / np.float32(sb),
            ]
        )
        self.addPairwiseEnergy(feats.astype(np.float32), compat, kernel, normalization)
