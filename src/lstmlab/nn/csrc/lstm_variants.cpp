// The step loops of lstmlab's LSTM variants (issue 12) out of Python: LayerNorm (Ba et al., gates and cell),
// peepholes (Gers et al.), zoneout (a weight per unit and step) and variational recurrent dropout (a mask per
// sequence on the h entering the recurrent product), in any combination, with packed batch_sizes, float and double.
// The equations are lstmlab.nn.cell.lstm_step's; fused.py's variant section holds the same loops in Python (the
// fallback) and documents the buffers, which both kinds of loops fill alike.
//
// forward:  without the gates' LayerNorm, per step ONE matmul [h_in | x_t | 1] @ [W_hh | W_ih | b]^T over xh, as the
//           plain cell (lstm_native.cpp); with it, A = x W_ih^T for all steps in ONE matmul before the loop and per
//           step ONE matmul h_in W_hh^T apart (A and it are each normalised in the row pass). Then ONE pass per row
//           over the gates (LayerNorms, peepholes, activations, c', the cell's LayerNorm, zoneout) that also writes
//           the next step's h_in = h_t * mask (h_in of step 0 is the caller's).
// backward: per step (last to first) ONE pass per row that turns dh, dc into the gradient of the pre-activations
//           (through zoneout, the cell LayerNorm, peepholes, the gates' LayerNorm) and dc_{t-1}, accumulating the
//           column sums of the LayerNorm, peephole and (with the gates' LayerNorm) bias gradients on the way (see
//           kSums); then ONE matmul dh_{t-1} = dR_t W_hh (times the mask, plus zoneout's carry). dx, dW_ih and
//           dW_hh (and db without the gates' LayerNorm) are matmuls over all steps, done in Python after the loop.
//
// LayerNorm in float is computed as the reference computes it, two-pass statistics in float (see normalize_row),
// and held to the reference's accuracy by the fp32 tests (against fp64). In float, 1/std reaches 1/sqrt(eps) ~ 316 on
// rows of nearly equal values, which scales up any rounding before it: so tanh is lstm_math.h's tanh_accurate (small
// relative error near 0) where a LayerNorm runs (the plain cell's tanh_ elsewhere), and zoneout keeps z = 0 or 1
// exact (see zone()).
//
// As in lstm_native.cpp: a batch is cut into row blocks that run the whole sequence on separate threads
// (over_blocks), pointwise loops are plain loops the compiler vectorises, exp is lstm_math.h's branch-free one.
//
// At the end, zoneout_mask: the training-mode zoneout masks of one seed (lstmlab.nn.cell.zoneout_masks).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "lstm_blocks.h"
#include "lstm_gemm.h"
#include "lstm_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using lstmlab::sigmoid;
using lstmlab::tanh_;
// tanh with a small relative error near 0 too (lstm_math.h): a LayerNorm divides differences by their spread.
using lstmlab::tanh_accurate;

// tanh_accurate where a LayerNorm runs (ACC), else the plain cell's tanh_.
template <bool ACC, typename T>
inline T tanh_v(T x) {
  if constexpr (ACC) {
    return tanh_accurate(x);
  } else {
    return tanh_(x);
  }
}

constexpr double kLnEps = 1e-5;  // lstmlab.nn.cell.LN_EPS

// --- the row-block machinery: lstm_blocks.h, shared with lstm_native.cpp ------------------------------------

using lstmlab::live_rows;
using lstmlab::over_blocks;
using lstmlab::over_rows;
using lstmlab::sizes_ptr;

// A slot of per-thread state that no other thread uses at the same time: one per (row block, thread of over_rows),
// `threads` being at::get_num_threads() outside the parallel region. Blocks run in parallel only with over_rows
// inline (thread number 0); over_rows runs in parallel only when there is one block.
int64_t slot(int64_t block, int64_t threads) { return block * threads + at::get_thread_num(); }

bool given(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

void check(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "lstmlab_native: ", name, " must be on the CPU");
  TORCH_CHECK(t.is_contiguous(), "lstmlab_native: ", name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == dtype, "lstmlab_native: ", name, " must have the input's dtype");
}

void check_numel(const at::Tensor& t, int64_t numel, const char* name) {
  TORCH_CHECK(t.numel() == numel, "lstmlab_native: ", name, " has ", t.numel(), " elements, expected ", numel);
}

template <typename T>
const T* opt_ptr(const c10::optional<at::Tensor>& t) {
  return given(t) ? t->data_ptr<T>() : nullptr;
}

// Calls f(std::integral_constant<bool, b>) so that a runtime flag picks a template instantiation.
template <typename F>
void with_flag(bool b, F&& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// --- LayerNorm of one row -----------------------------------------------------------------------------------------
//
// In the row's own dtype, as the reference computes it with torch's float ops (the forward: the mean, d = v - mean,
// the mean of d^2), except the cell LayerNorm's backward, whose two means and result are in double: against fp64
// over 300 random fp32 cases, its rounding was what set the fused LayerNorm's error apart from the reference's
// (max error / (reference's + 3e-5): 7.9 with it in float, 3.3 in double; the gates' backward in float or double
// made no difference).

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

// --- forward -------------------------------------------------------------------------------------------------------

// Zoneout: z * prev + (1 - z) * next, as the reference cell writes it. Not next + z * (prev - next): the compiler
// fuses a multiply into that difference (fp-contract), and the product's rounding error then survives where z = 1
// should give prev exactly -- an error that a LayerNorm in the next layer can scale up by 1/sqrt(eps).
template <typename T>
inline T zone(T z, T prev, T next) {
  return z * prev + (T(1) - z) * next;
}

// One step's rows (pointers at the step's first row of the block; row b at + b * width).
template <typename T>
struct FwdStep {
  int64_t H;
  T* acts;          // (n, 4H): in, the pre-activations A + R; out, i, f, g, o (without the gate LayerNorm)
  T* a_hat;         // (n, 4H): in, x W_ih^T; out, its LayerNorm (gate LayerNorm: acts' own rows)
  T* r_hat;         // (n, 4H): in, h_in W_hh^T; out, its LayerNorm (gate LayerNorm)
  T* rstd;          // (n, 3): 1/std of c_new, A, R
  const T* gain_ih;  // (4H) γ_ih
  const T* gain_hh;  // (4H) γ_hh
  const T* bias;     // (4H) b_ih + b_hh, or zeros (gate LayerNorm: added after the normalisation)
  const T* peep;     // (3, H) p_i, p_f, p_o
  const T* gain_c;   // (H) γ_c
  const T* bias_c;   // (H) β_c
  const T* c_prev;   // (n, H)
  const T* h_prev;   // (n, H)
  T* c_new;          // (n, H) the cell before zoneout (c_t's rows themselves without zoneout)
  T* tc;             // (n, H) tanh of what h reads; ĉ = LN(c_new) with the cell LayerNorm
  T* h;              // (n, H) h_t (after zoneout)
  T* c;              // (n, H) c_t (after zoneout)
  const T* zc;       // zoneout weights of the previous c and h: rows of z_stride
  const T* zh;
  int64_t z_stride;  // H, or 0 when one row of weights serves every row (eval: the probabilities)
  T* h_next;         // the next step's h_in, rows of h_stride (xh's h columns, or extra's h_in), or null
  int64_t h_stride;
  int64_t n_next;    // rows of this step that the next step runs
  const T* mask;     // (n, H) the recurrent-dropout mask, or null
};

// The gates of one row: z (pre-activations, i f g o blocks of H) -> activations in place, c' into cn and, without
// the cell LayerNorm, tanh(c'), h and c after zoneout too. Pointers as restrict parameters, so that the compiler
// knows the rows apart and vectorises the loop.
template <typename T, bool PEEP, bool LNC, bool ZONE, bool ACC>
inline void gates_row(T* __restrict zi, T* __restrict zf, T* __restrict zg, T* __restrict zo,
                      const T* __restrict pi, const T* __restrict pf, const T* __restrict po,
                      const T* __restrict cp, const T* __restrict hp, const T* __restrict zc,
                      const T* __restrict zh, T* __restrict cn, T* __restrict tcb, T* __restrict hb,
                      T* __restrict cb, int64_t H) {
  for (int64_t j = 0; j < H; ++j) {
    T ai = zi[j], af = zf[j], ao = zo[j];
    if constexpr (PEEP) {  // i and f see the previous cell
      ai += pi[j] * cp[j];
      af += pf[j] * cp[j];
    }
    const T i = sigmoid(ai);
    const T f = sigmoid(af);
    const T g = tanh_v<ACC>(zg[j]);
    const T c1 = f * cp[j] + i * g;
    if constexpr (PEEP) {  // o sees the new one
      ao += po[j] * c1;
    }
    const T o = sigmoid(ao);
    zi[j] = i;
    zf[j] = f;
    zg[j] = g;
    zo[j] = o;
    cn[j] = c1;
    if constexpr (!LNC) {
      const T tcj = tanh_v<ACC>(c1);
      tcb[j] = tcj;
      T hv = o * tcj;
      if constexpr (ZONE) {  // keep the previous value with weight z (exactly, for z = 0 or 1: see zone())
        cb[j] = zone(zc[j], cp[j], c1);
        hv = zone(zh[j], hp[j], hv);
      }  // without zoneout cn is c_t's row itself (and cb is not touched)
      hb[j] = hv;
    }
  }
}

// tanh(γ_c ĉ + β_c), what h reads with the cell LayerNorm: one expression for the forward and the backward's
// recomputation, so that both round it alike.
template <typename T>
inline T cell_tanh(T gc, T ch, T bc) {
  return tanh_accurate(gc * ch + bc);
}

// The cell LayerNorm's way out of one row: h = o * tanh(γ_c ĉ + β_c), then zoneout of c and h.
template <typename T, bool ZONE>
inline void cell_out_row(const T* __restrict ch, const T* __restrict gc, const T* __restrict bc,
                         const T* __restrict o, const T* __restrict cn, const T* __restrict cp,
                         const T* __restrict hp, const T* __restrict zc, const T* __restrict zh,
                         T* __restrict hb, T* __restrict cb, int64_t H) {
  for (int64_t j = 0; j < H; ++j) {
    T hv = o[j] * cell_tanh(gc[j], ch[j], bc[j]);
    const T c1 = cn[j];
    if constexpr (ZONE) {
      cb[j] = zone(zc[j], cp[j], c1);
      hv = zone(zh[j], hp[j], hv);
    }  // without zoneout cn is c_t's row itself
    hb[j] = hv;
  }
}

// A pre-activation with the gates' LayerNorm, γ_ih â + γ_hh r̂ + b: one expression for the forward and the
// backward's recomputation, so that both round it alike.
template <typename T>
inline T ln_gate(T a, T ga, T r, T gr, T bias) {
  return a * ga + r * gr + bias;
}

// z = γ_ih â + γ_hh r̂ + b over one row of 4H.
template <typename T>
inline void ln_gates_row(const T* __restrict a, const T* __restrict ga, const T* __restrict r,
                         const T* __restrict gr, const T* __restrict bias, T* __restrict z, int64_t H4) {
  for (int64_t k = 0; k < H4; ++k) {
    z[k] = ln_gate(a[k], ga[k], r[k], gr[k], bias[k]);
  }
}

// The gates' LayerNorm of one row in one pass after the statistics: â = LN(a), r̂ = LN(r) in place (as
// normalize_row rounds them) and z = γ_ih â + γ_hh r̂ + b; rstd[1], rstd[2] = 1/std of a and r.
template <typename T>
inline void ln_gates_forward_row(T* __restrict a, const T* __restrict ga, T* __restrict r, const T* __restrict gr,
                                 const T* __restrict bias, T* __restrict z, T* __restrict rstd, int64_t H4) {
  T ma, mr;
  const T sa = row_rstd(a, H4, &ma), sr = row_rstd(r, H4, &mr);
  for (int64_t k = 0; k < H4; ++k) {
    const T av = (a[k] - ma) * sa, rv = (r[k] - mr) * sr;
    a[k] = av;
    r[k] = rv;
    z[k] = ln_gate(av, ga[k], rv, gr[k], bias[k]);
  }
  rstd[1] = sa;
  rstd[2] = sr;
}

// The next step's h_in from this step's h: h * mask (variational recurrent dropout) or h itself.
template <typename T>
inline void next_input_row(const T* __restrict h, const T* __restrict m, T* __restrict h_in, int64_t H) {
  if (m == nullptr) {
    std::memcpy(h_in, h, sizeof(T) * H);
    return;
  }
  for (int64_t j = 0; j < H; ++j) {
    h_in[j] = h[j] * m[j];
  }
}

template <typename T, bool LNG, bool LNC, bool PEEP, bool ZONE>
void forward_rows(const FwdStep<T>& s, int64_t b0, int64_t b1) {
  const int64_t H = s.H, H4 = 4 * H;
  constexpr bool ACC = LNG || LNC;
  // With the gates' LayerNorm the activations are not kept (the backward recomputes them from â and r̂): each
  // row's go through one scratch row, which stays in the cache.
  std::vector<T> z_row(LNG ? static_cast<size_t>(H4) : 0);
  for (int64_t b = b0; b < b1; ++b) {
    T* const z = LNG ? z_row.data() : s.acts + b * H4;
    if constexpr (LNG) {
      if (b + 1 < b1) {
        prefetch_row(s.a_hat + (b + 1) * H4, H4);
      }
      T* const a = s.a_hat + b * H4;
      T* const r = s.r_hat + b * H4;
      ln_gates_forward_row(a, s.gain_ih, r, s.gain_hh, s.bias, z, s.rstd + b * 3, H4);
    }
    const T* const cp = s.c_prev + b * H;
    const T* const hp = s.h_prev + b * H;
    const T* const zc = ZONE ? s.zc + b * s.z_stride : nullptr;
    const T* const zh = ZONE ? s.zh + b * s.z_stride : nullptr;
    if constexpr (ZONE) {
      if (b + 1 < b1) {
        prefetch_row(zc + s.z_stride, s.z_stride);
        prefetch_row(zh + s.z_stride, s.z_stride);
      }
    }
    T* const cn = s.c_new + b * H;
    gates_row<T, PEEP, LNC, ZONE, ACC>(z, z + H, z + 2 * H, z + 3 * H, s.peep, PEEP ? s.peep + H : nullptr,
                                  PEEP ? s.peep + 2 * H : nullptr, cp, hp, zc, zh, cn, s.tc + b * H, s.h + b * H,
                                  s.c + b * H, H);
    if constexpr (LNC) {  // h = o * tanh(γ_c LN(c') + β_c); c' itself keeps its scale
      T* const ch = s.tc + b * H;  // tcs keeps ĉ (the backward recomputes the tanh)
      s.rstd[b * 3] = normalize_row(cn, ch, H);
      cell_out_row<T, ZONE>(ch, s.gain_c, s.bias_c, z + 3 * H, cn, cp, hp, zc, zh, s.h + b * H, s.c + b * H, H);
    }
    if (s.h_next != nullptr && b < s.n_next) {
      next_input_row(s.h + b * H, s.mask == nullptr ? nullptr : s.mask + b * H, s.h_next + b * s.h_stride, H);
    }
  }
}

template <typename T>
using ForwardRowsFn = void (*)(const FwdStep<T>&, int64_t, int64_t);

template <typename T>
ForwardRowsFn<T> pick_forward(bool lng, bool lnc, bool peep, bool zone) {
  ForwardRowsFn<T> fn = nullptr;
  with_flag(lng, [&](auto LNG) {
    with_flag(lnc, [&](auto LNC) {
      with_flag(peep, [&](auto PEEP) {
        with_flag(zone, [&](auto ZONE) {
          fn = &forward_rows<T, decltype(LNG)::value, decltype(LNC)::value, decltype(PEEP)::value,
                             decltype(ZONE)::value>;
        });
      });
    });
  });
  return fn;
}

// The extra buffer's parts (fused.py's _extra_views): contiguous (T, B, width) blocks of one storage.
template <typename T>
struct Extra {
  T* base;
  T* c_new;
  T* h_in;
  T* r_hat;
  T* rstd;
};

// fused.py's _extra_parts: c_new (H, zoneout; else c_new is cs); h_in (H, gates' LayerNorm); r̂ (4H, gates'
// LayerNorm; â is in acts); rstd (3, either LayerNorm; ĉ is in tcs). Absent parts are null.
template <typename T>
Extra<T> extra_parts(const at::Tensor& extra, int64_t T_, int64_t B, int64_t H, bool lng, bool lnc, bool zone) {
  const int64_t width = (zone ? H : 0) + (lng ? 5 * H : 0) + (lng || lnc ? 3 : 0);
  TORCH_CHECK(extra.dim() == 3 && extra.size(0) == T_ && extra.size(1) == B && extra.size(2) == width,
              "lstmlab_native: extra must be (T, B, ", width, ")");
  T* p = extra.data_ptr<T>();
  const int64_t n = T_ * B;
  auto take = [&](bool present, int64_t w) {
    T* const part = present ? p : nullptr;
    p += present ? n * w : 0;
    return part;
  };
  Extra<T> e{};
  e.base = p;
  e.c_new = take(zone, H);
  e.h_in = take(lng, H);
  e.r_hat = take(lng, 4 * H);
  e.rstd = take(lng || lnc, 3);
  return e;
}

// The bias the gates' LayerNorm adds after normalising, b_ih + b_hh: the given one, or zeros when there is none
// (an undefined tensor without the gates' LayerNorm).
at::Tensor ln_gates_bias(const c10::optional<at::Tensor>& bias, bool lng, int64_t H4, const at::TensorOptions& opt) {
  if (!lng) {
    return at::Tensor();
  }
  return given(bias) ? *bias : at::zeros({H4}, opt);
}

// The zoneout weights: (2, T, B, H), or (2, 1, 1, H) for the same weights at every step and row.
int64_t zoneout_layout(const at::Tensor& zm, int64_t T, int64_t B, int64_t H, int64_t* step_stride) {
  TORCH_CHECK(zm.dim() == 4 && zm.size(0) == 2 && zm.size(3) == H,
              "lstmlab_native: zoneout_mask must be (2, T, B, H) or (2, 1, 1, H)");
  if (zm.size(1) == 1 && zm.size(2) == 1 && (T != 1 || B != 1)) {
    *step_stride = 0;
    return 0;
  }
  TORCH_CHECK(zm.size(1) == T && zm.size(2) == B, "lstmlab_native: zoneout_mask must be (2, T, B, H)");
  *step_stride = B * H;
  return H;
}

// The forward pass of one layer and direction with a variant. x (T, B, I); h0, c0 (B, H); w_ih (4H, I); w_hh
// (4H, H); bias (4H) = b_ih + b_hh or None; ln_gates (2, 4H), ln_cell (2, H), peephole (3, H), recurrent_mask (B, H),
// zoneout_mask as zoneout_layout says, each None when off. Without the gates' LayerNorm, xh (T, B, K) = rows
// [h_in | x_t | 1 | 0...] with step 0's h_in in place and w (4H, K) = [W_hh | W_ih | b | 0...] (fused.py's
// _input_rows, _stacked_weights); with it both are empty, and extra's h_in holds step 0's. Writes acts (T, B, 4H) =
// i, f, g, o; cs, tcs, out (T, B, H) = c_t, tanh of what h reads, h_t; extra (T, B, E) as fused.py's _extra_views;
// each later step's h_in. With the gates' LayerNorm acts holds â instead, LN(x W_ih^T), from which (and r̂) the
// backward recomputes the activations; with the cell LayerNorm tcs holds ĉ = LN(c'), from which it recomputes the
// tanh. With batch_sizes only live rows are written (â's dead rows are zeroed); the caller zeroes the buffers for a
// packed batch.
void variant_forward(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
                     const at::Tensor& w_hh, const c10::optional<at::Tensor>& bias,
                     const c10::optional<at::Tensor>& ln_gates, const c10::optional<at::Tensor>& ln_cell,
                     const c10::optional<at::Tensor>& peephole, const c10::optional<at::Tensor>& recurrent_mask,
                     const c10::optional<at::Tensor>& zoneout_mask, at::Tensor xh, const at::Tensor& w,
                     at::Tensor acts, at::Tensor cs, at::Tensor tcs, at::Tensor out, at::Tensor extra,
                     const c10::optional<at::Tensor>& batch_sizes) {
  const auto dtype = x.scalar_type();
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2), H = c0.size(1), H4 = 4 * H;
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&x, "x"}, {&h0, "h0"}, {&c0, "c0"},
                                {&w_ih, "w_ih"}, {&w_hh, "w_hh"}, {&xh, "xh"}, {&w, "w"}, {&acts, "acts"},
                                {&cs, "cs"}, {&tcs, "tcs"}, {&out, "out"}, {&extra, "extra"}}) {
    check(*t, dtype, name);
  }
  for (const auto& [t, name] : {std::pair<const c10::optional<at::Tensor>*, const char*>{&bias, "bias"},
                                {&ln_gates, "ln_gates"}, {&ln_cell, "ln_cell"}, {&peephole, "peephole"},
                                {&recurrent_mask, "recurrent_mask"}, {&zoneout_mask, "zoneout_mask"}}) {
    if (given(*t)) {
      check(**t, dtype, name);
    }
  }
  check_numel(h0, B * H, "h0");
  check_numel(c0, B * H, "c0");
  check_numel(w_ih, H4 * I, "w_ih");
  check_numel(w_hh, H4 * H, "w_hh");
  check_numel(acts, T * B * H4, "acts");
  check_numel(cs, T * B * H, "cs");
  check_numel(tcs, T * B * H, "tcs");
  check_numel(out, T * B * H, "out");
  if (given(bias)) check_numel(*bias, H4, "bias");
  if (given(ln_gates)) check_numel(*ln_gates, 2 * H4, "ln_gates");
  if (given(ln_cell)) check_numel(*ln_cell, 2 * H, "ln_cell");
  if (given(peephole)) check_numel(*peephole, 3 * H, "peephole");
  if (given(recurrent_mask)) check_numel(*recurrent_mask, B * H, "recurrent_mask");
  const bool lng = given(ln_gates), lnc = given(ln_cell), peep = given(peephole), zone = given(zoneout_mask);
  const bool rmask = given(recurrent_mask);
  const int64_t K = lng ? 0 : w.size(-1);
  if (lng) {
    TORCH_CHECK(xh.numel() == 0 && w.numel() == 0, "lstmlab_native: with the gates' LayerNorm, xh and w are empty");
  } else {
    TORCH_CHECK(w.dim() == 2 && w.size(0) == H4 && K >= H + I && xh.dim() == 3 && xh.size(0) == T &&
                    xh.size(1) == B && xh.size(2) == K,
                "lstmlab_native: xh must be (T, B, K) and w (4H, K), K >= H + I");
  }
  int64_t z_step = 0, z_row = 0;
  if (zone) {
    z_row = zoneout_layout(*zoneout_mask, T, B, H, &z_step);
  }
  const int64_t* const sizes = sizes_ptr(batch_sizes, T);
  if (T == 0 || B == 0) {
    return;
  }
  const at::Tensor flat = extra.view({-1});
  const at::Tensor gates_bias = ln_gates_bias(bias, lng, H4, x.options());
  const bool onednn = lstmlab::onednn_gemm(dtype);  // once per call, not per step
  AT_DISPATCH_FLOATING_TYPES(dtype, "lstmlab_variant_forward", [&] {
    using T_ = scalar_t;
    const Extra<T_> e = extra_parts<T_>(extra, T, B, H, lng, lnc, zone);
    T_* const ap = acts.data_ptr<T_>();
    // The gates' LayerNorm: every step's x W_ih^T in one matmul before the loop, into acts (normalised in place by
    // the row pass into â, b added after the normalisation).
    if (lng) {
      at::Tensor a = acts.view({T * B, H4});
      lstmlab::mm_out(a, x.view({T * B, I}), w_ih.t(), onednn);
      if (sizes != nullptr) {  // rows a packed step does not reach read as zeros, as the Python loop leaves them
        for (int64_t t = 0; t < T; ++t) {
          const int64_t n = live_rows(sizes, t, B);
          if (n < B) {
            std::memset(ap + (t * B + n) * H4, 0, sizeof(T_) * (B - n) * H4);
          }
        }
      }
    }
    const at::Tensor w_t = lng ? w_hh.t() : w.t();  // (H, 4H) or (K, 4H)
    // The h entering each step's recurrent product: rows of h_stride, step 0's written by the caller.
    T_* const h_in = lng ? e.h_in : xh.data_ptr<T_>();
    const int64_t h_stride = lng ? H : K;
    const ForwardRowsFn<T_> rows_fn = pick_forward<T_>(lng, lnc, peep, zone);
    T_* const cp = cs.data_ptr<T_>();
    T_* const tp = tcs.data_ptr<T_>();
    T_* const op = out.data_ptr<T_>();
    const T_* const h0p = h0.data_ptr<T_>();
    const T_* const c0p = c0.data_ptr<T_>();
    const T_* const mp = rmask ? recurrent_mask->data_ptr<T_>() : nullptr;
    const T_* const zp = zone ? zoneout_mask->data_ptr<T_>() : nullptr;
    const int64_t z_half = zone ? zoneout_mask->numel() / 2 : 0;
    const T_* const gates_gain = opt_ptr<T_>(ln_gates);
    const T_* const cell_ln = opt_ptr<T_>(ln_cell);
    const T_* const bias_p = lng ? gates_bias.data_ptr<T_>() : nullptr;
    over_blocks(B, [&](int64_t r0, int64_t r1, int64_t) {
      for (int64_t t = 0; t < T; ++t) {
        const int64_t n = std::min(r1, live_rows(sizes, t, B)) - r0;
        if (n <= 0) {
          break;  // live rows only shrink with t
        }
        const int64_t o1 = (t * B + r0) * H;  // this step's first row, in rows of H
        if (lng) {  // R = h_in W_hh^T, normalised in the row pass
          at::Tensor r_rows = flat.narrow(0, (e.r_hat - e.base) + o1 * 4, n * H4).view({n, H4});
          lstmlab::mm_out(r_rows, flat.narrow(0, (e.h_in - e.base) + o1, n * H).view({n, H}), w_t, onednn);
        } else {  // [h_in | x_t | 1] @ [W_hh | W_ih | b]^T
          at::Tensor g_rows = acts.select(0, t).narrow(0, r0, n);
          lstmlab::mm_out(g_rows, xh.select(0, t).narrow(0, r0, n), w_t, onednn);
        }
        FwdStep<T_> s{};
        s.H = H;
        s.acts = ap + o1 * 4;
        s.a_hat = lng ? ap + o1 * 4 : nullptr;
        s.r_hat = lng ? e.r_hat + o1 * 4 : nullptr;
        s.rstd = (lng || lnc) ? e.rstd + (t * B + r0) * 3 : nullptr;
        s.gain_ih = gates_gain;
        s.gain_hh = lng ? gates_gain + H4 : nullptr;
        s.bias = bias_p;
        s.peep = opt_ptr<T_>(peephole);
        s.gain_c = cell_ln;
        s.bias_c = lnc ? cell_ln + H : nullptr;
        s.c_prev = t == 0 ? c0p + r0 * H : cp + o1 - B * H;
        s.h_prev = t == 0 ? h0p + r0 * H : op + o1 - B * H;
        s.c_new = zone ? e.c_new + o1 : cp + o1;  // without zoneout c' is c_t
        s.tc = tp + o1;
        s.h = op + o1;
        s.c = cp + o1;
        if (zone) {
          s.zc = zp + t * z_step + r0 * z_row;
          s.zh = s.zc + z_half;
          s.z_stride = z_row;
        }
        if (t + 1 < T) {
          s.h_next = h_in + ((t + 1) * B + r0) * h_stride;
          s.h_stride = h_stride;
          s.n_next = std::max<int64_t>(0, std::min(r1, live_rows(sizes, t + 1, B)) - r0);
          s.mask = mp == nullptr ? nullptr : mp + r0 * H;
        }
        over_rows(n, H, [&](int64_t b0, int64_t b1) { rows_fn(s, b0, b1); });
      }
    });
  });
}

// --- backward ------------------------------------------------------------------------------------------------------

// Column sums of the parameter gradients, per thread: [db (4H) | dγ_ih (4H) | dγ_hh (4H) | dγ_c (H) | dβ_c (H) |
// dp_i (H) | dp_f (H) | dp_o (H)]. The rows add into partial sums in their own dtype (so that the row loops keep
// their full vector width), which go into double sums every kFlushRows rows.
constexpr int64_t kSums = 17;    // times H
constexpr int64_t kFlushRows = 32;
// times H: dz (4H, gate LayerNorm), dy (H, cell LayerNorm), zoneout's carry of c (H); with the gates' LayerNorm, the
// recomputed activations (4H) and what their recomputation writes besides (c', tanh, h, c: 4H); with the cell
// LayerNorm, the recomputed tanh (H)
constexpr int64_t kScratch = 15;

template <typename T>
struct BwdStep {
  int64_t H;
  const T* acts;     // (n, 4H) i, f, g, o; â with the gates' LayerNorm
  const T* tc;       // (n, H) tanh of what h read; ĉ with the cell LayerNorm
  const T* c_prev;   // (n, H)
  const T* c_new;    // (n, H)
  const T* a_hat;    // (n, 4H)
  const T* r_hat;    // (n, 4H)
  const T* rstd;     // (n, 3)
  const T* gain_ih;  // (4H)
  const T* gain_hh;  // (4H)
  const T* bias;     // (4H) b_ih + b_hh, or zeros (gate LayerNorm)
  const T* peep;     // (3, H)
  const T* gain_c;   // (H)
  const T* bias_c;   // (H)
  const T* zc;
  const T* zh;
  int64_t z_stride;
  const T* d_out;  // (n, H) the gradient reaching h_t from the output, or null
  T* dh;  // (n, H): in, the gradient reaching h_t from step t+1; out, zoneout's carry to h_{t-1}
  T* dc;  // (n, H): in, dc_t; out, dc_{t-1}
  T* dA;  // (n, 4H): the gradient w.r.t. x W_ih^T (= w.r.t. the pre-activations without the gates' LayerNorm)
  T* dR;  // (n, 4H): the gradient w.r.t. h_in W_hh^T (dA itself without the gates' LayerNorm)
  double* acc;  // sums per slot (kSums * H each)
  T* part;      // partial sums per slot (kSums * H each)
  T* scratch;   // scratch per slot (kScratch * H each)
};

// Backward through h = o * tanh(y) and zoneout, for one row: dzo, the gradient w.r.t. y (into dy with the cell
// LayerNorm, else added to dc), zoneout's kept shares (dh's into dh itself, dc's into carry_c).
template <typename T, bool LNC, bool ZONE, bool OUT>
inline void out_back_row(T* __restrict dh, const T* __restrict d_out, T* __restrict dc, const T* __restrict o,
                         const T* __restrict tc, const T* __restrict zc, const T* __restrict zh,
                         T* __restrict carry_c, T* __restrict dy, T* __restrict dzo, int64_t H) {
  for (int64_t j = 0; j < H; ++j) {
    T dhj = dh[j];
    if constexpr (OUT) {
      dhj += d_out[j];
    }
    T dcj = dc[j];
    if constexpr (ZONE) {  // the kept share goes straight to the previous state
      dh[j] = dhj * zh[j];
      carry_c[j] = dcj * zc[j];
      dhj *= T(1) - zh[j];
      dcj *= T(1) - zc[j];
    }
    const T t = tc[j], oj = o[j];
    const T dyj = dhj * oj * (T(1) - t * t);  // through h = o * tanh(y)
    dzo[j] = dhj * t * oj * (T(1) - oj);
    if constexpr (LNC) {
      dy[j] = dyj;
      dc[j] = dcj;
    } else {
      dc[j] = dcj + dyj;
    }
  }
}

// Backward through c' = f c + i g and the peepholes, for one row: dzi, dzf, dzg and dc_{t-1} (into dc).
template <typename T, bool PEEP, bool ZONE>
inline void cell_back_row(const T* __restrict ai, const T* __restrict af, const T* __restrict ag,
                          const T* __restrict cp, const T* __restrict cn, const T* __restrict pi,
                          const T* __restrict pf, const T* __restrict po, const T* __restrict carry_c,
                          T* __restrict dc, T* __restrict dzi, T* __restrict dzf, T* __restrict dzg,
                          const T* __restrict dzo, T* __restrict acc_pi, T* __restrict acc_pf,
                          T* __restrict acc_po, int64_t H) {
  for (int64_t j = 0; j < H; ++j) {
    const T i = ai[j], f = af[j], g = ag[j];
    T dcj = dc[j];
    if constexpr (PEEP) {  // o saw c'
      dcj += dzo[j] * po[j];
    }
    const T di = dcj * g * i * (T(1) - i);
    const T df = dcj * cp[j] * f * (T(1) - f);
    dzi[j] = di;
    dzf[j] = df;
    dzg[j] = dcj * i * (T(1) - g * g);
    T dcp = dcj * f;
    if constexpr (PEEP) {  // i and f saw c_{t-1}
      dcp += di * pi[j] + df * pf[j];
      acc_pi[j] += di * cp[j];
      acc_pf[j] += df * cp[j];
      acc_po[j] += dzo[j] * cn[j];
    }
    if constexpr (ZONE) {
      dcp += carry_c[j];
    }
    dc[j] = dcp;
  }
}

// Without either LayerNorm, out_back_row and cell_back_row in ONE pass over the row (as the plain cell's backward):
// from dh (+ the output's), dc to the pre-activations' gradient dz, dc_{t-1} and zoneout's carry of h in dh. dz may
// be the activations a themselves: element j of each gate is read before it is written (ivdep).
template <typename T, bool PEEP, bool ZONE, bool OUT>
inline void plain_back_row(T* __restrict dh, const T* __restrict d_out, T* __restrict dc, const T* a,
                           const T* __restrict tc, const T* __restrict cp, const T* __restrict cn,
                           const T* __restrict peep, const T* __restrict zc, const T* __restrict zh, T* dz,
                           T* __restrict acc_p, int64_t H) {
  const T* ai = a;
  const T* af = a + H;
  const T* ag = a + 2 * H;
  const T* ao = a + 3 * H;
  T* dzi = dz;
  T* dzf = dz + H;
  T* dzg = dz + 2 * H;
  T* dzo = dz + 3 * H;
#pragma GCC ivdep
  for (int64_t j = 0; j < H; ++j) {
    T dhj = dh[j];
    if constexpr (OUT) {
      dhj += d_out[j];
    }
    T dcj = dc[j];
    T carry_c = T(0);
    if constexpr (ZONE) {  // the kept share goes straight to the previous state
      dh[j] = dhj * zh[j];
      carry_c = dcj * zc[j];
      dhj *= T(1) - zh[j];
      dcj *= T(1) - zc[j];
    }
    const T i = ai[j], f = af[j], g = ag[j], o = ao[j], t = tc[j];
    const T d_o = dhj * t * o * (T(1) - o);
    dcj += dhj * o * (T(1) - t * t);  // through h = o * tanh(c')
    if constexpr (PEEP) {  // o saw c'
      dcj += d_o * peep[2 * H + j];
    }
    const T di = dcj * g * i * (T(1) - i);
    const T df = dcj * cp[j] * f * (T(1) - f);
    dzi[j] = di;
    dzf[j] = df;
    dzg[j] = dcj * i * (T(1) - g * g);
    dzo[j] = d_o;
    T dcp = dcj * f;
    if constexpr (PEEP) {  // i and f saw c_{t-1}
      dcp += di * peep[j] + df * peep[H + j];
      acc_p[j] += di * cp[j];
      acc_p[H + j] += df * cp[j];
      acc_p[2 * H + j] += d_o * cn[j];
    }
    if constexpr (ZONE) {
      dcp += carry_c;
    }
    dc[j] = dcp;
  }
}

// One step's rows [r0, r1) of one row block, adding their column sums into part; rows up to `end` follow (the
// next one is prefetched).
template <typename T, bool LNG, bool LNC, bool PEEP, bool ZONE, bool OUT>
void backward_some_rows(const BwdStep<T>& s, int64_t r0, int64_t r1, int64_t end, T* __restrict part,
                        T* __restrict scratch) {
  const int64_t H = s.H, H4 = 4 * H;
  if constexpr (!LNG && !LNC) {
    for (int64_t b = r0; b < r1; ++b) {
      if constexpr (ZONE) {
        if (b + 1 < end) {
          prefetch_row(s.zc + (b + 1) * s.z_stride, s.z_stride);
          prefetch_row(s.zh + (b + 1) * s.z_stride, s.z_stride);
        }
      }
      plain_back_row<T, PEEP, ZONE, OUT>(s.dh + b * H, OUT ? s.d_out + b * H : nullptr, s.dc + b * H,
                                         s.acts + b * H4, s.tc + b * H, s.c_prev + b * H, s.c_new + b * H, s.peep,
                                         ZONE ? s.zc + b * s.z_stride : nullptr,
                                         ZONE ? s.zh + b * s.z_stride : nullptr, s.dA + b * H4, part + 14 * H, H);
    }
    return;
  }
  T* const dy = scratch + 4 * H;
  T* const carry_c = scratch + 5 * H;
  T* const acts = scratch + 6 * H;  // the gates' LayerNorm: the activations, recomputed
  T* const spill = scratch + 10 * H;
  for (int64_t b = r0; b < r1; ++b) {
    T* const dc = s.dc + b * H;
    T* const dz = LNG ? scratch : s.dA + b * H4;  // the gradient w.r.t. the pre-activations
    const T* const zc = ZONE ? s.zc + b * s.z_stride : nullptr;
    const T* const zh = ZONE ? s.zh + b * s.z_stride : nullptr;
    if constexpr (LNG) {
      if (b + 1 < end) {
        prefetch_row(s.a_hat + (b + 1) * H4, H4);
        prefetch_row(s.r_hat + (b + 1) * H4, H4);
        if (s.dA != s.a_hat) {
          prefetch_row<1>(s.dA + (b + 1) * H4, H4);
          prefetch_row<1>(s.dR + (b + 1) * H4, H4);
        }
        prefetch_row(s.tc + (b + 1) * H, H);
        prefetch_row(s.c_prev + (b + 1) * H, H);
        prefetch_row(s.c_new + (b + 1) * H, H);
      }
      // the activations, by the forward's own functions on the same â, r̂
      ln_gates_row(s.a_hat + b * H4, s.gain_ih, s.r_hat + b * H4, s.gain_hh, s.bias, acts, H4);
      const T* const cp = s.c_prev + b * H;  // (the h_prev that zoneout would read: any H values do, unused)
      gates_row<T, PEEP, LNC, ZONE, true>(acts, acts + H, acts + 2 * H, acts + 3 * H, s.peep,
                                          PEEP ? s.peep + H : nullptr, PEEP ? s.peep + 2 * H : nullptr, cp, cp, zc,
                                          zh, spill, spill + H, spill + 2 * H, spill + 3 * H, H);
    }
    const T* const a = LNG ? acts : s.acts + b * H4;
    const T* tc = s.tc + b * H;
    if constexpr (LNC) {  // tcs keeps ĉ: the tanh as the forward computed it
      T* const t = scratch + 14 * H;
      for (int64_t j = 0; j < H; ++j) {
        t[j] = cell_tanh(s.gain_c[j], tc[j], s.bias_c[j]);
      }
      tc = t;
    }
    out_back_row<T, LNC, ZONE, OUT>(s.dh + b * H, OUT ? s.d_out + b * H : nullptr, dc, a + 3 * H, tc, zc, zh,
                                    carry_c, dy, dz + 3 * H, H);
    if constexpr (LNC) {  // y = γ_c LN(c') + β_c
      normalize_backward_row(dy, s.gain_c, s.tc + b * H, s.rstd[b * 3], dc, H, part + 12 * H, part + 13 * H);
    }
    cell_back_row<T, PEEP, ZONE>(a, a + H, a + 2 * H, s.c_prev + b * H, s.c_new + b * H, s.peep,
                                 PEEP ? s.peep + H : nullptr, PEEP ? s.peep + 2 * H : nullptr, carry_c, dc, dz,
                                 dz + H, dz + 2 * H, dz + 3 * H, part + 14 * H, part + 15 * H, part + 16 * H, H);
    if constexpr (LNG) {  // z = γ_ih LN(A) + γ_hh LN(R) + b
      // db too (without the gates' LayerNorm, fused.py takes it from the dW matmul)
      ln_gates_backward_row(dz, s.gain_ih, s.a_hat + b * H4, s.rstd[b * 3 + 1], s.gain_hh, s.r_hat + b * H4,
                            s.rstd[b * 3 + 2], s.dA + b * H4, s.dR + b * H4, H4, part + 4 * H, part + 8 * H, part);
    }
  }
}

template <typename T, bool LNG, bool LNC, bool PEEP, bool ZONE, bool OUT>
void backward_rows(const BwdStep<T>& s, int64_t b0, int64_t b1, int64_t slot) {
  constexpr bool SUMS = LNG || LNC || PEEP;
  const int64_t n_sums = SUMS ? kSums * s.H : 0;
  double* const acc = s.acc + slot * kSums * s.H;
  T* const part = s.part + slot * kSums * s.H;
  T* const scratch = s.scratch + slot * kScratch * s.H;
  for (int64_t r0 = b0; r0 < b1; r0 += kFlushRows) {
    std::fill(part, part + n_sums, T(0));
    backward_some_rows<T, LNG, LNC, PEEP, ZONE, OUT>(s, r0, std::min(b1, r0 + kFlushRows), b1, part, scratch);
    for (int64_t k = 0; k < n_sums; ++k) {
      acc[k] += static_cast<double>(part[k]);
    }
  }
}

template <typename T>
using BackwardRowsFn = void (*)(const BwdStep<T>&, int64_t, int64_t, int64_t);

template <typename T>
BackwardRowsFn<T> pick_backward(bool lng, bool lnc, bool peep, bool zone, bool out) {
  BackwardRowsFn<T> fn = nullptr;
  with_flag(lng, [&](auto LNG) {
    with_flag(lnc, [&](auto LNC) {
      with_flag(peep, [&](auto PEEP) {
        with_flag(zone, [&](auto ZONE) {
          with_flag(out, [&](auto OUT) {
            fn = &backward_rows<T, decltype(LNG)::value, decltype(LNC)::value, decltype(PEEP)::value,
                                decltype(ZONE)::value, decltype(OUT)::value>;
          });
        });
      });
    });
  });
  return fn;
}

// Backpropagation through time of variant_forward. acts, cs, tcs, extra: what it saved; dh, dc (B, H): the
// gradients reaching h_T, c_T on entry, h_0, c_0 on exit (dh only if need_dh0). d_out (T, B, H) or None. Writes
// dA (T, B, 4H), the gradient w.r.t. x W_ih^T, and dR (T, B, 4H), w.r.t. h_in W_hh^T (pass dA itself as dR without
// the gates' LayerNorm: both are then the pre-activations' gradient), zero in rows a packed step does not reach;
// sums (17H) gets [db | dγ_ih | dγ_hh | dγ_c | dβ_c | dp_i | dp_f | dp_o] (the parts of absent terms are zero).
void variant_backward(const c10::optional<at::Tensor>& d_out, at::Tensor dh, at::Tensor dc, const at::Tensor& c0,
                      const at::Tensor& w_hh, const c10::optional<at::Tensor>& bias, const at::Tensor& acts,
                      const at::Tensor& cs, const at::Tensor& tcs,
                      const at::Tensor& extra, const c10::optional<at::Tensor>& ln_gates,
                      const c10::optional<at::Tensor>& ln_cell, const c10::optional<at::Tensor>& peephole,
                      const c10::optional<at::Tensor>& recurrent_mask,
                      const c10::optional<at::Tensor>& zoneout_mask, at::Tensor dA, at::Tensor dR, at::Tensor sums,
                      bool need_dh0, const c10::optional<at::Tensor>& batch_sizes) {
  const auto dtype = acts.scalar_type();
  const int64_t T = acts.size(0), B = acts.size(1), H4 = acts.size(2), H = H4 / 4;
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&dh, "dh"}, {&dc, "dc"}, {&c0, "c0"},
                                {&w_hh, "w_hh"}, {&acts, "acts"}, {&cs, "cs"}, {&tcs, "tcs"}, {&extra, "extra"},
                                {&dA, "dA"}, {&dR, "dR"}, {&sums, "sums"}}) {
    check(*t, dtype, name);
  }
  for (const auto& [t, name] : {std::pair<const c10::optional<at::Tensor>*, const char*>{&d_out, "d_out"},
                                {&bias, "bias"}, {&ln_gates, "ln_gates"}, {&ln_cell, "ln_cell"}, {&peephole, "peephole"},
                                {&recurrent_mask, "recurrent_mask"}, {&zoneout_mask, "zoneout_mask"}}) {
    if (given(*t)) {
      check(**t, dtype, name);
    }
  }
  check_numel(dh, B * H, "dh");
  check_numel(dc, B * H, "dc");
  check_numel(c0, B * H, "c0");
  check_numel(w_hh, H4 * H, "w_hh");
  check_numel(cs, T * B * H, "cs");
  check_numel(tcs, T * B * H, "tcs");
  check_numel(dA, T * B * H4, "dA");
  check_numel(dR, T * B * H4, "dR");
  check_numel(sums, kSums * H, "sums");
  if (given(d_out)) check_numel(*d_out, T * B * H, "d_out");
  if (given(bias)) check_numel(*bias, H4, "bias");
  if (given(ln_gates)) check_numel(*ln_gates, 2 * H4, "ln_gates");
  if (given(ln_cell)) check_numel(*ln_cell, 2 * H, "ln_cell");
  if (given(peephole)) check_numel(*peephole, 3 * H, "peephole");
  if (given(recurrent_mask)) check_numel(*recurrent_mask, B * H, "recurrent_mask");
  const bool lng = given(ln_gates), lnc = given(ln_cell), peep = given(peephole), zone = given(zoneout_mask);
  const bool rmask = given(recurrent_mask);
  TORCH_CHECK(lng || dA.data_ptr() == dR.data_ptr(),
              "lstmlab_native.variant_backward: without the gates' LayerNorm, dR must be dA");
  int64_t z_step = 0, z_row = 0;
  if (zone) {
    z_row = zoneout_layout(*zoneout_mask, T, B, H, &z_step);
  }
  const int64_t* const sizes = sizes_ptr(batch_sizes, T);
  const int64_t threads = at::get_num_threads();
  const int64_t n_slots = threads * threads;
  std::vector<double> acc(static_cast<size_t>(n_slots * kSums * H), 0.0);
  at::Tensor dh_next = at::empty_like(dh);  // the step reads dh while the matmul writes dh_next
  const at::Tensor gates_bias = ln_gates_bias(bias, lng, H4, acts.options());
  const bool onednn = lstmlab::onednn_gemm(dtype);  // once per call, not per step
  AT_DISPATCH_FLOATING_TYPES(dtype, "lstmlab_variant_backward", [&] {
    using T_ = scalar_t;
    const Extra<T_> e = extra_parts<T_>(extra, T, B, H, lng, lnc, zone);
    std::vector<T_> scratch(static_cast<size_t>(n_slots * kScratch * H));
    std::vector<T_> part(static_cast<size_t>(n_slots * kSums * H));
    const T_* const dop = given(d_out) ? d_out->data_ptr<T_>() : nullptr;
    const BackwardRowsFn<T_> rows_fn = pick_backward<T_>(lng, lnc, peep, zone, dop != nullptr);
    const T_* const ap = acts.data_ptr<T_>();
    const T_* const cp = cs.data_ptr<T_>();
    const T_* const tp = tcs.data_ptr<T_>();
    const T_* const c0p = c0.data_ptr<T_>();
    const T_* const mp = rmask ? recurrent_mask->data_ptr<T_>() : nullptr;
    const T_* const zp = zone ? zoneout_mask->data_ptr<T_>() : nullptr;
    const int64_t z_half = zone ? zoneout_mask->numel() / 2 : 0;
    const T_* const gates_gain = opt_ptr<T_>(ln_gates);
    T_* const dAp = dA.data_ptr<T_>();
    T_* const dRp = dR.data_ptr<T_>();
    T_* const dcp = dc.data_ptr<T_>();
    over_blocks(B, [&](int64_t r0, int64_t r1, int64_t block) {
      const int64_t rows = r1 - r0;
      at::Tensor cur = dh.narrow(0, r0, rows), next = dh_next.narrow(0, r0, rows);
      for (int64_t t = T - 1; t >= 0; --t) {
        const int64_t n = std::max<int64_t>(0, std::min(r1, live_rows(sizes, t, B)) - r0);
        if (n < rows) {  // rows a packed step does not reach get no gradient
          std::memset(dAp + (t * B + r0 + n) * H4, 0, sizeof(T_) * (rows - n) * H4);
          if (lng) {
            std::memset(dRp + (t * B + r0 + n) * H4, 0, sizeof(T_) * (rows - n) * H4);
          }
        }
        if (n == 0) {
          continue;  // going backwards, live rows only grow
        }
        const int64_t o1 = (t * B + r0) * H;
        T_* const dh_t = cur.data_ptr<T_>();
        BwdStep<T_> s{};
        s.H = H;
        s.acts = ap + o1 * 4;
        s.tc = tp + o1;
        s.c_prev = t > 0 ? cp + o1 - B * H : c0p + r0 * H;
        s.c_new = zone ? e.c_new + o1 : cp + o1;
        s.a_hat = lng ? ap + o1 * 4 : nullptr;
        s.r_hat = lng ? e.r_hat + o1 * 4 : nullptr;
        s.rstd = (lng || lnc) ? e.rstd + (t * B + r0) * 3 : nullptr;
        s.gain_ih = gates_gain;
        s.gain_hh = lng ? gates_gain + H4 : nullptr;
        s.bias = lng ? gates_bias.data_ptr<T_>() : nullptr;
        s.peep = opt_ptr<T_>(peephole);
        s.gain_c = opt_ptr<T_>(ln_cell);
        s.bias_c = lnc ? s.gain_c + H : nullptr;
        if (zone) {
          s.zc = zp + t * z_step + r0 * z_row;
          s.zh = s.zc + z_half;
          s.z_stride = z_row;
        }
        s.d_out = dop == nullptr ? nullptr : dop + o1;
        s.dh = dh_t;
        s.dc = dcp + r0 * H;
        s.dA = dAp + o1 * 4;
        s.dR = dRp + o1 * 4;
        s.acc = acc.data();
        s.part = part.data();
        s.scratch = scratch.data();
        over_rows(n, H, [&](int64_t b0, int64_t b1) { rows_fn(s, b0, b1, slot(block, threads)); });
        if (t > 0 || need_dh0) {
          if (n < rows) {  // rows past this step keep their dh: carry them into the buffer that becomes cur
            next.narrow(0, n, rows - n).copy_(cur.narrow(0, n, rows - n));
          }
          at::Tensor next_rows = next.narrow(0, 0, n);
          lstmlab::mm_out(next_rows, dR.select(0, t).narrow(0, r0, n), w_hh, onednn);  // through h_in W_hh^T
          if (mp != nullptr || zone) {  // dh_{t-1} = (dR_t W_hh) * mask + zoneout's carry
            T_* __restrict nx = next_rows.data_ptr<T_>();
            const T_* __restrict carry = dh_t;
            const T_* __restrict m = mp != nullptr ? mp + r0 * H : nullptr;
            if (m != nullptr && zone) {
              for (int64_t k = 0; k < n * H; ++k) nx[k] = nx[k] * m[k] + carry[k];
            } else if (m != nullptr) {
              for (int64_t k = 0; k < n * H; ++k) nx[k] *= m[k];
            } else {
              for (int64_t k = 0; k < n * H; ++k) nx[k] += carry[k];
            }
          }
          std::swap(cur, next);
        }
      }
      if (cur.data_ptr() != dh.data_ptr<T_>() + r0 * H) {
        dh.narrow(0, r0, rows).copy_(cur);
      }
    });
    T_* const sp = sums.data_ptr<T_>();
    for (int64_t k = 0; k < kSums * H; ++k) {
      double total = 0.0;
      for (int64_t q = 0; q < n_slots; ++q) {
        total += acc[q * kSums * H + k];
      }
      sp[k] = static_cast<T_>(total);
    }
  });
}

// --- zoneout masks: element k of the flat (2, T, B, H) mask is 1 iff the high 32 bits of SplitMix64's k-th output
// from `seed` (Steele et al. 2014; a pure function of seed + (k + 1) * gamma, so any thread draws any element) are
// below the plane's threshold round(z * 2^32). lstmlab.nn.masks.zoneout_mask_torch computes the same bits in torch.

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;

inline uint64_t splitmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

template <typename T_>
void fill_zoneout(T_* out, uint64_t seed, int64_t plane, const uint64_t (&threshold)[2]) {
  at::parallel_for(0, 2 * plane, lstmlab::kParallelElems, [&](int64_t k0, int64_t k1) {
    for (int64_t p = 0; p < 2; ++p) {
      const int64_t lo = std::max(k0, p * plane), hi = std::min(k1, (p + 1) * plane);
      const uint64_t thr = threshold[p];
      for (int64_t k = lo; k < hi; ++k) {
        const uint64_t bits = splitmix64(seed + static_cast<uint64_t>(k + 1) * kGolden) >> 32;
        out[k] = bits < thr ? T_(1) : T_(0);
      }
    }
  });
}

void zoneout_mask(int64_t seed, int64_t threshold_c, int64_t threshold_h, at::Tensor out) {
  TORCH_CHECK(out.device().is_cpu() && out.is_contiguous(), "lstmlab_native: out must be a contiguous CPU tensor");
  TORCH_CHECK(out.dim() >= 1 && out.size(0) == 2, "lstmlab_native: out must have 2 planes (c, h)");
  TORCH_CHECK(0 <= threshold_c && threshold_c <= (int64_t{1} << 32) && 0 <= threshold_h &&
                  threshold_h <= (int64_t{1} << 32),
              "lstmlab_native: zoneout thresholds must lie in [0, 2^32]");
  const uint64_t threshold[2] = {static_cast<uint64_t>(threshold_c), static_cast<uint64_t>(threshold_h)};
  const int64_t plane = out.numel() / 2;
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "lstmlab_zoneout_mask", [&] {
    fill_zoneout<scalar_t>(out.data_ptr<scalar_t>(), static_cast<uint64_t>(seed), plane, threshold);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lstmlab_native, m) {
  m.def(
      "variant_forward(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? bias, Tensor? ln_gates, "
      "Tensor? ln_cell, Tensor? peephole, Tensor? recurrent_mask, Tensor? zoneout_mask, Tensor(f!) xh, Tensor w, "
      "Tensor(a!) acts, Tensor(b!) cs, Tensor(c!) tcs, Tensor(d!) out, Tensor(e!) extra, Tensor? batch_sizes) -> ()");
  m.def(
      "variant_backward(Tensor? d_out, Tensor(a!) dh, Tensor(b!) dc, Tensor c0, Tensor w_hh, Tensor? bias, Tensor acts, "
      "Tensor cs, Tensor tcs, Tensor extra, Tensor? ln_gates, Tensor? ln_cell, Tensor? peephole, "
      "Tensor? recurrent_mask, Tensor? zoneout_mask, Tensor(c!) dA, Tensor(d!) dR, Tensor(e!) sums, "
      "bool need_dh0, Tensor? batch_sizes) -> ()");
  m.def("zoneout_mask(int seed, int threshold_c, int threshold_h, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(lstmlab_native, CPU, m) {
  m.impl("variant_forward", &variant_forward);
  m.impl("variant_backward", &variant_backward);
  m.impl("zoneout_mask", &zoneout_mask);
}
