// Autograd of the energy loss's two differentiable ops (schemas: csrc/rrm.cpp), as C++ autograd
// functions registered for the Autograd key, torchvision's way. They replace torch.library's Python
// register_autograd, whose wrapper cost about 25 us of host time per call with a gradient on the
// CPU VM (29 us per call at tiny sizes, 7 us through this), and its backward ran Python too: host
// time is what sets the loss's speed on a GPU (benchmarks/NOTES.md section 13). The fake kernels stay
// in Python (rrm_cuda/_ops/energy.py). The emulated ops (tests) go through the same functions.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/host_alloc.h"
#include "common/op_pair.h"

namespace rrm {
namespace energy {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using EnergySig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                     const std::optional<at::Tensor>&, int64_t);
using InputsSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const std::optional<at::Tensor>&,
                                                                 const std::optional<at::Tensor>&, int64_t, bool,
                                                                 int64_t, bool);
using InputsBackwardSig = at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, int64_t, int64_t, int64_t,
                                     int64_t, const std::optional<at::Tensor>&);

const OpPair<EnergySig>& energy_ops() {
  static const OpPair<EnergySig> p("rrm_cuda::dense_energy", "rrm_cuda::_dense_energy_emulated");
  return p;
}

const OpPair<InputsSig>& inputs_ops() {
  static const OpPair<InputsSig> p("rrm_cuda::dense_energy_inputs", "rrm_cuda::_dense_energy_inputs_emulated");
  return p;
}

const OpPair<InputsBackwardSig>& inputs_backward_ops() {
  static const OpPair<InputsBackwardSig> p("rrm_cuda::dense_energy_inputs_backward",
                                           "rrm_cuda::_dense_energy_inputs_backward_emulated");
  return p;
}

// The start of the energy ops' backwards: false when no gradient flows back; refuses a double
// backward, and a call made without a gradient direction (grad_mode 0).
bool energy_backward_needed(AutogradContext* ctx, const at::Tensor& grad, const char* op) {
  if (!grad.defined()) return false;
  refuse_double_backward(op);
  TORCH_CHECK(ctx->saved_data["grad_mode"].toInt() != 0, "rrm_cuda::", op,
              " was called with grad_mode=0 (no gradient direction computed); call it with grad_mode=1 (rloss) or "
              "2 (exact) to differentiate it");
  return true;
}

// grad * factor (the product's backward in dense_energy_loss), in the direction's dtype.
at::Tensor factor_scale(AutogradContext* ctx, const at::Tensor& grad, const at::Tensor& grad_dir) {
  return at::mul(grad, ctx->saved_data["factor"].toDouble()).to(grad_dir.scalar_type());
}

// dense_energy (below autograd) and its energies summed and scaled: (factor * sum_b energy_b,
// grad_dir), with ATen's sum and product, the ops dense_energy_loss ran in Python (the same bits).
std::tuple<at::Tensor, at::Tensor> energy_sum_forward(const at::Tensor& probs, const at::Tensor& gate,
                                                      const at::Tensor& features, const std::optional<at::Tensor>& mass,
                                                      int64_t grad_mode, double factor, bool emulated) {
  auto [energy, grad_dir] = energy_ops().get(emulated).call(probs, gate, features, mass, grad_mode);
  return {at::mul(energy.sum(), factor), grad_dir};
}

// grad_dir * scale (a (B, 1, 1) or one-element scale) into a block of the large-output cache on the
// CPU (common/host_alloc.h; at::empty on CUDA): a fresh (B, K, N) product is mapped afresh and
// faulted in page by page on every call (2-core VM, 4 x 21 x 513^2: 18 ms for the product, most of
// it page faults).
at::Tensor scaled_direction(const at::Tensor& grad_dir, const at::Tensor& scale) {
  at::Tensor out = empty_large(grad_dir.sizes(), grad_dir.options(), kCachedOutputBytes);
  at::mul_out(out, grad_dir, scale);
  return out;
}

// dense_energy returns, beside the per-image energy, its gradient direction d energy_b / d probs
// (grad_mode 1: rloss, 2: exact; 0: none), so the backward is a product: no lattice in it.
struct DenseEnergyFunction : public torch::autograd::Function<DenseEnergyFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& probs, const at::Tensor& gate,
                               const at::Tensor& features, const std::optional<at::Tensor>& mass, int64_t grad_mode,
                               bool emulated) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [energy, grad_dir] = energy_ops().get(emulated).call(probs, gate, features, mass, grad_mode);
    ctx->saved_data["grad_mode"] = grad_mode;
    ctx->mark_non_differentiable({grad_dir});
    ctx->set_materialize_grads(false);  // no (B, K, N) zeros for the direction's gradient
    ctx->save_for_backward({grad_dir});
    return {energy, grad_dir};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(6);  // probs; gate, features and mass are constants of the loss (as in rloss)
    const at::Tensor& grad_energy = grads[0];
    // (undefined: only the direction was used, nothing flows back; the direction is a constant of the
    // backward, so no double backward)
    if (!energy_backward_needed(ctx, grad_energy, "dense_energy")) return out;
    const at::Tensor grad_dir = ctx->get_saved_variables()[0];
    out[0] = scaled_direction(grad_dir, grad_energy.reshape({-1, 1, 1}).to(grad_dir.scalar_type()));
    return out;
  }
};

// dense_energy_sum: factor * sum_b energy_b in one node (energy_sum_forward). Backward: grad *
// factor (the product's backward), then grad_dir times it (dense_energy's backward with the sum's
// expanded gradient): the same values, two autograd nodes fewer per call.
struct DenseEnergySumFunction : public torch::autograd::Function<DenseEnergySumFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& probs, const at::Tensor& gate,
                            const at::Tensor& features, const std::optional<at::Tensor>& mass, int64_t grad_mode,
                            double factor, bool emulated) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, grad_dir] = energy_sum_forward(probs, gate, features, mass, grad_mode, factor, emulated);
    ctx->saved_data["grad_mode"] = grad_mode;
    ctx->saved_data["factor"] = factor;
    ctx->save_for_backward({grad_dir});
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(7);  // probs only
    const at::Tensor& grad = grads[0];
    if (!energy_backward_needed(ctx, grad, "dense_energy_sum")) return out;
    const at::Tensor grad_dir = ctx->get_saved_variables()[0];
    out[0] = scaled_direction(grad_dir, factor_scale(ctx, grad, grad_dir));
    return out;
  }
};

// dense_energy_inputs: the probabilities at the working scale (downscaled, ROI-masked, in the
// requested pixel order) and the gate, a constant of the loss.
struct DenseEnergyInputsFunction : public torch::autograd::Function<DenseEnergyInputsFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& segmentations,
                               const std::optional<at::Tensor>& rois, const std::optional<at::Tensor>& unlabelled,
                               int64_t stride, bool gate, int64_t tile, bool stats, bool emulated) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [probs, g, st] = inputs_ops().get(emulated).call(segmentations, rois, unlabelled, stride, gate, tile, stats);
    ctx->mark_non_differentiable({g, st});
    ctx->set_materialize_grads(false);
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["tile"] = tile;
    ctx->saved_data["height"] = segmentations.size(2);
    ctx->saved_data["width"] = segmentations.size(3);
    ctx->saved_data["emulated"] = emulated;
    ctx->save_for_backward({rois.has_value() ? *rois : at::Tensor()});
    return {probs, g, st};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(8);  // segmentations only
    const at::Tensor& grad_probs = grads[0];
    if (!grad_probs.defined()) return out;
    const at::Tensor rois = ctx->get_saved_variables()[0];
    const int64_t stride = ctx->saved_data["stride"].toInt(), tile = ctx->saved_data["tile"].toInt();
    const int64_t height = ctx->saved_data["height"].toInt(), width = ctx->saved_data["width"].toInt();
    if (stride == 1 && !rois.defined() && (tile == 0 || tile >= width)) {  // the identity
      out[0] = grad_probs;
      return out;
    }
    const std::optional<at::Tensor> r = rois.defined() ? std::optional<at::Tensor>(rois) : std::nullopt;
    out[0] = inputs_backward_ops()
                 .get(ctx->saved_data["emulated"].toBool())
                 .call(grad_probs, r, height, width, stride, tile, std::nullopt);
    return out;
  }
};

// The inputs at the working scale (raster order) and the summed energy below autograd: the values of
// dense_energy_inputs followed by dense_energy_sum.
std::tuple<at::Tensor, at::Tensor> fused_loss_forward(const at::Tensor& seg, const std::optional<at::Tensor>& rois,
                                                      const std::optional<at::Tensor>& unlabelled, int64_t stride,
                                                      bool gate, const at::Tensor& features,
                                                      const std::optional<at::Tensor>& mass, int64_t grad_mode,
                                                      double factor, bool emulated) {
  auto [probs, g, st] = inputs_ops().get(emulated).call(seg, rois, unlabelled, stride, gate, 0, false);
  const int64_t B = probs.size(0), K = probs.size(1), N = probs.size(2) * probs.size(3);
  // without the gate the op returns none: ones, as dense_energy_loss makes them
  const at::Tensor gate_n = gate ? g.reshape({B, N}) : at::ones({B, N}, probs.options());
  return energy_sum_forward(probs.reshape({B, K, N}), gate_n, features, mass, grad_mode, factor, emulated);
}

// dense_energy_loss_fused: one node for the inputs op and the summed energy. Its backward is the
// inputs' backward of grad_dir with the scale grad * factor read by the kernel (no (B, K, N) product
// of its own): element by element the products the two ops' backwards make, in the same order.
struct DenseEnergyLossFusedFunction : public torch::autograd::Function<DenseEnergyLossFusedFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& seg, const std::optional<at::Tensor>& rois,
                            const std::optional<at::Tensor>& unlabelled, int64_t stride, bool gate,
                            const at::Tensor& features, const std::optional<at::Tensor>& mass, int64_t grad_mode,
                            double factor, bool emulated) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, grad_dir] =
        fused_loss_forward(seg, rois, unlabelled, stride, gate, features, mass, grad_mode, factor, emulated);
    ctx->saved_data["grad_mode"] = grad_mode;
    ctx->saved_data["factor"] = factor;
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["height"] = seg.size(2);
    ctx->saved_data["width"] = seg.size(3);
    ctx->saved_data["emulated"] = emulated;
    ctx->save_for_backward({grad_dir, rois.has_value() ? *rois : at::Tensor()});
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(10);  // segmentations only
    const at::Tensor& grad = grads[0];
    if (!energy_backward_needed(ctx, grad, "dense_energy_loss_fused")) return out;
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& grad_dir = saved[0];
    const at::Tensor& rois = saved[1];
    const int64_t stride = ctx->saved_data["stride"].toInt();
    const int64_t height = ctx->saved_data["height"].toInt(), width = ctx->saved_data["width"].toInt();
    const int64_t B = grad_dir.size(0), K = grad_dir.size(1);
    const at::Tensor scale = factor_scale(ctx, grad, grad_dir);
    if (stride == 1 && !rois.defined()) {  // the inputs op is the identity here
      out[0] = scaled_direction(grad_dir, scale).view({B, K, height, width});
      return out;
    }
    const std::optional<at::Tensor> r = rois.defined() ? std::optional<at::Tensor>(rois) : std::nullopt;
    out[0] = inputs_backward_ops()
                 .get(ctx->saved_data["emulated"].toBool())
                 .call(grad_dir.view({B, K, height / stride, width / stride}), r, height, width, stride, 0, scale);
    return out;
  }
};

template <bool kEmulated>
std::tuple<at::Tensor, at::Tensor> energy_autograd(const at::Tensor& probs, const at::Tensor& gate,
                                                   const at::Tensor& features, const std::optional<at::Tensor>& mass,
                                                   int64_t grad_mode) {
  auto out = DenseEnergyFunction::apply(probs, gate, features, mass, grad_mode, kEmulated);
  return {out[0], out[1]};
}

template <bool kEmulated>
at::Tensor energy_sum_autograd(const at::Tensor& probs, const at::Tensor& gate, const at::Tensor& features,
                               const std::optional<at::Tensor>& mass, int64_t grad_mode, double factor) {
  return DenseEnergySumFunction::apply(probs, gate, features, mass, grad_mode, factor, kEmulated);
}

template <bool kEmulated>
at::Tensor loss_fused_autograd(const at::Tensor& seg, const std::optional<at::Tensor>& rois,
                               const std::optional<at::Tensor>& unlabelled, int64_t stride, bool gate,
                               const at::Tensor& features, const std::optional<at::Tensor>& mass, int64_t grad_mode,
                               double factor) {
  return DenseEnergyLossFusedFunction::apply(seg, rois, unlabelled, stride, gate, features, mass, grad_mode, factor,
                                             kEmulated);
}

// Below autograd (inference mode, tracing): the forwards alone, through the fused ops' own kernels.
template <bool kEmulated>
at::Tensor energy_sum_kernel(const at::Tensor& probs, const at::Tensor& gate, const at::Tensor& features,
                             const std::optional<at::Tensor>& mass, int64_t grad_mode, double factor) {
  return std::get<0>(energy_sum_forward(probs, gate, features, mass, grad_mode, factor, kEmulated));
}

template <bool kEmulated>
at::Tensor loss_fused_kernel(const at::Tensor& seg, const std::optional<at::Tensor>& rois,
                             const std::optional<at::Tensor>& unlabelled, int64_t stride, bool gate,
                             const at::Tensor& features, const std::optional<at::Tensor>& mass, int64_t grad_mode,
                             double factor) {
  return std::get<0>(
      fused_loss_forward(seg, rois, unlabelled, stride, gate, features, mass, grad_mode, factor, kEmulated));
}

template <bool kEmulated>
std::tuple<at::Tensor, at::Tensor, at::Tensor> inputs_autograd(const at::Tensor& segmentations,
                                                               const std::optional<at::Tensor>& rois,
                                                               const std::optional<at::Tensor>& unlabelled,
                                                               int64_t stride, bool gate, int64_t tile, bool stats) {
  auto out = DenseEnergyInputsFunction::apply(segmentations, rois, unlabelled, stride, gate, tile, stats, kEmulated);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(rrm_cuda, Autograd, m) {
  m.impl("dense_energy", &energy_autograd<false>);
  m.impl("_dense_energy_emulated", &energy_autograd<true>);
  m.impl("dense_energy_sum", &energy_sum_autograd<false>);
  m.impl("_dense_energy_sum_emulated", &energy_sum_autograd<true>);
  m.impl("dense_energy_loss_fused", &loss_fused_autograd<false>);
  m.impl("_dense_energy_loss_fused_emulated", &loss_fused_autograd<true>);
  m.impl("dense_energy_inputs", &inputs_autograd<false>);
  m.impl("_dense_energy_inputs_emulated", &inputs_autograd<true>);
}

// (kernels made of the device's own ops, so one definition serves both devices)
TORCH_LIBRARY_IMPL(rrm_cuda, CPU, m) {
  m.impl("dense_energy_sum", &energy_sum_kernel<false>);
  m.impl("_dense_energy_sum_emulated", &energy_sum_kernel<true>);
  m.impl("dense_energy_loss_fused", &loss_fused_kernel<false>);
  m.impl("_dense_energy_loss_fused_emulated", &loss_fused_kernel<true>);
}

#ifdef RRM_WITH_CUDA
TORCH_LIBRARY_IMPL(rrm_cuda, CUDA, m) {
  m.impl("dense_energy_sum", &energy_sum_kernel<false>);
  m.impl("dense_energy_loss_fused", &loss_fused_kernel<false>);
}
#endif

}  // namespace energy
}  // namespace rrm
