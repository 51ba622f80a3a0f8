from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import rrm_cuda

torch.set_num_threads(min(2, os.cpu_count() or 1))


def cuda_available() -> bool:
    """True when a GPU is usable. A GPU without CUDA in the build is a failure, not a skip."""
    if not torch.cuda.is_available():
        return False
    if not rrm_cuda.build_info()["with_cuda"]:
        pytest.fail("a CUDA device is present but rrm_cuda was built without CUDA kernels (rebuild with FORCE_CUDA=1)")
    return True


@pytest.fixture
def cuda():
    if not cuda_available():
        pytest.skip("no CUDA device")
    return torch.device("cuda")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def cuda_or_cpu(request):
    """Both devices: the CPU always, CUDA when a GPU is usable (skipped otherwise)."""
    if request.param == "cuda" and not cuda_available():
        pytest.skip("no CUDA device")
    return torch.device(request.param)


class OpSpy:
    """A stand-in for torch.ops.rrm_cuda that logs the calls of one op (then makes them)."""

    def __init__(self, real, name: str, log: list):
        self._real, self._name, self._log = real, name, log

    def __getattr__(self, name):
        f = getattr(self._real, name)
        return (lambda *a, **k: self._log.append(name) or f(*a, **k)) if name == self._name else f


@pytest.fixture
def lattice_cache():
    """The lattice cache emptied, at its default capacity (8), before and after the test."""
    rrm_cuda.clear_lattice_cache()
    rrm_cuda.set_lattice_cache_capacity(8)
    yield
    rrm_cuda.clear_lattice_cache()
    rrm_cuda.set_lattice_cache_capacity(8)


@pytest.fixture
def tuning():
    """rrm_cuda._C.set_tuning for the test (the CUDA launch-configuration knobs, common/tuning.h);
    every knob is restored afterwards."""
    from rrm_cuda import _C

    saved = _C.tuning()
    yield _C.set_tuning
    for name, value in saved.items():
        _C.set_tuning(name, value)


def photo(name: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """A bundled scikit-image photograph as uint8 (H, W, 3), centre-cropped to ``size`` (H, W)."""
    skdata = pytest.importorskip("skimage.data")
    img = getattr(skdata, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    img = img[..., :3]
    if size is not None:
        H, W = size
        y0 = (img.shape[0] - H) // 2
        x0 = (img.shape[1] - W) // 2
        assert y0 >= 0 and x0 >= 0, (img.shape, size)
        img = img[y0 : y0 + H, x0 : x0 + W]
    return np.ascontiguousarray(img)


def smooth_probs(L: int, H: int, W: int, seed: int = 0, sharp: float = 20.0, sigma: float = 8.0) -> np.ndarray:
    """Spatially smooth random class scores (L, H, W), like a network's softmax output."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    logits = ndimage.gaussian_filter(rng.normal(size=(L, H, W)), (0, sigma, sigma)) * sharp
    p = np.exp(logits - logits.max(0))
    return (p / p.sum(0)).astype(np.float32)


@pytest.fixture
def pixel_tile():
    """Sets rrm_cuda.functional._PIXEL_TILE[device type] for the test; restored afterwards."""
    import rrm_cuda.functional as FN

    saved = dict(FN._PIXEL_TILE)

    def set_tile(device_type: str, tile: int) -> None:
        FN._PIXEL_TILE[device_type] = tile

    yield set_tile
    FN._PIXEL_TILE.clear()
    FN._PIXEL_TILE.update(saved)
