"""rrm_cuda.dense_crf: mean field against the slow reference, pydensecrf2 on real photographs,
the compatibility and normalisation conventions, and bad input."""

import math

import numpy as np
import pytest
import torch

import rrm_cuda
from rrm_cuda.reference import dense_crf_reference, gaussian_filter_exact
from tests.conftest import OpSpy, photo, smooth_probs

ops = torch.ops.rrm_cuda


def _crf_inputs(B=2, L=4, H=12, W=10, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    unary = torch.rand(B, L, H, W, generator=g, dtype=dtype) * 3
    image = torch.randint(0, 256, (B, 3, H, W), generator=g).to(torch.uint8)
    return unary, image


def _ref_features(B, H, W, image, dtype, gsxy=3.0, bsxy=80.0, bsrgb=13.0):
    pos = rrm_cuda.position_features(B, (H, W), gsxy, dtype=dtype)
    bil = rrm_cuda.bilateral_features(image, bsxy, bsrgb, dtype=dtype)
    return pos, bil


# ---- forward vs reference --------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("normalization", ["symmetric", "after", "before", "none"])
def test_matches_reference(dtype, normalization):
    unary, image = _crf_inputs(dtype=dtype)
    B, L, H, W = unary.shape
    q = rrm_cuda.dense_crf(unary, image, iterations=5, normalization=normalization, bilateral_sxy=5.0)
    pos, bil = _ref_features(B, H, W, image, dtype, bsxy=5.0)
    eye = torch.eye(L, dtype=dtype)
    ref = dense_crf_reference(unary.reshape(B, L, -1), [pos, bil], [-3 * eye, -10 * eye], 5, normalization)
    tol = 2e-4 if dtype == torch.float32 else 1e-10  # float32: 5 iterations amplify rounding
    torch.testing.assert_close(q.reshape(B, L, -1), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("kind", ["vector", "matrix"])
def test_label_compat_matches_reference(kind):
    unary, image = _crf_inputs(L=3)
    B, L, H, W = unary.shape
    if kind == "vector":
        c = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
        cm = torch.diag(c)
    else:
        c = torch.tensor([[0.0, 1.0, 2.0], [0.5, 0.0, 1.0], [3.0, 1.0, -1.0]], dtype=torch.float64)
        cm = 0.5 * (c + c.T)
    q = rrm_cuda.dense_crf(unary, image, iterations=4, gaussian_compat=c, bilateral_compat=None)
    pos, _ = _ref_features(B, H, W, image, torch.float64)
    ref = dense_crf_reference(unary.reshape(B, L, -1), [pos], [cm], 4)
    torch.testing.assert_close(q.reshape(B, L, -1), ref)


def test_extra_pairwise_terms_and_volumes():
    """A 3-D volume with a depth-like extra modality: any spatial rank, any feature dimension."""
    g = torch.Generator().manual_seed(3)
    unary = torch.rand(1, 3, 4, 5, 6, generator=g, dtype=torch.float64)
    depth = torch.rand(1, 1, 4, 5, 6, generator=g, dtype=torch.float64) * 4
    grey = torch.rand(1, 1, 4, 5, 6, generator=g, dtype=torch.float64) * 255
    q = rrm_cuda.dense_crf(unary, grey, iterations=3, bilateral_sxy=4.0, bilateral_srgb=20.0, pairwise=[(depth, 2.0)])
    pos = rrm_cuda.position_features(1, (4, 5, 6), 3.0, dtype=torch.float64)
    bil = rrm_cuda.bilateral_features(grey, 4.0, 20.0, dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64)
    ref = dense_crf_reference(
        unary.reshape(1, 3, -1), [pos, bil, depth.reshape(1, 1, -1)], [-3 * eye, -10 * eye, -2 * eye], 3
    )
    torch.testing.assert_close(q.reshape(1, 3, -1), ref)
    # a compat of None or 0 switches an extra term off, as it does the Gaussian and bilateral ones
    alone = rrm_cuda.dense_crf(unary, grey, iterations=3, bilateral_sxy=4.0, bilateral_srgb=20.0)
    for off in (None, 0, 0.0):
        kw = dict(iterations=3, bilateral_sxy=4.0, bilateral_srgb=20.0, pairwise=[(depth, off)])
        assert torch.equal(rrm_cuda.dense_crf(unary, grey, **kw), alone), off


def test_probs_input_and_per_image_sigma():
    probs = torch.from_numpy(np.stack([smooth_probs(3, 16, 16, seed=s) for s in range(2)]))
    image = torch.randint(0, 256, (2, 3, 16, 16)).to(torch.uint8)
    sig = torch.tensor([40.0, 80.0])
    q = rrm_cuda.dense_crf(probs=probs, image=image, bilateral_sxy=sig)
    for b in range(2):
        qb = rrm_cuda.dense_crf(probs=probs[b : b + 1], image=image[b : b + 1], bilateral_sxy=float(sig[b]))
        torch.testing.assert_close(q[b : b + 1], qb)
    u = rrm_cuda.unary_from_probs(probs)
    torch.testing.assert_close(rrm_cuda.dense_crf(u, image), rrm_cuda.dense_crf(probs=probs, image=image))


@pytest.mark.parametrize("gauss_sxy", [3.0, torch.tensor([3.0, 5.0, 2.0, 4.0])])
def test_shared_lattices(gauss_sxy):
    # unary batch 4 over an image batch 2 (item b uses image b % 2): the same as four separate calls;
    # diagonal compatibilities (the CPU's fused mean field), a full matrix (per-term path), emulated.
    unary, image = _crf_inputs(B=4, L=3, H=11, W=9, seed=7)
    img2 = image[:2]
    sig = torch.tensor([50.0, 70.0, 60.0, 80.0])
    for kw in (dict(), dict(bilateral_compat=torch.rand(3, 3, dtype=torch.float64)), dict(bilateral_srgb=sig)):
        q = rrm_cuda.dense_crf(unary, img2, iterations=4, bilateral_sxy=6.0, gaussian_sxy=gauss_sxy, **kw)
        for b in range(4):
            kb = {k: (v[b : b + 1] if isinstance(v, torch.Tensor) and v.dim() == 1 else v) for k, v in kw.items()}
            gs = gauss_sxy[b : b + 1] if isinstance(gauss_sxy, torch.Tensor) else gauss_sxy
            qb = rrm_cuda.dense_crf(
                unary[b : b + 1], img2[b % 2 : b % 2 + 1], iterations=4, bilateral_sxy=6.0, gaussian_sxy=gs, **kb
            )
            torch.testing.assert_close(q[b : b + 1], qb, rtol=1e-12, atol=1e-12)
    B, L, H, W = unary.shape
    pos, bil = _ref_features(2, H, W, img2, torch.float64, bsxy=6.0)
    args = (unary.reshape(B, L, -1), [pos[:1], bil], -torch.eye(L, dtype=torch.float64).expand(2, L, L), [True] * 2)
    full = (unary.reshape(B, L, -1), [pos[:1].expand(4, -1, -1), bil.repeat(2, 1, 1)], args[2], args[3])
    torch.testing.assert_close(ops._dense_crf_emulated(*args, [0, 0], 3), ops.dense_crf(*full, [0, 0], 3))
    with pytest.raises(ValueError, match=r"features\[1\] must have shape \(B', d, N\)"):
        ops.dense_crf(unary.reshape(B, L, -1), [pos[:1], bil[:1].repeat(3, 1, 1)], args[2], args[3], [0, 0], 3)


@pytest.mark.parametrize("L", [2, 3, 4, 5, 8, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_mean_field_pairs_give_the_same_bits(tuning, L, dtype):
    # The CPU's fused mean field takes images that share every lattice in pairs (knob cpu_crf_pairs,
    # rows of up to 8 labels): the same bits as one at a time. Unary batches of 2, 3 (a pair and a
    # single left over) and 5 per image over two images; a Gaussian term of one lattice for all
    # (scalar sxy) and of one per item (per-item sxy: no pairs); per-label compatibilities, the
    # 'after' normalisation, and 2 threads (the splat buffers' thread spans).
    unary, image = _crf_inputs(B=10, L=L, H=65, W=70, seed=11, dtype=dtype)  # > 4096 pixels: 2 spans
    img2 = image[:2]
    cases = [
        dict(),
        dict(gaussian_sxy=torch.tensor([3.0, 5.0, 2.0, 4.0, 6.0, 3.5], dtype=torch.float64)),
        dict(bilateral_compat=torch.linspace(3.0, 9.0, L, dtype=torch.float64), normalization="after"),
    ]
    threads = torch.get_num_threads()
    try:
        for per_image in (2, 3, 5):
            u = unary[: 2 * per_image]
            for kw in cases:
                if "gaussian_sxy" in kw:
                    if per_image != 3:
                        continue
                    kw = dict(gaussian_sxy=kw["gaussian_sxy"])
                for n_threads in (1, 2):
                    torch.set_num_threads(n_threads)
                    got = {}
                    for pairs in (0, 1):
                        tuning("cpu_crf_pairs", pairs)
                        got[pairs] = rrm_cuda.dense_crf(u, img2, iterations=4, bilateral_sxy=6.0, **kw)
                    assert torch.equal(got[0], got[1]), (per_image, kw, n_threads)
    finally:
        torch.set_num_threads(threads)
    # and one at a time, item by item: item b uses image b % 2
    tuning("cpu_crf_pairs", 1)
    q = rrm_cuda.dense_crf(unary[:6], img2, iterations=4, bilateral_sxy=6.0)
    for b in range(6):
        qb = rrm_cuda.dense_crf(unary[b : b + 1], img2[b % 2 : b % 2 + 1], iterations=4, bilateral_sxy=6.0)
        assert torch.equal(q[b : b + 1], qb), b


def test_cpu_softmax_gives_exact_zeros_below_its_range():
    # A label of energy far above the others (RRM's padding labels: 1e4) gets Q exactly 0 on the
    # CPU, not exp(-86) ~ 4e-38 (its products with lattice weights were denormals, 1.6x the CRF's
    # time), and sends nothing: the other labels are those of the CRF without it, bit for bit.
    unary, image = _crf_inputs(B=2, L=3, H=30, W=40, seed=5, dtype=torch.float32)
    padded = unary.clone()
    padded[:, 2] = 1.0e4
    q3 = rrm_cuda.dense_crf(padded, image, iterations=5)
    q2 = rrm_cuda.dense_crf(unary[:, :2].contiguous(), image, iterations=5)
    assert bool((q3[:, 2] == 0).all())
    assert torch.equal(q3[:, :2], q2)


def test_layouts_and_half():
    unary, image = _crf_inputs(dtype=torch.float32)
    ref = rrm_cuda.dense_crf(unary, image)
    cl = rrm_cuda.dense_crf(
        unary.contiguous(memory_format=torch.channels_last),
        image.contiguous(memory_format=torch.channels_last),
    )
    torch.testing.assert_close(cl, ref)
    nc = rrm_cuda.dense_crf(unary.transpose(2, 3).contiguous().transpose(2, 3), image)
    torch.testing.assert_close(nc, ref)
    h = rrm_cuda.dense_crf(unary.half(), image)
    assert h.dtype == torch.float32
    torch.testing.assert_close(h, rrm_cuda.dense_crf(unary.half().float(), image), rtol=1e-5, atol=1e-5)


def test_op_takes_strided_unary():
    # the op itself (not only the public API) accepts a non-contiguous unary, on every path
    unary, image = _crf_inputs(B=2, L=5)
    B, L, H, W = unary.shape
    pos, bil = _ref_features(B, H, W, image, torch.float64)
    u = unary.reshape(B, L, -1)
    strided = u.transpose(1, 2).contiguous().transpose(1, 2)  # (B, L, N) with the label stride 1
    assert not strided.is_contiguous()
    eye = torch.eye(L, dtype=torch.float64)
    for c, diag in (
        (torch.stack([-3 * eye, -5 * eye]), [True, True]),
        (-torch.rand(2, L, L, dtype=torch.float64), [False] * 2),
    ):
        for op in (ops.dense_crf, ops._dense_crf_emulated):
            args = ([pos, bil], c, diag, [0, 0], 3)
            torch.testing.assert_close(op(strided, *args), op(u, *args), rtol=0, atol=0)


def test_emulated_cuda_launch_matches_cpu():
    unary, image = _crf_inputs(B=2, L=5)
    B, L, H, W = unary.shape
    pos, bil = _ref_features(B, H, W, image, torch.float64)
    c = torch.stack([-3 * torch.eye(L, dtype=torch.float64), torch.rand(L, L, dtype=torch.float64)])
    args = (unary.reshape(B, L, -1), [pos, bil], c, [True, False], [0, 1], 4)
    torch.testing.assert_close(ops._dense_crf_emulated(*args), ops.dense_crf(*args), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("L", [2, 3, 4, 5, 8, 9, 17, 21, 32, 33])
def test_fused_cpu_mean_field_matches_per_term_path(L, dtype):
    # Diagonal compatibilities with L <= 32 take the fused mean fields, rows of 4, 8, 16, 24 or 32
    # lanes: the CPU's (scatter splat, vector rows) and the CUDA one (gather splat, one thread per
    # pixel slicing every term) through the emulated launch; L = 33 takes the per-term path on both.
    unary, image = _crf_inputs(B=2, L=L, H=13, W=11, dtype=dtype, seed=L)
    B, _, H, W = unary.shape
    pos, bil = _ref_features(B, H, W, image, dtype, bsxy=5.0)
    eye = torch.eye(L, dtype=dtype)
    c = torch.stack([-3 * eye, torch.diag(torch.linspace(-4, 1, L, dtype=dtype))])
    for norms in ([0, 0], [1, 1]):
        args = (unary.reshape(B, L, -1), [pos, bil], c, [True, True], norms, 5)
        tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
        torch.testing.assert_close(ops.dense_crf(*args), ops._dense_crf_emulated(*args), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("L", [3, 5, 21, 33])
def test_huge_finite_energies(L, dtype):
    # Finite energies above 1e30 (accepted by the checks): the fused mean fields padded their softmax
    # rows at -1e30, which was then every row's max, and every q came out NaN (a fuzz find, session
    # 31). Rows whose energies differ by 2e30 give one-hot q, equal rows 1/L: the pairwise messages
    # (order 10) vanish beside them in either dtype. L = 33 takes the per-term path (ATen's softmax).
    B, H, W = 2, 7, 6
    _, image = _crf_inputs(B=B, L=L, H=H, W=W, dtype=dtype, seed=3)
    pos, bil = _ref_features(B, H, W, image, dtype, bsxy=5.0)
    N = H * W
    unary = torch.full((B, L, N), 2e30, dtype=dtype)
    unary[:, :, : N // 2] *= torch.arange(1, L + 1, dtype=dtype)[:, None]  # label 0 lowest by 2e30
    want = torch.full((B, L, N), 1.0 / L, dtype=dtype)
    want[:, :, : N // 2] = 0
    want[:, 0, : N // 2] = 1
    eye = torch.eye(L, dtype=dtype)
    c = torch.stack([-3 * eye, -10 * eye])
    for iterations in (0, 3):
        args = (unary, [pos, bil], c, [True, True], [0, 0], iterations)
        for op in (ops.dense_crf, ops._dense_crf_emulated):
            torch.testing.assert_close(op(*args), want, rtol=1e-6, atol=1e-7)
    # through the public call, checks included
    q = rrm_cuda.dense_crf(unary.view(B, L, H, W), image, iterations=2, bilateral_sxy=5.0)
    torch.testing.assert_close(q, want.view(B, L, H, W), rtol=1e-6, atol=1e-7)


def test_unchecked_inputs_read_nothing_and_equal_checked():
    # check_inputs=False: the same result without reading values back; bad values are not refused
    unary, image = _crf_inputs(B=2, L=4, seed=7)
    probs = torch.softmax(-unary, 1)
    depth = torch.rand(2, 1, *unary.shape[2:], dtype=torch.float64) * 4
    for kw in (dict(probs=probs, image=image), dict(unary=unary, image=image.double(), pairwise=[(depth, 2.0)])):
        ref = rrm_cuda.dense_crf(**kw, iterations=3)
        torch.testing.assert_close(rrm_cuda.dense_crf(**kw, iterations=3, check_inputs=False), ref, rtol=0, atol=0)
    bad = probs.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="probs contains NaN"):
        rrm_cuda.dense_crf(probs=bad, image=image)
    assert rrm_cuda.dense_crf(probs=bad, image=image, check_inputs=False).shape == bad.shape
    # features far outside the key range: refused when checked; unchecked, the lattice's guard
    # gives those pixels no weight (no crash)
    huge = torch.full_like(depth, 1e12)
    with pytest.raises(ValueError, match="overflow the lattice's integer keys"):
        rrm_cuda.dense_crf(unary, image, pairwise=[(huge, 1.0)])
    q = rrm_cuda.dense_crf(unary, image, pairwise=[(huge, 1.0)], check_inputs=False)
    assert bool(torch.isfinite(q).all())
    # the shapes are always checked
    with pytest.raises(ValueError, match="image must have shape"):
        rrm_cuda.dense_crf(probs=probs, image=image[:, :, :3], check_inputs=False)


# ---- the lattice cache of constant features ----------------------------------------------------
def test_gaussian_lattice_cached_across_calls(lattice_cache):
    # The Gaussian term's position features are a cached constant: the op keeps their lattice and
    # normaliser, and later calls (forward and backward, CPU and emulated CUDA) reuse them with
    # bit-identical results.
    unary, image = _crf_inputs(B=2, L=5, H=13, W=11, seed=3)
    rrm_cuda.set_lattice_cache_capacity(0)
    fresh = rrm_cuda.dense_crf(unary, image, iterations=4, bilateral_sxy=5.0)
    assert rrm_cuda.lattice_cache_info()["entries"] == 0
    rrm_cuda.set_lattice_cache_capacity(8)
    for _ in range(3):
        torch.testing.assert_close(
            rrm_cuda.dense_crf(unary, image, iterations=4, bilateral_sxy=5.0), fresh, rtol=0, atol=0
        )
    info = rrm_cuda.lattice_cache_info()
    assert info["entries"] == 1 and info["hits"] == 2 and info["bytes"] > 0
    # per-image sigmas make no constant term: nothing new is cached
    rrm_cuda.dense_crf(unary, image, iterations=4, gaussian_sxy=torch.tensor([3.0, 4.0], dtype=torch.float64))
    assert rrm_cuda.lattice_cache_info()["entries"] == 1

    B, L, H, W = unary.shape
    pos, bil = _ref_features(1, H, W, image, torch.float64, bsxy=5.0)
    bil = rrm_cuda.bilateral_features(image, 5.0, 13.0, dtype=torch.float64)
    c = torch.stack([-3 * torch.eye(L, dtype=torch.float64), -torch.rand(L, L, dtype=torch.float64)])
    u = unary.reshape(B, L, -1)
    for diag, norms in (([True, True], [0, 0]), ([True, False], [1, 2]), ([False, True], [3, 0])):
        args = (u, [pos, bil], c, diag, norms, 3)
        for op, bop in (
            (ops.dense_crf, ops.dense_crf_backward),
            (ops._dense_crf_emulated, ops._dense_crf_backward_emulated),
        ):
            ref, gref = op(*args), bop(torch.ones_like(u), *args)
            for _ in range(2):
                torch.testing.assert_close(op(*args, [True, False]), ref, rtol=0, atol=0)
                got = bop(torch.ones_like(u), *args, True, [True, False])
                torch.testing.assert_close(got, gref, rtol=0, atol=0)
    # one entry per (features, executor); normalisers of every mode on each
    assert rrm_cuda.lattice_cache_info()["entries"] == 3
    # autograd through the public API: the backward passes the flags on
    ug = unary.clone().requires_grad_()
    rrm_cuda.dense_crf(ug, image, iterations=3).pow(2).sum().backward()
    rrm_cuda.set_lattice_cache_capacity(0)
    ug0 = unary.clone().requires_grad_()
    rrm_cuda.dense_crf(ug0, image, iterations=3).pow(2).sum().backward()
    torch.testing.assert_close(ug.grad, ug0.grad, rtol=0, atol=0)


@pytest.mark.cuda
def test_cuda_lattice_cache(cuda, lattice_cache):
    # on the GPU: cached == fresh (forward, backward), one entry per CUDA stream
    unary, image = _crf_inputs(B=2, L=5, H=13, W=11, seed=3, dtype=torch.float32)
    u, img = unary.to(cuda), image.to(cuda)
    rrm_cuda.set_lattice_cache_capacity(0)
    fresh = rrm_cuda.dense_crf(u, img, iterations=4, bilateral_sxy=5.0)
    ug0 = u.clone().requires_grad_()
    rrm_cuda.dense_crf(ug0, img, iterations=3).pow(2).sum().backward()
    rrm_cuda.set_lattice_cache_capacity(8)
    for _ in range(3):
        torch.testing.assert_close(rrm_cuda.dense_crf(u, img, iterations=4, bilateral_sxy=5.0), fresh, rtol=0, atol=0)
    assert rrm_cuda.lattice_cache_info()["hits"] == 2
    ug = u.clone().requires_grad_()
    rrm_cuda.dense_crf(ug, img, iterations=3).pow(2).sum().backward()
    torch.testing.assert_close(ug.grad, ug0.grad, rtol=0, atol=0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        q = rrm_cuda.dense_crf(u, img, iterations=4, bilateral_sxy=5.0)
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(q, fresh, rtol=0, atol=0)
    assert rrm_cuda.lattice_cache_info()["entries"] == 2


def test_lattice_cache_sees_in_place_changes_and_limits(lattice_cache):
    unary, image = _crf_inputs(B=1, L=3, H=9, W=8, seed=5)
    B, L, H, W = unary.shape
    u = unary.reshape(B, L, -1)
    feats = rrm_cuda.position_features(1, (H, W), 2.0, dtype=torch.float64)
    c = -3 * torch.eye(L, dtype=torch.float64)[None]
    for op in (ops.dense_crf, ops._dense_crf_emulated):
        first = op(u, [feats], c, [True], [0], 3, [True])
        feats.mul_(1.7)  # a new version of the tensor: its cached lattice is not used
        got = op(u, [feats], c, [True], [0], 3, [True])
        torch.testing.assert_close(got, op(u, [feats.clone()], c, [True], [0], 3), rtol=0, atol=0)
        assert not torch.equal(got, first)
        feats.div_(1.7)
    # a non-contiguous tensor is never kept (contiguous() would copy it every call)
    before = rrm_cuda.lattice_cache_info()["entries"]
    strided = feats.transpose(1, 2).contiguous().transpose(1, 2)
    ops.dense_crf(u, [strided], c, [True], [0], 3, [True])
    assert rrm_cuda.lattice_cache_info()["entries"] == before
    # capacity: least recently used entries go first
    rrm_cuda.clear_lattice_cache()
    rrm_cuda.set_lattice_cache_capacity(2)
    many = [rrm_cuda.position_features(1, (H, W), s, dtype=torch.float64) for s in (1.0, 2.0, 3.0)]
    for f in many:
        ops.dense_crf(u, [f], c, [True], [0], 2, [True])
    assert rrm_cuda.lattice_cache_info()["entries"] == 2
    ops.dense_crf(u, [many[2]], c, [True], [0], 2, [True])
    assert rrm_cuda.lattice_cache_info()["hits"] == 1
    ops.dense_crf(u, [many[0]], c, [True], [0], 2, [True])  # evicted: built again
    assert rrm_cuda.lattice_cache_info()["hits"] == 1
    with pytest.raises(ValueError, match="cache must be empty or have one flag per pairwise term"):
        ops.dense_crf(u, [feats], c, [True], [0], 3, [True, True])
    with pytest.raises(ValueError, match="capacity must be an int >= 0"):
        rrm_cuda.set_lattice_cache_capacity(-1)
    rrm_cuda.set_lattice_cache_capacity(0)
    assert rrm_cuda.lattice_cache_info()["entries"] == 0


def test_lattice_approximates_exact_crf():
    """With d=2 positions only, mean field on the lattice is close to mean field with the exact
    Gaussian (the lattice is ~0.9x the exact kernel; symmetric normalisation removes most of it)."""
    unary, image = _crf_inputs(B=1, L=3, H=14, W=14)
    pos = rrm_cuda.position_features(1, (14, 14), 2.0, dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64)
    lat = dense_crf_reference(unary.reshape(1, 3, -1), [pos], [-3 * eye], 5)
    ex = dense_crf_reference(unary.reshape(1, 3, -1), [pos], [-3 * eye], 5, filter_fn=gaussian_filter_exact)
    assert float((lat - ex).abs().max()) < 0.05
    assert float((lat.argmax(1) == ex.argmax(1)).double().mean()) > 0.97


# ---- tiny hand-computed case -----------------------------------------------------------------
def test_zero_iterations_is_softmax_and_uniform_unary_stays_uniform():
    unary, image = _crf_inputs()
    torch.testing.assert_close(rrm_cuda.dense_crf(unary, image, iterations=0), torch.softmax(-unary, 1))
    flat = torch.zeros(1, 3, 6, 6, dtype=torch.float64)
    q = rrm_cuda.dense_crf(flat, torch.zeros(1, 3, 6, 6), iterations=3)
    torch.testing.assert_close(q, torch.full_like(q, 1 / 3))


def test_potts_sign_is_a_reward():
    """Potts compat w > 0 pulls a pixel towards its neighbours' label."""
    unary = torch.zeros(1, 2, 9, 9, dtype=torch.float64)
    unary[0, 1] = 2.0  # everywhere label 0 is favoured ...
    unary[0, 0, 4, 4], unary[0, 1, 4, 4] = 0.2, 0.0  # ... except weakly at the centre
    q = rrm_cuda.dense_crf(unary, None, iterations=5, bilateral_compat=0, gaussian_compat=5.0)
    assert q[0, 0, 4, 4] > 0.5 > torch.softmax(-unary, 1)[0, 0, 4, 4]


# ---- pydensecrf parity on real photographs ---------------------------------------------------
def _pydensecrf(probs, img, iterations, gauss, bil):
    dcrf = pytest.importorskip("pydensecrf.densecrf")
    from pydensecrf.utils import unary_from_softmax

    L, H, W = probs.shape
    d = dcrf.DenseCRF2D(W, H, L)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    d.addPairwiseGaussian(sxy=gauss[0], compat=gauss[1])
    d.addPairwiseBilateral(sxy=bil[0], srgb=bil[1], rgbim=np.ascontiguousarray(img), compat=bil[2])
    return np.array(d.inference(iterations)).reshape(L, H, W)


PARITY_CASES = [
    # photo, size (H, W), labels, (gauss sxy, compat), (bil sxy, srgb, compat): RRM pseudo-label and
    # inference settings (SPEC §5)
    ("chelsea", (120, 160), 21, (3, 3), (80, 13, 10)),
    ("astronaut", (128, 128), 2, (3, 3), (80, 13, 10)),
    ("coffee", (96, 144), 21, (3, 3), (83, 5, 4)),
    ("rocket", (100, 75), 2, (3, 3), (83, 5, 4)),
]


@pytest.mark.parametrize("name,size,L,gauss,bil", PARITY_CASES)
def test_pydensecrf_parity(name, size, L, gauss, bil):
    img = photo(name, size)
    H, W = size
    probs = smooth_probs(L, H, W, seed=L + H)
    ref = _pydensecrf(probs, img, 10, gauss, bil)
    q = rrm_cuda.dense_crf(
        probs=torch.from_numpy(probs)[None],
        image=torch.from_numpy(img).permute(2, 0, 1)[None],
        gaussian_sxy=gauss[0],
        gaussian_compat=gauss[1],
        bilateral_sxy=bil[0],
        bilateral_srgb=bil[1],
        bilateral_compat=bil[2],
    )[0].numpy()
    assert np.abs(q - ref).max() < 1e-3
    assert (q.argmax(0) == ref.argmax(0)).mean() >= 0.999


@pytest.mark.slow
def test_pydensecrf_parity_full_size_batch():
    """Full-size photos batched together, each compared with its own pydensecrf run."""
    imgs = [photo("astronaut", (375, 500)), photo("coffee", (375, 500))]
    probs = [smooth_probs(21, 375, 500, seed=s) for s in range(2)]
    q = rrm_cuda.dense_crf(
        probs=torch.from_numpy(np.stack(probs)), image=torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2)
    )
    for b in range(2):
        ref = _pydensecrf(probs[b], imgs[b], 10, (3, 3), (80, 13, 10))
        assert np.abs(q[b].numpy() - ref).max() < 1e-3
        assert (q[b].numpy().argmax(0) == ref.argmax(0)).mean() >= 0.999


# ---- float64 gradcheck -----------------------------------------------------------------------
def _grad_inputs(B=2, L=3, H=5, W=6, seed=0):
    """Small float64 op inputs: unary (B, L, N), a Gaussian (d=2) and a bilateral (d=5) term, and
    compat (2, L, L) = [Potts -3 I, a random full matrix]."""
    unary, image = _crf_inputs(B=B, L=L, H=H, W=W, seed=seed)
    pos, bil = _ref_features(B, H, W, image, torch.float64, bsxy=5.0)
    g = torch.Generator().manual_seed(seed + 1)
    c = torch.stack([-3 * torch.eye(L, dtype=torch.float64), torch.rand(L, L, generator=g, dtype=torch.float64) - 0.5])
    return unary.reshape(B, L, -1), [pos, bil], c


# (diagonal flags, normalisation, iterations): diagonal and full terms in both orders (the first
# diagonal term's slice adds -U itself), symmetric and after normalisation (plus before and none).
GRAD_CASES = [
    ([True, False], 0, 3),
    ([False, True], 1, 2),
    ([True, True], 0, 4),
    ([False, False], 1, 3),
    ([True, False], 2, 2),
    ([False, True], 3, 2),
]


@pytest.mark.parametrize("emulated", [False, True])
@pytest.mark.parametrize("diagonal,norm,iterations", GRAD_CASES)
def test_gradcheck(emulated, diagonal, norm, iterations):
    """Gradients w.r.t. the unary and the compatibilities (a diagonal term's off-diagonal entries are
    unused: gradient 0); the features are constants."""
    unary, feats, c = _grad_inputs()
    if norm == 3:  # unnormalised messages are large: a small compat keeps Q away from saturation
        c = c * 0.1
    op = ops._dense_crf_emulated if emulated else ops.dense_crf
    u = unary.clone().requires_grad_()
    cc = c.clone().requires_grad_()
    norms = [norm] * 2
    # Full Jacobians: fast mode (non-negative random projections, atol scaled by their sums) let a
    # 5 % error of the unary gradient through, as Q's rows sum to 1.
    assert torch.autograd.gradcheck(lambda u, cc: op(u, feats, cc, diagonal, norms, iterations), (u, cc))


def test_backward_under_autocast():
    # autocast stays on below a custom op: the backward's (L, L) products (at::mm) would run in
    # bfloat16 and grad_compat lose three digits. The op switches autocast off for its body.
    g = torch.Generator().manual_seed(4)
    unary = torch.rand(1, 5, 9, 11, generator=g) * 3
    image = torch.randint(0, 256, (1, 3, 9, 11), generator=g, dtype=torch.uint8)
    compat = torch.rand(5, 5, generator=g) * 5

    def grads():
        u, c = unary.clone().requires_grad_(), compat.clone().requires_grad_()
        q = rrm_cuda.dense_crf(u, image, bilateral_compat=c, iterations=5)
        return torch.autograd.grad((q * torch.linspace(0, 1, q.numel()).reshape(q.shape)).sum(), (u, c))

    ref = grads()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = grads()
    assert all(torch.equal(a, b) for a, b in zip(out, ref))


@pytest.mark.parametrize("kind", ["potts", "vector", "matrix"])
def test_gradcheck_public_probs_and_tensor_compat(kind):
    """Through rrm_cuda.dense_crf: probs -> unary_from_probs -> CRF, tensor compatibilities through
    their (L, L) matrices (symmetrised); the image gets no gradient."""
    g = torch.Generator().manual_seed(2)
    B, L, H, W = 2, 3, 5, 6
    probs = (torch.rand(B, L, H, W, generator=g, dtype=torch.float64) * 0.9 + 0.05).requires_grad_()
    image = (torch.rand(B, 3, H, W, generator=g, dtype=torch.float64) * 255).requires_grad_()
    if kind == "potts":
        gc, bc = torch.tensor(3.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)
    elif kind == "vector":
        gc, bc = torch.rand(L, generator=g, dtype=torch.float64) - 2, torch.rand(L, generator=g, dtype=torch.float64)
    else:
        gc = torch.rand(L, L, generator=g, dtype=torch.float64) - 2
        bc = torch.rand(L, L, generator=g, dtype=torch.float64)
    gc.requires_grad_()
    bc.requires_grad_()

    def fn(p, gc, bc):
        return rrm_cuda.dense_crf(
            probs=p, image=image, iterations=3, gaussian_compat=gc, bilateral_compat=bc, bilateral_sxy=5.0
        )

    assert torch.autograd.gradcheck(fn, (probs, gc, bc))
    for norm in ("after", "before"):
        q = rrm_cuda.dense_crf(probs=probs, image=image, iterations=2, bilateral_sxy=5.0, normalization=norm)
        q.pow(2).sum().backward()
    assert probs.grad is not None and image.grad is None
    q = rrm_cuda.dense_crf(probs=probs.detach(), image=image, iterations=2)
    assert not q.requires_grad  # features (image) are constants


@pytest.mark.parametrize("emulated", [False, True])
def test_op_refuses_feature_gradient(emulated):
    # The public dense_crf passes its features detached (constants, as in pydensecrf: the test
    # above); the op itself, given features that need a gradient, raises in the backward instead of
    # leaving them without one. The unary's gradient alone still works.
    unary, feats, c = _grad_inputs()
    op = ops._dense_crf_emulated if emulated else ops.dense_crf
    u = unary.clone().requires_grad_()
    f0 = feats[0].clone().requires_grad_()
    fs = [f0, *feats[1:]]
    (gu,) = torch.autograd.grad(op(u, fs, c, [False, False], [1, 1], 2).sum(), u)
    (ref,) = torch.autograd.grad(op(u, feats, c, [False, False], [1, 1], 2).sum(), u)
    assert torch.equal(gu, ref)
    with pytest.raises(RuntimeError, match=r"dense_crf: no gradient w\.r\.t\. the pairwise features"):
        op(u, fs, c, [False, False], [1, 1], 2).sum().backward()


def test_grad_unary_input_and_module_parameter():
    """unary= gets its gradient; an nn.Parameter compatibility of the module is learnable."""
    unary, image = _crf_inputs(B=1, L=3, H=6, W=5)
    u = unary.clone().requires_grad_()
    m = rrm_cuda.DenseCRF(iterations=3, bilateral_sxy=5.0)
    m.gaussian_compat = torch.nn.Parameter(torch.full((3,), -3.0, dtype=torch.float64))
    assert [n for n, _ in m.named_parameters()] == ["gaussian_compat"]
    m(u, image).pow(2).sum().backward()
    assert u.grad is not None and float(u.grad.abs().sum()) > 0
    assert m.gaussian_compat.grad is not None and float(m.gaussian_compat.grad.abs().sum()) > 0


# ---- gradient vs reference -------------------------------------------------------------------
@pytest.mark.parametrize("diagonal,norm,iterations", GRAD_CASES)
def test_grad_matches_reference(diagonal, norm, iterations):
    """The op's backward equals autograd through the pure-PyTorch mean field (dense_crf_reference)."""
    unary, feats, c = _grad_inputs(B=2, L=4, H=7, W=6, seed=3)
    names = ["symmetric", "after", "before", "none"]
    if norm == 3:
        c = c * 0.1
    gq = torch.randn(unary.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    u, cc = unary.clone().requires_grad_(), c.clone().requires_grad_()
    q = ops.dense_crf(u, feats, cc, diagonal, [norm] * 2, iterations)
    gu, gc = torch.autograd.grad(q, (u, cc), gq)
    u2, c2 = unary.clone().requires_grad_(), c.clone().requires_grad_()
    cm = [torch.diag(c2[t].diagonal()) if diagonal[t] else c2[t] for t in range(2)]
    ref = dense_crf_reference(u2, feats, cm, iterations, names[norm])
    ru, rc = torch.autograd.grad(ref, (u2, c2), gq)
    torch.testing.assert_close(gu, ru, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(gc, rc, rtol=1e-9, atol=1e-10)
    # the emulated CUDA launch computes the same gradients
    eu, ec = ops._dense_crf_backward_emulated(gq, unary, feats, c, diagonal, [norm] * 2, iterations)
    torch.testing.assert_close(eu, gu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ec, gc, rtol=1e-12, atol=1e-12)


def test_grad_with_shared_lattices():
    """Unaries of batch 4 over features of batch 2 / 1: the same gradients as with repeated features."""
    unary, feats, c = _grad_inputs(B=4, L=3, H=6, W=5, seed=11)
    shared = [feats[0][:1], feats[1][:2]]
    full = [feats[0][:1].expand(4, -1, -1).contiguous(), feats[1][:2].repeat(2, 1, 1)]
    gq = torch.randn(unary.shape, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    for op in (ops.dense_crf_backward, ops._dense_crf_backward_emulated):
        for diag in ([True, True], [True, False]):
            a = op(gq, unary, shared, c, diag, [0, 1], 3)
            b = op(gq, unary, full, c, diag, [0, 1], 3)
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    u = unary.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: ops.dense_crf(x, shared, c, [True, False], [0, 0], 2), (u,))


def test_grad_without_compat_grad_skips_it():
    """compat_grad=False (autograd passes it when the compatibilities need no gradient): the same
    unary gradient, a zero compatibility gradient, on the CPU and the emulated launch."""
    unary, feats, c = _grad_inputs(B=2, L=3, H=6, W=5, seed=13)
    gq = torch.randn(unary.shape, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    for op in (ops.dense_crf_backward, ops._dense_crf_backward_emulated):
        full = op(gq, unary, feats, c, [True, False], [0, 1], 3)
        gu, gc = op(gq, unary, feats, c, [True, False], [0, 1], 3, False)
        torch.testing.assert_close(gu, full[0], rtol=0, atol=0)
        assert not bool(gc.any()) and bool(full[1].any())


def _crf_grad_counted(fn, unary, feats, c, diagonal, norms, iterations, gq, compat_grad=False):
    """One forward of fn (an op of dense_crf's schema) and one backward: (the gradients w.r.t. the
    unary (and compat), the lattices the backward built, the backwards that reran the steps)."""
    from rrm_cuda import _C

    u, cc = unary.clone().requires_grad_(), c.clone().requires_grad_(compat_grad)
    q = fn(u, feats, cc, diagonal, norms, iterations)
    builds, reruns = _C.lattice_builds(), _C.crf_backward_reruns()
    grads = torch.autograd.grad(q, (u, cc) if compat_grad else (u,), gq)
    return grads, _C.lattice_builds() - builds, _C.crf_backward_reruns() - reruns


@pytest.mark.parametrize("op", ["dense_crf", "_dense_crf_emulated"])
@pytest.mark.parametrize("diagonal,norm,iterations", GRAD_CASES[:3])
def test_forward_hands_its_lattices_to_the_backward(op, diagonal, norm, iterations, tuning, lattice_cache):
    """The autograd node keeps the forward's lattices with their normalisers: the backward (which
    reruns the forward's steps) builds none, where with knob lattice_to_backward 0 it builds every
    term's again; the same bits either way. A term the lattice cache keeps (cache flag) is taken from
    the cache by both as before, and a second backward (retain_graph=True) builds again."""
    from rrm_cuda import _C

    unary, feats, c = _grad_inputs(B=2, L=3, H=7, W=6, seed=21)
    gq = torch.randn(unary.shape, generator=torch.Generator().manual_seed(22), dtype=torch.float64)
    fn = getattr(ops, op)

    def fwd_bwd(cache, keep, backwards=1):
        tuning("lattice_to_backward", keep)
        u, cc = unary.clone().requires_grad_(), c.clone().requires_grad_()
        q = fn(u, feats, cc, diagonal, [norm] * 2, iterations, cache)
        counts, grads = [_C.lattice_builds()], []
        for k in range(backwards):
            grads.append(torch.autograd.grad(q, (u, cc), gq, retain_graph=k + 1 < backwards))
            counts.append(_C.lattice_builds())
        return grads, [b - a for a, b in zip(counts, counts[1:])]

    for cache in ([False, False], [True, False]):
        rrm_cuda.clear_lattice_cache()
        fn(unary, feats, c, diagonal, [norm] * 2, iterations, cache)  # the cached term's entry, if any
        kept, kept_builds = fwd_bwd(cache, 1, backwards=2)
        rebuilt, rebuilt_builds = fwd_bwd(cache, 0)
        assert kept_builds == [0, 2 - sum(cache)] and rebuilt_builds == [2 - sum(cache)], cache
        for a, b in zip(kept[0] + kept[1], rebuilt[0] + rebuilt[0]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("op", ["dense_crf", "_dense_crf_emulated"])
@pytest.mark.parametrize("diagonal,norm,iterations", GRAD_CASES[:4])
def test_forward_hands_its_trajectory_to_the_backward(op, diagonal, norm, iterations, tuning):
    """The forward also keeps every step's Q (a saved variable): the backward sweeps back without
    rerunning the steps (the fused mean fields and the per-term loop alike), and gives the rerun's
    gradients up to rounding (the fused forward rounds differently from the rerun's loop); a second
    backward (retain_graph=True) gives the first one's bits (gradcheck's reentrancy); the knobs
    are independent."""
    from rrm_cuda import _C

    unary, feats, c = _grad_inputs(B=2, L=3, H=7, W=6, seed=25)
    gq = torch.randn(unary.shape, generator=torch.Generator().manual_seed(26), dtype=torch.float64)
    fn = getattr(ops, op)

    def fwd_bwd(traj, lattices=1):
        tuning("crf_trajectory_to_backward", traj)
        tuning("lattice_to_backward", lattices)
        u, cc = unary.clone().requires_grad_(), c.clone().requires_grad_()
        q = fn(u, feats, cc, diagonal, [norm] * 2, iterations)
        reruns, builds = _C.crf_backward_reruns(), _C.lattice_builds()
        first = torch.autograd.grad(q, (u, cc), gq, retain_graph=True)
        second = torch.autograd.grad(q, (u, cc), gq)
        return first, second, _C.crf_backward_reruns() - reruns, _C.lattice_builds() - builds

    kept, kept2, reruns, builds = fwd_bwd(1)
    rerun, rerun2, reruns0, _ = fwd_bwd(0)
    assert (reruns, reruns0) == (0, 2) and builds == 2  # the second backward builds its lattices again
    for a, b, a2, b2 in zip(kept, rerun, kept2, rerun2):
        assert torch.equal(a, a2) and torch.equal(b, b2)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    _, _, reruns, builds = fwd_bwd(1, lattices=0)  # trajectory without lattices: both backwards build
    assert (reruns, builds) == (0, 4)


@pytest.mark.parametrize("op", ["dense_crf", "_dense_crf_emulated"])
def test_trajectory_of_unaries_sharing_lattices(op, tuning):
    """Unaries of batch 4 over features of batch 2 and 1 (RRM's two pseudo-label CRFs per image):
    the CPU's fused mean field takes them in pairs (knob cpu_crf_pairs), each image of a pair
    writing its own trajectory; the gradients are the rerun's, paired or not."""
    unary, feats, c = _grad_inputs(B=4, L=3, H=6, W=7, seed=31)
    shared = [feats[0][:1], feats[1][:2]]
    gq = torch.randn(unary.shape, generator=torch.Generator().manual_seed(32), dtype=torch.float64)
    grads = {}
    for pairs in (1, 0):
        tuning("cpu_crf_pairs", pairs)
        for traj in (1, 0):
            tuning("crf_trajectory_to_backward", traj)
            (grads[pairs, traj],), _, reruns = _crf_grad_counted(
                getattr(ops, op), unary, shared, c, [True, True], [0, 1], 3, gq
            )
            assert reruns == 1 - traj
    for key, g in grads.items():
        torch.testing.assert_close(g, grads[0, 0], rtol=1e-12, atol=1e-14, msg=str(key))


@pytest.mark.parametrize("kernel,kept", [(0, True), (1, True), (2, False), (3, False)])
def test_tiled_mean_field_trajectory(kernel, kept, tuning):
    """The tiled GPU mean field (emulated): kernels 0 and 1 leave Q in the padded rows at every step,
    so the trajectory is kept; 2 and 3 keep Q in shared memory, so the backward reruns the steps."""
    unary, feats, c = _grad_inputs(B=2, L=3, H=12, W=11, seed=27)
    gq = torch.randn(unary.shape, generator=torch.Generator().manual_seed(28), dtype=torch.float64)
    tuning("mean_field_tile", 32)
    tuning("mean_field_tile_kernel", kernel)
    grads = {}
    for traj in (1, 0):
        tuning("crf_trajectory_to_backward", traj)
        (grads[traj],), _, reruns = _crf_grad_counted(
            ops._dense_crf_emulated, unary, feats, c, [True, True], [0, 0], 3, gq
        )
        assert reruns == (0 if kept and traj else 1)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-14)


def test_grad_float32_close_to_float64():
    unary, feats, c = _grad_inputs(B=1, L=5, H=12, W=10, seed=5)
    gq = torch.randn(unary.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    g64 = ops.dense_crf_backward(gq, unary, feats, c, [True, False], [0, 0], 5)
    g32 = ops.dense_crf_backward(
        gq.float(), unary.float(), [f.float() for f in feats], c.float(), [True, False], [0, 0], 5
    )
    for a, b in zip(g32, g64):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


def test_zero_iterations_grad_is_softmax_backward():
    unary, feats, c = _grad_inputs()
    gq = torch.randn(unary.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    u = unary.clone().requires_grad_()
    (expected,) = torch.autograd.grad(torch.softmax(-u, 1), u, gq)
    for feats_, c_, diag in ((feats, c, [True, False]), ([], c[:0], [])):  # also without pairwise terms
        for iterations in (0, 3) if not feats_ else (0,):
            gu, gc = ops.dense_crf_backward(gq, unary, feats_, c_, diag, [0] * len(diag), iterations)
            torch.testing.assert_close(gu, expected, rtol=1e-12, atol=1e-14)
            assert gc.shape == c_.shape and not gc.any()


# ---- opcheck ---------------------------------------------------------------------------------
def test_opcheck():
    unary, image = _crf_inputs(B=1, L=3, H=6, W=5)
    B, L, H, W = unary.shape
    pos, bil = _ref_features(B, H, W, image, torch.float64)
    c = torch.stack([-3 * torch.eye(L, dtype=torch.float64), torch.rand(L, L, dtype=torch.float64)])
    u = unary.reshape(B, L, -1)
    for args in [
        (u, [pos, bil], c, [True, False], [0, 1], 3),
        (u, [pos], c[:1], [True], [3], 0),
        # with gradients: the autograd registration is checked too
        (u.clone().requires_grad_(), [pos, bil], c.clone().requires_grad_(), [True, False], [0, 1], 3),
        (u.clone().requires_grad_(), [pos], c[:1].clone(), [False], [1], 2),
    ]:
        torch.library.opcheck(ops.dense_crf, args)
    torch.library.opcheck(
        ops._dense_crf_emulated, (u.clone().requires_grad_(), [pos], c[1:].clone().requires_grad_(), [False], [0], 2)
    )
    torch.library.opcheck(ops.dense_crf_backward, (torch.randn_like(u), u, [pos, bil], c, [True, False], [0, 1], 3))
    # with a cached (constant) term
    torch.library.opcheck(
        ops.dense_crf, (u.clone().requires_grad_(), [pos, bil], c, [True, False], [0, 1], 3, [True, False])
    )


# ---- empty inputs ----------------------------------------------------------------------------
def test_empty():
    q = rrm_cuda.dense_crf(torch.zeros(0, 3, 4, 4), torch.zeros(0, 3, 4, 4))
    assert q.shape == (0, 3, 4, 4)
    q = rrm_cuda.dense_crf(torch.zeros(2, 3, 0, 4), torch.zeros(2, 3, 0, 4))
    assert q.shape == (2, 3, 0, 4)


# ---- bad input -------------------------------------------------------------------------------
def test_bad_inputs():
    unary, image = _crf_inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match="exactly one of unary"):
        rrm_cuda.dense_crf(unary, image, probs=unary)
    with pytest.raises(ValueError, match="unary must have at least 2 labels"):
        rrm_cuda.dense_crf(unary[:, :1], image)
    with pytest.raises(ValueError, match="unary must have shape"):
        rrm_cuda.dense_crf(unary[0, 0], image)
    with pytest.raises(ValueError, match="unary contains NaN"):
        rrm_cuda.dense_crf(unary.clone().fill_(math.nan), image)
    with pytest.raises(ValueError, match="probs must be non-negative"):
        rrm_cuda.dense_crf(probs=-unary, image=image)
    with pytest.raises(TypeError, match="unary must have dtype"):
        rrm_cuda.dense_crf(unary.int(), image)
    with pytest.raises(ValueError, match="image is required"):
        rrm_cuda.dense_crf(unary)
    sm = torch.softmax(unary, 1)
    for clip in (0.0, 2.0, -1e-5, "a", True, [1e-5]):
        with pytest.raises(ValueError, match=r"clip must be a number in \(0, 1\] or None"):
            rrm_cuda.dense_crf(probs=sm, image=image, clip=clip)
    want = rrm_cuda.dense_crf(probs=sm, image=image, clip=1e-5)
    for clip in (np.float32(1e-5), torch.tensor(1e-5)):  # numbers of any kind
        torch.testing.assert_close(rrm_cuda.dense_crf(probs=sm, image=image, clip=clip), want)
    sm0 = sm.clone()
    sm0[:, 1, :3] = 0  # clip=None: no clipping, a score of 0 forbids the label (pydensecrf's clip=None)
    q = rrm_cuda.dense_crf(probs=sm0, image=image, clip=None)
    assert bool(torch.isfinite(q).all()) and float(q[:, 1, :3].max()) < 1e-30
    # the same as +inf energies (pydensecrf's forbidden labels), with a finite gradient equal to that of
    # a large finite energy there; not NaN or -inf, and not +inf for every label of a pixel
    torch.testing.assert_close(rrm_cuda.dense_crf(-sm0.log(), image), q, rtol=0, atol=0)
    u0 = (-sm0.double().log()).requires_grad_()
    w = torch.randn(q.shape, dtype=torch.float64)
    (rrm_cuda.dense_crf(u0, image, iterations=3) * w).sum().backward()
    big = u0.detach().clamp(max=1e3).requires_grad_()
    (rrm_cuda.dense_crf(big, image, iterations=3) * w).sum().backward()
    assert bool(torch.isfinite(u0.grad).all())
    torch.testing.assert_close(u0.grad, big.grad)
    with pytest.raises(ValueError, match="unary contains -inf"):
        rrm_cuda.dense_crf(unary.clone().fill_(-math.inf), image)
    blocked = u0.detach().clone()
    blocked[-1, :, 1, 2] = math.inf
    with pytest.raises(ValueError, match=r"unary leaves no label at item 1, pixel \(1, 2\)"):
        rrm_cuda.dense_crf(blocked, image)
    sm0[-1, :, 1, 2] = 0
    with pytest.raises(ValueError, match=r"probs leaves no label at item 1, pixel \(1, 2\).*clip=None"):
        rrm_cuda.dense_crf(probs=sm0, image=image, clip=None)
    rrm_cuda.dense_crf(probs=sm0, image=image)  # clipped: every label allowed
    # an empty batch or image: an empty result that still backpropagates
    for shape in ((0, 3, 6, 5), (2, 3, 0, 5)):
        u = torch.randn(*shape, requires_grad=True)
        q = rrm_cuda.dense_crf(u, torch.zeros(shape[0], 3, *shape[2:]))
        assert q.shape == shape and q.requires_grad
        q.sum().backward()
        assert u.grad.shape == shape
    # the public feature helpers name their bad arguments
    with pytest.raises(ValueError, match="batch must be >= 0"):
        rrm_cuda.position_features(-1, (3, 4), 2.0)
    with pytest.raises(TypeError, match="batch and spatial must be an int and ints"):
        rrm_cuda.position_features(1, (3.5, 4), 2.0)
    with pytest.raises(TypeError, match="dtype must be torch.float32 or torch.float64; got torch.int64"):
        rrm_cuda.position_features(1, (3, 4), 2.0, dtype=torch.int64)
    assert rrm_cuda.position_features(np.int64(2), torch.Size([3, 4]), 2.0).shape == (2, 2, 12)
    with pytest.raises(ValueError, match=r"image must be a real \(B, c, \*S\) tensor"):
        rrm_cuda.bilateral_features(torch.ones(3, 4), 80.0, 13.0)
    with pytest.raises(TypeError, match="image must be a torch.Tensor; got list"):
        rrm_cuda.bilateral_features([[1.0]], 80.0, 13.0)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():  # plain torch: any device
        assert rrm_cuda.bilateral_features(torch.zeros(1, 3, 4, 5, device="xpu"), 80.0, 13.0).shape == (1, 5, 20)
    with pytest.raises(ValueError, match="image must have shape"):
        rrm_cuda.dense_crf(unary, image[:, :, :5])
    with pytest.raises(ValueError, match="image must have shape"):
        rrm_cuda.dense_crf(unary, torch.cat([image, image, image]))  # batch 3 does not divide 2
    with pytest.raises(ValueError, match="image contains Inf"):
        rrm_cuda.dense_crf(unary, image.float().fill_(math.inf))
    with pytest.raises(ValueError, match="image must have at most 14 channels: .* got 15 channels"):
        rrm_cuda.dense_crf(unary, image[:, :1].expand(-1, 15, -1, -1))
    with pytest.raises(ValueError, match="bilateral_sxy must be positive"):
        rrm_cuda.dense_crf(unary, image, bilateral_sxy=0.0)
    with pytest.raises(ValueError, match="gaussian_sxy must be positive"):
        rrm_cuda.dense_crf(unary, image, gaussian_sxy=-1.0)
    with pytest.raises(ValueError, match="bilateral_srgb must be positive"):
        rrm_cuda.dense_crf(unary, image, bilateral_srgb=math.nan)
    with pytest.raises(ValueError, match=r"bilateral_sxy must be a number or a tensor of shape \(B,\)"):
        rrm_cuda.dense_crf(unary, image, bilateral_sxy=torch.ones(5))
    with pytest.raises(ValueError, match="iterations must be a non-negative int"):
        rrm_cuda.dense_crf(unary, image, iterations=-1)
    with pytest.raises(ValueError, match="normalization must be one of"):
        rrm_cuda.dense_crf(unary, image, normalization="sym")
    with pytest.raises(ValueError, match=r"gaussian_compat as a vector must have shape \(L,\)"):
        rrm_cuda.dense_crf(unary, image, gaussian_compat=torch.ones(7))
    with pytest.raises(ValueError, match=r"bilateral_compat as a matrix must have shape"):
        rrm_cuda.dense_crf(unary, image, bilateral_compat=torch.ones(3, 3))
    with pytest.raises(ValueError, match=r"pairwise\[0\] features must have shape"):
        rrm_cuda.dense_crf(unary, image, pairwise=[(torch.ones(2, 1, 5, 5), 1.0)])
    H, W = unary.shape[2:]
    if H != W:  # the same N pixels arranged as (W, H): refused, not paired with the wrong features
        with pytest.raises(ValueError, match=r"pairwise\[0\] features must have shape"):
            rrm_cuda.dense_crf(unary, image, pairwise=[(torch.ones(2, 1, W, H), 1.0)])
    flat = rrm_cuda.dense_crf(unary, image, pairwise=[(torch.ones(2, 1, H * W), 1.0)])  # flattened: fine
    torch.testing.assert_close(flat, rrm_cuda.dense_crf(unary, image, pairwise=[(torch.ones(2, 1, H, W), 1.0)]))
    with pytest.raises(ValueError, match="overflow the lattice's integer keys"):
        rrm_cuda.dense_crf(unary, image, gaussian_sxy=1e-9)
    with pytest.raises(ValueError, match="compat must have shape"):
        ops.dense_crf(unary.reshape(2, 4, -1), [], torch.zeros(1, 4, 4), [True], [0], 1)
    with pytest.raises(ValueError, match="normalization entries must be"):
        ops.dense_crf(unary.reshape(2, 4, -1), [torch.zeros(2, 2, 120)], torch.zeros(1, 4, 4), [True], [7], 1)
    with pytest.raises(ValueError, match="grad must have the shape of unary"):
        ops.dense_crf_backward(
            unary.reshape(2, 4, -1)[:, :3], unary.reshape(2, 4, -1), [], torch.zeros(0, 4, 4), [], [], 1
        )
    with pytest.raises(TypeError, match="grad"):
        ops.dense_crf_backward(
            unary.reshape(2, 4, -1).double(), unary.reshape(2, 4, -1), [], torch.zeros(0, 4, 4), [], [], 1
        )


def test_inputs_checked_with_one_synchronisation(monkeypatch):
    # every value check of a call (probs, image, features, compatibilities) is read back at once: on a
    # GPU each read-back stalls the host until the queue drains
    from rrm_cuda import _validate as V

    calls = []
    real = V.finite_ranges_later
    monkeypatch.setattr(V, "finite_ranges_later", lambda items, **kw: calls.append(len(items)) or real(items, **kw))
    monkeypatch.setattr(V, "finite_ranges", lambda *a: pytest.fail("finite_ranges called"))
    monkeypatch.setattr(V, "finite_range", lambda *a: pytest.fail("finite_range called"))
    monkeypatch.setattr(V, "check_finite", lambda *a: pytest.fail("check_finite called"))
    unary, image = _crf_inputs(B=2, L=3, H=7, W=6, dtype=torch.float32)
    depth = torch.rand(2, 1, 7, 6)
    q = rrm_cuda.dense_crf(
        probs=torch.softmax(-unary, 1), image=image, bilateral_compat=torch.rand(3, 3), pairwise=[(depth, 2.0)]
    )
    # probs, image, the depth features (CPU compat: checked directly); the position and bilateral
    # features' key ranges are bounded from the sigmas and the image's range, not read
    assert calls == [3] and q.shape == unary.shape


@pytest.mark.parametrize("defer", [False, True])
def test_deferred_score_checks(defer, monkeypatch):
    # On a GPU (here forced on the CPU) the scores' value checks are read after the op is queued when
    # nothing before it needs a value (uint8 image, positions bounded from the sigma): the same
    # errors, raised after the op ran (F._DEFER_CHECKS). A float image's range bounds the lattice
    # keys, so with one the checks are read first, deferral or not.
    from rrm_cuda import functional as F

    monkeypatch.setattr(F, "_DEFER_CHECKS_ON_CPU", True)
    monkeypatch.setattr(F, "_DEFER_CHECKS", defer)
    log = []
    monkeypatch.setattr(F, "ops", OpSpy(F.ops, "dense_crf", log))
    unary, image = _crf_inputs(B=2, L=3, H=7, W=6, dtype=torch.float32)
    probs = torch.softmax(-unary, 1)
    good = rrm_cuda.dense_crf(probs=probs, image=image, iterations=3)
    assert log == ["dense_crf"]
    for bad, match in (
        (probs.masked_fill(probs > 0.5, float("nan")), "probs contains NaN"),
        (probs - 1, "probs must be non-negative"),
    ):
        for img, deferred in ((image, defer), (image.float(), False)):
            log.clear()
            with pytest.raises(ValueError, match=match):
                rrm_cuda.dense_crf(probs=bad, image=img, iterations=3)
            assert log == (["dense_crf"] if deferred else [])
    log.clear()
    for bad, match in (
        (unary.masked_fill(unary > 2, -math.inf), "unary contains -inf"),
        (unary.masked_fill(unary > 2, math.inf), r"unary leaves no label at item \d, pixel"),
    ):
        log.clear()
        with pytest.raises(ValueError, match=match):
            rrm_cuda.dense_crf(bad, image, iterations=3)
        assert log == (["dense_crf"] if defer else [])
    allowed = unary.masked_fill((unary > 2) & (unary < unary.amax(1, keepdim=True)), math.inf)
    assert bool(allowed.isinf().any())
    q = rrm_cuda.dense_crf(allowed, image, iterations=3)  # +inf: forbidden labels, not every label
    assert bool(q.isfinite().all()) and float(q[allowed.isinf()].max()) < 1e-30
    monkeypatch.setattr(F, "_DEFER_CHECKS", not defer)
    assert torch.equal(rrm_cuda.dense_crf(probs=probs, image=image, iterations=3), good)


def _positions_reference(batch, spatial, sxy, dtype):
    grids = torch.meshgrid(*[torch.arange(s, dtype=dtype) for s in spatial], indexing="ij")
    pos = torch.stack([g.reshape(-1) for g in reversed(grids)]).unsqueeze(0).expand(batch, -1, -1)
    return pos / (sxy.to(dtype).reshape(batch, 1, 1) if isinstance(sxy, torch.Tensor) else sxy)


def test_position_features_bit_identical_to_grid_division_and_fresh():
    # positions divide each axis once (cached constants): the same true divisions as the whole grid
    for spatial, sxy, dtype in [
        ((7, 9), 3.0, torch.float32),
        ((321, 321), 80.0, torch.float32),
        ((5, 4, 6), 0.7, torch.float64),
        ((11,), 3.3, torch.float32),
        ((6, 5), torch.tensor([1.5, 80.0, 13.0]), torch.float32),
    ]:
        B = 3
        ref = _positions_reference(B, spatial, sxy, dtype)
        for _ in range(2):  # built, then cached
            pos = rrm_cuda.position_features(B, spatial, sxy, dtype=dtype)
            assert pos.dtype == dtype and pos.is_contiguous() and torch.equal(pos, ref)
            pos.zero_()  # a fresh tensor: the cached one is untouched
        img = torch.randint(0, 256, (B, 3, *spatial), dtype=torch.uint8)
        bil = rrm_cuda.bilateral_features(img, sxy, 13.0, dtype=dtype)
        assert torch.equal(bil, torch.cat([ref, img.flatten(2).to(dtype) / 13.0], 1))


def test_constants_cached_across_calls_and_inference_mode():
    unary, image = _crf_inputs(B=2, L=3, H=7, W=6, dtype=torch.float32)
    rrm_cuda.functional._CONST_CACHE.clear()
    with torch.inference_mode():
        q0 = rrm_cuda.dense_crf(unary, image, iterations=3)
    u = unary.clone().requires_grad_()
    q1 = rrm_cuda.dense_crf(u, image, iterations=3)  # cached constants made under inference mode
    q1.sum().backward()
    assert torch.equal(q0, q1.detach()) and u.grad is not None
    assert torch.equal(q1, rrm_cuda.dense_crf(unary, image, iterations=3, gaussian_compat=torch.tensor(3.0)))


def test_key_range_overflow_bounded_without_reading_features():
    unary, image = _crf_inputs(B=2, L=3, H=7, W=6, dtype=torch.float32)
    for img in (image, image.float(), image.double()):
        with pytest.raises(ValueError, match="bilateral_features: feature values up to .* overflow"):
            rrm_cuda.dense_crf(unary, img, bilateral_srgb=1e-9)
        with pytest.raises(ValueError, match="bilateral_features: feature values up to .* overflow"):
            rrm_cuda.dense_crf(unary, img, bilateral_sxy=1e-9)
    with pytest.raises(ValueError, match="gaussian_features: feature values up to .* overflow"):
        rrm_cuda.dense_crf(unary, image, gaussian_sxy=1e-9)
    with pytest.raises(ValueError, match="overflow"):  # per-image sigmas: the features' range is read
        rrm_cuda.dense_crf(unary, image, bilateral_srgb=torch.tensor([13.0, 1e-9]))
    # a float image's own range bounds its colours (a dark image allows a smaller srgb than 255 would)
    rrm_cuda.dense_crf(unary, image.float() * 0.0 + 1.0, bilateral_srgb=2e-5, iterations=1)
    # float32 features beyond 2^16 (no key overflow yet) lose the weights' precision: refused
    with pytest.raises(ValueError, match=r"bilateral_features: feature values up to 1.27e\+07 exceed 65536"):
        rrm_cuda.dense_crf(unary, image.float() * 0.0 + 255.0, bilateral_srgb=2e-5, iterations=1)
    rrm_cuda.dense_crf(unary.double(), image.double() * 0.0 + 255.0, bilateral_srgb=2e-5, iterations=1)


# ---- module == functional --------------------------------------------------------------------
def test_module_matches_functional():
    unary, image = _crf_inputs(dtype=torch.float32)
    m = rrm_cuda.DenseCRF(iterations=3, bilateral_sxy=50.0, bilateral_srgb=5.0, bilateral_compat=4.0)
    assert "bilateral" in repr(m)
    torch.testing.assert_close(
        m(unary, image),
        rrm_cuda.dense_crf(unary, image, iterations=3, bilateral_sxy=50.0, bilateral_srgb=5.0, bilateral_compat=4.0),
    )


# ---- CPU == CUDA -----------------------------------------------------------------------------
@pytest.mark.cuda
def test_cuda_matches_cpu(cuda):
    img = photo("chelsea", (150, 200))
    probs = torch.from_numpy(np.stack([smooth_probs(21, 150, 200, seed=s) for s in range(3)]))
    image = torch.from_numpy(np.stack([img] * 3)).permute(0, 3, 1, 2)
    q_cpu = rrm_cuda.dense_crf(probs=probs, image=image)
    q_gpu = rrm_cuda.dense_crf(probs=probs.to(cuda), image=image.to(cuda)).cpu()
    torch.testing.assert_close(q_gpu, q_cpu, rtol=1e-4, atol=1e-4)
    assert (q_gpu.argmax(1) == q_cpu.argmax(1)).double().mean() > 0.9999


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("normalization", ["symmetric", "after", "before", "none"])
@pytest.mark.parametrize("compat", ["potts", "diagonal", "matrix"])
def test_cuda_matches_cpu_all_options(cuda, dtype, normalization, compat):
    unary, image = _crf_inputs(B=3, L=5, H=23, W=19, dtype=dtype, seed=4)
    g = torch.Generator().manual_seed(5)
    if compat == "potts":
        gc, bc = 3.0, 10.0
    elif compat == "diagonal":
        gc, bc = torch.rand(5, generator=g, dtype=dtype) * -3, torch.rand(5, generator=g, dtype=dtype) * -8
    else:
        gc, bc = torch.rand(5, 5, generator=g, dtype=dtype) - 2, torch.rand(5, 5, generator=g, dtype=dtype) * 3 - 6
    depth = torch.rand(3, 1, 23, 19, generator=g, dtype=dtype) * 4
    kw = dict(
        iterations=6,
        gaussian_compat=gc,
        bilateral_compat=bc,
        bilateral_sxy=torch.tensor([20.0, 40.0, 80.0]),
        normalization=normalization,
    )
    q_cpu = rrm_cuda.dense_crf(unary, image, pairwise=[(depth, 2.0)], **kw)
    q_gpu = rrm_cuda.dense_crf(unary.to(cuda), image.to(cuda), pairwise=[(depth.to(cuda), 2.0)], **kw)
    assert q_gpu.device.type == cuda.type and q_gpu.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(q_gpu.cpu(), q_cpu, rtol=tol, atol=tol)


@pytest.mark.cuda
def test_cuda_volume_grey_module_and_edge_cases(cuda):
    g = torch.Generator().manual_seed(6)
    unary = torch.rand(2, 3, 5, 9, 8, generator=g) * 3  # a 3-D volume with a grey "image"
    grey = torch.randint(0, 256, (2, 1, 5, 9, 8), generator=g).float()
    q_cpu = rrm_cuda.dense_crf(unary, grey, iterations=4, bilateral_sxy=4.0)
    q_gpu = rrm_cuda.dense_crf(unary.to(cuda), grey.to(cuda), iterations=4, bilateral_sxy=4.0)
    torch.testing.assert_close(q_gpu.cpu(), q_cpu, rtol=1e-4, atol=1e-4)
    m = rrm_cuda.DenseCRF(iterations=3).to(cuda)
    u2, im2 = _crf_inputs(B=2, L=4, H=16, W=16, dtype=torch.float32)
    torch.testing.assert_close(m(u2.to(cuda), im2.to(cuda)).cpu(), m(u2, im2), rtol=1e-4, atol=1e-4)
    # zero iterations, an empty batch, a single pixel
    torch.testing.assert_close(
        rrm_cuda.dense_crf(u2.to(cuda), im2.to(cuda), iterations=0).cpu(), torch.softmax(-u2, 1), rtol=1e-5, atol=1e-6
    )
    assert rrm_cuda.dense_crf(torch.empty(0, 4, 8, 8, device=cuda), torch.empty(0, 3, 8, 8, device=cuda)).shape == (
        0,
        4,
        8,
        8,
    )
    one = rrm_cuda.dense_crf(u2[:, :, :1, :1].to(cuda), im2[:, :, :1, :1].to(cuda)).cpu()
    torch.testing.assert_close(one, rrm_cuda.dense_crf(u2[:, :, :1, :1], im2[:, :, :1, :1]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="same device"):
        rrm_cuda.dense_crf(u2.to(cuda), im2)


@pytest.mark.cuda
def test_cuda_full_size_photo_batch_matches_cpu(cuda):
    # RRM's pseudo-label setting on a full-size photo batch: the sizes where the hash table and the
    # grid of every kernel are largest
    imgs = [photo(n, (300, 450)) for n in ("chelsea", "astronaut", "coffee", "rocket")]
    probs = torch.from_numpy(np.stack([smooth_probs(21, 300, 450, seed=s) for s in range(4)]))
    image = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2)
    q_cpu = rrm_cuda.dense_crf(probs=probs, image=image)
    q_gpu = rrm_cuda.dense_crf(probs=probs.to(cuda), image=image.to(cuda))
    torch.testing.assert_close(q_gpu.cpu(), q_cpu, rtol=1e-4, atol=1e-4)
    assert (q_gpu.argmax(1).cpu() == q_cpu.argmax(1)).double().mean() > 0.9999
    # run to run: the GPU result is deterministic (the splat is a gather in a fixed order)
    assert torch.equal(q_gpu, rrm_cuda.dense_crf(probs=probs.to(cuda), image=image.to(cuda)))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("diagonal,norm,iterations", GRAD_CASES[:4])
def test_cuda_grad_matches_cpu(cuda, dtype, diagonal, norm, iterations):
    unary, feats, c = _grad_inputs(B=3, L=5, H=23, W=19, seed=8)
    unary, feats, c = unary.to(dtype), [f.to(dtype) for f in feats], c.to(dtype)
    gq = torch.randn(unary.shape, generator=torch.Generator().manual_seed(9), dtype=dtype)
    grads = []
    for dev in ("cpu", cuda):
        u, cc = unary.to(dev).detach().requires_grad_(), c.to(dev).detach().requires_grad_()
        q = ops.dense_crf(u, [f.to(dev) for f in feats], cc, diagonal, [norm] * 2, iterations)
        grads.append([x.cpu() for x in torch.autograd.grad(q, (u, cc), gq.to(dev))])
    # float32: the CPU forward (fused mean field, polynomial exp) and CUDA's round differently, and
    # iterations amplify it; compared relative to the largest gradient
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    for a, b in zip(grads[1], grads[0]):
        assert float((a - b).abs().max()) <= tol * float(b.abs().max())
    # the public API on a photo, from probs
    img = torch.from_numpy(photo("chelsea", (60, 80))).permute(2, 0, 1)[None]
    probs = torch.from_numpy(smooth_probs(4, 60, 80, seed=1))[None].to(dtype)
    pg = []
    for dev in ("cpu", cuda):
        p = probs.to(dev).detach().requires_grad_()
        rrm_cuda.dense_crf(probs=p, image=img.to(dev), iterations=5).pow(2).sum().backward()
        pg.append(p.grad.cpu())
    assert float((pg[1] - pg[0]).abs().max()) <= tol * 10 * float(pg[0].abs().max())


@pytest.mark.cuda
def test_cuda_forward_hands_its_lattices_and_trajectory_to_the_backward(cuda, tuning):
    """On the GPU: the backward builds no lattice, with the bits of the rebuilding one; and it does
    not rerun the steps, with the rerun's gradients up to rounding."""
    unary, feats, c = _grad_inputs(B=2, L=5, H=23, W=19, seed=23)
    gq = torch.randn(unary.shape, generator=torch.Generator().manual_seed(24), dtype=torch.float64)
    unary, feats, c, gq = unary.to(cuda), [f.to(cuda) for f in feats], c.to(cuda), gq.to(cuda)
    out = []
    for keep in (1, 0):
        tuning("lattice_to_backward", keep)
        grads, builds, _ = _crf_grad_counted(ops.dense_crf, unary, feats, c, [True, False], [0, 0], 3, gq, True)
        out.append((grads, builds))
    assert (out[0][1], out[1][1]) == (0, 2)
    for a, b in zip(out[0][0], out[1][0]):
        assert torch.equal(a, b)
    tuning("lattice_to_backward", 1)
    out = []
    for traj in (1, 0):
        tuning("crf_trajectory_to_backward", traj)
        (grad,), _, reruns = _crf_grad_counted(ops.dense_crf, unary, feats, c, [True, True], [0, 0], 4, gq)
        out.append((grad, reruns))
    assert (out[0][1], out[1][1]) == (0, 1)
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-10, atol=1e-12)


# ---- pixel order: 16 x 16 tiles (the GPU's default) ---------------------------------------------
def test_pixel_tile_order():
    # 16 x 16 tiles, row-major inside each and across them; the whole tiles first (each starts at a
    # multiple of 256: the tiled mean field's blocks of 256 pixels are squares), then the columns
    # right of them and the rows below them, each in raster order; the inverse undoes it; the
    # energy loss's C++ order (tile_position) is the same; images no larger than a tile and 3-D
    # volumes keep the raster order
    import rrm_cuda.functional as F

    H, W = 35, 40  # 2 x 2 whole tiles, 8 columns right of them, 3 rows below
    order, inverse = _tile_order_with(F, (H, W))
    y, x = order // W, order % W
    assert torch.equal(torch.sort(order).values, torch.arange(H * W))
    assert torch.equal(order[inverse], torch.arange(H * W))
    assert torch.equal(order[:17], torch.tensor([*range(16), W]))  # the first tile's first row, then its second
    for k in range(4):  # the whole tiles, row-major
        ty, tx = divmod(k, 2)
        t = slice(256 * k, 256 * (k + 1))
        assert torch.equal(y[t], ty * 16 + torch.arange(16).repeat_interleave(16))
        assert torch.equal(x[t], tx * 16 + torch.arange(16).repeat(16))
    right, below = slice(1024, 1024 + 32 * 8), slice(1024 + 32 * 8, H * W)
    assert (x[right] >= 32).all() and (y[right] < 32).all() and (order[right].diff() > 0).all()
    assert torch.equal(order[below], torch.arange(32 * W, H * W))
    for hw in ((35, 40), (40, 35), (16 * 3, 16 * 5 + 1), (17, 17), (500, 375)):
        img = torch.arange(hw[0] * hw[1], dtype=torch.float64).reshape(1, 1, *hw)
        got = torch.ops.rrm_cuda.dense_energy_inputs(img, None, None, 1, False, 16)[0]
        assert torch.equal(got.flatten().long(), _tile_order_with(F, hw)[0])
    assert _tile_order_with(F, (16, 300)) is None and _tile_order_with(F, (4, 5, 6)) is None


def _tile_order_with(F, spatial):
    saved = F._PIXEL_TILE["cpu"]
    F._PIXEL_TILE["cpu"] = 16
    try:
        return F._pixel_order(spatial, "cpu")
    finally:
        F._PIXEL_TILE["cpu"] = saved


@pytest.mark.parametrize("normalization", ["symmetric", "after"])
def test_pixel_tile_order_gives_the_raster_result(pixel_tile, normalization, lattice_cache):
    # The op's points in tile order: the same CRF, up to the splat lists' summation order (the last
    # bits), forward and backward (unary and a full compatibility matrix); extra pairwise features
    # and a shared image batch go through the same order; repeated calls give the same bits and hit
    # the position lattice kept in tile order.
    img = torch.from_numpy(photo("astronaut", (70, 90))).permute(2, 0, 1)[None]
    img = torch.cat([img, img.flip(3)])
    g = torch.Generator().manual_seed(4)
    u = torch.rand(4, 5, 70, 90, generator=g) * 3
    depth = torch.rand(2, 1, 70, 90, generator=g) * 4
    cmat = (torch.rand(5, 5, generator=g) - 0.5) * 4

    def run():
        ug = u.clone().requires_grad_()
        cg = cmat.clone().requires_grad_()
        q = rrm_cuda.dense_crf(
            ug, img, iterations=4, bilateral_compat=cg, normalization=normalization, pairwise=[(depth, 2.0)]
        )
        gu, gc = torch.autograd.grad((q * torch.linspace(0, 1, q.numel()).view_as(q)).sum(), (ug, cg))
        return q.detach(), gu, gc

    pixel_tile("cpu", 0)
    ref = run()
    pixel_tile("cpu", 16)
    rrm_cuda.clear_lattice_cache()
    got = run()
    hits = rrm_cuda.lattice_cache_info()["hits"]
    again = run()
    assert rrm_cuda.lattice_cache_info()["hits"] > hits  # the tiled positions' lattice was kept
    for a, b, c in zip(got, ref, again):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert torch.equal(a, c)
    assert not torch.equal(got[0], ref[0])  # the order did change the summation (else nothing was tested)
    with torch.inference_mode():  # the gathers without autograd; the cached order made outside it
        q = rrm_cuda.dense_crf(
            u, img, iterations=4, bilateral_compat=cmat, normalization=normalization, pairwise=[(depth, 2.0)]
        )
    assert torch.equal(q, got[0])
    # another tile side in the same process: its own order (the cached tiled positions are keyed by it)
    for tile in (4, 8):
        pixel_tile("cpu", tile)
        for a, b in zip(run(), ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        probs = torch.softmax(u[:2], 1)
        e_tiled = rrm_cuda.dense_energy_loss(img.float(), probs, sigma_xy=5.0)
        pixel_tile("cpu", 0)
        e_raster = rrm_cuda.dense_energy_loss(img.float(), probs, sigma_xy=5.0)
        torch.testing.assert_close(e_tiled, e_raster, rtol=1e-5, atol=1e-6)


def test_pixel_tile_order_compiles(pixel_tile):
    # the tile order's gathers (an autograd.Function) trace whole under torch.compile(fullgraph=True)
    pixel_tile("cpu", 16)
    g = torch.Generator().manual_seed(5)
    probs = torch.softmax(torch.randn(1, 3, 20, 19, generator=g), 1).requires_grad_()
    img = torch.randint(0, 256, (1, 3, 20, 19), generator=g, dtype=torch.uint8)

    def fn(p, i):
        return rrm_cuda.dense_crf(probs=p, image=i, iterations=2)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    a, b = compiled(probs, img), fn(probs, img)
    torch.testing.assert_close(a, b)
    ga = torch.autograd.grad(a.pow(2).sum(), probs)[0]
    gb = torch.autograd.grad(b.pow(2).sum(), probs)[0]
    torch.testing.assert_close(ga, gb)


@pytest.mark.cuda
def test_cuda_pixel_tile_order(cuda, pixel_tile):
    # the GPU's default order (16 x 16 tiles) against its raster order and the CPU's; deterministic
    img = torch.from_numpy(photo("chelsea", (150, 200))).permute(2, 0, 1)[None]
    probs = torch.from_numpy(smooth_probs(21, 150, 200, seed=3))[None]
    q_cpu = rrm_cuda.dense_crf(probs=probs, image=img)
    pixel_tile("cuda", 16)
    q_tile = rrm_cuda.dense_crf(probs=probs.to(cuda), image=img.to(cuda))
    assert torch.equal(q_tile, rrm_cuda.dense_crf(probs=probs.to(cuda), image=img.to(cuda)))
    pixel_tile("cuda", 0)
    q_raster = rrm_cuda.dense_crf(probs=probs.to(cuda), image=img.to(cuda))
    torch.testing.assert_close(q_tile.cpu(), q_cpu, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(q_tile, q_raster, rtol=1e-5, atol=1e-6)


# ---- torch.compile ---------------------------------------------------------------------------
def test_compile_fullgraph():
    unary, image = _crf_inputs(B=1, L=3, H=6, W=5)
    B, L, H, W = unary.shape
    pos, bil = _ref_features(B, H, W, image, torch.float64)
    c = -3 * torch.eye(L, dtype=torch.float64)[None].repeat(2, 1, 1)

    def fn(u, p, b):
        return ops.dense_crf(u * 1.0, [p, b], c, [True, True], [0, 0], 3)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(unary.reshape(B, L, -1), pos, bil), fn(unary.reshape(B, L, -1), pos, bil))


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_public_api(dynamic):
    # The public functions trace whole: while torch.compile traces, their value checks and the memory
    # query (os.sysconf, a host call Dynamo cannot trace) are skipped, and a Potts weight may be a
    # symbolic float (dynamic=True). Two sizes: the second call runs the same or a recompiled graph.
    g = torch.Generator().manual_seed(3)

    def fn(p, i, v, f):
        return rrm_cuda.dense_crf(probs=p, image=i, iterations=2), rrm_cuda.permutohedral_filter(v, f)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    for H, W in ((7, 6), (9, 5)):
        probs = torch.softmax(torch.randn(1, 3, H, W, generator=g), 1)
        img = torch.randint(0, 256, (1, 3, H, W), generator=g, dtype=torch.uint8)
        v, f = torch.randn(1, 2, H, W, generator=g), torch.randn(1, 2, H, W, generator=g)
        for a, b in zip(compiled(probs, img, v, f), fn(probs, img, v, f)):
            torch.testing.assert_close(a, b)


def test_compile_fullgraph_tensor_compat_and_sigmas():
    # Tensor arguments that are read when checked eagerly -- a learnable (L,) compatibility, a 0-dim
    # one, per-image (B,) sigmas -- are not read while torch.compile traces, also on the CPU.
    g = torch.Generator().manual_seed(4)
    probs = torch.softmax(torch.randn(2, 3, 7, 6, generator=g), 1)
    img = torch.randint(0, 256, (2, 3, 7, 6), generator=g, dtype=torch.uint8)
    m = rrm_cuda.DenseCRF(iterations=2)
    m.bilateral_compat = torch.nn.Parameter(torch.full((3,), -10.0))
    m.gaussian_compat = torch.tensor(3.0)
    m.gaussian_sxy, m.bilateral_srgb = torch.tensor([3.0, 4.0]), torch.tensor([13.0, 20.0])
    compiled = torch.compile(lambda p, i: m(probs=p, image=i), fullgraph=True, backend="aot_eager")
    got, want = compiled(probs, img), m(probs=probs, image=img)
    torch.testing.assert_close(got, want)
    (gg,), (gw,) = (
        torch.autograd.grad(got.sum(), m.bilateral_compat),
        torch.autograd.grad(want.sum(), m.bilateral_compat),
    )
    torch.testing.assert_close(gg, gw)
    energy = torch.compile(
        lambda p, i, s: rrm_cuda.dense_energy_loss(i, p, sigma_rgb=s, sigma_xy=40.0),
        fullgraph=True,
        backend="aot_eager",
    )
    sig = torch.tensor([15.0, 20.0])
    torch.testing.assert_close(
        energy(probs, img, sig), rrm_cuda.dense_energy_loss(img, probs, sigma_rgb=sig, sigma_xy=40.0)
    )


def test_compile_fullgraph_backward():
    unary, feats, c = _grad_inputs(B=1, L=3, H=6, W=5)

    def fn(u, cc):
        return ops.dense_crf(u * 1.0, feats, cc, [True, False], [0, 1], 3).pow(2).sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    u, cc = unary.clone().requires_grad_(), c.clone().requires_grad_()
    expected = torch.autograd.grad(fn(u, cc), (u, cc))
    got = torch.autograd.grad(compiled(u, cc), (u, cc))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.cuda
def test_cuda_shared_lattices_match_cpu(cuda):
    # unaries of batch 6 over images of batch 3 (lattices repeated for the per-term CUDA path), a
    # position lattice shared by the whole batch, and a full compatibility matrix
    unary, image = _crf_inputs(B=6, L=3, H=21, W=17, dtype=torch.float32, seed=9)
    img3 = image[:3]
    for kw in (dict(), dict(bilateral_compat=torch.rand(3, 3) * -4), dict(gaussian_sxy=torch.rand(6) * 3 + 1)):
        q_cpu = rrm_cuda.dense_crf(unary, img3, iterations=5, bilateral_sxy=7.0, **kw)
        kw_gpu = {k: v.to(cuda) if isinstance(v, torch.Tensor) and v.dim() == 1 else v for k, v in kw.items()}
        q_gpu = rrm_cuda.dense_crf(unary.to(cuda), img3.to(cuda), iterations=5, bilateral_sxy=7.0, **kw_gpu)
        torch.testing.assert_close(q_gpu.cpu(), q_cpu, rtol=1e-4, atol=1e-4)


def test_concurrent_calls_from_threads():
    # Evaluation scripts run CRF post-processing in thread pools; the ops release the GIL, so calls
    # overlap: the lattice cache (the same position lattice for every call here), the constant
    # caches and the OpenMP teams must give every call the result it gets alone (bitwise: same
    # thread count per call).
    from concurrent.futures import ThreadPoolExecutor

    names = ("astronaut", "coffee", "chelsea", "rocket")

    def job(i: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        im = torch.from_numpy(photo(names[i % 4], (96, 120)).copy()).permute(2, 0, 1)[None].contiguous()
        p = torch.softmax(torch.randn(1, 5, 96, 120, generator=g) * 3, 1)
        q = rrm_cuda.dense_crf(probs=p, image=im, iterations=3)
        pe = torch.softmax(torch.randn(2, 5, 40, 44, generator=g) * 3, 1).requires_grad_()
        ie = torch.rand(2, 3, 40, 44, generator=g) * 255
        loss = rrm_cuda.dense_energy_loss(ie, pe, None, None, sigma_rgb=15.0, sigma_xy=30.0, scale_factor=0.5)
        v, f = torch.randn(1, 4, 1500, generator=g), torch.randn(1, 5, 1500, generator=g) * 3
        return [q, loss.detach(), torch.autograd.grad(loss, pe)[0], rrm_cuda.permutohedral_filter(v, f)]

    alone = [job(i) for i in range(12)]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(job, range(12)))
    for a, b in zip(alone, together):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def _photo_pair(H: int, W: int) -> tuple[torch.Tensor, int]:
    """Two bundled photographs (astronaut, coffee) centre-cropped to H x W: uint8 (2, 3, H, W), and H W."""
    img = torch.from_numpy(np.stack([photo("astronaut", (H, W)), photo("coffee", (H, W))])).permute(0, 3, 1, 2)
    return img, H * W


def _crf_bit_inputs(seed: int, noise_scale: torch.Tensor):
    """The CRF bit tests' inputs, per dtype (float32, float64) and label count (3, 21): (dtype, L, u,
    eye, pos, bil, noise, g) with u (4, L, N) unaries for the photo pair's 40 x 48 features (bilateral
    sxy 20, srgb 13; positions sxy 3), noise (2, 3, N) features scaled by ``noise_scale``, and the
    generator for further draws."""
    g = torch.Generator().manual_seed(seed)
    img, N = _photo_pair(40, 48)
    for dtype in (torch.float32, torch.float64):
        bil = rrm_cuda.bilateral_features(img, 20.0, 13.0).to(dtype)
        pos = rrm_cuda.position_features(1, (40, 48), 3.0).to(dtype)
        noise = (torch.randn(2, 3, N, generator=g) * noise_scale).to(dtype)
        for L in (3, 21):
            u = (torch.rand(4, L, N, generator=g) * 3).to(dtype)
            yield dtype, L, u, torch.eye(L, dtype=dtype), pos, bil, noise, g


def test_counted_lattices_give_the_same_bits(tuning):
    # Knob counted_lattice (and, on a GPU, any CUDA graph capture): the CRF's lattices built without
    # reading their vertex counts back, the fused mean field's stages counted launches over per-image
    # totals of the terms' counts (CountedTermItems), the generic path's filters counted ones. Through
    # the emulated launch, whose counted workspaces are filled with NaN (0 for indices): bitwise the
    # read-back build's Q and gradients, for 3 and 21 labels, lattices shared by several unaries, a
    # cached (read-back) Gaussian lattice beside a counted bilateral one, every normalization, a full
    # compatibility matrix (the generic path) and the backward, with the chunk sums in the splat's
    # launch or in a second one. A mutation that drops one item of each image's totals fails 12 of
    # the 16 cases.
    _C = rrm_cuda._ext._C
    per_image = torch.tensor([0.3, 30.0]).reshape(2, 1, 1)  # the noise's scale per image
    for dtype, L, u, eye, pos, bil, noise, g in _crf_bit_inputs(3, per_image):
        full = torch.rand(L, L, generator=g, dtype=dtype) - 3
        cases = [
            ([pos, bil], torch.stack([-3 * eye, -10 * eye]), [True, True], [0, 0], [True, False], 1),
            ([pos, bil], torch.stack([-3 * eye, -10 * eye]), [True, True], [1, 2], [], 2),
            ([bil, noise], torch.stack([-3 * eye, full]), [True, False], [0, 3], [], 2),
            ([noise], (-5 * eye)[None], [True], [0], [], 1),
        ]
        for feats, compat, diag, norms, cache, counted_terms in cases:
            outs = []
            # read back; counted with the chunk sums in the splat's launch, and in a second launch
            for c, fused in ((0, 1), (1, 1), (1, 0)):
                tuning("counted_lattice", c)
                tuning("splat_fused_reduce", fused)
                before = _C.lattice_counted_builds()
                q = ops._dense_crf_emulated(u, feats, compat, diag, norms, 3, cache)
                grads = ops._dense_crf_backward_emulated(0.1 * torch.ones_like(u), u, feats, compat, diag, norms, 2)
                # forward and backward each build the uncached terms (counted only with the knob)
                assert _C.lattice_counted_builds() - before == (c * counted_terms + c * len(feats))
                outs.append((q, *grads))
            for other in outs[1:]:
                for a, b in zip(outs[0], other):
                    assert torch.equal(a, b), (dtype, L, norms)


def test_counted_knob_keeps_cached_lattices_read_back(tuning):
    # Knob counted_lattice on eager calls: a term whose lattice the op keeps (constant features, the
    # positions) is built with the read of its size on a cache miss and kept, so later calls take it
    # from the cache; only the other terms are counted builds, on every call. The same bits as
    # without the knob. (A capture uses no cache: there every lattice is counted.)
    _C = rrm_cuda._ext._C
    dtype, L, u, eye, pos, bil, noise, g = next(_crf_bit_inputs(4, torch.tensor([1.0, 2.0]).reshape(2, 1, 1)))
    compat = torch.stack([-3 * eye, -10 * eye])
    tuning("counted_lattice", 0)
    want = ops._dense_crf_emulated(u, [pos, bil], compat, [True, True], [0, 0], 3, [True, False])
    rrm_cuda.clear_lattice_cache()
    tuning("counted_lattice", 1)
    for call in range(3):
        before, entries = _C.lattice_counted_builds(), rrm_cuda.lattice_cache_info()["entries"]
        q = ops._dense_crf_emulated(u, [pos, bil], compat, [True, True], [0, 0], 3, [True, False])
        assert _C.lattice_counted_builds() - before == 1, call  # the bilateral term only
        assert rrm_cuda.lattice_cache_info()["entries"] == (entries + 1 if call == 0 else entries), call
        assert torch.equal(q, want), call


def _capture_public_crf_and_replay(img: torch.Tensor) -> int:
    """The public dense_crf (5 labels, 5 iterations) on ``img`` captured in a CUDA graph after an eager
    warm-up on a side stream, replayed twice on new probabilities against eager calls; returns the
    tiled mean-field steps the capture recorded."""
    cuda = img.device
    static = torch.softmax(torch.randn(1, 5, *img.shape[2:], device=cuda) * 3, 1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            rrm_cuda.dense_crf(probs=static, image=img, iterations=5)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    steps = rrm_cuda._ext._C.tiled_mean_field_steps()
    with torch.cuda.graph(graph):
        out = rrm_cuda.dense_crf(probs=static, image=img, iterations=5)
    steps = rrm_cuda._ext._C.tiled_mean_field_steps() - steps
    for _ in range(2):
        fresh = torch.softmax(torch.randn(1, 5, *img.shape[2:], device=cuda) * 3, 1)
        static.copy_(fresh)
        graph.replay()
        torch.testing.assert_close(out, rrm_cuda.dense_crf(probs=fresh, image=img, iterations=5), rtol=1e-5, atol=1e-6)
    return steps


@pytest.mark.cuda
def test_cuda_counted_lattices_and_graph_capture(cuda, tuning):
    # On the device: counted lattices give the read-back build's bits (the fused mean field, 3 and 21
    # labels); and the public dense_crf captured in a CUDA graph (its lattices counted under capture,
    # its value checks skipped), replayed on new probabilities, gives the eager result.
    img = torch.from_numpy(photo("astronaut", (64, 80)).copy()).permute(2, 0, 1)[None].contiguous().to(cuda)
    bil = rrm_cuda.bilateral_features(img, 30.0, 13.0)
    pos = rrm_cuda.position_features(1, (64, 80), 3.0, device=cuda)
    for L in (3, 21):
        u = torch.rand(2, L, 64 * 80, device=cuda) * 3
        compat = torch.stack([-3 * torch.eye(L), -10 * torch.eye(L)]).to(cuda)
        tuning("counted_lattice", 0)
        a = ops.dense_crf(u, [pos, bil], compat, [True, True], [0, 0], 5)
        tuning("counted_lattice", 1)
        assert torch.equal(ops.dense_crf(u, [pos, bil], compat, [True, True], [0, 0], 5), a), L
    tuning("counted_lattice", 0)
    tuning("mean_field_tile", 0)
    assert _capture_public_crf_and_replay(img) == 0  # the untiled mean field


@pytest.mark.cuda
def test_cuda_capture_keeps_no_cached_tensors(cuda, lattice_cache):
    # A capture on the stream the eager calls warmed up (torch.cuda.graph(g, stream=s)): the graph
    # must not use the lattice cache's entries or functional's cached constants, which a later
    # eviction frees under it, nor store tensors made in the capture (unwritten until a replay).
    # Here the caches are emptied and their memory reused by garbage before the replays. Tensor
    # sigmas (B,) and a 0-dim tensor compatibility are not read back during the capture.
    from rrm_cuda import functional as FN

    img = torch.from_numpy(photo("astronaut", (48, 64)).copy()).permute(2, 0, 1)[None].contiguous().to(cuda)
    static = torch.softmax(torch.randn(1, 5, 48, 64, device=cuda) * 3, 1)
    kw = dict(
        iterations=5,
        bilateral_sxy=torch.tensor([30.0], device=cuda),
        bilateral_compat=torch.tensor(7.0, device=cuda),
    )
    pos = rrm_cuda.position_features(1, (48, 64), 3.0, device=cuda).reshape(1, 2, 48, 64)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            rrm_cuda.dense_crf(probs=static, image=img, **kw)
            rrm_cuda.permutohedral_filter(static, pos, cache=True)
    assert rrm_cuda.lattice_cache_info()["entries"] >= 1
    n_const, hits = len(FN._CONST_CACHE), rrm_cuda.lattice_cache_info()["hits"]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=s):
        out = rrm_cuda.dense_crf(probs=static, image=img, **kw)
    assert len(FN._CONST_CACHE) == n_const and rrm_cuda.lattice_cache_info()["hits"] == hits
    torch.cuda.current_stream().wait_stream(s)
    rrm_cuda.clear_lattice_cache()
    FN._CONST_CACHE.clear()
    junk = [torch.full((1 << 20,), float("nan"), device=cuda) for _ in range(64)]  # reuses freed blocks
    for _ in range(2):
        fresh = torch.softmax(torch.randn(1, 5, 48, 64, device=cuda) * 3, 1)
        static.copy_(fresh)
        graph.replay()
        torch.testing.assert_close(out, rrm_cuda.dense_crf(probs=fresh, image=img, **kw), rtol=1e-5, atol=1e-6)
    del junk


def test_emulated_capture_takes_no_cached_lattices(tuning, lattice_cache):
    # Knob emulate_capture: the emulated launch runs a capture's host logic on the CPU. Its lattices
    # are counted ones (a counter), and the lattice cache is neither read nor written (a graph would
    # keep pointers that an eviction frees); the results are bitwise the eager calls'.
    _C = rrm_cuda._ext._C
    unary, image = _crf_inputs(B=2, L=5, H=13, W=11, seed=3)
    B, L, H, W = unary.shape
    pos = rrm_cuda.position_features(1, (H, W), 3.0, dtype=torch.float64)
    bil = rrm_cuda.bilateral_features(image, 5.0, 13.0, dtype=torch.float64)
    u = unary.reshape(B, L, -1)
    eye = torch.eye(L, dtype=torch.float64)
    args = (u, [pos, bil], torch.stack([-3 * eye, -5 * eye]), [True, True], [0, 0], 3)
    g = torch.ones_like(u)
    v = torch.rand(1, 4, H * W, dtype=torch.float64)
    ref = ops._dense_crf_emulated(*args, [True, False])  # eager: the positions' lattice kept
    gref = ops._dense_crf_backward_emulated(g, *args, True, [True, False])
    fref = ops._permutohedral_filter_emulated(v, pos, False, True)
    before = rrm_cuda.lattice_cache_info()
    assert before["entries"] == 1 and before["hits"] == 2
    tuning("emulate_capture", 1)
    builds = _C.lattice_counted_builds()
    assert torch.equal(ops._dense_crf_emulated(*args, [True, False]), ref)
    for a, b in zip(ops._dense_crf_backward_emulated(g, *args, True, [True, False]), gref):
        assert torch.equal(a, b)
    assert torch.equal(ops._permutohedral_filter_emulated(v, pos, False, True), fref)
    assert _C.lattice_counted_builds() - builds == 5  # both terms, forward and backward; the filter
    after = rrm_cuda.lattice_cache_info()
    assert (after["entries"], after["hits"], after["misses"]) == (1, before["hits"], before["misses"])
    tuning("emulate_capture", 0)
    assert torch.equal(ops._permutohedral_filter_emulated(v, pos, False, True), fref)
    assert rrm_cuda.lattice_cache_info()["hits"] == before["hits"] + 1


def test_constants_cache_from_threads(monkeypatch):
    # functional._cached from several threads at once (dense_crf and the energy loss in a thread
    # pool): one eviction at a time, every caller gets its own key's constant
    import sys
    import threading

    from rrm_cuda import functional as FN

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    monkeypatch.setattr(FN, "_CONST_CACHE_SIZE", 4)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(400):
                k = (t * 1000 + i) % 37
                got = FN._cached(("test-threads", k, torch.device("cpu")), lambda: torch.full((1,), float(k)))
                assert float(got) == k
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(old)
    assert not errors, errors[0]
    assert len(FN._CONST_CACHE) <= 4


def test_meta_tensors_give_shapes():
    # meta tensors have shapes, no values: eager calls skip the value checks (as torch.compile's
    # tracing does) and return the fake kernels' shapes, with sigma and compatibility tensors too
    u, img = torch.randn(2, 3, 8, 8, device="meta"), torch.zeros(2, 3, 8, 8, device="meta")
    for kw in ({}, dict(bilateral_compat=torch.eye(3, device="meta"), bilateral_sxy=torch.ones(2, device="meta"))):
        q = rrm_cuda.dense_crf(u, img, **kw)
        assert q.shape == u.shape and q.device.type == "meta"
    assert rrm_cuda.dense_crf(probs=u, image=img, clip=None).shape == u.shape
    v, f = torch.randn(2, 4, 10, device="meta"), torch.randn(2, 3, 10, device="meta")
    assert rrm_cuda.permutohedral_filter(v, f).shape == v.shape
    with pytest.raises(ValueError, match="unary and image must be on the same device"):
        rrm_cuda.dense_crf(torch.randn(2, 3, 8, 8), img)  # device checks still run


def test_no_caching_and_no_reads_while_capturing(monkeypatch, lattice_cache):
    # The Python side of the capture rules, on any machine: while the current stream is captured,
    # functional._cached makes CUDA constants without storing them, and the sigma and compatibility
    # checks read no device values (device tensors stood in for by meta tensors).
    from rrm_cuda import _validate as V
    from rrm_cuda import functional as FN

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    n = len(FN._CONST_CACHE)
    made = FN._cached(("test-capture", torch.device("cuda")), lambda: torch.zeros(3))
    assert torch.equal(made, torch.zeros(3)) and len(FN._CONST_CACHE) == n
    assert not V.checking_values()
    sig = torch.tensor([1.0, -2.0], device="meta")  # not readable: passed on unchecked
    assert V.positive(sig, "bilateral_sxy", 2) is sig
    with pytest.raises(ValueError, match="bilateral_sxy: a 0-dim meta tensor is read as a number, which a CUDA graph"):
        V.positive(torch.tensor(3.0, device="meta"), "bilateral_sxy")
    m, diag = FN._compat_matrix(torch.tensor(4.0, device="meta"), 3, "compat", torch.float32, torch.device("meta"))
    assert diag and m.shape == (3, 3) and m.device.type == "meta"
    # CPU tensors are still read and checked
    with pytest.raises(ValueError, match="bilateral_sxy must be positive and finite"):
        V.positive(torch.tensor([1.0, -2.0]), "bilateral_sxy", 2)


def test_tiled_mean_field_kernels_give_the_same_bits(tuning):
    # Knob mean_field_tile = P (the fused GPU mean field, tiles of P consecutive pixels): the CRF's
    # lattices are built with their splat chunks also cut where a vertex's list crosses a tile, and
    # a step's splat runs one block per tile from the tile's rows of Q in block-shared memory (knob
    # mean_field_tile_kernel 1: copied from q; 2: computed there by the slice, which then never
    # writes q; 3: and the tile's vertex rows staged there for that slice, where they fit). Through
    # the emulated launch (threads of every phase in reverse, shared memory filled with NaN bytes
    # before each block): the four kernels give the same bits for each P, the tiled
    # steps run (a counter), and the regrouped sums stay within rounding of P = 0. P = 4096 needs
    # more shared memory than a block takes at 21 labels: the chunk splat over the cut chunks. A P
    # beyond the image (2^40) is one tile of all its pixels: no cut, the bits of P = 0. The backward
    # builds (or finds cached) the forward's tiled lattices: within rounding of P = 0 too.
    _C = rrm_cuda._ext._C
    for dtype, L, u, eye, pos, bil, noise, _ in _crf_bit_inputs(5, torch.tensor([0.3, 30.0, 3.0]).reshape(1, 3, 1)):
        tol = {"rtol": 0, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 0, "atol": 1e-12}
        N = u.shape[-1]
        cases = [
            ([pos, bil], torch.stack([-3 * eye, -10 * eye]), [0, 0], [True, False]),
            ([pos, bil], torch.stack([-3 * eye, -10 * eye]), [1, 2], []),
            ([noise], (-5 * eye)[None], [3], []),
        ]
        for feats, compat, norms, cache in cases:
            diag = [True] * len(feats)
            tuning("mean_field_tile", 0)
            want = ops._dense_crf_emulated(u, feats, compat, diag, norms, 3, cache)
            grads = ops._dense_crf_backward_emulated(0.1 * torch.ones_like(u), u, feats, compat, diag, norms, 2)
            for P in (1, 7, 64, 256, 4096, 2**40):
                tuning("mean_field_tile", P)
                outs = []
                for kernel in (0, 1, 2, 3):
                    tuning("mean_field_tile_kernel", kernel)
                    before = _C.tiled_mean_field_steps()
                    outs.append(ops._dense_crf_emulated(u, feats, compat, diag, norms, 3, cache))
                    wide = min(P, N) * (4 if L <= 4 else 24) * u.element_size() > 96 * 1024
                    assert _C.tiled_mean_field_steps() - before == (3 if kernel and not wide else 0)
                for o in outs[1:]:
                    assert torch.equal(o, outs[0]), (dtype, L, norms, P)
                torch.testing.assert_close(outs[0], want, **tol)
                back = ops._dense_crf_backward_emulated(0.1 * torch.ones_like(u), u, feats, compat, diag, norms, 2)
                for a, b in zip(back, grads):
                    torch.testing.assert_close(a, b, **tol)
                if P >= N:  # one tile: no cut, the untiled chunks and bits
                    assert torch.equal(outs[0], want), (dtype, L, norms)
                    assert all(torch.equal(a, b) for a, b in zip(back, grads)), (dtype, L, norms)


def test_counted_tiled_mean_field_gives_the_same_bits(tuning):
    # Counted lattices (knob counted_lattice; on a GPU any CUDA graph capture) cut by tiles (knob
    # mean_field_tile): the chunk tables sized by their bound E instead of a count read back, each
    # image's count left in device memory, the unused chunks sorted after every tile. Through the
    # emulated launch (counted workspaces filled with NaN): the read-back tiled build's bits for every
    # kernel, forward and backward, with a cached read-back lattice beside a counted one; the block
    # kernels run (a counter) and the lattices are counted ones (a counter).
    _C = rrm_cuda._ext._C
    for dtype, L, u, eye, pos, bil, noise, _ in _crf_bit_inputs(6, torch.tensor([0.3, 30.0, 3.0]).reshape(1, 3, 1)):
        cases = [
            ([pos, bil], torch.stack([-3 * eye, -10 * eye]), [0, 0], [True, False], 1),
            ([noise], (-5 * eye)[None], [1], [], 1),
        ]
        for feats, compat, norms, cache, counted_terms in cases:
            diag = [True] * len(feats)
            for P in (7, 64):
                tuning("mean_field_tile", P)
                outs = []
                for counted in (0, 1):
                    tuning("counted_lattice", counted)
                    for kernel in (0, 1, 2, 3):
                        tuning("mean_field_tile_kernel", kernel)
                        steps, builds = _C.tiled_mean_field_steps(), _C.lattice_counted_builds()
                        q = ops._dense_crf_emulated(u, feats, compat, diag, norms, 3, cache)
                        assert _C.tiled_mean_field_steps() - steps == (3 if kernel else 0)
                        assert _C.lattice_counted_builds() - builds == counted * counted_terms
                        back = ops._dense_crf_backward_emulated(
                            0.1 * torch.ones_like(u), u, feats, compat, diag, norms, 2
                        )
                        outs.append((q, *back))
                for o in outs[1:]:
                    for a, b in zip(o, outs[0]):
                        assert torch.equal(a, b), (dtype, L, norms, P)


@pytest.mark.cuda
def test_cuda_tiled_mean_field(cuda, tuning):
    # On the device: the tiled mean field's four kernels give the same bits (the block kernels'
    # shared memory and barriers on real thread blocks), those of the emulated launch, and stay
    # within rounding of the untiled mean field; 3 and 21 labels, float32 and float64, a batch of 2.
    img = torch.from_numpy(photo("astronaut", (64, 80)).copy()).permute(2, 0, 1)[None].contiguous()
    for dtype in (torch.float32, torch.float64):
        bil = rrm_cuda.bilateral_features(img, 30.0, 13.0).to(dtype)
        pos = rrm_cuda.position_features(1, (64, 80), 3.0).to(dtype)
        for L in (3, 21):
            u = (torch.rand(2, L, 64 * 80) * 3).to(dtype)
            compat = torch.stack([-3 * torch.eye(L), -10 * torch.eye(L)]).to(dtype)
            args = ([pos.to(cuda), bil.to(cuda)], compat.to(cuda), [True, True], [0, 0], 5)
            tuning("mean_field_tile", 0)
            want = ops.dense_crf(u.to(cuda), *args)
            tuning("mean_field_tile", 256)
            tuning("mean_field_tile_kernel", 2)
            emulated = ops._dense_crf_emulated(u, [pos, bil], compat, [True, True], [0, 0], 5)
            outs = []
            for kernel in (0, 1, 2, 3):
                tuning("mean_field_tile_kernel", kernel)
                outs.append(ops.dense_crf(u.to(cuda), *args))
            for o in outs[1:]:
                assert torch.equal(o, outs[0]), (dtype, L)
            torch.testing.assert_close(outs[0].cpu(), emulated, rtol=0, atol=1e-4 if dtype == torch.float32 else 1e-12)
            torch.testing.assert_close(outs[0], want, rtol=0, atol=1e-4 if dtype == torch.float32 else 1e-12)


@pytest.mark.cuda
def test_cuda_counted_tiled_mean_field_and_graph_capture(cuda, tuning, pixel_tile):
    # On the device: counted lattices cut by tiles give the read-back tiled build's bits (kernels
    # 0-3, 3 and 21 labels); and the public dense_crf with the tiled mean field (P 256 in 16 x 16
    # pixel tiles) captured in a CUDA graph runs the block kernels in the graph (a counter at
    # capture) and replays on new probabilities to the eager tiled result.
    img = torch.from_numpy(photo("astronaut", (64, 80)).copy()).permute(2, 0, 1)[None].contiguous().to(cuda)
    bil = rrm_cuda.bilateral_features(img, 30.0, 13.0)
    pos = rrm_cuda.position_features(1, (64, 80), 3.0, device=cuda)
    tuning("mean_field_tile", 256)
    for L in (3, 21):
        u = torch.rand(2, L, 64 * 80, device=cuda) * 3
        compat = torch.stack([-3 * torch.eye(L), -10 * torch.eye(L)]).to(cuda)
        for kernel in (0, 1, 2, 3):
            tuning("mean_field_tile_kernel", kernel)
            tuning("counted_lattice", 0)
            a = ops.dense_crf(u, [pos, bil], compat, [True, True], [0, 0], 5)
            tuning("counted_lattice", 1)
            assert torch.equal(ops.dense_crf(u, [pos, bil], compat, [True, True], [0, 0], 5), a), (L, kernel)
    tuning("counted_lattice", 0)
    tuning("mean_field_tile_kernel", 3)
    pixel_tile("cuda", 16)
    assert _capture_public_crf_and_replay(img) == 5  # the capture's 5 steps ran the block kernels


@pytest.mark.cuda
def test_cuda_compile_reduce_overhead(cuda):
    # torch.compile(mode="reduce-overhead") captures CUDA graphs; the lattice ops read their vertex
    # count mid-call, so they carry the cudagraph_unsafe tag and the compiled step leaves them out
    # of its graphs (skip or partition) instead of failing the capture
    img = torch.from_numpy(photo("astronaut", (64, 80)).copy()).permute(2, 0, 1)[None].contiguous().to(cuda)
    probs = torch.softmax(torch.randn(1, 4, 64, 80, device=cuda) * 3, 1)

    def step(p: torch.Tensor) -> torch.Tensor:
        q = rrm_cuda.dense_crf(probs=p, image=img, iterations=3, check_inputs=False)
        loss = rrm_cuda.dense_energy_loss(img.float(), q, sigma_rgb=15.0, sigma_xy=30.0, check_inputs=False)
        return q.mean(1) + loss

    want = step(probs)
    fn = torch.compile(step, mode="reduce-overhead")
    for _ in range(3):
        got = fn(probs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_unit_range_float_image_warns():
    # bilateral_srgb is in 0-255 units (pydensecrf's): a torchvision-style [0, 1] float image makes the
    # bilateral kernel nearly colour-blind, silently; the checked call warns (it reads the range anyway)
    import warnings

    img = torch.from_numpy(photo("astronaut", (40, 48)).copy()).permute(2, 0, 1)[None].float()
    probs = torch.softmax(torch.randn(1, 3, 40, 48, generator=torch.Generator().manual_seed(0)), 1)
    with pytest.warns(UserWarning, match=r"a \[0, 1\] image .*pass image \* 255"):
        rrm_cuda.dense_crf(probs=probs, image=img / 255, iterations=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rrm_cuda.dense_crf(probs=probs, image=img, iterations=1)  # 0-255: no warning
        rrm_cuda.dense_crf(probs=probs, image=img.to(torch.uint8), iterations=1)
        rrm_cuda.dense_crf(probs=probs, image=img / 255, iterations=1, bilateral_compat=0)  # no bilateral term


def test_autograd_is_cpp_and_routes_each_gradient():
    # dense_crf's and permutohedral_filter's autograd is C++ (csrc/lattice/lattice_autograd.cpp): the
    # node's gradients are the backward op's, for the unary alone, the compatibilities alone (the
    # input edge after the features) and both; on the CPU and the emulated launch
    unary, feats, c = _grad_inputs(B=2, L=3, H=6, W=5, seed=21)
    gq = torch.randn(unary.shape, generator=torch.Generator().manual_seed(22), dtype=torch.float64)
    pairs = ((ops.dense_crf, ops.dense_crf_backward), (ops._dense_crf_emulated, ops._dense_crf_backward_emulated))
    for op, bwd in pairs:
        want_u, want_c = bwd(gq, unary, feats, c, [True, False], [0, 1], 3)
        for needs in ((True, False), (False, True), (True, True)):
            u = unary.clone().requires_grad_(needs[0])
            cc = c.clone().requires_grad_(needs[1])
            q = op(u, feats, cc, [True, False], [0, 1], 3)
            assert "CrfFunction" in q.grad_fn.name()
            got = torch.autograd.grad(q, [t for t, n in zip((u, cc), needs) if n], gq)
            want = [w for w, n in zip((want_u, want_c), needs) if n]
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    v = torch.randn(1, 2, 30, dtype=torch.float64, requires_grad=True)
    f = torch.rand(1, 3, 30, dtype=torch.float64) * 3
    for op in (ops.permutohedral_filter, ops._permutohedral_filter_emulated):
        out = op(v, f, False)
        assert "FilterFunction" in out.grad_fn.name()
        g = torch.randn(out.shape, dtype=torch.float64)
        (got,) = torch.autograd.grad(out, v, g)
        torch.testing.assert_close(got, op(g, f, True), rtol=0, atol=0)


@pytest.mark.parametrize("case", ["photo", "zero_scores"])
def test_defaults_are_pydensecrfs(case):
    # dense_crf's and nn.DenseCRF's defaults (clip 1e-5, Gaussian 3 / 3, bilateral 80 / 13 / 10, 10
    # iterations) are pydensecrf's usual call; "zero_scores": a patch where label 1 scores exactly 0,
    # where the clip decides the result
    pdcrf = pytest.importorskip("pydensecrf.densecrf")
    putils = pytest.importorskip("pydensecrf.utils")
    H, W, L = (48, 64, 5) if case == "photo" else (32, 32, 3)
    if case == "photo":
        img, p = photo("astronaut", (H, W)), smooth_probs(L, H, W, seed=3)
        p[1:, : H // 3, : W // 3] = 0.0
        p = (p / p.sum(0, keepdims=True)).astype(np.float32)
    else:
        img = np.full((H, W, 3), 128, np.uint8)
        p = np.zeros((L, H, W), np.float32)
        p[1] = 1.0
        p[:, 12:20, 12:20] = 0.0
        p[0, 12:20, 12:20] = 1.0
    d = pdcrf.DenseCRF2D(W, H, L)
    d.setUnaryEnergy(np.ascontiguousarray(putils.unary_from_softmax(p)))
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=img, compat=10)
    ref = np.array(d.inference(10)).reshape(L, H, W)
    tp = torch.from_numpy(p)[None]
    ti = torch.from_numpy(img).permute(2, 0, 1)[None].contiguous()
    for q in (rrm_cuda.dense_crf(probs=tp, image=ti), rrm_cuda.DenseCRF()(probs=tp, image=ti)):
        assert np.abs(q[0].numpy() - ref).max() < 1e-3


def test_emulated_thread_order_does_not_change_results(tuning):
    # The GPU kernels' results must not depend on the order in which a launch's threads run: a
    # thread that reads what another thread of the same launch writes (a fill riding along, a pair
    # of launches run as one, the fused chunk sums' last-chunk rule, a block's phases) would give
    # other bits in another order. The emulated launch visits threads in reverse by default; knob
    # emulate_order runs them in order (1) and in seeded permutations (s >= 2), blocks and each
    # block's threads per phase too. Read-back and counted lattices, the untiled and the tiled mean
    # field (its block kernels), the backward, the filter both ways, the energy loss with both
    # gradients and the BCD loss: bitwise the same in every order. (Vertex numbers follow the
    # hash insert's races and may differ; no result depends on them.)
    from tests.test_bcd import _features, _seg

    _C = rrm_cuda._ext._C
    per_image = torch.tensor([0.3, 30.0]).reshape(2, 1, 1)
    inputs = []
    for dtype, L, u, eye, pos, bil, _noise, g in _crf_bit_inputs(11, per_image):
        if (dtype == torch.float64) == (L == 3):  # float32 at 21 labels, float64 at 3
            gate_mass = torch.rand(2, 2, u.shape[2], generator=g, dtype=dtype)
            inputs.append((u, eye, pos, bil, gate_mass))
    bcd_in = (_seg(2, 5, 6, 7, bg_bias=1.0).reshape(2, 5, -1), _features(2, 8, 6, 7, torch.float32).reshape(2, 8, -1))

    def run() -> list[torch.Tensor]:
        outs = []
        for u, eye, pos, bil, (gate, mass) in inputs:
            compat = torch.stack([-3 * eye, -10 * eye])
            for counted, tile in ((0, 0), (1, 0), (0, 64)):
                tuning("counted_lattice", counted)
                tuning("mean_field_tile", tile)
                rrm_cuda.clear_lattice_cache()
                outs.append(ops._dense_crf_emulated(u, [pos, bil], compat, [True, True], [0, 0], 2, []))
            tuning("counted_lattice", 0)
            tuning("mean_field_tile", 0)
            grad_q = 0.1 * torch.ones_like(u)
            outs += ops._dense_crf_backward_emulated(grad_q, u, [pos, bil], compat, [True, True], [0, 0], 2)
            v = torch.softmax(-u[:2], 1)
            for reverse in (False, True):
                outs.append(ops._permutohedral_filter_emulated(v, bil.expand(2, -1, -1).contiguous(), reverse))
            for mode in (1, 2):
                for m in (None, mass):
                    outs += ops._dense_energy_emulated(v, gate, bil.expand(2, -1, -1).contiguous(), m, mode)
        outs += [t for t in ops._bcd_loss_emulated(*bcd_in) if t.is_floating_point()]
        return outs

    want = run()
    for order in (1, 2, 7):
        tuning("emulate_order", order)
        got = run()
        assert len(got) == len(want)
        for k, (a, b) in enumerate(zip(want, got)):
            assert torch.equal(a, b), (order, k)
