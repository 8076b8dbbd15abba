// LayerNorm of one row for the variants' step loops (lstm_variant_forward.h, lstm_variant_backward.h): the
// statistics, the normalisation and their backward, with GCC/Clang vector-extension sums.
//
// In the row's own dtype, as the reference computes it with torch's float ops (the forward: the mean, d = v - mean,
// the mean of d^2), except the cell LayerNorm's backward, whose two means and result are in double: against fp64
// over 300 random fp32 cases, its rounding was what set the fused LayerNorm's error apart from the reference's
// (max error / (reference's + 3e-5): 7.9 with it in float, 3.3 in double; the gates' backward in float or double
// made no difference).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace lstmlab {
// Internal linkage, as all of the one translation unit that includes this (lstm_variants.cpp).
namespace {

constexpr double kLnEps = 1e-5;  // lstmlab.nn.cell.LN_EPS

// The vector of W = 64 / sizeof(Acc) values of Acc from p[0..W) (GCC/Clang vector extensions, 64 bytes: one
// AVX-512 register where the CPU has them).
template <typename Acc, typename T>
inline auto load_vec(const T* p) {
  typedef Acc V __attribute__((vector_size(64)));
  typedef T U __attribute__((vector_size(64 / sizeof(Acc) * sizeof(T))));
  U u;
  std::memcpy(&u, p, sizeof(U));
  return __builtin_convertvector(u, V);
}

// Σ term(k) over N values in Acc, term(k) giving the vector of values k.. (load_vec) and one(k) the value k alone:
// four independent vector partial sums, so that the additions neither wait on each other nor go through memory,
// then the tail.
template <typename Acc, typename Term, typename One>
inline Acc row_sum(int64_t N, Term term, One one) {
  typedef Acc V __attribute__((vector_size(64)));
  constexpr int64_t W = 64 / sizeof(Acc);
  V s0{}, s1{}, s2{}, s3{};
  int64_t k = 0;
  for (; k + 4 * W <= N; k += 4 * W) {
    s0 += term(k);
    s1 += term(k + W);
    s2 += term(k + 2 * W);
    s3 += term(k + 3 * W);
  }
  for (; k + W <= N; k += W) {
    s0 += term(k);
  }
  const V s = (s0 + s1) + (s2 + s3);
  Acc r = Acc(0);
  for (int64_t l = 0; l < W; ++l) {
    r += s[l];
  }
  for (; k < N; ++k) {
    r += one(k);
  }
  return r;
}

// Σ a[k] (* b[k] (* c[k])) over N values in Acc, b and c optional.
template <typename Acc, typename T>
inline Acc row_dot(const T* a, const T* b, const T* c, int64_t N) {
  const auto term = [&](int64_t k) {
    auto v = load_vec<Acc>(a + k);
    if (b != nullptr) v *= load_vec<Acc>(b + k);
    if (c != nullptr) v *= load_vec<Acc>(c + k);
    return v;
  };
  const auto one = [&](int64_t k) {
    Acc v = static_cast<Acc>(a[k]);
    if (b != nullptr) v *= static_cast<Acc>(b[k]);
    if (c != nullptr) v *= static_cast<Acc>(c[k]);
    return v;
  };
  return row_sum<Acc>(N, term, one);
}

// Σ (v[k] - mean)^2 over N values, in T (the rounding of normalize_row's d = v - mean, then Σ d * d).
template <typename T>
inline T row_sq_dev(const T* v, T mean, int64_t N) {
  const auto term = [&](int64_t k) {
    const auto d = load_vec<T>(v + k) - mean;
    return d * d;
  };
  const auto one = [&](int64_t k) {
    const T d = v[k] - mean;
    return d * d;
  };
  return row_sum<T>(N, term, one);
}

// The LayerNorm statistics of N values: their mean into *mean, and 1/sqrt(var + eps) returned (biased variance,
// two passes).
template <typename T>
inline T row_rstd(const T* v, int64_t N, T* mean) {
  const T n = static_cast<T>(N);
  *mean = row_dot<T, T>(v, nullptr, nullptr, N) / n;
  return T(1) / std::sqrt(row_sq_dev(v, *mean, N) / n + static_cast<T>(kLnEps));
}

// hat = (v - mean) / sqrt(var + eps) over N values (hat may be v itself); returns 1/sqrt(var + eps).
template <typename T>
T normalize_row(const T* v, T* hat, int64_t N) {
  T mean;
  const T rstd = row_rstd(v, N, &mean);
  for (int64_t j = 0; j < N; ++j) {
    hat[j] = (v[j] - mean) * rstd;
  }
  return rstd;
}

// The gradient w.r.t. v of y = gamma * LN(v), from dy: rstd * (g - mean(g) - hat * mean(g * hat)), g = dy * gamma,
// ADDED to dv (which may not alias dy). Also adds dy * hat into acc_gamma and dy into acc_beta (the gain's and
// the bias's gradients).
template <typename T>
void normalize_backward_row(const T* __restrict dy, const T* __restrict gamma, const T* __restrict hat, T rstd,
                            T* __restrict dv, int64_t N, T* __restrict acc_gamma, T* __restrict acc_beta) {
  const double n = static_cast<double>(N);
  const T* const none = nullptr;
  const double m1 = row_dot<double>(dy, gamma, none, N) / n;
  const double m2 = row_dot<double>(dy, gamma, hat, N) / n;
  const double r = static_cast<double>(rstd);
  for (int64_t k = 0; k < N; ++k) {
    const double g = static_cast<double>(dy[k]) * static_cast<double>(gamma[k]);
    dv[k] += static_cast<T>((g - m1 - static_cast<double>(hat[k]) * m2) * r);
    acc_gamma[k] += dy[k] * hat[k];
    acc_beta[k] += dy[k];
  }
}

// The gates' LayerNorm backward for one row: z = γ_ih LN(A) + γ_hh LN(R) + b, from dz to dA and dR (as
// normalize_backward_row for each, in T), adding dz * â, dz * r̂ and dz into the gains' and the bias's sums. Two
// passes: the four means and the sums (four independent vector partial sums), then dA and dR, which may be â and r̂
// themselves (each value is read before it is written).
template <typename T>
void ln_gates_backward_row(const T* __restrict dz, const T* __restrict gain_a, const T* a_hat, T rstd_a,
                           const T* __restrict gain_r, const T* r_hat, T rstd_r, T* dA, T* dR, int64_t N,
                           T* __restrict acc_a, T* __restrict acc_r, T* __restrict acc_b) {
  typedef T V __attribute__((vector_size(64)));
  constexpr int64_t W = 64 / sizeof(T);
  const auto add_to = [](T* p, V v) {
    V u;
    std::memcpy(&u, p, sizeof(V));
    u += v;
    std::memcpy(p, &u, sizeof(V));
  };
  V s1{}, s2{}, s3{}, s4{};
  int64_t k = 0;
  for (; k + W <= N; k += W) {
    const V d = load_vec<T>(dz + k), av = load_vec<T>(a_hat + k), rv = load_vec<T>(r_hat + k);
    const V ga = d * load_vec<T>(gain_a + k), gr = d * load_vec<T>(gain_r + k);
    s1 += ga;
    s2 += ga * av;
    s3 += gr;
    s4 += gr * rv;
    add_to(acc_a + k, d * av);
    add_to(acc_r + k, d * rv);
    add_to(acc_b + k, d);
  }
  T m1 = T(0), m2 = T(0), m3 = T(0), m4 = T(0);
  for (int64_t l = 0; l < W; ++l) {
    m1 += s1[l];
    m2 += s2[l];
    m3 += s3[l];
    m4 += s4[l];
  }
  for (; k < N; ++k) {
    const T d = dz[k], ga = d * gain_a[k], gr = d * gain_r[k];
    m1 += ga;
    m2 += ga * a_hat[k];
    m3 += gr;
    m4 += gr * r_hat[k];
    acc_a[k] += d * a_hat[k];
    acc_r[k] += d * r_hat[k];
    acc_b[k] += d;
  }
  const T n = static_cast<T>(N);
  m1 /= n;
  m2 /= n;
  m3 /= n;
  m4 /= n;
#pragma GCC ivdep
  for (int64_t j = 0; j < N; ++j) {
    const T d = dz[j], av = a_hat[j], rv = r_hat[j];
    dA[j] = (d * gain_a[j] - m1 - av * m2) * rstd_a;
    dR[j] = (d * gain_r[j] - m3 - rv * m4) * rstd_r;
  }
}

// Asks for the next row's n values of p in the cache while this row computes (the variants' LayerNorm rows come
// from (T, B, 4H) buffers written long before, and each waits on their loads otherwise).
template <int RW = 0, typename T>
inline void prefetch_row(const T* p, int64_t n) {
  for (int64_t k = 0; k < n; k += 64 / static_cast<int64_t>(sizeof(T))) {
    __builtin_prefetch(p + k, RW);
  }
}

}  // namespace
}  // namespace lstmlab
