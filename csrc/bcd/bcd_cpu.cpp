// CPU launchers of the BCD-loss ops: the production path (CpuExec, OpenMP through at::parallel_for;
// deterministic whatever the thread count, since every sum runs in a fixed order inside one task)
// and, for tests, the CUDA kernels' decomposition emulated serially (EmulatedCudaExec).
#include <torch/library.h>

#include "bcd/bcd_ops.h"
#include "common/exec.h"

namespace rrm {
namespace bcd {

TORCH_LIBRARY_IMPL(rrm_cuda, CPU, m) {
  m.impl("masked_feature_sums", &sums_op<CpuExec>);
  m.impl("_masked_feature_sums_emulated", &sums_op<EmulatedCudaExec>);
  m.impl("masked_feature_gather", &gather_op<CpuExec>);
  m.impl("_masked_feature_gather_emulated", &gather_op<EmulatedCudaExec>);
  m.impl("feature_center_cosine", &cosine_op<CpuExec>);
  m.impl("_feature_center_cosine_emulated", &cosine_op<EmulatedCudaExec>);
  m.impl("feature_center_cosine_backward", &cosine_backward_op<CpuExec>);
  m.impl("_feature_center_cosine_backward_emulated", &cosine_backward_op<EmulatedCudaExec>);
  m.impl("bcd_loss", &bcd_loss_op<CpuExec>);
  m.impl("_bcd_loss_emulated", &bcd_loss_op<EmulatedCudaExec>);
  m.impl("bcd_loss_backward", &bcd_loss_backward_op<CpuExec>);
  m.impl("_bcd_loss_backward_emulated", &bcd_loss_backward_op<EmulatedCudaExec>);
}

}  // namespace bcd
}  // namespace rrm
