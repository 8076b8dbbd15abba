"""The variants of the LSTM cell, one table entry each: what every module but the equations reads.

A variant is a cell (``cell="peephole"``, ``--cell``) or a regulariser (``zoneout``, ``recurrent_dropout``). Its
entry says which parameters it adds (name, shape, initial value), which arguments it passes to the step functions
and the ``fused`` op (the parameters stacked, or a mask the caller draws), which of its terms ``lstm_step``
hands back as signals (and their labels in ``lstmlab gates`` and the demo), and which loops implement it. Its
equations are written once, in :func:`lstmlab.nn.cell.lstm_step`, the file that reads like the textbook.

Only the standard library: ``lstmlab --help`` reads ``CELLS`` without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Param:
    """A learned parameter: ``name`` plus the layer's suffix (``weight_ci_l0_reverse``), ``rows`` x H values, all
    ``init`` at initialisation. The names are ``state_dict`` keys: checkpoints depend on them."""

    name: str
    rows: int
    init: float


@dataclass(frozen=True)
class Arg:
    """A variant argument of ``reference_layer``, ``fused_layer`` and the fused op (and of ``lstm_step`` as
    ``step_name``, when that differs).

    ``params`` are the parameters it stacks, (len(params), rows * H); none: a mask the caller draws, which gets no
    gradient. ``per`` says how a layer hands it to each step: ``"layer"`` whole, ``"row"`` (B, H) its live rows,
    ``"step"`` (2, T, B, H) step t's pair."""

    name: str
    params: tuple[Param, ...] = ()
    per: Literal["layer", "row", "step"] = "layer"
    step_name: str = ""

    @property
    def shape(self) -> tuple[int, int]:
        """(stacked parameters, rows per H): the argument is (shape[0], shape[1] * H)."""
        return len(self.params), self.params[0].rows


@dataclass(frozen=True)
class Signal:
    """A term ``lstm_step(..., signals={})`` hands back, (B, H): ``title`` heads its ``lstmlab gates`` heatmap
    (empty: recorded, not drawn), ``label`` is the demo's short one."""

    name: str
    title: str = ""
    label: str = ""


@dataclass(frozen=True)
class Variant:
    """One variant: a cell (``cell=name``) or a regulariser; its arguments (in the op's order) and signals.

    ``loops``: what runs it on the ``fused`` backend. ``"native"``: the compiled loops (csrc/lstm_variants.cpp)
    and fused's Python loops; ``"python"``: fused's Python loops only; ``"reference"``: the reference math
    (``lstm_step`` step by step, differentiated by autograd), for a variant no fast loop knows yet."""

    name: str
    kind: Literal["cell", "regulariser"]
    args: tuple[Arg, ...]
    signals: tuple[Signal, ...] = ()
    loops: Literal["native", "python", "reference"] = "reference"

    @property
    def params(self) -> tuple[Param, ...]:
        """Every parameter of its arguments, in registration order."""
        return tuple(p for arg in self.args for p in arg.params)


# In this order: the cells' order is --cell's, and every variant's arguments are the fused op's, in turn.
VARIANTS: tuple[Variant, ...] = (
    Variant(  # Gers, Schraudolph & Schmidhuber 2002; zeros: a fresh peephole cell is the plain one
        "peephole", "cell", loops="native",
        args=(Arg("peephole", (Param("weight_ci", 1, 0.0), Param("weight_cf", 1, 0.0), Param("weight_co", 1, 0.0))),),
        signals=(Signal("peep_i", "peephole into i: p_i · c (the previous cell)", "peephole p_i·c"),
                 Signal("peep_f", "peephole into f: p_f · c (the previous cell)", "peephole p_f·c"),
                 Signal("peep_o", "peephole into o: p_o · c' (the new cell)", "peephole p_o·c'")),
    ),
    Variant(  # Ba, Kiros & Hinton 2016, as haste implements it; gains 1 and biases 0
        "layernorm", "cell", loops="native",
        args=(Arg("ln_gates", (Param("ln_ih_weight", 4, 1.0), Param("ln_hh_weight", 4, 1.0))),
              Arg("ln_cell", (Param("ln_c_weight", 1, 1.0), Param("ln_c_bias", 1, 0.0)))),
        signals=(Signal("z_i"), Signal("z_f", "z_f: f's pre-activation, LN(xW)+LN(hW)+b; f = σ(z_f)", "z_f f pre-act."),
                 Signal("z_g"), Signal("z_o"),  # i, g and o are drawn squashed above: their z are recorded only
                 Signal("c_norm", "LN(c'): the normalised cell that tanh reads", "LN(c')")),
    ),
    Variant(  # Krueger et al. 2017: a 0/1 mask per step and unit in training, the probability in eval
        "zoneout", "regulariser", loops="native", args=(Arg("zoneout_mask", per="step", step_name="zoneout"),),
        signals=(Signal("zone_c", "zoneout on c: z_c · (c − c'), previous minus new cell", "zoneout on c"),
                 Signal("zone_h", "zoneout on h: z_h · (h − h'), previous minus new state", "zoneout on h")),
    ),
    Variant(  # Gal & Ghahramani 2016: one mask per sequence
        "recurrent_dropout", "regulariser", loops="native", args=(Arg("recurrent_mask", per="row"),),
    ),
)

BY_NAME = {v.name: v for v in VARIANTS}
CELLS = ("lstm", *(v.name for v in VARIANTS if v.kind == "cell"))  # --cell's choices; "lstm" is the plain cell
ARGS: tuple[Arg, ...] = tuple(arg for v in VARIANTS for arg in v.args)
ARG_NAMES = tuple(arg.name for arg in ARGS)
BY_ARG = {arg.name: arg for arg in ARGS}
LEARNED = tuple(arg for arg in ARGS if arg.params)  # the arguments that get a gradient
SIGNALS: tuple[Signal, ...] = tuple(s for v in VARIANTS for s in v.signals)
OWNER = {arg.name: v for v in VARIANTS for arg in v.args}  # argument name -> its variant
# The fused op's variant arguments, in its order: every variant's but those only the reference math runs.
FUSED_ARGS = tuple(arg.name for arg in ARGS if OWNER[arg.name].loops != "reference")
FUSED_LEARNED = tuple(arg.name for arg in LEARNED if arg.name in FUSED_ARGS)  # ... and of them, the learned ones


def cell_variant(cell: str) -> Variant | None:
    """The table entry of a cell name (None for the plain ``lstm``)."""
    return None if cell == "lstm" else BY_NAME[cell]


def parameter_shapes(cell: str, hidden_size: int, suffix: str = "") -> list[tuple[str, int]]:
    """The parameters a cell adds, (name + suffix, size), in registration order."""
    v = cell_variant(cell)
    return [] if v is None else [(p.name + suffix, p.rows * hidden_size) for p in v.params]
