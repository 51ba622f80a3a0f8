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
