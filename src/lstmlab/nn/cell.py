"""The LSTM cell, gate by gate: the reference math every fast path is held equal to.

One time step, with ``W_ih`` and ``W_hh`` each stacking the four gates' weights (hence 4·H rows),
gates in PyTorch's order i, f, g, o::

    gates = x @ W_ih.T + b_ih + h @ W_hh.T + b_hh      # (B, 4H)
    i = sigmoid(gates[:, 0H:1H])   input gate: how much of the candidate to write
    f = sigmoid(gates[:, 1H:2H])   forget gate: how much of the old cell to keep
    g = tanh(gates[:, 2H:3H])      candidate: what could be written
    o = sigmoid(gates[:, 3H:4H])   output gate: how much of the cell to show
    c' = f * c + i * g
    h' = o * tanh(c')
    h' = W_hr @ h'                                      # only with proj_size (nn.LSTM's projection)

``reference_layer`` runs that step over a whole sequence; every fast path is held equal to it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn


class Gates(NamedTuple):
    """The activations of one step: each (B, H)."""

    i: Tensor
    f: Tensor
    g: Tensor
    o: Tensor
    c: Tensor
    h: Tensor


def lstm_step(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor | None = None,
    bias_hh: Tensor | None = None,
    weight_hr: Tensor | None = None,
) -> Gates:
    """One LSTM step; returns every gate so that tools can look inside. x (B, I), h (B, P), c (B, H);
    P = H, or proj_size when ``weight_hr`` (P, H) projects the hidden state."""
    gates = x @ weight_ih.T + h @ weight_hh.T  # (B, 4H): x2h and h2h of the textbook
    if bias_ih is not None:
        gates = gates + bias_ih + bias_hh
    i, f, g, o = gates.chunk(4, dim=1)  # each (B, H)
    i = torch.sigmoid(i)
    f = torch.sigmoid(f)
    g = torch.tanh(g)
    o = torch.sigmoid(o)
    c = f * c + i * g
    h = o * torch.tanh(c)
    if weight_hr is not None:
        h = h @ weight_hr.T  # (B, P)
    return Gates(i, f, g, o, c, h)


def reference_layer(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor | None,
    bias_hh: Tensor | None,
    weight_hr: Tensor | None = None,
    batch_sizes: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Run the cell over every step of x (T, B, I); the ground truth for every other backend.

    Returns (out (T, B, P), h_T, c_T). With ``batch_sizes`` (a packed batch, longest first, laid out padded) step t
    updates only the first ``batch_sizes[t]`` rows: the others keep their final state and output zeros.
    """
    sizes = None if batch_sizes is None else batch_sizes.tolist()
    outputs = []
    for t, x_t in enumerate(x.unbind(0)):  # (B, I) per step
        n = x.shape[1] if sizes is None else min(sizes[t], x.shape[1])
        step = lstm_step(x_t[:n], h[:n], c[:n], weight_ih, weight_hh, bias_ih, bias_hh, weight_hr)
        if n == x.shape[1]:
            h, c = step.h, step.c
            outputs.append(h)
        else:  # finished rows keep their state
            h, c = torch.cat([step.h, h[n:]]), torch.cat([step.c, c[n:]])
            outputs.append(torch.cat([step.h, step.h.new_zeros(x.shape[1] - n, step.h.shape[1])]))
    if not outputs:
        return x.new_zeros(0, x.shape[1], h.shape[1]), h, c
    return torch.stack(outputs), h, c  # (T, B, P), (B, P), (B, H)


class LSTMCell(nn.Module):
    """A drop-in for ``torch.nn.LSTMCell``: same parameters, ``state_dict`` keys and gate order.

    ``forget_bias`` is added to the forget gate's slice of ``bias_ih`` at initialisation; a
    positive value (1.0 is common) makes the cell remember by default early in training.
    """

    def __init__(
        self, input_size: int, hidden_size: int, bias: bool = True, forget_bias: float = 0.0
    ) -> None:
        super().__init__()
        if input_size <= 0 or hidden_size <= 0:
            raise ValueError(
                f"input_size and hidden_size must be positive, got {input_size} and {hidden_size}"
            )
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        self.forget_bias = forget_bias
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden_size, hidden_size))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(4 * hidden_size))
            self.bias_hh = nn.Parameter(torch.empty(4 * hidden_size))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """uniform(-1/sqrt(H), 1/sqrt(H)) for every parameter, as the textbook and nn.LSTM do."""
        reset_lstm_parameters(self, self.hidden_size, self.forget_bias)

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """x (B, I) or (I,); state (h, c) each (B, H) or (H,), zeros if None. Returns (h, c)."""
        unbatched = x.dim() == 1
        if unbatched:  # nn.LSTMCell accepts one unbatched sample; keep shapes explicit, never squeeze
            x = x.unsqueeze(0)
            state = None if state is None else (state[0].unsqueeze(0), state[1].unsqueeze(0))
        if state is None:
            zeros = x.new_zeros(x.size(0), self.hidden_size)
            state = (zeros, zeros)
        step = lstm_step(x, state[0], state[1], self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        if unbatched:
            return step.h.squeeze(0), step.c.squeeze(0)
        return step.h, step.c


def reset_lstm_parameters(module: nn.Module, hidden_size: int, forget_bias: float = 0.0) -> None:
    """Initialise every parameter of an LSTM module uniformly in ±1/sqrt(H), then the forget bias."""
    bound = 1.0 / math.sqrt(hidden_size)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.uniform_(-bound, bound)
            if forget_bias and name.startswith("bias_ih"):
                p[hidden_size : 2 * hidden_size] += forget_bias
