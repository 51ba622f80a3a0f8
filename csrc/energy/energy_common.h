// Per-element math of the dense-CRF energy loss (rloss / RRM semantics, SPEC §3), written once as
// RRM_HOST_DEVICE functors run by CpuExec, EmulatedCudaExec and CudaExec (energy_impl.h strings
// them together with the lattice's splat and blur functors).
//
// Notation (per image b): s_k(i) = probs[b, k, i] (already multiplied by the crop ROI), S(i) the
// gate, W the unnormalised lattice filter, AS_k = W s_k. The per-image energy is
//     e_b = - sum_{k,i} S(i) s_k(i) AS_k(i)            [+ sum_i S(i) m(i) (W 1)(i)  with a mass m]
// and its gradient direction (the gradient of e_b w.r.t. s, the gate and the mass held constant)
//     rloss: -2 S AS_k                 exact: -(S AS_k + W^T (S s_k))
// Channel tiles of kTile values keep the CPU's all-channels-per-thread loops on the stack without
// any cap on the number of classes.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "common/macros.h"
#include "energy/prob_rows_cpu.h"
#include "lattice/lattice_common.h"  // row_add_scaled

namespace rrm {
namespace energy {

constexpr int kTile = 32;
// Pixels per block of the CPU's slice and pack (SliceBlocksCpu, PackBlocksCpu): 16 floats, a cache line.
constexpr int kSliceBlock = 16;

// Gradient modes of the op (schema: csrc/rrm.cpp).
enum GradMode : int64_t { kNoGrad = 0, kRlossGrad = 1, kExactGrad = 2 };

// Channel-major (B, K, N) probabilities -> pixel-major (B, N, Cs) lattice input, C = K or K + 1; the
// extra channel is all ones (its filter is W 1, the constant of the non-negative form); channels
// [C, Cs) are zero padding (CUDA's float4 rows).
// One call per (image b, pixel i, channels [c0, c1)): all channels on the CPU, one per thread on
// CUDA, c fastest, so that a warp writes consecutive entries of the output (the reads of a channel
// row are reused from L1 by the threads of the next pixels).
template <typename scalar_t>
struct PackFunctor {
  const scalar_t* probs;  // (B, K, N)
  scalar_t* out;          // (B, N, Cs)
  int64_t N, K, C, Cs;

  RRM_HOST_DEVICE void operator()(int64_t b, int64_t i, int64_t c0, int64_t c1) const {
    scalar_t* o = out + (b * N + i) * Cs;
    const scalar_t* p = probs + b * K * N + i;
    for (int64_t c = c0; c < c1; ++c) o[c] = c < K ? p[c * N] : c < C ? scalar_t(1) : scalar_t(0);
  }
};

// The same packing on CUDA and in its emulation as a transpose through shared memory (knob
// energy_pack_blocks): block k of image b takes pixels [k P, k P + P). Phase 1 reads the K class rows
// of those pixels (a warp reads 32 consecutive pixels of one class), phase 2 writes their Cs-wide
// output rows (a warp writes consecutive entries). PackFunctor's one thread per (pixel, channel)
// reads 24 class rows per warp, 4 useful bytes per 32-byte sector (34 us for 8 x 21 x 160^2 on the
// H200, 37 MB moved). Rows padded to P + 1 in shared memory: the phase-2 reads, down a column,
// fall on distinct banks.
template <typename scalar_t>
struct PackBlockFunctor {
  static constexpr int64_t P = 32;  // pixels per block
  const scalar_t* probs;            // (B, K, N)
  scalar_t* out;                    // (B, N, Cs)
  int64_t N, K, C, Cs;

  static int64_t smem_bytes(int64_t K) { return K * (P + 1) * static_cast<int64_t>(sizeof(scalar_t)); }

  template <class Blk>
  RRM_HOST_DEVICE void operator()(const Blk& blk, int64_t b, int64_t k) const {
    scalar_t* const tile = blk.template shared<scalar_t>();  // (K, P + 1)
    const int nt = blk.threads();
    const int64_t i0 = k * P, n = N - i0 < P ? N - i0 : P;
    blk.phase([&](int th) {
      for (int64_t e = th; e < K * P; e += nt) {
        const int64_t c = e / P, i = e - c * P;
        if (i < n) tile[c * (P + 1) + i] = probs[(b * K + c) * N + i0 + i];
      }
    });
    blk.phase([&](int th) {
      const uint32_t cs = static_cast<uint32_t>(Cs);  // e < P Cs: 32-bit divisions
      for (uint32_t e = static_cast<uint32_t>(th); e < static_cast<uint32_t>(n * Cs); e += static_cast<uint32_t>(nt)) {
        const uint32_t i = e / cs, c = e - i * cs;
        out[(b * N + i0) * Cs + e] = c < K ? tile[c * (P + 1) + i] : c < C ? scalar_t(1) : scalar_t(0);
      }
    });
  }
};

// The energy's inputs at its working scale, from the full-resolution ones in one pass (the
// dense_energy_inputs op). Stride 2 is RRM's scale_factor 0.5 exactly as F.interpolate computes it
// on CUDA: bilinear with align_corners=False samples output (y, x) at input (2y + 1/2, 2x + 1/2),
// all weights 1/2, so the output is the mean of the 2x2 block, in the CUDA kernel's order of
// operations (its CPU kernel adds four 1/4-weighted taps, which can differ in the last bit); nearest
// takes input (2y, 2x). Stride 1 downscales nothing. Per output pixel (y, x) of image b, class k:
//   probs[b, k, y, x] = p_k roi      (p_k the downscaled probability; roi the nearest ROI, 1 without)
//   gate[b, y, x]     = 1 where unlabelled, else max(0, roi - max_k p_k)
// NaN propagates through the max and the clamp as through torch's amax and clamp.
// One call per (image b, output row y, columns [x0, x1)): the CPU takes whole rows, in tiles of
// kTile columns whose running maxima stay on the stack (row-wise streams, no per-element index
// divisions); CUDA and its emulation take one column per thread (Row = false: the maximum in a
// register, never in local memory), so that a warp reads consecutive input pairs and writes
// consecutive outputs of each class row. Both take the classes in the same order: same bits.
// With a tile order (the op's `tile`, see tile_position), output position p = y w + x holds pixel
// tile_pixel(p) of the downscaled image, so that the lattice op gets its points in that order without
// a gather; the CPU then goes column by column too, and a warp reads runs of T consecutive pixels.
template <typename scalar_t>
RRM_HOST_DEVICE scalar_t downscaled_tap(const scalar_t* s, int64_t sy, int64_t sx, int stride) {
  if (stride == 1) return s[0];
  const scalar_t l0 = scalar_t(0.5), l1 = scalar_t(0.5);
  return l0 * (l0 * s[0] + l1 * s[sx]) + l1 * (l0 * s[sy] + l1 * s[sy + sx]);
}

// The running maximum over the classes, NaN-propagating like torch.amax (a NaN, once met, stays).
template <typename scalar_t>
RRM_HOST_DEVICE scalar_t nan_max(scalar_t mx, scalar_t p) {
  return (mx == mx && (p > mx || p != p)) ? p : mx;
}

template <typename scalar_t>
RRM_HOST_DEVICE scalar_t gate_value(scalar_t r, scalar_t mx, bool unlabelled) {
  const scalar_t g = unlabelled ? scalar_t(1) : r - mx;
  return g < scalar_t(0) ? scalar_t(0) : g;  // NaN stays NaN, as in clamp(min=0)
}

// The loss's pixel order on a GPU (rrm_cuda.functional._PIXEL_TILE): the whole T x T tiles first
// (row-major inside each tile and across the tiles), so that every tile starts at a multiple of T^2
// whatever the image's size (the tiled mean field's blocks of P = T^2 consecutive pixels are then
// squares); then the columns right of the whole tiles, beside them, in raster order; then the rows
// below the whole tiles, in raster order. T = 0, or T >= w, is the raster order. tile_position: the
// position p of pixel (y, x) of an h x w image; tile_pixel: its inverse. 32-bit divisions (h w <
// 2^31: checked), 64-bit products; shifts for a power-of-two T.
struct TileGrid {
  int32_t T, hw, ww, ntx;  // the whole tiles cover rows [0, hw) and columns [0, ww): ntx tiles a row
  int s;                   // log2 T for a power of two, else -1
  RRM_HOST_DEVICE TileGrid(int32_t h, int32_t w, int32_t T_) : T(T_), s(-1) {
    if ((T & (T - 1)) == 0) {  // a power of two (the default 16)
#ifdef __CUDA_ARCH__
      s = __ffs(T) - 1;
#else
      s = __builtin_ctz(static_cast<unsigned>(T));
#endif
      ntx = w >> s;
      hw = (h >> s) << s;
    } else {
      ntx = w / T;
      hw = h / T * T;
    }
    ww = ntx * T;
  }
  RRM_HOST_DEVICE int32_t div(int32_t v) const { return s >= 0 ? v >> s : v / T; }
};

RRM_HOST_DEVICE int64_t tile_position(int32_t y, int32_t x, int32_t h, int32_t w, int32_t T) {
  if (T <= 0) return int64_t{y} * w + x;
  const TileGrid t(h, w, T);
  if (y >= t.hw) return int64_t{y} * w + x;                                           // the bottom rows
  if (x >= t.ww) return int64_t{t.hw} * t.ww + int64_t{y} * (w - t.ww) + (x - t.ww);  // the right columns
  const int32_t ty = t.div(y), tx = t.div(x);
  return ((int64_t{ty} * t.ntx + tx) * T + (y - ty * T)) * T + (x - tx * T);
}

RRM_HOST_DEVICE void tile_pixel(int64_t p, int32_t h, int32_t w, int32_t T, int32_t& y, int32_t& x) {
  const TileGrid t(h, w, T > 0 ? T : 1);
  const int64_t whole = int64_t{t.hw} * t.ww;
  if (T <= 0 || p >= int64_t{t.hw} * w) {  // raster (and the bottom rows)
    y = static_cast<int32_t>(p / w);
    x = static_cast<int32_t>(p - int64_t{y} * w);
  } else if (p >= whole) {  // the right columns
    const int32_t r = static_cast<int32_t>(p - whole), rw = w - t.ww;
    y = r / rw;
    x = t.ww + (r - y * rw);
  } else {
    const int32_t q = static_cast<int32_t>(p);             // < h w < 2^31
    const int32_t k = t.div(t.div(q)), i = q - k * T * T;  // the tile, and the pixel inside it
    const int32_t ty = k / t.ntx, tx = k - ty * t.ntx, iy = t.div(i);
    y = ty * T + iy;
    x = tx * T + (i - iy * T);
  }
}

template <typename scalar_t, bool Row>
struct InputsFunctor {
  const scalar_t* seg;     // (B, K, H, W), strides sb, sk, sy, sx
  const scalar_t* roi;     // (B, H, W) contiguous, or nullptr
  const bool* unlabelled;  // (B, H, W) contiguous, or nullptr
  scalar_t* probs;         // (B, K, h, w) out: position p = y w + x holds pixel tile_pixel(p)
  scalar_t* gate;          // (B, h, w) out (same order), or nullptr
  int64_t sb, sk, sy, sx;
  int64_t K, H, W, h, w;
  int stride;  // 1 or 2
  int tile;    // the pixel order's tile side (0: raster; < w)
  // Output rows per item: 1, or (the CPU in the raster order, unit column steps) a block of rows,
  // whole rows each (rows_unit_stride1, rows_unit_stride2).
  int64_t rows = 1;
  // With rows > 1: where each item writes the statistics of the full-resolution rows it read (its
  // stride * rows input rows, every column): 4 doubles at item (b, block) b * blocks + block, see
  // prob_stats_finish; nullptr: none.
  double* stats = nullptr;
  int64_t blocks = 0;

  // The gate of output columns [t0, t1) of row y from their running maxima (the CPU's rows).
  void write_gate(int64_t b, int64_t y, int64_t src, int64_t t0, int64_t t1, const scalar_t* mx) const {
    if (!gate) return;
    for (int64_t x = t0; x < t1; ++x) {
      const int64_t q = src + x * stride;
      gate[b * h * w + y * w + x] = gate_value(roi ? roi[q] : scalar_t(1), mx[x - t0], unlabelled && unlabelled[q]);
    }
  }

  // The end of a block of output rows [y0, y1) (rows_unit_stride1, rows_unit_stride2): their gate
  // from the running maxima mx, and with stats the block's statistics from the per-pixel sums psum
  // of its stride (y1 - y0) input rows and the range lanes lo, hi.
  void finish_rows(int64_t b, int64_t y0, int64_t y1, const scalar_t* mx, const scalar_t* psum, const scalar_t* lo,
                   const scalar_t* hi) const {
    for (int64_t y = y0; y < y1; ++y) write_gate(b, y, (b * H + stride * y) * W, 0, w, mx + (y - y0) * w);
    if (stats) {
      double* st = stats + (b * blocks + y0 / rows) * 4;
      for (int j = 0; j < 4; ++j) st[j] = -std::numeric_limits<double>::infinity();
      prob_stats_finish(psum, stride * (y1 - y0) * W, lo, hi, st);
    }
  }

  // Output rows [y0, y1) of image b in the CPU's raster order at stride 2 with unit column steps
  // (the item is a block of rows: InputsFunctor::rows): downscaled_tap's sums (the same expression,
  // so the same bits) in loops without a branch per element, which vectorise; class by class, so
  // that each class's 2 (y1 - y0) input rows stream in one contiguous run (one run per class and
  // row of 21 interleaved, as one row at a time reads them, halved the read rate).
  void rows_unit_stride2(int64_t b, int64_t y0, int64_t y1) const {
    const scalar_t l = scalar_t(0.5);
    const int64_t n = y1 - y0;
    // Work space, the calling thread's own and kept across calls (a fresh allocation per item
    // measured as page faults on 2 threads): the running maxima (n w), the two input rows' pair
    // sums (2 w) and, with stats, the input rows' per-pixel sums over the classes (2 n W).
    thread_local std::vector<scalar_t> work;
    const size_t need = static_cast<size_t>(n * w + 2 * w + (stats ? 2 * n * W : 0));
    if (work.size() < need) work.resize(need);
    scalar_t* mx = work.data();
    scalar_t* h0 = mx + n * w;
    scalar_t* h1 = h0 + w;
    scalar_t* psum = h1 + w;
    scalar_t lo[kProbLanes], hi[kProbLanes];
    prob_lanes_init(lo, hi);
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t y = y0; y < y1; ++y) {
        const scalar_t* s0 = seg + b * sb + k * sk + 2 * y * sy;
        const scalar_t* s1 = s0 + sy;
        prefetch_ahead(s0, 4 * sy, W);  // the rows two pairs ahead
        prefetch_ahead(s1, 4 * sy, W);
        if (stats) {  // the rows just read, every column (W may be odd)
          prob_row(s0, W, psum + 2 * (y - y0) * W, k == 0, lo, hi);
          prob_row(s1, W, psum + (2 * (y - y0) + 1) * W, k == 0, lo, hi);
        }
        const scalar_t* rr = roi ? roi + (b * H + 2 * y) * W : nullptr;
        scalar_t* o = probs + ((b * K + k) * h + y) * w;
        scalar_t* m = mx + (y - y0) * w;
        // one input row at a time (each read in one sequential run), then the rows' sum
        for (int64_t x = 0; x < w; ++x) h0[x] = l * s0[2 * x] + l * s0[2 * x + 1];
        for (int64_t x = 0; x < w; ++x) h1[x] = l * s1[2 * x] + l * s1[2 * x + 1];
        for (int64_t x = 0; x < w; ++x) {
          const scalar_t p = l * h0[x] + l * h1[x];
          o[x] = rr ? p * rr[2 * x] : p;
          m[x] = k == 0 ? p : nan_max(m[x], p);
        }
      }
    }
    finish_rows(b, y0, y1, mx, psum, lo, hi);
  }

  // The same at stride 1 (RRM's scale 1: nothing downscaled): each class's input rows of the block
  // in one run, the ROI product and the running maxima, with the statistics of the rows read.
  void rows_unit_stride1(int64_t b, int64_t y0, int64_t y1) const {
    const int64_t n = y1 - y0;
    thread_local std::vector<scalar_t> work;  // the running maxima (n w), with stats the sums (n W)
    const size_t need = static_cast<size_t>(n * w + (stats ? n * W : 0));
    if (work.size() < need) work.resize(need);
    scalar_t* mx = work.data();
    scalar_t* psum = mx + n * w;
    scalar_t lo[kProbLanes], hi[kProbLanes];
    prob_lanes_init(lo, hi);
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t y = y0; y < y1; ++y) {
        const scalar_t* s = seg + b * sb + k * sk + y * sy;
        prefetch_ahead(s, 4 * sy, W);  // the row four ahead
        if (stats) prob_row(s, W, psum + (y - y0) * W, k == 0, lo, hi);
        const scalar_t* rr = roi ? roi + (b * H + y) * W : nullptr;
        scalar_t* o = probs + ((b * K + k) * h + y) * w;
        scalar_t* m = mx + (y - y0) * w;
        if (rr) {
          for (int64_t x = 0; x < w; ++x) o[x] = s[x] * rr[x];
        } else {
          for (int64_t x = 0; x < w; ++x) o[x] = s[x];
        }
        if (k == 0) {
          for (int64_t x = 0; x < w; ++x) m[x] = s[x];
        } else {
          for (int64_t x = 0; x < w; ++x) m[x] = nan_max(m[x], s[x]);
        }
      }
    }
    finish_rows(b, y0, y1, mx, psum, lo, hi);
  }

  RRM_HOST_DEVICE void operator()(int64_t b, int64_t y, int64_t x0, int64_t x1) const {
    if constexpr (Row) {
      if (rows > 1) {  // item y: the block of output rows [y rows, (y + 1) rows)
        const int64_t y1 = (y + 1) * rows < h ? (y + 1) * rows : h;
        if (stride == 1)
          rows_unit_stride1(b, y * rows, y1);
        else
          rows_unit_stride2(b, y * rows, y1);
        return;
      }
    }
    scalar_t* orow = probs + (b * K * h + y) * w;
    const int64_t plane = h * w;
    if constexpr (Row) {
      if (tile == 0) {
        const int64_t Y = y * stride;
        const scalar_t* srow = seg + b * sb + Y * sy;
        const int64_t src = (b * H + Y) * W;  // the ROI's and labels' row
        for (int64_t t0 = x0; t0 < x1; t0 += kTile) {
          const int64_t t1 = (t0 + kTile < x1) ? t0 + kTile : x1;
          scalar_t mx[kTile];
          for (int64_t k = 0; k < K; ++k) {
            const scalar_t* s = srow + k * sk;
            scalar_t* o = orow + k * plane;
            for (int64_t x = t0; x < t1; ++x) {
              const scalar_t p = downscaled_tap(s + x * stride * sx, sy, sx, stride);
              o[x] = roi ? p * roi[src + x * stride] : p;
              mx[x - t0] = k == 0 ? p : nan_max(mx[x - t0], p);
            }
          }
          write_gate(b, y, src, t0, t1, mx);
        }
        return;
      }
    }
    // one column at a time (CUDA's thread; the CPU in a tile order): the pixel of position (y, x)
    for (int64_t x = x0; x < x1; ++x) {
      int32_t py = static_cast<int32_t>(y), px = static_cast<int32_t>(x);
      if (tile) tile_pixel(y * w + x, static_cast<int32_t>(h), static_cast<int32_t>(w), tile, py, px);
      const int64_t Y = int64_t{py} * stride, X = int64_t{px} * stride;
      const int64_t q = (b * H + Y) * W + X;
      const scalar_t r = roi ? roi[q] : scalar_t(1);
      const scalar_t* s = seg + b * sb + Y * sy + X * sx;
      scalar_t mx = 0;
      for (int64_t k = 0; k < K; ++k) {
        const scalar_t p = downscaled_tap(s + k * sk, sy, sx, stride);
        orow[k * plane + x] = roi ? p * r : p;
        mx = k == 0 ? p : nan_max(mx, p);
      }
      if (gate) gate[b * plane + y * w + x] = gate_value(r, mx, unlabelled && unlabelled[q]);
    }
  }
};

// Backward of InputsFunctor's probs (the gate is a constant): the adjoint of the ROI product and of
// the downscaling, with F.interpolate's arithmetic -- each input pixel of a 2x2 block gets
// (1/2 1/2) (grad roi), every other pixel (the last row / column of an odd size) 0. One call per
// (image and class bk, input row Y, column items [C0, C1)): whole rows on the CPU, one column pair
// per thread on CUDA (a warp writes consecutive pixels).
template <typename scalar_t>
struct InputsBackwardFunctor {
  const scalar_t* grad;  // (B, K, h, w) contiguous, in the forward's pixel order
  const scalar_t* roi;   // (B, H, W) contiguous, or nullptr
  scalar_t* out;         // (B, K, H, W) out
  int64_t K, H, W, h, w;
  int stride;
  int tile;  // the forward's (0: raster; < w)
  int cols;  // columns per item: 1 (whole rows come as column ranges: the CPU), or 2 (CUDA: a thread
             // writes an input pair, which at stride 2 shares one gradient element)
  const scalar_t* scale = nullptr;  // (1,) or nullptr: grad times it first (the loss's factor; the
                                    // product at::mul(grad, scale) would give, element by element)

  RRM_HOST_DEVICE void operator()(int64_t bk, int64_t Y, int64_t C0, int64_t C1) const {
    // one 32-bit division, only with ROIs (B K < 2^31: checked by the launcher); stride is 1 or 2.
    // CUDA calls this once per column pair, so its index arithmetic is the kernel's cost
    const int64_t X0 = C0 * cols, X1 = C1 * cols < W ? C1 * cols : W;
    const int64_t y = stride == 2 ? (Y >> 1) : Y;
    scalar_t* o = out + (bk * H + Y) * W;
    if (y >= h) {
      for (int64_t X = X0; X < X1; ++X) o[X] = scalar_t(0);
      return;
    }
    const scalar_t* g = grad + bk * h * w;
    const scalar_t* r = nullptr;
    if (roi) {
      const int64_t b = static_cast<int32_t>(bk) / static_cast<int32_t>(K);
      r = roi + (b * H + y * stride) * W;
    }
    int64_t last = -1;  // the x of v: an input pair at stride 2 reads one element
    scalar_t v = 0;
    int64_t X = X0;
#if !defined(__CUDA_ARCH__)
    if (cols == 1 && tile == 0 && stride == 2 && X0 % 2 == 0) {
      // The CPU's rows in the raster order: the same values as the loop below, in a loop that
      // vectorises (no branch per element). Pairs (2x, 2x + 1) inside [X0, X1) with x < w here, the
      // rest (an odd size's last column) below.
      const int64_t xb = X0 / 2, xe = X1 / 2 < w ? X1 / 2 : w;
      const scalar_t* gy = g + y * w;
      constexpr scalar_t q = scalar_t(0.5) * scalar_t(0.5);
      if (scale) {  // (the loss's fused op: grad times its factor first)
        const scalar_t s = *scale;
        for (int64_t x = xb; x < xe; ++x) {
          const scalar_t u = q * (r ? (gy[x] * s) * r[2 * x] : gy[x] * s);
          o[2 * x] = u;
          o[2 * x + 1] = u;
        }
      } else if (r) {
        for (int64_t x = xb; x < xe; ++x) {
          const scalar_t u = q * (gy[x] * r[2 * x]);
          o[2 * x] = u;
          o[2 * x + 1] = u;
        }
      } else {
        for (int64_t x = xb; x < xe; ++x) {
          const scalar_t u = q * gy[x];
          o[2 * x] = u;
          o[2 * x + 1] = u;
        }
      }
      X = xe > xb ? 2 * xe : X0;
    }
    if (cols == 1 && tile == 0 && stride == 1) {  // the same at stride 1: the ROI product, or a copy
      const int64_t xe = X1 < w ? X1 : w;
      const scalar_t* gy = g + y * w;
      if (scale) {
        const scalar_t s = *scale;
        for (int64_t x = X0; x < xe; ++x) o[x] = r ? (gy[x] * s) * r[x] : gy[x] * s;
      } else if (r) {
        for (int64_t x = X0; x < xe; ++x) o[x] = gy[x] * r[x];
      } else {
        for (int64_t x = X0; x < xe; ++x) o[x] = gy[x];
      }
      X = xe > X0 ? xe : X0;
    }
#endif
    for (; X < X1; ++X) {
      const int64_t x = stride == 2 ? (X >> 1) : X;
      if (x != last) {
        last = x;
        v = 0;
        if (x < w) {
          v = g[tile ? tile_position(static_cast<int32_t>(y), static_cast<int32_t>(x), static_cast<int32_t>(h),
                                     static_cast<int32_t>(w), tile)
                     : y * w + x];
          if (scale) v = v * *scale;
          if (r) v = v * r[x * stride];
          if (stride == 2) v = scalar_t(0.5) * scalar_t(0.5) * v;
        }
      }
      o[X] = v;
    }
  }
};

// The same backward on CUDA and in its emulation (knob energy_backward_blocks): one call per (image b,
// gradient row y, gradient column x), y < ceil(H / stride), x < ceil(W / stride), for all K classes:
// it reads the ROI once and each class's gradient element once, and writes the class's stride x
// stride block of inputs (rows Y = y stride + dy < H, columns X = x stride + dx < W; zeros where the
// forward dropped the last odd row or column, y >= h or x >= w). A warp writes each class's two rows
// as runs of consecutive pairs. The column-pair form above makes 2 inputs a thread and costs three
// divisions per thread: 92 us for 8 x 21 x 321^2 on the H200 (session 24) for 86 MB moved, most of
// it index arithmetic by an instruction count (unmeasured; benchmarks/NOTES.md §26). The same
// values: v = g, then v * roi, then (1/2 1/2) v.
template <typename scalar_t>
struct InputsBackwardBlockFunctor {
  static constexpr int U = 4;  // classes whose gradient loads are in flight together
  const scalar_t* grad;        // (B, K, h, w) contiguous, in the forward's pixel order
  const scalar_t* roi;         // (B, H, W) contiguous, or nullptr
  scalar_t* out;               // (B, K, H, W) out
  int64_t K, H, W, h, w;
  int stride;
  int tile;
  const scalar_t* scale = nullptr;  // as InputsBackwardFunctor's

  RRM_HOST_DEVICE void operator()(int64_t b, int64_t y, int64_t x, int64_t) const {
    const bool in = y < h && x < w;
    const int64_t Y0 = y * stride, X0 = x * stride;
    const int64_t ny = H - Y0 < stride ? H - Y0 : stride, nx = W - X0 < stride ? W - X0 : stride;
    const int64_t p = !in    ? 0
                      : tile ? tile_position(static_cast<int32_t>(y), static_cast<int32_t>(x), static_cast<int32_t>(h),
                                             static_cast<int32_t>(w), tile)
                             : y * w + x;
    const scalar_t r = in && roi ? roi[(b * H + Y0) * W + X0] : scalar_t(1);
    const scalar_t* g = grad + b * K * h * w + p;
    scalar_t* o = out + (b * K * H + Y0) * W + X0;
    for (int64_t k0 = 0; k0 < K; k0 += U) {
      scalar_t v[U];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
      for (int u = 0; u < U; ++u) {
        v[u] = 0;
        if (in && k0 + u < K) {
          v[u] = g[(k0 + u) * h * w];
          if (scale) v[u] = v[u] * *scale;
          if (roi) v[u] = v[u] * r;
          if (stride == 2) v[u] = scalar_t(0.5) * scalar_t(0.5) * v[u];
        }
      }
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
      for (int u = 0; u < U; ++u) {
        if (k0 + u >= K) break;
        scalar_t* ok = o + (k0 + u) * H * W;
        for (int64_t dy = 0; dy < ny; ++dy)
          for (int64_t dx = 0; dx < nx; ++dx) ok[dy * W + dx] = v[u];
      }
    }
  }
};

// ---- value checks of the loss's inputs, one pass (the dense_energy_input_stats op) ----

// Element types of the images, ROIs and labels, read through one loader: their dtypes vary
// independently (uint8 or float images, any ROI and label dtype), and a kernel per combination
// would be hundreds. The switch is uniform across a warp. The probabilities, K times larger, are
// typed (prob_t).
enum class Elem : int32_t { kU8, kI8, kI16, kI32, kI64, kF16, kBF16, kF32, kF64, kBool };

RRM_HOST_DEVICE double load_elem(const void* p, int64_t i, Elem t) {
  switch (t) {
    case Elem::kU8:
      return static_cast<const uint8_t*>(p)[i];
    case Elem::kI8:
      return static_cast<const int8_t*>(p)[i];
    case Elem::kI16:
      return static_cast<const int16_t*>(p)[i];
    case Elem::kI32:
      return static_cast<const int32_t*>(p)[i];
    case Elem::kI64:
      return static_cast<double>(static_cast<const int64_t*>(p)[i]);
    case Elem::kF16:
      return static_cast<float>(static_cast<const c10::Half*>(p)[i]);
    case Elem::kBF16:
      return static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]);
    case Elem::kF32:
      return static_cast<const float*>(p)[i];
    case Elem::kF64:
      return static_cast<const double*>(p)[i];
    default:
      return static_cast<const bool*>(p)[i] ? 1.0 : 0.0;
  }
}

// A (B, C, H, W) tensor with any strides (C = 1 and sc = 0 for the (B, H, W) ROIs and labels).
struct StridedView {
  const void* p;  // nullptr: absent
  Elem t;
  int64_t sb, sc, sy, sx;
};

// Bilateral features of 2-D images, at a stride (the bilateral_features_2d op; the energy loss's pixels
// at its working scale, dense_crf's bilateral term):
// out (B, 2 + c, h w), row-major pixels p = y w + x: x / sxy, y / sxy, then colour k of the sampled
// pixel (stride y, stride x) / srgb. The same values as rrm_cuda.bilateral_features of the images
// sliced [::stride, ::stride], converted to scalar_t and divided (true divisions in scalar_t, as a
// tensor divided by a number or by a 0-dim tensor of its dtype). One call per (image, output row,
// columns [x0, x1)): rows on the CPU, one pixel per thread on CUDA (a warp writes consecutive
// pixels of each feature row).
template <typename scalar_t>
struct FeaturesFunctor {
  StridedView img;  // (B, c, H, W), any dtype and strides
  scalar_t* out;    // (B, 2 + c, h w)
  int64_t c, h, w;
  int stride;
  scalar_t sxy, srgb;

  RRM_HOST_DEVICE void operator()(int64_t b, int64_t y, int64_t x0, int64_t x1) const {
    const int64_t N = h * w;
    scalar_t* o = out + b * (2 + c) * N + y * w;
    const scalar_t py = static_cast<scalar_t>(y) / sxy;
    const int64_t row = b * img.sb + y * stride * img.sy;
    for (int64_t x = x0; x < x1; ++x) {
      o[x] = static_cast<scalar_t>(x) / sxy;
      o[N + x] = py;
      const int64_t q = row + x * stride * img.sx;
      for (int64_t k = 0; k < c; ++k) {
        o[(2 + k) * N + x] = static_cast<scalar_t>(load_elem(img.p, q + k * img.sc, img.t)) / srgb;
      }
    }
  }
};

// Statistics, all maxima (minima negated) so that one amax over the threads' partials reduces
// them; NaN propagates as through torch.amax (nan_max), so NaN inputs fail the range checks. 0/1
// flags for the ROIs and labels.
enum InputStat : int { kImgNegMin, kImgMax, kProbNegMin, kProbMax, kSumNegMin, kSumMax, kRoiBad, kLabelBad, kNumStats };

// ROI values must be 0 or 1 (NaN is neither); labels ignore_index or an integer in [0, K).
RRM_HOST_DEVICE bool roi_ok(double v) { return v == 0.0 || v == 1.0; }
RRM_HOST_DEVICE bool label_ok(double v, double ignore, int64_t K) {
  return v == ignore || (v >= 0.0 && v < static_cast<double>(K) && v == static_cast<double>(static_cast<int64_t>(v)));
}

// One call per thread t of T. On CUDA and its emulation (Chunked = false) there is about one thread
// per resident thread slot of the GPU, a few pixels each, and a thread takes every T-th pixel from
// t (a warp reads consecutive pixels of each channel row); on the CPU a thread takes a contiguous
// range of pixels. Each pixel with its image channels, its K
// probabilities (and their sum, with `distribution`), its ROI value and its label.
// out: (T, kNumStats) partial maxima.
template <typename prob_t, bool Chunked>
struct InputStatsFunctor {
  StridedView img, roi, lab;
  const prob_t* prob;
  int64_t psb, psk, psy, psx;
  int64_t C, K, H, W, P, T;  // P = B H W pixels (< 2^31: checked), T threads
  double ignore;
  bool distribution;
  double* out;
  bool probabilities = true;  // false: the probabilities are not read (their entries stay -inf)

  RRM_HOST_DEVICE void operator()(int64_t t) const {
    double m[kNumStats];
    for (int j = 0; j < kNumStats; ++j) m[j] = j >= kRoiBad ? 0.0 : -std::numeric_limits<double>::infinity();
    const int32_t W32 = static_cast<int32_t>(W), HW32 = static_cast<int32_t>(H * W);
    const int64_t p0 = Chunked ? t * P / T : t, p1 = Chunked ? (t + 1) * P / T : P, step = Chunked ? 1 : T;
    for (int64_t p = p0; p < p1; p += step) {
      const int32_t p32 = static_cast<int32_t>(p);
      const int32_t b = p32 / HW32, r = p32 - b * HW32, y = r / W32, x = r - y * W32;
      const int64_t io = b * img.sb + y * img.sy + x * img.sx;
      for (int64_t c = 0; c < C; ++c) {
        const double v = load_elem(img.p, io + c * img.sc, img.t);
        m[kImgNegMin] = nan_max(m[kImgNegMin], -v);
        m[kImgMax] = nan_max(m[kImgMax], v);
      }
      const prob_t* pp = prob + b * psb + y * psy + x * psx;
      const int64_t Kr = probabilities ? K : 0;  // the classes read
      double sum = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll 4
#endif
      for (int64_t k = 0; k < Kr; ++k) {  // unrolled: several loads in flight per thread
        const double v = static_cast<double>(pp[k * psk]);
        m[kProbNegMin] = nan_max(m[kProbNegMin], -v);
        m[kProbMax] = nan_max(m[kProbMax], v);
        sum += v;
      }
      if (distribution && probabilities) {
        m[kSumNegMin] = nan_max(m[kSumNegMin], -sum);
        m[kSumMax] = nan_max(m[kSumMax], sum);
      }
      if (roi.p && !roi_ok(load_elem(roi.p, b * roi.sb + y * roi.sy + x * roi.sx, roi.t))) m[kRoiBad] = 1.0;
      if (lab.p && !label_ok(load_elem(lab.p, b * lab.sb + y * lab.sy + x * lab.sx, lab.t), ignore, K)) {
        m[kLabelBad] = 1.0;
      }
    }
    for (int j = 0; j < kNumStats; ++j) out[t * kNumStats + j] = m[j];
  }
};

// Slice of the energy loss: the forward slice fused with the gate, the ROI-masked probabilities,
// the dot product, the gradient and (exact gradient) the adjoint slice. One call per (image b,
// pixel i), every channel (the c0, c1 of the item launch are ignored: it is launched with one
// channel), so that the per-pixel energy is reduced in the thread and a warp reads and writes
// consecutive pixels of each (B, K, N) channel row:
//   as_c  = alpha sum_r w_{i,r} L[v_{i,r}, c]        (L: the forward blur of the splat of s, 1)
//   adj_c = alpha sum_r w_{i,r} L'[v_{i,r}, c]       (L': the splat of S s blurred in reverse order,
//                                                     i.e. adj = W^T (S s); exact gradient only)
//   terms[b, i]   = sum_c (c < K ? -S(i) s_c(i) as_c : S(i) m(i) as_c)
//   grad[b, c, i] = -2 S(i) as_c (rloss) or -S(i) as_c - adj_c (exact)
// The per-pixel terms are reduced afterwards in a fixed order (deterministic, no float atomics).
// Tiled (the CPU's choice): channel tiles of kTile sums on the stack, corners outer, so that the
// channel loops vectorise; otherwise (CUDA and its emulation) channels outer with one running sum
// per lattice, the corners' weights and rows held in registers when D (= d) is fixed. Both forms
// add the corners of each channel in the same order, so they give the same sums.
// V = 4 (CUDA and its emulation with rows of 4, fixed D; knob kEnergySlice4): the corners' rows are
// read a float4 at a time, four channels per step -- a quarter of the load instructions of one
// channel at a time, each channel's sums unchanged.
template <typename scalar_t, bool Tiled, int D = 0, int V = 1>
struct EnergySliceFunctor {
  static_assert(V == 1 || (V == 4 && D > 0 && !Tiled), "four channels at a time need a fixed d");
  const scalar_t* lattice_values;  // (B, M, Cs) blurred
  const scalar_t* adjoint_values;  // (B, M, Cs) blurred in reverse order, or nullptr
  const scalar_t* weights;         // (B, E)
  const int32_t* entry_vertex;     // (B, E)
  const scalar_t* probs;           // (B, K, N)
  const scalar_t* gate;            // (B, N)
  const scalar_t* mass;            // (B, N) or nullptr (then C == K)
  scalar_t* terms;                 // (B, N)
  scalar_t* grad;                  // (B, K, N) or nullptr
  scalar_t alpha, grad_scale;      // grad_scale: -2 (rloss) or -1 (exact)
  int64_t N, E, M, C, Cs, K;       // Cs: lattice row stride (C padded to 8 on the CPU)
  int d_runtime;
  // The CPU (Tiled) reads the probabilities from the splat's pixel-major copy (B, N, Cin), the same
  // values: a pixel's K classes in one run instead of K rows N apart (at N = 160^2 every class row
  // starts at the same offset in its 4 KiB page, so the K streams fight over one L1 set). With
  // grad_block (SliceBlocksCpu) the gradient entries of pixels [block_i0, block_i0 + kSliceBlock)
  // go to a (K, kSliceBlock) tile at grad instead of grad's (B, K, N) rows.
  const scalar_t* packed = nullptr;
  int64_t Cin = 0;
  bool grad_block = false;
  int64_t block_i0 = 0;

  // The energy term of channel c (c < K: a class, c == K: the constant of the mass) and its
  // gradient entry.
  RRM_HOST_DEVICE void channel(int64_t b, int64_t i, int64_t c, scalar_t S, scalar_t sf, scalar_t sa,
                               scalar_t& acc) const {
    const scalar_t as = alpha * sf;
    if (c < K) {
      const int64_t o = (b * K + c) * N + i;
      scalar_t pv;
      int64_t go = o;
      if constexpr (Tiled) {  // the CPU: see packed and grad_block
        pv = packed[(b * N + i) * Cin + c];
        if (grad_block) go = c * kSliceBlock + (i - block_i0);
      } else {
        pv = probs[o];
      }
      acc -= S * pv * as;
      if (grad) {
        scalar_t g = grad_scale * S * as;
        if (adjoint_values) g -= alpha * sa;
        grad[go] = g;
      }
    } else {
      acc += S * mass[b * N + i] * as;
    }
  }

  RRM_HOST_DEVICE void operator()(int64_t b, int64_t i, int64_t /*c0*/, int64_t /*c1*/) const {
    const int d = D > 0 ? D : d_runtime;
    const int64_t bi = b * N + i;
    const scalar_t* wb = weights + b * E + i * (d + 1);
    const int32_t* vb = entry_vertex + b * E + i * (d + 1);
    const scalar_t* Lb = lattice_values + b * M * Cs;
    const scalar_t* Ab = adjoint_values ? adjoint_values + b * M * Cs : nullptr;
    const scalar_t S = gate[bi];
    scalar_t acc = 0;
    if constexpr (Tiled && D > 0) {
      // The CPU with d fixed: tiles of 8 channels (one AVX register; Cs is a multiple of 8) whose
      // sums stay in registers across the corners, the corners' rows addressed once. The same sums
      // in the same order as the tiles of kTile below.
      const scalar_t* Lr[D + 1];
      const scalar_t* Ar[D + 1];
      scalar_t w[D + 1];
      for (int r = 0; r <= D; ++r) {
        w[r] = wb[r];
        Lr[r] = Lb + static_cast<int64_t>(vb[r]) * Cs;
        Ar[r] = Ab ? Ab + static_cast<int64_t>(vb[r]) * Cs : nullptr;
      }
      for (int64_t c0 = 0; c0 < C; c0 += 8) {
        scalar_t s[8] = {0, 0, 0, 0, 0, 0, 0, 0}, a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int r = 0; r <= D; ++r)
          for (int u = 0; u < 8; ++u) s[u] += w[r] * Lr[r][c0 + u];
        if (Ab)
          for (int r = 0; r <= D; ++r)
            for (int u = 0; u < 8; ++u) a[u] += w[r] * Ar[r][c0 + u];
        const int n = C - c0 < 8 ? static_cast<int>(C - c0) : 8;
        for (int u = 0; u < n; ++u) channel(b, i, c0 + u, S, s[u], a[u], acc);
      }
    } else if constexpr (Tiled) {
      for (int64_t t0 = 0; t0 < C; t0 += kTile) {
        const int64_t t1 = (t0 + kTile < C) ? t0 + kTile : C;
        scalar_t s[kTile], a[kTile];
        for (int64_t c = t0; c < t1; ++c) s[c - t0] = a[c - t0] = 0;
        for (int r = 0; r <= d; ++r) {
          const scalar_t w = wb[r];
          const scalar_t* L = Lb + static_cast<int64_t>(vb[r]) * Cs;
          for (int64_t c = t0; c < t1; ++c) s[c - t0] += w * L[c];
        }
        if (Ab) {
          for (int r = 0; r <= d; ++r) {
            const scalar_t w = wb[r];
            const scalar_t* A = Ab + static_cast<int64_t>(vb[r]) * Cs;
            for (int64_t c = t0; c < t1; ++c) a[c - t0] += w * A[c];
          }
        }
        for (int64_t c = t0; c < t1; ++c) channel(b, i, c, S, s[c - t0], a[c - t0], acc);
      }
    } else if constexpr (D > 0) {
      scalar_t w[D + 1];
      int64_t row[D + 1];
      for (int r = 0; r <= D; ++r) {
        w[r] = wb[r];
        row[r] = static_cast<int64_t>(vb[r]) * Cs;
      }
      if constexpr (V == 4) {  // Cs % 4 == 0: whole float4s of every row, the channels >= C unused
        for (int64_t c0 = 0; c0 < C; c0 += 4) {
          scalar_t sf[4] = {0, 0, 0, 0}, sa[4] = {0, 0, 0, 0};
          for (int r = 0; r <= D; ++r) lattice::row_add_scaled<scalar_t, 4>(sf, w[r], Lb + row[r] + c0);
          if (Ab && c0 < K)
            for (int r = 0; r <= D; ++r) lattice::row_add_scaled<scalar_t, 4>(sa, w[r], Ab + row[r] + c0);
          for (int j = 0; j < 4 && c0 + j < C; ++j) channel(b, i, c0 + j, S, sf[j], sa[j], acc);
        }
        terms[bi] = acc;
        return;
      }
      for (int64_t c = 0; c < C; ++c) {
        scalar_t sf = 0, sa = 0;
        for (int r = 0; r <= D; ++r) sf += w[r] * Lb[row[r] + c];
        if (Ab && c < K)
          for (int r = 0; r <= D; ++r) sa += w[r] * Ab[row[r] + c];
        channel(b, i, c, S, sf, sa, acc);
      }
    } else {
      for (int64_t c = 0; c < C; ++c) {
        scalar_t sf = 0, sa = 0;
        for (int r = 0; r <= d; ++r) sf += wb[r] * Lb[static_cast<int64_t>(vb[r]) * Cs + c];
        if (Ab && c < K)
          for (int r = 0; r <= d; ++r) sa += wb[r] * Ab[static_cast<int64_t>(vb[r]) * Cs + c];
        channel(b, i, c, S, sf, sa, acc);
      }
    }
    terms[bi] = acc;
  }
};

// The CPU's slice in blocks of kSliceBlock pixels (items (image, block)): each pixel's gradient
// entries go to a (K, kSliceBlock) tile on the stack, written out afterwards one class row segment
// (a cache line of floats) at a time, instead of K scattered stores per pixel into rows N apart.
// The same values in the same places. Classes beyond kSliceTileK: the rows directly.
constexpr int kSliceTileK = 64;
template <class F>
struct SliceBlocksCpu {
  F f;
  void operator()(int64_t b, int64_t blk, int64_t, int64_t) const {
    using scalar_t = std::remove_const_t<std::remove_pointer_t<decltype(f.grad)>>;
    const int64_t i0 = blk * kSliceBlock, i1 = i0 + kSliceBlock < f.N ? i0 + kSliceBlock : f.N;
    if (!f.grad || f.K > kSliceTileK) {
      for (int64_t i = i0; i < i1; ++i) f(b, i, 0, 1);
      return;
    }
    scalar_t tile[kSliceTileK * kSliceBlock];
    F g = f;
    g.grad = tile;
    g.grad_block = true;
    g.block_i0 = i0;
    for (int64_t i = i0; i < i1; ++i) g(b, i, 0, 1);
    for (int64_t c = 0; c < f.K; ++c) {
      scalar_t* out = f.grad + (b * f.K + c) * f.N;
      for (int64_t i = i0; i < i1; ++i) out[i] = tile[c * kSliceBlock + (i - i0)];
    }
  }
};

// The CPU's PackFunctor in blocks of kSliceBlock pixels (items (image, block)): each class row
// segment read in one run, the block's (kSliceBlock, Cs) output rows (in L1) written column by
// column. The same values.
template <typename scalar_t>
struct PackBlocksCpu {
  PackFunctor<scalar_t> f;
  void operator()(int64_t b, int64_t blk, int64_t, int64_t) const {
    const int64_t i0 = blk * kSliceBlock, i1 = i0 + kSliceBlock < f.N ? i0 + kSliceBlock : f.N;
    scalar_t* o = f.out + b * f.N * f.Cs;
    const scalar_t* p = f.probs + b * f.K * f.N;
    for (int64_t c = 0; c < f.Cs; ++c) {
      if (c < f.K) {
        for (int64_t i = i0; i < i1; ++i) o[i * f.Cs + c] = p[c * f.N + i];
      } else {
        const scalar_t v = c < f.C ? scalar_t(1) : scalar_t(0);
        for (int64_t i = i0; i < i1; ++i) o[i * f.Cs + c] = v;
      }
    }
  }
};

}  // namespace energy
}  // namespace rrm
