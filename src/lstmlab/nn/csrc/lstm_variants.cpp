// The step loops of lstmlab's LSTM variants (issue 12) out of Python: LayerNorm (Ba et al., gates and cell),
// peepholes (Gers et al.), zoneout (a weight per unit and step) and variational recurrent dropout (a mask per
// sequence on the h entering the recurrent product), in any combination, with packed batch_sizes, float and double.
// The equations are lstmlab.nn.cell.lstm_step's; fused.py's variant section holds the same loops in Python (the
// fallback) and documents the buffers, which both kinds of loops fill alike.
//
// The loops live in job-sized headers, compiled here as ONE translation unit (each TU of torch's headers costs ~6 s of
// compiler time, and the inlining in the hot loops, hence their float rounding, is then that of one unit as before):
//   lstm_variant_forward.h   variant_forward: the call's setup, the per-step matmul, the row pass
//   lstm_variant_backward.h  variant_backward: the same, last step first, and the column sums
//   lstm_zoneout.h           zoneout_mask: the training-mode zoneout masks of one seed
//   lstm_variant_rows.h      what forward and backward share (the gates of one row, the buffers' layout)
//   lstm_rownorm.h           LayerNorm of one row and its backward
//   lstm_args.h              the argument checks (shared with lstm_native.cpp)

#include <torch/library.h>

// In this order, as the loops stood in one file: the order in which the compiler meets them sets its inlining.
#include "lstm_variant_forward.h"
#include "lstm_variant_backward.h"
#include "lstm_zoneout.h"

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
  m.impl("variant_forward", &lstmlab::variant_forward);
  m.impl("variant_backward", &lstmlab::variant_backward);
  m.impl("zoneout_mask", &lstmlab::zoneout_mask);
}
