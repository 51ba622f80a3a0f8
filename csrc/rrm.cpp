// rrm_cuda: every op schema in one place, plus build information for Python.
//
// Shapes use B batch, C channels, N pixels (any spatial layout, flattened), d feature dimension,
// L labels, T pairwise terms. Kernels live in csrc/<op>/<op>_{cpu.cpp,cuda.cu}; Python wrappers,
// fake kernels and autograd in rrm_cuda/_ops/<op>.py.
#include <ATen/Parallel.h>
#include <Python.h>
#include <torch/library.h>

#include <atomic>
#include <set>
#include <mutex>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

TORCH_LIBRARY(rrm_cuda, m) {
  // ---- permutohedral lattice (csrc/lattice) ----
  // values (B, C, N), features (B, d, N) already divided by their standard deviations ->
  // (B, C, N): out_i = alpha * sum_p w_ip (B_d..B_0 splat(values))_p ~ sum_j exp(-|f_i - f_j|^2 / 2) v_j.
  // reverse=True blurs the axes in reverse order: the exact adjoint (transpose) of reverse=False.
  m.def("permutohedral_filter(Tensor values, Tensor features, bool reverse=False) -> Tensor");
  // CPU only, for tests: the CUDA launch decomposition emulated serially in reverse thread order.
  m.def("_permutohedral_filter_emulated(Tensor values, Tensor features, bool reverse=False) -> Tensor");
  // (B, d, N) -> (B,) int64: lattice points per image (occupancy diagnostics, memory planning).
  m.def("lattice_num_vertices(Tensor features) -> Tensor");
  // Mean-field inference with densecrf's semantics. unary (B, L, N) energies; features T x (B, d_t, N);
  // compat (T, L, L) in the energy convention (Potts w -> -w I); diagonal: T flags (compat[t] is
  // diagonal); normalization: per term 0 symmetric, 1 after, 2 before, 3 none -> Q (B, L, N).
  m.def(
      "dense_crf(Tensor unary, Tensor[] features, Tensor compat, bool[] diagonal, int[] normalization, "
      "int iterations) -> Tensor");
  m.def(
      "_dense_crf_emulated(Tensor unary, Tensor[] features, Tensor compat, bool[] diagonal, int[] normalization, "
      "int iterations) -> Tensor");

  // ---- dense energy loss (csrc/energy) ----
  // Dense-CRF energy of RRM / rloss (SPEC §3) on already-downscaled tensors.
  // probs (B, K, N) ROI-masked probabilities s; gate (B, N) S; features (B, d, N) divided by their
  // sigmas; mass (B, N) or None: adds sum_i S m (W 1) (the non-negative form's constant).
  // grad_mode: 0 none, 1 rloss (-2 S W s), 2 exact (-(S W s + W^T (S s)), the gate held constant).
  // -> (energy (B,) per image: -sum_{k,i} S s_k W s_k [+ const], grad_dir (B, K, N) = d energy_b / d s,
  //     or (0,) for grad_mode 0). The loss is weight * energy.sum() / B.
  m.def("dense_energy(Tensor probs, Tensor gate, Tensor features, Tensor? mass=None, int grad_mode=0) -> (Tensor, Tensor)");
  // CPU only, for tests: the CUDA launch decomposition emulated serially in reverse thread order.
  m.def(
      "_dense_energy_emulated(Tensor probs, Tensor gate, Tensor features, Tensor? mass=None, int grad_mode=0) -> "
      "(Tensor, Tensor)");
}

namespace {

PyObject* build_info(PyObject*, PyObject*) {
#ifdef RRM_WITH_CUDA
  const bool cuda = true;
#else
  const bool cuda = false;
#endif
#ifdef _OPENMP
  const bool openmp = true;
  const long omp_version = _OPENMP;
#else
  const bool openmp = false;
  const long omp_version = 0;
#endif
  return Py_BuildValue("{s:O,s:O,s:l,s:s}", "with_cuda", cuda ? Py_True : Py_False, "with_openmp",
                       openmp ? Py_True : Py_False, "openmp_version", omp_version, "compiler",
#if defined(__clang__)
                       "clang " __clang_version__
#elif defined(__GNUC__)
                       "gcc " __VERSION__
#else
                       "unknown"
#endif
  );
}

// Number of distinct threads that ran the bodies of one at::parallel_for over n items: proves the
// extension's own parallel loops are really multi-threaded (not silently serial).
PyObject* parallel_threads_used(PyObject*, PyObject* arg) {
  const long n = PyLong_AsLong(arg);
  if (n < 0 && PyErr_Occurred()) return nullptr;
  std::mutex mu;
  std::set<int> ids;
  Py_BEGIN_ALLOW_THREADS;
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    volatile double sink = 0;
    for (int64_t i = b; i < e; ++i)
      for (int k = 0; k < 200000; ++k) sink = sink + k;
    std::lock_guard<std::mutex> lock(mu);
    ids.insert(at::get_thread_num());
  });
  Py_END_ALLOW_THREADS;
  return PyLong_FromLong(static_cast<long>(ids.size()));
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "Build configuration of the extension (CUDA, OpenMP, compiler)."},
    {"parallel_threads_used", parallel_threads_used, METH_O,
     "Distinct threads used by at::parallel_for over n items inside the extension."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "rrm_cuda native ops (registered under torch.ops.rrm_cuda)", -1,
                      methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
