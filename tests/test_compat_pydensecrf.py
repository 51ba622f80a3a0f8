"""rrm_cuda.compat.pydensecrf: a drop-in for pydensecrf.densecrf / pydensecrf.utils."""

import gc
import sys

import numpy as np
import pytest
import torch

import rrm_cuda.compat.pydensecrf.densecrf as rdcrf
import rrm_cuda.compat.pydensecrf.utils as rutils
from tests.conftest import photo, smooth_probs

try:  # the reference; the shim's own tests run without it (pydensecrf2 does not build on Python 3.13)
    import pydensecrf.densecrf as pdcrf
    import pydensecrf.utils as putils
except ImportError:
    pdcrf = putils = None
needs_pydensecrf = pytest.mark.skipif(pdcrf is None, reason="pydensecrf2 not installed")


def _run(mod, utils, probs, img, *, gauss_kw, bil_kw, iters=10):
    L, H, W = probs.shape
    d = mod.DenseCRF2D(W, H, L)
    d.setUnaryEnergy(np.ascontiguousarray(utils.unary_from_softmax(probs)))
    d.addPairwiseGaussian(**gauss_kw)
    d.addPairwiseBilateral(rgbim=img, **bil_kw)
    return np.array(d.inference(iters))


@pytest.mark.parametrize(
    "compat",
    ["potts", "diag", "matrix"],
)
@pytest.mark.parametrize("norm", ["NORMALIZE_SYMMETRIC", "NORMALIZE_AFTER"])
@needs_pydensecrf
def test_densecrf2d_matches_pydensecrf(compat, norm):
    img = photo("chelsea", (60, 80))
    L = 4
    probs = smooth_probs(L, 60, 80, seed=2)
    rng = np.random.default_rng(0)
    c = {
        "potts": 5.0,
        "diag": rng.uniform(-3, 0, L).astype(np.float32),
        "matrix": rng.uniform(-2, 2, (L, L)).astype(np.float32),
    }[compat]
    outs = []
    for mod, utils in ((pdcrf, putils), (rdcrf, rutils)):
        nrm = getattr(mod, norm)
        outs.append(
            _run(
                mod,
                utils,
                probs,
                img,
                gauss_kw=dict(sxy=3, compat=3, normalization=nrm),
                bil_kw=dict(sxy=(60, 70), srgb=13, compat=c, kernel=mod.DIAG_KERNEL, normalization=nrm),
            )
        )
    assert outs[1].shape == outs[0].shape == (L, 60 * 80)
    assert np.abs(outs[1] - outs[0]).max() < 1e-3
    assert (outs[1].argmax(0) == outs[0].argmax(0)).mean() >= 0.999


@pytest.mark.parametrize("norm", ["NORMALIZE_SYMMETRIC", "NORMALIZE_AFTER", "NORMALIZE_BEFORE", "NO_NORMALIZATION"])
@needs_pydensecrf
def test_step_inference_matches_pydensecrf(norm):
    # pydensecrf's step-wise API (startInference, stepInference, klDivergence, as in its README's KL
    # loop) on a photograph: each step's Q and the KL divergence before it against pydensecrf2, for
    # Potts, per-label and full compatibilities; k steps give inference(k)
    img = photo("chelsea", (60, 80))
    L = 4
    probs = smooth_probs(L, 60, 80, seed=2)
    rng = np.random.default_rng(1)
    for compat in (5.0, rng.uniform(-3, 0, L).astype(np.float32), rng.uniform(-2, 2, (L, L)).astype(np.float32)):
        runs = []
        for mod, utils in ((pdcrf, putils), (rdcrf, rutils)):
            d = mod.DenseCRF2D(80, 60, L)
            d.setUnaryEnergy(np.ascontiguousarray(utils.unary_from_softmax(probs)))
            d.addPairwiseGaussian(sxy=3, compat=3, normalization=getattr(mod, norm))
            d.addPairwiseBilateral(sxy=(60, 70), srgb=13, rgbim=img, compat=compat, normalization=getattr(mod, norm))
            Q, tmp1, tmp2 = d.startInference()
            kls, qs = [], [np.array(Q).copy()]
            for _ in range(5):
                kls.append(d.klDivergence(Q))
                d.stepInference(Q, tmp1, tmp2)
                qs.append(np.array(Q).copy())
            runs.append((np.array(kls), qs, np.array(d.inference(5))))
        (kl0, q0, _), (kl1, q1, inf1) = runs
        np.testing.assert_allclose(kl1, kl0, rtol=1e-4)
        assert not np.allclose(kl1[0], kl1[-1])  # the steps moved Q
        for a, b in zip(q0, q1):
            assert b.dtype == np.float32 and b.shape == (L, 60 * 80)
            assert np.abs(a - b).max() < 1e-3
            assert (a.argmax(0) == b.argmax(0)).mean() >= 0.999
        # the same steps summed in another order (unnormalised messages are ~100x larger)
        np.testing.assert_allclose(q1[-1], inf1, rtol=0, atol=1e-4 if norm == "NO_NORMALIZATION" else 1e-5)


def test_step_inference_builds_each_lattice_once(lattice_cache):
    # the step-wise API keeps each term's lattice (permutohedral_filter's cache=True): the
    # normaliser and every later step reuse it; the steps equal inference(k)
    import rrm_cuda

    img = photo("chelsea", (30, 40))
    d = rdcrf.DenseCRF2D(40, 30, 3)
    d.setUnaryEnergy(np.ascontiguousarray(rutils.unary_from_softmax(smooth_probs(3, 30, 40, seed=5))))
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=20, srgb=13, rgbim=img, compat=np.array([-4.0, -5.0, -6.0], np.float32))
    d.addPairwiseEnergy(np.ones((2, 1200), np.float32), compat=0)  # switched off: never filtered
    rrm_cuda.clear_lattice_cache()
    Q, tmp1, tmp2 = d.startInference()
    for _ in range(4):
        d.klDivergence(Q)
        d.stepInference(Q, tmp1, tmp2)
    info = rrm_cuda.lattice_cache_info()
    # two builds; per term: the normaliser's filter and 4 steps' reuse the lattice
    assert info["misses"] == 2 and info["entries"] == 2 and info["hits"] == 8
    # the CRF's copy of its bilateral features leaves the cache with it; the shared positions stay
    q4 = d.inference(4)
    del d
    gc.collect()
    assert rrm_cuda.lattice_cache_info()["entries"] == 1
    np.testing.assert_allclose(Q, q4, rtol=0, atol=1e-5)


@needs_pydensecrf
def test_unary_objects_match_pydensecrf():
    # setUnary(ConstUnary(u)), setUnary(LogisticUnary(L, f)) (energies L f: the first Q is
    # softmax(-L f)) and setUnaryEnergy(L, f) (pydensecrf accepts only K = N there) against pydensecrf2
    H, W, L, K = 24, 30, 3, 4
    img = photo("chelsea", (H, W))
    rng = np.random.default_rng(7)
    u = np.ascontiguousarray(putils.unary_from_softmax(smooth_probs(L, H, W, seed=6)))
    Lw = rng.normal(size=(L, K)).astype(np.float32)
    f = rng.normal(size=(K, H * W)).astype(np.float32)
    Ls, fs = rng.normal(size=(L, 12)).astype(np.float32), rng.normal(size=(12, 12)).astype(np.float32)

    def run(mod, how, w, h):
        d = mod.DenseCRF2D(w, h, L)
        how(mod, d)
        d.addPairwiseGaussian(sxy=3, compat=3)
        if w == W:
            d.addPairwiseBilateral(sxy=20, srgb=13, rgbim=img, compat=5)
        return np.array(d.inference(0)), np.array(d.inference(5))

    cases = [
        (lambda mod, d: d.setUnary(mod.ConstUnary(u)), W, H),
        (lambda mod, d: d.setUnary(mod.LogisticUnary(Lw, f)), W, H),
        (lambda mod, d: d.setUnaryEnergy(Ls, f=fs), 4, 3),  # K = N = 12
    ]
    for k, (how, w, h) in enumerate(cases):
        (q0p, q5p), (q0r, q5r) = run(pdcrf, how, w, h), run(rdcrf, how, w, h)
        np.testing.assert_allclose(q0r, q0p, rtol=0, atol=1e-6, err_msg=str(k))
        np.testing.assert_allclose(q5r, q5p, rtol=0, atol=1e-4, err_msg=str(k))
    q0 = torch.softmax(torch.from_numpy(-(Lw @ f)), 0).numpy()
    np.testing.assert_allclose(run(rdcrf, cases[1][0], W, H)[0], q0, rtol=0, atol=1e-6)
    # K other than N too (a superset of pydensecrf's), and one unary object on two CRFs
    lu = rdcrf.LogisticUnary(Lw, f)
    for _ in range(2):
        d = rdcrf.DenseCRF2D(W, H, L)
        d.setUnaryEnergy(Lw, f)
        a = np.array(d.inference(0))
        d.setUnary(lu)
        np.testing.assert_array_equal(np.array(d.inference(0)), a)


def test_unary_objects_bad_inputs():
    d = rdcrf.DenseCRF(6, 2)
    with pytest.raises(TypeError, match="Unary is abstract"):
        rdcrf.Unary()
    with pytest.raises(TypeError, match="u must be float32"):
        rdcrf.ConstUnary(np.zeros((2, 6)))
    with pytest.raises(ValueError, match=r"u must be a 2-D array; got shape \(12,\)"):
        rdcrf.ConstUnary(np.zeros(12, np.float32))
    with pytest.raises(ValueError, match="f contains NaN or Inf"):
        rdcrf.LogisticUnary(np.zeros((2, 3), np.float32), np.full((3, 6), np.nan, np.float32))
    with pytest.raises(ValueError, match=r"L \(M, K\) and f \(K, N\) must agree in K; got L \(2, 3\) and f \(4, 6\)"):
        rdcrf.LogisticUnary(np.zeros((2, 3), np.float32), np.zeros((4, 6), np.float32))
    with pytest.raises(TypeError, match="u must be a ConstUnary or a LogisticUnary; got ndarray"):
        d.setUnary(np.zeros((2, 6), np.float32))
    with pytest.raises(ValueError, match=r"energies must have shape \(M, N\) = \(2, 6\); got \(2, 5\)"):
        d.setUnary(rdcrf.ConstUnary(np.zeros((2, 5), np.float32)))
    big = np.full((2, 3), 3e38, np.float32)
    with pytest.raises(ValueError, match=r"the energies L @ f overflow float32"), np.errstate(over="ignore"):
        d.setUnary(rdcrf.LogisticUnary(big, np.ones((3, 6), np.float32)))
    with pytest.raises(TypeError, match="u must be float32"):  # setUnaryEnergy's own names
        d.setUnaryEnergy(np.zeros((2, 3)), f=np.zeros((3, 6), np.float32))
    with pytest.raises(ValueError, match=r"u \(M, K\) and f \(K, N\) must agree in K"):
        d.setUnaryEnergy(u=np.zeros((2, 3), np.float32), f=np.zeros((4, 6), np.float32))
    assert d._unary is None  # nothing was set by the failed calls


def test_step_inference_bad_inputs():
    d = rdcrf.DenseCRF2D(8, 6, 3)
    d.setUnaryEnergy(np.zeros((3, 48), np.float32))
    d.addPairwiseGaussian(sxy=3, compat=3)
    Q, tmp1, tmp2 = d.startInference()
    np.testing.assert_allclose(Q, 1 / 3)
    with pytest.raises(TypeError, match="Q must be the float32 array startInference returned; got list"):
        d.stepInference(Q.tolist(), tmp1, tmp2)
    with pytest.raises(ValueError, match=r"Q must be a writable float32 array of shape \(M, N\) = \(3, 48\); got f"):
        d.stepInference(Q.astype(np.float64), tmp1, tmp2)
    with pytest.raises(ValueError, match=r"Q must be .*; got float32 \(3, 40\)"):
        d.stepInference(Q[:, :40].copy(), tmp1, tmp2)
    ro = Q.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        d.stepInference(ro, tmp1, tmp2)
    bad = Q.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="Q contains NaN or Inf"):
        d.stepInference(bad, tmp1, tmp2)
    with pytest.raises(ValueError, match="Q contains NaN or Inf"):
        d.klDivergence(bad)
    with pytest.raises(ValueError, match=r"Q must have shape \(M, N\) = \(3, 48\)"):
        d.klDivergence(Q[:2])
    np.testing.assert_allclose(Q, 1 / 3)  # nothing was written by the failed calls
    d.stepInference(Q, tmp1, tmp2)
    # a new unary is used by the next step (the shim keeps a device copy of the old one)
    u = np.random.default_rng(0).uniform(0, 3, (3, 48)).astype(np.float32)
    d.setUnaryEnergy(u)
    Q, tmp1, tmp2 = d.startInference()
    d.stepInference(Q, tmp1, tmp2)
    np.testing.assert_allclose(Q, d.inference(1), rtol=0, atol=1e-6)


@pytest.mark.cuda
def test_step_inference_on_cuda_equals_cpu(cuda):
    img = photo("chelsea", (60, 80))
    probs = smooth_probs(4, 60, 80, seed=3)
    out = []
    for dev in ("cpu", cuda):
        d = rdcrf.DenseCRF2D(80, 60, 4, device=dev)
        d.setUnaryEnergy(np.ascontiguousarray(rutils.unary_from_softmax(probs)))
        d.addPairwiseGaussian(sxy=3, compat=3)
        d.addPairwiseBilateral(sxy=60, srgb=13, rgbim=img, compat=5)
        Q, tmp1, tmp2 = d.startInference()
        kl = d.klDivergence(Q)
        for _ in range(3):
            d.stepInference(Q, tmp1, tmp2)
        out.append((kl, Q))
    assert out[1][0] == pytest.approx(out[0][0], rel=1e-5)
    np.testing.assert_allclose(out[1][1], out[0][1], rtol=0, atol=1e-5)


def test_gaussian_term_uses_the_lattice_cache(lattice_cache):
    # addPairwiseGaussian with one sxy takes rrm_cuda's cached position features (the same float32
    # divisions as pydensecrf's), whose lattice the op keeps: images of a size share it across CRFs
    import rrm_cuda

    L, H, W = 3, 40, 50
    img = photo("chelsea", (H, W))
    unary = np.ascontiguousarray(rutils.unary_from_softmax(smooth_probs(L, H, W, seed=4)))
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    pos = np.stack([xx.reshape(-1) / np.float32(3), yy.reshape(-1) / np.float32(3)])

    def run(numpy_positions):
        d = rdcrf.DenseCRF2D(W, H, L)
        d.setUnaryEnergy(unary)
        if numpy_positions:
            d.addPairwiseEnergy(pos, compat=3)
        else:
            d.addPairwiseGaussian(sxy=3, compat=3)
        d.addPairwiseBilateral(sxy=20, srgb=13, rgbim=img, compat=5)
        return np.array(d.inference(5))

    ref = run(True)
    for _ in range(2):
        np.testing.assert_array_equal(run(False), ref)
    assert rrm_cuda.lattice_cache_info()["hits"] == 1


@needs_pydensecrf
def test_densecrf_generic_features_and_utils():
    rng = np.random.default_rng(1)
    L, H, W = 3, 20, 24
    labels = rng.integers(0, L + 1, (H, W))
    img = photo("coffee", (H, W))
    for utils in (putils, rutils):
        np.testing.assert_allclose(
            utils.unary_from_labels(labels, L, 0.7), putils.unary_from_labels(labels, L, 0.7), rtol=1e-6
        )
        np.testing.assert_allclose(
            utils.create_pairwise_bilateral((5, 5), (10, 10, 10), img, chdim=2),
            putils.create_pairwise_bilateral((5, 5), (10, 10, 10), img, chdim=2),
        )
        np.testing.assert_allclose(
            utils.create_pairwise_gaussian((2, 3), (H, W)), putils.create_pairwise_gaussian((2, 3), (H, W))
        )
        np.testing.assert_allclose(
            utils.unary_from_softmax(smooth_probs(L, H, W), scale=0.8),
            putils.unary_from_softmax(smooth_probs(L, H, W), scale=0.8),
            rtol=1e-6,
        )
    outs = []
    for mod, utils in ((pdcrf, putils), (rdcrf, rutils)):
        d = mod.DenseCRF(H * W, L)
        d.setUnaryEnergy(utils.unary_from_labels(labels, L, 0.7))
        d.addPairwiseEnergy(utils.create_pairwise_gaussian((3, 3), (H, W)), compat=3)
        d.addPairwiseEnergy(utils.create_pairwise_bilateral((20, 20), (13, 13, 13), img, chdim=2), compat=10)
        outs.append(np.array(d.inference(5)))
    assert np.abs(outs[0] - outs[1]).max() < 1e-3


def test_alias_makes_pydensecrf_imports_resolve_to_the_shim(monkeypatch):
    import rrm_cuda.compat as compat

    for name in ("pydensecrf", "pydensecrf.densecrf", "pydensecrf.utils"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    compat.install_pydensecrf_alias()
    import pydensecrf.densecrf as dcrf

    assert dcrf is rdcrf


def test_bad_inputs():
    d = rdcrf.DenseCRF2D(8, 6, 3)
    with pytest.raises(TypeError, match="u must be float32"):
        d.setUnaryEnergy(np.zeros((3, 48)))
    with pytest.raises(ValueError, match=r"u must have shape \(M, N\) = \(3, 48\)"):
        d.setUnaryEnergy(np.zeros((3, 40), np.float32))
    with pytest.raises(ValueError, match="u contains NaN or -inf"):
        d.setUnaryEnergy(np.full((3, 48), np.nan, np.float32))
    with pytest.raises(ValueError, match="u contains NaN or -inf"):
        d.setUnaryEnergy(np.full((3, 48), -np.inf, np.float32))
    with pytest.raises(TypeError, match="rgbim must be a uint8"):
        d.addPairwiseBilateral(sxy=3, srgb=3, rgbim=np.zeros((6, 8, 3)), compat=3)
    with pytest.raises(ValueError, match=r"rgbim must have shape \(H, W, 3\)"):
        d.addPairwiseBilateral(sxy=3, srgb=3, rgbim=np.zeros((8, 6, 3), np.uint8), compat=3)
    with pytest.raises(ValueError, match="sxy must be positive"):
        d.addPairwiseGaussian(sxy=0, compat=3)
    with pytest.raises(ValueError, match="features must have shape"):
        d.addPairwiseEnergy(np.zeros((2, 5), np.float32), compat=3)
    with pytest.raises(ValueError, match="compat must be a number"):
        d.addPairwiseGaussian(sxy=3, compat=np.ones(5))
    with pytest.raises(ValueError, match="nlabels must be >= 1"):
        rdcrf.DenseCRF2D(8, 6, 0)
    # compat, features and integer arguments are checked when given, not at inference
    for bad, exc, match in (
        (None, TypeError, r"compat must be a number, an \(3,\) vector .*; got NoneType"),
        ("a", TypeError, "compat must be a number.*; got str"),
        (float("nan"), ValueError, "compat must be finite"),
        (np.array([1.0, np.inf, 1.0]), ValueError, "compat contains NaN or Inf"),
    ):
        with pytest.raises(exc, match=match):
            d.addPairwiseGaussian(sxy=3, compat=bad)
    with pytest.raises(ValueError, match=r"features must have 1 <= d <= 16"):
        d.addPairwiseEnergy(np.zeros((0, 48), np.float32), compat=3)
    with pytest.raises(ValueError, match=r"features must have 1 <= d <= 16"):
        d.addPairwiseEnergy(np.zeros((17, 48), np.float32), compat=3)
    with pytest.raises(ValueError, match="features: feature values up to 1e[+]20 overflow the lattice's integer keys"):
        d.addPairwiseEnergy(np.full((2, 48), 1e20, np.float32), compat=3)
    with pytest.raises(ValueError, match="features contains NaN"):
        d.addPairwiseEnergy(np.full((2, 48), np.nan, np.float32), compat=3)
    assert d._terms == []  # nothing was added by the failed calls
    d.setUnaryEnergy(np.zeros((3, 48), np.float32))
    for n in ("3", None, float("nan"), [2]):
        with pytest.raises(TypeError, match="n_iterations must be an integer"):
            d.inference(n)
    assert d.inference(np.int64(1)).shape == (3, 48)
    # beyond a C int: OverflowError, as pydensecrf's Cython signatures raise (not hours of iterations)
    for n in (2**31, -(2**31) - 1, 1e10, np.int64(2**40)):
        with pytest.raises(OverflowError, match="n_iterations must fit a C int"):
            d.inference(n)
    np.testing.assert_array_equal(d.inference(-1), d.inference(0))  # n <= 0: the softmax, as there
    with pytest.raises(OverflowError, match="nlabels must fit a C int"):
        rdcrf.DenseCRF(10, 2**32)
    with pytest.raises(TypeError, match="W must be an integer; got str '5'"):
        rdcrf.DenseCRF2D("5", 5, 2)
    with pytest.raises(TypeError, match="nlabels must be an integer; got inf"):
        rdcrf.DenseCRF(10, float("inf"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            rdcrf.DenseCRF2D(8, 6, 3, device="cuda")
    # utils: numpy scalars as sigmas (pydensecrf takes any numbers.Number), positive sigmas, labels
    img = np.zeros((6, 8, 3), np.uint8)
    np.testing.assert_array_equal(
        rutils.create_pairwise_bilateral((3, 3), np.float32(13), img, chdim=2),
        rutils.create_pairwise_bilateral((3, 3), 13.0, img, chdim=2),
    )
    for sdims, schan in (((3, 0), 13), ((3, 3), 0), ((3, 3), (13, 0, 13))):
        with pytest.raises(ValueError, match="sdims and schan must be positive"):
            rutils.create_pairwise_bilateral(sdims, schan, img, chdim=2)
    with pytest.raises(ValueError, match=r"labels must be in 0..n_labels=3 \(0 = unsure\); got range -1..2"):
        rutils.unary_from_labels(np.array([0, -1, 2]), 3, 0.7)


def test_forked_pool_workers_do_not_hang():
    # The drop-in in multiprocessing.Pool workers (fork on Linux) after the parent ran parallel ops:
    # GNU OpenMP would deadlock the child's first parallel region; rrm_cuda's at-fork handler makes
    # the children single-threaded. A hang shows as a timeout here.
    import multiprocessing as mp

    if "fork" not in mp.get_all_start_methods():
        pytest.skip("no fork on this platform")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        want = _fork_job(0)  # the parent's parallel regions (OpenMP's pool is now up)
        with mp.get_context("fork").Pool(2) as pool:
            got = pool.map_async(_fork_job, [0, 0]).get(timeout=60)
    finally:
        torch.set_num_threads(threads)
    for q, n in got:
        assert n == 1
        np.testing.assert_allclose(q, want[0], rtol=0, atol=1e-5)


def _fork_job(seed: int) -> tuple[np.ndarray, int]:
    img = photo("astronaut", (120, 150))
    probs = smooth_probs(4, 120, 150, seed=seed)
    d = rdcrf.DenseCRF2D(150, 120, 4)
    d.setUnaryEnergy(np.ascontiguousarray(rutils.unary_from_softmax(probs)))
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=np.copy(img), compat=10)
    big = torch.rand(512, 512).exp().sum()  # a parallel torch op too
    assert torch.isfinite(big)
    return np.array(d.inference(10)), torch.get_num_threads()


@needs_pydensecrf
def test_forbidden_labels_with_infinite_energies_match_pydensecrf():
    # unary_from_softmax(p, clip=None) (and pydensecrf's deprecated softmax_to_unary) give +inf for
    # p = 0: a label forbidden at that pixel, Q = 0 there. pydensecrf handles it; so does the drop-in.
    img = photo("astronaut", (40, 48))
    H, W = img.shape[:2]
    probs = smooth_probs(3, H, W, seed=3)
    probs[1, :, :20] = 0  # label 1 forbidden in the left part
    probs /= probs.sum(0, keepdims=True)
    with np.errstate(divide="ignore"):
        U = putils.unary_from_softmax(probs, clip=None)
    assert np.isposinf(U).sum() == H * 20
    out = {}
    for name, mod in (("pydensecrf", pdcrf), ("shim", rdcrf)):
        d = mod.DenseCRF2D(W, H, 3)
        d.setUnaryEnergy(U)
        d.addPairwiseGaussian(sxy=3, compat=3)
        d.addPairwiseBilateral(sxy=20, srgb=13, rgbim=img, compat=10)
        q = np.array(d.inference(5))
        Q, t1, t2 = d.startInference()
        for _ in range(2):
            d.stepInference(Q, t1, t2)
        out[name] = q, np.array(Q)
    for k in range(2):
        assert np.isfinite(out["shim"][k]).all()
        np.testing.assert_allclose(out["shim"][k], out["pydensecrf"][k], rtol=0, atol=1e-4)
        assert out["shim"][k].reshape(3, H, W)[1, :, :20].max() < 1e-30
    d = rdcrf.DenseCRF(4, 2)
    blocked = np.zeros((2, 4), np.float32)
    blocked[:, 2] = np.inf
    with pytest.raises(ValueError, match=r"u is \+inf for every label of variable 2 \(and 0 more\)"):
        d.setUnaryEnergy(blocked)
    with pytest.raises(ValueError, match=r"u is \+inf for every label of variable 2"):
        rdcrf.ConstUnary(blocked)


@needs_pydensecrf
def test_pydensecrf_argument_conventions():
    # What pydensecrf accepts, the drop-in accepts: floats for its C-int arguments (truncated, as
    # Cython converts them), a CRF without a unary (zero energies), one label (Q = 1), a negative
    # iteration count (no step), and its exception classes for wrong dtypes and bad scale/gt_prob.
    rng = np.random.default_rng(0)
    U = rng.uniform(0, 3, (3, 20)).astype(np.float32)
    for mod in (pdcrf, rdcrf):
        ref = mod.DenseCRF2D(5, 4, 3)
        ref.setUnaryEnergy(U)
        ref.addPairwiseGaussian(sxy=3, compat=3)
        want = np.array(ref.inference(3))
        d = mod.DenseCRF2D(5.0, np.float64(4.9), np.float32(3))
        d.setUnaryEnergy(U)
        d.addPairwiseGaussian(sxy=3, compat=3)
        np.testing.assert_array_equal(np.array(d.inference(3.9)), want)
        np.testing.assert_array_equal(np.array(d.inference(np.array(3))), want)
        np.testing.assert_allclose(np.array(d.inference(-1)), np.array(d.inference(0)), rtol=0, atol=0)
        blank = mod.DenseCRF2D(5, 4, 3)
        blank.addPairwiseGaussian(sxy=3, compat=3)
        np.testing.assert_allclose(np.array(blank.inference(2)), 1 / 3, rtol=0, atol=1e-6)
        one = mod.DenseCRF2D(5, 4, 1)
        one.setUnaryEnergy(np.zeros((1, 20), np.float32))
        one.addPairwiseGaussian(sxy=3, compat=3)
        np.testing.assert_array_equal(np.array(one.inference(2)), np.ones((1, 20), np.float32))
        with pytest.raises(ValueError):  # pydensecrf: "Buffer dtype mismatch"
            d.setUnaryEnergy(U.astype(np.float64))
    with pytest.raises(TypeError):  # and the drop-in's error is a TypeError too
        rdcrf.DenseCRF2D(5, 4, 3).setUnaryEnergy(U.astype(np.float64))
    for utils in (putils, rutils):
        with pytest.raises(AssertionError):
            utils.unary_from_softmax(np.full((2, 3), 0.5), scale=0)
        with pytest.raises(AssertionError):
            utils.unary_from_labels(np.array([1, 2]), 2, gt_prob=1.5)
    with pytest.raises(ValueError, match=r"scale must be in \(0, 1\]; got 0"):
        rutils.unary_from_softmax(np.full((2, 3), 0.5), scale=0)


@needs_pydensecrf
def test_deprecated_utils_match_pydensecrf():
    rng = np.random.default_rng(1)
    sm = rng.dirichlet(np.ones(4), size=(6, 5)).transpose(2, 0, 1).astype(np.float32)
    sm[2, 0, :3] = 0
    labels = rng.integers(0, 4, (6, 5))
    with np.errstate(divide="ignore"):
        for gt in (1, 0.8):
            np.testing.assert_array_equal(rutils.softmax_to_unary(sm, gt), putils.softmax_to_unary(sm, gt))
        for scale in (None, 0.7, 1.0):  # float64 mixing, bitwise
            for x in (sm, sm.astype(np.float64)):
                np.testing.assert_array_equal(
                    rutils.unary_from_softmax(x, scale, clip=None), putils.unary_from_softmax(x, scale, clip=None)
                )
    np.testing.assert_array_equal(rutils.compute_unary(labels, 3, 0.6), putils.compute_unary(labels, 3, 0.6))
    np.testing.assert_array_equal(rutils.compute_unary(labels, 3), putils.compute_unary(labels, 3))


@needs_pydensecrf
def test_parity_on_tied_features_small_spatial_sigma():
    # Integer-like features (positions / 1, colours / 3, integer feature grids) put many points on
    # simplex faces, where one ulp of the feature scale picks the simplex: with densecrf's rounding
    # of the scale (sqrt(2/3)(d+1) as a float) the drop-in matches pydensecrf2; with the exact double
    # it was off by up to 0.22 in Q at bilateral sxy = 1. (H * W a multiple of 4: pydensecrf's SSE
    # set-up pads other pixel counts with zero features, whose stray vertices are not reproduced.)
    img = photo("astronaut", (40, 48))
    H, W = img.shape[:2]
    rng = np.random.default_rng(0)
    U = rng.uniform(0, 3, (4, H * W)).astype(np.float32)
    grid = rng.integers(-3, 4, (3, H * W)).astype(np.float32)
    for sxy, srgb, feats in ((1, 13, None), (3, 3, None), (1, 1, None), (None, None, grid)):
        out = []
        for mod in (pdcrf, rdcrf):
            d = mod.DenseCRF2D(W, H, 4)
            d.setUnaryEnergy(U)
            if feats is None:
                d.addPairwiseBilateral(sxy=sxy, srgb=srgb, rgbim=img, compat=10)
            else:
                d.addPairwiseEnergy(feats, compat=5)
            out.append(np.array(d.inference(3)))
        np.testing.assert_allclose(out[1], out[0], rtol=0, atol=1e-4, err_msg=f"{sxy} {srgb}")


@needs_pydensecrf
def test_anisotropic_sigmas_match_pydensecrf():
    # per-axis sxy and per-channel srgb: each divides its own coordinate / colour channel
    H, W, L = 40, 56, 4
    img, p = photo("chelsea", (H, W)), smooth_probs(L, H, W, seed=2)
    outs = []
    for mod, ut in ((pdcrf, putils), (rdcrf, rutils)):
        d = mod.DenseCRF2D(W, H, L)
        d.setUnaryEnergy(np.ascontiguousarray(ut.unary_from_softmax(p)))
        d.addPairwiseGaussian(sxy=(2, 7), compat=3)
        d.addPairwiseBilateral(sxy=(30, 50), srgb=(5, 13, 40), rgbim=img, compat=10)
        outs.append(np.array(d.inference(5)))
    assert np.abs(outs[0] - outs[1]).max() < 1e-3


@needs_pydensecrf
def test_unary_from_softmax_default_clip():
    # the default clip (1e-5) binds where scores are exactly 0
    p = smooth_probs(3, 10, 12, seed=3)
    p[1:, :3, :4] = 0.0
    p = (p / p.sum(0, keepdims=True)).astype(np.float32)
    np.testing.assert_allclose(rutils.unary_from_softmax(p), putils.unary_from_softmax(p), rtol=1e-6)
