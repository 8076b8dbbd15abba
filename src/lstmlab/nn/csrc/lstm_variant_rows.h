// What the variants' forward (lstm_variant_forward.h) and backward (lstm_variant_backward.h) share: the gates of
// one row (the backward recomputes them with the gates' LayerNorm, by the same functions, so that both round alike),
// the layout of the extra buffer and of the zoneout weights, and the per-thread slots.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "lstm_args.h"
#include "lstm_math.h"

#include <cstdint>
#include <type_traits>

namespace lstmlab {
// Internal linkage, as all of the one translation unit that includes this (lstm_variants.cpp).
namespace {

// tanh_accurate where a LayerNorm runs (ACC), else the plain cell's tanh_.
template <bool ACC, typename T>
LSTMLAB_INLINE T tanh_v(T x) {  // (always inlined, as the functions it picks)
  if constexpr (ACC) {
    return tanh_accurate(x);
  } else {
    return tanh_(x);
  }
}

// A slot of per-thread state that no other thread uses at the same time: one per (row block, thread of over_rows),
// `threads` being at::get_num_threads() outside the parallel region. Blocks run in parallel only with over_rows
// inline (thread number 0); over_rows runs in parallel only when there is one block.
inline int64_t slot(int64_t block, int64_t threads) { return block * threads + at::get_thread_num(); }

// Calls f(std::integral_constant<bool, b>) so that a runtime flag picks a template instantiation.
template <typename F>
void with_flag(bool b, F&& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Zoneout: z * prev + (1 - z) * next, as the reference cell writes it. Not next + z * (prev - next): the compiler
// fuses a multiply into that difference (fp-contract), and the product's rounding error then survives where z = 1
// should give prev exactly -- an error that a LayerNorm in the next layer can scale up by 1/sqrt(eps).
template <typename T>
inline T zone(T z, T prev, T next) {
  return z * prev + (T(1) - z) * next;
}

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
inline at::Tensor ln_gates_bias(const c10::optional<at::Tensor>& bias, bool lng, int64_t H4,
                                const at::TensorOptions& opt) {
  if (!lng) {
    return at::Tensor();
  }
  return given(bias) ? *bias : at::zeros({H4}, opt);
}

// The zoneout weights: (2, T, B, H), or (2, 1, 1, H) for the same weights at every step and row.
inline int64_t zoneout_layout(const at::Tensor& zm, int64_t T, int64_t B, int64_t H, int64_t* step_stride) {
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

}  // namespace
}  // namespace lstmlab
