// Autograd of bcd_loss (schema: csrc/rrm.cpp), a C++ autograd function registered for the Autograd
// key, as the energy loss's and the lattice ops' (csrc/energy/energy_autograd.cpp, which says why): the loss runs every
// training iteration with a gradient, where torch.library's Python wrapper cost about 25 us of host
// time per call. The standalone BCD ops (masked sums, gather, cosine) keep their Python autograd
// (rrm_cuda/_ops/bcd.py); the fake kernels are there too. The emulated op (tests) shares the function.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>

#include "common/op_pair.h"

namespace rrm {
namespace bcd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using LossSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                           at::Tensor>(const at::Tensor&, const at::Tensor&);
using LossBackwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&);

const OpPair<LossSig>& loss_ops() {
  static const OpPair<LossSig> p("rrm_cuda::bcd_loss", "rrm_cuda::_bcd_loss_emulated");
  return p;
}

const OpPair<LossBackwardSig>& loss_backward_ops() {
  static const OpPair<LossBackwardSig> p("rrm_cuda::bcd_loss_backward", "rrm_cuda::_bcd_loss_backward_emulated");
  return p;
}

// The loss is differentiable in the features only (the labels come from seg_logits by argmax); the
// other seven outputs are what its backward reads.
struct BcdLossFunction : public torch::autograd::Function<BcdLossFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& seg_logits, const at::Tensor& features,
                               bool emulated) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, labels, centers, dot, norm, cos_sums, counts, finite] =
        loss_ops().get(emulated).call(seg_logits, features);
    ctx->save_for_backward({features, labels, centers, dot, norm, cos_sums, counts});
    ctx->mark_non_differentiable({labels, centers, dot, norm, cos_sums, counts, finite});
    ctx->set_materialize_grads(false);  // no zero gradients for the seven non-differentiable outputs
    ctx->saved_data["emulated"] = emulated;
    return {loss, labels, centers, dot, norm, cos_sums, counts, finite};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(3);
    if (!grads[0].defined() || !ctx->needs_input_grad(1)) return out;
    refuse_double_backward("bcd_loss");
    const variable_list s = ctx->get_saved_variables();
    out[1] = loss_backward_ops()
                 .get(ctx->saved_data["emulated"].toBool())
                 .call(grads[0], s[0], s[1], s[2], s[3], s[4], s[5], s[6]);
    return out;
  }
};

template <bool kEmulated>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
loss_autograd(const at::Tensor& seg_logits, const at::Tensor& features) {
  auto o = BcdLossFunction::apply(seg_logits, features, kEmulated);
  return {o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]};
}

}  // namespace

TORCH_LIBRARY_IMPL(rrm_cuda, Autograd, m) {
  m.impl("bcd_loss", &loss_autograd<false>);
  m.impl("_bcd_loss_emulated", &loss_autograd<true>);
}

}  // namespace bcd
}  // namespace rrm
