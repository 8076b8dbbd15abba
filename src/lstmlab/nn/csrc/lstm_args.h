// The ops' argument checks, in one place: every tensor on the CPU, contiguous, of the input's dtype, with the number
// of elements its shape implies.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <initializer_list>

namespace lstmlab {

inline bool given(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

inline void check_cpu_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "lstmlab_native: ", name, " must be on the CPU");
  TORCH_CHECK(t.is_contiguous(), "lstmlab_native: ", name, " must be contiguous");
}

inline void check(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  check_cpu_contiguous(t, name);
  TORCH_CHECK(t.scalar_type() == dtype, "lstmlab_native: ", name, " must have the input's dtype");
}

inline void check_numel(const at::Tensor& t, int64_t numel, const char* name) {
  TORCH_CHECK(t.numel() == numel, "lstmlab_native: ", name, " has ", t.numel(), " elements, expected ", numel);
}

template <typename T>
const T* opt_ptr(const c10::optional<at::Tensor>& t) {
  return given(t) ? t->data_ptr<T>() : nullptr;
}

// A tensor argument and the number of elements it must have (kAnySize: its shape is checked elsewhere).
constexpr int64_t kAnySize = -1;

struct Arg {
  const at::Tensor& t;
  const char* name;
  int64_t numel;
};

struct OptArg {  // checked only when given
  const c10::optional<at::Tensor>& t;
  const char* name;
  int64_t numel;
};

// First device, layout and dtype of every tensor, then the sizes, each in the order listed: so that of several
// mistakes the same one is reported whatever the op.
inline void check_args(at::ScalarType dtype, std::initializer_list<Arg> args, std::initializer_list<OptArg> opts) {
  for (const Arg& a : args) {
    check(a.t, dtype, a.name);
  }
  for (const OptArg& a : opts) {
    if (given(a.t)) {
      check(*a.t, dtype, a.name);
    }
  }
  for (const Arg& a : args) {
    if (a.numel != kAnySize) {
      check_numel(a.t, a.numel, a.name);
    }
  }
  for (const OptArg& a : opts) {
    if (a.numel != kAnySize && given(a.t)) {
      check_numel(*a.t, a.numel, a.name);
    }
  }
}

}  // namespace lstmlab
