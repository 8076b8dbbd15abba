"""The variants' loops in Python (LayerNorm, peephole, zoneout, recurrent dropout: the table's ``loops="native"`` and
``"python"`` entries) and the buffer layout they share with the compiled ones.

The same equations as lstmlab.nn.cell.lstm_step, step by step into preallocated buffers, and their hand-written
backward. Without the gates' LayerNorm a step is the plain cell's ONE matmul [h_in | x_t | 1] @ [W_hh | W_ih | b]^T
over xh (T, B, K) (:func:`~lstmlab.nn.fused.layout._input_rows`; h_in = h_{t-1} times the recurrent-dropout mask),
and the weight gradients ONE matmul dZ^T xh. With it, the two products are normalised apart: x W_ih^T for all steps
in one matmul, h_in W_hh^T per step, h_in kept in ``extra``, and xh is empty.

``acts`` (T, B, 4H) keeps the activations i, f, g, o; with the gates' LayerNorm it keeps â = LN(x W_ih^T) instead,
and both backwards recompute the activations from â and r̂ (as the forward computed them): one (T, B, 4H) buffer
less to write and read back. ``tcs`` (T, B, H) keeps tanh(c_new); with the cell LayerNorm ĉ = LN(c_new) instead,
from which the backwards recompute tanh(γ_c ĉ + β_c). ``extra`` (T, B, E) keeps what the backward needs beyond
acts, cs (the state c_t after zoneout) and tcs, each part a contiguous (T, B, width) block (:func:`_extra_views`):
c_new, the cell before zoneout (with zoneout; else it is cs); h_in (gates' LayerNorm); r̂ (gates' LayerNorm);
rstd_c, rstd_a, rstd_r (either LayerNorm).

The compiled loops (csrc/lstm_variants.cpp, bridged in :mod:`lstmlab.nn.fused.native`) use the same buffers: a
forward of one kind and a backward of the other work together. Rows a packed step does not reach are zero in every
buffer but xh, which holds what the plain cell's does.

``variant`` below is always the call's variant arguments by name (:mod:`lstmlab.nn.variants`), absent or None = off.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lstmlab.nn.cell import LN_EPS
from lstmlab.nn.fused.layout import _input_rows, _last_steps, _live, _stacked_weights, _width
from lstmlab.nn.variants import FUSED_LEARNED

Variant = dict[str, Tensor | None]


def _extra_parts(H: int, variant: Variant) -> list[tuple[str, int]]:
    """The parts of ``extra`` a call's variants need, (name, width), in storage order (csrc reads the same)."""
    layer_norm = variant.get("ln_gates") is not None
    parts = [("c_new", H)] if variant.get("zoneout_mask") is not None else []  # else c_new is c_t itself: cs
    if layer_norm:
        parts += [("h_in", H), ("r_hat", 4 * H)]
    if layer_norm or variant.get("ln_cell") is not None:
        parts.append(("rstd", 3))
    return parts


def _extra_width(H: int, variant: Variant) -> int:
    return sum(width for _, width in _extra_parts(H, variant))


def _extra_views(extra: Tensor, H: int, variant: Variant) -> dict[str, Tensor]:
    """extra's parts, each a contiguous (T, B, width) block of its storage (strided column slices would make
    every per-step op and matmul copy)."""
    T, B = extra.shape[:2]
    flat = extra.reshape(-1)
    views, offset = {}, 0
    for name, width in _extra_parts(H, variant):
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
                     batch_sizes: Tensor | None, save: bool, variant: Variant) -> tuple[Tensor, ...]:
    """lstm_layer for the variants on the Python loops: (out, h_T, c_T, acts, cs, tcs, xh, extra)."""
    T, B, _ = x.shape
    H = c0.shape[1]
    recurrent_mask, zoneout_mask = variant.get("recurrent_mask"), variant.get("zoneout_mask")
    # Zero-filled: rows a packed step skips must read as zeros (they meet zero gradients, never NaN garbage).
    acts, cs, tcs, out = x.new_zeros(T, B, 4 * H), x.new_zeros(T, B, H), x.new_zeros(T, B, H), x.new_zeros(T, B, H)
    extra = x.new_zeros(T, B, _extra_width(H, variant))
    v = _extra_views(extra, H, variant)
    sizes = None if batch_sizes is None else batch_sizes.tolist()
    xh, h_in, w_t = _step_inputs(x, h0, weight_ih, weight_hh, bias, acts, v, sizes, variant)
    h, c = h0, c0
    for t in range(T):
        n = _live(sizes, t, B)
        h_p, c_p = h[:n], c[:n]
        z, gates = _preactivations(t, n, xh, h_in, w_t, weight_hh, bias, acts, v, variant)
        c_new = v["c_new"][t, :n] if zoneout_mask is not None else cs[t, :n]
        rstd_c = v["rstd"][t, :n, 0] if variant.get("ln_cell") is not None else None
        h_t = out[t, :n]
        _cell_step(z, gates, c_p, c_new, tcs[t, :n], h_t, rstd_c, variant)
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


def _step_inputs(x: Tensor, h0: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Tensor | None, acts: Tensor,
                 v: dict[str, Tensor], sizes: list[int] | None, variant: Variant
                 ) -> tuple[Tensor, Tensor, Tensor | None]:
    """(xh, h_in, [W_hh | W_ih | b]^T or None): what the steps' matmuls read, with h_in of step 0 in place."""
    T, B, n_in = x.shape
    H = h0.shape[1]
    recurrent_mask = variant.get("recurrent_mask")
    h_in0 = h0 if recurrent_mask is None else h0 * recurrent_mask  # variational recurrent dropout
    if variant.get("ln_gates") is not None:  # the two products apart: every step's x2h in one matmul now, into acts
        torch.mm(x.reshape(T * B, n_in), weight_ih.t(), out=acts.view(T * B, 4 * H))  # (normalised there)
        for t in range(T if sizes is not None else 0):  # rows a packed step does not reach read as zeros
            acts[t, sizes[t] :] = 0
        h_in = v["h_in"]
        if T:
            h_in[0] = h_in0
        return x.new_empty(0), h_in, None
    # [h_in | x | 1] @ [W_hh | W_ih | b]^T per step, as the plain cell
    xh = _input_rows(x, h_in0, _width(H, n_in, bias is not None), bias is not None, x.new_zeros)
    return xh, xh[:, :, :H], _stacked_weights(weight_ih, weight_hh, bias).t()


def _preactivations(t: int, n: int, xh: Tensor, h_in: Tensor, w_t: Tensor | None, weight_hh: Tensor,
                    bias: Tensor | None, acts: Tensor, v: dict[str, Tensor], variant: Variant
                    ) -> tuple[Tensor, Tensor]:
    """(z, gates) of step t's n live rows: the pre-activations before the peepholes (n, 4H) and where the
    activations go (acts, or a scratch buffer with the gates' LayerNorm: the backward recomputes them)."""
    ln_gates = variant.get("ln_gates")
    if ln_gates is None:
        return torch.mm(xh[t, :n], w_t), acts[t, :n]  # (n, 4H)
    R = torch.mm(h_in[t, :n], weight_hh.t())  # (n, 4H)
    rstd = v["rstd"][t, :n]
    _normalize(acts[t, :n], acts[t, :n], rstd[:, 1])
    _normalize(R, v["r_hat"][t, :n], rstd[:, 2])
    z = _ln_gates(acts[t, :n], v["r_hat"][t, :n], ln_gates, bias)
    return z, torch.empty_like(z)


def _cell_step(z: Tensor, gates: Tensor, c_p: Tensor, c_new: Tensor, tc: Tensor, h_t: Tensor,
               rstd_c: Tensor | None, variant: Variant) -> None:
    """One step's pointwise math, into gates (i, f, g, o), c_new, tc (tanh(c_new), or ĉ) and h_t."""
    H = c_p.shape[1]
    peephole, ln_cell = variant.get("peephole"), variant.get("ln_cell")
    i, f, g, o = gates.split(H, dim=1)
    zi, zf, zg, zo = z.split(H, dim=1)
    if peephole is not None:  # i and f see the previous cell
        zi = zi + peephole[0] * c_p
        zf = zf + peephole[1] * c_p
    torch.sigmoid(zi, out=i)
    torch.sigmoid(zf, out=f)
    torch.tanh(zg, out=g)
    torch.mul(f, c_p, out=c_new)
    c_new.addcmul_(i, g)  # c' = f*c + i*g
    if peephole is not None:  # o sees the new cell
        zo = zo + peephole[2] * c_new
    torch.sigmoid(zo, out=o)
    if ln_cell is not None:
        _normalize(c_new, tc, rstd_c)  # tcs keeps ĉ
        tanh_c = _cell_tanh(tc, ln_cell)
    else:
        tanh_c = torch.tanh(c_new, out=tc)
    torch.mul(o, tanh_c, out=h_t)


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
    xh: Tensor, extra: Tensor, variant: Variant, need_x: bool, need_h0: bool, need_weights: bool,
) -> tuple[Tensor, ...]:
    """(dx, dh0, dc0, dW_ih, dW_hh, db, then the gradient of each learned argument in ``variant``'s table order) on
    the Python loops, each empty when not needed or absent (db when ``bias``, b_ih + b_hh, is None)."""
    T, B, H4 = acts.shape
    layer_norm = variant.get("ln_gates") is not None
    v = _extra_views(extra, c0.shape[1], variant)
    sizes = None if batch_sizes is None else batch_sizes.tolist()
    dh = acts.new_zeros(B, c0.shape[1]) if d_hT is None else d_hT.contiguous().clone()
    dc = acts.new_zeros(B, c0.shape[1]) if d_cT is None else d_cT.contiguous().clone()
    dZ = acts.new_zeros(T, B, H4)  # gradient w.r.t. the gates' pre-activations (after LayerNorm and peepholes)
    dA = acts.new_zeros(T, B, H4) if layer_norm else dZ  # ... w.r.t. x W_ih^T and h_in W_hh^T
    dR = acts.new_zeros(T, B, H4) if layer_norm else dZ
    dY = acts.new_zeros(T, B, H4 // 4) if variant.get("ln_cell") is not None else None  # ... w.r.t. γ_c ĉ + β_c
    for t in range(T - 1, -1, -1):
        n = _live(sizes, t, B)
        c_prev = cs[t - 1, :n] if t > 0 else c0[:n]
        dh_t = dh[:n] + d_out[t, :n] if d_out is not None else dh[:n].clone()
        dh[:n], dc[:n] = _step_backward(t, n, dh_t, dc[:n].clone(), c_prev, weight_hh, bias, acts, cs, tcs, v,
                                        dZ, dA, dR, dY, variant)

    def empty() -> Tensor:  # a distinct tensor each: a custom op's outputs may not alias
        return acts.new_empty(0)

    dx = torch.mm(dA.view(T * B, H4), weight_ih).view(T, B, weight_ih.shape[1]) if need_x else empty()
    grads = (empty(), empty(), empty(), {})
    if need_weights:
        grads = _param_grads(dZ, dA, dR, dY, x, c0, acts, cs, tcs, xh, v, bias, variant)
    dw_ih, dw_hh, db, learned = grads
    dh0, dc0 = (dh, dc) if need_h0 else (empty(), empty())
    return dx, dh0, dc0, dw_ih, dw_hh, db, *(learned.get(name, empty()) for name in FUSED_LEARNED)


def _step_backward(t: int, n: int, dh_t: Tensor, dc_t: Tensor, c_prev: Tensor, weight_hh: Tensor,
                   bias: Tensor | None, acts: Tensor, cs: Tensor, tcs: Tensor, v: dict[str, Tensor], dZ: Tensor,
                   dA: Tensor, dR: Tensor, dY: Tensor | None, variant: Variant) -> tuple[Tensor, Tensor]:
    """Step t back: from the gradients at its h and c (n live rows) fill dZ, dA, dR, dY at t and return those at
    the previous h and c."""
    H = c_prev.shape[1]
    ln_gates, ln_cell, peephole = variant.get("ln_gates"), variant.get("ln_cell"), variant.get("peephole")
    recurrent_mask, zoneout_mask = variant.get("recurrent_mask"), variant.get("zoneout_mask")
    tc = tcs[t, :n] if ln_cell is None else _cell_tanh(tcs[t, :n], ln_cell)  # tcs keeps ĉ then
    i, f, g, o = _activations(t, n, c_prev, bias, acts, cs, v, variant)
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
    if ln_gates is not None:
        rstd = v["rstd"][t, :n]
        dA[t, :n] = _normalize_backward(dZ_t * ln_gates[0], acts[t, :n], rstd[:, 1])
        dR[t, :n] = _normalize_backward(dZ_t * ln_gates[1], v["r_hat"][t, :n], rstd[:, 2])
    dh_prev = torch.mm(dR[t, :n], weight_hh)  # through h_in W_hh^T
    if recurrent_mask is not None:
        dh_prev *= recurrent_mask[:n]
    if zoneout_mask is not None:
        dh_prev += carry_h
    return dh_prev, dc_prev


def _activations(t: int, n: int, c_prev: Tensor, bias: Tensor | None, acts: Tensor, cs: Tensor,
                 v: dict[str, Tensor], variant: Variant) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Step t's i, f, g, o: kept in acts, or recomputed from â and r̂ (the gates' LayerNorm) as the forward did."""
    H = c_prev.shape[1]
    ln_gates, peephole = variant.get("ln_gates"), variant.get("peephole")
    if ln_gates is None:
        return acts[t, :n].split(H, dim=1)
    z = _ln_gates(acts[t, :n], v["r_hat"][t, :n], ln_gates, bias)
    zi, zf, zg, zo = z.split(H, dim=1)
    if peephole is not None:
        zi, zf = zi + peephole[0] * c_prev, zf + peephole[1] * c_prev
        zo = zo + peephole[2] * v.get("c_new", cs)[t, :n]
    return zi.sigmoid(), zf.sigmoid(), zg.tanh(), zo.sigmoid()


def _param_grads(dZ: Tensor, dA: Tensor, dR: Tensor, dY: Tensor | None, x: Tensor, c0: Tensor, acts: Tensor,
                 cs: Tensor, tcs: Tensor, xh: Tensor, v: dict[str, Tensor], bias: Tensor | None, variant: Variant
                 ) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """(dW_ih, dW_hh, db, {learned argument: its gradient}) from the steps' gradients, as sums over all steps."""
    T, _, H4 = dZ.shape
    H = H4 // 4
    dw_ih, dw_hh, db_mm = _variant_weight_grads(torch.mm, dA, dR, x, xh, v.get("h_in"), bias is not None)
    db = acts.new_empty(0)
    if bias is not None:
        db = dZ.sum((0, 1)) if db_mm is None else db_mm
    learned = {}
    if variant.get("ln_gates") is not None:
        learned["ln_gates"] = torch.stack([(dZ * acts).sum((0, 1)), (dZ * v["r_hat"]).sum((0, 1))])
    if variant.get("ln_cell") is not None:
        learned["ln_cell"] = torch.stack([(dY * tcs).sum((0, 1)), dY.sum((0, 1))])
    if variant.get("peephole") is not None:
        c_prev_all = torch.cat([c0.unsqueeze(0), cs[:-1]]) if T else cs
        learned["peephole"] = torch.stack([(dZ[..., :H] * c_prev_all).sum((0, 1)),
                                           (dZ[..., H : 2 * H] * c_prev_all).sum((0, 1)),
                                           (dZ[..., 3 * H :] * v.get("c_new", cs)).sum((0, 1))])
    return dw_ih, dw_hh, db, learned
