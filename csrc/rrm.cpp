// rrm_cuda: every op schema in one place (the Python module entry point is python_module.cpp).
//
// Shapes use B batch, C channels, N pixels (any spatial layout, flattened), d feature dimension,
// L labels, T pairwise terms. Kernels live in csrc/<op>/<op>_{cpu.cpp,cuda.cu}; Python wrappers,
// fake kernels and autograd in rrm_cuda/_ops/<op>.py.
#include <torch/library.h>
#include <torch/version.h>

#include <vector>

namespace {

// Ops that read a value back to the host mid-call on CUDA (a lattice's vertex count; the BCD ops'
// label check) cannot be captured in a CUDA graph: the tag makes torch.compile(mode="reduce-overhead")
// leave them out of its graphs (skip or partition) instead of failing the capture. dense_energy,
// permutohedral_filter and dense_crf build counted lattices inside a capture (no read), but keep the
// tag until a GPU run has verified their capture (benchmarks/NOTES.md section 14). The others (the
// energy loss's inputs and statistics ops, the fused BCD loss) are capturable.
// (A const lvalue: an rvalue vector would select def(name, function) instead of def(schema, tags).)
const std::vector<at::Tag>& host_sync() {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
  static const std::vector<at::Tag> tags{at::Tag::cudagraph_unsafe};
#else
  static const std::vector<at::Tag> tags;
#endif
  return tags;
}

}  // namespace

TORCH_LIBRARY(rrm_cuda, m) {
  // ---- permutohedral lattice (csrc/lattice) ----
  // values (B, C, N), features (B, d, N) already divided by their standard deviations ->
  // (B, C, N): out_i = alpha * sum_p w_ip (B_d..B_0 splat(values))_p ~ sum_j exp(-|f_i - f_j|^2 / 2) v_j.
  // reverse=True blurs the axes in reverse order: the exact adjoint (transpose) of reverse=False.
  // cache=True: features is a constant tensor (never changed in place outside autograd's view); its
  // lattice is kept for later calls with the same tensor (csrc/lattice/lattice_cache.h).
  m.def("permutohedral_filter(Tensor values, Tensor features, bool reverse=False, bool cache=False) -> Tensor",
        host_sync());
  // CPU only, for tests: the CUDA launch decomposition emulated serially in reverse thread order.
  m.def(
      "_permutohedral_filter_emulated(Tensor values, Tensor features, bool reverse=False, bool cache=False) -> "
      "Tensor");
  // permutohedral_filter's backward when the features need a gradient: values (B, C, N), features
  // (B, d, N), grad (B, C, N) the output's gradient -> (the values' gradient (B, C, N), the features'
  // (B, d, N)) from one lattice. The features' is exact almost everywhere: the lattice is piecewise
  // constant in them, the barycentric weights linear (csrc/lattice/lattice_common.h,
  // FeatureGradFunctor). Not differentiable itself.
  m.def(
      "_permutohedral_filter_backward(Tensor values, Tensor features, Tensor grad, bool reverse=False, "
      "bool cache=False) -> (Tensor, Tensor)",
      host_sync());
  m.def(
      "_permutohedral_filter_backward_emulated(Tensor values, Tensor features, Tensor grad, bool reverse=False, "
      "bool cache=False) -> (Tensor, Tensor)");
  // (B, d, N) -> (B,) int64: lattice points per image (occupancy diagnostics, memory planning).
  m.def("lattice_num_vertices(Tensor features) -> Tensor", host_sync());
  // For tests: the lattices' tables, (B, N, d+1) int32 entry vertices and (B, N, d+1) weights, (B, d+1, M, 2)
  // int32 neighbours (-1: none; M the largest vertex count); emulated (CPU): the CUDA build's passes emulated.
  m.def("_lattice_tables(Tensor features, bool emulated=False) -> (Tensor, Tensor, Tensor)", host_sync());
  // Mean-field inference with densecrf's semantics. unary (B, L, N) energies; features T x (B_t, d_t, N)
  // with B_t dividing B (image b uses features[t][b % B_t]: lattices shared by several unaries);
  // compat (T, L, L) in the energy convention (Potts w -> -w I); diagonal: T flags (compat[t] is
  // diagonal); normalization: per term 0 symmetric, 1 after, 2 before, 3 none -> Q (B, L, N).
  // cache: empty, or per term True when features[t] is a constant tensor (never changed in place
  // outside autograd's view): its lattice and normaliser are then kept for later calls with the same
  // tensor (csrc/lattice/lattice_cache.h; the Gaussian term's cached position features).
  m.def(
      "dense_crf(Tensor unary, Tensor[] features, Tensor compat, bool[] diagonal, int[] normalization, "
      "int iterations, bool[] cache=[]) -> Tensor",
      host_sync());
  m.def(
      "_dense_crf_emulated(Tensor unary, Tensor[] features, Tensor compat, bool[] diagonal, int[] normalization, "
      "int iterations, bool[] cache=[]) -> Tensor");
  // Backward of dense_crf (backpropagation through the mean-field iterations): grad (B, L, N) = dL/dQ
  // and dense_crf's arguments -> (grad_unary (B, L, N), grad_compat (T, L, L)); features get no
  // gradient. Rebuilds the lattices and reruns the forward, keeping (iterations + 1) B N L values.
  // compat_grad=False skips grad_compat (zeros), and with it one filter per term and iteration.
  m.def(
      "dense_crf_backward(Tensor grad, Tensor unary, Tensor[] features, Tensor compat, bool[] diagonal, "
      "int[] normalization, int iterations, bool compat_grad=True, bool[] cache=[]) -> "
      "(Tensor grad_unary, Tensor grad_compat)",
      host_sync());
  m.def(
      "_dense_crf_backward_emulated(Tensor grad, Tensor unary, Tensor[] features, Tensor compat, bool[] diagonal, "
      "int[] normalization, int iterations, bool compat_grad=True, bool[] cache=[]) -> "
      "(Tensor grad_unary, Tensor grad_compat)");

  // ---- BCD loss (csrc/bcd) ----
  // SPEC section 4. features (B, C, N) float32/float64/float16/bfloat16, any strides; labels (B, N)
  // integer, each in [0, K) or == ignore_index (ignore_index must not be in [0, K)). Reductions come
  // back in the compute dtype (float64 for float64 features, float32 otherwise).
  // -> sums (B, K, C) = per-(image, class) feature sums, counts (B, K) = pixels per (image, class).
  m.def(
      "masked_feature_sums(Tensor features, Tensor labels, int num_classes, int ignore_index=-1) -> "
      "(Tensor, Tensor)",
      host_sync());
  m.def(
      "_masked_feature_sums_emulated(Tensor features, Tensor labels, int num_classes, int ignore_index=-1) -> "
      "(Tensor, Tensor)");
  // values (B, K, C), labels (B, N) -> (B, C, N): out[b, :, n] = values[b, labels[b, n], :], 0 where
  // ignored. The adjoint of masked_feature_sums (its backward).
  m.def("masked_feature_gather(Tensor values, Tensor labels, int ignore_index=-1) -> Tensor", host_sync());
  m.def("_masked_feature_gather_emulated(Tensor values, Tensor labels, int ignore_index=-1) -> Tensor");
  // centers (B, K, C) of the compute dtype -> (cos_sums (B, K), dot (B, N), norm (B, N)):
  // cos_sums[b, k] = sum_{n: labels = k} cos(F[b, :, n], centers[b, k]), cos(a, b) = a.b / (|a||b| + 1e-7);
  // dot and norm are the per-pixel F.c and |F| (0 where ignored), kept for the backward.
  m.def(
      "feature_center_cosine(Tensor features, Tensor labels, Tensor centers, int ignore_index=-1) -> "
      "(Tensor, Tensor, Tensor)",
      host_sync());
  m.def(
      "_feature_center_cosine_emulated(Tensor features, Tensor labels, Tensor centers, int ignore_index=-1) -> "
      "(Tensor, Tensor, Tensor)");
  // grad (B, K) of cos_sums, plus the forward's inputs and its dot/norm -> (grad_features (B, C, N) in
  // features' dtype, grad_centers (B, K, C)).
  m.def(
      "feature_center_cosine_backward(Tensor grad, Tensor features, Tensor labels, Tensor centers, Tensor dot, "
      "Tensor norm, int ignore_index=-1) -> (Tensor, Tensor)",
      host_sync());
  m.def(
      "_feature_center_cosine_backward_emulated(Tensor grad, Tensor features, Tensor labels, Tensor centers, "
      "Tensor dot, Tensor norm, int ignore_index=-1) -> (Tensor, Tensor)");
  // The whole loss in one op, on segments made once: seg_logits (B, K, N), features (B, C, N) ->
  // (loss () of the compute dtype, labels (B, N) int64 = argmax_k seg_logits, centers (B, K, C) (column 0
  // each image's background centre, columns >= 1 the batch's foreground centres), dot (B, N), norm (B, N),
  // cos_sums (B, K), counts (B, K), finite (2,) bool = [seg_logits finite, class sums finite]).
  m.def(
      "bcd_loss(Tensor seg_logits, Tensor features) -> (Tensor loss, Tensor labels, Tensor centers, Tensor dot, "
      "Tensor norm, Tensor cos_sums, Tensor counts, Tensor finite)");
  m.def(
      "_bcd_loss_emulated(Tensor seg_logits, Tensor features) -> (Tensor loss, Tensor labels, Tensor centers, "
      "Tensor dot, Tensor norm, Tensor cos_sums, Tensor counts, Tensor finite)");
  // grad () of the loss, features and bcd_loss's saved outputs -> grad_features (B, C, N) in features' dtype.
  m.def(
      "bcd_loss_backward(Tensor grad, Tensor features, Tensor labels, Tensor centers, Tensor dot, Tensor norm, "
      "Tensor cos_sums, Tensor counts) -> Tensor");
  m.def(
      "_bcd_loss_backward_emulated(Tensor grad, Tensor features, Tensor labels, Tensor centers, Tensor dot, "
      "Tensor norm, Tensor cos_sums, Tensor counts) -> Tensor");

  // ---- dense energy loss (csrc/energy) ----
  // Dense-CRF energy of RRM / rloss (SPEC §3) on already-downscaled tensors.
  // probs (B, K, N) ROI-masked probabilities s; gate (B, N) S; features (B, d, N) divided by their
  // sigmas; mass (B, N) or None: adds sum_i S m (W 1) (the non-negative form's constant).
  // grad_mode: 0 none, 1 rloss (-2 S W s), 2 exact (-(S W s + W^T (S s)), the gate held constant).
  // -> (energy (B,) per image: -sum_{k,i} S s_k W s_k [+ const], grad_dir (B, K, N) = d energy_b / d s,
  //     or (0,) for grad_mode 0). The loss is weight * energy.sum() / B.
  m.def(
      "dense_energy(Tensor probs, Tensor gate, Tensor features, Tensor? mass=None, int grad_mode=0) -> "
      "(Tensor, Tensor)",
      host_sync());
  // CPU only, for tests: the CUDA launch decomposition emulated serially in reverse thread order.
  m.def(
      "_dense_energy_emulated(Tensor probs, Tensor gate, Tensor features, Tensor? mass=None, int grad_mode=0) -> "
      "(Tensor, Tensor)");
  // The loss itself: factor * dense_energy(...)[0].sum(), 0-dim (dense_energy_loss: factor = weight / B), with
  // one autograd node whose backward is grad_dir * (grad * factor): the same values as the sum, the
  // product and dense_energy's own backward, without their two autograd nodes and Python ops per call.
  m.def(
      "dense_energy_sum(Tensor probs, Tensor gate, Tensor features, Tensor? mass=None, int grad_mode=0, "
      "float factor=1.0) -> Tensor",
      host_sync());
  m.def(
      "_dense_energy_sum_emulated(Tensor probs, Tensor gate, Tensor features, Tensor? mass=None, int grad_mode=0, "
      "float factor=1.0) -> Tensor");
  // The energy's inputs at its working scale, in one pass over the full-resolution ones (the loss's
  // F.interpolate calls, ROI product and gate fused). segmentations (B, K, H, W) float32/float64, any
  // strides; rois (B, H, W) of its dtype or None; unlabelled (B, H, W) bool (seg_label == ignore_index) or
  // None; stride 2: scale_factor 0.5 with F.interpolate's arithmetic (probabilities bilinear,
  // align_corners=False: each 2x2 block's mean; ROI and labels nearest: the block's first pixel),
  // stride 1: no downscaling. -> (probs (B, K, H/stride, W/stride) = downscaled segmentations * ROI,
  // gate (B, H/stride, W/stride) = 1 where unlabelled, else max(0, roi - max_k p_k); (0,) for gate=False).
  // tile > 0: both outputs' pixels in the order of tile x tile tiles (rrm_cuda.functional._PIXEL_TILE:
  // row-major inside each tile and across the tiles, partial edge tiles included), as the lattice op
  // takes its points on a GPU; tile 0 (or >= W/stride): the raster order. stats: a third output, the
  // segmentations' value statistics (4,) float64 [-min, max of every value, -min, max of the per-pixel
  // sums over K (on the CPU's raster-order paths in the segmentations' dtype, elsewhere in double)],
  // NaN where a value is NaN, as dense_energy_input_stats' entries 2-5 (the loss's value checks on the
  // CPU: read while the downscaling reads the values, one pass instead of two); (0,) without.
  m.def(
      "dense_energy_inputs(Tensor segmentations, Tensor? rois, Tensor? unlabelled, int stride, bool gate, "
      "int tile=0, bool stats=False) -> (Tensor, Tensor, Tensor)");
  m.def(
      "_dense_energy_inputs_emulated(Tensor segmentations, Tensor? rois, Tensor? unlabelled, int stride, bool gate, "
      "int tile=0, bool stats=False) -> (Tensor, Tensor, Tensor)");
  // The value checks of dense_energy_loss in one pass over its inputs: images (B, c, H, W),
  // segmentations (B, K, H, W) floating, rois and labels (B, H, W) or None, any dtypes and strides ->
  // (8,) float64 [-min, max of the images, -min, max of the probabilities, -min, max of their sums over
  // K (with distribution; else -inf), 1 if a ROI value is neither 0 nor 1, 1 if a label is neither
  // ignore_index nor an integer in [0, K)]; NaN propagates into the ranges. dense_energy_loss uses it
  // (one kernel for about ten ATen reductions on a GPU; row blocks in AVX2 registers on the CPU, where
  // the fused path takes the probabilities' entries from dense_energy_inputs' stats instead).
  // probabilities=False: entries 2-5 are left at -inf and the segmentations are not read (their class
  // count K still bounds the labels).
  m.def(
      "dense_energy_input_stats(Tensor images, Tensor segmentations, Tensor? rois, Tensor? labels, "
      "float ignore_index, bool distribution, bool probabilities=True) -> Tensor");
  m.def(
      "_dense_energy_input_stats_emulated(Tensor images, Tensor segmentations, Tensor? rois, Tensor? labels, "
      "float ignore_index, bool distribution, bool probabilities=True) -> Tensor");
  // Bilateral features of 2-D images in one pass (dense_crf's bilateral term with stride 1; the energy
  // loss's pixels at its working scale with stride 2): images (B, c, H, W), any real dtype and strides
  // -> (B, 2 + c, height * width) of dtype (float32/float64): x / sxy, y / sxy, then the colours of
  // pixel (stride y, stride x) / srgb (rrm_cuda.bilateral_features of
  // images[:, :, ::stride, ::stride][:, :, :height, :width], bitwise). No autograd (features are constants).
  m.def(
      "bilateral_features_2d(Tensor images, int stride, int height, int width, float sxy, float srgb, "
      "ScalarType dtype) -> Tensor");
  m.def(
      "_bilateral_features_2d_emulated(Tensor images, int stride, int height, int width, float sxy, float srgb, "
      "ScalarType dtype) -> Tensor");
  // Backward of dense_energy_inputs' probs: grad (B, K, H/stride, W/stride), in the forward's pixel order
  // (tile), -> (B, K, height, width). scale (one element) or None: the gradient of grad * scale (each
  // element multiplied first, as at::mul would: the loss's factor, dense_energy_loss_fused).
  m.def(
      "dense_energy_inputs_backward(Tensor grad, Tensor? rois, int height, int width, int stride, int tile=0, "
      "Tensor? scale=None) -> Tensor");
  m.def(
      "_dense_energy_inputs_backward_emulated(Tensor grad, Tensor? rois, int height, int width, int stride, "
      "int tile=0, Tensor? scale=None) -> Tensor");
  // The loss at the fused scales in one op and one autograd node: dense_energy_inputs (raster order),
  // then dense_energy_sum on its outputs: segmentations (B, K, H, W), rois, unlabelled, stride and gate
  // as dense_energy_inputs; features (B, d, N), mass (B, N) or None, grad_mode and factor as
  // dense_energy_sum, N = (H / stride) (W / stride). -> 0-dim loss. Its backward is
  // dense_energy_inputs_backward of grad_dir with the scale grad * factor: one pass, the same values
  // as the two ops' backwards.
  m.def(
      "dense_energy_loss_fused(Tensor segmentations, Tensor? rois, Tensor? unlabelled, int stride, bool gate, "
      "Tensor features, Tensor? mass=None, int grad_mode=0, float factor=1.0) -> Tensor",
      host_sync());
  m.def(
      "_dense_energy_loss_fused_emulated(Tensor segmentations, Tensor? rois, Tensor? unlabelled, int stride, "
      "bool gate, Tensor features, Tensor? mass=None, int grad_mode=0, float factor=1.0) -> Tensor");
}
