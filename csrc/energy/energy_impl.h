// Host-side algorithm of the dense-CRF energy loss, written once against an execution policy
// (common/exec.h, common/cuda_exec.cuh). Included by energy_cpu.cpp (CpuExec, EmulatedCudaExec) and
// energy_cuda.cu (CudaExec).
//
// One lattice per image, shared by all K channels (lattice::build); one splat and d+1 blurs over
// all channels at once (the lattice's SplatChunkFunctor / BlurFunctor). The exact gradient's
// second half, W^T (S s), is one more splat (pre-multiplied by the gate; on CUDA summed in the
// forward splat's pass over the lists and rows) and blur in reverse axis order on the same lattice. Then one slice per
// pixel (EnergySliceFunctor) reads both blurred lattices and writes the pixel's energy term and its whole gradient
// column, fused with the gate, the masked probabilities and the dot product. All of it runs in the forward call so that
// the backward is a product with the saved direction: no lattice is rebuilt and nothing is filtered in the backward.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>  // lattice_impl.h uses at::parallel_for (not pulled in by ATen.h under nvcc)

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "common/host_alloc.h"
#include "common/tuning.h"
#include "energy/energy_common.h"
#include "energy/input_stats_cpu.h"
#include "lattice/lattice_common.h"
#include "lattice/lattice_impl.h"

namespace rrm {
namespace energy {

// Args:
//   probs     (B, K, N) ROI-masked probabilities s
//   gate      (B, N)    S, a constant for the gradient
//   features  (B, d, N) lattice features, already divided by their standard deviations
//   mass      (B, N) or none: adds sum_i S(i) m(i) (W 1)(i) to each image's energy (a constant for
//             the gradient; m = ROI gives the non-negative Potts form when s sums to the ROI)
//   grad_mode kNoGrad, kRlossGrad or kExactGrad
//   chunk     images per lattice-build chunk (workspace granularity)
//   grad_out  (B, K, N) contiguous, or undefined: where grad_dir is written (the CPU's images across
//             threads write their rows of one batch tensor)
// Returns:
//   energy    (B,)  per-image e_b (see energy_common.h); the loss divides their sum by B
//   grad_dir  (B, K, N) d e_b / d s for the chosen mode, or an empty (0,) tensor for kNoGrad
template <class Exec>
std::tuple<at::Tensor, at::Tensor> dense_energy(const Exec& exec, const at::Tensor& probs, const at::Tensor& gate,
                                                const at::Tensor& features, const std::optional<at::Tensor>& mass,
                                                int64_t grad_mode, int64_t chunk,
                                                const at::Tensor& grad_out = at::Tensor()) {
  const int64_t B = probs.size(0), K = probs.size(1), N = probs.size(2);
  // Every entry of grad is written by EnergySliceFunctor (no memset needed).
  auto grad = grad_mode == kNoGrad ? at::empty({0}, probs.options())
              : grad_out.defined() ? grad_out
                                   : empty_large({B, K, N}, probs.options(), kCachedOutputBytes);
  if (B == 0 || K == 0 || N == 0) return {at::zeros({B}, probs.options()), grad};
  const bool has_mass = mass.has_value() && mass->defined();
  const int64_t C = K + (has_mass ? 1 : 0);
  auto p = probs.contiguous();
  auto g = gate.contiguous();
  auto m = has_mass ? mass->contiguous() : at::Tensor();
  constexpr bool kCpu = std::is_same_v<Exec, CpuExec>;
  const bool exact = grad_mode == kExactGrad;
  const bool rows4 = !kCpu && tuning::get(tuning::kEnergyRows4) != 0;
  const int64_t Cs = kCpu ? (C + 7) / 8 * 8 : rows4 ? (C + 3) / 4 * 4 : C;
  const bool pair = exact && !kCpu && tuning::get(tuning::kEnergyPairSplat) != 0;
  const int nbufs = !exact ? 2 : pair ? 4 : 3;
  // A counted lattice (lattice::use_counted: in a CUDA graph capture, or by knob counted_lattice):
  // no host read of the vertex count, so the host never waits for the GPU in the loss and the op
  // can be captured in a CUDA graph; its price is memory, buffers for N (d+1) vertices per image
  // (26-77 times the vertices of energy_bench's images at 160^2). Its rows: bufs and the chunk sums
  // (two when paired).
  const bool counted =
      lattice::use_counted(exec, B, chunk, N, features.size(1), Cs * probs.element_size() * (nbufs + (pair ? 2 : 1)));
  const lattice::Lattice lat = lattice::build(exec, features.contiguous(), chunk, counted);
  const int64_t E = lat.E, M = lat.M;
  const int d = lat.d;
  auto terms = at::empty({B, N}, probs.options());  // every pixel writes its term
  // Lattice rows: padded to a multiple of 8 channels on the CPU, as lattice::filter does (one AVX
  // register), and of 4 on CUDA and its emulation, whose input rows are padded likewise (zeros):
  // float4 rows, so that the splat's chunk sums and the blurs take four channels per thread, the
  // fused mean field's configuration (an H100's blur: 8.5 -> 4.4 us per 512x512x21 launch, session
  // 7). The sums of every channel are those of one channel per thread. (Knob kEnergyRows4: 0 gives
  // unpadded rows, one channel per thread, for A/B timings.) The packed input rows take the same
  // padding (zeros), also on the CPU, whose scatter splat then adds whole AVX registers with no
  // remainder loop (2-core VM, 8 x 21 x 160^2 on 2 threads, alternating builds: the op with the
  // exact gradient 13.5 -> 13.1 ms, with the rloss gradient unchanged; at K = 2 unchanged).
  const int64_t Cin = Cs;  // row stride of the packed input
  // (From the large-output cache on the CPU, like grad: at 513^2 a fresh block faulted in page by
  // page was half the op's page faults, 2-core VM. On CUDA at::empty.)
  auto in = empty_large({B, N, Cin}, probs.options(), kCachedOutputBytes);
  // Lattice buffers: the forward blur ping-pongs between the first two; the exact gradient's
  // reverse blur between the one the forward did not end in and the third, or, when both splats
  // are made in one pass before either blur (CUDA; knob kEnergyPairSplat), between the third and
  // fourth.
  lattice::FilterWorkspace ws;
  at::Tensor bufs[4];
  for (int k = 0; k < nbufs; ++k)
    bufs[k] =
        counted ? lattice::counted_empty<Exec>({B, M, Cs}, probs.options()) : at::empty({B, M, Cs}, probs.options());
  const int64_t grain = std::max<int64_t>(16, 8192 / C);

  AT_DISPATCH_FLOATING_TYPES(probs.scalar_type(), "rrm_dense_energy", [&] {
    const scalar_t* w = lat.entry_weight.data_ptr<scalar_t>();
    const int32_t* ev = lat.entry_vertex.data_ptr<int32_t>();
    const int32_t* nbr = lat.neighbors.data_ptr<int32_t>();
    const int32_t* nv = lat.num_vertices.data_ptr<int32_t>();
    const scalar_t alpha = static_cast<scalar_t>(lattice::slice_alpha(d));
    scalar_t* in_p = in.data_ptr<scalar_t>();
    const scalar_t* gate_p = g.data_ptr<scalar_t>();
    scalar_t* grad_p = grad_mode == kNoGrad ? nullptr : grad.data_ptr<scalar_t>();

    // Blur every channel of buffer `first` (a splat), as lattice::filter does before its slice,
    // ping-ponging with buffer `second`, V channels per thread; returns the index of the buffer that
    // holds the result.
    auto blur = [&](auto vtag, bool reverse, int first, int second) -> int {
      constexpr int V = decltype(vtag)::value;
      scalar_t* out =
          lattice::blur_axes<Exec, scalar_t, V>(exec, B, M, Cs, nbr, nv, d, reverse, bufs[first].data_ptr<scalar_t>(),
                                                bufs[second].data_ptr<scalar_t>(), grain, lat.counted);
      return out == bufs[first].data_ptr<scalar_t>() ? first : second;
    };

    const PackFunctor<scalar_t> pack{p.data_ptr<scalar_t>(), in_p, N, K, C, Cin};
    const int64_t blocks = (N + kSliceBlock - 1) / kSliceBlock;
    if constexpr (kCpu) {
      exec.for_each_item(B, blocks, 1, PackBlocksCpu<scalar_t>{pack}, std::max<int64_t>(1, grain / kSliceBlock));
    } else {
      using Block = PackBlockFunctor<scalar_t>;
      const int64_t smem = Block::smem_bytes(K);
      if (tuning::get(tuning::kEnergyPackBlocks) != 0 && smem <= 48 * 1024)  // no opt-in: K <= 372 floats
        exec.for_each_block(B, (N + Block::P - 1) / Block::P, smem, Block{p.data_ptr<scalar_t>(), in_p, N, K, C, Cin});
      else
        exec.for_each_item(B, N, Cin, pack, grain);
    }
    // The forward W s: the splat of s blurred. The exact gradient's second half, W^T (S s): the
    // splat of S s blurred in reverse order; sliced together with the forward below. The CPU splats
    // by scatter, one splat after the other; CUDA gathers both splats' rows in one pass.
    int fwd = 0, adj = -1;
    const auto one = std::integral_constant<int, 1>{};
    if constexpr (kCpu) {
      lattice::splat_scatter_cpu<scalar_t>(lat, in_p, nullptr, bufs[0].data_ptr<scalar_t>(), Cin, Cs, ws);
      fwd = blur(one, false, 0, 1);
      if (exact) {
        lattice::splat_scatter_cpu<scalar_t>(lat, in_p, gate_p, bufs[1 - fwd].data_ptr<scalar_t>(), Cin, Cs, ws);
        adj = blur(one, true, 1 - fwd, 2);
      }
    } else {
      auto filters = [&](auto vtag) {
        constexpr int V = decltype(vtag)::value;
        auto splat = [&](const scalar_t* pre, int first, const scalar_t* pre2, int second) {
          lattice::splat_gather<Exec, scalar_t, V>(exec, lat, in_p, pre, bufs[first].data_ptr<scalar_t>(), Cs, ws,
                                                   grain, pre2,
                                                   second >= 0 ? bufs[second].data_ptr<scalar_t>() : nullptr);
        };
        if (pair) {
          splat(nullptr, 0, gate_p, 2);
          fwd = blur(vtag, false, 0, 1);
          adj = blur(vtag, true, 2, 3);
          return;
        }
        splat(nullptr, 0, nullptr, -1);
        fwd = blur(vtag, false, 0, 1);
        if (exact) {
          splat(gate_p, 1 - fwd, nullptr, -1);
          adj = blur(vtag, true, 1 - fwd, 2);
        }
      };
      if (rows4)
        filters(std::integral_constant<int, 4>{});
      else
        filters(one);
    }
    const scalar_t grad_scale = grad_mode == kRlossGrad ? scalar_t(-2) : scalar_t(-1);
    // The slice reads four channels of each row at a time where the rows are float4s and d is fixed
    // (knob kEnergySlice4: 0 gives one channel at a time, for A/B timings).
    const bool slice4 = rows4 && tuning::get(tuning::kEnergySlice4) != 0;
    auto slice = [&](auto tiled, auto fixed_d, auto vtag) {
      constexpr bool kTiled = decltype(tiled)::value;
      constexpr int kD = decltype(fixed_d)::value;
      constexpr int kV = decltype(vtag)::value;
      EnergySliceFunctor<scalar_t, kTiled, kD, kV> f{bufs[fwd].data_ptr<scalar_t>(),
                                                     adj >= 0 ? bufs[adj].data_ptr<scalar_t>() : nullptr,
                                                     w,
                                                     ev,
                                                     p.data_ptr<scalar_t>(),
                                                     gate_p,
                                                     has_mass ? m.data_ptr<scalar_t>() : nullptr,
                                                     terms.data_ptr<scalar_t>(),
                                                     grad_p,
                                                     alpha,
                                                     grad_scale,
                                                     N,
                                                     E,
                                                     M,
                                                     C,
                                                     Cs,
                                                     K,
                                                     d};
      // One call per pixel, all channels (see EnergySliceFunctor); the CPU in blocks of pixels,
      // reading the probabilities from the packed copy.
      if constexpr (kTiled) {
        f.packed = in_p;
        f.Cin = Cin;
        exec.for_each_item(B, blocks, 1, SliceBlocksCpu<decltype(f)>{f}, std::max<int64_t>(1, grain / kSliceBlock));
      } else {
        exec.for_each_item(B, N, 1, f, grain);
      }
    };
    // The energy loss's bilateral kernels: d = 2 + image channels (3 greyscale, 5 RGB) fixed.
    lattice::with_fixed_d<3, 5>(d, [&](auto fixed_d) {
      if constexpr (Exec::kChannelsPerThread == 0) {  // the CPU: the corners' sums in registers where d is fixed
        slice(std::true_type{}, fixed_d, one);
      } else if constexpr (decltype(fixed_d)::value == 0) {
        slice(std::false_type{}, fixed_d, one);
      } else if (slice4) {
        slice(std::false_type{}, fixed_d, std::integral_constant<int, 4>{});
      } else {
        slice(std::false_type{}, fixed_d, one);
      }
    });
  });
  // Fixed-order reduction of the per-pixel terms (deterministic on every device). The CPU adds each
  // image's terms in pixel order in double on one thread: the same bits whether the image comes
  // alone or in a batch, on any thread count (ATen's sum splits a long row across threads).
  if constexpr (kCpu) {
    auto energy = at::empty({B}, probs.options());
    AT_DISPATCH_FLOATING_TYPES(probs.scalar_type(), "rrm_dense_energy_sum", [&] {
      const scalar_t* t = terms.data_ptr<scalar_t>();
      scalar_t* e = energy.data_ptr<scalar_t>();
      at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          double acc = 0;
          for (int64_t i = 0; i < N; ++i) acc += static_cast<double>(t[b * N + i]);
          e[b] = static_cast<scalar_t>(acc);
        }
      });
    });
    return {energy, grad};
  }
  return {terms.sum(1), grad};
}

template <class Exec>
at::Tensor dense_energy_input_stats(const Exec& exec, const at::Tensor& images, const at::Tensor& probs,
                                    const at::Tensor& rois, const at::Tensor& labels, double ignore_index,
                                    bool distribution, bool probabilities = true);

// The energy's inputs at its working scale (InputsFunctor): segmentations (B, K, H, W) with any
// strides, rois (B, H, W) or undefined, unlabelled (B, H, W) bool or undefined -> (probs (B, K, h, w),
// gate (B, h, w), or (0,) without the gate), h = H / stride, w = W / stride, their pixels in the
// order of T x T tiles (tile_position; tile = 0: raster); with_stats: also the segmentations' value
// statistics (4,) float64 (-min, max of every value, -min, max of the per-pixel sums over the
// classes; NaN where one is NaN), else (0,).
template <class Exec>
std::tuple<at::Tensor, at::Tensor, at::Tensor> dense_energy_inputs(const Exec& exec, const at::Tensor& seg,
                                                                   const at::Tensor& rois, const at::Tensor& unlabelled,
                                                                   int64_t stride, bool with_gate, int64_t tile,
                                                                   bool with_stats = false) {
  const int64_t B = seg.size(0), K = seg.size(1), H = seg.size(2), W = seg.size(3);
  const int64_t h = H / stride, w = W / stride;
  const int T = tile < w ? static_cast<int>(tile) : 0;  // tiles as wide as the image: the raster order
  auto probs = empty_large({B, K, h, w}, seg.options(), kCachedOutputBytes);
  auto gate = with_gate ? at::empty({B, h, w}, seg.options()) : at::empty({0}, seg.options());
  const auto dopt = seg.options().dtype(at::kDouble);
  // The statistics by the one-pass statistics op (no images, ROIs or labels) where the downscaling
  // does not read every value itself
  auto separate_stats = [&] {
    return with_stats
               ? dense_energy_input_stats(exec, seg.new_empty({B, 0, H, W}), seg, at::Tensor(), at::Tensor(), 0.0, true)
                     .narrow(0, kProbNegMin, 4)
                     .clone()
               : at::empty({0}, dopt);
  };
  if (B * K * h * w == 0) return {probs, gate, separate_stats()};  // (K >= 1 with the gate: checked)
  const at::Tensor r = rois.defined() ? rois.contiguous() : at::Tensor();
  const at::Tensor u = unlabelled.defined() ? unlabelled.contiguous() : at::Tensor();
  at::Tensor stats;
  AT_DISPATCH_FLOATING_TYPES(seg.scalar_type(), "rrm_dense_energy_inputs", [&] {
    constexpr bool kRow = Exec::kChannelsPerThread == 0;  // whole rows on the CPU
    InputsFunctor<scalar_t, kRow> f{seg.data_ptr<scalar_t>(),
                                    r.defined() ? r.data_ptr<scalar_t>() : nullptr,
                                    u.defined() ? u.data_ptr<bool>() : nullptr,
                                    probs.data_ptr<scalar_t>(),
                                    with_gate ? gate.data_ptr<scalar_t>() : nullptr,
                                    seg.stride(0),
                                    seg.stride(1),
                                    seg.stride(2),
                                    seg.stride(3),
                                    K,
                                    H,
                                    W,
                                    h,
                                    w,
                                    static_cast<int>(stride),
                                    T};
    if (kRow && T == 0 && seg.stride(3) == 1) {  // (image, block of output rows)
      f.rows = 16;
      f.blocks = (h + f.rows - 1) / f.rows;
      // with stats: each block's statistics of the input rows it reads (rows [0, stride h), every
      // column)
      at::Tensor part = with_stats ? at::empty({B * f.blocks, 4}, dopt) : at::Tensor();
      if (with_stats) f.stats = part.data_ptr<double>();
      exec.for_each_item(B, f.blocks, w, f, 1);
      if (with_stats) {
        stats = part.amax(0);  // NaN propagates as through nan_max
        if (H > stride * h) {  // odd H at stride 2: the last row, which the downscaling does not read
          auto rest =
              dense_energy_input_stats(exec, seg.new_empty({B, 0, H - stride * h, W}),
                                       seg.narrow(2, stride * h, H - stride * h), at::Tensor(), at::Tensor(), 0.0, true)
                  .narrow(0, kProbNegMin, 4);
          stats = at::stack({stats, rest}).amax(0);
        }
      }
      return;
    }
    exec.for_each_item(B, h, w, f, 1);  // (image, output row), columns as the item's channels
  });
  if (!stats.defined()) stats = separate_stats();
  return {probs, gate, stats};
}

// Backward of dense_energy_inputs' probs: grad (B, K, h, w) -> (B, K, height, width).
template <class Exec>
at::Tensor dense_energy_inputs_backward(const Exec& exec, const at::Tensor& grad, const at::Tensor& rois,
                                        int64_t height, int64_t width, int64_t stride, int64_t tile,
                                        const at::Tensor& scale = at::Tensor()) {
  const int64_t B = grad.size(0), K = grad.size(1), h = grad.size(2), w = grad.size(3);
  const int T = tile < w ? static_cast<int>(tile) : 0;  // as the forward's
  const int cols = Exec::kChannelsPerThread == 0 ? 1 : 2;
  auto out = empty_large({B, K, height, width}, grad.options());
  if (out.numel() == 0) return out;
  const at::Tensor g = grad.contiguous();
  const at::Tensor r = rois.defined() ? rois.contiguous() : at::Tensor();
  const at::Tensor sc = scale.defined() ? scale.reshape({1}).contiguous() : at::Tensor();
  const bool blocks = cols == 2 && tuning::get(tuning::kEnergyBwdBlocks) != 0;
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "rrm_dense_energy_inputs_backward", [&] {
    const scalar_t* s = sc.defined() ? sc.data_ptr<scalar_t>() : nullptr;
    if (blocks) {  // (image, gradient row), gradient columns: each a stride x stride block of every class
      const InputsBackwardBlockFunctor<scalar_t> f{g.data_ptr<scalar_t>(),
                                                   r.defined() ? r.data_ptr<scalar_t>() : nullptr,
                                                   out.data_ptr<scalar_t>(),
                                                   K,
                                                   height,
                                                   width,
                                                   h,
                                                   w,
                                                   static_cast<int>(stride),
                                                   T,
                                                   s};
      exec.for_each_item(B, (height + stride - 1) / stride, (width + stride - 1) / stride, f, 4);
      return;
    }
    InputsBackwardFunctor<scalar_t> f{g.data_ptr<scalar_t>(),
                                      r.defined() ? r.data_ptr<scalar_t>() : nullptr,
                                      out.data_ptr<scalar_t>(),
                                      K,
                                      height,
                                      width,
                                      h,
                                      w,
                                      static_cast<int>(stride),
                                      T,
                                      cols,
                                      s};
    // (image and class, input row), columns (CUDA and its emulation: column pairs)
    exec.for_each_item(B * K, height, (width + cols - 1) / cols, f, 4);
  });
  return out;
}

inline Elem elem_of(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kByte:
      return Elem::kU8;
    case at::kChar:
      return Elem::kI8;
    case at::kShort:
      return Elem::kI16;
    case at::kInt:
      return Elem::kI32;
    case at::kLong:
      return Elem::kI64;
    case at::kHalf:
      return Elem::kF16;
    case at::kBFloat16:
      return Elem::kBF16;
    case at::kFloat:
      return Elem::kF32;
    case at::kDouble:
      return Elem::kF64;
    case at::kBool:
      return Elem::kBool;
    default:
      TORCH_CHECK_TYPE(false, what, ": unsupported dtype ", t.scalar_type());
  }
  return Elem::kF64;
}

// A (B, C, H, W) or (B, H, W) tensor as a StridedView (absent: p = nullptr).
inline StridedView strided_view(const at::Tensor& t, const char* what) {
  if (!t.defined()) return StridedView{nullptr, Elem::kF64, 0, 0, 0, 0};
  if (t.dim() == 3) return StridedView{t.data_ptr(), elem_of(t, what), t.stride(0), 0, t.stride(1), t.stride(2)};
  return StridedView{t.data_ptr(), elem_of(t, what), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// The bilateral features of the loss's sampled pixels (FeaturesFunctor): images (B, c, H, W), any
// dtype and strides -> (B, 2 + c, h w) of dtype.
template <class Exec>
at::Tensor bilateral_features_2d(const Exec& exec, const at::Tensor& images, int64_t stride, int64_t h, int64_t w,
                                 double sxy, double srgb, at::ScalarType dtype) {
  const int64_t B = images.size(0), c = images.size(1);
  auto out = empty_large({B, 2 + c, h * w}, images.options().dtype(dtype), kCachedOutputBytes);
  if (out.numel() == 0) return out;
  const StridedView img = strided_view(images, "images");
  AT_DISPATCH_FLOATING_TYPES(dtype, "rrm_bilateral_features_2d", [&] {
    FeaturesFunctor<scalar_t> f{img,
                                out.data_ptr<scalar_t>(),
                                c,
                                h,
                                w,
                                static_cast<int>(stride),
                                static_cast<scalar_t>(sxy),
                                static_cast<scalar_t>(srgb)};
    exec.for_each_item(B, h, w, f, 64);  // (image, output row), columns
  });
  return out;
}

// The value checks' statistics of the loss's inputs in one pass (InputStatsFunctor), reduced on the
// device: (kNumStats,) float64 maxima. images (B, c, H, W), probs (B, K, H, W), rois and labels
// (B, H, W) or undefined, any dtypes and strides.
template <class Exec>
at::Tensor dense_energy_input_stats(const Exec& exec, const at::Tensor& images, const at::Tensor& probs,
                                    const at::Tensor& rois, const at::Tensor& labels, double ignore_index,
                                    bool distribution, bool probabilities) {
  const int64_t B = probs.size(0), K = probs.size(1), H = probs.size(2), W = probs.size(3);
  const int64_t P = B * H * W;
  constexpr bool kChunked = Exec::kChannelsPerThread == 0;  // the CPU: contiguous pixel ranges
  // Threads: CUDA ~ one per resident thread slot of an H100 (132 SMs x 2048): a few pixels each, so
  // that enough loads are in flight; the partials (T x 8 doubles, 17 MB) reduce in one amax.
  const int64_t want = Exec::kIsCuda ? 262144 : (kChunked ? 4 * at::get_num_threads() : 256);
  if (P == 0) {  // nothing to see: the initial values (-inf maxima, clear flags)
    auto none = at::full({kNumStats}, -std::numeric_limits<double>::infinity(), probs.options().dtype(at::kDouble));
    none.narrow(0, kRoiBad, 2).zero_();
    return none;
  }
  const StridedView img = strided_view(images, "images"), roi = strided_view(rois, "rois"),
                    lab = strided_view(labels, "labels");
  // The CPU: blocks of rows (input_stats_cpu.h) where the probabilities' rows have unit column steps
  // or are not read; otherwise (and CUDA, the emulation) the functor, a pixel at a time.
  if constexpr (std::is_same_v<Exec, CpuExec>) {
    if (probs.stride(3) == 1 || !probabilities)
      return input_stats_cpu_rows(images, probs, img, roi, lab, ignore_index, distribution, probabilities);
  }
  const int64_t T = std::min(P, want);
  auto partial = at::empty({T, kNumStats}, probs.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, probs.scalar_type(), "rrm_energy_input_stats", [&] {
    InputStatsFunctor<scalar_t, kChunked> f{img,
                                            roi,
                                            lab,
                                            probs.data_ptr<scalar_t>(),
                                            probs.stride(0),
                                            probs.stride(1),
                                            probs.stride(2),
                                            probs.stride(3),
                                            images.size(1),
                                            K,
                                            H,
                                            W,
                                            P,
                                            T,
                                            ignore_index,
                                            distribution,
                                            partial.data_ptr<double>(),
                                            probabilities};
    exec.for_each(T, f, 1);
  });
  return partial.amax(0);
}

}  // namespace energy
}  // namespace rrm
