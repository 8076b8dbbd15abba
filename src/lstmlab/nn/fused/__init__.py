"""The ``fused`` backend: one layer, one direction, the whole sequence as ONE registered PyTorch operator.

Against the gate-level reference loop (:func:`lstmlab.nn.cell.reference_layer`) it saves most of the small ops
that dominate an LSTM on a CPU:

* a forward step is ONE matmul ``[h_{t-1} | x_t | 1] @ [W_hh | W_ih | b]^T`` (the textbook's h2h and x2h with
  both biases) plus one pass of pointwise math;
* the backward pass through time is hand-written: per step only the gates' pointwise derivatives and one
  ``dG_t @ W_hh``; all the parameter gradients are ONE matmul over all steps.

``lstmlab::lstm_layer`` and ``lstmlab::lstm_layer_backward`` are ``torch.library`` custom ops with fake (meta)
kernels, an autograd formula whose saved tensors go through ``ctx.save_for_backward`` (so saved-tensor hooks and
checkpointing see them) and a vmap rule, so ``torch.compile(fullgraph=True)``, ``torch.export`` and inference mode
treat the layer like any built-in op. Big training buffers come from a cache that reuses a buffer only when no
tensor outside it holds it (:class:`_BufferCache`).

Double backward (``create_graph=True``, ``torch.func.grad``) is exact: the first backward is then recomputed with
the differentiable reference math instead of the hand-written kernels.

The per-step loops run either in Python (always available) or in a small C++ extension
(:mod:`lstmlab.nn._native`, compiled once in the background and cached on disk) when it is ready; both give
the same numbers up to float rounding.

``torch.func`` transforms (grad, vmap, jacrev, per-sample gradients) cannot differentiate through a custom op's
registered autograd in this torch, so calls whose tensors a transform wraps run the reference math instead: same
numbers, no fused speed.
The package, by job: ``dispatch`` (:func:`fused_layer`: which path a call takes), ``ops`` (the registered ops,
their fake kernels, autograd and vmap), ``layer`` (a layer on the loops that run it), ``choose`` (compiled or
Python loops, and the fallback from one to the other), ``plain`` and ``variant`` (the Python loops), ``native``
(the bridges to the compiled loops), ``layout`` and ``buffers`` (what they share). The compiled loops' self-test
is :mod:`lstmlab.nn.selftest`.
"""

from lstmlab.nn.fused.buffers import _BufferCache, release_buffers
from lstmlab.nn.fused.dispatch import bidirectional_layer, fused_layer
from lstmlab.nn.fused.ops import lstm_layer, lstm_layer_backward, lstm_layer_backward_, lstm_variant_layer_backward
from lstmlab.nn.variants import FUSED_ARGS as VARIANT_ARGS  # the op's variant arguments, in its order

__all__ = ["VARIANT_ARGS", "_BufferCache", "bidirectional_layer", "fused_layer", "lstm_layer", "lstm_layer_backward",
           "lstm_layer_backward_", "lstm_variant_layer_backward", "release_buffers"]
