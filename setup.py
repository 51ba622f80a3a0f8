"""Build rrm_cuda._C against the torch that is already installed.

Environment switches (all optional):
  FORCE_CUDA=1           build the CUDA kernels even without a visible GPU (needs nvcc / CUDA_HOME)
  FORCE_CPU=1            build the CPU kernels only, even where CUDA is available
  CUDA_HOME=/path        the CUDA toolkit (default: torch's guess; set it when nvcc is a wrapper)
  TORCH_CUDA_ARCH_LIST   e.g. "8.0;9.0"; default when no GPU is visible: "8.0;8.6;9.0+PTX"
  MAX_JOBS               parallel compile jobs (ninja)
  RRM_DEBUG=1            -O0 -g, no -DNDEBUG
"""

from __future__ import annotations

import glob
import os
import sys
import sysconfig

HERE = os.path.dirname(os.path.abspath(__file__))

try:
    import torch  # noqa: F401
except ImportError:
    # pip's isolated build env runs the environment's own interpreter: the user's torch is still in
    # this interpreter's purelib, so make it importable instead of letting pip fetch a second torch.
    for key in ("purelib", "platlib"):
        path = sysconfig.get_paths().get(key)
        if path and path not in sys.path:
            sys.path.append(path)
    try:
        import torch  # noqa: F401
    except ImportError:
        sys.exit(
            "rrm_cuda needs PyTorch installed before it is built, and builds against that torch.\n"
            "Install torch first (e.g. `pip install torch`), then run:\n"
            "    pip install --no-build-isolation --no-deps .\n"
        )

from setuptools import find_packages, setup  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _want_cuda() -> bool:
    if _flag("FORCE_CPU"):
        return False
    if _flag("FORCE_CUDA"):
        return True
    return bool(torch.cuda.is_available() and cpp_extension.CUDA_HOME)


def _openmp_flags() -> list[str]:
    # at::parallel_for is header code: without -fopenmp in *our* translation units it is silently
    # serial (the trap rloss fell into). Use OpenMP exactly when torch itself was built with it.
    cfg = torch.__config__.parallel_info()
    return ["-fopenmp"] if "OpenMP" in cfg and sys.platform != "darwin" else []


def build_extension():
    debug = _flag("RRM_DEBUG")
    with_cuda = _want_cuda()
    omp = _openmp_flags()
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    # No -std here: torch's BuildExtension adds the standard its own headers need (C++17 up to the
    # torch releases built for CUDA 11.8, C++20 in recent ones), for g++ and nvcc alike. The sources
    # are C++17 (.ci/run checks them with g++ -std=c++17), so that an older torch builds with an
    # older nvcc (11.8 has no C++20) and compiler.
    cxx += ["-ffp-contract=off", *omp]
    define_macros = [] if debug else [("NDEBUG", None)]
    include_dirs = [os.path.join(HERE, "csrc")]
    extra_link = list(omp)
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;8.6;9.0+PTX"
        # torch's CUDA wheels ship the CUDA headers under site-packages/nvidia/cu*/include
        nv_root = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia")
        include_dirs += sorted(glob.glob(os.path.join(nv_root, "cu*", "include")))
        define_macros.append(("RRM_WITH_CUDA", None))
        nvcc = ["-O0", "-g", "-lineinfo"] if debug else ["-O3", "-lineinfo"]
        # --fmad=false: no fused multiply-adds, like -ffp-contract=off on the CPU, so that CPU and CUDA
        # round the lattice embedding alike (an FMA moves pixels whose elevated coordinates sit on a
        # rounding tie, e.g. integer colours, to another simplex: seen on an H200 as CPU != CUDA).
        nvcc += ["--expt-relaxed-constexpr", "--fmad=false"]
        nvcc += [f"-Xcompiler={f}" for f in omp]
        ext = cpp_extension.CUDAExtension(
            "rrm_cuda._C",
            sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=extra_link,
        )
    else:
        ext = cpp_extension.CppExtension(
            "rrm_cuda._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=extra_link,
        )
    print(
        f"[rrm_cuda] torch {torch.__version__}; CUDA kernels: {'yes' if with_cuda else 'no'}"
        f" (CUDA_HOME={cpp_extension.CUDA_HOME}, TORCH_CUDA_ARCH_LIST="
        f"{os.environ.get('TORCH_CUDA_ARCH_LIST', '<torch default>')}); OpenMP: {'yes' if omp else 'no'};"
        f" debug: {debug}; {len(sources)} C++ and {len(cuda_sources) if with_cuda else 0} CUDA sources",
        flush=True,
    )
    return ext


def _requirements(extra: str) -> list[str]:
    """An extra's requirements from requirements/EXTRA.txt, the one list that CI installs too."""
    with open(os.path.join(HERE, "requirements", f"{extra}.txt"), encoding="utf-8") as f:
        lines = (line.split("#", 1)[0].strip() for line in f)
        return [line for line in lines if line]


setup(
    name="rrm_cuda",
    version="0.1.0",
    description="Dense CRF, dense-CRF energy loss and BCD loss as batched, differentiable CPU/CUDA torch ops",
    packages=find_packages(include=["rrm_cuda", "rrm_cuda.*"]),
    ext_modules=[build_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.9",
    install_requires=["numpy"],
    extras_require={extra: _requirements(extra) for extra in ("test", "bench", "rrm")},
    entry_points={
        "console_scripts": [
            "rrm-train = rrm_cuda.rrm.train:main",
            "rrm-infer = rrm_cuda.rrm.infer:main",
            "rrm-eval = rrm_cuda.rrm.evaluate:main",
        ],
    },
    zip_safe=False,
)
