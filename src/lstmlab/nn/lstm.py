"""Stacked, optionally bidirectional LSTM layers with the interface of ``torch.nn.LSTM``.

Parameter names, shapes, ``state_dict`` keys, inputs and outputs are those of ``nn.LSTM``, so
weights load both ways. The time loop can run on several backends (``BACKENDS``); each takes one
layer in one direction and must give the same numbers as ``reference``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lstmlab.nn.cell import lstm_step, reset_lstm_parameters

# (x (T, B, I), h0 (B, H), c0 (B, H), w_ih, w_hh, b_ih, b_hh) -> (out (T, B, H), h_T, c_T)
LayerFn = Callable[..., tuple[Tensor, Tensor, Tensor]]


def reference_layer(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor | None,
    bias_hh: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Run the textbook cell over every step of x (T, B, I); the ground truth for other backends."""
    outputs = []
    for x_t in x.unbind(0):  # (B, I) per step
        step = lstm_step(x_t, h, c, weight_ih, weight_hh, bias_ih, bias_hh)
        h, c = step.h, step.c
        outputs.append(h)
    return torch.stack(outputs), h, c  # (T, B, H), (B, H), (B, H)


def _layer_backends() -> dict[str, LayerFn]:
    """Per-layer backends, looked up at call time so optional modules load lazily."""
    backends: dict[str, LayerFn] = {"reference": reference_layer}
    try:
        from lstmlab.nn.fused import fused_layer
    except ImportError:  # the fused backend is optional until it is built
        pass
    else:
        backends["fused"] = fused_layer
    return backends


BACKENDS = ("auto", "reference", "fused", "torch")


def resolve_backend(name: str, device: torch.device | None = None) -> str:
    """Turn ``auto`` into the fastest backend available here; check that a named one exists."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        if device is not None and device.type == "cuda":
            return "torch"  # cuDNN; the fused step loops are CPU code
        return "fused" if "fused" in _layer_backends() else "reference"
    if name != "torch" and name not in _layer_backends():
        raise ValueError(f"backend {name!r} is not available in this installation")
    return name


class LSTM(nn.Module):
    """A drop-in for ``torch.nn.LSTM`` (without ``proj_size``) built from the gate-level cell.

    Returns ``(output, (h_n, c_n))`` with ``output`` (T, B, D*H) or (B, T, D*H) when
    ``batch_first``, and ``h_n``, ``c_n`` (num_layers*D, B, H), D = 2 if bidirectional else 1.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        *,
        forget_bias: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if input_size <= 0 or hidden_size <= 0 or num_layers <= 0:
            raise ValueError(
                "input_size, hidden_size and num_layers must be positive, got "
                f"{input_size}, {hidden_size}, {num_layers}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        resolve_backend(backend)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = dropout
        self.bidirectional = bidirectional
        self.forget_bias = forget_bias
        self.backend = backend
        self.num_directions = 2 if bidirectional else 1
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else hidden_size * self.num_directions
            for suffix in self._suffixes(layer):
                setattr(self, f"weight_ih{suffix}", nn.Parameter(torch.empty(4 * hidden_size, layer_input)))
                setattr(self, f"weight_hh{suffix}", nn.Parameter(torch.empty(4 * hidden_size, hidden_size)))
                if bias:
                    setattr(self, f"bias_ih{suffix}", nn.Parameter(torch.empty(4 * hidden_size)))
                    setattr(self, f"bias_hh{suffix}", nn.Parameter(torch.empty(4 * hidden_size)))
        self.reset_parameters()

    def _suffixes(self, layer: int) -> list[str]:
        return [f"_l{layer}"] + ([f"_l{layer}_reverse"] if self.bidirectional else [])

    def reset_parameters(self) -> None:
        """uniform(±1/sqrt(H)) as nn.LSTM, then ``forget_bias`` on the forget gate of bias_ih."""
        reset_lstm_parameters(self, self.hidden_size, self.forget_bias)

    def layer_weights(self, layer: int, direction: int) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """(weight_ih, weight_hh, bias_ih, bias_hh) of one layer and direction (1 = reverse)."""
        suffix = self._suffixes(layer)[direction]
        if self.bias:
            biases = (getattr(self, f"bias_ih{suffix}"), getattr(self, f"bias_hh{suffix}"))
        else:
            biases = (None, None)
        return getattr(self, f"weight_ih{suffix}"), getattr(self, f"weight_hh{suffix}"), *biases

    def extra_repr(self) -> str:
        return (
            f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
            f"batch_first={self.batch_first}, dropout={self.dropout}, "
            f"bidirectional={self.bidirectional}, backend={self.backend!r}"
        )

    def forward(
        self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """input (T, B, I), (B, T, I) if batch_first, or unbatched (T, I); hx (h_0, c_0) or zeros."""
        unbatched = input.dim() == 2
        if input.dim() not in (2, 3) or input.size(-1) != self.input_size:
            raise ValueError(
                f"expected input of shape (T, B, {self.input_size}) or (T, {self.input_size}), "
                f"got {tuple(input.shape)}"
            )
        if unbatched:
            input = input.unsqueeze(1)
            hx = None if hx is None else (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        elif self.batch_first:
            input = input.transpose(0, 1)
        x = input  # (T, B, I)
        states = self.num_layers * self.num_directions
        if hx is None:
            zeros = x.new_zeros(states, x.size(1), self.hidden_size)
            hx = (zeros, zeros)
        elif hx[0].shape != (states, x.size(1), self.hidden_size) or hx[1].shape != hx[0].shape:
            raise ValueError(
                f"expected h_0 and c_0 of shape {(states, x.size(1), self.hidden_size)}, "
                f"got {tuple(hx[0].shape)} and {tuple(hx[1].shape)}"
            )

        backend = resolve_backend(self.backend, x.device)
        if backend == "torch":
            output, h_n, c_n = self._forward_torch(x, hx)
        else:
            output, h_n, c_n = self._forward_layers(x, hx, _layer_backends()[backend])

        if unbatched:
            return output.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        if self.batch_first:
            output = output.transpose(0, 1)
        return output, (h_n, c_n)

    def _forward_layers(
        self, x: Tensor, hx: tuple[Tensor, Tensor], layer_fn: LayerFn
    ) -> tuple[Tensor, Tensor, Tensor]:
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout > 0 and self.training:
                x = F.dropout(x, self.dropout, training=True)  # between layers, as nn.LSTM
            outs = []
            for direction in range(self.num_directions):
                k = layer * self.num_directions + direction
                seq = x.flip(0) if direction == 1 else x  # the reverse direction reads from the end
                out, h, c = layer_fn(seq, hx[0][k], hx[1][k], *self.layer_weights(layer, direction))
                outs.append(out.flip(0) if direction == 1 else out)
                h_n.append(h)
                c_n.append(c)
            x = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]  # (T, B, D*H)
        return x, torch.stack(h_n), torch.stack(c_n)

    def _forward_torch(self, x: Tensor, hx: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Delegate to PyTorch's own LSTM kernel (oneDNN or cuDNN), for comparison."""
        weights = [w for layer in range(self.num_layers) for d in range(self.num_directions)
                   for w in self.layer_weights(layer, d) if w is not None]
        output, h_n, c_n = torch.lstm(
            x, hx, weights, self.bias, self.num_layers, self.dropout, self.training,
            self.bidirectional, False,
        )
        return output, h_n, c_n
