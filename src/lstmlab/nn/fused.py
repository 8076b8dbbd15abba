"""The ``fused`` backend: one layer, one direction, the whole sequence in one autograd node.

Against the gate-level ``reference`` loop it saves most of the small ops that dominate an LSTM on a CPU:

* a forward step is ONE matmul ``[h_{t-1} | x_t | 1] @ [W_hh | W_ih | b]^T`` (the textbook's h2h and x2h with
  both biases) plus one pass of pointwise math;
* the backward pass through time is hand-written: per step only the gates' pointwise derivatives and one
  ``dG_t @ W_hh``; all the parameter gradients are ONE matmul over all steps.

The per-step loops run either in Python (always available) or in a small C++ extension
(:mod:`lstmlab.nn._native`, compiled once in the background and cached on disk) when it is ready; both give
the same numbers up to float rounding.
"""

from __future__ import annotations

import functools
import math
import threading
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


def fused_layer(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor | None,
    bias_hh: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Run one LSTM layer over x (T, B, I) from (h0, c0) each (B, H).

    Returns ``(out (T, B, H), h_T (B, H), c_T (B, H))``; gates in i, f, g, o order as ``nn.LSTM``.
    Differentiable once w.r.t. every tensor argument (double backward raises an error).
    """
    if x.dim() != 3 or h0.shape != c0.shape or h0.shape != (x.shape[1], weight_hh.shape[1]):
        raise ValueError(
            f"fused_layer: expected x (T, B, I) and h0, c0 (B, H), got {tuple(x.shape)}, "
            f"{tuple(h0.shape)}, {tuple(c0.shape)}"
        )
    native = _native_for(x)
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh)
    ):
        return _FusedLSTM.apply(x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, native)
    with torch.no_grad():  # inference: nothing is kept for backward, the scratch goes straight back
        fw = _forward(x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, native)
        h_T, c_T = fw.out[-1].clone(), fw.cs[-1].clone()
        _pool().give(fw.acts, fw.cs, fw.tcs, fw.xh)
        return fw.out, h_T, c_T


def release_buffers() -> None:
    """Free the scratch buffers the fused backend keeps between steps (e.g. after training)."""
    _pool().clear()


def _native_for(x: Tensor):  # noqa: ANN202 - an optional module or None
    """The compiled step loops when they are built and support x's device and dtype, else None."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return None
    from lstmlab.nn import _native

    return _native.get()


class _ScratchPool:
    """Big CPU scratch buffers kept from one step to the next.

    A fresh multi-megabyte CPU tensor comes from the kernel as untouched pages, and touching them costs more
    than the LSTM math at large batches (measured: filling a fresh 58 MB buffer took as long as 28 steps of
    the recurrent matmul). Only buffers that never reach the caller go here; other devices have their own
    caching allocators and bypass the pool.
    """

    def __init__(self, max_bytes: int = 2 << 30, per_key: int = 4) -> None:
        self._free: dict[tuple[int, torch.dtype], list[Tensor]] = {}
        self._bytes = 0
        self._max_bytes = max_bytes
        self._per_key = per_key
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """An uninitialised contiguous tensor of this shape with like's dtype and device."""
        if like.device.type != "cpu":
            return like.new_empty(shape)
        key = (math.prod(shape), like.dtype)
        with self._lock:
            stack = self._free.get(key)
            if stack:
                buf = stack.pop()
                self._bytes -= buf.numel() * buf.element_size()
                return buf.view(shape)
        return like.new_empty(shape)

    def give(self, *buffers: Tensor | None) -> None:
        """Hand buffers back; the caller must hold no other reference to them."""
        with self._lock:
            for buf in buffers:
                if buf is None or buf.device.type != "cpu":
                    continue
                size = buf.numel() * buf.element_size()
                stack = self._free.setdefault((buf.numel(), buf.dtype), [])
                if len(stack) < self._per_key and self._bytes + size <= self._max_bytes:
                    stack.append(buf.view(-1))
                    self._bytes += size

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._bytes = 0


@functools.cache
def _pool() -> _ScratchPool:
    # One per process, like an allocator's cache: buffers outlive any one call by design.
    return _ScratchPool()


def _keep_graph() -> bool:
    """Whether the running backward keeps the graph (retain_graph=True): then the saved buffers must survive."""
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


class _Forward(NamedTuple):
    out: Tensor  # (T, B, H) h_t, the caller's
    acts: Tensor  # (T, B, 4H) activated gates i, f, g, o (pool)
    cs: Tensor  # (T, B, H) c_t (pool)
    tcs: Tensor  # (T, B, H) tanh(c_t) (pool)
    xh: Tensor  # (T, B, K) row t = [h_{t-1} | x_t | 1 | 0...], the steps' matmul input (pool)


def _stacked_weights(weight_ih: Tensor, weight_hh: Tensor, bias: Tensor | None) -> Tensor:
    """[W_hh | W_ih | b | 0...] (4H, K): the x2h and h2h maps (and the bias) as one matrix. K is rounded up to a
    multiple of 16, which the CPU matmul kernels run faster, and the zero columns change nothing."""
    H4, H = weight_hh.shape
    n_in = weight_ih.shape[1]
    width = H + n_in + (bias is not None)
    w = weight_hh.new_zeros(H4, -(-width // 16) * 16)
    w[:, :H] = weight_hh
    w[:, H : H + n_in] = weight_ih
    if bias is not None:
        w[:, H + n_in] = bias
    return w


def _forward(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor | None,
    bias_hh: Tensor | None,
    native,  # noqa: ANN001
) -> _Forward:
    """The forward loop over all steps."""
    pool = _pool()
    T, B, n_in = x.shape
    H4, H = weight_hh.shape
    bias = _bias(bias_ih, bias_hh)
    w = _stacked_weights(weight_ih, weight_hh, bias)  # (4H, K)
    # Each step's matmul reads [h_{t-1} | x_t | 1]: x and the ones are laid out for all steps now, each step
    # writes its h_t into the next row. The same buffer is the right-hand side of the weight gradients' matmul.
    xh = pool.take((T, B, w.shape[1]), x)
    xh[0, :, :H] = h0
    xh[:, :, H : H + n_in] = x
    xh[:, :, H + n_in :] = 0.0
    if bias is not None:
        xh[:, :, H + n_in] = 1.0
    acts = pool.take((T, B, H4), x)
    out = x.new_empty(T, B, H)
    cs = pool.take((T, B, H), x)
    tcs = pool.take((T, B, H), x)
    c0 = c0.contiguous()
    if native is not None:
        native.forward(xh, c0, w, acts, out, cs, tcs)
        return _Forward(out, acts, cs, tcs, xh)
    w_t = w.t()  # (K, 4H)
    # Per-step views made once: indexing in the loop would cost a dispatcher call each.
    h_next = [*xh[1:, :, :H].unbind(0), None]  # where h_t goes for step t+1's matmul (nowhere after the last)
    steps = zip(xh.unbind(0), acts.unbind(0), out.unbind(0), cs.unbind(0), tcs.unbind(0), h_next, strict=True)
    c = c0
    for xh_t, gates, h_t, c_t, tc_t, next_t in steps:
        torch.mm(xh_t, w_t, out=gates)  # (B, 4H) = [h_{t-1} | x_t | 1] @ [W_hh | W_ih | b]^T
        gates[:, : 2 * H].sigmoid_()  # i, f
        gates[:, 2 * H : 3 * H].tanh_()  # g
        gates[:, 3 * H :].sigmoid_()  # o
        i, f, g, o = gates.split(H, dim=1)
        torch.mul(f, c, out=c_t)
        c_t.addcmul_(i, g)  # c' = f*c + i*g
        torch.tanh(c_t, out=tc_t)
        torch.mul(o, tc_t, out=h_t)  # h' = o * tanh(c')
        if next_t is not None:
            next_t.copy_(h_t)
        c = c_t
    return _Forward(out, acts, cs, tcs, xh)


def _backward_steps(acts: Tensor, cs: Tensor, tcs: Tensor, c0: Tensor, weight_hh: Tensor,
                    d_out: Tensor | None, dh: Tensor, dc: Tensor, need_dh0: bool) -> Tensor:
    """Backpropagation through time in Python. dh, dc (B, H) go from the gradients at h_T, c_T to those at
    h_0, c_0 in place; returns dG (T, B, 4H), the gradient w.r.t. the gates' pre-activations (pool)."""
    pool = _pool()
    T, B, H4 = acts.shape
    H = H4 // 4
    i, f, g, o = acts.split(H, dim=2)  # each (T, B, H), strided views
    # What does not depend on the incoming gradient, for all steps at once (a few big ops instead of many
    # small ones in the loop): d(pre-activation)/d(c_t) for gates i, f, g and d(pre-activation)/d(h_t) for o.
    dG = pool.take((T, B, 4, H), acts)
    torch.mul(i * (1 - i), g, out=dG[:, :, 0])
    torch.mul(1 - g * g, i, out=dG[:, :, 2])
    torch.mul(o * (1 - o), tcs, out=dG[:, :, 3])
    dG1 = dG[:, :, 1]
    torch.mul(f[0] * (1 - f[0]), c0, out=dG1[0])
    if T > 1:
        torch.mul(f[1:] * (1 - f[1:]), cs[:-1], out=dG1[1:])
    k_c = pool.take((T, B, H), acts)
    torch.mul(o, 1 - tcs * tcs, out=k_c)  # dc_t += dh_t * o * (1 - tanh(c_t)^2)
    dh_in = acts.new_empty(B, H)
    for t in range(T - 1, -1, -1):
        if d_out is not None:
            torch.add(dh, d_out[t], out=dh_in)
        else:
            dh_in.copy_(dh)
        dc.addcmul_(dh_in, k_c[t])
        dG_t = dG[t]  # (B, 4, H)
        dG_t[:, :3].mul_(dc.unsqueeze(1))  # i, f, g
        dG_t[:, 3].mul_(dh_in)  # o
        dc.mul_(f[t])  # dc_{t-1} = dc_t * f_t
        if t > 0 or need_dh0:  # the last one only when h_0 wants its gradient
            torch.mm(dG_t.view(B, H4), weight_hh, out=dh)  # dh_{t-1} = dG_t @ W_hh
    pool.give(k_c)
    return dG.view(T, B, H4)


class _FusedLSTM(torch.autograd.Function):
    """One layer over the whole sequence; backward is hand-written BPTT (first derivatives only)."""

    @staticmethod
    def forward(ctx, x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, native):  # noqa: ANN001, ANN205
        ctx.set_materialize_grads(False)  # an unused output (out, or c_T) gets no zero-filled gradient
        fw = _forward(x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, native)
        ctx.save_for_backward(c0, weight_ih, weight_hh)
        ctx.fw = fw  # the scratch buffers: ours alone, reused in place by backward
        ctx.native = native
        ctx.has_bias = bias_ih is not None or bias_hh is not None
        return fw.out, fw.out[-1].clone(), fw.cs[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_hT, d_cT):  # noqa: ANN001, ANN205
        c0, weight_ih, weight_hh = ctx.saved_tensors
        fw: _Forward = ctx.fw
        if fw is None:
            raise RuntimeError("fused LSTM: backward through this graph a second time needs retain_graph=True")
        pool = _pool()
        T, B, H4 = fw.acts.shape
        H = H4 // 4
        n_in = weight_ih.shape[1]
        keep = _keep_graph()
        need = ctx.needs_input_grad
        dh = torch.zeros_like(fw.cs[0]) if d_hT is None else d_hT.contiguous().clone()
        dc = torch.zeros_like(fw.cs[0]) if d_cT is None else d_cT.contiguous().clone()
        if d_out is not None:
            d_out = d_out.contiguous()
        c0 = c0.contiguous()
        if ctx.native is not None:
            # The native loop turns the activations into dG in place: on a copy when the graph is kept.
            dG = pool.take(fw.acts.shape, fw.acts).copy_(fw.acts) if keep else fw.acts
            ctx.native.backward(dG, fw.cs, fw.tcs, c0, weight_hh.contiguous(), d_out, dh, dc, need[1])
        else:
            dG = _backward_steps(fw.acts, fw.cs, fw.tcs, c0, weight_hh, d_out, dh, dc, need[1])
        dG2 = dG.view(T * B, H4)  # (T*B, 4H)
        dx = torch.mm(dG2, weight_ih).view(T, B, n_in) if need[0] else None
        dw_ih = dw_hh = db = None
        if any(need[3:7]):
            # Every parameter gradient in ONE matmul over all steps: dG^T @ [h_{t-1} | x_t | 1] = [dW_hh | dW_ih | db].
            # Thin matmuls of their own (N = I, or a sum for db) run at a fraction of the wide one's speed on a
            # CPU, and dG is read once instead of three times.
            dw = torch.mm(dG2.t(), fw.xh.view(T * B, -1))  # (4H, K)
            dw_hh, dw_ih = dw[:, :H], dw[:, H : H + n_in]
            if ctx.has_bias:
                db = dw[:, H + n_in]
        if dG is not fw.acts:
            pool.give(dG)
        if not keep:
            pool.give(fw.acts, fw.cs, fw.tcs, fw.xh)
            ctx.fw = None
        return (
            dx,
            dh if need[1] else None,
            dc if need[2] else None,
            dw_ih if need[3] else None,
            dw_hh if need[4] else None,
            db if need[5] else None,
            (db.clone() if need[5] else db) if need[6] else None,  # two parameters must not share one tensor
            None,
        )
