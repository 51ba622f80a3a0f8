// Large CPU outputs on transparent huge pages.
//
// glibc's malloc serves a request above its mmap threshold (which adapts up to 32 MiB) with fresh
// mmap'ed memory and unmaps it when freed, so such a tensor's first write faults in every 4 KiB
// page, each zeroed by the kernel: again on every call. (Smaller tensors come back from malloc's
// heap after the first call, already faulted in.) For the energy loss's memory-bound passes that
// was most of the time: the gradient of RRM's (8, 21, 321, 321) probabilities (69 MB) spent 30 ms
// of its 36 ms in page faults on the 2-core VM (session 20). Memory advised MADV_HUGEPAGE faults
// in 2 MiB pages instead (512 times fewer faults) where the kernel's transparent huge pages are in
// "madvise" or "always" mode; under "never" the advice is ignored and nothing changes. (ATen does
// this for all its allocations when THP_MEM_ALLOC_ENABLE=1 is set before its first one.) Only
// tensors that glibc would map afresh take this path: on tensors below the threshold it measured
// slower (the (8, 21, 160^2) gradient of dense_energy: +20 ms). Freed blocks are kept for reuse
// (BlockCache, at most six): a training loop's next gradient then needs no page zeroed at all.
// RRM_CUDA_HUGE_PAGES=0 in the environment turns all of it off (plain at::empty).
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>

#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace rrm {

namespace detail {

constexpr size_t kHugePage = size_t(2) << 20;

inline bool huge_pages_enabled() {
  static const bool on = [] {
    const char* env = std::getenv("RRM_CUDA_HUGE_PAGES");
    return !(env && std::strcmp(env, "0") == 0);
  }();
  return on;
}

// Freed blocks kept for the next large output (one cache for both kinds of block, huge-page-advised
// and plain: a block of either kind may serve a request of the other, which changes speed only): a reused block is
// already faulted in, so the next call writes to it at memory speed instead of waiting for the kernel to zero fresh
// pages (the energy loss's input gradient is one such block per training step, freed by the step's backward before the
// next one asks). At most kCachedBlocks blocks, kCachedBytes in all; a request takes the smallest cached block that
// holds it and is at most twice its size. Leaked on purpose: tensors can be freed during static destruction, after a
// static cache would be gone.
struct BlockCache {
  static constexpr size_t kCachedBlocks = 6;
  static constexpr size_t kCachedBytes = size_t(1) << 30;
  struct Block {
    void* p;
    size_t n;
  };
  std::mutex mu;
  std::vector<Block> blocks;
  size_t bytes = 0;

  static BlockCache& get() {
    static BlockCache* cache = new BlockCache();
    return *cache;
  }
  // A cached block of at least n bytes (and at most 2 n), or {nullptr, 0}.
  Block take(size_t n) {
    std::lock_guard<std::mutex> lock(mu);
    size_t best = blocks.size();
    for (size_t i = 0; i < blocks.size(); ++i)
      if (blocks[i].n >= n && blocks[i].n <= 2 * n && (best == blocks.size() || blocks[i].n < blocks[best].n)) best = i;
    if (best == blocks.size()) return {nullptr, 0};
    const Block blk = blocks[best];
    blocks.erase(blocks.begin() + static_cast<std::ptrdiff_t>(best));
    bytes -= blk.n;
    return blk;
  }
  // Keeps the block if there is room, else frees it.
  void give(Block blk) {
    {
      std::lock_guard<std::mutex> lock(mu);
      if (blocks.size() < kCachedBlocks && bytes + blk.n <= kCachedBytes) {
        blocks.push_back(blk);
        bytes += blk.n;
        return;
      }
    }
    std::free(blk.p);
  }
};

template <bool kHuge>
struct HugePageAllocator final : c10::Allocator {
  static void release_nothing(void*) {}
  static void release(void* ctx) {
    auto* blk = static_cast<BlockCache::Block*>(ctx);
    BlockCache::get().give(*blk);
    delete blk;
  }

  c10::DataPtr allocate(size_t n) override {
    if (n == 0) return {nullptr, nullptr, &release_nothing, c10::Device(c10::DeviceType::CPU)};
    const size_t rounded = (n + kHugePage - 1) / kHugePage * kHugePage;  // whole huge pages: reusable blocks
    BlockCache::Block blk = BlockCache::get().take(rounded);
    if (blk.p == nullptr) {
      void* p = nullptr;
      TORCH_CHECK(posix_memalign(&p, kHugePage, rounded) == 0 && p != nullptr,
                  "rrm_cuda: out of host memory allocating ", n, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      if (kHuge) madvise(p, rounded, MADV_HUGEPAGE);  // advice: failure changes nothing
#endif
      blk = {p, rounded};
    }
    BlockCache::Block* ctx = nullptr;
    try {
      ctx = new BlockCache::Block{blk};  // (braces: nvcc in C++20 rejects the parentheses here)
    } catch (...) {
      std::free(blk.p);
      throw;
    }
    return {blk.p, ctx, &release, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }  // the context is not the data
  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }
};

template <bool kHuge>
inline HugePageAllocator<kHuge>* huge_page_allocator() {
  static auto* a = new HugePageAllocator<kHuge>();  // leaked, as BlockCache: storages outlive statics
  return a;
}

}  // namespace detail

// at::empty(sizes, options) for a CPU tensor of at least `min_bytes` (and huge pages on): from the
// block cache, on huge pages at 32 MiB or more (glibc's largest mmap threshold, where a fresh block
// is mapped on every call), in plain pages below (huge pages there measured slower: +20 ms for the
// (8, 21, 160^2) gradient of dense_energy, session 20). Below 32 MiB glibc's heap usually serves a
// freed block again, but not always: the energy loss's 17 MB outputs (its working-scale
// probabilities and gradient direction) were faulted in afresh on some calls and not others, 1-4k
// page faults per training step on the 2-core VM (session 21); from the cache they never are after
// the first. The tensor is an ordinary resizable CPU tensor (its storage keeps this allocator).
inline at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options,
                              size_t min_bytes = size_t(32) << 20) {
  if (options.device().is_cpu() && detail::huge_pages_enabled()) {
    size_t n = c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
    for (const int64_t s : sizes) n *= static_cast<size_t>(s);
    if (n >= min_bytes) {
      c10::Allocator* a = n >= (size_t(32) << 20) ? static_cast<c10::Allocator*>(detail::huge_page_allocator<true>())
                                                  : static_cast<c10::Allocator*>(detail::huge_page_allocator<false>());
      return at::detail::empty_generic(sizes, a, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                       c10::typeMetaToScalarType(options.dtype()), std::nullopt);
    }
  }
  return at::empty(sizes, options);
}

// The size from which the energy loss's CPU outputs come from the block cache.
constexpr size_t kCachedOutputBytes = size_t(8) << 20;

}  // namespace rrm
