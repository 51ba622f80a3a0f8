#pragma once
// The enclosing simplices of 8 pixels at once, in AVX2 registers (float features, d fixed): the
// CPU's one-pass lattice build (lattice_impl.h, insert_pixels). The same operations in the same
// order as EmbedFunctor::simplex, all_weights, corner_key and hash_key, lane by lane, so that the
// keys, weights and hashes are the same bits as the scalar path's (the build is compiled with FP
// contraction off: no fused multiply-adds on either side). Only x86-64 host code with the run-time
// AVX2 dispatch of exec.h; elsewhere (CUDA translation units, other processors) the scalar path.

#include "common/exec.h"
#include "lattice/lattice_common.h"

#if defined(RRM_CPU_AVX2_DISPATCH)
#include <immintrin.h>
#define RRM_SIMPLEX_AVX2 1

namespace rrm {
namespace lattice {

// One block of 8 pixels: corner r's key coordinates, hash and weight, lane l = pixel i + l.
template <int D>
struct alignas(32) Simplex8 {
  int32_t key[D + 1][D][8];
  uint32_t hash[D + 1][8];
  float weight[D + 1][8];
};

// Pixels i .. i + 7 of image b (i + 8 <= f.N). Called only where the processor has AVX2.
template <int D>
__attribute__((target("avx2"))) inline void simplex8(const EmbedFunctor<float, D>& f, int64_t b, int64_t i,
                                                     Simplex8<D>& out) {
  static_assert(D > 0, "the vector simplex needs a fixed d");
  const int64_t N = f.N;
  const float* feat = f.features + b * D * N + i;
  __m256 el[D + 1];
  // Elevation: e_j = sum_{k>=j} c_k - j c_{j-1}, c_k = f_k scale_k (as simplex()).
  __m256 sm = _mm256_setzero_ps();
  for (int j = D; j > 0; --j) {
    const __m256 cf = _mm256_mul_ps(_mm256_loadu_ps(feat + (j - 1) * N), _mm256_set1_ps(f.scale[j - 1]));
    el[j] = _mm256_sub_ps(sm, _mm256_mul_ps(_mm256_set1_ps(static_cast<float>(j)), cf));
    sm = _mm256_add_ps(sm, cf);
  }
  el[0] = sm;
  const __m256 down = _mm256_set1_ps(1.0f / static_cast<float>(D + 1));
  const __m256 up_factor = _mm256_set1_ps(static_cast<float>(D + 1));
  const __m256 lo = _mm256_set1_ps(static_cast<float>(-kMaxKeyCoord));
  const __m256 hi = _mm256_set1_ps(static_cast<float>(kMaxKeyCoord));
  const __m256d dp1 = _mm256_set1_pd(static_cast<double>(D + 1));
  __m256i rem0[D + 1];
  __m256i sum = _mm256_setzero_si256();
  __m256 bad = _mm256_setzero_ps();
  for (int k = 0; k <= D; ++k) {
    // out of range (or NaN): coordinate and quotient 0, the pixel refused
    const __m256 ok = _mm256_and_ps(_mm256_cmp_ps(el[k], lo, _CMP_GE_OQ), _mm256_cmp_ps(el[k], hi, _CMP_LE_OQ));
    bad = _mm256_or_ps(bad, _mm256_xor_ps(ok, _mm256_castsi256_ps(_mm256_set1_epi32(-1))));
    const __m256 q = _mm256_and_ps(_mm256_mul_ps(down, el[k]), ok);
    el[k] = _mm256_and_ps(el[k], ok);
    const __m256 up = _mm256_mul_ps(_mm256_ceil_ps(q), up_factor);
    const __m256 dn = _mm256_mul_ps(_mm256_floor_ps(q), up_factor);
    const __m256 take_up = _mm256_cmp_ps(_mm256_sub_ps(up, el[k]), _mm256_sub_ps(el[k], dn), _CMP_LT_OQ);
    rem0[k] = _mm256_cvttps_epi32(_mm256_blendv_ps(dn, up, take_up));
    // rem0 / (d + 1), truncated as int division: exact in double for |rem0| < 2^31
    const __m128i qlo = _mm256_cvttpd_epi32(_mm256_div_pd(_mm256_cvtepi32_pd(_mm256_castsi256_si128(rem0[k])), dp1));
    const __m128i qhi =
        _mm256_cvttpd_epi32(_mm256_div_pd(_mm256_cvtepi32_pd(_mm256_extracti128_si256(rem0[k], 1)), dp1));
    sum = _mm256_add_epi32(sum, _mm256_inserti128_si256(_mm256_castsi128_si256(qlo), qhi, 1));
  }
  // Ranks of the residuals (descending, ties as densecrf): less = -1 where res_k < res_j.
  __m256 res[D + 1];
  __m256i rank[D + 1];
  for (int k = 0; k <= D; ++k) {
    res[k] = _mm256_sub_ps(el[k], _mm256_cvtepi32_ps(rem0[k]));
    rank[k] = _mm256_setzero_si256();
  }
  const __m256i one = _mm256_set1_epi32(1);
  for (int k = 0; k < D; ++k) {
    for (int j = k + 1; j <= D; ++j) {
      const __m256i less = _mm256_castps_si256(_mm256_cmp_ps(res[k], res[j], _CMP_LT_OQ));
      rank[k] = _mm256_sub_epi32(rank[k], less);
      rank[j] = _mm256_add_epi32(rank[j], _mm256_add_epi32(one, less));
    }
  }
  // Off the plane: move the extreme coordinates back, then clamp the ranks.
  const __m256i dd = _mm256_set1_epi32(D), dp1i = _mm256_set1_epi32(D + 1), zero = _mm256_setzero_si256();
  __m256 v[D + 1];
  for (int k = 0; k <= D; ++k) {
    __m256i r = _mm256_add_epi32(rank[k], sum);
    const __m256i neg = _mm256_cmpgt_epi32(zero, r), big = _mm256_cmpgt_epi32(r, dd);
    const __m256i shift = _mm256_sub_epi32(_mm256_and_si256(neg, dp1i), _mm256_and_si256(big, dp1i));
    r = _mm256_add_epi32(r, shift);
    rem0[k] = _mm256_add_epi32(rem0[k], shift);
    rank[k] = _mm256_min_epi32(_mm256_max_epi32(r, zero), dd);
    v[k] = _mm256_mul_ps(_mm256_sub_ps(el[k], _mm256_cvtepi32_ps(rem0[k])), down);
  }
  // Barycentric weights (all_weights): slot d - rank_k += v_k, slot d - rank_k + 1 -= v_k, every
  // slot's terms in the order of k (a lane that does not touch a slot keeps it as it was).
  __m256 bary[D + 2];
  for (int s = 0; s <= D + 1; ++s) bary[s] = _mm256_setzero_ps();
  for (int k = 0; k <= D; ++k) {
    const __m256i t = _mm256_sub_epi32(dd, rank[k]);
    for (int s = 0; s <= D + 1; ++s) {
      const __m256 add = _mm256_castsi256_ps(_mm256_cmpeq_epi32(t, _mm256_set1_epi32(s)));
      const __m256 sub = _mm256_castsi256_ps(_mm256_cmpeq_epi32(t, _mm256_set1_epi32(s - 1)));
      bary[s] = _mm256_blendv_ps(bary[s], _mm256_add_ps(bary[s], v[k]), add);
      bary[s] = _mm256_blendv_ps(bary[s], _mm256_sub_ps(bary[s], v[k]), sub);
    }
  }
  bary[0] = _mm256_add_ps(bary[0], _mm256_add_ps(_mm256_set1_ps(1.0f), bary[D + 1]));
  // Corners: keys (corner_key), their hashes (hash_key) and weights (0 for a refused pixel).
  for (int r = 0; r <= D; ++r) {
    _mm256_store_ps(out.weight[r], _mm256_andnot_ps(bad, bary[r]));
    const __m256i dr = _mm256_set1_epi32(D - r), wrap = _mm256_set1_epi32(-(D + 1)), rr = _mm256_set1_epi32(r);
    __m256i h = _mm256_setzero_si256();
    for (int k = 0; k < D; ++k) {
      const __m256i key =
          _mm256_add_epi32(_mm256_add_epi32(rem0[k], rr), _mm256_and_si256(_mm256_cmpgt_epi32(rank[k], dr), wrap));
      _mm256_store_si256(reinterpret_cast<__m256i*>(out.key[r][k]), key);
      h = _mm256_mullo_epi32(_mm256_add_epi32(h, key), _mm256_set1_epi32(static_cast<int32_t>(2531011u)));
    }
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
    h = _mm256_mullo_epi32(h, _mm256_set1_epi32(static_cast<int32_t>(0x85ebca6bu)));
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 13));
    _mm256_store_si256(reinterpret_cast<__m256i*>(out.hash[r]), h);
  }
}

}  // namespace lattice
}  // namespace rrm
#endif
