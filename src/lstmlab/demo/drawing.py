"""The demo's core, testable without gradio: a drawing (sketchpad value, PIL image or array) -> everything the page
shows (:func:`predict_drawing`): preprocess it MNIST-style, record the gates while the model reads it, draw the
figures."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from lstmlab.demo.figures import FigureCache
from lstmlab.demo.steps import StepData, step_data
from lstmlab.errors import LstmlabError

if TYPE_CHECKING:
    from lstmlab.checkpoint import Checkpoint

MAX_DRAWING_PIXELS = 4_000_000  # decoded size cap for what reaches the demo (the CLI allows 40 MP photos)

BLANK_MESSAGE = "The canvas is blank: draw a digit (one stroke or more), then press **Read my digit**."


@dataclass
class DrawingResult:
    """What the page shows for one drawing; ``ok`` False means only ``message`` is meaningful."""

    ok: bool
    message: str
    digit: Tensor | None = None  # uint8 (28, 28): what the model reads
    probabilities: dict[str, float] = field(default_factory=dict)  # class name -> probability
    gates: np.ndarray | None = None  # RGB (H, W, 3): the gates figure
    evolution: np.ndarray | None = None  # RGB (H, W, 3): the guess after each step
    steps: list[tuple[int, str, float]] = field(default_factory=list)  # (step, guess, probability) per step
    step_data: StepData | None = None  # for the step-by-step view (slider and play)


INPUT_SCALE = 8  # the 28x28 input shown 224 pixels a side, each of its pixels a visible square


def input_picture(digit: Tensor) -> np.ndarray:
    """The uint8 (28, 28) input the model read, enlarged ``INPUT_SCALE`` times with square pixels (no smoothing):
    what ``lstmlab predict --save-input`` writes, as the page shows it."""
    a = digit.cpu().numpy().astype(np.uint8)
    return np.repeat(np.repeat(a, INPUT_SCALE, axis=0), INPUT_SCALE, axis=1)


def drawing_to_image(drawing: Any):
    """A Gradio sketchpad value (dict with ``composite``), a PIL image or an array -> PIL image or None."""
    from PIL import Image

    if isinstance(drawing, dict):  # gradio's EditorValue: background, layers, composite
        drawing = drawing.get("composite")
        if drawing is None:
            return None
    if drawing is None:
        return None
    if isinstance(drawing, Image.Image):
        return drawing
    if isinstance(drawing, (str, Path)):
        from lstmlab.analysis.inputs import open_image

        return open_image(drawing)
    array = np.asarray(drawing)
    if array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    if array.ndim not in (2, 3) or array.size == 0:
        raise LstmlabError(f"cannot read a drawing of shape {array.shape}")
    return Image.fromarray(array)


def _guess_changes(probs: Tensor, names: list[str]) -> list[tuple[int, str, float]]:
    """(step, guess, probability) at the first step and wherever the leading class changes."""
    p = probs.detach().float().cpu()
    best, top = p.max(1)
    out = []
    for t in range(len(p)):
        if t == 0 or top[t] != top[t - 1]:
            out.append((t + 1, names[int(top[t])], float(best[t])))
    return out


@torch.no_grad()
def predict_drawing(ckpt: Checkpoint, drawing: Any, *, figures: bool = True,
                    figure_cache: FigureCache | None = None) -> DrawingResult:
    """The demo's core: a drawing (sketchpad value, PIL image or array) -> everything the page shows.

    A blank or unreadable drawing gives ``ok=False`` and a message, never an exception, so the app
    keeps serving. ``figure_cache`` (one per checkpoint, shared by the server's threads) makes the figures cheap;
    without it they are drawn from scratch. Safe to call from several threads at once.
    """
    from lstmlab.analysis.inputs import class_names, model_input, preprocess_image
    from lstmlab.analysis.recording import record

    try:
        img = drawing_to_image(drawing)
        if img is None:
            return DrawingResult(ok=False, message=BLANK_MESSAGE)
        width, height = img.size
        if width * height > MAX_DRAWING_PIXELS:
            raise LstmlabError(f"the drawing is {width} x {height} pixels, over the demo's "
                               f"{MAX_DRAWING_PIXELS:,}-pixel limit; draw on the canvas or upload a smaller image")
        digit = preprocess_image(img)
    except LstmlabError as e:
        message = BLANK_MESSAGE if "blank" in str(e) else f"Cannot read the drawing: {e}"
        return DrawingResult(ok=False, message=message)

    names = class_names(ckpt.config.data.dataset)
    view = ckpt.config.data.view
    rec = record(ckpt.model, model_input(ckpt, digit[None]))
    final = torch.softmax(rec.logits[0].float(), 0).cpu()
    probabilities = {names[k]: float(final[k]) for k in range(len(names))}
    top = int(final.argmax())
    changes = _guess_changes(rec.probs[0], names) if rec.probs is not None else []
    word = "row" if view == "rows" else "pixel"
    story = "; ".join(f"after {word} {t}: {n} ({100 * q:.0f}%)" for t, n, q in changes[-6:])
    message = f"**Prediction: {names[top]}** ({100 * final[top]:.1f}%)."
    if story:
        message += f" How the guess changed — {story}."
    result = DrawingResult(ok=True, message=message, digit=digit, probabilities=probabilities, steps=changes,
                           step_data=step_data(rec, digit, names, view, ckpt.permutation))
    if figures:
        cache = figure_cache or FigureCache(ckpt.permutation, names, view)
        result.gates, result.evolution = cache.render(rec, digit)
    return result
