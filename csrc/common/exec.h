// Execution policies: how a "kernel" (a functor called once per thread index) is run.
//
// Algorithms in csrc/<op>/<op>_impl.h are written once against this interface:
//     exec.for_each(n, functor)   calls functor(t) for every t in [0, n), in any order / concurrently
//     Exec::kChannelsPerThread    how many channels one thread handles (0 = all: the CPU's choice)
// and the launchers choose the policy:
//   CpuExec          at::parallel_for over chunks of t (OpenMP threads), the production CPU path;
//   EmulatedCudaExec serial, but with the CUDA launch's decomposition (one thread per (item, channel),
//                    blocks of 256) visited in reverse block and thread order, so that CPU-only CI
//                    exercises the GPU algorithm -- hash insertion races excepted -- and shows that
//                    its result does not depend on the order threads run in;
//   CudaExec         (csrc/common/cuda_exec.cuh) a grid-stride kernel on the current stream.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace rrm {

struct CpuExec {
  static constexpr int kChannelsPerThread = 0;
  static constexpr bool kIsCuda = false;
  static constexpr bool kSortCsr = false;  // build splat lists with a serial counting sort
  template <class F>
  void for_each(int64_t n, const F& f, int64_t grain = 2048) const {
    if (n <= 0) return;
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) f(t);
    });
  }
};

struct EmulatedCudaExec {
  static constexpr int kChannelsPerThread = 1;
  static constexpr bool kIsCuda = false;
  static constexpr bool kSortCsr = true;  // the CUDA path's sort-based splat lists
  static constexpr int64_t kBlock = 256;
  template <class F>
  void for_each(int64_t n, const F& f, int64_t /*grain*/ = 0) const {
    if (n <= 0) return;
    const int64_t blocks = (n + kBlock - 1) / kBlock;
    for (int64_t b = blocks - 1; b >= 0; --b) {
      for (int64_t th = kBlock - 1; th >= 0; --th) {
        const int64_t t = b * kBlock + th;
        if (t < n) f(t);
      }
    }
  }
};

}  // namespace rrm
