// CPU launchers of the dense-CRF energy op: the production path (CpuExec: at::parallel_for over
// lattice points and pixels of each image, all channels per thread) and, for tests, the CUDA
// launch decomposition emulated serially (EmulatedCudaExec: one channel per thread, whole batch).
#include <torch/library.h>

#include "common/exec.h"
#include "energy/energy.h"
#include "energy/energy_impl.h"

namespace rrm {
namespace energy {
namespace {

std::tuple<at::Tensor, at::Tensor> energy_cpu(const at::Tensor& probs, const at::Tensor& gate,
                                              const at::Tensor& features, const std::optional<at::Tensor>& mass,
                                              int64_t grad_mode) {
  check_energy_args(probs, gate, features, mass, grad_mode);
  // Lattices built one image at a time (small hash-table workspace; each stage parallel inside the
  // image); filtering runs over the whole batch at once.
  return dense_energy(CpuExec{}, probs, gate, features, mass, grad_mode, /*chunk=*/1);
}

std::tuple<at::Tensor, at::Tensor> energy_emulated(const at::Tensor& probs, const at::Tensor& gate,
                                                   const at::Tensor& features, const std::optional<at::Tensor>& mass,
                                                   int64_t grad_mode) {
  check_energy_args(probs, gate, features, mass, grad_mode);
  return dense_energy(EmulatedCudaExec{}, probs, gate, features, mass, grad_mode, probs.size(0));
}

}  // namespace

TORCH_LIBRARY_IMPL(rrm_cuda, CPU, m) {
  m.impl("dense_energy", &energy_cpu);
  m.impl("_dense_energy_emulated", &energy_emulated);
}

}  // namespace energy
}  // namespace rrm
