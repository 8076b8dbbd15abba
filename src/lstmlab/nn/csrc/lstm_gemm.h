// The step loops' matmuls. In float32 they go to oneDNN's GEMM (the library nn.LSTM's own CPU kernel runs on),
// where this torch has it: on the development machine (an AMD EPYC, whose AVX-512 kernels MKL does not dispatch to)
// oneDNN's is about twice as fast as MKL's (README, Performance). Float64, and a torch without oneDNN, use at::mm.
// LSTMLAB_ONEDNN=0 (or torch.backends.mkldnn.enabled = False) turns it off, for measuring one against the other.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>

namespace at {
namespace native {
// ATen's own entry point (ATen/native/mkldnn/Matmul.cpp; its header is not installed with torch): result =
// beta * result + alpha * mat1 @ mat2, float32 included. Weak, so that a torch without it still loads this library.
__attribute__((weak)) void mkldnn_matmul(const Tensor& mat1, const Tensor& mat2, const Tensor& result, float beta,
                                         float alpha);
}  // namespace native
}  // namespace at

namespace lstmlab {

// Whether this op call's matmuls of this dtype go to oneDNN: decided once per call, outside the step loops.
// torch.backends.mkldnn.enabled = False (userEnabledMkldnn) turns it off too, as it does for torch's own ops.
inline bool onednn_gemm(at::ScalarType dtype) {
  if (&at::native::mkldnn_matmul == nullptr || !at::hasMKLDNN() || !at::globalContext().userEnabledMkldnn() ||
      dtype != at::kFloat) {
    return false;
  }
  const char* env = std::getenv("LSTMLAB_ONEDNN");
  return env == nullptr || env[0] != '0';
}

// out = a @ b (an empty product stays on at::mm, which fills out with zeros)
inline void mm_out(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool onednn) {
  if (onednn && a.numel() != 0 && b.numel() != 0) {
    at::native::mkldnn_matmul(a, b, out, 0.0f, 1.0f);
  } else {
    at::Tensor o = out;
    at::mm_out(o, a, b);
  }
}

// out += a @ b
inline void addmm_(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool onednn) {
  if (onednn && a.numel() != 0 && b.numel() != 0) {
    at::native::mkldnn_matmul(a, b, out, 1.0f, 1.0f);
  } else {
    at::Tensor o = out;
    o.addmm_(a, b);
  }
}

}  // namespace lstmlab
