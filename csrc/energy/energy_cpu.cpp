// CPU launchers of the dense-CRF energy ops: the production path (CpuExec: at::parallel_for over
// lattice points and pixels of each image, all channels per thread) and, for tests, the CUDA
// launch decomposition emulated serially (EmulatedCudaExec: one channel per thread, whole batch).
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>

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
  const int64_t B = probs.size(0), K = probs.size(1), N = probs.size(2);
  const int threads = at::get_num_threads();
  if (B < 2 || B < threads || K == 0 || N == 0 || at::in_parallel_region()) {
    // Lattices built one image at a time (small hash-table workspace; each stage parallel inside
    // the image); filtering runs over the whole batch at once.
    return dense_energy(CpuExec{}, probs, gate, features, mass, grad_mode, /*chunk=*/1);
  }
  // At least as many images as threads (>= 2): images across threads, each image's build, filters
  // and slice on one thread (the at::parallel_for of each stage runs inline inside a parallel
  // region): no synchronisation between the ~15 stages of an image, and each image's lattice stays
  // in its core's cache from the build to the slice. Threads take the next image as they finish one
  // (the images' lattices differ in size). Each image computes what the op computes for it alone on
  // one thread: the same bits (tests/test_energy.py). The workers run under the caller's
  // thread-local state (inference mode, grad mode, dispatch keys), which OpenMP's threads do not
  // inherit. 2-core VM, 8 x 21 x 160^2 (session 20): 48 -> 39 ms on 2 threads (benchmarks/NOTES.md).
  const auto p = probs.contiguous(), g = gate.contiguous(), f = features.contiguous();
  const bool has_mass = mass.has_value() && mass->defined();
  const at::Tensor m = has_mass ? mass->contiguous() : at::Tensor();
  auto terms = at::empty({B}, probs.options());
  auto grad = grad_mode == kNoGrad ? at::empty({0}, probs.options())
                                   : empty_large({B, K, N}, probs.options(), kCachedOutputBytes);
  std::atomic<int64_t> next{0};
  const at::ThreadLocalState tls;
  at::parallel_for(0, std::min<int64_t>(B, threads), 1, [&](int64_t, int64_t) {
    const at::ThreadLocalStateGuard guard(tls);
    for (int64_t b = next++; b < B; b = next++) {
      const auto one = [&](const at::Tensor& t) { return t.narrow(0, b, 1); };
      auto [e, unused] = dense_energy(CpuExec{}, one(p), one(g), one(f),
                                      has_mass ? std::optional<at::Tensor>(one(m)) : std::nullopt, grad_mode,
                                      /*chunk=*/1, grad_mode == kNoGrad ? at::Tensor() : one(grad));
      terms.narrow(0, b, 1).copy_(e);
    }
  });
  return {terms, grad};
}

std::tuple<at::Tensor, at::Tensor> energy_emulated(const at::Tensor& probs, const at::Tensor& gate,
                                                   const at::Tensor& features, const std::optional<at::Tensor>& mass,
                                                   int64_t grad_mode) {
  check_energy_args(probs, gate, features, mass, grad_mode);
  return dense_energy(EmulatedCudaExec{}, probs, gate, features, mass, grad_mode, probs.size(0));
}

template <class Exec>
std::tuple<at::Tensor, at::Tensor, at::Tensor> inputs_impl(const at::Tensor& seg, const std::optional<at::Tensor>& rois,
                                                           const std::optional<at::Tensor>& unlabelled, int64_t stride,
                                                           bool gate, int64_t tile, bool stats) {
  check_energy_inputs_args(seg, rois, unlabelled, stride, gate, tile);
  return dense_energy_inputs(Exec{}, seg, rois.value_or(at::Tensor()), unlabelled.value_or(at::Tensor()), stride, gate,
                             tile, stats);
}

template <class Exec>
at::Tensor inputs_backward_impl(const at::Tensor& grad, const std::optional<at::Tensor>& rois, int64_t height,
                                int64_t width, int64_t stride, int64_t tile, const std::optional<at::Tensor>& scale) {
  check_energy_inputs_backward_args(grad, rois, height, width, stride, tile, scale);
  return dense_energy_inputs_backward(Exec{}, grad, rois.value_or(at::Tensor()), height, width, stride, tile,
                                      scale.value_or(at::Tensor()));
}

template <class Exec>
at::Tensor features_impl(const at::Tensor& images, int64_t stride, int64_t height, int64_t width, double sxy,
                         double srgb, at::ScalarType dtype) {
  check_bilateral_features_2d_args(images, stride, height, width, sxy, srgb, dtype);
  return bilateral_features_2d(Exec{}, images, stride, height, width, sxy, srgb, dtype);
}

template <class Exec>
at::Tensor input_stats_impl(const at::Tensor& images, const at::Tensor& seg, const std::optional<at::Tensor>& rois,
                            const std::optional<at::Tensor>& labels, double ignore_index, bool distribution,
                            bool probabilities) {
  check_energy_input_stats_args(images, seg, rois, labels);
  return dense_energy_input_stats(Exec{}, images, seg, rois.value_or(at::Tensor()), labels.value_or(at::Tensor()),
                                  ignore_index, distribution, probabilities);
}

}  // namespace

TORCH_LIBRARY_IMPL(rrm_cuda, CPU, m) {
  m.impl("dense_energy_input_stats", &input_stats_impl<CpuExec>);
  m.impl("_dense_energy_input_stats_emulated", &input_stats_impl<EmulatedCudaExec>);
  m.impl("bilateral_features_2d", &features_impl<CpuExec>);
  m.impl("_bilateral_features_2d_emulated", &features_impl<EmulatedCudaExec>);
  m.impl("dense_energy", &energy_cpu);
  m.impl("_dense_energy_emulated", &energy_emulated);
  m.impl("dense_energy_inputs", &inputs_impl<CpuExec>);
  m.impl("_dense_energy_inputs_emulated", &inputs_impl<EmulatedCudaExec>);
  m.impl("dense_energy_inputs_backward", &inputs_backward_impl<CpuExec>);
  m.impl("_dense_energy_inputs_backward_emulated", &inputs_backward_impl<EmulatedCudaExec>);
}

}  // namespace energy
}  // namespace rrm
