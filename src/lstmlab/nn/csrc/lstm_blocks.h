// The row-block machinery shared by the plain and the variant step loops: how a batch is cut into blocks that
// run the whole sequence on separate threads, how one step's rows are split further, and a packed batch's live rows.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>  // at::NoGradGuard (over_blocks)

#include <algorithm>
#include <cstdint>

namespace lstmlab {

// Rows [b0, b1) of one step, split over torch's own intra-op threads (the same OpenMP runtime as torch's
// kernels) only when a step is big enough to pay for waking them: at least kParallelElems per thread.
constexpr int64_t kParallelElems = 16384;

template <typename F>
void over_rows(int64_t B, int64_t H, const F& f) {
  at::parallel_for(0, B, std::max<int64_t>(1, kParallelElems / H), f);
}

// Rows (samples) never interact in an LSTM, so a batch can be cut into row blocks that run the whole sequence
// independently, one block per thread, with single-threaded matmuls inside: no fork/join per step, and each
// core keeps W_hh and its own rows in its cache. Worth it once a block has kMinBlockRows rows (measured on a
// 2-core AMD EPYC: below that a matmul split over the threads wins).
constexpr int64_t kMinBlockRows = 16;

inline int64_t row_blocks(int64_t B) {
  if (at::in_parallel_region()) {
    return 1;
  }
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B / kMinBlockRows));
}

// Runs f(r0, r1, k) for each row block k: in parallel with one thread per block, or directly (matmuls then use
// every thread) when there is one block. Inside a block, at::get_thread_num() is 0 on every thread (a parallel_for
// that runs inline, as over_rows does in a block, sets it so): per-thread state must be indexed by k too.
template <typename F>
void over_blocks(int64_t B, const F& f) {
  const int64_t blocks = row_blocks(B);
  if (blocks == 1) {
    f(int64_t{0}, B, int64_t{0});
    return;
  }
  at::parallel_for(0, blocks, 1, [&](int64_t k0, int64_t k1) {
    // Autograd and grad mode are thread-local: a worker thread must be told, like the calling one, that these
    // tensors are plain buffers.
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    const at::NoGradGuard no_grad;
    for (int64_t k = k0; k < k1; ++k) {
      f(B * k / blocks, B * (k + 1) / blocks, k);
    }
  });
}

// Rows of step t that are live: all B, or batch_sizes[t] for a packed batch (sorted longest first, so the live rows
// of a step are its first ones). A block [r0, r1) then runs rows [r0, min(r1, live)).
inline int64_t live_rows(const int64_t* batch_sizes, int64_t t, int64_t B) {
  return batch_sizes == nullptr ? B : std::min<int64_t>(B, batch_sizes[t]);
}

inline const int64_t* sizes_ptr(const c10::optional<at::Tensor>& batch_sizes, int64_t T) {
  if (!batch_sizes.has_value() || !batch_sizes->defined()) {
    return nullptr;
  }
  TORCH_CHECK(batch_sizes->device().is_cpu() && batch_sizes->scalar_type() == at::kLong &&
                  batch_sizes->is_contiguous() && batch_sizes->numel() == T,
              "lstmlab_native: batch_sizes must be a contiguous CPU int64 tensor of T entries");
  return batch_sizes->data_ptr<int64_t>();
}

}  // namespace lstmlab
