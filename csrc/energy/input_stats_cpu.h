#pragma once
// The value checks' statistics of the energy loss's inputs on the CPU (dense_energy_input_stats,
// CpuExec), block of rows by block of rows: the images' channel rows, the K probability rows (each
// class's rows of a block in one sequential run), the ROI rows and the label rows, each by a loop
// of its own dtype -- for float32 in AVX2 registers -- instead of InputStatsFunctor's pixel at a
// time (the K probabilities of a pixel lie H W apart, and every element goes through load_elem's
// type switch). At 8 x 21 x 321^2 on the 2-core VM: 2.8 ms on 2 threads, the ATen reductions 5.4,
// the functor 60-90. The same statistics as InputStatsFunctor (tests/test_energy.py checks both
// against torch reductions) but for the per-pixel sums over the classes, which are added in the
// probabilities' dtype (float32 for float16/bfloat16; the loss checks them to 1e-2), not double:
// maxima with the minima negated, NaN where a value is NaN (a pixel's sum is NaN then; so is one
// that holds both +Inf and -Inf, which the range check refuses all the same).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <array>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/exec.h"
#include "energy/energy_common.h"
#include "energy/prob_rows_cpu.h"

#if defined(RRM_CPU_AVX2_DISPATCH)
#include <immintrin.h>
#endif

namespace rrm {
namespace energy {

// The running type of an element type's range: float holds every value of the small types exactly.
template <typename T>
using range_t =
    std::conditional_t<(sizeof(T) <= 2 || std::is_same_v<T, float>) && !std::is_same_v<T, double>, float, double>;

// f(T{}) with the C++ type of an Elem.
template <class F>
void with_elem(Elem t, F&& f) {
  switch (t) {
    case Elem::kU8:
      return f(uint8_t{});
    case Elem::kI8:
      return f(int8_t{});
    case Elem::kI16:
      return f(int16_t{});
    case Elem::kI32:
      return f(int32_t{});
    case Elem::kI64:
      return f(int64_t{});
    case Elem::kF16:
      return f(c10::Half{});
    case Elem::kBF16:
      return f(c10::BFloat16{});
    case Elem::kF32:
      return f(float{});
    case Elem::kF64:
      return f(double{});
    default:
      return f(bool{});
  }
}

constexpr int kLanes = kProbLanes;  // (prob_rows_cpu.h's lanes: 8)

// Range of n elements (stride sx) into lanes lo, hi, and whether any is NaN into lanes nan (the
// plain selects ignore NaN; min and max instructions each).
template <typename T, typename A>
inline void range_row(const T* p, int64_t sx, int64_t n, A* lo, A* hi, int32_t* nan) {
  A l[kLanes], h[kLanes];  // local lanes, which the compiler keeps in registers
  int32_t q[kLanes];
  for (int u = 0; u < kLanes; ++u) {
    l[u] = lo[u];
    h[u] = hi[u];
    q[u] = nan[u];
  }
  int64_t x = 0;
  if (sx == 1) {
    for (; x + kLanes <= n; x += kLanes) {
      for (int u = 0; u < kLanes; ++u) {
        const A v = static_cast<A>(p[x + u]);
        l[u] = v < l[u] ? v : l[u];
        h[u] = v > h[u] ? v : h[u];
        q[u] |= v != v;
      }
    }
  }
  for (; x < n; ++x) {
    const A v = static_cast<A>(p[x * sx]);
    l[0] = v < l[0] ? v : l[0];
    h[0] = v > h[0] ? v : h[0];
    q[0] |= v != v;
  }
  for (int u = 0; u < kLanes; ++u) {
    lo[u] = l[u];
    hi[u] = h[u];
    nan[u] = q[u];
  }
}

// Lanes -> (negated minimum, maximum) merged into m[neg_min], m[max]; NaN where a lane saw one.
template <typename A>
inline void merge_range(const A* lo, const A* hi, const int32_t* nan, double* m, int neg_min, int max) {
  for (int u = 0; u < kLanes; ++u) {
    const double q = std::numeric_limits<double>::quiet_NaN();
    m[neg_min] = nan_max(m[neg_min], nan[u] ? q : -static_cast<double>(lo[u]));
    m[max] = nan_max(m[max], nan[u] ? q : static_cast<double>(hi[u]));
  }
}

template <typename A>
inline void init_range(A* lo, A* hi, int32_t* nan) {
  for (int u = 0; u < kLanes; ++u) {
    lo[u] = std::numeric_limits<A>::infinity();
    hi[u] = -std::numeric_limits<A>::infinity();
    nan[u] = 0;
  }
}

// Whether any of n elements fails ok (roi_ok, label_ok), into lanes bad.
template <typename T, class Ok>
inline void flag_row(const T* p, int64_t sx, int64_t n, int32_t* bad, const Ok& ok) {
  int32_t q[kLanes];  // local lanes, as range_row's
  for (int u = 0; u < kLanes; ++u) q[u] = bad[u];
  int64_t x = 0;
  if (sx == 1) {
    for (; x + kLanes <= n; x += kLanes)
      for (int u = 0; u < kLanes; ++u) q[u] |= ok(static_cast<double>(p[x + u])) ? 0 : 1;
  }
  for (; x < n; ++x) q[0] |= ok(static_cast<double>(p[x * sx])) ? 0 : 1;
  for (int u = 0; u < kLanes; ++u) bad[u] = q[u];
}

#if defined(RRM_CPU_AVX2_DISPATCH)
// range_row for float elements in unit steps, in AVX2 registers (min/max skip NaN; the NaN lanes
// from an unordered compare).
__attribute__((target("avx2"))) inline void range_f32_avx2(const float* p, int64_t n, float* lo, float* hi,
                                                           int32_t* nan) {
  __m256 vlo = _mm256_loadu_ps(lo), vhi = _mm256_loadu_ps(hi);
  __m256 vnan = _mm256_setzero_ps();
  int64_t x = 0;
  for (; x + 8 <= n; x += 8) {
    const __m256 v = _mm256_loadu_ps(p + x);
    vlo = _mm256_min_ps(v, vlo);
    vhi = _mm256_max_ps(v, vhi);
    vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  _mm256_storeu_ps(lo, vlo);
  _mm256_storeu_ps(hi, vhi);
  int32_t q[8];
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm256_castps_si256(vnan));
  for (int u = 0; u < 8; ++u) nan[u] |= q[u] != 0;
  range_row(p + x, 1, n - x, lo, hi, nan);  // the tail
}

// Whether any of n float elements in unit steps is neither a nor b, nor (with k > 0) an integer
// in [0, k): ROIs (a = 0, b = 1, k = 0) and labels (a = b = ignore, k = K).
__attribute__((target("avx2"))) inline bool flag_f32_avx2(const float* p, int64_t n, float a, float b, float k) {
  const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b), vk = _mm256_set1_ps(k), zero = _mm256_setzero_ps();
  __m256 bad = _mm256_setzero_ps();
  int64_t x = 0;
  for (; x + 8 <= n; x += 8) {
    const __m256 v = _mm256_loadu_ps(p + x);
    __m256 ok = _mm256_or_ps(_mm256_cmp_ps(v, va, _CMP_EQ_OQ), _mm256_cmp_ps(v, vb, _CMP_EQ_OQ));
    if (k > 0) {
      const __m256 cls =
          _mm256_and_ps(_mm256_and_ps(_mm256_cmp_ps(v, zero, _CMP_GE_OQ), _mm256_cmp_ps(v, vk, _CMP_LT_OQ)),
                        _mm256_cmp_ps(v, _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC), _CMP_EQ_OQ));
      ok = _mm256_or_ps(ok, cls);
    }
    bad = _mm256_or_ps(bad, _mm256_xor_ps(ok, _mm256_castsi256_ps(_mm256_set1_epi32(-1))));
  }
  bool any = _mm256_movemask_ps(bad) != 0;
  for (; x < n; ++x) {
    const float v = p[x];
    any |= !(v == a || v == b || (k > 0 && v >= 0 && v < k && v == std::trunc(v)));
  }
  return any;
}
#endif

// The statistics of rows [r0, r1) of the B H rows, merged into m (kNumStats maxima).
template <typename prob_t>
struct InputStatsRows {
  StridedView img, roi, lab;
  const prob_t* prob;
  int64_t psb, psk, psy;  // unit column stride
  int64_t C, K, H, W;
  double ignore;
  bool distribution;
  bool probabilities;  // false: the probabilities are not read (their entries stay -inf)

  // Rows [y0, y1) of image b (a block: each class's rows of the block are one sequential run),
  // merged into m (kNumStats maxima).
  // buf: (y1 - y0) W elements of work space.
  void operator()(int64_t b, int64_t y0, int64_t y1, double* m, range_t<prob_t>* buf) const {
    using P = range_t<prob_t>;
    const int64_t n = (y1 - y0) * W;
    int32_t roi_bad[kLanes] = {}, lab_bad[kLanes] = {};
    // images: every channel row
    if (C > 0 && W > 0) {
      with_elem(img.t, [&](auto tag) {
        using T = decltype(tag);
        using A = range_t<T>;
        A lo[kLanes], hi[kLanes];
        int32_t nan[kLanes];
        init_range(lo, hi, nan);
        for (int64_t y = y0; y < y1; ++y) {
          const T* base = static_cast<const T*>(img.p) + b * img.sb + y * img.sy;
          for (int64_t c = 0; c < C; ++c) {
#if defined(RRM_CPU_AVX2_DISPATCH)
            if constexpr (std::is_same_v<T, float>) {
              if (img.sx == 1 && cpu_has_avx2()) {
                range_f32_avx2(base + c * img.sc, W, lo, hi, nan);
                continue;
              }
            }
#endif
            range_row(base + c * img.sc, img.sx, W, lo, hi, nan);
          }
        }
        merge_range(lo, hi, nan, m, kImgNegMin, kImgMax);
      });
    }
    // probabilities: their range and each pixel's sum over the classes (in the probabilities'
    // dtype, float32 for float16/bfloat16: the loss checks it to 1e-2), class by class over the
    // block (each class's rows of the block: one sequential run), the sums in a row-block buffer.
    // float and double: prob_rows_cpu.h (float in AVX2 registers), shared with dense_energy_inputs.
    if (probabilities && K == 0 && n > 0 && distribution) {  // empty sums: 0, as InputStatsFunctor's
      m[kSumNegMin] = nan_max(m[kSumNegMin], -0.0);
      m[kSumMax] = nan_max(m[kSumMax], 0.0);
    }
    if (probabilities && K > 0 && n > 0) {
      P* sum = buf;
      double st[4];
      for (int j = 0; j < 4; ++j) st[j] = -std::numeric_limits<double>::infinity();
      P lo[kProbLanes], hi[kProbLanes];
      prob_lanes_init(lo, hi);
      if constexpr (std::is_same_v<prob_t, P>) {
        for (int64_t k = 0; k < K; ++k) {
          for (int64_t y = y0; y < y1; ++y) {
            const prob_t* row = prob + b * psb + k * psk + y * psy;
            prefetch_ahead(row, 4 * psy, W);
            prob_row(row, W, sum + (y - y0) * W, k == 0, lo, hi);
          }
        }
      } else {  // float16, bfloat16: converted element by element
        for (int64_t k = 0; k < K; ++k)
          for (int64_t y = y0; y < y1; ++y)
            prob_row_generic(prob + b * psb + k * psk + y * psy, W, sum + (y - y0) * W, k == 0, lo, hi);
      }
      prob_stats_finish(sum, n, lo, hi, st);
      m[kProbNegMin] = nan_max(m[kProbNegMin], st[0]);
      m[kProbMax] = nan_max(m[kProbMax], st[1]);
      if (distribution) {
        m[kSumNegMin] = nan_max(m[kSumNegMin], st[2]);
        m[kSumMax] = nan_max(m[kSumMax], st[3]);
      }
    }
    for (int64_t y = y0; y < y1; ++y) {
      if (roi.p) {
        with_elem(roi.t, [&](auto tag) {
          using T = decltype(tag);
#if defined(RRM_CPU_AVX2_DISPATCH)
          if constexpr (std::is_same_v<T, float>) {
            if (roi.sx == 1 && cpu_has_avx2()) {
              roi_bad[0] |=
                  flag_f32_avx2(static_cast<const float*>(roi.p) + b * roi.sb + y * roi.sy, W, 0.0f, 1.0f, 0.0f);
              return;
            }
          }
#endif
          flag_row(static_cast<const T*>(roi.p) + b * roi.sb + y * roi.sy, roi.sx, W, roi_bad, roi_ok);
        });
      }
      if (lab.p) {
        const double ig = ignore;
        const double k = static_cast<double>(K);
        with_elem(lab.t, [&](auto tag) {
          using T = decltype(tag);
#if defined(RRM_CPU_AVX2_DISPATCH)
          // float labels, where ignore and K are floats exactly (then the float tests are the double ones)
          if constexpr (std::is_same_v<T, float>) {
            const float igf = static_cast<float>(ig), kf = static_cast<float>(k);
            if (lab.sx == 1 && cpu_has_avx2() && static_cast<double>(igf) == ig && static_cast<double>(kf) == k &&
                k > 0) {
              lab_bad[0] |= flag_f32_avx2(static_cast<const float*>(lab.p) + b * lab.sb + y * lab.sy, W, igf, igf, kf);
              return;
            }
          }
#endif
          // label_ok, with the integer test as trunc (the same for every value below K)
          flag_row(static_cast<const T*>(lab.p) + b * lab.sb + y * lab.sy, lab.sx, W, lab_bad,
                   [&](double v) { return v == ig || (v >= 0.0 && v < k && v == std::trunc(v)); });
        });
      }
    }
    for (int u = 0; u < kLanes; ++u) {
      if (roi_bad[u]) m[kRoiBad] = 1.0;
      if (lab_bad[u]) m[kLabelBad] = 1.0;
    }
  }
};

// images (B, c, H, W), probs (B, K, H, W) with unit column stride, rois and labels (B, H, W) or
// undefined, any dtypes and strides -> (kNumStats,) float64.
inline at::Tensor input_stats_cpu_rows(const at::Tensor& images, const at::Tensor& probs, const StridedView& img,
                                       const StridedView& roi, const StridedView& lab, double ignore_index,
                                       bool distribution, bool probabilities) {
  const int64_t B = probs.size(0), K = probs.size(1), H = probs.size(2), W = probs.size(3);
  // items: blocks of 32 rows of an image (each class's rows of a block: one run of 32 W elements;
  // the block's sums, 32 W, stay in L1 / L2 at W ~ 320; 8 and 16 rows measured 10-20 % slower),
  // one partial per item (not per thread: safe inside other parallel regions too)
  constexpr int64_t kRows = 32;
  const int64_t blocks = (H + kRows - 1) / kRows;
  std::vector<std::array<double, kNumStats>> part(static_cast<size_t>(B * blocks));
  for (auto& m : part)
    for (int j = 0; j < kNumStats; ++j) m[j] = j >= kRoiBad ? 0.0 : -std::numeric_limits<double>::infinity();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, probs.scalar_type(), "rrm_energy_input_stats_rows", [&] {
    const InputStatsRows<scalar_t> f{img,
                                     roi,
                                     lab,
                                     probs.data_ptr<scalar_t>(),
                                     probs.stride(0),
                                     probs.stride(1),
                                     probs.stride(2),
                                     images.size(1),
                                     K,
                                     H,
                                     W,
                                     ignore_index,
                                     distribution,
                                     probabilities};
    at::parallel_for(0, B * blocks, 1, [&](int64_t i0, int64_t i1) {
      std::vector<range_t<scalar_t>> buf(probabilities ? static_cast<size_t>(kRows * W) : 0);
      cpu_run([&] {
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t b = i / blocks, y0 = (i - b * blocks) * kRows;
          f(b, y0, std::min(H, y0 + kRows), part[static_cast<size_t>(i)].data(), buf.data());
        }
      });
    });
  });
  auto out = at::empty({kNumStats}, probs.options().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  for (int j = 0; j < kNumStats; ++j) {
    o[j] = j >= kRoiBad ? 0.0 : -std::numeric_limits<double>::infinity();
    for (const auto& m : part) o[j] = nan_max(o[j], m[j]);
  }
  return out;
}

}  // namespace energy
}  // namespace rrm
