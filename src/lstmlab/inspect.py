"""Look inside the LSTM: record every gate of every layer at every time step.

``record`` re-runs a ``SequenceClassifier`` through the reference gate math (``lstmlab.nn.cell.lstm_step``)
with the model's own weights, whatever backend the model itself uses, and keeps what the fast
backends never materialise: i, f, g, o, c and h per layer, direction and step, plus the class
probabilities the head would give after each step.

Per-step probabilities, ``probs[:, t]``, are defined as *the model's prediction if the sequence ended
after step t*, i.e. ``softmax(model(x[:, : t + 1]))``:

- unidirectional: that is exactly ``softmax(head(h_t))`` of the last layer, computed in one pass;
- bidirectional: the reverse direction would read a different sequence for every prefix, so each
  prefix is re-run through the whole stack (O(T^2) steps). This is done for T <= ``MAX_PREFIX_STEPS``
  (the rows view, T = 28); for longer sequences ``probs`` is None and ``probs_note`` says why.

Dropout is never applied: a recording shows the model as it predicts (eval mode).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lstmlab.errors import LstmlabError
from lstmlab.model import SequenceClassifier
from lstmlab.nn.cell import lstm_step

GATE_NAMES = ("i", "f", "g", "o", "c", "h")
MAX_PREFIX_STEPS = 64  # bidirectional per-step probs cost O(T^2) steps: fine for rows (28), not pixels (784)


@dataclass
class LayerRecord:
    """Activations of one layer in one direction, each (B, T, H), indexed by input position.

    For the reverse direction index t holds the step that read x_t (coming from the end), so it lines
    up with ``nn.LSTM``'s output: ``h[:, t]`` is the reverse half of the output at t.
    """

    layer: int
    direction: int  # 0 forward, 1 reverse
    i: Tensor
    f: Tensor
    g: Tensor
    o: Tensor
    c: Tensor
    h: Tensor

    def __getitem__(self, name: str) -> Tensor:
        """``record["f"]``: the activation by gate name (one of i, f, g, o, c, h)."""
        if name not in GATE_NAMES:
            raise KeyError(f"unknown gate {name!r}; one of {', '.join(GATE_NAMES)}")
        return getattr(self, name)

    @property
    def final_h(self) -> Tensor:
        """The state this direction ends in (B, H): t = T-1 forward, t = 0 reverse (as ``h_n``)."""
        return self.h[:, -1] if self.direction == 0 else self.h[:, 0]

    @property
    def final_c(self) -> Tensor:
        """The cell state this direction ends in (B, H), as ``c_n``."""
        return self.c[:, -1] if self.direction == 0 else self.c[:, 0]


@dataclass
class Recording:
    """Everything ``record`` saw: ``layers`` in ``h_n`` order (layer-major, forward before reverse)."""

    layers: list[LayerRecord]
    logits: Tensor  # (B, C): the model's output for the whole sequence
    probs: Tensor | None  # (B, T, C): the prediction if the sequence ended after each step
    probs_note: str  # how probs was computed, or why it is None
    num_layers: int
    num_directions: int

    def get(self, layer: int = -1, direction: int = 0) -> LayerRecord:
        """One layer's record; ``layer`` may be negative, ``direction`` 0 (forward) or 1 (reverse)."""
        if not -self.num_layers <= layer < self.num_layers:
            raise LstmlabError(f"layer {layer} does not exist; the model has {self.num_layers} layer(s)")
        if direction not in range(self.num_directions):
            raise LstmlabError("direction 1 (reverse) exists only for a bidirectional model")
        return self.layers[(layer % self.num_layers) * self.num_directions + direction]


def _run_layers(model: SequenceClassifier, x: Tensor) -> tuple[list[LayerRecord], Tensor, Tensor]:
    """Reference forward pass of the stack over x (B, T, I); returns records, last-layer output, logits."""
    lstm = model.lstm
    batch = x.size(0)
    seq = x.transpose(0, 1)  # (T, B, I)
    records: list[LayerRecord] = []
    for layer in range(lstm.num_layers):
        outs = []
        for direction in range(lstm.num_directions):
            w_ih, w_hh, b_ih, b_hh, w_hr = (None if w is None else w.detach()
                                            for w in lstm.layer_weights(layer, direction))
            # A variant's own terms, in eval mode: no recurrent dropout, zoneout's expectation.
            variant = {k: None if v is None else v.detach() for k, v in lstm.variant_weights(layer, direction).items()}
            if any(lstm.zoneout):
                variant["zoneout"] = tuple(torch.full((batch, lstm.hidden_size), z, dtype=seq.dtype,
                                                      device=seq.device) for z in lstm.zoneout)
            h = seq.new_zeros(batch, lstm.hidden_size)
            c = seq.new_zeros(batch, lstm.hidden_size)
            steps = []
            order = range(seq.size(0) - 1, -1, -1) if direction == 1 else range(seq.size(0))
            for t in order:
                gates = lstm_step(seq[t], h, c, w_ih, w_hh, b_ih, b_hh, w_hr, **variant)
                h, c = gates.h, gates.c
                steps.append(gates)
            if direction == 1:
                steps.reverse()  # index by input position, as nn.LSTM's output is
            stacked = {n: torch.stack([getattr(s, n) for s in steps], dim=1) for n in GATE_NAMES}  # each (B, T, H)
            records.append(LayerRecord(layer=layer, direction=direction, **stacked))
            outs.append(stacked["h"].transpose(0, 1))  # (T, B, H)
        seq = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]  # (T, B, D*H): next layer's input
    last = records[-lstm.num_directions :]
    final = torch.cat([r.final_h for r in last], dim=1)  # (B, D*H), as the model's head reads it
    logits = model.head.weight.detach() @ final.T
    if model.head.bias is not None:
        logits = logits + model.head.bias.detach()[:, None]
    return records, seq.transpose(0, 1), logits.T  # logits (B, C)


@torch.no_grad()
def record(model: SequenceClassifier, x: Tensor, max_prefix_steps: int = MAX_PREFIX_STEPS) -> Recording:
    """Run ``model`` over x (B, T, I) through the reference gate math and record every activation.

    Uses the model's own weights in their own dtype and device; works for any backend, any number of
    layers, uni- or bidirectional. See the module docstring for how ``probs`` is defined.
    """
    if not isinstance(model, SequenceClassifier):
        raise TypeError(f"record() takes a SequenceClassifier, got {type(model).__name__}")
    if x.dim() != 3 or x.size(-1) != model.lstm.input_size:
        raise LstmlabError(
            f"expected input of shape (B, T, {model.lstm.input_size}), got {tuple(x.shape)}"
        )
    param = next(model.parameters())
    x = x.to(device=param.device, dtype=param.dtype)
    records, _, logits = _run_layers(model, x)
    steps = x.size(1)
    if model.lstm.num_directions == 1:
        h = records[-1].h  # (B, T, H)
        probs = torch.softmax(model.head(h).float(), dim=-1)  # (B, T, C): head on each step's state
        note = "after step t: softmax(head(h_t)) of the last layer, i.e. the prediction if the sequence ended at t"
    elif steps <= max_prefix_steps:
        prefix = [torch.softmax(_run_layers(model, x[:, : t + 1])[2].float(), dim=-1) for t in range(steps)]
        probs = torch.stack(prefix, dim=1)  # (B, T, C)
        note = "after step t: softmax(model(x[:, :t+1])), the bidirectional model re-run on each prefix"
    else:
        probs = None
        note = (
            f"per-step probabilities of a bidirectional model need every prefix re-run (O(T^2)); "
            f"skipped for T={steps} > {max_prefix_steps}"
        )
    return Recording(
        layers=records,
        logits=logits,
        probs=probs,
        probs_note=note,
        num_layers=model.lstm.num_layers,
        num_directions=model.lstm.num_directions,
    )
