// CUDA launchers of the BCD-loss ops: the same algorithms (bcd_impl.h) and per-thread bodies
// (bcd_common.h) as the CPU, run by CudaExec on the current stream.
//
// Determinism: every segment (the pixels of one image and class, from a stable sort) is cut into fixed
// chunks; one thread per (chunk[, channel]) sums its chunk in a fixed order, then one thread per
// (image, class[, channel]) adds the chunks in order (bcd_common.h, "GPU segment machinery") -- no
// floating-point atomics, so results are bitwise reproducible run to run on the same GPU and build.
// They differ from the CPU's in rounding only (the CPU accumulates in double, one segment per task).
// Host synchronisations: one per op, the label check's (a device flag read back); bcd_loss and
// bcd_loss_backward make their segments once, so one each as well.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "bcd/bcd_ops.h"
#include "common/cuda_exec.cuh"

namespace rrm {
namespace bcd {
namespace {

std::tuple<at::Tensor, at::Tensor> sums_cuda(const at::Tensor& features, const at::Tensor& labels, int64_t num_classes,
                                             int64_t ignore_index) {
  const c10::cuda::CUDAGuard guard(features.device());
  return sums_op<CudaExec>(features, labels, num_classes, ignore_index);
}

at::Tensor gather_cuda(const at::Tensor& values, const at::Tensor& labels, int64_t ignore_index) {
  const c10::cuda::CUDAGuard guard(values.device());
  return gather_op<CudaExec>(values, labels, ignore_index);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cosine_cuda(const at::Tensor& features, const at::Tensor& labels,
                                                           const at::Tensor& centers, int64_t ignore_index) {
  const c10::cuda::CUDAGuard guard(features.device());
  return cosine_op<CudaExec>(features, labels, centers, ignore_index);
}

std::tuple<at::Tensor, at::Tensor> cosine_backward_cuda(const at::Tensor& grad, const at::Tensor& features,
                                                        const at::Tensor& labels, const at::Tensor& centers,
                                                        const at::Tensor& dot, const at::Tensor& norm,
                                                        int64_t ignore_index) {
  const c10::cuda::CUDAGuard guard(features.device());
  return cosine_backward_op<CudaExec>(grad, features, labels, centers, dot, norm, ignore_index);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> loss_cuda(
    const at::Tensor& seg_logits, const at::Tensor& features) {
  const c10::cuda::CUDAGuard guard(features.device());
  return bcd_loss_op<CudaExec>(seg_logits, features);
}

at::Tensor loss_backward_cuda(const at::Tensor& grad, const at::Tensor& features, const at::Tensor& labels,
                              const at::Tensor& centers, const at::Tensor& dot, const at::Tensor& norm,
                              const at::Tensor& cos_sums, const at::Tensor& counts) {
  const c10::cuda::CUDAGuard guard(features.device());
  return bcd_loss_backward_op<CudaExec>(grad, features, labels, centers, dot, norm, cos_sums, counts);
}

}  // namespace

TORCH_LIBRARY_IMPL(rrm_cuda, CUDA, m) {
  m.impl("masked_feature_sums", &sums_cuda);
  m.impl("masked_feature_gather", &gather_cuda);
  m.impl("feature_center_cosine", &cosine_cuda);
  m.impl("feature_center_cosine_backward", &cosine_backward_cuda);
  m.impl("bcd_loss", &loss_cuda);
  m.impl("bcd_loss_backward", &loss_backward_cuda);
}

}  // namespace bcd
}  // namespace rrm
