// CUDA launcher of the dense-CRF energy op: the same algorithm (energy_impl.h) and per-thread bodies
// (energy_common.h, lattice_common.h) as the CPU, run by CudaExec on the current stream, whole
// batch at once. The energy is reduced from per-pixel terms by at::sum (deterministic).
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/cuda_exec.cuh"
#include "energy/energy.h"
#include "energy/energy_impl.h"

namespace rrm {
namespace energy {
namespace {

std::tuple<at::Tensor, at::Tensor> energy_cuda(const at::Tensor& probs, const at::Tensor& gate,
                                               const at::Tensor& features, const std::optional<at::Tensor>& mass,
                                               int64_t grad_mode) {
  check_energy_args(probs, gate, features, mass, grad_mode);
  const c10::cuda::CUDAGuard guard(probs.device());
  return dense_energy(CudaExec{}, probs, gate, features, mass, grad_mode, probs.size(0));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> inputs_cuda(const at::Tensor& seg, const std::optional<at::Tensor>& rois,
                                                           const std::optional<at::Tensor>& unlabelled, int64_t stride,
                                                           bool gate, int64_t tile, bool stats) {
  check_energy_inputs_args(seg, rois, unlabelled, stride, gate, tile);
  const c10::cuda::CUDAGuard guard(seg.device());
  return dense_energy_inputs(CudaExec{}, seg, rois.value_or(at::Tensor()), unlabelled.value_or(at::Tensor()), stride,
                             gate, tile, stats);
}

at::Tensor inputs_backward_cuda(const at::Tensor& grad, const std::optional<at::Tensor>& rois, int64_t height,
                                int64_t width, int64_t stride, int64_t tile, const std::optional<at::Tensor>& scale) {
  check_energy_inputs_backward_args(grad, rois, height, width, stride, tile, scale);
  const c10::cuda::CUDAGuard guard(grad.device());
  return dense_energy_inputs_backward(CudaExec{}, grad, rois.value_or(at::Tensor()), height, width, stride, tile,
                                      scale.value_or(at::Tensor()));
}

at::Tensor features_cuda(const at::Tensor& images, int64_t stride, int64_t height, int64_t width, double sxy,
                         double srgb, at::ScalarType dtype) {
  check_bilateral_features_2d_args(images, stride, height, width, sxy, srgb, dtype);
  const c10::cuda::CUDAGuard guard(images.device());
  return bilateral_features_2d(CudaExec{}, images, stride, height, width, sxy, srgb, dtype);
}

at::Tensor input_stats_cuda(const at::Tensor& images, const at::Tensor& seg, const std::optional<at::Tensor>& rois,
                            const std::optional<at::Tensor>& labels, double ignore_index, bool distribution,
                            bool probabilities) {
  check_energy_input_stats_args(images, seg, rois, labels);
  const c10::cuda::CUDAGuard guard(seg.device());
  return dense_energy_input_stats(CudaExec{}, images, seg, rois.value_or(at::Tensor()), labels.value_or(at::Tensor()),
                                  ignore_index, distribution, probabilities);
}

}  // namespace

TORCH_LIBRARY_IMPL(rrm_cuda, CUDA, m) {
  m.impl("dense_energy_input_stats", &input_stats_cuda);
  m.impl("bilateral_features_2d", &features_cuda);
  m.impl("dense_energy", &energy_cuda);
  m.impl("dense_energy_inputs", &inputs_cuda);
  m.impl("dense_energy_inputs_backward", &inputs_backward_cuda);
}

}  // namespace energy
}  // namespace rrm
