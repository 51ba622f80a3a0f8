"""Dense-CRF energy loss (rrm_cuda.dense_energy_loss, DenseEnergyLoss, torch.ops.rrm_cuda.dense_energy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import rrm_cuda
from rrm_cuda import energy as E
from rrm_cuda import reference as R
from tests.conftest import OpSpy

ops = torch.ops.rrm_cuda


def _smooth(shape, scale=3.0, seed=0, dtype=torch.float64, cells=4):
    g = torch.Generator().manual_seed(seed)
    B, C, H, W = shape
    x = torch.randn(B, C, cells, cells, generator=g, dtype=dtype) * scale
    return F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)


def _inputs(B=2, K=3, H=10, W=9, dtype=torch.float64, seed=0, channels=3):
    g = torch.Generator().manual_seed(seed)
    images = (_smooth((B, channels, H, W), 60.0, seed, dtype) + 128).clamp(0, 255).round()
    probs = torch.softmax(_smooth((B, K, H, W), 3.0, seed + 1, dtype), 1)
    rois = torch.ones(B, H, W, dtype=dtype)
    rois[:, :, -2:] = 0
    labels = torch.randint(0, K, (B, 1, H, W), generator=g).to(dtype)
    labels[:, :, : H // 3] = 255
    return images, probs, rois, labels


def _op_inputs(B=2, K=3, N=30, d=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(B, K, N, generator=g, dtype=dtype)
    gate = torch.rand(B, N, generator=g, dtype=dtype)
    feats = torch.rand(B, d, N, generator=g, dtype=dtype) * 3
    mass = torch.rand(B, N, generator=g, dtype=dtype)
    return probs, gate, feats, mass


def _gate(probs, rois, labels):
    g = rois - probs.amax(1)
    g = torch.where((labels.long() == 255).squeeze(1), torch.ones_like(g), g)
    return g.clamp(min=0)


# ---------------------------------------------------------------------------------------------
# forward vs reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("gate,nonnegative", [(True, False), (False, False), (True, True)])
def test_forward_vs_reference(dtype, contiguous, gate, nonnegative):
    images, probs, rois, labels = _inputs(dtype=dtype)
    if not contiguous:
        probs = probs.transpose(2, 3).contiguous().transpose(2, 3)
        images = images.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
        assert not probs.is_contiguous() and not images.is_contiguous()
    out = rrm_cuda.dense_energy_loss(
        images, probs, rois, labels, sigma_rgb=15.0, sigma_xy=6.0, gate=gate, nonnegative=nonnegative
    )
    B, K = probs.shape[:2]
    s_hat = (probs * rois.unsqueeze(1)).reshape(B, K, -1)
    S = _gate(probs, rois, labels).reshape(B, -1) if gate else torch.ones_like(s_hat[:, 0])
    feats = R.rloss_features(images, 15.0, 6.0)
    mass = rois.reshape(B, -1) if nonnegative else None
    ref = R.dense_energy_reference(s_hat, S, feats, mass).sum() / B
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert out.dtype == dtype and out.dim() == 0
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    if nonnegative:
        assert float(out) >= 0


def test_module_forward_matches_original_restatement():
    images, probs, rois, labels = _inputs(H=12, W=14, dtype=torch.float32)
    m = rrm_cuda.DenseEnergyLoss(1e-3, 15.0, 100.0, 0.5)
    out = m(images, probs, rois, labels)
    ref = R.dense_energy_loss_module_reference(images, probs, rois, labels, 1e-3, 15.0, 100.0, 0.5)
    assert out.shape == (1,)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-8)


def test_close_to_exact_dense_gaussian():
    # SPEC §1: the lattice underestimates the Gaussian sum (≈0.55x at d=5) with ~10 % scatter.
    images, probs, rois, labels = _inputs(B=1, K=4, H=20, W=20)
    B, K = probs.shape[:2]
    s_hat = probs.reshape(B, K, -1)
    S = torch.ones(B, 400, dtype=torch.float64)
    feats = R.rloss_features(images, 15.0, 5.0)
    e = rrm_cuda.dense_energy_loss(images, probs, sigma_rgb=15.0, sigma_xy=5.0, gate=False)
    exact = R.dense_energy_reference(s_hat, S, feats, filter_fn=R.gaussian_filter_exact).sum()
    ratio = float(e / exact)
    assert 0.4 < ratio < 0.75, ratio
    a = ops.permutohedral_filter(s_hat, feats, False)
    b = R.gaussian_filter_exact(s_hat, feats)
    c = (a * b).sum() / (b * b).sum()
    assert float((a - c * b).norm() / (c * b).norm()) < 0.2


# ---------------------------------------------------------------------------------------------
# tiny hand-computed case


def test_hand_computed():
    # d = 1, every pixel at feature 0: the pixel splats with weight 1 onto the lattice point 0; the
    # blur along axis 0 leaves it (its neighbour holds 0) and along axis 1 adds 1/2 * 1/2 of it back
    # from the weight-0 corner, so W_ij = alpha * 1.25 = (2/3) * 1.25 = 5/6 for every pair.
    probs = torch.tensor([[[0.2, 0.7], [0.8, 0.3]]], dtype=torch.float64)
    gate = torch.tensor([[1.0, 0.5]], dtype=torch.float64)
    feats = torch.zeros(1, 1, 2, dtype=torch.float64)
    energy, grad = ops.dense_energy(probs, gate, feats, None, 1)
    as0, as1 = 5 / 6 * 0.9, 5 / 6 * 1.1
    expected = -(1.0 * (0.2 * as0 + 0.8 * as1) + 0.5 * (0.7 * as0 + 0.3 * as1))
    torch.testing.assert_close(energy, torch.tensor([expected], dtype=torch.float64))
    torch.testing.assert_close(grad, -2 * torch.tensor([[[as0, 0.5 * as0], [as1, 0.5 * as1]]], dtype=torch.float64))
    # mass m: + sum_i S m (W 1) with W 1 = 5/6 * 2
    e2, _ = ops.dense_energy(probs, gate, feats, torch.ones(1, 2, dtype=torch.float64), 0)
    torch.testing.assert_close(e2, energy + 1.5 * 5 / 3)


# ---------------------------------------------------------------------------------------------
# gradients


@pytest.mark.parametrize("with_mass", [False, True])
@pytest.mark.parametrize("op", ["dense_energy", "_dense_energy_emulated"])
def test_gradcheck_exact(with_mass, op):
    probs, gate, feats, mass = _op_inputs(N=24)
    probs.requires_grad_()
    fn = getattr(ops, op)
    m = mass if with_mass else None
    assert torch.autograd.gradcheck(lambda p: fn(p, gate, feats, m, 2)[0], (probs,), fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pack_blocks_give_the_same_bits(tuning, dtype):
    # The GPU's packing of the (B, K, N) probabilities into lattice rows (knob energy_pack_blocks): a
    # transpose through shared memory in blocks of 32 pixels, or one thread per (pixel, channel).
    # Through the emulated launch, bitwise: pixel counts that are and are not a multiple of the
    # block, one to 21 classes, the mass channel (rows of K + 1), every gradient mode, and a class
    # count whose tile exceeds 48 KiB of shared memory (the per-channel threads then).
    for K, N, B in ((1, 32, 1), (3, 70, 2), (4, 33, 2), (21, 100, 2), (400, 40, 1)):
        probs, gate, feats, mass = _op_inputs(B=B, K=K, N=N)
        probs, gate, feats, mass = (t.to(dtype) for t in (probs, gate, feats, mass))
        for m in (None, mass):
            for mode in (0, 1, 2):
                outs = []
                for blocks in (0, 1):
                    tuning("energy_pack_blocks", blocks)
                    outs.append(ops._dense_energy_emulated(probs, gate, feats, m, mode))
                for a, b in zip(*outs):
                    assert torch.equal(a, b), (K, N, m is None, mode)


def test_gradcheck_functional_through_downscale():
    # Gate off (S = 1 is constant) so the value's true gradient is what the exact mode returns;
    # the gradient flows through the ROI mask and the bilinear downscaling.
    images, probs, rois, _ = _inputs(B=1, K=2, H=8, W=8)
    probs.requires_grad_()
    fn = lambda p: rrm_cuda.dense_energy_loss(  # noqa: E731
        images, p, rois, sigma_rgb=15.0, sigma_xy=8.0, scale_factor=0.5, gate=False, nonnegative=True
    )
    assert torch.autograd.gradcheck(fn, (probs,), fast_mode=True)


def test_exact_gradient_vs_reference():
    probs, gate, feats, mass = _op_inputs(K=4, N=40)
    p1 = probs.clone().requires_grad_()
    p2 = probs.clone().requires_grad_()
    ops.dense_energy(p1, gate, feats, mass, 2)[0].sum().backward()
    R.dense_energy_reference(p2, gate, feats, mass).sum().backward()
    torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-10, atol=1e-12)
    # S W s + W^T (S s) differs from the rloss formula 2 S W s: W is not symmetric, S not constant.
    g_rloss = ops.dense_energy(probs, gate, feats, mass, 1)[1]
    assert float((g_rloss - p1.grad).abs().max()) > 1e-6


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_rloss_gradient_equals_original(scale):
    images, probs, rois, labels = _inputs(H=12, W=12)
    p1 = probs.clone().requires_grad_()
    p2 = probs.clone().requires_grad_()
    rrm_cuda.DenseEnergyLoss(1.0, 15.0, 40.0, scale)(images, p1, rois, labels).sum().backward()
    R.dense_energy_loss_module_reference(images, p2, rois, labels, 1.0, 15.0, 40.0, scale).sum().backward()
    torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-10, atol=1e-12)


def test_opcheck():
    samples = []
    probs, gate, feats, mass = _op_inputs(N=20, dtype=torch.float32)
    samples.append((probs.clone().requires_grad_(), gate, feats, None, 2))
    samples.append((probs.clone().requires_grad_(), gate, feats, mass, 1))
    samples.append((probs, gate, feats[:, :2].contiguous(), None, 0))
    for args in samples:
        torch.library.opcheck(ops.dense_energy.default, args)


@pytest.mark.parametrize("op", ["dense_energy_sum", "_dense_energy_sum_emulated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_energy_sum_op_equals_the_composition(op, dtype):
    # dense_energy_sum (what dense_energy_loss calls): factor * dense_energy(...)[0].sum() in one
    # autograd node. Loss and gradient are the bits of the composition it replaces (sum, product,
    # dense_energy's backward), with and without a mass, for both gradients; float64 gradcheck;
    # opcheck; no gradient without a direction.
    base = "dense_energy" if op == "dense_energy_sum" else "_dense_energy_emulated"
    probs, gate, feats, mass = _op_inputs(K=4, N=60, dtype=dtype)
    factor = 1e-3 / 3
    for m in (None, mass):
        for mode in (1, 2):
            p1, p2 = probs.clone().requires_grad_(), probs.clone().requires_grad_()
            want = getattr(ops, base)(p1, gate, feats, m, mode)[0].sum() * factor
            got = getattr(ops, op)(p2, gate, feats, m, mode, factor)
            assert got.shape == () and torch.equal(got, want)
            (g1,) = torch.autograd.grad(want * 0.7, p1)
            (g2,) = torch.autograd.grad(got * 0.7, p2)
            assert torch.equal(g1, g2)
    with torch.inference_mode():  # below autograd: the op's own kernel
        below = getattr(ops, op)(probs, gate, feats, mass, 1, factor)
    assert torch.equal(below, want.detach())
    if dtype == torch.float64:
        fn = lambda p: getattr(ops, op)(p, gate, feats, mass, 2, 0.5)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (probs.clone().requires_grad_(),), fast_mode=True)
        torch.library.opcheck(getattr(ops, op).default, (probs.clone().requires_grad_(), gate, feats, mass, 2, 0.5))
        torch.library.opcheck(getattr(ops, op).default, (probs, gate, feats, None, 0, 1.0))
    p = probs.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="grad_mode=0"):
        getattr(ops, op)(p, gate, feats, None, 0, 1.0).backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [0.5, 1.0])
def test_fused_loss_op_gives_the_unfused_bits(dtype, scale):
    # dense_energy_loss_fused (the loss in raster order without the CPU's statistics: GPUs, and the
    # unchecked CPU call): the inputs op and the summed energy in one autograd node, whose backward
    # reads the scale grad * factor in the inputs' backward kernel. Loss and gradient are the bits of
    # the unfused path (the checked CPU call runs dense_energy_inputs and dense_energy_sum), for both
    # gradients, with and without the gate, ROIs, labels and the mass.
    images, probs, rois, labels = _inputs(B=3, K=4, H=10, W=9, dtype=dtype, seed=5)
    for kw in (
        dict(gradient="rloss"),
        dict(gradient="exact", nonnegative=True),
        dict(gradient="exact", gate=False),
        dict(gradient="rloss", rois_none=True),
    ):
        kw = dict(kw)
        r = None if kw.pop("rois_none", False) else rois
        outs = []
        for check in (True, False):
            p = probs.clone().requires_grad_()
            loss = rrm_cuda.dense_energy_loss(
                images,
                p,
                r,
                labels,
                sigma_rgb=15.0,
                sigma_xy=6.0,
                scale_factor=scale,
                weight=0.3,
                check_inputs=check,
                **kw,
            )
            name = loss.grad_fn.name()
            assert ("DenseEnergyLossFused" in name) == (not check), name
            (grad,) = torch.autograd.grad(loss * 1.7, p)
            outs.append((loss, grad))
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1]), kw


@pytest.mark.parametrize("op", ["dense_energy_loss_fused", "_dense_energy_loss_fused_emulated"])
def test_fused_loss_op_checks_gradcheck_and_opcheck(op):
    # The op against the two ops it fuses, bitwise (the emulated twin too: through the emulated
    # launch), at both strides; float64 gradcheck (without the gate, which the gradient holds
    # constant); opcheck; no gradient without a direction.
    base = (
        ("dense_energy_inputs", "dense_energy_sum")
        if op[0] != "_"
        else ("_dense_energy_inputs_emulated", "_dense_energy_sum_emulated")
    )
    images, probs, rois, labels = _inputs(B=2, K=3, H=8, W=10, dtype=torch.float64, seed=6)
    unl = labels.reshape(2, 8, 10) == 255
    for stride in (1, 2):
        feats = rrm_cuda.bilateral_features(images[:, :, ::stride, ::stride], 5.0, 15.0, dtype=torch.float64)
        mass = rois[:, ::stride, ::stride].reshape(2, -1)
        p1, p2 = probs.clone().requires_grad_(), probs.clone().requires_grad_()
        s_hat, g, _ = getattr(ops, base[0])(p1, rois, unl, stride, True, 0, False)
        want = getattr(ops, base[1])(s_hat.reshape(2, 3, -1), g.reshape(2, -1), feats, mass, 2, 0.25)
        got = getattr(ops, op)(p2, rois, unl, stride, True, feats, mass, 2, 0.25)
        assert got.shape == () and torch.equal(got, want)
        assert torch.equal(torch.autograd.grad(want, p1)[0], torch.autograd.grad(got, p2)[0])
        with torch.inference_mode():  # below autograd: the op's own kernel
            below = getattr(ops, op)(probs, rois, unl, stride, True, feats, mass, 2, 0.25)
        assert torch.equal(below, want.detach())
        fn = lambda p, s=stride, f=feats: getattr(ops, op)(p, rois, None, s, False, f, None, 2, 0.5)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (probs.clone().requires_grad_(),), fast_mode=True)
        torch.library.opcheck(
            getattr(ops, op).default, (probs.clone().requires_grad_(), rois, unl, stride, True, feats, mass, 1, 0.5)
        )
    p = probs.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="grad_mode=0"):
        getattr(ops, op)(p, rois, unl, 2, True, feats, None, 0, 1.0).backward()
    # bad arguments name themselves: features of another size than the working scale's, a bad stride
    with pytest.raises(ValueError, match="features must have shape"):
        getattr(ops, op)(probs, rois, unl, 1, True, feats, None, 1, 1.0)  # feats are stride 2's
    with pytest.raises(ValueError, match="stride must be 1 or 2"):
        getattr(ops, op)(probs, rois, unl, 3, True, feats, None, 1, 1.0)


@pytest.mark.parametrize("name", ["dense_energy_inputs_backward", "_dense_energy_inputs_backward_emulated"])
def test_inputs_backward_scale_argument(name):
    # The optional scale of the inputs' backward (the fused loss's factor): the gradient of grad * scale,
    # bitwise; a scale of the wrong size, dtype or device is refused by name.
    g = torch.Generator().manual_seed(3)
    grad = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    rois = (torch.rand(2, 8, 10, generator=g) > 0.3).double()
    op = getattr(ops, name)
    s = torch.tensor(0.37, dtype=torch.float64)
    for r in (None, rois):
        assert torch.equal(op(grad, r, 8, 10, 2, 0, s), op(grad * s, r, 8, 10, 2, 0))
    # an odd size (the forward dropped the last row and column) and a (1,) scale
    assert torch.equal(op(grad, None, 9, 11, 2, 0, s.reshape(1)), op(grad * s, None, 9, 11, 2, 0))
    with pytest.raises(ValueError, match="scale must hold one element"):
        op(grad, None, 8, 10, 2, 0, torch.ones(2, dtype=torch.float64))
    with pytest.raises((TypeError, RuntimeError), match="scale"):
        op(grad, None, 8, 10, 2, 0, torch.ones(1, dtype=torch.float32))


# ---------------------------------------------------------------------------------------------
# the inputs op: downscaling, ROI product and gate in one pass


def _inputs_restated(seg, rois, labels, stride, ignore_index=255):
    """What dense_energy_loss did before the fused op, line by line: F.interpolate (nearest for the
    ROI and labels), the ROI product, the gate. The bilinear 0.5 downscale is written with CUDA's
    order of operations (F.interpolate's CUDA kernel); its CPU kernel sums four 1/4-weighted taps
    instead, which can differ in the last bit (checked against it separately)."""
    B, K, H, W = seg.shape
    p, roi, lab = seg, rois, labels
    if stride == 2:
        h, w = H // 2, W // 2
        taps = [seg[:, :, dy : 2 * h : 2, dx : 2 * w : 2] for dy in (0, 1) for dx in (0, 1)]
        p = 0.5 * (0.5 * taps[0] + 0.5 * taps[1]) + 0.5 * (0.5 * taps[2] + 0.5 * taps[3])
        ref = F.interpolate(seg, scale_factor=0.5, mode="bilinear", align_corners=False)
        torch.testing.assert_close(p, ref, rtol=2 * torch.finfo(seg.dtype).eps, atol=0, equal_nan=True)
        roi = F.interpolate(rois.unsqueeze(1), scale_factor=0.5).squeeze(1) if rois is not None else None
        lab = F.interpolate(labels.to(seg.dtype), scale_factor=0.5) if labels is not None else None
    s_hat = p * roi.unsqueeze(1) if roi is not None else p
    g = p.amax(1)
    g = roi - g if roi is not None else 1 - g
    if lab is not None:
        g = g.masked_fill((lab == ignore_index).reshape(g.shape), 1)
    return s_hat, g.clamp(min=0)


@pytest.mark.parametrize("op", ["dense_energy_inputs", "_dense_energy_inputs_emulated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(10, 9), (7, 12), (37, 70)])  # (37, 70): the CPU's blocks of 16 output rows
def test_inputs_op_bitwise_vs_restatement(op, dtype, stride, size):
    H, W = size
    images, probs, rois, labels = _inputs(B=2, K=4, H=H, W=W, dtype=dtype)
    probs = torch.softmax(torch.randn(probs.shape, dtype=dtype, generator=torch.Generator().manual_seed(1)) * 4, 1)
    f = getattr(ops, op)
    for roi, lab in ((rois, labels), (None, None), (rois, None), (None, labels)):
        strided = probs.transpose(0, 1).contiguous().transpose(0, 1)
        for seg in (probs, probs.contiguous(memory_format=torch.channels_last), strided):
            want_p, want_g = _inputs_restated(seg, roi, lab, stride)
            unl = (lab.reshape(2, H, W) == 255) if lab is not None else None
            p, g, st = f(seg, roi, unl, stride, True)
            assert torch.equal(p, want_p) and torch.equal(g, want_g) and st.shape == (0,)
            p2, g2, _ = f(seg, roi, unl, stride, False)
            assert torch.equal(p2, want_p) and g2.shape == (0,)
            # backward: the adjoint of the ROI product and of F.interpolate's downscaling, bitwise
            x = seg.detach().clone().requires_grad_()
            y = x if stride == 1 else F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
            y = y * roi[:, ::stride, ::stride][:, : H // stride, : W // stride].unsqueeze(1) if roi is not None else y
            go = torch.randn(y.shape, dtype=dtype, generator=torch.Generator().manual_seed(2))
            (want,) = torch.autograd.grad(y, x, go)
            x2 = seg.detach().clone().requires_grad_()
            (got,) = torch.autograd.grad(f(x2, roi, unl, stride, True)[0], x2, go)
            assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inputs_backward_blocks_give_the_same_bits(tuning, dtype):
    # The GPU form of the inputs' backward (knob energy_backward_blocks): a thread per gradient pixel
    # writes the stride x stride input block of every class, or (0) a thread per input column pair
    # and class. Through the emulated launch, bitwise one another and the CPU op: odd and even sizes
    # (the dropped last row and column), class counts below, at and above the 4 loads in flight,
    # with and without ROIs, raster and tile orders.
    g = torch.Generator().manual_seed(8)
    for (H, W), K, T in (((9, 11), 3, 0), ((10, 12), 4, 0), ((37, 70), 9, 16), ((7, 5), 1, 2), ((16, 15), 21, 0)):
        for stride in (1, 2):
            h, w = H // stride, W // stride
            go = torch.randn(2, K, h, w, generator=g, dtype=dtype)
            rois = (torch.rand(2, H, W, generator=g) > 0.3).to(dtype)
            for roi in (rois, None):
                want = ops.dense_energy_inputs_backward(go, roi, H, W, stride, T)
                for blocks in (0, 1):
                    tuning("energy_backward_blocks", blocks)
                    got = ops._dense_energy_inputs_backward_emulated(go, roi, H, W, stride, T)
                    assert torch.equal(got, want), (H, W, K, T, stride, roi is None, blocks)


def test_inputs_op_backward_large_output_on_huge_pages():
    # A gradient of >= 32 MiB is allocated on (transparent) huge pages on the CPU (common/host_alloc.h):
    # the same values as the adjoint of F.interpolate, and an ordinary tensor (resizable, writable).
    g = torch.randn(1, 2, 1030, 2050, generator=torch.Generator().manual_seed(0))
    rois = torch.ones(1, 2061, 4101)
    rois[:, :, -100:] = 0
    x = torch.zeros(1, 2, 2061, 4101, requires_grad=True)
    (want,) = torch.autograd.grad(
        F.interpolate(x, scale_factor=0.5, mode="bilinear") * rois[:, ::2, ::2][:, :1030, :2050].unsqueeze(1), x, g
    )
    got = ops.dense_energy_inputs_backward(g, rois, 2061, 4101, 2, 0)
    assert got.nbytes >= 32 << 20 and torch.equal(got, want)
    # Freed blocks are reused (host_alloc.h's BlockCache), never while a tensor still holds them.
    again = ops.dense_energy_inputs_backward(g, rois, 2061, 4101, 2, 0)
    assert again.data_ptr() != got.data_ptr() and torch.equal(again, want)
    got.add_(1)
    got.resize_(3, 2061, 4101)  # grows: the storage reallocates through its allocator
    assert torch.equal(got[:2], want.reshape(2, 2061, 4101) + 1)
    del got  # its block back to the cache (or freed): the next output may take it
    third = ops.dense_energy_inputs_backward(g * 2, rois, 2061, 4101, 2, 0)
    assert torch.equal(third, want * 2) and torch.equal(again, want)
    assert third.data_ptr() != again.data_ptr()  # a live block is never handed out twice
    del again, third, want


def test_cached_cpu_outputs_of_8_to_32_mib():
    # The energy loss's CPU outputs of 8-32 MiB (its working-scale probabilities, its gradient
    # direction) come from host_alloc.h's block cache in plain pages: the same values as the
    # emulated launch, reused once freed (never while held), ordinary resizable tensors.
    g = torch.Generator().manual_seed(3)
    seg = torch.softmax(torch.randn(1, 8, 1100, 1102, generator=g), 1)
    rois = torch.ones(1, 1100, 1102)
    rois[..., -9:] = 0
    p, gate, _ = ops.dense_energy_inputs(seg, rois, None, 2, True)
    want_p, want_g, _ = ops._dense_energy_inputs_emulated(seg, rois, None, 2, True)
    assert 8 << 20 <= p.nbytes < 32 << 20 and torch.equal(p, want_p) and torch.equal(gate, want_g)
    q, _, _ = ops.dense_energy_inputs(seg * 0.5, rois, None, 2, True)
    assert q.data_ptr() != p.data_ptr() and torch.equal(q, want_p * 0.5) and torch.equal(p, want_p)
    del p
    r, _, _ = ops.dense_energy_inputs(seg, rois, None, 2, True)  # may take the freed block, never q's
    assert r.data_ptr() != q.data_ptr() and torch.equal(r, want_p) and torch.equal(q, want_p * 0.5)
    r.resize_(2, 8, 550, 551)  # grows through its allocator
    assert torch.equal(r[:1], want_p)
    probs = r[:1].reshape(1, 8, -1)
    feats = torch.rand(1, 5, probs.shape[2], generator=g) * 3
    e, d = ops.dense_energy(probs, torch.rand(1, probs.shape[2], generator=g), feats, None, 1)
    assert d.nbytes >= 8 << 20 and bool(torch.isfinite(d).all()) and bool(torch.isfinite(e).all())


def test_inputs_op_nan_propagates_like_amax_and_clamp():
    p = torch.softmax(torch.randn(1, 3, 4, 6, generator=torch.Generator().manual_seed(0)), 1)
    p[0, 1, 0, 0] = float("nan")  # a later class
    p[0, 0, 2, 3] = float("nan")  # the first class
    for stride in (1, 2):
        want_p, want_g = _inputs_restated(p, None, None, stride)
        got_p, got_g, _ = ops.dense_energy_inputs(p, None, None, stride, True)
        assert torch.equal(got_p.isnan(), want_p.isnan()) and torch.equal(got_g.isnan(), want_g.isnan())
        assert int(got_g.isnan().sum()) == 2 and torch.equal(got_g.nan_to_num(), want_g.nan_to_num())


@pytest.mark.parametrize("tile", [0, 4])  # 4: the tile order (partial edge tiles at 11 x 13)
def test_inputs_op_gradcheck_and_opcheck(tile):
    images, probs, rois, labels = _inputs(B=2, K=3, H=11, W=13)
    unl = labels.reshape(2, 11, 13) == 255
    for stride in (1, 2):
        for roi in (rois, None):
            p = probs.clone().requires_grad_()
            fn = lambda q: ops.dense_energy_inputs(q, roi, unl, stride, True, tile)[0]  # noqa: E731
            assert torch.autograd.gradcheck(fn, (p,))
            for name in ("dense_energy_inputs", "_dense_energy_inputs_emulated"):
                torch.library.opcheck(getattr(ops, name).default, (p, roi, unl, stride, True, tile))
            torch.library.opcheck(ops.dense_energy_inputs.default, (probs.float(), None, None, stride, False, tile))
    g = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    torch.library.opcheck(ops.dense_energy_inputs_backward.default, (g, rois, 11, 13, 2, tile))


def _tile_order(h: int, w: int, T: int) -> torch.Tensor:
    """The pixel order of T x T tiles, restated with loops: the whole tiles (row-major inside each
    tile and across the tiles), then the columns right of them in raster order, then the rows below
    them in raster order."""
    hw, ww = h // T * T, w // T * T
    whole = [
        y * w + x
        for ty in range(0, hw, T)
        for tx in range(0, ww, T)
        for y in range(ty, ty + T)
        for x in range(tx, tx + T)
    ]
    right = [y * w + x for y in range(hw) for x in range(ww, w)]
    below = [y * w + x for y in range(hw, h) for x in range(w)]
    return torch.tensor(whole + right + below, dtype=torch.long)


@pytest.mark.parametrize("op", ["dense_energy_inputs", "_dense_energy_inputs_emulated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(10, 9), (37, 70), (38, 45)])
def test_inputs_op_stats(op, dtype, stride, size):
    # stats=True: the segmentations' value statistics as dense_energy_input_stats' entries 2-5 (the
    # CPU reads them with the downscaling in the raster order: the rows it reads, every column, then
    # at stride 2 the last row of an odd height on its own), whatever the pixel order or layout; the other outputs
    # unchanged. NaN and Inf anywhere: in a block's rows, in the last column, in the last row.
    H, W = size
    f = getattr(ops, op)
    _, probs, rois, labels = _inputs(B=2, K=4, H=H, W=W, dtype=dtype, seed=H)
    unl = labels.reshape(2, H, W) == 255
    strided = probs.transpose(0, 1).contiguous().transpose(0, 1)

    def want(seg):
        r = _stats_restated(torch.zeros(2, 1, H, W), seg, None, None, 255, True)[2:6]
        return r

    for seg in (probs, probs.contiguous(memory_format=torch.channels_last), strided):
        for tile in (0, 4):
            p0, g0, st0 = f(seg, rois, unl, stride, True, tile)
            p, g, st = f(seg, rois, unl, stride, True, tile, True)
            assert torch.equal(p, p0) and torch.equal(g, g0) and st0.shape == (0,) and st.dtype == torch.float64
            torch.testing.assert_close(st, want(seg), rtol=1e-6, atol=1e-6)
    for idx, value in (
        ((1, 2, 3, 4), float("nan")),
        ((0, 1, H - 1, 2), float("nan")),  # the last row (odd H: not read by the downscaling)
        ((1, 3, 5, W - 1), float("nan")),  # the last column (odd W)
        ((0, 0, H - 1, W - 1), float("inf")),
        ((1, 1, 2, W - 1), -float("inf")),
        ((0, 2, H - 1, 0), 7.0),
        ((1, 0, 0, W - 1), -3.0),
    ):
        seg = probs.clone()
        seg[idx] = value
        got = f(seg, rois, unl, stride, True, 0, True)[2]
        torch.testing.assert_close(got, want(seg), rtol=1e-6, atol=1e-6, equal_nan=True)
        assert not torch.allclose(got, want(probs), equal_nan=True), idx
    torch.library.opcheck(getattr(ops, op).default, (probs, rois, unl, stride, True, 0, True))


@pytest.mark.parametrize("op", ["dense_energy_inputs", "_dense_energy_inputs_emulated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("stride", [1, 2])
def test_inputs_op_tile_order(op, dtype, stride):
    # tile > 0: the outputs' pixels in the tile order, the raster outputs' values bitwise; the
    # backward reads its gradient in that order. Partial edge tiles, tiles of one pixel, tiles as
    # wide as the image (the raster order), strided and channels-last inputs.
    f, fb = getattr(ops, op), getattr(ops, op.replace("inputs", "inputs_backward"))
    for (H, W), T in (((38, 45), 16), ((35, 40), 3), ((9, 40), 4), ((40, 9), 4), ((12, 14), 1), ((20, 20), 10)):
        for T_ in (T, W // stride, 10**9):
            _, probs, rois, labels = _inputs(B=2, K=3, H=H, W=W, dtype=dtype, seed=H + T_ % 97)
            unl = labels.reshape(2, H, W) == 255
            h, w = H // stride, W // stride
            order = _tile_order(h, w, min(T_, w))
            for seg in (probs, probs.contiguous(memory_format=torch.channels_last)):
                p0, g0, _ = f(seg, rois, unl, stride, True, 0)
                p1, g1, _ = f(seg, rois, unl, stride, True, T_)
                assert p1.shape == p0.shape and g1.shape == g0.shape
                assert torch.equal(p1.reshape(2, 3, -1), p0.reshape(2, 3, -1)[..., order])
                assert torch.equal(g1.reshape(2, -1), g0.reshape(2, -1)[..., order])
                p2, g2, _ = f(seg, None, None, stride, False, T_)
                p3 = f(seg, None, None, stride, False)[0]
                assert torch.equal(p2.reshape(2, 3, -1), p3.reshape(2, 3, -1)[..., order]) and g2.shape == (0,)
            go = torch.randn(2, 3, h * w, dtype=dtype, generator=torch.Generator().manual_seed(5))
            for roi in (rois, None):
                want = fb(go.reshape(2, 3, h, w), roi, H, W, stride, 0)
                got = fb(go[..., order].reshape(2, 3, h, w), roi, H, W, stride, T_)
                assert torch.equal(got, want)
                # through autograd
                x = probs.clone().requires_grad_()
                y = f(x, roi, unl, stride, True, T_)[0]
                (g_auto,) = torch.autograd.grad(y, x, go[..., order].reshape(2, 3, h, w))
                assert torch.equal(g_auto, want)


def test_inputs_op_bad_arguments():
    images, probs, rois, labels = _inputs(B=2, K=3, H=6, W=6)
    unl = labels.reshape(2, 6, 6) == 255
    with pytest.raises(ValueError, match="stride must be 1 or 2"):
        ops.dense_energy_inputs(probs, rois, unl, 3, True)
    with pytest.raises(ValueError, match="segmentations must have 4 dimensions"):
        ops.dense_energy_inputs(probs[0], rois, unl, 2, True)
    with pytest.raises(TypeError, match="segmentations and rois must have the same dtype"):
        ops.dense_energy_inputs(probs, rois.float(), unl, 2, True)
    with pytest.raises(ValueError, match="rois must have shape"):
        ops.dense_energy_inputs(probs, rois[:, :5], unl, 2, True)
    with pytest.raises(TypeError, match="unlabelled must be bool"):
        ops.dense_energy_inputs(probs, rois, unl.float(), 2, True)
    with pytest.raises(ValueError, match="unlabelled must have shape"):
        ops.dense_energy_inputs(probs, rois, unl[:1], 2, True)
    with pytest.raises(ValueError, match="at least one class"):
        ops.dense_energy_inputs(probs[:, :0], rois, unl, 2, True)
    with pytest.raises(TypeError, match="float32 or float64"):
        ops.dense_energy_inputs(probs.half(), None, None, 2, True)
    with pytest.raises(ValueError, match="grad must have shape"):
        ops.dense_energy_inputs_backward(torch.zeros(2, 3, 3, 2, dtype=torch.float64), rois, 6, 6, 2)
    with pytest.raises(ValueError, match="tile must be >= 0"):
        ops.dense_energy_inputs(probs, rois, unl, 2, True, -1)
    with pytest.raises(ValueError, match="tile must be >= 0"):
        ops.dense_energy_inputs_backward(torch.zeros(2, 3, 3, 3, dtype=torch.float64), rois, 6, 6, 2, -16)
    p, g, _ = ops.dense_energy_inputs(probs[:, :0], rois, unl, 2, False)  # no class and no gate: empty
    assert p.shape == (2, 0, 3, 3) and g.shape == (0,)
    p, g, _ = ops.dense_energy_inputs(probs[:, :, :1], rois[:, :1], unl[:, :1], 2, True)  # one row: h = 0
    assert p.shape == (2, 3, 0, 3) and g.shape == (2, 0, 3)


# ---------------------------------------------------------------------------------------------
# the value checks' statistics: one pass over the four inputs


def _stats_restated(images, probs, rois, labels, ignore_index, distribution):
    """What dense_energy_input_stats computes, with torch reductions (NaN propagates)."""
    nan = float("nan")
    K = probs.shape[1]

    def rng(x):
        x = x.double()
        return (nan, nan) if bool(x.isnan().any()) else (-float(x.min()), float(x.max()))

    out = [*rng(images), *rng(probs)]
    out += [*rng(probs.double().sum(1))] if distribution else [-float("inf"), -float("inf")]
    r = rois.double() if rois is not None else torch.zeros(1)
    out.append(float(bool(((r != 0) & (r != 1)).any())))
    lab = labels.double() if labels is not None else torch.full((1,), float(ignore_index))
    ok = (lab == ignore_index) | ((lab >= 0) & (lab < K) & (lab == lab.trunc()))
    out.append(float(not bool(ok.all())))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("op", ["dense_energy_input_stats", "_dense_energy_input_stats_emulated"])
def test_input_stats_op_vs_restatement(op):
    f = getattr(ops, op)
    images, probs, rois, labels = _inputs(B=2, K=4, H=9, W=300, dtype=torch.float32)  # W > 256 columns
    lab3 = labels.reshape(2, 9, 300)
    cases = [
        (images, probs, rois, lab3),
        (images.to(torch.uint8), probs.half(), rois.to(torch.uint8), lab3.long()),
        (images.half(), probs.bfloat16(), rois.long(), lab3.to(torch.uint8)),
        (images.double(), probs.double(), None, None),
        (images.to(torch.int16), probs.contiguous(memory_format=torch.channels_last), rois.mT.contiguous().mT, lab3),
    ]

    def check(got, want):
        # The CPU op sums a pixel's classes in the probabilities' dtype (float32 for float16/bfloat16:
        # the loss checks the sums to 1e-2), CUDA and its emulation in double; the rest is exact.
        sums = [4, 5]
        rest = [i for i in range(8) if i not in sums]
        torch.testing.assert_close(got[rest], want[rest], rtol=1e-12, atol=1e-12, equal_nan=True)
        torch.testing.assert_close(got[sums], want[sums], rtol=1e-6, atol=1e-6, equal_nan=True)

    for img, p, r, lab in cases:
        for dist in (True, False):
            check(f(img, p, r, lab, 255.0, dist), _stats_restated(img, p, r, lab, 255, dist))
    # an ignore index that float32 cannot hold (the CPU's float-label fast path must not take it)
    big = float(2**24 + 1)
    lab_big = lab3.masked_fill(lab3 == 255, big)
    lab_big[0, 0, 0] = float(2**24)  # equal to big in float32, not in double: a bad label
    for labels_ in (lab_big, lab_big.masked_fill(lab_big == 2**24, big)):
        check(f(images, probs, rois, labels_, big, True), _stats_restated(images, probs, rois, labels_, big, True))
    # bad values, NaN and Inf, one at a time
    for mutate, idx in (
        (lambda t: t[0].__setitem__((1, 0, 0, 7), float("nan")), 2),  # a NaN probability
        (lambda t: t[0].__setitem__((0, 3, 8, 299), float("inf")), 3),  # an Inf probability
        (lambda t: t[1].__setitem__((1, 2, 4, 4), float("nan")), 0),  # a NaN pixel
        (lambda t: t[2].__setitem__((0, 5, 5), 0.5), 6),  # a ROI value of 0.5
        (lambda t: t[2].__setitem__((1, 0, 0), float("nan")), 6),
        (lambda t: t[3].__setitem__((1, 8, 3), 4.0), 7),  # label K
        (lambda t: t[3].__setitem__((0, 1, 1), 1.5), 7),  # a fractional label
        (lambda t: t[3].__setitem__((0, 1, 2), -1.0), 7),
        (lambda t: t[3].__setitem__((0, 1, 3), float("nan")), 7),
        # the same at the rows' last columns (the CPU's vector loops leave W % 8 = 4 to a scalar tail)
        (lambda t: t[0].__setitem__((0, 2, 3, 298), float("nan")), 2),
        (lambda t: t[0].__setitem__((1, 1, 8, 299), -float("inf")), 2),
        (lambda t: t[1].__setitem__((0, 0, 8, 299), float("nan")), 0),
        (lambda t: t[1].__setitem__((1, 1, 0, 297), 300.0), 1),
        (lambda t: t[2].__setitem__((0, 8, 299), 0.5), 6),
        (lambda t: t[3].__setitem__((1, 4, 299), 2.5), 7),
    ):
        p, img, r, lab = probs.clone(), images.clone(), rois.clone(), lab3.clone()
        mutate((p, img, r, lab))
        got = f(img, p, r, lab, 255.0, True)
        want = _stats_restated(img, p, r, lab, 255, True)
        check(got, want)
        clean = _stats_restated(images, probs, rois, lab3, 255, True)
        assert not torch.allclose(got[idx], clean[idx], equal_nan=True)
    # no class: every label must be the ignore index
    got = f(images, probs[:, :0], None, lab3, 255.0, False)
    assert got[7] == 1.0 and f(images, probs[:, :0], None, torch.full_like(lab3, 255), 255.0, False)[7] == 0.0
    # no class with the distribution: the empty sums are 0 on every path
    for dist in (True, False):
        want = ops._dense_energy_input_stats_emulated(images, probs[:, :0], None, lab3, 255.0, dist)
        torch.testing.assert_close(f(images, probs[:, :0], None, lab3, 255.0, dist), want, rtol=0, atol=0)
    # probabilities=False: the probabilities' entries left at -inf, the rest as with them (K still
    # bounds the labels)
    no_p = f(images, probs, rois, lab3, 255.0, True, False)
    full = f(images, probs, rois, lab3, 255.0, True)
    rest = [0, 1, 6, 7]
    assert torch.equal(no_p[rest], full[rest]) and bool((no_p[2:6] == -float("inf")).all())
    bad = lab3.clone()
    bad[0, 0, 0] = 4.0  # = K: a bad label with or without the probabilities
    assert f(images, probs, rois, bad, 255.0, True, False)[7] == 1.0


def test_input_stats_op_opcheck_and_bad_arguments():
    images, probs, rois, labels = _inputs(B=2, K=3, H=6, W=5, dtype=torch.float32)
    lab3 = labels.reshape(2, 6, 5)
    for name in ("dense_energy_input_stats", "_dense_energy_input_stats_emulated"):
        torch.library.opcheck(getattr(ops, name).default, (images, probs, rois, lab3, 255.0, True))
        torch.library.opcheck(getattr(ops, name).default, (images, probs, None, None, 255.0, False))
    with pytest.raises(ValueError, match="images must have shape"):
        ops.dense_energy_input_stats(images[:, :, :5], probs, rois, lab3, 255.0, True)
    with pytest.raises(ValueError, match="rois must have shape"):
        ops.dense_energy_input_stats(images, probs, rois[:1], lab3, 255.0, True)
    with pytest.raises(ValueError, match="labels must have shape"):
        ops.dense_energy_input_stats(images, probs, rois, labels, 255.0, True)
    with pytest.raises(TypeError, match="segmentations must be floating"):
        ops.dense_energy_input_stats(images, probs.long(), rois, lab3, 255.0, True)
    with pytest.raises(TypeError, match="unsupported dtype"):
        ops.dense_energy_input_stats(images, probs, rois.to(torch.complex64), lab3, 255.0, True)
    empty = ops.dense_energy_input_stats(images[:0], probs[:0], None, None, 255.0, True)  # no pixel
    assert empty[:6].eq(-float("inf")).all() and empty[6:].eq(0).all()


# ---------------------------------------------------------------------------------------------
# empty and bad inputs


@pytest.mark.parametrize("stats_op", [False, True])
def test_empty_inputs(stats_op, monkeypatch):
    monkeypatch.setattr(E, "_STATS_OP_ON_CPU", stats_op)
    e, g = ops.dense_energy(torch.empty(0, 3, 5), torch.empty(0, 5), torch.empty(0, 5, 5), None, 2)
    assert e.shape == (0,) and g.shape == (0, 3, 5)
    e, g = ops.dense_energy(torch.empty(2, 3, 0), torch.empty(2, 0), torch.empty(2, 5, 0), None, 0)
    assert e.tolist() == [0.0, 0.0] and g.shape == (0,)
    out = rrm_cuda.dense_energy_loss(torch.empty(0, 3, 4, 4), torch.empty(0, 2, 4, 4))
    assert float(out) == 0.0
    images, probs, rois, labels = _inputs(H=4, W=4)
    out = rrm_cuda.dense_energy_loss(images[:, :, :0], probs[:, :, :0], rois[:, :0], labels[:, :, :0])
    assert float(out) == 0.0
    # no class (K = 0) at every scale, the general (F.interpolate) path's 0.3 included: an empty sum
    for scale in (1.0, 0.5, 0.3):
        seg = probs[:, :0].clone().requires_grad_()
        out = rrm_cuda.DenseEnergyLoss(1e-7, 15.0, 100.0, scale)(images, seg, rois, torch.full_like(labels, 255))
        assert float(out.detach()) == 0.0
        out.sum().backward()
        assert seg.grad.shape == seg.shape


def _bad(scale_factor=1.0, **over):
    images, probs, rois, labels = _inputs(H=6, W=6)
    args = dict(images=images, segmentations=probs, rois=rois, seg_label=labels)
    kwargs = dict(sigma_rgb=15.0, sigma_xy=10.0, scale_factor=scale_factor)
    for k, v in over.items():
        (args if k in args else kwargs)[k] = v(args[k]) if callable(v) and k in args else v
    return lambda: rrm_cuda.dense_energy_loss(**args, **kwargs)


@pytest.mark.parametrize("stats_op", [False, True])
def test_unit_range_images_warn(monkeypatch, stats_op):
    import warnings

    monkeypatch.setattr(E, "_STATS_OP_ON_CPU", stats_op)
    images, probs, rois, labels = _inputs(H=12, W=14, dtype=torch.float32)
    with pytest.warns(UserWarning, match=r"\[0, 1\] images .*pass images \* 255"):
        rrm_cuda.dense_energy_loss(images / 255, probs, rois, labels, sigma_rgb=15.0, sigma_xy=10.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rrm_cuda.dense_energy_loss(images, probs, rois, labels, sigma_rgb=15.0, sigma_xy=10.0)


@pytest.mark.parametrize("stats_op", [False, True])
def test_denormalised_images_pass_the_range_check(monkeypatch, stats_op):
    # AFA / ToCo hand the loss x * std + mean of a normalised batch: float rounding leaves values a
    # few 1e-5 outside [0, 255], which half a grey level of slack accepts (both statistics paths)
    monkeypatch.setattr(E, "_STATS_OP_ON_CPU", stats_op)
    images, probs, rois, labels = _inputs(H=12, W=14, dtype=torch.float32)
    images[0, :, 0, :3] = torch.tensor([0.0, 255.0, 128.0])
    mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
    denorm = (images - mean) / std * std + mean
    assert float(denorm.min()) < 0 or float(denorm.max()) > 255  # the rounding this is about
    got = rrm_cuda.dense_energy_loss(denorm, probs, rois, labels, sigma_rgb=15.0, sigma_xy=10.0)
    want = rrm_cuda.dense_energy_loss(images, probs, rois, labels, sigma_rgb=15.0, sigma_xy=10.0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    "over,exc,match",
    [
        (dict(seg_label=lambda t: t.masked_fill(t == 0, 7)), ValueError, "seg_label must hold class indices"),
        (dict(seg_label=lambda t: t + 0.5), ValueError, "seg_label"),
        (dict(rois=lambda t: t * 0.5), ValueError, "ROIs must be a 0/1"),
        (dict(images=lambda t: t + 300), ValueError, "images must be on the 0-255"),
        (dict(images=lambda t: t - 0.6), ValueError, "images must be on the 0-255"),  # beyond the slack
        (dict(images=lambda t: (t - 123.675) / 58.395), ValueError, "not normalised"),  # a normalised image
        (dict(images=lambda t: t[:, :1].expand(-1, 20, -1, -1)), ValueError, "images must have 1 to 14"),
        (dict(segmentations=lambda t: t * 3), ValueError, "segmentations must be probabilities"),
        (dict(segmentations=lambda t: t - 0.5), ValueError, "not logits"),
        (dict(rois=lambda t: t.masked_fill(t == 0, float("nan"))), ValueError, "ROIs contains NaN"),
        (dict(seg_label=lambda t: t.long().masked_fill(t == 1, -1)), ValueError, "seg_label must hold"),
        (dict(seg_label=lambda t: t.long().masked_fill(t == 1, 3)), ValueError, r"seg_label.*\(e\.g\. 3\)"),
        (dict(seg_label=lambda t: t.masked_fill(t == 255, 255.5)), ValueError, r"seg_label.*\(e\.g\. 255\.5\)"),
        (dict(seg_label=lambda t: t.masked_fill(t == 1, float("nan"))), ValueError, "seg_label contains NaN"),
        (dict(rois=lambda t: t.to(torch.uint8).masked_fill(t == 0, 2)), ValueError, "ROIs must be a 0/1"),
        (dict(rois=lambda t: t.masked_fill(t == 0, -1.0)), ValueError, "ROIs must be a 0/1"),
        (dict(rois=lambda t: t.masked_fill(t == 0, float("inf"))), ValueError, "ROIs contains Inf"),
        (dict(segmentations=lambda t: t * 0.5), ValueError, "probability distribution"),
        (dict(segmentations=lambda t: t * 0.985), ValueError, "sums deviate from 1 by up to 0.015"),
        (dict(segmentations=lambda t: t[:1]), ValueError, "images must have shape"),
        (dict(rois=lambda t: t[:, :3]), ValueError, "ROIs must have shape"),
        (dict(seg_label=lambda t: t[:, :, :3]), ValueError, "seg_label must have shape"),
        (dict(segmentations=lambda t: t.long()), TypeError, "segmentations must have dtype"),
        (dict(segmentations=lambda t: t[0]), ValueError, "segmentations must have 4 dimensions"),
        (dict(images=lambda t: t.bool()), TypeError, "images must be uint8 or floating"),
        (dict(segmentations=lambda t: t.masked_fill(t > 0.9, float("nan"))), ValueError, "contains NaN"),
        (dict(images=lambda t: t.masked_fill(t > 200, float("inf"))), ValueError, "images contains Inf"),
        (dict(images=lambda t: t.to("meta")), ValueError, "same device"),
        (dict(sigma_rgb=0.0), ValueError, "sigma_rgb must be positive"),
        (dict(sigma_xy=-1.0), ValueError, "sigma_xy must be positive"),
        (dict(scale_factor=0.0), ValueError, "scale_factor must be positive"),
        (dict(scale_factor=2.0), ValueError, "scale_factor must be in"),
        (dict(scale_factor=0.1), ValueError, r"scale_factor=0.1 shrinks the 6x6 images to 0x0 pixels"),
        (dict(scale_factor=0.16), ValueError, r"to 0x0 pixels; use a larger scale_factor \(at least 0.167\)"),
        (dict(gradient="approx"), ValueError, "gradient must be"),
        (dict(weight="a"), TypeError, "weight must be a number"),
        (dict(segmentations=[1.0]), TypeError, "segmentations must be a torch.Tensor"),
    ],
)
@pytest.mark.parametrize("stats_op", [False, True])  # the ATen reductions / the one-pass op
@pytest.mark.parametrize("scale", [1.0, 0.5])  # 0.5: the probabilities' statistics from dense_energy_inputs
def test_bad_inputs(over, exc, match, stats_op, scale, monkeypatch):
    monkeypatch.setattr(E, "_STATS_OP_ON_CPU", stats_op)
    over = {"scale_factor": scale, **over}
    with pytest.raises(exc, match=match):
        _bad(**over)()


@pytest.mark.parametrize("stats_op", [False, True])
def test_bfloat16_rounded_probabilities_pass_the_check(stats_op, monkeypatch):
    # A mixed-precision network's softmax, rounded to bfloat16 and cast back: its sums miss 1 by up to
    # ~3e-3 at 21 classes, which the distribution check (1e-2) must accept.
    monkeypatch.setattr(E, "_STATS_OP_ON_CPU", stats_op)
    images, probs, rois, labels = _inputs(B=2, K=21, H=12, W=12, dtype=torch.float32)
    p16 = probs.bfloat16().float()
    assert float((p16.sum(1) - 1).abs().max()) > 1e-3
    for p in (p16, p16.bfloat16()):
        loss = rrm_cuda.dense_energy_loss(images, p, rois, labels, sigma_rgb=15.0, sigma_xy=10.0)
        assert torch.isfinite(loss)


@pytest.mark.parametrize("stats_op", [False, True])
def test_valid_label_and_roi_dtypes(stats_op, monkeypatch):
    monkeypatch.setattr(E, "_STATS_OP_ON_CPU", stats_op)
    images, probs, rois, labels = _inputs(H=6, W=6, dtype=torch.float32)
    ref = rrm_cuda.dense_energy_loss(images, probs, rois, labels, sigma_rgb=15.0, sigma_xy=10.0)
    for lab in (labels.long(), labels.to(torch.uint8), labels.reshape(2, 6, 6)):
        for roi in (rois.bool(), rois.to(torch.uint8), rois.double()):
            out = rrm_cuda.dense_energy_loss(images.to(torch.uint8), probs, roi, lab, sigma_rgb=15.0, sigma_xy=10.0)
            torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("defer", [False, True])
def test_deferred_value_checks(defer, monkeypatch):
    # Where the one-pass statistics op runs (GPUs; here forced on the CPU), the checked loss reads
    # them after ops.dense_energy_sum is queued (E._DEFER_CHECKS): a bad input raises the same error,
    # after the op ran on it (safe: the lattice gives bad features no weight), instead of before.
    monkeypatch.setattr(E, "_STATS_OP_ON_CPU", True)
    monkeypatch.setattr(E, "_DEFER_CHECKS", defer)
    monkeypatch.setattr(E, "_DEFER_CHECKS_ON_CPU", True)
    log = []
    monkeypatch.setattr(E, "ops", OpSpy(E.ops, "dense_energy_sum", log))
    images, probs, rois, labels = _inputs(H=8, W=8, dtype=torch.float32)
    good = rrm_cuda.dense_energy_loss(images, probs, rois, labels, sigma_rgb=15.0, sigma_xy=10.0)
    assert log == ["dense_energy_sum"] and torch.isfinite(good)
    cases = [
        (images * 300, "images must be on the 0-255 scale"),
        (images.masked_fill(images > 200, float("nan")), "images contains NaN"),
    ]
    for bad_images, match in cases:
        log.clear()
        with pytest.raises(ValueError, match=match):
            rrm_cuda.dense_energy_loss(bad_images, probs, rois, labels, sigma_rgb=15.0, sigma_xy=10.0)
        assert log == (["dense_energy_sum"] if defer else [])
    bad_labels = labels.masked_fill(labels == 1, 7)
    log.clear()
    with pytest.raises(ValueError, match="seg_label must hold class indices"):
        rrm_cuda.dense_energy_loss(images, probs, rois, bad_labels, sigma_rgb=15.0, sigma_xy=10.0)
    assert log == (["dense_energy_sum"] if defer else [])
    # the result is the same either way
    monkeypatch.setattr(E, "_DEFER_CHECKS", not defer)
    other = rrm_cuda.dense_energy_loss(images, probs, rois, labels, sigma_rgb=15.0, sigma_xy=10.0)
    assert torch.equal(good, other)


@pytest.mark.parametrize("stats_op", [False, True])  # True: the deferred checks (E._DEFER_CHECKS)
@pytest.mark.parametrize("check_inputs", [True, False])
def test_key_range_refuses_tiny_sigmas(check_inputs, stats_op, monkeypatch):
    monkeypatch.setattr(E, "_STATS_OP_ON_CPU", stats_op)
    # The features' range is bounded from the positions' and the images' ranges (not read): the
    # int32 lattice keys still refuse sigmas so small that the elevated coordinates would overflow.
    images, probs, rois, labels = _inputs(H=6, W=6, dtype=torch.float32)
    for kw in (dict(sigma_rgb=1e-7, sigma_xy=10.0), dict(sigma_rgb=15.0, sigma_xy=1e-8)):
        with pytest.raises(ValueError, match="overflow the lattice's integer keys"):
            rrm_cuda.dense_energy_loss(images, probs, rois, labels, check_inputs=check_inputs, **kw)
    per_image = torch.tensor([15.0, 1e-7])
    with pytest.raises(ValueError, match="overflow the lattice's integer keys"):
        rrm_cuda.dense_energy_loss(images, probs, rois, labels, sigma_rgb=per_image, check_inputs=check_inputs)
    # dark images: the checked path bounds the colours by the images' maximum (10 / 2e-4 fits the
    # float32 limit of 2^16), the unchecked one by 255 (255 / 2e-4 does not)
    dark = images * (10 / 255)
    call = lambda: rrm_cuda.dense_energy_loss(  # noqa: E731
        dark, probs, rois, labels, sigma_rgb=2e-4, sigma_xy=10.0, check_inputs=check_inputs
    )
    if check_inputs:
        assert bool(torch.isfinite(call()))
    else:
        with pytest.raises(ValueError, match="exceed 65536, beyond which float32 lattice weights lose"):
            call()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e30, 3e9])
def test_unchecked_bad_images_stay_in_the_lattice_range(bad):
    # check_inputs=False reads no value, but features that would corrupt the lattice's hash table
    # (NaN, Inf, beyond the int32 keys) get no lattice weight in the embedding instead of crashing
    # the op
    images, probs, rois, labels = _inputs(H=12, W=12, dtype=torch.float32)
    images[:, :, 3:7] = bad
    p = probs.clone().requires_grad_()
    loss = rrm_cuda.dense_energy_loss(images, p, rois, labels, sigma_rgb=15.0, sigma_xy=10.0, check_inputs=False)
    loss.backward()
    assert p.grad.shape == probs.shape
    assert torch.isfinite(loss) and torch.isfinite(p.grad).all()
    with pytest.raises(ValueError, match="images"):
        rrm_cuda.dense_energy_loss(images, p, rois, labels, sigma_rgb=15.0, sigma_xy=10.0)


@pytest.mark.parametrize("stats_op", [False, True])
@pytest.mark.parametrize("check_inputs", [True, False])
def test_value_checks_read_the_device_once(monkeypatch, check_inputs, stats_op):
    # On a GPU every read of a device value stalls the host: the checked path reads all its
    # statistics with one tolist(), the unchecked path reads nothing.
    monkeypatch.setattr(E, "_STATS_OP_ON_CPU", stats_op)
    images, probs, rois, labels = _inputs(H=8, W=8, dtype=torch.float32)
    reads = []
    for name in ("tolist", "item", "__bool__", "__float__", "__int__", "cpu"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor, name, lambda self, *a, _n=name, _r=real, **k: reads.append(_n) or _r(self, *a, **k)
        )
    p = probs.clone().requires_grad_()
    loss = rrm_cuda.dense_energy_loss(
        images, p, rois, labels, sigma_rgb=15.0, sigma_xy=10.0, scale_factor=0.5, check_inputs=check_inputs
    )
    assert reads == (["tolist"] if check_inputs else [])
    monkeypatch.undo()
    loss.backward()
    assert p.grad is not None


def test_meta_tensors_give_shapes():
    # meta tensors have no values: the value checks are skipped, the fake kernels give the shapes
    m = "meta"
    images, probs = torch.zeros(2, 3, 32, 32, device=m), torch.rand(2, 4, 32, 32, device=m)
    rois, labels = torch.ones(2, 32, 32, device=m), torch.zeros(2, 32, 32, device=m)
    loss = rrm_cuda.DenseEnergyLoss(1e-7, 15.0, 100.0, 0.5)(images, probs, rois, labels)
    assert loss.shape == (1,) and loss.device.type == "meta"
    for gradient in ("exact", "rloss"):
        assert rrm_cuda.dense_energy_loss(images, probs, gradient=gradient).shape == ()


def test_bad_inputs_module_and_op():
    images, probs, rois, labels = _inputs(H=6, W=6)
    with pytest.raises(TypeError, match="ignore_index must be an int; got NoneType"):
        rrm_cuda.dense_energy_loss(images, probs, rois, labels, ignore_index=None)
    with pytest.raises(ValueError, match=r"ignore_index \(2\) must not be a class in \[0, K = 3\)"):
        rrm_cuda.dense_energy_loss(images, probs, rois, labels, ignore_index=2)
    for big in (2**70, -(2**70), 2**63):
        with pytest.raises(ValueError, match=f"ignore_index must fit in int64; got {big}"):
            rrm_cuda.dense_energy_loss(images, probs, rois, labels, ignore_index=big)
    torch.testing.assert_close(  # a numpy integer is an int
        rrm_cuda.dense_energy_loss(images, probs, rois, labels, ignore_index=np.int64(255)),
        rrm_cuda.dense_energy_loss(images, probs, rois, labels),
    )
    # without labels ignore_index is unused: any number of classes (rloss's DenseCRFLoss, K >= 256)
    many = torch.softmax(torch.randn(2, 300, 6, 6, dtype=probs.dtype), 1)
    assert E.DenseCRFLoss(1e-3, 15.0, 40.0, 1.0)(images, many, rois).shape == (1,)
    with pytest.raises(ValueError, match="gradient must be 'exact' or 'rloss'; got 'Exact'"):
        rrm_cuda.DenseEnergyLossFunction.apply(*_op_inputs(), "Exact")
    # uint8 labels with ignore_index -1: 255 is a bad label, not "unlabelled" (no wrap-around)
    lab8 = labels.clone().masked_fill_(labels == 255, 1).to(torch.uint8)
    lab8[0, 0, 0, 0] = 255
    with pytest.raises(ValueError, match="seg_label"):
        rrm_cuda.dense_energy_loss(images, probs, rois, lab8, ignore_index=-1)
    want = rrm_cuda.dense_energy_loss(images, probs, rois, lab8.long(), ignore_index=-1, check_inputs=False)
    got = rrm_cuda.dense_energy_loss(images, probs, rois, lab8, ignore_index=-1, check_inputs=False)
    torch.testing.assert_close(got, want)
    # gradients reach the segmentations only, on the fused and the F.interpolate path alike
    for scale in (1.0, 0.5, 0.75):
        r = rois.clone().requires_grad_()
        out = rrm_cuda.dense_energy_loss(images, probs, r, labels, scale_factor=scale)
        assert not out.requires_grad
    # unsigned integer dtypes the reductions do not take (uint16): converted, then checked and used
    u16 = rrm_cuda.dense_energy_loss(images.to(torch.uint16), probs, rois.to(torch.uint16), labels.to(torch.uint16))
    torch.testing.assert_close(u16, rrm_cuda.dense_energy_loss(images, probs, rois, labels))
    with pytest.raises(ValueError, match="ROIs"):
        rrm_cuda.dense_energy_loss(images, probs, (rois * 2).to(torch.uint16), labels)
    with pytest.raises(ValueError, match="images must have 3 channels"):
        rrm_cuda.DenseEnergyLoss(1.0, 15.0, 10.0, 1.0)(images[:, :1], probs, rois, labels)
    with pytest.raises(ValueError, match="sigma_xy must be positive"):
        rrm_cuda.DenseEnergyLoss(1.0, 15.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="scale_factor must be positive"):
        rrm_cuda.DenseEnergyLoss(1.0, 15.0, 10.0, -0.5)
    probs, gate, feats, mass = _op_inputs()
    with pytest.raises(ValueError, match="gate must have shape"):
        ops.dense_energy(probs, gate[:, :3], feats, None, 0)
    with pytest.raises(ValueError, match="features must have shape"):
        ops.dense_energy(probs, gate, feats[:1], None, 0)
    with pytest.raises(ValueError, match="mass must have shape"):
        ops.dense_energy(probs, gate, feats, mass[:1], 0)
    with pytest.raises(TypeError, match="probs and features must have the same dtype"):
        ops.dense_energy(probs, gate, feats.float(), None, 0)
    with pytest.raises(ValueError, match="grad_mode must be"):
        ops.dense_energy(probs, gate, feats, None, 3)
    with pytest.raises(ValueError, match="features must have 1 <= d <= 16"):
        ops.dense_energy(probs, gate, torch.rand(2, 17, 30, dtype=torch.float64), None, 0)


# ---------------------------------------------------------------------------------------------
# options, module == functional


def test_module_equals_functional_and_compat():
    from rrm_cuda.compat.rloss import DenseEnergyLoss as Compat

    images, probs, rois, labels = _inputs(H=12, W=12, dtype=torch.float32)
    for gradient in ("rloss", "exact"):
        p1 = probs.clone().requires_grad_()
        p2 = probs.clone().requires_grad_()
        m = rrm_cuda.DenseEnergyLoss(1e-3, 15.0, 100.0, 0.5, gradient=gradient)
        out = m(images, p1, rois, labels)
        ref = rrm_cuda.dense_energy_loss(
            images,
            p2,
            rois,
            labels,
            sigma_rgb=15.0,
            sigma_xy=100.0,
            scale_factor=0.5,
            weight=1e-3,
            gradient=gradient,
        )
        torch.testing.assert_close(out, ref.reshape(1))
        out.sum().backward()
        ref.backward()
        torch.testing.assert_close(p1.grad, p2.grad)
    assert Compat is rrm_cuda.DenseEnergyLoss and Compat(1e-7, 15, 100, 0.5).gradient == "rloss"


@pytest.mark.parametrize("scale", [0.5, 1.0, 0.75])
def test_rloss_dense_crf_loss_module_matches_original_restatement(scale):
    # rloss's own DenseCRFLoss(weight, sigma_rgb, sigma_xy, scale_factor).forward(images, segs, ROIs):
    # value and the original's gradient -(2/N) AS ROI (through the downscaling), against a line-by-line
    # restatement; equal to the functional form without the gate
    from rrm_cuda.compat.rloss import DenseCRFLoss

    images, probs, rois, _ = _inputs(H=14, W=16, dtype=torch.float64, seed=5)
    m = DenseCRFLoss(1e-3, 15.0, 40.0, scale)
    assert m.gate is False and m.gradient == "rloss" and "gate" not in repr(m)
    p1, p2, p3 = (probs.clone().requires_grad_() for _ in range(3))
    out = m(images, p1, rois)
    ref = R.dense_energy_loss_module_reference(images, p2, rois, None, 1e-3, 15.0, 40.0, scale)
    fn = rrm_cuda.dense_energy_loss(
        images, p3, rois, None, sigma_rgb=15.0, sigma_xy=40.0, scale_factor=scale, weight=1e-3, gate=False
    )
    assert out.shape == (1,)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(out, fn.reshape(1))
    (g1,), (g2,) = torch.autograd.grad(out, p1), torch.autograd.grad(ref, p2)
    torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-14)
    with pytest.raises(TypeError, match="no gate"):
        DenseCRFLoss(1e-3, 15.0, 40.0, 0.5, gate=True)
    assert DenseCRFLoss(1e-3, 15.0, 40.0, 0.5, gradient="exact").gradient == "exact"


@pytest.mark.parametrize("scale", [0.5, 0.75])
def test_recompute_scale_factor_matches_the_afa_toco_copies(scale):
    # AFA / ToCo's copies of the module pass recompute_scale_factor=True to their four F.interpolate
    # calls: at odd sizes the bilinear sampling moves (size ratio instead of 1 / scale_factor). The
    # option restates them (value and gradient); at sizes that divide it changes nothing (bitwise).
    odd = _inputs(H=15, W=13, dtype=torch.float64, seed=7)
    even = _inputs(H=16, W=12, dtype=torch.float64, seed=7)
    for (images, probs, rois, labels), divides in ((odd, False), (even, True)):
        outs, grads = {}, {}
        for recompute in (False, True):
            m = rrm_cuda.DenseEnergyLoss(1e-3, 15.0, 40.0, scale, recompute_scale_factor=recompute)
            p1, p2 = (probs.clone().requires_grad_() for _ in range(2))
            out = m(images, p1, rois, labels)
            ref = R.dense_energy_loss_module_reference(
                images, p2, rois, labels, 1e-3, 15.0, 40.0, scale, recompute_scale_factor=recompute
            )
            torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-14)
            (g1,), (g2,) = torch.autograd.grad(out, p1), torch.autograd.grad(ref, p2)
            torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-14)
            outs[recompute], grads[recompute] = out, g1
        if divides and scale == 0.5:
            assert torch.equal(outs[True], outs[False]) and torch.equal(grads[True], grads[False])
        elif not divides:
            assert not torch.allclose(outs[True], outs[False], rtol=1e-6, atol=0)
    m = rrm_cuda.DenseEnergyLoss(1e-3, 15.0, 40.0, 0.5, recompute_scale_factor=True)
    assert "recompute_scale_factor=True" in repr(m)
    with pytest.raises(TypeError, match="recompute_scale_factor must be a bool; got NoneType"):
        rrm_cuda.DenseEnergyLoss(1e-3, 15.0, 40.0, 0.5, recompute_scale_factor=None)
    with pytest.raises(TypeError, match="recompute_scale_factor must be a bool; got str"):
        rrm_cuda.dense_energy_loss(*odd, recompute_scale_factor="yes")


def test_autograd_function_form():
    probs, gate, feats, mass = _op_inputs(K=3, N=40)
    for gradient, mode in (("exact", 2), ("rloss", 1)):
        p1 = probs.clone().requires_grad_()
        p2 = probs.clone().requires_grad_()
        e1, _ = rrm_cuda.DenseEnergyLossFunction.apply(p1, gate, feats, mass, gradient)
        e2, _ = ops.dense_energy(p2, gate, feats, mass, mode)
        torch.testing.assert_close(e1, e2)
        (e1 * torch.tensor([1.0, -2.0], dtype=e1.dtype)).sum().backward()
        (e2 * torch.tensor([1.0, -2.0], dtype=e2.dtype)).sum().backward()
        torch.testing.assert_close(p1.grad, p2.grad)


def test_any_image_channels():
    for c in (1, 6):
        images, probs, rois, labels = _inputs(channels=c)
        out = rrm_cuda.DenseEnergyLoss(1.0, 15.0, 6.0, 1.0, image_channels=None)(images, probs, rois, labels)
        B, K = probs.shape[:2]
        S = _gate(probs, rois, labels).reshape(B, -1)
        s_hat = (probs * rois.unsqueeze(1)).reshape(B, K, -1)
        ref = R.dense_energy_reference(s_hat, S, R.rloss_features(images, 15.0, 6.0)).sum() / B
        torch.testing.assert_close(out, ref.reshape(1))


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_per_image_sigmas(scale):
    # per-image sigmas take the ATen features, number sigmas ops.bilateral_features_2d (both fused scales)
    images, probs, rois, labels = _inputs(B=2)
    both = rrm_cuda.dense_energy_loss(
        images,
        probs,
        rois,
        labels,
        sigma_rgb=torch.tensor([15.0, 30.0]),
        sigma_xy=torch.tensor([6.0, 9.0]),
        scale_factor=scale,
    )
    one = [
        rrm_cuda.dense_energy_loss(
            images[b : b + 1],
            probs[b : b + 1],
            rois[b : b + 1],
            labels[b : b + 1],
            sigma_rgb=sr,
            sigma_xy=sx,
            scale_factor=scale,
        )
        for b, (sr, sx) in enumerate(((15.0, 6.0), (30.0, 9.0)))
    ]
    torch.testing.assert_close(both, (one[0] + one[1]) / 2)
    with pytest.raises(ValueError, match="sigma_rgb must be a number or a tensor of shape"):
        rrm_cuda.dense_energy_loss(images, probs, rois, labels, sigma_rgb=torch.tensor([15.0, 30.0, 1.0]))


def test_half_inputs_and_autocast():
    images, probs, rois, labels = _inputs(dtype=torch.float32)
    ref = rrm_cuda.dense_energy_loss(images, probs, rois, labels, sigma_rgb=15.0, sigma_xy=6.0)
    for dt in (torch.float16, torch.bfloat16):
        p = probs.to(dt).requires_grad_()
        out = rrm_cuda.dense_energy_loss(images.to(dt), p, rois, labels, sigma_rgb=15.0, sigma_xy=6.0)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, ref, rtol=2e-2, atol=1e-2)
        out.backward()
        assert p.grad.dtype == dt and bool(torch.isfinite(p.grad).all())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = torch.randn(2, 3, 10, 9, requires_grad=True)
        probs_ac = torch.softmax(F.conv2d(logits, torch.eye(3).reshape(3, 3, 1, 1)), 1)
        out = rrm_cuda.dense_energy_loss(images, probs_ac, rois, labels, sigma_rgb=15.0, sigma_xy=6.0)
    out.backward()
    assert logits.grad is not None and bool(torch.isfinite(logits.grad).all())


def test_no_grad_mode_skips_gradient():
    probs, gate, feats, _ = _op_inputs()
    e0, g0 = ops.dense_energy(probs, gate, feats, None, 0)
    e2, g2 = ops.dense_energy(probs, gate, feats, None, 2)
    assert g0.shape == (0,) and g2.shape == probs.shape
    torch.testing.assert_close(e0, e2)


# ---------------------------------------------------------------------------------------------
# emulated CUDA launch == CPU; CPU == CUDA


@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_emulated_cuda_equals_cpu(mode, dtype):
    probs, gate, feats, mass = _op_inputs(K=5, N=300, dtype=dtype)
    e1, g1 = ops.dense_energy(probs, gate, feats, mass, mode)
    e2, g2 = ops._dense_energy_emulated(probs, gate, feats, mass, mode)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(e1, e2, rtol=tol, atol=tol)
    torch.testing.assert_close(g1, g2, rtol=tol, atol=tol)


@pytest.mark.parametrize("mode", [1, 2])
def test_emulated_cuda_makes_no_fill_launches(mode, tuning):
    # The GPU path of the op zeroes its buffers without ATen fills (each a kernel launch and ~10 us of
    # host time on a GPU): the lattice's tables by the threads of its own launches, the fused splat's
    # counters by one memset (see test_permutohedral_filter's test_gpu_path_makes_no_fill_launches).
    from torch.profiler import ProfilerActivity, profile

    from rrm_cuda import _C
    from tests.conftest import photo

    tuning("splat_fused_reduce", 1)
    tuning("energy_pair_splat", 0)  # the exact gradient's two splats one after the other: one workspace
    img = torch.from_numpy(photo("coffee", (40, 48))).permute(2, 0, 1)[None].float()
    feats = rrm_cuda.bilateral_features(img, 50.0, 15.0)
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(1, 6, 40 * 48, generator=g), 1)
    gate = torch.rand(1, 40 * 48, generator=g)
    r0 = _C.lattice_table_retries()
    l0, m0 = _C.emulated_launches()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        e, gd = ops._dense_energy_emulated(probs, gate, feats, None, mode)
    assert _C.lattice_table_retries() == r0
    # (the CPU's sum of the per-pixel terms initialises its output with a fill; CUDA's does not)
    fills = [
        e.name
        for e in prof.events()
        if e.name.split("::")[-1] in ("fill_", "zero_", "zeros", "full", "ones")
        and not (e.cpu_parent is not None and e.cpu_parent.name == "aten::sum")
    ]
    assert fills == []
    launches, memsets = _C.emulated_launches()
    assert memsets - m0 == 1
    # the filter's 12 (test_gpu_path_makes_no_fill_launches) with the energy's slice and the packing of
    # the probabilities instead of the filter's slice; the exact gradient's second splat and blurs
    assert launches - l0 == (13 if mode == 1 else 17)
    e1, g1 = ops.dense_energy(probs, gate, feats, None, mode)
    torch.testing.assert_close(e, e1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gd, g1, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("K, N", [(5, 16 * 20), (7, 16 * 20 + 9), (70, 203)])
def test_cpu_slice_blocks(K, N):
    # The CPU's pack and slice take blocks of 16 pixels (energy_common.h, PackBlocksCpu and
    # SliceBlocksCpu: the gradient through a (K, 16) tile, directly into its rows beyond 64 classes),
    # with the probabilities read from the packed copy: the same values as the emulated launch's
    # pixel at a time, whole blocks, a partial last block, and more classes than the tile holds.
    probs, gate, feats, mass = _op_inputs(K=K, N=N, dtype=torch.float64)
    for m in (None, mass):
        for mode in (0, 1, 2):
            e1, g1 = ops.dense_energy(probs, gate, feats, m, mode)
            e2, g2 = ops._dense_energy_emulated(probs, gate, feats, m, mode)
            torch.testing.assert_close(e1, e2, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)


def test_launch_knobs_do_not_change_results(tuning):
    # The GPU path's launch configurations (common/tuning.h), through the emulated launch: rows of
    # 4 channels with four per thread or unpadded with one, the slice's rows read four channels or
    # one at a time, the exact gradient's splats in one pass or two, chunks launched by tile or
    # vertex, the vertices' chunk sums in the splat's launch or a second one, the blurs one or two
    # axes per launch; bitwise the same, with
    # and without the mass (class counts whose rows need 0, 1 or 3 channels of padding), for the
    # slices compiled with a fixed d (3, 5) and the generic one (4).
    settings = (
        (1, 1, 1, 64, 1, 1),
        (0, 1, 1, 64, 1, 1),
        (1, 0, 1, 64, 1, 1),
        (1, 1, 0, 64, 1, 1),
        (0, 0, 0, 0, 0, 0),
        (1, 1, 1, 0, 1, 1),
        (1, 1, 1, 64, 0, 1),
        (0, 0, 1, 0, 1, 1),
        (1, 1, 1, 64, 1, 0),
        (0, 1, 0, 64, 0, 1),
    )
    for d, K in ((5, 3), (5, 4), (5, 6), (3, 4), (4, 5)):
        probs, gate, feats, mass = _op_inputs(K=K, N=400, d=d, dtype=torch.float32)
        for mode in (0, 1, 2):
            for m in (None, mass):
                outs = []
                for rows4, slice4, pair, tile, fused, blur2 in settings:
                    tuning("energy_rows4", rows4)
                    tuning("energy_slice4", slice4)
                    tuning("energy_pair_splat", pair)
                    tuning("splat_tile", tile)
                    tuning("splat_fused_reduce", fused)
                    tuning("blur_pairs", blur2)
                    outs.append(ops._dense_energy_emulated(probs, gate, feats, m, mode))
                for e, g in outs[1:]:
                    assert torch.equal(e, outs[0][0]) and torch.equal(g, outs[0][1]), (d, K, mode, m is None)


def test_counted_lattice_gives_the_same_bits(tuning):
    # Knob counted_lattice: the lattice built without reading its vertex count back (buffers for
    # N (d+1) vertices, every launch over vertices or chunks over the counts in device memory: no host
    # wait, capturable in a CUDA graph). Through the emulated launch, whose counted workspaces are
    # filled with NaN (and 0 for indices) so that a read of a row beyond the counts shows: bitwise the
    # read-back build's results, for images whose vertex counts differ (smooth and noisy features in
    # one batch, up to M = E), one pixel, d = 1..6, every mode, with and without the mass, and the
    # launch settings that change which buffers and launches the filter uses.
    _C = rrm_cuda._ext._C
    g = torch.Generator().manual_seed(5)
    cases = [(2, 3, 30, 5), (3, 4, 200, 5), (1, 2, 1, 2), (2, 5, 64, 1), (2, 3, 90, 3), (2, 6, 80, 6)]
    for B, K, N, d in cases:
        for dtype in (torch.float32, torch.float64):
            probs = torch.rand(B, K, N, generator=g, dtype=dtype)
            gate = torch.rand(B, N, generator=g, dtype=dtype)
            # image 0 smooth (few vertices), the others noise at growing scale (up to one vertex per entry)
            scale = torch.tensor([0.2] + [4.0 * 10**b for b in range(B - 1)], dtype=dtype).reshape(B, 1, 1)
            feats = torch.rand(B, d, N, generator=g, dtype=dtype) * scale
            mass = torch.rand(B, N, generator=g, dtype=dtype)
            for mode in (0, 1, 2):
                for m in (None, mass):
                    for rows4, pair, blur2 in ((1, 1, 1), (0, 0, 0), (1, 0, 1), (0, 1, 0)):
                        tuning("energy_rows4", rows4)
                        tuning("energy_pair_splat", pair)
                        tuning("blur_pairs", blur2)
                        tuning("counted_lattice", 0)
                        before = _C.lattice_counted_builds()
                        e0, g0 = ops._dense_energy_emulated(probs, gate, feats, m, mode)
                        assert _C.lattice_counted_builds() == before
                        tuning("counted_lattice", 1)
                        e1, g1 = ops._dense_energy_emulated(probs, gate, feats, m, mode)
                        assert _C.lattice_counted_builds() == before + 1  # the counted build ran
                        where = (B, K, N, d, dtype, mode, m is None, rows4, pair, blur2)
                        assert torch.equal(e0, e1) and torch.equal(g0, g1), where
    # The CPU kernels build with the read (a counted lattice is a GPU form); results unchanged.
    probs, gate, feats, mass = _op_inputs(K=4, N=100)
    tuning("counted_lattice", 1)
    before = _C.lattice_counted_builds()
    e1, g1 = ops.dense_energy(probs, gate, feats, mass, 2)
    assert _C.lattice_counted_builds() == before
    tuning("counted_lattice", 0)
    e0, g0 = ops.dense_energy(probs, gate, feats, mass, 2)
    assert torch.equal(e0, e1) and torch.equal(g0, g1)


def test_cpu_thread_count_does_not_change_result():
    probs, gate, feats, mass = _op_inputs(K=6, N=5000, dtype=torch.float32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        e1, g1 = ops.dense_energy(probs, gate, feats, mass, 2)
        torch.set_num_threads(2)
        e2, g2 = ops.dense_energy(probs, gate, feats, mass, 2)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(e1, e2, rtol=1e-6, atol=0)
    # the CPU splat sums per-thread partial lattices: the last bits may depend on the thread count
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("threads", [2, 3])
def test_cpu_images_across_threads_same_bits_as_one_image_on_one_thread(threads):
    # With at least as many images as threads (>= 2) the CPU op runs whole images on threads
    # (energy_cpu.cpp); each image must come out as the op computes it alone on one thread, bit for
    # bit: terms, both gradients, the mass, float32/64, 21 classes (the slice's 8-channel tiles), and
    # a long image (N >= 32768, where a parallel sum of the terms would split the row).
    before = torch.get_num_threads()
    try:
        for dtype, B, K, N in ((torch.float32, 5, 21, 3000), (torch.float64, 5, 6, 3000), (torch.float32, 3, 3, 40000)):
            probs, gate, feats, mass = _op_inputs(B=B, K=K, N=N, dtype=dtype, seed=3)
            feats[1] *= 2  # images of different lattice sizes
            for m in (None, mass):
                for mode in (0, 1, 2):
                    torch.set_num_threads(threads)
                    e, g = ops.dense_energy(probs, gate, feats, m, mode)
                    torch.set_num_threads(1)
                    for b in range(B):
                        one = m[b : b + 1] if m is not None else None
                        eb, gb = ops.dense_energy(probs[b : b + 1], gate[b : b + 1], feats[b : b + 1], one, mode)
                        where = (dtype, K, N, m is None, mode, b)
                        assert torch.equal(e[b : b + 1], eb), where
                        if mode:
                            assert torch.equal(g[b : b + 1], gb), where
                        else:
                            assert g.shape == gb.shape == (0,)
        # the workers run under the caller's thread-local state: inference mode works as on one thread
        torch.set_num_threads(threads)
        probs, gate, feats, mass = _op_inputs(B=4, K=3, N=500, dtype=torch.float32)
        with torch.inference_mode():
            e_inf, g_inf = ops.dense_energy(probs, gate, feats, mass, 2)
        e, g = ops.dense_energy(probs, gate, feats, mass, 2)
        assert torch.equal(e_inf, e) and torch.equal(g_inf, g)
        images, probs4 = torch.rand(4, 3, 20, 25) * 255, torch.softmax(torch.randn(4, 3, 20, 25), 1)
        with torch.inference_mode():
            loss = rrm_cuda.dense_energy_loss(images, probs4, sigma_rgb=15.0, sigma_xy=10.0)
        assert torch.equal(loss, rrm_cuda.dense_energy_loss(images, probs4, sigma_rgb=15.0, sigma_xy=10.0).detach())
    finally:
        torch.set_num_threads(before)


@pytest.mark.cuda
def test_cpu_equals_cuda(cuda):  # the fixture skips without a GPU, fails on a GPU without CUDA kernels
    images, probs, rois, labels = _inputs(B=3, K=4, H=40, W=36, dtype=torch.float32)
    for gradient in ("exact", "rloss"):
        outs, grads = [], []
        for dev in ("cpu", cuda):
            p = probs.to(dev).detach().requires_grad_()
            out = rrm_cuda.dense_energy_loss(
                images.to(dev),
                p,
                rois.to(dev),
                labels.to(dev),
                sigma_rgb=15.0,
                sigma_xy=20.0,
                scale_factor=0.5,
                gradient=gradient,
                nonnegative=True,
            )
            out.backward()
            outs.append(out.cpu())
            grads.append(p.grad.cpu())
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
def test_cuda_counted_lattice_gives_the_same_bits(cuda, tuning):
    # Knob counted_lattice on the GPU: the lattice's count never read back, the same bits (the
    # emulated launch's test above covers the shapes; here the CUDA kernels, counted grid included).
    g = torch.Generator().manual_seed(3)
    for B, N, d in ((3, 900, 5), (2, 50, 3), (4, 6000, 5)):
        probs = torch.rand(B, 6, N, generator=g).to(cuda)
        gate = torch.rand(B, N, generator=g).to(cuda)
        scale = torch.tensor([0.3] + [5.0] * (B - 1)).reshape(B, 1, 1)
        feats = (torch.rand(B, d, N, generator=g) * scale).to(cuda)
        for mode in (0, 1, 2):
            tuning("counted_lattice", 0)
            e0, g0 = ops.dense_energy(probs, gate, feats, None, mode)
            tuning("counted_lattice", 1)
            before = rrm_cuda._ext._C.lattice_counted_builds()
            e1, g1 = ops.dense_energy(probs, gate, feats, None, mode)
            assert rrm_cuda._ext._C.lattice_counted_builds() == before + 1
            assert torch.equal(e0, e1) and torch.equal(g0, g1), (B, N, d, mode)


@pytest.mark.cuda
@pytest.mark.parametrize("gradient", ["rloss", "exact"])
def test_cuda_graph_capture_of_the_loss(cuda, gradient):
    # The energy loss's forward and backward captured in one CUDA graph (its lattice is a counted one
    # under capture: no host read), replayed on new inputs copied into the captured ones: the eager
    # loss and gradient. A lattice op that reads its size back refuses the capture with a clear error.
    images, probs, rois, labels = (t.to(cuda) for t in _inputs(B=2, K=4, H=48, W=40, dtype=torch.float32))
    mod = rrm_cuda.DenseEnergyLoss(1e-3, 15.0, 40.0, 0.5, gradient=gradient)
    static = probs.clone().requires_grad_()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (checked, eager) on a side stream, as torch.cuda.graph asks
        for _ in range(2):
            static.grad = None
            mod(images, static, rois, labels).backward()
    torch.cuda.current_stream().wait_stream(side)
    static.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = mod(images, static, rois, labels)
        loss.backward()
    for seed in (1, 2):
        _, fresh, _, _ = _inputs(B=2, K=4, H=48, W=40, dtype=torch.float32, seed=seed)
        with torch.no_grad():
            static.copy_(fresh.to(cuda))
        graph.replay()
        p = fresh.to(cuda).requires_grad_()
        want = mod(images, p, rois, labels)
        want.backward()
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=0)
        torch.testing.assert_close(static.grad, p.grad, rtol=1e-5, atol=1e-7)
    feats = torch.rand(1, 2, 400, device=cuda) * 4
    ops.lattice_num_vertices(feats)  # eager: fine
    with pytest.raises(RuntimeError, match="CUDA graph capture does not allow"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            ops.lattice_num_vertices(feats)


@pytest.mark.cuda
def test_cuda_make_graphed_callables(cuda):
    # The drop-in module through torch.cuda.make_graphed_callables (its forward and backward each
    # captured in a CUDA graph, the network around it left eager): the eager loss and gradient.
    images, probs, rois, labels = (t.to(cuda) for t in _inputs(B=2, K=4, H=48, W=40, dtype=torch.float32))
    mod = rrm_cuda.DenseEnergyLoss(1e-3, 15.0, 40.0, 0.5)
    graphed = torch.cuda.make_graphed_callables(mod, (images, probs.clone().requires_grad_(), rois, labels))
    for seed in (1, 2):
        fresh = _inputs(B=2, K=4, H=48, W=40, dtype=torch.float32, seed=seed)[1].to(cuda)
        p, q = fresh.clone().requires_grad_(), fresh.clone().requires_grad_()
        got = graphed(images, p, rois, labels)
        got.backward()
        want = mod(images, q, rois, labels)
        want.backward()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.cuda
@pytest.mark.parametrize("grad_mode", [0, 1, 2])
@pytest.mark.parametrize("d", [3, 5, 7])
def test_cuda_op_matches_cpu_and_gradcheck(cuda, grad_mode, d):
    probs, gate, feats, mass = _op_inputs(B=3, K=5, N=400, d=d)
    a = ops.dense_energy(probs, gate, feats, mass, grad_mode)
    b = ops.dense_energy(probs.to(cuda), gate.to(cuda), feats.to(cuda), mass.to(cuda), grad_mode)
    for x, y in zip(a, b):
        torch.testing.assert_close(y.cpu(), x, rtol=1e-10, atol=1e-10)
    if grad_mode == 2:
        p = probs[:2, :, :24].to(cuda).requires_grad_()
        args = (gate[:2, :24].to(cuda), feats[:2, :, :24].to(cuda), mass[:2, :24].to(cuda), 2)
        assert torch.autograd.gradcheck(lambda q: ops.dense_energy(q, *args)[0], (p,), fast_mode=True)
        torch.library.opcheck(ops.dense_energy, (p,) + args)


@pytest.mark.cuda
@pytest.mark.parametrize("scale", [0.5, 1.0])
def test_cuda_fused_loss_matches_cpu(cuda, scale):
    # On a GPU the loss runs dense_energy_loss_fused (one node; its backward hands grad * factor to the
    # inputs' backward kernel) and dense_energy_sum: loss and gradient as the CPU's, with and without
    # the gate, ROIs and the mass; the op itself against the CPU's; opcheck on CUDA tensors.
    images, probs, rois, labels = _inputs(B=3, K=4, H=14, W=13, dtype=torch.float64, seed=9)
    for kw in (dict(gradient="rloss"), dict(gradient="exact", nonnegative=True), dict(gradient="exact", gate=False)):
        outs = []
        for dev in ("cpu", cuda):
            p = probs.to(dev).requires_grad_()
            loss = rrm_cuda.dense_energy_loss(
                images.to(dev),
                p,
                rois.to(dev),
                labels.to(dev),
                sigma_rgb=15.0,
                sigma_xy=5.0,
                scale_factor=scale,
                weight=0.7,
                check_inputs=False,
                **kw,
            )
            assert "DenseEnergyLossFused" in loss.grad_fn.name()
            outs.append((loss.detach().cpu(), torch.autograd.grad(loss, p)[0].cpu()))
        torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-10, atol=1e-12)
    stride = 2 if scale == 0.5 else 1
    unl = (labels.reshape(3, 14, 13) == 255).to(cuda)
    small = images[:, :, ::stride, ::stride][:, :, : 14 // stride, : 13 // stride]
    feats = rrm_cuda.bilateral_features(small, 5.0, 15.0, dtype=torch.float64).to(cuda)
    p = probs.to(cuda).requires_grad_()
    args = (rois.to(cuda), unl, stride, True, feats, None, 2, 0.25)
    torch.library.opcheck(ops.dense_energy_loss_fused, (p,) + args)


@pytest.mark.cuda
def test_cuda_modules_take_host_images_rois_and_labels(cuda):
    # RRM and rloss call their modules with images, ROIs and labels from numpy (CPU tensors) and the
    # probabilities on the GPU: the drop-ins move them (the functional form refuses mixed devices)
    from rrm_cuda.compat.rloss import DenseCRFLoss, DenseEnergyLoss

    images, probs, rois, labels = _inputs(B=2, K=5, H=40, W=42, dtype=torch.float32, seed=6)
    for m, extra in ((DenseEnergyLoss(1e-3, 15.0, 100.0, 0.5), (labels,)), (DenseCRFLoss(1e-3, 15.0, 100.0, 0.5), ())):
        p1, p2 = probs.to(cuda).requires_grad_(), probs.to(cuda).requires_grad_()
        host = m(images, p1, rois, *extra)
        dev = m(images.to(cuda), p2, rois.to(cuda), *(x.to(cuda) for x in extra))
        assert host.device == p1.device
        torch.testing.assert_close(host, dev)
        torch.testing.assert_close(torch.autograd.grad(host, p1)[0], torch.autograd.grad(dev, p2)[0])


@pytest.mark.cuda
def test_cuda_module_autocast_and_full_size(cuda):
    images, probs, rois, labels = _inputs(B=2, K=21, H=161, W=161, dtype=torch.float32, seed=3)
    m = rrm_cuda.DenseEnergyLoss(1e-3, 15.0, 100.0, 0.5)
    outs, grads = [], []
    for dev in ("cpu", cuda):
        p = probs.to(dev).detach().requires_grad_()
        out = m(images.to(dev), p, rois.to(dev), labels.to(dev))
        assert out.device.type == torch.device(dev).type
        out.sum().backward()
        outs.append(out.cpu())
        grads.append(p.grad.cpu())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-9)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        p = probs.detach().to(cuda, torch.bfloat16).requires_grad_()
        out = rrm_cuda.dense_energy_loss(images.to(cuda), p, rois.to(cuda), labels.to(cuda), scale_factor=0.5)
    out.backward()
    assert p.grad.dtype == torch.bfloat16 and bool(torch.isfinite(p.grad).all())
    ref = rrm_cuda.dense_energy_loss(
        images, probs.bfloat16().float(), rois, labels, scale_factor=0.5, check_inputs=False
    )
    torch.testing.assert_close(out.float().cpu(), ref, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="same device"):
        rrm_cuda.dense_energy_loss(images, probs.to(cuda), rois.to(cuda), labels.to(cuda))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_inputs_op_equals_cpu_and_is_deterministic(cuda, dtype):
    images, probs, rois, labels = _inputs(B=2, K=21, H=65, W=47, dtype=dtype, seed=4)
    unl = labels.reshape(2, 65, 47) == 255
    go = torch.randn(2, 21, 32, 23, dtype=dtype, generator=torch.Generator().manual_seed(5))
    for stride in (1, 2):
        gs = go if stride == 2 else torch.randn(2, 21, 65, 47, dtype=dtype)
        outs = []
        for dev in ("cpu", cuda):
            x = probs.detach().to(dev).requires_grad_()
            p, g, _ = ops.dense_energy_inputs(x, rois.to(dev), unl.to(dev), stride, True)
            (gx,) = torch.autograd.grad(p, x, gs.to(dev))
            outs.append((p.cpu(), g.cpu(), gx.cpu()))
        for a, b in zip(*outs):
            assert torch.equal(a, b)  # the same arithmetic on both devices, no atomics
    # F.interpolate's CUDA backward is not deterministic (atomic adds), so deterministic mode refused
    # the loss at scale 0.5 before the fused op; it runs now.
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        p = probs.detach().float().to(cuda).requires_grad_()  # a leaf, whatever probs' dtype
        loss = rrm_cuda.DenseEnergyLoss(1e-3, 15.0, 100.0, 0.5)(images.to(cuda), p, rois.to(cuda), labels.to(cuda))
        loss.sum().backward()
        assert bool(torch.isfinite(p.grad).all())
    finally:
        torch.use_deterministic_algorithms(before)


@pytest.mark.cuda
def test_cuda_input_stats_equal_cpu(cuda):
    images, probs, rois, labels = _inputs(B=3, K=21, H=41, W=37, dtype=torch.float32, seed=6)
    lab3 = labels.reshape(3, 41, 37)
    probs[2, 3, 7, 7] = float("nan")
    for args in ((images, probs, rois, lab3), (images.to(torch.uint8), probs[:2].half(), None, lab3[:2].long())):
        if args[0].shape[0] != args[1].shape[0]:
            args = (args[0][: args[1].shape[0]],) + args[1:]
        want = ops.dense_energy_input_stats(*args, 255.0, True)
        got = ops.dense_energy_input_stats(*(a.to(cuda) if a is not None else None for a in args), 255.0, True)
        # entries 4, 5 are the extremes of the per-pixel sums over the classes, which the CPU adds in
        # the probabilities' dtype (float32 for half; csrc/energy/input_stats_cpu.h) and CUDA in
        # double: equal to float32 rounding; the ranges and flags are exact
        keep = [0, 1, 2, 3, 6, 7]
        torch.testing.assert_close(got.cpu()[keep], want[keep], rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(got.cpu()[4:6], want[4:6], rtol=1e-6, atol=0, equal_nan=True)


# ---------------------------------------------------------------------------------------------
# pixel order: 16 x 16 tiles (dense_crf's; the GPU's default)


@pytest.mark.parametrize("scale", [0.5, 1.0])
def test_pixel_tile_order_gives_the_raster_result(pixel_tile, scale):
    # The op's points in tile order: the same loss and gradient up to the summation order (last
    # bits), for both gradients, with and without the gate, the non-negative form (mass), through the
    # fused 0.5 downscale and at full scale
    images, probs, rois, labels = _inputs(B=2, K=4, H=38, W=44, dtype=torch.float32, seed=3)
    cases = [dict(gradient="exact"), dict(gradient="rloss"), dict(gate=False, nonnegative=True)]

    def run(kw):
        p = probs.clone().requires_grad_()
        loss = rrm_cuda.dense_energy_loss(
            images, p, rois, labels, sigma_rgb=15.0, sigma_xy=20.0, scale_factor=scale, **kw
        )
        return loss.detach(), torch.autograd.grad(loss, p)[0]

    pixel_tile("cpu", 0)
    ref = [run(kw) for kw in cases]
    pixel_tile("cpu", 16)
    got = [run(kw) for kw in cases]
    changed = False
    for (l1, g1), (l2, g2) in zip(got, ref):
        torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-7)
        changed |= not torch.equal(g1, g2) or not torch.equal(l1, l2)
    assert changed  # the order was applied (it changes the summation's last bits)


def test_pixel_tile_order_gradcheck_and_compile(pixel_tile):
    pixel_tile("cpu", 16)
    images, probs, rois, _ = _inputs(B=1, K=2, H=36, W=36)
    p = probs.clone().requires_grad_()
    fn = lambda q: rrm_cuda.dense_energy_loss(  # noqa: E731
        images, q, rois, sigma_rgb=15.0, sigma_xy=8.0, scale_factor=0.5, gate=False, nonnegative=True
    )
    assert torch.autograd.gradcheck(fn, (p,), fast_mode=True)
    images, probs, rois, labels = _inputs(B=2, K=3, H=40, W=34, dtype=torch.float32)

    def loss(x):
        return rrm_cuda.dense_energy_loss(
            images, torch.softmax(x, 1), rois, labels, sigma_rgb=15.0, sigma_xy=6.0, scale_factor=0.5
        )

    l1, l2 = torch.log(probs).requires_grad_(), torch.log(probs).requires_grad_()
    ref = loss(l1)
    out = torch.compile(loss, fullgraph=True, backend="aot_eager")(l2)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(torch.autograd.grad(out, l2)[0], torch.autograd.grad(ref, l1)[0])


@pytest.mark.cuda
def test_cuda_pixel_tile_order(cuda, pixel_tile):
    images, probs, rois, labels = _inputs(B=2, K=5, H=66, W=70, dtype=torch.float32, seed=4)
    p = probs.clone().requires_grad_()
    lc = rrm_cuda.dense_energy_loss(images, p, rois, labels, sigma_rgb=15.0, sigma_xy=30.0, scale_factor=0.5)
    gc = torch.autograd.grad(lc, p)[0]
    out = {}
    for tile in (0, 16):
        pixel_tile("cuda", tile)
        pg = probs.to(cuda).requires_grad_()
        args = (images.to(cuda), pg, rois.to(cuda), labels.to(cuda))
        lg = rrm_cuda.dense_energy_loss(*args, sigma_rgb=15.0, sigma_xy=30.0, scale_factor=0.5)
        out[tile] = (lg, torch.autograd.grad(lg, pg)[0])
    for lg, gg in out.values():
        torch.testing.assert_close(lg.cpu(), lc, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gg.cpu(), gc, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# torch.compile


def test_torch_compile():
    images, probs, rois, labels = _inputs(dtype=torch.float32)

    def loss(p):
        return rrm_cuda.dense_energy_loss(
            images, torch.softmax(p, 1), rois, labels, sigma_rgb=15.0, sigma_xy=6.0, scale_factor=0.5
        )

    logits = torch.log(probs)
    l1 = logits.clone().requires_grad_()
    l2 = logits.clone().requires_grad_()
    ref = loss(l1)
    ref.backward()
    out = torch.compile(loss, fullgraph=True, backend="aot_eager")(l2)
    out.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(l2.grad, l1.grad)


def test_check_inputs_off_skips_value_checks_only():
    images, probs, rois, labels = _inputs(H=6, W=6)
    out = rrm_cuda.dense_energy_loss(
        images, probs * 0.5, rois, labels, sigma_rgb=15.0, sigma_xy=10.0, check_inputs=False
    )
    assert bool(torch.isfinite(out))
    with pytest.raises(ValueError, match="ROIs must have shape"):
        rrm_cuda.dense_energy_loss(images, probs, rois[:, :2], labels, check_inputs=False)


# ---- torch.compile ---------------------------------------------------------------------------


@pytest.mark.parametrize("gradient", ["rloss", "exact"])
@pytest.mark.parametrize("scale", [0.5, 0.75])  # the fused inputs op; F.interpolate
def test_compile_fullgraph_loss_and_gradient(gradient, scale):
    # The loss traces whole (its value checks skipped while tracing), and the C++ autograd of its ops
    # (csrc/energy/energy_autograd.cpp) traces into the backward graph: loss and gradient as eager.
    images, probs, rois, labels = _inputs(B=2, K=3, H=12, W=11, dtype=torch.float64, seed=8)

    def fn(p):
        return rrm_cuda.dense_energy_loss(
            images, p * 1.0, rois, labels, sigma_rgb=15.0, sigma_xy=5.0, scale_factor=scale, gradient=gradient
        )

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    p1, p2 = probs.detach().clone().requires_grad_(), probs.detach().clone().requires_grad_()
    want = fn(p1)
    got = compiled(p2)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, p2)[0], torch.autograd.grad(want, p1)[0])


def test_autograd_of_the_ops_is_cpp():
    # dense_energy, dense_energy_sum and dense_energy_inputs (and the emulated twins) have C++ autograd
    # kernels: no Python wrapper on the hot path (host time per call, benchmarks/NOTES.md section 13)
    names = ("dense_energy", "dense_energy_sum", "dense_energy_loss_fused", "dense_energy_inputs")
    for name in names + tuple(f"_{n}_emulated" for n in names):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"rrm_cuda::{name}", "Autograd"), name
    p = torch.softmax(torch.randn(1, 2, 6), 1).requires_grad_()
    energy, _ = ops.dense_energy(p, torch.ones(1, 6), torch.rand(1, 2, 6), None, 1)
    assert "DenseEnergyFunction" in energy.grad_fn.name()
    loss = ops.dense_energy_sum(p, torch.ones(1, 6), torch.rand(1, 2, 6), None, 1, 0.5)
    assert "DenseEnergySumFunction" in loss.grad_fn.name()
    # the loss's graph: the op's node directly under the user's (no sum or product nodes of its own);
    # unchecked (and on a GPU) one node for the inputs op and the energy
    images, probs, rois, labels = _inputs(B=2, K=3, H=8, W=8, dtype=torch.float32)
    out = rrm_cuda.dense_energy_loss(images, probs.requires_grad_(), rois, labels, scale_factor=0.5)
    assert "DenseEnergySumFunction" in out.grad_fn.name()
    out = rrm_cuda.dense_energy_loss(images, probs, rois, labels, scale_factor=0.5, check_inputs=False)
    assert "DenseEnergyLossFusedFunction" in out.grad_fn.name()
    assert out.grad_fn.next_functions[0][0].name() == "torch::autograd::AccumulateGrad"
    s_hat, _, _ = ops.dense_energy_inputs(torch.rand(1, 2, 4, 4, requires_grad=True), None, None, 2, True, 0)
    assert "DenseEnergyInputsFunction" in s_hat.grad_fn.name()


# ---- the features op (the loss's bilateral features at its working scale, one pass) ---------------


@pytest.mark.parametrize("op", ["bilateral_features_2d", "_bilateral_features_2d_emulated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_features_op_equals_the_aten_formulation(op, dtype):
    # bitwise: rrm_cuda.bilateral_features of the images sliced [::stride, ::stride] and converted,
    # for image dtypes and layouts, odd sizes, 1-4 channels, sigmas whose divisions round
    f = getattr(ops, op)
    g = torch.Generator().manual_seed(11)
    for (H, W), c, idt in (
        ((13, 10), 3, torch.uint8),
        ((9, 16), 1, torch.float32),
        ((7, 7), 4, torch.float64),
        ((12, 5), 3, torch.float16),
        ((6, 11), 2, torch.int16),
    ):
        img = torch.randint(0, 256, (2, c, H, W), generator=g).to(idt)
        if idt.is_floating_point:
            img = img + torch.rand(img.shape, generator=g).to(idt)  # fractional values round in the conversion
        for layout in (
            img,
            img.contiguous(memory_format=torch.channels_last),
            img.transpose(2, 3).contiguous().transpose(2, 3),
        ):
            for stride in (1, 2):
                h, w = H // stride, W // stride
                for sxy, srgb in ((13.3, 7.1), (100.0 / 3, 15.0), (0.7, 0.3)):
                    got = f(layout, stride, h, w, sxy, srgb, dtype)
                    sampled = layout[:, :, ::stride, ::stride][:, :, :h, :w].to(dtype)
                    want = rrm_cuda.bilateral_features(sampled, sxy, srgb, dtype=dtype)
                    assert got.dtype == dtype and got.shape == (2, 2 + c, h * w)
                    assert torch.equal(got, want), (op, H, W, idt, stride, sxy, srgb)
    torch.library.opcheck(f.default, (img, 2, 2, 3, 13.3, 7.1, dtype))


def test_features_op_bad_arguments():
    img = torch.zeros(2, 3, 8, 9, dtype=torch.uint8)
    f = ops.bilateral_features_2d
    assert f(img[:0], 2, 4, 4, 1.0, 1.0, torch.float32).shape == (0, 5, 16)
    for args, msg in (
        ((img[0], 2, 4, 4, 1.0, 1.0, torch.float32), "images"),
        ((img, 3, 2, 3, 1.0, 1.0, torch.float32), "stride must be 1 or 2"),
        ((img, 2, 5, 4, 1.0, 1.0, torch.float32), "height and width"),
        ((img, 1, 8, 10, 1.0, 1.0, torch.float32), "height and width"),
        ((img, 2, 4, 4, 0.0, 1.0, torch.float32), "sxy and srgb must be positive"),
        ((img, 2, 4, 4, 1.0, float("inf"), torch.float32), "sxy and srgb must be positive"),
        ((img, 2, 4, 4, 1.0, 1.0, torch.int32), "dtype must be float32 or float64"),
        ((img.bool(), 2, 4, 4, 1.0, 1.0, torch.float32), "real, non-bool"),
    ):
        with pytest.raises((ValueError, TypeError, RuntimeError), match=msg):
            f(*args)


@pytest.mark.cuda
def test_cuda_features_op_equals_cpu(cuda):
    g = torch.Generator().manual_seed(12)
    img = torch.randint(0, 256, (3, 3, 41, 37), generator=g, dtype=torch.uint8)
    for stride, dtype in ((1, torch.float32), (2, torch.float32), (2, torch.float64)):
        h, w = 41 // stride, 37 // stride
        for x in (img, img.float().contiguous(memory_format=torch.channels_last)):
            a = ops.bilateral_features_2d(x, stride, h, w, 50.0, 15.0, dtype)
            b = ops.bilateral_features_2d(x.to(cuda), stride, h, w, 50.0, 15.0, dtype)
            assert torch.equal(b.cpu(), a)


def test_backward_of_grad_mode_0_is_refused():
    # dense_energy with grad_mode=0 computes no gradient direction: differentiating it raises a clear
    # error (from the C++ autograd) instead of returning a wrong gradient
    probs, gate, feats, mass = _op_inputs(B=2, K=3, N=20)
    for op in (ops.dense_energy, ops._dense_energy_emulated):
        p = probs.clone().requires_grad_()
        energy, grad_dir = op(p, gate, feats, mass, 0)
        assert grad_dir.numel() == 0
        with pytest.raises(RuntimeError, match=r"grad_mode=0 \(no gradient direction computed\)"):
            energy.sum().backward()


@pytest.mark.parametrize("scale", [1.0, 0.5, 0.75])
def test_custom_ignore_index_equals_255(scale):
    # any unlabelled value gives the 255 result, on the fused paths (scale 1, 0.5) and F.interpolate's
    g = torch.Generator().manual_seed(0)
    B, K, H, W = 2, 3, 12, 12
    images = torch.randint(0, 256, (B, 3, H, W), generator=g).float()
    probs = torch.softmax(torch.randn(B, K, H, W, generator=g) * 3, 1)
    rois = torch.ones(B, H, W)
    rois[:, :, :3] = 0
    labels = torch.randint(0, K, (B, 1, H, W), generator=g).float()
    labels[torch.rand(B, 1, H, W, generator=g) < 0.5] = 255
    ref = rrm_cuda.dense_energy_loss(images, probs, rois, labels, sigma_xy=10.0, scale_factor=scale)
    for ii in (-1, 254, 1000):
        got = rrm_cuda.dense_energy_loss(
            images,
            probs,
            rois,
            labels.masked_fill(labels == 255, ii),
            sigma_xy=10.0,
            scale_factor=scale,
            ignore_index=ii,
        )
        torch.testing.assert_close(got, ref)
