// CUDA execution policy: one grid-stride kernel template runs any functor from the *_impl.h headers.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>

namespace rrm {

template <class F>
__global__ void for_each_kernel(int64_t n, F f) {
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < n;
       t += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    f(t);
  }
}

// One thread per (b, i, c), c fastest, so that a warp reads consecutive channels of one item.
// The index is split with 32-bit divisions whenever the whole range fits (a uniform branch): a
// 64-bit division is a ~70-instruction subroutine on the GPU, three of them per thread cost more
// than a blur pass's own arithmetic. One call site of the functor, so it is inlined once.
template <class F>
__global__ void for_each_item_kernel(int64_t B, int64_t n, int64_t C, F f) {
  const int64_t total = B * n * C;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  const bool narrow = total + stride < (int64_t(1) << 31);
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total; t += stride) {
    int64_t b, i, c;
    if (narrow) {
      const uint32_t t32 = static_cast<uint32_t>(t), C32 = static_cast<uint32_t>(C), n32 = static_cast<uint32_t>(n);
      const uint32_t bi = t32 / C32;
      c = t32 - bi * C32;
      b = bi / n32;
      i = bi - static_cast<uint32_t>(b) * n32;
    } else {
      const int64_t bi = t / C;
      c = t - bi * C;
      b = bi / n;
      i = bi - b * n;
    }
    f(b, i, c, c + 1);
  }
}

struct CudaExec {
  static constexpr int kChannelsPerThread = 1;
  static constexpr bool kIsCuda = true;
  static constexpr bool kSortCsr = true;
  static constexpr const char* kName = "cuda";
  static int64_t stream_id() { return static_cast<int64_t>(at::cuda::getCurrentCUDAStream().id()); }
  static constexpr int kBlock = 256;
  template <class F>
  void for_each(int64_t n, const F& f, int64_t /*grain*/ = 0) const {
    if (n <= 0) return;
    const int64_t want = (n + kBlock - 1) / kBlock;
    const int64_t max_blocks = 65535LL * 32;
    const unsigned blocks = static_cast<unsigned>(std::min(want, max_blocks));
    for_each_kernel<F><<<blocks, kBlock, 0, at::cuda::getCurrentCUDAStream()>>>(n, f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <class F>
  void for_each_item(int64_t B, int64_t n, int64_t C, const F& f, int64_t /*grain*/ = 0) const {
    const int64_t total = B * n * C;
    if (total <= 0) return;
    const int64_t want = (total + kBlock - 1) / kBlock;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(want, 65535LL * 32));
    for_each_item_kernel<F><<<blocks, kBlock, 0, at::cuda::getCurrentCUDAStream()>>>(B, n, C, f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace rrm
