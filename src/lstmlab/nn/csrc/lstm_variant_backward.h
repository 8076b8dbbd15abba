// The backward step loop of lstmlab's LSTM variants (lstm_variant_forward.h says which): backpropagation through
// time of variant_forward, with what both share in lstm_variant_rows.h and lstm_rownorm.h.
//
// Per step (last to first) ONE pass per row that turns dh, dc into the gradient of the pre-activations (through
// zoneout, the cell LayerNorm, peepholes, the gates' LayerNorm) and dc_{t-1}, accumulating the column sums of the
// LayerNorm, peephole and (with the gates' LayerNorm) bias gradients on the way (see kSums); then ONE matmul
// dh_{t-1} = dR_t W_hh (times the mask, plus zoneout's carry). dx, dW_ih and dW_hh (and db without the gates'
// LayerNorm) are matmuls over all steps, done in Python after the loop.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "lstm_args.h"
#include "lstm_blocks.h"
#include "lstm_gemm.h"
#include "lstm_rownorm.h"
#include "lstm_variant_rows.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

namespace lstmlab {
namespace {

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

// Without either LayerNorm: rows [r0, r1) by plain_back_row, the peepholes' sums into part.
template <typename T, bool PEEP, bool ZONE, bool OUT>
inline void plain_back_rows(const BwdStep<T>& s, int64_t r0, int64_t r1, int64_t end, T* __restrict part) {
  const int64_t H = s.H, H4 = 4 * H;
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
}

// The gates' LayerNorm: asks for row b + 1's buffers while row b computes.
template <typename T>
inline void prefetch_ln_row(const BwdStep<T>& s, int64_t b) {
  const int64_t H = s.H, H4 = 4 * H;
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

// The gates' LayerNorm: row b's activations into acts, by the forward's own functions on the same â, r̂ (what
// gates_row writes besides goes to spill).
template <typename T, bool LNC, bool PEEP, bool ZONE>
inline void recompute_acts_row(const BwdStep<T>& s, int64_t b, const T* zc, const T* zh, T* __restrict acts,
                               T* __restrict spill) {
  const int64_t H = s.H, H4 = 4 * H;
  ln_gates_row(s.a_hat + b * H4, s.gain_ih, s.r_hat + b * H4, s.gain_hh, s.bias, acts, H4);
  const T* const cp = s.c_prev + b * H;  // (the h_prev that zoneout would read: any H values do, unused)
  gates_row<T, PEEP, LNC, ZONE, true>(acts, acts + H, acts + 2 * H, acts + 3 * H, s.peep,
                                      PEEP ? s.peep + H : nullptr, PEEP ? s.peep + 2 * H : nullptr, cp, cp, zc, zh,
                                      spill, spill + H, spill + 2 * H, spill + 3 * H, H);
}

// With either LayerNorm: row b (the next rows up to `end`), its column sums into part, its temporaries in scratch.
template <typename T, bool LNG, bool LNC, bool PEEP, bool ZONE, bool OUT>
inline void ln_back_row(const BwdStep<T>& s, int64_t b, int64_t end, T* __restrict part, T* __restrict scratch) {
  const int64_t H = s.H, H4 = 4 * H;
  T* const dy = scratch + 4 * H;
  T* const carry_c = scratch + 5 * H;
  T* const acts = scratch + 6 * H;  // the gates' LayerNorm: the activations, recomputed
  T* const dc = s.dc + b * H;
  T* const dz = LNG ? scratch : s.dA + b * H4;  // the gradient w.r.t. the pre-activations
  const T* const zc = ZONE ? s.zc + b * s.z_stride : nullptr;
  const T* const zh = ZONE ? s.zh + b * s.z_stride : nullptr;
  if constexpr (LNG) {
    if (b + 1 < end) {
      prefetch_ln_row(s, b);
    }
    recompute_acts_row<T, LNC, PEEP, ZONE>(s, b, zc, zh, acts, scratch + 10 * H);
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
  out_back_row<T, LNC, ZONE, OUT>(s.dh + b * H, OUT ? s.d_out + b * H : nullptr, dc, a + 3 * H, tc, zc, zh, carry_c,
                                  dy, dz + 3 * H, H);
  if constexpr (LNC) {  // y = γ_c LN(c') + β_c
    normalize_backward_row(dy, s.gain_c, s.tc + b * H, s.rstd[b * 3], dc, H, part + 12 * H, part + 13 * H);
  }
  cell_back_row<T, PEEP, ZONE>(a, a + H, a + 2 * H, s.c_prev + b * H, s.c_new + b * H, s.peep,
                               PEEP ? s.peep + H : nullptr, PEEP ? s.peep + 2 * H : nullptr, carry_c, dc, dz, dz + H,
                               dz + 2 * H, dz + 3 * H, part + 14 * H, part + 15 * H, part + 16 * H, H);
  if constexpr (LNG) {  // z = γ_ih LN(A) + γ_hh LN(R) + b
    // db too (without the gates' LayerNorm, fused.py takes it from the dW matmul)
    ln_gates_backward_row(dz, s.gain_ih, s.a_hat + b * H4, s.rstd[b * 3 + 1], s.gain_hh, s.r_hat + b * H4,
                          s.rstd[b * 3 + 2], s.dA + b * H4, s.dR + b * H4, H4, part + 4 * H, part + 8 * H, part);
  }
}

// One step's rows [r0, r1) of one row block, adding their column sums into part; rows up to `end` follow (the
// next one is prefetched).
template <typename T, bool LNG, bool LNC, bool PEEP, bool ZONE, bool OUT>
void backward_some_rows(const BwdStep<T>& s, int64_t r0, int64_t r1, int64_t end, T* __restrict part,
                        T* __restrict scratch) {
  if constexpr (!LNG && !LNC) {
    plain_back_rows<T, PEEP, ZONE, OUT>(s, r0, r1, end, part);
  } else {
    for (int64_t b = r0; b < r1; ++b) {
      ln_back_row<T, LNG, LNC, PEEP, ZONE, OUT>(s, b, end, part, scratch);
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

// The op's tensors, as variant_backward takes them.
struct BwdArgs {
  const c10::optional<at::Tensor>& d_out;
  const at::Tensor &dh, &dc, &c0, &w_hh;
  const c10::optional<at::Tensor>& bias;
  const at::Tensor &acts, &cs, &tcs, &extra;
  const c10::optional<at::Tensor> &ln_gates, &ln_cell, &peephole, &recurrent_mask, &zoneout_mask;
  const at::Tensor &dA, &dR, &sums;
};

// Sizes and switches of one call.
struct BwdShape {
  int64_t T, B, H, H4;
  bool lng, lnc, peep, zone;
};

// Every tensor's device, dtype and size; dR is dA itself without the gates' LayerNorm.
void check_backward_args(const BwdArgs& a, const BwdShape& d) {
  const int64_t T = d.T, B = d.B, H = d.H, H4 = d.H4;
  check_args(a.acts.scalar_type(),
             {{a.dh, "dh", B * H}, {a.dc, "dc", B * H}, {a.c0, "c0", B * H}, {a.w_hh, "w_hh", H4 * H},
              {a.acts, "acts", kAnySize}, {a.cs, "cs", T * B * H}, {a.tcs, "tcs", T * B * H},
              {a.extra, "extra", kAnySize}, {a.dA, "dA", T * B * H4}, {a.dR, "dR", T * B * H4},
              {a.sums, "sums", kSums * H}},
             {{a.d_out, "d_out", T * B * H}, {a.bias, "bias", H4}, {a.ln_gates, "ln_gates", 2 * H4},
              {a.ln_cell, "ln_cell", 2 * H}, {a.peephole, "peephole", 3 * H},
              {a.recurrent_mask, "recurrent_mask", B * H}, {a.zoneout_mask, "zoneout_mask", kAnySize}});
  TORCH_CHECK(d.lng || a.dA.data_ptr() == a.dR.data_ptr(),
              "lstmlab_native.variant_backward: without the gates' LayerNorm, dR must be dA");
}

// What every step of one call reads, fixed for the call: the buffers as pointers (step t's rows at + t * B * width)
// and the per-slot sums and scratch.
template <typename T>
struct BwdCall {
  BwdShape d;
  const int64_t* sizes;  // batch_sizes, or null
  bool onednn, need_dh0;
  int64_t threads;  // at::get_num_threads() outside the parallel region (slot())
  const at::Tensor *dh, *dh_next, *dR, *w_hh;
  Extra<T> e;
  BackwardRowsFn<T> rows_fn;
  const T *ap, *cp, *tp, *c0p, *mp, *zp, *dop, *gates_gain, *gates_bias, *peep, *cell_ln;
  int64_t z_half, z_step, z_row;
  T *dAp, *dRp, *dcp;
  double* acc;
  T* part;
  T* scratch;
};

template <typename T>
BwdCall<T> backward_call(const BwdArgs& a, const BwdShape& d, const at::Tensor& dh_next,
                         const at::Tensor& gates_bias) {
  BwdCall<T> c{};
  c.d = d;
  c.dh = &a.dh;
  c.dh_next = &dh_next;
  c.dR = &a.dR;
  c.w_hh = &a.w_hh;
  c.e = extra_parts<T>(a.extra, d.T, d.B, d.H, d.lng, d.lnc, d.zone);
  c.dop = opt_ptr<T>(a.d_out);
  c.rows_fn = pick_backward<T>(d.lng, d.lnc, d.peep, d.zone, c.dop != nullptr);
  c.ap = a.acts.data_ptr<T>();
  set_shared_pointers<T>(c, a, d.zone);
  c.gates_bias = d.lng ? gates_bias.data_ptr<T>() : nullptr;
  c.dAp = a.dA.data_ptr<T>();
  c.dRp = a.dR.data_ptr<T>();
  c.dcp = a.dc.data_ptr<T>();
  return c;
}

// Step t's rows of the block from r0, for the row pass; dh_t: the block's dh buffer of this step.
template <typename T>
BwdStep<T> back_step_rows(const BwdCall<T>& c, int64_t t, int64_t r0, T* dh_t) {
  const int64_t B = c.d.B, H = c.d.H;
  const bool lng = c.d.lng, lnc = c.d.lnc, zone = c.d.zone;
  const int64_t o1 = (t * B + r0) * H;  // this step's first row, in rows of H
  BwdStep<T> s{};
  s.H = H;
  s.acts = c.ap + o1 * 4;
  s.tc = c.tp + o1;
  s.c_prev = t > 0 ? c.cp + o1 - B * H : c.c0p + r0 * H;
  s.c_new = zone ? c.e.c_new + o1 : c.cp + o1;
  s.a_hat = lng ? c.ap + o1 * 4 : nullptr;
  s.r_hat = lng ? c.e.r_hat + o1 * 4 : nullptr;
  s.rstd = (lng || lnc) ? c.e.rstd + (t * B + r0) * 3 : nullptr;
  s.gain_ih = c.gates_gain;
  s.gain_hh = lng ? c.gates_gain + c.d.H4 : nullptr;
  s.bias = c.gates_bias;
  s.peep = c.peep;
  s.gain_c = c.cell_ln;
  s.bias_c = lnc ? s.gain_c + H : nullptr;
  if (zone) {
    s.zc = c.zp + t * c.z_step + r0 * c.z_row;
    s.zh = s.zc + c.z_half;
    s.z_stride = c.z_row;
  }
  s.d_out = c.dop == nullptr ? nullptr : c.dop + o1;
  s.dh = dh_t;
  s.dc = c.dcp + r0 * H;
  s.dA = c.dAp + o1 * 4;
  s.dR = c.dRp + o1 * 4;
  s.acc = c.acc;
  s.part = c.part;
  s.scratch = c.scratch;
  return s;
}

// Rows [r0 + n, r0 + rows) of step t, which a packed step does not reach, get no gradient.
template <typename T>
void zero_dead_rows(const BwdCall<T>& c, int64_t t, int64_t r0, int64_t n, int64_t rows) {
  const int64_t H4 = c.d.H4, B = c.d.B;
  std::memset(c.dAp + (t * B + r0 + n) * H4, 0, sizeof(T) * (rows - n) * H4);
  if (c.d.lng) {
    std::memset(c.dRp + (t * B + r0 + n) * H4, 0, sizeof(T) * (rows - n) * H4);
  }
}

// dh_{t-1} of the block's n live rows into next, from step t's dR (and cur, the block's dh of step t).
template <typename T>
void step_dh(const BwdCall<T>& c, int64_t t, int64_t r0, int64_t n, int64_t rows, const at::Tensor& cur,
             const at::Tensor& next) {
  const int64_t H = c.d.H;
  if (n < rows) {  // rows past this step keep their dh: carry them into the buffer that becomes cur
    next.narrow(0, n, rows - n).copy_(cur.narrow(0, n, rows - n));
  }
  at::Tensor next_rows = next.narrow(0, 0, n);
  lstmlab::mm_out(next_rows, c.dR->select(0, t).narrow(0, r0, n), *c.w_hh, c.onednn);  // through h_in W_hh^T
  if (c.mp != nullptr || c.d.zone) {  // dh_{t-1} = (dR_t W_hh) * mask + zoneout's carry
    T* __restrict nx = next_rows.data_ptr<T>();
    const T* __restrict carry = cur.data_ptr<T>();
    const T* __restrict m = c.mp != nullptr ? c.mp + r0 * H : nullptr;
    if (m != nullptr && c.d.zone) {
      for (int64_t k = 0; k < n * H; ++k) nx[k] = nx[k] * m[k] + carry[k];
    } else if (m != nullptr) {
      for (int64_t k = 0; k < n * H; ++k) nx[k] *= m[k];
    } else {
      for (int64_t k = 0; k < n * H; ++k) nx[k] += carry[k];
    }
  }
}

// The whole sequence, last step first, for the row block [r0, r1), number `block`.
template <typename T>
void backward_block(const BwdCall<T>& c, int64_t r0, int64_t r1, int64_t block) {
  const int64_t rows = r1 - r0, H = c.d.H;
  at::Tensor cur = c.dh->narrow(0, r0, rows), next = c.dh_next->narrow(0, r0, rows);
  for (int64_t t = c.d.T - 1; t >= 0; --t) {
    const int64_t n = std::max<int64_t>(0, std::min(r1, live_rows(c.sizes, t, c.d.B)) - r0);
    if (n < rows) {
      zero_dead_rows(c, t, r0, n, rows);
    }
    if (n == 0) {
      continue;  // going backwards, live rows only grow
    }
    const BwdStep<T> s = back_step_rows(c, t, r0, cur.data_ptr<T>());
    over_rows(n, H, [&](int64_t b0, int64_t b1) { c.rows_fn(s, b0, b1, slot(block, c.threads)); });
    if (t > 0 || c.need_dh0) {
      step_dh(c, t, r0, n, rows, cur, next);
      std::swap(cur, next);
    }
  }
  if (cur.data_ptr() != c.dh->template data_ptr<T>() + r0 * H) {
    c.dh->narrow(0, r0, rows).copy_(cur);
  }
}

// The slots' double sums, added up, into sums (in its dtype).
template <typename T>
void reduce_sums(const std::vector<double>& acc, int64_t n_slots, int64_t H, const at::Tensor& sums) {
  T* const sp = sums.data_ptr<T>();
  for (int64_t k = 0; k < kSums * H; ++k) {
    double total = 0.0;
    for (int64_t q = 0; q < n_slots; ++q) {
      total += acc[q * kSums * H + k];
    }
    sp[k] = static_cast<T>(total);
  }
}

// Backpropagation through time of variant_forward. acts, cs, tcs, extra: what it saved; dh, dc (B, H): the
// gradients reaching h_T, c_T on entry, h_0, c_0 on exit (dh only if need_dh0). d_out (T, B, H) or None. Writes
// dA (T, B, 4H), the gradient w.r.t. x W_ih^T, and dR (T, B, 4H), w.r.t. h_in W_hh^T (pass dA itself as dR without
// the gates' LayerNorm: both are then the pre-activations' gradient), zero in rows a packed step does not reach;
// sums (17H) gets [db | dγ_ih | dγ_hh | dγ_c | dβ_c | dp_i | dp_f | dp_o] (the parts of absent terms are zero).
void variant_backward(const c10::optional<at::Tensor>& d_out, at::Tensor dh, at::Tensor dc, const at::Tensor& c0,
                      const at::Tensor& w_hh, const c10::optional<at::Tensor>& bias, const at::Tensor& acts,
                      const at::Tensor& cs, const at::Tensor& tcs, const at::Tensor& extra,
                      const c10::optional<at::Tensor>& ln_gates, const c10::optional<at::Tensor>& ln_cell,
                      const c10::optional<at::Tensor>& peephole, const c10::optional<at::Tensor>& recurrent_mask,
                      const c10::optional<at::Tensor>& zoneout_mask, at::Tensor dA, at::Tensor dR, at::Tensor sums,
                      bool need_dh0, const c10::optional<at::Tensor>& batch_sizes) {
  const BwdArgs a{d_out,    dh,      dc,        c0,             w_hh,         bias, acts, cs,  tcs, extra,
                  ln_gates, ln_cell, peephole,  recurrent_mask, zoneout_mask, dA,   dR,   sums};
  const int64_t T = acts.size(0), B = acts.size(1), H4 = acts.size(2), H = H4 / 4;
  const BwdShape d{T, B, H, H4, given(ln_gates), given(ln_cell), given(peephole), given(zoneout_mask)};
  check_backward_args(a, d);
  int64_t z_step = 0, z_row = 0;
  if (d.zone) {
    z_row = zoneout_layout(*zoneout_mask, T, B, H, &z_step);
  }
  const int64_t* const sizes = sizes_ptr(batch_sizes, T);
  const int64_t threads = at::get_num_threads();
  const int64_t n_slots = threads * threads;
  std::vector<double> acc(static_cast<size_t>(n_slots * kSums * H), 0.0);
  const at::Tensor dh_next = at::empty_like(dh);  // the step reads dh while the matmul writes dh_next
  const at::Tensor gates_bias = ln_gates_bias(bias, d.lng, H4, acts.options());
  const bool onednn = onednn_gemm(acts.scalar_type());  // once per call, not per step
  AT_DISPATCH_FLOATING_TYPES(acts.scalar_type(), "lstmlab_variant_backward", [&] {
    BwdCall<scalar_t> c = backward_call<scalar_t>(a, d, dh_next, gates_bias);
    std::vector<scalar_t> scratch(static_cast<size_t>(n_slots * kScratch * H));
    std::vector<scalar_t> part(static_cast<size_t>(n_slots * kSums * H));
    c.sizes = sizes;
    c.onednn = onednn;
    c.need_dh0 = need_dh0;
    c.threads = threads;
    c.z_step = z_step;
    c.z_row = z_row;
    c.acc = acc.data();
    c.part = part.data();
    c.scratch = scratch.data();
    over_blocks(B, [&](int64_t r0, int64_t r1, int64_t block) { backward_block(c, r0, r1, block); });
    reduce_sums<scalar_t>(acc, n_slots, H, sums);
  });
}

}  // namespace
}  // namespace lstmlab
