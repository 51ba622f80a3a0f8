// Host-side algorithms of the permutohedral lattice, written once against an execution policy
// (common/exec.h, common/cuda_exec.cuh): building a batch of lattices, filtering with them, and the
// dense-CRF mean-field loop. Included by lattice_cpu.cpp (CpuExec, EmulatedCudaExec) and
// lattice_cuda.cu (CudaExec).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <limits>
#include <memory>
#include <numeric>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "common/exec.h"
#include "common/host_alloc.h"
#include "common/tuning.h"

#include "lattice/lattice_cache.h"
#include "lattice/lattice_common.h"
#include "lattice/simplex_avx2.h"

namespace rrm {
namespace lattice {

inline const int32_t* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<int32_t>() : nullptr; }

inline int64_t next_pow2(int64_t x) {
  int64_t p = 1;
  while (p < x) p <<= 1;
  return p;
}

// Workspace of a counted lattice (Lattice::counted) whose rows beyond the counts stay unwritten. The
// emulated launch fills it with NaN (floats) or 0 (integers: vertex 0 where a neighbour was meant),
// so that a test sees any read of those rows in the results.
template <class Exec>
at::Tensor counted_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  if constexpr (std::is_same_v<Exec, EmulatedCudaExec>) {
    if (at::isFloatingType(t.scalar_type()))
      t.fill_(std::numeric_limits<double>::quiet_NaN());
    else
      t.zero_();
  }
  return t;
}

// Inclusive sums along the rows of x (B, n) int32, whose sums over all rows stay below total_bound.
// at::cumsum along dim 1 of more than one row runs ATen's row kernel (one block of at most 512
// threads per row, walking it 1024 elements at a time with ten barriers each): at a counted
// lattice's chunk counts, rows of N (d + 1) + 1, that is ~150 rounds per row at 8 x 160^2 and
// ~1500 at 4 x 513^2, on B SMs. A single row takes cub's device-wide scan instead; so rows of at
// least knob flat_scan_min elements are scanned as one flat row, then each row less the sum of the
// rows before it (RowBaseFunctor). Shorter rows (the read-back lattices' M + 1) keep the row
// kernel: one launch instead of three.
template <class Exec>
at::Tensor row_cumsum(const Exec& exec, const at::Tensor& x, int64_t total_bound) {
  const int64_t B = x.size(0), n = x.size(1);
  if (B <= 1 || n < tuning::get(tuning::kFlatScanMin) || total_bound >= (int64_t(1) << 31))
    return at::cumsum(x, /*dim=*/1, /*dtype=*/at::kInt);
  const at::Tensor flat = at::cumsum(x.reshape({B * n}), /*dim=*/0, /*dtype=*/at::kInt);
  at::Tensor out = at::empty({B, n}, x.options().dtype(at::kInt));
  exec.for_each_item(B, n, 1, RowBaseFunctor{flat.data_ptr<int32_t>(), out.data_ptr<int32_t>(), n});
  return out;
}

template <class Exec>
void chunks_by_tile(const Exec& exec, Lattice& lat, int64_t tile, bool offsets = false);

// Chunks cut by tiles of P consecutive pixels (Lattice::chunk_tile; the tiled mean field): heads
// (TileChunkHeadFunctor), their scan, the chunk count, the chunk ranges and offsets, then the launch
// order by tile with each tile's first launch slot. The chunk tables are sized by the count read
// back (one synchronisation), or, for a counted lattice, by E, a bound (every chunk holds an entry),
// with each image's count left in device memory (Lattice::num_chunks). Unused chunks are empty and
// sort after every tile's (ChunkTileKeyFunctor), so launch slots [0, num_chunks[b]) are the chunks.
template <class Exec>
void tile_chunks(const Exec& exec, Lattice& lat, const at::Tensor& sorted_entries, int64_t P) {
  const int64_t B = lat.B, E = lat.E, M = lat.M;
  const auto iopt = lat.entry_vertex.options();
  auto heads = at::empty({B, E}, iopt);
  exec.for_each_item(B, E, 1,
                     TileChunkHeadFunctor{sorted_entries.data_ptr<int32_t>(), lat.entry_vertex.data_ptr<int32_t>(),
                                          lat.offsets.data_ptr<int32_t>(), lat.splat_pixel.data_ptr<int32_t>(),
                                          heads.data_ptr<int32_t>(), E, M, P});
  const at::Tensor numbers = row_cumsum(exec, heads, B * E);  // heads are 0 or 1
  if (lat.counted) {
    lat.K = E;
    lat.num_chunks = numbers.select(1, E - 1).contiguous();
  } else {
    lat.K = std::max<int64_t>(1, numbers.select(1, E - 1).max().item<int32_t>());
  }
  const at::Tensor chunk_be = at::zeros({3, B, lat.K}, iopt);
  lat.chunk_begin = chunk_be[0];
  lat.chunk_end = chunk_be[1];
  lat.chunk_vertex = chunk_be[2];
  int32_t* cb = chunk_be.data_ptr<int32_t>();
  exec.for_each_item(
      B, E, 1,
      TileChunkRangeFunctor{sorted_entries.data_ptr<int32_t>(), lat.entry_vertex.data_ptr<int32_t>(),
                            lat.offsets.data_ptr<int32_t>(), heads.data_ptr<int32_t>(), numbers.data_ptr<int32_t>(), cb,
                            cb + B * lat.K, cb + 2 * B * lat.K, E, M, lat.K});
  lat.chunk_offsets = at::empty({B, M + 1}, iopt);
  exec.for_each_item(
      B, M + 1, 1,
      TileChunkOffsetsFunctor{lat.offsets.data_ptr<int32_t>(), numbers.data_ptr<int32_t>(),
                              lat.num_vertices.data_ptr<int32_t>(), lat.chunk_offsets.data_ptr<int32_t>(), E, M});
  lat.chunk_tile = P;
  chunks_by_tile(exec, lat, P, /*offsets=*/true);
  const int64_t ntiles = (lat.N + P - 1) / P;
  lat.tile_entry_local = at::empty({B, E}, iopt);
  exec.for_each_item(B, lat.K, 1,
                     TileEntryLocalFunctor{sorted_entries.data_ptr<int32_t>(), lat.chunk_begin.data_ptr<int32_t>(),
                                           lat.chunk_end.data_ptr<int32_t>(), lat.splat_pixel.data_ptr<int32_t>(),
                                           lat.tile_offsets.data_ptr<int32_t>(),
                                           lat.tile_entry_local.data_ptr<int32_t>(), E, lat.K, P, ntiles});
}

// Splat lists with device-friendly primitives (CUDA, emulated): order by a *stable* sort of
// (image, vertex) keys, so that the entries of a vertex also come out in increasing order and the
// splat sums are deterministic; list bounds by binary searches of the sorted keys; chunk offsets by
// one scan. Few ATen calls (each one costs host time on a GPU): the keys, the bounds, the chunk
// counts and the lists from the sort's permutation are functors.
// The neighbour launch of a build of one chunk (read back), left to ride with the sort keys' launch
// (splat_lists_sorted): the buffers it reads, kept until then, and its items per image.
struct PendingNeighbors {
  NeighborFunctor f;
  int64_t n;
  at::Tensor table, keys, owner;
};

template <class Exec>
void splat_lists_sorted(const Exec& exec, Lattice& lat, int64_t chunk_tile = 0,
                        const PendingNeighbors* nbrs = nullptr) {
  const int64_t B = lat.B, E = lat.E, M = lat.M;
  const auto iopt = lat.entry_vertex.options();
  // Sort the entries by (image, vertex), carrying each entry's index -- keys in 32 bits when they
  // fit, and on CUDA a radix sort over their significant bits only (exec.sort_pairs: 2 passes for a
  // 512x512 image's lattice, where at::sort takes 4, moving 4-byte values) -- then every list bound
  // by a binary search of the sorted keys.
  // Chunks: ceil(n_v / S) per vertex at column 1 + v and 0 at column 0, written with the list
  // bounds (ListOffsetsFunctor), then scanned into offsets.
  // A counted lattice: every launch over its vertices (chunks) runs over the counts in device
  // memory; the chunk counts come out of the chunk ranges' launch, into the tail of nchunks'
  // allocation (zeroed: the scan reads all M + 1 columns).
  // The zeros (nchunks_all; the read-back lattice's chunk tables) are filled by the sort keys'
  // launch's threads, not by fill launches of their own.
  const bool counted = lat.counted;
  FillList fills;
  const at::Tensor nchunks_all = counted ? at::empty({B * (M + 1) + B}, iopt) : at::Tensor();
  if (counted) fills.add(nchunks_all, 0);
  const at::Tensor nchunks =
      counted ? nchunks_all.narrow(0, 0, B * (M + 1)).view({B, M + 1}) : at::empty({B, M + 1}, iopt);
  // Chunks (untiled): sum_v ceil(n_v / S) <= E / S + M bounds every image's count without a host sync.
  // Unused chunks stay empty: [0, 0), no vertex (a counted lattice's are never launched: unwritten).
  const int64_t K = (E + kSplatChunk - 1) / kSplatChunk + M;
  at::Tensor chunk_be;
  if (chunk_tile == 0) {
    chunk_be = counted ? counted_empty<Exec>({3, B, K}, iopt) : at::empty({3, B, K}, iopt);
    if (!counted) fills.add(chunk_be, 0);
  }
  auto over_vertices = [&](int64_t add, const auto& f) {  // f(b, v) for v < M + add (counted: num_vertices[b] + add)
    if (counted)
      exec.for_each_counted(B, lat.num_vertices.data_ptr<int32_t>(), add, M + add, 1, f);
    else
      exec.for_each_item(B, M + add, 1, f);
  };
  auto sort_and_bound = [&](auto key_zero) -> at::Tensor {
    using key_t = decltype(key_zero);
    const at::Tensor keys = at::empty({B * E}, iopt.dtype(c10::CppTypeToScalarType<key_t>::value));
    const at::Tensor entries = at::empty({B * E}, iopt);
    const SortKeyFunctor<key_t> sort_keys{lat.entry_vertex.data_ptr<int32_t>(), keys.data_ptr<key_t>(),
                                          entries.data_ptr<int32_t>(), E, M};
    if (nbrs) {  // the build's neighbour launch too (independent: it writes lat.neighbors only)
      for_each_item_filling(exec, B, std::max(E, nbrs->n), 1,
                            ItemPair<SortKeyFunctor<key_t>, NeighborFunctor>{sort_keys, nbrs->f, E, nbrs->n}, fills,
                            1024);
    } else {
      for_each_item_filling(exec, B, E, 1, sort_keys, fills, 1024);
    }
    at::Tensor sorted, sorted_entries;
    std::tie(sorted, sorted_entries) = exec.sort_pairs(keys, entries, B * M - 1);                 // keys b M + v < B M
    lat.offsets = counted ? counted_empty<Exec>({B, M + 1}, iopt) : at::empty({B, M + 1}, iopt);  // < E < 2^30
    const ListOffsetsFunctor<key_t> bounds{sorted.data_ptr<key_t>(), lat.offsets.data_ptr<int32_t>(), E, M,
                                           nchunks.data_ptr<int32_t>()};
    AT_DISPATCH_FLOATING_TYPES(lat.entry_weight.scalar_type(), "rrm_splat_lists", [&] {
      const SplatListFunctor<scalar_t> lists{sorted_entries.data_ptr<int32_t>(),
                                             lat.entry_weight.data_ptr<scalar_t>(),
                                             lat.splat_pixel.data_ptr<int32_t>(),
                                             lat.splat_weight.data_ptr<scalar_t>(),
                                             E,
                                             lat.d};
      if (counted) {
        over_vertices(1, bounds);
        exec.for_each_item(B, E, 1, lists);
      } else {  // one launch for both (independent)
        exec.for_each_item(B, std::max(M + 1, E), 1,
                           ItemPair<ListOffsetsFunctor<key_t>, SplatListFunctor<scalar_t>>{bounds, lists, M + 1, E});
      }
    });
    return sorted_entries;
  };
  lat.splat_pixel = at::empty({B, E}, iopt);
  lat.splat_weight = at::empty({B, E}, lat.entry_weight.options());
  const at::Tensor sorted_entries =
      B * M < (int64_t(1) << 31) ? sort_and_bound(int32_t{0}) : sort_and_bound(int64_t{0});
  if (chunk_tile > 0) return tile_chunks(exec, lat, sorted_entries, chunk_tile);
  lat.K = K;
  lat.chunk_offsets = row_cumsum(exec, nchunks, B * lat.K);
  lat.chunk_begin = chunk_be[0];
  lat.chunk_end = chunk_be[1];
  lat.chunk_vertex = chunk_be[2];
  int32_t* cb = chunk_be.data_ptr<int32_t>();
  ChunkRangeFunctor ranges{lat.offsets.data_ptr<int32_t>(),
                           lat.chunk_offsets.data_ptr<int32_t>(),
                           lat.num_vertices.data_ptr<int32_t>(),
                           cb,
                           cb + B * lat.K,
                           M,
                           lat.K,
                           cb + 2 * B * lat.K};
  if (counted) {
    lat.num_chunks = nchunks_all.narrow(0, B * (M + 1), B);
    ranges.num_chunks = lat.num_chunks.data_ptr<int32_t>();
  }
  over_vertices(0, ranges);
  const int64_t tile = counted ? 0 : tuning::get(tuning::kSplatTile);  // counted: vertex order
  if (tile > 0) chunks_by_tile(exec, lat, tile);
}

// Launch order of the chunks: by the tile of their first pixel (ChunkTileKeyFunctor), a stable
// sort of (image, tile) keys over their significant bits, then the tables permuted. With
// offsets = true also lat.tile_offsets, each tile's first launch slot (from the sorted keys).
template <class Exec>
void chunks_by_tile(const Exec& exec, Lattice& lat, int64_t tile, bool offsets) {
  const int64_t B = lat.B, E = lat.E;
  const auto iopt = lat.entry_vertex.options();
  const int64_t K = lat.K, ntiles = (lat.N + tile - 1) / tile;
  auto tile_order = [&](auto key_zero) -> at::Tensor {
    using key_t = decltype(key_zero);
    const at::Tensor keys = at::empty({B * K}, iopt.dtype(c10::CppTypeToScalarType<key_t>::value));
    const at::Tensor chunks = at::empty({B * K}, iopt);
    exec.for_each_item(
        B, K, 1,
        ChunkTileKeyFunctor<key_t>{lat.chunk_begin.data_ptr<int32_t>(), lat.chunk_end.data_ptr<int32_t>(),
                                   lat.splat_pixel.data_ptr<int32_t>(), keys.data_ptr<key_t>(),
                                   chunks.data_ptr<int32_t>(), E, K, tile, ntiles});
    at::Tensor sorted, order;
    std::tie(sorted, order) = exec.sort_pairs(keys, chunks, B * (ntiles + 1) - 1);
    if (offsets) {  // keys b (ntiles + 1) + j: ListOffsetsFunctor's b M + v with M = ntiles + 1
      lat.tile_offsets = at::empty({B, ntiles + 2}, iopt);
      exec.for_each_item(
          B, ntiles + 2, 1,
          ListOffsetsFunctor<key_t>{sorted.data_ptr<key_t>(), lat.tile_offsets.data_ptr<int32_t>(), K, ntiles + 1});
    }
    return order;
  };
  const at::Tensor corder = B * (ntiles + 1) < (int64_t(1) << 31) ? tile_order(int32_t{0}) : tile_order(int64_t{0});
  auto tables = at::empty({3, B, K}, iopt);
  int32_t* tb = tables.data_ptr<int32_t>();
  exec.for_each_item(B, K, 1,
                     ChunkPermuteFunctor{corder.data_ptr<int32_t>(), lat.chunk_begin.data_ptr<int32_t>(),
                                         lat.chunk_end.data_ptr<int32_t>(), tb, tb + B * K, tb + 2 * B * K, K});
  lat.chunk_begin = tables[0];
  lat.chunk_end = tables[1];
  lat.chunk_slot = tables[2];
}

// CPU vertex numbering (AssignFunctor's job): owner entries take ids in increasing entry order, as
// a serial AssignFunctor would, whatever the thread count -- a count of the owners per chunk of
// entries, a scan, then the ids. With AssignFunctor's shared counter, two threads walking the two
// halves of an image interleave the ids of its top and bottom vertices, which spreads each thread's
// splat and slice rows over twice as many cache lines in the mean-field loop (and bounces the
// counter's cache line between the cores).
inline void assign_vertices_cpu(const int32_t* table, const int32_t* entry_slot, int32_t* entry_vertex,
                                int32_t* vertex_owner, int32_t* num_vertices, int64_t nb, int64_t E, int64_t cap) {
  constexpr int64_t kSpan = 16384;  // entries per chunk
  const int64_t nch = (E + kSpan - 1) / kSpan;
  std::vector<int32_t> first(nb * nch);
  auto owns = [&](int64_t b, int64_t e) {
    const int32_t s = entry_slot[b * E + e];  // < 0: the table overflowed, the host rebuilds it
    return s >= 0 && table[b * cap + s] == static_cast<int32_t>(e);
  };
  at::parallel_for(0, nb * nch, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t b = k / nch, e0 = k % nch * kSpan, e1 = std::min(E, e0 + kSpan);
      int32_t n = 0;
      for (int64_t e = e0; e < e1; ++e) n += owns(b, e);
      first[k] = n;
    }
  });
  for (int64_t b = 0; b < nb; ++b) {
    int32_t run = 0;
    for (int64_t c = 0; c < nch; ++c) {
      const int32_t n = first[b * nch + c];
      first[b * nch + c] = run;
      run += n;
    }
    num_vertices[b] = run;
  }
  at::parallel_for(0, nb * nch, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t b = k / nch, e0 = k % nch * kSpan, e1 = std::min(E, e0 + kSpan);
      int32_t v = first[k];
      for (int64_t e = e0; e < e1; ++e) {
        if (!owns(b, e)) continue;
        entry_vertex[b * E + e] = v;
        vertex_owner[b * E + v] = static_cast<int32_t>(e);
        ++v;
      }
    }
  });
}

// f(std::integral_constant<int, D>{}) for the D among Ds equal to d, else f(std::integral_constant<int, 0>{})
// (the kernels' compile-time d: loops unrolled for the feature dimensions the ops use most).
template <int... Ds, class F>
void with_fixed_d(int d, const F& f) {
  if (!((d == Ds ? (f(std::integral_constant<int, Ds>{}), true) : false) || ...)) f(std::integral_constant<int, 0>{});
}

// The vertices of one image's lattice on the host (the CPU build): keys stored once per vertex, in
// order of first appearance, and an open-addressing table of their ids (linear probing, at most
// half full; grown 4x and refilled in id order, so the ids never change).
template <int kD>
class HostVertices {
 public:
  // Initial slots: 2 per pixel up to 2^19 (2 MiB of ids). The lattices have far fewer vertices than
  // pixels (1-15 %), but the probes are faster in a sparser table: 2-core VM, 2 slots per pixel
  // instead of 1: 8 x 160^2 energy-loss lattices 9.2 -> 8.7 ms, the 512^2 position lattice 4.2 ->
  // 3.9 ms (one thread); beyond 2^19 (4 x 513^2) 2-3 % slower, and 2^15 slots 6-40 % slower.
  static constexpr int64_t kMaxInitialSlots = int64_t(1) << 19;
  HostVertices(int d, int64_t pixels)
      : d_(kD > 0 ? kD : d), cap_(next_pow2(std::max<int64_t>(64, std::min<int64_t>(2 * pixels, kMaxInitialSlots)))) {
    vkeys_.reserve(static_cast<size_t>(std::max<int64_t>(64, pixels / 4) * d));
    table_.assign(static_cast<size_t>(cap_), -1);
  }
  int d() const { return d_; }
  int64_t size() const { return M_; }
  const int32_t* key(int64_t v) const { return vkeys_.data() + v * d_; }
  // The id of key (hash: hash_key(key)), or -1 where it is not a vertex.
  int32_t find(const int32_t* key, uint32_t hash) const { return table_[slot(key, hash)]; }
  // The id of key, the next new one where it is new.
  int32_t insert(const int32_t* key, uint32_t hash) {
    const int64_t s = slot(key, hash);
    if (table_[s] >= 0) return table_[s];
    TORCH_CHECK(M_ < std::numeric_limits<int32_t>::max(), "rrm_cuda: lattice too large");
    const auto id = static_cast<int32_t>(M_++);
    table_[s] = id;
    vkeys_.insert(vkeys_.end(), key, key + d_);
    if (2 * M_ > cap_) {
      cap_ *= 4;
      table_.assign(static_cast<size_t>(cap_), -1);
      for (int64_t v = 0; v < M_; ++v) table_[slot(this->key(v), hash_key(this->key(v), d_))] = static_cast<int32_t>(v);
    }
    return id;
  }

 private:
  int64_t slot(const int32_t* key, uint32_t hash) const {  // key's slot, or the free one where it would go
    int64_t s = hash & (cap_ - 1);
    for (;;) {
      const int32_t id = table_[s];
      if (id < 0 || same_key(vkeys_.data() + static_cast<int64_t>(id) * d_, key)) return s;
      s = (s + 1) & (cap_ - 1);
    }
  }
  bool same_key(const int32_t* a, const int32_t* b) const {  // fixed d: one branch, not d
    if constexpr (kD > 0) {
      int32_t diff = 0;
      for (int k = 0; k < kD; ++k) diff |= a[k] ^ b[k];
      return diff == 0;
    } else {
      return keys_equal(a, b, d_);
    }
  }
  int d_;
  int64_t cap_, M_ = 0;
  std::vector<int32_t> vkeys_;  // (M, d)
  std::vector<int32_t> table_;  // cap slots: a vertex id or -1
};

// Pixels [i0, i1) of image b into vt, serially on the calling thread: each pixel's simplex
// (EmbedFunctor::corners, the same keys and weights as the embed launch) and, corner by corner, a
// lookup-or-insert. entry_vertex, entry_weight: the image's (E,) rows; the ids written are vt's.
template <typename scalar_t, int kD>
void insert_pixels(const EmbedFunctor<scalar_t, kD>& f, int64_t b, int64_t i0, int64_t i1, int32_t* entry_vertex,
                   scalar_t* entry_weight, HostVertices<kD>& vt) {
  const int d = kD > 0 ? kD : f.d_runtime;
  cpu_run([&] {  // (vector growth allocates; the table lookups and the simplex are inline)
    int64_t i = i0;
#if defined(RRM_SIMPLEX_AVX2)
    // float with d fixed, on a processor with AVX2: the simplices of 8 pixels at a time (the same
    // keys, hashes and weights as corners(), so the same lattice), then their corners in order.
    if constexpr (std::is_same_v<scalar_t, float> && kD > 0) {
      if (cpu_has_avx2()) {
        Simplex8<kD> s8;
        int32_t key[kD];
        for (; i + 8 <= i1; i += 8) {
          simplex8(f, b, i, s8);
          for (int l = 0; l < 8; ++l) {
            for (int r = 0; r <= kD; ++r) {
              for (int k = 0; k < kD; ++k) key[k] = s8.key[r][k][l];
              entry_vertex[(i + l) * (kD + 1) + r] = vt.insert(key, s8.hash[r][l]);
              entry_weight[(i + l) * (kD + 1) + r] = s8.weight[r][l];
            }
          }
        }
      }
    }
#endif
    int32_t keys[(kMaxDim + 1) * kMaxDim];
    scalar_t w[kMaxDim + 1];
    for (; i < i1; ++i) {
      f.corners(b, i, keys, w);
      for (int r = 0; r <= d; ++r) {
        entry_vertex[i * (d + 1) + r] = vt.insert(keys + r * d, hash_key(keys + r * d, d));
        entry_weight[i * (d + 1) + r] = w[r];
      }
    }
  });
}

// Blur neighbours of vertices [v0, v1) of vt into out (d + 1, M, 2), whose entries must be -1
// beforehand. Along axis j, n2 of v (key + 1 with coordinate j - d: neighbor_keys) is u exactly when
// n1 of u is v, so each pair is looked up once, from its lower side: v writes its own n2 and u's n1
// (u may lie outside [v0, v1): ranges on several threads write disjoint words). The neighbour's hash
// comes from v's linear hash plus the axis's constant step (hash_linear).
template <int kD>
void host_neighbors(const HostVertices<kD>& vt, int32_t* out, int64_t v0, int64_t v1) {
  const int d = kD > 0 ? kD : vt.d();
  const int64_t M = vt.size();
  uint32_t coef[kMaxDim], step[kMaxDim + 1], all = 0, pw = kHashPrime;
  for (int i = d - 1; i >= 0; --i, pw *= kHashPrime) {  // key[i]'s factor in hash_linear: P^(d - i)
    coef[i] = pw;
    all += pw;
  }
  for (int j = 0; j < d; ++j) step[j] = all - static_cast<uint32_t>(d + 1) * coef[j];
  step[d] = all;
  int32_t n2[kMaxDim];
  for (int64_t v = v0; v < v1; ++v) {
    const int32_t* key = vt.key(v);
    const uint32_t lin = hash_linear(key, d);
    for (int j = 0; j <= d; ++j) {
      for (int k = 0; k < d; ++k) n2[k] = key[k] + 1;
      if (j < d) n2[j] = key[j] - d;
      const int32_t u = vt.find(n2, hash_mix(lin + step[j]));
      out[(j * M + v) * 2 + 1] = u;
      if (u >= 0) out[(j * M + u) * 2] = static_cast<int32_t>(v);
    }
  }
}

// Pixels per part below which an image's CPU build stays on one thread (build_image_cpu).
constexpr int64_t kMinBuildPart = 8192;

// The CPU's lattice of image b in one pass over the pixels instead of five launches over the
// (d + 1) N entries (embed, insert, assign, resolve; an E x d key array written and read back). Its
// vertices are numbered by the entries' order of first appearance (the launches number them by the
// entries that won their slots, which is that order on one thread only). parts (1 to N /
// kMinBuildPart, build() picks it): the pixels cut into that many consecutive ranges, each built
// into a table of its own on a thread of its own; then, in range order, each range's vertices
// looked up or added in the first range's table (so every vertex keeps its first appearance over
// the whole image) and its entries renumbered; then the neighbours, vertices across threads. The
// same lattice, bit for bit, for any parts. entry_vertex, entry_weight: the image's (E,) rows.
// Returns the vertex count; nbr: (1, d + 1, M, 2) neighbours (-1: none), as NeighborFunctor.
template <typename scalar_t, int kD>
int64_t build_image_cpu(const EmbedFunctor<scalar_t, kD>& f, int64_t b, int32_t* entry_vertex, scalar_t* entry_weight,
                        at::Tensor& nbr, const at::TensorOptions& iopt, int64_t parts) {
  const int d = kD > 0 ? kD : f.d_runtime;
  const int64_t N = f.N;
  TORCH_INTERNAL_ASSERT(parts == 1 || (parts > 1 && parts <= N / kMinBuildPart));
  auto lo = [&](int64_t p) { return N * p / parts; };
  std::vector<std::unique_ptr<HostVertices<kD>>> vts(static_cast<size_t>(parts));  // made on their threads
  auto range = [&](int64_t p) {
    vts[p] = std::make_unique<HostVertices<kD>>(d, lo(p + 1) - lo(p));
    insert_pixels(f, b, lo(p), lo(p + 1), entry_vertex, entry_weight, *vts[p]);
  };
  if (parts == 1) {
    range(0);
  } else {
    at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) range(p);
    });
    std::vector<std::vector<int32_t>> ids(static_cast<size_t>(parts));  // part's id -> the image's
    for (int64_t p = 1; p < parts; ++p) {
      const HostVertices<kD>& part = *vts[p];
      ids[p].resize(static_cast<size_t>(part.size()));
      for (int64_t v = 0; v < part.size(); ++v) ids[p][v] = vts[0]->insert(part.key(v), hash_key(part.key(v), d));
    }
    at::parallel_for(1, parts, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p)
        for (int64_t e = lo(p) * (d + 1); e < lo(p + 1) * (d + 1); ++e) entry_vertex[e] = ids[p][entry_vertex[e]];
    });
  }
  const HostVertices<kD>& vt = *vts[0];
  const int64_t M = vt.size();
  nbr = at::full({1, d + 1, M, 2}, -1, iopt);
  int32_t* out = nbr.data_ptr<int32_t>();
  if (parts == 1)
    cpu_run([&] { host_neighbors(vt, out, 0, M); });
  else
    at::parallel_for(0, M, 1024, [&](int64_t v0, int64_t v1) { cpu_run([&] { host_neighbors(vt, out, v0, v1); }); });
  return M;
}

// Whether an op on `exec` builds a counted lattice (build(..., counted = true)) for B images of N
// points in d dimensions built `chunk` at a time, with `row_bytes` bytes of its own per vertex (its
// lattice rows: channels x dtype size x buffers): always inside a CUDA graph capture (the
// alternative is an error), and by knob counted_lattice while the workspace, its rows and the
// lattice's tables for N (d+1) vertices per image, stays within kCountedBudget.
constexpr int64_t kCountedBudget = int64_t(1) << 30;  // 1 GiB: the energy loss at 8 x 21 x 160^2 takes 0.45-0.8
template <class Exec>
bool use_counted(const Exec& exec, int64_t B, int64_t chunk, int64_t N, int64_t d, int64_t row_bytes) {
  if (!Exec::kSortCsr || chunk < B) return false;
  if (exec.capturing()) return true;
  const int64_t E = N * (d + 1);
  return tuning::get(tuning::kCountedLattice) != 0 && B * E * (row_bytes + 4 * (2 * (d + 1) + 8)) <= kCountedBudget;
}

// Builds the lattices of a batch. features: (B, d, N) contiguous, float or double.
// Images are processed `chunk` at a time (the hash tables and keys of a chunk are workspace).
// counted (the sorted-list policies, whole batch in one chunk): no host read of the vertex counts,
// so that the host never waits for the GPU here and the build can be captured in a CUDA graph. The
// hash table then has room for every entry (2 E slots: it cannot overflow), M = E is a capacity,
// and the lattice is a counted one (Lattice::counted).
template <class Exec>
Lattice build(const Exec& exec, const at::Tensor& features, int64_t chunk, bool counted = false,
              int64_t chunk_tile = 0) {
  TORCH_INTERNAL_ASSERT(!counted || (Exec::kSortCsr && chunk >= features.size(0)),
                        "a counted lattice needs the sorted lists and the whole batch in one chunk");
  TORCH_CHECK(counted || !exec.capturing(),
              "rrm_cuda: this op builds a permutohedral lattice whose size it reads back to the host, which a CUDA "
              "graph capture does not allow (dense_energy, permutohedral_filter and dense_crf build lattices that "
              "can be captured; lattice_num_vertices cannot). Run it outside the captured region.");
  Lattice lat;
  lat.counted = counted;
  note_build();
  if (counted) note_counted_build();
  lat.B = features.size(0);
  lat.d = static_cast<int>(features.size(1));
  lat.N = features.size(2);
  lat.E = lat.N * (lat.d + 1);
  const int d = lat.d;
  const int64_t B = lat.B, N = lat.N, E = lat.E;
  const auto iopt = features.options().dtype(at::kInt);
  lat.entry_vertex = at::empty({B, E}, iopt);
  lat.entry_weight = at::empty({B, E}, features.options());
  lat.num_vertices = at::empty({B}, iopt);  // zeroed by each chunk's embed launch (or set by the CPU's build)
  chunk = std::max<int64_t>(1, std::min(chunk, B));
  std::vector<at::Tensor> nbr_chunks;
  std::vector<int64_t> chunk_m;
  std::optional<PendingNeighbors> pending_nbrs;

  // The CPU builds each image in one pass (build_image_cpu). At least as many images as threads (one
  // thread: any batch), or inside a parallel region (the energy loss's images across threads): an
  // image per thread. Fewer images than threads: one image after another, its pixels cut into a
  // range per thread (at least kMinBuildPart pixels each; images too small for two ranges take a
  // thread each instead). Knob cpu_build_passes = 1 (tests): fewer images than threads take the
  // launches instead, every thread on each pass over one image.
  int64_t parts = 0;  // pixel ranges per image; 0: the launches
  if constexpr (std::is_same_v<Exec, CpuExec>) {
    const int64_t threads = at::get_num_threads();
    if (B >= threads || at::in_parallel_region())
      parts = 1;
    else if (tuning::get(tuning::kCpuBuildPasses) == 0)
      parts = std::max<int64_t>(1, std::min(threads, N / kMinBuildPart));
  }

  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "rrm_lattice_build", [&] {
    EmbedFunctor<scalar_t> proto{};  // the per-feature scales, passed to the kernels by value
    for (int k = 0; k < d; ++k) proto.scale[k] = static_cast<scalar_t>(feature_scale(k, d));
    if constexpr (std::is_same_v<Exec, CpuExec>) {  // (no host copy of it in the CUDA build)
      if (parts > 0) {
        nbr_chunks.resize(B);
        chunk_m.resize(B);
        auto images = [&](auto fixed_d) {
          EmbedFunctor<scalar_t, decltype(fixed_d)::value> f{};
          f.features = features.data_ptr<scalar_t>();
          for (int k = 0; k < d; ++k) f.scale[k] = proto.scale[k];
          f.N = N;
          f.d_runtime = d;
          int32_t* ev = lat.entry_vertex.data_ptr<int32_t>();
          scalar_t* ew = lat.entry_weight.data_ptr<scalar_t>();
          int32_t* nv = lat.num_vertices.data_ptr<int32_t>();
          auto one = [&](int64_t b) {
            chunk_m[b] = build_image_cpu(f, b, ev + b * E, ew + b * E, nbr_chunks[b], iopt, parts);
            nv[b] = static_cast<int32_t>(chunk_m[b]);
          };
          if (parts > 1) {
            for (int64_t b = 0; b < B; ++b) one(b);
            return;
          }
          std::atomic<int64_t> next{0};  // threads take the next image as they finish one
          at::parallel_for(0, B, 1, [&](int64_t, int64_t) {
            for (int64_t b = next++; b < B; b = next++) one(b);
          });
        };
        with_fixed_d<2, 3, 5>(d, images);
        return;
      }
    }
    for (int64_t b0 = 0; b0 < B; b0 += chunk) {
      const int64_t nb = std::min(chunk, B - b0);
      auto keys = at::empty({nb, E, d}, iopt);
      auto slot = at::empty({nb, E}, iopt);
      auto owner = at::empty({nb, E}, iopt);
      int32_t* ev = lat.entry_vertex.data_ptr<int32_t>() + b0 * E;
      int32_t* nv = lat.num_vertices.data_ptr<int32_t>() + b0;
      auto nv_chunk = lat.num_vertices.narrow(0, b0, nb);
      // Hash table sized for ~E/16 distinct points (typical occupancy is 1-15 %, SPEC §1), so that it
      // stays in cache; grown 8x and rebuilt if an image has more. A size that can hold every
      // entry (2E slots) always succeeds. Vertex ids are assigned before the overflow flags are
      // read, so that one host synchronisation (on CUDA) reads both the flags and the vertex count
      // that sizes everything that follows; after an overflow the ids are discarded.
      int64_t cap = counted ? next_pow2(std::max<int64_t>(64, 2 * E)) : next_pow2(std::max<int64_t>(64, E / 8));
      // The insert's claim counters (InsertFunctor): none for a table of 2E slots, else S per image,
      // S = min(knob insert_shards, cap / 1024) (a power of two), so that each counter's share stays
      // large next to its chance deviations. Knob 0: one counter on every table (before session 25).
      const int64_t max_shards = tuning::get(tuning::kInsertShards);
      const int64_t per = kInsertCounterStride;
      bool whole = false;
      int64_t shards = 1;
      auto layout = [&] {  // for the current cap
        whole = max_shards > 0 && cap >= 2 * E;
        shards = 1;
        while (!whole && shards * 2 <= std::min<int64_t>(max_shards, cap / 1024)) shards *= 2;
        // overflow flags (nb), BuildStatsFunctor's (any overflow, max M), then the claim counters
        return nb + 2 + (whole ? 0 : nb * shards * per);
      };
      // The first table (-1), its counters and the chunk's vertex counts (0) are filled by the embed
      // launch's threads (no fill launches); a rebuilt table's by ATen.
      at::Tensor table = at::empty({nb, cap}, iopt);
      at::Tensor counters = at::empty({layout()}, iopt);
      FillList fills;
      fills.add(table, -1);
      fills.add(counters, 0);
      fills.add(nv_chunk, 0);
      auto embed = [&](auto fixed_d) {
        EmbedFunctor<scalar_t, decltype(fixed_d)::value> f{};
        f.features = features.data_ptr<scalar_t>() + b0 * d * N;
        f.keys = keys.data_ptr<int32_t>();
        f.weights = lat.entry_weight.data_ptr<scalar_t>() + b0 * E;
        for (int k = 0; k < d; ++k) f.scale[k] = proto.scale[k];
        f.N = N;
        f.d_runtime = d;
        for_each_item_filling(exec, nb, N, d + 1, f, fills, 256);  // items (pixel, corner)
      };
      with_fixed_d<2, 3, 5>(d, embed);  // the dense CRF's kernels (d = 2: positions, 5: positions + RGB), and 3
      // The GPU launch's thread order of the insert (knob insert_corner_major); the CPU keeps entry
      // order (its vertex numbering follows the claiming entries, assign_vertices_cpu).
      const bool corner_major = !std::is_same_v<Exec, CpuExec> && tuning::get(tuning::kInsertCornerMajor) != 0;
      int64_t M = 0;
      for (bool first = true;; first = false) {
        if (!first) {
          table = at::full({nb, cap}, -1, iopt);
          counters = at::zeros({layout()}, iopt);
        }
        int32_t* cnt = counters.data_ptr<int32_t>();
        exec.for_each_item(nb, E, 1,
                           InsertFunctor{table.data_ptr<int32_t>(), slot.data_ptr<int32_t>(),
                                         whole ? nullptr : cnt + nb + 2, cnt, keys.data_ptr<int32_t>(), E, cap, d,
                                         corner_major ? N : 0, shards, shards == 1 ? cap / 2 : 3 * (cap / shards) / 4});
        if constexpr (std::is_same_v<Exec, CpuExec>) {
          assign_vertices_cpu(table.data_ptr<int32_t>(), slot.data_ptr<int32_t>(), ev, owner.data_ptr<int32_t>(), nv,
                              nb, E, cap);
        } else {
          exec.for_each_item(nb, E, 1,
                             AssignFunctor{table.data_ptr<int32_t>(), slot.data_ptr<int32_t>(), ev,
                                           owner.data_ptr<int32_t>(), nv, E, cap});
        }
        const ResolveFunctor resolve{table.data_ptr<int32_t>(), slot.data_ptr<int32_t>(), ev, E, cap};
        if (counted) {  // 2 E slots hold every entry: no overflow, and M is the capacity E
          exec.for_each_item(nb, E, 1, resolve);
          M = E;
          break;
        }
        // The overflow flags and the largest vertex count (final once the assign launch is done), by
        // the first thread of the resolve launch.
        const BuildStatsFunctor stats_f{cnt, nv, cnt + nb, nb, cap / 2};
        if (E > 0) {
          exec.for_each_item(nb, E, 1, WithFirst<ResolveFunctor, BuildStatsFunctor>{resolve, stats_f});
        } else {
          exec.for_each(1, stats_f, 1);
        }
        const at::Tensor stats = counters.narrow(0, nb, 2).cpu();
        const int32_t* st = stats.data_ptr<int32_t>();
        M = st[1];
        if (cap >= 2 * E || st[0] == 0) break;
        note_table_retry();
        cap = std::min(next_pow2(2 * E), cap * 8);
        nv_chunk.zero_();
      }
      at::Tensor nbr = counted ? counted_empty<Exec>({nb, d + 1, M, 2}, iopt) : at::empty({nb, d + 1, M, 2}, iopt);
      const NeighborFunctor nf{table.data_ptr<int32_t>(),
                               keys.data_ptr<int32_t>(),
                               ev,
                               owner.data_ptr<int32_t>(),
                               nv,
                               nbr.data_ptr<int32_t>(),
                               E,
                               cap,
                               M,
                               d};
      if (counted)
        exec.for_each_counted(nb, nv, 0, M, d + 1, NeighborAxesFunctor{nf}, 256);
      else if (Exec::kSortCsr && nb == B)  // one chunk: launched with the sort keys (splat_lists_sorted)
        pending_nbrs = PendingNeighbors{nf, (d + 1) * M, table, keys, owner};
      else
        exec.for_each_item(nb, (d + 1) * M, 1, nf, 256);
      nbr_chunks.push_back(nbr);
      chunk_m.push_back(M);
    }
  });
  lat.M = *std::max_element(chunk_m.begin(), chunk_m.end());
  if (nbr_chunks.size() == 1) {
    lat.neighbors = nbr_chunks[0];
  } else {
    for (auto& t : nbr_chunks)
      if (t.size(2) < lat.M) t = at::constant_pad_nd(t, {0, 0, 0, lat.M - t.size(2)}, -1);
    lat.neighbors = at::cat(nbr_chunks, 0);
  }
  // Splat lists for the gather splat of CUDA (and its emulation). The CPU splats by scatter
  // (splat_scatter_cpu) and needs none, which saves a sort and three (B, E) arrays per build.
  if constexpr (Exec::kSortCsr) splat_lists_sorted(exec, lat, chunk_tile, pending_nbrs ? &*pending_nbrs : nullptr);
  return lat;
}

// For tests (op _lattice_tables): the lattices of features (B, d, N), built `chunk` images at a time:
// entry vertices and weights (B, N, d + 1) and neighbours (B, d + 1, M, 2), M the largest vertex
// count (an image's rows beyond its own count: -1).
template <class Exec>
std::tuple<at::Tensor, at::Tensor, at::Tensor> lattice_tables(const Exec& exec, const at::Tensor& features,
                                                              int64_t chunk) {
  const int64_t B = features.size(0), d = features.size(1), N = features.size(2);
  if (B == 0 || N == 0)
    return {at::empty({B, N, d + 1}, features.options().dtype(at::kInt)), at::empty({B, N, d + 1}, features.options()),
            at::empty({B, d + 1, 0, 2}, features.options().dtype(at::kInt))};
  const Lattice lat = build(exec, features.contiguous(), chunk);
  return {lat.entry_vertex.view({B, N, d + 1}), lat.entry_weight.view({B, N, d + 1}), lat.neighbors};
}

// Work buffers of one filter call, reusable across calls on the same lattice and channel count.
struct FilterWorkspace {
  at::Tensor a, b;      // (B, M, Cs): C channels padded to Cs (see splat_blur)
  at::Tensor packed;    // GPU rows of four: the input's rows padded to Cs, (B, N, Cs)
  at::Tensor partial;   // CPU splat: (threads, M, C); CUDA splat: (B, K, C) chunk sums
  at::Tensor partial2;  // CUDA splat's second sums (splat_gather's pre2), (B, K, C)
  at::Tensor counters;  // CUDA splat with the chunk sums in its launch: (B, M, C / V), zero between launches
};

// The splats sum each vertex's chunks in the chunk launch (SplatChunkFunctor's kFuse) unless the
// knob says a second launch. Read once per call.
inline bool fused_reduce() { return tuning::get(tuning::kSplatFusedReduce) != 0; }

// The GPU blurs take two axes per launch (BlurPairFunctor) unless the knob says one. Read once per call.
inline bool blur_pairs() { return tuning::get(tuning::kBlurPairs) != 0; }

// The d + 1 blur axes in order (0..d, or d..0 when reversed) over buffers cur -> nxt, ping-ponging:
// one launch per axis, or, with pairs (GPU policies), per two axes. Returns the buffer that holds
// the result.
// counted: a counted lattice's vertices (nv[b] per image, M their capacity; B lattices).
template <class Exec, typename scalar_t, int V>
scalar_t* blur_axes(const Exec& exec, int64_t B, int64_t M, int64_t C, const int32_t* neighbors, const int32_t* nv,
                    int d, bool reverse, scalar_t* cur, scalar_t* nxt, int64_t grain, bool counted = false) {
  const bool pairs = !std::is_same_v<Exec, CpuExec> && blur_pairs();
  auto launch = [&](const auto& f) {
    if (counted)
      exec.for_each_counted(B, nv, 0, M, C / V, f, grain);
    else
      exec.for_each_item(B, M, C / V, f, grain);
  };
  for (int s = 0; s <= d; s += pairs ? 2 : 1) {
    const int j = reverse ? d - s : s;
    if (pairs) {
      const int j2 = s + 1 > d ? -1 : reverse ? d - s - 1 : s + 1;
      launch(BlurPairFunctor<scalar_t, V>{cur, nxt, neighbors, M, C, d, j, j2, B, nv});
    } else {
      launch(BlurFunctor<scalar_t, V>{cur, nxt, neighbors, M, C, d, j, B, nv});
    }
    std::swap(cur, nxt);
  }
  return cur;
}

// The chunk-splat functor over lattice `lat` (lists of lattice b % lat.B for image b): chunk sums of
// pre * in into part (and of pre2 * in into part2, kPair), C channels, V per thread; kFuse adds up
// each vertex's chunk sums into out (and out2) in the same launch, with `counters`.
template <typename scalar_t, int V, bool kPair, bool kFuse>
SplatChunkFunctor<scalar_t, V, kPair, kFuse> chunk_splat(const Lattice& lat, const scalar_t* in, const scalar_t* pre,
                                                         scalar_t* part, int64_t C, const scalar_t* pre2,
                                                         scalar_t* part2, int32_t* counters, scalar_t* out,
                                                         scalar_t* out2) {
  SplatChunkFunctor<scalar_t, V, kPair, kFuse> f{in,
                                                 pre,
                                                 lat.chunk_begin.data_ptr<int32_t>(),
                                                 lat.chunk_end.data_ptr<int32_t>(),
                                                 lat.splat_pixel.data_ptr<int32_t>(),
                                                 lat.splat_weight.data_ptr<scalar_t>(),
                                                 part,
                                                 lat.N,
                                                 lat.E,
                                                 lat.K,
                                                 C,
                                                 lat.B,
                                                 ptr_or_null(lat.chunk_slot),
                                                 pre2,
                                                 part2};
  if constexpr (kFuse) {
    f.chunk_vertex = lat.chunk_vertex.data_ptr<int32_t>();
    f.chunk_offsets = lat.chunk_offsets.data_ptr<int32_t>();
    f.counters = counters;
    f.out = out;
    f.out2 = out2;
    f.M = lat.M;
  }
  return f;
}

// Splat for CUDA and its emulation: chunk sums, then per-vertex sums of the chunks (see
// SplatChunkFunctor; V channels per thread of the chunk sums, C a multiple of V). out: (B, M, C).
// With out2, the same pass also splats pre2 * in into out2 (the splats of in with pre and with pre2).
template <class Exec, typename scalar_t, int V = 1>
void splat_gather(const Exec& exec, const Lattice& lat, const scalar_t* in, const scalar_t* pre, scalar_t* out,
                  int64_t C, FilterWorkspace& ws, int64_t grain, const scalar_t* pre2 = nullptr,
                  scalar_t* out2 = nullptr) {
  const int64_t B = lat.B, K = lat.K;
  auto fit = [&](at::Tensor& t) {
    if (!t.defined() || t.size(1) != K || t.size(2) != C)
      t = lat.counted ? counted_empty<Exec>({B, K, C}, lat.entry_weight.options())
                      : at::empty({B, K, C}, lat.entry_weight.options());
    return t.data_ptr<scalar_t>();
  };
  scalar_t* part = fit(ws.partial);
  scalar_t* part2 = out2 ? fit(ws.partial2) : nullptr;
  // A counted lattice: the launches run over its chunk and vertex counts; the chunk sums are added
  // up by a second launch (the fused form's counters would need zeroing for every vertex it could
  // have).
  const bool counted = lat.counted;
  TORCH_INTERNAL_ASSERT(!counted || lat.B == B);
  const bool fuse = !counted && fused_reduce();
  int32_t* counters = nullptr;
  if (fuse) {
    if (!ws.counters.defined() || ws.counters.size(0) != B || ws.counters.size(1) != lat.M ||
        ws.counters.size(2) != C / V) {
      ws.counters = at::empty({B, lat.M, C / V}, lat.entry_vertex.options());
      exec.zero_bytes(ws.counters);
    }
    counters = ws.counters.data_ptr<int32_t>();
  }
  auto chunk_sums = [&](auto pair, auto fused) {  // the second sums compiled in only where used
    const auto f = chunk_splat<scalar_t, V, decltype(pair)::value, decltype(fused)::value>(lat, in, pre, part, C, pre2,
                                                                                           part2, counters, out, out2);
    if constexpr (!decltype(fused)::value) {  // a counted lattice never takes the fused sums: no kernel for it
      if (counted) {
        exec.for_each_counted(B, lat.num_chunks.data_ptr<int32_t>(), 0, K, C / V, f, grain);
        return;
      }
    }
    exec.for_each_item(B, K, C / V, f, grain);
  };
  auto launch = [&](auto fused) {
    if (out2)
      chunk_sums(std::true_type{}, fused);
    else
      chunk_sums(std::false_type{}, fused);
  };
  if (fuse) {
    launch(std::true_type{});
    return;
  }
  launch(std::false_type{});
  for (int k = 0; k < (out2 ? 2 : 1); ++k) {
    const SplatReduceFunctor<scalar_t> f{k ? part2 : part,
                                         lat.chunk_offsets.data_ptr<int32_t>(),
                                         lat.num_vertices.data_ptr<int32_t>(),
                                         k ? out2 : out,
                                         lat.M,
                                         K,
                                         C,
                                         lat.B};
    if (counted)
      exec.for_each_counted(B, lat.num_vertices.data_ptr<int32_t>(), 0, lat.M, C, f, grain);
    else
      exec.for_each_item(B, lat.M, C, f, grain);
  }
}

// CPU splat: each thread scatters a contiguous range of pixels of image b into its own (M, C)
// buffer; the buffers are then summed in thread order. Reads the (large) input once, in order,
// instead of gathering it vertex by vertex. The summation order depends on the thread count, so
// results can differ across thread counts in the last bits (they do not differ across runs).
template <typename scalar_t>
void splat_scatter_cpu(const Lattice& lat, const scalar_t* in, const scalar_t* pre, scalar_t* out, int64_t C,
                       int64_t Cs, FilterWorkspace& ws) {
  const int64_t B = lat.B, N = lat.N, E = lat.E, M = lat.M;
  // Inside a parallel region (the energy loss's images across threads) one buffer: the thread
  // count's buffers would be filled and summed serially there (memory and time for nothing).
  const int64_t T =
      at::in_parallel_region() ? 1 : std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (N + 4095) / 4096));
  if (!ws.partial.defined() || ws.partial.size(0) != T || ws.partial.size(2) != Cs)
    ws.partial = at::empty({T, M, Cs}, lat.entry_weight.options());
  scalar_t* part = ws.partial.data_ptr<scalar_t>();
  const int64_t span = (N + T - 1) / T;
  const int32_t* nv = lat.num_vertices.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t Mb = nv[b];
    at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        scalar_t* buf = part + t * M * Cs;
        std::fill(buf, buf + Mb * Cs, scalar_t(0));
        ScatterFunctor<scalar_t> f{
            in, pre,  lat.entry_weight.data_ptr<scalar_t>(), lat.entry_vertex.data_ptr<int32_t>(), buf, N, E, C,
            Cs, lat.d};
        const int64_t i0 = b * N + t * span, i1 = b * N + std::min(N, (t + 1) * span);
        if (i0 >= i1) continue;
        cpu_run_items(i0, i1, N, C, f);
      }
    });
    scalar_t* ob = out + b * M * Cs;
    at::parallel_for(0, M, 256, [&](int64_t v0, int64_t v1) {
      for (int64_t v = v0; v < v1; ++v) {
        scalar_t* o = ob + v * Cs;
        if (v >= Mb) {
          std::fill(o, o + Cs, scalar_t(0));
          continue;
        }
        const scalar_t* p0 = part + v * Cs;
        for (int64_t c = 0; c < Cs; ++c) o[c] = p0[c];
        for (int64_t t = 1; t < T; ++t) {
          const int64_t i0 = b * N + t * span;
          if (i0 >= b * N + N) break;
          const scalar_t* pt = part + (t * M + v) * Cs;
          for (int64_t c = 0; c < Cs; ++c) o[c] += pt[c];
        }
      }
    });
  }
}

// The GPU filter's lattice rows are padded to a multiple of 4 channels, which its splat and blurs
// take four at a time (float rows as float4 loads and stores; double rows four scalars per thread),
// for C >= 4 unless the knob says one channel per thread; the same bits either way (each channel's
// sums are the same terms in the same order).
inline bool filter_rows4(int64_t C) { return C >= 4 && tuning::get(tuning::kFilterRows4) != 0; }

// The generic filter's lattice row width for C channels on Exec: CPU rows padded to a multiple of 8
// channels (one AVX register, see SliceFunctor), the GPU's (and its emulation's) to a multiple of 4
// (filter_rows4) or not at all.
template <class Exec>
int64_t filter_row_width(int64_t C) {
  if constexpr (std::is_same_v<Exec, CpuExec>) return (C + 7) / 8 * 8;
  return filter_rows4(C) ? (C + 3) / 4 * 4 : C;
}

// The lattice rows of B S (pre * in) in ws's buffers, Cs channels (ws.a.size(2)) per row; returns
// the buffer that holds them. B = B_d ... B_0 (forward) or B_0 ... B_d (reverse).
// in: (B, N, C) contiguous, same dtype as the lattice weights.
template <class Exec, typename scalar_t>
scalar_t* splat_blur(const Exec& exec, const Lattice& lat, const scalar_t* in, const scalar_t* pre, int64_t C,
                     bool reverse, FilterWorkspace& ws) {
  const int64_t B = lat.B, M = lat.M;
  const int d = lat.d;
  constexpr bool kCpu = std::is_same_v<Exec, CpuExec>;
  const bool rows4 = !kCpu && filter_rows4(C);
  const int64_t Cs = filter_row_width<Exec>(C);
  if (!ws.a.defined() || ws.a.size(2) != Cs) {
    ws.a = lat.counted ? counted_empty<Exec>({B, M, Cs}, lat.entry_weight.options())
                       : at::empty({B, M, Cs}, lat.entry_weight.options());
    ws.b = lat.counted ? counted_empty<Exec>({B, M, Cs}, lat.entry_weight.options())
                       : at::empty({B, M, Cs}, lat.entry_weight.options());
  }
  scalar_t* cur = ws.a.data_ptr<scalar_t>();
  scalar_t* nxt = ws.b.data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(16, 8192 / std::max<int64_t>(1, C));
  if constexpr (kCpu) {
    splat_scatter_cpu<scalar_t>(lat, in, pre, cur, C, Cs, ws);
  } else if (rows4) {
    // the splat reads whole rows of four (16-byte loads): the input padded to Cs first where C is not
    // a multiple of 4 or the rows do not start on 16 bytes (a caller's view with an odd offset)
    const scalar_t* src = in;
    if (Cs != C || reinterpret_cast<std::uintptr_t>(in) % 16 != 0) {
      const int64_t N = lat.N;
      if (!ws.packed.defined() || ws.packed.size(0) != B || ws.packed.size(1) != N || ws.packed.size(2) != Cs)
        ws.packed = at::empty({B, N, Cs}, lat.entry_weight.options());
      exec.for_each_item(B, N, Cs, PadRowsFunctor<scalar_t>{in, ws.packed.data_ptr<scalar_t>(), N, C, Cs}, 256);
      src = ws.packed.data_ptr<scalar_t>();
    }
    splat_gather<Exec, scalar_t, 4>(exec, lat, src, pre, cur, Cs, ws, grain);
    return blur_axes<Exec, scalar_t, 4>(exec, B, M, Cs, lat.neighbors.data_ptr<int32_t>(),
                                        lat.num_vertices.data_ptr<int32_t>(), d, reverse, cur, nxt, grain, lat.counted);
  } else {
    splat_gather<Exec, scalar_t>(exec, lat, in, pre, cur, C, ws, grain);
  }
  return blur_axes<Exec, scalar_t, 1>(exec, B, M, Cs, lat.neighbors.data_ptr<int32_t>(),
                                      lat.num_vertices.data_ptr<int32_t>(), d, reverse, cur, nxt, grain, lat.counted);
}

// out = alpha * S^T B S (pre * in), optionally post-multiplied / accumulated (see SliceFunctor).
// B = B_d ... B_0 (forward) or B_0 ... B_d (reverse: the exact adjoint of the forward filter).
// in, out: (B, N, C) contiguous, same dtype as the lattice weights.
// Returns the blurred rows (B S (pre * in), in ws.a or ws.b).
template <class Exec, typename scalar_t>
const scalar_t* filter(const Exec& exec, const Lattice& lat, const scalar_t* in, const scalar_t* pre, scalar_t* out,
                       const scalar_t* post, const scalar_t* coef, int64_t C, bool reverse, FilterWorkspace& ws,
                       const scalar_t* base = nullptr) {
  const int64_t B = lat.B, N = lat.N, E = lat.E, M = lat.M;
  const int d = lat.d;
  const scalar_t* cur = splat_blur<Exec, scalar_t>(exec, lat, in, pre, C, reverse, ws);
  const int64_t Cs = ws.a.size(2);
  const int64_t grain = std::max<int64_t>(16, 8192 / std::max<int64_t>(1, C));
  exec.for_each_item(
      B, N, C,
      SliceFunctor<scalar_t>{cur, lat.entry_weight.data_ptr<scalar_t>(), lat.entry_vertex.data_ptr<int32_t>(), post,
                             coef, base, out, static_cast<scalar_t>(slice_alpha(d)), N, E, M, C, Cs, d},
      grain);
  return cur;
}

// q = softmax(x) over the last dimension of (rows, L), max-subtracted as densecrf's expAndNormalize.
// The CPU uses the vectorised row softmax of lattice_common.h (exp dominates the mean-field step
// otherwise); CUDA and its emulation ATen's kernel (a warp per row on CUDA: a thread-per-pixel
// functor measured 160 us per 512x512x21 call on an H200, ATen's 26 us).
template <class Exec, typename scalar_t>
void softmax_rows(const Exec& exec, const at::Tensor& x, at::Tensor& q) {
#if !defined(__CUDA_ARCH__)  // the CPU row softmax is host code (lattice_common.h)
  if constexpr (std::is_same_v<Exec, CpuExec>) {
    const int64_t L = x.size(-1);
    exec.for_each_item(1, x.numel() / L, L,
                       SoftmaxRowCpuFunctor<scalar_t>{x.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), L}, 256);
    return;
  }
#endif
  at::_softmax_out(q, x, /*dim=*/-1, /*half_to_float=*/false);
}

#if !defined(__CUDACC__)
// CPU mean field with diagonal compatibilities, image by image: each step blurs every term's splat
// buffer, then one pass over the pixels (MeanFieldCpuFunctor) slices all terms, adds the unary,
// takes the softmax and scatters the new Q into the next step's splat buffers -- instead of a
// splat, a slice and a softmax pass over (N, L) arrays per term and step. Q is only written at the
// end, label-major. The pixel spans, their thread-private splat buffers and the order in which they
// are summed are those of splat_scatter_cpu, so the splat sums are the same as lattice::filter's.
//   unary (B, L, N); q (B, L, N) out; coefs[t] (L,); lats[t].B divides B (image b uses lattice
//   b % lats[t].B); pre/post[t] (lats[t].B, N) or undefined.
// units: the images, G at a time, the G of a unit sharing every lattice: their rows lie side by
// side, Wg columns each (MeanFieldCpuFunctor's G), so that one pass over the lattice entries serves
// all G (mean_field_cpu_units pairs them).
// traj (iterations, B, N, L), or undefined: each step but the last also writes its Q there,
// pixel-major (Q^0 .. Q^{S-1}; dense_crf's trajectory for its backward).
template <typename scalar_t, int Wg, int G = 1>
void mean_field_cpu(const std::vector<Lattice>& lats, const std::vector<at::Tensor>& pre,
                    const std::vector<at::Tensor>& post, const std::vector<at::Tensor>& coefs, const at::Tensor& unary,
                    at::Tensor& q, int64_t iterations, const std::vector<std::array<int64_t, G>>& units,
                    const at::Tensor& traj = at::Tensor()) {
  constexpr int W = Wg * G;
  const int64_t L = unary.size(1), N = unary.size(2);
  const int T = static_cast<int>(lats.size());
  const int64_t P = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (N + 4095) / 4096));
  const int64_t span = (N + P - 1) / P;
  const auto opt = unary.options();
  std::vector<at::Tensor> part(T), bufa(T), bufb(T);
  for (int t = 0; t < T; ++t) {
    part[t] = at::empty({P, lats[t].M, W}, opt);
    bufa[t] = at::empty({lats[t].M, W}, opt);
    bufb[t] = at::empty({lats[t].M, W}, opt);
  }
  auto ptr = [](const at::Tensor& x, int64_t off) -> const scalar_t* {
    return x.defined() ? x.data_ptr<scalar_t>() + off : nullptr;
  };
  // Rows padded to W: the unary with softmax_pad, the compatibilities with 0 (fixed-width loops).
  at::Tensor base_w = empty_large({N, W}, opt, kCachedOutputBytes);  // (a cached block: no page faults)
  const at::Tensor unary_c = unary.contiguous();  // the op takes any strides; read below as (B, L, N)
  std::vector<at::Tensor> coef_w(T);
  for (int t = 0; t < T; ++t) coef_w[t] = at::constant_pad_nd(coefs[t], {0, Wg - L}, 0).repeat({G});
  MeanFieldCpuFunctor<scalar_t, W, G> proto{};
  for (int c = 0; c < W; ++c) proto.mask[c] = c % Wg < L ? scalar_t(1) : scalar_t(0);
  for (const std::array<int64_t, G>& unit : units) {
    const int64_t b = unit[0];  // the unit's lattices: those of its first image (all share them)
    // -unary of each image transposed into its columns of the padded rows, in blocks of pixels
    // (ATen's strided neg_out into the (N, L) view took 6 ms at 500x375x21 on one thread, and did
    // not use a second one).
    for (int g = 0; g < G; ++g) {
      const scalar_t* u = unary_c.data_ptr<scalar_t>() + unit[g] * L * N;
      scalar_t* bw = base_w.data_ptr<scalar_t>() + g * Wg;
      at::parallel_for(0, (N + 63) / 64, 16, [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k) {
          const int64_t i0 = k * 64, i1 = std::min(N, i0 + 64);
          for (int64_t l = 0; l < L; ++l)
            for (int64_t i = i0; i < i1; ++i) bw[i * W + l] = -u[l * N + i];
          for (int64_t i = i0; i < i1; ++i)
            for (int64_t l = L; l < Wg; ++l) bw[i * W + l] = softmax_pad<scalar_t>();
        }
      });
    }
    std::vector<int64_t> Mb(T);
    std::vector<const scalar_t*> blurred(T, nullptr);
    // Image b uses lattice b % lat.B of each term (a term's lattices may be shared, see dense_crf).
    for (int t = 0; t < T; ++t) Mb[t] = lats[t].num_vertices.data_ptr<int32_t>()[b % lats[t].B];
    for (int64_t step = 0; step <= iterations; ++step) {
      const bool last = step == iterations;
      // Slice (from the second step on), softmax, and scatter (all but the last step).
      at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t i0 = p * span, i1 = std::min(N, (p + 1) * span);
          if (i0 >= i1) continue;
          MeanFieldCpuFunctor<scalar_t, W, G> f = proto;
          f.base = base_w.data_ptr<scalar_t>();
          const int64_t B = unary.size(0);
          for (int g = 0; g < G; ++g)
            f.q_out[g] = last             ? q.data_ptr<scalar_t>() + unit[g] * L * N
                         : traj.defined() ? traj.data_ptr<scalar_t>() + (step * B + unit[g]) * N * L
                                          : nullptr;
          f.q_c = last ? N : 1;
          f.q_i = last ? 1 : L;
          f.T = T;
          f.N = N;
          f.L = L;
          for (int t = 0; t < T; ++t) {
            const Lattice& lat = lats[t];
            MeanFieldTerm<scalar_t>& m = f.terms[t];
            const int64_t lb = b % lat.B;
            m.weights = lat.entry_weight.data_ptr<scalar_t>() + lb * lat.E;
            m.vertex = lat.entry_vertex.data_ptr<int32_t>() + lb * lat.E;
            m.blurred = blurred[t];
            m.pre = ptr(pre[t], lb * N);
            m.post = ptr(post[t], lb * N);
            m.coef = coef_w[t].data_ptr<scalar_t>();
            m.alpha = static_cast<scalar_t>(slice_alpha(lat.d));
            m.d = lat.d;
            m.splat = nullptr;
            if (!last) {
              m.splat = part[t].data_ptr<scalar_t>() + p * lat.M * W;
              std::fill(m.splat, m.splat + Mb[t] * W, scalar_t(0));
            }
          }
          cpu_run_items(i0, i1, N, L, f);
        }
      });
      if (last) break;
      for (int t = 0; t < T; ++t) {
        const Lattice& lat = lats[t];
        const int64_t M = lat.M, Mt = Mb[t];
        // Sum the thread buffers in thread order (as splat_scatter_cpu), then blur d+1 times.
        scalar_t* src = part[t].data_ptr<scalar_t>();
        scalar_t* cur = bufb[t].data_ptr<scalar_t>();
        scalar_t* nxt = bufa[t].data_ptr<scalar_t>();
        if (P > 1) {
          at::parallel_for(0, Mt, 256, [&](int64_t v0, int64_t v1) {
            for (int64_t v = v0; v < v1; ++v) {
              scalar_t* o = cur + v * W;
              const scalar_t* p0 = src + v * W;
              for (int c = 0; c < W; ++c) o[c] = p0[c];
              for (int64_t p = 1; p < P; ++p) {
                if (p * span >= N) break;
                const scalar_t* pt = src + (p * M + v) * W;
                for (int c = 0; c < W; ++c) o[c] += pt[c];
              }
            }
          });
        } else {
          cur = src;
        }
        const int32_t* nbr = lat.neighbors.data_ptr<int32_t>() + (b % lat.B) * (lat.d + 1) * M * 2;
        const int64_t grain = std::max<int64_t>(16, 8192 / W);
        for (int s = 0; s <= lat.d; ++s) {
          CpuExec{}.for_each_item(1, Mt, W, BlurFunctor<scalar_t>{cur, nxt, nbr, M, W, lat.d, s, 1}, grain);
          // the next pass reads what this one wrote; the first one's source may be the thread buffer
          std::swap(cur, nxt);
          if (nxt == src)
            nxt = (cur == bufa[t].data_ptr<scalar_t>()) ? bufb[t].data_ptr<scalar_t>() : bufa[t].data_ptr<scalar_t>();
        }
        blurred[t] = cur;
      }
    }
  }
}

// dense_crf's CPU mean field with rows Wg wide: images that share every lattice (image b uses lattice
// b % lats[t].B, so b and b + S do for S the lcm of the lattice counts; RRM's pseudo labels: each
// crop's two CRFs) go through it in pairs, rows 2 Wg wide, the others one at a time; the same bits
// either way (knob cpu_crf_pairs, default 1). At 321^2 with 3 labels a pass of rows 8 wide costs
// little more than one of rows 4 wide: the lattice entries, not the channels, are most of it.
constexpr int kMaxPairedWidth = 8;  // rows of 16 labels in pairs were slower (9-16 labels, 321^2, 1 thread)
template <typename scalar_t, int Wg>
void mean_field_cpu_units(const std::vector<Lattice>& lats, const std::vector<at::Tensor>& pre,
                          const std::vector<at::Tensor>& post, const std::vector<at::Tensor>& coefs,
                          const at::Tensor& unary, at::Tensor& q, int64_t iterations,
                          const at::Tensor& traj = at::Tensor()) {
  const int64_t B = unary.size(0);
  int64_t S = 1;
  for (const Lattice& lat : lats) S = std::lcm(S, lat.B);
  std::vector<std::array<int64_t, 1>> singles;
  std::vector<std::array<int64_t, 2>> pairs;
  const bool pair = Wg <= kMaxPairedWidth && tuning::get(tuning::kCpuCrfPairs) != 0;
  for (int64_t r = 0; r < std::min(S, B); ++r) {
    int64_t b = r;
    for (; pair && b + S < B; b += 2 * S) pairs.push_back({b, b + S});
    for (; b < B; b += S) singles.push_back({b});
  }
  if constexpr (Wg <= kMaxPairedWidth) {
    if (!pairs.empty()) mean_field_cpu<scalar_t, Wg, 2>(lats, pre, post, coefs, unary, q, iterations, pairs, traj);
  }
  if (!singles.empty()) mean_field_cpu<scalar_t, Wg, 1>(lats, pre, post, coefs, unary, q, iterations, singles, traj);
}
#endif

// Whether an op may use the lattice cache: not while a CUDA graph is captured. A graph would keep
// raw pointers to an entry's tensors, which a later eviction (LRU, clear_lattice_cache) frees under
// it; and an entry or normaliser made in the capture holds its values only once the graph replays.
template <class Exec>
bool cache_ok(const Exec& exec) {
  return !exec.capturing();
}

// The lattices of features (B', d, N) built `chunk` images at a time, with chunks cut by
// `chunk_tile` pixels: from the lattice cache (lattice_cache.h) when keep -- features is a constant
// tensor, never changed in place outside autograd's view -- and an entry cut by the same tiles is
// there; else built (counted: a counted build) and, when keep, stored. Only a contiguous tensor is
// kept (contiguous() of any other is a new tensor every call), never a counted lattice (sized for
// every possible vertex), and nothing while a CUDA graph is captured (cache_ok). A lattice that
// will be kept is built with the read of its size even when `counted` asks otherwise (knob
// counted_lattice on eager calls): one host wait on its first call instead of a counted build on
// every call. An entry cut by other tiles is replaced when `replace` (dense_crf), else left to its
// owner (the filter).
template <class Exec>
std::shared_ptr<CachedLattice> cached_or_built(const Exec& exec, const at::Tensor& features, int64_t chunk, bool keep,
                                               bool counted, int64_t chunk_tile, bool replace) {
  bool cacheable = keep && features.is_contiguous() && cache_ok(exec);
  const int64_t eff_chunk = std::max<int64_t>(1, std::min(chunk, features.size(0)));
  std::shared_ptr<CachedLattice> cached;
  if (cacheable) cached = cache_find(features, Exec::kName, Exec::stream_id(), eff_chunk);
  if (cached && cached->lat.chunk_tile == chunk_tile) return cached;
  if (cached) cacheable = cacheable && replace;
  cached = std::make_shared<CachedLattice>();
  cached->lat = build(exec, features.contiguous(), chunk, counted && !cacheable, chunk_tile);
  if (cacheable) cache_put(features, Exec::kName, Exec::stream_id(), eff_chunk, cached);  // replaces
  return cached;
}

// An op's lattice of `features`: the one handed over by the caller's autograd node (a supply
// scope, lattice_cache.h) when it was built for these features and cut by the same tiles, else
// cached_or_built's; recorded into the caller's node when it asks (a record scope). Neither while a
// CUDA graph is captured.
template <class Exec>
std::shared_ptr<CachedLattice> op_lattice(const Exec& exec, const HandoffClaim& claim, const at::Tensor& features,
                                          int64_t chunk, bool keep, bool counted, int64_t chunk_tile = 0,
                                          bool replace = false) {
  const bool handoff = cache_ok(exec);
  const int64_t eff_chunk = std::max<int64_t>(1, std::min(chunk, features.size(0)));
  std::shared_ptr<CachedLattice> entry;
  if (handoff && claim.supply) entry = handoff_find(*claim.supply, features, Exec::kName, Exec::stream_id(), eff_chunk);
  if (entry && entry->lat.chunk_tile != chunk_tile) entry = nullptr;
  if (!entry) entry = cached_or_built(exec, features, chunk, keep, counted, chunk_tile, replace);
  if (handoff && claim.record && claim.record->want_lattices)
    handoff_put(*claim.record, features, Exec::kName, Exec::stream_id(), eff_chunk, entry);
  return entry;
}

// values (B, C, N) -> (B, C, N): the lattice filter of every channel, one lattice per image.
// keep: features is constant, its lattice may come from and go to the cache (cached_or_built).
template <class Exec>
at::Tensor permutohedral_filter(const Exec& exec, const at::Tensor& values, const at::Tensor& features, bool reverse,
                                int64_t chunk, bool keep = false) {
  const HandoffClaim claim = handoff_claim();
  const int64_t B = values.size(0), C = values.size(1), N = values.size(2);
  auto out = at::empty({B, N, C}, values.options());
  if (B == 0 || C == 0 || N == 0) return out.permute({0, 2, 1}).contiguous();
  // A counted lattice (use_counted): in a CUDA graph capture, or by knob. Its rows: the two blur
  // buffers and the chunk sums, each of the padded width.
  const bool counted =
      use_counted(exec, B, chunk, N, features.size(1), 3 * filter_row_width<Exec>(C) * values.element_size());
  const auto entry = op_lattice(exec, claim, features, chunk, keep, counted);
  const Lattice& lat = entry->lat;
  auto in = values.transpose(1, 2).contiguous();  // pixel-major
  FilterWorkspace ws;
  const void* rows = nullptr;
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "rrm_permutohedral_filter", [&] {
    rows = filter<Exec, scalar_t>(exec, lat, in.data_ptr<scalar_t>(), nullptr, out.data_ptr<scalar_t>(), nullptr,
                                  nullptr, C, reverse, ws);
  });
  if (claim.record && claim.record->want_rows && !claim.record->items.empty()) {
    // the blurred rows B S in, which the features' gradient needs (permutohedral_filter_backward's lf)
    claim.record->rows = rows == ws.a.data_ptr() ? ws.a : ws.b;
    claim.record->rows_of = entry;
    claim.record->rows_reverse = reverse;
  }
  return out.transpose(1, 2).contiguous();
}

// Both gradients of permutohedral_filter from one lattice: values (B, C, N), features (B, d, N),
// grad (B, C, N) the output's gradient -> (the values' (B, C, N), the features' (B, d, N)). The
// lattice (the forward's, from the cache when keep), the splat and blur of grad in the reversed
// blur order, whose slice is the values' gradient (the filter of grad with !reverse, the same bits),
// and of the values in the filter's own order, then one pass over the pixels for the features'
// (FeatureGradFunctor). One build and three splats and blurs where the two gradients apart took two
// builds and four.
template <class Exec>
std::tuple<at::Tensor, at::Tensor> permutohedral_filter_backward(const Exec& exec, const at::Tensor& values,
                                                                 const at::Tensor& features, const at::Tensor& grad,
                                                                 bool reverse, int64_t chunk, bool keep = false) {
  const HandoffClaim claim = handoff_claim();
  const int64_t B = values.size(0), C = values.size(1), N = values.size(2);
  const int d = static_cast<int>(features.size(1));
  if (B == 0 || C == 0 || N == 0) return {at::zeros_like(values), at::zeros({B, d, N}, features.options())};
  // its rows: two filters' blur buffers and chunk sums, each of the padded width
  const bool counted = use_counted(exec, B, chunk, N, d, 6 * filter_row_width<Exec>(C) * values.element_size());
  const auto entry = op_lattice(exec, claim, features, chunk, keep, counted);
  const Lattice& lat = entry->lat;
  // the forward's blurred rows B S in, when its node handed them over with this lattice
  at::Tensor fwd_rows;
  if (claim.supply && claim.supply->rows_of == entry && claim.supply->rows.defined() &&
      claim.supply->rows_reverse == reverse && claim.supply->rows.scalar_type() == values.scalar_type())
    fwd_rows = claim.supply->rows;
  auto in = values.transpose(1, 2).contiguous();  // pixel-major
  auto g = grad.transpose(1, 2).contiguous();
  auto f = features.contiguous();
  auto grad_values = at::empty({B, N, C}, values.options());
  auto grad_features = at::empty({B, d, N}, features.options());
  FilterWorkspace ws_in, ws_g;
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "rrm_permutohedral_filter_backward", [&] {
    const scalar_t alpha = static_cast<scalar_t>(slice_alpha(d));
    const scalar_t* la = splat_blur<Exec, scalar_t>(exec, lat, g.data_ptr<scalar_t>(), nullptr, C, !reverse, ws_g);
    const int64_t Cs = ws_g.a.size(2);
    exec.for_each_item(
        B, N, C,
        SliceFunctor<scalar_t>{la, lat.entry_weight.data_ptr<scalar_t>(), lat.entry_vertex.data_ptr<int32_t>(), nullptr,
                               nullptr, nullptr, grad_values.data_ptr<scalar_t>(), alpha, N, lat.E, lat.M, C, Cs, d},
        std::max<int64_t>(16, 8192 / std::max<int64_t>(1, C)));
    const scalar_t* lf =
        fwd_rows.defined() && fwd_rows.size(2) == Cs
            ? fwd_rows.data_ptr<scalar_t>()
            : splat_blur<Exec, scalar_t>(exec, lat, in.data_ptr<scalar_t>(), nullptr, C, reverse, ws_in);
    with_fixed_d<2, 3, 5>(d, [&](auto fixed_d) {
      FeatureGradFunctor<scalar_t, decltype(fixed_d)::value> fg{};
      fg.embed.features = f.data_ptr<scalar_t>();
      for (int k = 0; k < d; ++k) fg.embed.scale[k] = static_cast<scalar_t>(feature_scale(k, d));
      fg.embed.N = N;
      fg.embed.d_runtime = d;
      fg.in = in.data_ptr<scalar_t>();
      fg.g = g.data_ptr<scalar_t>();
      fg.lf = lf;
      fg.la = la;
      fg.entry_vertex = lat.entry_vertex.data_ptr<int32_t>();
      fg.grad = grad_features.data_ptr<scalar_t>();
      fg.alpha = alpha;
      fg.M = lat.M;
      fg.C = C;
      fg.Cs = Cs;
      exec.for_each_item(B, N, 1, fg, std::max<int64_t>(16, 4096 / std::max<int64_t>(1, C)));
    });
  });
  return {grad_values.transpose(1, 2).contiguous(), grad_features};
}

// The lattices of `lat` repeated `reps` times along the batch (image b of the result is image
// b % lat.B): for the per-term path, whose kernels index the lattice by image.
inline Lattice tile(const Lattice& lat, int64_t reps) {
  if (reps == 1) return lat;
  Lattice t = lat;
  t.B = lat.B * reps;
  auto rep = [reps](const at::Tensor& x) {
    if (!x.defined()) return x;
    std::vector<int64_t> r(x.dim(), 1);
    r[0] = reps;
    return x.repeat(r);
  };
  t.entry_vertex = rep(lat.entry_vertex);
  t.entry_weight = rep(lat.entry_weight);
  t.num_vertices = rep(lat.num_vertices);
  t.neighbors = rep(lat.neighbors);
  t.offsets = rep(lat.offsets);
  t.splat_pixel = rep(lat.splat_pixel);
  t.splat_weight = rep(lat.splat_weight);
  t.chunk_offsets = rep(lat.chunk_offsets);
  t.chunk_begin = rep(lat.chunk_begin);
  t.chunk_end = rep(lat.chunk_end);
  t.chunk_slot = rep(lat.chunk_slot);
  t.chunk_vertex = rep(lat.chunk_vertex);
  t.num_chunks = rep(lat.num_chunks);
  // The tiled mean field's tables are not repeated: repeated lattices feed the per-term path, which
  // reads neither (mean_field_gpu takes only lattices that have them).
  t.tile_offsets = at::Tensor();
  t.tile_entry_local = at::Tensor();
  return t;
}

// The pairwise terms of one dense_crf call: each term's lattice, built once, its normalisers and
// its filter workspace.
//   lats[t]: features[t]'s B_t lattices, repeated to `tile_to` images when tile_to > B_t (the
//   per-term path indexes lattices by image; the fused CPU mean field takes b % B_t itself: 0)
//   pre/post[t] (lats[t].B, N) or undefined: the messages are m_t = post_t * K_t (pre_t * Q)
//   (symmetric: both n^-1/2; after: post = 1/n; before: pre = 1/n; none: neither), n = K_t 1 + 1e-20.
//   coefs[t] (L,) = -diag(compat[t]) for diagonal terms (the slice's acc -= c_l m_l), else undefined.
struct CrfTerms {
  std::vector<Lattice> lats;
  std::vector<FilterWorkspace> wss;
  std::vector<at::Tensor> pre, post, coefs;
};

// keep[t] (or an empty vector: none): features[t] is a constant tensor, its lattice and normaliser
// may come from, and go to, the lattice cache (lattice_cache.h). need_coefs = false leaves coefs
// undefined (the fused GPU mean field pads its rows from compat itself). row_bytes > 0: the bytes
// of the caller's lattice rows per vertex and image, row_images the images that have rows (a
// lattice shared by several unaries serves each), for use_counted (0: never a counted lattice).
template <class Exec, typename scalar_t>
CrfTerms crf_terms(const Exec& exec, const std::vector<at::Tensor>& features, const at::Tensor& compat_c,
                   const std::vector<bool>& diagonal, const std::vector<int64_t>& norms, int64_t N,
                   const at::TensorOptions& opt, int64_t chunk, int64_t tile_to, const std::vector<bool>& keep = {},
                   bool need_coefs = true, int64_t row_bytes = 0, int64_t row_images = 0, int64_t chunk_tile = 0,
                   const HandoffClaim& claim = HandoffClaim{}) {
  const int64_t T = static_cast<int64_t>(features.size());
  CrfTerms terms;
  terms.wss.resize(T);
  terms.pre.resize(T);
  terms.post.resize(T);
  terms.coefs.resize(T);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t norm = norms[t];
    const at::Tensor& ft = features[t];
    // A counted lattice (use_counted; row_bytes: the caller's rows per vertex) in a CUDA graph
    // capture or by knob.
    const int64_t per_lattice = std::max<int64_t>(1, row_images / std::max<int64_t>(1, ft.size(0)));
    const bool counted = row_bytes > 0 && use_counted(exec, ft.size(0), chunk, N, ft.size(1), row_bytes * per_lattice);
    const bool kept = t < static_cast<int64_t>(keep.size()) && keep[t];
    // an entry of other tiles is rebuilt and replaced; a private entry's normaliser stays private (or
    // goes with it to the backward: op_lattice)
    std::shared_ptr<CachedLattice> cached = op_lattice(exec, claim, ft, chunk, kept, counted, chunk_tile, true);
    terms.lats.push_back(cached->lat);
    const int64_t Bt = terms.lats[t].B;
    if (norm != 3) {  // NO_NORMALIZATION: densecrf computes a mean norm but never applies it
      at::Tensor n = cache_norm(*cached, norm);
      if (!n.defined()) {
        // Normaliser n = K 1 by the same lattice (forward order), then 1/sqrt or 1/x.
        auto ones = at::ones({Bt, N, 1}, opt);
        auto kn = at::empty({Bt, N, 1}, opt);
        filter<Exec, scalar_t>(exec, terms.lats[t], ones.data_ptr<scalar_t>(), nullptr, kn.data_ptr<scalar_t>(),
                               nullptr, nullptr, 1, false, terms.wss[t]);
        terms.wss[t] = FilterWorkspace{};
        exec.for_each(Bt * N, NormFunctor<scalar_t>{kn.data_ptr<scalar_t>(), norm == 0});
        n = kn.reshape({Bt, N});
        cache_set_norm(*cached, norm, n);
      }
      if (norm == 0 || norm == 1) terms.post[t] = n;
      if (norm == 0 || norm == 2) terms.pre[t] = n;
    }
    // Diagonal compatibility enters the slice as a per-label coefficient: acc -= c_l m_l.
    if (diagonal[t] && need_coefs) terms.coefs[t] = compat_c[t].diagonal().neg().contiguous();
    if (tile_to > Bt) {
      const int64_t reps = tile_to / Bt;
      terms.lats[t] = tile(terms.lats[t], reps);
      if (terms.pre[t].defined()) terms.pre[t] = terms.pre[t].repeat({reps, 1});
      if (terms.post[t].defined()) terms.post[t] = norm == 0 ? terms.pre[t] : terms.post[t].repeat({reps, 1});
    }
  }
  return terms;
}

// One generic mean-field step (dense_crf's per-term loop body): q_next = softmax(-U - sum_t C_t m_t),
// m_t = post_t * K_t (pre_t * q_prev). All (B, N, L) contiguous; acc and m (defined when a term has
// a full matrix) are scratch; q_next may be q_prev (it is written last).
template <class Exec, typename scalar_t>
void mean_field_step(const Exec& exec, CrfTerms& terms, const at::Tensor& compat_c, const std::vector<bool>& diagonal,
                     const at::Tensor& neg_unary, const at::Tensor& q_prev, at::Tensor& acc, at::Tensor& m,
                     at::Tensor& q_next) {
  const int64_t T = static_cast<int64_t>(terms.lats.size());
  const int64_t L = neg_unary.size(2), BN = neg_unary.size(0) * neg_unary.size(1);
  auto ptr = [](const at::Tensor& x) -> const scalar_t* { return x.defined() ? x.data_ptr<scalar_t>() : nullptr; };
  const bool fold = diagonal[0];  // -U folded into the first diagonal term's slice, as dense_crf does
  if (!fold) acc.copy_(neg_unary);
  for (int64_t t = 0; t < T; ++t) {
    if (diagonal[t]) {
      filter<Exec, scalar_t>(exec, terms.lats[t], q_prev.data_ptr<scalar_t>(), ptr(terms.pre[t]),
                             acc.data_ptr<scalar_t>(), ptr(terms.post[t]), terms.coefs[t].data_ptr<scalar_t>(), L,
                             false, terms.wss[t], (t == 0 && fold) ? neg_unary.data_ptr<scalar_t>() : nullptr);
    } else {
      filter<Exec, scalar_t>(exec, terms.lats[t], q_prev.data_ptr<scalar_t>(), ptr(terms.pre[t]),
                             m.data_ptr<scalar_t>(), ptr(terms.post[t]), nullptr, L, false, terms.wss[t]);
      exec.for_each(BN,
                    MatVecSubFunctor<scalar_t>{m.data_ptr<scalar_t>(), compat_c[t].data_ptr<scalar_t>(),
                                               acc.data_ptr<scalar_t>(), L},
                    256);
    }
  }
  softmax_rows<Exec, scalar_t>(exec, acc, q_next);
}

// Shared memory of one block of the tiled mean field at most (its tile's rows of Q): 96 KiB, two
// blocks per SM of an H100 (228 KiB), opted into above the default 48 KiB (CudaExec::for_each_block).
constexpr int64_t kTileSmemMax = 96 * 1024;

// CUDA (and emulated) mean field with diagonal compatibilities (see MeanFieldSliceFunctor): per
// step a splat of Q's padded rows and d+1 blurs for every term (each stage one launch for all terms),
// then one per-pixel pass for the slices of all terms, the unary and the softmax. Q stays in (B, N, W) rows between
// steps and is written label-major at the last one. Lattices are not tiled: image b uses lattice b % lats[t].B.
//   unary (B, L, N); q_out (B, L, N); terms from crf_terms(..., tile_to = 0).
//   traj (iterations + 1, B, N, L) or undefined: every step's Q (Q^0 .. Q^S, dense_crf's trajectory
//   for its backward), copied from the padded rows after each slice; left undefined (reset) by the
//   tiled kernels that keep Q in shared memory (mean_field_tile_kernel 2 and 3).
template <class Exec, typename scalar_t, int W>
void mean_field_gpu(const Exec& exec, CrfTerms& terms, const at::Tensor& compat_c, const at::Tensor& unary,
                    at::Tensor& q_out, int64_t iterations, at::Tensor* traj = nullptr) {
  const int64_t B = unary.size(0), L = unary.size(1), N = unary.size(2);
  const int T = static_cast<int>(terms.lats.size());
  const auto opt = unary.options();
  // -diag(compat[t]) padded with zeros, every term at once (compat_c: (T, L, L) contiguous)
  at::Tensor coef_all = at::empty({T, W}, opt);
  exec.for_each(T * W, PadCoefRowsFunctor<scalar_t>{compat_c.data_ptr<scalar_t>(), coef_all.data_ptr<scalar_t>(), L, W},
                256);
  constexpr int V = W >= 16 ? 4 : 1;  // channels per thread of the chunk splats
  // Counted lattices (Lattice::counted: in a CUDA graph capture, or by knob): every stage a counted
  // launch (CountedTermItems) over per-image totals of the terms' counts; the chunk sums in the
  // splat's launch as for read-back lattices (before session 25: a second launch every step).
  bool counted = false;
  for (int t = 0; t < T; ++t) counted = counted || terms.lats[t].counted;
  // Tiled (Lattice::chunk_tile = P, every term's chunks cut by the same tiles; knob mean_field_tile):
  // each step's splat one block per tile of P pixels (TileMeanFieldFunctor) with the tile's rows of Q
  // in shared memory, copied from q (kernel 1) or computed there (kernel 2, which also takes over the
  // slices of every step but the last), then the chunk sums by a second launch. Kernel 0, or rows
  // too wide for kTileSmemMax, keeps the chunk splat over the cut chunks: the same bits. Counted
  // lattices too: the blocks are the tiles (known from N and P), the other stages counted launches.
  const int64_t P = terms.lats[0].chunk_tile;
  bool tiled = P > 0;
  for (int t = 0; t < T; ++t) tiled = tiled && terms.lats[t].chunk_tile == P && terms.lats[t].tile_offsets.defined();
  // Kernel 3 stages up to 2P vertex rows after the P rows of Q (astronaut 512^2 in 16 x 16 tiles of
  // P = 256: median 191 chunks per tile, 72 % of the tiles within P, ~all within 2P); a block whose
  // shared memory would exceed kTileSmemMax takes the kernel below.
  const int64_t row_bytes = W * static_cast<int64_t>(sizeof(scalar_t));
  int64_t tile_kernel = tiled ? std::min<int64_t>(3, tuning::get(tuning::kMeanFieldTileKernel)) : 0;
  const int64_t smem_max = tile_kernel ? std::min(kTileSmemMax, exec.max_block_smem()) : 0;
  if (tile_kernel == 3 && 3 * P * row_bytes > smem_max) tile_kernel = 2;
  if (tile_kernel >= 1 && (P * row_bytes > smem_max || B * ((N + P - 1) / P) >= (int64_t(1) << 31)))
    tile_kernel = 0;  // too wide a block for this device or kTileSmemMax, or more blocks than a grid takes
  const int64_t smem = (tile_kernel == 3 ? 3 * P : P) * row_bytes;
  const bool block_splat = tile_kernel >= 1, block_slice = tile_kernel >= 2;
  // The chunk sums in the splat's launch (SplatChunkFunctor's kFuse), counted lattices too: their
  // counters are sized by the bound M (N (d + 1) per image) and zeroed once per call (~0.06 GB at
  // 512^2 x 21, one fill), against a second launch in every step.
  const bool fuse = !block_splat && fused_reduce();
  // Q's padded rows between steps; kernels 2 and 3 keep them in shared memory and never use these.
  auto q = at::empty({B, block_slice ? 0 : N, W}, opt);
  std::vector<at::Tensor> part(T), bufa(T), bufb(T);
  // The fused chunk sums' counters, every term's in one zeroed allocation: (B, M_t, W / V) each.
  at::Tensor counters;
  if (fuse) {
    int64_t total = 0;
    for (int t = 0; t < T; ++t) total += B * terms.lats[t].M * (W / V);
    counters = at::empty({total}, terms.lats[0].entry_vertex.options());
    exec.zero_bytes(counters);
  }
  int64_t counter_at = 0;
  MeanFieldSliceArgs<scalar_t> f{};
  f.unary = unary.data_ptr<scalar_t>();
  f.sb = unary.stride(0);
  f.sl = unary.stride(1);
  f.sn = unary.stride(2);
  f.q = q.data_ptr<scalar_t>();
  f.q_lmajor = nullptr;
  f.T = T;
  f.N = N;
  f.L = L;
  auto ptr = [](const at::Tensor& x) -> const scalar_t* { return x.defined() ? x.data_ptr<scalar_t>() : nullptr; };
  for (int t = 0; t < T; ++t) {
    const Lattice& lat = terms.lats[t];
    auto alloc = [&](int64_t rows) {  // a counted lattice's rows beyond its counts stay unwritten
      return lat.counted ? counted_empty<Exec>({B, rows, W}, opt) : at::empty({B, rows, W}, opt);
    };
    part[t] = alloc(lat.K);
    bufa[t] = alloc(lat.M);
    bufb[t] = alloc(lat.M);
    MeanFieldRowTerm<scalar_t>& m = f.terms[t];
    m.weights = lat.entry_weight.data_ptr<scalar_t>();
    m.vertex = lat.entry_vertex.data_ptr<int32_t>();
    m.blurred = nullptr;
    m.post = ptr(terms.post[t]);
    m.coef = coef_all.data_ptr<scalar_t>() + t * W;
    m.alpha = static_cast<scalar_t>(slice_alpha(lat.d));
    m.E = lat.E;
    m.M = lat.M;
    m.LB = lat.B;
    m.d = lat.d;
  }
  // Every stage of a step is one launch for all terms (TermItems): the chunk splats of Q, the chunk
  // sums into bufa, then blur along axis j = 0..max d for the terms that have that axis, each term
  // ping-ponging between its two buffers. The launches read and write the same buffers every step.
  // Channels per thread of the blurs (W is a multiple of 4): 8.5 -> 4.4 us per launch on an H100
  // at 512x512x21. The chunk sums keep one (SplatReduceFunctor).
  constexpr int VR = 4;
  TermItems<SplatChunkFunctor<scalar_t, V>> splat{};
  TermItems<SplatChunkFunctor<scalar_t, V, false, true>> splat_sums{};  // the chunk sums in the same launch
  TermItems<SplatReduceFunctor<scalar_t>> reduce{};
  CountedTermItems<SplatChunkFunctor<scalar_t, V>> csplat{};
  CountedTermItems<SplatChunkFunctor<scalar_t, V, false, true>> csplat_sums{};
  CountedTermItems<SplatReduceFunctor<scalar_t>> creduce{};
  splat.T = splat_sums.T = reduce.T = csplat.T = csplat_sums.T = creduce.T = T;
  // counts of a counted lattice's vertices or chunks (nullptr: the host's n)
  auto vertex_counts = [](const Lattice& lat) { return lat.counted ? lat.num_vertices.data_ptr<int32_t>() : nullptr; };
  int max_d = 0;
  for (int t = 0; t < T; ++t) {
    const Lattice& lat = terms.lats[t];
    scalar_t* const qp = q.data_ptr<scalar_t>();
    scalar_t* const pp = part[t].data_ptr<scalar_t>();
    splat.f[t] = chunk_splat<scalar_t, V, false, false>(lat, qp, ptr(terms.pre[t]), pp, W, nullptr, nullptr, nullptr,
                                                        nullptr, nullptr);
    splat.n[t] = lat.K;
    int32_t* const cnt = fuse ? counters.data_ptr<int32_t>() + counter_at : nullptr;
    if (fuse) counter_at += B * lat.M * (W / V);
    splat_sums.f[t] = chunk_splat<scalar_t, V, false, true>(lat, qp, ptr(terms.pre[t]), pp, W, nullptr, nullptr, cnt,
                                                            bufa[t].data_ptr<scalar_t>(), nullptr);
    splat_sums.n[t] = lat.K;
    reduce.f[t] = SplatReduceFunctor<scalar_t>{part[t].data_ptr<scalar_t>(),
                                               lat.chunk_offsets.data_ptr<int32_t>(),
                                               lat.num_vertices.data_ptr<int32_t>(),
                                               bufa[t].data_ptr<scalar_t>(),
                                               lat.M,
                                               lat.K,
                                               W,
                                               lat.B};
    reduce.n[t] = lat.M;
    csplat.f[t] = splat.f[t];
    csplat.counts[t] = lat.counted ? lat.num_chunks.data_ptr<int32_t>() : nullptr;
    csplat.n[t] = lat.K;
    csplat.LB[t] = lat.B;
    csplat_sums.f[t] = splat_sums.f[t];
    csplat_sums.counts[t] = csplat.counts[t];
    csplat_sums.n[t] = lat.K;
    csplat_sums.LB[t] = lat.B;
    creduce.f[t] = reduce.f[t];
    creduce.counts[t] = vertex_counts(lat);
    creduce.n[t] = lat.M;
    creduce.LB[t] = lat.B;
    max_d = std::max(max_d, lat.d);
  }
  // One launch per axis j (blur), or per two axes j, j + 1 (blur2: BlurPairFunctor; knob blur_pairs),
  // each term taking the axes it has.
  const bool pairs = blur_pairs();
  std::vector<TermItems<BlurFunctor<scalar_t, VR>>> blur;
  std::vector<TermItems<BlurPairFunctor<scalar_t, VR>>> blur2;
  std::vector<CountedTermItems<BlurFunctor<scalar_t, VR>>> cblur;
  std::vector<CountedTermItems<BlurPairFunctor<scalar_t, VR>>> cblur2;
  std::vector<scalar_t*> cur(T), nxt(T);
  for (int t = 0; t < T; ++t) {
    cur[t] = bufa[t].data_ptr<scalar_t>();
    nxt[t] = bufb[t].data_ptr<scalar_t>();
  }
  for (int j = 0; j <= max_d; j += pairs ? 2 : 1) {
    TermItems<BlurFunctor<scalar_t, VR>> bj{};
    TermItems<BlurPairFunctor<scalar_t, VR>> bj2{};
    CountedTermItems<BlurFunctor<scalar_t, VR>> cbj{};
    CountedTermItems<BlurPairFunctor<scalar_t, VR>> cbj2{};
    for (int t = 0; t < T; ++t) {
      const Lattice& lat = terms.lats[t];
      if (j > lat.d) continue;
      const int32_t* nbr = lat.neighbors.data_ptr<int32_t>();
      const int32_t* nv = lat.num_vertices.data_ptr<int32_t>();  // an image's unused rows are skipped
      if (pairs) {
        const int j2 = j + 1 <= lat.d ? j + 1 : -1;
        bj2.f[bj2.T] = BlurPairFunctor<scalar_t, VR>{cur[t], nxt[t], nbr, lat.M, W, lat.d, j, j2, lat.B, nv};
        bj2.n[bj2.T++] = lat.M;
        cbj2.f[cbj2.T] = bj2.f[bj2.T - 1];
        cbj2.counts[cbj2.T] = vertex_counts(lat);
        cbj2.LB[cbj2.T] = lat.B;
        cbj2.n[cbj2.T++] = lat.M;
      } else {
        BlurFunctor<scalar_t, VR> fb{cur[t], nxt[t], nbr, lat.M, W, lat.d, j, lat.B};
        fb.num_vertices = nv;
        bj.f[bj.T] = fb;
        bj.n[bj.T++] = lat.M;
        cbj.f[cbj.T] = fb;
        cbj.counts[cbj.T] = vertex_counts(lat);
        cbj.LB[cbj.T] = lat.B;
        cbj.n[cbj.T++] = lat.M;
      }
      std::swap(cur[t], nxt[t]);
    }
    if (pairs) {
      blur2.push_back(bj2);
      cblur2.push_back(cbj2);
    } else {
      blur.push_back(bj);
      cblur.push_back(cbj);
    }
  }
  // The slice takes the vertex rows four channels at a time (fewer registers) unless the knob says
  // whole rows; the same bits either way.
  const bool group4 = W > 4 && tuning::get(tuning::kSliceGroup4) != 0;
  auto slice = [&] {
    if (group4) {
      exec.for_each_item(B, N, 1, MeanFieldSliceFunctor<scalar_t, W, 4>{f}, 256);
    } else {
      exec.for_each_item(B, N, 1, MeanFieldSliceFunctor<scalar_t, W>{f}, 256);
    }
  };
  // The tiled splat (block_splat): every term's tile tables; the functor is made at each step from f,
  // whose blurred rows change after the first.
  std::array<TileSplatTerm<scalar_t>, kMaxFusedTerms> tile_terms{};
  const int64_t ntiles = tiled ? (N + P - 1) / P : 0;
  if (block_splat) {
    for (int t = 0; t < T; ++t) {
      const Lattice& lat = terms.lats[t];
      tile_terms[t] = TileSplatTerm<scalar_t>{lat.tile_offsets.data_ptr<int32_t>(),
                                              lat.chunk_begin.data_ptr<int32_t>(),
                                              lat.chunk_end.data_ptr<int32_t>(),
                                              lat.chunk_slot.data_ptr<int32_t>(),
                                              lat.splat_pixel.data_ptr<int32_t>(),
                                              lat.splat_weight.data_ptr<scalar_t>(),
                                              ptr(terms.pre[t]),
                                              part[t].data_ptr<scalar_t>(),
                                              lat.E,
                                              lat.K,
                                              lat.B,
                                              lat.chunk_vertex.data_ptr<int32_t>(),
                                              lat.tile_entry_local.data_ptr<int32_t>()};
    }
  }
  auto block_step = [&] {
    auto run = [&](auto slice_proto, auto mode) {
      TileMeanFieldFunctor<scalar_t, W, V, decltype(slice_proto), decltype(mode)::value> k{};
      k.slice = slice_proto;
      k.R = 2 * P;
      k.q = q.data_ptr<scalar_t>();
      for (int t = 0; t < T; ++t) k.terms[t] = tile_terms[t];
      k.T = T;
      k.N = N;
      k.P = P;
      k.ntiles = ntiles;
      exec.for_each_block(B, ntiles, smem, k);
    };
    using One = std::integral_constant<int, 1>;
    using Two = std::integral_constant<int, 2>;
    using Three = std::integral_constant<int, 3>;
    if (!block_slice) {
      run(MeanFieldSliceFunctor<scalar_t, W>{f}, One{});
    } else if (group4) {
      if (tile_kernel == 3) {
        run(MeanFieldSliceFunctor<scalar_t, W, 4>{f}, Three{});
      } else {
        run(MeanFieldSliceFunctor<scalar_t, W, 4>{f}, Two{});
      }
    } else if (tile_kernel == 3) {
      run(MeanFieldSliceFunctor<scalar_t, W>{f}, Three{});
    } else {
      run(MeanFieldSliceFunctor<scalar_t, W>{f}, Two{});
    }
  };
  // Counted: each stage's per-image totals (constant over the steps), then its launches over them.
  std::vector<at::Tensor> totals;
  auto total_of = [&](const auto& items) -> const int32_t* {
    TORCH_CHECK(items.capacity() < (int64_t(1) << 31), "dense_crf: too many lattice points for a counted launch");
    totals.push_back(at::empty({B}, terms.lats[0].entry_vertex.options()));
    int32_t* out = totals.back().data_ptr<int32_t>();
    exec.for_each(B, TermTotalsFunctor<std::decay_t<decltype(items.f[0])>>{items, out}, 256);
    return out;
  };
  struct CountedStage {
    const int32_t* totals;
    int64_t cap;
  };
  CountedStage s_splat{}, s_reduce{};
  std::vector<CountedStage> s_blur, s_blur2;
  if (counted) {
    s_splat = {total_of(csplat), csplat.capacity()};  // csplat_sums's too (the same counts)
    if (!fuse) s_reduce = {total_of(creduce), creduce.capacity()};
    for (const auto& c : cblur) s_blur.push_back({total_of(c), c.capacity()});
    for (const auto& c : cblur2) s_blur2.push_back({total_of(c), c.capacity()});
  }
  if (block_splat) note_tiled_steps(iterations);
  if (traj && block_slice) *traj = at::Tensor();
  const bool keep_traj = traj && traj->defined();
  if (!block_slice) slice();  // q = softmax(-U) (block_slice: in the first step's blocks)
  if (keep_traj) traj->select(0, 0).copy_(q.narrow(2, 0, L));
  for (int64_t it = 0; it < iterations; ++it) {
    if (block_splat) {  // the splat (kernels 2 and 3: the slice too), one block per tile
      block_step();
    } else if (counted && fuse) {  // the chunk sums too
      exec.for_each_counted(B, s_splat.totals, 0, s_splat.cap, W / V, csplat_sums, 256);
    } else if (counted) {
      exec.for_each_counted(B, s_splat.totals, 0, s_splat.cap, W / V, csplat, 256);
    } else if (fuse) {  // the chunk sums too
      exec.for_each_item(B, splat_sums.total(), W / V, splat_sums, 256);
    } else {
      exec.for_each_item(B, splat.total(), W / V, splat, 256);
    }
    if (counted) {
      if (!fuse) exec.for_each_counted(B, s_reduce.totals, 0, s_reduce.cap, W, creduce, 256);
      for (size_t k = 0; k < cblur.size(); ++k)
        exec.for_each_counted(B, s_blur[k].totals, 0, s_blur[k].cap, W / VR, cblur[k], 256);
      for (size_t k = 0; k < cblur2.size(); ++k)
        exec.for_each_counted(B, s_blur2[k].totals, 0, s_blur2[k].cap, W / VR, cblur2[k], 256);
    } else {
      if (!fuse) exec.for_each_item(B, reduce.total(), W, reduce, 256);
      for (const auto& bj : blur) exec.for_each_item(B, bj.total(), W / VR, bj, 256);
      for (const auto& bj : blur2) exec.for_each_item(B, bj.total(), W / VR, bj, 256);
    }
    for (int t = 0; t < T; ++t) f.terms[t].blurred = cur[t];
    if (it == iterations - 1) {
      f.q = nullptr;
      f.q_lmajor = q_out.data_ptr<scalar_t>();
    }
    if (!block_slice || it == iterations - 1) slice();
    if (keep_traj && it < iterations - 1) traj->select(0, it + 1).copy_(q.narrow(2, 0, L));
  }
  if (keep_traj) traj->select(0, iterations).copy_(q_out.transpose(1, 2));
}

// The tile size the dense CRF's GPU lattices are cut by (knob mean_field_tile, at most the image;
// 0: none), for the forward and the backward alike, so that they share cached lattices.
template <class Exec>
int64_t crf_chunk_tile(int64_t N) {
  return Exec::kSortCsr ? std::min(tuning::get(tuning::kMeanFieldTile), N) : 0;
}

// Bytes of a dense CRF term's lattice rows per vertex: two blur buffers and the chunk sums, rows of
// L labels padded as the fused mean field pads them, and the fused chunk sums' counters (an int32
// per 4 channels, or per channel below 16) (for use_counted).
inline int64_t crf_row_bytes(int64_t L, const at::Tensor& unary) {
  const int64_t W = L <= 4 ? 4 : (L + 7) / 8 * 8;
  return 3 * W * static_cast<int64_t>(unary.element_size()) + 4 * (W >= 16 ? W / 4 : W);
}

// Dense-CRF mean field (densecrf semantics).
//   unary     (B, L, N) energies (-log p)
//   features  T tensors (B_t, d_t, N), already divided by their standard deviations; B_t divides B
//             and image b uses the lattice of features[t][b % B_t] (one lattice shared by several
//             unaries: RRM's two pseudo-label CRFs per image, one Gaussian lattice for a whole batch)
//   compat    (T, L, L) energy-convention compatibility (Potts w -> -w I)
//   diagonal  T flags: compat[t] is diagonal (cheaper path)
//   norms     per term: 0 symmetric, 1 after, 2 before, 3 none (densecrf's NORMALIZE_* semantics)
//   keep      per term (or empty): features[t] is constant, its lattice may be cached (crf_terms)
// Returns Q (B, L, N).
template <class Exec>
at::Tensor dense_crf(const Exec& exec, const at::Tensor& unary, const std::vector<at::Tensor>& features,
                     const at::Tensor& compat, const std::vector<bool>& diagonal, const std::vector<int64_t>& norms,
                     int64_t iterations, int64_t chunk, const std::vector<bool>& keep = {}) {
  const HandoffClaim claim = handoff_claim();  // dense_crf's autograd: the lattices go to its backward
  const int64_t B = unary.size(0), L = unary.size(1), N = unary.size(2);
  const int64_t T = static_cast<int64_t>(features.size());
  if (B == 0 || N == 0) return at::empty({B, L, N}, unary.options());
  // Diagonal compatibilities only, at most kMaxFusedTerms terms, L <= 32: the fused mean fields
  // (CPU: mean_field_cpu; CUDA and its emulation: mean_field_gpu).
  bool fused = iterations > 0 && T > 0 && T <= kMaxFusedTerms && L <= 32;
  for (int64_t t = 0; t < T; ++t) fused = fused && diagonal[t];
  at::Tensor neg_unary, q;  // (B, N, L) for the generic loop
  if (!fused) {
    neg_unary = unary.neg().transpose(1, 2).contiguous();
    q = at::empty_like(neg_unary);
  }
  at::Tensor q_lmajor;  // (B, L, N), written directly by the fused mean fields
  // Q^0 .. Q^S (S + 1, B, N, L) for the backward, when dense_crf's autograd node asks (a record
  // scope wanting the trajectory): the backward then sweeps back without rerunning the steps.
  at::Tensor traj;
  if (claim.record && claim.record->want_trajectory && iterations > 0 && T > 0 && cache_ok(exec))
    traj = at::empty({iterations + 1, B, N, L}, unary.options());
  AT_DISPATCH_FLOATING_TYPES(unary.scalar_type(), "rrm_dense_crf", [&] {
    if (!fused) softmax_rows<Exec, scalar_t>(exec, neg_unary, q);
    if (iterations == 0 || T == 0) return;
    auto compat_c = compat.contiguous();
    CrfTerms terms = crf_terms<Exec, scalar_t>(exec, features, compat_c, diagonal, norms, N, unary.options(), chunk,
                                               fused ? 0 : B, keep, /*need_coefs=*/!(fused && Exec::kSortCsr),
                                               crf_row_bytes(L, unary), B, fused ? crf_chunk_tile<Exec>(N) : 0, claim);
    at::Tensor* tr = traj.defined() ? &traj : nullptr;
    if constexpr (Exec::kSortCsr) {
      if (fused) {
        q_lmajor = at::empty({B, L, N}, unary.options());
        if (L <= 4) return mean_field_gpu<Exec, scalar_t, 4>(exec, terms, compat_c, unary, q_lmajor, iterations, tr);
        switch ((L + 7) / 8) {
          case 1:
            return mean_field_gpu<Exec, scalar_t, 8>(exec, terms, compat_c, unary, q_lmajor, iterations, tr);
          case 2:
            return mean_field_gpu<Exec, scalar_t, 16>(exec, terms, compat_c, unary, q_lmajor, iterations, tr);
          case 3:
            return mean_field_gpu<Exec, scalar_t, 24>(exec, terms, compat_c, unary, q_lmajor, iterations, tr);
          default:
            return mean_field_gpu<Exec, scalar_t, 32>(exec, terms, compat_c, unary, q_lmajor, iterations, tr);
        }
      }
    }
#if !defined(__CUDACC__)
    if constexpr (std::is_same_v<Exec, CpuExec>) {
      if (fused) {
        q_lmajor = empty_large({B, L, N}, unary.options(), kCachedOutputBytes);
        const auto& lats = terms.lats;
        const auto &pre = terms.pre, &post = terms.post, &coefs = terms.coefs;
        // Q^0 .. Q^{S-1} written by the steps, Q^S from the output
        const at::Tensor head = traj.defined() ? traj.narrow(0, 0, iterations) : at::Tensor();
        auto run = [&](auto wg) {
          mean_field_cpu_units<scalar_t, decltype(wg)::value>(lats, pre, post, coefs, unary, q_lmajor, iterations,
                                                              head);
        };
        if (L <= 4)
          run(std::integral_constant<int, 4>{});
        else if (L <= 8)
          run(std::integral_constant<int, 8>{});
        else if (L <= 16)
          run(std::integral_constant<int, 16>{});
        else if (L <= 24)
          run(std::integral_constant<int, 24>{});
        else
          run(std::integral_constant<int, 32>{});
        if (traj.defined()) traj.select(0, iterations).copy_(q_lmajor.transpose(1, 2));
        return;
      }
    }
#endif
    auto acc = at::empty_like(neg_unary);
    at::Tensor m;  // full-matrix terms only
    if (std::find(diagonal.begin(), diagonal.end(), false) != diagonal.end()) m = at::empty_like(neg_unary);
    if (traj.defined()) traj.select(0, 0).copy_(q);
    for (int64_t it = 0; it < iterations; ++it) {
      mean_field_step<Exec, scalar_t>(exec, terms, compat_c, diagonal, neg_unary, q, acc, m, q);
      if (traj.defined()) traj.select(0, it + 1).copy_(q);
    }
  });
  if (claim.record && traj.defined()) claim.record->trajectory = traj;
  if (q_lmajor.defined()) return q_lmajor;
  return q.transpose(1, 2).contiguous();
}

// ---------------------------------------------------------------------------------------------
// Dense-CRF backward (CRF-as-RNN: backpropagation through the unrolled mean-field iterations).

// Softmax backward over the last dimension of (rows, L): ga = q * (g - rowsum(g * q)), and
// grad_unary -= ga (the unary enters as -U). ga may be undefined (not kept). The CPU runs one
// functor pass; CUDA and its emulation ATen's kernel, as softmax_rows does for the forward (a
// thread-per-row softmax measured 6x slower than ATen's warp-per-row kernel on an H200).
template <class Exec, typename scalar_t>
void softmax_backward_rows(const Exec& exec, const at::Tensor& g, const at::Tensor& q, at::Tensor ga,
                           at::Tensor& grad_unary) {
  const int64_t L = q.size(-1), rows = q.numel() / L;
  if constexpr (std::is_same_v<Exec, CpuExec>) {
    exec.for_each(rows,
                  SoftmaxBackwardFunctor<scalar_t>{g.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(),
                                                   ga.defined() ? ga.data_ptr<scalar_t>() : nullptr,
                                                   grad_unary.data_ptr<scalar_t>(), L},
                  256);
    return;
  }
  if (!ga.defined()) ga = at::empty_like(q);
  at::_softmax_backward_data_out(ga, g, q, /*dim=*/-1, q.scalar_type());
  grad_unary.sub_(ga);
}

// Gradients of dense_crf w.r.t. the unary and the compatibilities (not the features).
//   grad (B, L, N) = dL/dQ^T; the other arguments as dense_crf's.
// Returns (grad_unary (B, L, N), grad_compat (T, L, L); only the diagonal of a diagonal term's
// matrix is used by the forward, so its off-diagonal gradient is 0).
//
// Forward (per image, rows i = pixels): Q^0 = softmax(-U); for s = 1..S (S = iterations)
//   A^s = -U - sum_t m_t^s C_t^T,  m_t^s = post_t * K_t (pre_t * Q^{s-1}),  Q^s = softmax(A^s).
// Backward, g = dL/dQ^S: for s = S..1
//   gA = Q^s * (g - rowsum(g * Q^s));  dU -= gA;  dC_t -= sum_i gA_i (x) m_t,i^s (recomputed);
//   g <- -sum_t pre_t * K_t^T (post_t * (gA C_t)),  K_t^T = the filter with the blur order reversed;
// finally dU -= softmax_backward(g, Q^0). Every lattice is built once; the forward is rerun with
// dense_crf's generic loop and keeps Q^0..Q^S ((S+1) B N L values) for the reverse sweep. The
// (L, L) reductions are ATen matrix products (no host synchronisation on CUDA beyond build()'s).
template <class Exec>
std::tuple<at::Tensor, at::Tensor> dense_crf_backward(const Exec& exec, const at::Tensor& grad, const at::Tensor& unary,
                                                      const std::vector<at::Tensor>& features, const at::Tensor& compat,
                                                      const std::vector<bool>& diagonal,
                                                      const std::vector<int64_t>& norms, int64_t iterations,
                                                      int64_t chunk, bool compat_grad = true,
                                                      const std::vector<bool>& keep = {}) {
  RRM_NO_AUTOCAST();                           // grad_compat's products (at::mm) in the unary's dtype
  const HandoffClaim claim = handoff_claim();  // the forward's lattices, from dense_crf's autograd node
  const int64_t B = unary.size(0), L = unary.size(1), N = unary.size(2);
  const int64_t T = static_cast<int64_t>(features.size());
  const auto opt = unary.options();
  auto grad_compat = at::zeros({T, L, L}, opt);
  if (B == 0 || N == 0) return {at::zeros_like(unary, at::MemoryFormat::Contiguous), grad_compat};
  const int64_t S = T == 0 ? 0 : iterations;  // without pairwise terms Q = Q^0 = softmax(-U)
  const int64_t BN = B * N;
  auto g = at::empty({B, N, L}, opt);  // a copy: g is overwritten by the sweep
  g.copy_(grad.transpose(1, 2));
  auto grad_acc = at::zeros({B, N, L}, opt);  // dL/dU, pixel-major
  // Q^0 .. Q^S: the forward's, when its autograd node handed them over (dense_crf's trajectory),
  // else recomputed here (the forward's steps rerun on its lattices)
  at::Tensor qs;
  const at::Tensor* handed = claim.supply ? &claim.supply->trajectory : nullptr;
  const bool have_qs = handed && handed->defined() && handed->sizes() == at::IntArrayRef{S + 1, B, N, L} &&
                       handed->scalar_type() == unary.scalar_type() && handed->device() == unary.device();
  qs = have_qs ? *handed : at::empty({S + 1, B, N, L}, opt);
  at::Tensor neg_unary;  // (B, N, L), for the rerun only
  if (!have_qs) neg_unary = unary.neg().transpose(1, 2).contiguous();
  if (!have_qs && S > 0) note_crf_rerun();
  AT_DISPATCH_FLOATING_TYPES(unary.scalar_type(), "rrm_dense_crf_backward", [&] {
    auto q0 = qs.select(0, 0);
    if (!have_qs) softmax_rows<Exec, scalar_t>(exec, neg_unary, q0);
    if (S > 0) {
      auto compat_c = compat.contiguous();
      // the forward's lattices (handed over by its node, or its cached ones, with their normalisers;
      // else built again): chunks cut by the same tiles (mean_field_tile)
      CrfTerms terms =
          crf_terms<Exec, scalar_t>(exec, features, compat_c, diagonal, norms, N, opt, chunk, B, keep,
                                    /*need_coefs=*/true, crf_row_bytes(L, unary), B, crf_chunk_tile<Exec>(N), claim);
      auto acc = at::empty({B, N, L}, opt);
      auto m = at::empty({B, N, L}, opt);
      for (int64_t s = 1; s <= S && !have_qs; ++s) {
        auto qn = qs.select(0, s);
        mean_field_step<Exec, scalar_t>(exec, terms, compat_c, diagonal, neg_unary, qs.select(0, s - 1), acc, m, qn);
      }
      // Reverse sweep. acc holds gA, g_next the next g; h = -(gA C_t) for full matrices.
      auto& ga = acc;
      auto g_next = at::empty({B, N, L}, opt);
      // full-matrix terms only: h, unit slice coefficients (out += post * s), and the transposed
      // matrices (h = -(gA C_t) is MatVecSubFunctor's acc -= C_t^T gA on a zeroed acc)
      at::Tensor h, ones, compat_t;
      if (std::find(diagonal.begin(), diagonal.end(), false) != diagonal.end()) {
        h = at::empty({B, N, L}, opt);
        ones = at::ones({L}, opt);
        compat_t = compat_c.transpose(1, 2).contiguous();
      }
      auto ptr = [](const at::Tensor& x) -> const scalar_t* { return x.defined() ? x.data_ptr<scalar_t>() : nullptr; };
      for (int64_t s = S; s >= 1; --s) {
        const auto q = qs.select(0, s), q_prev = qs.select(0, s - 1);
        softmax_backward_rows<Exec, scalar_t>(exec, g, q, ga, grad_acc);
        g_next.zero_();
        const auto ga2 = ga.view({BN, L});
        for (int64_t t = 0; t < T; ++t) {
          // m_t^s = post_t * K_t (pre_t * Q^{s-1}), recomputed, for the compatibility's gradient only
          at::Tensor m2;
          if (compat_grad) {
            filter<Exec, scalar_t>(exec, terms.lats[t], q_prev.data_ptr<scalar_t>(), ptr(terms.pre[t]),
                                   m.data_ptr<scalar_t>(), ptr(terms.post[t]), nullptr, L, false, terms.wss[t]);
            m2 = m.view({BN, L});
          }
          if (diagonal[t]) {
            if (compat_grad) grad_compat[t].diagonal().sub_(ga2.mul(m2).sum(0));
            // g_next_l += -c_ll * pre_t * K_t^T (post_t * gA_l): coefs[t] = -diag(C_t)
            filter<Exec, scalar_t>(exec, terms.lats[t], ga.data_ptr<scalar_t>(), ptr(terms.post[t]),
                                   g_next.data_ptr<scalar_t>(), ptr(terms.pre[t]), terms.coefs[t].data_ptr<scalar_t>(),
                                   L, true, terms.wss[t]);
          } else {
            if (compat_grad) grad_compat[t].sub_(at::mm(ga2.t(), m2));
            h.zero_();
            exec.for_each(BN,
                          MatVecSubFunctor<scalar_t>{ga.data_ptr<scalar_t>(), compat_t[t].data_ptr<scalar_t>(),
                                                     h.data_ptr<scalar_t>(), L},
                          256);
            // g_next += pre_t * K_t^T (post_t * h)
            filter<Exec, scalar_t>(exec, terms.lats[t], h.data_ptr<scalar_t>(), ptr(terms.post[t]),
                                   g_next.data_ptr<scalar_t>(), ptr(terms.pre[t]), ones.data_ptr<scalar_t>(), L, true,
                                   terms.wss[t]);
          }
        }
        std::swap(g, g_next);
      }
    }
    softmax_backward_rows<Exec, scalar_t>(exec, g, q0, at::Tensor(), grad_acc);
  });
  return {grad_acc.transpose(1, 2).contiguous(), grad_compat};
}

}  // namespace lattice
}  // namespace rrm
