// rrm_cuda: every op schema in one place (the Python module entry point is python_module.cpp).
//
// Shapes use B batch, C channels, N pixels (any spatial layout, flattened), d feature dimension,
// L labels, T pairwise terms. Kernels live in csrc/<op>/<op>_{cpu.cpp,cuda.cu}; Python wrappers,
// fake kernels and autograd in rrm_cuda/_ops/<op>.py.
#include <torch/library.h>

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
}
