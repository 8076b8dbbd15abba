"""The ``fused`` backend: one layer, one direction, the whole sequence in one autograd node.

Against the gate-level ``reference`` loop it saves most of the small ops that dominate an LSTM on a CPU:

* the input projection of all T steps is ONE matmul ``(T*B, I) @ (I, 4H)`` with both biases folded in;
* a forward step is one ``addmm`` of ``h @ W_hh^T`` into those precomputed gates plus the pointwise math;
* the backward pass through time is hand-written: per step only the gates' pointwise derivatives and one
  ``dG_t @ W_hh``; the weight gradients are ONE matmul each over all steps.

The per-step loops run either in Python (always available) or in a small C++ extension
(:mod:`lstmlab._native`, compiled once in the background and cached on disk) when it is ready; both give
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
        _pool().give(fw.acts, fw.cs, fw.tcs, fw.x2_own)
        return fw.out, h_T, c_T


def release_buffers() -> None:
    """Free the scratch buffers the fused backend keeps between steps (e.g. after training)."""
    _pool().clear()


def _native_for(x: Tensor):  # noqa: ANN202 - an optional module or None
    """The compiled step loops when they are built and support x's device and dtype, else None."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return None
    from lstmlab import _native

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
    x2: Tensor  # (T*B, I) the input as a matrix
    x2_own: Tensor | None  # x2 when it is a private copy (pool), None when it is a view of x


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
    H4 = weight_hh.shape[0]
    H = H4 // 4
    if x.is_contiguous():
        x2, x2_own = x.view(T * B, n_in), None
    else:  # e.g. batch_first input seen as (T, B, I)
        x2 = x2_own = pool.take((T * B, n_in), x).copy_(x.reshape(T * B, n_in))
    acts = pool.take((T, B, H4), x)
    bias = _bias(bias_ih, bias_hh)
    # The input projection of every step at once, biases folded in: (T*B, I) @ (I, 4H).
    if bias is None:
        torch.mm(x2, weight_ih.t(), out=acts.view(T * B, H4))
    else:
        torch.addmm(bias, x2, weight_ih.t(), out=acts.view(T * B, H4))
    h0 = h0.contiguous()
    c0 = c0.contiguous()
    out = x.new_empty(T, B, H)
    cs = pool.take((T, B, H), x)
    tcs = pool.take((T, B, H), x)
    if native is not None:
        native.forward(acts, h0, c0, weight_hh.contiguous(), out, cs, tcs)
        return _Forward(out, acts, cs, tcs, x2, x2_own)
    w_hh_t = weight_hh.t()  # (H, 4H)
    # Per-step views made once: indexing in the loop would cost a dispatcher call each.
    steps = zip(acts.unbind(0), out.unbind(0), cs.unbind(0), tcs.unbind(0), strict=True)
    h, c = h0, c0
    for gates, h_t, c_t, tc_t in steps:
        gates.addmm_(h, w_hh_t)  # (B, 4H) += h @ W_hh^T
        gates[:, : 2 * H].sigmoid_()  # i, f
        gates[:, 2 * H : 3 * H].tanh_()  # g
        gates[:, 3 * H :].sigmoid_()  # o
        i, f, g, o = gates.split(H, dim=1)
        torch.mul(f, c, out=c_t)
        c_t.addcmul_(i, g)  # c' = f*c + i*g
        torch.tanh(c_t, out=tc_t)
        torch.mul(o, tc_t, out=h_t)  # h' = o * tanh(c')
        h, c = h_t, c_t
    return _Forward(out, acts, cs, tcs, x2, x2_own)


def _backward_steps(acts: Tensor, cs: Tensor, tcs: Tensor, c0: Tensor, weight_hh: Tensor,
                    d_out: Tensor | None, dh: Tensor, dc: Tensor) -> Tensor:
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
        torch.mm(dG_t.view(B, H4), weight_hh, out=dh)  # dh_{t-1} = dG_t @ W_hh
    pool.give(k_c)
    return dG.view(T, B, H4)


class _FusedLSTM(torch.autograd.Function):
    """One layer over the whole sequence; backward is hand-written BPTT (first derivatives only)."""

    @staticmethod
    def forward(ctx, x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, native):  # noqa: ANN001, ANN205
        ctx.set_materialize_grads(False)  # an unused output (out, or c_T) gets no zero-filled gradient
        fw = _forward(x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, native)
        # x2 is saved through save_for_backward when it is a view of x, so that changing x in place is caught.
        ctx.save_for_backward(h0, c0, weight_ih, weight_hh, fw.out, fw.x2 if fw.x2_own is None else None)
        ctx.fw = fw  # the scratch buffers: ours alone, reused in place by backward
        ctx.native = native
        return fw.out, fw.out[-1].clone(), fw.cs[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_hT, d_cT):  # noqa: ANN001, ANN205
        h0, c0, weight_ih, weight_hh, out, x2 = ctx.saved_tensors
        fw: _Forward = ctx.fw
        if fw is None:
            raise RuntimeError("fused LSTM: backward through this graph a second time needs retain_graph=True")
        if x2 is None:
            x2 = fw.x2_own
        pool = _pool()
        T, B, H4 = fw.acts.shape
        keep = _keep_graph()
        dh = torch.zeros_like(h0) if d_hT is None else d_hT.contiguous().clone()
        dc = torch.zeros_like(c0) if d_cT is None else d_cT.contiguous().clone()
        if d_out is not None:
            d_out = d_out.contiguous()
        c0 = c0.contiguous()
        if ctx.native is not None:
            # The native loop turns the activations into dG in place: on a copy when the graph is kept.
            dG = pool.take(fw.acts.shape, fw.acts).copy_(fw.acts) if keep else fw.acts
            ctx.native.backward(dG, fw.cs, fw.tcs, c0, weight_hh.contiguous(), d_out, dh, dc)
        else:
            dG = _backward_steps(fw.acts, fw.cs, fw.tcs, c0, weight_hh, d_out, dh, dc)
        need = ctx.needs_input_grad
        dG2 = dG.view(T * B, H4)  # (T*B, 4H)
        dx = torch.mm(dG2, weight_ih).view(T, B, -1) if need[0] else None
        dw_ih = dw_hh = None
        H = H4 // 4
        if need[3] and need[4] and x2.device.type == "cpu":
            # Both weight gradients in ONE matmul: dG^T @ [h_{t-1} | x_t] over all steps. A thin (N = I) matmul
            # of its own runs at half the speed of the wide one on a CPU, and dG is read once instead of twice.
            hx = pool.take((T, B, H + x2.shape[1]), dG)  # (T, B, H+I): row t holds [h_{t-1}, x_t]
            hx[0, :, :H] = h0
            hx[1:, :, :H] = out[:-1]
            hx[:, :, H:] = x2.view(T, B, -1)
            dw = torch.mm(dG2.t(), hx.view(T * B, -1))  # (4H, H+I)
            pool.give(hx)
            dw_hh, dw_ih = dw[:, :H], dw[:, H:]
        else:
            if need[3]:
                dw_ih = torch.mm(dG2.t(), x2)
            if need[4]:
                # dW_hh = sum_t dG_t^T @ h_{t-1}: steps 1..T-1 read out[0..T-2], step 0 reads h0.
                dw_hh = torch.mm(dG[0].t(), h0)
                if T > 1:
                    dw_hh.addmm_(dG[1:].reshape((T - 1) * B, H4).t(), out[:-1].reshape((T - 1) * B, -1))
        db = dG2.sum(0) if (need[5] or need[6]) else None
        if keep:
            if dG is not fw.acts:
                pool.give(dG)
        else:
            if dG is not fw.acts:
                pool.give(dG)
            pool.give(fw.acts, fw.cs, fw.tcs, fw.x2_own)
            ctx.fw = None
        return (
            dx,
            dh if need[1] else None,
            dc if need[2] else None,
            dw_ih,
            dw_hh,
            db if need[5] else None,
            (db.clone() if need[5] else db) if need[6] else None,  # two parameters must not share one tensor
            None,
        )
