// CUDA launchers of the lattice ops: the same algorithms (lattice_impl.h) and per-thread bodies
// (lattice_common.h) as the CPU, run by CudaExec on the current stream, whole batch at once.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/cuda_exec.cuh"
#include "lattice/lattice.h"
#include "lattice/lattice_impl.h"

namespace rrm {
namespace lattice {
namespace {

at::Tensor filter_cuda(const at::Tensor& values, const at::Tensor& features, bool reverse, bool cache) {
  check_filter_args(values, features);
  const c10::cuda::CUDAGuard guard(values.device());
  return permutohedral_filter(CudaExec{}, values, features, reverse, values.size(0), cache);
}

std::tuple<at::Tensor, at::Tensor> filter_backward_cuda(const at::Tensor& values, const at::Tensor& features,
                                                        const at::Tensor& grad, bool reverse, bool cache) {
  check_filter_args(values, features);
  check_filter_grad(values, grad);
  const c10::cuda::CUDAGuard guard(values.device());
  return permutohedral_filter_backward(CudaExec{}, values, features, grad, reverse, values.size(0), cache);
}

at::Tensor crf_cuda(const at::Tensor& unary, at::TensorList features, const at::Tensor& compat,
                    const c10::List<bool>& diagonal, at::IntArrayRef normalization, int64_t iterations,
                    const c10::List<bool>& cache) {
  check_crf_args(unary, features, compat, diagonal, normalization, iterations, cache);
  const c10::cuda::CUDAGuard guard(unary.device());
  std::vector<bool> diag(diagonal.begin(), diagonal.end()), keep(cache.begin(), cache.end());
  return dense_crf(CudaExec{}, unary, features.vec(), compat, diag, normalization.vec(), iterations, unary.size(0),
                   keep);
}

std::tuple<at::Tensor, at::Tensor> crf_backward_cuda(const at::Tensor& grad, const at::Tensor& unary,
                                                     at::TensorList features, const at::Tensor& compat,
                                                     const c10::List<bool>& diagonal, at::IntArrayRef normalization,
                                                     int64_t iterations, bool compat_grad,
                                                     const c10::List<bool>& cache) {
  check_crf_backward_args(grad, unary, features, compat, diagonal, normalization, iterations, cache);
  const c10::cuda::CUDAGuard guard(unary.device());
  std::vector<bool> diag(diagonal.begin(), diagonal.end()), keep(cache.begin(), cache.end());
  return dense_crf_backward(CudaExec{}, grad, unary, features.vec(), compat, diag, normalization.vec(), iterations,
                            unary.size(0), compat_grad, keep);
}

at::Tensor num_vertices_cuda(const at::Tensor& features) {
  RRM_CHECK_DIM(features, 3, "features");
  RRM_CHECK_FLOATING(features, "features");
  const c10::cuda::CUDAGuard guard(features.device());
  if (features.size(0) == 0 || features.size(2) == 0)
    return at::zeros({features.size(0)}, features.options().dtype(at::kLong));
  return build(CudaExec{}, features.contiguous(), features.size(0)).num_vertices.to(at::kLong);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tables_cuda(const at::Tensor& features, bool emulated) {
  RRM_CHECK_DIM(features, 3, "features");
  RRM_CHECK_FLOATING(features, "features");
  TORCH_CHECK_VALUE(!emulated, "rrm_cuda: _lattice_tables(emulated=True) takes CPU features, got ", features.device());
  check_filter_args(at::empty({features.size(0), 1, features.size(2)}, features.options()), features);
  const c10::cuda::CUDAGuard guard(features.device());
  return lattice_tables(CudaExec{}, features, features.size(0));
}

}  // namespace

TORCH_LIBRARY_IMPL(rrm_cuda, CUDA, m) {
  m.impl("_lattice_tables", &tables_cuda);
  m.impl("permutohedral_filter", &filter_cuda);
  m.impl("_permutohedral_filter_backward", &filter_backward_cuda);
  m.impl("dense_crf", &crf_cuda);
  m.impl("lattice_num_vertices", &num_vertices_cuda);
  m.impl("dense_crf_backward", &crf_backward_cuda);
}

}  // namespace lattice
}  // namespace rrm
