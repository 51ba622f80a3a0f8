// Entry points of the dense-CRF energy-loss op (schema in csrc/rrm.cpp, algorithm in energy_impl.h).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>

#include "common/checks.h"
#include "energy/energy_common.h"
#include "lattice/lattice_common.h"

namespace rrm {
namespace energy {

// probs (B, K, N), gate (B, N), features (B, d, N), mass (B, N) or none; same dtype and device.
inline void check_energy_args(const at::Tensor& probs, const at::Tensor& gate, const at::Tensor& features,
                              const std::optional<at::Tensor>& mass, int64_t grad_mode) {
  RRM_CHECK_DIM(probs, 3, "probs");
  RRM_CHECK_DIM(gate, 2, "gate");
  RRM_CHECK_DIM(features, 3, "features");
  RRM_CHECK_FLOATING(probs, "probs");
  RRM_CHECK_SAME_DTYPE(probs, gate, "probs", "gate");
  RRM_CHECK_SAME_DTYPE(probs, features, "probs", "features");
  RRM_CHECK_SAME_DEVICE(probs, gate, "probs", "gate");
  RRM_CHECK_SAME_DEVICE(probs, features, "probs", "features");
  const int64_t B = probs.size(0), N = probs.size(2);
  TORCH_CHECK_VALUE(gate.size(0) == B && gate.size(1) == N, "gate must have shape (B, N) = (", B, ", ", N, "); got ",
                    gate.sizes());
  TORCH_CHECK_VALUE(features.size(0) == B && features.size(2) == N, "features must have shape (B, d, N) with B = ", B,
                    ", N = ", N, "; got ", features.sizes());
  TORCH_CHECK_VALUE(features.size(1) >= 1 && features.size(1) <= lattice::kMaxDim,
                    "features must have 1 <= d <= ", lattice::kMaxDim, " channels; got shape ", features.sizes());
  TORCH_CHECK_VALUE(N * (features.size(1) + 1) < (int64_t{1} << 30),
                    "features: N * (d + 1) must be < 2^30 lattice entries per image; got ", features.sizes());
  TORCH_CHECK_VALUE(grad_mode >= kNoGrad && grad_mode <= kExactGrad,
                    "grad_mode must be 0 (none), 1 (rloss) or 2 (exact); got ", grad_mode);
  if (mass.has_value() && mass->defined()) {
    RRM_CHECK_DIM(*mass, 2, "mass");
    RRM_CHECK_SAME_DTYPE(probs, *mass, "probs", "mass");
    RRM_CHECK_SAME_DEVICE(probs, *mass, "probs", "mass");
    TORCH_CHECK_VALUE(mass->size(0) == B && mass->size(1) == N, "mass must have shape (B, N) = (", B, ", ", N,
                      "); got ", mass->sizes());
  }
}

// dense_energy_inputs: segmentations (B, K, H, W) float32/float64 (any strides), rois (B, H, W) of its
// dtype or none, unlabelled (B, H, W) bool or none, stride 1 or 2, K >= 1 for the gate.
inline void check_energy_inputs_args(const at::Tensor& seg, const std::optional<at::Tensor>& rois,
                                     const std::optional<at::Tensor>& unlabelled, int64_t stride, bool gate,
                                     int64_t tile) {
  RRM_CHECK_DIM(seg, 4, "segmentations");
  RRM_CHECK_FLOATING(seg, "segmentations");
  TORCH_CHECK_VALUE(stride == 1 || stride == 2, "stride must be 1 or 2; got ", stride);
  TORCH_CHECK_VALUE(tile >= 0, "tile must be >= 0 (0: raster order); got ", tile);
  TORCH_CHECK_VALUE(!gate || seg.size(1) >= 1, "segmentations must have at least one class for the gate; got ",
                    seg.sizes());
  const int64_t B = seg.size(0), H = seg.size(2), W = seg.size(3);
  TORCH_CHECK_VALUE(H * W < (int64_t{1} << 31), "segmentations: H * W must be < 2^31; got ", seg.sizes());
  if (rois.has_value() && rois->defined()) {
    RRM_CHECK_DIM(*rois, 3, "rois");
    RRM_CHECK_SAME_DTYPE(seg, *rois, "segmentations", "rois");
    RRM_CHECK_SAME_DEVICE(seg, *rois, "segmentations", "rois");
    TORCH_CHECK_VALUE(rois->size(0) == B && rois->size(1) == H && rois->size(2) == W,
                      "rois must have shape (B, H, W) = (", B, ", ", H, ", ", W, "); got ", rois->sizes());
  }
  if (unlabelled.has_value() && unlabelled->defined()) {
    RRM_CHECK_DIM(*unlabelled, 3, "unlabelled");
    TORCH_CHECK_TYPE(unlabelled->scalar_type() == at::kBool, "unlabelled must be bool; got ",
                     unlabelled->scalar_type());
    RRM_CHECK_SAME_DEVICE(seg, *unlabelled, "segmentations", "unlabelled");
    TORCH_CHECK_VALUE(unlabelled->size(0) == B && unlabelled->size(1) == H && unlabelled->size(2) == W,
                      "unlabelled must have shape (B, H, W) = (", B, ", ", H, ", ", W, "); got ", unlabelled->sizes());
  }
}

// bilateral_features_2d: images (B, c, H, W) of a real dtype, output (B, 2 + c, height * width) of
// dtype with height * stride <= H and width * stride <= W.
inline void check_bilateral_features_2d_args(const at::Tensor& images, int64_t stride, int64_t height, int64_t width,
                                             double sxy, double srgb, at::ScalarType dtype) {
  RRM_CHECK_DIM(images, 4, "images");
  TORCH_CHECK_TYPE(!images.is_complex() && images.scalar_type() != at::kBool,
                   "images must have a real, non-bool dtype; got ", images.scalar_type());
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble, "dtype must be float32 or float64; got ", dtype);
  TORCH_CHECK_VALUE(stride == 1 || stride == 2, "stride must be 1 or 2; got ", stride);
  TORCH_CHECK_VALUE(height >= 0 && width >= 0 && height * stride <= images.size(2) && width * stride <= images.size(3),
                    "height and width must be >= 0 with height * stride <= H and width * stride <= W; got height=",
                    height, ", width=", width, ", stride=", stride, " for images of shape ", images.sizes());
  TORCH_CHECK_VALUE(height * width < (int64_t{1} << 31), "height * width must be < 2^31; got ", height, " x ", width);
  TORCH_CHECK_VALUE(sxy > 0 && srgb > 0 && std::isfinite(sxy) && std::isfinite(srgb),
                    "sxy and srgb must be positive and finite; got sxy=", sxy, ", srgb=", srgb);
}

// dense_energy_inputs_backward: grad (B, K, h, w) with h = height / stride, w = width / stride.
inline void check_energy_inputs_backward_args(const at::Tensor& grad, const std::optional<at::Tensor>& rois,
                                              int64_t height, int64_t width, int64_t stride, int64_t tile,
                                              const std::optional<at::Tensor>& scale = std::nullopt) {
  if (scale.has_value() && scale->defined()) {
    RRM_CHECK_SAME_DTYPE(grad, *scale, "grad", "scale");
    RRM_CHECK_SAME_DEVICE(grad, *scale, "grad", "scale");
    TORCH_CHECK_VALUE(scale->numel() == 1, "scale must hold one element; got shape ", scale->sizes());
  }
  RRM_CHECK_DIM(grad, 4, "grad");
  RRM_CHECK_FLOATING(grad, "grad");
  TORCH_CHECK_VALUE(stride == 1 || stride == 2, "stride must be 1 or 2; got ", stride);
  TORCH_CHECK_VALUE(tile >= 0, "tile must be >= 0 (0: raster order); got ", tile);
  TORCH_CHECK_VALUE(grad.size(0) * grad.size(1) < (int64_t{1} << 31), "grad: B * K must be < 2^31; got ", grad.sizes());
  TORCH_CHECK_VALUE(height >= 0 && width >= 0 && height * width < (int64_t{1} << 31),
                    "height and width must be >= 0 with height * width < 2^31; got ", height, " x ", width);
  TORCH_CHECK_VALUE(grad.size(2) == height / stride && grad.size(3) == width / stride, "grad must have shape (B, K, ",
                    height / stride, ", ", width / stride, ") for a ", height, " x ", width, " input at stride ",
                    stride, "; got ", grad.sizes());
  if (rois.has_value() && rois->defined()) {
    RRM_CHECK_SAME_DTYPE(grad, *rois, "grad", "rois");
    RRM_CHECK_SAME_DEVICE(grad, *rois, "grad", "rois");
    TORCH_CHECK_VALUE(
        rois->dim() == 3 && rois->size(0) == grad.size(0) && rois->size(1) == height && rois->size(2) == width,
        "rois must have shape (B, H, W) = (", grad.size(0), ", ", height, ", ", width, "); got ", rois->sizes());
  }
}

// dense_energy_input_stats: images (B, c, H, W), segmentations (B, K, H, W) floating, rois and labels
// (B, H, W) or none; same device; B H W < 2^31.
inline void check_energy_input_stats_args(const at::Tensor& images, const at::Tensor& seg,
                                          const std::optional<at::Tensor>& rois,
                                          const std::optional<at::Tensor>& labels) {
  RRM_CHECK_DIM(images, 4, "images");
  RRM_CHECK_DIM(seg, 4, "segmentations");
  TORCH_CHECK_TYPE(at::isFloatingType(seg.scalar_type()), "segmentations must be floating; got ", seg.scalar_type());
  RRM_CHECK_SAME_DEVICE(seg, images, "segmentations", "images");
  const int64_t B = seg.size(0), H = seg.size(2), W = seg.size(3);
  TORCH_CHECK_VALUE(images.size(0) == B && images.size(2) == H && images.size(3) == W,
                    "images must have shape (B, c, H, W) = (", B, ", c, ", H, ", ", W, "); got ", images.sizes());
  TORCH_CHECK_VALUE(B * H * W < (int64_t{1} << 31), "segmentations: B * H * W must be < 2^31; got ", seg.sizes());
  for (const auto* t : {&rois, &labels}) {
    if (!t->has_value() || !(*t)->defined()) continue;
    const char* what = t == &rois ? "rois" : "labels";
    const at::Tensor& x = **t;
    RRM_CHECK_SAME_DEVICE(seg, x, "segmentations", what);
    TORCH_CHECK_VALUE(x.dim() == 3 && x.size(0) == B && x.size(1) == H && x.size(2) == W, what,
                      " must have shape (B, H, W) = (", B, ", ", H, ", ", W, "); got ", x.sizes());
  }
}

}  // namespace energy
}  // namespace rrm
