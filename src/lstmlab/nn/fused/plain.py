"""The plain cell's loops: the forward of ONE matmul per step ``[h_{t-1} | x_t | 1] @ [W_hh | W_ih | b]^T`` plus
pointwise math, and the hand-written backward through time; each in Python or on the compiled loops."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lstmlab.nn.fused.buffers import _allocator, _cache
from lstmlab.nn.fused.choose import _mm, _native_for
from lstmlab.nn.fused.layout import _bias, _input_rows, _last_steps, _live, _stacked_weights, _width
from lstmlab.nn.fused.native import _plain_backward_native, _plain_forward_native
from lstmlab.nn.infer import infer_layer


def _plain_forward(x: Tensor, h0: Tensor, c0: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor | None,
                   bias_hh: Tensor | None, weight_hr: Tensor | None, batch_sizes: Tensor | None, save: bool
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out, h_T, c_T, acts, cs, tcs, xh, extra) of the plain cell: the last five are what backward needs, empty
    unless ``save`` (``extra`` always: it is the variants')."""
    if not save:  # forward only (no_grad, inference): the compiled infer loop when it applies (lstmlab.nn.infer)
        done = infer_layer(_native_for(x), x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, batch_sizes)
        if done is not None:  # five distinct empty tensors: a custom op's outputs may not alias
            return (*done, *(x.new_empty(0) for _ in range(5)))
    T, B, n_in = x.shape
    H4, P = weight_hh.shape
    H = H4 // 4
    bias = _bias(bias_ih, bias_hh)
    new = _allocator(x, save, batch_sizes is not None)
    xh = _input_rows(x, h0, _width(P, n_in, bias is not None), bias is not None, new)
    acts, cs, tcs = new(T, B, H4), new(T, B, H), new(T, B, H)
    out = new(T, B, P)
    native = _native_for(x) if weight_hr is None else None  # the compiled loops have no projection
    if T and B:
        if native is not None:
            _plain_forward_native(native, x, xh, c0, weight_ih, weight_hh, bias, acts, out, cs, tcs, batch_sizes)
        else:  # the stacked [W_hh | W_ih | b] (4H, K), built only for the loops that read it
            _forward_steps(xh, c0, _stacked_weights(weight_ih, weight_hh, bias), weight_hr, acts, out, cs, tcs,
                           batch_sizes)
    h_T, c_T = _last_steps(out, batch_sizes), _last_steps(cs, batch_sizes)
    if T == 0:
        h_T, c_T = h0.clone(), c0.clone()
    if not save:  # inference: keep nothing (four distinct tensors: a custom op's outputs may not alias)
        acts, cs, tcs, xh = (x.new_empty(0) for _ in range(4))
    return out, h_T, c_T, acts, cs, tcs, xh, x.new_empty(0)


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
    dh = acts.new_zeros(B, P) if d_hT is None else d_hT.contiguous().clone()
    dc = acts.new_zeros(B, H) if d_cT is None else d_cT.contiguous().clone()
    native = _native_for(acts) if weight_hr is None else None
    if inplace and native is not None:
        dG = acts  # rows a packed step skips were zeroed by the forward and stay so
    else:
        dG = _cache().empty((T, B, H4), acts)
        if batch_sizes is not None:
            dG.zero_()  # rows a packed step skips must be zero
    dH = None
    if T and B:
        d_out = None if d_out is None else d_out.contiguous()
        if native is not None:
            _plain_backward_native(native, acts, dG, cs, tcs, c0, weight_hh, d_out, dh, dc, need_h0, batch_sizes)
        else:
            dH = _backward_steps(acts, cs, tcs, c0, weight_hh, weight_hr, d_out, dh, dc, dG, batch_sizes)
    dG2 = dG.view(T * B, H4)  # (T*B, 4H)
    dx = _mm(native, dG2, weight_ih).view(T, B, n_in) if need_x else acts.new_empty(0)
    if need_weights:
        weight_grads = _weight_grads(native, dG2, xh, acts, tcs, dH, weight_hr, P, n_in, has_bias)
    else:  # distinct tensors: a custom op's outputs may not alias
        weight_grads = tuple(acts.new_empty(0) for _ in range(4))
    dh0, dc0 = (dh, dc) if need_h0 else (acts.new_empty(0), acts.new_empty(0))
    return dx, dh0, dc0, *weight_grads


def _weight_grads(native: Any, dG2: Tensor, xh: Tensor, acts: Tensor, tcs: Tensor, dH: Tensor | None,
                  weight_hr: Tensor | None, P: int, n_in: int, has_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dW_ih, dW_hh, db, dW_hr) from the pre-activations' gradient dG2 (T*B, 4H); db and dW_hr empty if absent.

    Every parameter gradient in ONE matmul over all steps: dG^T @ [h_{t-1} | x_t | 1] = [dW_hh | dW_ih | db].
    Thin matmuls of their own (N = I, or a sum for db) run at a fraction of the wide one's speed on a CPU, and dG
    is read once instead of three times."""
    T, B, H4 = acts.shape
    H = H4 // 4
    dw = _mm(native, dG2.t(), xh.view(T * B, xh.shape[2]))  # (4H, K)
    dw_hh, dw_ih = dw[:, :P].clone(), dw[:, P : P + n_in].clone()
    db = dw[:, P + n_in].clone() if has_bias else acts.new_empty(0)
    dw_hr = acts.new_empty(0)
    if weight_hr is not None:  # dW_hr = sum_t dh_t^T (o_t * tanh(c_t))
        raw = acts[:, :, 3 * H :] * tcs  # (T, B, H)
        dw_hr = torch.mm(dH.view(T * B, P).t(), raw.reshape(T * B, H)) if dH is not None else \
            weight_hr.new_zeros(weight_hr.shape)
    return dw_ih, dw_hh, db, dw_hr


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
