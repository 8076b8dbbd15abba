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
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

from lstmlab.nn.cell import LN_EPS, reference_layer
from lstmlab.nn.infer import infer_layer, train_backward, train_forward
from lstmlab.nn.masks import nothing_traces, zoneout_mask_torch, zoneout_thresholds

_T = TypeVar("_T")


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
    """
    P = h0.shape[-1] if h0.dim() == 2 else -1
    if x.dim() != 3 or h0.dim() != 2 or c0.dim() != 2 or h0.shape[0] != x.shape[1] or c0.shape[0] != x.shape[1] \
            or weight_hh.shape[1] != P or c0.shape[1] * 4 != weight_hh.shape[0]:
        raise ValueError(
            f"fused_layer: expected x (T, B, I), h0 (B, P) and c0 (B, H), got {tuple(x.shape)}, "
            f"{tuple(h0.shape)}, {tuple(c0.shape)}"
        )
    unknown = set(variant) - set(VARIANT_ARGS)
    if unknown:
        raise TypeError(f"fused_layer: unexpected keyword arguments {sorted(unknown)}")
    if variant and weight_hr is not None:
        raise ValueError("fused_layer: cell variants, zoneout and recurrent dropout do not combine with a projection")
    if _under_functorch(x, h0, c0, weight_ih, weight_hh, *variant.values()):  # torch.func cannot see through a
        # custom op's autograd
        return reference_layer(x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, batch_sizes, **variant)
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, *variant.values())
    )
    if save and variant.get("ln_gates") is not None:  # the LayerNorm loops and dW_ih read x whole: copy a batch_first
        x = x.contiguous()  # view once here, not in the forward and again in the backward
    args = (x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, batch_sizes, save,
            *(variant.get(name) for name in VARIANT_ARGS))
    if _plain_eager(*args):
        out, h_T, c_T, *_ = _EagerLayer.apply(*args) if save else _lstm_layer_impl(*args)
    else:
        out, h_T, c_T, *_ = torch.ops.lstmlab.lstm_layer(*args)
    return out, h_T, c_T


# The variant arguments of the op, in its order: LayerNorm gains (2, 4H) = (γ_ih, γ_hh), the cell's LayerNorm
# (2, H) = (γ_c, β_c), peepholes (3, H) = (p_i, p_f, p_o), the recurrent-dropout mask (B, H) and the zoneout
# weights of the previous (c, h) at every step (2, T, B, H). Masks are drawn by the caller from torch's generator.
VARIANT_ARGS = ("ln_gates", "ln_cell", "peephole", "recurrent_mask", "zoneout_mask")


def _plain_eager(*args: Any) -> bool:
    """Whether this call runs in plain eager mode: then the op's implementation and autograd formula are called
    straight from Python, skipping torch.library's Python wrappers around a registered op (~1 ms per training step,
    4% of a B=256 step). Anything that traces or intercepts ops (torch.compile, export, jit.trace, dispatch and
    function modes, tensor subclasses such as FakeTensor) gets the registered op itself."""
    if not nothing_traces():
        return False
    return all(type(a) in (Tensor, torch.nn.Parameter) for a in args if isinstance(a, Tensor))


def _under_functorch(*tensors: Tensor) -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev...) wraps any of these tensors."""
    if torch.compiler.is_compiling():
        return False
    return any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def _mm(native: Any, a: Tensor, b: Tensor) -> Tensor:
    """a @ b on the compiled loops' GEMM when they are loaded (oneDNN's in float32: csrc/lstm_gemm.h), else torch.mm."""
    return torch.mm(a, b) if native is None else native.mm(a, b)


def _loader() -> Any:
    """The module that builds and loads the compiled loops: imported on first use, as `python -m` runs it as a
    script (a copy imported with this package would be a second one)."""
    from lstmlab.nn import _native

    return _native


def _native_for(x: Tensor) -> Any:
    """The compiled step loops when they are built and support x's device and dtype, else None."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return None
    return _loader().get()


def _guarded(where: str, like: Tensor, run: Callable[[], _T]) -> _T:
    """run(); if it raised on the compiled loops, one warning line and run() again on the Python loops, which take
    over for the rest of the process. Only for calls whose inputs the compiled loops do not overwrite."""
    if _native_for(like) is None:
        return run()
    try:
        return run()
    except Exception as e:  # noqa: BLE001 - whatever the compiled loops raise, the Python loops give the numbers
        _loader().fail(where, e)
        with _loader().forced(None):
            return run()


class _BufferCache:
    """Big CPU buffers kept from one training step to the next, handed out again only when provably free.

    Why: a fresh multi-megabyte CPU tensor comes from the kernel as untouched pages (glibc maps anything over
    32 MB anew on every allocation), and faulting them in cost more than the LSTM math: at B=1024, 50 000 page
    faults and ~120 ms of a ~250 ms training step. Safety: each handed-out tensor is a separate tensor on a cached
    storage; a storage is reused only when no tensor but the cache's own still holds it (its use count), so
    nothing a caller, autograd or a saved-tensor hook keeps can ever be overwritten. Only calls that save for
    backward use it (no_grad and inference calls allocate fresh and keep nothing), and it holds at most
    ``max_bytes``; ``release_buffers()`` empties it.
    """

    def __init__(self, max_bytes: int = 1 << 30, min_bytes: int = 1 << 18) -> None:
        self._bufs: list[Tensor] = []  # most recently used last
        self._max_bytes = max_bytes
        self._min_bytes = min_bytes
        self._lock = threading.Lock()

    @staticmethod
    def _free(buf: Tensor) -> bool:
        storage = buf.untyped_storage()  # this handle counts as one holder, buf as another
        return torch._C._storage_Use_Count(storage._cdata) <= 2

    def empty(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """An uninitialised contiguous tensor of this shape, like's dtype and device."""
        numel = math.prod(shape)
        nbytes = numel * like.element_size()
        if like.device.type != "cpu" or nbytes < self._min_bytes or nbytes > self._max_bytes:
            return like.new_empty(shape)
        with self._lock:
            for k, buf in enumerate(self._bufs):
                if buf.numel() == numel and buf.dtype == like.dtype and self._free(buf):
                    self._bufs.append(self._bufs.pop(k))
                    return like.new_empty(0).set_(buf.untyped_storage(), 0, shape)
            with torch.inference_mode(False):  # a cached buffer must never be an inference tensor
                buf = like.new_empty(numel)
            self._bufs.append(buf)
            total = sum(b.numel() * b.element_size() for b in self._bufs)
            for old in list(self._bufs[:-1]):  # drop the least recently used free ones past the budget
                if total <= self._max_bytes:
                    break
                if self._free(old):
                    # by identity: list.remove compares tensors with ==, elementwise (and raises across sizes)
                    self._bufs = [b for b in self._bufs if b is not old]
                    total -= old.numel() * old.element_size()
            return like.new_empty(0).set_(buf.untyped_storage(), 0, shape)

    def clear(self) -> None:
        with self._lock:
            self._bufs.clear()


@functools.cache
def _cache() -> _BufferCache:
    # One per process, like an allocator's cache (and no more mutable than one): see _BufferCache.
    return _BufferCache()


def release_buffers() -> None:
    """Free the big buffers the fused backend keeps between training steps (e.g. after training)."""
    _cache().clear()


def _keep_graph() -> bool:
    """Whether the running backward keeps the graph (retain_graph=True): then the saved tensors must survive."""
    probe = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    if probe is None:  # a torch without the probe: always keep, the safe choice
        return True
    try:
        return bool(probe())
    except RuntimeError:
        return True


def _bias(bias_ih: Tensor | None, bias_hh: Tensor | None) -> Tensor | None:
    if bias_ih is None:
        return bias_hh
    if bias_hh is None:
        return bias_ih
    return bias_ih + bias_hh


def _width(P: int, n_in: int, has_bias: bool) -> int:
    """K, the steps' matmul width [h | x | 1] rounded up to a multiple of 16 (faster CPU matmul kernels; the
    zero columns change nothing)."""
    return -(-(P + n_in + has_bias) // 16) * 16


def _stacked_weights(weight_ih: Tensor, weight_hh: Tensor, bias: Tensor | None) -> Tensor:
    """[W_hh | W_ih | b | 0...] (4H, K): the x2h and h2h maps (and the bias) as one matrix."""
    H4, P = weight_hh.shape
    n_in = weight_ih.shape[1]
    w = weight_hh.new_zeros(H4, _width(P, n_in, bias is not None))
    w[:, :P] = weight_hh
    w[:, P : P + n_in] = weight_ih
    if bias is not None:
        w[:, P + n_in] = bias
    return w


def _input_rows(x: Tensor, h0: Tensor, K: int, has_bias: bool, new: Any) -> Tensor:
    """xh (T, B, K): row t = [h_{t-1} | x_t | 1 | 0...] with h_0 (B, P) in place. Each step's matmul reads its
    row; the step writes h_t into the next row. The same buffer is the right-hand side of the weight gradients'
    matmul. ``new(*shape)`` allocates it."""
    T, B, n_in = x.shape
    P = h0.shape[1]
    xh = new(T, B, K)
    if T and B:
        xh[0, :, :P] = h0
        xh[:, :, P : P + n_in] = x
        xh[:, :, P + n_in :] = 0.0
        if has_bias:
            xh[:, :, P + n_in] = 1.0
    return xh


def _lengths(batch_sizes: Tensor, B: int) -> Tensor:
    """Each row's number of live steps, from a packed batch's per-step row counts."""
    return (batch_sizes.unsqueeze(1) > torch.arange(B).unsqueeze(0)).sum(0)  # (B,)


def _last_steps(seq: Tensor, batch_sizes: Tensor | None) -> Tensor:
    """seq (T, B, N) -> (B, N): each row at its last live step."""
    if batch_sizes is None:
        return seq[-1].clone()
    last = (_lengths(batch_sizes, seq.shape[1]) - 1).to(seq.device)
    return seq.gather(0, last.view(1, -1, 1).expand(1, -1, seq.shape[2])).squeeze(0)


def _live(batch_sizes: list[int] | None, t: int, B: int) -> int:
    return B if batch_sizes is None else min(B, batch_sizes[t])


# --- forward ------------------------------------------------------------------------------------------------------


def _layer_forward(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor | None,
    bias_hh: Tensor | None,
    weight_hr: Tensor | None,
    batch_sizes: Tensor | None,
    save: bool,
    ln_gates: Tensor | None = None,
    ln_cell: Tensor | None = None,
    peephole: Tensor | None = None,
    recurrent_mask: Tensor | None = None,
    zoneout_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out, h_T, c_T, acts, cs, tcs, xh, extra): the last five are what backward needs, empty unless ``save``
    (``extra`` is the variants' own, see :func:`_variant_forward`; empty for the plain cell)."""
    if any(t is not None for t in (ln_gates, ln_cell, peephole, recurrent_mask, zoneout_mask)):
        return _variant_forward(x, h0, c0, weight_ih, weight_hh, _bias(bias_ih, bias_hh), batch_sizes, save,
                                ln_gates, ln_cell, peephole, recurrent_mask, zoneout_mask)
    if not save:  # forward only (no_grad, inference): the compiled infer loop when it applies (lstmlab.nn.infer)
        done = infer_layer(_native_for(x), x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, batch_sizes)
        if done is not None:  # five distinct empty tensors: a custom op's outputs may not alias
            return (*done, *(x.new_empty(0) for _ in range(5)))
    T, B, n_in = x.shape
    H4, P = weight_hh.shape
    H = H4 // 4
    bias = _bias(bias_ih, bias_hh)
    packed = batch_sizes is not None

    def new(*shape: int) -> Tensor:
        buf = _cache().empty(shape, x) if save else x.new_empty(shape)
        return buf.zero_() if packed else buf  # a packed step leaves rows untouched: they must read as zeros

    xh = _input_rows(x, h0, _width(P, n_in, bias is not None), bias is not None, new)
    acts, cs, tcs = new(T, B, H4), new(T, B, H), new(T, B, H)
    out = new(T, B, P)
    native = _native_for(x) if weight_hr is None else None  # the compiled loops have no projection
    if T and B:
        if native is not None:
            sizes = batch_sizes.to(torch.int64).contiguous() if packed else None
            if not train_forward(native, x, xh, c0, weight_ih, weight_hh, bias_ih, bias_hh, acts, out, cs, tcs, sizes):
                w = _stacked_weights(weight_ih, weight_hh, bias)  # (4H, K)
                native.forward(xh, c0.contiguous(), w, acts, out, cs, tcs, sizes)
        else:
            _forward_steps(xh, c0, _stacked_weights(weight_ih, weight_hh, bias), weight_hr, acts, out, cs, tcs,
                           batch_sizes)
    h_T, c_T = _last_steps(out, batch_sizes), _last_steps(cs, batch_sizes)
    if T == 0:
        h_T, c_T = h0.clone(), c0.clone()
    if not save:  # inference: keep nothing (four distinct tensors: a custom op's outputs may not alias)
        acts, cs, tcs, xh = (x.new_empty(0) for _ in range(4))
    return out, h_T, c_T, acts, cs, tcs, xh, x.new_empty(0)


@functools.wraps(_layer_forward)  # the same signature: the op's schema is inferred from it
def _lstm_layer_impl(*args: Any, **kwargs: Any) -> tuple[Tensor, ...]:
    # The op: _layer_forward, on the Python loops if the compiled ones raise.
    x = args[0] if args else kwargs["x"]
    return _guarded("the forward", x, lambda: _layer_forward(*args, **kwargs))


lstm_layer = torch.library.custom_op("lstmlab::lstm_layer", mutates_args=())(_lstm_layer_impl)


@lstm_layer.register_fake
def _(x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, batch_sizes, save,  # noqa: ANN001, ANN202
      ln_gates=None, ln_cell=None, peephole=None, recurrent_mask=None, zoneout_mask=None):  # noqa: ANN001
    T, B, n_in = x.shape
    H4, P = weight_hh.shape
    H = H4 // 4
    variant = any(t is not None for t in (ln_gates, ln_cell, peephole, recurrent_mask, zoneout_mask))
    K = _width(P, n_in, bias_ih is not None or bias_hh is not None)
    if variant:
        layer_norm = ln_gates is not None
        saved = (x.new_empty(T, B, H4), x.new_empty(T, B, H), x.new_empty(T, B, H),
                 x.new_empty(0) if layer_norm else x.new_empty(T, B, K),
                 x.new_empty(T, B, _extra_width(H, layer_norm, ln_cell is not None, zoneout_mask is not None)))
    else:
        saved = (x.new_empty(T, B, H4), x.new_empty(T, B, H), x.new_empty(T, B, H), x.new_empty(T, B, K),
                 x.new_empty(0))
    if not save:
        saved = tuple(x.new_empty(0) for _ in range(5))
    return (x.new_empty(T, B, P), x.new_empty(B, P), x.new_empty(B, H), *saved)


def _forward_steps(xh: Tensor, c0: Tensor, w: Tensor, weight_hr: Tensor | None, acts: Tensor, out: Tensor,
                   cs: Tensor, tcs: Tensor, batch_sizes: Tensor | None) -> None:
    """The forward loop over all steps in Python, filling acts, out, cs, tcs and xh's h columns."""
    T, B, _ = xh.shape
    H = cs.shape[2]
    P = out.shape[2]
    sizes = None if batch_sizes is None else batch_sizes.tolist()
    w_t = w.t()  # (K, 4H)
    c = c0
    for t in range(T):
        n = _live(sizes, t, B)
        gates = acts[t, :n]
        torch.mm(xh[t, :n], w_t, out=gates)  # (n, 4H) = [h_{t-1} | x_t | 1] @ [W_hh | W_ih | b]^T
        gates[:, : 2 * H].sigmoid_()  # i, f
        gates[:, 2 * H : 3 * H].tanh_()  # g
        gates[:, 3 * H :].sigmoid_()  # o
        i, f, g, o = gates.split(H, dim=1)
        c_t, tc_t, h_t = cs[t, :n], tcs[t, :n], out[t, :n]
        torch.mul(f, c[:n], out=c_t)
        c_t.addcmul_(i, g)  # c' = f*c + i*g
        torch.tanh(c_t, out=tc_t)
        if weight_hr is None:
            torch.mul(o, tc_t, out=h_t)  # h' = o * tanh(c')
        else:
            torch.mm(o * tc_t, weight_hr.t(), out=h_t)  # h' = W_hr (o * tanh(c'))
        if t + 1 < T:
            xh[t + 1, :n, :P] = h_t
        c = cs[t]


# --- backward -----------------------------------------------------------------------------------------------------


def _backward_impl(
    d_out: Tensor | None,
    d_hT: Tensor | None,
    d_cT: Tensor | None,
    c0: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    weight_hr: Tensor | None,
    batch_sizes: Tensor | None,
    acts: Tensor,
    cs: Tensor,
    tcs: Tensor,
    xh: Tensor,
    has_bias: bool,
    need_x: bool,
    need_h0: bool,
    need_weights: bool,
    inplace: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dh0, dc0, dW_ih, dW_hh, db, dW_hr); a gradient nobody needs comes back empty. ``inplace``: the compiled
    loops may turn acts itself into the pre-activation gradient (autograd will not read it again)."""
    T, B, H4 = acts.shape
    H = H4 // 4
    P, n_in = weight_hh.shape[1], weight_ih.shape[1]
    def empty() -> Tensor:  # a distinct tensor each: a custom op's outputs may not alias
        return acts.new_empty(0)

    dh = acts.new_zeros(B, P) if d_hT is None else d_hT.contiguous().clone()
    dc = acts.new_zeros(B, H) if d_cT is None else d_cT.contiguous().clone()
    packed = batch_sizes is not None
    native = _native_for(acts) if weight_hr is None else None
    if inplace and native is not None:
        dG = acts  # rows a packed step skips were zeroed by the forward and stay so
    else:
        dG = _cache().empty((T, B, H4), acts)
        if packed:
            dG.zero_()  # rows a packed step skips must be zero
    dH = None
    if T and B:
        d_out = None if d_out is None else d_out.contiguous()
        if native is not None:
            sizes = batch_sizes.to(torch.int64).contiguous() if packed else None
            if not train_backward(native, acts, dG, cs, tcs, c0, weight_hh, d_out, dh, dc, need_h0, sizes):
                native.backward(acts, dG, cs, tcs, c0.contiguous(), weight_hh.contiguous(), d_out, dh, dc, need_h0,
                                sizes)
        else:
            dH = _backward_steps(acts, cs, tcs, c0, weight_hh, weight_hr, d_out, dh, dc, dG, batch_sizes)
    dG2 = dG.view(T * B, H4)  # (T*B, 4H)
    dx = _mm(native, dG2, weight_ih).view(T, B, n_in) if need_x else empty()
    dw_ih, dw_hh, db, dw_hr = empty(), empty(), empty(), empty()
    if need_weights:
        # Every parameter gradient in ONE matmul over all steps: dG^T @ [h_{t-1} | x_t | 1] = [dW_hh | dW_ih | db].
        # Thin matmuls of their own (N = I, or a sum for db) run at a fraction of the wide one's speed on a
        # CPU, and dG is read once instead of three times.
        dw = _mm(native, dG2.t(), xh.view(T * B, xh.shape[2]))  # (4H, K)
        dw_hh, dw_ih = dw[:, :P].clone(), dw[:, P : P + n_in].clone()
        if has_bias:
            db = dw[:, P + n_in].clone()
        if weight_hr is not None:  # dW_hr = sum_t dh_t^T (o_t * tanh(c_t))
            raw = acts[:, :, 3 * H :] * tcs  # (T, B, H)
            dw_hr = torch.mm(dH.view(T * B, P).t(), raw.reshape(T * B, H)) if dH is not None else \
                weight_hr.new_zeros(weight_hr.shape)
    return dx, (dh if need_h0 else empty()), (dc if need_h0 else empty()), dw_ih, dw_hh, db, dw_hr


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


def _backward_steps(acts: Tensor, cs: Tensor, tcs: Tensor, c0: Tensor, weight_hh: Tensor, weight_hr: Tensor | None,
                    d_out: Tensor | None, dh: Tensor, dc: Tensor, dG: Tensor, batch_sizes: Tensor | None) -> Tensor:
    """Backpropagation through time in Python. dh (B, P), dc (B, H) go from the gradients at h_T, c_T to those at
    h_0, c_0 in place; dG (T, B, 4H) gets the gradient w.r.t. the gates' pre-activations. Returns dH (T, B, P),
    the gradient reaching each h_t (for dW_hr)."""
    T, B, H4 = acts.shape
    H = H4 // 4
    sizes = None if batch_sizes is None else batch_sizes.tolist()
    dH = acts.new_zeros(T, B, dh.shape[1])
    for t in range(T - 1, -1, -1):
        n = _live(sizes, t, B)
        i, f, g, o = acts[t, :n].split(H, dim=1)  # each (n, H)
        tc = tcs[t, :n]
        c_prev = cs[t - 1, :n] if t > 0 else c0[:n]
        dh_t = dH[t, :n]
        torch.add(dh[:n], d_out[t, :n], out=dh_t) if d_out is not None else dh_t.copy_(dh[:n])
        d_raw = dh_t if weight_hr is None else dh_t @ weight_hr  # through the projection: (n, H)
        dcn = dc[:n]
        dcn.addcmul_(d_raw, o * (1 - tc * tc))  # dc_t += dh_t * o * (1 - tanh(c_t)^2)
        dG_t = dG[t, :n]  # (n, 4H)
        torch.mul(dcn, i * (1 - i) * g, out=dG_t[:, :H])
        torch.mul(dcn, f * (1 - f) * c_prev, out=dG_t[:, H : 2 * H])
        torch.mul(dcn, i * (1 - g * g), out=dG_t[:, 2 * H : 3 * H])
        torch.mul(d_raw, o * (1 - o) * tc, out=dG_t[:, 3 * H :])
        dcn.mul_(f)  # dc_{t-1} = dc_t * f_t
        dh[:n] = dG_t @ weight_hh  # dh_{t-1} = dG_t @ W_hh
    return dH


# --- the variants (LayerNorm, peephole, zoneout, recurrent dropout): compiled or Python step loops ---------------
#
# The same equations as lstmlab.nn.cell.lstm_step, step by step into preallocated buffers, and their hand-written
# backward. Without the gates' LayerNorm a step is the plain cell's ONE matmul [h_in | x_t | 1] @ [W_hh | W_ih | b]^T
# over xh (T, B, K) (:func:`_input_rows`; h_in = h_{t-1} times the recurrent-dropout mask), and the weight
# gradients ONE matmul dZ^T xh. With it, the two products are normalised apart: x W_ih^T for all steps in one
# matmul, h_in W_hh^T per step, h_in kept in ``extra``, and xh is empty.
#
# ``acts`` (T, B, 4H) keeps the activations i, f, g, o; with the gates' LayerNorm it keeps â = LN(x W_ih^T) instead,
# and both backwards recompute the activations from â and r̂ (as the forward computed them): one (T, B, 4H) buffer
# less to write and read back. ``tcs`` (T, B, H) keeps tanh(c_new); with the cell LayerNorm ĉ = LN(c_new) instead,
# from which the backwards recompute tanh(γ_c ĉ + β_c). ``extra`` (T, B, E) keeps what the backward needs beyond
# acts, cs (the state c_t after zoneout) and tcs, each part a contiguous (T, B, width) block (:func:`_extra_views`):
# c_new, the cell before zoneout (with zoneout; else it is cs); h_in (gates' LayerNorm); r̂ (gates' LayerNorm);
# rstd_c, rstd_a, rstd_r (either LayerNorm).
#
# The compiled loops (csrc/lstm_variants.cpp, ops lstmlab_native::variant_forward/variant_backward) run when
# _native_for gives them, with the same buffers: a forward of one kind and a backward of the other work together.
# Rows a packed step does not reach are zero in every buffer but xh, which holds what the plain cell's does.


def _extra_parts(H: int, layer_norm: bool, cell_norm: bool, zoneout: bool) -> list[tuple[str, int]]:
    parts = [("c_new", H)] if zoneout else []  # without zoneout c_new is c_t itself: cs
    if layer_norm:
        parts += [("h_in", H), ("r_hat", 4 * H)]
    if layer_norm or cell_norm:
        parts.append(("rstd", 3))
    return parts


def _extra_width(H: int, layer_norm: bool, cell_norm: bool, zoneout: bool) -> int:
    return sum(width for _, width in _extra_parts(H, layer_norm, cell_norm, zoneout))


def _extra_views(extra: Tensor, H: int, layer_norm: bool, cell_norm: bool, zoneout: bool) -> dict[str, Tensor]:
    """extra's parts, each a contiguous (T, B, width) block of its storage (strided column slices would make
    every per-step op and matmul copy)."""
    T, B = extra.shape[:2]
    flat = extra.reshape(-1)
    views, offset = {}, 0
    for name, width in _extra_parts(H, layer_norm, cell_norm, zoneout):
        views[name] = flat[offset : offset + T * B * width].view(T, B, width)
        offset += T * B * width
    return views


def _normalize(v: Tensor, hat: Tensor, rstd: Tensor) -> None:
    """LayerNorm without gain: hat = (v - mean) / sqrt(var + eps) over the last axis (biased var); rstd (n,)."""
    d = v - v.mean(1, keepdim=True)
    torch.rsqrt(d.square().mean(1) + LN_EPS, out=rstd)
    torch.mul(d, rstd.unsqueeze(1), out=hat)


def _ln_gates(a_hat: Tensor, r_hat: Tensor, ln_gates: Tensor, bias: Tensor | None) -> Tensor:
    """The pre-activations with the gates' LayerNorm: γ_ih â + γ_hh r̂ + b."""
    z = a_hat * ln_gates[0] + r_hat * ln_gates[1]
    return z if bias is None else z.add_(bias)


def _cell_tanh(c_hat: Tensor, ln_cell: Tensor) -> Tensor:
    """What h reads with the cell LayerNorm: tanh(γ_c ĉ + β_c)."""
    return torch.tanh(torch.addcmul(ln_cell[1], c_hat, ln_cell[0]))


def _normalize_backward(d_hat: Tensor, hat: Tensor, rstd: Tensor) -> Tensor:
    """The gradient w.r.t. v of hat = LN(v), from the gradient w.r.t. hat."""
    mean_d = d_hat.mean(1, keepdim=True)
    mean_dh = (d_hat * hat).mean(1, keepdim=True)
    return (d_hat - mean_d - hat * mean_dh) * rstd.unsqueeze(1)


def _variant_forward(x: Tensor, h0: Tensor, c0: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Tensor | None,
                     batch_sizes: Tensor | None, save: bool, ln_gates: Tensor | None, ln_cell: Tensor | None,
                     peephole: Tensor | None, recurrent_mask: Tensor | None, zoneout_mask: Tensor | None
                     ) -> tuple[Tensor, ...]:
    """lstm_layer for the variants: (out, h_T, c_T, acts, cs, tcs, xh, extra)."""
    T, B, n_in = x.shape
    H = c0.shape[1]
    native = _native_for(x)
    if native is not None and T and B:
        return _variant_forward_native(native, x, h0, c0, weight_ih, weight_hh, bias, batch_sizes, save, ln_gates,
                                       ln_cell, peephole, recurrent_mask, zoneout_mask)
    layer_norm = ln_gates is not None
    # Zero-filled: rows a packed step skips must read as zeros (they meet zero gradients, never NaN garbage).
    acts, cs, tcs, out = x.new_zeros(T, B, 4 * H), x.new_zeros(T, B, H), x.new_zeros(T, B, H), x.new_zeros(T, B, H)
    parts = (H, layer_norm, ln_cell is not None, zoneout_mask is not None)
    extra = x.new_zeros(T, B, _extra_width(*parts))
    v = _extra_views(extra, *parts)
    sizes = None if batch_sizes is None else batch_sizes.tolist()
    h_in0 = h0 if recurrent_mask is None else h0 * recurrent_mask  # variational recurrent dropout
    if layer_norm:  # the two products apart: every step's x2h in one matmul now, into acts (normalised there)
        xh = x.new_empty(0)
        torch.mm(x.reshape(T * B, n_in), weight_ih.t(), out=acts.view(T * B, 4 * H))
        for t in range(T if sizes is not None else 0):  # rows a packed step does not reach read as zeros
            acts[t, sizes[t] :] = 0
        h_in = v["h_in"]
        if T:
            h_in[0] = h_in0
    else:  # [h_in | x | 1] @ [W_hh | W_ih | b]^T per step, as the plain cell
        xh = _input_rows(x, h_in0, _width(H, n_in, bias is not None), bias is not None, x.new_zeros)
        w_t = _stacked_weights(weight_ih, weight_hh, bias).t()
        h_in = xh[:, :, :H]
    h, c = h0, c0
    for t in range(T):
        n = _live(sizes, t, B)
        h_p, c_p = h[:n], c[:n]
        if layer_norm:
            R = torch.mm(h_in[t, :n], weight_hh.t())  # (n, 4H)
            rstd = v["rstd"][t, :n]
            _normalize(acts[t, :n], acts[t, :n], rstd[:, 1])
            _normalize(R, v["r_hat"][t, :n], rstd[:, 2])
            z = _ln_gates(acts[t, :n], v["r_hat"][t, :n], ln_gates, bias)
            gates = torch.empty_like(z)  # not kept: the backward recomputes them
        else:
            z = torch.mm(xh[t, :n], w_t)  # (n, 4H)
            gates = acts[t, :n]
        i, f, g, o = gates.split(H, dim=1)
        zi, zf, zg, zo = z.split(H, dim=1)
        if peephole is not None:  # i and f see the previous cell
            zi = zi + peephole[0] * c_p
            zf = zf + peephole[1] * c_p
        torch.sigmoid(zi, out=i)
        torch.sigmoid(zf, out=f)
        torch.tanh(zg, out=g)
        c_new = v["c_new"][t, :n] if zoneout_mask is not None else cs[t, :n]
        torch.mul(f, c_p, out=c_new)
        c_new.addcmul_(i, g)  # c' = f*c + i*g
        if peephole is not None:  # o sees the new cell
            zo = zo + peephole[2] * c_new
        torch.sigmoid(zo, out=o)
        tc = tcs[t, :n]
        if ln_cell is not None:
            _normalize(c_new, tc, v["rstd"][t, :n, 0])  # tcs keeps ĉ
            tanh_c = _cell_tanh(tc, ln_cell)
        else:
            tanh_c = torch.tanh(c_new, out=tc)
        h_t = out[t, :n]
        torch.mul(o, tanh_c, out=h_t)
        if zoneout_mask is not None:  # keep the previous value with weight z: new + z * (prev - new)
            cs[t, :n] = torch.addcmul(c_new, zoneout_mask[0, t, :n], c_p - c_new)
            h_t.addcmul_(zoneout_mask[1, t, :n], h_p - h_t)
        if t + 1 < T:  # the next step's recurrent input, for its live rows
            m = _live(sizes, t + 1, B)
            h_next = h_in[t + 1, :m]
            torch.mul(h_t[:m], recurrent_mask[:m], out=h_next) if recurrent_mask is not None else h_next.copy_(h_t[:m])
        h, c = out[t], cs[t]
    h_T, c_T = _last_steps(out, batch_sizes), _last_steps(cs, batch_sizes)
    if T == 0:
        h_T, c_T = h0.clone(), c0.clone()
    if not save:
        acts, cs, tcs, xh, extra = (x.new_empty(0) for _ in range(5))
    return out, h_T, c_T, acts, cs, tcs, xh, extra


def _variant_weight_grads(mm: Any, dA: Tensor, dR: Tensor, x: Tensor, xh: Tensor, h_in: Tensor | None,
                          has_bias: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """(dW_ih, dW_hh, db or None). Without the gates' LayerNorm (h_in None: it is xh's; dA is dR, the
    pre-activations' gradient), ONE matmul dA^T [h_in | x | 1] as the plain cell's backward gives all three; with
    it, dA^T x and dR^T h_in apart, and db (a column sum after the normalisation) is not among them."""
    T, B, H4 = dA.shape
    H, n_in, flat = H4 // 4, x.shape[2], T * B
    if h_in is None:
        dw = mm(dA.view(flat, H4).t(), xh.view(flat, xh.shape[2]))  # (4H, K)
        return dw[:, H : H + n_in].clone(), dw[:, :H].clone(), dw[:, H + n_in].clone() if has_bias else None
    # x^T dA, then transposed: oneDNN splits this thin product (4H x I over T*B rows) better that way round
    dw_ih = mm(x.reshape(flat, n_in).t(), dA.view(flat, H4)).t().contiguous()
    return dw_ih, mm(dR.view(flat, H4).t(), h_in.reshape(flat, H)), None


def _variant_backward_impl(
    d_out: Tensor | None, d_hT: Tensor | None, d_cT: Tensor | None, x: Tensor, c0: Tensor, weight_ih: Tensor,
    weight_hh: Tensor, bias: Tensor | None, batch_sizes: Tensor | None, acts: Tensor, cs: Tensor, tcs: Tensor,
    xh: Tensor, extra: Tensor, ln_gates: Tensor | None, ln_cell: Tensor | None, peephole: Tensor | None,
    recurrent_mask: Tensor | None, zoneout_mask: Tensor | None, need_x: bool, need_h0: bool, need_weights: bool,
    inplace: bool = False,
) -> tuple[Tensor, ...]:
    """(dx, dh0, dc0, dW_ih, dW_hh, db, d_ln_gates, d_ln_cell, d_peephole), each empty when not needed or absent
    (db when ``bias``, b_ih + b_hh, is None).
    ``inplace``: the compiled loops may write the gradient over ``acts`` (as the plain cell's backward does) and,
    with the gates' LayerNorm, over ``extra``'s r̂."""
    T, B, H4 = acts.shape
    H = H4 // 4
    native = _native_for(acts)
    if native is not None and T and B:
        return _variant_backward_native(native, d_out, d_hT, d_cT, x, c0, weight_ih, weight_hh, bias, batch_sizes,
                                        acts, cs, tcs, xh, extra, ln_gates, ln_cell, peephole, recurrent_mask,
                                        zoneout_mask, need_x, need_h0, need_weights, inplace)
    layer_norm = ln_gates is not None
    v = _extra_views(extra, H, layer_norm, ln_cell is not None, zoneout_mask is not None)
    sizes = None if batch_sizes is None else batch_sizes.tolist()
    dh = acts.new_zeros(B, H) if d_hT is None else d_hT.contiguous().clone()
    dc = acts.new_zeros(B, H) if d_cT is None else d_cT.contiguous().clone()
    dZ = acts.new_zeros(T, B, H4)  # gradient w.r.t. the gates' pre-activations (after LayerNorm and peepholes)
    dA = acts.new_zeros(T, B, H4) if layer_norm else dZ  # ... w.r.t. x W_ih^T and h_in W_hh^T
    dR = acts.new_zeros(T, B, H4) if layer_norm else dZ
    dY = acts.new_zeros(T, B, H) if ln_cell is not None else None  # ... w.r.t. γ_c ĉ + β_c
    for t in range(T - 1, -1, -1):
        n = _live(sizes, t, B)
        tc = tcs[t, :n] if ln_cell is None else _cell_tanh(tcs[t, :n], ln_cell)  # tcs keeps ĉ then
        c_prev = cs[t - 1, :n] if t > 0 else c0[:n]
        if layer_norm:  # the activations, as the forward computed them
            z = _ln_gates(acts[t, :n], v["r_hat"][t, :n], ln_gates, bias)
            zi, zf, zg, zo = z.split(H, dim=1)
            if peephole is not None:
                zi, zf = zi + peephole[0] * c_prev, zf + peephole[1] * c_prev
                zo = zo + peephole[2] * v.get("c_new", cs)[t, :n]
            i, f, g, o = zi.sigmoid(), zf.sigmoid(), zg.tanh(), zo.sigmoid()
        else:
            i, f, g, o = acts[t, :n].split(H, dim=1)
        dh_t = dh[:n] + d_out[t, :n] if d_out is not None else dh[:n].clone()
        dc_t = dc[:n].clone()
        if zoneout_mask is not None:  # the kept share goes straight to the previous state
            carry_h, carry_c = dh_t * zoneout_mask[1, t, :n], dc_t * zoneout_mask[0, t, :n]
            dh_t -= carry_h
            dc_t -= carry_c
        dy = dh_t * o * (1 - tc * tc)  # through h = o * tanh(y)
        if ln_cell is not None:
            dY[t, :n] = dy
            dc_t += _normalize_backward(dy * ln_cell[0], tcs[t, :n], v["rstd"][t, :n, 0])
        else:
            dc_t += dy
        dZ_t = dZ[t, :n]
        dzi, dzf, dzg, dzo = dZ_t.split(H, dim=1)
        torch.mul(dh_t, tc * o * (1 - o), out=dzo)
        if peephole is not None:
            dc_t.addcmul_(dzo, peephole[2])  # o saw c_new
        torch.mul(dc_t, g * i * (1 - i), out=dzi)
        torch.mul(dc_t, c_prev * f * (1 - f), out=dzf)
        torch.mul(dc_t, i * (1 - g * g), out=dzg)
        dc_prev = dc_t * f
        if peephole is not None:  # i and f saw c_prev
            dc_prev.addcmul_(dzi, peephole[0]).addcmul_(dzf, peephole[1])
        if zoneout_mask is not None:
            dc_prev += carry_c
        if layer_norm:
            rstd = v["rstd"][t, :n]
            dA[t, :n] = _normalize_backward(dZ_t * ln_gates[0], acts[t, :n], rstd[:, 1])
            dR[t, :n] = _normalize_backward(dZ_t * ln_gates[1], v["r_hat"][t, :n], rstd[:, 2])
        dh_prev = torch.mm(dR[t, :n], weight_hh)  # through h_in W_hh^T
        if recurrent_mask is not None:
            dh_prev *= recurrent_mask[:n]
        if zoneout_mask is not None:
            dh_prev += carry_h
        dh[:n] = dh_prev
        dc[:n] = dc_prev

    def empty() -> Tensor:  # a distinct tensor each: a custom op's outputs may not alias
        return acts.new_empty(0)

    dx = torch.mm(dA.view(T * B, H4), weight_ih).view(T, B, weight_ih.shape[1]) if need_x else empty()
    dw_ih, dw_hh, db, d_ln_gates, d_ln_cell, d_peep = (empty() for _ in range(6))
    if need_weights:
        dw_ih, dw_hh, db_mm = _variant_weight_grads(torch.mm, dA, dR, x, xh, v.get("h_in"), bias is not None)
        if bias is not None:
            db = dZ.sum((0, 1)) if db_mm is None else db_mm
        if layer_norm:
            d_ln_gates = torch.stack([(dZ * acts).sum((0, 1)), (dZ * v["r_hat"]).sum((0, 1))])
        if ln_cell is not None:
            d_ln_cell = torch.stack([(dY * tcs).sum((0, 1)), dY.sum((0, 1))])
        if peephole is not None:
            c_prev_all = torch.cat([c0.unsqueeze(0), cs[:-1]]) if T else cs
            d_peep = torch.stack([(dZ[..., :H] * c_prev_all).sum((0, 1)), (dZ[..., H : 2 * H] * c_prev_all).sum((0, 1)),
                                  (dZ[..., 3 * H :] * v.get("c_new", cs)).sum((0, 1))])
    dh0, dc0 = (dh, dc) if need_h0 else (empty(), empty())
    return dx, dh0, dc0, dw_ih, dw_hh, db, d_ln_gates, d_ln_cell, d_peep


def _contiguous(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


def _native_zoneout(mask: Tensor | None) -> Tensor | None:
    """The zoneout weights as the compiled loops take them: (2, T, B, H), or (2, 1, 1, H) when the same weights
    serve every step and row (eval's probabilities, expanded without copying)."""
    if mask is None:
        return None
    if mask.shape[1] * mask.shape[2] > 1 and mask.stride(1) == 0 and mask.stride(2) == 0:
        return mask[:, :1, :1].contiguous()
    return mask.contiguous()


def _variant_forward_native(native: Any, x: Tensor, h0: Tensor, c0: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                            bias: Tensor | None, batch_sizes: Tensor | None, save: bool, ln_gates: Tensor | None,
                            ln_cell: Tensor | None, peephole: Tensor | None, recurrent_mask: Tensor | None,
                            zoneout_mask: Tensor | None) -> tuple[Tensor, ...]:
    """_variant_forward on the compiled loops (T, B > 0)."""
    T, B, n_in = x.shape
    H = c0.shape[1]
    packed = batch_sizes is not None
    layer_norm = ln_gates is not None

    def new(*shape: int) -> Tensor:
        buf = _cache().empty(shape, x) if save else x.new_empty(shape)
        return buf.zero_() if packed else buf  # a packed step leaves rows untouched: they must read as zeros

    acts, cs, tcs, out = new(T, B, 4 * H), new(T, B, H), new(T, B, H), new(T, B, H)
    parts = (H, layer_norm, ln_cell is not None, zoneout_mask is not None)
    extra = new(T, B, _extra_width(*parts))
    h_in0 = h0 if recurrent_mask is None else h0 * recurrent_mask  # variational recurrent dropout
    if layer_norm:  # the loop takes x, W_ih and W_hh apart; h_in of step 0 goes into extra
        xh, w = x.new_empty(0), x.new_empty(0)
        _extra_views(extra, *parts)["h_in"][0] = h_in0
    else:
        xh = _input_rows(x, h_in0, _width(H, n_in, bias is not None), bias is not None, new)
        w = _stacked_weights(weight_ih, weight_hh, bias)
    sizes = batch_sizes.to(torch.int64).contiguous() if packed else None
    native.variant_forward(x.contiguous(), h0.contiguous(), c0.contiguous(), weight_ih.contiguous(),
                           weight_hh.contiguous(), _contiguous(bias), _contiguous(ln_gates), _contiguous(ln_cell),
                           _contiguous(peephole), _contiguous(recurrent_mask), _native_zoneout(zoneout_mask), xh, w,
                           acts, cs, tcs, out, extra, sizes)
    h_T, c_T = _last_steps(out, batch_sizes), _last_steps(cs, batch_sizes)
    if not save:  # five distinct tensors: a custom op's outputs may not alias
        acts, cs, tcs, xh, extra = (x.new_empty(0) for _ in range(5))
    return out, h_T, c_T, acts, cs, tcs, xh, extra


def _variant_backward_native(
    native: Any, d_out: Tensor | None, d_hT: Tensor | None, d_cT: Tensor | None, x: Tensor, c0: Tensor,
    weight_ih: Tensor, weight_hh: Tensor, bias: Tensor | None, batch_sizes: Tensor | None, acts: Tensor, cs: Tensor,
    tcs: Tensor, xh: Tensor, extra: Tensor, ln_gates: Tensor | None, ln_cell: Tensor | None, peephole: Tensor | None,
    recurrent_mask: Tensor | None, zoneout_mask: Tensor | None, need_x: bool, need_h0: bool, need_weights: bool,
    inplace: bool = False,
) -> tuple[Tensor, ...]:
    """_variant_backward_impl on the compiled loops (T, B > 0): they give the gradients w.r.t. x W_ih^T (dA) and
    h_in W_hh^T (dR), the same tensor without the gates' LayerNorm, and the column sums of the bias (gates'
    LayerNorm), LayerNorm and peephole gradients; dx and the weight gradients are matmuls over all steps."""
    T, B, H4 = acts.shape
    H = H4 // 4
    layer_norm = ln_gates is not None
    dh = acts.new_zeros(B, H) if d_hT is None else d_hT.contiguous().clone()
    dc = acts.new_zeros(B, H) if d_cT is None else d_cT.contiguous().clone()
    extra = extra.contiguous()
    v = _extra_views(extra, H, layer_norm, ln_cell is not None, zoneout_mask is not None)
    if inplace and acts.is_contiguous():  # each row's gradient over what it was computed from, as it is read:
        dA = acts  # the activations, or â
        dR = v["r_hat"] if layer_norm else dA  # and r̂
    else:  # every row is written (zeros where a packed step does not reach)
        dA = _cache().empty((T, B, H4), acts)
        dR = _cache().empty((T, B, H4), acts) if layer_norm else dA
    sums = acts.new_empty(17 * H)  # [db | dγ_ih | dγ_hh | dγ_c | dβ_c | dp_i | dp_f | dp_o]
    sizes = batch_sizes.to(torch.int64).contiguous() if batch_sizes is not None else None
    native.variant_backward(_contiguous(d_out), dh, dc, c0.contiguous(), weight_hh.contiguous(), _contiguous(bias),
                            acts.contiguous(), cs.contiguous(), tcs.contiguous(), extra, _contiguous(ln_gates),
                            _contiguous(ln_cell), _contiguous(peephole), _contiguous(recurrent_mask),
                            _native_zoneout(zoneout_mask), dA, dR, sums, need_h0, sizes)

    def empty() -> Tensor:  # a distinct tensor each: a custom op's outputs may not alias
        return acts.new_empty(0)

    dx = _mm(native, dA.view(T * B, H4), weight_ih).view(T, B, weight_ih.shape[1]) if need_x else empty()
    dw_ih, dw_hh, db, d_ln_gates, d_ln_cell, d_peep = (empty() for _ in range(6))
    if need_weights:
        dw_ih, dw_hh, db_mm = _variant_weight_grads(functools.partial(_mm, native), dA, dR, x, xh, v.get("h_in"),
                                                    bias is not None)
        if bias is not None:
            db = sums[:H4].clone() if db_mm is None else db_mm
        if layer_norm:
            d_ln_gates = sums[H4 : 3 * H4].view(2, H4).clone()
        if ln_cell is not None:
            d_ln_cell = sums[3 * H4 : 3 * H4 + 2 * H].view(2, H).clone()
        if peephole is not None:
            d_peep = sums[3 * H4 + 2 * H :].view(3, H).clone()
    dh0, dc0 = (dh, dc) if need_h0 else (empty(), empty())
    return dx, dh0, dc0, dw_ih, dw_hh, db, d_ln_gates, d_ln_cell, d_peep


def _variant_backward_fake(d_out, d_hT, d_cT, x, c0, weight_ih, weight_hh, bias, batch_sizes, acts, cs, tcs, xh,  # noqa: ANN001, ANN202
                           extra, ln_gates, ln_cell, peephole, recurrent_mask, zoneout_mask, need_x, need_h0,  # noqa: ANN001
                           need_weights):  # noqa: ANN001
    T, B, H4 = acts.shape
    H, w = H4 // 4, need_weights
    shapes = [x.shape if need_x else (0,), (B, H) if need_h0 else (0,), (B, H) if need_h0 else (0,),
              weight_ih.shape if w else (0,), weight_hh.shape if w else (0,), (H4,) if w and bias is not None else (0,),
              ln_gates.shape if w and ln_gates is not None else (0,),
              ln_cell.shape if w and ln_cell is not None else (0,),
              peephole.shape if w and peephole is not None else (0,)]
    return tuple(acts.new_empty(shape) for shape in shapes)


@torch.library.custom_op(
    "lstmlab::lstm_variant_layer_backward", mutates_args=(),
    schema="""(Tensor? d_out, Tensor? d_hT, Tensor? d_cT, Tensor x, Tensor c0, Tensor weight_ih, Tensor weight_hh,
    Tensor? bias, Tensor? batch_sizes, Tensor acts, Tensor cs, Tensor tcs, Tensor xh, Tensor extra, Tensor? ln_gates,
    Tensor? ln_cell, Tensor? peephole, Tensor? recurrent_mask, Tensor? zoneout_mask, bool need_x, bool need_h0,
    bool need_weights) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)""",
)
def lstm_variant_layer_backward(*args: Any) -> tuple[Tensor, ...]:
    """The hand-written BPTT of ``lstm_layer`` with a variant; reads the saved tensors only."""
    return _guarded("the backward", args[9], lambda: _variant_backward_impl(*args))


lstm_variant_layer_backward.register_fake(_variant_backward_fake)


# --- autograd -----------------------------------------------------------------------------------------------------

_INPUTS = ("x", "h0", "c0", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, save, *variant = inputs
    variant += [None] * (len(VARIANT_ARGS) - len(variant))  # inputs end at the last argument given
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
    variant_args = {name: t for name, t in zip(VARIANT_ARGS, variant, strict=True) if t is not None}
    return [x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr], batch_sizes, variant_args, (acts, cs, tcs, xh, extra)


def _backward(ctx: Any, d_out: Tensor | None, d_hT: Tensor | None, d_cT: Tensor | None, *_: Any) -> tuple:
    # One gradient per input the call gave (the op's inputs end at the last argument given).
    grads = _backward_all(ctx, d_out, d_hT, d_cT)
    return grads[: len(ctx.needs_input_grad)]


def _backward_all(ctx: Any, d_out: Tensor | None, d_hT: Tensor | None, d_cT: Tensor | None) -> tuple:
    """The gradients of all 15 inputs."""
    inputs, batch_sizes, variant, saved = _unpack(ctx)
    need = list(ctx.needs_input_grad[:8])
    need_variant = list(ctx.needs_input_grad[10:13])  # ln_gates, ln_cell, peephole; masks get no gradient
    need_variant += [False] * (3 - len(need_variant))
    if torch.is_grad_enabled():  # create_graph: the gradient itself must be differentiable
        grads = _differentiable_backward(inputs, batch_sizes, variant, need + need_variant, d_out, d_hT, d_cT)
        return (*grads[:8], None, None, *grads[8:], None, None)
    if saved[0].dim() != 3:
        raise RuntimeError("lstmlab fused LSTM: this forward kept nothing for backward (it ran without grad)")
    grads = (d_out, d_hT, d_cT)
    if _native_for(saved[0]) is None:
        return _hand_backward(ctx.variant, inputs, batch_sizes, variant, saved, need, need_variant, grads)
    try:
        return _hand_backward(ctx.variant, inputs, batch_sizes, variant, saved, need, need_variant, grads)
    except Exception as e:  # noqa: BLE001 - the Python loops give the numbers instead
        _loader().fail("the backward", e)
        with _loader().forced(None):  # the compiled backward may have overwritten the saved tensors: recompute them
            fresh = _layer_forward(*inputs, batch_sizes, True, *(variant.get(name) for name in VARIANT_ARGS))[3:]
            return _hand_backward(ctx.variant, inputs, batch_sizes, variant, fresh, need, need_variant, grads)


def _hand_backward(is_variant: bool, inputs: list[Tensor | None], batch_sizes: Tensor | None,
                   variant: dict[str, Tensor], saved: tuple[Tensor, ...], need: list[bool], need_variant: list[bool],
                   grads: tuple[Tensor | None, Tensor | None, Tensor | None]) -> tuple:
    """The hand-written backward of one call from its saved tensors (acts, cs, tcs, xh, extra)."""
    acts, cs, tcs, xh, extra = saved
    d_out, d_hT, d_cT = grads
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = inputs
    no_masks = (None, None)
    if is_variant:
        args = (d_out, d_hT, d_cT, x, c0, w_ih, w_hh, _bias(b_ih, b_hh), batch_sizes, acts, cs, tcs, xh, extra,
                *(variant.get(name) for name in VARIANT_ARGS), need[0], need[1] or need[2],
                any(need[3:]) or any(need_variant))
        if _plain_eager(*args):  # the activations are ours to overwrite unless the graph is kept
            result = _variant_backward_impl(*args, inplace=not _keep_graph())
        else:
            result = torch.ops.lstmlab.lstm_variant_layer_backward(*args)
        dx, dh0, dc0, dw_ih, dw_hh, db, d_ln_gates, d_ln_cell, d_peep = result
        out = [dx, dh0, dc0, dw_ih, dw_hh, db, db, None]
        ours = [o if n else None for o, n in zip(out, need, strict=True)]
        if need[5] and need[6]:
            ours[6] = db.clone()  # two parameters must not share one gradient tensor
        extras = [g if n else None for g, n in zip((d_ln_gates, d_ln_cell, d_peep), need_variant, strict=True)]
        return (*ours, None, None, *extras, *no_masks)
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
    out = [dx, dh0, dc0, dw_ih, dw_hh, db, db, dw_hr]
    ours = [o if n else None for o, n in zip(out, need, strict=True)]
    if need[5] and need[6]:
        ours[6] = db.clone()  # two parameters must not share one gradient tensor
    return (*ours, None, None, None, None, None, *no_masks)


def _differentiable_backward(inputs: list[Tensor | None], batch_sizes: Tensor | None, variant: dict[str, Tensor],
                             need: list[bool], d_out: Tensor | None, d_hT: Tensor | None, d_cT: Tensor | None
                             ) -> list[Tensor | None]:
    """The first backward as differentiable reference math, for double backward and torch.func. ``need`` covers the
    8 standard inputs, then ln_gates, ln_cell, peephole."""
    learnable = [variant.get(name) for name in VARIANT_ARGS[:3]]
    everything = [*inputs, *learnable]
    wanted = [t for t, n in zip(everything, need, strict=True) if n]
    with torch.enable_grad():
        outs = reference_layer(*inputs, batch_sizes=batch_sizes, **variant)
        pairs = [(o, g) for o, g in zip(outs, (d_out, d_hT, d_cT), strict=True) if g is not None]
        if not pairs:
            return [torch.zeros_like(t) if n else None for t, n in zip(everything, need, strict=True)]
        grads = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], create_graph=True,
                                    allow_unused=True)
    it = iter(grads)
    result = []
    for t, n in zip(everything, need, strict=True):
        g = next(it) if n else None
        result.append(torch.zeros_like(t) if n and g is None else g)
    return result


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



# --- the compiled loops' self-test --------------------------------------------------------------------------------


def self_test(ops: Any) -> str | None:
    """Hold freshly loaded compiled loops to the Python loops before any use: a tiny forward and backward of the plain
    cell and of two variant mixes, in float32 and float64, and the zoneout mask. None when they agree, else why not
    (one line). Its own generator and no autocast or dispatch modes: it changes nothing the caller sees."""
    from torch.utils._python_dispatch import _disable_current_modes

    gen = torch.Generator().manual_seed(20261207)
    try:
        with _disable_current_modes(), torch.autocast("cpu", enabled=False), torch.inference_mode():
            for dtype in (torch.float32, torch.float64):
                for mix in ((), ("ln_gates", "peephole"), ("ln_cell", "recurrent_mask", "zoneout_mask")):
                    case = _self_test_case(dtype, mix, gen)
                    with _loader().forced(ops):
                        got = _self_test_run(*case)
                    with _loader().forced(None):
                        want = _self_test_run(*case)
                    tol = 1e-4 if dtype == torch.float32 else 1e-9
                    for name, g, w in zip(("out", "h_T", "c_T", "dx", "dh0", "dc0", "dW_ih", "dW_hh"), got, want,
                                          strict=True):
                        if g.shape != w.shape or not torch.allclose(g, w, rtol=tol, atol=tol):
                            label = "+".join(mix) or "plain"
                            return f"{name} of the {label} cell in {dtype} differs from the Python loops"
                problem = _self_test_infer(ops, dtype, gen)
                if problem is not None:
                    return problem
            mask = torch.empty(2, 3, 5, 7)
            ops.zoneout_mask(12345, *zoneout_thresholds(0.25, 0.5), mask)
            if not torch.equal(mask, zoneout_mask_torch(12345, 0.25, 0.5, 3, 5, 7)):
                return "the zoneout mask differs from torch's"
    except Exception as e:  # noqa: BLE001 - any failure is a reason not to use them
        return f"{type(e).__name__}: {_loader()._first_line(e)}"
    return None


def _self_test_case(dtype: torch.dtype, mix: tuple[str, ...], gen: torch.Generator) -> tuple:
    """Inputs of one self-test call: T=3 steps, B=33 rows (two row blocks on two threads), I=5, H=8."""
    T, B, n_in, H = 3, 33, 5, 8

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype) * 0.5

    x, h0, c0 = rand(T, B, n_in), rand(B, H), rand(B, H)
    weights = (rand(4 * H, n_in), rand(4 * H, H), rand(4 * H), rand(4 * H))
    make = {"ln_gates": lambda: 1 + rand(2, 4 * H), "ln_cell": lambda: rand(2, H) + torch.tensor([[1.0], [0.0]],
            dtype=dtype), "peephole": lambda: rand(3, H), "recurrent_mask": lambda: (rand(B, H) > 0).to(dtype) * 2,
            "zoneout_mask": lambda: (rand(2, T, B, H) > 0.3).to(dtype)}
    variant = {name: make[name]() for name in mix}
    d_out, d_hT, d_cT = rand(T, B, H), rand(B, H), rand(B, H)
    return x, h0, c0, weights, variant, (d_out, d_hT, d_cT)


def _self_test_infer(ops: Any, dtype: torch.dtype, gen: torch.Generator) -> str | None:
    """The forward-only loop (lstmlab.nn.infer) against the Python loops' forward, on each of its thread layouts
    (the op's own choice, one thread, unit blocks split, rows split) and on a packed batch; None when they agree.
    H=40: several unit blocks, the last one partial, at every vector width."""
    T, B, n_in, H = 3, 33, 5, 40

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype) * 0.5

    x, h0, c0 = rand(T, B, n_in), rand(B, H), rand(B, H)
    w_ih, w_hh, b_ih, b_hh = rand(4 * H, n_in), rand(4 * H, H), rand(4 * H), rand(4 * H)
    tol = 1e-4 if x.dtype == torch.float32 else 1e-9
    packed = torch.tensor([B, B - 5, 2][:T], dtype=torch.int64)
    for sizes in (None, packed):
        with _loader().forced(None):
            want = _layer_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, None, sizes, False)[:3]
        for threads, split in ((0, 0), (1, 0), (2, 1), (2, 2)):
            got = infer_layer(ops, x, h0, c0, w_ih, w_hh, b_ih, b_hh, None, sizes, threads, split, torch_kernel=False)
            for name, g, w in zip(("out", "h_T", "c_T"), got, want, strict=True):
                if g.shape != w.shape or not torch.allclose(g, w, rtol=tol, atol=tol):
                    return (f"{name} of the forward-only loop ({threads} threads, split {split}"
                            f"{', packed' if sizes is not None else ''}) in {x.dtype} differs from the Python loops")
    return None


def _self_test_run(x: Tensor, h0: Tensor, c0: Tensor, weights: tuple, variant: dict, grads: tuple) -> list[Tensor]:
    w_ih, w_hh, b_ih, b_hh = weights
    args = [variant.get(name) for name in VARIANT_ARGS]
    out, h_T, c_T, acts, cs, tcs, xh, extra = _layer_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, None, None, True,
                                                             *args)
    if variant:
        g = _variant_backward_impl(*grads, x, c0, w_ih, w_hh, _bias(b_ih, b_hh), None, acts, cs, tcs, xh, extra,
                                   *args, True, True, True)
    else:
        g = _backward_impl(*grads, c0, w_ih, w_hh, None, None, acts, cs, tcs, xh, True, True, True, True,
                           inplace=False)
    return [out, h_T, c_T, *g[:5]]
