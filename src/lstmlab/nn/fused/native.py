"""The bridges to the compiled loops (``torch.ops.lstmlab_native``, csrc/): each takes the buffers the Python loops
use and calls one compiled op with the arguments in the order its C++ signature has them."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from lstmlab.nn.fused.buffers import _allocator, _cache
from lstmlab.nn.fused.choose import _mm
from lstmlab.nn.fused.layout import _input_rows, _last_steps, _stacked_weights, _width
from lstmlab.nn.fused.variant import Variant, _extra_views, _extra_width, _variant_weight_grads
from lstmlab.nn.infer import pack_layer
from lstmlab.nn.variants import BY_ARG, FUSED_LEARNED

# The learned arguments' column sums variant_backward hands back after db (4H), in csrc/lstm_variants.cpp's order
# (its kSums: [db | dγ_ih | dγ_hh | dγ_c | dβ_c | dp_i | dp_f | dp_o]); their sizes are the table's.
_SUMS = ("ln_gates", "ln_cell", "peephole")


def _sizes(batch_sizes: Tensor | None) -> Tensor | None:
    return None if batch_sizes is None else batch_sizes.to(torch.int64).contiguous()


def _contiguous(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


# Training steps below this batch size run the step loops of csrc/lstm_infer.cpp: x @ W_ih^T for all steps in one
# product, then per step only h @ W_hh^T, its hidden units split over the threads (each reads its share of W_hh,
# which stays in its core's cache) with the cell fused in, and the backward split the same way over columns of
# W_hh. From this size lstm_native.cpp's row blocks (one per thread, lstm_blocks.h) take over. A/B of a training
# step in one process, 2-core AMD EPYC Zen 4 (AVX-512, oneDNN GEMM), step loops' speed-up over the row blocks:
# H=128: B=16 1.49, 32 1.23, 48 1.11, 64 1.02, 96 0.96; H=256: B=16 1.22, 32 0.98, 64 0.94-1.00; H=512: B=32 1.15,
# 64 1.05, 96 0.94. At B=64 a tie, where the row blocks keep less memory.
TRAIN_MAX_BATCH = 64


def _step_loops(native: Any, x: Tensor) -> bool:
    """Whether a training call of batch x.shape[1] runs lstm_infer.cpp's step loops (:data:`TRAIN_MAX_BATCH`)."""
    return x.dtype in (torch.float32, torch.float64) and x.shape[1] < TRAIN_MAX_BATCH and \
        hasattr(native, "train_forward")


def _plain_forward_native(native: Any, x: Tensor, xh: Tensor, c0: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                          bias: Tensor | None, acts: Tensor, out: Tensor, cs: Tensor, tcs: Tensor,
                          batch_sizes: Tensor | None) -> None:
    """The plain cell's forward loop (T, B > 0), into the buffers :func:`~lstmlab.nn.fused.plain._plain_forward`
    allocated: lstm_infer.cpp's step loops below :data:`TRAIN_MAX_BATCH` (on weights packed for them), else
    lstm_native.cpp's row blocks on the stacked [W_hh | W_ih | b]."""
    sizes = _sizes(batch_sizes)
    if _step_loops(native, x):
        w_ih, w_hh, b = pack_layer(native, weight_ih, weight_hh, bias)
        native.train_forward(x if x.stride(2) == 1 else x.contiguous(), xh, c0.contiguous(), w_ih, w_hh, b, acts,
                             out, cs, tcs, sizes)
    else:
        w = _stacked_weights(weight_ih, weight_hh, bias)  # (4H, K)
        native.forward(xh, c0.contiguous(), w, acts, out, cs, tcs, sizes)


def _plain_backward_native(native: Any, acts: Tensor, dG: Tensor, cs: Tensor, tcs: Tensor, c0: Tensor,
                           weight_hh: Tensor, d_out: Tensor | None, dh: Tensor, dc: Tensor, need_h0: bool,
                           batch_sizes: Tensor | None) -> None:
    """The plain cell's backward loop (T, B > 0): dG, and dh, dc in place, on the loops the forward ran (the step
    loops take no packed batch: those run the row blocks both ways)."""
    sizes = _sizes(batch_sizes)
    if sizes is None and _step_loops(native, acts):
        with torch.no_grad():
            w_cols = native.pack_columns(weight_hh.detach())
        native.train_backward(acts, dG, cs, tcs, c0.contiguous(), w_cols, d_out, dh, dc, need_h0)
    else:
        native.backward(acts, dG, cs, tcs, c0.contiguous(), weight_hh.contiguous(), d_out, dh, dc, need_h0, sizes)


def _native_zoneout(mask: Tensor | None) -> Tensor | None:
    """The zoneout weights as the compiled loops take them: (2, T, B, H), or (2, 1, 1, H) when the same weights
    serve every step and row (eval's probabilities, expanded without copying)."""
    if mask is None:
        return None
    if mask.shape[1] * mask.shape[2] > 1 and mask.stride(1) == 0 and mask.stride(2) == 0:
        return mask[:, :1, :1].contiguous()
    return mask.contiguous()


def _variant_args(variant: Variant) -> tuple[Tensor | None, ...]:
    """The variant arguments as variant_forward and variant_backward take them, in their C++ order."""
    return (_contiguous(variant.get("ln_gates")), _contiguous(variant.get("ln_cell")),
            _contiguous(variant.get("peephole")), _contiguous(variant.get("recurrent_mask")),
            _native_zoneout(variant.get("zoneout_mask")))


def _variant_forward_native(native: Any, x: Tensor, h0: Tensor, c0: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                            bias: Tensor | None, batch_sizes: Tensor | None, save: bool, variant: Variant
                            ) -> tuple[Tensor, ...]:
    """:func:`~lstmlab.nn.fused.variant._variant_forward` on the compiled loops (T, B > 0)."""
    T, B, n_in = x.shape
    H = c0.shape[1]
    new = _allocator(x, save, batch_sizes is not None)
    acts, cs, tcs, out = new(T, B, 4 * H), new(T, B, H), new(T, B, H), new(T, B, H)
    extra = new(T, B, _extra_width(H, variant))
    recurrent_mask = variant.get("recurrent_mask")
    h_in0 = h0 if recurrent_mask is None else h0 * recurrent_mask  # variational recurrent dropout
    if variant.get("ln_gates") is not None:  # the loop takes x, W_ih and W_hh apart; h_in of step 0 goes into extra
        xh, w = x.new_empty(0), x.new_empty(0)
        _extra_views(extra, H, variant)["h_in"][0] = h_in0
    else:
        xh = _input_rows(x, h_in0, _width(H, n_in, bias is not None), bias is not None, new)
        w = _stacked_weights(weight_ih, weight_hh, bias)
    native.variant_forward(x.contiguous(), h0.contiguous(), c0.contiguous(), weight_ih.contiguous(),
                           weight_hh.contiguous(), _contiguous(bias), *_variant_args(variant), xh, w,
                           acts, cs, tcs, out, extra, _sizes(batch_sizes))
    h_T, c_T = _last_steps(out, batch_sizes), _last_steps(cs, batch_sizes)
    if not save:  # five distinct tensors: a custom op's outputs may not alias
        acts, cs, tcs, xh, extra = (x.new_empty(0) for _ in range(5))
    return out, h_T, c_T, acts, cs, tcs, xh, extra


def _variant_backward_native(
    native: Any, d_out: Tensor | None, d_hT: Tensor | None, d_cT: Tensor | None, x: Tensor, c0: Tensor,
    weight_ih: Tensor, weight_hh: Tensor, bias: Tensor | None, batch_sizes: Tensor | None, acts: Tensor, cs: Tensor,
    tcs: Tensor, xh: Tensor, extra: Tensor, variant: Variant, need_x: bool, need_h0: bool, need_weights: bool,
    inplace: bool = False,
) -> tuple[Tensor, ...]:
    """:func:`~lstmlab.nn.fused.variant._variant_backward_impl` on the compiled loops (T, B > 0): they give the
    gradients w.r.t. x W_ih^T (dA) and h_in W_hh^T (dR), the same tensor without the gates' LayerNorm, and the
    column sums of the bias (gates' LayerNorm), LayerNorm and peephole gradients; dx and the weight gradients are
    matmuls over all steps. ``inplace``: the loops may write the gradient over ``acts`` (as the plain cell's
    backward does) and, with the gates' LayerNorm, over ``extra``'s r̂."""
    T, B, H4 = acts.shape
    H = H4 // 4
    layer_norm = variant.get("ln_gates") is not None
    dh = acts.new_zeros(B, H) if d_hT is None else d_hT.contiguous().clone()
    dc = acts.new_zeros(B, H) if d_cT is None else d_cT.contiguous().clone()
    extra = extra.contiguous()
    v = _extra_views(extra, H, variant)
    if inplace and acts.is_contiguous():  # each row's gradient over what it was computed from, as it is read:
        dA = acts  # the activations, or â
        dR = v["r_hat"] if layer_norm else dA  # and r̂
    else:  # every row is written (zeros where a packed step does not reach)
        dA = _cache().empty((T, B, H4), acts)
        dR = _cache().empty((T, B, H4), acts) if layer_norm else dA
    widths = {name: BY_ARG[name].shape[0] * BY_ARG[name].shape[1] * H for name in _SUMS}
    sums = acts.new_empty(H4 + sum(widths.values()))
    native.variant_backward(_contiguous(d_out), dh, dc, c0.contiguous(), weight_hh.contiguous(), _contiguous(bias),
                            acts.contiguous(), cs.contiguous(), tcs.contiguous(), extra, *_variant_args(variant),
                            dA, dR, sums, need_h0, _sizes(batch_sizes))

    def empty() -> Tensor:  # a distinct tensor each: a custom op's outputs may not alias
        return acts.new_empty(0)

    dx = _mm(native, dA.view(T * B, H4), weight_ih).view(T, B, weight_ih.shape[1]) if need_x else empty()
    dw_ih, dw_hh, db, learned = empty(), empty(), empty(), {}
    if need_weights:
        dw_ih, dw_hh, db_mm = _variant_weight_grads(functools.partial(_mm, native), dA, dR, x, xh, v.get("h_in"),
                                                    bias is not None)
        if bias is not None:
            db = sums[:H4].clone() if db_mm is None else db_mm
        offset = H4
        for name in _SUMS:  # each learned argument's block of the sums, shaped as the argument
            if variant.get(name) is not None:
                learned[name] = sums[offset : offset + widths[name]].view(BY_ARG[name].shape[0], -1).clone()
            offset += widths[name]
    dh0, dc0 = (dh, dc) if need_h0 else (empty(), empty())
    return dx, dh0, dc0, dw_ih, dw_hh, db, *(learned.get(name, empty()) for name in FUSED_LEARNED)
