// Autograd of the lattice ops (schemas: csrc/rrm.cpp) as C++ autograd functions registered for the
// Autograd key, like the energy and BCD losses' (csrc/energy/energy_autograd.cpp says why: host time
// per call). permutohedral_filter's backward is the filter with the blur order reversed (its exact
// adjoint) and, when the features need a gradient too, _permutohedral_filter_backward gives both
// from one lattice (the features': the barycentric weights' derivative; not differentiable again).
// The forward hands its lattice to the backward (a Handoff kept by the node, lattice_cache.h; knob
// lattice_to_backward), and with the features' gradient its blurred rows B S values too, so the
// backward neither builds the lattice again nor splats and blurs the values again; the node lets
// them go in its first backward (a second one, retain_graph=True, builds again), and a CUDA graph
// capture hands nothing over. dense_crf's is dense_crf_backward, handed the forward's lattices and
// normalisers the same way, and every step's Q (the trajectory, knob crf_trajectory_to_backward), so
// that it sweeps back without rerunning the steps (its features get no gradient: a backward that
// needs one raises). The fake kernels stay in Python (rrm_cuda/_ops/lattice.py).
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>
#include <utility>
#include <vector>

#include "common/op_pair.h"
#include "common/tuning.h"
#include "lattice/lattice_cache.h"

namespace rrm {
namespace lattice {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using FilterSig = at::Tensor(const at::Tensor&, const at::Tensor&, bool, bool);
using CrfSig = at::Tensor(const at::Tensor&, at::TensorList, const at::Tensor&, const c10::List<bool>&, at::IntArrayRef,
                          int64_t, const c10::List<bool>&);
using CrfBackwardSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, at::TensorList,
                                                          const at::Tensor&, const c10::List<bool>&, at::IntArrayRef,
                                                          int64_t, bool, const c10::List<bool>&);

const OpPair<FilterSig>& filter_ops() {
  static const OpPair<FilterSig> p("rrm_cuda::permutohedral_filter", "rrm_cuda::_permutohedral_filter_emulated");
  return p;
}

using FilterBackwardSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                             bool, bool);
const OpPair<FilterBackwardSig>& filter_backward_ops() {
  static const OpPair<FilterBackwardSig> p("rrm_cuda::_permutohedral_filter_backward",
                                           "rrm_cuda::_permutohedral_filter_backward_emulated");
  return p;
}

const OpPair<CrfSig>& crf_ops() {
  static const OpPair<CrfSig> p("rrm_cuda::dense_crf", "rrm_cuda::_dense_crf_emulated");
  return p;
}

const OpPair<CrfBackwardSig>& crf_backward_ops() {
  static const OpPair<CrfBackwardSig> p("rrm_cuda::dense_crf_backward", "rrm_cuda::_dense_crf_backward_emulated");
  return p;
}

// What `call` (the forward op) records for the backward when keep: its lattices (knob
// lattice_to_backward), with want_rows the filter's blurred rows, into the node's saved data (they
// go with the first backward: a later one rebuilds the same bits); with `trajectory` dense_crf's
// every step's Q (knob crf_trajectory_to_backward), into *trajectory, which the caller saves as a
// saved variable: the rerun it spares would round differently, so a second backward
// (retain_graph=True) must find it too, and the engine frees it with the others.
template <class Call>
at::Tensor recording_lattices(AutogradContext* ctx, bool keep, bool want_rows, const Call& call,
                              at::Tensor* trajectory = nullptr) {
  const bool lattices = tuning::get(tuning::kLatticeToBackward) != 0;
  const bool want_trajectory = trajectory && tuning::get(tuning::kCrfTrajectoryToBackward) != 0;
  if (!keep || (!lattices && !want_trajectory)) return call();
  auto handoff = c10::make_intrusive<Handoff>();
  handoff->want_lattices = lattices;
  handoff->want_rows = lattices && want_rows;
  handoff->want_trajectory = want_trajectory;
  at::Tensor out;
  {
    HandoffScope scope(handoff.get(), /*record=*/true);
    out = call();
  }
  if (trajectory) *trajectory = std::exchange(handoff->trajectory, at::Tensor());
  if (!handoff->items.empty()) ctx->saved_data["lattice"] = c10::IValue::make_capsule(handoff);
  return out;
}

// The forward's lattices, taken out of the node (their memory goes with this backward), or null.
c10::intrusive_ptr<Handoff> take_lattices(AutogradContext* ctx) {
  auto it = ctx->saved_data.find("lattice");
  if (it == ctx->saved_data.end()) return {};
  auto handoff = c10::static_intrusive_pointer_cast<Handoff>(it->second.toCapsule());
  ctx->saved_data.erase(it);
  return handoff;
}

struct FilterFunction : public torch::autograd::Function<FilterFunction> {
  // keep: a backward will follow (the node records its inputs), so the op hands its lattice over
  static variable_list forward(AutogradContext* ctx, const at::Tensor& values, const at::Tensor& features, bool reverse,
                               bool cache, bool emulated, bool keep) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor out = recording_lattices(ctx, keep, features.requires_grad(), [&] {
      return filter_ops().get(emulated).call(values, features, reverse, cache);
    });
    // the values only when the features' gradient may be asked for (it needs them)
    ctx->save_for_backward({features, features.requires_grad() ? values : at::Tensor()});
    ctx->saved_data["reverse"] = reverse;
    ctx->saved_data["cache"] = cache;
    ctx->saved_data["emulated"] = emulated;
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(6);
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& features = saved[0];
    const bool emulated = ctx->saved_data["emulated"].toBool(), reverse = ctx->saved_data["reverse"].toBool();
    const bool cache = ctx->saved_data["cache"].toBool();
    const at::Tensor grad = grads[0].contiguous();
    const auto handoff = take_lattices(ctx);
    HandoffScope scope(handoff.get(), /*record=*/false);
    if (ctx->needs_input_grad(1)) {  // both from one lattice
      refuse_double_backward("permutohedral_filter (with a gradient w.r.t. features)");
      auto [grad_values, grad_features] =
          filter_backward_ops().get(emulated).call(saved[1], features, grad, reverse, cache);
      if (ctx->needs_input_grad(0)) out[0] = grad_values;
      out[1] = grad_features;
      return out;
    }
    // K = alpha S^T B_d..B_0 S; each B_j is symmetric, so K^T blurs the axes in reverse order
    if (ctx->needs_input_grad(0)) out[0] = filter_ops().get(emulated).call(grad, features, !reverse, cache);
    return out;
  }
};

struct CrfFunction : public torch::autograd::Function<CrfFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& unary, at::TensorList features,
                               const at::Tensor& compat, const c10::List<bool>& diagonal, at::IntArrayRef normalization,
                               int64_t iterations, const c10::List<bool>& cache, bool emulated, bool keep) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor trajectory;  // Q^0 .. Q^S, or undefined
    at::Tensor q = recording_lattices(
        ctx, keep, false,
        [&] {
          return crf_ops().get(emulated).call(unary, features, compat, diagonal, normalization, iterations, cache);
        },
        &trajectory);
    std::vector<at::Tensor> saved{unary, compat};
    saved.insert(saved.end(), features.begin(), features.end());
    saved.push_back(trajectory);  // last, defined or not
    ctx->save_for_backward(saved);
    ctx->saved_data["diagonal"] = diagonal;
    ctx->saved_data["normalization"] = normalization.vec();
    ctx->saved_data["iterations"] = iterations;
    ctx->saved_data["cache"] = cache;
    ctx->saved_data["emulated"] = emulated;
    return {q};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    refuse_double_backward("dense_crf");
    const variable_list s = ctx->get_saved_variables();
    const std::vector<at::Tensor> features(s.begin() + 2, s.end() - 1);
    const size_t F = features.size();
    // inputs: unary, the F features, compat (the tensors' edges: compat is edge F + 1), then six
    // non-tensor arguments
    variable_list out(F + 8);
    for (size_t f = 0; f < F; ++f)
      TORCH_CHECK(!ctx->needs_input_grad(1 + f),
                  "dense_crf: no gradient w.r.t. the pairwise features (made from `image`, and any extra "
                  "`features` terms) is implemented; pass them detached (e.g. image.detach()): they are constants "
                  "of the CRF, as in pydensecrf (unary/probs and compat get gradients)");
    const bool want_unary = ctx->needs_input_grad(0), want_compat = ctx->needs_input_grad(F + 1);
    // Without a compatibility gradient the op skips recomputing the messages (one filter per term
    // and step).
    auto handoff = take_lattices(ctx);
    if (s.back().defined()) {  // the forward's trajectory
      if (!handoff) handoff = c10::make_intrusive<Handoff>();
      handoff->trajectory = s.back();
    }
    HandoffScope scope(handoff.get(), /*record=*/false);
    auto [grad_unary, grad_compat] =
        crf_backward_ops()
            .get(ctx->saved_data["emulated"].toBool())
            .call(grads[0].contiguous(), s[0], features, s[1], ctx->saved_data["diagonal"].toBoolList(),
                  ctx->saved_data["normalization"].toIntVector(), ctx->saved_data["iterations"].toInt(), want_compat,
                  ctx->saved_data["cache"].toBoolList());
    if (want_unary) out[0] = grad_unary;
    if (want_compat) out[F + 1] = grad_compat;
    return out;
  }
};

template <bool kEmulated>
at::Tensor filter_autograd(const at::Tensor& values, const at::Tensor& features, bool reverse, bool cache) {
  const bool keep = at::GradMode::is_enabled() && (values.requires_grad() || features.requires_grad());
  return FilterFunction::apply(values, features, reverse, cache, kEmulated, keep)[0];
}

template <bool kEmulated>
at::Tensor crf_autograd(const at::Tensor& unary, at::TensorList features, const at::Tensor& compat,
                        const c10::List<bool>& diagonal, at::IntArrayRef normalization, int64_t iterations,
                        const c10::List<bool>& cache) {
  const bool keep = at::GradMode::is_enabled() && (unary.requires_grad() || compat.requires_grad());
  return CrfFunction::apply(unary, features, compat, diagonal, normalization, iterations, cache, kEmulated, keep)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(rrm_cuda, Autograd, m) {
  m.impl("permutohedral_filter", &filter_autograd<false>);
  m.impl("_permutohedral_filter_emulated", &filter_autograd<true>);
  m.impl("dense_crf", &crf_autograd<false>);
  m.impl("_dense_crf_emulated", &crf_autograd<true>);
}

}  // namespace lattice
}  // namespace rrm
