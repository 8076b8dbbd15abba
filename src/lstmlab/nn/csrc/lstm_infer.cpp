// The forward-only loop of lstmlab's fused LSTM layer: inference and no-grad calls of the plain cell.
//
// Nothing for a backward is kept or written: no per-step gates, c_t or tanh(c_t) buffers. Per layer and direction:
//
//   1. xp = x @ W_ih^T + b for all steps at once (one GEMM over T*B rows, parallel over row tiles) when the unit
//      blocks are split over the threads; with the rows split, x_t @ W_ih^T + b is instead the first part of each
//      step's tile (no xp buffer: a thread's rows need no other thread's projection);
//   2. per step, gates = xp_t + h_{t-1} @ W_hh^T computed by a register-tiled micro-kernel whose tile is R rows x
//      the four gates of U hidden units, and the cell's pointwise math done on that tile while it is still in
//      registers / L1: c stays in one (B, H) buffer (updated in place, it is c_T at the end), h_t goes straight
//      into out[t], which the next step reads as h_{t-1}.
//
// The weights are packed once (pack_weights, cached by lstmlab.nn.infer): for each block of U hidden units, a
// (K, 4, U) panel holding the i, f, g, o rows of those units, so that the micro-kernel streams one contiguous
// panel and its accumulators are exactly the gates one unit block needs.
//
// Threads: at very small B the recurrent product is a matrix-vector product that reads all of W_hh per step; the
// unit blocks are then split over the threads (each keeps its share of W_hh in its own L2) with one wait per step.
// With a tile of rows per thread the rows are split instead (no wait at all: rows never interact). Below a
// minimum of work per step one thread runs alone (a wait would cost more than it saves).
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
#include <initializer_list>
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
constexpr int kRows = 3;  // 16 registers: 3 x 4 accumulators + 1 broadcast, the weights read as FMA operands
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
      return tile<T, 2, 1>(a, K, panel, init, init_stride, dst, dst_stride);
    case 3:
      return tile<T, 3, 1>(a, K, panel, init, init_stride, dst, dst_stride);
#if defined(__AVX512F__)
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

// (NV, K, 4U) panels of w (K, N) row-major: block v, row k holds w[k, v*4U .. v*4U + 4U) (zero past N). The
// backward's dh_{t-1} = dG_t @ W_hh reads W_hh (4H, H) this way: K = 4H, N = H, one tile of 4 vectors per block.
at::Tensor pack_columns(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.device().is_cpu() && (w.scalar_type() == at::kFloat || w.scalar_type() == at::kDouble),
              "lstmlab_native.pack_columns: expected a (K, N) float32 or float64 CPU tensor");
  const int64_t K = w.size(0), N = w.size(1);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "lstmlab_pack_columns", [&] {
    constexpr int64_t W4 = 4 * units<scalar_t>();
    const int64_t NV = (N + W4 - 1) / W4;
    out = at::empty({NV, K, W4}, w.options());
    const at::Tensor wc = w.contiguous();
    const scalar_t* src = wc.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, NV, 1, [&](int64_t v0, int64_t v1) {
      for (int64_t v = v0; v < v1; ++v) {
        const int64_t len = std::min(W4, N - v * W4);
        for (int64_t k = 0; k < K; ++k) {
          scalar_t* d = dst + (v * K + k) * W4;
          std::memcpy(d, src + k * N + v * W4, sizeof(scalar_t) * len);
          std::fill(d + len, d + W4, scalar_t(0));
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

// The cell on one tile row of one unit block, from g = the four gates' pre-activations (4 vectors) and c_{t-1}:
// a[0..3] = the activated i, f, g, o, a[4] = c_t, a[5] = tanh(c_t), a[6] = h_t = o * tanh(c_t). Float: the
// exp/sigmoid/tanh of lstm_math.h written on whole vectors (GCC does not vectorise a 16-lane loop it has unrolled
// first); double: lane by lane with std::exp/std::tanh.
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

constexpr int kCellOuts = 7;  // i, f, g, o, c_t, tanh(c_t), h_t

inline void cell(const float* g, const float* c_prev, float* a) {
  constexpr int64_t U = units<float>();
  VF v[4], cv;
  for (int q = 0; q < 4; ++q) {
    std::memcpy(&v[q], g + q * U, sizeof(VF));
  }
  std::memcpy(&cv, c_prev, sizeof(VF));
  const VF i = vsigmoid(v[0]), f = vsigmoid(v[1]), gg = vtanh(v[2]), o = vsigmoid(v[3]);
  cv = f * cv + i * gg;
  const VF tc = vtanh(cv);
  const VF hv = o * tc;
  const VF outs[kCellOuts] = {i, f, gg, o, cv, tc, hv};
  std::memcpy(a, outs, sizeof(outs));
}

inline void cell(const double* g, const double* c_prev, double* a) {
  constexpr int64_t U = units<double>();
  for (int64_t l = 0; l < U; ++l) {
    const double i = sigmoid(g[l]), f = sigmoid(g[U + l]), gg = std::tanh(g[2 * U + l]), o = sigmoid(g[3 * U + l]);
    const double cn = f * c_prev[l] + i * gg, tc = std::tanh(cn);
    const double outs[kCellOuts] = {i, f, gg, o, cn, tc, o * tc};
    for (int k = 0; k < kCellOuts; ++k) {
      a[k * U + l] = outs[k];
    }
  }
}

// What one forward runs on: packed weights, xp = x @ W_ih^T + b (T*B, NU, 4, U), h0 and c0 (B, H), out (T, B, H).
// Inference: c (B, H) is the running cell state, updated in place. Training (acts != nullptr): c_t goes to cs[t],
// and acts (T, B, 4H) = the activated i|f|g|o, tcs (T, B, H) = tanh(c_t), xh (T, B, K) gets h_t in row t+1's
// first H columns: the buffers the backward reads (lstm_native.cpp's forward writes the same ones).
template <typename T>
struct Forward {
  int64_t steps, B, H, NU;
  const int64_t* sizes;
  const T *xp, *whh, *h0, *c0;
  T *c, *out;
  T *acts = nullptr, *cs = nullptr, *tcs = nullptr, *xh = nullptr;
  int64_t K = 0;
  // x itself instead of xp (xp == nullptr): each step tile adds x_t @ W_ih^T + b first (the row split, where a
  // thread's rows never need another thread's projection and xp, T*B*4H, would stream through memory twice)
  const T *x = nullptr, *wih = nullptr, *bias = nullptr;
  int64_t I = 0, sx_t = 0, sx_b = 0;
  int64_t ho = 0;    // out's row stride (0: H); 2H when a bidirectional layer's two directions share out
  bool rev = false;  // run backwards in time (inference only): step s is time steps - 1 - s

  int64_t out_stride() const { return ho == 0 ? H : ho; }
  int64_t time(int64_t s) const { return rev ? steps - 1 - s : s; }
  // row b of h_{t-1} (of h_{t+1} backwards in time)
  const T* h_row(int64_t t, int64_t b) const {
    const int64_t prev = rev ? t + 1 : t - 1;
    return prev < 0 || prev >= steps ? h0 + b * H : out + (prev * B + b) * out_stride();
  }
  const T* c_prev(int64_t t) const { return acts == nullptr ? c : t == 0 ? c0 : cs + (t - 1) * B * H; }
  T* c_out(int64_t t) const { return acts == nullptr ? c : cs + t * B * H; }
};

// len (<= U) values from src to dst: a whole block as one vector move (a memcpy of constant size is inlined; one of
// variable size is a library call, which at H = 128 cost as much as a tenth of a step).
template <typename T>
inline void copy_units(T* dst, const T* src, int64_t len) {
  constexpr int64_t U = units<T>();
  if (len == U) {
    std::memcpy(dst, src, sizeof(T) * U);
  } else {
    std::memcpy(dst, src, sizeof(T) * len);
  }
}

// Writes one row's cell outputs a (kCellOuts vectors) for units [j, j + len) of step t, row b.
template <typename T>
void store_cell(const Forward<T>& f, int64_t t, int64_t b, int64_t j, int64_t len, const T* a) {
  constexpr int64_t U = units<T>();
  const int64_t row = t * f.B + b;
  copy_units(f.c_out(t) + b * f.H + j, a + 4 * U, len);
  copy_units(f.out + row * f.out_stride() + j, a + 6 * U, len);
  if (f.acts == nullptr) {
    return;
  }
  for (int q = 0; q < 4; ++q) {
    copy_units(f.acts + row * 4 * f.H + q * f.H + j, a + q * U, len);
  }
  copy_units(f.tcs + row * f.H + j, a + 5 * U, len);
  if (t + 1 < f.steps) {
    copy_units(f.xh + (row + f.B) * f.K + j, a + 6 * U, len);
  }
}

// One step for rows [r0, r1) and unit blocks [u0, u1): gates from xp_t and h_{t-1}, then the cell.
template <typename T>
void step_block(const Forward<T>& f, int64_t t, int64_t r0, int64_t r1, int64_t u0, int64_t u1) {
  constexpr int64_t U = units<T>();
  alignas(64) T g[kRows * 4 * U];
  alignas(64) T cl[U];
  alignas(64) T a[kCellOuts * U];
  const T* rows[kRows];
  const T* const cp = f.c_prev(t);
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t len = std::min(U, f.H - u * U);
    for (int64_t rb = r0; rb < r1; rb += kRows) {
      const int rr = static_cast<int>(std::min<int64_t>(kRows, r1 - rb));
      const bool in_step = f.xp == nullptr;  // x's projection in this tile (Forward::x)
      if (in_step) {
        for (int r = 0; r < rr; ++r) {
          rows[r] = f.x + t * f.sx_t + (rb + r) * f.sx_b;
        }
        tile_rows<T>(rr, rows, f.I, f.wih + u * f.I * 4 * U, f.bias == nullptr ? nullptr : f.bias + u * 4 * U, 0, g,
                     4 * U);
      }
      for (int r = 0; r < rr; ++r) {
        rows[r] = f.h_row(t, rb + r);
      }
      const T* const init = in_step ? g : f.xp + ((t * f.B + rb) * f.NU + u) * 4 * U;
      tile_rows<T>(rr, rows, f.H, f.whh + u * f.H * 4 * U, init, in_step ? 4 * U : f.NU * 4 * U, g, 4 * U);
      for (int r = 0; r < rr; ++r) {
        const T* const cb = cp + (rb + r) * f.H + u * U;
        if (len < U) {
          std::fill(cl + len, cl + U, T(0));
        }
        copy_units(cl, cb, len);
        cell(g + r * 4 * U, cl, a);
        store_cell(f, t, rb + r, u * U, len, a);
      }
    }
  }
}

// Work per step (multiply-adds, B * H * 4H) below which one thread runs the recurrence alone (a barrier would cost
// more than it saves). Rows are split over the threads rather than unit blocks once each thread has a full tile of
// rows (kMinRowsPerThread), or two rows where a step is short (below kShortStep, where the unit split's one wait
// per step costs most). The unit split waits once per step for the slowest thread, and each thread streams only
// its share of W_hh; the row split never waits, each thread streams all of W_hh, and x's projection runs inside
// the step (Forward::x). Measured on a 2-core AMD EPYC Zen 4 (AVX-512), I=64, best of 15 rounds, the row split's
// speed-up over the unit split: H=128 (T=50): B=2 0.72, 3 0.95, 4 1.42, 8 1.19, 16 1.26, 48 1.30; H=256: B=2
// 0.64, 4 1.11, 8 0.91-1.08, 12 1.19, 16 1.18; H=512 (T=100): B=4 1.00, 6 0.81, 8 0.89, 12 1.09, 16 1.07. On a
// core that another process holds, a per-step wait can cost a time slice: one more reason for the row split.
constexpr int64_t kMinParallelWork = 1 << 15;
constexpr int64_t kMinRowsPerThread = kRows;
constexpr int64_t kShortStep = 1 << 21;
constexpr int64_t kTaskWork = 1 << 15;  // multiply-adds per task of a split over blocks (one block at least)

// Spin until done reaches target, yielding the core after a while (it may be the one the awaited thread needs).
inline void wait_for(const std::atomic<int64_t>& done, int64_t target) {
  for (int spins = 0; done.load(std::memory_order_acquire) < target; ++spins) {
    if (spins >= 2000) {
      std::this_thread::yield();
    }
  }
}

// task(s, j) for every step s < steps and task j < per_step of it, on `team` threads: the tasks are handed out in
// order from a shared counter, and a task of step s waits only until every task of step s-1 is done. No barrier
// per step: a thread that the OS has descheduled (another process on its core) holds the others up only while it
// is inside a task; the rest of the time the running thread takes every task itself.
template <typename F>
void run_tasks(int64_t steps, int64_t per_step, int64_t team, const F& task) {
  if (team <= 1) {
    for (int64_t s = 0; s < steps; ++s) {
      for (int64_t j = 0; j < per_step; ++j) {
        task(s, j);
      }
    }
    return;
  }
#ifdef _OPENMP
  std::atomic<int64_t> next_task{0}, tasks_done{0};
#pragma omp parallel num_threads(static_cast<int>(team))
  for (;;) {
    const int64_t k = next_task.fetch_add(1, std::memory_order_relaxed);
    if (k >= steps * per_step) {
      break;
    }
    const int64_t s = k / per_step;
    wait_for(tasks_done, s * per_step);  // every task of step s-1 written
    task(s, k % per_step);
    tasks_done.fetch_add(1, std::memory_order_release);
  }
#endif
}

// rows(r0, r1) on each of `team` threads, even shares of [0, B): rows never interact, so nothing waits.
template <typename F>
void run_rows(int64_t B, int64_t team, const F& rows) {
#ifdef _OPENMP
#pragma omp parallel num_threads(static_cast<int>(team))
  {
    const int64_t n = omp_get_num_threads(), p = omp_get_thread_num();
    rows(B * p / n, B * (p + 1) / n);
  }
#else
  (void)team;
  rows(int64_t{0}, B);
#endif
}

// The threads a loop of `work` multiply-adds per step runs on (threads > 0: at most that many).
inline int64_t team_for(int64_t work, int64_t threads) {
  int64_t team = at::in_parallel_region() ? 1 : at::get_num_threads();
  if (threads > 0) {
    team = std::min(team, threads);
  } else if (work < kMinParallelWork) {
    team = 1;
  }
#ifndef _OPENMP
  team = 1;  // a compiler without OpenMP (Apple clang): one thread, the same numbers
#endif
  return team;
}

// How the recurrence runs: on how many threads, rows or unit blocks split over them. split: 0 = decide, 1 = unit
// blocks over threads, 2 = rows over threads.
struct Plan {
  int64_t team;
  bool by_rows;
};

inline Plan plan_for(int64_t B, int64_t H, int64_t NU, int64_t threads, int64_t split) {
  const int64_t work = B * H * 4 * H;
  int64_t team = team_for(work, threads);
  const bool by_rows = split == 2 || (split == 0 && (B >= kMinRowsPerThread * team ||
                                                     (B >= 2 * team && work < kShortStep)));
  return {std::max<int64_t>(1, std::min(team, by_rows ? B : NU)), by_rows};
}

// 2. the recurrence over all steps, as planned.
template <typename T>
void recurrence(const Forward<T>& f, Plan plan) {
  const int64_t B = f.B, NU = f.NU, steps = f.steps;
  const int64_t team = plan.team;
  if (plan.by_rows && team > 1) {
    run_rows(B, team, [&](int64_t r0, int64_t r1) {
      for (int64_t s = 0; s < steps; ++s) {
        const int64_t t = f.time(s), end = std::min(r1, live(f.sizes, t, B));
        if (end <= r0) {
          break;  // live rows only shrink with t (no packed batch backwards in time)
        }
        step_block<T>(f, t, r0, end, 0, NU);
      }
    });
    return;
  }
  // unit blocks per task: enough work to pay for its two shared-counter updates
  const int64_t chunk = team == 1 ? NU : std::min(NU, std::max<int64_t>(1, kTaskWork / (B * f.H * 4 * units<T>())));
  const int64_t per_step = (NU + chunk - 1) / chunk;
  run_tasks(steps, per_step, team, [&](int64_t s, int64_t j) {
    const int64_t t = f.time(s);
    step_block<T>(f, t, 0, live(f.sizes, t, B), j * chunk, std::min(NU, (j + 1) * chunk));
  });
}

// 1. xp (T*B, NU, 4, U) = x @ W_ih^T + b for every step at once, parallel over (unit block, row tile) pairs.
template <typename T>
void project(const at::Tensor& x, const at::Tensor& w_ih, const T* bias, int64_t NU, T* xp) {
  constexpr int64_t U = units<T>();
  const int64_t B = x.size(1), I = x.size(2), N = x.size(0) * B;
  const T* const xptr = x.data_ptr<T>();
  const int64_t sx_t = x.stride(0), sx_b = x.stride(1);
  const T* const wih = w_ih.data_ptr<T>();
  const int64_t row_tiles = (N + kRows - 1) / kRows;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, kRows * I * 4 * U));
  at::parallel_for(0, row_tiles * NU, grain, [&](int64_t j0, int64_t j1) {
    const T* rows[kRows];
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t u = j / row_tiles, r0 = j % row_tiles * kRows;  // unit block outer: its panel stays in cache
      const int rr = static_cast<int>(std::min<int64_t>(kRows, N - r0));
      for (int r = 0; r < rr; ++r) {
        rows[r] = xptr + ((r0 + r) / B) * sx_t + ((r0 + r) % B) * sx_b;
      }
      tile_rows<T>(rr, rows, I, wih + u * I * 4 * U, bias == nullptr ? nullptr : bias + u * 4 * U, 0,
                   xp + (r0 * NU + u) * 4 * U, NU * 4 * U);
    }
  });
}

// The checks both forward ops make: x (T, B, I) with unit stride in I, weights from pack_weights for this H and I.
void check_forward(const at::Tensor& x, const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                   const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 3 && x.device().is_cpu() && x.stride(2) == 1,
              "lstmlab_native.infer: x must be a (T, B, I) CPU tensor with unit stride over I");
  TORCH_CHECK(c0.dim() == 2 && c0.is_contiguous() && c0.size(0) == x.size(1),
              "lstmlab_native.infer: c0 must be contiguous (B, H)");
  const int64_t I = x.size(2), H = c0.size(1);
  for (const at::Tensor* t : {&x, &c0, &w_ih, &w_hh}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "lstmlab_native.infer: one dtype for every tensor");
  }
  const int64_t U = x.scalar_type() == at::kFloat ? units<float>() : units<double>();
  const int64_t NU = (H + U - 1) / U;
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK(w_hh.is_contiguous() && w_hh.numel() == NU * H * 4 * U && w_ih.is_contiguous() &&
                  w_ih.numel() == NU * I * 4 * U &&
                  (!has_bias || (bias->is_contiguous() && bias->numel() == NU * 4 * U &&
                                 bias->scalar_type() == x.scalar_type())),
              "lstmlab_native.infer: weights must come from pack_weights for this H and I");
}

const int64_t* sizes_of(const c10::optional<at::Tensor>& batch_sizes, int64_t T) {
  if (!batch_sizes.has_value() || !batch_sizes->defined()) {
    return nullptr;
  }
  TORCH_CHECK(batch_sizes->scalar_type() == at::kLong && batch_sizes->is_contiguous() && batch_sizes->numel() == T,
              "lstmlab_native.infer: batch_sizes must be a contiguous int64 tensor of T entries");
  return batch_sizes->data_ptr<int64_t>();
}

// Projection and recurrence of f (its xp is allocated here).
template <typename T>
void run_forward(Forward<T> f, const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& w_hh,
                 const c10::optional<at::Tensor>& bias, int64_t threads, int64_t split) {
  const Plan plan = plan_for(f.B, f.H, f.NU, threads, split);
  const bool has_bias = bias.has_value() && bias->defined();
  const T* const b = has_bias ? bias->data_ptr<T>() : nullptr;
  at::Tensor xp;
  if (plan.by_rows) {  // the projection inside each step's tile (Forward::x)
    f.x = x.data_ptr<T>();
    f.wih = w_ih.data_ptr<T>();
    f.bias = b;
    f.I = x.size(2);
    f.sx_t = x.stride(0);
    f.sx_b = x.stride(1);
  } else {
    xp = at::empty({f.steps * f.B, f.NU, 4, units<T>()}, x.options());
    project<T>(x, w_ih, b, f.NU, xp.data_ptr<T>());
    f.xp = xp.data_ptr<T>();
  }
  f.whh = w_hh.data_ptr<T>();
  recurrence<T>(f, plan);
}

// h_T: each row's h at its last live step.
template <typename T>
void last_h(const T* h0, const T* out, const int64_t* sizes, int64_t steps, int64_t B, int64_t H, T* hT) {
  for (int64_t b = 0; b < B; ++b) {
    int64_t len = steps;
    if (sizes != nullptr) {
      len = 0;
      while (len < steps && sizes[len] > b) {
        ++len;
      }
    }
    const T* src = len == 0 ? h0 + b * H : out + ((len - 1) * B + b) * H;
    std::memcpy(hT + b * H, src, sizeof(T) * H);
  }
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
  check_forward(x, c0, w_ih, w_hh, bias);
  TORCH_CHECK(h0.is_contiguous() && h0.sizes() == c0.sizes() && h0.scalar_type() == x.scalar_type(),
              "lstmlab_native.infer: h0 and c0 must be contiguous (B, H)");
  const int64_t T = x.size(0), B = x.size(1), H = c0.size(1);
  const int64_t* sizes = sizes_of(batch_sizes, T);
  at::Tensor out = sizes != nullptr ? at::zeros({T, B, H}, x.options()) : at::empty({T, B, H}, x.options());
  at::Tensor c = c0.clone();
  at::Tensor h_T = at::empty({B, H}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstmlab_infer", [&] {
    constexpr int64_t U = units<scalar_t>();
    Forward<scalar_t> f{T, B, H, (H + U - 1) / U, sizes, nullptr, nullptr, h0.data_ptr<scalar_t>(),
                        c0.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), out.data_ptr<scalar_t>()};
    run_forward<scalar_t>(f, x, w_ih, w_hh, bias, threads, split);
    last_h<scalar_t>(f.h0, f.out, sizes, T, B, H, h_T.data_ptr<scalar_t>());
  });
  return {out, h_T, c};
}

// Both directions of a bidirectional layer in one call, each on a thread of its own (one thread each, so nothing
// waits on anything per step), out (T, B, 2H) written in place: forward direction in columns [0, H), backward in
// [H, 2H), as nn.LSTM lays them out. x (T, B, I) with unit stride in I; h0, c0 (2, B, H); the packed weights of
// each direction. Returns out, h_T, c_T (2, B, H). Not for packed batches.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_infer_bidir(const at::Tensor& x, const at::Tensor& h0,
                                                                const at::Tensor& c0, at::TensorList w_ih,
                                                                at::TensorList w_hh,
                                                                const c10::List<c10::optional<at::Tensor>>& bias) {
  TORCH_CHECK(w_ih.size() == 2 && w_hh.size() == 2 && bias.size() == 2 && h0.dim() == 3 && h0.size(0) == 2 &&
                  h0.sizes() == c0.sizes() && h0.is_contiguous() && c0.is_contiguous() &&
                  h0.scalar_type() == x.scalar_type(),
              "lstmlab_native.infer_bidir: two directions' weights, h0 and c0 contiguous (2, B, H)");
  const int64_t T = x.size(0), B = x.size(1), H = c0.size(2);
  const c10::optional<at::Tensor> b[2] = {bias.get(0), bias.get(1)};
  for (int d = 0; d < 2; ++d) {
    check_forward(x, c0.select(0, d), w_ih[d], w_hh[d], b[d]);
  }
  at::Tensor out = at::empty({T, B, 2 * H}, x.options());
  at::Tensor c = c0.clone();
  at::Tensor h_T = at::empty({2, B, H}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstmlab_infer_bidir", [&] {
    constexpr int64_t U = units<scalar_t>();
    auto direction = [&](int64_t d) {
      Forward<scalar_t> f{T, B, H, (H + U - 1) / U, nullptr, nullptr, nullptr, h0.data_ptr<scalar_t>() + d * B * H,
                          nullptr, c.data_ptr<scalar_t>() + d * B * H, out.data_ptr<scalar_t>() + d * H};
      f.ho = 2 * H;
      f.rev = d == 1;
      run_forward<scalar_t>(f, x, w_ih[d], w_hh[d], b[d], 1, 0);
      for (int64_t r = 0; r < B; ++r) {  // h_T: the last step run, time T-1 forwards, 0 backwards
        std::memcpy(h_T.data_ptr<scalar_t>() + (d * B + r) * H, f.h_row(f.time(T - 1) + (f.rev ? -1 : 1), r),
                    sizeof(scalar_t) * H);
      }
    };
    run_rows(2, team_for(B * H * 4 * H, 0) > 1 ? 2 : 1, [&](int64_t d0, int64_t d1) {
      for (int64_t d = d0; d < d1; ++d) {
        direction(d);
      }
    });
  });
  return {out, h_T, c};
}

// The training forward on the same loop: fills the buffers lstmlab_native::forward fills (its comment in
// lstm_native.cpp), from x (T, B, I) and the packed weights, with xh (T, B, K) already holding h_0 in row 0's first
// H columns (its other columns are not read here). acts (T, B, 4H), out, cs, tcs (T, B, H) contiguous; with
// batch_sizes, a step leaves the rows past its live ones as they were.
void lstm_train_forward(const at::Tensor& x, at::Tensor xh, const at::Tensor& c0, const at::Tensor& w_ih,
                        const at::Tensor& w_hh, const c10::optional<at::Tensor>& bias, at::Tensor acts, at::Tensor out,
                        at::Tensor cs, at::Tensor tcs, const c10::optional<at::Tensor>& batch_sizes, int64_t threads,
                        int64_t split) {
  check_forward(x, c0, w_ih, w_hh, bias);
  const int64_t T = x.size(0), B = x.size(1), H = c0.size(1);
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&xh, &acts, &out, &cs, &tcs}) {
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == x.scalar_type() && t->dim() == 3 && t->size(0) == T &&
                    t->size(1) == B, "lstmlab_native.train_forward: buffers must be contiguous (T, B, *)");
  }
  TORCH_CHECK(acts.size(2) == 4 * H && out.size(2) == H && cs.size(2) == H && tcs.size(2) == H && xh.size(2) >= H,
              "lstmlab_native.train_forward: acts (T, B, 4H), out, cs, tcs (T, B, H), xh (T, B, K >= H)");
  const int64_t* sizes = sizes_of(batch_sizes, T);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstmlab_train_forward", [&] {
    constexpr int64_t U = units<scalar_t>();
    scalar_t* const xhp = xh.data_ptr<scalar_t>();
    // h_0 is row 0 of xh: rows of stride K, while h_prev(0) is read with stride H
    at::Tensor h0 = xh.select(0, 0).narrow(1, 0, H).contiguous();
    Forward<scalar_t> f{T, B, H, (H + U - 1) / U, sizes, nullptr, nullptr, h0.data_ptr<scalar_t>(),
                        c0.data_ptr<scalar_t>(), nullptr, out.data_ptr<scalar_t>(), acts.data_ptr<scalar_t>(),
                        cs.data_ptr<scalar_t>(), tcs.data_ptr<scalar_t>(), xhp, xh.size(2)};
    run_forward<scalar_t>(f, x, w_ih, w_hh, bias, threads, split);
  });
}

// What the training backward runs on: the forward's acts (T, B, 4H), cs, tcs (T, B, H), c0 (B, H); wt = W_hh
// (4H, H) packed by pack_columns (NV, 4H, 4U); d_out (T, B, H) or null; dG (T, B, 4H) gets the gradient w.r.t.
// the pre-activations (it may be acts itself); dh, dc (B, H) hold dh_T, dc_T on entry, dh_0, dc_0 on exit.
template <typename T>
struct Backward {
  int64_t steps, B, H, NV;
  const T *acts, *cs, *tcs, *c0, *wt, *d_out;
  T *dG, *dh, *dc;
};

// The backward pointwise pass of step t, row b, units [j0, j0 + len), from dh_loc = the gradient reaching h_t
// from step t+1: lstm_native.cpp's backward_pointwise, the same formulas in the same order.
template <typename T>
void back_cell(const Backward<T>& w, int64_t t, int64_t b, int64_t j0, int64_t len, const T* dh_loc) {
  const int64_t H = w.H, row = t * w.B + b;
  const T* const a = w.acts + row * 4 * H + j0;
  T* const d = w.dG + row * 4 * H + j0;
  const T* const cp = (t > 0 ? w.cs + (row - w.B) * H : w.c0 + b * H) + j0;
  const T* const tc = w.tcs + row * H + j0;
  const T* const dout = w.d_out == nullptr ? nullptr : w.d_out + row * H + j0;
  T* const dcb = w.dc + b * H + j0;
#pragma GCC ivdep
  for (int64_t l = 0; l < len; ++l) {
    const T i = a[l], f = a[H + l], g = a[2 * H + l], o = a[3 * H + l], tt = tc[l];
    const T dh = dout == nullptr ? dh_loc[l] : dh_loc[l] + dout[l];
    const T dcj = dcb[l] + dh * o * (T(1) - tt * tt);
    d[3 * H + l] = dh * tt * o * (T(1) - o);
    d[l] = dcj * g * i * (T(1) - i);
    d[H + l] = dcj * cp[l] * f * (T(1) - f);
    d[2 * H + l] = dcj * i * (T(1) - g * g);
    dcb[l] = dcj * f;
  }
}

// Task of backward step s (t = steps_T - 1 - s; t = -1 is dh_0 only) for column blocks [v0, v1): dh_t[:, block] =
// dG_{t+1} @ W_hh[:, block] (dh_T as given for the last step), then the pointwise pass of step t on those units.
template <typename T>
void back_block(const Backward<T>& w, int64_t t, int64_t v0, int64_t v1, int64_t T_) {
  constexpr int64_t W4 = 4 * units<T>();
  alignas(64) T g[kRows * W4];
  const T* rows[kRows];
  for (int64_t v = v0; v < v1; ++v) {
    const int64_t j0 = v * W4, len = std::min(W4, w.H - j0);
    for (int64_t rb = 0; rb < w.B; rb += kRows) {
      const int rr = static_cast<int>(std::min<int64_t>(kRows, w.B - rb));
      if (t == T_ - 1) {
        for (int r = 0; r < rr; ++r) {
          std::memcpy(g + r * W4, w.dh + (rb + r) * w.H + j0, sizeof(T) * len);
        }
      } else {
        for (int r = 0; r < rr; ++r) {
          rows[r] = w.dG + ((t + 1) * w.B + rb + r) * 4 * w.H;
        }
        tile_rows<T>(rr, rows, 4 * w.H, w.wt + v * 4 * w.H * W4, nullptr, 0, g, W4);
      }
      for (int r = 0; r < rr; ++r) {
        if (t >= 0) {
          back_cell(w, t, rb + r, j0, len, g + r * W4);
        } else {
          std::memcpy(w.dh + (rb + r) * w.H + j0, g + r * W4, sizeof(T) * len);
        }
      }
    }
  }
}

// Backpropagation through time, split over column blocks of H (each thread reads its share of W_hh), for a batch
// that is not packed: the same results as lstmlab_native::backward (its comment in lstm_native.cpp).
void lstm_train_backward(const at::Tensor& acts, at::Tensor dgates, const at::Tensor& cs, const at::Tensor& tcs,
                         const at::Tensor& c0, const at::Tensor& w_cols, const c10::optional<at::Tensor>& d_out,
                         at::Tensor dh, at::Tensor dc, bool need_dh0, int64_t threads) {
  const bool has_out = d_out.has_value() && d_out->defined();
  TORCH_CHECK(acts.dim() == 3 && acts.size(2) % 4 == 0, "lstmlab_native.train_backward: acts must be (T, B, 4H)");
  const int64_t T = acts.size(0), B = acts.size(1), H = acts.size(2) / 4;
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&acts, &dgates, &cs, &tcs, &c0, &w_cols, &dh, &dc}) {
    TORCH_CHECK(t->is_contiguous() && t->device().is_cpu() && t->scalar_type() == acts.scalar_type(),
                "lstmlab_native.train_backward: contiguous CPU tensors of one dtype");
  }
  TORCH_CHECK(dgates.sizes() == acts.sizes() && cs.numel() == T * B * H && tcs.numel() == T * B * H &&
                  c0.numel() == B * H && dh.numel() == B * H && dc.numel() == B * H &&
                  (!has_out || (d_out->is_contiguous() && d_out->numel() == T * B * H &&
                                d_out->scalar_type() == acts.scalar_type())),
              "lstmlab_native.train_backward: shapes");
  AT_DISPATCH_FLOATING_TYPES(acts.scalar_type(), "lstmlab_train_backward", [&] {
    constexpr int64_t W4 = 4 * units<scalar_t>();
    const int64_t NV = (H + W4 - 1) / W4;
    TORCH_CHECK(w_cols.numel() == NV * 4 * H * W4, "lstmlab_native.train_backward: w_cols must come from pack_columns");
    const Backward<scalar_t> w{T, B, H, NV, acts.data_ptr<scalar_t>(), cs.data_ptr<scalar_t>(),
                               tcs.data_ptr<scalar_t>(), c0.data_ptr<scalar_t>(), w_cols.data_ptr<scalar_t>(),
                               has_out ? d_out->data_ptr<scalar_t>() : nullptr, dgates.data_ptr<scalar_t>(),
                               dh.data_ptr<scalar_t>(), dc.data_ptr<scalar_t>()};
    const int64_t chunk = std::min(NV, std::max<int64_t>(1, kTaskWork / (B * 4 * H * W4)));
    const int64_t per_step = (NV + chunk - 1) / chunk;
    const int64_t team = std::min(team_for(B * 4 * H * H, threads), per_step);
    run_tasks(T + (need_dh0 ? 1 : 0), per_step, team, [&](int64_t s, int64_t j) {
      back_block<scalar_t>(w, T - 1 - s, j * chunk, std::min(NV, (j + 1) * chunk), T);
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lstmlab_native, m) {
  m.def("pack_weights(Tensor w) -> Tensor");
  m.def("pack_columns(Tensor w) -> Tensor");
  m.def(
      "infer(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? bias, Tensor? batch_sizes, "
      "int threads=0, int split=0) -> (Tensor, Tensor, Tensor)");
  m.def(
      "infer_bidir(Tensor x, Tensor h0, Tensor c0, Tensor[] w_ih, Tensor[] w_hh, Tensor?[] bias) -> (Tensor, Tensor, "
      "Tensor)");
  m.def(
      "train_forward(Tensor x, Tensor(a!) xh, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? bias, Tensor(b!) acts, "
      "Tensor(c!) out, Tensor(d!) cs, Tensor(e!) tcs, Tensor? batch_sizes, int threads=0, int split=0) -> ()");
  m.def(
      "train_backward(Tensor acts, Tensor(a!) dgates, Tensor cs, Tensor tcs, Tensor c0, Tensor w_cols, "
      "Tensor? d_out, Tensor(b!) dh, Tensor(c!) dc, bool need_dh0, int threads=0) -> ()");
}

TORCH_LIBRARY_IMPL(lstmlab_native, CPU, m) {
  m.impl("pack_weights", &pack_weights);
  m.impl("pack_columns", &pack_columns);
  m.impl("infer", &lstm_infer);
  m.impl("infer_bidir", &lstm_infer_bidir);
  m.impl("train_forward", &lstm_train_forward);
  m.impl("train_backward", &lstm_train_backward);
}
