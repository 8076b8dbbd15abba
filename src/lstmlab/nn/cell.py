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

The variants (``cell=`` and the regularisers of :class:`lstmlab.LSTM`), each a few lines of ``lstm_step``:

* ``layernorm`` (Ba, Kiros & Hinton 2016, as haste implements it): the two products are normalised separately,
  ``gates = LN(x W_ih^T; γ_ih) + LN(h W_hh^T; γ_hh) + b_ih + b_hh`` and ``h' = o * tanh(LN(c'; γ_c, β_c))``; c'
  itself is not normalised. LN over the features, biased variance, eps 1e-5.
* ``peephole`` (Gers, Schraudolph & Schmidhuber 2002): ``i = σ(z_i + p_i*c)``, ``f = σ(z_f + p_f*c)`` see the
  previous c, ``o = σ(z_o + p_o*c')`` the new one.
* recurrent dropout (Gal & Ghahramani 2016): the h entering ``h W_hh^T`` is ``h * m``, one mask m per sequence
  (already scaled by 1/(1-p)); nothing in eval.
* zoneout (Krueger et al. 2017): ``c' = z_c*c + (1-z_c)*c'`` and ``h' = z_h*h + (1-z_h)*h'`` with z a 0/1 mask
  drawn per step and unit in training (1 = the unit keeps its previous value) and the probability itself in eval;
  the masks are drawn in :mod:`lstmlab.nn.masks`.

``lstm_step(..., signals={})`` also hands back each variant's own terms (what ``lstmlab gates`` draws below the
gates). ``reference_layer`` runs that step over a whole sequence; every fast path is held equal to it.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lstmlab.nn.masks import recurrent_dropout_mask, zoneout_masks
from lstmlab.nn.variants import ARGS, CELLS, LEARNED, VARIANTS, parameter_shapes

__all__ = ["CELLS", "Gates", "LSTMCell", "check_variant", "layer_norm", "lstm_step", "reference_layer"]
LN_EPS = 1e-5


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
    *,
    ln_gates: Tensor | None = None,
    ln_cell: Tensor | None = None,
    peephole: Tensor | None = None,
    recurrent_mask: Tensor | None = None,
    zoneout: tuple[Tensor, Tensor] | None = None,
    signals: dict[str, Tensor] | None = None,
) -> Gates:
    """One LSTM step; returns every gate so that tools can look inside. x (B, I), h (B, P), c (B, H);
    P = H, or proj_size when ``weight_hr`` (P, H) projects the hidden state.

    Variants (each None = off): ``ln_gates`` (2, 4H) = (γ_ih, γ_hh) and ``ln_cell`` (2, H) = (γ_c, β_c) for the
    LayerNorm cell; ``peephole`` (3, H) = (p_i, p_f, p_o); ``recurrent_mask`` (B, H) multiplies the h entering the
    recurrent product; ``zoneout`` = (z_c, z_h), each (B, H), the weight of the previous value.

    ``signals``, when a dict, receives the variants' own terms of this step, each (B, H): LayerNorm's
    normalised pre-activations ``z_i``, ``z_f``, ``z_g``, ``z_o`` (bias included) and ``c_norm`` = LN(c'; γ_c, β_c),
    what tanh reads; the peephole terms ``peep_i`` = p_i·c, ``peep_f`` = p_f·c, ``peep_o`` = p_o·c'; zoneout's
    ``zone_c`` = z_c·(c − c') and ``zone_h`` = z_h·(h − h'), how far it held each unit back from its new value."""
    gates = preactivations(x, h, weight_ih, weight_hh, bias_ih, bias_hh, ln_gates=ln_gates,
                           recurrent_mask=recurrent_mask)  # (B, 4H)
    i, f, g, o = gates.chunk(4, dim=1)  # each (B, H)
    if ln_gates is not None:
        _keep(signals, z_i=i, z_f=f, z_g=g, z_o=o)
    if peephole is not None:  # i and f peek at the previous cell
        peep_i, peep_f = peephole[0] * c, peephole[1] * c
        i, f = i + peep_i, f + peep_f
        _keep(signals, peep_i=peep_i, peep_f=peep_f)
    i, f, g = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g)
    c_new = f * c + i * g
    if peephole is not None:  # o peeks at the new cell
        peep_o = peephole[2] * c_new
        o = o + peep_o
        _keep(signals, peep_o=peep_o)
    o = torch.sigmoid(o)
    if ln_cell is None:
        h_new = o * torch.tanh(c_new)
    else:  # the cell is normalised only on its way out: c itself keeps its scale
        c_norm = layer_norm(c_new, ln_cell[0], ln_cell[1])
        h_new = o * torch.tanh(c_norm)
        _keep(signals, c_norm=c_norm)
    if weight_hr is not None:
        h_new = h_new @ weight_hr.T  # (B, P)
    if zoneout is not None:  # each unit keeps its previous value with weight z
        if signals is not None:  # only on request: training on this reference path does not pay for it
            signals.update(zone_c=zoneout[0] * (c - c_new), zone_h=zoneout[1] * (h - h_new))
        c_new = zoneout[0] * c + (1 - zoneout[0]) * c_new
        h_new = zoneout[1] * h + (1 - zoneout[1]) * h_new
    return Gates(i, f, g, o, c_new, h_new)


def preactivations(x: Tensor, h: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor | None = None,
                   bias_hh: Tensor | None = None, *, ln_gates: Tensor | None = None,
                   recurrent_mask: Tensor | None = None) -> Tensor:
    """The gates' pre-activations (B, 4H) of one step: x2h + h2h + both biases, the variants' way."""
    h_in = h if recurrent_mask is None else h * recurrent_mask  # variational recurrent dropout
    if ln_gates is None:
        gates = x @ weight_ih.T + h_in @ weight_hh.T  # (B, 4H): x2h and h2h of the textbook
    else:  # LayerNorm-LSTM: each product normalised on its own, gain only
        gates = layer_norm(x @ weight_ih.T, ln_gates[0]) + layer_norm(h_in @ weight_hh.T, ln_gates[1])
    if bias_ih is not None:
        gates = gates + bias_ih + bias_hh
    return gates


def _keep(signals: dict[str, Tensor] | None, **terms: Tensor) -> None:
    """Store a step's variant terms in ``signals`` when the caller asked for them."""
    if signals is not None:
        signals.update(terms)


def layer_norm(v: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """LayerNorm over the last axis: biased variance, eps 1e-5, gain ``weight`` and optional ``bias``."""
    return F.layer_norm(v, v.shape[-1:], weight, bias, LN_EPS)


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
    **variant: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Run the cell over every step of x (T, B, I); the ground truth for every other backend.

    Returns (out (T, B, P), h_T, c_T). With ``batch_sizes`` (a packed batch, longest first, laid out padded) step t
    updates only the first ``batch_sizes[t]`` rows: the others keep their final state and output zeros. ``variant``
    holds the variant arguments by their names in :mod:`lstmlab.nn.variants` (None = off), handed to
    :func:`lstm_step` step by step; ``zoneout_mask`` (2, T, B, H) holds (z_c, z_h) of every step.
    """
    unknown = set(variant) - {arg.name for arg in ARGS}
    if unknown:
        raise TypeError(f"reference_layer: unexpected keyword arguments {sorted(unknown)}")
    variant_args = [arg for arg in ARGS if variant.get(arg.name) is not None]
    sizes = None if batch_sizes is None else batch_sizes.tolist()
    outputs = []
    for t, x_t in enumerate(x.unbind(0)):  # (B, I) per step
        n = x.shape[1] if sizes is None else min(sizes[t], x.shape[1])
        own = {arg.step_name or arg.name: _at_step(arg.per, variant[arg.name], t, n) for arg in variant_args}
        step = lstm_step(x_t[:n], h[:n], c[:n], weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, **own)
        if n == x.shape[1]:
            h, c = step.h, step.c
            outputs.append(h)
        else:  # finished rows keep their state
            h, c = torch.cat([step.h, h[n:]]), torch.cat([step.c, c[n:]])
            outputs.append(torch.cat([step.h, step.h.new_zeros(x.shape[1] - n, step.h.shape[1])]))
    if not outputs:
        return x.new_zeros(0, x.shape[1], h.shape[1]), h, c
    return torch.stack(outputs), h, c  # (T, B, P), (B, P), (B, H)


def _at_step(per: str, value: Tensor, t: int, n: int) -> Tensor | tuple[Tensor, Tensor]:
    """What step t of a layer with n live rows reads of a variant argument (see :class:`~lstmlab.nn.variants.Arg`)."""
    if per == "row":
        return value[:n]
    if per == "step":
        return value[0, t, :n], value[1, t, :n]
    return value


def check_variant(cell: str, zoneout: float | tuple[float, float], recurrent_dropout: float,
                  proj_size: int = 0) -> tuple[float, float]:
    """Validate the variant arguments as nn.LSTM validates ``dropout``; returns zoneout as (z_c, z_h)."""
    if not isinstance(cell, str) or cell not in CELLS:
        raise ValueError(f"cell should be one of {', '.join(repr(n) for n in CELLS)}, got {cell!r}")

    def probability(name: str, p: object, top_open: bool) -> float:
        if not isinstance(p, numbers.Number) or isinstance(p, bool) or not (0 <= p < 1 if top_open else 0 <= p <= 1):
            raise ValueError(f"{name} should be a number in range [0, 1{')' if top_open else ']'} representing the "
                             f"probability of {'an element being zeroed' if top_open else 'a unit keeping its value'}"
                             f", got {p!r}")
        return float(p)

    if isinstance(zoneout, (tuple, list)):
        if len(zoneout) != 2:
            raise ValueError(f"zoneout should be a number or a pair (z_c, z_h), got {zoneout!r}")
        pair = (probability("zoneout", zoneout[0], False), probability("zoneout", zoneout[1], False))
    else:
        z = probability("zoneout", zoneout, False)
        pair = (z, z)
    p = probability("recurrent_dropout", recurrent_dropout, True)  # p = 1 would scale by 1/0
    if proj_size and (cell != "lstm" or any(pair) or p):
        raise ValueError("proj_size > 0 is not supported with cell variants, zoneout or recurrent_dropout")
    return pair


class LSTMCell(nn.Module):
    """A drop-in for ``torch.nn.LSTMCell``: same parameters, ``state_dict`` keys and gate order.

    ``forget_bias`` is added to the forget gate's slice of ``bias_ih`` at initialisation; a
    positive value (1.0 is common) makes the cell remember by default early in training.

    ``cell``, ``zoneout`` and ``recurrent_dropout`` choose a variant as on :class:`lstmlab.LSTM`. The extra
    parameters are ``ln_ih_weight``, ``ln_hh_weight`` (4H), ``ln_c_weight``, ``ln_c_bias`` (H) for ``layernorm``
    and ``weight_ci``, ``weight_cf``, ``weight_co`` (H, zeros at init) for ``peephole``. A cell sees one step, so
    recurrent dropout draws a new mask per call unless ``recurrent_mask`` is passed: for the variational form
    (one mask per sequence) draw it once with :meth:`draw_recurrent_mask` and pass it at every step.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        forget_bias: float = 0.0,
        *,
        cell: str = "lstm",
        zoneout: float | tuple[float, float] = 0.0,
        recurrent_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if input_size <= 0 or hidden_size <= 0:
            raise ValueError(
                f"input_size and hidden_size must be positive, got {input_size} and {hidden_size}"
            )
        self.zoneout = check_variant(cell, zoneout, recurrent_dropout)
        self.cell = cell
        self.recurrent_dropout = float(recurrent_dropout)
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
        for name, size in variant_parameter_shapes(cell, hidden_size):
            self.register_parameter(name, nn.Parameter(torch.empty(size)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """uniform(-1/sqrt(H), 1/sqrt(H)) for every standard parameter, as the textbook and nn.LSTM do; LayerNorm
        gains 1, biases 0; peepholes 0."""
        reset_lstm_parameters(self, self.hidden_size, self.forget_bias)
        reset_variant_parameters(self)

    def draw_recurrent_mask(self, batch_size: int) -> Tensor | None:
        """A recurrent-dropout mask (batch_size, H) to pass at every step of one sequence (None when off)."""
        if not self.recurrent_dropout:
            return None
        return recurrent_dropout_mask(self.weight_hh.new_empty(batch_size, self.hidden_size), self.recurrent_dropout)

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor] | None = None, *,
                recurrent_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x (B, I) or (I,); state (h, c) each (B, H) or (H,), zeros if None. Returns (h, c)."""
        unbatched = x.dim() == 1
        if unbatched:  # nn.LSTMCell accepts one unbatched sample; keep shapes explicit, never squeeze
            x = x.unsqueeze(0)
            state = None if state is None else (state[0].unsqueeze(0), state[1].unsqueeze(0))
            recurrent_mask = None if recurrent_mask is None else recurrent_mask.view(1, -1)
        if state is None:
            zeros = x.new_zeros(x.size(0), self.hidden_size)
            state = (zeros, zeros)
        if not self.training or not self.recurrent_dropout:
            recurrent_mask = None  # eval: recurrent dropout does nothing
        elif recurrent_mask is None:
            recurrent_mask = recurrent_dropout_mask(state[0], self.recurrent_dropout)
        zoneout = None
        if any(self.zoneout):
            masks = zoneout_masks(state[1], self.zoneout, 1, self.training)
            zoneout = (masks[0, 0], masks[1, 0])
        step = lstm_step(x, state[0], state[1], self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh,
                         recurrent_mask=recurrent_mask, zoneout=zoneout, **variant_tensors(self, ""))
        if unbatched:
            return step.h.squeeze(0), step.c.squeeze(0)
        return step.h, step.c

    def extra_repr(self) -> str:
        return variant_repr(self.cell, zoneout=self.zoneout, recurrent_dropout=self.recurrent_dropout)


def variant_parameter_shapes(cell: str, hidden_size: int, suffix: str = "") -> list[tuple[str, int]]:
    """The extra parameters a cell variant adds (name, size), in registration order (its table entry's)."""
    return parameter_shapes(cell, hidden_size, suffix)


_INITS = {p.name: p.init for v in VARIANTS for p in v.params}
_LAYER_SUFFIX = re.compile(r"_l\d+(_reverse)?$")  # nn.LSTM's per-layer names: weight_ci_l0, weight_ci_l1_reverse


def reset_variant_parameters(module: nn.Module) -> None:
    """Every variant parameter to its table entry's value: LayerNorm gains 1 and biases 0 (Ba et al.); peepholes
    0, so that a fresh peephole cell computes exactly the plain LSTM of its standard weights (nn.LSTM's weights
    load into it unchanged) and learns its peepholes from there (their gradient, dz * c, is not zero)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            init = _INITS.get(_LAYER_SUFFIX.sub("", name))
            if init is not None:
                p.fill_(init)


def variant_tensors(module: nn.Module, suffix: str) -> dict[str, Tensor | None]:
    """Every learned variant argument (``peephole``, ``ln_gates``, ``ln_cell``...) stacked from a module's
    parameters, None where the module has none."""
    def stack(names: list[str]) -> Tensor | None:
        params = [getattr(module, name + suffix, None) for name in names]
        return None if params[0] is None else torch.stack(params)

    return {arg.name: stack([p.name for p in arg.params]) for arg in LEARNED}


def variant_repr(cell: str, **regularisers: float | tuple[float, float]) -> str:
    """The variant part of a module's repr: ``cell='peephole', zoneout=0.1, recurrent_dropout=0.2`` (what is on)."""
    parts = [] if cell == "lstm" else [f"cell={cell!r}"]
    for v in VARIANTS:
        value = regularisers.get(v.name) if v.kind == "regulariser" else None
        if isinstance(value, tuple) and len(set(value)) == 1:
            value = value[0]  # a pair of equal probabilities reads as one
        if value:
            parts.append(f"{v.name}={value}")
    return ", ".join(parts)


def reset_lstm_parameters(module: nn.Module, hidden_size: int, forget_bias: float = 0.0) -> None:
    """Initialise every parameter of an LSTM module uniformly in ±1/sqrt(H), then the forget bias."""
    bound = 1.0 / math.sqrt(hidden_size)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.uniform_(-bound, bound)
            if forget_bias and name.startswith("bias_ih"):
                p[hidden_size : 2 * hidden_size] += forget_bias
