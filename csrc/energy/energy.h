// Entry points of the dense-CRF energy-loss op (schema in csrc/rrm.cpp, algorithm in energy_impl.h).
#pragma once

#include <ATen/ATen.h>

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

}  // namespace energy
}  // namespace rrm
