// Entry points of the permutohedral-lattice ops (schemas in csrc/rrm.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/List.h>

#include "common/checks.h"
#include "lattice/lattice_common.h"

namespace rrm {
namespace lattice {

// Shape/dtype/device checks shared by the CPU and CUDA launchers.
//   values (B, C, N), features (B, d, N), 1 <= d <= kMaxDim, same dtype (float32/float64) and device.
inline void check_filter_args(const at::Tensor& values, const at::Tensor& features) {
  RRM_CHECK_DIM(values, 3, "values");
  RRM_CHECK_DIM(features, 3, "features");
  RRM_CHECK_FLOATING(values, "values");
  RRM_CHECK_SAME_DTYPE(values, features, "values", "features");
  RRM_CHECK_SAME_DEVICE(values, features, "values", "features");
  TORCH_CHECK_VALUE(values.size(0) == features.size(0) && values.size(2) == features.size(2),
                    "values (B, C, N) and features (B, d, N) must agree in B and N; got values ", values.sizes(),
                    " and features ", features.sizes());
  TORCH_CHECK_VALUE(features.size(1) >= 1 && features.size(1) <= kMaxDim, "features must have 1 <= d <= ", kMaxDim,
                    " feature channels; got shape ", features.sizes());
  TORCH_CHECK_VALUE(features.size(2) * (features.size(1) + 1) < (int64_t{1} << 30),
                    "features: N * (d + 1) must be < 2^30 lattice entries per image; got N = ", features.size(2),
                    ", d = ", features.size(1));
}

// grad: the gradient of a filter's output, the values' shape, dtype and device.
inline void check_filter_grad(const at::Tensor& values, const at::Tensor& grad) {
  RRM_CHECK_SAME_DTYPE(values, grad, "values", "grad");
  RRM_CHECK_SAME_DEVICE(values, grad, "values", "grad");
  TORCH_CHECK_VALUE(grad.sizes() == values.sizes(), "grad must have the shape of values ", values.sizes(), "; got ",
                    grad.sizes());
}

// unary (B, L, N); features: T tensors (B_t, d_t, N), B_t dividing B; compat (T, L, L); diagonal: T flags.
inline void check_crf_args(const at::Tensor& unary, at::TensorList features, const at::Tensor& compat,
                           const c10::List<bool>& diagonal, at::IntArrayRef normalization, int64_t iterations,
                           const c10::List<bool>& cache = c10::List<bool>()) {
  RRM_CHECK_DIM(unary, 3, "unary");
  RRM_CHECK_FLOATING(unary, "unary");
  TORCH_CHECK_VALUE(unary.size(1) >= 1, "unary must have at least one label; got shape ", unary.sizes());
  RRM_CHECK_DIM(compat, 3, "compat");
  RRM_CHECK_SAME_DTYPE(unary, compat, "unary", "compat");
  RRM_CHECK_SAME_DEVICE(unary, compat, "unary", "compat");
  const int64_t T = static_cast<int64_t>(features.size());
  TORCH_CHECK_VALUE(compat.size(0) == T && compat.size(1) == unary.size(1) && compat.size(2) == unary.size(1),
                    "compat must have shape (T, L, L) = (", T, ", ", unary.size(1), ", ", unary.size(1), "); got ",
                    compat.sizes());
  TORCH_CHECK_VALUE(static_cast<int64_t>(diagonal.size()) == T, "diagonal must have one flag per pairwise term (", T,
                    "); got ", diagonal.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(normalization.size()) == T,
                    "normalization must have one entry per pairwise term (", T, "); got ", normalization);
  for (auto n : normalization)
    TORCH_CHECK_VALUE(n >= 0 && n <= 3,
                      "normalization entries must be 0 (symmetric), 1 (after), 2 (before) or 3 (none); got ", n);
  TORCH_CHECK_VALUE(iterations >= 0, "iterations must be >= 0; got ", iterations);
  TORCH_CHECK_VALUE(cache.empty() || static_cast<int64_t>(cache.size()) == T,
                    "cache must be empty or have one flag per pairwise term (", T, "); got ", cache.size());
  for (int64_t t = 0; t < T; ++t) {
    const auto& f = features[t];
    RRM_CHECK_DIM(f, 3, "features[" + std::to_string(t) + "]");
    RRM_CHECK_SAME_DTYPE(unary, f, "unary", "features[" + std::to_string(t) + "]");
    RRM_CHECK_SAME_DEVICE(unary, f, "unary", "features[" + std::to_string(t) + "]");
    const int64_t B = unary.size(0), Bt = f.size(0);
    TORCH_CHECK_VALUE((B == 0 ? Bt == 0 : Bt >= 1 && B % Bt == 0) && f.size(2) == unary.size(2), "features[", t,
                      "] must have shape (B', d, N) with N of unary ", unary.sizes(),
                      " and B' dividing its batch (image b uses features[b % B']); got ", f.sizes());
    TORCH_CHECK_VALUE(f.size(1) >= 1 && f.size(1) <= kMaxDim, "features[", t, "] must have 1 <= d <= ", kMaxDim,
                      " channels; got shape ", f.sizes());
    TORCH_CHECK_VALUE(f.size(2) * (f.size(1) + 1) < (int64_t{1} << 30), "features[", t,
                      "]: N * (d + 1) must be < 2^30 lattice entries per image; got ", f.sizes());
  }
}

// dense_crf_backward: grad (B, L, N) like unary, plus dense_crf's arguments.
inline void check_crf_backward_args(const at::Tensor& grad, const at::Tensor& unary, at::TensorList features,
                                    const at::Tensor& compat, const c10::List<bool>& diagonal,
                                    at::IntArrayRef normalization, int64_t iterations,
                                    const c10::List<bool>& cache = c10::List<bool>()) {
  check_crf_args(unary, features, compat, diagonal, normalization, iterations, cache);
  RRM_CHECK_SAME_DTYPE(unary, grad, "unary", "grad");
  RRM_CHECK_SAME_DEVICE(unary, grad, "unary", "grad");
  TORCH_CHECK_VALUE(grad.sizes() == unary.sizes(), "grad must have the shape of unary ", unary.sizes(), "; got ",
                    grad.sizes());
}

}  // namespace lattice
}  // namespace rrm
