"""One layer's forward and variant backward on the loops that run it: the plain cell's or the variants', compiled
when :func:`~lstmlab.nn.fused.choose._native_for` gives the compiled loops, else in Python."""

from __future__ import annotations

from torch import Tensor

from lstmlab.nn.fused.choose import _native_for
from lstmlab.nn.fused.layout import _bias
from lstmlab.nn.fused.native import _variant_backward_native, _variant_forward_native
from lstmlab.nn.fused.plain import _plain_forward
from lstmlab.nn.fused.variant import Variant, _variant_backward_impl, _variant_forward


def _layer_forward(x: Tensor, h0: Tensor, c0: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor | None,
                   bias_hh: Tensor | None, weight_hr: Tensor | None, batch_sizes: Tensor | None, save: bool,
                   variant: Variant | None = None) -> tuple[Tensor, ...]:
    """(out, h_T, c_T, acts, cs, tcs, xh, extra): the last five are what backward needs, empty unless ``save``
    (``extra`` is the variants' own, see :mod:`lstmlab.nn.fused.variant`; empty for the plain cell)."""
    if not variant or all(t is None for t in variant.values()):
        return _plain_forward(x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, batch_sizes, save)
    T, B, _ = x.shape
    bias = _bias(bias_ih, bias_hh)
    native = _native_for(x, variant)
    if native is not None and T and B:
        return _variant_forward_native(native, x, h0, c0, weight_ih, weight_hh, bias, batch_sizes, save, variant)
    return _variant_forward(x, h0, c0, weight_ih, weight_hh, bias, batch_sizes, save, variant)


def _variant_backward(
    d_out: Tensor | None, d_hT: Tensor | None, d_cT: Tensor | None, x: Tensor, c0: Tensor, weight_ih: Tensor,
    weight_hh: Tensor, bias: Tensor | None, batch_sizes: Tensor | None, acts: Tensor, cs: Tensor, tcs: Tensor,
    xh: Tensor, extra: Tensor, variant: Variant, need_x: bool, need_h0: bool, need_weights: bool,
    inplace: bool = False,
) -> tuple[Tensor, ...]:
    """(dx, dh0, dc0, dW_ih, dW_hh, db, then each learned variant argument's gradient in the op's order), each empty
    when not needed or absent. ``inplace``: the compiled loops may write over ``acts`` and ``extra``."""
    T, B, _ = acts.shape
    native = _native_for(acts, variant)
    if native is not None and T and B:
        return _variant_backward_native(native, d_out, d_hT, d_cT, x, c0, weight_ih, weight_hh, bias, batch_sizes,
                                        acts, cs, tcs, xh, extra, variant, need_x, need_h0, need_weights, inplace)
    return _variant_backward_impl(d_out, d_hT, d_cT, x, c0, weight_ih, weight_hh, bias, batch_sizes, acts, cs, tcs,
                                  xh, extra, variant, need_x, need_h0, need_weights)
