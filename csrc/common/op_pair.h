// The dispatcher handles of an op and of its emulated twin (the CUDA launch decomposition run on
// the CPU, for tests), looked up once: what the C++ autograd functions (csrc/*/*_autograd.cpp) call
// below the Autograd key.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

namespace rrm {

template <typename Sig>
struct OpPair {
  c10::TypedOperatorHandle<Sig> op, emulated;
  OpPair(const char* name, const char* emulated_name)
      : op(c10::Dispatcher::singleton().findSchemaOrThrow(name, "").template typed<Sig>()),
        emulated(c10::Dispatcher::singleton().findSchemaOrThrow(emulated_name, "").template typed<Sig>()) {}
  const c10::TypedOperatorHandle<Sig>& get(bool emulated_op) const { return emulated_op ? emulated : op; }
};

}  // namespace rrm
