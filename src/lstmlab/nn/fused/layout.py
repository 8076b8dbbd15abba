"""How the fused loops lay out a layer: the stacked weights [W_hh | W_ih | b], the rows [h | x | 1] each step's matmul
reads, and a packed batch's live rows."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


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
