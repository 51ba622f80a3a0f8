#!/usr/bin/env bash
# The GPU-machine session in one script: build in place for the local GPU, run the CUDA tests,
# compute-sanitizer on every kernel, and the benchmarks. Each step has its own time limit, so a
# hang or a slow step cannot eat the others; every log goes to $OUT_DIR/logs.txt and the results
# (JSON + PNG) to $OUT_DIR/results/ -- under the device tool ($OUT set, OUT_DIR in it), to a
# folder packed into $OUT_DIR/results.tgz after every step, so that a call stopped at its time limit
# still brings back what the finished steps wrote (the tool returns at most 8 files).
# BUDGET=S (seconds, default 0: none): each step's limit is cut to what is left of S (less a margin
# for the packing), and a step with under 20 s left is skipped and logged as such: set it below the
# call's timeout_s.
#
#   bash benchmarks/gpu_check.sh [STEP ...]     # steps: build smoke tests suite sanitize bench profile host tiles ab ncu rrm train
#   (host: launches, synchronisations, copies and ATen ops per call against wall and kernel time, cuda_host.py;
#   tiles: the tiled mean field's settings swept on the 512^2 CRF, tile_sweep.py;
#   ab: cuda_host and energy_bench in a baseline tree too, from .baseline.tgz (see the step), same machine;
#   ncu: Nsight Compute on one dense CRF and one energy loss, results/ncu.txt and its per-kernel
#   table in the log; rrm: rrm_bench with the small backbone, then ResNet-38 without the original
#   path; train: the CPU demo preset trained on the GPU)
#   OUT_DIR=/tmp/gpu bash benchmarks/gpu_check.sh build smoke tests
#
# Default steps: build smoke tests sanitize bench profile. SANITIZERS (default memcheck racecheck) and
# BENCHES (default crf energy bcd; also filter) choose within a step. Needs nvcc (CUDA_HOME) and a CUDA torch.
set -u
OUT_DIR=${OUT_DIR:-${OUT:-/tmp/rrm-gpu}}
mkdir -p "$OUT_DIR"
PACK=0
# under the device tool: OUT_DIR is $OUT (or a folder in it), whose files come back
if [ -n "${OUT:-}" ] && case "$(cd "$OUT_DIR" && pwd -P)/" in "$(cd "$OUT" && pwd -P)"/*) true ;; *) false ;; esac; then
  PACK=1
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/rrm-gpu-results.XXXXXX") || exit 1
  trap 'rm -rf "$WORK"' EXIT
  RESULTS="$WORK/results"
else
  RESULTS="$OUT_DIR/results"
fi
mkdir -p "$RESULTS"
LOG="$OUT_DIR/logs.txt"
BUDGET=${BUDGET:-0}
case "$BUDGET" in
  '' | *[!0-9]*)
    echo "BUDGET must be a whole number of seconds; got '$BUDGET'" >&2
    exit 2
    ;;
esac
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} FORCE_CUDA=1
PY=${PY:-python3}
STEPS=${*:-build smoke tests sanitize bench profile}
status=0

pack() {  # the results so far into $OUT_DIR/results.tgz (replaced whole, never half written)
  [ $PACK -eq 1 ] || return 0
  tar czf "$OUT_DIR/.results.tgz.part" -C "$WORK" results && mv "$OUT_DIR/.results.tgz.part" "$OUT_DIR/results.tgz"
}

step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  if [ "$BUDGET" -gt 0 ]; then
    local left=$((BUDGET - SECONDS - 10))
    if [ $left -lt 20 ]; then
      echo "=== $name: skipped (BUDGET=${BUDGET}s: ${left}s left)" | tee -a "$LOG"
      status=1
      return 124
    fi
    [ "$limit" -gt $left ] && limit=$left
  fi
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  timeout --kill-after=5 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "=== $name: rc=$rc in $((SECONDS - t0))s" | tee -a "$LOG"
  [ $rc -eq 0 ] || status=1
  pack
  return $rc
}

has() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac }

# The extension built on a CPU machine for this one's stack (benchmarks/prebuild_for_device.sh, carried
# as .prebuilt), taken instead of a build when its stamp matches: the same csrc/ and setup.py, torch,
# Python, and an architecture this GPU runs. NO_PREBUILT=1 always builds.
take_prebuilt() {
  local so stamp want cap
  so=$(ls .prebuilt/_C.cpython-*.so 2>/dev/null | head -n 1 || true)
  [ -n "$so" ] && [ -f .prebuilt/stamp ] && [ -z "${NO_PREBUILT:-}" ] || return 1
  stamp=$(cat .prebuilt/stamp)
  want=$(printf 'source %s\ntorch %s\npython %s' "$(bash benchmarks/source_hash.sh)" \
    "$($PY -c 'import torch; print(torch.__version__)')" "$($PY -c 'import sys; print("%d.%d" % sys.version_info[:2])')")
  cap=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo none)
  case "$(sed -n 's/^arch //p' .prebuilt/stamp)" in
    "$cap" | "$cap"a | "$cap"+PTX) ;;
    *) want="$want (arch for $cap)" ;;
  esac
  if [ "$(head -n 3 .prebuilt/stamp)" != "$want" ]; then
    printf '=== prebuilt: not taken, it was built from\n%s\nand this tree and torch are\n%s\n' "$stamp" "$want" | tee -a "$LOG"
    return 1
  fi
  cp "$so" rrm_cuda/ && $PY -c "import rrm_cuda; assert rrm_cuda.build_info()['with_cuda']" >>"$LOG" 2>&1 || {
    echo "=== prebuilt: does not import here (log above); building instead" | tee -a "$LOG"
    rm -f "rrm_cuda/$(basename "$so")"
    return 1
  }
  echo "=== build: prebuilt extension taken (stamp: $(echo "$stamp" | tr '\n' ' '))" | tee -a "$LOG"
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  $PY -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
  nproc
} 2>&1 | tee -a "$LOG"

if has build; then
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then # the visible GPU's architecture (one arch: a faster build)
    arch=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || true)
    export TORCH_CUDA_ARCH_LIST=${arch:-9.0}
  fi
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  AB_SRC=${AB_SRC:-.baseline.tgz}
  BASE=${TMPDIR:-/tmp}/rrm-base
  if has ab && [ -f "$AB_SRC" ]; then
    # the baseline builds beside this tree, at the same time: a build waits mostly on its longest
    # nvcc file, so two at once cost little more than one; the ab step waits for it
    rm -rf "$BASE" && mkdir -p "$BASE" && tar xzf "$AB_SRC" -C "$BASE"
    echo "=== ab_build: started in the background (log: $OUT_DIR/ab_build.txt)" | tee -a "$LOG"
    (cd "$BASE" && timeout --kill-after=5 600 $PY setup.py build_ext --inplace >"$OUT_DIR/ab_build.txt" 2>&1
      echo $? >"$BASE/.build_rc") &
    AB_PID=$!
  fi
  if ! take_prebuilt; then
    step build 400 $PY setup.py build_ext --inplace || {
      tail -40 "$LOG"
      exit 1
    }
  fi
  $PY -c "import rrm_cuda; print(rrm_cuda.build_info())" 2>&1 | tee -a "$LOG"
fi
has smoke && step smoke 120 $PY tests/cuda_smoke.py
has tests && step tests 300 $PY -m pytest -q -m cuda -ra -p no:cacheprovider tests
has suite && step suite 400 $PY -m pytest -q -ra -p no:cacheprovider -x tests
if has sanitize; then
  for tool in memcheck racecheck initcheck synccheck; do
    case " ${SANITIZERS:-memcheck racecheck} " in *" $tool "*) ;; *) continue ;; esac
    step "compute-sanitizer $tool" 150 compute-sanitizer --tool $tool --error-exitcode 3 $PY tests/cuda_smoke.py
  done
fi
if has bench; then
  R="$RESULTS"
  for b in ${BENCHES:-crf energy bcd}; do
    case $b in
      crf) step crf_bench 200 $PY benchmarks/crf_bench.py --skip-cpu --min-run-time 0.5 --out-dir "$R" ;;
      energy) step energy_bench 200 $PY benchmarks/energy_bench.py --skip-cpu --min-run-time 0.5 --out-dir "$R" ;;
      bcd) step bcd_bench 150 $PY benchmarks/bcd_bench.py --skip-cpu --skip reference_loop --min-run-time 0.5 \
        --out-dir "$R" ;;
      filter) step filter_bench 120 $PY benchmarks/filter_bench.py --skip-cpu --min-run-time 0.5 --out-dir "$R" ;;
    esac
  done
fi
has profile && step cuda_profile 150 $PY benchmarks/cuda_profile.py --out-dir "$RESULTS"
has host && step cuda_host 120 $PY benchmarks/cuda_host.py --out-dir "$RESULTS"
has tiles && step tile_sweep 150 $PY benchmarks/tile_sweep.py --out-dir "$RESULTS"
if has ab; then
  # Before/after on one machine (machines of one kind differ, in their hosts above all): a baseline's
  # sources from a tarball that travels with the tree (here: git archive --format=tar.gz -o
  # .baseline.tgz REV, then carry .baseline.tgz), built beside this tree; cuda_host and the energy
  # benchmark then run in both trees, twice, alternating. Results under results/ab_<tree>_<round>.
  AB_SRC=${AB_SRC:-.baseline.tgz}
  BASE=${TMPDIR:-/tmp}/rrm-base
  if [ -f "$AB_SRC" ]; then
    if [ -n "${AB_PID:-}" ]; then  # started with the build step
      step ab_build 400 bash -c "while [ ! -f '$BASE/.build_rc' ]; do sleep 1; done; tail -3 '$OUT_DIR/ab_build.txt'; exit \$(cat '$BASE/.build_rc')"
    else
      rm -rf "$BASE" && mkdir -p "$BASE" && tar xzf "$AB_SRC" -C "$BASE"
      step ab_build 400 bash -c "cd '$BASE' && $PY setup.py build_ext --inplace"
    fi
    for round in $(seq 1 "${AB_ROUNDS:-2}"); do
      for tree in "$BASE" "$PWD"; do
        tag=$([ "$tree" = "$BASE" ] && echo base || echo head)_$round
        step "ab cuda_host $tag" 120 env PYTHONPATH="$tree" $PY "$tree/benchmarks/cuda_host.py" \
          --out-dir "$RESULTS/ab_$tag"
        step "ab energy_bench $tag" 200 env PYTHONPATH="$tree" $PY "$tree/benchmarks/energy_bench.py" --skip-cpu \
          --min-run-time 0.5 --out-dir "$RESULTS/ab_$tag"
      done
    done
  else
    echo "=== ab: no $AB_SRC (git archive --format=tar.gz -o .baseline.tgz REV, and carry it)" | tee -a "$LOG"
  fi
fi
if has ncu; then
  # every kernel is for_each_item_kernel<Functor>: the filter must see the demangled name
  step ncu 240 bash -c "ncu --profile-from-start off --kernel-name-base demangled \
    --kernel-name regex:'Embed|SplatChunk|SplatReduce|Blur|MeanFieldSlice|Insert|EnergySlice' --launch-count 30 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
    $PY benchmarks/ncu_kernels.py --iterations 1 > '$RESULTS/ncu.txt' 2>&1"
  $PY benchmarks/ncu_kernels.py --table "$RESULTS/ncu.txt" 2>&1 | tee -a "$LOG"
fi
if has rrm && [ -f benchmarks/rrm_bench.py ]; then
  step rrm_bench 300 $PY benchmarks/rrm_bench.py --device cuda --out-dir "$RESULTS"
  # the papers' network (random init), rrm_cuda's path only: the share the issue's target is about
  step rrm_bench_resnet38 300 $PY benchmarks/rrm_bench.py --device cuda --backbone resnet38 --skip-original \
    --out-dir "$RESULTS"
fi
if has train; then
  # the CPU demo preset on the GPU (issue 5: a short real training there): its log, mIoU table (in
  # logs.txt) and last PNG panel come back, the checkpoints do not
  T="${WORK:-$OUT_DIR}/train"  # under the device tool beside the results: its checkpoints stay there
  step train_demo 150 $PY python/train_rrm.py --preset cpu-demo --device cuda --no-progress --out-dir "$T"
  mkdir -p "$RESULTS"
  [ -f "$T/log.csv" ] && cp "$T/log.csv" "$RESULTS/train_demo_log.csv"
  last=$(ls "$T"/panels/*.png 2>/dev/null | tail -1)
  [ -n "$last" ] && cp "$last" "$RESULTS/train_demo_panel.png"
fi
grep -E "^=== .*rc=|passed|failed|MISMATCH|ERROR SUMMARY|mIoU" "$LOG" | tail -40
pack  # the device tool brings back at most 8 files: the results travel as one
exit $status
