// The per-step loops of lstmlab's fused LSTM layer, out of Python.
//
// forward:  for each step, gates_t = [h_{t-1} | x_t | 1] @ [W_hh | W_ih | b]^T (one mm), then ONE pass over the
//           (B, 4H) gates that activates them in place and writes c_t, tanh(c_t) and h_t.
// backward: for each step (last to first), ONE pass that turns dh, dc into the gradient of the four gates'
//           pre-activations and dc_{t-1}, then dh_{t-1} = dG_t @ W_hh (one mm).
// Packed batches (sorted longest first): step t runs only its first batch_sizes[t] rows.
// The parameter gradients (one matmul over all steps: dG^T @ [h_{t-1} | x_t | 1]) stay in Python.
//
// The pointwise passes are plain loops that the compiler vectorises (-O3, this machine's SIMD); exp is a
// branch-free polynomial for float so that it vectorises too. A batch is cut into row blocks, one per torch
// intra-op thread, each running every step on its own (over_blocks). Registered as torch ops lstmlab_native::*.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "lstm_args.h"
#include "lstm_blocks.h"
#include "lstm_gemm.h"
#include "lstm_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <string>
#include <utility>

namespace {

using lstmlab::exp_f;
using lstmlab::live_rows;
using lstmlab::over_blocks;
using lstmlab::over_rows;
using lstmlab::sizes_ptr;
using lstmlab::sigmoid;
using lstmlab::tanh_;

// One forward step's pointwise math over rows of 4H pre-activations (in place -> activations). h_t goes to
// h_out (rows of H) and, unless null, also to h_next (rows of h_stride): the next step's matmul input.
template <typename T>
void forward_pointwise(T* __restrict gates, const T* __restrict c_prev, T* __restrict c_out, T* __restrict tc_out,
                       T* __restrict h_out, T* __restrict h_next, int64_t h_stride, int64_t B, int64_t H) {
  for (int64_t b = 0; b < B; ++b) {
    T* __restrict gi = gates + b * 4 * H;
    T* __restrict gf = gi + H;
    T* __restrict gg = gi + 2 * H;
    T* __restrict go = gi + 3 * H;
    const T* __restrict cp = c_prev + b * H;
    T* __restrict cn = c_out + b * H;
    T* __restrict tn = tc_out + b * H;
    T* __restrict hn = h_out + b * H;
    for (int64_t j = 0; j < H; ++j) {
      const T i = sigmoid(gi[j]);
      const T f = sigmoid(gf[j]);
      const T g = tanh_(gg[j]);
      const T o = sigmoid(go[j]);
      const T c = f * cp[j] + i * g;
      const T tc = tanh_(c);
      gi[j] = i;
      gf[j] = f;
      gg[j] = g;
      go[j] = o;
      cn[j] = c;
      tn[j] = tc;
      hn[j] = o * tc;
    }
    if (h_next != nullptr) {
      std::memcpy(h_next + b * h_stride, hn, sizeof(T) * H);
    }
  }
}

// One backward step's pointwise math: from the activations i, f, g, o in acts (B, 4H) to the gradient w.r.t. the
// four pre-activations in dgates (B, 4H). dgates may be acts itself (in place, when autograd will not need the
// activations again): element j is read whole before it is written, so the loop has no carried dependence (ivdep).
// dh (B, H) is the gradient reaching h_t from step t+1, d_out (B, H) or null the one from the output;
// dc (B, H) goes from dc_t to dc_{t-1}.
template <typename T, bool HAS_OUT>
void backward_pointwise(const T* acts, T* dgates, const T* __restrict c_prev,
                        const T* __restrict tc, const T* __restrict dh_rec, const T* __restrict d_out,
                        T* __restrict dc, int64_t B, int64_t H) {
  for (int64_t b = 0; b < B; ++b) {
    const T* ai = acts + b * 4 * H;
    const T* af = ai + H;
    const T* ag = ai + 2 * H;
    const T* ao = ai + 3 * H;
    T* di = dgates + b * 4 * H;
    T* df = di + H;
    T* dg = di + 2 * H;
    T* d_o = di + 3 * H;
    const T* __restrict cp = c_prev + b * H;
    const T* __restrict tcb = tc + b * H;
    const T* __restrict dhr = dh_rec + b * H;
    const T* __restrict dob = HAS_OUT ? d_out + b * H : nullptr;
    T* __restrict dcb = dc + b * H;
#pragma GCC ivdep
    for (int64_t j = 0; j < H; ++j) {
      const T i = ai[j], f = af[j], g = ag[j], o = ao[j], t = tcb[j];
      T dh = dhr[j];
      if constexpr (HAS_OUT) {
        dh += dob[j];
      }
      const T dcj = dcb[j] + dh * o * (T(1) - t * t);
      d_o[j] = dh * t * o * (T(1) - o);
      di[j] = dcj * g * i * (T(1) - i);
      df[j] = dcj * cp[j] * f * (T(1) - f);
      dg[j] = dcj * i * (T(1) - g * g);
      dcb[j] = dcj * f;
    }
  }
}

// One backward step's pointwise pass over its rows [b0, b1) (do_t: null when no gradient comes from the output).
template <typename T>
void backward_rows(const T* a_t, T* dg_t, const T* c_prev, const T* tc_t, const T* dh_t, const T* do_t, T* dc_t,
                   int64_t b0, int64_t b1, int64_t H) {
  if (do_t != nullptr) {
    backward_pointwise<T, true>(a_t + b0 * 4 * H, dg_t + b0 * 4 * H, c_prev + b0 * H, tc_t + b0 * H, dh_t + b0 * H,
                                do_t + b0 * H, dc_t + b0 * H, b1 - b0, H);
  } else {
    backward_pointwise<T, false>(a_t + b0 * 4 * H, dg_t + b0 * 4 * H, c_prev + b0 * H, tc_t + b0 * H,
                                 dh_t + b0 * H, nullptr, dc_t + b0 * H, b1 - b0, H);
  }
}

// The forward pass over all steps. xh (T, B, K) holds row t = [h_{t-1} | x_t | 1 | 0...] with h_0 in place and
// x, the ones and the padding filled in; w (4H, K) = [W_hh | W_ih | b | 0...]. Per step, gates_t = xh_t @ w^T is
// the whole textbook "x2h + h2h" as ONE matmul; gates (T, B, 4H) gets the activations, out, cs, tcs (T, B, H)
// h_t, c_t and tanh(c_t), and h_t is also written into xh for the next step. All contiguous CPU tensors.
// With batch_sizes, step t touches only its live rows; the others are left as they were.
void lstm_forward(at::Tensor xh, const at::Tensor& c0, const at::Tensor& w, at::Tensor gates, at::Tensor out,
                  at::Tensor cs, at::Tensor tcs, const c10::optional<at::Tensor>& batch_sizes) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&xh, &c0, &w, &gates, &out, &cs, &tcs}) {
    lstmlab::check_cpu_contiguous(*t, "every tensor");
  }
  const int64_t T = gates.size(0), B = gates.size(1), H = gates.size(2) / 4, K = xh.size(2);
  TORCH_CHECK(xh.size(0) == T && xh.size(1) == B && w.size(0) == 4 * H && w.size(1) == K && K >= H,
              "lstmlab_native.forward: xh must be (T, B, K), w (4H, K), gates (T, B, 4H)");
  TORCH_CHECK(out.numel() == T * B * H && cs.numel() == T * B * H && tcs.numel() == T * B * H,
              "lstmlab_native.forward: out, cs, tcs must be (T, B, H)");
  const int64_t* const sizes = sizes_ptr(batch_sizes, T);
  const at::Tensor w_t = w.t();  // (K, 4H)
  const bool onednn = lstmlab::onednn_gemm(gates.scalar_type());  // once per call, not per step
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "lstmlab_forward", [&] {
    scalar_t* const xp = xh.data_ptr<scalar_t>();
    scalar_t* const gp = gates.data_ptr<scalar_t>();
    scalar_t* const op = out.data_ptr<scalar_t>();
    scalar_t* const cp = cs.data_ptr<scalar_t>();
    scalar_t* const tp = tcs.data_ptr<scalar_t>();
    const scalar_t* const c0p = c0.data_ptr<scalar_t>();
    over_blocks(B, [&](int64_t r0, int64_t r1, int64_t) {
      for (int64_t t = 0; t < T; ++t) {
        const int64_t n = std::min(r1, live_rows(sizes, t, B)) - r0;
        if (n <= 0) {
          break;  // live rows only shrink with t
        }
        at::Tensor g_rows = gates.select(0, t).narrow(0, r0, n);
        lstmlab::mm_out(g_rows, xh.select(0, t).narrow(0, r0, n), w_t, onednn);  // (n, 4H) = [h_{t-1} | x_t | 1] @ w^T
        scalar_t* const g_t = gp + (t * B + r0) * 4 * H;
        const scalar_t* const c_prev = t == 0 ? c0p + r0 * H : cp + ((t - 1) * B + r0) * H;
        const int64_t o_t = (t * B + r0) * H;
        scalar_t* const next = t + 1 < T ? xp + ((t + 1) * B + r0) * K : nullptr;
        over_rows(n, H, [&](int64_t b0, int64_t b1) {
          forward_pointwise<scalar_t>(g_t + b0 * 4 * H, c_prev + b0 * H, cp + o_t + b0 * H, tp + o_t + b0 * H,
                                      op + o_t + b0 * H, next == nullptr ? nullptr : next + b0 * K, K, b1 - b0, H);
        });
      }
    });
  });
}

// Backpropagation through time. acts (T, B, 4H) holds the saved activations; dgates (T, B, 4H), a buffer of its own
// or acts itself, gets the gradient w.r.t. the pre-activations (rows a packed step does not reach are left untouched). dh, dc (B, H): the
// gradients reaching h_T, c_T on entry, h_0, c_0 on exit (dh only if need_dh0: the last step's matmul is skipped
// when nobody wants it, e.g. for a zero initial state). d_out (T, B, H) may be None.
void lstm_backward(const at::Tensor& acts, at::Tensor dgates, const at::Tensor& cs, const at::Tensor& tcs,
                   const at::Tensor& c0, const at::Tensor& w_hh, const c10::optional<at::Tensor>& d_out,
                   at::Tensor dh, at::Tensor dc, bool need_dh0, const c10::optional<at::Tensor>& batch_sizes) {
  const bool has_out = d_out.has_value() && d_out->defined();
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&acts, &dgates, &cs, &tcs, &c0, &dh, &dc}) {
    lstmlab::check_cpu_contiguous(*t, "every tensor");
  }
  if (has_out) {
    lstmlab::check_cpu_contiguous(*d_out, "d_out");
  }
  const int64_t T = acts.size(0), B = acts.size(1), H = acts.size(2) / 4;
  TORCH_CHECK(dgates.sizes() == acts.sizes(), "lstmlab_native.backward: dgates must be shaped like acts (or be it)");
  const int64_t* const sizes = sizes_ptr(batch_sizes, T);
  at::Tensor dh_next = at::empty_like(dh);  // the step reads dh while the mm writes dh_next
  const bool onednn = lstmlab::onednn_gemm(acts.scalar_type());  // once per call, not per step
  AT_DISPATCH_FLOATING_TYPES(acts.scalar_type(), "lstmlab_backward", [&] {
    const scalar_t* const ap = acts.data_ptr<scalar_t>();
    scalar_t* const dgp = dgates.data_ptr<scalar_t>();
    const scalar_t* const cp = cs.data_ptr<scalar_t>();
    const scalar_t* const tp = tcs.data_ptr<scalar_t>();
    const scalar_t* const c0p = c0.data_ptr<scalar_t>();
    const scalar_t* const dop = has_out ? d_out->data_ptr<scalar_t>() : nullptr;
    scalar_t* const dcp = dc.data_ptr<scalar_t>();
    over_blocks(B, [&](int64_t r0, int64_t r1, int64_t) {
      const int64_t rows = r1 - r0;
      // cur holds dh for this block's rows; rows a packed step does not reach keep theirs until their last step.
      at::Tensor cur = dh.narrow(0, r0, rows), next = dh_next.narrow(0, r0, rows);
      for (int64_t t = T - 1; t >= 0; --t) {
        const int64_t n = std::min(r1, live_rows(sizes, t, B)) - r0;
        if (n <= 0) {
          continue;  // none of this block's rows is live yet (going backwards, live rows only grow)
        }
        const scalar_t* const c_prev = t > 0 ? cp + ((t - 1) * B + r0) * H : c0p + r0 * H;
        const scalar_t* const a_t = ap + (t * B + r0) * 4 * H;
        scalar_t* const dg_t = dgp + (t * B + r0) * 4 * H;
        const scalar_t* const tc_t = tp + (t * B + r0) * H;
        const scalar_t* const dh_t = cur.data_ptr<scalar_t>();
        const scalar_t* const do_t = has_out ? dop + (t * B + r0) * H : nullptr;
        scalar_t* const dc_t = dcp + r0 * H;
        over_rows(n, H, [&](int64_t b0, int64_t b1) {
          backward_rows(a_t, dg_t, c_prev, tc_t, dh_t, do_t, dc_t, b0, b1, H);
        });
        if (t > 0 || need_dh0) {
          if (n < rows) {  // rows past this step keep their dh: carry them into the buffer that becomes cur
            next.narrow(0, n, rows - n).copy_(cur.narrow(0, n, rows - n));
          }
          at::Tensor next_rows = next.narrow(0, 0, n);
          lstmlab::mm_out(next_rows, dgates.select(0, t).narrow(0, r0, n), w_hh, onednn);  // dh_{t-1} = dG_t @ W_hh
          std::swap(cur, next);
        }
      }
      if (cur.data_ptr() != dh.data_ptr<scalar_t>() + r0 * H) {
        dh.narrow(0, r0, rows).copy_(cur);
      }
    });
  });
}

// a @ b for the matmuls over all steps that fused.py runs after a loop (dx, the weight gradients), on the same
// GEMM as the loops (lstm_gemm.h).
at::Tensor matmul(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0) && a.scalar_type() == b.scalar_type(),
              "lstmlab_native.mm: expected (M, K) @ (K, N) of one dtype");
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  lstmlab::mm_out(out, a, b, lstmlab::onednn_gemm(a.scalar_type()));
  return out;
}

// Which GEMM the float32 matmuls run on: "onednn" or "at::mm" (what lstmlab bench reports), and why not oneDNN.
std::string gemm_name() {
  return lstmlab::onednn_gemm(at::kFloat) ? "onednn" : "at::mm";
}

std::string gemm_reason() {
  return lstmlab::onednn_off_reason();
}

}  // namespace

TORCH_LIBRARY(lstmlab_native, m) {
  m.def(
      "forward(Tensor(a!) xh, Tensor c0, Tensor w, Tensor(b!) gates, Tensor(c!) out, Tensor(d!) cs, "
      "Tensor(e!) tcs, Tensor? batch_sizes) -> ()");
  m.def(
      "backward(Tensor acts, Tensor(a!) dgates, Tensor cs, Tensor tcs, Tensor c0, Tensor w_hh, Tensor? d_out, "
      "Tensor(b!) dh, Tensor(c!) dc, bool need_dh0, Tensor? batch_sizes) -> ()");
  m.def("mm(Tensor a, Tensor b) -> Tensor");
  m.def("gemm() -> str");
  m.def("gemm_reason() -> str");
}

TORCH_LIBRARY_IMPL(lstmlab_native, CPU, m) {
  m.impl("forward", &lstm_forward);
  m.impl("backward", &lstm_backward);
  m.impl("mm", &matmul);
}

TORCH_LIBRARY_IMPL(lstmlab_native, CatchAll, m) {
  m.impl("gemm", &gemm_name);
  m.impl("gemm_reason", &gemm_reason);
}
