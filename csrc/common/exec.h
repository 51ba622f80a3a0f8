// Execution policies: how a "kernel" (a functor called once per thread index) is run.
//
// Algorithms in csrc/<op>/<op>_impl.h are written once against this interface:
//     exec.for_each(n, functor)   calls functor(t) for every t in [0, n), in any order / concurrently
//     exec.for_each_item(B, n, C, functor)
//                                 calls functor(b, i, c0, c1) so that every (b < B, i < n, c < C) is
//                                 covered once: the CPU gives each call all channels [0, C) and walks
//                                 (b, i) without divisions; CUDA gives each thread one channel.
// and the launchers choose the policy:
//   CpuExec          at::parallel_for over chunks of t (OpenMP threads), the production CPU path;
//   EmulatedCudaExec serial, but with the CUDA launch's decomposition (one thread per (item, channel),
//                    blocks of 256) visited in reverse block and thread order (or in order, or in a
//                    seeded permutation: test knob emulate_order), so that CPU-only CI exercises the
//                    GPU algorithm -- hash insertion races excepted -- and shows that its result does
//                    not depend on the order threads run in;
//   CudaExec         (csrc/common/cuda_exec.cuh) a grid-stride kernel on the current stream.
//     exec.for_each_counted(B, counts, add, cap, C, functor)
//                                 calls functor(b, i, c0, c1) for every b < B, i < min(counts[b] + add,
//                                 cap), c < C: an extent held in (device) memory, e.g. a lattice's
//                                 vertex counts after a build that does not read them back, so that
//                                 the host never waits for it. CUDA launches a grid sized from the
//                                 device, not from cap, whose threads stride over all images' items.
//     exec.for_each_block(B, nblocks, smem_bytes, functor)
//                                 calls functor(blk, b, k) for every image b < B and block k < nblocks:
//                                 a block of kBlock threads with smem_bytes of block-shared memory
//                                 (blk.template shared<T>()), whose work is a sequence of phases,
//                                 blk.phase(g): g(t) for every thread t of the block, then a barrier.
//                                 Threads of one phase must not touch the same shared word unless all
//                                 only read it; a phase sees every write of the phases before it. CUDA
//                                 runs it as one thread block; the emulation runs a block's threads in
//                                 turn, in reverse, with the shared memory filled with NaN bytes first
//                                 (a read of a word no phase wrote shows) and a guard after it (a
//                                 write beyond it raises). CpuExec has none. exec.max_block_smem():
//                                 the most shared memory a block can have (the device's opt-in limit).
// exec.capturing() says whether the current CUDA stream is being captured into a graph (false on
// the CPU; the emulation's follows the test knob emulate_capture): code that reads a device value
// back must not run then.
// Each also has exec.sort_keys(keys, max_key): a stable ascending sort of a 1-D tensor of integer
// keys in [0, max_key] -> (sorted keys, int64 permutation); and exec.sort_pairs(keys, values,
// max_key): the same sort carrying int32 values along -> (sorted keys, values in sorted order), for
// callers that need the values, not the permutation (the CUDA sort then moves 4-byte values and
// needs no iota). A stable sort's result is unique, so the policies agree whatever sort they use
// (CUDA: a radix sort over the keys' significant bits only).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include "common/macros.h"
#include "common/tuning.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ATen products inside an op (at::mm) would be autocast to 16 bits when the op is called under
// torch.autocast (autocast stays on below a custom op): the ops compute in their inputs' dtype, so
// those that call ATen products switch autocast off for their own body.
#define RRM_NO_AUTOCAST() c10::impl::ExcludeDispatchKeyGuard rrm_no_autocast_guard_(c10::autocast_dispatch_keyset)

namespace rrm {

// The CPU loops are compiled twice: for the x86-64 baseline and, where the processor has it, for
// AVX2 (chosen at run time). `flatten` inlines the functor bodies into the AVX2 copy, so the
// channel loops of splat/blur/slice vectorise 8 floats wide; the functors themselves stay baseline
// code, so nothing AVX2 can leak into other translation units. FP contraction is off in the build
// (setup.py), so both copies give bit-identical results.
template <class F>
inline void cpu_item_loop(int64_t begin, int64_t end, int64_t n, int64_t C, const F& f) {
  int64_t b = begin / n, i = begin % n;
  for (int64_t t = begin; t < end; ++t) {
    f(b, i, int64_t{0}, C);
    if (++i == n) {
      i = 0;
      ++b;
    }
  }
}

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__CUDACC__)
#define RRM_CPU_AVX2_DISPATCH 1
// The same loop, compiled for AVX2: `flatten` inlines cpu_item_loop and the functor into it.
template <class F>
__attribute__((target("avx2"), flatten)) void cpu_item_loop_avx2(int64_t begin, int64_t end, int64_t n, int64_t C,
                                                                 const F& f) {
  cpu_item_loop(begin, end, n, C, f);
}

inline bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}
#endif

// f() on the calling thread, in a copy compiled for AVX2 when the processor has it (serial CPU
// loops that are not item launches, e.g. lattice::insert_pixels' pixel loop, whose
// ceil/floor are one instruction each with AVX2's rounding and a call or a dozen without).
#ifdef RRM_CPU_AVX2_DISPATCH
template <class F>
__attribute__((target("avx2"), flatten)) void cpu_call_avx2(const F& f) {
  f();
}
#endif

template <class F>
inline void cpu_run(const F& f) {
#ifdef RRM_CPU_AVX2_DISPATCH
  if (cpu_has_avx2()) {
    cpu_call_avx2(f);
    return;
  }
#endif
  f();
}

// Items [begin, end) of a (B, n) item range on the calling thread, in the AVX2 copy when the
// processor has it.
template <class F>
inline void cpu_run_items(int64_t begin, int64_t end, int64_t n, int64_t C, const F& f) {
#ifdef RRM_CPU_AVX2_DISPATCH
  if (cpu_has_avx2()) {
    cpu_item_loop_avx2(begin, end, n, C, f);
    return;
  }
#endif
  cpu_item_loop(begin, end, n, C, f);
}

// The CPU policies' sort (at::sort, stable).
inline std::tuple<at::Tensor, at::Tensor> stable_sort_keys(const at::Tensor& keys) {
  return at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
}

inline std::tuple<at::Tensor, at::Tensor> stable_sort_pairs(const at::Tensor& keys, const at::Tensor& values) {
  auto [sorted, order] = stable_sort_keys(keys);
  return {sorted, values.index_select(0, order)};
}

// Fills that ride along an item launch: int32 ranges set to a value by the launch's own threads
// (thread t of T writes elements t, t + T, ...), so that a buffer a later launch needs zeroed (or
// -1) costs no fill launch of its own: on a GPU each at::zeros / at::full is a TensorIterator and a
// launch, ~10 us of host time on session 24's H200 host. The launch's functor must not read them;
// the launches after it see them (stream order). Made with FillList::rides() on the host.
struct IntFills {
  static constexpr int kMax = 4;
  int32_t* ptr[kMax] = {};
  int64_t n[kMax] = {};
  int32_t value[kMax] = {};
  int count = 0;
  RRM_HOST_DEVICE void apply(int64_t t, int64_t T) const {
    for (int k = 0; k < count; ++k)
      for (int64_t j = t; j < n[k]; j += T) ptr[k][j] = value[k];
  }
};

// An item functor with fills riding along: thread (b, i, c) of a (B, n, C) launch is thread
// (b n + i) C + c of T = B n C.
template <class F>
struct WithFills {
  F f;
  IntFills fills;
  int64_t n, C, T;
  RRM_HOST_DEVICE void operator()(int64_t b, int64_t i, int64_t c0, int64_t c1) const {
    for (int64_t c = c0; c < c1; ++c) fills.apply((b * n + i) * C + c, T);
    f(b, i, c0, c1);
  }
};

// Two independent item launches of one channel each, as one launch over i < max(n1, n2) of every
// image: f1 for i < n1, f2 for i < n2 (a launch fewer: ~10 us of host time each on a GPU). Neither
// may read what the other writes.
template <class F1, class F2>
struct ItemPair {
  F1 f1;
  F2 f2;
  int64_t n1, n2;
  RRM_HOST_DEVICE void operator()(int64_t b, int64_t i, int64_t c0, int64_t c1) const {
    if (i < n1) f1(b, i, c0, c1);
    if (i < n2) f2(b, i, c0, c1);
  }
};

// An item launch whose item (0, 0) also runs g(0) first: a one-thread launch riding along (g must
// not read what the launch writes, nor the launch what g writes).
template <class F, class G>
struct WithFirst {
  F f;
  G g;
  RRM_HOST_DEVICE void operator()(int64_t b, int64_t i, int64_t c0, int64_t c1) const {
    if (b == 0 && i == 0 && c0 == 0) g(0);
    f(b, i, c0, c1);
  }
};

// The host side: int32 tensors (contiguous) and their values.
struct FillList {
  std::vector<std::pair<at::Tensor, int32_t>> items;
  void add(const at::Tensor& t, int32_t value) {
    TORCH_INTERNAL_ASSERT(t.scalar_type() == at::kInt && t.is_contiguous());
    TORCH_INTERNAL_ASSERT(items.size() < static_cast<size_t>(IntFills::kMax));
    items.emplace_back(t, value);
  }
  IntFills rides() const {
    IntFills r;
    for (const auto& [t, v] : items) {
      r.ptr[r.count] = t.data_ptr<int32_t>();
      r.n[r.count] = t.numel();
      r.value[r.count++] = v;
    }
    return r;
  }
  void run_aten() const {
    for (const auto& [t, v] : items) t.fill_(v);
  }
};

// Items of image b in a counted launch: counts[b] + add, clamped to [0, cap].
RRM_HOST_DEVICE int64_t counted_extent(const int32_t* counts, int64_t b, int64_t add, int64_t cap) {
  const int64_t n = counts[b] + add;
  return n < 0 ? 0 : n > cap ? cap : n;
}

// A block of EmulatedCudaExec::for_each_block: its threads run each phase in turn, in reverse,
// over the block's own shared memory. (The CPU's kernels have no block form: the tiled mean field
// that uses it is the GPU's.)
// A phase inside a phase is refused: on the GPU it is a __syncthreads() reached by each thread on
// its own (a divergent barrier), which the serial emulation would otherwise run as if it were fine.
// (What the emulation cannot show: a block-level local that a phase changes is one variable here
// but one per thread on the GPU, so code between phases must not depend on what phases write to
// locals; it reads shared or global memory instead.)
// The order in which the emulation visits n threads (knob emulate_order): the j-th visited is
// order(j, n). 0: in reverse; 1: in order; s >= 2: i -> (a i + c) mod n, a bijection (a a prime
// that divides no n below 2^31, c from s).
struct EmulatedOrder {
  int64_t seed = 0;
  static EmulatedOrder current() { return EmulatedOrder{tuning::get(tuning::kEmulateOrder)}; }
  int64_t operator()(int64_t j, int64_t n) const {
    if (seed == 0) return n - 1 - j;
    if (seed == 1) return j;
    const unsigned __int128 a = 2654435761u, c = (static_cast<uint64_t>(seed) * 0x9E3779B97F4A7C15ull) % n;
    return static_cast<int64_t>((a * static_cast<uint64_t>(j) + c) % static_cast<uint64_t>(n));
  }
};

struct EmulatedBlock {
  char* smem;
  int nthreads;
  bool* in_phase;
  EmulatedOrder order;
  int threads() const { return nthreads; }
  template <typename T>
  T* shared() const {
    return reinterpret_cast<T*>(smem);
  }
  template <class G>
  void phase(const G& g) const {
    TORCH_CHECK(!*in_phase, "emulated block: a phase inside a phase (a divergent __syncthreads on the GPU)");
    *in_phase = true;
    for (int j = 0; j < nthreads; ++j) g(static_cast<int>(order(j, nthreads)));
    *in_phase = false;
  }
};

// Shared memory of one emulated block: 16-byte aligned, as CUDA's dynamic shared memory is.
// kGuard bytes after it hold a pattern that a write beyond the block's shared memory would change.
struct HostSmem {
  static constexpr int64_t kGuard = 256;
  std::vector<double> words;  // doubles: 8-byte aligned; the offset below makes 16
  char* base = nullptr;
  int64_t bytes = 0;
  char* get(int64_t n) {
    bytes = n;
    words.resize(static_cast<size_t>((n + kGuard + 15) / 8 + 2));
    auto p = reinterpret_cast<uintptr_t>(words.data());
    base = reinterpret_cast<char*>((p + 15) & ~uintptr_t(15));
    return base;
  }
  // Before a block: its shared memory NaN bytes (0xFF), the guard its pattern.
  void poison() const {
    std::memset(base, 0xFF, static_cast<size_t>(bytes));
    std::memset(base + bytes, 0xA5, static_cast<size_t>(kGuard));
  }
  bool guard_intact() const {
    for (int64_t k = 0; k < kGuard; ++k)
      if (static_cast<unsigned char>(base[bytes + k]) != 0xA5) return false;
    return true;
  }
};

struct CpuExec {
  static constexpr int kChannelsPerThread = 0;  // 0: all channels in one call
  static constexpr bool kIsCuda = false;
  static constexpr bool kDeviceAccumulation = false;  // the BCD ops' sums in double, not the compute dtype
  static constexpr bool kSortCsr = false;             // no device-style sorted lists: serial counting sorts
  static constexpr const char* kName = "cpu";
  static int64_t stream_id() { return 0; }
  // A tensor's bytes set to zero (CUDA: one cudaMemsetAsync, no TensorIterator and no kernel).
  static void zero_bytes(const at::Tensor& t) { t.zero_(); }
  static bool capturing() { return false; }
  static std::tuple<at::Tensor, at::Tensor> sort_keys(const at::Tensor& keys, int64_t /*max_key*/) {
    return stable_sort_keys(keys);
  }
  static std::tuple<at::Tensor, at::Tensor> sort_pairs(const at::Tensor& keys, const at::Tensor& values,
                                                       int64_t /*max_key*/) {
    return stable_sort_pairs(keys, values);
  }
  template <class F>
  void for_each(int64_t n, const F& f, int64_t grain = 2048) const {
    if (n <= 0) return;
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) f(t);
    });
  }
  template <class F>
  void for_each_item(int64_t B, int64_t n, int64_t C, const F& f, int64_t grain = 1024) const {
    if (B <= 0 || n <= 0 || C <= 0) return;
    at::parallel_for(0, B * n, grain, [&](int64_t begin, int64_t end) { cpu_run_items(begin, end, n, C, f); });
  }
  template <class F>
  void for_each_counted(int64_t B, const int32_t* counts, int64_t add, int64_t cap, int64_t C, const F& f,
                        int64_t grain = 1024) const {
    for (int64_t b = 0; b < B; ++b) {
      const int64_t n = counted_extent(counts, b, add, cap);
      if (n == 0 || C <= 0) continue;
      at::parallel_for(b * cap, b * cap + n, grain,
                       [&](int64_t begin, int64_t end) { cpu_run_items(begin, end, cap, C, f); });
    }
  }
};

// What the emulation ran: its launches (for_each, for_each_item, for_each_counted, for_each_block
// calls with work) and memsets (zero_bytes): what the same call launches on a GPU besides ATen's own
// kernels (rrm_cuda._C.emulated_launches(); tests and benchmarks/host_overhead.py).
struct EmulatedCounts {
  std::atomic<int64_t> launches{0}, memsets{0};
};
inline EmulatedCounts& emulated_counts() {
  static EmulatedCounts counts;
  return counts;
}

struct EmulatedCudaExec {
  static constexpr int kChannelsPerThread = 1;
  static constexpr bool kIsCuda = false;
  static constexpr bool kDeviceAccumulation = true;  // as CUDA: its rounding and ranges are tested
  static constexpr bool kSortCsr = true;             // the CUDA path's sort-based splat lists
  static constexpr const char* kName = "emulated_cuda";
  static int64_t stream_id() { return 0; }
  static void zero_bytes(const at::Tensor& t) {
    TORCH_INTERNAL_ASSERT(t.is_contiguous());
    if (t.numel() == 0) return;
    emulated_counts().memsets.fetch_add(1, std::memory_order_relaxed);
    std::memset(t.data_ptr(), 0, t.nbytes());
  }
  // Knob emulate_capture (tests): act as inside a CUDA graph capture, whose host logic (counted
  // lattices, no lattice cache) the CPU then runs.
  static bool capturing() { return tuning::get(tuning::kEmulateCapture) != 0; }
  static std::tuple<at::Tensor, at::Tensor> sort_keys(const at::Tensor& keys, int64_t /*max_key*/) {
    return stable_sort_keys(keys);
  }
  static std::tuple<at::Tensor, at::Tensor> sort_pairs(const at::Tensor& keys, const at::Tensor& values,
                                                       int64_t /*max_key*/) {
    return stable_sort_pairs(keys, values);
  }
  static constexpr int64_t kBlock = 256;
  template <class F>
  void for_each(int64_t n, const F& f, int64_t /*grain*/ = 0) const {
    if (n <= 0) return;
    emulated_counts().launches.fetch_add(1, std::memory_order_relaxed);
    // (knob 0, the default: blocks and their threads in reverse, i.e. t from n - 1 down)
    const EmulatedOrder order = EmulatedOrder::current();
    for (int64_t j = 0; j < n; ++j) f(order(j, n));
  }
  template <class F>
  void for_each_item(int64_t B, int64_t n, int64_t C, const F& f, int64_t /*grain*/ = 0) const {
    // Same decomposition as CudaExec::for_each_item: one thread per (b, i, c), c fastest.
    for_each(B * n * C, [&](int64_t t) {
      const int64_t c = t % C, bi = t / C;
      f(bi / n, bi % n, c, c + 1);
    });
  }
  // The emulated device's opt-in shared memory per block: an H100's.
  static int64_t max_block_smem() { return 227 * 1024; }
  // Blocks in reverse order, each one's threads in reverse in every phase; the shared memory
  // filled with NaN bytes (0xFF: a NaN for floats and doubles, -1 for integers) before each block.
  template <class F>
  void for_each_block(int64_t B, int64_t nblocks, int64_t smem_bytes, const F& f) const {
    if (B <= 0 || nblocks <= 0) return;
    emulated_counts().launches.fetch_add(1, std::memory_order_relaxed);
    TORCH_CHECK(smem_bytes <= max_block_smem(), "for_each_block: ", smem_bytes,
                " bytes of shared memory per block exceed the device's opt-in limit of ", max_block_smem());
    HostSmem smem;
    char* const p = smem.get(smem_bytes);
    bool in_phase = false;
    const EmulatedOrder order = EmulatedOrder::current();
    const EmulatedBlock blk{p, static_cast<int>(kBlock), &in_phase, order};
    for (int64_t j = 0; j < B * nblocks; ++j) {
      const int64_t t = order(j, B * nblocks);
      smem.poison();
      f(blk, t / nblocks, t % nblocks);
      TORCH_CHECK(smem.guard_intact(), "emulated block ", t % nblocks, " of image ", t / nblocks, " wrote beyond its ",
                  smem_bytes, " bytes of shared memory");
    }
  }
  // CudaExec::for_each_counted's decomposition: a fixed grid of threads (here at most kCountedGrid
  // of them) striding over the items of all images in turn, c fastest; threads visited in reverse.
  static constexpr int64_t kCountedGrid = 16 * kBlock;
  template <class F>
  void for_each_counted(int64_t B, const int32_t* counts, int64_t add, int64_t cap, int64_t C, const F& f,
                        int64_t /*grain*/ = 0) const {
    if (B <= 0 || cap <= 0 || C <= 0) return;
    emulated_counts().launches.fetch_add(1, std::memory_order_relaxed);
    const int64_t G = std::min(kCountedGrid, (B * cap * C + kBlock - 1) / kBlock * kBlock);
    const EmulatedOrder order = EmulatedOrder::current();
    for (int64_t j = 0; j < G; ++j) {
      const int64_t t0 = order(j, G);
      int64_t b = 0, base = 0, nb = counted_extent(counts, 0, add, cap) * C;
      for (int64_t u = t0;; u += G) {
        while (b < B && u - base >= nb) {
          base += nb;
          if (++b < B) nb = counted_extent(counts, b, add, cap) * C;
        }
        if (b == B) break;
        const int64_t r = u - base;
        f(b, r / C, r % C, r % C + 1);
      }
    }
  }
};

// exec.for_each_item(B, n, C, f) with `fills` riding along; a launch with no threads fills them
// with ATen instead. The emulation first fills them with a pattern that is neither value, so a
// test sees an element the launch left unwritten.
template <class Exec, class F>
void for_each_item_filling(const Exec& exec, int64_t B, int64_t n, int64_t C, const F& f, const FillList& fills,
                           int64_t grain) {
  const int64_t T = B * n * C;
  if (B <= 0 || n <= 0 || C <= 0) {
    fills.run_aten();
    return;
  }
  if constexpr (std::is_same_v<Exec, EmulatedCudaExec>) {
    for (const auto& item : fills.items) {  // (host memory: no ATen call, which would count as a fill)
      int32_t* p = item.first.data_ptr<int32_t>();
      std::fill(p, p + item.first.numel(), 0x5A5A5A5A);
    }
  }
  exec.for_each_item(B, n, C, WithFills<F>{f, fills.rides(), n, C, T}, grain);
}

}  // namespace rrm
