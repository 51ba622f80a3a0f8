#pragma once
// The probabilities' part of the energy loss's value checks on the CPU, one row at a time: their
// range (lanes of running minima and maxima, min/max instructions that skip NaN) and each pixel's
// sum over the classes (a row of sums, the first class initialising it; a NaN probability makes its
// pixel's sum NaN, which is how NaN is found). Used by dense_energy_input_stats (input_stats_cpu.h)
// and, on the rows it has just read, by dense_energy_inputs with stats (InputsFunctor): one read
// of the (B, K, H, W) probabilities for the downscaling and the checks. Host code only.

#include <cstdint>
#include <limits>
#include <type_traits>

#include "common/exec.h"

#if defined(RRM_CPU_AVX2_DISPATCH)
#include <immintrin.h>
#endif

namespace rrm {
namespace energy {

// A hint that the n elements from p + ahead are read soon (the readers of class rows below: the
// processor's own prefetch falls behind on K interleaved runs of rows; 4 rows ahead measured best
// for the downscaling at 321^2 against 2, 8 and 16: 4.6 -> 2.5 ms on 2 threads). Never faults,
// wherever it points.
template <typename T>
inline void prefetch_ahead(const T* p, int64_t ahead, int64_t n) {
#if defined(__GNUC__)
  const auto at = reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(ahead) * sizeof(T);
  for (uintptr_t a = at & ~uintptr_t{63}; a < at + static_cast<uintptr_t>(n) * sizeof(T); a += 64)
    __builtin_prefetch(reinterpret_cast<const void*>(a));
#endif
}

constexpr int kProbLanes = 8;

template <typename T>
inline void prob_lanes_init(T* lo, T* hi) {
  for (int u = 0; u < kProbLanes; ++u) {
    lo[u] = std::numeric_limits<T>::infinity();
    hi[u] = -std::numeric_limits<T>::infinity();
  }
}

// A: the running type (T itself, or float for float16 / bfloat16 elements, converted one by one).
template <typename T, typename A = T>
inline void prob_row_generic(const T* p, int64_t W, A* sum, bool init, A* lo, A* hi) {
  A l[kProbLanes], h[kProbLanes];  // local lanes (registers)
  for (int u = 0; u < kProbLanes; ++u) {
    l[u] = lo[u];
    h[u] = hi[u];
  }
  int64_t x = 0;
  for (; x + kProbLanes <= W; x += kProbLanes) {
    for (int u = 0; u < kProbLanes; ++u) {
      const A v = static_cast<A>(p[x + u]);
      l[u] = v < l[u] ? v : l[u];
      h[u] = v > h[u] ? v : h[u];
      sum[x + u] = init ? v : sum[x + u] + v;
    }
  }
  for (; x < W; ++x) {
    const A v = static_cast<A>(p[x]);
    l[0] = v < l[0] ? v : l[0];
    h[0] = v > h[0] ? v : h[0];
    sum[x] = init ? v : sum[x] + v;
  }
  for (int u = 0; u < kProbLanes; ++u) {
    lo[u] = l[u];
    hi[u] = h[u];
  }
}

#if defined(RRM_CPU_AVX2_DISPATCH)
__attribute__((target("avx2"))) inline void prob_row_avx2(const float* p, int64_t W, float* sum, bool init, float* lo,
                                                          float* hi) {
  __m256 vlo = _mm256_loadu_ps(lo), vhi = _mm256_loadu_ps(hi);
  int64_t x = 0;
  if (init) {
    for (; x + 8 <= W; x += 8) {
      const __m256 v = _mm256_loadu_ps(p + x);
      vlo = _mm256_min_ps(v, vlo);
      vhi = _mm256_max_ps(v, vhi);
      _mm256_storeu_ps(sum + x, v);
    }
  } else {
    for (; x + 8 <= W; x += 8) {
      const __m256 v = _mm256_loadu_ps(p + x);
      vlo = _mm256_min_ps(v, vlo);
      vhi = _mm256_max_ps(v, vhi);
      _mm256_storeu_ps(sum + x, _mm256_add_ps(_mm256_loadu_ps(sum + x), v));
    }
  }
  _mm256_storeu_ps(lo, vlo);
  _mm256_storeu_ps(hi, vhi);
  for (; x < W; ++x) {  // the tail into lane 0
    const float v = p[x];
    lo[0] = v < lo[0] ? v : lo[0];
    hi[0] = v > hi[0] ? v : hi[0];
    sum[x] = init ? v : sum[x] + v;
  }
}
#endif

// One row of W probabilities (unit steps) of one class into the running range lo, hi (kProbLanes
// lanes) and the row's sums (init: the first class).
template <typename T>
inline void prob_row(const T* p, int64_t W, T* sum, bool init, T* lo, T* hi) {
#if defined(RRM_CPU_AVX2_DISPATCH)
  if constexpr (std::is_same_v<T, float>) {
    if (cpu_has_avx2()) {
      prob_row_avx2(p, W, sum, init, lo, hi);
      return;
    }
  }
#endif
  prob_row_generic(p, W, sum, init, lo, hi);
}

// NaN-propagating maximum (as energy_common.h's nan_max, for doubles; no dependency on it here).
inline double prob_nan_max(double m, double v) { return (m == m && (v > m || v != v)) ? v : m; }

// n finished sums and the range lanes -> merged into st[0..3] = (-min p, max p, -min sum, max sum),
// all four NaN where a sum is NaN.
template <typename T>
inline void prob_stats_finish(const T* sum, int64_t n, const T* lo, const T* hi, double* st) {
  T sl[kProbLanes], sh[kProbLanes];
  bool nan = false;
  prob_lanes_init(sl, sh);
  int64_t x = 0;
  for (; x + kProbLanes <= n; x += kProbLanes) {
    for (int u = 0; u < kProbLanes; ++u) {
      const T v = sum[x + u];
      sl[u] = v < sl[u] ? v : sl[u];
      sh[u] = v > sh[u] ? v : sh[u];
      nan |= v != v;
    }
  }
  for (; x < n; ++x) {
    const T v = sum[x];
    sl[0] = v < sl[0] ? v : sl[0];
    sh[0] = v > sh[0] ? v : sh[0];
    nan |= v != v;
  }
  const double q = std::numeric_limits<double>::quiet_NaN();
  for (int u = 0; u < kProbLanes; ++u) {
    st[0] = prob_nan_max(st[0], nan ? q : -static_cast<double>(lo[u]));
    st[1] = prob_nan_max(st[1], nan ? q : static_cast<double>(hi[u]));
    st[2] = prob_nan_max(st[2], nan ? q : -static_cast<double>(sl[u]));
    st[3] = prob_nan_max(st[3], nan ? q : static_cast<double>(sh[u]));
  }
}

}  // namespace energy
}  // namespace rrm
