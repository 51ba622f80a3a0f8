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
