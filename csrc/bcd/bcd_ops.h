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

// bcd_loss: seg_logits (B, K, N), features (B, C, N) -> (loss, labels, centers, dot, norm, cos_sums,
// counts, finite) (bcd_impl.h).
template <class Exec>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bcd_loss_op(
    const at::Tensor& seg_logits, const at::Tensor& features) {
  check_features(features);
  RRM_CHECK_DIM(seg_logits, 3, "seg_logits");
  const auto t = seg_logits.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
                   "seg_logits must be float32, float64, float16 or bfloat16; got ", t);
  RRM_CHECK_SAME_DEVICE(features, seg_logits, "features", "seg_logits");
  TORCH_CHECK_VALUE(seg_logits.size(0) == features.size(0) && seg_logits.size(2) == features.size(2),
                    "seg_logits (B, K, N) must match features (B, C, N) in B and N; got seg_logits ",
                    seg_logits.sizes(), " and features ", features.sizes());
  TORCH_CHECK_VALUE(features.size(0) >= 1, "bcd_loss needs at least one image; got features ", features.sizes());
  TORCH_CHECK_VALUE(seg_logits.size(1) >= 1 && seg_logits.size(1) < (int64_t{1} << 30),
                    "seg_logits must have K in [1, 2^30) classes; got ", seg_logits.sizes());
  TORCH_CHECK_VALUE(features.size(2) < (int64_t{1} << 31), "features: N must be < 2^31 pixels; got ", features.size(2));
  return bcd_loss(Exec{}, seg_logits, features);
}

// bcd_loss_backward: grad (), features (B, C, N) and bcd_loss's labels, centers, dot, norm, cos_sums,
// counts -> grad_features (B, C, N) of features' dtype.
template <class Exec>
at::Tensor bcd_loss_backward_op(const at::Tensor& grad, const at::Tensor& features, const at::Tensor& labels,
                                const at::Tensor& centers, const at::Tensor& dot, const at::Tensor& norm,
                                const at::Tensor& cos_sums, const at::Tensor& counts) {
  check_features(features);
  check_centers(features, centers);
  const int64_t K = centers.size(1);
  check_labels(features, labels, K, -1);
  TORCH_CHECK_VALUE(features.size(0) >= 1, "bcd_loss needs at least one image; got features ", features.sizes());
  const auto ct = centers.scalar_type();
  TORCH_CHECK_VALUE(grad.numel() == 1, "grad must have one element; got shape ", grad.sizes());
  RRM_CHECK_SAME_DEVICE(features, grad, "features", "grad");
  check_same_rows(dot, "dot", {features.size(0), features.size(2)}, ct, features);
  check_same_rows(norm, "norm", {features.size(0), features.size(2)}, ct, features);
  check_same_rows(cos_sums, "cos_sums", {features.size(0), K}, ct, features);
  check_same_rows(counts, "counts", {features.size(0), K}, ct, features);
  return bcd_loss_backward(Exec{}, grad.reshape({}), features, labels, centers, dot, norm, cos_sums, counts);
}

}  // namespace bcd
}  // namespace rrm
