// The step loops' matmuls. In float32 they may go to oneDNN's GEMM (the library nn.LSTM's own CPU kernel runs on):
// on an AMD EPYC with AVX-512, whose AVX-512 kernels MKL does not dispatch to, it is about twice as fast as at::mm
// (docs/performance.md). Its entry point, at::native::mkldnn_matmul, is ATen's own and not public: on x86 its float32
// branch refuses every CPU without AVX-512 (and older torch releases refuse float32 on any x86 CPU). So it is used
// only after a probe: once per process, a small product of each layout the loops use, inside try/catch and compared
// with at::mm. Where the probe fails, or a later call raises, everything runs on at::mm (public API) for the rest of
// the process. Float64 always uses at::mm. LSTMLAB_ONEDNN=0 (or torch.backends.mkldnn.enabled = False) turns oneDNN
// off, for measuring one against the other.
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <cstdlib>
#include <exception>
#include <iostream>
#include <mutex>
#include <string>

// The weak declaration needs the ELF/GNU toolchain; elsewhere (MSVC, macOS) the loops use at::mm only.
#if defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define LSTMLAB_HAVE_ONEDNN_ENTRY 1
namespace at {
namespace native {
// ATen/native/mkldnn/Matmul.cpp (header not installed): result = beta * result + alpha * mat1 @ mat2. Weak, so
// that a torch without it still loads this library.
__attribute__((weak)) void mkldnn_matmul(const Tensor& mat1, const Tensor& mat2, const Tensor& result, float beta,
                                         float alpha);
}  // namespace native
}  // namespace at
#else
#define LSTMLAB_HAVE_ONEDNN_ENTRY 0
#endif

namespace lstmlab {

// What the probe found, process-wide: whether oneDNN's float32 GEMM may run, and the one-line reason when not.
struct OnednnState {
  std::once_flag probed;
  std::atomic<bool> usable{false};
  std::mutex reason_lock;
  std::string reason = "not probed yet";

  void refuse(const std::string& why) {
    usable.store(false);
    const std::lock_guard<std::mutex> hold(reason_lock);
    reason = why;
  }
};

inline OnednnState& onednn_state() {
  static OnednnState state;  // one per process, like the library's ops
  return state;
}

// The first line of an exception's message (ATen's add a C++ stack trace after it).
inline std::string first_line(const char* what) {
  std::string s(what == nullptr ? "" : what);
  const size_t end = s.find('\n');
  return end == std::string::npos ? s : s.substr(0, end);
}

inline void onednn_call(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, float beta) {
#if LSTMLAB_HAVE_ONEDNN_ENTRY
  at::native::mkldnn_matmul(a, b, out, beta, 1.0f);
#else
  (void)out, (void)a, (void)b, (void)beta;
  TORCH_CHECK(false, "no oneDNN entry point in this build");
#endif
}

// Deterministic values (the probe must not draw from torch's generator: that would change the user's random stream).
inline at::Tensor probe_values(int64_t rows, int64_t cols, double phase) {
  return at::sin(at::arange(rows * cols, at::kFloat).mul_(0.37).add_(phase)).view({rows, cols});
}

// The layouts the loops use: a row block times a transposed weight (forward), times a plain one (backward), a
// transposed activation block times a plain one (weight gradients), and out += a @ b.
inline std::string run_probe() {
  try {
    const at::Tensor a = probe_values(7, 40, 0.1), w = probe_values(24, 40, 0.7), v = probe_values(40, 24, 1.3);
    const at::Tensor cases[3][2] = {{a, w.t()}, {a, v}, {probe_values(40, 7, 2.1).t(), v}};
    for (const auto& c : cases) {
      at::Tensor got = at::empty({c[0].size(0), c[1].size(1)}, c[0].options());
      onednn_call(got, c[0], c[1], 0.0f);
      const at::Tensor want = at::mm(c[0], c[1]);
      onednn_call(got, c[0], c[1], 1.0f);  // got = 2 * want
      if (!at::allclose(got, want * 2, 1e-4, 1e-4)) {
        return "oneDNN's float32 GEMM disagreed with at::mm on this CPU";
      }
    }
  } catch (const std::exception& e) {
    return "oneDNN refused float32 on this CPU: " + first_line(e.what());
  }
  return "";
}

inline void probe_onednn() {
  OnednnState& s = onednn_state();
  std::call_once(s.probed, [&s] {
    if (!LSTMLAB_HAVE_ONEDNN_ENTRY) {
      s.refuse("this build has no oneDNN entry point");
      return;
    }
#if LSTMLAB_HAVE_ONEDNN_ENTRY
    if (&at::native::mkldnn_matmul == nullptr || !at::hasMKLDNN()) {
      s.refuse("this torch has no oneDNN");
      return;
    }
#endif
    const std::string why = run_probe();
    if (why.empty()) {
      s.usable.store(true);
      const std::lock_guard<std::mutex> hold(s.reason_lock);
      s.reason = "";
    } else {
      s.refuse(why);
    }
  });
}

// Why the float32 matmuls do not run on oneDNN ("" when they do), for lstmlab bench's header.
inline std::string onednn_off_reason() {
  const char* env = std::getenv("LSTMLAB_ONEDNN");
  if (env != nullptr && env[0] == '0') {
    return "LSTMLAB_ONEDNN=0";
  }
  if (!at::globalContext().userEnabledMkldnn()) {
    return "torch.backends.mkldnn.enabled is False";
  }
  probe_onednn();
  OnednnState& s = onednn_state();
  const std::lock_guard<std::mutex> hold(s.reason_lock);
  return s.usable.load() ? "" : s.reason;
}

// Whether this op call's matmuls of this dtype go to oneDNN: decided once per call, outside the step loops.
// torch.backends.mkldnn.enabled = False (userEnabledMkldnn) turns it off too, as it does for torch's own ops.
inline bool onednn_gemm(at::ScalarType dtype) {
  if (dtype != at::kFloat) {
    return false;
  }
  const char* env = std::getenv("LSTMLAB_ONEDNN");
  if ((env != nullptr && env[0] == '0') || !at::globalContext().userEnabledMkldnn()) {
    return false;
  }
  probe_onednn();
  return onednn_state().usable.load();
}

// A oneDNN call that raised after the probe passed: this call and every later one go to at::mm (one line, once).
inline void onednn_failed(const std::exception& e) {
  OnednnState& s = onednn_state();
  if (s.usable.exchange(false)) {
    s.refuse("oneDNN raised after its probe passed: " + first_line(e.what()));
    std::cerr << "lstmlab: warning: oneDNN's GEMM failed (" << first_line(e.what())
              << "); the fast loops use at::mm for the rest of this process" << std::endl;
  }
}

// out = beta * out + a @ b; an empty product stays on at::mm, which fills out with zeros.
inline void gemm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool onednn, float beta) {
  if (onednn && a.numel() != 0 && b.numel() != 0 && onednn_state().usable.load()) {
    try {
      onednn_call(out, a, b, beta);
      return;
    } catch (const std::exception& e) {
      onednn_failed(e);  // then at::mm below: out is rewritten whole (beta = 1 only reads it, oneDNN wrote nothing)
    }
  }
  at::Tensor o = out;
  if (beta == 0.0f) {
    at::mm_out(o, a, b);
  } else {
    o.addmm_(a, b);
  }
}

// out = a @ b
inline void mm_out(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool onednn) {
  gemm(out, a, b, onednn, 0.0f);
}

// out += a @ b
inline void addmm_(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool onednn) {
  gemm(out, a, b, onednn, 1.0f);
}

}  // namespace lstmlab
