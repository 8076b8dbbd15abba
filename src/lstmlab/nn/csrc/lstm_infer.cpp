// The forward-only loop of lstmlab's fused LSTM layer: inference and no-grad calls of the plain cell.
//
// Nothing for a backward is kept or written: no per-step gates, c_t or tanh(c_t) buffers. Per layer and direction:
//
//   1. xp = x @ W_ih^T + b for all steps at once (one GEMM over T*B rows, parallel over row tiles);
//   2. per step, gates = xp_t + h_{t-1} @ W_hh^T computed by a register-tiled micro-kernel whose tile is R rows x
//      the four gates of U hidden units, and the cell's pointwise math done on that tile while it is still in
//      registers / L1: c stays in one (B, H) buffer (updated in place, it is c_T at the end), h_t goes straight
//      into out[t], which the next step reads as h_{t-1}.
//
// The weights are packed once (pack_weights, cached by lstmlab.nn.infer): for each block of U hidden units, a
// (K, 4, U) panel holding the i, f, g, o rows of those units, so that the micro-kernel streams one contiguous
// panel and its accumulators are exactly the gates one unit block needs.
//
// Threads: at small B the recurrent product is a matrix-vector product that reads all of W_hh per step; the unit
// blocks are then split over the threads (each keeps its share of W_hh in its own L2) with one barrier per step.
// With enough rows per thread the rows are split instead (no barrier at all: rows never interact). Below a
// minimum of work per step one thread runs alone (a barrier would cost more than it saves).
//
// The vectors are GCC vector extensions of the machine's width (-march=native: 64 bytes with AVX-512, else 32),
// so the same source builds for AVX2, AVX-512 and NEON-less fallbacks. Registered as lstmlab_native::infer,
// lstmlab_native::pack_weights.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "lstm_math.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <tuple>

namespace {

using lstmlab::sigmoid;
using lstmlab::tanh_;

#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
constexpr int kRows = 6;  // rows per tile: 6 x 4 accumulators + 4 weight vectors + 1 broadcast of 32 registers
#else
constexpr int kVecBytes = 32;
constexpr int kRows = 2;  // 16 registers: 2 x 4 accumulators (x2 k-split) leave room for loads
#endif

template <typename T>
struct VecOf {
  typedef T type __attribute__((vector_size(kVecBytes)));
};

template <typename T>
constexpr int64_t units() {  // hidden units per block: one vector of each gate
  return kVecBytes / sizeof(T);
}

// acc (RR rows x 4 vectors) = init + sum_k a[r][k] * panel[k] (panel (K, 4, U), vector aligned), stored at
// dst + r * dst_stride. KS independent accumulator sets over alternating k hide the FMA latency when RR is small.
template <typename T, int RR, int KS>
inline void tile(const T* const* a, int64_t K, const T* __restrict panel, const T* init, int64_t init_stride,
                 T* dst, int64_t dst_stride) {
  using V = typename VecOf<T>::type;
  constexpr int64_t U = units<T>();
  V acc[KS][RR][4];
#pragma GCC unroll 8
  for (int s = 0; s < KS; ++s) {
#pragma GCC unroll 8
    for (int r = 0; r < RR; ++r) {
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) {
        if (s == 0 && init != nullptr) {
          std::memcpy(&acc[s][r][q], init + r * init_stride + q * U, sizeof(V));
        } else {
          acc[s][r][q] = V{};
        }
      }
    }
  }
  const V* w = reinterpret_cast<const V*>(panel);
  int64_t k = 0;
  for (; k + KS <= K; k += KS) {
#pragma GCC unroll 8
    for (int s = 0; s < KS; ++s) {
      const V w0 = w[(k + s) * 4], w1 = w[(k + s) * 4 + 1], w2 = w[(k + s) * 4 + 2], w3 = w[(k + s) * 4 + 3];
#pragma GCC unroll 8
      for (int r = 0; r < RR; ++r) {
        const T hb = a[r][k + s];
        acc[s][r][0] += hb * w0;
        acc[s][r][1] += hb * w1;
        acc[s][r][2] += hb * w2;
        acc[s][r][3] += hb * w3;
      }
    }
  }
  for (; k < K; ++k) {
#pragma GCC unroll 8
    for (int r = 0; r < RR; ++r) {
      const T hb = a[r][k];
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) {
        acc[0][r][q] += hb * w[k * 4 + q];
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < RR; ++r) {
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      V v = acc[0][r][q];
#pragma GCC unroll 8
      for (int s = 1; s < KS; ++s) {
        v += acc[s][r][q];
      }
      std::memcpy(dst + r * dst_stride + q * U, &v, sizeof(V));
    }
  }
}

// tile() for a run-time row count rr in [1, kRows].
template <typename T>
void tile_rows(int rr, const T* const* a, int64_t K, const T* panel, const T* init, int64_t init_stride, T* dst,
               int64_t dst_stride) {
  switch (rr) {
    case 1:
      return tile<T, 1, 2>(a, K, panel, init, init_stride, dst, dst_stride);
    case 2:
      return tile<T, 2, kRows <= 2 ? 2 : 1>(a, K, panel, init, init_stride, dst, dst_stride);
#if defined(__AVX512F__)
    case 3:
      return tile<T, 3, 1>(a, K, panel, init, init_stride, dst, dst_stride);
    case 4:
      return tile<T, 4, 1>(a, K, panel, init, init_stride, dst, dst_stride);
    case 5:
      return tile<T, 5, 1>(a, K, panel, init, init_stride, dst, dst_stride);
    case 6:
      return tile<T, 6, 1>(a, K, panel, init, init_stride, dst, dst_stride);
#endif
    default:
      TORCH_CHECK(false, "lstmlab_native.infer: bad tile height");
  }
}

// w (4H, K) -> (NU, K, 4, U): block u, row k, gate q, lane l holds w[q*H + u*U + l, k] (zero past H).
at::Tensor pack_weights(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.size(0) % 4 == 0 && w.device().is_cpu(),
              "lstmlab_native.pack_weights: expected a (4H, K) CPU tensor");
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kDouble,
              "lstmlab_native.pack_weights: float32 or float64 only");
  const int64_t H = w.size(0) / 4, K = w.size(1);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "lstmlab_pack", [&] {
    constexpr int64_t U = units<scalar_t>();
    const int64_t NU = (H + U - 1) / U;
    out = at::zeros({NU, K, 4, U}, w.options());
    const at::Tensor wc = w.contiguous();
    const scalar_t* src = wc.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, NU, 1, [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t len = std::min(U, H - u * U);
        for (int q = 0; q < 4; ++q) {
          for (int64_t l = 0; l < len; ++l) {
            const scalar_t* row = src + (q * H + u * U + l) * K;
            scalar_t* col = dst + (u * K * 4 + q) * U + l;
            for (int64_t k = 0; k < K; ++k) {
              col[k * 4 * U] = row[k];
            }
          }
        }
      }
    });
  });
  return out;
}

// Rows of step t that are live (a packed batch is sorted longest first).
inline int64_t live(const int64_t* sizes, int64_t t, int64_t B) {
  return sizes == nullptr ? B : std::min<int64_t>(B, sizes[t]);
}

// The cell on one tile row of one unit block: g = the four gates' pre-activations (4 vectors), c (one vector) in
// place from c_{t-1} to c_t, h = o * tanh(c_t). Float: the exp/sigmoid/tanh of lstm_math.h written on whole vectors
// (GCC does not vectorise a 16-lane loop it has unrolled first); double: lane by lane with std::exp/std::tanh.
using VF = VecOf<float>::type;
typedef int32_t VI __attribute__((vector_size(kVecBytes)));

// m ? a : b lane by lane (m: all ones or all zeros per lane), in bit operations: the ?: operator on vector
// extensions is not accepted by every compiler the library must build with.
inline VF select(VI m, VF a, VF b) {
  VI ai, bi;
  std::memcpy(&ai, &a, sizeof(VI));
  std::memcpy(&bi, &b, sizeof(VI));
  const VI r = (ai & m) | (bi & ~m);
  VF out;
  std::memcpy(&out, &r, sizeof(VF));
  return out;
}

// lstm_math.h's exp_f on whole vectors (same polynomial, same floor, so the same numbers).
inline VF vexp(VF x) {
  const VF lo = VF{} - 87.0f, hi = VF{} + 88.0f;
  x = select(x < lo, lo, x);
  x = select(x > hi, hi, x);
  const VF t = x * 1.44269504088896341f + 0.5f;
  VI ni = __builtin_convertvector(t, VI);  // truncation; floor below
  VF n = __builtin_convertvector(ni, VF);
  const VI up = n > t;  // -1 where truncation went up (negative t)
  ni += up;
  n = __builtin_convertvector(ni, VF);
  VF r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  VF p = VF{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const VI bits = (ni + 127) << 23;
  VF scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline VF vsigmoid(VF x) { return 1.0f / (1.0f + vexp(-x)); }

// lstm_math.h's tanh_ on whole vectors.
inline VF vtanh(VF x) {
  const VI neg = x < 0.0f;
  const VF a = select(neg, -x, x);
  const VF e = vexp(-2.0f * a);
  const VF t = (1.0f - e) / (1.0f + e);
  return select(neg, -t, t);
}

inline void cell(const float* g, float* c, float* h) {
  constexpr int64_t U = units<float>();
  VF gi, gf, gg, go, cv;
  std::memcpy(&gi, g, sizeof(VF));
  std::memcpy(&gf, g + U, sizeof(VF));
  std::memcpy(&gg, g + 2 * U, sizeof(VF));
  std::memcpy(&go, g + 3 * U, sizeof(VF));
  std::memcpy(&cv, c, sizeof(VF));
  cv = vsigmoid(gf) * cv + vsigmoid(gi) * vtanh(gg);
  const VF hv = vsigmoid(go) * vtanh(cv);
  std::memcpy(c, &cv, sizeof(VF));
  std::memcpy(h, &hv, sizeof(VF));
}

inline void cell(const double* g, double* c, double* h) {
  constexpr int64_t U = units<double>();
  for (int64_t l = 0; l < U; ++l) {
    const double cn = sigmoid(g[U + l]) * c[l] + sigmoid(g[l]) * std::tanh(g[2 * U + l]);
    c[l] = cn;
    h[l] = sigmoid(g[3 * U + l]) * std::tanh(cn);
  }
}

// One step for rows [r0, r1) and unit blocks [u0, u1): gates from xp_t and h_prev, then the cell.
template <typename T>
void step_block(int64_t t, int64_t r0, int64_t r1, int64_t u0, int64_t u1, int64_t B, int64_t H, int64_t NU,
                const T* xp, const T* whh, const T* h_prev, T* c, T* out) {
  constexpr int64_t U = units<T>();
  alignas(64) T g[kRows * 4 * U];
  const T* rows[kRows];
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t len = std::min(U, H - u * U);
    for (int64_t rb = r0; rb < r1; rb += kRows) {
      const int rr = static_cast<int>(std::min<int64_t>(kRows, r1 - rb));
      for (int r = 0; r < rr; ++r) {
        rows[r] = h_prev + (rb + r) * H;
      }
      tile_rows<T>(rr, rows, H, whh + u * H * 4 * U, xp + ((t * B + rb) * NU + u) * 4 * U, NU * 4 * U, g, 4 * U);
      for (int r = 0; r < rr; ++r) {
        T* const cb = c + (rb + r) * H + u * U;
        T* const hb = out + (t * B + rb + r) * H + u * U;
        const T* const gr = g + r * 4 * U;
        alignas(64) T cl[U];
        alignas(64) T hl[U];
        if (len == U) {
          std::memcpy(cl, cb, sizeof(cl));
        } else {
          for (int64_t l = 0; l < U; ++l) {
            cl[l] = l < len ? cb[l] : T(0);
          }
        }
        cell(gr, cl, hl);
        std::memcpy(cb, cl, sizeof(T) * len);
        std::memcpy(hb, hl, sizeof(T) * len);
      }
    }
  }
}

// Work per step (multiply-adds, B * H * 4H) below which one thread runs the recurrence alone (a barrier would cost
// more than it saves), and the rows per thread from which the rows are split rather than the unit blocks. Measured
// on a 2-core AMD EPYC (AVX-512), best of 9 rounds: at B <= 16 the unit split wins or ties at every H (each thread
// streams only its share of W_hh; with rows split, each streams all of it), from B = 64 the two tie. On a core
// that another process holds, a per-step barrier can cost a time slice: the row split never waits.
constexpr int64_t kMinParallelWork = 1 << 15;
constexpr int64_t kMinRowsPerThread = 4 * kRows;
constexpr int64_t kTaskWork = 1 << 15;  // multiply-adds per task of the unit split (one unit block at least)

// Spin until done reaches target, yielding the core after a while (it may be the one the awaited thread needs).
inline void wait_for(const std::atomic<int64_t>& done, int64_t target) {
  for (int spins = 0; done.load(std::memory_order_acquire) < target; ++spins) {
    if (spins >= 2000) {
      std::this_thread::yield();
    }
  }
}

// 2. the recurrence over all steps (outside AT_DISPATCH: OpenMP pragmas cannot sit in a macro argument).
template <typename scalar_t>
void recurrence(int64_t T, int64_t B, int64_t H, int64_t NU, const int64_t* sizes, const scalar_t* xp,
                const scalar_t* whh, const scalar_t* h0p, scalar_t* cp, scalar_t* op, int64_t threads,
                int64_t split) {
    int64_t team = at::in_parallel_region() ? 1 : at::get_num_threads();
    const int64_t work = B * H * 4 * H;
    if (threads > 0) {
      team = std::min(team, threads);
    } else if (work < kMinParallelWork) {
      team = 1;
    }
    const bool by_rows = split == 2 || (split == 0 && B >= kMinRowsPerThread * team);
    team = std::max<int64_t>(1, std::min(team, by_rows ? B : NU));
#ifndef _OPENMP
    team = 1;  // a compiler without OpenMP (Apple clang): one thread, the same numbers
#endif
    auto h_prev = [&](int64_t t) { return t == 0 ? h0p : op + (t - 1) * B * H; };
    if (team == 1) {
      for (int64_t t = 0; t < T; ++t) {
        step_block<scalar_t>(t, 0, live(sizes, t, B), 0, NU, B, H, NU, xp, whh, h_prev(t), cp, op);
      }
      return;
    }
#ifdef _OPENMP
    // Unit split: no barrier per step, but a shared counter of (step, unit blocks) tasks that each thread takes from and
    // a count of the finished ones that a task of step t waits on until step t-1 is done. A thread that the OS has
    // descheduled (another process on its core) then holds up the others only while it is inside a block: the rest
    // of the time the running thread takes every block itself. With a per-step barrier, each step waited for it.
    std::atomic<int64_t> next_task{0}, tasks_done{0};
    constexpr int64_t U = units<scalar_t>();
    // unit blocks per task: enough work to pay for its two shared-counter updates
    const int64_t chunk = std::min(NU, std::max<int64_t>(1, kTaskWork / (B * H * 4 * U)));
    const int64_t per_step = (NU + chunk - 1) / chunk;
#pragma omp parallel num_threads(static_cast<int>(team))
      {
        const int64_t n = omp_get_num_threads(), p = omp_get_thread_num();
        if (by_rows) {  // rows never interact: each thread runs its rows through every step, no barrier
          const int64_t r0 = B * p / n, r1 = B * (p + 1) / n;  // even shares: the weights cost each thread alike
          for (int64_t t = 0; t < T; ++t) {
            const int64_t end = std::min(r1, live(sizes, t, B));
            if (end <= r0) {
              break;  // live rows only shrink with t
            }
            step_block<scalar_t>(t, r0, end, 0, NU, B, H, NU, xp, whh, h_prev(t), cp, op);
          }
        } else {  // unit blocks handed out in order, step by step: see next_task
          for (;;) {
            const int64_t j = next_task.fetch_add(1, std::memory_order_relaxed);
            if (j >= T * per_step) {
              break;
            }
            const int64_t t = j / per_step, u0 = j % per_step * chunk;
            wait_for(tasks_done, t * per_step);  // every task of step t-1 written: h_{t-1} is whole
            step_block<scalar_t>(t, 0, live(sizes, t, B), u0, std::min(NU, u0 + chunk), B, H, NU, xp, whh,
                                 h_prev(t), cp, op);
            tasks_done.fetch_add(1, std::memory_order_release);
          }
        }
      }
#endif
}

// The forward pass. x (T, B, I) with unit stride in I (any strides over T and B), h0, c0 (B, H) contiguous; packed
// weights from pack_weights: w_ih (NU, I, 4, U), w_hh (NU, H, 4, U), bias (NU, 1, 4, U) or None. Returns out (T, B,
// H), h_T, c_T (B, H); with batch_sizes, step t runs its first batch_sizes[t] rows, out is zero past them and h_T,
// c_T are each row's state at its last step. threads: 0 = decide here, else at most that many; split: 0 = decide,
// 1 = unit blocks over threads, 2 = rows over threads.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_infer(const at::Tensor& x, const at::Tensor& h0,
                                                          const at::Tensor& c0, const at::Tensor& w_ih,
                                                          const at::Tensor& w_hh,
                                                          const c10::optional<at::Tensor>& bias,
                                                          const c10::optional<at::Tensor>& batch_sizes,
                                                          int64_t threads, int64_t split) {
  TORCH_CHECK(x.dim() == 3 && x.device().is_cpu() && x.stride(2) == 1,
              "lstmlab_native.infer: x must be a (T, B, I) CPU tensor with unit stride over I");
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2), H = c0.size(1);
  TORCH_CHECK(h0.is_contiguous() && c0.is_contiguous() && h0.sizes() == c0.sizes() && h0.size(0) == B,
              "lstmlab_native.infer: h0 and c0 must be contiguous (B, H)");
  const bool has_bias = bias.has_value() && bias->defined();
  for (const at::Tensor* t : {&x, &h0, &c0, &w_ih, &w_hh}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "lstmlab_native.infer: one dtype for every tensor");
  }
  const int64_t* sizes = nullptr;
  if (batch_sizes.has_value() && batch_sizes->defined()) {
    TORCH_CHECK(batch_sizes->scalar_type() == at::kLong && batch_sizes->is_contiguous() &&
                    batch_sizes->numel() == T,
                "lstmlab_native.infer: batch_sizes must be a contiguous int64 tensor of T entries");
    sizes = batch_sizes->data_ptr<int64_t>();
  }
  at::Tensor out = sizes != nullptr ? at::zeros({T, B, H}, x.options()) : at::empty({T, B, H}, x.options());
  at::Tensor c = c0.clone();
  at::Tensor h_T = at::empty({B, H}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstmlab_infer", [&] {
    constexpr int64_t U = units<scalar_t>();
    const int64_t NU = (H + U - 1) / U;
    TORCH_CHECK(w_hh.is_contiguous() && w_hh.numel() == NU * H * 4 * U && w_ih.is_contiguous() &&
                    w_ih.numel() == NU * I * 4 * U && (!has_bias || (bias->is_contiguous() &&
                                                                      bias->numel() == NU * 4 * U)),
                "lstmlab_native.infer: weights must come from pack_weights for this H and I");
    // 1. the input projection of every step: xp (T*B, NU, 4, U)
    at::Tensor xp_t = at::empty({T * B, NU, 4, U}, x.options());
    scalar_t* const xp = xp_t.data_ptr<scalar_t>();
    const scalar_t* const xptr = x.data_ptr<scalar_t>();
    const int64_t sx_t = x.stride(0), sx_b = x.stride(1);
    const scalar_t* const wih = w_ih.data_ptr<scalar_t>();
    const scalar_t* const bp = has_bias ? bias->data_ptr<scalar_t>() : nullptr;
    const int64_t row_tiles = (T * B + kRows - 1) / kRows;
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, kRows * I * 4 * U));
    at::parallel_for(0, row_tiles * NU, grain, [&](int64_t j0, int64_t j1) {
      const scalar_t* rows[kRows];
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t u = j / row_tiles, rt = j % row_tiles;  // unit block outer: its panel stays in cache
        const int64_t r0 = rt * kRows;
        const int rr = static_cast<int>(std::min<int64_t>(kRows, T * B - r0));
        for (int r = 0; r < rr; ++r) {
          const int64_t row = r0 + r;
          rows[r] = xptr + (row / B) * sx_t + (row % B) * sx_b;
        }
        tile_rows<scalar_t>(rr, rows, I, wih + u * I * 4 * U, bp == nullptr ? nullptr : bp + u * 4 * U, 0,
                            xp + (r0 * NU + u) * 4 * U, NU * 4 * U);
      }
    });
    recurrence<scalar_t>(T, B, H, NU, sizes, xp, w_hh.data_ptr<scalar_t>(), h0.data_ptr<scalar_t>(),
                         c.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), threads, split);
    const scalar_t* const h0p = h0.data_ptr<scalar_t>();
    const scalar_t* const op = out.data_ptr<scalar_t>();
    // h_T: each row's h at its last live step
    scalar_t* const hT = h_T.data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b) {
      int64_t len = T;
      if (sizes != nullptr) {
        len = 0;
        while (len < T && sizes[len] > b) {
          ++len;
        }
      }
      const scalar_t* src = len == 0 ? h0p + b * H : op + ((len - 1) * B + b) * H;
      std::memcpy(hT + b * H, src, sizeof(scalar_t) * H);
    }
  });
  return {out, h_T, c};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lstmlab_native, m) {
  m.def("pack_weights(Tensor w) -> Tensor");
  m.def(
      "infer(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? bias, Tensor? batch_sizes, "
      "int threads=0, int split=0) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lstmlab_native, CPU, m) {
  m.impl("pack_weights", &pack_weights);
  m.impl("infer", &lstm_infer);
}
