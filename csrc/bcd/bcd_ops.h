// Checked entry points of the BCD-loss ops, templated on the execution policy; bcd_cpu.cpp and
// bcd_cuda.cu register them (the CUDA file adds a device guard).
#pragma once

#include "bcd/bcd.h"
#include "bcd/bcd_impl.h"

namespace rrm {
namespace bcd {

// masked_feature_sums: features (B, C, N), labels (B, N) -> sums (B, K, C), counts (B, K).
template <class Exec>
std::tuple<at::Tensor, at::Tensor> sums_op(const at::Tensor& features, const at::Tensor& labels, int64_t num_classes,
                                           int64_t ignore_index) {
  check_features(features);
  check_labels(features, labels, num_classes, ignore_index);
  return masked_feature_sums(Exec{}, features, labels, num_classes, ignore_index);
}

// masked_feature_gather: values (B, K, C), labels (B, N) -> (B, C, N).
template <class Exec>
at::Tensor gather_op(const at::Tensor& values, const at::Tensor& labels, int64_t ignore_index) {
  RRM_CHECK_DIM(values, 3, "values");
  const auto t = values.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
                   "values must be float32, float64, float16 or bfloat16; got ", t);
  RRM_CHECK_DIM(labels, 2, "labels");
  TORCH_CHECK_VALUE(values.size(1) >= 1, "values must have shape (B, K, C) with K >= 1; got ", values.sizes());
  TORCH_CHECK_TYPE(at::isIntegralType(labels.scalar_type(), /*includeBool=*/false),
                   "labels must have an integer dtype; got ", labels.scalar_type());
  RRM_CHECK_SAME_DEVICE(values, labels, "values", "labels");
  TORCH_CHECK_VALUE(labels.size(0) == values.size(0), "labels (B, N) and values (B, K, C) must agree in B; got ",
                    labels.sizes(), " and ", values.sizes());
  TORCH_CHECK_VALUE(ignore_index < 0 || ignore_index >= values.size(1), "ignore_index (", ignore_index,
                    ") must not be a class index in [0, K = ", values.size(1), ")");
  return masked_feature_gather(Exec{}, values, labels, ignore_index);
}

// feature_center_cosine: features (B, C, N), labels (B, N), centers (B, K, C) -> (B, K), dot (B, N), norm (B, N).
template <class Exec>
std::tuple<at::Tensor, at::Tensor, at::Tensor> cosine_op(const at::Tensor& features, const at::Tensor& labels,
                                                         const at::Tensor& centers, int64_t ignore_index) {
  check_features(features);
  check_centers(features, centers);
  check_labels(features, labels, centers.size(1), ignore_index);
  return feature_center_cosine(Exec{}, features, labels, centers, ignore_index);
}

template <class Exec>
std::tuple<at::Tensor, at::Tensor> cosine_backward_op(const at::Tensor& grad, const at::Tensor& features,
                                                      const at::Tensor& labels, const at::Tensor& centers,
                                                      const at::Tensor& dot, const at::Tensor& norm,
                                                      int64_t ignore_index) {
  check_features(features);
  check_centers(features, centers);
  check_labels(features, labels, centers.size(1), ignore_index);
  const auto ct = centers.scalar_type();
  check_same_rows(grad, "grad", {centers.size(0), centers.size(1)}, ct, features);
  check_same_rows(dot, "dot", {features.size(0), features.size(2)}, ct, features);
  check_same_rows(norm, "norm", {features.size(0), features.size(2)}, ct, features);
  return feature_center_cosine_backward(Exec{}, grad, features, labels, centers, dot, norm, ignore_index);
}

}  // namespace bcd
}  // namespace rrm
