// Per-thread math of the BCD-loss reductions (SPEC section 4), written once as RRM_HOST_DEVICE
// functors. bcd_impl.h strings them together; CpuExec / EmulatedCudaExec (bcd_cpu.cpp) and CudaExec
// (bcd_cuda.cu) run these same bodies.
//
// Conventions:
//   features  (B, C, N) of scalar_t (float, double, Half, BFloat16), ANY strides (sB, sC, sN): NCHW,
//             channels-last and sliced inputs are read in place, never copied
//   key       (B, N) int32: the pixel's class in [0, K), or K for "ignored"
//   segments  pixels of (image b, class k) in increasing pixel order:
//             perm[b * N + j] for j in [offsets[b * (K + 1) + k], offsets[b * (K + 1) + k + 1]);
//             every reduction walks its segment in that fixed order, so results do not depend on the
//             number of threads or the order they run in (deterministic on CPU and GPU, no float atomics)
//   acc_t     accumulation type: double on the CPU, the compute type (float / double) on the GPU
//   out_t     the compute type: double for double features, float otherwise (fp16/bf16 accumulate in fp32)
#pragma once

#include <cmath>
#include <cstdint>

#include "common/macros.h"

namespace rrm {
namespace bcd {

// The authors' cosine: cos(a, b) = a.b / (|a| |b| + 1e-7) (SPEC section 4).
constexpr double kCosEps = 1e-7;

struct FeatureView {
  int64_t sB, sC, sN;  // element strides of features (B, C, N)
};

// ---------------------------------------------------------------------------------------------
// 1. Segmented sum, one thread per (b, k, c): out[b, k, c] = sum_{p in segment(b, k)} w_p F[b, c, p]
//    (w = 1 when weight is null). The thread order is (b, c, k) with k fastest when the features are
//    pixel-contiguous (a row F[b, c, :] is reused from cache by the K threads that share it) and
//    (b, k, c) with c fastest when they are channel-contiguous (coalesced reads on the GPU).
template <typename scalar_t, typename acc_t, typename out_t>
struct SegmentSumFunctor {
  const scalar_t* features;
  FeatureView fv;
  const int32_t* perm;     // (B, N)
  const int64_t* offsets;  // (B, K + 1 + 1)
  const out_t* weight;     // (B, N) or nullptr
  out_t* out;              // (B, K, C) contiguous
  int64_t C, N, K;
  bool c_fastest;
  RRM_HOST_DEVICE void operator()(int64_t t) const {
    int64_t b, k, c;
    if (c_fastest) {
      c = t % C;
      k = (t / C) % K;
      b = t / (C * K);
    } else {
      k = t % K;
      c = (t / K) % C;
      b = t / (C * K);
    }
    const int64_t* off = offsets + b * (K + 2);
    const int32_t* pb = perm + b * N;
    const scalar_t* row = features + b * fv.sB + c * fv.sC;
    acc_t acc = 0;
    if (weight == nullptr) {
      for (int64_t j = off[k]; j < off[k + 1]; ++j) acc += static_cast<acc_t>(row[pb[j] * fv.sN]);
    } else {
      const out_t* wb = weight + b * N;
      for (int64_t j = off[k]; j < off[k + 1]; ++j) {
        const int64_t n = pb[j];
        acc += static_cast<acc_t>(wb[n]) * static_cast<acc_t>(row[n * fv.sN]);
      }
    }
    out[(b * K + k) * C + c] = static_cast<out_t>(acc);
  }
};

// ---------------------------------------------------------------------------------------------
// 2. Gather (the adjoint of 1), one thread per run of `per` consecutive pixels of one (b, c) row:
//    out[b, c, n] = values[b, key[b, n], c], 0 for ignored pixels. values (B, K, C) contiguous,
//    out (B, C, N) contiguous. The GPU uses per = 1 (one element per thread, coalesced writes); the
//    CPU per = N (a whole row per task: no index arithmetic per element).
template <typename in_t, typename out_t>
struct GatherFunctor {
  const in_t* values;
  const int32_t* key;
  out_t* out;
  int64_t C, N, K, per;
  RRM_HOST_DEVICE void operator()(int64_t t) const {
    const int64_t runs = (N + per - 1) / per;
    const int64_t row = t / runs;  // b * C + c
    const int64_t n0 = (t % runs) * per;
    const int64_t n1 = n0 + per < N ? n0 + per : N;
    const int64_t c = row % C, b = row / C;
    const int32_t* kb = key + b * N;
    const in_t* vb = values + b * K * C + c;
    out_t* o = out + row * N;
    for (int64_t n = n0; n < n1; ++n) {
      const int32_t k = kb[n];
      o[n] = k < K ? static_cast<out_t>(vb[k * C]) : out_t(0);
    }
  }
};

// ---------------------------------------------------------------------------------------------
// 3. Per-pixel statistics, in two steps.
// 3a. One thread per (b, channel chunk j, block of P consecutive pixels): partial sums over the
//     channels [j * chunk_c, (j + 1) * chunk_c) of F[b, c, n] * centers[b, key, c] and F[b, c, n]^2
//     (0 for ignored pixels) into part_s / part_q (B, chunks, N). The channel loop is outside the
//     pixel loop so that on the CPU (P = 32, one chunk of all channels) a block reads pixel-contiguous
//     features as P-wide rows; the GPU uses P = 1 and chunks of 64 channels, which gives B * N * C / 64
//     threads instead of B * N (enough to fill the GPU at the authors' B * N = 13k pixels) and coalesced
//     reads (consecutive threads, consecutive pixels). centers_t is (B, C, K) contiguous (transposed, so
//     that the P pixels' centre entries of one channel share cache lines).
template <typename scalar_t, typename acc_t, typename out_t, int P>
struct PixelStatsFunctor {
  const scalar_t* features;
  FeatureView fv;
  const int32_t* key;      // (B, N)
  const out_t* centers_t;  // (B, C, K)
  acc_t* part_s;           // (B, chunks, N)
  acc_t* part_q;           // (B, chunks, N)
  int64_t C, N, K, chunk_c, chunks;
  RRM_HOST_DEVICE void operator()(int64_t t) const {
    const int64_t blocks = (N + P - 1) / P;
    const int64_t n0 = (t % blocks) * P;
    const int64_t j = (t / blocks) % chunks;
    const int64_t b = t / (blocks * chunks);
    const int np = static_cast<int>(N - n0 < P ? N - n0 : P);
    acc_t s[P], q[P];
    int32_t kk[P];
    for (int i = 0; i < P; ++i) {
      s[i] = 0;
      q[i] = 0;
      kk[i] = i < np ? key[b * N + n0 + i] : static_cast<int32_t>(K);
    }
    const int64_t c0 = j * chunk_c;
    const int64_t c1 = c0 + chunk_c < C ? c0 + chunk_c : C;
    const scalar_t* fb = features + b * fv.sB + n0 * fv.sN;
    const out_t* cb = centers_t + b * C * K;
    for (int64_t c = c0; c < c1; ++c) {
      const scalar_t* fc = fb + c * fv.sC;
      const out_t* cc = cb + c * K;
      for (int i = 0; i < np; ++i) {
        if (kk[i] >= K) continue;
        const acc_t f = static_cast<acc_t>(fc[i * fv.sN]);
        s[i] += f * static_cast<acc_t>(cc[kk[i]]);
        q[i] += f * f;
      }
    }
    const int64_t o = (b * chunks + j) * N + n0;
    for (int i = 0; i < np; ++i) {
      part_s[o + i] = s[i];
      part_q[o + i] = q[i];
    }
  }
};

// 3b. One thread per (b, n): dot = sum of the chunks' partial dots, norm = sqrt(sum of the partial
//     squares), the chunks added in increasing order (deterministic).
template <typename acc_t, typename out_t>
struct FinishStatsFunctor {
  const acc_t* part_s;  // (B, chunks, N)
  const acc_t* part_q;
  out_t* dot;   // (B, N)
  out_t* norm;  // (B, N)
  int64_t N, chunks;
  RRM_HOST_DEVICE void operator()(int64_t t) const {
    const int64_t b = t / N, n = t % N;
    acc_t s = 0, q = 0;
    for (int64_t j = 0; j < chunks; ++j) {
      s += part_s[(b * chunks + j) * N + n];
      q += part_q[(b * chunks + j) * N + n];
    }
    dot[t] = static_cast<out_t>(s);
    norm[t] = static_cast<out_t>(sqrt(q));
  }
};

// ---------------------------------------------------------------------------------------------
// 4. Cosine sums, one thread per (b, k): out[b, k] = sum_{p in segment(b, k)} dot_p / (norm_p |c_bk| + eps).
template <typename acc_t, typename out_t>
struct CosineSumFunctor {
  const out_t* dot;          // (B, N)
  const out_t* norm;         // (B, N)
  const out_t* center_norm;  // (B, K)
  const int32_t* perm;
  const int64_t* offsets;
  out_t* out;  // (B, K)
  int64_t N, K;
  RRM_HOST_DEVICE void operator()(int64_t t) const {
    const int64_t b = t / K, k = t % K;
    const int64_t* off = offsets + b * (K + 2);
    const int32_t* pb = perm + b * N;
    const acc_t cn = static_cast<acc_t>(center_norm[t]);
    acc_t acc = 0;
    for (int64_t j = off[k]; j < off[k + 1]; ++j) {
      const int64_t n = b * N + pb[j];
      acc += static_cast<acc_t>(dot[n]) / (static_cast<acc_t>(norm[n]) * cn + static_cast<acc_t>(kCosEps));
    }
    out[t] = static_cast<out_t>(acc);
  }
};

// ---------------------------------------------------------------------------------------------
// Backward of the cosine sums. With s = F.c, a = |F|, n = |c|, D = a n + eps, cos = s / D:
//   dcos/dF = c / D - (s n / (a D^2)) F        (the second term is 0 at a = 0: torch's subgradient of |F|)
//   dcos/dc = F / D - (s a / (n D^2)) c        (likewise 0 at n = 0)
// so with g = grad[b, key_p]:
//   grad_F[:, p] = alpha_p c_{b,key_p} + beta_p F_p,   alpha_p = g / D_p,   beta_p = -g s_p n / (a_p D_p^2)
//   grad_c[b, k] = sum_p alpha_p F_p - (gamma_bk / n) c_bk,   gamma_bk = sum_p g s_p a_p / D_p^2
//
// 5. Per-pixel coefficients, one thread per (b, n): alpha, beta (0 for ignored pixels).
template <typename acc_t, typename out_t>
struct CosineCoefFunctor {
  const out_t* grad;         // (B, K)
  const out_t* dot;          // (B, N)
  const out_t* norm;         // (B, N)
  const out_t* center_norm;  // (B, K)
  const int32_t* key;        // (B, N)
  out_t* alpha;              // (B, N)
  out_t* beta;               // (B, N)
  int64_t N, K;
  RRM_HOST_DEVICE void operator()(int64_t t) const {
    const int64_t b = t / N;
    const int32_t k = key[t];
    if (k >= K) {
      alpha[t] = out_t(0);
      beta[t] = out_t(0);
      return;
    }
    const acc_t g = static_cast<acc_t>(grad[b * K + k]);
    const acc_t cn = static_cast<acc_t>(center_norm[b * K + k]);
    const acc_t a = static_cast<acc_t>(norm[t]);
    const acc_t s = static_cast<acc_t>(dot[t]);
    const acc_t D = a * cn + static_cast<acc_t>(kCosEps);
    alpha[t] = static_cast<out_t>(g / D);
    // as ratios (each about 1 or 1/D): g s n / (a D^2) formed as a product overflows float from |F| ~ 6e7
    beta[t] = static_cast<out_t>(a > 0 ? -(g / D) * (s / D) * (cn / a) : acc_t(0));
  }
};

// 6. gamma, one thread per (b, k): sum over the segment of g s_p a_p / D_p^2, in segment order.
template <typename acc_t, typename out_t>
struct CosineGammaFunctor {
  const out_t* grad;
  const out_t* dot;
  const out_t* norm;
  const out_t* center_norm;
  const int32_t* perm;
  const int64_t* offsets;
  out_t* gamma;  // (B, K)
  int64_t N, K;
  RRM_HOST_DEVICE void operator()(int64_t t) const {
    const int64_t b = t / K, k = t % K;
    const int64_t* off = offsets + b * (K + 2);
    const int32_t* pb = perm + b * N;
    const acc_t cn = static_cast<acc_t>(center_norm[t]);
    acc_t acc = 0;
    for (int64_t j = off[k]; j < off[k + 1]; ++j) {
      const int64_t n = b * N + pb[j];
      const acc_t a = static_cast<acc_t>(norm[n]);
      const acc_t D = a * cn + static_cast<acc_t>(kCosEps);
      acc += (static_cast<acc_t>(dot[n]) / D) * (a / D);  // not s a / D^2: D^2 overflows float
    }
    gamma[t] = static_cast<out_t>(static_cast<acc_t>(grad[t]) * acc);
  }
};

// 7. grad_F, one thread per run of `per` consecutive pixels of one (b, c) row of the (B, C, N)
//    contiguous result (per = 1 on the GPU, N on the CPU, as in 2):
//    alpha_p c[b, key_p, c] + beta_p F[b, c, p] (0 for ignored pixels).
template <typename scalar_t, typename acc_t, typename out_t>
struct CosineGradFeaturesFunctor {
  const scalar_t* features;
  FeatureView fv;
  const int32_t* key;
  const out_t* centers;  // (B, K, C) contiguous
  const out_t* alpha;
  const out_t* beta;
  scalar_t* out;  // (B, C, N)
  int64_t C, N, K, per;
  RRM_HOST_DEVICE void operator()(int64_t t) const {
    const int64_t runs = (N + per - 1) / per;
    const int64_t row = t / runs;  // b * C + c
    const int64_t n0 = (t % runs) * per;
    const int64_t n1 = n0 + per < N ? n0 + per : N;
    const int64_t c = row % C, b = row / C;
    const int32_t* kb = key + b * N;
    const out_t* ab = alpha + b * N;
    const out_t* bb = beta + b * N;
    const out_t* cb = centers + b * K * C + c;
    const scalar_t* fb = features + b * fv.sB + c * fv.sC;
    scalar_t* o = out + row * N;
    for (int64_t n = n0; n < n1; ++n) {
      const int32_t k = kb[n];
      if (k >= K) {
        o[n] = scalar_t(0);
        continue;
      }
      const acc_t v = static_cast<acc_t>(ab[n]) * static_cast<acc_t>(cb[k * C]) +
                      static_cast<acc_t>(bb[n]) * static_cast<acc_t>(fb[n * fv.sN]);
      o[n] = static_cast<scalar_t>(v);
    }
  }
};

// ---------------------------------------------------------------------------------------------
// GPU (and emulated) segment machinery. The per-segment functors above give one thread a whole
// segment, which on the GPU serialises the kernel on the background class (thousands of pixels).
// The GPU path instead cuts every segment into chunks of at most kChunkSteps entries and sums in two
// steps (chunk partials, then the chunks of a segment in order), so every sum still has a fixed
// order: bitwise reproducible, no floating-point atomics.
//
// Chunk shape. A segment is cut into tiles of kChunkLanes * kChunkSteps consecutive (sorted) entries;
// chunk l of a tile takes the entries l, l + kChunkLanes, l + 2 kChunkLanes, ... of the tile (lanes
// interleaved rather than contiguous runs). With NCHW features (pixel-contiguous rows), the 32 threads
// of a warp are the 32 lanes of one tile for one channel: at each step they read 32 consecutive
// entries of the segment, i.e. increasing pixels of one row -- for a spatially coherent class (a
// region of the image) one or two 128-byte lines per load instead of 32 lines for contiguous chunks
// (or for channel-fastest threads, which read 32 rows N elements apart). Transposing the features to
// channels-last first would make every load coalesced whatever the labels, but costs a read and a
// write of the whole tensor (3 feature-sized transfers instead of 1), and ATen's strided copy has
// the same uncoalesced side; so we read in place. With channels-last features the threads of a warp
// are instead 32 consecutive channels of one chunk (coalesced whatever the labels).
// Chunks of a segment: floor(len / T) full tiles of kChunkLanes chunks, then min(len mod T, kChunkLanes)
// chunks (a chunk is never empty), so an image has at most min(N, N / kChunkSteps + K kChunkLanes)
// chunks: the partial buffers are sized without a host synchronisation.
constexpr int64_t kChunkLanes = 32;
constexpr int64_t kChunkSteps = 32;
constexpr int64_t kChunkTile = kChunkLanes * kChunkSteps;

RRM_HOST_DEVICE int64_t chunks_of_segment(int64_t len) {
  const int64_t rem = len % kChunkTile;
  return (len / kChunkTile) * kChunkLanes + (rem < kChunkLanes ? rem : kChunkLanes);
}

// Upper bound of the chunks of one image, rounded up to a multiple of kChunkLanes (warps of lanes).
inline int64_t chunk_capacity(int64_t N, int64_t K) {
  int64_t cap = N / kChunkSteps + K * kChunkLanes;
  if (cap > N) cap = N;
  return (cap + kChunkLanes - 1) / kChunkLanes * kChunkLanes;
}

// S1. Class keys, one thread per pixel (B, N): key = label (K for ignore_index), sort key
//     skey = key + b (K + 1) (so that one flat stable sort groups by image, then class); an invalid
//     label sets *bad (every writer writes 1: no race on the value) and is treated as ignored.
template <typename label_t, typename skey_t>
struct KeysFunctor {
  const label_t* labels;
  int64_t lsB, lsN;  // element strides of labels (B, N)
  int32_t* key;      // (B, N)
  skey_t* skey;      // (B * N), or nullptr: not wanted
  int32_t* bad;      // (1)
  int64_t N, K, ignore_index;
  RRM_HOST_DEVICE void operator()(int64_t t) const {
    const int64_t b = t / N, n = t % N;
    const int64_t l = static_cast<int64_t>(labels[b * lsB + n * lsN]);
    int64_t k = l;
    if (l == ignore_index) {
      k = K;
    } else if (l < 0 || l >= K) {
      *bad = 1;
      k = K;
    }
    key[t] = static_cast<int32_t>(k);
    if (skey != nullptr) skey[t] = static_cast<skey_t>(k + b * (K + 1));
  }
};

// S2. Segment bounds and pixel order from the stable sort, one thread per sorted position t of the
//     flat (B * N) order: perm[t] = the pixel (index - b N); the thread at the start of a run of equal
//     keys writes the offsets of its class and of the empty classes before it; the image's last
//     thread also closes the classes after it (offsets[b, K + 1] = N). No search, no bincount.
template <typename skey_t>
struct SegmentBoundsFunctor {
  const skey_t* sorted;  // (B * N) sorted sort keys
  const int64_t* order;  // (B * N) their original flat positions
  int32_t* perm;         // (B, N)
  int64_t* offsets;      // (B, K + 2)
  int64_t N, K;
  RRM_HOST_DEVICE void operator()(int64_t t) const {
    const int64_t b = t / N, j = t % N;
    perm[t] = static_cast<int32_t>(order[t] - b * N);
    const int64_t base = b * (K + 1);
    const int64_t cur = static_cast<int64_t>(sorted[t]) - base;
    const int64_t prev = j == 0 ? -1 : static_cast<int64_t>(sorted[t - 1]) - base;
    int64_t* o = offsets + b * (K + 2);
    for (int64_t k = prev + 1; k <= cur; ++k) o[k] = j;
    if (j == N - 1)
      for (int64_t k = cur + 1; k <= K + 1; ++k) o[k] = N;
  }
};

// S3. Chunk offsets, one thread per image: chunk_offsets[b, k] = chunks of the classes before k
//     (k in [0, K]; the ignored pixels get no chunks).
struct ChunkOffsetsFunctor {
  const int64_t* offsets;  // (B, K + 2)
  int32_t* chunk_offsets;  // (B, K + 1)
  int64_t K;
  RRM_HOST_DEVICE void operator()(int64_t b) const {
    const int64_t* o = offsets + b * (K + 2);
    int32_t* co = chunk_offsets + b * (K + 1);
    int64_t acc = 0;
    for (int64_t k = 0; k < K; ++k) {
      co[k] = static_cast<int32_t>(acc);
      acc += chunks_of_segment(o[k + 1] - o[k]);
    }
    co[K] = static_cast<int32_t>(acc);
  }
};

// S4. Chunk table, one thread per (b, k): chunk q of image b takes the sorted entries
//     chunk_begin[b, q], + kChunkLanes, ... < chunk_end[b, q]. Slots q >= chunk_offsets[b, K] are
//     unused (left unwritten; readers check q against chunk_offsets[b, K]).
struct ChunkTableFunctor {
  const int64_t* offsets;        // (B, K + 2)
  const int32_t* chunk_offsets;  // (B, K + 1)
  int32_t* chunk_begin;          // (B, cap)
  int32_t* chunk_end;            // (B, cap)
  int64_t K, cap;
  RRM_HOST_DEVICE void operator()(int64_t t) const {
    const int64_t b = t / K, k = t % K;
    const int64_t s0 = offsets[b * (K + 2) + k], s1 = offsets[b * (K + 2) + k + 1];
    int64_t q = b * cap + chunk_offsets[b * (K + 1) + k];
    for (int64_t tile = s0; tile < s1; tile += kChunkTile) {
      const int64_t tile_end = tile + kChunkTile < s1 ? tile + kChunkTile : s1;
      for (int64_t l = 0; l < kChunkLanes && tile + l < tile_end; ++l, ++q) {
        chunk_begin[q] = static_cast<int32_t>(tile + l);
        chunk_end[q] = static_cast<int32_t>(tile_end);
      }
    }
  }
};

// Chunk tables of the labels' segments (GPU path); the buffers of one image hold `cap` chunks.
struct ChunkView {
  const int32_t* chunk_begin;    // (B, cap)
  const int32_t* chunk_end;      // (B, cap)
  const int32_t* chunk_offsets;  // (B, K + 1)
  int64_t cap;
};

// 1'. Segmented sums, step 1: one thread per (b, chunk q, c) sums its chunk's entries of channel c
//     (times weight) into part[b, q, c] at element offset b cap C + q pq + c pc. lanes_fastest: the
//     thread index runs (b, group of kChunkLanes chunks, c, lane) for pixel-contiguous features (a
//     warp = the 32 lanes of one channel, part laid out (B, C, cap): pq = 1, pc = cap); otherwise
//     (b, q, c) with c fastest (part (B, cap, C): pq = C, pc = 1).
template <typename scalar_t, typename acc_t, typename out_t>
struct SegmentChunkSumFunctor {
  const scalar_t* features;
  FeatureView fv;
  const int32_t* perm;  // (B, N)
  ChunkView cv;
  const out_t* weight;  // (B, N) or nullptr
  acc_t* part;
  int64_t C, N, K, pq, pc;
  bool lanes_fastest;
  RRM_HOST_DEVICE void operator()(int64_t t) const {
    const int64_t per_image = cv.cap * C;
    const int64_t b = t / per_image, r = t % per_image;
    int64_t q, c;
    if (lanes_fastest) {
      q = (r / (kChunkLanes * C)) * kChunkLanes + r % kChunkLanes;
      c = (r / kChunkLanes) % C;
    } else {
      q = r / C;
      c = r % C;
    }
    if (q >= cv.chunk_offsets[b * (K + 1) + K]) return;
    const int64_t j0 = cv.chunk_begin[b * cv.cap + q], j1 = cv.chunk_end[b * cv.cap + q];
    const int32_t* pb = perm + b * N;
    const scalar_t* row = features + b * fv.sB + c * fv.sC;
    acc_t acc = 0;
    if (weight == nullptr) {
      for (int64_t j = j0; j < j1; j += kChunkLanes) acc += static_cast<acc_t>(row[pb[j] * fv.sN]);
    } else {
      const out_t* wb = weight + b * N;
      for (int64_t j = j0; j < j1; j += kChunkLanes) {
        const int64_t n = pb[j];
        acc += static_cast<acc_t>(wb[n]) * static_cast<acc_t>(row[n * fv.sN]);
      }
    }
    part[b * per_image + q * pq + c * pc] = acc;
  }
};

// 1''. Segmented sums, step 2: one thread per (b, k, c), c fastest: the chunks of segment (b, k) in
//      increasing order (0 for an empty class).
template <typename acc_t, typename out_t>
struct SegmentReduceFunctor {
  const acc_t* part;
  ChunkView cv;
  out_t* out;  // (B, K, C)
  int64_t C, K, pq, pc;
  RRM_HOST_DEVICE void operator()(int64_t t) const {
    const int64_t c = t % C, bk = t / C;
    const int64_t b = bk / K, k = bk % K;
    const int32_t* co = cv.chunk_offsets + b * (K + 1);
    const acc_t* pb = part + b * cv.cap * C + c * pc;
    acc_t acc = 0;
    for (int64_t q = co[k]; q < co[k + 1]; ++q) acc += pb[q * pq];
    out[t] = static_cast<out_t>(acc);
  }
};

// 4' / 6'. Cosine sums and gamma, step 1: one thread per (b, chunk q): the chunk's sum of
//     dot / D (kGamma false) or dot a / D^2 (kGamma true), D = a |c_bk| + eps, into part[b, q]. The
//     class of the chunk is the key of its first pixel.
template <typename acc_t, typename out_t, bool kGamma>
struct CosineChunkFunctor {
  const out_t* dot;          // (B, N)
  const out_t* norm;         // (B, N)
  const out_t* center_norm;  // (B, K)
  const int32_t* key;        // (B, N)
  const int32_t* perm;       // (B, N)
  ChunkView cv;
  acc_t* part;  // (B, cap)
  int64_t N, K;
  RRM_HOST_DEVICE void operator()(int64_t t) const {
    const int64_t b = t / cv.cap, q = t % cv.cap;
    if (q >= cv.chunk_offsets[b * (K + 1) + K]) return;
    const int64_t j0 = cv.chunk_begin[t], j1 = cv.chunk_end[t];
    const int32_t* pb = perm + b * N;
    const acc_t cn = static_cast<acc_t>(center_norm[b * K + key[b * N + pb[j0]]]);
    acc_t acc = 0;
    for (int64_t j = j0; j < j1; j += kChunkLanes) {
      const int64_t n = b * N + pb[j];
      const acc_t a = static_cast<acc_t>(norm[n]);
      const acc_t D = a * cn + static_cast<acc_t>(kCosEps);
      if (kGamma) {
        acc += (static_cast<acc_t>(dot[n]) / D) * (a / D);  // as ratios: D^2 overflows float
      } else {
        acc += static_cast<acc_t>(dot[n]) / D;
      }
    }
    part[t] = acc;
  }
};

// 4'' / 6''. Step 2, one thread per (b, k): the chunks of the segment in order, times scale[b, k]
//      when scale is not null (gamma's g).
template <typename acc_t, typename out_t>
struct ScalarReduceFunctor {
  const acc_t* part;  // (B, cap)
  ChunkView cv;
  const out_t* scale;  // (B, K) or nullptr
  out_t* out;          // (B, K)
  int64_t K;
  RRM_HOST_DEVICE void operator()(int64_t t) const {
    const int64_t b = t / K, k = t % K;
    const int32_t* co = cv.chunk_offsets + b * (K + 1);
    const acc_t* pb = part + b * cv.cap;
    acc_t acc = 0;
    for (int64_t q = co[k]; q < co[k + 1]; ++q) acc += pb[q];
    if (scale != nullptr) acc = static_cast<acc_t>(scale[t]) * acc;
    out[t] = static_cast<out_t>(acc);
  }
};

// ---------------------------------------------------------------------------------------------
// 6. The loss's epilogue on the GPU (bcd_impl.h: bcd_loss, bcd_loss_backward): a handful of launches
//    instead of ~100 small tensor ops. With F = K - 1 foreground classes and P = F + B, the centres
//    are also gathered into A (P, C) (rows 0..F-1 the foreground centres c_k, rows F..P-1 each
//    image's background centre c_b); the Gram matrix G = A A^T (one matrix product) carries every
//    norm and dot product the separation term needs. counts (B, K), cos_sums (B, K), all of out_t.

// Class counts n_b = counts[b, 0], n_k = sum_b counts[b, k], and the flags of the loss.
template <typename out_t>
struct BcdCounts {
  const out_t* counts;  // (B, K)
  int64_t B, K;
  RRM_HOST_DEVICE double n_b(int64_t b) const { return static_cast<double>(counts[b * K]); }
  RRM_HOST_DEVICE double n_k(int64_t k) const {  // k in [1, K)
    double n = 0;
    for (int64_t b = 0; b < B; ++b) n += static_cast<double>(counts[b * K + k]);
    return n;
  }
  RRM_HOST_DEVICE double present_count() const {
    double nk = 0;
    for (int64_t k = 1; k < K; ++k) nk += n_k(k) >= 1 ? 1.0 : 0.0;
    return nk;
  }
  RRM_HOST_DEVICE bool any_bg() const {
    for (int64_t b = 0; b < B; ++b)
      if (n_b(b) >= 1) return true;
    return false;
  }
};

// One thread per (k, c): c_b = s[b, 0] / (n_b + eps) for every image, c_k = sum_b s[b, k] / (n_k + eps)
// written to every image's row k; both also into A.
template <typename out_t>
struct CentersFunctor {
  const out_t* sums;  // (B, K, C)
  BcdCounts<out_t> n;
  out_t* centers;  // (B, K, C)
  out_t* A;        // (F + B, C)
  int64_t C;
  RRM_HOST_DEVICE void operator()(int64_t t) const {
    const int64_t B = n.B, K = n.K, k = t / C, c = t % C;
    const out_t eps = static_cast<out_t>(kCosEps);
    if (k == 0) {
      for (int64_t b = 0; b < B; ++b) {
        const out_t v = sums[b * K * C + c] / (static_cast<out_t>(n.n_b(b)) + eps);
        centers[b * K * C + c] = v;
        A[(K - 1 + b) * C + c] = v;
      }
      return;
    }
    out_t acc = 0;
    for (int64_t b = 0; b < B; ++b) acc += sums[(b * K + k) * C + c];
    const out_t v = acc / (static_cast<out_t>(n.n_k(k)) + eps);
    for (int64_t b = 0; b < B; ++b) centers[(b * K + k) * C + c] = v;
    A[(k - 1) * C + c] = v;
  }
};

// The class statistics the loss and its adjoint share, computed once (one thread; O(B K) reads):
// meta (F + B + 2) double = [n_k for the F foreground classes, n_b for the B images, |K| (the number
// of present foreground classes), 1 if any image has background pixels else 0].
template <typename out_t>
struct MetaFunctor {
  BcdCounts<out_t> n;
  double* meta;
  RRM_HOST_DEVICE void operator()(int64_t) const {
    const int64_t B = n.B, F = n.K - 1;
    double nk = 0, any_bg = 0;
    for (int64_t k = 0; k < F; ++k) {
      const double v = n.n_k(k + 1);
      meta[k] = v;
      nk += v >= 1 ? 1.0 : 0.0;
    }
    for (int64_t b = 0; b < B; ++b) {
      const double v = n.n_b(b);
      meta[F + b] = v;
      any_bg = v >= 1 ? 1.0 : any_bg;
    }
    meta[F + B] = nk;
    meta[F + B + 1] = any_bg;
  }
};

RRM_HOST_DEVICE double clamp_min1(double x) { return x > 1 ? x : 1.0; }

// The Gram matrix G = A A^T (P, P) of the centres A (P, C), in double, one thread per entry, the C
// products in order: the CPU's (and the emulation's) Gram. In double because the squared norms of
// large float32 centres overflow (|c| > 1.8e19); per entry and in order because a BLAS GEMM's result
// depends on the thread count. (CUDA: cuBLAS on the double rows, bcd_impl.h.)
template <typename scalar_t>
struct GramFunctor {
  const scalar_t* A;  // (P, C)
  double* G;          // (P, P) out
  int64_t P, C;
  RRM_HOST_DEVICE void operator()(int64_t t) const {
    const scalar_t* a = A + (t / P) * C;
    const scalar_t* b = A + (t % P) * C;
    double acc = 0;
    for (int64_t c = 0; c < C; ++c) acc += static_cast<double>(a[c]) * static_cast<double>(b[c]);
    G[t] = acc;
  }
};

// gA = S A (P, C) for the Gram's adjoint S (P, P, double), one thread per entry, the P products in
// order and in double, rounded once to the centres' dtype.
template <typename scalar_t>
struct GramAdjointFunctor {
  const double* S;    // (P, P)
  const scalar_t* A;  // (P, C)
  scalar_t* gA;       // (P, C) out
  int64_t P, C;
  RRM_HOST_DEVICE void operator()(int64_t t) const {
    const int64_t i = t / C, c = t % C;
    double acc = 0;
    for (int64_t l = 0; l < P; ++l) acc += S[i * P + l] * static_cast<double>(A[l * C + c]);
    gA[t] = static_cast<scalar_t>(acc);
  }
};

// cos(a_i, a_j) from the Gram matrix G (P, P).
RRM_HOST_DEVICE double gram_cos(const double* G, int64_t P, int64_t i, int64_t j) {
  return G[i * P + j] / (sqrt(G[i * P + i]) * sqrt(G[j * P + j]) + kCosEps);
}

// One thread per row of A: part (P, 3). Foreground class k (row k < F, present): its compactness
// term 1 - (sum_b cos_sums[b, k]) / n_k and its rows of the separation sums, sum over present l != k
// of 1 + cos(c_k, c_l) and sum over images of 1 + cos(c_k, c_b). Image b (row F + b): its background
// compactness term (2 without background pixels).
template <typename out_t>
struct LossRowFunctor {
  const double* meta;
  const out_t* cos_sums;  // (B, K)
  const double* G;        // (P, P)
  double* part;           // (P, 3)
  int64_t B, K;
  RRM_HOST_DEVICE void operator()(int64_t i) const {
    const int64_t F = K - 1, P = F + B;
    double* o = part + i * 3;
    o[0] = o[1] = o[2] = 0;
    if (i >= F) {
      const int64_t b = i - F;
      const double nb = meta[F + b];
      o[0] = nb >= 1 ? 1 - cos_sums[b * K] / clamp_min1(nb) : 2.0;
      return;
    }
    const double nk = meta[i];
    if (nk < 1) return;
    double s = 0;
    for (int64_t b = 0; b < B; ++b) s += cos_sums[b * K + 1 + i];
    o[0] = 1 - s / clamp_min1(nk);
    for (int64_t l = 0; l < F; ++l)
      if (l != i && meta[l] >= 1) o[1] += 1 + gram_cos(G, P, i, l);
    for (int64_t b = 0; b < B; ++b) o[2] += 1 + gram_cos(G, P, i, F + b);
  }
};

// The loss from the row sums (one thread, O(P) reads): (T1 + T2) / (|K| + B) + the separation.
template <typename out_t>
struct LossFinishFunctor {
  const double* meta;
  const double* part;  // (P, 3)
  out_t* loss;         // ()
  int64_t B, K;
  RRM_HOST_DEVICE void operator()(int64_t) const {
    const int64_t F = K - 1;
    const double nk = meta[F + B], any_bg = meta[F + B + 1];
    double t1 = 0, t2 = 0, l_ff = 0, l_fb = 0;
    for (int64_t k = 0; k < F; ++k) {
      t2 += part[k * 3];
      l_ff += part[k * 3 + 1];
      l_fb += part[k * 3 + 2];
    }
    for (int64_t b = 0; b < B; ++b) t1 += part[(F + b) * 3];
    l_ff /= clamp_min1(nk * (nk - 1));
    l_fb /= clamp_min1(nk * B);
    const double center = nk > 0 ? (any_bg > 0 ? 0.5 * l_ff + 0.5 * l_fb : 0.5 * l_ff + 1) : 0.0;
    *loss = static_cast<out_t>(center + (t1 + t2) / (nk + B));
  }
};

// The separation's adjoint for the upstream gradient *grad, one thread per entry (i, j) of
// S = dG + dG^T (P, P), so that d loss / d A = S A. The loss holds w_ij cos(a_i, a_j) for the ordered
// pairs (i, j) with w_ij = w_ff (both foreground, present, i != j) or w_fb (i foreground present, j an
// image); with r_i = sqrt(G_ii) and D = r_i r_j + eps, such a term gives dG_ij = w / D and
// dG_ii = -w G_ij r_j / (2 r_i D^2) (0 where r_i = 0, torch's subgradient of the norm), likewise dG_jj.
// So S_ij = (w_ij + w_ji) / D_ij off the diagonal and S_ii = -sum_j (w_ij + w_ji) G_ij r_j / (r_i D_ij^2).
template <typename out_t>
struct AdjointGramFunctor {
  const double* meta;
  const out_t* grad;  // ()
  const double* G;    // (P, P)
  double* S;          // (P, P) out
  int64_t B, K;
  RRM_HOST_DEVICE double weight(int64_t i, int64_t j, double w_ff, double w_fb) const {  // ordered pair
    const int64_t F = K - 1;
    if (i >= F || i == j || meta[i] < 1) return 0.0;
    if (j < F) return meta[j] >= 1 ? w_ff : 0.0;
    return w_fb;
  }
  RRM_HOST_DEVICE void operator()(int64_t t) const {
    const int64_t F = K - 1, P = F + B, i = t / P, j = t % P;
    const double g = static_cast<double>(*grad), nk = meta[F + B], any_bg = meta[F + B + 1];
    const double w_ff = nk > 0 ? g * 0.5 / clamp_min1(nk * (nk - 1)) : 0.0;
    const double w_fb = nk > 0 && any_bg > 0 ? g * 0.5 / clamp_min1(nk * B) : 0.0;
    const double ri = sqrt(G[i * P + i]);
    if (i != j) {
      const double rj = sqrt(G[j * P + j]);
      S[t] = (weight(i, j, w_ff, w_fb) + weight(j, i, w_ff, w_fb)) / (ri * rj + kCosEps);
      return;
    }
    double acc = 0;
    if (ri > 0) {
      for (int64_t l = 0; l < P; ++l) {
        const double w = weight(i, l, w_ff, w_fb) + weight(l, i, w_ff, w_fb);
        if (w == 0) continue;
        const double rl = sqrt(G[l * P + l]), den = ri * rl + kCosEps;
        acc -= w * G[i * P + l] * rl / (ri * den * den);
      }
    }
    S[t] = acc;
  }
};

// d loss / d cos_sums (B, K) for the upstream gradient *grad, one thread per entry: the compactness
// (T1 + T2) / (|K| + B) gives -[n >= 1] / (n (|K| + B)) with n = n_b (k = 0) or n_k.
template <typename out_t>
struct GradCosFunctor {
  const double* meta;
  const out_t* grad;  // ()
  out_t* grad_cos;    // (B, K)
  int64_t B, K;
  RRM_HOST_DEVICE void operator()(int64_t t) const {
    const int64_t F = K - 1, b = t / K, k = t % K;
    const double gd = static_cast<double>(*grad) / (meta[F + B] + B);
    const double n = k == 0 ? meta[F + b] : meta[k - 1];
    grad_cos[t] = static_cast<out_t>(n >= 1 ? -gd / clamp_min1(n) : 0.0);
  }
};

// One thread per (k, c): grad_sums from the cosine backward's grad_centers (B, K, C) plus the
// separation's gA = S A (P, C), through c = s / (n + eps) (the foreground centre is shared by all
// images: its gradient is summed over them and handed back to every image's class sum).
template <typename out_t>
struct GradSumsFunctor {
  const out_t* grad_centers;  // (B, K, C)
  const out_t* gA;            // (P, C)
  BcdCounts<out_t> n;
  out_t* out;  // (B, K, C)
  int64_t C;
  RRM_HOST_DEVICE void operator()(int64_t t) const {
    const int64_t B = n.B, K = n.K, k = t / C, c = t % C;
    const out_t eps = static_cast<out_t>(kCosEps);
    if (k == 0) {
      for (int64_t b = 0; b < B; ++b)
        out[b * K * C + c] =
            (grad_centers[b * K * C + c] + gA[(K - 1 + b) * C + c]) / (static_cast<out_t>(n.n_b(b)) + eps);
      return;
    }
    out_t acc = 0;
    for (int64_t b = 0; b < B; ++b) acc += grad_centers[(b * K + k) * C + c];
    const out_t v = (acc + gA[(k - 1) * C + c]) / (static_cast<out_t>(n.n_k(k)) + eps);
    for (int64_t b = 0; b < B; ++b) out[(b * K + k) * C + c] = v;
  }
};

}  // namespace bcd
}  // namespace rrm
