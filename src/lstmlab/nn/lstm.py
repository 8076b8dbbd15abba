"""``lstmlab.LSTM``: ``torch.nn.LSTM``'s interface and checks, with the time loop run by lstmlab's backends.

The class is built on ``nn.RNNBase`` in LSTM mode, exactly as ``nn.LSTM`` is, and borrows nn.LSTM's own input
checks: the constructor, its argument checks, parameter names (``weight_ih_l0``, ``weight_hr_l0_reverse``...),
``state_dict``, ``proj_size``, ``flatten_parameters``, ``all_weights``, ``repr`` and the forward checks are
PyTorch's. It is deliberately not a subclass of ``nn.LSTM``: TorchDynamo refuses to trace any ``nn.LSTM``
instance (``torch._dynamo.config.allow_rnn`` is off by default), which would make ``torch.compile`` break the
graph at every layer. Each layer and direction runs on a backend (``BACKENDS``) that must give the same numbers
as ``reference``:

* ``reference``: the textbook cell of :mod:`lstmlab.nn.cell`, step by step, differentiated by autograd;
* ``fused``: :mod:`lstmlab.nn.fused`, one registered op per layer and direction (the default on a CPU);
* ``torch``: PyTorch's own kernel (oneDNN / cuDNN), the default on CUDA. ONNX export always takes this path, so
  exported graphs hold the standard ONNX ``LSTM`` operator.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from lstmlab.nn.cell import (
    check_variant,
    reference_layer,
    reset_variant_parameters,
    variant_parameter_shapes,
    variant_repr,
    variant_tensors,
)
from lstmlab.nn.masks import recurrent_dropout_mask, zoneout_masks

# (x (T, B, I), h0 (B, P), c0 (B, H), w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes) -> (out (T, B, P), h_T, c_T)
LayerFn = Callable[..., tuple[Tensor, Tensor, Tensor]]

BACKENDS = ("auto", "reference", "fused", "torch")


def _layer_backends() -> dict[str, LayerFn]:
    """Per-layer backends, looked up at call time so that the fused module loads lazily."""
    from lstmlab.nn.fused import fused_layer

    return {"reference": reference_layer, "fused": fused_layer}


def bidirectional_layer(*args: object) -> tuple[Tensor, Tensor, Tensor] | None:
    """:func:`lstmlab.nn.fused.bidirectional_layer` (both directions of a layer in one call, or None), loaded lazily."""
    from lstmlab.nn.fused import bidirectional_layer as both

    return both(*args)


def resolve_backend(name: str, device: torch.device | None = None) -> str:
    """Turn ``auto`` into the fastest backend for this device; check that a named one exists."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        return "torch" if device is not None and device.type == "cuda" else "fused"  # fused loops are CPU code
    return name


class LSTM(nn.RNNBase):
    """A drop-in for ``torch.nn.LSTM`` whose time loop runs on lstmlab's gate-level backends.

    Same arguments as ``nn.LSTM`` plus, keyword-only, ``forget_bias`` (added to the forget gate's slice of every
    ``bias_ih`` at initialisation; 1.0 makes the cell remember by default early in training) and ``backend``.
    Returns ``(output, (h_n, c_n))`` exactly as ``nn.LSTM``, PackedSequence in, PackedSequence out.

    Variants (keyword-only; equations in :mod:`lstmlab.nn.cell`): ``cell="peephole"`` adds ``weight_ci_l0``,
    ``weight_cf_l0``, ``weight_co_l0`` (H each, zeros at init: a fresh peephole LSTM equals the plain one);
    ``cell="layernorm"`` adds ``ln_ih_weight_l0``, ``ln_hh_weight_l0`` (4H, ones), ``ln_c_weight_l0`` (H, ones) and
    ``ln_c_bias_l0`` (H, zeros), all with ``_reverse`` twins. ``zoneout`` (a probability, or a pair (z_c, z_h)) and
    ``recurrent_dropout`` (one mask per sequence on the h entering the recurrent product) act in training; in eval
    zoneout takes its expectation and recurrent dropout does nothing. The standard parameters keep nn.LSTM's names,
    so they load from and into nn.LSTM with ``load_state_dict(..., strict=False)``. Variants run on the
    ``reference`` and ``fused`` backends (not ``torch``) and do not combine with ``proj_size``.
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
        proj_size: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        forget_bias: float = 0.0,
        backend: str = "auto",
        cell: str = "lstm",
        zoneout: float | tuple[float, float] = 0.0,
        recurrent_dropout: float = 0.0,
    ) -> None:
        resolve_backend(backend)
        zoneout_pair = check_variant(cell, zoneout, recurrent_dropout, proj_size if isinstance(proj_size, int) else 0)
        if backend == "torch" and (cell != "lstm" or any(zoneout_pair) or recurrent_dropout):
            raise ValueError("the torch backend (nn.LSTM's kernel) runs only the plain cell: use backend='fused' or "
                             "'reference' with cell variants, zoneout or recurrent_dropout")
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         proj_size, device, dtype)
        self.forget_bias = forget_bias
        self.backend = backend
        self.cell = cell
        self.zoneout = zoneout_pair
        self.recurrent_dropout = float(recurrent_dropout)
        ref = self.weight_ih_l0  # the extra parameters follow the standard ones, on their device and dtype
        for layer in range(num_layers):
            for direction in range(self.num_directions):
                suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                for name, size in variant_parameter_shapes(cell, hidden_size, suffix):
                    self.register_parameter(name, nn.Parameter(ref.new_empty(size)))
        reset_variant_parameters(self)
        if forget_bias:
            self._add_forget_bias()

    @property
    def is_variant(self) -> bool:
        """Whether anything but nn.LSTM's plain cell runs (a cell variant, zoneout or recurrent dropout)."""
        return getattr(self, "cell", "lstm") != "lstm" or any(getattr(self, "zoneout", (0.0, 0.0))) or \
            bool(getattr(self, "recurrent_dropout", 0.0))

    # nn.LSTM's own LSTM-specific checks (a cell state beside h, proj_size), the same functions nn.LSTM runs.
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def reset_parameters(self) -> None:
        """uniform(±1/sqrt(H)) as nn.LSTM (same draws for the same seed), then ``forget_bias``."""
        super().reset_parameters()
        reset_variant_parameters(self)
        if getattr(self, "forget_bias", 0.0):  # nn.LSTM's constructor calls this before forget_bias is set
            self._add_forget_bias()

    def _add_forget_bias(self) -> None:
        H = self.hidden_size
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.startswith("bias_ih"):
                    p[H : 2 * H] += self.forget_bias

    def layer_weights(self, layer: int, direction: int) -> tuple[Tensor | None, ...]:
        """(weight_ih, weight_hh, bias_ih, bias_hh, weight_hr) of one layer and direction (1 = reverse); the
        biases are None without ``bias``, weight_hr without ``proj_size``."""
        suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
        names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
        return tuple(getattr(self, name + suffix, None) for name in names)

    def variant_weights(self, layer: int, direction: int) -> dict[str, Tensor | None]:
        """``ln_gates`` (2, 4H), ``ln_cell`` (2, H) and ``peephole`` (3, H) of one layer and direction, stacked from
        the extra parameters (None when the cell has none)."""
        return variant_tensors(self, f"_l{layer}" + ("_reverse" if direction == 1 else ""))

    def extra_repr(self) -> str:
        variant = variant_repr(self.cell, zoneout=self.zoneout, recurrent_dropout=self.recurrent_dropout)
        return super().extra_repr() + f", backend={self.backend!r}" + (f", {variant}" if variant else "")

    def forward(self, input: Tensor | PackedSequence, hx: tuple[Tensor, Tensor] | None = None):  # noqa: ANN201
        """As ``nn.LSTM.forward``: input (T, B, I), (B, T, I) if batch_first, (T, I) unbatched, or packed."""
        data = input.data if isinstance(input, PackedSequence) else input
        backend = resolve_backend(self.backend, data.device)
        if torch.onnx.is_in_onnx_export() and self.proj_size > 0:
            raise RuntimeError("ONNX's LSTM operator has no projection: export an LSTM with proj_size=0")
        if self.is_variant:
            if torch.onnx.is_in_onnx_export():
                raise RuntimeError("ONNX's LSTM operator has no cell variants, zoneout or recurrent dropout")
            if backend == "torch":  # auto on CUDA: nn.LSTM's kernel cannot run a variant
                backend = "reference"
        if backend == "torch" or torch.onnx.is_in_onnx_export():
            return nn.LSTM.forward(self, input, hx)  # ONNX: PyTorch's exporters map aten::lstm to ONNX's LSTM
        x, hx, batch_sizes, sorted_indices, unsorted_indices, unbatched = self._prepare(input, hx)
        out, h_n, c_n = self._run_layers(x, hx, batch_sizes, _layer_backends()[backend])
        hidden = self.permute_hidden((h_n, c_n), unsorted_indices)
        if batch_sizes is not None:
            return PackedSequence(out, batch_sizes, sorted_indices, unsorted_indices), hidden
        if self.batch_first:
            out = out.transpose(0, 1)
        if unbatched:
            return out.squeeze(0 if self.batch_first else 1), (hidden[0].squeeze(1), hidden[1].squeeze(1))
        return out, hidden

    def _prepare(self, input: Tensor | PackedSequence, hx: tuple[Tensor, Tensor] | None) -> tuple:
        """nn.LSTM's input handling: (x, (h0, c0), batch_sizes, sorted_indices, unsorted_indices, unbatched)."""
        batch_sizes = sorted_indices = unsorted_indices = None
        unbatched = False
        if isinstance(input, PackedSequence):
            x, batch_sizes, sorted_indices, unsorted_indices = input
            max_batch = int(batch_sizes[0])
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
            unbatched = input.dim() == 2
            x = input.unsqueeze(0 if self.batch_first else 1) if unbatched else input
            max_batch = x.size(0 if self.batch_first else 1)
        if hx is None:
            states = self.num_layers * self.num_directions
            real_hidden = self.proj_size if self.proj_size > 0 else self.hidden_size
            hx = (torch.zeros(states, max_batch, real_hidden, dtype=x.dtype, device=x.device),
                  torch.zeros(states, max_batch, self.hidden_size, dtype=x.dtype, device=x.device))
        else:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2 or not all(isinstance(t, Tensor) for t in hx):
                raise TypeError(  # nn.LSTM fails here with an IndexError or a misleading dimension message
                    "LSTM: hx must be a tuple (h_0, c_0) of two tensors, got "
                    f"{type(hx).__name__}; pass (h_0, c_0), e.g. the (h_n, c_n) a previous call returned"
                )
            want = 2 if unbatched else 3
            if hx[0].dim() != want or hx[1].dim() != want:
                states = self.num_layers * self.num_directions
                h_size = self.proj_size or self.hidden_size
                batch = () if unbatched else (max_batch,)
                raise RuntimeError(
                    f"For {'unbatched 2-D' if unbatched else 'batched 3-D'} input, hx and cx should also be "
                    f"{want}-D, shaped {(states, *batch, h_size)} and {(states, *batch, self.hidden_size)}, but got "
                    f"{tuple(hx[0].shape)} and {tuple(hx[1].shape)}"
                    + ("; drop the batch dimension of hx, or add one to the input" if unbatched else "")
                )
            if unbatched:
                hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        self.check_forward_args(x, hx, batch_sizes)
        if batch_sizes is None and x.size(1 if self.batch_first else 0) == 0:  # nn.LSTM's check, in its words
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        if batch_sizes is None and self.batch_first:
            x = x.transpose(0, 1)  # (T, B, I) from here on
        hx = self.permute_hidden(hx, sorted_indices)
        return x, hx, batch_sizes, sorted_indices, unsorted_indices, unbatched

    def _run_layers(self, x: Tensor, hx: tuple[Tensor, Tensor], batch_sizes: Tensor | None,
                    layer_fn: LayerFn) -> tuple[Tensor, Tensor, Tensor]:
        """Every layer and direction over x (T, B, I), or over packed data (N, I) laid out padded on the way."""
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):  # as nn.LSTM under autocast: compute in the autocast dtype
            dtype = torch.get_autocast_dtype(device_type)
            with torch.autocast(device_type, enabled=False):
                x, hx = x.to(dtype), (hx[0].to(dtype), hx[1].to(dtype))
                weights = [[w if w is None else w.to(dtype) for w in self.layer_weights(layer, d)]
                           for layer in range(self.num_layers) for d in range(self.num_directions)]
                extras = [{k: v if v is None else v.to(dtype) for k, v in self.variant_weights(layer, d).items()}
                          for layer in range(self.num_layers) for d in range(self.num_directions)]
                return self._layers(x, hx, batch_sizes, layer_fn, weights, extras)
        weights = [list(self.layer_weights(layer, d))
                   for layer in range(self.num_layers) for d in range(self.num_directions)]
        extras = [self.variant_weights(layer, d) if self.cell != "lstm" else {}
                  for layer in range(self.num_layers) for d in range(self.num_directions)]
        return self._layers(x, hx, batch_sizes, layer_fn, weights, extras)

    def _layers(self, x: Tensor, hx: tuple[Tensor, Tensor], batch_sizes: Tensor | None, layer_fn: LayerFn,
                weights: list[list[Tensor | None]], extras: list[dict[str, Tensor | None]]
                ) -> tuple[Tensor, Tensor, Tensor]:
        if batch_sizes is not None:
            T, B = batch_sizes.numel(), hx[0].shape[1]
            index, reverse = _packed_layout(batch_sizes, B, x.device)
            x = x.new_zeros(T * B, x.shape[1]).index_copy(0, index, x).view(T, B, -1)  # (T, B, I), zero padded
        h_n, c_n = [], []
        variant = self.is_variant
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout > 0 and self.training:
                x = F.dropout(x, self.dropout, training=True)  # between layers, as nn.LSTM
            outs = []
            k = layer * self.num_directions
            both = None if variant or batch_sizes is not None or self.num_directions != 2 else \
                bidirectional_layer(layer_fn, x, hx[0][k : k + 2], hx[1][k : k + 2], weights[k], weights[k + 1])
            if both is not None:  # one call runs both directions (lstmlab.nn.infer)
                x, h, c = both
                h_n.extend(h.unbind(0))
                c_n.extend(c.unbind(0))
                continue
            for direction in range(self.num_directions):
                k = layer * self.num_directions + direction
                seq = x if direction == 0 else _reversed(x, reverse if batch_sizes is not None else None)
                extra = {}
                if variant:  # the plain cell passes nothing more: its call stays as it was
                    extra = {name: v for name, v in extras[k].items() if v is not None}
                    extra.update(self._masks(hx[1][k], x.shape[0]))
                out, h, c = layer_fn(seq, hx[0][k], hx[1][k], *weights[k], batch_sizes=batch_sizes, **extra)
                outs.append(out if direction == 0 else _reversed(out, reverse if batch_sizes is not None else None))
                h_n.append(h)
                c_n.append(c)
            x = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]  # (T, B, D*P)
        if batch_sizes is not None:
            x = x.reshape(-1, x.shape[2]).index_select(0, index)  # back to packed rows
        return x, torch.stack(h_n), torch.stack(c_n)


    def _masks(self, c0: Tensor, steps: int) -> dict[str, Tensor]:
        """One layer and direction's random masks, drawn here (outside the step loops) from torch's generator, in
        a fixed order: the recurrent-dropout mask, then the seed of the zoneout masks of every step."""
        masks = {}
        if self.recurrent_dropout and self.training:
            masks["recurrent_mask"] = recurrent_dropout_mask(c0, self.recurrent_dropout)
        if any(self.zoneout):
            masks["zoneout_mask"] = zoneout_masks(c0, self.zoneout, steps, self.training)
        return masks


def _packed_layout(batch_sizes: Tensor, B: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """For packed data (rows of step 0, then step 1, ...): each packed row's index in a padded (T*B) layout, and the
    (T, B) time index that reverses every row within its own length (padding stays in place)."""
    T = batch_sizes.numel()
    live = torch.arange(B).unsqueeze(0) < batch_sizes.unsqueeze(1)  # (T, B)
    index = live.flatten().nonzero().squeeze(1).to(device)
    lengths = live.sum(0)  # (B,)
    t = torch.arange(T).unsqueeze(1)
    reverse = torch.where(t < lengths, lengths - 1 - t, t).to(device)  # (T, B)
    return index, reverse


def _reversed(seq: Tensor, reverse: Tensor | None) -> Tensor:
    """seq (T, B, N) read backwards in time: whole (plain) or each row within its length (packed)."""
    if reverse is None:
        return seq.flip(0)
    return seq.gather(0, reverse.unsqueeze(2).expand(-1, -1, seq.shape[2]))
