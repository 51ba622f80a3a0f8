// Portability macros and atomics shared by the CPU and CUDA builds.
//
// Every per-element function in csrc/<op>/<op>_common.h is RRM_HOST_DEVICE, so the CPU build runs
// exactly the code the GPU threads run (and tests can exercise it on a machine without a GPU).
#pragma once

#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#define RRM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define RRM_HOST_DEVICE inline
#endif

namespace rrm {

// Whether CUDA compiles F's item launch also with register caps (knob item_min_blocks, common/cuda_exec.cuh): F
// declares `static constexpr bool kMinBlocksVariants = true;`. Only the few functors worth the experiment do, since
// each variant is another kernel to compile.
template <class F, class = void>
struct min_blocks_variants : std::false_type {};
template <class F>
struct min_blocks_variants<F, std::void_t<decltype(F::kMinBlocksVariants)>>
    : std::integral_constant<bool, F::kMinBlocksVariants> {};

// Compare-and-swap on a 32-bit word; returns the value that was there before.
RRM_HOST_DEVICE int32_t atomic_cas(int32_t* addr, int32_t expected, int32_t desired) {
#if defined(__CUDA_ARCH__)
  return atomicCAS(reinterpret_cast<int*>(addr), expected, desired);
#else
  __atomic_compare_exchange_n(addr, &expected, desired, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
  return expected;  // on failure `expected` holds the current value; on success it is unchanged
#endif
}

// Fetch-and-add on a 32-bit word; returns the old value.
RRM_HOST_DEVICE int32_t atomic_add(int32_t* addr, int32_t v) {
#if defined(__CUDA_ARCH__)
  return atomicAdd(reinterpret_cast<int*>(addr), v);
#else
  return __atomic_fetch_add(addr, v, __ATOMIC_ACQ_REL);
#endif
}

// A load that may race with atomic_cas on the same word.
RRM_HOST_DEVICE int32_t atomic_load(const int32_t* addr) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const volatile int*>(addr);
#else
  return __atomic_load_n(addr, __ATOMIC_ACQUIRE);
#endif
}

// Orders this thread's earlier writes to global memory before its later ones for every thread of
// the device (a release/acquire fence around the atomic counter of SplatChunkFunctor's last-chunk
// sums). The host side's atomics are acq_rel already; the fence keeps the emulation's order the same.
RRM_HOST_DEVICE void thread_fence() {
#if defined(__CUDA_ARCH__)
  __threadfence();
#else
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
#endif
}

}  // namespace rrm
