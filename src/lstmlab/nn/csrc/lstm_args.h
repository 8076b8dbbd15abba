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

// The pointers the variant forward's and backward's loops both read: the saved cells, c0, the masks and the
// variant parameters (Args: FwdArgs or BwdArgs; Call: their FwdCall or BwdCall).
template <typename T, typename Call, typename Args>
void set_shared_pointers(Call& c, const Args& a, bool zoneout) {
  c.cp = a.cs.template data_ptr<T>();
  c.tp = a.tcs.template data_ptr<T>();
  c.c0p = a.c0.template data_ptr<T>();
  c.mp = opt_ptr<T>(a.recurrent_mask);
  c.zp = opt_ptr<T>(a.zoneout_mask);
  c.z_half = zoneout ? a.zoneout_mask->numel() / 2 : 0;
  c.gates_gain = opt_ptr<T>(a.ln_gates);
  c.cell_ln = opt_ptr<T>(a.ln_cell);
  c.peep = opt_ptr<T>(a.peephole);
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
