#!/usr/bin/env bash
# Build the extension HERE, for the lent GPU machine's stack, so that its scarce device time is not
# spent compiling (gpu_check.sh's build step took 133 of a 570 s call on the H200, session 24).
# The GPU machine runs Python 3.12 and torch 2.11.0+cu130 with nvcc 13.0 (the device tool's
# KINDS.md); PyPI's torch 2.11.0 is that same CUDA 13.0 build, so an extension built here against it
# loads there. Writes .prebuilt/ (git-ignored; name it in the run's `carry`):
#   .prebuilt/_C.cpython-312-x86_64-linux-gnu.so   stripped, the GPU's architecture only
#   .prebuilt/stamp                                  what it was built from: a hash of csrc/ and
#                                                    setup.py, torch, Python, TORCH_CUDA_ARCH_LIST
#   .prebuilt/build.log                              the build's log
# gpu_check.sh's build step takes it when the stamp matches the tree and torch it runs on, and builds
# from source otherwise (or when the copy does not import), so a stale prebuild costs nothing but its
# transfer. Rebuild after every change under csrc/ or to setup.py.
#
#   bash benchmarks/prebuild_for_device.sh            # ≈ 10 min on 2 cores; first run also makes the venv
# Environment: PREBUILD_VENV (default /work/venv-dev312), PREBUILD_PYTHON (an interpreter of the
# GPU machine's minor version, default: pyenv's newest 3.12), PREBUILD_TORCH (2.11.0),
# TORCH_CUDA_ARCH_LIST (9.0a: H100 and H200), CUDA_HOME (/usr/local/cuda), MAX_JOBS (2).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${PREBUILD_VENV:-/work/venv-dev312}
TORCH=${PREBUILD_TORCH:-2.11.0}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-2}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

if [ ! -x "$VENV/bin/python" ]; then
  PY=${PREBUILD_PYTHON:-$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12.*/bin/python3.12 2>/dev/null | tail -n 1)}
  [ -n "$PY" ] || { echo "no Python 3.12 found (set PREBUILD_PYTHON)"; exit 1; }
  "$PY" -m venv "$VENV"
  # PyPI's Linux torch 2.11.0 is the CUDA 13.0 build (≈ 4.7 GB installed with its nvidia packages)
  "$VENV/bin/pip" install -q "torch==$TORCH" numpy ninja setuptools wheel
fi
"$VENV/bin/python" -c "import torch, sys; assert torch.__version__.startswith('$TORCH'), torch.__version__; print(sys.version.split()[0], torch.__version__)"

# the files the GPU machine receives: tracked ones and untracked ones git does not ignore, as they are
WORK=$(mktemp -d "${TMPDIR:-/tmp}/rrm-prebuild.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
{ git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 -I{} cp --parents {} "$WORK/" 2>/dev/null || true
hash=$(bash benchmarks/source_hash.sh "$WORK")
t0=$(date +%s)
(cd "$WORK" && "$VENV/bin/python" setup.py build_ext --inplace >"$WORK/build.log" 2>&1) || {
  tail -n 40 "$WORK/build.log"
  exit 1
}
grep -E "\[rrm_cuda\]" "$WORK/build.log"
# the log stays beside the extension (with NVCC_APPEND_FLAGS="-Xptxas -v" in the environment it
# lists every kernel's registers and spills: python benchmarks/ptxas_table.py .prebuilt/build.log)
so=$(ls "$WORK"/rrm_cuda/_C.cpython-312-*.so)
mkdir -p "$ROOT/.prebuilt"
rm -f "$ROOT"/.prebuilt/*.so
strip --strip-debug -o "$ROOT/.prebuilt/$(basename "$so")" "$so"
cp "$WORK/build.log" "$ROOT/.prebuilt/build.log"
# it imports beside this torch (no GPU here: nothing runs)
(cd "$WORK" && cp "$ROOT/.prebuilt/$(basename "$so")" rrm_cuda/ &&
  "$VENV/bin/python" -c "import rrm_cuda; i = rrm_cuda.build_info(); print(i); assert i['with_cuda']")
tv=$("$VENV/bin/python" -c "import torch; print(torch.__version__)")
pv=$("$VENV/bin/python" -c "import sys; print('%d.%d' % sys.version_info[:2])")
printf 'source %s\ntorch %s\npython %s\narch %s\n' "$hash" "$tv" "$pv" "$TORCH_CUDA_ARCH_LIST" >"$ROOT/.prebuilt/stamp"
echo "prebuilt in $(($(date +%s) - t0)) s: $(du -h "$ROOT"/.prebuilt/*.so | cut -f1) (carry .prebuilt)"
cat "$ROOT/.prebuilt/stamp"
