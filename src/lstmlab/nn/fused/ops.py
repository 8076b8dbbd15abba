"""The registered operators ``lstmlab::lstm_layer`` and its backwards: their schemas (the variant arguments are the
table's, :data:`lstmlab.nn.variants.FUSED_ARGS`), fake kernels, autograd formula and vmap rules."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lstmlab.nn.cell import reference_layer
from lstmlab.nn.fused.choose import _guarded, _loader, _native_for
from lstmlab.nn.fused.layer import _layer_forward, _variant_backward
from lstmlab.nn.fused.layout import _bias, _width
from lstmlab.nn.fused.plain import _backward_impl
from lstmlab.nn.fused.variant import _extra_width
from lstmlab.nn.masks import nothing_traces
from lstmlab.nn.variants import FUSED_ARGS, FUSED_LEARNED

_N_STANDARD = 10  # the op's inputs before the variant arguments: x ... weight_hr, batch_sizes, save
_VARIANT_SCHEMA = ", ".join(f"Tensor? {name}=None" for name in FUSED_ARGS)
_LAYER_SCHEMA = " ".join(f"""(Tensor x, Tensor h0, Tensor c0, Tensor weight_ih, Tensor weight_hh, Tensor? bias_ih,
    Tensor? bias_hh, Tensor? weight_hr, Tensor? batch_sizes, bool save, {_VARIANT_SCHEMA}) ->
    (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)""".split())  # one line, as torch parses it


def _plain_eager(*args: Any) -> bool:
    """Whether this call runs in plain eager mode: then the op's implementation and autograd formula are called
    straight from Python, skipping torch.library's Python wrappers around a registered op (~1 ms per training step,
    4% of a B=256 step). Anything that traces or intercepts ops (torch.compile, export, jit.trace, dispatch and
    function modes, tensor subclasses such as FakeTensor) gets the registered op itself."""
    if not nothing_traces():
        return False
    return all(type(a) in (Tensor, torch.nn.Parameter) for a in args if isinstance(a, Tensor))


def _keep_graph() -> bool:
    """Whether the running backward keeps the graph (retain_graph=True): then the saved tensors must survive."""
    probe = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    if probe is None:  # a torch without the probe: always keep, the safe choice
        return True
    try:
        return bool(probe())
    except RuntimeError:
        return True


# --- forward ------------------------------------------------------------------------------------------------------


def _lstm_layer_impl(*args: Tensor | bool | None) -> tuple[Tensor, ...]:
    """The op: :func:`~lstmlab.nn.fused.layer._layer_forward`, on the Python loops if the compiled ones raise."""
    variant = dict(zip(FUSED_ARGS, args[_N_STANDARD:], strict=False))
    return _guarded("the forward", args[0], lambda: _layer_forward(*args[:_N_STANDARD], variant))


lstm_layer = torch.library.custom_op("lstmlab::lstm_layer", mutates_args=(), schema=_LAYER_SCHEMA)(_lstm_layer_impl)


@lstm_layer.register_fake
def _layer_fake(x: Tensor, h0: Tensor, c0: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor | None,
                bias_hh: Tensor | None, weight_hr: Tensor | None, batch_sizes: Tensor | None, save: bool,
                *values: Tensor | None, **named: Tensor | None) -> tuple[Tensor, ...]:
    T, B, n_in = x.shape
    H4, P = weight_hh.shape
    H = H4 // 4
    variant = {**dict(zip(FUSED_ARGS, values, strict=False)), **named}
    K = _width(P, n_in, bias_ih is not None or bias_hh is not None)
    if any(t is not None for t in variant.values()):
        saved = (x.new_empty(T, B, H4), x.new_empty(T, B, H), x.new_empty(T, B, H),
                 x.new_empty(0) if variant.get("ln_gates") is not None else x.new_empty(T, B, K),
                 x.new_empty(T, B, _extra_width(H, variant)))
    else:
        saved = (x.new_empty(T, B, H4), x.new_empty(T, B, H), x.new_empty(T, B, H), x.new_empty(T, B, K),
                 x.new_empty(0))
    if not save:
        saved = tuple(x.new_empty(0) for _ in range(5))
    return (x.new_empty(T, B, P), x.new_empty(B, P), x.new_empty(B, H), *saved)


# --- backward -----------------------------------------------------------------------------------------------------


def _backward_fake(d_out, d_hT, d_cT, c0, weight_ih, weight_hh, weight_hr, batch_sizes, acts, cs, tcs, xh, has_bias,  # noqa: ANN001, ANN202
      need_x, need_h0, need_weights):  # noqa: ANN001, ANN202
    T, B, H4 = acts.shape
    P, n_in = weight_hh.shape[1], weight_ih.shape[1]
    w = need_weights
    shapes = [(T, B, n_in) if need_x else (0,), (B, P) if need_h0 else (0,), (B, H4 // 4) if need_h0 else (0,),
              weight_ih.shape if w else (0,), weight_hh.shape if w else (0,), (H4,) if w and has_bias else (0,),
              weight_hr.shape if w and weight_hr is not None else (0,)]
    return tuple(acts.new_empty(shape) for shape in shapes)


_BACKWARD_ARGS = """(Tensor? d_out, Tensor? d_hT, Tensor? d_cT, Tensor c0, Tensor weight_ih, Tensor weight_hh,
    Tensor? weight_hr, Tensor? batch_sizes, Tensor{acts} acts, Tensor cs, Tensor tcs, Tensor xh, bool has_bias,
    bool need_x, bool need_h0, bool need_weights) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"""


@torch.library.custom_op("lstmlab::lstm_layer_backward", mutates_args=(), schema=_BACKWARD_ARGS.format(acts=""))
def lstm_layer_backward(*args: Any) -> tuple[Tensor, ...]:
    """The hand-written BPTT of ``lstm_layer``; reads the saved tensors only."""
    return _guarded("the backward", args[8], lambda: _backward_impl(*args, inplace=False))


@torch.library.custom_op("lstmlab::lstm_layer_backward_", mutates_args=("acts",),
                         schema=_BACKWARD_ARGS.format(acts="(a!)"))
def lstm_layer_backward_(*args: Any) -> tuple[Tensor, ...]:
    """As ``lstm_layer_backward``, but may overwrite ``acts`` (a backward that frees its graph): no extra buffer.
    Not guarded here: after a failure acts may be half overwritten, so :func:`_backward_all` recomputes it."""
    return _backward_impl(*args, inplace=True)


lstm_layer_backward.register_fake(_backward_fake)
lstm_layer_backward_.register_fake(_backward_fake)


_N_SAVED = 14  # the variant backward's inputs before the variant arguments: d_out ... extra
_VARIANT_BACKWARD_SCHEMA = " ".join(f"""(Tensor? d_out, Tensor? d_hT, Tensor? d_cT, Tensor x, Tensor c0,
    Tensor weight_ih, Tensor weight_hh, Tensor? bias, Tensor? batch_sizes, Tensor acts, Tensor cs, Tensor tcs,
    Tensor xh, Tensor extra,
    {", ".join(f"Tensor? {name}" for name in FUSED_ARGS)}, bool need_x, bool need_h0, bool need_weights) ->
    ({", ".join("Tensor" for _ in range(6 + len(FUSED_LEARNED)))})""".split())


def _split_variant_backward_args(args: tuple) -> tuple[tuple, dict[str, Tensor | None], tuple]:
    """The variant backward op's inputs as (before the variant arguments, the variant arguments by name, after)."""
    return args[:_N_SAVED], dict(zip(FUSED_ARGS, args[_N_SAVED:-3], strict=True)), args[-3:]


def _variant_backward_fake(*args: Any) -> tuple[Tensor, ...]:
    (_, _, _, x, _, weight_ih, weight_hh, bias, _, acts, *_), variant, (need_x, need_h0, w) = \
        _split_variant_backward_args(args)
    T, B, H4 = acts.shape
    H = H4 // 4
    shapes = [x.shape if need_x else (0,), (B, H) if need_h0 else (0,), (B, H) if need_h0 else (0,),
              weight_ih.shape if w else (0,), weight_hh.shape if w else (0,), (H4,) if w and bias is not None else (0,),
              *(variant[name].shape if w and variant[name] is not None else (0,) for name in FUSED_LEARNED)]
    return tuple(acts.new_empty(shape) for shape in shapes)


@torch.library.custom_op("lstmlab::lstm_variant_layer_backward", mutates_args=(), schema=_VARIANT_BACKWARD_SCHEMA)
def lstm_variant_layer_backward(*args: Any) -> tuple[Tensor, ...]:
    """The hand-written BPTT of ``lstm_layer`` with a variant; reads the saved tensors only."""
    before, variant, after = _split_variant_backward_args(args)
    return _guarded("the backward", args[9], lambda: _variant_backward(*before, variant, *after))


lstm_variant_layer_backward.register_fake(_variant_backward_fake)


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, save, *variant = inputs
    variant += [None] * (len(FUSED_ARGS) - len(variant))  # inputs end at the last argument given
    _, _, _, acts, cs, tcs, xh, extra = output
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the unused outputs (acts alone is T*B*4H)
    ctx.has = [t is not None for t in (b_ih, b_hh, w_hr, batch_sizes, *variant)]
    ctx.variant = any(t is not None for t in variant)
    present = [t for t in (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, *variant) if t is not None]
    ctx.save_for_backward(*present, acts, cs, tcs, xh, extra)


def _unpack(ctx: Any) -> tuple[list[Tensor | None], Tensor | None, dict[str, Tensor], tuple[Tensor, ...]]:
    saved = list(ctx.saved_tensors)
    acts, cs, tcs, xh, extra = saved[-5:]
    it = iter(saved[:-5])
    x, h0, c0, w_ih, w_hh = (next(it) for _ in range(5))
    b_ih, b_hh, w_hr, batch_sizes, *variant = (next(it) if has else None for has in ctx.has)
    variant_args = {name: t for name, t in zip(FUSED_ARGS, variant, strict=True) if t is not None}
    return [x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr], batch_sizes, variant_args, (acts, cs, tcs, xh, extra)


def _backward(ctx: Any, d_out: Tensor | None, d_hT: Tensor | None, d_cT: Tensor | None, *_: Any) -> tuple:
    # One gradient per input the call gave (the op's inputs end at the last argument given).
    grads = _backward_all(ctx, d_out, d_hT, d_cT)
    return grads[: len(ctx.needs_input_grad)]


def _backward_all(ctx: Any, d_out: Tensor | None, d_hT: Tensor | None, d_cT: Tensor | None) -> tuple:
    """The gradients of all the op's inputs: the 8 standard ones, none for batch_sizes and save, then each variant
    argument's (none for the masks)."""
    inputs, batch_sizes, variant, saved = _unpack(ctx)
    need = list(ctx.needs_input_grad[:8])
    given = ctx.needs_input_grad[_N_STANDARD:]
    need_learned = {name: k < len(given) and given[k] for k, name in enumerate(FUSED_ARGS) if name in FUSED_LEARNED}
    grads = (d_out, d_hT, d_cT)
    if torch.is_grad_enabled():  # create_graph: the gradient itself must be differentiable
        standard, learned = _differentiable_backward(inputs, batch_sizes, variant, need, need_learned, grads)
        return (*standard, None, None, *(learned.get(name) for name in FUSED_ARGS))
    if saved[0].dim() != 3:
        raise RuntimeError("lstmlab fused LSTM: this forward kept nothing for backward (it ran without grad)")
    if _native_for(saved[0], variant) is None:
        return _hand_backward(ctx.variant, inputs, batch_sizes, variant, saved, need, need_learned, grads)
    try:
        return _hand_backward(ctx.variant, inputs, batch_sizes, variant, saved, need, need_learned, grads)
    except Exception as e:  # noqa: BLE001 - the Python loops give the numbers instead
        _loader().fail("the backward", e)
        with _loader().forced(None):  # the compiled backward may have overwritten the saved tensors: recompute them
            fresh = _layer_forward(*inputs, batch_sizes, True, variant)[3:]
            return _hand_backward(ctx.variant, inputs, batch_sizes, variant, fresh, need, need_learned, grads)


def _hand_backward(is_variant: bool, inputs: list[Tensor | None], batch_sizes: Tensor | None,
                   variant: dict[str, Tensor], saved: tuple[Tensor, ...], need: list[bool],
                   need_learned: dict[str, bool], grads: tuple[Tensor | None, Tensor | None, Tensor | None]) -> tuple:
    """The hand-written backward of one call from its saved tensors (acts, cs, tcs, xh, extra)."""
    if is_variant:
        return _hand_variant_backward(inputs, batch_sizes, variant, saved, need, need_learned, grads)
    acts, cs, tcs, xh, _ = saved
    d_out, d_hT, d_cT = grads
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = inputs
    # The activations are ours to overwrite unless the graph is kept for another backward (or being traced).
    inplace = not torch.compiler.is_compiling() and not _keep_graph()
    args = (d_out, d_hT, d_cT, c0, w_ih, w_hh, w_hr, batch_sizes, acts, cs, tcs, xh,
            b_ih is not None or b_hh is not None, need[0], need[1] or need[2], any(need[3:]))
    if _plain_eager(*args):
        result = _backward_impl(*args, inplace=inplace)
    else:
        op = torch.ops.lstmlab.lstm_layer_backward_ if inplace else torch.ops.lstmlab.lstm_layer_backward
        result = op(*args)
    dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr = result
    return (*_standard_grads([dx, dh0, dc0, dw_ih, dw_hh, db, db, dw_hr], need), None, None,
            *(None for _ in FUSED_ARGS))


def _hand_variant_backward(inputs: list[Tensor | None], batch_sizes: Tensor | None, variant: dict[str, Tensor],
                           saved: tuple[Tensor, ...], need: list[bool], need_learned: dict[str, bool],
                           grads: tuple[Tensor | None, Tensor | None, Tensor | None]) -> tuple:
    """:func:`_hand_backward` of a call with variants, through ``lstm_variant_layer_backward``."""
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = inputs
    args = (*grads, x, c0, w_ih, w_hh, _bias(b_ih, b_hh), batch_sizes, *saved,
            *(variant.get(name) for name in FUSED_ARGS), need[0], need[1] or need[2],
            any(need[3:]) or any(need_learned.values()))
    if _plain_eager(*args):  # the activations are ours to overwrite unless the graph is kept
        before, named, after = _split_variant_backward_args(args)
        result = _variant_backward(*before, named, *after, inplace=not _keep_graph())
    else:
        result = torch.ops.lstmlab.lstm_variant_layer_backward(*args)
    dx, dh0, dc0, dw_ih, dw_hh, db, *learned = result
    ours = _standard_grads([dx, dh0, dc0, dw_ih, dw_hh, db, db, None], need)
    by_name = {name: g for name, g in zip(FUSED_LEARNED, learned, strict=True) if need_learned[name]}
    return (*ours, None, None, *(by_name.get(name) for name in FUSED_ARGS))


def _standard_grads(out: list[Tensor | None], need: list[bool]) -> list[Tensor | None]:
    """The 8 standard inputs' gradients, None where not needed; b_ih and b_hh share one sum, so one is copied."""
    ours = [o if n else None for o, n in zip(out, need, strict=True)]
    if need[5] and need[6]:
        ours[6] = out[6].clone()  # two parameters must not share one gradient tensor
    return ours


def _differentiable_backward(inputs: list[Tensor | None], batch_sizes: Tensor | None, variant: dict[str, Tensor],
                             need: list[bool], need_learned: dict[str, bool],
                             grads: tuple[Tensor | None, Tensor | None, Tensor | None]
                             ) -> tuple[list[Tensor | None], dict[str, Tensor | None]]:
    """The first backward as differentiable reference math, for double backward and torch.func: the 8 standard
    inputs' gradients and the learned variant arguments' (None where not needed)."""
    names = list(need_learned)
    everything = [*inputs, *(variant.get(name) for name in names)]
    wanted_mask = need + [need_learned[name] for name in names]
    wanted = [t for t, n in zip(everything, wanted_mask, strict=True) if n]
    with torch.enable_grad():
        outs = reference_layer(*inputs, batch_sizes=batch_sizes, **variant)
        pairs = [(o, g) for o, g in zip(outs, grads, strict=True) if g is not None]
        if pairs:
            found = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                             create_graph=True, allow_unused=True))
    result = []
    for t, n in zip(everything, wanted_mask, strict=True):
        g = (next(found) if pairs else None) if n else None
        result.append(torch.zeros_like(t) if n and g is None else g)
    return result[:8], dict(zip(names, result[8:], strict=True))


lstm_layer.register_autograd(_backward, setup_context=_setup_context)


class _EagerLayer(torch.autograd.Function):
    """``lstmlab::lstm_layer`` with its registered autograd formula, called directly in plain eager mode (see
    :func:`_plain_eager`): the same implementation, setup_context and backward as the op."""

    @staticmethod
    def forward(*args: Any) -> tuple[Tensor, ...]:  # noqa: D102
        return _lstm_layer_impl(*args)

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)


# --- vmap: run the op once per vmapped slice (correct for any in_dims; torch.func users want the numbers) ---------


def _loop_vmap(op: Any) -> Any:
    def rule(info: Any, in_dims: tuple, *args: Any) -> tuple:
        outs = []
        for k in range(info.batch_size):
            sliced = [a.select(d, k) if d is not None and isinstance(a, Tensor) else a
                      for a, d in zip(args, in_dims, strict=True)]
            outs.append(op(*sliced))
        stacked = tuple(torch.stack(parts) for parts in zip(*outs, strict=True))
        return stacked, tuple(0 for _ in stacked)

    return rule


torch.library.register_vmap("lstmlab::lstm_layer", _loop_vmap(lstm_layer))
torch.library.register_vmap("lstmlab::lstm_layer_backward", _loop_vmap(lstm_layer_backward))
torch.library.register_vmap("lstmlab::lstm_variant_layer_backward", _loop_vmap(lstm_variant_layer_backward))
