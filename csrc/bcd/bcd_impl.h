// Host-side algorithms of the BCD-loss reductions, written once against an execution policy
// (common/exec.h, common/cuda_exec.cuh). Included by bcd_cpu.cpp (CpuExec, EmulatedCudaExec) and
// bcd_cuda.cu (CudaExec). Passes over the features: sums 1 read; gather (their backward) 1 write;
// cosine 1 read; cosine backward 2 reads + 1 write (the per-pixel dots and norms of the forward are
// reused, not recomputed).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "bcd/bcd.h"
#include "bcd/bcd_common.h"
#include "common/exec.h"

namespace rrm {
namespace bcd {

// Pixels per thread of the per-pixel statistics: a block of rows on the CPU, one pixel on the GPU.
template <class Exec>
constexpr int pixels_per_thread() {
  return Exec::kChannelsPerThread == 0 ? 32 : 1;
}

// Pixels of one (b, c) row per thread of the elementwise passes (gather, grad_F): the whole row on
// the CPU, one pixel on the GPU. Returns (per, number of threads).
template <class Exec>
std::pair<int64_t, int64_t> row_runs(int64_t B, int64_t C, int64_t N) {
  const int64_t per = Exec::kChannelsPerThread == 0 ? std::max<int64_t>(N, 1) : 1;
  return {per, B * C * ((N + per - 1) / per)};
}

// Class keys and per-(image, class) segments of the labels.
//   key      (B, N) int32: label, or K for a pixel whose label is ignore_index
//   perm     (B, N) int32: pixels sorted by key, stable (increasing pixel order inside a segment)
//   offsets  (B, K + 2) int64: segment (b, k) is perm[b, offsets[b, k] : offsets[b, k + 1]]
//   GPU path (Exec::kSortCsr) only: the chunk tables (bcd_common.h, "GPU segment machinery")
//   chunk_begin, chunk_end (B, cap) int32, chunk_offsets (B, K + 1) int32
struct Segments {
  at::Tensor key, perm, offsets;
  at::Tensor chunk_begin, chunk_end, chunk_offsets;
  int64_t cap = 0;
  ChunkView view() const {
    return ChunkView{chunk_begin.data_ptr<int32_t>(), chunk_end.data_ptr<int32_t>(), chunk_offsets.data_ptr<int32_t>(),
                     cap};
  }
};

// Validates the label values (one host synchronisation) and returns the class keys (B, N) int32.
inline at::Tensor make_keys(const at::Tensor& labels, int64_t K, int64_t ignore_index) {
  auto l = labels.to(at::kLong);
  if (labels.numel() > 0) {
    auto ok = at::logical_or(at::logical_and(l.ge(0), l.lt(K)), l.eq(ignore_index));
    if (!ok.all().item<bool>()) {
      auto bad = l.masked_select(ok.logical_not());
      // (ignore_index = INT64_MIN: none was given; the Python wrappers pass that for None)
      const std::string or_ignored = ignore_index == std::numeric_limits<int64_t>::min()
                                         ? std::string()
                                         : " or equal ignore_index (" + std::to_string(ignore_index) + ")";
      TORCH_CHECK_VALUE(false, "labels must lie in [0, num_classes = ", K, ")", or_ignored, "; got values from ",
                        bad.min().item<int64_t>(), " to ", bad.max().item<int64_t>());
    }
  }
  return at::where(l.eq(ignore_index), at::scalar_tensor(K, l.options()), l).to(at::kInt).contiguous();
}

// CPU path: make_keys in one serial loop (no temporaries; at RRM's sizes make_keys' dozen tensor ops
// cost more than the passes over the features). Bad labels fall back to make_keys, which names them.
inline at::Tensor make_keys_cpu(const at::Tensor& labels, int64_t K, int64_t ignore_index) {
  const int64_t B = labels.size(0), N = labels.size(1);
  auto key = at::empty({B, N}, labels.options().dtype(at::kInt));
  const auto st = labels.scalar_type();
  const bool native = st == at::kByte || st == at::kChar || st == at::kShort || st == at::kInt || st == at::kLong;
  const at::Tensor l = native ? labels : labels.to(at::kLong);
  bool bad = false;
  AT_DISPATCH_INTEGRAL_TYPES(l.scalar_type(), "rrm_bcd_keys_cpu", [&] {
    const scalar_t* lp = l.data_ptr<scalar_t>();
    int32_t* kp = key.data_ptr<int32_t>();
    const int64_t s0 = l.stride(0), s1 = l.stride(1);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t n = 0; n < N; ++n) {
        const int64_t v = static_cast<int64_t>(lp[b * s0 + n * s1]);
        const bool ok = v >= 0 && v < K;
        bad = bad || (!ok && v != ignore_index);
        kp[b * N + n] = ok ? static_cast<int32_t>(v) : static_cast<int32_t>(K);
      }
    }
  });
  if (bad) make_keys(labels, K, ignore_index);  // throws, naming the bad values
  return key;
}

// GPU path: the class keys (B, N) int32 and, when skey is not null, the flat sort keys
// key + b (K + 1) (int32 when they fit, int64 otherwise) in one pass (KeysFunctor). Bad labels are
// flagged on the device; the flag costs one host synchronisation per call (the only one of the op),
// and only when it is set is the slower check that names the bad values run.
// checked = false skips that synchronisation for labels known to be valid (an argmax over K classes):
// a bad label then only becomes "ignored".
template <class Exec>
at::Tensor make_keys_flat(const Exec& exec, const at::Tensor& labels, int64_t K, int64_t ignore_index, at::Tensor* skey,
                          bool checked = true) {
  const int64_t B = labels.size(0), N = labels.size(1);
  auto key = at::empty({B, N}, labels.options().dtype(at::kInt));
  const bool wide = B * (K + 1) >= (int64_t{1} << 31);
  if (skey) *skey = at::empty({B * N}, labels.options().dtype(wide ? at::kLong : at::kInt));
  if (B * N == 0) return key;
  const auto st = labels.scalar_type();
  const bool native = st == at::kByte || st == at::kChar || st == at::kShort || st == at::kInt || st == at::kLong;
  const at::Tensor l = native ? labels : labels.to(at::kLong);
  auto bad = at::zeros({1}, labels.options().dtype(at::kInt));
  AT_DISPATCH_INTEGRAL_TYPES(l.scalar_type(), "rrm_bcd_keys", [&] {
    using label_t = scalar_t;
    auto run = [&](auto* sk) {
      using skey_t = std::remove_pointer_t<decltype(sk)>;
      exec.for_each(
          B * N,
          KeysFunctor<label_t, skey_t>{l.data_ptr<label_t>(), l.stride(0), l.stride(1), key.data_ptr<int32_t>(), sk,
                                       bad.data_ptr<int32_t>(), N, K, ignore_index},
          4096);
    };
    if (skey == nullptr) {
      run(static_cast<int32_t*>(nullptr));
    } else if (wide) {
      run(skey->data_ptr<int64_t>());
    } else {
      run(skey->data_ptr<int32_t>());
    }
  });
  if (checked && bad.item<int32_t>() != 0) make_keys(labels, K, ignore_index);  // throws, naming the bad values
  return key;
}

// Builds the segments of the labels. On the CPU (kSortCsr false) a serial counting sort per image,
// parallel over images; on the GPU and its emulation a stable sort of (image, key) pairs -- both
// give the same, increasing, pixel order inside each segment.
template <class Exec>
Segments make_segments(const Exec&, const at::Tensor& labels, int64_t K, int64_t ignore_index, bool checked = true) {
  const int64_t B = labels.size(0), N = labels.size(1);
  const auto lopt = labels.options().dtype(at::kLong);
  Segments s;
  if (!Exec::kSortCsr) {
    s.key = make_keys_cpu(labels, K, ignore_index);
    s.perm = at::empty({B, N}, s.key.options());
    s.offsets = at::zeros({B, K + 2}, lopt);
    const int32_t* key = s.key.data_ptr<int32_t>();
    int32_t* perm = s.perm.data_ptr<int32_t>();
    int64_t* off = s.offsets.data_ptr<int64_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<int64_t> cursor;
      for (int64_t b = b0; b < b1; ++b) {
        int64_t* o = off + b * (K + 2);
        const int32_t* kb = key + b * N;
        for (int64_t n = 0; n < N; ++n) o[kb[n] + 1]++;
        for (int64_t k = 0; k <= K; ++k) o[k + 1] += o[k];
        cursor.assign(o, o + K + 1);
        int32_t* pb = perm + b * N;
        for (int64_t n = 0; n < N; ++n) pb[cursor[kb[n]]++] = static_cast<int32_t>(n);
      }
    });
  } else {
    // One pass for the keys, a stable sort of the flat (image, class) keys (so each segment lists its
    // pixels in increasing order), one pass for the pixel order and the bounds, then the chunk tables.
    // No bincount (whose CUDA version synchronises to size its output) and no host synchronisation
    // but the label check's.
    at::Tensor skey;
    s.key = make_keys_flat(Exec{}, labels, K, ignore_index, &skey, checked);
    s.perm = at::empty({B, N}, s.key.options());
    s.offsets = N > 0 ? at::empty({B, K + 2}, lopt) : at::zeros({B, K + 2}, lopt);
    s.cap = chunk_capacity(N, K);
    s.chunk_begin = at::empty({B, s.cap}, s.key.options());
    s.chunk_end = at::empty({B, s.cap}, s.key.options());
    s.chunk_offsets = at::empty({B, K + 1}, s.key.options());
    const Exec exec;
    if (B * N > 0) {
      at::Tensor sorted, order;
      std::tie(sorted, order) = exec.sort_keys(skey, B * (K + 1) - 1);  // keys k + b (K + 1), k <= K
      auto run = [&](auto* sk) {
        using skey_t = std::remove_const_t<std::remove_pointer_t<decltype(sk)>>;
        exec.for_each(B * N,
                      SegmentBoundsFunctor<skey_t>{sk, order.data_ptr<int64_t>(), s.perm.data_ptr<int32_t>(),
                                                   s.offsets.data_ptr<int64_t>(), N, K},
                      4096);
      };
      if (sorted.scalar_type() == at::kLong) {
        run(sorted.data_ptr<int64_t>());
      } else {
        run(sorted.data_ptr<int32_t>());
      }
    }
    exec.for_each(B, ChunkOffsetsFunctor{s.offsets.data_ptr<int64_t>(), s.chunk_offsets.data_ptr<int32_t>(), K}, 1);
    exec.for_each(B * K,
                  ChunkTableFunctor{s.offsets.data_ptr<int64_t>(), s.chunk_offsets.data_ptr<int32_t>(),
                                    s.chunk_begin.data_ptr<int32_t>(), s.chunk_end.data_ptr<int32_t>(), K, s.cap},
                  64);
  }
  return s;
}

inline FeatureView view_of(const at::Tensor& f) { return FeatureView{f.stride(0), f.stride(1), f.stride(2)}; }

// Picks the compute type (out_t) and the accumulation type (acc_t) for scalar_t: double on the CPU,
// the compute type on CUDA and in its emulation (so that the CPU build tests float32's ranges).
#define RRM_BCD_TYPES(Exec)                                                          \
  using out_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>; \
  using acc_t = std::conditional_t<Exec::kDeviceAccumulation, out_t, double>

// Segmented (optionally weighted by a (B, N) compute-dtype tensor) sums: (B, K, C) of the compute dtype.
template <class Exec>
at::Tensor segment_sums(const Exec& exec, const at::Tensor& features, const Segments& seg, int64_t K,
                        const at::Tensor& weight) {
  const int64_t B = features.size(0), C = features.size(1), N = features.size(2);
  auto out = at::empty({B, K, C}, features.options().dtype(compute_dtype(features.scalar_type())));
  if (out.numel() == 0) return out;
  const auto fv = view_of(features);
  const bool c_fastest = fv.sC < fv.sN;
  // about 64k pixel reads per parallel_for task
  const int64_t grain = std::max<int64_t>(1, 65536 / (N / K + 1));
  if constexpr (Exec::kSortCsr) {
    // GPU: chunk partials, then each segment's chunks in order (bcd_common.h, 1' and 1'').
    const bool lanes_fastest = !c_fastest;
    const int64_t pq = lanes_fastest ? 1 : C, pc = lanes_fastest ? seg.cap : 1;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "rrm_bcd_segment_sums", [&] {
      RRM_BCD_TYPES(Exec);
      const at::ScalarType acc_dtype = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
      auto part = at::empty({B, seg.cap, C}, out.options().dtype(acc_dtype));
      exec.for_each(B * seg.cap * C, SegmentChunkSumFunctor<scalar_t, acc_t, out_t>{
                                         features.data_ptr<scalar_t>(), fv, seg.perm.data_ptr<int32_t>(), seg.view(),
                                         weight.defined() ? weight.data_ptr<out_t>() : nullptr, part.data_ptr<acc_t>(),
                                         C, N, K, pq, pc, lanes_fastest});
      exec.for_each(B * K * C, SegmentReduceFunctor<acc_t, out_t>{part.data_ptr<acc_t>(), seg.view(),
                                                                  out.data_ptr<out_t>(), C, K, pq, pc});
    });
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "rrm_bcd_segment_sums", [&] {
    RRM_BCD_TYPES(Exec);
    exec.for_each(B * K * C,
                  SegmentSumFunctor<scalar_t, acc_t, out_t>{
                      features.data_ptr<scalar_t>(), fv, seg.perm.data_ptr<int32_t>(), seg.offsets.data_ptr<int64_t>(),
                      weight.defined() ? weight.data_ptr<out_t>() : nullptr, out.data_ptr<out_t>(), C, N, K, c_fastest},
                  grain);
  });
  return out;
}

// features (B, C, N), labels (B, N) -> (sums (B, K, C), counts (B, K)), both of the compute dtype.
template <class Exec>
std::tuple<at::Tensor, at::Tensor> masked_feature_sums(const Exec& exec, const at::Tensor& features,
                                                       const at::Tensor& labels, int64_t K, int64_t ignore_index) {
  const Segments seg = make_segments(exec, labels, K, ignore_index);
  auto sums = segment_sums(exec, features, seg, K, at::Tensor());
  auto counts = (seg.offsets.narrow(1, 1, K) - seg.offsets.narrow(1, 0, K)).to(sums.scalar_type());
  return {sums, counts};
}

template <class Exec>
at::Tensor gather_keys(const Exec& exec, const at::Tensor& values, const at::Tensor& key);

// values (B, K, C), labels (B, N) -> (B, C, N) of values' dtype: out[b, :, n] = values[b, labels[b, n], :]
// (0 where labels == ignore_index). The adjoint of the sums.
template <class Exec>
at::Tensor masked_feature_gather(const Exec& exec, const at::Tensor& values, const at::Tensor& labels,
                                 int64_t ignore_index) {
  const int64_t B = values.size(0), K = values.size(1), C = values.size(2), N = labels.size(1);
  if (B * C * N == 0) return at::empty({B, C, N}, values.options());
  at::Tensor key;
  if constexpr (Exec::kSortCsr) {
    key = make_keys_flat(exec, labels, K, ignore_index, nullptr);
  } else {
    key = make_keys_cpu(labels, K, ignore_index);
  }
  return gather_keys(exec, values, key);
}

// masked_feature_gather on class keys already made (make_keys / make_segments): key (B, N) int32,
// K for an ignored pixel.
template <class Exec>
at::Tensor gather_keys(const Exec& exec, const at::Tensor& values, const at::Tensor& key) {
  const int64_t B = values.size(0), K = values.size(1), C = values.size(2), N = key.size(1);
  auto out = at::empty({B, C, N}, values.options());
  if (out.numel() == 0) return out;
  auto v = values.contiguous();
  const auto runs = row_runs<Exec>(B, C, N);
  const int64_t per = runs.first, threads = runs.second;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "rrm_bcd_gather", [&] {
    exec.for_each(threads,
                  GatherFunctor<scalar_t, scalar_t>{v.data_ptr<scalar_t>(), key.data_ptr<int32_t>(),
                                                    out.data_ptr<scalar_t>(), C, N, K, per},
                  std::max<int64_t>(1, 16384 / per));
  });
  return out;
}

// Channels per thread of the per-pixel statistics: all of them on the CPU, chunks of 64 on the GPU
// (and its emulation), whose partial sums are then added in a fixed order.
template <class Exec>
int64_t stats_chunk_channels(int64_t C) {
  return Exec::kChannelsPerThread == 0 ? std::max<int64_t>(C, 1) : 64;
}

// Per-pixel dot products with the own class centre and feature norms, (B, N) each.
template <class Exec>
std::tuple<at::Tensor, at::Tensor> pixel_stats(const Exec& exec, const at::Tensor& features, const at::Tensor& key,
                                               const at::Tensor& centers) {
  const int64_t B = features.size(0), C = features.size(1), N = features.size(2), K = centers.size(1);
  auto dot = at::zeros({B, N}, centers.options());
  auto norm = at::zeros({B, N}, centers.options());
  if (B * N == 0) return {dot, norm};
  auto centers_t = centers.transpose(1, 2).contiguous();  // (B, C, K)
  constexpr int P = pixels_per_thread<Exec>();
  const int64_t blocks = (N + P - 1) / P;
  const int64_t chunk_c = stats_chunk_channels<Exec>(C);
  const int64_t chunks = std::max<int64_t>(1, (C + chunk_c - 1) / chunk_c);
  const auto fv = view_of(features);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "rrm_bcd_pixel_stats", [&] {
    RRM_BCD_TYPES(Exec);
    const at::ScalarType acc_dtype = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
    at::Tensor part_s = at::empty({B, chunks, N}, centers.options().dtype(acc_dtype));
    at::Tensor part_q = at::empty({B, chunks, N}, centers.options().dtype(acc_dtype));
    exec.for_each(B * chunks * blocks,
                  PixelStatsFunctor<scalar_t, acc_t, out_t, P>{
                      features.data_ptr<scalar_t>(), fv, key.data_ptr<int32_t>(), centers_t.data_ptr<out_t>(),
                      part_s.data_ptr<acc_t>(), part_q.data_ptr<acc_t>(), C, N, K, chunk_c, chunks},
                  std::max<int64_t>(1, 8192 / std::max<int64_t>(1, std::min(C, chunk_c))));
    exec.for_each(B * N,
                  FinishStatsFunctor<acc_t, out_t>{part_s.data_ptr<acc_t>(), part_q.data_ptr<acc_t>(),
                                                   dot.data_ptr<out_t>(), norm.data_ptr<out_t>(), N, chunks},
                  4096);
  });
  return {dot, norm};
}

// |centers| per (b, k), computed as the authors do (sqrt of the sum of squares).
inline at::Tensor center_norms(const at::Tensor& centers) { return centers.mul(centers).sum(-1).sqrt().contiguous(); }

template <class Exec>
std::tuple<at::Tensor, at::Tensor, at::Tensor> cosine_segments(const Exec& exec, const at::Tensor& features,
                                                               const Segments& seg, const at::Tensor& centers);

// features (B, C, N), labels (B, N), centers (B, K, C) ->
//   (cos_sums (B, K): sum over the pixels of class k of cos(F_p, centers[b, k]), dot (B, N), norm (B, N)).
template <class Exec>
std::tuple<at::Tensor, at::Tensor, at::Tensor> feature_center_cosine(const Exec& exec, const at::Tensor& features,
                                                                     const at::Tensor& labels,
                                                                     const at::Tensor& centers, int64_t ignore_index) {
  return cosine_segments(exec, features, make_segments(exec, labels, centers.size(1), ignore_index), centers);
}

// feature_center_cosine on segments already made (make_segments).
template <class Exec>
std::tuple<at::Tensor, at::Tensor, at::Tensor> cosine_segments(const Exec& exec, const at::Tensor& features,
                                                               const Segments& seg, const at::Tensor& centers) {
  const int64_t B = features.size(0), K = centers.size(1), N = features.size(2);
  auto c = centers.contiguous();
  at::Tensor dot, norm;
  std::tie(dot, norm) = pixel_stats(exec, features, seg.key, c);
  auto out = at::zeros({B, K}, c.options());
  if (B == 0) return {out, dot, norm};
  auto cn = center_norms(c);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "rrm_bcd_cosine", [&] {
    RRM_BCD_TYPES(Exec);
    if constexpr (Exec::kSortCsr) {
      const at::ScalarType acc_dtype = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
      auto part = at::empty({B, seg.cap}, c.options().dtype(acc_dtype));
      exec.for_each(B * seg.cap, CosineChunkFunctor<acc_t, out_t, false>{
                                     dot.data_ptr<out_t>(), norm.data_ptr<out_t>(), cn.data_ptr<out_t>(),
                                     seg.key.data_ptr<int32_t>(), seg.perm.data_ptr<int32_t>(), seg.view(),
                                     part.data_ptr<acc_t>(), N, K});
      exec.for_each(B * K, ScalarReduceFunctor<acc_t, out_t>{part.data_ptr<acc_t>(), seg.view(), nullptr,
                                                             out.data_ptr<out_t>(), K});
      return;
    }
    exec.for_each(B * K,
                  CosineSumFunctor<acc_t, out_t>{dot.data_ptr<out_t>(), norm.data_ptr<out_t>(), cn.data_ptr<out_t>(),
                                                 seg.perm.data_ptr<int32_t>(), seg.offsets.data_ptr<int64_t>(),
                                                 out.data_ptr<out_t>(), N, K},
                  1);
  });
  return {out, dot, norm};
}

template <class Exec>
std::tuple<at::Tensor, at::Tensor> cosine_backward_segments(const Exec& exec, const at::Tensor& grad,
                                                            const at::Tensor& features, const Segments& seg,
                                                            const at::Tensor& centers, const at::Tensor& dot_in,
                                                            const at::Tensor& norm_in);

// Backward of feature_center_cosine's first output, given the dot and norm it returned:
// grad (B, K) -> (grad_features (B, C, N) of features' dtype, grad_centers (B, K, C) of the compute dtype).
template <class Exec>
std::tuple<at::Tensor, at::Tensor> feature_center_cosine_backward(const Exec& exec, const at::Tensor& grad,
                                                                  const at::Tensor& features, const at::Tensor& labels,
                                                                  const at::Tensor& centers, const at::Tensor& dot_in,
                                                                  const at::Tensor& norm_in, int64_t ignore_index) {
  return cosine_backward_segments(exec, grad, features, make_segments(exec, labels, centers.size(1), ignore_index),
                                  centers, dot_in, norm_in);
}

// feature_center_cosine_backward on segments already made (make_segments).
template <class Exec>
std::tuple<at::Tensor, at::Tensor> cosine_backward_segments(const Exec& exec, const at::Tensor& grad,
                                                            const at::Tensor& features, const Segments& seg,
                                                            const at::Tensor& centers, const at::Tensor& dot_in,
                                                            const at::Tensor& norm_in) {
  const int64_t B = features.size(0), C = features.size(1), N = features.size(2), K = centers.size(1);
  auto grad_features = at::empty({B, C, N}, features.options());
  auto c = centers.contiguous();
  auto g = grad.contiguous();
  auto dot = dot_in.contiguous();
  auto norm = norm_in.contiguous();
  if (B == 0 || C == 0) return {grad_features, at::zeros_like(c)};
  auto cn = center_norms(c);
  auto alpha = at::empty({B, N}, c.options());
  auto beta = at::empty({B, N}, c.options());
  auto gamma = at::empty({B, K}, c.options());
  const auto fv = view_of(features);
  const auto runs = row_runs<Exec>(B, C, N);
  const int64_t per = runs.first, threads = runs.second;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "rrm_bcd_cosine_backward", [&] {
    RRM_BCD_TYPES(Exec);
    exec.for_each(B * N,
                  CosineCoefFunctor<acc_t, out_t>{g.data_ptr<out_t>(), dot.data_ptr<out_t>(), norm.data_ptr<out_t>(),
                                                  cn.data_ptr<out_t>(), seg.key.data_ptr<int32_t>(),
                                                  alpha.data_ptr<out_t>(), beta.data_ptr<out_t>(), N, K},
                  4096);
    if constexpr (Exec::kSortCsr) {
      const at::ScalarType acc_dtype = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
      auto part = at::empty({B, seg.cap}, c.options().dtype(acc_dtype));
      exec.for_each(B * seg.cap, CosineChunkFunctor<acc_t, out_t, true>{
                                     dot.data_ptr<out_t>(), norm.data_ptr<out_t>(), cn.data_ptr<out_t>(),
                                     seg.key.data_ptr<int32_t>(), seg.perm.data_ptr<int32_t>(), seg.view(),
                                     part.data_ptr<acc_t>(), N, K});
      exec.for_each(B * K, ScalarReduceFunctor<acc_t, out_t>{part.data_ptr<acc_t>(), seg.view(), g.data_ptr<out_t>(),
                                                             gamma.data_ptr<out_t>(), K});
    } else {
      exec.for_each(B * K,
                    CosineGammaFunctor<acc_t, out_t>{g.data_ptr<out_t>(), dot.data_ptr<out_t>(), norm.data_ptr<out_t>(),
                                                     cn.data_ptr<out_t>(), seg.perm.data_ptr<int32_t>(),
                                                     seg.offsets.data_ptr<int64_t>(), gamma.data_ptr<out_t>(), N, K},
                    1);
    }
    exec.for_each(threads,
                  CosineGradFeaturesFunctor<scalar_t, acc_t, out_t>{features.data_ptr<scalar_t>(), fv,
                                                                    seg.key.data_ptr<int32_t>(), c.data_ptr<out_t>(),
                                                                    alpha.data_ptr<out_t>(), beta.data_ptr<out_t>(),
                                                                    grad_features.data_ptr<scalar_t>(), C, N, K, per},
                  std::max<int64_t>(1, 16384 / per));
  });
  // grad_c = sum_p alpha_p F_p - (gamma / |c|) c, with the second term 0 where |c| = 0.
  auto grad_centers = segment_sums(exec, features, seg, K, alpha);
  auto coef = at::where(cn.gt(0), gamma / cn, at::zeros_like(cn));
  grad_centers.sub_(coef.unsqueeze(-1) * c);
  return {grad_features, grad_centers};
}

#undef RRM_BCD_TYPES

// ---- the whole loss (SPEC section 4) as one op ------------------------------------------------------
// bcd_loss: the reductions above run on one set of segments, and the loss's epilogue on the
// (B, K, C)-sized results runs inside the op (no autograd-recorded tensor ops in Python), as
// functors around one Gram matrix of the centres (bcd_common.h section 6) on every device.
// bcd_loss_backward is its adjoint: the epilogue's adjoint, one cosine backward and one gather, added.

// CPU: seg_logits (B, K, N) -> argmax over K (B, N) int64, as torch.argmax (the first maximum; a NaN
// counts as the maximum), and whether every entry is finite, in one pass (torch's argmax over a strided
// dimension is slow on the CPU).
inline at::Tensor argmax_classes_cpu(const at::Tensor& seg_logits, bool* finite) {
  const int64_t B = seg_logits.size(0), K = seg_logits.size(1), N = seg_logits.size(2);
  auto labels = at::empty({B, N}, seg_logits.options().dtype(at::kLong));
  bool all_finite = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, seg_logits.scalar_type(), "rrm_bcd_argmax", [&] {
    const scalar_t* sp = seg_logits.data_ptr<scalar_t>();
    const int64_t s0 = seg_logits.stride(0), s1 = seg_logits.stride(1), s2 = seg_logits.stride(2);
    int64_t* lp = labels.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t n = 0; n < N; ++n) {
        const scalar_t* p = sp + b * s0 + n * s2;
        double best = static_cast<double>(p[0]);
        int64_t arg = 0;
        all_finite = all_finite && std::isfinite(best);
        for (int64_t k = 1; k < K; ++k) {
          const double v = static_cast<double>(p[k * s1]);
          all_finite = all_finite && std::isfinite(v);
          if (!std::isnan(best) && (std::isnan(v) || v > best)) {
            best = v;
            arg = k;
          }
        }
        lp[b * N + n] = arg;
      }
    }
  });
  *finite = all_finite;
  return labels;
}

// G = A A^T (P, P) in double for the centres A (P, C): cuBLAS on CUDA; on the CPU (and in the
// emulation) one functor thread per entry in a fixed order, so that it does not depend on the
// thread count (bcd_common.h: GramFunctor).
template <class Exec>
at::Tensor gram_double(const Exec& exec, const at::Tensor& A) {
  const auto Ad = A.to(at::kDouble).contiguous();
  if constexpr (Exec::kIsCuda) {
    return at::mm(Ad, Ad.t()).contiguous();
  } else {
    const int64_t P = A.size(0), C = A.size(1);
    auto G = at::empty({P, P}, Ad.options());
    exec.for_each(P * P, GramFunctor<double>{Ad.data_ptr<double>(), G.data_ptr<double>(), P, C});
    return G;
  }
}

// seg_logits (B, K, N), features (B, C, N) ->
//   (loss (), labels (B, N) int64 = argmax over K, centers (B, K, C), dot (B, N), norm (B, N),
//    cos_sums (B, K), counts (B, K), finite (2,) bool: [seg_logits finite, class sums finite]).
template <class Exec>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bcd_loss(
    const Exec& exec, const at::Tensor& seg_logits, const at::Tensor& features) {
  const int64_t K = seg_logits.size(1);
  at::Tensor labels;
  bool seg_finite = true;
  if constexpr (!Exec::kSortCsr) {
    labels = argmax_classes_cpu(seg_logits, &seg_finite);
  } else {
    labels = seg_logits.argmax(1);
  }
  // the labels are an argmax over K classes: no label check (and no host synchronisation) needed
  const Segments seg = make_segments(exec, labels, K, /*ignore_index=*/-1, /*checked=*/false);
  const at::Tensor sums = segment_sums(exec, features, seg, K, at::Tensor());
  // c_b = sum_{M=0} F / (n_b + eps) per image; c_k = sum_{(b, p): M=k} F / (n_k + eps) over the batch.
  at::Tensor counts, centers, cos_sums, dot, norm, loss, finite;
  {
    const int64_t B = sums.size(0), C = sums.size(2), P = K - 1 + B;
    counts = (seg.offsets.narrow(1, 1, K) - seg.offsets.narrow(1, 0, K)).to(sums.scalar_type());
    // the epilogue as functors around one Gram matrix (bcd_common.h section 6): 4 launches + 1 GEMM
    centers = at::empty_like(sums);
    auto A = at::empty({P, C}, sums.options());
    auto meta = at::empty({P + 2}, sums.options().dtype(at::kDouble));
    auto part = at::empty({P, 3}, sums.options().dtype(at::kDouble));
    AT_DISPATCH_FLOATING_TYPES(sums.scalar_type(), "rrm_bcd_epilogue", [&] {
      const BcdCounts<scalar_t> n{counts.data_ptr<scalar_t>(), B, K};
      double* mp = meta.data_ptr<double>();
      exec.for_each(1, MetaFunctor<scalar_t>{n, mp});
      exec.for_each(K * C, CentersFunctor<scalar_t>{sums.data_ptr<scalar_t>(), n, centers.data_ptr<scalar_t>(),
                                                    A.data_ptr<scalar_t>(), C});
      std::tie(cos_sums, dot, norm) = cosine_segments(exec, features, seg, centers);
      cos_sums = cos_sums.contiguous();
      const at::Tensor G = gram_double(exec, A);
      exec.for_each(P, LossRowFunctor<scalar_t>{mp, cos_sums.data_ptr<scalar_t>(), G.data_ptr<double>(),
                                                part.data_ptr<double>(), B, K});
      loss = at::empty({}, sums.options());
      exec.for_each(1, LossFinishFunctor<scalar_t>{mp, part.data_ptr<double>(), loss.data_ptr<scalar_t>(), B, K});
    });
    // seg_logits' finiteness: from the CPU argmax's pass, on the device otherwise
    const auto seg_ok = Exec::kSortCsr ? at::isfinite(seg_logits).all()
                                       : at::scalar_tensor(seg_finite, sums.options().dtype(at::kBool));
    finite = at::stack({seg_ok, at::isfinite(sums).all()});
  }
  return {loss, labels, centers, dot, norm, cos_sums, counts, finite};
}

// grad () of the loss, features (B, C, N) and bcd_loss's saved outputs -> grad_features (B, C, N) of
// features' dtype.
template <class Exec>
at::Tensor bcd_loss_backward(const Exec& exec, const at::Tensor& grad, const at::Tensor& features,
                             const at::Tensor& labels, const at::Tensor& centers, const at::Tensor& dot,
                             const at::Tensor& norm, const at::Tensor& cos_sums, const at::Tensor& counts) {
  const int64_t B = counts.size(0), K = counts.size(1);
  const auto ct = counts.scalar_type();
  const Segments seg = make_segments(exec, labels, K, /*ignore_index=*/-1);
  // the epilogue's adjoint as functors (bcd_common.h section 6): 4 launches + 2 GEMMs
  const int64_t F = K - 1, P = F + B, C = centers.size(2);
  const auto c = centers.contiguous(), n_t = counts.contiguous(), gc = grad.to(ct).contiguous();
  const auto A = at::cat({c.select(0, 0).narrow(0, 1, F), c.select(1, 0)}, 0);  // (P, C)
  const at::Tensor G = gram_double(exec, A);
  auto meta = at::empty({P + 2}, c.options().dtype(at::kDouble));
  auto grad_cos = at::empty({B, K}, c.options());
  auto S = at::empty({P, P}, c.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(ct, "rrm_bcd_epilogue_adjoint", [&] {
    const BcdCounts<scalar_t> n{n_t.data_ptr<scalar_t>(), B, K};
    double* mp = meta.data_ptr<double>();
    exec.for_each(1, MetaFunctor<scalar_t>{n, mp});
    exec.for_each(B * K, GradCosFunctor<scalar_t>{mp, gc.data_ptr<scalar_t>(), grad_cos.data_ptr<scalar_t>(), B, K});
    exec.for_each(P * P, AdjointGramFunctor<scalar_t>{mp, gc.data_ptr<scalar_t>(), G.data_ptr<double>(),
                                                      S.data_ptr<double>(), B, K});
  });
  at::Tensor grad_features, grad_centers;
  std::tie(grad_features, grad_centers) = cosine_backward_segments(exec, grad_cos, features, seg, c, dot, norm);
  const auto gcen = grad_centers.contiguous();
  auto grad_sums = at::empty_like(c);
  auto gA = at::empty({P, C}, c.options());
  AT_DISPATCH_FLOATING_TYPES(ct, "rrm_bcd_grad_sums", [&] {
    // gA = S A, in double and in a fixed order (a GEMM's result depends on the CPU's thread count)
    exec.for_each(P * C, GramAdjointFunctor<scalar_t>{S.data_ptr<double>(), A.data_ptr<scalar_t>(),
                                                      gA.data_ptr<scalar_t>(), P, C});
    const BcdCounts<scalar_t> n{n_t.data_ptr<scalar_t>(), B, K};
    exec.for_each(K * C, GradSumsFunctor<scalar_t>{gcen.data_ptr<scalar_t>(), gA.data_ptr<scalar_t>(), n,
                                                   grad_sums.data_ptr<scalar_t>(), C});
  });
  return grad_features.add_(gather_keys(exec, grad_sums.to(features.scalar_type()), seg.key));
}

}  // namespace bcd
}  // namespace rrm
