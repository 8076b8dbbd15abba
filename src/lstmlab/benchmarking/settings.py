"""What ``lstmlab bench`` can time: the backends, the modes, the grid of shapes and the cell variants. Plain data
(no torch), so that the command's flags and ``--help`` can read it."""

from __future__ import annotations

from collections.abc import Sequence

BACKENDS = ("reference", "fused", "torch")
SERVING = ("int8", "onnxruntime")  # what a CPU server would run instead: inference modes only
MODES = ("train", "forward", "infer")
INFERENCE_MODES = ("forward", "infer")
# --grid: (mode, B, T, I, H, layers, bidirectional); issue 27's table, plus B=1 at H=512 with 2 bidirectional layers
GRID: tuple[tuple[str, int, int, int, int, int, bool], ...] = (
    ("infer", 1, 100, 40, 256, 2, False),
    ("infer", 1, 500, 16, 128, 1, False),
    ("infer", 1, 100, 64, 512, 2, True),
    ("infer", 8, 100, 64, 512, 1, False),
    ("infer", 64, 50, 128, 256, 2, True),
    ("infer", 256, 28, 28, 128, 1, False),
    ("train", 16, 50, 64, 256, 1, False),
    ("train", 64, 100, 32, 256, 2, False),
    ("train", 128, 50, 128, 512, 1, False),
    ("train", 32, 200, 16, 128, 1, True),
    ("train", 256, 28, 28, 128, 1, False),
)
GRID_BACKENDS = ("fused", "torch")
NAMES = {"fused": "lstmlab", "torch": "nn.LSTM", "reference": "reference", "int8": "int8 dynamic",
         "onnxruntime": "onnxruntime"}
# --variants: (cell, zoneout, recurrent_dropout) of each variant alone, then two combinations of them
VARIANTS: tuple[tuple[str, float | tuple[float, float], float], ...] = (
    ("layernorm", 0.0, 0.0),
    ("peephole", 0.0, 0.0),
    ("lstm", (0.1, 0.05), 0.0),
    ("lstm", 0.0, 0.25),
    ("layernorm", (0.1, 0.05), 0.25),
    ("peephole", (0.1, 0.05), 0.25),
)
PLAIN = ("lstm", 0.0, 0.0)
ALLOCATORS = ("default", "warm")


def variant_label(cell: str, zoneout: float | Sequence[float], recurrent_dropout: float) -> str:
    """A variant's name in the table (no spaces): ``lstm``, ``layernorm``, ``zoneout=0.1,0.05``,
    ``peephole+zoneout=0.1+rdrop=0.25``..."""
    parts = [] if cell == "lstm" else [cell]
    pair = tuple(zoneout) if isinstance(zoneout, (tuple, list)) else (zoneout, zoneout)
    if any(pair):
        parts.append(f"zoneout={pair[0]:g}" if pair[0] == pair[1] else f"zoneout={pair[0]:g},{pair[1]:g}")
    if recurrent_dropout:
        parts.append(f"rdrop={recurrent_dropout:g}")
    return "+".join(parts) or "lstm"
