// Entry points of the BCD-loss reductions (schemas in csrc/rrm.cpp; SPEC section 4).
//
// Shapes: B images, C feature channels, N pixels (flattened h*w), K classes.
//   features (B, C, N) float32 / float64 / float16 / bfloat16, any strides
//   labels   (B, N) integer; every entry in [0, K) or equal to ignore_index
//   centers  (B, K, C) of the compute dtype (float64 for float64 features, float32 otherwise)
#pragma once

#include <ATen/ATen.h>

#include "common/checks.h"

namespace rrm {
namespace bcd {

// The dtype reductions are computed and returned in: fp16/bf16 accumulate in fp32.
inline at::ScalarType compute_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_features(const at::Tensor& features) {
  RRM_CHECK_DIM(features, 3, "features");
  const auto t = features.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
                   "features must be float32, float64, float16 or bfloat16; got ", t);
}

inline void check_labels(const at::Tensor& features, const at::Tensor& labels, int64_t num_classes,
                         int64_t ignore_index) {
  RRM_CHECK_DIM(labels, 2, "labels");
  TORCH_CHECK_TYPE(at::isIntegralType(labels.scalar_type(), /*includeBool=*/false),
                   "labels must have an integer dtype; got ", labels.scalar_type());
  RRM_CHECK_SAME_DEVICE(features, labels, "features", "labels");
  TORCH_CHECK_VALUE(labels.size(0) == features.size(0) && labels.size(1) == features.size(2),
                    "labels (B, N) must match features (B, C, N) in B and N; got labels ", labels.sizes(),
                    " and features ", features.sizes());
  TORCH_CHECK_VALUE(num_classes >= 1 && num_classes < (int64_t{1} << 30), "num_classes must be in [1, 2^30); got ",
                    num_classes);
  TORCH_CHECK_VALUE(ignore_index < 0 || ignore_index >= num_classes, "ignore_index (", ignore_index,
                    ") must not be a class index in [0, num_classes = ", num_classes, ")");
  TORCH_CHECK_VALUE(features.size(2) < (int64_t{1} << 31), "features: N must be < 2^31 pixels; got ", features.size(2));
}

inline void check_centers(const at::Tensor& features, const at::Tensor& centers) {
  RRM_CHECK_DIM(centers, 3, "centers");
  RRM_CHECK_SAME_DEVICE(features, centers, "features", "centers");
  TORCH_CHECK_TYPE(centers.scalar_type() == compute_dtype(features.scalar_type()), "centers must have dtype ",
                   compute_dtype(features.scalar_type()), " for features of dtype ", features.scalar_type(), "; got ",
                   centers.scalar_type());
  TORCH_CHECK_VALUE(centers.size(0) == features.size(0) && centers.size(2) == features.size(1),
                    "centers must have shape (B, K, C) with B, C of features ", features.sizes(), "; got ",
                    centers.sizes());
  TORCH_CHECK_VALUE(centers.size(1) >= 1, "centers must have at least one class; got shape ", centers.sizes());
}

inline void check_same_rows(const at::Tensor& t, const char* what, at::IntArrayRef want, at::ScalarType dtype,
                            const at::Tensor& features) {
  TORCH_CHECK_VALUE(t.sizes() == want, what, " must have shape ", want, "; got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, what, " must have dtype ", dtype, "; got ", t.scalar_type());
  RRM_CHECK_SAME_DEVICE(features, t, "features", what);
}

}  // namespace bcd
}  // namespace rrm
