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
from typing import Any

import torch
from torch import Tensor

from lstmlab.nn.cell import reference_layer


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
    if _under_functorch(x, h0, c0, weight_ih, weight_hh):  # torch.func cannot see through a custom op's autograd
        return reference_layer(x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, batch_sizes)
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr)
    )
    out, h_T, c_T, *_ = torch.ops.lstmlab.lstm_layer(
        x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, batch_sizes, save
    )
    return out, h_T, c_T


def _under_functorch(*tensors: Tensor) -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev...) wraps any of these tensors."""
    if torch.compiler.is_compiling():
        return False
    return any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def _native_for(x: Tensor) -> Any:
    """The compiled step loops when they are built and support x's device and dtype, else None."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return None
    from lstmlab.nn import _native

    return _native.get()


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
                    self._bufs.remove(old)
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


@torch.library.custom_op("lstmlab::lstm_layer", mutates_args=())
def lstm_layer(
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
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out, h_T, c_T, acts, cs, tcs, xh): the last four are what backward needs, empty unless ``save``."""
    T, B, n_in = x.shape
    H4, P = weight_hh.shape
    H = H4 // 4
    bias = _bias(bias_ih, bias_hh)
    w = _stacked_weights(weight_ih, weight_hh, bias)  # (4H, K)
    packed = batch_sizes is not None

    def new(*shape: int) -> Tensor:
        buf = _cache().empty(shape, x) if save else x.new_empty(shape)
        return buf.zero_() if packed else buf  # a packed step leaves rows untouched: they must read as zeros

    # Each step's matmul reads [h_{t-1} | x_t | 1]: x and the ones are laid out for all steps now, each step
    # writes its h_t into the next row. The same buffer is the right-hand side of the weight gradients' matmul.
    xh = new(T, B, w.shape[1])
    if T and B:
        xh[0, :, :P] = h0
        xh[:, :, P : P + n_in] = x
        xh[:, :, P + n_in :] = 0.0
        if bias is not None:
            xh[:, :, P + n_in] = 1.0
    acts, cs, tcs = new(T, B, H4), new(T, B, H), new(T, B, H)
    out = new(T, B, P)
    native = _native_for(x) if weight_hr is None else None  # the compiled loops have no projection
    if T and B:
        if native is not None:
            sizes = batch_sizes.to(torch.int64).contiguous() if packed else None
            native.forward(xh, c0.contiguous(), w, acts, out, cs, tcs, sizes)
        else:
            _forward_steps(xh, c0, w, weight_hr, acts, out, cs, tcs, batch_sizes)
    h_T, c_T = _last_steps(out, batch_sizes), _last_steps(cs, batch_sizes)
    if T == 0:
        h_T, c_T = h0.clone(), c0.clone()
    if not save:  # inference: keep nothing (four distinct tensors: a custom op's outputs may not alias)
        acts, cs, tcs, xh = (x.new_empty(0) for _ in range(4))
    return out, h_T, c_T, acts, cs, tcs, xh


@lstm_layer.register_fake
def _(x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, batch_sizes, save):  # noqa: ANN001, ANN202
    T, B, n_in = x.shape
    H4, P = weight_hh.shape
    H = H4 // 4
    K = _width(P, n_in, bias_ih is not None or bias_hh is not None)
    saved = (x.new_empty(T, B, H4), x.new_empty(T, B, H), x.new_empty(T, B, H), x.new_empty(T, B, K))
    if not save:
        saved = tuple(x.new_empty(0) for _ in range(4))
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
            native.backward(acts, dG, cs, tcs, c0.contiguous(), weight_hh.contiguous(), d_out, dh, dc, need_h0, sizes)
        else:
            dH = _backward_steps(acts, cs, tcs, c0, weight_hh, weight_hr, d_out, dh, dc, dG, batch_sizes)
    dG2 = dG.view(T * B, H4)  # (T*B, 4H)
    dx = torch.mm(dG2, weight_ih).view(T, B, n_in) if need_x else empty()
    dw_ih, dw_hh, db, dw_hr = empty(), empty(), empty(), empty()
    if need_weights:
        # Every parameter gradient in ONE matmul over all steps: dG^T @ [h_{t-1} | x_t | 1] = [dW_hh | dW_ih | db].
        # Thin matmuls of their own (N = I, or a sum for db) run at a fraction of the wide one's speed on a
        # CPU, and dG is read once instead of three times.
        dw = torch.mm(dG2.t(), xh.view(T * B, xh.shape[2]))  # (4H, K)
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
    return _backward_impl(*args, inplace=False)


@torch.library.custom_op("lstmlab::lstm_layer_backward_", mutates_args=("acts",),
                         schema=_BACKWARD_ARGS.format(acts="(a!)"))
def lstm_layer_backward_(*args: Any) -> tuple[Tensor, ...]:
    """As ``lstm_layer_backward``, but may overwrite ``acts`` (a backward that frees its graph): no extra buffer."""
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


# --- autograd -----------------------------------------------------------------------------------------------------

_INPUTS = ("x", "h0", "c0", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, save = inputs
    _, _, _, acts, cs, tcs, xh = output
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the unused outputs (acts alone is T*B*4H)
    ctx.has = [t is not None for t in (b_ih, b_hh, w_hr, batch_sizes)]
    present = [t for t in (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes) if t is not None]
    ctx.save_for_backward(*present, acts, cs, tcs, xh)


def _unpack(ctx: Any) -> tuple[list[Tensor | None], Tensor | None, tuple[Tensor, Tensor, Tensor, Tensor]]:
    saved = list(ctx.saved_tensors)
    acts, cs, tcs, xh = saved[-4:]
    it = iter(saved[:-4])
    x, h0, c0, w_ih, w_hh = (next(it) for _ in range(5))
    b_ih, b_hh, w_hr, batch_sizes = (next(it) if has else None for has in ctx.has)
    return [x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr], batch_sizes, (acts, cs, tcs, xh)


def _backward(ctx: Any, d_out: Tensor | None, d_hT: Tensor | None, d_cT: Tensor | None, *_: Any) -> tuple:
    inputs, batch_sizes, (acts, cs, tcs, xh) = _unpack(ctx)
    need = list(ctx.needs_input_grad[:8])
    if torch.is_grad_enabled():  # create_graph: the gradient itself must be differentiable
        return (*_differentiable_backward(inputs, batch_sizes, need, d_out, d_hT, d_cT), None, None)
    if acts.dim() != 3:
        raise RuntimeError("lstmlab fused LSTM: this forward kept nothing for backward (it ran without grad)")
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = inputs
    # The activations are ours to overwrite unless the graph is kept for another backward (or being traced).
    inplace = not torch.compiler.is_compiling() and not _keep_graph()
    op = torch.ops.lstmlab.lstm_layer_backward_ if inplace else torch.ops.lstmlab.lstm_layer_backward
    grads = op(
        d_out, d_hT, d_cT, c0, w_ih, w_hh, w_hr, batch_sizes, acts, cs, tcs, xh,
        b_ih is not None or b_hh is not None, need[0], need[1] or need[2], any(need[3:]),
    )
    dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr = grads
    out = [dx, dh0, dc0, dw_ih, dw_hh, db, db, dw_hr]
    result = [o if n else None for o, n in zip(out, need, strict=True)]
    if need[5] and need[6]:
        result[6] = db.clone()  # two parameters must not share one gradient tensor
    return (*result, None, None)


def _differentiable_backward(inputs: list[Tensor | None], batch_sizes: Tensor | None, need: list[bool],
                             d_out: Tensor | None, d_hT: Tensor | None, d_cT: Tensor | None) -> list[Tensor | None]:
    """The first backward as differentiable reference math, for double backward and torch.func."""
    wanted = [t for t, n in zip(inputs, need, strict=True) if n]
    with torch.enable_grad():
        outs = reference_layer(*inputs, batch_sizes=batch_sizes)
        pairs = [(o, g) for o, g in zip(outs, (d_out, d_hT, d_cT), strict=True) if g is not None]
        if not pairs:
            return [torch.zeros_like(t) if n else None for t, n in zip(inputs, need, strict=True)]
        grads = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], create_graph=True,
                                    allow_unused=True)
    it = iter(grads)
    result = []
    for t, n in zip(inputs, need, strict=True):
        g = next(it) if n else None
        result.append(torch.zeros_like(t) if n and g is None else g)
    return result


lstm_layer.register_autograd(_backward, setup_context=_setup_context)


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

