// Per-element math of the permutohedral lattice (Adams, Baek & Davis, Eurographics 2010), written
// once as RRM_HOST_DEVICE functors. The CPU build (CpuExec, EmulatedCudaExec) and the CUDA build
// (CudaExec) run these same bodies; lattice_impl.h strings them together.
//
// Conventions (identical to Kraehenbuehl's densecrf, so that dense_crf matches pydensecrf):
//   d            feature dimension, 1 <= d <= kMaxDim; points live on the plane H_d in R^{d+1}
//   entry e      pixel i's r-th simplex corner, e = i * (d + 1) + r, 0 <= r <= d
//   key          the first d integer coordinates of a lattice point (the last one is implied, since
//                the coordinates of a point of H_d sum to 0); int32 here, int16 in densecrf, which
//                silently wraps for large coordinates -- the Python layer refuses features that
//                would overflow int32 instead.
//   vertex v     a distinct lattice point of one image, 0 <= v < num_vertices[b]
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/macros.h"

namespace rrm {
namespace lattice {

constexpr int kMaxDim = 16;

// Scale of feature k before elevation: sqrt(2/3) * (d+1) / sqrt((k+1)(k+2)). The (k+1)(k+2) term
// is the diagonal of the elevation matrix E (Adams et al. p.5); sqrt(2/3)(d+1) makes the blur's
// expected standard deviation one lattice step (p.6), i.e. the "accurate" variant densecrf uses.
// Rounded as densecrf's Permutohedral::init rounds it: inv_std_dev = sqrt(2/3)(d+1) stored as a
// float, then 1 / sqrt((k+2)(k+1)) * inv_std_dev in double (and the caller's cast to the feature
// type). One ulp matters: points whose elevated residuals tie (integer-like features, e.g. x / 1)
// fall in other simplices, which creates other zero-weight vertices and, on sparse lattices, other
// blur paths (Q off by up to 0.2 against pydensecrf at bilateral sxy = 1 with the exact double).
RRM_HOST_DEVICE double feature_scale(int k, int d) {
  const float inv_std_dev = static_cast<float>(sqrt(2.0 / 3.0) * (d + 1));
  return 1.0 / sqrt(static_cast<double>((k + 2) * (k + 1))) * static_cast<double>(inv_std_dev);
}

// Slice normalisation of the [1/2, 1, 1/2] blur along d+1 axes: alpha = 1 / (1 + 2^-d).
RRM_HOST_DEVICE double slice_alpha(int d) { return 1.0 / (1.0 + pow(2.0, -d)); }

// A key's hash: hash_mix(hash_linear(key)). The linear part, sum_i key[i] P^(d-i) (mod 2^32), moves
// by a constant per lattice axis between a key and its blur neighbours (the CPU's one-pass build
// forms the neighbours' hashes from it: host_neighbors).
constexpr uint32_t kHashPrime = 2531011u;
RRM_HOST_DEVICE uint32_t hash_linear(const int32_t* key, int d) {
  uint32_t h = 0;
  for (int i = 0; i < d; ++i) {
    h += static_cast<uint32_t>(key[i]);
    h *= kHashPrime;
  }
  return h;
}

RRM_HOST_DEVICE uint32_t hash_mix(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  return h;
}

RRM_HOST_DEVICE uint32_t hash_key(const int32_t* key, int d) { return hash_mix(hash_linear(key, d)); }

RRM_HOST_DEVICE bool keys_equal(const int32_t* a, const int32_t* b, int d) {
  for (int i = 0; i < d; ++i)
    if (a[i] != b[i]) return false;
  return true;
}

// ---------------------------------------------------------------------------------------------
// 1. Embed: items (pixel i, corners [c0, c1)). Elevates the feature vector onto H_d, finds the
//    enclosing simplex (rounding to the nearest 0-coloured point, ranking the residuals, fixing up
//    the sum), and writes the keys and barycentric weights of corners c0..c1-1. The CPU takes a
//    pixel's d+1 corners in one call; CUDA runs one thread per corner (each recomputes the pixel's
//    simplex, a few dozen instructions), so that a warp's stores of keys and weights land on a few
//    consecutive cache lines instead of 32 lines (d+1)*d*4 bytes apart, and the corner's barycentric
//    coordinate is picked by predicated selects instead of an array indexed by rank (which put the
//    array in local memory: 72 bytes of stack per thread at d = 5).
// kD > 0 fixes d at compile time (the loops unroll; used for the common d = 2, 3, 5); kD = 0 reads
// d_runtime.
// Bound on |elevated coordinate| that keeps the keys' integer conversions in range (rounded keys
// stay below 2^30 + d + 1 < 2^31). The Python layer refuses features whose elevated coordinates could
// pass it (functional._check_key_range bounds them from above), so the guard never fires for them.
constexpr double kMaxKeyCoord = double(1 << 30);

template <typename scalar_t, int kD = 0>
struct EmbedFunctor {
  const scalar_t* features;  // (B, d, N) contiguous
  int32_t* keys;             // (B, N*(d+1), d)
  scalar_t* weights;         // (B, N*(d+1))
  scalar_t scale[kMaxDim];   // feature_scale(k, d) rounded to scalar_t, as densecrf does (by value:
                             // no host-to-device copy per build)
  int64_t N;
  int d_runtime;

  // The enclosing simplex of pixel i of image b: the 0-coloured point rem0, the residuals' ranks,
  // the (scaled) residuals v and whether the pixel is refused (bad: no weight). Shared by every path.
  RRM_HOST_DEVICE void simplex(int64_t b, int64_t i, int32_t* rem0, int* rank, scalar_t* v, bool& bad) const {
    const int d = kD > 0 ? kD : d_runtime;
    const scalar_t* f = features + b * d * N + i;
    scalar_t elevated[kMaxDim + 1];
    // Elevation e = E f: e_j = sum_{k>=j} c_k - j c_{j-1}, with c_k = f_k * scale_k.
    scalar_t sm = 0;
    for (int j = d; j > 0; --j) {
      const scalar_t cf = f[(j - 1) * N] * scale[j - 1];
      elevated[j] = sm - static_cast<scalar_t>(j) * cf;
      sm += cf;
    }
    elevated[0] = sm;
    // Nearest 0-coloured lattice point: round every coordinate to a multiple of d+1 (ties down).
    const scalar_t down_factor = scalar_t(1) / static_cast<scalar_t>(d + 1);
    const scalar_t up_factor = static_cast<scalar_t>(d + 1);
    int sum = 0;
    bad = false;
    for (int k = 0; k <= d; ++k) {
      scalar_t q = down_factor * elevated[k];
      // Features the Python layer refuses (NaN, Inf, or so large that the keys overflow int32) must
      // not reach the integer conversions below when the op is called directly: such a coordinate
      // is taken as 0 and the pixel's weights as 0 (it neither sends nor receives anything, and
      // every index stays in range). No-op otherwise.
      if (!(elevated[k] >= static_cast<scalar_t>(-kMaxKeyCoord) &&
            elevated[k] <= static_cast<scalar_t>(kMaxKeyCoord))) {
        q = 0;
        elevated[k] = 0;
        bad = true;
      }
      const scalar_t up = ceil(q) * up_factor;
      const scalar_t dn = floor(q) * up_factor;
      rem0[k] = static_cast<int32_t>((up - elevated[k] < elevated[k] - dn) ? up : dn);
      sum += rem0[k] / (d + 1);  // exact: rem0 is a multiple of d+1
    }
    // Rank of each residual (descending); ties broken as densecrf does. Branch-free: the
    // comparisons are data-dependent coin flips (mispredicted branches dominated the CPU embed).
    scalar_t res[kMaxDim + 1];
    for (int k = 0; k <= d; ++k) {
      rank[k] = 0;
      res[k] = elevated[k] - static_cast<scalar_t>(rem0[k]);
    }
    for (int k = 0; k < d; ++k) {
      for (int j = k + 1; j <= d; ++j) {
        const int less = res[k] < res[j] ? 1 : 0;
        rank[k] += less;
        rank[j] += 1 - less;
      }
    }
    // If the rounded point is off the plane (sum != 0), move the extreme coordinates back.
    for (int k = 0; k <= d; ++k) {
      rank[k] += sum;
      if (rank[k] < 0) {
        rank[k] += d + 1;
        rem0[k] += d + 1;
      } else if (rank[k] > d) {
        rank[k] -= d + 1;
        rem0[k] -= d + 1;
      }
      rank[k] = rank[k] < 0 ? 0 : (rank[k] > d ? d : rank[k]);  // only a replaced coordinate needs it
    }
    // The residuals scaled to barycentric units (all_weights, bary_slot): every path forms the
    // weights from these in the order of k, so the weights are the same bits on every path.
    for (int k = 0; k <= d; ++k) v[k] = (elevated[k] - static_cast<scalar_t>(rem0[k])) * down_factor;
  }

  // The barycentric weights of all d + 1 corners (bary[0..d]; bary needs d + 2 slots): residual k
  // adds v_k to slot d - rank[k] and subtracts it from slot d - rank[k] + 1, slot d + 1 wrapping
  // onto slot 0 (Adams et al. p.10); every slot receives its terms in the order of k, as bary_slot.
  RRM_HOST_DEVICE static void all_weights(int d, const int* rank, const scalar_t* v, scalar_t* bary) {
    for (int k = 0; k <= d + 1; ++k) bary[k] = 0;
    for (int k = 0; k <= d; ++k) {
      bary[d - rank[k]] += v[k];
      bary[d - rank[k] + 1] -= v[k];
    }
    bary[0] += scalar_t(1) + bary[d + 1];
  }

  // Every corner of pixel i of image b into the caller's arrays (the CPU's one-pass build): keys
  // (d + 1) x d and weights (d + 1), the same values as operator() writes to keys and weights.
  void corners(int64_t b, int64_t i, int32_t* key_out, scalar_t* w_out) const {
    const int d = kD > 0 ? kD : d_runtime;
    int32_t rem0[kMaxDim + 1];
    int rank[kMaxDim + 1];
    scalar_t v[kMaxDim + 1], bary[kMaxDim + 2];
    bool bad;
    simplex(b, i, rem0, rank, v, bad);
    all_weights(d, rank, v, bary);
    for (int r = 0; r <= d; ++r) {
      corner_key(key_out + r * d, r, d, rem0, rank);
      w_out[r] = bad ? scalar_t(0) : bary[r];
    }
  }

  RRM_HOST_DEVICE void operator()(int64_t b, int64_t i, int64_t c0, int64_t c1) const {
    const int d = kD > 0 ? kD : d_runtime;
    int32_t rem0[kMaxDim + 1];
    int rank[kMaxDim + 1];
    scalar_t v[kMaxDim + 1];
    bool bad;
    simplex(b, i, rem0, rank, v, bad);
    const int64_t E = N * (d + 1);
#if !defined(__CUDA_ARCH__)
    if (c1 - c0 == d + 1) {  // every corner of the pixel (the CPU): one pass over k
      scalar_t bary[kMaxDim + 2];
      all_weights(d, rank, v, bary);
      for (int r = 0; r <= d; ++r) write_corner(b * E + i * (d + 1) + r, r, d, rem0, rank, bad ? scalar_t(0) : bary[r]);
      return;
    }
#endif
    for (int64_t r64 = c0; r64 < c1; ++r64) {  // one corner per thread (CUDA, emulated)
      const int r = static_cast<int>(r64);
      scalar_t w = bary_slot(r, d, rank, v);
      if (r == 0) w += scalar_t(1) + bary_slot(d + 1, d, rank, v);
      write_corner(b * E + i * (d + 1) + r, r, d, rem0, rank, bad ? scalar_t(0) : w);
    }
  }

  // Slot s of the barycentric accumulation, its terms in the order of k.
  RRM_HOST_DEVICE static scalar_t bary_slot(int s, int d, const int* rank, const scalar_t* v) {
    scalar_t acc = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int k = 0; k <= (kD > 0 ? kD : kMaxDim); ++k) {
      if (kD == 0 && k > d) break;
      if (d - rank[k] == s) acc += v[k];
      if (d - rank[k] + 1 == s) acc -= v[k];
    }
    return acc;
  }

  // Corner r of the simplex: rem0 + the canonical simplex's r-th vertex, permuted by rank
  // (canonical[r][rank] = r if rank <= d - r else r - (d + 1)).
  RRM_HOST_DEVICE static void corner_key(int32_t* key, int r, int d, const int32_t* rem0, const int* rank) {
    for (int k = 0; k < d; ++k) key[k] = rem0[k] + ((rank[k] <= d - r) ? r : r - (d + 1));
  }
  RRM_HOST_DEVICE void write_corner(int64_t e, int r, int d, const int32_t* rem0, const int* rank, scalar_t w) const {
    corner_key(keys + e * d, r, d, rem0, rank);
    weights[e] = w;
  }
};

// ---------------------------------------------------------------------------------------------
// int32 words between the insert's claim counters: one 128-byte line each.
constexpr int64_t kInsertCounterStride = 32;

// 2. Insert: one thread per entry. Open addressing with linear probing; a slot holds the id of the
//    first entry whose key claimed it (atomic CAS from -1), keys are compared through that entry.
//    Keys were written by EmbedFunctor in an earlier launch, so they are visible to every thread.
//    Which entry owns a slot depends on thread timing; the filter's result does not (see
//    lattice_impl.h). The table is sized from an estimate of the vertex count (small tables stay
//    in cache) and must end at most half full: BuildStatsFunctor raises the image's overflow flag
//    when more than cap / 2 slots were claimed, and the host retries with a larger table. So that a
//    table being outgrown is given up early rather than filled, the claims are counted as they
//    happen, on S counters per image (slot mod S; each on its own 128-byte line): a thread that
//    finds an empty slot whose counter already holds `limit` claims gives up (raises the flag).
//    With S = 1 and limit = cap / 2 that is exactly "half the table claimed"; with S > 1 the limit
//    is 3/4 of the counter's even share of cap, i.e. the table is given up about three quarters full
//    (never before half full but by chance), and the exact half-full rule is BuildStatsFunctor's.
//    The counters spread what was one word per image, on which every claim and every probe that
//    met an empty slot queued (knob insert_shards; benchmarks/NOTES.md §26: unmeasured). A table of
//    2E slots holds every entry: it has no counters (claimed == nullptr) and never gives up.
struct InsertFunctor {
  int32_t* table;       // (chunk, cap) initialised to -1
  int32_t* entry_slot;  // (chunk, E) out: slot of the entry's key (-1 on overflow)
  int32_t* claimed;     // (chunk, S, kInsertCounterStride) claims per counter (zeroed), or nullptr
  int32_t* overflow;    // (chunk,) set to 1 when the table is too small
  const int32_t* keys;  // (chunk, E, d)
  int64_t E, cap;       // cap is a power of two
  int d;
  // Corner-major thread order (knob insert_corner_major; N = the pixels, 0: entry order): item i is
  // corner i / N of pixel i % N, so that a warp's threads insert the same corner of 32 neighbouring
  // pixels -- mostly one or a few distinct keys, whose probes share their loads -- instead of all
  // d + 1 corners of 5 pixels. Which entry claims a slot changes, the lattice does not.
  int64_t N = 0;
  int64_t shards = 1;  // S, a power of two
  int64_t limit = 0;   // claims on a counter at which a thread gives up

  RRM_HOST_DEVICE void operator()(int64_t b, int64_t i, int64_t, int64_t) const {
    int64_t e = i;
    if (N) {  // i < E < 2^30
      const uint32_t u = static_cast<uint32_t>(i), n = static_cast<uint32_t>(N), r = u / n;
      e = static_cast<int64_t>(u - r * n) * (d + 1) + r;
    }
    int32_t* tab = table + b * cap;
    const int32_t* kb = keys + b * E * d;
    const int32_t* key = kb + e * d;
    int64_t slot = hash_key(key, d) & (cap - 1);
    int32_t* out = entry_slot + b * E + e;
    for (int64_t probe = 0; probe < cap; ++probe) {
      int32_t cur = atomic_load(tab + slot);
      if (cur == -1) {
        int32_t* counter = claimed ? claimed + (b * shards + (slot & (shards - 1))) * kInsertCounterStride : nullptr;
        if (counter && atomic_load(counter) >= limit) break;  // too full: give up, the host retries
        cur = atomic_cas(tab + slot, -1, static_cast<int32_t>(e));
        if (cur == -1) {  // claimed
          if (counter) atomic_add(counter, 1);
          *out = static_cast<int32_t>(slot);
          return;
        }
      }
      if (keys_equal(kb + static_cast<int64_t>(cur) * d, key, d)) {
        *out = static_cast<int32_t>(slot);
        return;
      }
      slot = (slot + 1) & (cap - 1);
    }
    *out = -1;
    atomic_cas(overflow + b, 0, 1);
  }
};

// 3. Assign: the owner entry of each slot takes the next vertex id of its image.
struct AssignFunctor {
  const int32_t* table;       // (chunk, cap)
  const int32_t* entry_slot;  // (chunk, E)
  int32_t* entry_vertex;      // (chunk, E) out (owners only)
  int32_t* vertex_owner;      // (chunk, E) out: owner entry of vertex v
  int32_t* num_vertices;      // (chunk,) zero-initialised counters
  int64_t E, cap;

  RRM_HOST_DEVICE void operator()(int64_t b, int64_t e, int64_t, int64_t) const {
    const int64_t t = b * E + e;
    if (entry_slot[t] < 0) return;  // the table overflowed: the host rebuilds it
    if (table[b * cap + entry_slot[t]] == static_cast<int32_t>(e)) {
      const int32_t v = atomic_add(num_vertices + b, 1);
      entry_vertex[t] = v;
      vertex_owner[b * E + v] = static_cast<int32_t>(e);
    }
  }
};

// 4. Resolve: every other entry copies its owner's vertex id.
struct ResolveFunctor {
  const int32_t* table;
  const int32_t* entry_slot;
  int32_t* entry_vertex;
  int64_t E, cap;

  RRM_HOST_DEVICE void operator()(int64_t b, int64_t e, int64_t, int64_t) const {
    const int64_t t = b * E + e;
    if (entry_slot[t] < 0) return;  // overflow, as above
    const int32_t owner = table[b * cap + entry_slot[t]];
    if (owner != static_cast<int32_t>(e)) entry_vertex[t] = entry_vertex[b * E + owner];
  }
};

// Read-only lookup after insertion: vertex id of `key`, or -1 when it is not a lattice point.
RRM_HOST_DEVICE int32_t lookup_vertex(const int32_t* tab, const int32_t* kb, const int32_t* entry_vertex_b,
                                      const int32_t* key, int64_t cap, int d) {
  int64_t slot = hash_key(key, d) & (cap - 1);
  for (;;) {
    const int32_t cur = tab[slot];
    if (cur == -1) return -1;
    if (keys_equal(kb + static_cast<int64_t>(cur) * d, key, d)) return entry_vertex_b[cur];
    slot = (slot + 1) & (cap - 1);
  }
}

// 5. Blur neighbours: one thread per (vertex, axis). Along axis j the neighbours of key k are
//    k - 1 (all coordinates) with k_j + d, and k + 1 with k_j - d (for j == d only the implied last
//    coordinate moves, so the stored d coordinates are just -1 / +1). neighbor_keys forms them
//    (the CPU's one-pass build forms the second, host_neighbors, and takes the first from it).
RRM_HOST_DEVICE void neighbor_keys(const int32_t* key, int j, int d, int32_t* n1, int32_t* n2) {
  for (int k = 0; k < d; ++k) {
    n1[k] = key[k] - 1;
    n2[k] = key[k] + 1;
  }
  if (j < d) {
    n1[j] = key[j] + d;
    n2[j] = key[j] - d;
  }
}

struct NeighborFunctor {
  const int32_t* table;
  const int32_t* keys;
  const int32_t* entry_vertex;
  const int32_t* vertex_owner;
  const int32_t* num_vertices;
  int32_t* neighbors;  // (chunk, d+1, M, 2)
  int64_t E, cap, M;
  int d;

  // item = j * M + v
  RRM_HOST_DEVICE void operator()(int64_t b, int64_t item, int64_t, int64_t) const {
    const int64_t v = item % M;
    const int j = static_cast<int>(item / M);
    int32_t* out = neighbors + (b * (d + 1) * M + item) * 2;
    if (v >= num_vertices[b]) {
      out[0] = -1;
      out[1] = -1;
      return;
    }
    const int32_t* kb = keys + b * E * d;
    const int32_t* key = kb + static_cast<int64_t>(vertex_owner[b * E + v]) * d;
    int32_t n1[kMaxDim], n2[kMaxDim];
    neighbor_keys(key, j, d, n1, n2);
    const int32_t* tab = table + b * cap;
    out[0] = lookup_vertex(tab, kb, entry_vertex + b * E, n1, cap, d);
    out[1] = lookup_vertex(tab, kb, entry_vertex + b * E, n2, cap, d);
  }
};

// NeighborFunctor over items (vertex v, axes [j0, j1)), as a counted launch gives them (only
// v < num_vertices[b]: the rows of a counted lattice's other vertices stay unwritten).
struct NeighborAxesFunctor {
  NeighborFunctor f;
  RRM_HOST_DEVICE void operator()(int64_t b, int64_t v, int64_t j0, int64_t j1) const {
    for (int64_t j = j0; j < j1; ++j) f(b, j * f.M + v, 0, 0);
  }
};

// 6. The two numbers the host reads after a build, one thread: stats[0] = 1 if any image's table
// overflowed, stats[1] = the largest vertex count (M).
struct BuildStatsFunctor {
  const int32_t* overflow;      // (chunk,)
  const int32_t* num_vertices;  // (chunk,)
  int32_t* stats;               // (2,) out
  int64_t nb;
  int64_t half_cap;  // an image with more vertices overflowed its table (InsertFunctor)
  RRM_HOST_DEVICE void operator()(int64_t) const {
    int32_t o = 0, m = 0;
    for (int64_t b = 0; b < nb; ++b) {
      o = overflow[b] > o ? overflow[b] : o;
      o = num_vertices[b] > half_cap ? 1 : o;
      m = num_vertices[b] > m ? num_vertices[b] : m;
    }
    stats[0] = o;
    stats[1] = m;
  }
};

// Rows of a flat inclusive scan (row_cumsum): each row's sums less the sum of the rows before it.
struct RowBaseFunctor {
  const int32_t* flat;  // (B n,) inclusive sums over all rows
  int32_t* out;         // (B, n) out: inclusive sums within each row
  int64_t n;
  RRM_HOST_DEVICE void operator()(int64_t b, int64_t j, int64_t, int64_t) const {
    const int64_t t = b * n + j;
    out[t] = b ? flat[t] - flat[b * n - 1] : flat[t];
  }
};

// Sort keys of the entries: image-major, then vertex (b M + v), in 32 bits when B M fits; the
// values the sort carries: each entry's index e in its image.
template <typename key_t>
struct SortKeyFunctor {
  const int32_t* entry_vertex;  // (B, E)
  key_t* keys;                  // (B, E) out
  int32_t* entries;             // (B, E) out
  int64_t E, M;
  RRM_HOST_DEVICE void operator()(int64_t b, int64_t e, int64_t, int64_t) const {
    keys[b * E + e] = static_cast<key_t>(b * M + entry_vertex[b * E + e]);
    entries[b * E + e] = static_cast<int32_t>(e);
  }
};

// Splat as a deterministic two-step gather (CUDA and its emulation). The splat list of a vertex
// can be long (a vertex of a smooth region of a bilateral lattice collects thousands of pixels), so
// one thread per vertex would serialise on it: each list is cut into chunks of at most kSplatChunk
// entries; SplatChunkFunctor sums a chunk (one thread per chunk and channel, in entry order), then
// the chunks of a vertex are summed in order. Fixed chunks: the same sums every run.
constexpr int64_t kSplatChunk = 32;

// Splat lists (CUDA / emulated path): offsets[b, v] = the first slot of vertex v's entries in image
// b's sorted list, E for v >= num_vertices[b] (and v = M), found by a binary search of the sorted
// keys. Every vertex has at least one entry (its owner), so these are the bounds of its list: no
// per-vertex counts by atomic adds (72 us at 512x512 on an H100, 1.6M entries on 22k counters) and
// no scan of them. With nchunks, the same launch also writes nchunks[b, 1 + v] = ceil(n_v /
// kSplatChunk) for v < M (a second search for v's end) and nchunks[b, 0] = 0, so that a scan of
// nchunks gives the chunk offsets: no zeroed array and no launch of its own.
template <typename key_t>
struct ListOffsetsFunctor {
  const key_t* sorted;  // (B E,) the sort keys, sorted
  int32_t* offsets;     // (B, M+1) out
  int64_t E, M;
  int32_t* nchunks = nullptr;  // (B, M+1) out, or nullptr

  RRM_HOST_DEVICE int64_t lower_bound(const key_t* sb, key_t target) const {
    int64_t lo = 0, hi = E;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (sb[mid] < target) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    return lo;
  }

  RRM_HOST_DEVICE void operator()(int64_t b, int64_t v, int64_t, int64_t) const {
    const key_t* sb = sorted + b * E;
    const int64_t lo = lower_bound(sb, static_cast<key_t>(b * M + v));
    offsets[b * (M + 1) + v] = static_cast<int32_t>(lo);
    if (!nchunks) return;
    if (v == 0) nchunks[b * (M + 1)] = 0;
    if (v < M) {
      const int64_t n = lower_bound(sb, static_cast<key_t>(b * M + v + 1)) - lo;
      nchunks[b * (M + 1) + v + 1] = static_cast<int32_t>((n + kSplatChunk - 1) / kSplatChunk);
    }
  }
};

// The splat lists from the stable sort (image b's entries sort into [b E, (b+1) E)): list slot s
// of image b holds entry o = sorted_entries[b E + s], i.e. pixel o / (d+1) with weight
// entry_weight[b, o].
template <typename scalar_t>
struct SplatListFunctor {
  const int32_t* sorted_entries;  // (B E,) SortKeyFunctor's entry indices in sorted order
  const scalar_t* entry_weight;   // (B, E)
  int32_t* splat_pixel;           // (B, E) out
  scalar_t* splat_weight;         // (B, E) out
  int64_t E;
  int d;
  RRM_HOST_DEVICE void operator()(int64_t b, int64_t s, int64_t, int64_t) const {
    const int32_t o = sorted_entries[b * E + s];
    splat_pixel[b * E + s] = o / (d + 1);
    splat_weight[b * E + s] = entry_weight[b * E + o];
  }
};

// ---------------------------------------------------------------------------------------------
// Filtering. Values are pixel-major (B, N, C); lattice values vertex-major (B, M, C). A "thread"
// handles one item and channels [c0, c1): the CPU takes all channels (vectorisable inner loops),
// the GPU one channel (coalesced accesses across a warp).
//
// All three stages are gathers on the GPU, so they are deterministic and need no atomics: the
// splat L[v] = sum_{p in list(v)} w_p * pre[i_p] * in[i_p] sums fixed chunks of the sorted splat
// lists (each entry's pixel and weight, grouped by vertex, gathered once at build) in a fixed order.

// Splat as a deterministic two-step gather (CUDA and its emulation): the chunks of kSplatChunk
// (defined above ListOffsetsFunctor) entries of each vertex's list are summed by
// SplatChunkFunctor, then a vertex's chunk sums in order (SplatReduceFunctor, or the splat's own
// last chunk of the vertex).

// Per (b, v): the entry ranges of v's chunks, at chunk_offsets[b, v] ... chunk_offsets[b, v+1]-1.
struct ChunkRangeFunctor {
  const int32_t* offsets;        // (B, M+1) splat list bounds
  const int32_t* chunk_offsets;  // (B, M+1)
  const int32_t* num_vertices;   // (B,)
  int32_t* chunk_begin;          // (B, K) out (zero-initialised: unused chunks are empty)
  int32_t* chunk_end;            // (B, K) out
  int64_t M, K;
  int32_t* chunk_vertex = nullptr;  // (B, K) out (zero-initialised): 1 + v at each of v's chunks
  int32_t* num_chunks = nullptr;    // (B,) out, or nullptr: image b's chunk count (by its last vertex)

  RRM_HOST_DEVICE void operator()(int64_t b, int64_t v, int64_t, int64_t) const {
    if (v >= num_vertices[b]) return;
    const int32_t* off = offsets + b * (M + 1);
    int64_t k = b * K + chunk_offsets[b * (M + 1) + v];
    if (num_chunks && v == num_vertices[b] - 1) num_chunks[b] = chunk_offsets[b * (M + 1) + v + 1];
    const int64_t s1 = off[v + 1];
    for (int64_t s = off[v]; s < s1; s += kSplatChunk, ++k) {
      chunk_begin[k] = static_cast<int32_t>(s);
      chunk_end[k] = static_cast<int32_t>(s + kSplatChunk < s1 ? s + kSplatChunk : s1);
      if (chunk_vertex) chunk_vertex[k] = static_cast<int32_t>(v + 1);
    }
  }
};

// Launch order of the splat chunks (CUDA and its emulation). Chunks are numbered vertex by vertex,
// the order in which SplatReduceFunctor reads their sums; but a pixel's d+1 vertices lie far apart
// in that numbering, so the threads that gather a pixel's row of Q for its d+1 vertices run in
// different blocks, at different times, and each row crosses from L2 d+1 times. Launched in the
// order of the tile (`tile` consecutive pixels) of their first pixel instead, the chunks that read
// the same rows run side by side in one block (an L1 of the same SM). Only the launch order
// changes: every chunk's sum, and the row it is written to (chunk_slot), stay the same, so the
// results are bitwise those of the vertex order (tests/test_permutohedral_filter.py).
// Keys: chunk k of image b -> b (ntiles + 1) + tile of its first pixel; empty chunk slots last.
// The values the sort carries: k.
template <typename key_t>
struct ChunkTileKeyFunctor {
  const int32_t* chunk_begin;  // (B, K)
  const int32_t* chunk_end;    // (B, K)
  const int32_t* splat_pixel;  // (B, E)
  key_t* keys;                 // (B K,) out
  int32_t* chunks;             // (B K,) out
  int64_t E, K, tile, ntiles;

  RRM_HOST_DEVICE void operator()(int64_t b, int64_t k, int64_t, int64_t) const {
    const int64_t t = b * K + k;
    const int32_t s0 = chunk_begin[t], s1 = chunk_end[t];
    const int64_t tl = s0 < s1 ? splat_pixel[b * E + s0] / tile : ntiles;
    keys[t] = static_cast<key_t>(b * (ntiles + 1) + tl);
    chunks[t] = static_cast<int32_t>(k);
  }
};

// The chunk tables in launch order: slot k of image b takes chunk o = sorted_chunks[b K + k] (the
// keys are image-major, so image b's chunks sort into [b K, (b+1) K)); its sum goes to row o.
struct ChunkPermuteFunctor {
  const int32_t* sorted_chunks;  // (B K,) ChunkTileKeyFunctor's chunk numbers in sorted order
  const int32_t* begin_in;       // (B, K) vertex order
  const int32_t* end_in;         // (B, K)
  int32_t* begin_out;            // (B, K) launch order
  int32_t* end_out;              // (B, K)
  int32_t* slot_out;             // (B, K) row of the chunk's sum (its vertex-order number)
  int64_t K;

  RRM_HOST_DEVICE void operator()(int64_t b, int64_t k, int64_t, int64_t) const {
    const int64_t t = b * K + k;
    const int32_t o = sorted_chunks[t];
    begin_out[t] = begin_in[b * K + o];
    end_out[t] = end_in[b * K + o];
    slot_out[t] = o;
  }
};

// Chunks cut by tiles (build(..., tile = P), for the tiled mean field): a chunk is a run of at most
// kSplatChunk entries of one vertex's list that lie in one tile of P consecutive pixels. Entry s of
// image b's sorted lists starts a chunk (heads[b, s] = 1) when it is kSplatChunk entries after its
// list's start, or its pixel lies in another tile than the entry before it. A scan of the heads
// numbers the chunks vertex by vertex (the order SplatReduceFunctor sums them in).
struct TileChunkHeadFunctor {
  const int32_t* sorted_entries;  // (B E,) entry index of each list slot (SortKeyFunctor's sort)
  const int32_t* entry_vertex;    // (B, E)
  const int32_t* offsets;         // (B, M+1) list bounds
  const int32_t* splat_pixel;     // (B, E)
  int32_t* heads;                 // (B, E) out: 1 at the first slot of a chunk, else 0
  int64_t E, M, tile;

  RRM_HOST_DEVICE void operator()(int64_t b, int64_t s, int64_t, int64_t) const {
    const int64_t t = b * E + s;
    const int32_t v = entry_vertex[b * E + sorted_entries[t]];
    const int64_t start = offsets[b * (M + 1) + v];
    const bool head = (s - start) % kSplatChunk == 0 || splat_pixel[t] / tile != splat_pixel[t - 1] / tile;
    heads[t] = head ? 1 : 0;
  }
};

// From the heads' inclusive scan (numbers: (B, E), chunk k of image b has number k + 1 at its first
// slot): each chunk's range and vertex (vertex order), and every vertex's first chunk.
struct TileChunkRangeFunctor {
  const int32_t* sorted_entries;  // (B E,)
  const int32_t* entry_vertex;    // (B, E)
  const int32_t* offsets;         // (B, M+1)
  const int32_t* heads;           // (B, E)
  const int32_t* numbers;         // (B, E) inclusive scan of heads along each image
  int32_t* chunk_begin;           // (B, K) out (zero-initialised: unused chunks are empty)
  int32_t* chunk_end;             // (B, K) out
  int32_t* chunk_vertex;          // (B, K) out (zero-initialised): 1 + v
  int64_t E, M, K;

  RRM_HOST_DEVICE void operator()(int64_t b, int64_t s, int64_t, int64_t) const {
    const int64_t t = b * E + s;
    if (!heads[t]) return;
    const int32_t v = entry_vertex[b * E + sorted_entries[t]];
    const int64_t end = offsets[b * (M + 1) + v + 1];
    int64_t e = s + 1;
    while (e < end && !heads[b * E + e]) ++e;  // at most kSplatChunk - 1 steps
    const int64_t k = b * K + numbers[t] - 1;
    chunk_begin[k] = static_cast<int32_t>(s);
    chunk_end[k] = static_cast<int32_t>(e);
    chunk_vertex[k] = v + 1;
  }
};

// chunk_offsets[b, v] = the number of vertex v's first chunk (v < num_vertices[b]), or image b's
// chunk count (v >= num_vertices[b], up to M).
struct TileChunkOffsetsFunctor {
  const int32_t* offsets;       // (B, M+1)
  const int32_t* numbers;       // (B, E)
  const int32_t* num_vertices;  // (B,)
  int32_t* chunk_offsets;       // (B, M+1) out
  int64_t E, M;

  RRM_HOST_DEVICE void operator()(int64_t b, int64_t v, int64_t, int64_t) const {
    const int32_t* nb = numbers + b * E;
    chunk_offsets[b * (M + 1) + v] = v < num_vertices[b] ? nb[offsets[b * (M + 1) + v]] - 1 : nb[E - 1];
  }
};

// entry_local[b, e] = the launch slot of entry e's chunk less its tile's first (the chunk's row
// among the tile's staged rows in the tiled mean field's kernel 3); one thread per launch slot.
struct TileEntryLocalFunctor {
  const int32_t* sorted_entries;  // (B E,)
  const int32_t* chunk_begin;     // (B, K) launch order
  const int32_t* chunk_end;       // (B, K)
  const int32_t* splat_pixel;     // (B, E)
  const int32_t* tile_offsets;    // (B, ntiles + 2)
  int32_t* entry_local;           // (B, E) out
  int64_t E, K, tile, ntiles;

  RRM_HOST_DEVICE void operator()(int64_t b, int64_t k, int64_t, int64_t) const {
    const int64_t s0 = chunk_begin[b * K + k], s1 = chunk_end[b * K + k];
    if (s0 >= s1) return;
    const int64_t j = k - tile_offsets[b * (ntiles + 2) + splat_pixel[b * E + s0] / tile];
    for (int64_t s = s0; s < s1; ++s) entry_local[b * E + sorted_entries[b * E + s]] = static_cast<int32_t>(j);
  }
};

// dst[0, W) = row[0, W), a row of global memory: float4 loads through the read-only path on CUDA,
// or, kL2, loads through L2 only (ld.global.cg; float4 or double2): rows written by other blocks of
// the running kernel, which the read-only path or a stale L1 line could miss (SplatChunkFunctor's
// last-chunk sums).
template <typename scalar_t, int W, bool kL2 = false>
RRM_HOST_DEVICE void row_load(scalar_t* dst, const scalar_t* row) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same<scalar_t, float>::value && W % 4 == 0) {
    const float4* r4 = reinterpret_cast<const float4*>(row);
#pragma unroll
    for (int k = 0; k < W / 4; ++k) {
      const float4 x = kL2 ? __ldcg(r4 + k) : __ldg(r4 + k);
      dst[4 * k] = x.x;
      dst[4 * k + 1] = x.y;
      dst[4 * k + 2] = x.z;
      dst[4 * k + 3] = x.w;
    }
  } else if constexpr (kL2 && std::is_same<scalar_t, double>::value && W % 2 == 0) {
    const double2* r2 = reinterpret_cast<const double2*>(row);
#pragma unroll
    for (int k = 0; k < W / 2; ++k) {
      const double2 x = __ldcg(r2 + k);
      dst[2 * k] = x.x;
      dst[2 * k + 1] = x.y;
    }
  } else {
#pragma unroll
    for (int c = 0; c < W; ++c) dst[c] = kL2 ? __ldcg(row + c) : row[c];
  }
#else
  for (int c = 0; c < W; ++c) dst[c] = row[c];
#endif
}

// acc[0, W) += w * row[0, W)
template <typename scalar_t, int W>
RRM_HOST_DEVICE void row_add_scaled(scalar_t* acc, scalar_t w, const scalar_t* row) {
  scalar_t x[W];
  row_load<scalar_t, W>(x, row);
  for (int c = 0; c < W; ++c) acc[c] += w * x[c];
}

template <typename scalar_t, int W>
RRM_HOST_DEVICE void row_copy(scalar_t* dst, const scalar_t* src) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same<scalar_t, float>::value && W % 4 == 0) {
    const float4* s4 = reinterpret_cast<const float4*>(src);
    float4* d4 = reinterpret_cast<float4*>(dst);
#pragma unroll
    for (int k = 0; k < W / 4; ++k) d4[k] = s4[k];
  } else {
#pragma unroll
    for (int c = 0; c < W; ++c) dst[c] = src[c];
  }
#else
  for (int c = 0; c < W; ++c) dst[c] = src[c];
#endif
}

// dst[0, W) = src[0, W) where dst is a row of global memory (src: registers): on CUDA, float rows as
// float4 stores (__stwb, st.global.wb.v4: the default write-back policy). row_copy's float4 copy out
// of a register array compiled to four st.global.f32 per float4 in the blurs and the splats (nvcc
// 13 PTX, session 31: the copy's source array is split into scalars first), four store instructions
// and a quarter-filled sector write each where one does.
template <typename scalar_t, int W>
RRM_HOST_DEVICE void row_store(scalar_t* dst, const scalar_t* src) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same<scalar_t, float>::value && W % 4 == 0) {
    float4* d4 = reinterpret_cast<float4*>(dst);
#pragma unroll
    for (int k = 0; k < W / 4; ++k)
      __stwb(d4 + k, make_float4(src[4 * k], src[4 * k + 1], src[4 * k + 2], src[4 * k + 3]));
    return;
  }
#endif
  row_copy<scalar_t, W>(dst, src);
}

// row_add_scaled from any memory (block-shared memory included: no read-only-path loads).
template <typename scalar_t, int W>
RRM_HOST_DEVICE void row_add_scaled_any(scalar_t* acc, scalar_t w, const scalar_t* row) {
  scalar_t x[W];
  row_copy<scalar_t, W>(x, row);
  for (int c = 0; c < W; ++c) acc[c] += w * x[c];
}

// Chunk k of image b's splat lists, channels [V g, V g + V): partial = sum over the chunk's entries
// of w * pre * in_i, in entry order. The threads per chunk (C / V) and the entries in flight per
// thread hide the latency of the gathers: V = 1 (one channel per thread) for the per-term filter and
// rows of 4 or 8 in the fused mean field; V = 4 (one float4 per entry on CUDA; C a multiple of 4) for
// its wider rows (an H200 took 53 us per 512x512x21 splat with a whole row per thread, 40 us with one
// channel per thread). A thread takes its entries U at a time: first every index and weight, then
// every row, then the sums in entry order -- U independent load chains in flight instead of one
// (each entry's row load waits for its index load; one entry at a time, a 32-entry chunk waited 64
// memory latencies). The sums, and so the results, are those of the one-entry loop. Lists of lattice
// b % LB (shared lattices).
//
// kFuse: the launch also sums each vertex's chunks, SplatReduceFunctor's job, in its order, so the
// reduce launch and, for a vertex of one chunk, the round trip of its sum through `partial` go. A
// vertex of one chunk writes 0 + its sum (the reduce's arithmetic) to its row of `out`. Otherwise
// each chunk writes its sum, fences, and counts itself in its vertex's counter; the thread that
// counts last adds the vertex's chunk sums in chunk order (through L2) into `out` and zeroes the
// counter for the next launch. The same bits as the two launches (tests: knob splat_fused_reduce).
// Rows of vertices >= num_vertices are not written (the blurs skip them and no slice reads them).
template <typename scalar_t, int V = 1, bool kPair = false, bool kFuse = false>
struct SplatChunkFunctor {
  // CUDA: the float4 splat also compiled with register caps (knob item_min_blocks, common/cuda_exec.cuh)
  static constexpr bool kMinBlocksVariants = std::is_same<scalar_t, float>::value && V == 4 && !kPair;
  static constexpr int U = V == 1 ? 8 : 4;  // entries in flight per thread
  const scalar_t* in;                       // (B, N, C)
  const scalar_t* pre;                      // (LB, N) per-pixel factor, or nullptr
  const int32_t* chunk_begin;               // (LB, K) in launch order
  const int32_t* chunk_end;                 // (LB, K)
  const int32_t* splat_pixel;               // (LB, E)
  const scalar_t* splat_weight;             // (LB, E)
  scalar_t* partial;                        // (B, K, C) out, rows in vertex order
  int64_t N, E, K, C, LB;
  const int32_t* chunk_slot;  // (LB, K): row of partial for launch slot k (ChunkPermuteFunctor), or nullptr: k
  // kPair: a second splat of the same rows, pre-multiplied by pre2 (the energy loss's exact gradient
  // splats s and S s), sums into partial2 from one read of the lists and rows; each sum's arithmetic
  // is that of a separate launch with pre = pre2 (w * pre2[i], then the products in entry order).
  // A template flag: the second sums' registers (56 -> 70 in the mean field's float4 splat, which
  // is one block fewer per SM) stay out of the kernels that do not use them.
  const scalar_t* pre2 = nullptr;  // (LB, N)
  scalar_t* partial2 = nullptr;    // (B, K, C) out
  // kFuse only:
  const int32_t* chunk_vertex = nullptr;   // (LB, K) Lattice::chunk_vertex (vertex order)
  const int32_t* chunk_offsets = nullptr;  // (LB, M+1)
  int32_t* counters = nullptr;             // (B, M, C / V) zero before the launch, zero after it
  scalar_t* out = nullptr;                 // (B, M, C) the splat
  scalar_t* out2 = nullptr;                // (B, M, C) the second splat (kPair)
  int64_t M = 0;

  RRM_HOST_DEVICE void operator()(int64_t b, int64_t k, int64_t g0, int64_t g1) const {
    const int64_t lb = b < LB ? b : b % LB;
    const int64_t t = lb * K + k;
    const int64_t s0 = chunk_begin[t], s1 = chunk_end[t];
    const int64_t slot = chunk_slot ? chunk_slot[t] : k;
    scalar_t* const row = partial + (b * K + slot) * C;  // this chunk's row
    const int32_t* pix = splat_pixel + lb * E;
    const scalar_t* wb = splat_weight + lb * E;
    const scalar_t* xb = in + b * N * C;
    const scalar_t* pb = pre ? pre + lb * N : nullptr;
    const scalar_t* p2 = kPair ? pre2 + lb * N : nullptr;
    for (int64_t g = g0; g < g1; ++g) {
      scalar_t acc[V], acc2[V];
      for (int c = 0; c < V; ++c) acc[c] = acc2[c] = 0;
      for (int64_t p = s0; p < s1; p += U) {
        int64_t i[U];
        scalar_t w[U], w2[U];
        scalar_t x[U][V];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
        for (int u = 0; u < U; ++u) {
          i[u] = p + u < s1 ? pix[p + u] : 0;
          w[u] = p + u < s1 ? wb[p + u] : scalar_t(0);
        }
        if constexpr (kPair) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
          for (int u = 0; u < U; ++u) w2[u] = p + u < s1 ? w[u] * p2[i[u]] : scalar_t(0);
        }
        if (pb) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
          for (int u = 0; u < U; ++u)
            if (p + u < s1) w[u] = w[u] * pb[i[u]];
        }
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
        for (int u = 0; u < U; ++u) {
          if (p + u < s1) {
            row_load<scalar_t, V>(x[u], xb + i[u] * C + V * g);
          } else {
            for (int c = 0; c < V; ++c) x[u][c] = 0;
          }
        }
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
        for (int u = 0; u < U; ++u)
          if (p + u < s1)
            for (int c = 0; c < V; ++c) acc[c] += w[u] * x[u][c];
        if constexpr (kPair) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
          for (int u = 0; u < U; ++u)
            if (p + u < s1)
              for (int c = 0; c < V; ++c) acc2[c] += w2[u] * x[u][c];
        }
      }
      if constexpr (kFuse) {
        finish(b, lb, slot, g, row, acc, acc2);
      } else {
        row_store<scalar_t, V>(row + V * g, acc);
        if constexpr (kPair) row_store<scalar_t, V>(partial2 + (row - partial) + V * g, acc2);
      }
    }
  }

  // kFuse: this chunk's sums of channel group g, then its vertex's when it is the last to finish.
  RRM_HOST_DEVICE void finish(int64_t b, int64_t lb, int64_t slot, int64_t g, scalar_t* row, const scalar_t* acc,
                              const scalar_t* acc2) const {
    const int32_t v1 = chunk_vertex[lb * K + slot];
    if (v1 == 0) return;  // an unused chunk row (K bounds the chunk count)
    const int64_t v = v1 - 1;
    const int32_t* co = chunk_offsets + lb * (M + 1);
    const int64_t k0 = co[v], nk = co[v + 1] - k0;
    scalar_t* const o = out + (b * M + v) * C + V * g;
    scalar_t* const o2 = kPair ? out2 + (b * M + v) * C + V * g : nullptr;
    scalar_t s[V], s2[V];
    if (nk == 1) {
      for (int c = 0; c < V; ++c) s[c] = scalar_t(0) + acc[c];
      row_store<scalar_t, V>(o, s);
      if constexpr (kPair) {
        for (int c = 0; c < V; ++c) s2[c] = scalar_t(0) + acc2[c];
        row_store<scalar_t, V>(o2, s2);
      }
      return;
    }
    row_store<scalar_t, V>(row + V * g, acc);
    if constexpr (kPair) row_store<scalar_t, V>(partial2 + (row - partial) + V * g, acc2);
    thread_fence();  // release: the sums above before the count
    int32_t* const cnt = counters + (b * M + v) * (C / V) + g;
    if (atomic_add(cnt, 1) != nk - 1) return;
    thread_fence();  // acquire: the other chunks' sums after their counts
    for (int c = 0; c < V; ++c) s[c] = s2[c] = 0;
    const scalar_t* p = partial + (b * K + k0) * C + V * g;
    const scalar_t* p2 = kPair ? partial2 + (b * K + k0) * C + V * g : nullptr;
    for (int64_t k = 0; k < nk; ++k) {
      scalar_t x[V];
      row_load<scalar_t, V, true>(x, p + k * C);
      for (int c = 0; c < V; ++c) s[c] += x[c];
      if constexpr (kPair) {
        row_load<scalar_t, V, true>(x, p2 + k * C);
        for (int c = 0; c < V; ++c) s2[c] += x[c];
      }
    }
    row_store<scalar_t, V>(o, s);
    if constexpr (kPair) row_store<scalar_t, V>(o2, s2);
    *cnt = 0;  // for the next launch
  }
};

// Chunk sums of image b, chunk lists of lattice b % LB (lattices shared by several images). One
// channel per thread: with four (float4 per chunk), a vertex's chunks were summed by a quarter of
// the threads and an H100 took 25 instead of 21 us per 512x512x21 launch of the fused mean field.
template <typename scalar_t>
struct SplatReduceFunctor {
  const scalar_t* partial;       // (B, K, C)
  const int32_t* chunk_offsets;  // (LB, M+1)
  const int32_t* num_vertices;   // (LB,)
  scalar_t* out;                 // (B, M, C)
  int64_t M, K, C, LB;

  RRM_HOST_DEVICE void operator()(int64_t b, int64_t v, int64_t c0, int64_t c1) const {
    const int64_t lb = b < LB ? b : b % LB;
    scalar_t* o = out + (b * M + v) * C;
    if (v >= num_vertices[lb]) {
      for (int64_t c = c0; c < c1; ++c) o[c] = 0;
      return;
    }
    const int32_t* co = chunk_offsets + lb * (M + 1);
    const int64_t k0 = co[v], k1 = co[v + 1];
    const scalar_t* pb = partial + b * K * C;
    for (int64_t c = c0; c < c1; ++c) {
      scalar_t acc = 0;
      for (int64_t k = k0; k < k1; ++k) acc += pb[k * C + c];
      o[c] = acc;
    }
  }
};

// Splat by scatter, the CPU's choice: pixels are read in order (Q is large, the lattice small and
// cache-resident), each (pixel, corner) adds w * pre * x to its vertex row of a buffer private to
// the calling thread. The host reduces the buffers afterwards.
template <typename scalar_t>
struct ScatterFunctor {
  const scalar_t* in;           // (B, N, C)
  const scalar_t* pre;          // (B, N) or nullptr
  const scalar_t* weights;      // (B, E)
  const int32_t* entry_vertex;  // (B, E)
  scalar_t* out;                // (M, Cs) this thread's buffer for image b
  int64_t N, E, C, Cs;          // Cs >= C: row stride of the lattice buffers
  int d;

  RRM_HOST_DEVICE void operator()(int64_t b, int64_t i, int64_t c0, int64_t c1) const {
    const scalar_t* x = in + (b * N + i) * C;
    const scalar_t* wb = weights + b * E + i * (d + 1);
    const int32_t* vb = entry_vertex + b * E + i * (d + 1);
    const scalar_t p = pre ? pre[b * N + i] : scalar_t(1);
    for (int r = 0; r <= d; ++r) axpy(out + static_cast<int64_t>(vb[r]) * Cs, wb[r] * p, x, c0, c1);
  }
  // o[c] += w x[c] for c in [c0, c1): blocks of 8 (one AVX register of floats; rows padded to a
  // multiple of 8 take no remainder), then the rest. A buffer row never overlaps an input row.
  RRM_HOST_DEVICE static void axpy(scalar_t* __restrict__ o, scalar_t w, const scalar_t* __restrict__ x, int64_t c0,
                                   int64_t c1) {
    int64_t c = c0;
    for (; c + 8 <= c1; c += 8)
      for (int u = 0; u < 8; ++u) o[c + u] += w * x[c + u];
    for (; c < c1; ++c) o[c] += w * x[c];
  }
};

// r[0, V) = one blur axis's value at vertex x, channels [c, c + V): old[x] + (old[n1] + old[n2]) / 2,
// a missing neighbour (< 0) read as 0. old: one image's rows (M, C). Shared by BlurFunctor's rows of
// V channels and BlurPairFunctor, so that both give the same bits.
template <typename scalar_t, int V>
RRM_HOST_DEVICE void blur_value(const scalar_t* old, int32_t n1, int32_t n2, int64_t x, int64_t C, int64_t c,
                                scalar_t* r) {
  const scalar_t half = scalar_t(0.5);
  scalar_t o[V];
  row_load<scalar_t, V>(o, old + x * C + c);
  if (n1 >= 0 && n2 >= 0) {
    scalar_t y[V], t[V];
    row_load<scalar_t, V>(y, old + n1 * C + c);
    row_load<scalar_t, V>(t, old + n2 * C + c);
    for (int u = 0; u < V; ++u) r[u] = o[u] + half * (y[u] + t[u]);
  } else if (n1 >= 0 || n2 >= 0) {
    scalar_t y[V];
    row_load<scalar_t, V>(y, old + (n1 >= 0 ? n1 : n2) * C + c);
    for (int u = 0; u < V; ++u) r[u] = o[u] + half * y[u];
  } else {
    for (int u = 0; u < V; ++u) r[u] = o[u];
  }
}

// Blur along axis j: new[v] = old[v] + (old[n1] + old[n2]) / 2, missing neighbours read as 0.
// Values of image b, neighbours of lattice b % LB (lattices shared by several images). Items
// (vertex, channel group g): channels [V g, V g + V). V = 4 for the fused GPU mean field's rows:
// float4 loads and stores on CUDA, and a quarter of the threads, each with the index arithmetic
// and neighbour loads that dominated the one-channel blur (Nsight Compute on an H100: 60 % of the
// SM's issue slots, 14 % L1 hit rate, for 8-15 us per launch). Same arithmetic per channel.
template <typename scalar_t, int V = 1>
struct BlurFunctor {
  const scalar_t* old_values;  // (B, M, C)
  scalar_t* new_values;        // (B, M, C)
  const int32_t* neighbors;    // (LB, d+1, M, 2)
  int64_t M, C;
  int d, j;
  int64_t LB;
  // (LB,) or nullptr: rows v >= num_vertices[b % LB] (an image's unused rows in a batch, M being
  // the largest count) are neither read nor written. The gather splat's fused chunk sums leave them
  // unwritten, and no slice reads them.
  const int32_t* num_vertices = nullptr;

  RRM_HOST_DEVICE void operator()(int64_t b, int64_t v, int64_t g0, int64_t g1) const {
    const int64_t lb = b < LB ? b : b % LB;
    if (num_vertices && v >= num_vertices[lb]) return;
    const int32_t* nb = neighbors + ((lb * (d + 1) + j) * M + v) * 2;
    const int32_t n1 = nb[0], n2 = nb[1];
    const scalar_t* o = old_values + (b * M + v) * C;
    scalar_t* w = new_values + (b * M + v) * C;
    const scalar_t half = scalar_t(0.5);
    if constexpr (V == 1) {  // the per-channel loops (the CPU vectorises them)
      if (n1 >= 0 && n2 >= 0) {
        const scalar_t* a = old_values + (b * M + n1) * C;
        const scalar_t* z = old_values + (b * M + n2) * C;
        for (int64_t c = g0; c < g1; ++c) w[c] = o[c] + half * (a[c] + z[c]);
      } else if (n1 >= 0 || n2 >= 0) {
        const scalar_t* a = old_values + (b * M + (n1 >= 0 ? n1 : n2)) * C;
        for (int64_t c = g0; c < g1; ++c) w[c] = o[c] + half * a[c];
      } else {
        for (int64_t c = g0; c < g1; ++c) w[c] = o[c];
      }
      return;
    }
    for (int64_t g = g0; g < g1; ++g) {
      scalar_t r[V];
      blur_value<scalar_t, V>(old_values + b * M * C, n1, n2, v, C, V * g, r);
      row_store<scalar_t, V>(w + V * g, r);
    }
  }
};

// Two blur axes in one launch: new = B_j2 B_j old (j2 < 0: B_j alone, BlurFunctor's job). A
// thread computes B_j's value at its vertex and at its two neighbours along j2, then B_j2's; each
// value's arithmetic is BlurFunctor's (the same bits), three of B_j's values per thread instead of
// one, and one launch and one pass through the middle buffer fewer. The lattice rows are small and
// L2-resident (a 512 x 512 photo: 22 k + 34 k rows of 96 bytes), the launches latency-bound (an H100:
// 4.4 us per blur axis of the fused mean field, most of it ramp and tail), so the extra loads cost
// less than the launch they replace (knob blur_pairs; bitwise tests in test_permutohedral_filter.py).
template <typename scalar_t, int V = 1>
struct BlurPairFunctor {
  const scalar_t* old_values;  // (B, M, C)
  scalar_t* new_values;        // (B, M, C)
  const int32_t* neighbors;    // (LB, d+1, M, 2)
  int64_t M, C;
  int d, j, j2;  // first axis, second axis (-1: none)
  int64_t LB;
  const int32_t* num_vertices;  // (LB,) or nullptr: as BlurFunctor's

  // B_j's value at vertex x of image b, channels [c, c + V), into r.
  RRM_HOST_DEVICE void axis_j(int64_t b, int64_t lb, int64_t x, int64_t c, scalar_t* r) const {
    const int32_t* nb = neighbors + ((lb * (d + 1) + j) * M + x) * 2;
    blur_value<scalar_t, V>(old_values + b * M * C, nb[0], nb[1], x, C, c, r);
  }

  RRM_HOST_DEVICE void operator()(int64_t b, int64_t v, int64_t g0, int64_t g1) const {
    const int64_t lb = b < LB ? b : b % LB;
    if (num_vertices && v >= num_vertices[lb]) return;
    const scalar_t half = scalar_t(0.5);
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t c = V * g;
      scalar_t r[V];
      axis_j(b, lb, v, c, r);
      if (j2 >= 0) {
        const int32_t* nb = neighbors + ((lb * (d + 1) + j2) * M + v) * 2;
        const int32_t n1 = nb[0], n2 = nb[1];
        if (n1 >= 0 && n2 >= 0) {
          scalar_t y[V], t[V];
          axis_j(b, lb, n1, c, y);
          axis_j(b, lb, n2, c, t);
          for (int u = 0; u < V; ++u) r[u] = r[u] + half * (y[u] + t[u]);
        } else if (n1 >= 0 || n2 >= 0) {
          scalar_t y[V];
          axis_j(b, lb, n1 >= 0 ? n1 : n2, c, y);
          for (int u = 0; u < V; ++u) r[u] = r[u] + half * y[u];
        }
      }
      row_store<scalar_t, V>(new_values + (b * M + v) * C + c, r);
    }
  }
};

// Padding of the rows of the fused mean fields' softmax: the lowest finite value of the type, so
// that no label's finite value lies below it and the row's max is a label's (a label at exactly that
// value ties with it: the same max). Its q is 0 (masked). A fixed -1e30 made every q NaN once all of
// a pixel's -unary lay below it (finite energies above 1e30: the max was the padding's, every
// label's exp underflowed to 0, and the sum was 0).
template <typename scalar_t>
RRM_HOST_DEVICE constexpr scalar_t softmax_pad() {
  // -FLT_MAX and -DBL_MAX
  return std::is_same<scalar_t, float>::value ? static_cast<scalar_t>(-3.4028234663852886e+38)
                                              : static_cast<scalar_t>(-1.7976931348623157e+308);
}

// ---------------------------------------------------------------------------------------------
// CPU softmax of one row (host code; CUDA runs ATen's softmax). Written so that GCC vectorises it
// in the AVX2 copy of the item loops (common/exec.h) without reassociating anything: max and sum
// are kept in 8 lanes and reduced in a fixed order, and the float exp is a polynomial made of plain
// arithmetic, so both compiled copies give bit-identical results.
#if !defined(__CUDA_ARCH__)
// exp(x) for float: x = n ln2 + r with n = round(x / ln2) (by the 1.5 * 2^23 trick, exact for the
// clamped range) and ln2 split in two (Cody-Waite), exp(r) on |r| <= ln2/2 by Cephes' expf
// polynomial (relative error ~1e-7, like libm's), 2^n through the exponent bits. x is clamped to
// [-86, 88], so that 2^n and the result stay normal numbers (a denormal result would cost a
// microcode assist), and the result below -86 is exactly 0: a tiny normal result (exp(-86) ~ 4e-38,
// what the clamp alone gave) made the mean field's splats, blurs and slices multiply it by weights
// below 1 into denormals on every step (RRM's padding labels: 1.6x the whole CRF's time). By integer
// comparisons of the bit patterns: float comparisons would stop GCC from vectorising the loop
// (they may trap), integer ones become blends. As unsigned integers, the floats below -86 are
// exactly those above its pattern (sign-magnitude); as signed integers, those above 88 likewise.
inline float exp_cpu(float x) {
  int32_t xi;
  __builtin_memcpy(&xi, &x, sizeof xi);
  uint32_t xu = static_cast<uint32_t>(xi);
  const int32_t keep = xu <= 0xc2ac0000u ? -1 : 0;  // all result bits kept, or none (x < -86: 0)
  xu = xu < 0xc2ac0000u ? xu : 0xc2ac0000u;         // -86.0f (min/max forms: no branch)
  xi = static_cast<int32_t>(xu);
  xi = xi < 0x42b00000 ? xi : 0x42b00000;  // 88.0f
  __builtin_memcpy(&x, &xi, sizeof x);
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const float z = r * r;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * z + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float p2;
  __builtin_memcpy(&p2, &bits, sizeof p2);
  const float e = y * p2;
  int32_t ei;
  __builtin_memcpy(&ei, &e, sizeof ei);
  ei &= keep;
  float out;
  __builtin_memcpy(&out, &ei, sizeof out);
  return out;
}
inline double exp_cpu(double x) { return exp(x); }

// q[0, W) = softmax of the labels of v[0, W): mask[c] is 1 for a label and 0 for padding, whose v
// must be softmax_pad (it cannot be the max; its q is 0). Every loop has the fixed length W (4 or a
// multiple of 8): no partial vectors, no store-forwarding stalls. v is overwritten.
// Max and sum of W values (W a multiple of 8) in 8 lanes, reduced in a fixed order (W = 4: the same
// order, so that padding a row from 4 to 8 labels changes nothing). float: with GCC
// vector types, which GCC compiles to AVX in the AVX2 copy and to SSE pairs in the baseline one
// (lane-wise IEEE operations: the same result); the auto-vectoriser leaves these reductions scalar.
#if !defined(__CUDACC__)  // nvcc's host pass gets the plain loops below (never instantiated there)
template <int W>
inline float row_max(const float* v) {
  if constexpr (W == 4) {
    float r = v[0];
    for (int l = 1; l < 4; ++l) r = v[l] > r ? v[l] : r;
    return r;
  }
  typedef float v8 __attribute__((vector_size(32)));
  v8 m, x;
  __builtin_memcpy(&m, v, sizeof m);
  for (int c = 8; c < W; c += 8) {
    __builtin_memcpy(&x, v + c, sizeof x);
    m = x > m ? x : m;
  }
  float r = m[0];
  for (int l = 1; l < 8; ++l) r = m[l] > r ? m[l] : r;
  return r;
}
template <int W>
inline float row_sum(const float* v) {
  if constexpr (W == 4) return ((v[0] + v[1]) + v[2]) + v[3];  // the order of the 8-lane sum below
  typedef float v8 __attribute__((vector_size(32)));
  v8 s, x;
  __builtin_memcpy(&s, v, sizeof s);
  for (int c = 8; c < W; c += 8) {
    __builtin_memcpy(&x, v + c, sizeof x);
    s += x;
  }
  float r = s[0];
  for (int l = 1; l < 8; ++l) r += s[l];
  return r;
}
#endif
template <int W, typename scalar_t>
inline scalar_t row_max(const scalar_t* v) {
  scalar_t r = v[0];
  for (int c = 1; c < W; ++c) r = v[c] > r ? v[c] : r;
  return r;
}
template <int W, typename scalar_t>
inline scalar_t row_sum(const scalar_t* v) {
  scalar_t r = v[0];
  for (int c = 1; c < W; ++c) r += v[c];
  return r;
}

// Fixed-width rows of W values (W = 4 or a multiple of 8) as GCC vector types of 32 bytes (8 floats
// or 4 doubles; 16 bytes for 4 floats), for the CPU's per-pixel lattice loops: AVX registers in the AVX2 copy of the
// item loops, SSE pairs in the baseline copy. GCC's vectoriser leaves these loops scalar at W = 8 (it unrolls them
// completely, then does not pack the 8 scalar chains): a fused mean-field step at 2-8 labels was as slow as at 24.
// Lane-wise IEEE operations in the order of the scalar loops, so results are bit-identical to them (and across the two
// copies).
#if !defined(__CUDACC__)
template <typename scalar_t, int Bytes>
struct CpuVec {
  typedef scalar_t type __attribute__((vector_size(Bytes)));
};

template <typename scalar_t, int W>
struct CpuRow {
  // 32-byte vectors; a row of 4 floats (the fused mean field at <= 4 labels) is one 16-byte vector
  static constexpr int kBytes = W * sizeof(scalar_t) >= 32 ? 32 : 16;
  using V = typename CpuVec<scalar_t, kBytes>::type;
  static constexpr int kLanes = static_cast<int>(kBytes / sizeof(scalar_t));
  static constexpr int kN = W / kLanes;
  static_assert(W % kLanes == 0, "row width must be a multiple of the vector width");
  V v[kN];

  // (vectors are passed by reference: returning one from a baseline-ABI function changes the ABI)
  static void load1(V& x, const scalar_t* p) { __builtin_memcpy(&x, p, sizeof x); }
  static void store1(scalar_t* p, const V& x) { __builtin_memcpy(p, &x, sizeof x); }
  void load(const scalar_t* p) {
    for (int k = 0; k < kN; ++k) load1(v[k], p + k * kLanes);
  }
  void store(scalar_t* p) const {
    for (int k = 0; k < kN; ++k) store1(p + k * kLanes, v[k]);
  }
  // this = w * p
  void set_scaled(scalar_t w, const scalar_t* p) {
    for (int k = 0; k < kN; ++k) {
      V x;
      load1(x, p + k * kLanes);
      v[k] = w * x;
    }
  }
  // this += w * p
  void add_scaled(scalar_t w, const scalar_t* p) {
    for (int k = 0; k < kN; ++k) {
      V x;
      load1(x, p + k * kLanes);
      v[k] = v[k] + w * x;
    }
  }
  // this += (coef * s) * a, lane by lane
  void add_coef_scaled(const scalar_t* coef, scalar_t s, const CpuRow& a) {
    for (int k = 0; k < kN; ++k) {
      V c;
      load1(c, coef + k * kLanes);
      v[k] = v[k] + c * s * a.v[k];
    }
  }
  // p += w * this (p: a row in memory)
  void scatter_scaled(scalar_t* p, scalar_t w) const {
    for (int k = 0; k < kN; ++k) {
      V x;
      load1(x, p + k * kLanes);
      x = x + w * v[k];
      store1(p + k * kLanes, x);
    }
  }
};
#endif

template <typename scalar_t, int W>
inline void softmax_masked(scalar_t* v, const scalar_t* mask, scalar_t* q) {
  const scalar_t mx = row_max<W>(v);
  for (int c = 0; c < W; ++c) v[c] = exp_cpu(v[c] - mx) * mask[c];
  const scalar_t inv = scalar_t(1) / row_sum<W>(v);
  for (int c = 0; c < W; ++c) q[c] = v[c] * inv;
}

template <typename scalar_t, int W>
inline void softmax_padded_row(const scalar_t* x, int64_t L, scalar_t* q) {
  scalar_t v[W], mask[W], out[W];
  for (int c = 0; c < W; ++c) {
    v[c] = c < L ? x[c] : softmax_pad<scalar_t>();
    mask[c] = c < L ? scalar_t(1) : scalar_t(0);
  }
  softmax_masked<scalar_t, W>(v, mask, out);
  for (int64_t c = 0; c < L; ++c) q[c] = out[c];
}

// q = softmax(x) for a row of any length L (x and q may be the same row).
template <typename scalar_t>
inline void softmax_row_cpu(const scalar_t* x, scalar_t* q, int64_t L) {
  switch ((L + 7) / 8) {
    case 1:
      return softmax_padded_row<scalar_t, 8>(x, L, q);
    case 2:
      return softmax_padded_row<scalar_t, 16>(x, L, q);
    case 3:
      return softmax_padded_row<scalar_t, 24>(x, L, q);
    case 4:
      return softmax_padded_row<scalar_t, 32>(x, L, q);
    default:
      break;
  }
  scalar_t mx = x[0];
  for (int64_t l = 1; l < L; ++l) mx = x[l] > mx ? x[l] : mx;
  scalar_t sum = 0;
  for (int64_t l = 0; l < L; ++l) {
    q[l] = exp_cpu(x[l] - mx);
    sum += q[l];
  }
  const scalar_t inv = scalar_t(1) / sum;
  for (int64_t l = 0; l < L; ++l) q[l] *= inv;
}

// One row per call (CpuExec::for_each_item with C = L): q = softmax(x).
template <typename scalar_t>
struct SoftmaxRowCpuFunctor {
  const scalar_t* x;  // (rows, L)
  scalar_t* q;        // (rows, L)
  int64_t L;
  void operator()(int64_t, int64_t i, int64_t, int64_t) const { softmax_row_cpu(x + i * L, q + i * L, L); }
};
#endif

// Slice: s_i = alpha * sum_r w_{i,r} L[v_{i,r}]; then
//   out[i] = post[i] * s_i                                       (coef == nullptr)
//   out[i] = (base ? base[i] : out[i]) + coef[c] * post[i] * s_i  (coef != nullptr: mean field)
// post may be nullptr (1). One channel per thread on the GPU. On the CPU the lattice rows are padded
// to Cs = a multiple of 8 channels, so rows of up to 32 channels are summed in registers with
// fixed-width loops (vectorised, unrolled); wider rows in tiles of kSliceTile.
constexpr int kSliceTile = 32;

template <typename scalar_t>
struct SliceFunctor {
  const scalar_t* lattice_values;  // (B, M, Cs)
  const scalar_t* weights;         // (B, E)
  const int32_t* entry_vertex;     // (B, E)
  const scalar_t* post;            // (B, N) or nullptr
  const scalar_t* coef;            // (C,) or nullptr
  const scalar_t* base;            // (B, N, C) or nullptr (with coef: out = base + ...)
  scalar_t* out;                   // (B, N, C)
  scalar_t alpha;
  int64_t N, E, M, C, Cs;
  int d;

  RRM_HOST_DEVICE void finish(int64_t bi, int64_t c, scalar_t scale, scalar_t s) const {
    scalar_t* o = out + bi * C;
    if (coef)
      o[c] = (base ? base[bi * C + c] : o[c]) + coef[c] * scale * s;
    else
      o[c] = scale * s;
  }

#if !defined(__CUDACC__)  // CPU only (CpuRow)
  template <int W>
  void fixed_width(int64_t bi, const scalar_t* wb, const int32_t* vb, const scalar_t* Lb, scalar_t scale) const {
    CpuRow<scalar_t, W> row;  // W / 8 registers; initialised by the first corner (no zeroing pass)
    row.set_scaled(wb[0], Lb + static_cast<int64_t>(vb[0]) * Cs);
    for (int r = 1; r <= d; ++r) row.add_scaled(wb[r], Lb + static_cast<int64_t>(vb[r]) * Cs);
    scalar_t acc[W];
    row.store(acc);
    scalar_t* o = out + bi * C;
    if (coef) {
      const scalar_t* bs = base ? base + bi * C : o;
      for (int64_t c = 0; c < C; ++c) o[c] = bs[c] + coef[c] * scale * acc[c];
    } else {
      for (int64_t c = 0; c < C; ++c) o[c] = scale * acc[c];
    }
  }
#endif

  RRM_HOST_DEVICE void operator()(int64_t b, int64_t i, int64_t c0, int64_t c1) const {
    const int64_t bi = b * N + i;
    const scalar_t* wb = weights + b * E + i * (d + 1);
    const int32_t* vb = entry_vertex + b * E + i * (d + 1);
    const scalar_t* Lb = lattice_values + b * M * Cs;
    const scalar_t scale = post ? alpha * post[bi] : alpha;
    if (c1 - c0 == 1) {  // one channel (the CUDA decomposition)
      scalar_t s = 0;
      for (int r = 0; r <= d; ++r) s += wb[r] * Lb[static_cast<int64_t>(vb[r]) * Cs + c0];
      finish(bi, c0, scale, s);
      return;
    }
#if !defined(__CUDA_ARCH__)
#if !defined(__CUDACC__)
    if (c0 == 0 && c1 == C) {
      switch (Cs) {
        case 8:
          return fixed_width<8>(bi, wb, vb, Lb, scale);
        case 16:
          return fixed_width<16>(bi, wb, vb, Lb, scale);
        case 24:
          return fixed_width<24>(bi, wb, vb, Lb, scale);
        case 32:
          return fixed_width<32>(bi, wb, vb, Lb, scale);
        default:
          break;
      }
    }
#endif
    for (int64_t cb = c0; cb < c1; cb += kSliceTile) {
      const int64_t nc = (c1 - cb < kSliceTile) ? c1 - cb : kSliceTile;
      scalar_t acc[kSliceTile];
      for (int64_t c = 0; c < nc; ++c) acc[c] = 0;
      for (int r = 0; r <= d; ++r) {
        const scalar_t w = wb[r];
        const scalar_t* L = Lb + static_cast<int64_t>(vb[r]) * Cs + cb;
        for (int64_t c = 0; c < nc; ++c) acc[c] += w * L[c];
      }
      for (int64_t c = 0; c < nc; ++c) finish(bi, cb + c, scale, acc[c]);
    }
#endif
  }
};

// ---------------------------------------------------------------------------------------------
// The features' gradient of the filter out = alpha S^T B S in (B the blur, forward or reversed),
// one thread per pixel. A pixel's simplex (its vertices) is piecewise constant in its features: it
// changes only where a residual crosses another or a rounding boundary, a set of measure zero. So
// only the barycentric weights carry a derivative. Weight r of pixel i (vertex v_r) slices
// Lf = B S in and splats in_i, which the adjoint La = B^T S g slices: d<g, out>/dw_r = s_r =
// alpha (<g_i, Lf[v_r]> + <in_i, La[v_r]>). The weights are linear in the residuals
// v_k = (e_k - rem0_k) / (d + 1) (EmbedFunctor::all_weights: slot d - rank_k gets +v_k, slot
// d + 1 - rank_k, d + 1 wrapping onto 0, gets -v_k), the elevation e = E c in c_m = f_m scale_m
// (e_0 = sum_m c_m, e_j = sum_{m >= j} c_m - j c_{j-1}); so with t_k = (s_{d - rank_k} -
// s_{(d + 1 - rank_k) mod (d + 1)}) / (d + 1), grad f_m = scale_m (sum_{j <= m} t_j - (m + 1) t_{m+1}).
// A pixel the embedding refuses (no weight) gets 0. (The same derivative as autograd through
// rrm_cuda.reference's dense lattice: tests.)
template <typename scalar_t, int kD = 0>
struct FeatureGradFunctor {
  EmbedFunctor<scalar_t, kD> embed;  // the features (B, d, N) and scales: the pixels' simplices
  const scalar_t* in;                // (B, N, C) the filtered values, pixel-major
  const scalar_t* g;                 // (B, N, C) the output's gradient, pixel-major
  const scalar_t* lf;                // (B, M, Cs) B S in
  const scalar_t* la;                // (B, M, Cs) B^T S g
  const int32_t* entry_vertex;       // (B, E)
  scalar_t* grad;                    // (B, d, N) out
  scalar_t alpha;
  int64_t M, C, Cs;

  RRM_HOST_DEVICE void operator()(int64_t b, int64_t i, int64_t, int64_t) const {
    const int d = kD > 0 ? kD : embed.d_runtime;
    const int64_t N = embed.N, E = N * (d + 1);
    int32_t rem0[kMaxDim + 1];
    int rank[kMaxDim + 1];
    scalar_t v[kMaxDim + 1];
    bool bad;
    embed.simplex(b, i, rem0, rank, v, bad);
    scalar_t* out = grad + b * d * N + i;
    if (bad) {
      for (int m = 0; m < d; ++m) out[m * N] = 0;
      return;
    }
    const scalar_t* gi = g + (b * N + i) * C;
    const scalar_t* xi = in + (b * N + i) * C;
    const int32_t* vb = entry_vertex + b * E + i * (d + 1);
    scalar_t s[kMaxDim + 1];
    for (int r = 0; r <= d; ++r) {
      const scalar_t* rf = lf + (b * M + vb[r]) * Cs;
      const scalar_t* ra = la + (b * M + vb[r]) * Cs;
      scalar_t acc = 0;
      for (int64_t c = 0; c < C; ++c) acc += gi[c] * rf[c] + xi[c] * ra[c];
      s[r] = alpha * acc;
    }
    const scalar_t down = scalar_t(1) / static_cast<scalar_t>(d + 1);
    scalar_t t[kMaxDim + 1];
    for (int k = 0; k <= d; ++k) {
      const int lo = d + 1 - rank[k];
      t[k] = (s[d - rank[k]] - s[lo > d ? 0 : lo]) * down;
    }
    scalar_t prefix = 0;
    for (int m = 0; m < d; ++m) {
      prefix += t[m];
      out[m * N] = embed.scale[m] * (prefix - static_cast<scalar_t>(m + 1) * t[m + 1]);
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Mean-field helpers (one thread per pixel; labels are few, the loop over them is short).

// acc[i] -= C m[i] for a full (L, L) compatibility matrix (energy convention). Also the backward's
// adjoint: with C^T and acc zeroed, acc[i] = -(x[i] C).
template <typename scalar_t>
struct MatVecSubFunctor {
  const scalar_t* m;       // (B*N, L)
  const scalar_t* compat;  // (L, L)
  scalar_t* acc;           // (B*N, L)
  int64_t L;
  RRM_HOST_DEVICE void operator()(int64_t t) const {
    const scalar_t* mi = m + t * L;
    scalar_t* a = acc + t * L;
    for (int64_t l = 0; l < L; ++l) {
      scalar_t s = 0;
      for (int64_t k = 0; k < L; ++k) s += compat[l * L + k] * mi[k];
      a[l] -= s;
    }
  }
};

// The fused mean fields (CPU: MeanFieldCpuFunctor; CUDA: MeanFieldSliceFunctor) take at most this
// many pairwise terms; dense_crf runs the per-term path for more.
constexpr int kMaxFusedTerms = 4;

// Several terms' items in one launch (CUDA's fused mean field): items [0, n[0]) run f[0], the next
// n[1] items f[1], and so on; every term has the same channel count. Each stage of a mean-field step
// (chunk splat, chunk reduce, blur along axis j) is one launch for all terms instead of one per term:
// 9 launches per step instead of 14 for a bilateral (d = 5) + Gaussian (d = 2) CRF, and the small
// Gaussian lattice's work runs in the bilateral lattice's grid instead of its own mostly idle one.
// The loop over terms unrolls, so each f[t] is read from the kernel's parameters with a constant index.
template <class F>
struct TermItems {
  static constexpr bool kMinBlocksVariants = min_blocks_variants<F>::value;
  F f[kMaxFusedTerms];
  int64_t n[kMaxFusedTerms];
  int T;

  int64_t total() const {
    int64_t s = 0;
    for (int t = 0; t < T; ++t) s += n[t];
    return s;
  }

  RRM_HOST_DEVICE void operator()(int64_t b, int64_t i, int64_t c0, int64_t c1) const {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int t = 0; t < kMaxFusedTerms; ++t) {
      if (t + 1 == T || i < n[t]) {
        f[t](b, i, c0, c1);
        return;
      }
      i -= n[t];
    }
  }
};

// TermItems over counted lattices (Lattice::counted), for a counted launch: term t's extent for
// image b is counts[t][b % LB[t]] (its vertex or chunk count in device memory), or n[t] where
// counts[t] is null (a lattice whose size the host knows). The launch's per-image extents, their
// sums over the terms, come from TermTotalsFunctor.
template <class F>
struct CountedTermItems {
  F f[kMaxFusedTerms];
  const int32_t* counts[kMaxFusedTerms];
  int64_t n[kMaxFusedTerms];
  int64_t LB[kMaxFusedTerms];
  int T;

  RRM_HOST_DEVICE int64_t extent(int t, int64_t b) const { return counts[t] ? counts[t][b % LB[t]] : n[t]; }
  int64_t capacity() const {
    int64_t s = 0;
    for (int t = 0; t < T; ++t) s += n[t];
    return s;
  }

  RRM_HOST_DEVICE void operator()(int64_t b, int64_t i, int64_t c0, int64_t c1) const {
    for (int t = 0; t < kMaxFusedTerms; ++t) {
      if (t >= T) return;
      const int64_t e = extent(t, b);
      if (i < e) {
        f[t](b, i, c0, c1);
        return;
      }
      i -= e;
    }
  }
};

// totals[b] = the sum over the terms of items's extents for image b (one thread per image).
template <class F>
struct TermTotalsFunctor {
  CountedTermItems<F> items;
  int32_t* totals;  // (B,) out
  RRM_HOST_DEVICE void operator()(int64_t b) const {
    int64_t s = 0;
    for (int t = 0; t < items.T; ++t) s += items.extent(t, b);
    totals[b] = static_cast<int32_t>(s);
  }
};

#if !defined(__CUDACC__)  // CPU only (CpuRow); CUDA has its own fused path (MeanFieldSliceFunctor)
// CPU mean-field step of one image, fused per pixel (lattice_impl.h: mean_field_cpu). For pixel i:
//   row = base_i + sum_t coef_t * (alpha_t post_t(i)) * sum_r w_{t,i,r} L_t[v_{t,i,r}]   (the slices)
//   q_i = softmax(row)
//   then either q_i is written out (last step, label-major (L, N)) or pre_t(i) q_i is scattered
//   into each term's splat buffer (the next step's splats), so Q never goes to memory in between.
// Terms without a blurred buffer (the first step) contribute nothing: q_i = softmax(base_i).
// W = the lattice row width (L padded to 4 or a multiple of 8); the arithmetic per term is that of
// SliceFunctor (with coef and base) and ScatterFunctor, in the same order.
// G > 1: the rows hold G images that share every lattice (dense_crf's unaries of one image, such as
// RRM's two CRFs per crop), each in its own W / G columns with its own softmax: one pass over the
// lattice entries serves all G, and every channel's arithmetic is the G = 1 pass's (the same bits).

template <typename scalar_t>
struct MeanFieldTerm {
  const scalar_t* weights;  // (N*(d+1),)
  const int32_t* vertex;    // (N*(d+1),)
  const scalar_t* blurred;  // (M, W) or nullptr
  const scalar_t* pre;      // (N,) or nullptr
  const scalar_t* post;     // (N,) or nullptr
  const scalar_t* coef;     // (W,) zero-padded
  scalar_t* splat;          // (M, W) this thread's buffer, or nullptr (no scatter)
  scalar_t alpha;
  int d;
};

template <typename scalar_t, int W, int G = 1>
struct MeanFieldCpuFunctor {
  static_assert(W % G == 0, "G images of W / G columns each");
  static constexpr int Wg = W / G;
  const scalar_t* base;  // (N, W) -unary, padded with softmax_pad
  scalar_t* q_out[G];    // (L, N) each (element (c, i) at c * q_c + i * q_i), or nullptr
  int64_t q_c, q_i;      // q_out's strides: (N, 1) label-major, or (1, L) pixel-major
  scalar_t mask[W];      // 1 for the L labels of each image, 0 for the padding
  MeanFieldTerm<scalar_t> terms[kMaxFusedTerms];
  int T;
  int64_t N, L;

  void operator()(int64_t, int64_t i, int64_t, int64_t) const {
    using Row = CpuRow<scalar_t, W>;
    Row row;
    row.load(base + i * W);
    for (int t = 0; t < T; ++t) {
      const MeanFieldTerm<scalar_t>& m = terms[t];
      if (!m.blurred) continue;
      const scalar_t* wb = m.weights + i * (m.d + 1);
      const int32_t* vb = m.vertex + i * (m.d + 1);
      Row acc;
      acc.set_scaled(wb[0], m.blurred + static_cast<int64_t>(vb[0]) * W);
      for (int r = 1; r <= m.d; ++r) acc.add_scaled(wb[r], m.blurred + static_cast<int64_t>(vb[r]) * W);
      const scalar_t scale = m.post ? m.alpha * m.post[i] : m.alpha;
      row.add_coef_scaled(m.coef, scale, acc);
    }
    scalar_t v[W], qi[W];
    row.store(v);
    for (int g = 0; g < G; ++g) softmax_masked<scalar_t, Wg>(v + g * Wg, mask + g * Wg, qi + g * Wg);
    if (q_out[0]) {
      for (int g = 0; g < G; ++g)
        for (int64_t c = 0; c < L; ++c) q_out[g][c * q_c + i * q_i] = qi[g * Wg + c];
    }
    if (!terms[0].splat) return;  // the last step (every term's splat is null there)
    Row q;
    q.load(qi);
    for (int t = 0; t < T; ++t) {
      const MeanFieldTerm<scalar_t>& m = terms[t];
      const scalar_t* wb = m.weights + i * (m.d + 1);
      const int32_t* vb = m.vertex + i * (m.d + 1);
      const scalar_t p = m.pre ? m.pre[i] : scalar_t(1);
      for (int r = 0; r <= m.d; ++r) q.scatter_scaled(m.splat + static_cast<int64_t>(vb[r]) * W, wb[r] * p);
    }
  }
};
#endif

// ---------------------------------------------------------------------------------------------
// The fused mean field of CUDA (and of its emulation), for diagonal compatibilities
// (lattice_impl.h: mean_field_gpu). A step is, per term, a splat of the rows of Q (one thread per
// chunk of a vertex's splat list, SplatChunkFunctor, then SplatReduceFunctor) and d+1 blurs; then
// one thread per pixel slices every term, adds the unary, takes the softmax and writes Q
// (MeanFieldSliceFunctor) -- instead of, per term, a slice pass over (N, L) arrays with one thread
// per channel, and an ATen softmax. Rows are W wide (W = 4, 8, 16, 24 or 32 >= L; the padding of Q
// and of the lattice rows is 0, that of the unary softmax_pad): a thread holds whole rows in
// registers and reads a row of floats as W/4 float4 loads (16-byte aligned: W * 4 bytes is a
// multiple of 16). The arithmetic is that of SplatChunkFunctor and SliceFunctor (with coef and
// base), in the same order. Lattices may be shared: image b uses lattice b % LB of each term.

template <typename scalar_t>
RRM_HOST_DEVICE scalar_t exp_any(scalar_t x) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same<scalar_t, float>::value) {
    return expf(x);
  } else {
    return ::exp(x);
  }
#else
  return std::exp(x);
#endif
}

template <typename scalar_t>
struct MeanFieldRowTerm {
  const scalar_t* weights;  // (LB, E)
  const int32_t* vertex;    // (LB, E)
  const scalar_t* blurred;  // (B, M, W), or nullptr: the term is skipped (the first step)
  const scalar_t* post;     // (LB, N) or nullptr
  const scalar_t* coef;     // (W,) -diag(compat), zero-padded
  scalar_t alpha;
  int64_t E, M, LB;
  int d;
};

// Rows of C channels copied into rows of Cs >= C channels, zero-padded: out (B, N, Cs) from in
// (B, N, C), both contiguous. One item per (b, i, channel of out); the generic filter's float4
// lattice rows on the GPU (knob filter_rows4).
template <typename scalar_t>
struct PadRowsFunctor {
  const scalar_t* in;
  scalar_t* out;
  int64_t N, C, Cs;
  RRM_HOST_DEVICE void operator()(int64_t b, int64_t i, int64_t c0, int64_t c1) const {
    const scalar_t* src = in + (b * N + i) * C;
    scalar_t* dst = out + (b * N + i) * Cs;
    for (int64_t c = c0; c < c1; ++c) dst[c] = c < C ? src[c] : scalar_t(0);
  }
};

// The fused GPU mean field's compatibility rows, one functor instead of several ATen calls:
// coef[t, :] = (-compat[t, l, l] for l < L, 0...).
template <typename scalar_t>
struct PadCoefRowsFunctor {
  const scalar_t* compat;  // (T, L, L) contiguous
  scalar_t* coef;          // (T, W) out
  int64_t L, W;
  RRM_HOST_DEVICE void operator()(int64_t k) const {
    const int64_t t = k / W, l = k % W;
    coef[k] = l < L ? -compat[(t * L + l) * L + l] : scalar_t(0);
  }
};

// q_i = softmax(-U_i + sum_t coef_t * alpha_t * post_t(i) * slice_t(i)) of pixel (b, i), written as
// a padded row of q or label-major into q_lmajor (the last step). The unary is read where it lies,
// label-major with any strides (a warp's 32 pixels read consecutive addresses per label when the
// pixel stride is 1), and padded in registers: no (B, N, W) copy of it, and no pass to make one.
template <typename scalar_t>
struct MeanFieldSliceArgs {
  const scalar_t* unary;  // (B, L, N), strides sb, sl, sn
  scalar_t* q;            // (B, N, W) out, or nullptr
  scalar_t* q_lmajor;     // (B, L, N) out, or nullptr
  MeanFieldRowTerm<scalar_t> terms[kMaxFusedTerms];
  int T;
  int64_t N, L, sb, sl, sn;
};

// G: channels summed at a time. G = W takes each vertex's whole row at once (the d+1 rows' loads and
// sums need 96 registers at W = 24, sm_90: a quarter of the SM's warps fit); G = 4 takes the d+1
// rows four channels (one float4) at a time (64 registers at W = 24: half the warps). Tuning knob
// slice_group4. Each channel's sums are the same terms in the same order: the same bits.
template <typename scalar_t, int W, int G = W>
struct MeanFieldSliceFunctor : MeanFieldSliceArgs<scalar_t> {
  // CUDA: the four-channel slice also compiled with register caps (knob item_min_blocks, common/cuda_exec.cuh)
  static constexpr bool kMinBlocksVariants = std::is_same<scalar_t, float>::value && G == 4;
  static_assert(W % G == 0, "G must divide W");
  using MeanFieldSliceArgs<scalar_t>::unary;
  using MeanFieldSliceArgs<scalar_t>::q;
  using MeanFieldSliceArgs<scalar_t>::q_lmajor;
  using MeanFieldSliceArgs<scalar_t>::terms;
  using MeanFieldSliceArgs<scalar_t>::T;
  using MeanFieldSliceArgs<scalar_t>::N;
  using MeanFieldSliceArgs<scalar_t>::L;
  using MeanFieldSliceArgs<scalar_t>::sb;
  using MeanFieldSliceArgs<scalar_t>::sl;
  using MeanFieldSliceArgs<scalar_t>::sn;

  RRM_HOST_DEVICE void operator()(int64_t b, int64_t i, int64_t, int64_t) const {
    scalar_t row[W];
    compute(b, i, row);
    if (q_lmajor) {
      scalar_t* o = q_lmajor + b * L * N + i;
      for (int c = 0; c < W; ++c)
        if (c < L) o[c * N] = row[c];
      return;
    }
    row_store<scalar_t, W>(q + (b * N + i) * W, row);
  }

  // row = q_i of pixel (b, i), padded to W with zeros.
  // The vertex rows where they lie: term t's blurred rows of image b (global memory).
  struct GlobalRows {
    static constexpr bool kAny = false;  // read-only-path loads
    RRM_HOST_DEVICE const scalar_t* operator()(int, const MeanFieldRowTerm<scalar_t>& m, int64_t b, int64_t, int64_t,
                                               int32_t v) const {
      return m.blurred + (b * m.M + v) * W;
    }
  };

  RRM_HOST_DEVICE void compute(int64_t b, int64_t i, scalar_t* row) const { compute_with(b, i, row, GlobalRows{}); }

  // compute with the vertex row of entry e (corner r of pixel i: e = i (d+1) + r, vertex v) of term t
  // at rows(t, term, b, lb, e, v); Rows::kAny: rows in any memory (block-shared), plain loads.
  template <class Rows>
  RRM_HOST_DEVICE void compute_with(int64_t b, int64_t i, scalar_t* row, const Rows& rows) const {
    const scalar_t* u = unary + b * sb + i * sn;
    for (int c = 0; c < W; ++c) row[c] = c < L ? -u[c * sl] : softmax_pad<scalar_t>();
    for (int t = 0; t < T; ++t) {
      const MeanFieldRowTerm<scalar_t>& m = terms[t];
      if (!m.blurred) continue;
      const int64_t lb = b < m.LB ? b : b % m.LB;
      const int64_t e0 = i * (m.d + 1);
      const scalar_t* wb = m.weights + lb * m.E + e0;
      const int32_t* vb = m.vertex + lb * m.E + e0;
      const scalar_t scale = m.post ? m.alpha * m.post[lb * N + i] : m.alpha;
      for (int g = 0; g < W; g += G) {
        scalar_t acc[G];
        for (int c = 0; c < G; ++c) acc[c] = 0;
        for (int r = 0; r <= m.d; ++r) {
          const scalar_t* src = rows(t, m, b, lb, e0 + r, vb[r]) + g;
          if constexpr (Rows::kAny) {
            row_add_scaled_any<scalar_t, G>(acc, wb[r], src);
          } else {
            row_add_scaled<scalar_t, G>(acc, wb[r], src);
          }
        }
        for (int c = 0; c < G; ++c) row[g + c] += m.coef[g + c] * scale * acc[c];
      }
    }
    // softmax over the L labels (densecrf's expAndNormalize: max-subtracted); padding gives q = 0
    scalar_t mx = row[0];
    for (int c = 1; c < W; ++c) mx = row[c] > mx ? row[c] : mx;
    scalar_t sum = 0;
    for (int c = 0; c < W; ++c) {
      row[c] = c < L ? exp_any(row[c] - mx) : scalar_t(0);
      sum += row[c];
    }
    const scalar_t inv = scalar_t(1) / sum;
    for (int c = 0; c < W; ++c) row[c] *= inv;
  }
};

// The tiled mean field (Lattice::chunk_tile = P; knobs mean_field_tile, mean_field_tile_kernel):
// one block per tile of P consecutive pixels of image b. Phase 1 puts the tile's rows of Q in shared
// memory: copied from q (kSlice = false), or computed there (kSlice: the slice, unary and softmax of
// MeanFieldSliceFunctor, whose q the block never writes); phase 2 sums every term's chunks of the
// tile (a chunk of a tile-cut lattice lies in one tile) from those rows, V channels per thread,
// into the chunk's row of partial: SplatChunkFunctor's arithmetic in its order (each entry's w * pre,
// then the products in entry order), so the same bits as the chunk splat over the same chunks,
// with each row of Q read from global memory once per step instead of once per vertex of its pixel.
template <typename scalar_t>
struct TileSplatTerm {
  const int32_t* tile_offsets;   // (LB, ntiles + 2)
  const int32_t* chunk_begin;    // (LB, K) launch order
  const int32_t* chunk_end;      // (LB, K)
  const int32_t* chunk_slot;     // (LB, K) the chunk's row of partial
  const int32_t* splat_pixel;    // (LB, E)
  const scalar_t* splat_weight;  // (LB, E)
  const scalar_t* pre;           // (LB, N) or nullptr
  scalar_t* partial;             // (B, K, W) out
  int64_t E, K, LB;
  const int32_t* chunk_vertex = nullptr;  // (LB, K) vertex order (kernel 3)
  const int32_t* entry_local = nullptr;   // (LB, E) Lattice::tile_entry_local (kernel 3)
};

template <typename scalar_t, int W, int V, class Slice, int kMode>
struct TileMeanFieldFunctor {
  static_assert(kMode >= 1 && kMode <= 3, "kernels 1-3");
  static_assert(kMaxFusedTerms == 4, "StagedRows's base is initialised term by term");
  Slice slice;        // kMode >= 2: computes the rows (its q and q_lmajor unused)
  const scalar_t* q;  // (B, N, W): kMode 1
  TileSplatTerm<scalar_t> terms[kMaxFusedTerms];
  int T;
  int64_t N, P, ntiles;
  int64_t R = 0;  // kMode 3: rows of shared memory for the tile's vertex rows, after its P rows of Q

  // kMode 3: the vertex row of entry e of term t, staged in shared memory (its chunk's row).
  // Term t's first staged row, base[t], picked by selects over constant indices: a runtime index
  // into a thread's array would put it in local memory (a stack frame).
  static RRM_HOST_DEVICE int64_t pick(const int64_t (&base)[kMaxFusedTerms], int t) {
    int64_t r = base[0];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int k = 1; k < kMaxFusedTerms; ++k) r = t == k ? base[k] : r;
    return r;
  }

  struct StagedRows {
    static constexpr bool kAny = true;
    const scalar_t* rows;
    int64_t base[kMaxFusedTerms];
    const TileSplatTerm<scalar_t>* terms;
    RRM_HOST_DEVICE const scalar_t* operator()(int t, const MeanFieldRowTerm<scalar_t>&, int64_t, int64_t lb, int64_t e,
                                               int32_t) const {
      return rows + (pick(base, t) + terms[t].entry_local[lb * terms[t].E + e]) * W;
    }
  };

  template <class Blk>
  RRM_HOST_DEVICE void operator()(const Blk& blk, int64_t b, int64_t tile) const {
    scalar_t* const qs = blk.template shared<scalar_t>();  // (P, W)
    const int64_t p0 = tile * P, np = N - p0 < P ? N - p0 : P;
    const int nt = blk.threads();
    // kMode 3, after the first step: every term's chunks of the tile take a row each of shared
    // memory (term t's from base[t]) when all fit in R rows -- the same for every thread of the block.
    int64_t base[kMaxFusedTerms] = {};
    bool staged = false;
    if constexpr (kMode == 3) {
      int64_t total = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
      for (int t = 0; t < kMaxFusedTerms; ++t) {
        if (t >= T) continue;
        const int32_t* to = terms[t].tile_offsets + (b < terms[t].LB ? b : b % terms[t].LB) * (ntiles + 2);
        base[t] = total;
        total += to[tile + 1] - to[tile];
        staged = staged || slice.terms[t].blurred != nullptr;
      }
      staged = staged && total <= R;
    }
    scalar_t* const rs = qs + P * W;
    if (staged) {
      blk.phase([&](int th) {
        for (int t = 0; t < T; ++t) {
          const TileSplatTerm<scalar_t>& m = terms[t];
          const MeanFieldRowTerm<scalar_t>& mr = slice.terms[t];
          if (!mr.blurred) continue;
          const int64_t lb = b < m.LB ? b : b % m.LB;
          const int64_t k0 = m.tile_offsets[lb * (ntiles + 2) + tile];
          const int64_t n = (m.tile_offsets[lb * (ntiles + 2) + tile + 1] - k0) * W;
          scalar_t* const dst = rs + pick(base, t) * W;
          for (int64_t x = th; x < n; x += nt) {
            const int64_t j = x / W, c = x - j * W;
            const int64_t v = m.chunk_vertex[lb * m.K + m.chunk_slot[lb * m.K + k0 + j]] - 1;
            dst[j * W + c] = mr.blurred[(b * mr.M + v) * W + c];
          }
        }
      });
    }
    blk.phase([&](int th) {
      if constexpr (kMode >= 2) {
        for (int64_t p = th; p < np; p += nt) {
          scalar_t row[W];
          if (staged) {
            slice.compute_with(b, p0 + p, row, StagedRows{rs, {base[0], base[1], base[2], base[3]}, terms});
          } else {
            slice.compute(b, p0 + p, row);
          }
          row_copy<scalar_t, W>(qs + p * W, row);
        }
      } else {
        const scalar_t* src = q + (b * N + p0) * W;
        for (int64_t x = th; x < np * W; x += nt) qs[x] = src[x];
      }
    });
    blk.phase([&](int th) {
      constexpr int G = W / V;
      for (int t = 0; t < T; ++t) {
        const TileSplatTerm<scalar_t>& m = terms[t];
        const int64_t lb = b < m.LB ? b : b % m.LB;
        const int32_t* to = m.tile_offsets + lb * (ntiles + 2);
        const int64_t k0 = to[tile], n = (to[tile + 1] - k0) * G;
        const int32_t* pix = m.splat_pixel + lb * m.E;
        const scalar_t* wb = m.splat_weight + lb * m.E;
        const scalar_t* pb = m.pre ? m.pre + lb * N : nullptr;
        for (int64_t x = th; x < n; x += nt) {
          const int64_t k = lb * m.K + k0 + x / G, g = x % G;
          const int64_t s1 = m.chunk_end[k];
          scalar_t acc[V];
          for (int c = 0; c < V; ++c) acc[c] = 0;
          for (int64_t s = m.chunk_begin[k]; s < s1; ++s) {
            const int64_t i = pix[s];
            scalar_t w = wb[s];
            if (pb) w = w * pb[i];
            scalar_t xv[V];
            row_copy<scalar_t, V>(xv, qs + (i - p0) * W + V * g);
            for (int c = 0; c < V; ++c) acc[c] += w * xv[c];
          }
          row_store<scalar_t, V>(m.partial + (b * m.K + m.chunk_slot[k]) * W + V * g, acc);
        }
      }
    });
  }
};

// Normaliser from n = K 1: symmetric 1/sqrt(n + 1e-20), after/before 1/(n + 1e-20) (densecrf).
template <typename scalar_t>
struct NormFunctor {
  scalar_t* n;  // in: K 1, out: the normaliser (in place)
  bool symmetric;
  RRM_HOST_DEVICE void operator()(int64_t t) const {
    const double v = static_cast<double>(n[t]) + 1e-20;
    n[t] = static_cast<scalar_t>(symmetric ? 1.0 / sqrt(v) : 1.0 / v);
  }
};

// ---------------------------------------------------------------------------------------------
// Dense-CRF backward helpers (lattice_impl.h: dense_crf_backward; one thread per pixel).

// Softmax backward of one row: for q = softmax(x) and g = dL/dq, dL/dx_l = q_l (g_l - sum_j g_j q_j).
// out (or nullptr) receives dL/dx; grad_unary (or nullptr) accumulates -dL/dx, since every step's
// softmax input contains -U. The CPU's path (softmax_backward_rows); CUDA uses ATen's kernel.
template <typename scalar_t>
struct SoftmaxBackwardFunctor {
  const scalar_t* grad;  // (B*N, L) dL/dq
  const scalar_t* q;     // (B*N, L)
  scalar_t* out;         // (B*N, L) or nullptr
  scalar_t* grad_unary;  // (B*N, L) or nullptr
  int64_t L;
  RRM_HOST_DEVICE void operator()(int64_t t) const {
    const scalar_t* g = grad + t * L;
    const scalar_t* qi = q + t * L;
    scalar_t s = 0;
    for (int64_t l = 0; l < L; ++l) s += g[l] * qi[l];
    for (int64_t l = 0; l < L; ++l) {
      const scalar_t v = qi[l] * (g[l] - s);
      if (out) out[t * L + l] = v;
      if (grad_unary) grad_unary[t * L + l] -= v;
    }
  }
};

}  // namespace lattice
}  // namespace rrm
