// The dispatcher handles of an op and of its emulated twin (the CUDA launch decomposition run on
// the CPU, for tests), looked up once: what the C++ autograd functions (csrc/*/*_autograd.cpp) call
// below the Autograd key.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/Exception.h>

namespace rrm {

// Called by the backward of an op whose backward is not itself differentiable (dense_crf,
// dense_energy, bcd_loss): a double backward -- torch.autograd.grad(..., create_graph=True) through
// the op, which runs the backward with grad mode on -- would otherwise give silently wrong second
// derivatives (the backward's outputs as constants).
inline void refuse_double_backward(const char* op) {
  TORCH_CHECK(!at::GradMode::is_enabled(), "rrm_cuda::", op,
              ": its backward is not differentiable, so a double backward (create_graph=True through this op) "
              "is not supported");
}

template <typename Sig>
struct OpPair {
  c10::TypedOperatorHandle<Sig> op, emulated;
  OpPair(const char* name, const char* emulated_name)
      : op(c10::Dispatcher::singleton().findSchemaOrThrow(name, "").template typed<Sig>()),
        emulated(c10::Dispatcher::singleton().findSchemaOrThrow(emulated_name, "").template typed<Sig>()) {}
  const c10::TypedOperatorHandle<Sig>& get(bool emulated_op) const { return emulated_op ? emulated : op; }
};

}  // namespace rrm
