"""BCD loss and its fused feature-centre reductions (SPEC §4).

Order: forward vs reference · tiny hand-computed case · float64 gradcheck · gradient vs reference ·
opcheck · edge cases · empty inputs · bad inputs · module == functional · emulated CUDA == CPU ·
CPU == CUDA · torch.compile.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import rrm_cuda
from rrm_cuda import reference as R

ops = torch.ops.rrm_cuda
NO_IGNORE = -(2**63)


def _features(B, C, h, w, dtype=torch.float32, layout="contiguous", seed=0):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(B, C, h, w, generator=g, dtype=torch.float64)
    if layout == "noncontiguous":
        f = torch.randn(B, 2 * C, h, w + 3, generator=g, dtype=torch.float64)[:, ::2, :, 1 : w + 1]
    f = f.to(dtype)
    if layout == "channels_last":
        f = f.contiguous(memory_format=torch.channels_last)
    return f


def _seg(B, K, h, w, seed=1, bg_bias=0.5):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, K, h, w, generator=g, dtype=torch.float64)
    s[:, 0] += bg_bias
    return s


def _labels(B, K, h, w, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, K, (B, h, w), generator=g)


def _tol(dtype):
    return dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "noncontiguous", "channels_last"]


# ---- forward vs reference ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_vs_reference(dtype, layout):
    B, C, h, w, K = 3, 6, 5, 7, 4
    f = _features(B, C, h, w, dtype, layout)
    labels = _labels(B, K, h, w)
    ref_in = f.to(torch.float64)  # the same (rounded) values, exactly
    s, n = rrm_cuda.masked_feature_sums(f, labels, K)
    rs, rn = R.masked_feature_sums_reference(ref_in.reshape(B, C, -1), labels.reshape(B, -1), K)
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    assert s.dtype == ct and n.dtype == ct and s.shape == (B, K, C) and n.shape == (B, K)
    torch.testing.assert_close(s.double(), rs, **_tol(ct))
    torch.testing.assert_close(n.double(), rn)
    centers, _ = rrm_cuda.masked_feature_centers(f, labels, K)
    torch.testing.assert_close(centers.double(), rs / (rn + 1e-7)[..., None], **_tol(ct))
    cos = rrm_cuda.feature_center_cosine(f, labels, centers)
    rcos = R.feature_center_cosine_reference(ref_in.reshape(B, C, -1), labels.reshape(B, -1), centers.double())
    torch.testing.assert_close(cos.double(), rcos, **_tol(ct))
    seg = _seg(B, K, h, w)
    loss = rrm_cuda.bcd_loss(seg, f)
    assert loss.dtype == ct and loss.shape == ()
    torch.testing.assert_close(loss.double(), R.bcd_loss_reference_loop(seg, ref_in), **_tol(ct))
    torch.testing.assert_close(loss.double(), R.bcd_loss_reference_vectorized(seg, ref_in), **_tol(ct))


def test_references_agree_and_large_channels_classes():
    # C = 4096 channels, K = 256 classes (most absent), against both references.
    B, C, h, w, K = 2, 4096, 6, 6, 256
    f = _features(B, C, h, w, torch.float32)
    g = torch.Generator().manual_seed(3)
    seg = torch.randn(B, K, h, w, generator=g)
    ref_loop = R.bcd_loss_reference_loop(seg, f.double())
    ref_vec = R.bcd_loss_reference_vectorized(seg, f.double())
    torch.testing.assert_close(ref_loop, ref_vec, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rrm_cuda.bcd_loss(seg, f).double(), ref_loop, rtol=1e-5, atol=1e-5)
    labels = seg.argmax(1)
    s, n = rrm_cuda.masked_feature_sums(f, labels, K)
    rs, rn = R.masked_feature_sums_reference(f.double().reshape(B, C, -1), labels.reshape(B, -1), K)
    torch.testing.assert_close(s.double(), rs, rtol=1e-5, atol=1e-5)


def test_soft_masks_match_hard_labels():
    B, C, h, w, K = 2, 5, 4, 4, 3
    f = _features(B, C, h, w, torch.float64)
    labels = _labels(B, K, h, w)
    masks = torch.nn.functional.one_hot(labels, K).permute(0, 3, 1, 2).double()
    for red in ("mean", "sum"):
        a = rrm_cuda.masked_feature_centers(f, labels, K, reduction=red)
        b = rrm_cuda.masked_feature_centers(f, masks, reduction=red)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ---- tiny hand-computed case ------------------------------------------------------------------------


def test_hand_computed():
    # One image, 3 pixels, K = 3. Pixel 0: background, features (1, 0); pixels 1, 2: class 1,
    # features (0, 1) and (0, 3); class 2 absent.
    seg = torch.tensor([[[[9.0, 0.0, 0.0]], [[0.0, 9.0, 9.0]], [[0.0, 0.0, 0.0]]]], dtype=torch.float64)
    f = torch.tensor([[[[1.0, 0.0, 0.0]], [[0.0, 1.0, 3.0]]]], dtype=torch.float64)
    s, n = rrm_cuda.masked_feature_sums(f, seg.argmax(1), 3)
    torch.testing.assert_close(s, torch.tensor([[[1.0, 0.0], [0.0, 4.0], [0.0, 0.0]]], dtype=torch.float64))
    torch.testing.assert_close(n, torch.tensor([[1.0, 2.0, 0.0]], dtype=torch.float64))
    eps = 1e-7
    cb = 1 / (1 + eps)  # background centre (cb, 0)
    ck = 4 / (2 + eps)  # class-1 centre (0, ck)
    t1 = 1 - cb / (1 * cb + eps)
    t2 = 1 - 0.5 * (ck / (1 * ck + eps) + 3 * ck / (3 * ck + eps))
    compact = (t1 + t2) / (1 + 1)
    l_ff = 0.0  # one foreground class
    l_fb = 1 + 0.0  # orthogonal centres
    expected = 0.5 * l_ff + 0.5 * l_fb + compact
    assert abs(float(rrm_cuda.bcd_loss(seg, f)) - expected) < 1e-12
    cos = rrm_cuda.feature_center_cosine(
        f, seg.argmax(1), torch.tensor([[[1.0, 1.0], [0.0, 1.0], [1.0, 0.0]]]).double()
    )
    torch.testing.assert_close(
        cos,
        torch.tensor([[1 / (math.sqrt(2) + eps), 1 / (1 + eps) + 3 / (3 + eps), 0.0]], dtype=torch.float64),
    )


# ---- float64 gradcheck ------------------------------------------------------------------------------


def test_gradcheck_ops():
    B, C, h, w, K = 2, 3, 3, 4, 3
    f = _features(B, C, h, w, torch.float64).requires_grad_()
    labels = _labels(B, K, h, w)
    labels[0, 0, 0] = 7  # an ignored pixel
    lab = labels.reshape(B, -1)
    centers = torch.randn(B, K, C, dtype=torch.float64, requires_grad=True)
    values = torch.randn(B, K, C, dtype=torch.float64, requires_grad=True)
    fl = f.reshape(B, C, -1)
    kw = dict(fast_mode=True, atol=1e-6, rtol=1e-5)
    assert torch.autograd.gradcheck(lambda x: ops.masked_feature_sums(x, lab, K, 7)[0], (fl,), **kw)
    assert torch.autograd.gradcheck(lambda v: ops.masked_feature_gather(v, lab, 7), (values,), **kw)
    assert torch.autograd.gradcheck(lambda x, c: ops.feature_center_cosine(x, lab, c, 7)[0], (fl, centers), **kw)
    assert torch.autograd.gradcheck(
        lambda x, c: rrm_cuda.feature_center_cosine(x, labels, c, ignore_index=7), (f, centers), **kw
    )


@pytest.mark.parametrize("case", ["random", "no_background_image", "single_class"])
def test_gradcheck_loss(case):
    B, C, h, w, K = 2, 3, 3, 3, 4
    seg = _seg(B, K, h, w)
    if case == "no_background_image":
        seg[1, 0] = -10
    if case == "single_class":
        seg[:, 2] = 10
    f = _features(B, C, h, w, torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: rrm_cuda.bcd_loss(seg, x), (f,), fast_mode=True, atol=1e-6)


# ---- gradient vs reference --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradient_vs_reference(dtype, layout):
    B, C, h, w, K = 3, 8, 6, 5, 5
    seg = _seg(B, K, h, w)
    f = _features(B, C, h, w, dtype, layout).requires_grad_()
    (g,) = torch.autograd.grad(rrm_cuda.bcd_loss(seg, f), f)
    assert g.dtype == dtype and g.shape == f.shape
    fr = f.detach().double().requires_grad_()
    (g_loop,) = torch.autograd.grad(R.bcd_loss_reference_loop(seg, fr), fr)
    (g_vec,) = torch.autograd.grad(R.bcd_loss_reference_vectorized(seg, fr), fr)
    torch.testing.assert_close(g_loop, g_vec, rtol=1e-10, atol=1e-12)
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g.double(), g_loop, **tol)


def test_half_gradient_dtype():
    B, C, h, w, K = 2, 4, 4, 4, 3
    f = _features(B, C, h, w, torch.bfloat16).requires_grad_()
    loss = rrm_cuda.bcd_loss(_seg(B, K, h, w), f)
    (g,) = torch.autograd.grad(loss, f)
    assert loss.dtype == torch.float32 and g.dtype == torch.bfloat16 and bool(torch.isfinite(g).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["random", "no_background_image", "no_background", "background_only", "K1"])
def test_loss_op_equals_reference_tightly(dtype, case):
    # The one-node op (rrm_cuda::bcd_loss and its analytic backward) against the dense reference,
    # value and gradient: ~1e-12 in float64, float32 rounding only in float32.
    B, C, h, w, K = 4, 16, 6, 5, 21
    seg = _seg(B, K, h, w, bg_bias=1.5)
    if case == "no_background_image":
        seg[1, 0] = -10
    if case == "no_background":
        seg[:, 0] = -10
    if case == "background_only":
        seg[:, 0] = 10
    if case == "K1":
        seg = seg[:, :1]
    f = _features(B, C, h, w, dtype).requires_grad_()
    loss = rrm_cuda.bcd_loss(seg, f)
    (g,) = torch.autograd.grad(loss, f)
    fr = f.detach().double().requires_grad_()
    ref = R.bcd_loss_reference_vectorized(seg, fr)
    (g_ref,) = torch.autograd.grad(ref, fr)
    if dtype == torch.float64:
        torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12 * float(g_ref.abs().max()))
    else:
        torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-5 * float(g_ref.abs().max()))


def test_loss_op_labels_are_argmax():
    # the CPU op's own argmax: torch's first maximum on ties, a NaN counts as the maximum, any strides
    seg = torch.randint(0, 3, (2, 5, 40)).to(torch.float32)  # many ties
    seg[1, 2, 7] = float("nan")
    f = torch.randn(2, 3, 40)
    for s in (seg, seg.transpose(1, 2).contiguous().transpose(1, 2), seg.half()):
        labels, finite = ops.bcd_loss(s, f)[1::6]
        assert torch.equal(labels, s.argmax(1)) and finite.tolist() == [False, True]
    assert ops.bcd_loss(seg.nan_to_num(), f)[7].tolist() == [True, True]


def test_gradcheck_loss_op():
    # the raw op, float64, through its registered autograd
    B, C, N, K = 2, 3, 10, 4
    seg = _seg(B, K, 2, 5).reshape(B, K, N)
    seg[1, 0] = -10  # image 1 without background
    f = _features(B, C, 2, 5, torch.float64).reshape(B, C, N).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: ops.bcd_loss(seg, x)[0], (f,), fast_mode=True, atol=1e-6)


# ---- opcheck ----------------------------------------------------------------------------------------


def _op_samples():
    out = []
    for i, (B, C, N, K, dtype) in enumerate([(2, 3, 7, 4, torch.float64), (1, 5, 9, 2, torch.float32)]):
        g = torch.Generator().manual_seed(10 + i)
        f = torch.randn(B, C, N, generator=g, dtype=dtype, requires_grad=True)
        lab = torch.randint(0, K, (B, N), generator=g)
        lab[0, 0] = -1
        c = torch.randn(B, K, C, generator=g, dtype=dtype, requires_grad=True)
        out.append((f, lab, K, c))
    return out


@pytest.mark.parametrize("i", [0, 1])
def test_opcheck(i):
    f, lab, K, c = _op_samples()[i]
    torch.library.opcheck(ops.masked_feature_sums, (f, lab, K, -1))
    torch.library.opcheck(ops.masked_feature_gather, (c, lab, -1))
    torch.library.opcheck(ops.feature_center_cosine, (f, lab, c, -1))
    cos, dot, norm = ops.feature_center_cosine(f.detach(), lab, c.detach(), -1)
    grad = torch.randn_like(cos)
    torch.library.opcheck(ops.feature_center_cosine_backward, (grad, f.detach(), lab, c.detach(), dot, norm, -1))
    seg = torch.randn(f.shape[0], K, f.shape[2], generator=torch.Generator().manual_seed(20 + i), dtype=f.dtype)
    torch.library.opcheck(ops.bcd_loss, (seg, f))
    saved = ops.bcd_loss(seg, f.detach())[1:7]
    torch.library.opcheck(ops.bcd_loss_backward, (torch.tensor(1.5, dtype=f.dtype), f.detach(), *saved))


# ---- edge cases -------------------------------------------------------------------------------------


def _loss_matches(seg, f):
    ref = R.bcd_loss_reference_loop(seg, f.double())
    torch.testing.assert_close(rrm_cuda.bcd_loss(seg, f).double(), ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(R.bcd_loss_reference_vectorized(seg, f.double()), ref, rtol=1e-10, atol=1e-10)
    fr = f.detach().double().requires_grad_()
    fo = f.detach().double().requires_grad_()
    (g_ref,) = torch.autograd.grad(R.bcd_loss_reference_loop(seg, fr), fr)
    (g,) = torch.autograd.grad(rrm_cuda.bcd_loss(seg, fo), fo)
    torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-10)
    return ref


def test_edge_cases():
    B, C, h, w, K = 3, 4, 4, 4, 5
    f = _features(B, C, h, w, torch.float64)
    # a class present in one image only
    seg = _seg(B, K, h, w)
    seg[:, 4] = -10
    seg[1, 4, 0, :] = 10
    _loss_matches(seg, f)
    # an image with no background
    seg = _seg(B, K, h, w)
    seg[2, 0] = -10
    _loss_matches(seg, f)
    # batch of one
    _loss_matches(_seg(1, K, h, w), f[:1])
    # every pixel one foreground class: no background anywhere -> 0.5 L_ff + 1 with L_ff = 0
    seg = torch.zeros(B, K, h, w, dtype=torch.float64)
    seg[:, 3] = 1
    ref = _loss_matches(seg, f)
    assert float(ref) > 1.0
    # every pixel background: no foreground -> separation 0, compactness only
    seg = torch.zeros(B, K, h, w, dtype=torch.float64)
    seg[:, 0] = 1
    ref = _loss_matches(seg, f)
    assert 0 <= float(ref) < 1.0
    # one class (background only, K = 1)
    _loss_matches(torch.ones(B, 1, h, w, dtype=torch.float64), f)
    # all classes absent from the labels: zero sums, zero counts
    lab = torch.full((B, h, w), 9)
    s, n = rrm_cuda.masked_feature_sums(f, lab, K, ignore_index=9)
    assert not s.any() and not n.any()
    assert not rrm_cuda.feature_center_cosine(f, lab, torch.ones(B, K, C).double(), ignore_index=9).any()


def test_ignore_index():
    B, C, h, w, K = 2, 4, 5, 5, 3
    f = _features(B, C, h, w, torch.float64)
    lab = _labels(B, K, h, w)
    lab[0, :2] = 255
    lab[1, 3, 3] = 255
    s, n = rrm_cuda.masked_feature_sums(f, lab, K, ignore_index=255)
    rs, rn = R.masked_feature_sums_reference(f.reshape(B, C, -1), lab.reshape(B, -1), K, 255)
    torch.testing.assert_close(s, rs)
    torch.testing.assert_close(n, rn)
    assert float(n.sum()) == B * h * w - 2 * w - 1
    assert torch.equal(rrm_cuda.masked_feature_sums(f, lab, K, ignore_index=np.int16(255))[0], s)
    for bad, exc, match in (
        (2**64, ValueError, "fit in int64"),
        (1.5, TypeError, "be an int; got float"),
        (True, TypeError, "be an int; got bool"),
    ):
        with pytest.raises(exc, match=f"ignore_index must {match}"):
            rrm_cuda.masked_feature_sums(f, lab, K, ignore_index=bad)
    # NaN in an ignored pixel is harmless
    f2 = f.clone()
    f2[0, :, 0, 0] = float("nan")
    torch.testing.assert_close(rrm_cuda.masked_feature_sums(f2, lab, K, ignore_index=255)[0], s)
    c = torch.randn(B, K, C, dtype=torch.float64, requires_grad=True)
    fg = f.clone().requires_grad_()
    cos = rrm_cuda.feature_center_cosine(fg, lab, c, ignore_index=255)
    torch.testing.assert_close(cos, R.feature_center_cosine_reference(f.reshape(B, C, -1), lab.reshape(B, -1), c, 255))
    (gf,) = torch.autograd.grad(cos.sum(), fg)
    assert not gf[0, :, :2].any() and not gf[1, :, 3, 3].any()


def test_bcd_loss_unchecked():
    # check_inputs=False: no read of the op's finiteness flags; the same loss and gradient, and
    # NaN features give a NaN loss instead of an error
    g = torch.Generator().manual_seed(9)
    seg = torch.randn(2, 4, 6, 5, generator=g, dtype=torch.float64)
    f = torch.randn(2, 8, 6, 5, generator=g, dtype=torch.float64)
    fa, fb = f.clone().requires_grad_(), f.clone().requires_grad_()
    la, lb = rrm_cuda.bcd_loss(seg, fa), rrm_cuda.BCDLoss(check_inputs=False)(seg, fb)
    torch.testing.assert_close(la, lb, rtol=0, atol=0)
    la.backward()
    lb.backward()
    torch.testing.assert_close(fa.grad, fb.grad, rtol=0, atol=0)
    bad = f.clone()
    bad[0, :, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="features contains NaN"):
        rrm_cuda.bcd_loss(seg, bad)
    assert torch.isnan(rrm_cuda.bcd_loss(seg, bad, check_inputs=False))


def test_cpu_deterministic():
    # The fused ops give bitwise identical results whatever the thread count (fixed summation order)...
    B, C, N, K = 4, 64, 150, 6
    g = torch.Generator().manual_seed(5)
    f = torch.randn(B, C, N, generator=g)
    lab = torch.randint(0, K, (B, N), generator=g)
    c = torch.randn(B, K, C, generator=g)
    gr = torch.randn(B, K, generator=g)
    old = torch.get_num_threads()
    results = []
    try:
        for t in (1, max(2, old)):
            torch.set_num_threads(t)
            cos = ops.feature_center_cosine(f, lab, c, -1)
            results.append(
                [
                    *ops.masked_feature_sums(f, lab, K, -1),
                    ops.masked_feature_gather(c, lab, -1),
                    *cos,
                    *ops.feature_center_cosine_backward(gr, f, lab, c, cos[1], cos[2], -1),
                ]
            )
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(a, b) for a, b in zip(*results))
    # ... and the loss and its gradient are reproducible run to run.
    fg = f.reshape(B, C, 10, 15).requires_grad_()
    seg = _seg(B, K, 10, 15)
    runs = [torch.autograd.grad(rrm_cuda.bcd_loss(seg, fg), fg)[0] for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_loss_and_gradient_do_not_depend_on_thread_count():
    # The epilogue's Gram matrix and its adjoint's product run as fixed-order functors in double on
    # the CPU: a BLAS GEMM (torch.mm of a 5x5 by a 5x21 matrix) gave other last bits on 2 threads than
    # on 1, so the gradient did.
    g = torch.Generator().manual_seed(0)
    seg, f = torch.randn(4, 2, 10, 10, generator=g), torch.randn(4, 21, 10, 10, generator=g)
    old = torch.get_num_threads()
    out = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            x = f.clone().requires_grad_()
            loss = rrm_cuda.bcd_loss(seg, x)
            out.append((loss, torch.autograd.grad(loss, x)[0]))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_under_autocast(dtype):
    # autocast does not reach into the op (its products run in double): float32 results and gradients
    seg, f = _seg(2, 4, 8, 6), torch.randn(2, 3, 8, 6, generator=torch.Generator().manual_seed(1))
    x = f.clone().requires_grad_()
    ref = rrm_cuda.bcd_loss(seg, x)
    gref = torch.autograd.grad(ref, x)[0]
    with torch.autocast("cpu", dtype=dtype):
        loss = rrm_cuda.bcd_loss(seg, x)
        assert loss.dtype == torch.float32
        grad = torch.autograd.grad(loss, x)[0]
    assert torch.equal(loss, ref) and torch.equal(grad, gref)


def test_features_too_large_for_float32():
    # A centre of ~4e18 and a pixel of 1e20 multiply past float32's 3.4e38: the checked loss names
    # it (not a silent -inf); float64 computes it, and so does float32 below the overflow.
    torch.manual_seed(0)
    seg, f = torch.randn(2, 4, 8, 6), torch.randn(2, 3, 8, 6)
    for big, ok in ((1e18, True), (1e20, False), (1e30, False)):
        g = f.clone()
        g[0, 1, 2, 2] = big
        ref = rrm_cuda.bcd_loss(seg, g.double())
        if ok:
            torch.testing.assert_close(rrm_cuda.bcd_loss(seg, g).double(), ref, rtol=1e-5, atol=1e-6)
        else:
            with pytest.raises(ValueError, match=r"features are too large for torch.float32: .*largest \|feature\|"):
                rrm_cuda.bcd_loss(seg, g)
            assert not torch.isfinite(rrm_cuda.bcd_loss(seg, g, check_inputs=False))
        assert torch.isfinite(ref)
    # finite features whose per-class sums overflow: named as too large, not as NaN/Inf
    seg = torch.zeros(1, 2, 1, 4)
    seg[:, 0, :, :2] = 1
    seg[:, 1, :, 2:] = 1
    huge = torch.full((1, 3, 1, 4), 2e38)
    with pytest.raises(ValueError, match="features are too large for torch.float32: .*pass float64"):
        rrm_cuda.bcd_loss(seg, huge)
    with pytest.raises(ValueError, match="features are too large for torch.float32"):
        rrm_cuda.masked_feature_sums(huge, torch.tensor([[[0, 0, 1, 1]]]), 2)
    with pytest.raises(ValueError, match=r"features are too large for torch.float64: .*\); scale them down$"):
        rrm_cuda.bcd_loss(seg.double(), torch.full((1, 3, 1, 4), 1e308, dtype=torch.float64))
    with pytest.raises(ValueError, match="features contains NaN or Inf"):
        rrm_cuda.bcd_loss(seg, huge.clone().fill_(math.inf))
    with pytest.raises(ValueError, match="features contains NaN or Inf"):
        rrm_cuda.masked_feature_sums(huge.clone().fill_(math.nan), torch.tensor([[[0, 0, 1, 1]]]), 2)


def test_center_eps():
    # eps >= 0 and finite; eps = 0 gives exact means and still a zero centre for an absent class
    f = torch.arange(8.0).reshape(1, 2, 2, 2)
    lab = torch.tensor([[[0, 1], [1, 1]]])
    c, n = rrm_cuda.masked_feature_centers(f, lab, 3, eps=0.0)
    assert torch.equal(c, torch.tensor([[[0.0, 4.0], [2.0, 6.0], [0.0, 0.0]]])) and n.tolist() == [[1, 3, 0]]
    c, _ = rrm_cuda.masked_feature_centers(f, lab, 3, eps=np.float32(0.5))
    torch.testing.assert_close(c[0, 1], torch.tensor([6.0, 18.0]) / 3.5)
    assert torch.equal(c[0, 2], torch.zeros(2))
    for eps in (-1.0, math.nan, math.inf, "a", True, None):
        with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
            rrm_cuda.masked_feature_centers(f, lab, 3, eps=eps)


def test_meta_tensors_give_shapes():
    # meta tensors have no values: the eager calls skip the value checks and return the fake kernels' shapes
    seg, f = torch.randn(2, 4, 4, 5, device="meta"), torch.randn(2, 3, 4, 5, device="meta")
    lab = torch.zeros(2, 4, 5, dtype=torch.long, device="meta")
    assert rrm_cuda.bcd_loss(seg, f).shape == () and rrm_cuda.BCDLoss()(seg, f).device.type == "meta"
    s, n = rrm_cuda.masked_feature_sums(f, lab, 4)
    assert s.shape == (2, 4, 3) and n.shape == (2, 4)
    c, n = rrm_cuda.masked_feature_centers(f, torch.rand(2, 4, 4, 5, device="meta"))
    assert c.shape == (2, 4, 3) and c.device.type == "meta"
    assert rrm_cuda.feature_center_cosine(f, lab, torch.randn(2, 4, 3, device="meta")).shape == (2, 4)


# ---- empty inputs -----------------------------------------------------------------------------------


def test_empty_inputs():
    # The ops accept zero-size tensors and return empty / zero results ...
    f = torch.randn(2, 3, 0)
    lab = torch.zeros(2, 0, dtype=torch.long)
    s, n = ops.masked_feature_sums(f, lab, 4, -1)
    assert s.shape == (2, 4, 3) and not s.any() and not n.any()
    s, n = ops.masked_feature_sums(torch.randn(0, 3, 5), torch.zeros(0, 5, dtype=torch.long), 4, -1)
    assert s.shape == (0, 4, 3) and n.shape == (0, 4)
    s, _ = ops.masked_feature_sums(torch.randn(2, 0, 5), torch.zeros(2, 5, dtype=torch.long), 4, -1)
    assert s.shape == (2, 4, 0)
    cos, dot, norm = ops.feature_center_cosine(f, lab, torch.randn(2, 4, 3), -1)
    assert cos.shape == (2, 4) and not cos.any() and dot.shape == (2, 0)
    assert ops.masked_feature_gather(torch.randn(2, 4, 3), lab, -1).shape == (2, 3, 0)
    # ... while the public API refuses them, naming the argument.
    with pytest.raises(ValueError, match="features must not be empty"):
        rrm_cuda.masked_feature_sums(torch.randn(2, 3, 0, 4), torch.zeros(2, 0, 4, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="seg_logits must not be empty"):
        rrm_cuda.bcd_loss(torch.randn(0, 3, 4, 4), torch.randn(0, 2, 4, 4))
    with pytest.raises(ValueError, match="features must not be empty"):
        rrm_cuda.bcd_loss(torch.randn(1, 3, 4, 4), torch.randn(1, 0, 4, 4))


# ---- bad inputs -------------------------------------------------------------------------------------


def test_bad_inputs():
    f = torch.randn(2, 3, 4, 4)
    lab = torch.zeros(2, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, num_classes = 3\)"):
        rrm_cuda.masked_feature_sums(f, lab + 3, 3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, num_classes = 3\); got values from 3 to 3$"):
        rrm_cuda.masked_feature_sums(f, lab + 3, 3)  # no ignore_index given: none named
    with pytest.raises(ValueError, match=r"labels must lie in \[0, num_classes = 3\) or equal ignore_index \(255\)"):
        rrm_cuda.masked_feature_sums(f, lab + 3, 3, ignore_index=255)
    with pytest.raises(ValueError, match="features or centers contains NaN or Inf"):
        rrm_cuda.feature_center_cosine(f, lab, torch.full((2, 3, 3), math.nan))
    with pytest.raises(ValueError, match="labels must lie in"):
        rrm_cuda.masked_feature_sums(f, lab - 1, 3)
    with pytest.raises(TypeError, match="labels must have an integer dtype"):
        rrm_cuda.masked_feature_sums(f, lab.bool(), 3)
    with pytest.raises(TypeError, match="labels must have an integer dtype"):
        rrm_cuda.feature_center_cosine(f, lab.float(), torch.randn(2, 3, 3))
    with pytest.raises(ValueError, match="labels must have shape"):
        rrm_cuda.masked_feature_sums(f, lab[:, :3], 3)
    with pytest.raises(ValueError, match="ignore_index"):
        rrm_cuda.masked_feature_sums(f, lab, 3, ignore_index=1)
    with pytest.raises(ValueError, match="num_classes"):
        rrm_cuda.masked_feature_sums(f, lab, 0)
    with pytest.raises(TypeError, match="features must have dtype"):
        rrm_cuda.masked_feature_sums(f.int(), lab, 3)
    with pytest.raises(TypeError, match="features must be a torch.Tensor"):
        rrm_cuda.bcd_loss(torch.randn(2, 3, 4, 4), [1.0])
    with pytest.raises(ValueError, match="features contains NaN"):
        rrm_cuda.bcd_loss(torch.randn(2, 3, 4, 4), f.index_fill(1, torch.tensor([0]), float("nan")))
    with pytest.raises(ValueError, match="features contains NaN or Inf"):
        rrm_cuda.masked_feature_sums(f.index_fill(3, torch.tensor([1]), float("inf")), lab, 3)
    with pytest.raises(ValueError, match="seg_logits contains NaN"):
        rrm_cuda.bcd_loss(torch.full((2, 3, 4, 4), float("nan")), f)
    with pytest.raises(ValueError, match="features must have shape"):
        rrm_cuda.bcd_loss(torch.randn(2, 3, 4, 5), f)
    with pytest.raises(ValueError, match="centers must have shape"):
        rrm_cuda.feature_center_cosine(f, lab, torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="centers must have 3 dimensions"):
        rrm_cuda.feature_center_cosine(f, lab, torch.randn(2, 3))
    with pytest.raises(ValueError, match="soft masks"):
        rrm_cuda.masked_feature_centers(f, torch.rand(2, 3, 4, 5))
    with pytest.raises(ValueError, match="features and labels must be on the same device"):
        rrm_cuda.masked_feature_sums(f.to("meta"), lab, 3)
    with pytest.raises(ValueError, match="seg_logits and features must be on the same device"):
        rrm_cuda.bcd_loss(torch.randn(2, 3, 4, 4), f.to("meta"))
    with pytest.raises(ValueError, match="features and centers must be on the same device"):
        rrm_cuda.feature_center_cosine(f, lab, torch.randn(2, 3, 3, device="meta"))
    with pytest.raises(ValueError, match="reduction"):
        rrm_cuda.masked_feature_centers(f, lab, 3, reduction="max")
    # the raw ops check too
    with pytest.raises(TypeError, match="centers must have dtype Float"):
        ops.feature_center_cosine(f.reshape(2, 3, -1), lab.reshape(2, -1), torch.randn(2, 3, 3).double(), -1)
    with pytest.raises(ValueError, match="labels \\(B, N\\) must match features"):
        ops.masked_feature_sums(f.reshape(2, 3, -1), lab.reshape(2, -1)[:, :5], 3, -1)
    with pytest.raises(ValueError, match="labels must lie in"):
        ops.masked_feature_gather(torch.randn(2, 3, 3), lab.reshape(2, -1) + 5, -1)
    with pytest.raises(TypeError, match="features must be float32, float64, float16 or bfloat16"):
        ops.masked_feature_sums(f.reshape(2, 3, -1).int(), lab.reshape(2, -1), 3, -1)
    with pytest.raises(ValueError, match=r"seg_logits \(B, K, N\) must match features"):
        ops.bcd_loss(torch.randn(2, 3, 15), f.reshape(2, 3, -1))
    with pytest.raises(TypeError, match="seg_logits must be float32"):
        ops.bcd_loss(torch.zeros(2, 3, 16, dtype=torch.long), f.reshape(2, 3, -1))
    with pytest.raises(ValueError, match="at least one image"):
        ops.bcd_loss(torch.randn(0, 3, 16), torch.randn(0, 3, 16))
    with pytest.raises(ValueError, match="seg_logits contains Inf"):
        rrm_cuda.bcd_loss(torch.randn(2, 3, 4, 4).index_fill(3, torch.tensor([1]), float("inf")), f)
    saved = ops.bcd_loss(torch.randn(2, 3, 16), f.reshape(2, 3, -1))[1:7]
    with pytest.raises(ValueError, match="cos_sums must have shape"):
        ops.bcd_loss_backward(torch.tensor(1.0), f.reshape(2, 3, -1), *saved[:4], saved[4][:, :2], saved[5])


# ---- module == functional ---------------------------------------------------------------------------


def test_module_equals_functional():
    seg, f = _seg(2, 4, 5, 5), _features(2, 6, 5, 5)
    assert torch.equal(rrm_cuda.BCDLoss()(seg, f), rrm_cuda.bcd_loss(seg, f))


# ---- emulated CUDA decomposition == CPU ---------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype,layout,C",
    [
        (torch.float32, "contiguous", 5),
        (torch.float64, "channels_last", 5),
        (torch.float16, "noncontiguous", 5),
        (torch.float32, "channels_last", 130),  # three channel chunks of the GPU's per-pixel pass
        (torch.float64, "contiguous", 130),
    ],
)
def test_emulated_cuda_equals_cpu(dtype, layout, C):
    B, h, w, K = 2, 6, 6, 4
    f = _features(B, C, h, w, dtype, layout).reshape(B, C, -1)
    lab = _labels(B, K, h, w).reshape(B, -1)
    lab[1, 3] = 99
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    tol = _tol(ct)
    a = ops.masked_feature_sums(f, lab, K, 99)
    b = ops._masked_feature_sums_emulated(f, lab, K, 99)
    torch.testing.assert_close(a, b, **tol)
    c = torch.randn(B, K, C, dtype=ct)
    torch.testing.assert_close(
        ops.masked_feature_gather(c, lab, 99), ops._masked_feature_gather_emulated(c, lab, 99), rtol=0, atol=0
    )
    a = ops.feature_center_cosine(f, lab, c, 99)
    b = ops._feature_center_cosine_emulated(f, lab, c, 99)
    torch.testing.assert_close(a, b, **tol)
    g = torch.randn(B, K, dtype=ct)
    ga = ops.feature_center_cosine_backward(g, f, lab, c, a[1], a[2], 99)
    gb = ops._feature_center_cosine_backward_emulated(g, f, lab, c, a[1], a[2], 99)
    torch.testing.assert_close(ga[0].float(), gb[0].float(), **tol)
    torch.testing.assert_close(ga[1], gb[1], **tol)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("K", [3, 256])
def test_emulated_cuda_chunks_equal_cpu(layout, K):
    # The GPU path cuts segments into chunks (tiles of 32 lanes x 32 entries): a background segment of
    # several tiles plus a partial one, classes shorter than a tile's lanes, empty classes, ignored
    # pixels, and K = 256 (more classes than present: most segments empty).
    B, C, h, w = 2, 7, 48, 50
    f = _features(B, C, h, w, torch.float64, layout).reshape(B, C, -1)
    g = torch.Generator().manual_seed(5)
    ign = 99 if K < 99 else 999
    lab = torch.zeros(B, h * w, dtype=torch.long)
    lab[:, ::7] = 1  # 343 pixels: 10 lanes of one tile
    lab[0, 5:25] = 2  # 20 pixels, fewer than the lanes
    lab[1, torch.randint(0, h * w, (40,), generator=g)] = ign  # ignored
    if K == 256:
        lab[1, 100:130] = 200
    tol = _tol(torch.float64)
    torch.testing.assert_close(
        ops._masked_feature_sums_emulated(f, lab, K, ign), ops.masked_feature_sums(f, lab, K, ign), **tol
    )
    c = torch.randn(B, K, C, dtype=torch.float64, generator=g)
    a = ops.feature_center_cosine(f, lab, c, ign)
    b = ops._feature_center_cosine_emulated(f, lab, c, ign)
    torch.testing.assert_close(a, b, **tol)
    gr = torch.randn(B, K, dtype=torch.float64, generator=g)
    ga = ops.feature_center_cosine_backward(gr, f, lab, c, a[1], a[2], ign)
    gb = ops._feature_center_cosine_backward_emulated(gr, f, lab, c, a[1], a[2], ign)
    torch.testing.assert_close(ga, gb, **tol)
    with pytest.raises(ValueError, match="labels must lie in"):
        ops._masked_feature_sums_emulated(f, lab.clamp_max(K), K, ign)
    with pytest.raises(ValueError, match="labels must lie in"):
        ops._masked_feature_gather_emulated(c, lab - 1, ign)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("case", ["random", "no_background_image", "no_background", "K1", "many_classes"])
def test_emulated_cuda_loss_equals_cpu(dtype, case):
    # bcd_loss / bcd_loss_backward: the GPU path (segments by sorting, the epilogue and its adjoint as
    # functors around one Gram matrix of the centres) against the CPU's (counting sort, the epilogue as
    # loops); "many_classes": 300 classes, most of them absent.
    B, C, h, w, K = 3, 70, 5, 6, (300 if case == "many_classes" else 6)
    seg = _seg(B, K, h, w, bg_bias=1.0).reshape(B, K, -1)
    if case == "no_background_image":
        seg[2, 0] = -10
    if case == "no_background":
        seg[:, 0] = -10
    if case == "K1":
        seg = seg[:, :1]
    f = _features(B, C, h, w, dtype, "channels_last").reshape(B, C, -1)
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    a = ops.bcd_loss(seg, f)
    b = ops._bcd_loss_emulated(seg, f)
    assert torch.equal(a[1], b[1]) and torch.equal(a[6], b[6]) and a[7].tolist() == [True, True]
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, **_tol(ct))
    grad = torch.tensor(0.7, dtype=ct)
    ga = ops.bcd_loss_backward(grad, f, *a[1:7])
    gb = ops._bcd_loss_backward_emulated(grad, f, *a[1:7])
    assert ga.dtype == dtype and ga.shape == f.shape
    tol = _tol(ct) if dtype != torch.float16 else dict(rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(ga.double(), gb.double(), **tol)
    # through autograd (C++ functions, csrc/bcd/bcd_autograd.cpp): the same backward ops
    for op, want in ((ops.bcd_loss, ga), (ops._bcd_loss_emulated, gb)):
        fg = f.detach().clone().requires_grad_()
        loss = op(seg, fg)[0]
        assert "BcdLossFunction" in loss.grad_fn.name()
        (got,) = torch.autograd.grad(loss * 0.7, fg)
        torch.testing.assert_close(got.double(), want.double(), **tol)


@pytest.mark.parametrize("emulated", [False, True])
def test_gradient_at_large_feature_scales(emulated):
    # The loss does not depend on the features' scale, so grad(s F) s = grad(F). The GPU path (and
    # its emulation) accumulates float32 in float32: the cosine's backward coefficients must not form
    # |F|^3 |c|^2 (overflowing from |F| ~ 6e7 and silently dropping a term of the gradient).
    B, C, h, w, K = 2, 64, 8, 8, 5
    g = torch.Generator().manual_seed(3)
    seg = torch.randn(B, K, h * w, generator=g)
    f = torch.randn(B, C, h * w, generator=g)
    loss, bwd = (
        (ops._bcd_loss_emulated, ops._bcd_loss_backward_emulated) if emulated else (ops.bcd_loss, ops.bcd_loss_backward)
    )
    a = ops.bcd_loss(seg.double(), f.double())
    want = ops.bcd_loss_backward(torch.tensor(1.0, dtype=torch.float64), f.double(), *a[1:7])
    for s in (1.0, 1e7, 1e8, 1e10, 1e15):
        fs = f * s
        a = loss(seg, fs)
        got = bwd(torch.tensor(1.0), fs, *a[1:7]).double() * s
        err = float((got - want).abs().max() / want.abs().max())
        assert err < 1e-4, (s, err)


# ---- CPU == CUDA ------------------------------------------------------------------------------------


@pytest.mark.cuda
def test_cpu_equals_cuda(cuda):
    # the `cuda` fixture (tests/conftest.py) skips without a GPU and FAILS on a GPU with a CPU-only build
    B, C, h, w, K = 3, 32, 9, 9, 5
    for dtype in (torch.float32, torch.float64, torch.float16):
        f = _features(B, C, h, w, dtype).requires_grad_()
        seg = _seg(B, K, h, w)
        loss = rrm_cuda.bcd_loss(seg, f)
        (g,) = torch.autograd.grad(loss, f)
        fc = f.detach().to(cuda).requires_grad_()
        loss_c = rrm_cuda.bcd_loss(seg.to(cuda), fc)
        (gc,) = torch.autograd.grad(loss_c, fc)
        ct = torch.float64 if dtype == torch.float64 else torch.float32
        torch.testing.assert_close(loss_c.cpu(), loss, **_tol(ct))
        torch.testing.assert_close(gc.cpu().double(), g.double(), rtol=1e-3, atol=1e-5)
        # bitwise reproducible on the GPU (no float atomics)
        (gc2,) = torch.autograd.grad(rrm_cuda.bcd_loss(seg.to(cuda), fc), fc)
        assert torch.equal(gc, gc2)


@pytest.mark.cuda
def test_cuda_gradcheck_ops_layouts_and_opcheck(cuda):
    B, C, h, w, K = 2, 3, 3, 4, 3
    labels = _labels(B, K, h, w).to(cuda)
    labels[0, 0, 0] = 7
    lab = labels.reshape(B, -1)
    kw = dict(fast_mode=True, atol=1e-6, rtol=1e-5)
    f = _features(B, C, h, w, torch.float64).to(cuda).requires_grad_()
    fl = f.reshape(B, C, -1)
    centers = torch.randn(B, K, C, dtype=torch.float64, device=cuda, requires_grad=True)
    values = torch.randn(B, K, C, dtype=torch.float64, device=cuda, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ops.masked_feature_sums(x, lab, K, 7)[0], (fl,), **kw)
    assert torch.autograd.gradcheck(lambda v: ops.masked_feature_gather(v, lab, 7), (values,), **kw)
    assert torch.autograd.gradcheck(lambda x, c: ops.feature_center_cosine(x, lab, c, 7)[0], (fl, centers), **kw)
    seg = _seg(B, 4, h, w).to(cuda)
    assert torch.autograd.gradcheck(lambda x: rrm_cuda.bcd_loss(seg, x), (f,), fast_mode=True, atol=1e-6)
    torch.library.opcheck(ops.masked_feature_sums, (fl.detach(), lab, K, 7))
    torch.library.opcheck(ops.feature_center_cosine, (fl.detach(), lab, centers.detach(), 7))
    # every layout and dtype, and soft masks, equal the CPU
    for layout in LAYOUTS:
        for dtype in DTYPES:
            x = _features(3, 40, 17, 13, dtype, layout)
            lab3 = _labels(3, 6, 17, 13)
            a = rrm_cuda.masked_feature_centers(x, lab3, 6)
            b = rrm_cuda.masked_feature_centers(x.to(cuda), lab3.to(cuda), 6)
            tol = dict(rtol=2e-2, atol=2e-2) if dtype in (torch.float16, torch.bfloat16) else dict(rtol=1e-5, atol=1e-5)
            for u, v in zip(a, b):
                torch.testing.assert_close(v.cpu(), u, **tol)
    soft = torch.softmax(_seg(3, 6, 17, 13), 1).float()
    x = _features(3, 40, 17, 13)
    for u, v in zip(
        rrm_cuda.masked_feature_centers(x, soft), rrm_cuda.masked_feature_centers(x.to(cuda), soft.to(cuda))
    ):
        torch.testing.assert_close(v.cpu(), u, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_cuda_large_shape_and_many_classes(cuda):
    # the authors' shape and many classes: long per-(image, class) segments, K = 256
    f = _features(4, 256, 41, 41)
    seg = _seg(4, 21, 41, 41)
    lf = rrm_cuda.bcd_loss(seg, f)
    lg = rrm_cuda.bcd_loss(seg.to(cuda), f.to(cuda))
    torch.testing.assert_close(lg.cpu(), lf, rtol=1e-4, atol=1e-5)
    lab = torch.randint(0, 256, (2, 64, 64))
    x = _features(2, 8, 64, 64)
    for u, v in zip(
        rrm_cuda.masked_feature_sums(x, lab, 256), rrm_cuda.masked_feature_sums(x.to(cuda), lab.to(cuda), 256)
    ):
        torch.testing.assert_close(v.cpu(), u, rtol=1e-5, atol=1e-4)


# ---- torch.compile ----------------------------------------------------------------------------------


def test_compile():
    seg, f = _seg(2, 4, 5, 5), _features(2, 6, 5, 5).requires_grad_()
    compiled = torch.compile(rrm_cuda.bcd_loss, fullgraph=True, backend="aot_eager")
    out = compiled(seg, f)
    (g,) = torch.autograd.grad(out, f)
    (g_ref,) = torch.autograd.grad(rrm_cuda.bcd_loss(seg, f), f)
    torch.testing.assert_close(out, rrm_cuda.bcd_loss(seg, f))
    torch.testing.assert_close(g, g_ref)
