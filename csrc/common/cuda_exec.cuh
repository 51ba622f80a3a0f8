// CUDA execution policy: one grid-stride kernel template runs any functor from the *_impl.h headers.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/cub.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>

#include "common/exec.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <limits>
#include <tuple>

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
__device__ __forceinline__ void item_loop(int64_t B, int64_t n, int64_t C, const F& f) {
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

template <class F>
__global__ void for_each_item_kernel(int64_t B, int64_t n, int64_t C, F f) {
  item_loop(B, n, C, f);
}

// The same kernel compiled for at least kMinBlocks resident blocks of kBlock (256) threads per SM:
// the compiler keeps its registers within 65536 / (256 kMinBlocks) per thread (knob item_min_blocks).
template <class F, int kMinBlocks>
__global__ void __launch_bounds__(256, kMinBlocks) for_each_item_kernel_capped(int64_t B, int64_t n, int64_t C, F f) {
  item_loop(B, n, C, f);
}

// Items (b, i < counts[b] + add (at most cap), c < C) of all images in turn, c fastest, flattened
// and strided over by a fixed grid (the counts are in device memory, unknown to the host). Each
// thread walks the images forward as its index grows: no division by the image extents.
template <class F>
__global__ void for_each_counted_kernel(int64_t B, const int32_t* counts, int64_t add, int64_t cap, int64_t C, F f) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  const bool narrow = C < (int64_t(1) << 31);
  int64_t b = 0, base = 0, nb = counted_extent(counts, 0, add, cap) * C;
  for (int64_t u = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;; u += stride) {
    while (u - base >= nb) {
      base += nb;
      if (++b == B) return;
      nb = counted_extent(counts, b, add, cap) * C;
    }
    const int64_t r = u - base;
    int64_t i, c;
    if (narrow && r < (int64_t(1) << 31)) {
      const uint32_t r32 = static_cast<uint32_t>(r), C32 = static_cast<uint32_t>(C);
      const uint32_t i32 = r32 / C32;
      i = i32;
      c = r32 - i32 * C32;
    } else {
      i = r / C;
      c = r - i * C;
    }
    f(b, i, c, c + 1);
  }
}

// A block of for_each_block on the device: the thread block itself; a phase is the threads' calls
// and a __syncthreads(). Host-device members (the host side is never called) so that functors
// written for EmulatedBlock and CudaBlock alike compile in both passes.
struct CudaBlock {
  char* smem;
  RRM_HOST_DEVICE int threads() const {
#if defined(__CUDA_ARCH__)
    return static_cast<int>(blockDim.x);
#else
    return 0;
#endif
  }
  template <typename T>
  RRM_HOST_DEVICE T* shared() const {
    return reinterpret_cast<T*>(smem);
  }
  template <class G>
  RRM_HOST_DEVICE void phase(const G& g) const {
#if defined(__CUDA_ARCH__)
    g(static_cast<int>(threadIdx.x));
    __syncthreads();
#endif
  }
};

// Block k of image b is CUDA block b * nblocks + k.
template <class F>
__global__ void for_each_block_kernel(int64_t nblocks, F f) {
  extern __shared__ __align__(16) char rrm_block_smem[];
  const CudaBlock blk{rrm_block_smem};
  const int64_t t = blockIdx.x;
  f(blk, t / nblocks, t % nblocks);
}

struct CudaExec {
  static constexpr int kChannelsPerThread = 1;
  static constexpr int kMaxDevices = 64;  // per-device caches of launch settings
  static constexpr bool kIsCuda = true;
  static constexpr bool kDeviceAccumulation = true;
  static constexpr bool kSortCsr = true;
  static constexpr const char* kName = "cuda";
  static int64_t stream_id() { return static_cast<int64_t>(at::cuda::getCurrentCUDAStream().id()); }
  // A tensor's bytes set to zero on the current stream: one cudaMemsetAsync (a memset node in a
  // graph), where at::zeros is a TensorIterator and a fill kernel.
  static void zero_bytes(const at::Tensor& t) {
    TORCH_INTERNAL_ASSERT(t.is_contiguous());
    if (t.numel() > 0)
      C10_CUDA_CHECK(cudaMemsetAsync(t.data_ptr(), 0, t.nbytes(), at::cuda::getCurrentCUDAStream().stream()));
  }
  // Whether the current stream is being captured into a CUDA graph (no host reads allowed).
  static bool capturing() {
    return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  }
  // Stable ascending sort of int32/int64 keys in [0, max_key] -> (sorted keys, int64 permutation):
  // ATen's CUDA radix sort (at::cuda::cub::radix_sort_pairs, on the current stream, its scratch from
  // the caching allocator) over the keys' significant bits only. at::sort sorts all 32 or 64 bits:
  // 4 (int32) passes where a 512x512 image's (image, vertex) keys need 15 bits, i.e. 2 passes.
  static std::tuple<at::Tensor, at::Tensor> sort_keys(const at::Tensor& keys, int64_t max_key) {
    if (!radix_ok(keys, max_key)) return at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    return radix_sort<int64_t>(keys, at::arange(keys.numel(), keys.options().dtype(at::kLong)), max_key);
  }
  // The same sort carrying int32 values (one per key) instead of producing the permutation: no
  // iota, and 4-byte instead of 8-byte values through every pass.
  static std::tuple<at::Tensor, at::Tensor> sort_pairs(const at::Tensor& keys, const at::Tensor& values,
                                                       int64_t max_key) {
    if (!radix_ok(keys, max_key) || values.scalar_type() != at::kInt) {
      auto [sorted, order] = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
      return {sorted, values.index_select(0, order)};
    }
    return radix_sort<int32_t>(keys, values, max_key);
  }
  static bool radix_ok(const at::Tensor& keys, int64_t max_key) {
    const bool narrow = keys.scalar_type() == at::kInt || keys.scalar_type() == at::kLong;
    return narrow && keys.numel() <= std::numeric_limits<int>::max() && max_key >= 0;
  }
  // keys (int32 or int64) with values of type value_t, over bits [0, bits of max_key).
  template <typename value_t>
  static std::tuple<at::Tensor, at::Tensor> radix_sort(const at::Tensor& keys, const at::Tensor& values,
                                                       int64_t max_key) {
    const at::Tensor k = keys.contiguous();
    const at::Tensor v = values.contiguous();
    auto sorted = at::empty_like(k);
    auto vout = at::empty_like(v);
    const int64_t n = k.numel();
    const int64_t bits = at::cuda::cub::get_num_bits(static_cast<uint64_t>(max_key));
    auto run = [&](auto key_zero) {
      using key_t = decltype(key_zero);
      at::cuda::cub::radix_sort_pairs<key_t, value_t>(k.data_ptr<key_t>(), sorted.data_ptr<key_t>(),
                                                      v.data_ptr<value_t>(), vout.data_ptr<value_t>(), n,
                                                      /*descending=*/false, /*begin_bit=*/0, bits);
    };
    if (k.scalar_type() == at::kInt)
      run(int32_t{0});
    else
      run(int64_t{0});
    return {sorted, vout};
  }
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
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    if constexpr (min_blocks_variants<F>::value) {
      static_assert(kBlock == 256, "the capped kernels' __launch_bounds__ assume blocks of 256 threads");
      const int64_t cap = tuning::get(tuning::kItemMinBlocks);
      if (cap == 5 || cap == 6) {
        if (cap == 5)
          for_each_item_kernel_capped<F, 5><<<blocks, kBlock, 0, stream>>>(B, n, C, f);
        else
          for_each_item_kernel_capped<F, 6><<<blocks, kBlock, 0, stream>>>(B, n, C, f);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
    }
    for_each_item_kernel<F><<<blocks, kBlock, 0, stream>>>(B, n, C, f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // The most dynamic shared memory a block of this device can opt into (227 KiB on sm_90, 163 on
  // sm_80, 99 on sm_86/89, 64 on sm_75).
  static int64_t max_block_smem() {
    return static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
  }
  // One CUDA block per (image, block); dynamic shared memory above 48 KiB is opted into per kernel.
  template <class F>
  void for_each_block(int64_t B, int64_t nblocks, int64_t smem_bytes, const F& f) const {
    if (B <= 0 || nblocks <= 0) return;
    TORCH_CHECK(B * nblocks < (int64_t(1) << 31), "for_each_block: too many blocks (", B * nblocks, ")");
    TORCH_CHECK(smem_bytes <= max_block_smem(), "for_each_block: ", smem_bytes,
                " bytes of shared memory per block exceed the device's opt-in limit of ", max_block_smem());
    if (smem_bytes > 48 * 1024) {
      // the kernel opted into the device's whole limit, once per device (the attribute is only a
      // bound; every thread that races here sets the same value)
      static std::array<std::atomic<bool>, kMaxDevices> opted{};
      const int dev = c10::cuda::current_device();
      if (dev >= kMaxDevices || !opted[dev].load(std::memory_order_acquire)) {
        C10_CUDA_CHECK(cudaFuncSetAttribute(for_each_block_kernel<F>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(max_block_smem())));
        if (dev < kMaxDevices) opted[dev].store(true, std::memory_order_release);
      }
    }
    for_each_block_kernel<F><<<static_cast<unsigned>(B * nblocks), kBlock, static_cast<size_t>(smem_bytes),
                               at::cuda::getCurrentCUDAStream()>>>(nblocks, f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // Grid: the blocks of the kernel that are resident on the device at once (its occupancy per SM,
  // from its registers, times the SMs: one wave, each thread's share of the items fixed by the
  // stride), or fewer when cap bounds the items below that.
  template <class F>
  void for_each_counted(int64_t B, const int32_t* counts, int64_t add, int64_t cap, int64_t C, const F& f,
                        int64_t /*grain*/ = 0) const {
    if (B <= 0 || cap <= 0 || C <= 0) return;
    // resident blocks per SM, per functor type (its kernel's registers) and device; no stream work
    static std::array<std::atomic<int>, kMaxDevices> per_sm_of{};  // 0: not queried yet
    const int dev = c10::cuda::current_device();
    int per_sm = dev < kMaxDevices ? per_sm_of[dev].load(std::memory_order_relaxed) : 0;
    if (per_sm == 0) {
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, for_each_counted_kernel<F>, kBlock, 0));
      per_sm = std::max(1, per_sm);
      if (dev < kMaxDevices) per_sm_of[dev].store(per_sm, std::memory_order_relaxed);
    }
    const int64_t want = (B * cap * C + kBlock - 1) / kBlock;
    const int64_t wave = per_sm * static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
    const unsigned blocks = static_cast<unsigned>(std::max<int64_t>(1, std::min(want, wave)));
    for_each_counted_kernel<F><<<blocks, kBlock, 0, at::cuda::getCurrentCUDAStream()>>>(B, counts, add, cap, C, f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace rrm
