"""The extension's build configuration: OpenMP really on, CUDA compiled where expected."""

import os

import torch

import rrm_cuda


def test_build_info_fields():
    info = rrm_cuda.build_info()
    for key in ("with_cuda", "with_openmp", "openmp_version", "compiler", "torch"):
        assert key in info
    assert isinstance(info["with_cuda"], bool)


def test_openmp_compiled_when_torch_uses_it():
    if "OpenMP" in torch.__config__.parallel_info():
        assert rrm_cuda.build_info()["with_openmp"], "torch uses OpenMP but the extension was built without -fopenmp"


def test_parallel_for_really_uses_threads():
    from rrm_cuda import _C

    if (os.cpu_count() or 1) < 2 or torch.get_num_threads() < 2:
        import pytest

        pytest.skip("needs 2 threads")
    assert _C.parallel_threads_used(64) >= 2


def test_cuda_compiled_when_required():
    if os.environ.get("RRM_EXPECT_CUDA") == "1" or torch.cuda.is_available():
        assert rrm_cuda.build_info()["with_cuda"]


def test_host_synchronising_ops_are_tagged_cudagraph_unsafe():
    # The ops that read a value back mid-call on CUDA (a lattice's vertex count, a label check) carry
    # torch.Tag.cudagraph_unsafe, so torch.compile(mode="reduce-overhead") leaves them out of its CUDA
    # graphs instead of failing the capture; the capturable ones do not (torch >= 2.8 has the tag).
    import pytest

    tag = getattr(torch.Tag, "cudagraph_unsafe", None)
    if tag is None:
        pytest.skip("this torch has no cudagraph_unsafe tag")
    ops = torch.ops.rrm_cuda
    syncing = (
        "permutohedral_filter",
        "lattice_num_vertices",
        "dense_crf",
        "dense_crf_backward",
        "dense_energy",
        "masked_feature_sums",
        "masked_feature_gather",
        "feature_center_cosine",
        "feature_center_cosine_backward",
    )
    capturable = ("dense_energy_inputs", "dense_energy_inputs_backward", "dense_energy_input_stats", "bcd_loss")
    for name in syncing:
        assert tag in getattr(ops, name).default.tags, name
    for name in capturable:
        assert tag not in getattr(ops, name).default.tags, name


def _public_calls(device: str):
    """One call of every public function that runs rrm_cuda's kernels, on ``device`` tensors (shapes
    valid, values unread). bilateral_features and position_features are plain torch: any device."""
    B, L, H, W = 1, 3, 6, 7

    def t(*shape, dtype=torch.float32):
        return torch.zeros(*shape, dtype=dtype, device=device)

    ones = torch.ones(B, L, H, W, device=device) / L
    labels = torch.zeros(B, H, W, dtype=torch.long, device=device)
    return {
        "permutohedral_filter": lambda: rrm_cuda.permutohedral_filter(t(B, 2, 9), t(B, 2, 9)),
        "lattice_num_vertices": lambda: rrm_cuda.lattice_num_vertices(t(B, 2, 9)),
        "dense_crf (unary only)": lambda: rrm_cuda.dense_crf(t(B, L, H, W), iterations=1, check_inputs=False),
        "dense_crf (image)": lambda: rrm_cuda.dense_crf(probs=ones, image=t(B, 3, H, W), check_inputs=False),
        "dense_energy_loss": lambda: rrm_cuda.dense_energy_loss(
            t(B, 3, H, W), ones, t(B, H, W), labels, check_inputs=False
        ),
        "masked_feature_sums": lambda: rrm_cuda.masked_feature_sums(t(B, 4, H, W), labels, num_classes=L),
        "bcd_loss": lambda: rrm_cuda.bcd_loss(t(B, L, H, W), t(B, 4, H, W), check_inputs=False),
    }


def test_cuda_tensors_on_a_build_without_cuda_kernels_get_the_rebuild_command(monkeypatch):
    # A CPU-only build (pip install . where torch saw no GPU, e.g. a cluster's login node) given CUDA
    # tensors: an error that names the argument and says how to rebuild, not the dispatcher's "Could
    # not run 'rrm_cuda::...' with arguments from the 'CUDA' backend". Fake CUDA tensors (no GPU here).
    import pytest
    from torch._subclasses.fake_tensor import FakeTensorMode

    from rrm_cuda import _validate as V

    monkeypatch.setattr(V, "_built_with_cuda", lambda: False)
    with FakeTensorMode():
        calls = _public_calls("cuda")
        for what, call in calls.items():
            with pytest.raises(RuntimeError, match=r"is on cuda:0, but this rrm_cuda was built without CUDA") as err:
                call()
            assert "FORCE_CUDA=1" in str(err.value), what
    with pytest.raises(RuntimeError, match=r"^images is on cuda"):
        with FakeTensorMode():
            _public_calls("cuda")["dense_energy_loss"]()


def test_tensors_on_other_devices_are_refused_by_name():
    import pytest
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        for call in _public_calls("xpu").values():
            with pytest.raises(RuntimeError, match=r"is on xpu:0: rrm_cuda's ops run on CPU and CUDA tensors only"):
                call()


def test_device_check_traces_under_compile():
    # build_info (a pybind call) cannot be traced: while torch.compile traces, the device check is
    # skipped (else every op on CUDA tensors would break the graph, or fail fullgraph=True)
    from rrm_cuda import _validate as V

    def fn(x):
        V.supported_device(torch.device("cuda", 0), "x")
        return x + 1

    out = torch.compile(fn, fullgraph=True, backend="eager")(torch.ones(2))
    assert torch.equal(out, torch.full((2,), 2.0))


def test_supported_devices_pass():
    from rrm_cuda import _validate as V

    V.supported_device(torch.device("cpu"), "x")
    V.supported_device(torch.device("meta"), "x")
    assert V._built_with_cuda() == rrm_cuda.build_info()["with_cuda"]
    if V._built_with_cuda():
        V.supported_device(torch.device("cuda", 0), "x")


def test_double_backward_is_refused_not_silently_wrong():
    # The backward ops of dense_crf, the energy loss and the BCD losses are not differentiable: a
    # second derivative through them (create_graph=True) raises instead of treating the first
    # derivative as a constant. permutohedral_filter's backward is the filter itself: it works.
    import pytest

    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 3, 6, 8, generator=g, dtype=torch.float64) * 255
    seg = torch.softmax(torch.randn(1, 3, 6, 8, generator=g, dtype=torch.float64), 1).requires_grad_()
    feats = torch.randn(1, 4, 6, 8, generator=g, dtype=torch.float64).requires_grad_()
    labels = torch.randint(0, 3, (1, 6, 8), generator=g)
    cases = {
        "dense_crf": lambda: rrm_cuda.dense_crf(seg, img, iterations=2).pow(2).sum(),
        "dense_energy_sum": lambda: rrm_cuda.dense_energy_loss(img, seg, sigma_xy=5.0),
        "bcd_loss": lambda: rrm_cuda.bcd_loss(seg, feats),
        "feature_center_cosine": lambda: rrm_cuda.feature_center_cosine(
            feats, labels, torch.randn(1, 3, 4, dtype=torch.float64)
        ).sum(),
    }
    for name, loss in cases.items():
        x = feats if name in ("bcd_loss", "feature_center_cosine") else seg
        with pytest.raises(RuntimeError, match=f"{name}: its backward is not differentiable"):
            torch.autograd.grad(loss(), x, create_graph=True)
        (first,) = torch.autograd.grad(loss(), x)  # the first derivative still works
        assert torch.isfinite(first).all()
    # the Python autograd.Function form of the energy: the double backward itself raises
    probs = seg.detach().reshape(1, 3, -1).requires_grad_()
    gate, f = torch.ones(1, 48, dtype=torch.float64), torch.randn(1, 5, 48, generator=g, dtype=torch.float64)
    e, _ = rrm_cuda.DenseEnergyLossFunction.apply(probs, gate, f, None, "exact")
    with pytest.raises(RuntimeError, match="dense_energy: its backward is not differentiable"):
        torch.autograd.grad(e.sum(), probs, create_graph=True)
    v = torch.randn(1, 2, 48, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda v: rrm_cuda.permutohedral_filter(v, f), (v,))
