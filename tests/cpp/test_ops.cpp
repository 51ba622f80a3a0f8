// C++ smoke test of the CMake build: the ops are registered and compute known values through the
// dispatcher, without Python.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <string>

#include "common/exec.h"

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  std::printf("%s: %s\n", ok ? "PASS" : "FAIL", what);
  if (!ok) ++failures;
}

}  // namespace

int main() {
  auto filter = c10::Dispatcher::singleton()
                    .findSchemaOrThrow("rrm_cuda::permutohedral_filter", "")
                    .typed<at::Tensor(const at::Tensor&, const at::Tensor&, bool, bool)>();
  // d = 1, one point at the origin: alpha * (1 + 1/4) * v = (2/3) * 1.25 * 3 = 2.5 (see the Python test).
  auto v = at::full({1, 1, 1}, 3.0, at::kDouble);
  auto f = at::zeros({1, 1, 1}, at::kDouble);
  const double out = filter.call(v, f, false, false).item<double>();
  expect(std::abs(out - 2.5) < 1e-12, "single point, d = 1");

  // Adjoint: <K x, y> == <x, K^T y> with K^T the reversed blur.
  at::manual_seed(0);
  auto x = at::randn({2, 3, 200}, at::kDouble);
  auto y = at::randn({2, 3, 200}, at::kDouble);
  auto feats = at::randn({2, 5, 200}, at::kDouble) * 2;
  const double lhs = (filter.call(x, feats, false, false) * y).sum().item<double>();
  const double rhs = (x * filter.call(y, feats, true, false)).sum().item<double>();
  expect(std::abs(lhs - rhs) < 1e-9 * std::abs(lhs), "reverse blur is the exact adjoint");
  // A kept lattice (cache = true) gives a fresh build's bits, at its first call and later.
  for (int k = 0; k < 2; ++k)
    expect(at::equal(filter.call(x, feats, false, true), filter.call(x, feats, false, false)), "cached lattice");

  auto crf = c10::Dispatcher::singleton()
                 .findSchemaOrThrow("rrm_cuda::dense_crf", "")
                 .typed<at::Tensor(const at::Tensor&, at::TensorList, const at::Tensor&, const c10::List<bool>&,
                                   at::IntArrayRef, int64_t, const c10::List<bool>&)>();
  auto unary = at::rand({1, 3, 50}, at::kDouble);
  auto pos = at::rand({1, 2, 50}, at::kDouble) * 5;
  auto compat = (at::eye(3, at::kDouble) * -3).unsqueeze(0);
  auto q = crf.call(unary, {pos}, compat, c10::List<bool>({true}), {0}, 5, c10::List<bool>());
  expect(at::allclose(q.sum(1), at::ones({1, 50}, at::kDouble)), "dense_crf returns distributions");
  // A constant term's lattice from the cache: the same result as building it.
  auto q1 = crf.call(unary, {pos}, compat, c10::List<bool>({true}), {0}, 5, c10::List<bool>({true}));
  auto q2 = crf.call(unary, {pos}, compat, c10::List<bool>({true}), {0}, 5, c10::List<bool>({true}));
  expect(at::equal(q, q1) && at::equal(q, q2), "dense_crf with a cached lattice equals a fresh build");

  // With CUDA kernels and a GPU: the same ops on the device give the CPU's values (float64; the
  // sums' order differs between the two).
  if (at::hasCUDA()) {
    const auto gpu = [](const at::Tensor& t) { return t.to(at::kCUDA); };
    const auto yc = filter.call(gpu(x), gpu(feats), false, false).cpu();
    expect(at::allclose(yc, filter.call(x, feats, false, false), 1e-9, 1e-12), "CUDA filter equals the CPU's");
    const auto qc = crf.call(gpu(unary), {gpu(pos)}, gpu(compat), c10::List<bool>({true}), {0}, 5, c10::List<bool>());
    expect(at::allclose(qc.cpu(), q, 1e-9, 1e-12), "CUDA dense_crf equals the CPU's");
  } else {
    std::printf("SKIP: the CUDA checks (no CUDA device)\n");
  }

  // The emulated block launch: phases separated by barriers (a block sum through shared memory);
  // a phase inside a phase (a divergent __syncthreads on the GPU) and shared memory beyond the
  // device's limit are refused.
  const rrm::EmulatedCudaExec emu;
  std::vector<int64_t> sums(3, -1);
  emu.for_each_block(1, 3, 8 * 256, [&](const rrm::EmulatedBlock& blk, int64_t, int64_t k) {
    int64_t* sh = blk.shared<int64_t>();
    blk.phase([&](int t) { sh[t] = t + k; });
    blk.phase([&](int t) {
      if (t == 0) {
        int64_t acc = 0;
        for (int u = 0; u < blk.threads(); ++u) acc += sh[u];
        sums[k] = acc;
      }
    });
  });
  expect(sums[0] == 255 * 128 && sums[2] == 255 * 128 + 2 * 256, "emulated block phases");
  auto raises = [](auto&& fn, const char* text) {
    try {
      fn();
    } catch (const c10::Error& e) {
      return std::string(e.what()).find(text) != std::string::npos;
    }
    return false;
  };
  expect(raises(
             [&] {
               emu.for_each_block(1, 1, 64, [](const rrm::EmulatedBlock& blk, int64_t, int64_t) {
                 blk.phase([&](int) { blk.phase([](int) {}); });
               });
             },
             "a phase inside a phase"),
         "emulated block: a nested phase raises");
  expect(
      raises([&] { emu.for_each_block(1, 1, (int64_t{1} << 20), [](const rrm::EmulatedBlock&, int64_t, int64_t) {}); },
             "exceed the device's opt-in limit"),
      "emulated block: too much shared memory raises");

  bool threw = false;
  try {
    filter.call(v, at::zeros({2, 1, 1}, at::kDouble), false, false);
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("values (B, C, N) and features (B, d, N)") != std::string::npos;
  }
  expect(threw, "shape mismatch raises a named error");
  return failures == 0 ? 0 : 1;
}
