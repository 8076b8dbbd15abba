"""``fused_layer``: the fused backend's entry, which picks how a call runs: the registered op, the op's
implementation and autograd called straight from Python in plain eager mode, or the reference math (under
torch.func, or for a variant no fast loop knows)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lstmlab.nn.cell import reference_layer
from lstmlab.nn.fused.choose import _loader, _native_for
from lstmlab.nn.fused.ops import _EagerLayer, _lstm_layer_impl, _plain_eager
from lstmlab.nn.infer import _PACKED, applies
from lstmlab.nn.variants import ARG_NAMES, FUSED_ARGS, OWNER


def fused_layer(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor | None,
    bias_hh: Tensor | None,
    weight_hr: Tensor | None = None,
    batch_sizes: Tensor | None = None,
    **variant: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Run one LSTM layer over x (T, B, I) from h0 (B, P) and c0 (B, H); P = H unless ``weight_hr`` projects.

    Returns ``(out (T, B, P), h_T (B, P), c_T (B, H))``; gates in i, f, g, o order as ``nn.LSTM``. With
    ``batch_sizes`` (T,) int64 on the CPU, non-increasing: step t runs only the first ``batch_sizes[t]`` rows (a
    packed batch laid out padded), ``out`` is zero past them and h_T, c_T are each row's state at its last step.
    ``variant``: the variant arguments by their names in :mod:`lstmlab.nn.variants` (``peephole`` (3, H),
    ``ln_gates`` (2, 4H), ``ln_cell`` (2, H), ``zoneout_mask`` (2, T, B, H), ``recurrent_mask`` (B, H)...).
    """
    P = h0.shape[-1] if h0.dim() == 2 else -1
    if x.dim() != 3 or h0.dim() != 2 or c0.dim() != 2 or h0.shape[0] != x.shape[1] or c0.shape[0] != x.shape[1] \
            or weight_hh.shape[1] != P or c0.shape[1] * 4 != weight_hh.shape[0]:
        raise ValueError(
            f"fused_layer: expected x (T, B, I), h0 (B, P) and c0 (B, H), got {tuple(x.shape)}, "
            f"{tuple(h0.shape)}, {tuple(c0.shape)}"
        )
    unknown = set(variant) - set(ARG_NAMES)
    if unknown:
        raise TypeError(f"fused_layer: unexpected keyword arguments {sorted(unknown)}")
    if variant and weight_hr is not None:
        raise ValueError("fused_layer: cell variants, zoneout and recurrent dropout do not combine with a projection")
    # torch.func cannot see through a custom op's autograd; a variant no fast loop knows yet runs the reference
    # math (its table entry's ``loops``)
    if _under_functorch(x, h0, c0, weight_ih, weight_hh, *variant.values()) or \
            any(OWNER[name].loops == "reference" for name, t in variant.items() if t is not None):
        return reference_layer(x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, batch_sizes, **variant)
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, *variant.values())
    )
    if save and variant.get("ln_gates") is not None:  # the LayerNorm loops and dW_ih read x whole: copy a batch_first
        x = x.contiguous()  # view once here, not in the forward and again in the backward
    args = (x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, batch_sizes, save,
            *(variant.get(name) for name in FUSED_ARGS))
    if _plain_eager(*args):
        out, h_T, c_T, *_ = _EagerLayer.apply(*args) if save else _lstm_layer_impl(*args)
    else:
        out, h_T, c_T, *_ = torch.ops.lstmlab.lstm_layer(*args)
    return out, h_T, c_T


def _under_functorch(*tensors: Tensor) -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev...) wraps any of these tensors."""
    if torch.compiler.is_compiling():
        return False
    return any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def bidirectional_layer(layer_fn: Any, x: Tensor, h0: Tensor, c0: Tensor, forward: list[Tensor | None],
                        backward: list[Tensor | None]) -> tuple[Tensor, Tensor, Tensor] | None:
    """Both directions of a plain bidirectional layer of the fused backend in one call of the forward-only loop, one
    thread per direction (``lstmlab_native::infer_bidir``): out (T, B, 2H), h_T, c_T (2, B, H); None where it does
    not apply (another backend, a call that keeps a graph for backward, a projection, a packed batch, ...: the
    caller then runs each direction as before)."""
    if len(forward) == 5 and forward[4] is None and len(backward) == 5 and backward[4] is None:
        forward, backward = forward[:4], backward[:4]  # (W_ih, W_hh, b_ih, b_hh, W_hr) without a projection
    if layer_fn is not fused_layer or len(forward) != 4 or len(backward) != 4 or x.dim() != 3:
        return None
    tensors = (x, h0, c0, *forward, *backward)
    if not _plain_eager(*tensors) or (torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                                      for t in tensors)):
        return None  # traced or transformed calls, and calls that keep a graph, take the op per direction
    native = _native_for(x)
    if not applies(native, x, tensors, None) or not hasattr(native, "infer_bidir") or h0.shape[0] != 2:
        return None
    packed = [_PACKED.get(native, *weights) for weights in (forward, backward)]
    if x.stride(2) != 1:
        x = x.contiguous()
    try:
        return native.infer_bidir(x, h0.contiguous(), c0.contiguous(), [p[0] for p in packed], [p[1] for p in packed],
                                  [p[2] for p in packed])
    except Exception as e:  # noqa: BLE001 - as choose._guarded: one warning line, the Python loops from here on
        _loader().fail("the forward", e)
        return None
