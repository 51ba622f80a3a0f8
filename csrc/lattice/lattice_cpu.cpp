// CPU launchers of the lattice ops: the production path (CpuExec, OpenMP through at::parallel_for)
// and, for tests, the CUDA kernels' decomposition emulated serially (EmulatedCudaExec).
#include <torch/library.h>

#include "common/exec.h"
#include "lattice/lattice.h"
#include "lattice/lattice_impl.h"

namespace rrm {
namespace lattice {
namespace {

at::Tensor filter_cpu(const at::Tensor& values, const at::Tensor& features, bool reverse, bool cache) {
  check_filter_args(values, features);
  // One image at a time: the parallelism is inside each image, the workspace stays small.
  return permutohedral_filter(CpuExec{}, values, features, reverse, /*chunk=*/1, cache);
}

at::Tensor filter_emulated(const at::Tensor& values, const at::Tensor& features, bool reverse, bool cache) {
  check_filter_args(values, features);
  // The CUDA launcher processes the whole batch as one chunk; so does its emulation.
  return permutohedral_filter(EmulatedCudaExec{}, values, features, reverse, values.size(0), cache);
}

std::tuple<at::Tensor, at::Tensor> filter_backward_cpu(const at::Tensor& values, const at::Tensor& features,
                                                       const at::Tensor& grad, bool reverse, bool cache) {
  check_filter_args(values, features);
  check_filter_grad(values, grad);
  return permutohedral_filter_backward(CpuExec{}, values, features, grad, reverse, /*chunk=*/1, cache);
}

std::tuple<at::Tensor, at::Tensor> filter_backward_emulated(const at::Tensor& values, const at::Tensor& features,
                                                            const at::Tensor& grad, bool reverse, bool cache) {
  check_filter_args(values, features);
  check_filter_grad(values, grad);
  return permutohedral_filter_backward(EmulatedCudaExec{}, values, features, grad, reverse, values.size(0), cache);
}

std::vector<bool> to_vector(const c10::List<bool>& l) { return std::vector<bool>(l.begin(), l.end()); }

at::Tensor crf_cpu(const at::Tensor& unary, at::TensorList features, const at::Tensor& compat,
                   const c10::List<bool>& diagonal, at::IntArrayRef normalization, int64_t iterations,
                   const c10::List<bool>& cache) {
  check_crf_args(unary, features, compat, diagonal, normalization, iterations, cache);
  return dense_crf(CpuExec{}, unary, features.vec(), compat, to_vector(diagonal), normalization.vec(), iterations, 1,
                   to_vector(cache));
}

at::Tensor crf_emulated(const at::Tensor& unary, at::TensorList features, const at::Tensor& compat,
                        const c10::List<bool>& diagonal, at::IntArrayRef normalization, int64_t iterations,
                        const c10::List<bool>& cache) {
  check_crf_args(unary, features, compat, diagonal, normalization, iterations, cache);
  return dense_crf(EmulatedCudaExec{}, unary, features.vec(), compat, to_vector(diagonal), normalization.vec(),
                   iterations, unary.size(0), to_vector(cache));
}

std::tuple<at::Tensor, at::Tensor> crf_backward_cpu(const at::Tensor& grad, const at::Tensor& unary,
                                                    at::TensorList features, const at::Tensor& compat,
                                                    const c10::List<bool>& diagonal, at::IntArrayRef normalization,
                                                    int64_t iterations, bool compat_grad,
                                                    const c10::List<bool>& cache) {
  check_crf_backward_args(grad, unary, features, compat, diagonal, normalization, iterations, cache);
  return dense_crf_backward(CpuExec{}, grad, unary, features.vec(), compat, to_vector(diagonal), normalization.vec(),
                            iterations, 1, compat_grad, to_vector(cache));
}

std::tuple<at::Tensor, at::Tensor> crf_backward_emulated(const at::Tensor& grad, const at::Tensor& unary,
                                                         at::TensorList features, const at::Tensor& compat,
                                                         const c10::List<bool>& diagonal, at::IntArrayRef normalization,
                                                         int64_t iterations, bool compat_grad,
                                                         const c10::List<bool>& cache) {
  check_crf_backward_args(grad, unary, features, compat, diagonal, normalization, iterations, cache);
  return dense_crf_backward(EmulatedCudaExec{}, grad, unary, features.vec(), compat, to_vector(diagonal),
                            normalization.vec(), iterations, unary.size(0), compat_grad, to_vector(cache));
}

at::Tensor num_vertices_cpu(const at::Tensor& features) {
  RRM_CHECK_DIM(features, 3, "features");
  RRM_CHECK_FLOATING(features, "features");
  auto dummy = at::empty({features.size(0), 1, features.size(2)}, features.options());
  check_filter_args(dummy, features);
  if (features.size(0) == 0 || features.size(2) == 0)
    return at::zeros({features.size(0)}, features.options().dtype(at::kLong));
  return build(CpuExec{}, features.contiguous(), 1).num_vertices.to(at::kLong);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tables_cpu(const at::Tensor& features, bool emulated) {
  RRM_CHECK_DIM(features, 3, "features");
  RRM_CHECK_FLOATING(features, "features");
  check_filter_args(at::empty({features.size(0), 1, features.size(2)}, features.options()), features);
  if (emulated) return lattice_tables(EmulatedCudaExec{}, features, features.size(0));
  return lattice_tables(CpuExec{}, features, 1);
}

}  // namespace

TORCH_LIBRARY_IMPL(rrm_cuda, CPU, m) {
  m.impl("_lattice_tables", &tables_cpu);
  m.impl("permutohedral_filter", &filter_cpu);
  m.impl("_permutohedral_filter_emulated", &filter_emulated);
  m.impl("_permutohedral_filter_backward", &filter_backward_cpu);
  m.impl("_permutohedral_filter_backward_emulated", &filter_backward_emulated);
  m.impl("dense_crf", &crf_cpu);
  m.impl("_dense_crf_emulated", &crf_emulated);
  m.impl("lattice_num_vertices", &num_vertices_cpu);
  m.impl("dense_crf_backward", &crf_backward_cpu);
  m.impl("_dense_crf_backward_emulated", &crf_backward_emulated);
}

}  // namespace lattice
}  // namespace rrm
