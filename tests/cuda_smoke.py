"""Every CUDA kernel of rrm_cuda once, on small inputs, compared with the CPU: the program that
compute-sanitizer (memcheck, racecheck, initcheck, synccheck) runs on a GPU machine.

    compute-sanitizer --tool memcheck --error-exitcode 3 python tests/cuda_smoke.py

Exits non-zero on a mismatch. Not collected by pytest (the suite's CUDA tests are marked ``cuda``).
"""

from __future__ import annotations

import sys

import torch

import rrm_cuda

ops = torch.ops.rrm_cuda


def close(name: str, a: torch.Tensor, b: torch.Tensor, tol: float) -> None:
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    err = float((a - b).abs().max()) / max(1.0, float(b.abs().max())) if b.numel() else 0.0
    print(f"{name:<48} max rel err {err:.2e}", flush=True)
    if not err <= tol:
        raise SystemExit(f"MISMATCH: {name}: {err:.3g} > {tol}")


def main() -> None:
    dev = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")  # "cpu": a dry run of the script itself
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    g = torch.Generator().manual_seed(0)
    # permutohedral filter: unrolled d = 2, 5 and the generic path; both blur orders; table growth
    for d, N, scale in ((2, 300, 2.0), (5, 300, 2.0), (8, 200, 2.0), (5, 3000, 40.0)):
        v = torch.randn(2, 3, N, generator=g)
        f = torch.randn(2, d, N, generator=g) * scale
        for rev in (False, True):
            close(
                f"filter d={d} N={N} reverse={rev}",
                ops.permutohedral_filter(v.to(dev), f.to(dev), rev),
                ops.permutohedral_filter(v, f, rev),
                1e-5,
            )
        close(f"num_vertices d={d}", ops.lattice_num_vertices(f.to(dev)), ops.lattice_num_vertices(f), 0)
    x = torch.randn(2, 4, 60, generator=g, dtype=torch.float64)
    f = torch.randn(2, 3, 60, generator=g, dtype=torch.float64)
    xc = x.to(dev).detach().requires_grad_()
    rrm_cuda.permutohedral_filter(xc, f.to(dev)).pow(2).sum().backward()
    xr = x.detach().clone().requires_grad_()
    rrm_cuda.permutohedral_filter(xr, f).pow(2).sum().backward()
    close("filter backward float64", xc.grad, xr.grad, 1e-12)
    # dense CRF: Potts and full compatibilities, two batch images, float32 and float64
    for dtype in (torch.float32, torch.float64):
        unary = torch.rand(2, 4, 17, 13, generator=g, dtype=dtype) * 3
        image = torch.randint(0, 256, (2, 3, 17, 13), generator=g, dtype=torch.uint8)
        full = torch.rand(4, 4, generator=g, dtype=dtype) - 3
        for compat in (10.0, full):
            kw = dict(iterations=3, bilateral_sxy=10.0, bilateral_compat=compat)
            close(
                f"dense_crf {dtype} {'potts' if isinstance(compat, float) else 'matrix'}",
                rrm_cuda.dense_crf(unary.to(dev), image.to(dev), **kw),
                rrm_cuda.dense_crf(unary, image, **kw),
                1e-4 if dtype == torch.float32 else 1e-10,
            )
            # the backward (softmax backward, vector-matrix product, reversed filter)
            grads = []
            for d in (dev, torch.device("cpu")):
                u = unary.to(d).detach().requires_grad_()
                rrm_cuda.dense_crf(u, image.to(d), **kw).pow(2).sum().backward()
                grads.append(u.grad)
            close(
                f"dense_crf backward {dtype} {'potts' if isinstance(compat, float) else 'matrix'}",
                grads[0],
                grads[1],
                1e-4 if dtype == torch.float32 else 1e-10,
            )
    # the fused mean field at 21 labels (rows of 24: the slice's whole-row and 4-channel groupings)
    unary = torch.rand(2, 21, 40, 37, generator=g) * 3
    image = torch.randint(0, 256, (2, 3, 40, 37), generator=g, dtype=torch.uint8)
    ref = rrm_cuda.dense_crf(unary, image, iterations=3)
    from rrm_cuda import _C

    # the slice's two groupings; the splats' chunk sums by each vertex's last chunk (fence, counter,
    # L2 loads: twice, the counters must come back to zero) or by a second launch; blur axes in pairs;
    # the splat and slice compiled with register caps
    for name, values in (
        ("slice_group4", (0, 1)),
        ("splat_fused_reduce", (0, 1, 1)),
        ("blur_pairs", (0, 1)),
        ("item_min_blocks", (5, 6)),
    ):
        saved = _C.tuning()[name]
        for value in values:
            _C.set_tuning(name, value)
            close(
                f"dense_crf 21 labels {name}={value}",
                rrm_cuda.dense_crf(unary.to(dev), image.to(dev), iterations=3),
                ref,
                1e-4,
            )
        _C.set_tuning(name, saved)
    # the tiled mean field (knob mean_field_tile): its block kernels' shared memory and barriers
    saved = {k: _C.tuning()[k] for k in ("mean_field_tile", "mean_field_tile_kernel")}
    for tile, kernel in ((64, 1), (256, 2), (37, 2), (256, 3), (37, 3)):
        _C.set_tuning("mean_field_tile", tile)
        _C.set_tuning("mean_field_tile_kernel", kernel)
        close(
            f"dense_crf 21 labels mean_field_tile={tile} kernel={kernel}",
            rrm_cuda.dense_crf(unary.to(dev), image.to(dev), iterations=3),
            ref,
            1e-4,
        )
    for k, v in saved.items():
        _C.set_tuning(k, v)
    # energy op: value only, rloss and exact gradients, with and without the mass term; float32
    # takes the float4 rows (padded channels: 3 classes -> 4, 3 + mass -> 4, 7 -> 8); its lattice with
    # the vertex count read back and counted (knob counted_lattice: the counted launches)
    saved = _C.tuning()["counted_lattice"]
    for counted in (0, 1):
        _C.set_tuning("counted_lattice", counted)
        for dtype, K in ((torch.float64, 3), (torch.float32, 3), (torch.float32, 7)):
            probs = torch.rand(2, K, 150, generator=g, dtype=dtype)
            gate = torch.rand(2, 150, generator=g, dtype=dtype)
            feats = (
                torch.rand(2, 5, 150, generator=g, dtype=dtype) * torch.tensor([3.0, 30.0], dtype=dtype)[:, None, None]
            )
            mass = torch.rand(2, 150, generator=g, dtype=dtype)
            for mode in (0, 1, 2):
                for m in (None, mass):
                    md = None if m is None else m.to(dev)
                    a = ops.dense_energy(probs.to(dev), gate.to(dev), feats.to(dev), md, mode)
                    b = ops.dense_energy(probs, gate, feats, m, mode)
                    for k, (u, w) in enumerate(zip(a, b)):
                        close(
                            f"dense_energy {dtype} K={K} mode={mode} mass={m is not None} counted={counted} out{k}",
                            u,
                            w,
                            1e-4 if dtype == torch.float32 else 1e-10,
                        )
    _C.set_tuning("counted_lattice", saved)
    # the energy loss's inputs (downscale, ROI, gate) and its backward; its value-check statistics
    seg = torch.softmax(torch.randn(2, 4, 13, 10, generator=g, dtype=torch.float64), 1)
    roi = (torch.rand(2, 13, 10, generator=g) > 0.2).double()
    unl = torch.rand(2, 13, 10, generator=g) > 0.7
    for stride, tile in ((1, 0), (2, 0), (1, 3), (2, 2)):  # tile > 0: the outputs in the tile order
        a = ops.dense_energy_inputs(seg.to(dev), roi.to(dev), unl.to(dev), stride, True, tile)
        b = ops.dense_energy_inputs(seg, roi, unl, stride, True, tile)
        for k, (u, w) in enumerate(zip(a, b)):
            close(f"dense_energy_inputs stride={stride} tile={tile} out{k}", u, w, 0.0)
        # stats=True (session 21): on CUDA through the statistics op, sums in double; the CPU's
        # stride-2 path sums in the dtype (float64 here: the same to rounding)
        sa = ops.dense_energy_inputs(seg.to(dev), roi.to(dev), unl.to(dev), stride, True, tile, True)[2]
        sb = ops.dense_energy_inputs(seg, roi, unl, stride, True, tile, True)[2]
        close(f"dense_energy_inputs stride={stride} tile={tile} stats", sa, sb, 1e-12)
        go = torch.randn(b[0].shape, generator=g, dtype=torch.float64)
        u = ops.dense_energy_inputs_backward(go.to(dev), roi.to(dev), 13, 10, stride, tile)
        close(
            f"dense_energy_inputs_backward stride={stride} tile={tile}",
            u,
            ops.dense_energy_inputs_backward(go, roi, 13, 10, stride, tile),
            0.0,
        )
    img = torch.randint(0, 256, (2, 3, 13, 10), generator=g, dtype=torch.uint8)
    lab = torch.randint(0, 4, (2, 13, 10), generator=g)
    for stride, dt in ((1, torch.float32), (2, torch.float32), (2, torch.float64)):  # the loss's features
        h, w = 13 // stride, 10 // stride
        u = ops.bilateral_features_2d(img.to(dev), stride, h, w, 13.3, 7.1, dt)
        close(
            f"bilateral_features_2d stride={stride} {dt}",
            u,
            ops.bilateral_features_2d(img, stride, h, w, 13.3, 7.1, dt),
            0.0,
        )
    a = ops.dense_energy_input_stats(img.to(dev), seg.float().to(dev), roi.to(dev), lab.to(dev), 255.0, True)
    b = ops.dense_energy_input_stats(img, seg.float(), roi, lab, 255.0, True)
    # entries 4, 5: the extremes of the per-pixel sums over the classes, which the CPU adds in the
    # probabilities' dtype (csrc/energy/input_stats_cpu.h) and CUDA in double; the rest are exact
    close("dense_energy_input_stats (ranges, flags)", a[[0, 1, 2, 3, 6, 7]], b[[0, 1, 2, 3, 6, 7]], 0.0)
    close("dense_energy_input_stats (class sums)", a[4:6], b[4:6], 1e-6)
    # BCD ops through the loss, forward and backward, float32 and float16
    for dtype in (torch.float32, torch.float16):
        feat = torch.randn(2, 16, 9, 11, generator=g).to(dtype)
        seg = torch.randn(2, 5, 9, 11, generator=g)
        fc = feat.to(dev).detach().requires_grad_()
        lc = rrm_cuda.bcd_loss(seg.to(dev), fc)
        lc.backward()
        fr = feat.detach().clone().requires_grad_()
        lr = rrm_cuda.bcd_loss(seg, fr)
        lr.backward()
        tol = 1e-4 if dtype == torch.float32 else 1e-2
        close(f"bcd_loss {dtype}", lc, lr, tol)
        close(f"bcd_loss grad {dtype}", fc.grad, fr.grad, tol)
    lab = torch.randint(0, 6, (2, 9, 11), generator=g)
    lab[0, 0, 0] = 255
    feat = torch.randn(2, 16, 9, 11, generator=g)
    for k, (u, w) in enumerate(
        zip(
            rrm_cuda.masked_feature_sums(feat.to(dev), lab.to(dev), 6, ignore_index=255),
            rrm_cuda.masked_feature_sums(feat, lab, 6, ignore_index=255),
        )
    ):
        close(f"masked_feature_sums out{k}", u, w, 1e-5)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    print("cuda smoke: all kernels ran and matched the CPU")


if __name__ == "__main__":
    sys.exit(main())
