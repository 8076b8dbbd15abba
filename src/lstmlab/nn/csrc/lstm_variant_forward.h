// The forward step loop of lstmlab's LSTM variants (lstm_variants.cpp says which, and compiles it): what both
// directions share is in lstm_variant_rows.h and lstm_rownorm.h.
//
// Without the gates' LayerNorm, per step ONE matmul [h_in | x_t | 1] @ [W_hh | W_ih | b]^T over xh, as the plain
// cell (lstm_native.cpp); with it, A = x W_ih^T for all steps in ONE matmul before the loop and per step ONE matmul
// h_in W_hh^T apart (A and it are each normalised in the row pass). Then ONE pass per row over the gates
// (LayerNorms, peepholes, activations, c', the cell's LayerNorm, zoneout) that also writes the next step's
// h_in = h_t * mask (h_in of step 0 is the caller's).
//
// LayerNorm in float is computed as the reference computes it, two-pass statistics in float (see normalize_row),
// and held to the reference's accuracy by the fp32 tests (against fp64). In float, 1/std reaches 1/sqrt(eps) ~ 316 on
// rows of nearly equal values, which scales up any rounding before it: so tanh is lstm_math.h's tanh_accurate (small
// relative error near 0) where a LayerNorm runs (the plain cell's tanh_ elsewhere), and zoneout keeps z = 0 or 1
// exact (see zone()).
//
// As in lstm_native.cpp: a batch is cut into row blocks that run the whole sequence on separate threads
// (over_blocks), pointwise loops are plain loops the compiler vectorises, exp is lstm_math.h's branch-free one.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "lstm_args.h"
#include "lstm_blocks.h"
#include "lstm_gemm.h"
#include "lstm_math.h"
#include "lstm_rownorm.h"
#include "lstm_variant_rows.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace lstmlab {
namespace {

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

// The op's tensors, as variant_forward takes them.
struct FwdArgs {
  const at::Tensor &x, &h0, &c0, &w_ih, &w_hh;
  const c10::optional<at::Tensor> &bias, &ln_gates, &ln_cell, &peephole, &recurrent_mask, &zoneout_mask;
  const at::Tensor &xh, &w, &acts, &cs, &tcs, &out, &extra;
  const c10::optional<at::Tensor>& batch_sizes;
};

// Sizes and switches of one call.
struct FwdShape {
  int64_t T, B, I, H, H4, K;
  bool lng, lnc, peep, zone;
};

// Every tensor's device, dtype and size; xh and w (without the gates' LayerNorm) as the one matmul needs them.
void check_forward_args(const FwdArgs& a, const FwdShape& d) {
  const int64_t T = d.T, B = d.B, I = d.I, H = d.H, H4 = d.H4, K = d.K;
  check_args(a.x.scalar_type(),
             {{a.x, "x", kAnySize}, {a.h0, "h0", B * H}, {a.c0, "c0", B * H}, {a.w_ih, "w_ih", H4 * I},
              {a.w_hh, "w_hh", H4 * H}, {a.xh, "xh", kAnySize}, {a.w, "w", kAnySize}, {a.acts, "acts", T * B * H4},
              {a.cs, "cs", T * B * H}, {a.tcs, "tcs", T * B * H}, {a.out, "out", T * B * H},
              {a.extra, "extra", kAnySize}},
             {{a.bias, "bias", H4}, {a.ln_gates, "ln_gates", 2 * H4}, {a.ln_cell, "ln_cell", 2 * H},
              {a.peephole, "peephole", 3 * H}, {a.recurrent_mask, "recurrent_mask", B * H},
              {a.zoneout_mask, "zoneout_mask", kAnySize}});
  if (d.lng) {
    TORCH_CHECK(a.xh.numel() == 0 && a.w.numel() == 0,
                "lstmlab_native: with the gates' LayerNorm, xh and w are empty");
  } else {
    TORCH_CHECK(a.w.dim() == 2 && a.w.size(0) == H4 && K >= H + I && a.xh.dim() == 3 && a.xh.size(0) == T &&
                    a.xh.size(1) == B && a.xh.size(2) == K,
                "lstmlab_native: xh must be (T, B, K) and w (4H, K), K >= H + I");
  }
}

// What every step of one call reads, fixed for the call: the buffers as pointers (step t's rows at + t * B * width).
template <typename T>
struct FwdCall {
  FwdShape d;
  const int64_t* sizes;  // batch_sizes, or null
  bool onednn;
  const at::Tensor* acts;
  const at::Tensor* xh;
  at::Tensor flat;  // extra as one vector, for the matmul's views into it
  at::Tensor w_t;   // W_hh^T (H, 4H) with the gates' LayerNorm, else [W_hh | W_ih | b]^T (K, 4H)
  Extra<T> e;
  T* ap;            // acts
  T* h_in;          // the h entering each step's recurrent product: rows of h_stride, step 0's written by the caller
  int64_t h_stride;
  ForwardRowsFn<T> rows_fn;
  T *cp, *tp, *op;  // cs, tcs, out
  const T *h0p, *c0p, *mp, *zp;
  int64_t z_half, z_step, z_row;
  const T *gates_gain, *cell_ln, *bias_p, *peep;
};

template <typename T>
FwdCall<T> forward_call(const FwdArgs& a, const FwdShape& d, const int64_t* sizes, int64_t z_step, int64_t z_row,
                        const at::Tensor& gates_bias, bool onednn) {
  FwdCall<T> c{};
  c.d = d;
  c.sizes = sizes;
  c.onednn = onednn;
  c.acts = &a.acts;
  c.xh = &a.xh;
  c.flat = a.extra.view({-1});
  c.w_t = d.lng ? a.w_hh.t() : a.w.t();
  c.e = extra_parts<T>(a.extra, d.T, d.B, d.H, d.lng, d.lnc, d.zone);
  c.ap = a.acts.data_ptr<T>();
  c.h_in = d.lng ? c.e.h_in : a.xh.data_ptr<T>();
  c.h_stride = d.lng ? d.H : d.K;
  c.rows_fn = pick_forward<T>(d.lng, d.lnc, d.peep, d.zone);
  set_shared_pointers<T>(c, a, d.zone);
  c.op = a.out.data_ptr<T>();
  c.h0p = a.h0.data_ptr<T>();
  c.z_step = z_step;
  c.z_row = z_row;
  c.bias_p = d.lng ? gates_bias.data_ptr<T>() : nullptr;
  return c;
}

// The gates' LayerNorm: every step's x W_ih^T in one matmul before the loop, into acts (normalised in place by the
// row pass into â, b added after the normalisation).
template <typename T>
void input_product(const FwdCall<T>& c, const at::Tensor& x, const at::Tensor& w_ih) {
  const int64_t T_ = c.d.T, B = c.d.B, H4 = c.d.H4;
  at::Tensor a = c.acts->view({T_ * B, H4});
  lstmlab::mm_out(a, x.view({T_ * B, c.d.I}), w_ih.t(), c.onednn);
  if (c.sizes != nullptr) {  // rows a packed step does not reach read as zeros, as the Python loop leaves them
    for (int64_t t = 0; t < T_; ++t) {
      const int64_t n = live_rows(c.sizes, t, B);
      if (n < B) {
        std::memset(c.ap + (t * B + n) * H4, 0, sizeof(T) * (B - n) * H4);
      }
    }
  }
}

// Step t's recurrent product for rows [r0, r0 + n) of a block.
template <typename T>
void step_product(const FwdCall<T>& c, int64_t t, int64_t r0, int64_t n) {
  const int64_t H = c.d.H, H4 = c.d.H4;
  const int64_t o1 = (t * c.d.B + r0) * H;  // this step's first row, in rows of H
  if (c.d.lng) {  // R = h_in W_hh^T, normalised in the row pass
    at::Tensor r_rows = c.flat.narrow(0, (c.e.r_hat - c.e.base) + o1 * 4, n * H4).view({n, H4});
    lstmlab::mm_out(r_rows, c.flat.narrow(0, (c.e.h_in - c.e.base) + o1, n * H).view({n, H}), c.w_t, c.onednn);
  } else {  // [h_in | x_t | 1] @ [W_hh | W_ih | b]^T
    at::Tensor g_rows = c.acts->select(0, t).narrow(0, r0, n);
    lstmlab::mm_out(g_rows, c.xh->select(0, t).narrow(0, r0, n), c.w_t, c.onednn);
  }
}

// Step t's rows of the block [r0, r1), for the row pass.
template <typename T>
FwdStep<T> step_rows(const FwdCall<T>& c, int64_t t, int64_t r0, int64_t r1) {
  const int64_t B = c.d.B, H = c.d.H;
  const bool lng = c.d.lng;
  const int64_t o1 = (t * B + r0) * H;  // this step's first row, in rows of H
  FwdStep<T> s{};
  s.H = H;
  s.acts = c.ap + o1 * 4;
  s.a_hat = lng ? c.ap + o1 * 4 : nullptr;
  s.r_hat = lng ? c.e.r_hat + o1 * 4 : nullptr;
  s.rstd = (lng || c.d.lnc) ? c.e.rstd + (t * B + r0) * 3 : nullptr;
  s.gain_ih = c.gates_gain;
  s.gain_hh = lng ? c.gates_gain + c.d.H4 : nullptr;
  s.bias = c.bias_p;
  s.peep = c.peep;
  s.gain_c = c.cell_ln;
  s.bias_c = c.d.lnc ? c.cell_ln + H : nullptr;
  s.c_prev = t == 0 ? c.c0p + r0 * H : c.cp + o1 - B * H;
  s.h_prev = t == 0 ? c.h0p + r0 * H : c.op + o1 - B * H;
  s.c_new = c.d.zone ? c.e.c_new + o1 : c.cp + o1;  // without zoneout c' is c_t
  s.tc = c.tp + o1;
  s.h = c.op + o1;
  s.c = c.cp + o1;
  if (c.d.zone) {
    s.zc = c.zp + t * c.z_step + r0 * c.z_row;
    s.zh = s.zc + c.z_half;
    s.z_stride = c.z_row;
  }
  if (t + 1 < c.d.T) {
    s.h_next = c.h_in + ((t + 1) * B + r0) * c.h_stride;
    s.h_stride = c.h_stride;
    s.n_next = std::max<int64_t>(0, std::min(r1, live_rows(c.sizes, t + 1, B)) - r0);
    s.mask = c.mp == nullptr ? nullptr : c.mp + r0 * H;
  }
  return s;
}

// The whole sequence for the row block [r0, r1).
template <typename T>
void forward_block(const FwdCall<T>& c, int64_t r0, int64_t r1) {
  for (int64_t t = 0; t < c.d.T; ++t) {
    const int64_t n = std::min(r1, live_rows(c.sizes, t, c.d.B)) - r0;
    if (n <= 0) {
      break;  // live rows only shrink with t
    }
    step_product(c, t, r0, n);
    const FwdStep<T> s = step_rows(c, t, r0, r1);
    over_rows(n, c.d.H, [&](int64_t b0, int64_t b1) { c.rows_fn(s, b0, b1); });
  }
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
  const FwdArgs a{x,  h0, c0, w_ih, w_hh, bias, ln_gates, ln_cell, peephole, recurrent_mask, zoneout_mask,
                  xh, w,  acts, cs, tcs, out, extra, batch_sizes};
  const int64_t T = x.size(0), B = x.size(1), H = c0.size(1);
  const bool lng = given(ln_gates);
  const FwdShape d{T, B, x.size(2), H, 4 * H, lng ? 0 : w.size(-1), lng, given(ln_cell), given(peephole),
                   given(zoneout_mask)};
  check_forward_args(a, d);
  int64_t z_step = 0, z_row = 0;
  if (d.zone) {
    z_row = zoneout_layout(*zoneout_mask, T, B, H, &z_step);
  }
  const int64_t* const sizes = sizes_ptr(batch_sizes, T);
  if (T == 0 || B == 0) {
    return;
  }
  const at::Tensor gates_bias = ln_gates_bias(bias, lng, d.H4, x.options());
  const bool onednn = onednn_gemm(x.scalar_type());  // once per call, not per step
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstmlab_variant_forward", [&] {
    const FwdCall<scalar_t> c = forward_call<scalar_t>(a, d, sizes, z_step, z_row, gates_bias, onednn);
    if (lng) {
      input_product(c, x, w_ih);
    }
    over_blocks(B, [&](int64_t r0, int64_t r1, int64_t) { forward_block(c, r0, r1); });
  });
}

}  // namespace
}  // namespace lstmlab
