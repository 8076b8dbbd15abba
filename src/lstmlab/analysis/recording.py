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

Dropout is never applied: a recording shows the model as it predicts (eval mode). The variants' own terms
(``lstm_step``'s ``signals``: LayerNorm's normalised pre-activations, the peephole terms, zoneout's pull back to the
previous state) are in ``LayerRecord.extra``. Zoneout takes its eval-mode expectation, unless ``record(...,
zoneout="sample")`` draws training-mode 0/1 masks (one per unit, step and input position) so that the zoned-out
units show as such; recurrent dropout stays off either way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from lstmlab.errors import LstmlabError
from lstmlab.model import SequenceClassifier
from lstmlab.nn.cell import lstm_step

GATE_NAMES = ("i", "f", "g", "o", "c", "h")
ZONEOUT_MODES = ("expected", "sample")  # record's zoneout: eval's expectation, or training-mode draws
MAX_PREFIX_STEPS = 64  # bidirectional per-step probs cost O(T^2) steps: fine for rows (28), not pixels (784)


@dataclass
class LayerRecord:
    """Activations of one layer in one direction, each (B, T, H), indexed by input position.

    For the reverse direction index t holds the step that read x_t (coming from the end), so it lines
    up with ``nn.LSTM``'s output: ``h[:, t]`` is the reverse half of the output at t. ``extra`` holds a variant's
    own terms by ``lstm_step``'s signal names (``peep_f``, ``c_norm``, ``zone_c``...), the same shape and indexing;
    empty for the plain cell.
    """

    layer: int
    direction: int  # 0 forward, 1 reverse
    i: Tensor
    f: Tensor
    g: Tensor
    o: Tensor
    c: Tensor
    h: Tensor
    extra: dict[str, Tensor] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Tensor:
        """``record["f"]``, ``record["peep_f"]``: an activation by gate name (i, f, g, o, c, h) or signal name."""
        if name in GATE_NAMES:
            return getattr(self, name)
        if name in self.extra:
            return self.extra[name]
        raise KeyError(f"unknown gate or signal {name!r}; one of {', '.join([*GATE_NAMES, *self.extra])}")

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
    zoneout: str = "expected"  # how zoneout was applied: one of ZONEOUT_MODES

    def get(self, layer: int = -1, direction: int = 0) -> LayerRecord:
        """One layer's record; ``layer`` may be negative, ``direction`` 0 (forward) or 1 (reverse)."""
        if not -self.num_layers <= layer < self.num_layers:
            raise LstmlabError(f"layer {layer} does not exist; the model has {self.num_layers} layer(s)")
        if direction not in range(self.num_directions):
            raise LstmlabError("direction 1 (reverse) exists only for a bidirectional model")
        return self.layers[(layer % self.num_layers) * self.num_directions + direction]


def _zoneout_weights(model: SequenceClassifier, x: Tensor, mode: str,
                     generator: torch.Generator | None) -> list[Tensor] | None:
    """Zoneout's (z_c, z_h) for every layer and direction, each (2, B, T, H) by input position: the probabilities
    themselves (eval), or 0/1 draws (training); None without zoneout."""
    lstm = model.lstm
    if not any(lstm.zoneout):
        return None
    shape = (x.size(0), x.size(1), lstm.hidden_size)
    z = torch.tensor(lstm.zoneout, dtype=x.dtype, device=x.device).view(2, 1, 1, 1).expand(2, *shape)
    if mode == "expected":
        return [z] * (lstm.num_layers * lstm.num_directions)
    return [torch.bernoulli(z, generator=generator) for _ in range(lstm.num_layers * lstm.num_directions)]


def _run_direction(seq: Tensor, weights: tuple, variant: dict, zoneout: Tensor | None,
                   direction: int) -> list[tuple]:
    """One layer and direction over seq (T, B, I): per input position, its Gates and signals."""
    w_hh = weights[1]  # (4H, P)
    h, c = seq.new_zeros(seq.size(1), w_hh.size(1)), seq.new_zeros(seq.size(1), w_hh.size(0) // 4)
    steps = []
    for t in range(seq.size(0) - 1, -1, -1) if direction == 1 else range(seq.size(0)):
        signals: dict[str, Tensor] = {}
        held = None if zoneout is None else (zoneout[0, :, t], zoneout[1, :, t])
        gates = lstm_step(seq[t], h, c, *weights, **variant, zoneout=held, signals=signals)
        h, c = gates.h, gates.c
        steps.append((gates, signals))
    return steps[::-1] if direction == 1 else steps  # index by input position, as nn.LSTM's output is


def _run_layers(model: SequenceClassifier, x: Tensor,
                zoneout: list[Tensor] | None = None) -> tuple[list[LayerRecord], Tensor, Tensor]:
    """Reference forward pass of the stack over x (B, T, I) with zoneout weights from ``_zoneout_weights`` (cut to
    T steps); returns records, last-layer output, logits."""
    lstm = model.lstm
    seq = x.transpose(0, 1)  # (T, B, I)
    records: list[LayerRecord] = []
    for layer in range(lstm.num_layers):
        outs = []
        for direction in range(lstm.num_directions):
            weights = tuple(None if w is None else w.detach() for w in lstm.layer_weights(layer, direction))
            # A variant's own terms; recurrent dropout stays off (eval mode).
            variant = {k: None if v is None else v.detach() for k, v in lstm.variant_weights(layer, direction).items()}
            k = layer * lstm.num_directions + direction
            z = None if zoneout is None else zoneout[k][:, :, : seq.size(0)]
            steps = _run_direction(seq, weights, variant, z, direction)
            stacked = {n: torch.stack([getattr(s, n) for s, _ in steps], dim=1) for n in GATE_NAMES}  # (B, T, H)
            extra = {n: torch.stack([signals[n] for _, signals in steps], dim=1) for n in steps[0][1]}
            records.append(LayerRecord(layer=layer, direction=direction, **stacked, extra=extra))
            outs.append(stacked["h"].transpose(0, 1))  # (T, B, H)
        seq = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]  # (T, B, D*H): next layer's input
    last = records[-lstm.num_directions :]
    final = torch.cat([r.final_h for r in last], dim=1)  # (B, D*H), as the model's head reads it
    logits = model.head.weight.detach() @ final.T
    if model.head.bias is not None:
        logits = logits + model.head.bias.detach()[:, None]
    return records, seq.transpose(0, 1), logits.T  # logits (B, C)


@torch.no_grad()
def record(model: SequenceClassifier, x: Tensor, max_prefix_steps: int = MAX_PREFIX_STEPS, *,
           zoneout: str = "expected", generator: torch.Generator | None = None) -> Recording:
    """Run ``model`` over x (B, T, I) through the reference gate math and record every activation.

    Uses the model's own weights in their own dtype and device; works for any backend, any number of
    layers, uni- or bidirectional. See the module docstring for how ``probs`` is defined. ``zoneout="sample"``
    draws training-mode zoneout masks from ``generator`` (torch's default one if None), fixed per input position,
    so that the per-step probabilities of a bidirectional model see the same masks on every prefix.
    """
    if not isinstance(model, SequenceClassifier):
        raise TypeError(f"record() takes a SequenceClassifier, got {type(model).__name__}")
    if x.dim() != 3 or x.size(-1) != model.lstm.input_size:
        raise LstmlabError(
            f"expected input of shape (B, T, {model.lstm.input_size}), got {tuple(x.shape)}"
        )
    if zoneout not in ZONEOUT_MODES:
        raise LstmlabError(f"zoneout must be one of {', '.join(ZONEOUT_MODES)}, got {zoneout!r}")
    param = next(model.parameters())
    x = x.to(device=param.device, dtype=param.dtype)
    held = _zoneout_weights(model, x, zoneout, generator)
    records, _, logits = _run_layers(model, x, held)
    steps = x.size(1)
    if model.lstm.num_directions == 1:
        h = records[-1].h  # (B, T, H)
        probs = torch.softmax(model.head(h).float(), dim=-1)  # (B, T, C): head on each step's state
        note = "after step t: softmax(head(h_t)) of the last layer, i.e. the prediction if the sequence ended at t"
    elif steps <= max_prefix_steps:
        prefix = [torch.softmax(_run_layers(model, x[:, : t + 1], held)[2].float(), dim=-1) for t in range(steps)]
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
        zoneout=zoneout,
    )
