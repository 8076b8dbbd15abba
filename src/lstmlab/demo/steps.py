"""The step-by-step view (slider and play): what the model has read up to one step, each gate's heatmap revealed
so far and the guess then, painted with numpy and Pillow (no matplotlib, so any number of threads at once)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor

from lstmlab.nn.variants import SIGNALS


@dataclass
class StepData:
    """What the step-by-step view needs of one drawing (kept in the page's session state): small numpy arrays."""

    digit: np.ndarray  # uint8 (28, 28): what the model reads
    values: dict[str, np.ndarray]  # gate or variant signal name -> (H, T), hidden units in the gates figure's order
    probs: np.ndarray | None  # (T, C): the guess after each step
    names: list[str]
    view: str
    order: np.ndarray  # (T,) or (T, 2): the row (rows view) or flat pixel index each step reads

    @property
    def steps(self) -> int:
        """How many steps the model took (28 rows, or 784 pixels)."""
        return next(iter(self.values.values())).shape[1]


def step_data(rec: Any, digit: Tensor, names: list[str], view: str, permutation: Tensor | None = None) -> StepData:
    """The step view's data from a recording of the last layer's forward direction: its six gates and states, then
    a variant model's own terms, as the gates figure draws them."""
    from lstmlab.analysis.gates import panel_values, panels, unit_order

    layer = rec.get(-1, 0)
    rows = unit_order(layer, 0, "change")  # as the gates figure: units sorted by when their gates change most
    values = {name: panel_values(layer, name, 0, rows).astype(np.float32) for name in panels(layer)}
    steps = layer.h.size(1)
    if view == "rows":
        order = np.arange(steps)
    elif view == "permuted" and permutation is not None:
        order = permutation.cpu().numpy()[:steps]
    else:
        order = np.arange(steps)
    probs = rec.probs[0].detach().float().cpu().numpy() if rec.probs is not None else None
    return StepData(digit.cpu().numpy().astype(np.uint8), values, probs, names, view, order)


_LUTS: dict[str, np.ndarray] = {}


def _lut(cmap: str) -> np.ndarray:
    """A colour map as a (256, 3) uint8 table, built once (matplotlib's tables are read-only data after that)."""
    if cmap not in _LUTS:
        from matplotlib import colormaps

        _LUTS[cmap] = np.round(colormaps[cmap](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)
    return _LUTS[cmap]


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


STEP_PANEL = (168, 128)  # width (time) x height (units) of each gate's panel in the step view, in pixels
# the step view's panel labels, short enough for a panel's width with ": mean +0.00" after them; a variant's
# own terms are labelled in its table entry
STEP_LABELS = {"i": "i input gate", "f": "f forget gate", "g": "g candidate", "o": "o output gate",
               "c": "c cell (memory)", "h": "h hidden state", **{s.name: s.label for s in SIGNALS if s.label}}


def step_caption(data: StepData, step: int) -> str:
    """One line for the step view: which step, what it reads, the guess then (step counts from 1)."""
    word = "row" if data.view == "rows" else "pixel"
    line = f"**{word.capitalize()} {step} of {data.steps}**"
    if data.probs is not None:
        p = data.probs[step - 1]
        top = int(p.argmax())
        line += f": after reading it the guess is **{data.names[top]}** ({100 * p[top]:.0f}%)"
    f = data.values["f"][:, step - 1]
    line += f"; the forget gate keeps {100 * float(f.mean()):.0f}% of the memory on average."
    return line


def render_step(data: StepData, step: int) -> np.ndarray:
    """The step view for ``step`` (1-based) as an RGB array: the input with the rows read so far lit and the current
    one marked, each gate's heatmap (units x steps) revealed up to this step (a variant model's own terms in more
    rows below), and the guess after it. Pure numpy and Pillow: cheap, and safe from any number of threads."""
    from PIL import Image, ImageDraw

    step = int(min(max(step, 1), data.steps))
    pw, ph = STEP_PANEL
    width, height = 224 + 24 + 3 * (pw + 16) + 230, -(-len(data.values) // 3) * (ph + 40) + 24
    frame = np.full((height, width, 3), 255, np.uint8)
    top, x0 = 24, 224 + 24
    _paint_input(frame, data, step, top)
    _paint_panels(frame, data, step, x0, top)
    img = Image.fromarray(frame)
    draw = ImageDraw.Draw(img)
    small, tiny = _font(14), _font(12)
    word = "row" if data.view == "rows" else "pixel"
    draw.text((0, 2), f"reading {word} {step} of {data.steps}", fill=(0, 0, 0), font=small)
    for k, name in enumerate(data.values):
        px, py = x0 + (k % 3) * (pw + 16), top + (k // 3) * (ph + 40)
        draw.text((px, py), f"{STEP_LABELS[name]}: mean {float(data.values[name][:, step - 1].mean()):+.2f}",
                  fill=(0, 0, 0), font=tiny)
        draw.text((px, py + 16 + ph + 2), f"{word}s 1-{data.steps}", fill=(90, 90, 90), font=tiny)
    if data.probs is not None:
        p = data.probs[step - 1]
        bx = x0 + 3 * (pw + 16) + 8
        draw.text((bx, 2), f"the guess after {word} {step}", fill=(0, 0, 0), font=small)
        best = int(p.argmax())
        for c, q in enumerate(p):
            y = top + 6 + c * 22
            draw.text((bx, y), data.names[c][:10], fill=(0, 0, 0), font=tiny)
            length = int(round(float(q) * 150))
            draw.rectangle([bx + 70, y + 2, bx + 70 + max(length, 1), y + 14],
                           fill=(230, 30, 30) if c == best else (120, 120, 200))
            draw.text((bx + 76 + length, y), f"{100 * float(q):.0f}%", fill=(0, 0, 0), font=tiny)
    return np.asarray(img)


def _paint_input(frame: np.ndarray, data: StepData, step: int, top: int) -> None:
    """The input, 8x, at (0, top) of ``frame``: what has been read lit, the rest dimmed, the step being read in red."""
    scale = 8
    read = np.zeros(28 * 28, bool)
    if data.view == "rows":
        read[: step * 28] = True
    else:
        read[data.order[:step]] = True
    read = read.reshape(28, 28)
    digit = data.digit.astype(np.float32)
    shown = np.where(read, digit, 0.3 * digit + 40)  # unread pixels stay visible, dim, on a grey that shows "not yet"
    big = np.kron(shown, np.ones((scale, scale), np.float32)).astype(np.uint8)
    frame[top : top + 224, 0:224] = big[..., None]
    if data.view == "rows":
        y = top + (step - 1) * scale
        frame[y : y + 2, 0:224] = (230, 30, 30)
        frame[y + scale - 2 : y + scale, 0:224] = (230, 30, 30)
    else:
        r, c = divmod(int(data.order[step - 1]), 28)
        frame[top + r * scale : top + (r + 1) * scale, c * scale : (c + 1) * scale] = (230, 30, 30)


def _paint_panels(frame: np.ndarray, data: StepData, step: int, x0: int, top: int) -> None:
    """Each heatmap of ``data.values``, three to a row from (x0, top): units x steps so far, the current column
    marked."""
    from lstmlab.analysis.gates import PANELS, VARIANT_PANELS

    pw, ph = STEP_PANEL
    steps = data.steps
    columns = np.minimum((np.arange(pw) * steps) // pw, steps - 1)
    units = next(iter(data.values.values())).shape[0]
    rows = np.minimum((np.arange(ph) * units) // ph, units - 1)
    for k, (name, values) in enumerate(data.values.items()):
        _, cmap, limits = (PANELS | VARIANT_PANELS)[name]
        bound = max(float(np.abs(values).max()), 1e-6)
        low, high = limits if limits is not None else (-bound, bound)
        index = np.clip(((values - low) / (high - low) * 256), 0, 255).astype(np.intp)
        panel = _lut(cmap)[index[rows][:, columns]]  # (ph, pw, 3)
        panel[:, columns >= step] = 235  # steps not read yet
        px, py = x0 + (k % 3) * (pw + 16), top + 16 + (k // 3) * (ph + 40)
        frame[py : py + ph, px : px + pw] = panel
        cursor = px + np.nonzero(columns == step - 1)[0]
        frame[py - 4 : py, cursor] = (230, 30, 30)  # ticks above and below the current step's column
        frame[py + ph : py + ph + 4, cursor] = (230, 30, 30)
