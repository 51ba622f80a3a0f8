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

#include <cstdint>

#include "common/macros.h"

namespace rrm {
namespace energy {

constexpr int kTile = 32;

// Gradient modes of the op (schema: csrc/rrm.cpp).
enum GradMode : int64_t { kNoGrad = 0, kRlossGrad = 1, kExactGrad = 2 };

// Channel-major (B, K, N) probabilities -> pixel-major (B, N, C) lattice input, C = K or K + 1; the
// extra channel is all ones (its filter is W 1, the constant of the non-negative form).
// One thread per pixel.
template <typename scalar_t>
struct PackFunctor {
  const scalar_t* probs;  // (B, K, N)
  scalar_t* out;          // (B, N, C)
  int64_t N, K, C;

  RRM_HOST_DEVICE void operator()(int64_t t) const {
    const int64_t b = t / N, i = t % N;
    scalar_t* o = out + t * C;
    const scalar_t* p = probs + b * K * N + i;
    for (int64_t k = 0; k < K; ++k) o[k] = p[k * N];
    if (C > K) o[K] = scalar_t(1);
  }
};

// Forward slice fused with the gate, the ROI-masked probabilities and the dot product; one call per
// (image b, pixel i, channels [c0, c1)) -- all channels on the CPU, one per thread on CUDA:
//   as_c = alpha sum_r w_{i,r} L[v_{i,r}, c]
//   terms[b, i, c0] = sum_{c in [c0, c1)} (c < K ? -S(i) s_c(i) as_c : S(i) m(i) as_c)
//   grad[b, c, i]   = -2 S(i) as_c (rloss) or -S(i) as_c (exact; the adjoint pass adds the rest)
// terms (B, N, C) is zero-initialised; the per-pixel terms are reduced afterwards in a fixed order
// (deterministic, no float atomics).
template <typename scalar_t>
struct EnergySliceFunctor {
  const scalar_t* lattice_values;  // (B, M, Cs) blurred
  const scalar_t* weights;         // (B, E)
  const int32_t* entry_vertex;     // (B, E)
  const scalar_t* in;              // (B, N, C) the packed probabilities
  const scalar_t* gate;            // (B, N)
  const scalar_t* mass;            // (B, N) or nullptr (then C == K)
  scalar_t* terms;                 // (B, N, C)
  scalar_t* grad;                  // (B, K, N) or nullptr
  scalar_t alpha, grad_scale;      // grad_scale: -2 (rloss) or -1 (exact)
  int64_t N, E, M, C, Cs, K;       // Cs: lattice row stride (C padded to 8 on the CPU)
  int d;

  RRM_HOST_DEVICE void operator()(int64_t b, int64_t i, int64_t c0, int64_t c1) const {
    const int64_t bi = b * N + i;
    const scalar_t* wb = weights + b * E + i * (d + 1);
    const int32_t* vb = entry_vertex + b * E + i * (d + 1);
    const scalar_t* Lb = lattice_values + b * M * Cs;
    const scalar_t* x = in + bi * C;
    const scalar_t S = gate[bi];
    scalar_t acc = 0;
    for (int64_t t0 = c0; t0 < c1; t0 += kTile) {
      const int64_t t1 = (t0 + kTile < c1) ? t0 + kTile : c1;
      scalar_t s[kTile];
      for (int64_t c = t0; c < t1; ++c) s[c - t0] = 0;
      for (int r = 0; r <= d; ++r) {
        const scalar_t w = wb[r];
        const scalar_t* L = Lb + static_cast<int64_t>(vb[r]) * Cs;
        for (int64_t c = t0; c < t1; ++c) s[c - t0] += w * L[c];
      }
      for (int64_t c = t0; c < t1; ++c) {
        const scalar_t as = alpha * s[c - t0];
        if (c < K) {
          acc -= S * x[c] * as;
          if (grad) grad[(b * K + c) * N + i] = grad_scale * S * as;
        } else {
          acc += S * mass[bi] * as;
        }
      }
    }
    terms[bi * C + c0] = acc;
  }
};

// Adjoint slice of the exact gradient: grad[b, c, i] -= alpha sum_r w_{i,r} L'[v_{i,r}, c], where L'
// is the splat of S s blurred in reverse axis order, i.e. grad -= W^T (S s_c).
template <typename scalar_t>
struct AdjointSliceFunctor {
  const scalar_t* lattice_values;  // (B, M, Cs) blurred in reverse order
  const scalar_t* weights;         // (B, E)
  const int32_t* entry_vertex;     // (B, E)
  scalar_t* grad;                  // (B, K, N)
  scalar_t alpha;
  int64_t N, E, M, C, Cs, K;
  int d;

  RRM_HOST_DEVICE void operator()(int64_t b, int64_t i, int64_t c0, int64_t c1) const {
    const int64_t ce = c1 < K ? c1 : K;  // the constant channel (c == K) has no gradient
    const scalar_t* wb = weights + b * E + i * (d + 1);
    const int32_t* vb = entry_vertex + b * E + i * (d + 1);
    const scalar_t* Lb = lattice_values + b * M * Cs;
    for (int64_t t0 = c0; t0 < ce; t0 += kTile) {
      const int64_t t1 = (t0 + kTile < ce) ? t0 + kTile : ce;
      scalar_t s[kTile];
      for (int64_t c = t0; c < t1; ++c) s[c - t0] = 0;
      for (int r = 0; r <= d; ++r) {
        const scalar_t w = wb[r];
        const scalar_t* L = Lb + static_cast<int64_t>(vb[r]) * Cs;
        for (int64_t c = t0; c < t1; ++c) s[c - t0] += w * L[c];
      }
      for (int64_t c = t0; c < t1; ++c) grad[(b * K + c) * N + i] -= alpha * s[c - t0];
    }
  }
};

}  // namespace energy
}  // namespace rrm
