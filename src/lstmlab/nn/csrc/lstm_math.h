// Branch-free exp, sigmoid and tanh that the compiler vectorises (-O3, -fno-trapping-math): shared by the
// plain and the variant step loops.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

// Always inlined into the loops, where they vectorise: left to its budget, GCC may call them out of line once a
// translation unit holds many loops, which is slower and rounds differently.
#define LSTMLAB_INLINE inline __attribute__((always_inline))

namespace lstmlab {

// exp(x) for float, Cephes-style: 2^n * p(r), r = x - n ln2; error ~1-2 ulp, no branches so it vectorises.
LSTMLAB_INLINE float exp_f(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);  // keep 2^n a normal float (and NaN-free min/max vectorise)
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

LSTMLAB_INLINE double exp_f(double x) { return std::exp(x); }

template <typename T>
LSTMLAB_INLINE T sigmoid(T x) {
  return T(1) / (T(1) + exp_f(-x));
}

// tanh(x) = sign(x) (1 - e^{-2|x|}) / (1 + e^{-2|x|}); absolute error ~1e-7 in float near 0.
template <typename T>
LSTMLAB_INLINE T tanh_(T x) {
  const T a = x < T(0) ? -x : x;
  const T e = exp_f(T(-2) * a);
  const T t = (T(1) - e) / (T(1) + e);
  return x < T(0) ? -t : t;
}

template <>
LSTMLAB_INLINE double tanh_(double x) {
  return std::tanh(x);
}

// tanh with a small RELATIVE error everywhere (~2 ulp): tanh_'s (1 - e) / (1 + e) cancels near 0, where its error is
// ~1e-7 absolute, which a LayerNorm of nearly equal values (1/std up to 316) would amplify. Below |x| = 0.625 an odd
// minimax polynomial (Cephes' tanhf), above it tanh_'s formula; both are computed and one selected, so it vectorises.
LSTMLAB_INLINE float tanh_accurate(float x) {
  const float a = x < 0.0f ? -x : x;
  const float z = x * x;
  const float p = ((((-5.70498872745e-3f * z + 2.06390887954e-2f) * z - 5.37397155531e-2f) * z +
                    1.33314422036e-1f) * z - 3.33332819422e-1f) * z * x + x;
  const float e = exp_f(-2.0f * (a < 0.625f ? 0.625f : a));  // the clamp keeps the unused branch finite and cheap
  const float t = (1.0f - e) / (1.0f + e);
  return a < 0.625f ? p : (x < 0.0f ? -t : t);
}

LSTMLAB_INLINE double tanh_accurate(double x) { return std::tanh(x); }

}  // namespace lstmlab
