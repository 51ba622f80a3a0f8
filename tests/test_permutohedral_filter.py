"""rrm_cuda.permutohedral_filter: the lattice against a faithful slow reference, the exact Gaussian,
its adjoint, and bad input."""

import math
import os

import pytest
import torch

import rrm_cuda
from rrm_cuda.reference import (
    gaussian_filter_exact,
    lattice_num_vertices_reference,
    permutohedral_filter_reference,
)
from tests.conftest import cuda_available

ops = torch.ops.rrm_cuda


def _inputs(B=2, C=3, N=200, d=3, dtype=torch.float64, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(B, C, N, generator=g, dtype=dtype)
    f = torch.randn(B, d, N, generator=g, dtype=dtype) * scale
    return v, f


# ---- forward vs reference --------------------------------------------------------------------
@pytest.mark.parametrize("d", [1, 2, 3, 5, 8, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reverse", [False, True])
def test_forward_matches_reference(d, dtype, reverse):
    v, f = _inputs(d=d, dtype=dtype, N=150 if d < 16 else 60)
    out = ops.permutohedral_filter(v, f, reverse)
    ref = permutohedral_filter_reference(v, f, reverse)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol * float(ref.abs().max()))


def test_num_vertices_matches_reference():
    _, f = _inputs(B=3, d=5, N=300)
    assert ops.lattice_num_vertices(f).tolist() == lattice_num_vertices_reference(f).tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_matches_on_tied_residuals(dtype):
    # Features on an integer grid: the rounding residuals of many points tie exactly, so the simplex
    # each point falls in hangs on the last bit of the feature scale. The reference must compute it
    # as the kernels do (densecrf's rounding: sqrt(2/3) (d+1) as a float, 1 / sqrt((k+2)(k+1)) times
    # it in double); a scale one ulp off gives other vertex counts here (11 against 12 in float32,
    # the count densecrf's own float32 code gives on this pair of points).
    f = torch.tensor([[[0.0, 1.0], [2.0, 2.0], [-2.0, -3.0], [3.0, 3.0], [-2.0, -3.0]]], dtype=dtype)
    n = ops.lattice_num_vertices(f).tolist()
    assert n == lattice_num_vertices_reference(f).tolist()
    assert n == ([11] if dtype == torch.float64 else [12])  # the float32 scale ties otherwise
    g = torch.Generator().manual_seed(0)
    for d in (2, 5, 6, 7):
        f = torch.randint(-3, 4, (2, d, 300), generator=g).to(dtype)
        v = torch.randn(2, 3, 300, generator=g, dtype=dtype)
        assert ops.lattice_num_vertices(f).tolist() == lattice_num_vertices_reference(f).tolist(), d
        ref = permutohedral_filter_reference(v, f)
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(
            ops.permutohedral_filter(v, f, False), ref, rtol=tol, atol=tol * float(ref.abs().max())
        )


@pytest.mark.parametrize("layout", ["noncontiguous", "channels_last", "spatial"])
def test_layouts(layout):
    v, f = _inputs(B=2, C=4, N=64, d=3)
    ref = permutohedral_filter_reference(v, f)
    if layout == "noncontiguous":
        out = rrm_cuda.permutohedral_filter(v.transpose(1, 2).contiguous().transpose(1, 2), f[:, :, :].flip(0).flip(0))
    elif layout == "channels_last":
        v4 = v.reshape(2, 4, 8, 8).contiguous(memory_format=torch.channels_last)
        f4 = f.reshape(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
        out = rrm_cuda.permutohedral_filter(v4, f4).reshape(2, 4, 64)
    else:
        out = rrm_cuda.permutohedral_filter(v.reshape(2, 4, 4, 4, 4), f.reshape(2, 3, 4, 4, 4)).reshape(2, 4, 64)
    torch.testing.assert_close(out, ref)


def test_half_inputs_computed_in_float32():
    v, f = _inputs(dtype=torch.float32)
    out = rrm_cuda.permutohedral_filter(v.half(), f.half())
    assert out.dtype == torch.float16
    ref = ops.permutohedral_filter(v.half().float(), f.half().float(), False)
    torch.testing.assert_close(out.float(), ref, rtol=2e-3, atol=2e-3 * float(ref.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_emulated_cuda_launch_matches_cpu(dtype):
    # Bit for bit: the emulated launch runs the CUDA decomposition (one embed thread per simplex
    # corner, its barycentric weight picked by selects; the CPU computes a pixel's corners at once)
    # for the embeds compiled with a fixed d (2, 3, 5) and the generic one (1, 4, 7). At d = 1 the
    # 120 points fall on a few vertices with more than 32 entries each: the GPU's splat sums them in
    # chunks of 32 and then the chunks, the CPU in one run, so the sums differ by rounding there.
    for d in (1, 2, 3, 4, 5, 7):
        v, f = _inputs(B=3, C=5, N=120, d=d, dtype=dtype)
        tol = dict(rtol=0, atol=0) if d > 1 else dict(rtol=1e2 * torch.finfo(dtype).eps, atol=1e-12)
        for rev in (False, True):
            torch.testing.assert_close(
                ops._permutohedral_filter_emulated(v, f, rev), ops.permutohedral_filter(v, f, rev), **tol
            )


def test_splat_launch_order_does_not_change_results(tuning):
    # The GPU splat launches its chunks in the order of their first pixel's tile (the rows of Q a
    # pixel's d+1 vertices gather then come from one L1); each chunk's sum and its row stay those of
    # the vertex order, so the results are bitwise the same for any tile, 0 (vertex order) included.
    # Photographs (long bilateral lists, many chunks per tile) and a 3-D noise lattice (short ones);
    # shared lattices in the mean field (8 unaries on 2 lattices); the energy loss's three modes.
    from skimage import data

    img = torch.from_numpy(data.astronaut()[:96, :120].copy()).permute(2, 0, 1)[None]
    img = torch.cat([img, torch.from_numpy(data.chelsea()[:96, :120].copy()).permute(2, 0, 1)[None]])
    bil = rrm_cuda.bilateral_features(img, 20.0, 13.0)
    pos = rrm_cuda.position_features(1, (96, 120), 3.0)
    g = torch.Generator().manual_seed(3)
    v = torch.rand(2, 6, 96 * 120, generator=g)
    noise = torch.randn(2, 3, 96 * 120, generator=g) * 3
    u = torch.rand(8, 4, 96 * 120, generator=g) * 3
    compat = torch.stack([-3 * torch.eye(4), -10 * torch.eye(4)])
    probs = torch.softmax(u[:2], 1)
    gate = torch.rand(2, 96 * 120, generator=g)

    def run():
        feats = (bil, pos.expand(2, -1, -1), noise)
        out = [ops._permutohedral_filter_emulated(v, f, rev) for f in feats for rev in (False, True)]
        out.append(ops._dense_crf_emulated(u, [pos, bil], compat, [True, True], [0, 0], 3))
        out += [ops._dense_energy_emulated(probs, gate, bil, None, mode)[0] for mode in (0, 1, 2)]
        return out

    tuning("splat_tile", 0)
    ref = run()
    for tile in (1, 7, 64, 4096, 10**9):
        tuning("splat_tile", tile)
        for a, b in zip(run(), ref):
            assert torch.equal(a, b), tile


@pytest.mark.parametrize("knob", ["splat_fused_reduce", "blur_pairs", "insert_corner_major"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_launch_fusions_do_not_change_results(tuning, dtype, knob):
    # Two launch fusions of the GPU path, each bitwise neutral: the splat adds up each vertex's chunk
    # sums in its own launch, by the last chunk of the vertex to finish (splat_fused_reduce = 1), or
    # in a second launch (0); the blurs take two lattice axes per launch (blur_pairs = 1: B_j at the
    # vertex and its two neighbours along the next axis, then that axis) or one (0). The sums are the
    # same terms in the same order. And the build's hash insert in corner-major thread order
    # (insert_corner_major = 1): other entries claim the slots, the vertices get other numbers, the
    # lattice and every sum stay the same. Photographs' bilateral lattices (vertices of one chunk and of
    # many), noise lattices of d = 1, 3, 4 (an odd and an even number of axes; mostly one chunk), a
    # batch whose images have different vertex counts (unused rows), shared lattices in the mean
    # field (8 unaries on 2 lattices, d = 2 and 5: one pair and a single axis, three pairs), the dense
    # CRF's backward (lattices repeated over the batch, reversed axes), and the energy loss's three
    # modes with and without the mass. Each setting runs twice: the counters must be left at zero.
    from skimage import data

    img = torch.from_numpy(data.astronaut()[:80, :96].copy()).permute(2, 0, 1)[None]
    img = torch.cat([img, torch.from_numpy(data.coffee()[:80, :96].copy()).permute(2, 0, 1)[None]])
    bil = rrm_cuda.bilateral_features(img, 20.0, 13.0).to(dtype)
    pos = rrm_cuda.position_features(1, (80, 96), 3.0).to(dtype)
    g = torch.Generator().manual_seed(11)
    N = 80 * 96
    v = torch.rand(2, 7, N, generator=g, dtype=dtype)
    noise = (torch.randn(2, 3, N, generator=g) * 3).to(dtype)
    noise[1, :, N // 2 :] = 0  # fewer vertices in image 1: rows of unused vertices in the batch
    u = (torch.rand(8, 21, N, generator=g) * 3).to(dtype)
    compat = torch.stack([-3 * torch.eye(21), -10 * torch.eye(21)]).to(dtype)
    probs = torch.softmax(u[:2, :5], 1)
    gate = torch.rand(2, N, generator=g, dtype=dtype)
    mass = torch.rand(2, N, generator=g, dtype=dtype)
    counts = ops.lattice_num_vertices(noise)
    assert counts[0] != counts[1]

    def run():
        feats = (bil, pos.expand(2, -1, -1), noise, noise[:, :1] * 2, torch.cat([noise, noise[:, :1]], 1))
        out = [ops._permutohedral_filter_emulated(v, f, rev) for f in feats for rev in (False, True)]
        out.append(ops._dense_crf_emulated(u, [pos, bil], compat, [True, True], [0, 1], 3))
        # the backward's per-term filters on lattices repeated over the batch (lattice::tile)
        out += list(
            ops._dense_crf_backward_emulated(
                torch.ones_like(u[:4]), u[:4], [pos, bil], compat, [True, False], [0, 2], 2
            )
        )
        for m in (None, mass):
            for mode in (0, 1, 2):
                out += list(ops._dense_energy_emulated(probs, gate, bil, m, mode))
        return out

    for tile in (0, 64):
        tuning("splat_tile", tile)
        tuning(knob, 0)
        ref = run()
        tuning(knob, 1)
        for _ in range(2):
            for k, (a, b) in enumerate(zip(run(), ref)):
                assert torch.equal(a, b), (tile, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_flat_scans_give_the_same_bits(tuning, dtype):
    # The GPU build's per-image scans (chunk offsets; the tiled mean field's chunk numbers) in
    # batches of two or more images: ATen's row kernel, or one flat scan rebased per row
    # (row_cumsum, rows of at least knob flat_scan_min elements). Bitwise the same results through
    # the emulated launch: a batch of images with different vertex counts, read back and counted
    # (rows of N (d + 1) + 1, mostly zero), the tiled mean field's chunks, and the energy loss.
    from skimage import data

    img = torch.from_numpy(data.astronaut()[:40, :48].copy()).permute(2, 0, 1)[None]
    img = torch.cat([img, torch.from_numpy(data.coffee()[:40, :48].copy()).permute(2, 0, 1)[None]])
    bil = rrm_cuda.bilateral_features(img, 20.0, 13.0).to(dtype)
    pos = rrm_cuda.position_features(2, (40, 48), 3.0).to(dtype)
    g = torch.Generator().manual_seed(13)
    N = 40 * 48
    noise = (torch.randn(3, 3, N, generator=g) * 3).to(dtype)
    noise[1, :, N // 2 :] = 0  # fewer vertices in image 1
    v = torch.rand(3, 5, N, generator=g, dtype=dtype)
    u = (torch.rand(2, 6, N, generator=g) * 3).to(dtype)
    compat = torch.stack([-3 * torch.eye(6), -10 * torch.eye(6)]).to(dtype)
    probs = torch.softmax(u[:, :4], 1)
    gate = torch.rand(2, N, generator=g, dtype=dtype)

    def run():
        out = []
        for counted in (0, 1):
            tuning("counted_lattice", counted)
            out += [ops._permutohedral_filter_emulated(v, noise, rev) for rev in (False, True)]
            out += [ops._permutohedral_filter_emulated(v[:2], bil, False)]
            out += list(ops._dense_energy_emulated(probs, gate, bil, None, 1))
        tuning("counted_lattice", 0)
        for tile in (0, 64):  # the tiled mean field cuts its chunks by tiles (per-image scans of the heads)
            tuning("mean_field_tile", tile)
            out.append(ops._dense_crf_emulated(u, [pos, bil], compat, [True, True], [0, 0], 2))
        tuning("mean_field_tile", 0)
        return out

    tuning("flat_scan_min", 10**9)  # rows by ATen's row kernel
    ref = run()
    tuning("flat_scan_min", 1)  # every batch's rows flat
    for k, (a, b) in enumerate(zip(run(), ref)):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_counted_lattice_filter_gives_the_same_bits(tuning, dtype):
    # Knob counted_lattice (and, on a GPU, any CUDA graph capture): the filter's lattice built
    # without reading its vertex count back, every launch over vertices or chunks over the counts in
    # device memory. Through the emulated launch, whose counted workspaces are filled with NaN (0 for
    # indices): bitwise the read-back build's results, both blur orders, for a photograph's bilateral
    # lattice, noise of d = 1, 3 and 8 (up to one vertex per entry), a batch whose images have very
    # different vertex counts, one point, and the blurs one or two axes per launch.
    from skimage import data

    _C = rrm_cuda._ext._C
    img = torch.from_numpy(data.astronaut()[:40, :48].copy()).permute(2, 0, 1)[None]
    g = torch.Generator().manual_seed(12)
    N = 40 * 48
    noise = torch.randn(2, 3, N, generator=g) * torch.tensor([0.3, 30.0]).reshape(2, 1, 1)
    feats = [
        rrm_cuda.bilateral_features(img, 20.0, 13.0),
        noise,
        noise[:, :1] * 4,
        torch.randn(1, 8, 300, generator=g) * 2,
        torch.zeros(1, 2, 1),
    ]
    for f in feats:
        f = f.to(dtype)
        v = torch.rand(f.shape[0], 5, f.shape[2], generator=g).to(dtype)
        for blur2 in (0, 1):
            tuning("blur_pairs", blur2)
            for rev in (False, True):
                tuning("counted_lattice", 0)
                before = _C.lattice_counted_builds()
                a = ops._permutohedral_filter_emulated(v, f, rev)
                assert _C.lattice_counted_builds() == before
                tuning("counted_lattice", 1)
                b = ops._permutohedral_filter_emulated(v, f, rev)
                assert _C.lattice_counted_builds() == before + 1
                assert torch.equal(a, b), (tuple(f.shape), blur2, rev)
    # the CPU kernels keep the read (a counted lattice is a GPU form)
    before = _C.lattice_counted_builds()
    ops.permutohedral_filter(v, f, False)
    assert _C.lattice_counted_builds() == before


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_slice_grouping_does_not_change_results(tuning, dtype):
    # The fused mean field's slice sums a pixel's d+1 vertex rows four channels at a time
    # (slice_group4 = 1, fewer registers) or whole rows (0): every channel's sums are the same terms in
    # the same order, so the bits are the same, for every row width W (4, 8, 16, 24, 32 labels' rows),
    # with and without per-pixel scales (normalization 'after' gives the slice a post factor).
    from skimage import data

    img = torch.from_numpy(data.astronaut()[:64, :80].copy()).permute(2, 0, 1)[None]
    bil = rrm_cuda.bilateral_features(img, 20.0, 13.0).to(dtype)
    pos = rrm_cuda.position_features(1, (64, 80), 3.0).to(dtype)
    g = torch.Generator().manual_seed(5)
    for L in (3, 7, 13, 21, 30):
        u = (torch.rand(2, L, 64 * 80, generator=g) * 3).to(dtype)
        compat = torch.stack([-3 * torch.eye(L), -torch.linspace(5, 10, L).diag()]).to(dtype)
        for norms in ([0, 0], [1, 0]):
            outs = []
            for group4 in (0, 1):
                tuning("slice_group4", group4)
                outs.append(ops._dense_crf_emulated(u, [pos, bil], compat, [True, True], norms, 3))
            assert torch.equal(outs[0], outs[1]), (L, norms)
            torch.testing.assert_close(outs[1].sum(1), torch.ones_like(outs[1][:, 0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_filter_rows_of_four_do_not_change_results(tuning, dtype):
    # The GPU filter's lattice rows padded to a multiple of 4 channels, splat and blurs four channels
    # per thread (filter_rows4 = 1, C >= 4), or one channel per thread (0): the same terms in the same
    # order per channel, so the same bits through the emulated launch, for the filter in both blur
    # orders, its two gradients, and dense_crf's backward (two generic filters per step), at channel
    # counts that need padding (5, 21) and that do not (4, 8), and below the threshold (1, 3).
    g = torch.Generator().manual_seed(11)
    f = (torch.randn(2, 5, 900, generator=g) * 2).to(dtype)
    for C in (1, 3, 4, 5, 8, 21):
        v = torch.randn(2, C, 900, generator=g, dtype=dtype)
        grad = torch.randn(2, C, 900, generator=g, dtype=dtype)
        outs = []
        for rows4 in (0, 1):
            tuning("filter_rows4", rows4)
            out = [ops._permutohedral_filter_emulated(v, f, rev) for rev in (False, True)]
            out += list(ops._permutohedral_filter_backward_emulated(v, f, grad, False))
            outs.append(out)
        for k, (a, b) in enumerate(zip(*outs)):
            assert torch.equal(a, b), (C, k)
    pos = (torch.randn(1, 2, 900, generator=g) * 4).to(dtype)
    for L in (3, 21):
        u = (torch.rand(2, L, 900, generator=g) * 3).to(dtype)
        compat = torch.stack([-3 * torch.eye(L), -torch.rand(L, L, generator=g)]).to(dtype)
        gq = torch.randn(2, L, 900, generator=g, dtype=dtype)
        for diag in ([True, True], [True, False]):
            args = (u, [pos, f], compat, diag, [0, 0], 3)
            grads = []
            for rows4 in (0, 1):
                tuning("filter_rows4", rows4)
                grads.append(ops._dense_crf_backward_emulated(gq, *args))
            for a, b in zip(*grads):
                assert torch.equal(a, b), (L, diag)


def test_filter_rows_of_four_copy_a_misaligned_input(tuning):
    # Rows of four are read 16 bytes at a time: a caller's (B, C, 1) view whose storage starts one
    # element in gives pixel-major rows that are not 16-byte aligned (the transpose is a view), so
    # the filter copies them into its padded buffer first (one more launch) instead of reading them
    # in place, as it does for aligned rows of a multiple of 4 channels; the same values either way.
    from rrm_cuda import _C

    tuning("filter_rows4", 1)
    g = torch.Generator().manual_seed(2)
    f = torch.randn(2, 3, 1, generator=g)
    base = torch.randn(2 * 4 + 1, generator=g)
    shifted = base[1:].view(2, 4, 1)
    assert shifted.storage_offset() == 1
    aligned = shifted.clone()  # its own storage, offset 0
    counts, outs = [], []
    for v in (aligned, shifted):
        l0, _ = _C.emulated_launches()
        outs.append(ops._permutohedral_filter_emulated(v, f, False))
        counts.append(_C.emulated_launches()[0] - l0)
    assert counts[1] == counts[0] + 1, counts
    assert torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[0], ops.permutohedral_filter(aligned, f, False))


@pytest.mark.cuda
def test_cuda_filter_rows_of_four_misaligned_input(cuda):
    # the same misaligned view on the device: copied, not read with 16-byte loads (which would fault)
    g = torch.Generator().manual_seed(2)
    f = torch.randn(2, 3, 1, generator=g)
    base = torch.randn(2 * 4 + 1, generator=g)
    shifted = base.to(cuda)[1:].view(2, 4, 1)
    out = ops.permutohedral_filter(shifted, f.to(cuda), False).cpu()
    torch.testing.assert_close(out, ops.permutohedral_filter(base[1:].view(2, 4, 1).clone(), f, False))


def test_tuning_knobs(tuning):
    from rrm_cuda import _C

    saved = _C.tuning()
    assert set(saved) == {
        "splat_tile",
        "energy_rows4",
        "energy_pair_splat",
        "slice_group4",
        "energy_slice4",
        "splat_fused_reduce",
        "blur_pairs",
        "counted_lattice",
        "mean_field_tile",
        "mean_field_tile_kernel",
        "insert_corner_major",
        "emulate_capture",
        "cpu_build_passes",
        "cpu_crf_pairs",
        "insert_shards",
        "flat_scan_min",
        "energy_backward_blocks",
        "energy_pack_blocks",
        "emulate_order",
        "lattice_to_backward",
        "crf_trajectory_to_backward",
        "item_min_blocks",
        "filter_rows4",
    }
    assert all(isinstance(v, int) and v >= 0 for v in saved.values())
    with pytest.raises(ValueError, match="tuning value must be >= 0"):
        tuning("splat_tile", -1)
    with pytest.raises(ValueError, match=r"unknown tuning knob nope \(known: splat_tile, "):
        tuning("nope", 1)
    assert _C.tuning() == saved
    tuning("splat_tile", 5)
    assert _C.tuning()["splat_tile"] == 5


def test_tuning_from_the_environment():
    # RRM_CUDA_TUNING sets knobs at import (a GPU session flips a default without a rebuild); a bad
    # item fails the import with a message naming it
    import subprocess
    import sys

    code = "import rrm_cuda; from rrm_cuda import _C; t = _C.tuning(); print(t['blur_pairs'], t['splat_tile'])"
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    run = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(env, RRM_CUDA_TUNING="blur_pairs=0, splat_tile=16"),
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["0", "16"]
    for bad, msg in (
        ("nope=1", "unknown tuning knob nope"),
        ("blur_pairs", "expected name=value"),
        ("splat_tile=-2", ">= 0"),
        ("splat_tile=99999999999999999999", "int too big"),  # beyond int64: named too
    ):
        run = subprocess.run(
            [sys.executable, "-c", code], env=dict(env, RRM_CUDA_TUNING=bad), capture_output=True, text=True
        )
        assert run.returncode != 0 and "RRM_CUDA_TUNING: bad item" in run.stderr and msg in run.stderr, (
            bad,
            run.stderr[-500:],
        )


def test_hash_table_growth():
    # Images whose lattice outgrows the first hash table (sized for E/16 points) next to sparse ones:
    # the overflowed build is redone with a larger table, on the CPU and in the emulated launch.
    g = torch.Generator().manual_seed(5)
    N, d = 400, 5
    f = torch.randn(3, d, N, generator=g, dtype=torch.float64) * torch.tensor([30.0, 0.05, 3.0])[:, None, None]
    v = torch.randn(3, 2, N, generator=g, dtype=torch.float64)
    m = ops.lattice_num_vertices(f)
    assert int(m[0]) > N * (d + 1) // 4 and int(m[1]) < N * (d + 1) // 16  # 0 overflows the first table
    assert m.tolist() == lattice_num_vertices_reference(f).tolist()
    ref = permutohedral_filter_reference(v, f)
    torch.testing.assert_close(ops.permutohedral_filter(v, f, False), ref)
    torch.testing.assert_close(ops._permutohedral_filter_emulated(v, f, False), ref)


@pytest.mark.parametrize("rows4", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gpu_path_makes_no_fill_launches(dtype, rows4, tuning):
    # On a GPU every at::zeros / at::full is a TensorIterator and a kernel launch (~10 us of host time
    # each on session 24's H200). The GPU path's lattice build and splat lists have their hash table
    # (-1), claim counters, vertex counts and chunk tables (0) written by the threads of launches they
    # make anyway (common/exec.h, for_each_item_filling); the fused splat's counters take one memset.
    # Through the emulated launch, which fills those buffers with another pattern first (a buffer
    # the launch left unfilled would show in the result), and which counts its launches.
    from torch.profiler import ProfilerActivity, profile

    from rrm_cuda import _C
    from tests.conftest import photo

    tuning("splat_fused_reduce", 1)
    tuning("filter_rows4", rows4)
    img = torch.from_numpy(photo("astronaut", (48, 64))).permute(2, 0, 1)[None].to(dtype)
    f = rrm_cuda.bilateral_features(img, 80.0, 13.0, dtype=dtype)  # pydensecrf's bilateral sigmas
    v = torch.randn(1, 5, 48 * 64, generator=torch.Generator().manual_seed(0), dtype=dtype)
    r0 = _C.lattice_table_retries()
    l0, m0 = _C.emulated_launches()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = ops._permutohedral_filter_emulated(v, f, False)
    l1, m1 = _C.emulated_launches()
    assert _C.lattice_table_retries() == r0  # the first table held: no rebuild (whose fills are ATen's)
    fills = [e.name for e in prof.events() if e.name.split("::")[-1] in ("fill_", "zero_", "zeros", "full", "ones")]
    assert fills == []
    assert m1 - m0 == 1  # the fused splat's counters
    # The launches (besides the sort's and the chunk counts' scan): embed (with the fills), insert,
    # assign, resolve (with the table's statistics), sort keys (with the neighbours), list bounds
    # (with the splat lists), chunk ranges, the splat (with its chunk sums), three blurs (two axes
    # each), the slice; with rows of four (filter_rows4), the 5 channels' padding to 8 before the
    # splat. A change that adds one shows here.
    assert l1 - l0 == 12 + rows4
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out, permutohedral_filter_reference(v, f), rtol=tol, atol=tol)


@pytest.mark.parametrize("shards", [0, 1, 4, 32])
def test_hash_table_given_up_at_half_full(shards, tuning):
    # The launches' build (GPU, emulated, CPU passes) keeps a hash table only if at most half of it is
    # claimed (InsertFunctor, BuildStatsFunctor). N = 3000 points in 5-D: E = 18000 entries, a first
    # table of 4096 slots with min(knob insert_shards, 4) claim counters (4: each given up at 768
    # claims; 1: at 2048), then 32768 slots, then 65536 >= 2E (no counter but with knob 0).
    # Image 0 has 2048 < M < 3072 vertices: with one counter the insert gives up at 2048 claims, with
    # 4 no thread does and BuildStatsFunctor's count rejects the table. Image 1 outgrows the first
    # table by far (threads give up), image 3 the second too (M > 16384), image 2 fits. The lattice
    # and the filter are the reference's every way.
    from rrm_cuda import _C

    tuning("insert_shards", shards)
    g = torch.Generator().manual_seed(7)
    N, d = 3000, 5
    base = torch.randn(1, d, N, generator=g, dtype=torch.float64)
    f = torch.cat([base * 0.9, base * 2.0, base * 0.5, base * 10.0])
    v = torch.randn(4, 2, N, generator=g, dtype=torch.float64)
    m = lattice_num_vertices_reference(f).tolist()
    assert 2048 < m[0] < 3072 and 8192 < m[1] < 16384 and m[2] < 1024 and m[3] > 16384, m
    ref = permutohedral_filter_reference(v, f)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        tuning("cpu_build_passes", 1)  # one image on two threads: the CPU's launches
        for b, retries in enumerate((1, 1, 0, 2)):
            for op in (ops._permutohedral_filter_emulated, ops.permutohedral_filter):
                r0 = _C.lattice_table_retries()
                out = op(v[b : b + 1], f[b : b + 1], False)
                assert _C.lattice_table_retries() - r0 == retries, (b, op)
                torch.testing.assert_close(out, ref[b : b + 1])
            assert int(ops.lattice_num_vertices(f[b : b + 1])[0]) == m[b]
        r0 = _C.lattice_table_retries()
        torch.testing.assert_close(ops._permutohedral_filter_emulated(v, f, False), ref)  # one table size for all
        assert _C.lattice_table_retries() - r0 == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("d", [2, 3, 5, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_serial_build_equals_the_launches(d, dtype, tuning):
    # The CPU builds a batch's lattices image by image on one thread each (lattice_impl.h,
    # build_image_cpu), one image on several threads by the launches (embed, insert, assign,
    # resolve, neighbours) under knob cpu_build_passes. With the same thread count the filter then
    # runs the same way: every image's result must be the same bits either way, and the vertex counts
    # equal. The second image outgrows the serial build's first hash table (rehashed) and the
    # launches' (rebuilt).
    tuning("cpu_build_passes", 1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        g = torch.Generator().manual_seed(d)
        N = 1500
        f = torch.randn(3, d, N, generator=g, dtype=dtype) * 2
        f[1] *= 40  # spread out: many vertices
        f[2, :, N // 2 :] = float("nan")  # refused features: no weight, as the launches give them
        v = torch.randn(3, 4, N, generator=g, dtype=dtype)
        batch = ops.permutohedral_filter(v, f, False)  # 3 images: serial builds
        m = ops.lattice_num_vertices(f)
        assert int(m[1]) > N * (d + 1) // 4
        for b in range(3):
            one = ops.permutohedral_filter(v[b : b + 1], f[b : b + 1], False)  # launches
            assert torch.equal(batch[b : b + 1], one), b
            assert torch.equal(m[b : b + 1], ops.lattice_num_vertices(f[b : b + 1])), b
        assert m.tolist() == lattice_num_vertices_reference(f.nan_to_num(0.0)).tolist()  # NaN: taken as 0
    finally:
        torch.set_num_threads(before)


def _assert_same_lattice(tables, features, first_appearance):
    """The op's lattice tables (_lattice_tables) of each image equal the reference's
    (_lattice_reference: vertices numbered by torch.unique) up to the vertex numbering: one id of
    the op for each of the reference's, the same weights and the same neighbours. first_appearance:
    the ids also follow the entries' order of first appearance (the CPU's numbering)."""
    from rrm_cuda.reference import _lattice_reference

    ev, ew, nbr = tables
    for b in range(features.shape[0]):
        vertex, weight, ref_nbr, M = _lattice_reference(features[b])
        ours = ev[b].long()
        assert int(ours.max()) + 1 == M and int(ours.min()) == 0, b
        to_ours = torch.full((M,), -1, dtype=torch.long)
        to_ours[vertex.reshape(-1)] = ours.reshape(-1)
        assert torch.equal(to_ours[vertex], ours), b  # one id of ours per reference vertex
        assert torch.equal(torch.sort(to_ours).values, torch.arange(M)), b  # and a bijection
        torch.testing.assert_close(ew[b], weight, rtol=1e-6 if ew.dtype == torch.float32 else 1e-13, atol=1e-6)
        mapped = torch.where(ref_nbr < 0, -1, to_ours[ref_nbr.clamp(min=0)])  # (d+1, M, 2) in our ids
        ours_nbr = torch.full_like(mapped, -2)
        ours_nbr[:, to_ours] = mapped
        assert torch.equal(nbr[b, :, :M].long(), ours_nbr), b
        assert bool((nbr[b, :, M:] == -1).all()), b  # rows beyond the image's vertices
        if first_appearance:
            flat = ours.reshape(-1)
            seen = torch.cat([flat.new_tensor([-1]), flat.cummax(0).values[:-1]])
            assert bool((flat <= seen + 1).all()), b


@pytest.mark.parametrize("d", [1, 2, 3, 5, 7, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lattice_tables_equal_the_reference(d, dtype, tuning):
    # The lattice itself, not only what a filter computes with it: entries, weights and blur
    # neighbours from every CPU build (one pass per image; the launches' passes; the emulated CUDA
    # passes) against the reference's torch.unique lattice. Three images: smooth (few vertices),
    # spread (the first tables outgrown: rehashed, rebuilt), integer-valued (tied residuals).
    g = torch.Generator().manual_seed(20 + d)
    N = 700 if d <= 7 else 100  # (the reference's neighbour search grows with d)
    f = torch.randn(3, d, N, generator=g, dtype=dtype)
    f[0] *= 0.7
    f[1] *= 40
    f[2] = torch.randint(-3, 4, (d, N), generator=g).to(dtype)
    before = torch.get_num_threads()
    try:
        for threads, passes in ((1, 0), (2, 0), (4, 0), (4, 1)):
            torch.set_num_threads(threads)
            tuning("cpu_build_passes", passes)
            # the passes' vertex ids follow the entries that won the slots' races: not first appearance
            ordered = passes == 0
            for b in range(3):  # one image: fewer images than threads (pixel ranges or the passes)
                _assert_same_lattice(ops._lattice_tables(f[b : b + 1]), f[b : b + 1], first_appearance=ordered)
            _assert_same_lattice(ops._lattice_tables(f), f, first_appearance=ordered or threads <= 3)
    finally:
        torch.set_num_threads(before)
    _assert_same_lattice(ops._lattice_tables(f, True), f, first_appearance=False)


@pytest.mark.parametrize("d", [2, 5, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_build_in_pixel_ranges_gives_the_one_pass_lattice(d, dtype, tuning):
    # One image on several threads: its pixels cut into ranges, each built into a table of its own,
    # merged in range order (lattice_impl.h, build_image_cpu). The result must be the one-pass
    # lattice bit for bit -- the same vertex ids (first appearance over the whole image), weights and
    # neighbours -- whatever the number of ranges; the launches' passes number the vertices
    # otherwise, and filter the same. The image's halves differ (smooth, then spread out: the merge
    # outgrows the first range's table), and a band of refused (NaN) features crosses a range
    # boundary; without it, the lattice equals the reference's.
    g = torch.Generator().manual_seed(d)
    N = 4 * 8192 + 77  # up to four ranges of at least 8192 pixels
    clean = torch.randn(2, d, N, generator=g, dtype=dtype)
    clean[..., N // 2 :] *= 30
    clean[1] = clean[1].flip(-1)  # spread out first, then smooth
    f = clean.clone()
    f[..., N // 3 - 50 : N // 3 + 50] = float("nan")
    v = torch.randn(2, 3, N, generator=g, dtype=dtype)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops._lattice_tables(f)
        filtered = ops.permutohedral_filter(v, f, False)
        for threads, passes in ((2, 0), (3, 0), (4, 0), (5, 0), (3, 1)):
            torch.set_num_threads(threads)  # 2 images: one per thread at 2, cut into ranges beyond
            tuning("cpu_build_passes", passes)
            if passes == 0:
                for a, b in zip(one, ops._lattice_tables(f)):
                    assert torch.equal(a, b), threads
                for i in range(2):  # one image alone: cut into up to 4 ranges
                    ev, ew, nbr = ops._lattice_tables(f[i : i + 1])
                    m = nbr.shape[2]  # its own vertex count (the batch's rows beyond it: -1)
                    assert torch.equal(ev, one[0][i : i + 1]) and torch.equal(ew, one[1][i : i + 1]), threads
                    assert torch.equal(nbr, one[2][i : i + 1, :, :m]), threads
            tol = 1e-4 if dtype == torch.float32 else 1e-10  # other threads: other partial sums' rounding
            torch.testing.assert_close(
                ops.permutohedral_filter(v, f, False), filtered, rtol=tol, atol=tol * float(filtered.abs().max())
            )
        tuning("cpu_build_passes", 0)
        torch.set_num_threads(3)
        if d <= 5:  # (the reference's time grows with d; the other d match it in the test above)
            _assert_same_lattice(ops._lattice_tables(clean[:1]), clean[:1], first_appearance=True)  # 3 ranges
    finally:
        torch.set_num_threads(before)


def test_lattice_tables_bad_input():
    with pytest.raises(ValueError, match="features must have 3 dimensions"):
        ops._lattice_tables(torch.zeros(2, 3))
    with pytest.raises(TypeError, match="features"):
        ops._lattice_tables(torch.zeros(1, 2, 5, dtype=torch.int32))
    with pytest.raises(ValueError, match="features"):
        ops._lattice_tables(torch.zeros(1, 0, 5))  # d = 0
    with pytest.raises(ValueError, match="features"):
        ops._lattice_tables(torch.zeros(1, 17, 5))  # d beyond 16
    ev, ew, nbr = ops._lattice_tables(torch.zeros(2, 3, 0))
    assert ev.shape == (2, 0, 4) and ew.shape == (2, 0, 4) and nbr.shape == (2, 4, 0, 2)


def test_lattice_tables_opcheck():
    g = torch.Generator().manual_seed(0)
    for emulated in (False, True):
        torch.library.opcheck(ops._lattice_tables, (torch.randn(2, 3, 50, generator=g), emulated))


@pytest.mark.parametrize("d", [2, 3, 5])
def test_cpu_vector_simplex_edge_values(d, tuning):
    # The serial build takes float32 simplices 8 pixels at a time in AVX2 registers where the
    # processor has it (simplex_avx2.h), the launches one pixel at a time: the same bits are needed
    # where rounding is delicate too -- ties between the two nearest lattice points (integer and
    # half-integer features), coordinates so large that float spacing exceeds d + 1, values at and
    # beyond the key range (refused lane by lane), -0.0, and a pixel count that leaves a tail.
    tuning("cpu_build_passes", 1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        g = torch.Generator().manual_seed(10 + d)
        N = 8 * 40 + 5
        ties = torch.randint(-6, 7, (d, N), generator=g).float() * 0.5
        big = torch.randn(d, N, generator=g) * 3e7
        mixed = torch.randn(d, N, generator=g) * 4
        lanes = torch.arange(N)
        mixed[0, lanes % 8 == 3] = 2.0e9  # beyond the int32 keys: refused
        mixed[d - 1, lanes % 5 == 1] = float("inf")
        mixed[1, lanes % 7 == 2] = float("-inf")
        mixed[0, lanes % 11 == 4] = float("nan")
        mixed[:, lanes % 13 == 6] = -0.0
        mixed[0, lanes % 17 == 0] = 5.0e8  # near the edge of the key range
        f = torch.stack([ties, big, mixed])
        v = torch.randn(3, 3, N, generator=g)
        batch = ops.permutohedral_filter(v, f, False)  # 3 images on 2 threads: serial builds
        m = ops.lattice_num_vertices(f)
        for b in range(3):
            one = ops.permutohedral_filter(v[b : b + 1], f[b : b + 1], False)  # launches, scalar simplex
            assert torch.equal(batch[b : b + 1], one), b
            assert torch.equal(m[b : b + 1], ops.lattice_num_vertices(f[b : b + 1])), b
        assert bool(torch.isfinite(batch).all())
    finally:
        torch.set_num_threads(before)


def test_deterministic():
    v, f = _inputs(B=2, C=7, N=3000, d=5, dtype=torch.float32)
    a = ops.permutohedral_filter(v, f, False)
    for _ in range(3):
        assert torch.equal(a, ops.permutohedral_filter(v, f, False))


def test_bounded_by_exact_gaussian():
    """d=2: the lattice is ~0.8-0.9x the exact Gaussian sum with a few % error after a rescale (SPEC §1)."""
    g = torch.Generator().manual_seed(1)
    v = torch.rand(1, 1, 400, generator=g, dtype=torch.float64)
    f = torch.rand(1, 2, 400, generator=g, dtype=torch.float64) * 10
    lat = ops.permutohedral_filter(v, f, False)
    ex = gaussian_filter_exact(v, f)
    ratio = float((lat * ex).sum() / (ex * ex).sum())
    assert 0.7 < ratio < 1.0
    rel = float((lat / ratio - ex).norm() / ex.norm())
    assert rel < 0.05


# ---- tiny hand-computed case -----------------------------------------------------------------
def test_single_point_hand_computed():
    """d = 1, one point at the origin: it sits on vertex [0] with weight 1; the simplex's other corner,
    vertex [1], is created with weight 0. Blur along axis 0 (neighbours of [1]: [0] and [2]) gives
    [1] = 0 + v/2; blur along axis 1 (neighbours of [0]: [-1] and [1]) gives [0] = v + v/4. Slice:
    alpha * 1 * 5v/4 with alpha = 1 / (1 + 2^-1) = 2/3, so v = 3 -> 2.5."""
    v = torch.tensor([[[3.0]]], dtype=torch.float64)
    f = torch.zeros(1, 1, 1, dtype=torch.float64)
    assert float(ops.permutohedral_filter(v, f, False)) == pytest.approx(2.5, rel=1e-14)
    assert ops.lattice_num_vertices(f).tolist() == [2]


def test_far_apart_points_do_not_interact():
    v = torch.tensor([[[1.0, 2.0]]], dtype=torch.float64)
    f = torch.tensor([[[0.0, 999.0]]], dtype=torch.float64)
    out = ops.permutohedral_filter(v, f, False)
    single = torch.stack(
        [ops.permutohedral_filter(v[:, :, i : i + 1], f[:, :, i : i + 1], False) for i in range(2)], -1
    )
    torch.testing.assert_close(out, single.reshape(1, 1, 2))


# ---- gradients -------------------------------------------------------------------------------
def test_gradcheck():
    v, f = _inputs(B=2, C=2, N=30, d=3)
    v.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: rrm_cuda.permutohedral_filter(x, f), (v,), fast_mode=True)
    assert torch.autograd.gradcheck(lambda x: rrm_cuda.permutohedral_filter(x, f, reverse=True), (v,), fast_mode=True)


def test_gradient_is_reference_adjoint():
    v, f = _inputs(B=1, C=2, N=80, d=5)
    v.requires_grad_(True)
    w = torch.randn_like(v)
    (rrm_cuda.permutohedral_filter(v, f) * w).sum().backward()
    torch.testing.assert_close(v.grad, permutohedral_filter_reference(w, f, reverse=True))


def test_autograd_function_form():
    from rrm_cuda._ops.lattice import PermutohedralFilterFunction

    v, f = _inputs(B=1, C=2, N=40, d=2)
    v.requires_grad_(True)
    out = PermutohedralFilterFunction.apply(v, f, False)
    out.sum().backward()
    torch.testing.assert_close(v.grad, ops.permutohedral_filter(torch.ones_like(v), f, True))


def _filter_call(form):
    from rrm_cuda._ops.lattice import PermutohedralFilterFunction

    return {
        "public": lambda v, f, rev: rrm_cuda.permutohedral_filter(v, f, reverse=rev),
        "op": lambda v, f, rev: ops.permutohedral_filter(v, f, rev, False),
        "emulated": lambda v, f, rev: ops._permutohedral_filter_emulated(v, f, rev),
        "function": lambda v, f, rev: PermutohedralFilterFunction.apply(v, f, rev),
    }[form]


def _feature_grad_reference(v, f, w, reverse):
    # autograd through the dense reference lattice: its weights are torch ops of the features, its
    # vertices integers (no derivative), as the lattice's
    fr = f.detach().clone().requires_grad_(True)
    (gf,) = torch.autograd.grad((permutohedral_filter_reference(v.detach(), fr, reverse) * w).sum(), fr)
    return gf


@pytest.mark.parametrize("form", ["public", "op", "emulated", "function"])
@pytest.mark.parametrize("d", [1, 2, 3, 5, 7])
def test_feature_gradient_equals_reference_autograd(form, d):
    # The features' gradient (the barycentric weights' derivative, the simplices held) equals autograd
    # through the independent dense reference, for the kernels' fixed d (2, 3, 5) and runtime d, both
    # blur orders; the values' gradient in the same backward is still the adjoint.
    call = _filter_call(form)
    for reverse in (False, True):
        v, f = _inputs(B=2, C=3, N=70, d=d, seed=10 + d)
        w = torch.randn(v.shape, generator=torch.Generator().manual_seed(d), dtype=v.dtype)
        v.requires_grad_(True)
        f.requires_grad_(True)
        gv, gf = torch.autograd.grad((call(v, f, reverse) * w).sum(), (v, f))
        ref = _feature_grad_reference(v, f, w, reverse)
        assert float(ref.abs().max()) > 1e-3  # not a vacuous comparison
        torch.testing.assert_close(gf, ref, rtol=1e-10, atol=1e-12 * float(ref.abs().max()))
        torch.testing.assert_close(gv, permutohedral_filter_reference(w, f.detach(), not reverse))


@pytest.mark.parametrize("emulated", [False, True])
@pytest.mark.parametrize("d", [2, 4])
def test_feature_gradcheck(emulated, d):
    # float64 gradcheck of values and features together (finite differences: the features lie away
    # from the simplices' boundaries by more than eps at these seeds)
    op = ops._permutohedral_filter_emulated if emulated else ops.permutohedral_filter
    v, f = _inputs(B=2, C=2, N=30, d=d, seed=3)
    v.requires_grad_(True)
    f.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: op(a, b, False, False), (v, f), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(
        lambda a, b: rrm_cuda.permutohedral_filter(a, b, reverse=True), (v, f), eps=1e-6, atol=1e-6
    )


def test_feature_gradient_alone_and_with_float32_and_images():
    # Only the features require a gradient (the values are constants); float32; (B, d, H, W) images
    v, f = _inputs(B=2, C=3, N=64, d=5, dtype=torch.float32, seed=5)
    w = torch.randn(v.shape, generator=torch.Generator().manual_seed(2))
    f.requires_grad_(True)
    (gf,) = torch.autograd.grad((rrm_cuda.permutohedral_filter(v, f) * w).sum(), f)
    ref = _feature_grad_reference(v.double(), f.double(), w.double(), False)
    torch.testing.assert_close(gf.double(), ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    f4 = f.detach().reshape(2, 5, 8, 8).requires_grad_(True)
    (g4,) = torch.autograd.grad(
        (rrm_cuda.permutohedral_filter(v.reshape(2, 3, 8, 8), f4) * w.reshape(2, 3, 8, 8)).sum(), f4
    )
    torch.testing.assert_close(g4.reshape(2, 5, 64), gf)


def test_feature_gradient_with_cached_and_counted_lattices(lattice_cache, tuning):
    # cache=True (the forward's kept lattice) and counted lattices (emulated: a CUDA graph's build)
    # give the same features' gradient as a fresh build
    v, f = _inputs(B=3, C=4, N=90, d=3, seed=8)
    w = torch.randn(v.shape, generator=torch.Generator().manual_seed(4), dtype=v.dtype)
    f.requires_grad_(True)

    def grad_f(op, cache):
        (g,) = torch.autograd.grad((op(v, f, False, cache) * w).sum(), f)
        return g

    want = grad_f(ops.permutohedral_filter, False)
    for k in range(2):  # the first call builds and keeps the lattice, the second takes it from the cache
        assert torch.equal(grad_f(ops.permutohedral_filter, True), want), k
    emu = grad_f(ops._permutohedral_filter_emulated, False)
    torch.testing.assert_close(emu, want, rtol=1e-12, atol=1e-12 * float(want.abs().max()))
    tuning("counted_lattice", 1)
    assert torch.equal(grad_f(ops._permutohedral_filter_emulated, False), emu)


def test_feature_gradient_learns_bandwidths():
    # What the features' gradient is for: bandwidths learnt by gradient descent. The target is the
    # bilateral filter of a 24 x 24 image at sigma_x, sigma_y, sigma_rgb = 2.5, 4, 30; Adam on the
    # log-sigmas from 6, 1.5, 80 finds all three (to 0.1 % in this run; the lattice's piecewise
    # linear weights leave the loss continuous but with kinks, which the test tolerates).
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(24.0), torch.arange(24.0), indexing="ij")
    image = torch.rand(1, 1, 24, 24, generator=g) * 255
    feats = torch.cat([torch.stack([xx, yy])[None], image], 1).double()  # (1, 3, 24, 24)
    v = torch.randn(1, 2, 24, 24, generator=g, dtype=torch.float64)
    true = torch.tensor([2.5, 4.0, 30.0], dtype=torch.float64)
    target = rrm_cuda.permutohedral_filter(v, feats / true.view(1, 3, 1, 1))
    log_sigma = torch.tensor([6.0, 1.5, 80.0], dtype=torch.float64).log().requires_grad_(True)
    opt = torch.optim.Adam([log_sigma], lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        out = rrm_cuda.permutohedral_filter(v, feats / log_sigma.exp().view(1, 3, 1, 1))
        ((out - target) ** 2).mean().backward()
        opt.step()
    torch.testing.assert_close(log_sigma.exp().detach(), true, rtol=0.02, atol=0)


def test_feature_gradient_reaches_tensor_sigmas():
    # bilateral_features / position_features keep a learnable sigma's graph (a 0-dim tensor that
    # requires grad used to be read as a number: its gradient silently lost); generic sigmas, so that
    # no pixel sits on a simplex boundary within the finite differences' eps
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 12, 12, dtype=torch.float64, generator=g) * 255
    v = torch.randn(2, 4, 144, dtype=torch.float64, generator=g)
    sxy = torch.tensor(7.3, dtype=torch.float64, requires_grad=True)
    srgb = torch.tensor([13.7, 11.1], dtype=torch.float64, requires_grad=True)  # per image

    def filt(a, b):
        return rrm_cuda.permutohedral_filter(v, rrm_cuda.bilateral_features(img, a, b, dtype=torch.float64))

    assert torch.autograd.gradcheck(filt, (sxy, srgb), eps=1e-7, atol=1e-6)
    pos = rrm_cuda.position_features(2, (12, 12), sxy, dtype=torch.float64)
    assert pos.requires_grad and pos.shape == (2, 2, 144)
    # the values are those of number sigmas
    torch.testing.assert_close(pos.detach(), rrm_cuda.position_features(2, (12, 12), 7.3, dtype=torch.float64))
    feats = rrm_cuda.bilateral_features(img, sxy, 13.7, dtype=torch.float64)
    torch.testing.assert_close(feats.detach(), rrm_cuda.bilateral_features(img, 7.3, 13.7, dtype=torch.float64))
    with pytest.raises(ValueError, match="sxy must be positive and finite"):
        rrm_cuda.bilateral_features(img, torch.tensor(-1.0, requires_grad=True), 13.0)


def test_feature_gradient_is_not_differentiable_again():
    # the features' gradient is computed by an op without a derivative: a double backward through it
    # raises instead of silently dropping terms; the values' double backward still works
    v, f = _inputs(B=1, C=2, N=40, d=3)
    v.requires_grad_(True)
    for form in ("public", "function"):
        fr = f.clone().requires_grad_(True)
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(_filter_call(form)(v, fr, False).sum(), (v, fr), create_graph=True)
    (gv,) = torch.autograd.grad((rrm_cuda.permutohedral_filter(v, f) ** 2).sum(), v, create_graph=True)
    gv.sum().backward()
    assert v.grad is not None


def test_feature_gradient_op_bad_inputs():
    v, f = _inputs(B=2, C=3, N=20, d=2)
    with pytest.raises(ValueError, match="grad must have the shape of values"):
        ops._permutohedral_filter_backward(v, f, v[:, :2].contiguous(), False, False)
    with pytest.raises(TypeError, match="values and grad must have the same dtype"):
        ops._permutohedral_filter_backward(v, f, v.float(), False, False)
    gv, gf = ops._permutohedral_filter_backward(v[:, :0], f, v[:, :0], False, False)
    assert gv.shape == (2, 0, 20) and gf.shape == f.shape and not gf.any()


@pytest.mark.parametrize("op", ["_permutohedral_filter_backward", "_permutohedral_filter_backward_emulated"])
def test_joint_backward_gives_the_adjoints_bits(op):
    # the values' gradient of the joint backward (one lattice for both) is the adjoint filter's, bit
    # for bit: the same splat, blurs and slice of grad
    v, f = _inputs(B=2, C=5, N=120, d=5, seed=6)
    g = torch.randn(v.shape, generator=torch.Generator().manual_seed(7), dtype=v.dtype)
    filt = ops.permutohedral_filter if op == "_permutohedral_filter_backward" else ops._permutohedral_filter_emulated
    for rev in (False, True):
        gv, _ = getattr(ops, op)(v, f, g, rev, False)
        assert torch.equal(gv, filt(g, f, not rev, False))


# ---- the forward's lattice handed to the backward ----------------------------------------------
def _fwd_bwd(fn, v, f, w, want, rev=False, **grad_kw):
    """(gradients, lattices built) of one forward and backward of fn(v, f, rev, False) * w."""
    from rrm_cuda import _C

    vv = v.detach().clone().requires_grad_(want != "features")
    ff = f.detach().clone().requires_grad_(want != "values")
    before = _C.lattice_builds()
    grads = torch.autograd.grad((fn(vv, ff, rev, False) * w).sum(), [t for t in (vv, ff) if t.requires_grad], **grad_kw)
    return grads, _C.lattice_builds() - before


@pytest.mark.parametrize("op", ["permutohedral_filter", "_permutohedral_filter_emulated"])
@pytest.mark.parametrize("want", ["values", "features", "both"])
def test_forward_hands_its_lattice_to_the_backward(op, want, tuning, lattice_cache):
    # The autograd node keeps the lattice its forward built (and, for the features' gradient, the
    # forward's blurred rows): a forward and backward build one lattice, not two, and give the bits of
    # the backward that builds it again (knob lattice_to_backward 0), in both blur orders and with
    # non-contiguous features (keyed by the tensor the caller passed, as the cache's entries).
    from rrm_cuda import _C

    fn = getattr(ops, op)
    v, f = _inputs(B=2, C=5, N=150, d=5, seed=11)
    w = torch.randn(v.shape, generator=torch.Generator().manual_seed(12), dtype=v.dtype)
    f_nc = f.transpose(1, 2).contiguous().transpose(1, 2)
    assert not f_nc.is_contiguous()
    for feats in (f, f_nc):
        for rev in (False, True):
            got, builds = _fwd_bwd(fn, v, feats, w, want, rev)
            tuning("lattice_to_backward", 0)
            ref, builds0 = _fwd_bwd(fn, v, feats, w, want, rev)
            tuning("lattice_to_backward", 1)
            assert (builds, builds0) == (1, 2)
            assert len(got) == len(ref) == (2 if want == "both" else 1)
            for a, b in zip(got, ref):
                assert torch.equal(a, b)
    # nothing is left behind for later calls: a plain call builds its lattice
    before = _C.lattice_builds()
    fn(v, f, False, False)
    assert _C.lattice_builds() - before == 1
    assert rrm_cuda.lattice_cache_info()["entries"] == 0  # the cache is not used for it


def test_handed_over_rows_spare_the_backward_a_splat_and_blurs(tuning):
    # With the features' gradient the backward also takes the forward's blurred rows B S values: the
    # emulated GPU path launches the build's launches fewer (values' gradient) and, with the features',
    # a splat and three paired blurs (d = 5) fewer on top
    from rrm_cuda import _C

    v, f = _inputs(B=2, C=4, N=120, d=5, seed=13)
    w = torch.randn(v.shape, generator=torch.Generator().manual_seed(14), dtype=v.dtype)

    def launches(keep, want):
        tuning("lattice_to_backward", keep)
        before = _C.emulated_launches()[0]
        _fwd_bwd(ops._permutohedral_filter_emulated, v, f, w, want)
        return _C.emulated_launches()[0] - before

    before = _C.emulated_launches()[0]
    ops._lattice_tables(f, True)
    build = _C.emulated_launches()[0] - before
    assert build >= 5
    assert launches(0, "values") - launches(1, "values") == build
    assert launches(0, "both") - launches(1, "both") == build + 4
    assert launches(0, "features") - launches(1, "features") == build + 4


def test_handed_over_lattice_goes_with_the_first_backward(tuning):
    # The node lets the lattice go in its first backward: a second one (retain_graph=True) builds it
    # again, with the same bits; a double backward of the values' gradient (create_graph=True) hands
    # the lattice on to the node of its backward's filter.
    from rrm_cuda import _C

    v, f = _inputs(B=1, C=3, N=90, d=3, seed=15)
    w = torch.randn(v.shape, generator=torch.Generator().manual_seed(16), dtype=v.dtype)
    for want in ("values", "both"):
        vv = v.clone().requires_grad_(True)
        ff = f.clone().requires_grad_(want == "both")
        inputs = [vv, ff] if want == "both" else [vv]
        loss = (rrm_cuda.permutohedral_filter(vv, ff) * w).sum()
        counts = [_C.lattice_builds()]
        first = torch.autograd.grad(loss, inputs, retain_graph=True)
        counts.append(_C.lattice_builds())
        second = torch.autograd.grad(loss, inputs)
        counts.append(_C.lattice_builds())
        assert (counts[1] - counts[0], counts[2] - counts[1]) == (0, 1)
        for a, b in zip(first, second):
            assert torch.equal(a, b)

    def double(keep):
        tuning("lattice_to_backward", keep)
        vv = v.clone().requires_grad_(True)
        before = _C.lattice_builds()
        (gv,) = torch.autograd.grad((rrm_cuda.permutohedral_filter(vv, f) ** 2).sum(), vv, create_graph=True)
        (ggv,) = torch.autograd.grad((gv * w).sum(), vv)
        return gv, ggv, _C.lattice_builds() - before

    kept, rebuilt = double(1), double(0)
    assert torch.equal(kept[0], rebuilt[0]) and torch.equal(kept[1], rebuilt[1])
    # forward 1; first backward 0 (handed over), recorded by its filter's node; that node's backward 0;
    # the first node again (its lattice gone with its first backward) 1. Without: one per filter call.
    assert (kept[2], rebuilt[2]) == (2, 4)


def test_nothing_is_handed_over_in_a_capture_or_without_a_graph(tuning):
    # Inside a CUDA graph capture (emulated: counted lattices, no cache) the backward builds its own
    # lattice, as before; under no_grad, or with no input requiring a gradient, nothing is recorded.
    from rrm_cuda import _C

    v, f = _inputs(B=2, C=3, N=100, d=5, seed=17)
    w = torch.randn(v.shape, generator=torch.Generator().manual_seed(18), dtype=v.dtype)
    ref, _ = _fwd_bwd(ops._permutohedral_filter_emulated, v, f, w, "both")
    tuning("emulate_capture", 1)
    counted = _C.lattice_counted_builds()
    got, builds = _fwd_bwd(ops._permutohedral_filter_emulated, v, f, w, "both")
    assert builds == 2 and _C.lattice_counted_builds() - counted == 2
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    tuning("emulate_capture", 0)
    with torch.no_grad():
        out = rrm_cuda.permutohedral_filter(v.clone().requires_grad_(True), f)
    assert out.grad_fn is None
    assert rrm_cuda.permutohedral_filter(v, f).grad_fn is None


# ---- the lattice cache (cache=True) -------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cached_lattice_gives_the_same_bits(lattice_cache, dtype):
    from rrm_cuda import _C

    # cache=True: the first call builds and keeps the lattice, later calls (other values, either
    # blur order, the backward) reuse it with the bits of a fresh build; one entry per executor.
    v, f = _inputs(B=2, C=4, N=180, d=5, dtype=dtype, seed=4)
    w = torch.randn_like(v)
    for op in (ops.permutohedral_filter, ops._permutohedral_filter_emulated):
        for rev in (False, True):
            for x in (v, w):
                fresh = op(x, f, rev)
                for _ in range(2):
                    torch.testing.assert_close(op(x, f, rev, True), fresh, rtol=0, atol=0)
    info = rrm_cuda.lattice_cache_info()
    assert info["entries"] == 2 and info["misses"] == 2 and info["hits"] == 14 and info["bytes"] > 0
    # the public API and its backward (the adjoint reuses the forward's entry, which the forward's
    # autograd node hands to it: one cache hit, in the forward, and no build)
    vg = v.clone().requires_grad_()
    builds = _C.lattice_builds()
    out = rrm_cuda.permutohedral_filter(vg, f, cache=True)
    (out * w).sum().backward()
    assert _C.lattice_builds() == builds
    torch.testing.assert_close(out, ops.permutohedral_filter(v, f), rtol=0, atol=0)
    torch.testing.assert_close(vg.grad, ops.permutohedral_filter(w, f, True), rtol=0, atol=0)
    assert rrm_cuda.lattice_cache_info()["hits"] == 15
    # a lattice dense_crf keeps for the same tensor is the filter's too (one build per executor)
    rrm_cuda.clear_lattice_cache()
    u = torch.randn(2, 3, 180, dtype=dtype)
    c = -torch.eye(3, dtype=dtype)[None]
    ops.dense_crf(u, [f], c, [True], [0], 2, [True])
    assert torch.equal(ops.permutohedral_filter(v, f, False, True), ops.permutohedral_filter(v, f))
    assert rrm_cuda.lattice_cache_info()["misses"] == 1


def test_cached_filter_sees_in_place_changes_and_keeps_only_what_it_can(lattice_cache):
    v, f = _inputs(B=1, C=3, N=120, d=3, seed=6)
    for op in (ops.permutohedral_filter, ops._permutohedral_filter_emulated):
        first = op(v, f, False, True)
        f.mul_(1.3)  # a new version of the tensor: its kept lattice is not used
        got = op(v, f, False, True)
        torch.testing.assert_close(got, op(v, f.clone()), rtol=0, atol=0)
        assert not torch.equal(got, first)
        f.div_(1.3)
        # a new alias of the memory (its own version counter, at 0) after a write the kept tensor saw:
        # not the stale lattice of the key (pointer, shape, version 0) it matches
        rrm_cuda.clear_lattice_cache()
        g = f.clone()
        op(v, g, False, True)
        g.mul_(1.3)
        alias = torch.from_numpy(g.numpy())
        assert alias._version == 0
        torch.testing.assert_close(op(v, alias, False, True), op(v, g.clone()), rtol=0, atol=0)
    # a non-contiguous tensor is never kept (contiguous() copies it every call)
    rrm_cuda.clear_lattice_cache()
    ft = torch.randn(1, 120, 3, dtype=torch.float64).transpose(1, 2)
    torch.testing.assert_close(ops.permutohedral_filter(v, ft, False, True), ops.permutohedral_filter(v, ft))
    # the public API keeps a lattice only for features it passes on unconverted
    rrm_cuda.permutohedral_filter(v, f.float(), cache=True)  # float32 features, float64 values: converted
    rrm_cuda.permutohedral_filter(v.reshape(1, 3, 10, 12), f.reshape(1, 3, 10, 12), cache=True)
    rrm_cuda.permutohedral_filter(v.reshape(1, 3, 10, 12), f.reshape(1, 3, 10, 12), cache=True)
    assert rrm_cuda.lattice_cache_info()["entries"] == 1 and rrm_cuda.lattice_cache_info()["hits"] == 1
    # capacity 0: nothing kept, the same results
    rrm_cuda.set_lattice_cache_capacity(0)
    assert torch.equal(ops.permutohedral_filter(v, f, False, True), ops.permutohedral_filter(v, f))
    assert rrm_cuda.lattice_cache_info()["entries"] == 0
    # the module form passes the flag on
    rrm_cuda.set_lattice_cache_capacity(8)
    rrm_cuda.clear_lattice_cache()
    m = rrm_cuda.PermutohedralFilter(cache=True)
    torch.testing.assert_close(m(v, f), m(v, f), rtol=0, atol=0)
    assert rrm_cuda.lattice_cache_info()["entries"] == 1 and rrm_cuda.lattice_cache_info()["hits"] == 1


def test_filter_reads_its_inputs_back_once(monkeypatch, lattice_cache):
    # the features' and the values' checks (finite, the key range) share one device read per call,
    # with or without cache=True; a NaN written in place into kept features is still caught
    from rrm_cuda import _validate as V

    reads = []
    real = V.finite_ranges_later
    monkeypatch.setattr(V, "finite_ranges_later", lambda items: reads.append([n for n, _ in items]) or real(items))
    v, f = _inputs(B=1, C=2, N=60, d=3, seed=9)
    for _ in range(3):
        rrm_cuda.permutohedral_filter(v, f, cache=True)
    rrm_cuda.permutohedral_filter(v, f)
    assert reads == [["features", "values"]] * 4
    f[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="features contains NaN"):
        rrm_cuda.permutohedral_filter(v, f, cache=True)
    with pytest.raises(ValueError, match="features: feature values up to 1e\\+30 overflow"):
        rrm_cuda.permutohedral_filter(v, f.nan_to_num(1e30), cache=True)


def test_cached_filter_gradcheck(lattice_cache):
    v, f = _inputs(B=2, C=2, N=30, d=3)
    v.requires_grad_(True)
    for rev in (False, True):
        fn = lambda x: rrm_cuda.permutohedral_filter(x, f, reverse=rev, cache=True)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (v,), fast_mode=True)
    assert rrm_cuda.lattice_cache_info()["hits"] > 0


# ---- opcheck ---------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [(2, 3, 50, 2, False), (1, 1, 20, 5, True), (3, 4, 10, 1, False)])
def test_opcheck(args):
    B, C, N, d, rev = args
    v, f = _inputs(B=B, C=C, N=N, d=d)
    v.requires_grad_(True)
    torch.library.opcheck(ops.permutohedral_filter, (v, f, rev))
    torch.library.opcheck(ops.permutohedral_filter, (v, f, rev, True))
    torch.library.opcheck(ops.lattice_num_vertices, (f,), test_utils=("test_schema", "test_faketensor"))
    f.requires_grad_(True)  # the features' gradient through the autograd registration
    torch.library.opcheck(ops.permutohedral_filter, (v, f, rev))
    g = torch.randn_like(v.detach())
    torch.library.opcheck(ops._permutohedral_filter_backward, (v.detach(), f.detach(), g, rev, False))


# ---- empty inputs ----------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(0, 3, 10), (2, 0, 10), (2, 3, 0)])
def test_empty(shape):
    B, C, N = shape
    v = torch.zeros(B, C, N)
    f = torch.zeros(B, 2, N)
    out = rrm_cuda.permutohedral_filter(v, f)
    assert out.shape == v.shape


# ---- bad input -------------------------------------------------------------------------------
def test_bad_inputs():
    v, f = _inputs(dtype=torch.float32)
    # float32 lattices refuse features beyond 2^16 (precision), judged by the dtype the lattice is
    # built in: float64 features filtering float32 values are converted to float32 first
    big = torch.rand(1, 2, 100, dtype=torch.float64) * 1e5
    with pytest.raises(ValueError, match="features: feature values up to .* exceed 65536"):
        rrm_cuda.permutohedral_filter(torch.ones(1, 1, 100), big)
    assert rrm_cuda.permutohedral_filter(torch.ones(1, 1, 100, dtype=torch.float64), big).max() <= 1
    with pytest.raises(TypeError, match="values must be a torch.Tensor"):
        rrm_cuda.permutohedral_filter(v.numpy(), f)
    with pytest.raises(ValueError, match="values must have shape"):
        rrm_cuda.permutohedral_filter(v[0, 0], f)
    with pytest.raises(ValueError, match="features must have shape"):
        rrm_cuda.permutohedral_filter(v, f[0])
    with pytest.raises(ValueError, match="must agree in B"):
        rrm_cuda.permutohedral_filter(v, f[:1])
    with pytest.raises(ValueError, match="must agree in B"):
        rrm_cuda.permutohedral_filter(v, f[:, :, :10])
    with pytest.raises(TypeError, match="values must have dtype"):
        rrm_cuda.permutohedral_filter(v.int(), f)
    with pytest.raises(ValueError, match="values contains NaN"):
        rrm_cuda.permutohedral_filter(v.clone().fill_(math.nan), f)
    with pytest.raises(ValueError, match="features contains Inf"):
        rrm_cuda.permutohedral_filter(v, f.clone().fill_(math.inf))
    with pytest.raises(ValueError, match="1 <= d <= 16"):
        rrm_cuda.permutohedral_filter(v, torch.zeros(2, 17, 200))
    with pytest.raises(ValueError, match="overflow the lattice's integer keys"):
        rrm_cuda.permutohedral_filter(v, f * 1e9)
    with pytest.raises(MemoryError, match="GiB"):
        rrm_cuda.permutohedral_filter(
            torch.zeros(1, 1, 1).expand(64, 4096, 2**20), torch.zeros(1, 1, 1).expand(64, 5, 2**20)
        )
    # the host's limit: what the kernel reports available (+ free swap), not the physical memory
    from rrm_cuda import _validate as V

    avail = V._read_host_available()
    assert avail is not None and 0 < avail <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") + 2**40
    assert V.memory_limit(torch.device("cpu")) == V._host_available() > 0
    with pytest.raises(MemoryError, match="more than the"):
        V.memory(avail + 2**33, torch.device("cpu"), "a test buffer")
    # On a GPU, work under 1/16 of the device's memory is not checked against its free memory (a
    # driver call on every call of the ops; an allocation that does not fit raises PyTorch's own
    # OutOfMemoryError); larger work is. The host is always checked (a cached read).
    queries: list = []
    saved_limit, saved_total = V.memory_limit, dict(V._CUDA_TOTAL)
    try:
        V.memory_limit = lambda device: queries.append(device) or 2**30
        V._CUDA_TOTAL[0] = 80 * 2**30
        gpu = torch.device("cuda", 0)
        V.memory(5 * 2**30, gpu, "small work")
        assert queries == []
        with pytest.raises(MemoryError, match="more than the"):
            V.memory(5 * 2**30 + 1, gpu, "larger work")
        assert queries == [gpu]
        V.memory(2**20, torch.device("cpu"), "host work")
        assert len(queries) == 2
    finally:
        V.memory_limit = saved_limit
        V._CUDA_TOTAL.clear()
        V._CUDA_TOTAL.update(saved_total)
    # the C++ checks are reached by direct op calls too, and name the argument
    with pytest.raises(ValueError, match="values and features must agree|must agree in B and N"):
        ops.permutohedral_filter(v, f[:, :, :5], False)
    with pytest.raises(TypeError, match="same dtype"):
        ops.permutohedral_filter(v, f.double(), False)


# ---- module == functional --------------------------------------------------------------------
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 1e30])
@pytest.mark.parametrize("op", ["permutohedral_filter", "_permutohedral_filter_emulated"])
def test_raw_op_survives_features_the_api_refuses(op, bad):
    # The public API refuses such features (test_bad_inputs); the raw ops must not crash on them
    # either (out-of-range integer conversions in the embedding once wrote outside its arrays).
    v, f = _inputs(B=2, C=3, N=200, d=5, dtype=torch.float32)
    f[0, 1, 7] = bad
    f[1, :, :50] = bad
    out = getattr(ops, op)(v, f, False)
    assert out.shape == v.shape
    # images and pixels without a bad feature are unaffected by the ones that have one
    good = torch.ones(200, dtype=torch.bool)
    good[7] = False
    torch.testing.assert_close(out[0, :, good].isfinite(), torch.ones_like(out[0, :, good], dtype=torch.bool))


def test_module_matches_functional():
    v, f = _inputs()
    m = rrm_cuda.PermutohedralFilter(reverse=True)
    torch.testing.assert_close(m(v, f), rrm_cuda.permutohedral_filter(v, f, reverse=True))
    assert repr(m) == "PermutohedralFilter(reverse=True, cache=False)"


# ---- CPU == CUDA -----------------------------------------------------------------------------
@pytest.mark.cuda
def test_cuda_matches_cpu(cuda):
    for d in (2, 5):
        for dtype in (torch.float32, torch.float64):
            v, f = _inputs(B=3, C=21, N=5000, d=d, dtype=dtype)
            for rev in (False, True):
                a = ops.permutohedral_filter(v, f, rev)
                b = ops.permutohedral_filter(v.to(cuda), f.to(cuda), rev).cpu()
                tol = 1e-5 if dtype == torch.float32 else 1e-12
                torch.testing.assert_close(b, a, rtol=tol, atol=tol * float(a.abs().max()))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_lattice_tables_equal_the_reference(cuda, dtype):
    # The device's lattice itself (hash insert, vertex ids, neighbours) against the reference, up to
    # the vertex numbering (the device's follows the slots' races)
    g = torch.Generator().manual_seed(3)
    for d in (2, 5):
        f = torch.randn(3, d, 700, generator=g, dtype=dtype)
        f[1] *= 40
        f[2] = torch.randint(-3, 4, (d, 700), generator=g).to(dtype)
        tables = [t.cpu() for t in ops._lattice_tables(f.to(cuda))]
        _assert_same_lattice(tables, f, first_appearance=False)


@pytest.mark.cuda
def test_cuda_cached_filter(cuda, lattice_cache):
    # cache=True on the device: a fresh build's bits (forward, reverse, backward), one entry per
    # stream, and the step-wise pydensecrf API building each term's lattice once
    v, f = _inputs(B=2, C=21, N=20000, d=5, dtype=torch.float32)
    v, f = v.to(cuda), f.to(cuda)
    for rev in (False, True):
        fresh = ops.permutohedral_filter(v, f, rev)
        for _ in range(2):
            assert torch.equal(ops.permutohedral_filter(v, f, rev, True), fresh), rev
    vg = v.clone().requires_grad_()
    rrm_cuda.permutohedral_filter(vg, f, cache=True).sum().backward()
    assert torch.equal(vg.grad, ops.permutohedral_filter(torch.ones_like(v), f, True))
    # hits: three of the four cached forwards (the first builds), the autograd forward and, only
    # without the hand-over, its backward (which otherwise takes the forward's lattice)
    info = rrm_cuda.lattice_cache_info()
    assert info["entries"] == 1 and info["hits"] == 5 - rrm_cuda._C.tuning()["lattice_to_backward"]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = ops.permutohedral_filter(v, f, False, True)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(got, ops.permutohedral_filter(v, f)) and rrm_cuda.lattice_cache_info()["entries"] == 2


@pytest.mark.cuda
def test_cuda_splat_launch_order(cuda, tuning):
    # the tile-ordered launch of the splat chunks gives the vertex order's bits on the device too
    v, f = _inputs(B=2, C=21, N=20000, d=5, dtype=torch.float32)
    v, f = v.to(cuda), f.to(cuda)
    tuning("splat_tile", 0)
    ref = [ops.permutohedral_filter(v, f, rev) for rev in (False, True)]
    for tile in (1, 64, 10**9):
        tuning("splat_tile", tile)
        for rev in (False, True):
            assert torch.equal(ops.permutohedral_filter(v, f, rev), ref[rev]), tile


@pytest.mark.cuda
@pytest.mark.parametrize(
    "knob, on",
    [
        ("splat_fused_reduce", (1,)),
        ("blur_pairs", (1,)),
        ("insert_corner_major", (1,)),
        ("item_min_blocks", (5, 6)),
        ("filter_rows4", (1,)),
    ],
)
def test_cuda_launch_fusions(cuda, tuning, knob, on):
    # the chunk sums added up by each vertex's last chunk in the splat's launch give the bits of the
    # second launch on the device too (float4 and double2 rows through L2, the fence and counter);
    # repeated calls find the counters at zero; a batch with unused rows; the mean field and the loss.
    # Likewise the other launch knobs: blur axes in pairs, the insert's thread order, and the splat
    # and slice kernels compiled with register caps (item_min_blocks 5, 6)
    g = torch.Generator().manual_seed(8)
    for dtype in (torch.float32, torch.float64):
        v = torch.rand(2, 21, 30000, generator=g, dtype=dtype).to(cuda)
        f = (torch.randn(2, 5, 30000, generator=g) * 2).to(dtype)
        f[1, :, 15000:] = 0  # fewer vertices in image 1
        f = f.to(cuda)
        pos = (torch.randn(1, 2, 30000, generator=g) * 4).to(dtype).to(cuda)
        u = (torch.rand(2, 21, 30000, generator=g) * 3).to(dtype).to(cuda)
        compat = torch.stack([-3 * torch.eye(21), -10 * torch.eye(21)]).to(dtype).to(cuda)
        probs = torch.softmax(u[:, :6], 1)
        gate = torch.rand(2, 30000, generator=g, dtype=dtype).to(cuda)

        def run():
            out = [ops.permutohedral_filter(v, f, rev) for rev in (False, True)]
            out.append(ops.dense_crf(u, [pos, f], compat, [True, True], [0, 0], 3))
            for mode in (0, 1, 2):
                out += list(ops.dense_energy(probs, gate, f, None, mode))
            return out

        tuning(knob, 0)
        ref = run()
        for value in on:
            tuning(knob, value)
            for _ in range(3):
                for k, (a, b) in enumerate(zip(run(), ref)):
                    assert torch.equal(a, b), (dtype, value, k)


@pytest.mark.cuda
def test_cuda_counted_filter_and_graph_capture(cuda, tuning):
    # The counted lattice on the device: the read-back build's bits; and the filter with its backward
    # captured in a CUDA graph (counted under capture), replayed on new values: the eager results.
    v, f = _inputs(B=2, C=21, N=20000, d=5, dtype=torch.float32)
    v, f = v.to(cuda), f.to(cuda)
    for rev in (False, True):
        tuning("counted_lattice", 0)
        a = ops.permutohedral_filter(v, f, rev)
        tuning("counted_lattice", 1)
        assert torch.equal(ops.permutohedral_filter(v, f, rev), a), rev
    tuning("counted_lattice", 0)
    static = v.clone().requires_grad_()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            static.grad = None
            rrm_cuda.permutohedral_filter(static, f).square().sum().backward()
    torch.cuda.current_stream().wait_stream(side)
    static.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = rrm_cuda.permutohedral_filter(static, f)
        out.square().sum().backward()
    fresh = torch.rand_like(v)
    with torch.no_grad():
        static.copy_(fresh)
    graph.replay()
    x = fresh.clone().requires_grad_()
    want = rrm_cuda.permutohedral_filter(x, f)
    want.square().sum().backward()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(static.grad, x.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_cuda_slice_grouping(cuda, tuning):
    # the fused slice's two groupings (whole vertex rows, four channels at a time) give the same bits
    # on the device too, at every row width
    g = torch.Generator().manual_seed(6)
    f = (torch.randn(1, 5, 20000, generator=g) * 2).to(cuda)
    pos = (torch.randn(1, 2, 20000, generator=g) * 4).to(cuda)
    for L in (3, 7, 13, 21, 30):
        u = (torch.rand(2, L, 20000, generator=g) * 3).to(cuda)
        compat = torch.stack([-3 * torch.eye(L), -10 * torch.eye(L)]).to(cuda)
        outs = []
        for group4 in (0, 1):
            tuning("slice_group4", group4)
            outs.append(ops.dense_crf(u, [pos, f], compat, [True, True], [0, 0], 3))
        assert torch.equal(outs[0], outs[1]), L


@pytest.mark.cuda
def test_cuda_gradcheck_and_opcheck(cuda):
    v, f = _inputs(B=2, C=2, N=30, d=3)
    v = v.to(cuda).requires_grad_(True)
    f = f.to(cuda)
    assert torch.autograd.gradcheck(lambda x: rrm_cuda.permutohedral_filter(x, f), (v,), fast_mode=True)
    torch.library.opcheck(ops.permutohedral_filter, (v, f, False))
    f = f.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, y: rrm_cuda.permutohedral_filter(x, y), (v, f), eps=1e-6, atol=1e-6)
    torch.library.opcheck(ops.permutohedral_filter, (v, f, False))


@pytest.mark.cuda
def test_cuda_forward_hands_its_lattice_to_the_backward(cuda, tuning):
    # on the GPU too: one build per forward and backward, the bits of the rebuilding backward (the
    # CUDA ops are deterministic), the values' gradient and both
    v, f = _inputs(B=2, C=21, N=4000, d=5, seed=19)
    w = torch.randn(v.shape, generator=torch.Generator().manual_seed(20), dtype=v.dtype)
    v, f, w = v.to(cuda), f.to(cuda), w.to(cuda)
    for want in ("values", "both"):
        got, builds = _fwd_bwd(ops.permutohedral_filter, v, f, w, want)
        tuning("lattice_to_backward", 0)
        ref, builds0 = _fwd_bwd(ops.permutohedral_filter, v, f, w, want)
        tuning("lattice_to_backward", 1)
        assert (builds, builds0) == (1, 2)
        for a, b in zip(got, ref):
            assert torch.equal(a, b)


@pytest.mark.cuda
def test_cuda_feature_gradient_matches_cpu(cuda):
    for d in (2, 5, 7):
        v, f = _inputs(B=3, C=21, N=3000, d=d, seed=d)
        w = torch.randn(v.shape, generator=torch.Generator().manual_seed(d), dtype=v.dtype)
        for rev in (False, True):
            grads = []
            for dev in ("cpu", cuda):
                vd, fd = v.to(dev).requires_grad_(True), f.to(dev).requires_grad_(True)
                grads.append(
                    torch.autograd.grad((ops.permutohedral_filter(vd, fd, rev) * w.to(dev)).sum(), fd)[0].cpu()
                )
            torch.testing.assert_close(grads[1], grads[0], rtol=1e-9, atol=1e-11 * float(grads[0].abs().max()))


@pytest.mark.cuda
@pytest.mark.parametrize("d", [1, 3, 8, 16])
@pytest.mark.parametrize("C", [1, 7, 64])
def test_cuda_matches_cpu_any_d_and_c(cuda, d, C):
    v, f = _inputs(B=2, C=C, N=700, d=d, dtype=torch.float32)
    for rev in (False, True):
        a = ops.permutohedral_filter(v, f, rev)
        b = ops.permutohedral_filter(v.to(cuda), f.to(cuda), rev).cpu()
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * float(a.abs().max()))
    assert torch.equal(ops.lattice_num_vertices(f.to(cuda)).cpu(), ops.lattice_num_vertices(f)), (
        "the CUDA and CPU lattices must have the same points"
    )


@pytest.mark.cuda
def test_cuda_public_api_layouts_dtypes_and_backward(cuda):
    v, f = _inputs(B=2, C=4, N=12 * 11, d=2, dtype=torch.float32)
    v4, f4 = v.reshape(2, 4, 12, 11), f.reshape(2, 2, 12, 11)
    for x in (v4, v4.contiguous(memory_format=torch.channels_last), v4.transpose(2, 3).contiguous().transpose(2, 3)):
        a = rrm_cuda.permutohedral_filter(x, f4)
        b = rrm_cuda.permutohedral_filter(x.to(cuda), f4.to(cuda))
        assert b.device.type == cuda.type and b.dtype == x.dtype
        torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-4)
    h = rrm_cuda.permutohedral_filter(v4.to(cuda).half(), f4.to(cuda))
    assert h.dtype == torch.float16
    torch.testing.assert_close(h.float().cpu(), rrm_cuda.permutohedral_filter(v4, f4), rtol=1e-2, atol=1e-2)
    # backward on the GPU equals the backward on the CPU
    grads = []
    for dev in ("cpu", cuda):
        x = v4.to(dev).detach().requires_grad_()
        (rrm_cuda.permutohedral_filter(x, f4.to(dev)) * torch.arange(11.0, device=dev)).sum().backward()
        grads.append(x.grad.cpu())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-4)
    # empty inputs and a batch of one pixel per image
    e = rrm_cuda.permutohedral_filter(torch.empty(2, 3, 0, device=cuda), torch.empty(2, 2, 0, device=cuda))
    assert e.shape == (2, 3, 0)
    one = rrm_cuda.permutohedral_filter(torch.ones(3, 2, 1, device=cuda), torch.zeros(3, 4, 1, device=cuda))
    torch.testing.assert_close(one.cpu(), rrm_cuda.permutohedral_filter(torch.ones(3, 2, 1), torch.zeros(3, 4, 1)))


@pytest.mark.cuda
def test_cuda_bad_input(cuda):
    v, f = _inputs(B=1, C=2, N=40, d=2, dtype=torch.float32)
    with pytest.raises(ValueError, match="same device"):
        rrm_cuda.permutohedral_filter(v.to(cuda), f)
    bad = f.clone()
    bad[0, 0, 3] = float("nan")
    with pytest.raises(ValueError, match="features contains NaN"):
        rrm_cuda.permutohedral_filter(v.to(cuda), bad.to(cuda))
    N = 2**20  # 64 images of 2^20 pixels with d = 16: far more lattice than the GPU's memory, refused up front
    big_f = torch.zeros(1, 16, N, device=cuda).expand(64, 16, N)
    big_v = torch.zeros(1, 1, N, device=cuda).expand(64, 1, N)
    with pytest.raises(MemoryError, match="lattice of features"):
        rrm_cuda.permutohedral_filter(big_v, big_f)


@pytest.mark.cuda
def test_cuda_many_images_and_large_image(cuda):
    # many small images in one launch (a per-image table and counters), and one image large enough to
    # grow the hash table past its first guess
    g = torch.Generator().manual_seed(3)
    v = torch.randn(37, 3, 257, generator=g)
    f = torch.randn(37, 5, 257, generator=g) * torch.linspace(0.1, 20, 37)[:, None, None]
    torch.testing.assert_close(
        ops.permutohedral_filter(v.to(cuda), f.to(cuda), False).cpu(),
        ops.permutohedral_filter(v, f, False),
        rtol=1e-5,
        atol=1e-4,
    )
    v = torch.randn(1, 2, 200_000, generator=g)
    f = torch.randn(1, 5, 200_000, generator=g) * 30  # nearly every pixel its own lattice point
    a = ops.permutohedral_filter(v, f, False)
    b = ops.permutohedral_filter(v.to(cuda), f.to(cuda), False).cpu()
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-4)
    assert int(ops.lattice_num_vertices(f.to(cuda))) == int(ops.lattice_num_vertices(f))


def test_cuda_is_tested_when_present():
    cuda_available()  # fails if a GPU is present but the build has no CUDA


# ---- torch.compile ---------------------------------------------------------------------------
def test_compile_fullgraph():
    v, f = _inputs(B=1, C=2, N=50, d=2, dtype=torch.float32)
    v.requires_grad_(True)

    def fn(x, feats):
        return ops.permutohedral_filter(x * 2.0, feats, False).sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(v, f)
    out.backward()
    torch.testing.assert_close(out, fn(v.detach(), f))
