"""Draw a digit in the browser and watch the LSTM read it: ``lstmlab demo CHECKPOINT``.

The work is done by ``predict_drawing``, a plain function (testable without gradio): preprocess the
drawing MNIST-style, record the gates while the model reads it, and draw the figures. The Gradio app
around it binds 127.0.0.1 by default and never creates a public share link.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from lstmlab.errors import LstmlabError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from lstmlab.checkpoint import Checkpoint

# Drawings handled at once: the model and the figure code are thread-safe; two fit a 2-core machine, and more
# only make each answer slower (the figure drawing is serialised by one lock anyway).
CONCURRENCY = max(1, min(4, os.cpu_count() or 1))
QUEUE_SIZE = 256  # waiting requests; the next ones get "queue full" at once instead of waiting for minutes
MAX_UPLOAD = "5mb"  # a 400 x 400 canvas is ~20 KB as PNG; anything this big is not a drawing
DPI = 64  # the page shows the figures about this size; every pixel more costs drawing and PNG time per request
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


class EvolutionFigure:
    """Lines of each class's probability after every step (steps counted from 1), built once and refilled per drawing
    (``update``, then ``to_array``, which redraws only the input and the lines over a cached background). Each
    class keeps one colour, so the legend, beside the plot, never changes; the classes that lead at some step are
    drawn bold. One thread at a time per object."""

    def __init__(self, probs: Tensor, names: list[str], view: str, digit: Tensor) -> None:
        from lstmlab.analysis.figures import new_figure

        p = probs.detach().float().cpu().numpy()  # (T, C)
        self.names, self.steps = names, np.arange(1, len(p) + 1)
        fig = self.fig = new_figure(8, 3.6, dpi=DPI)
        ax = self.ax = fig.subplots(1, 1)  # the input itself is shown once on the page, in the step view
        self.lines = [ax.plot(self.steps, p[:, c], color=f"C{c % 10}", label=names[c])[0] for c in range(p.shape[1])]
        self._background = None
        ax.set_ylim(0, 1.02)
        ax.set_xlim(1, len(p))
        ax.set_xlabel("rows read so far" if view == "rows" else "pixels read so far")
        ax.set_ylabel("probability")
        ax.grid(True, alpha=0.3)
        ax.set_title(f"each class's probability after each {'row' if view == 'rows' else 'pixel'}", fontsize=11)
        ax.legend(title="bold: led at\nsome step", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
                  title_fontsize=8)
        self._fill(p)
        fig.tight_layout()

    def _fill(self, p: np.ndarray) -> None:
        leaders = {int(k) for k in p.argmax(1)} | {int(p[-1].argmax())}
        for c, line in enumerate(self.lines):
            line.set_ydata(p[:, c])
            line.set_linewidth(2.4 if c in leaders else 1.0)
            line.set_alpha(1.0 if c in leaders else 0.35)
            line.set_zorder(3 if c in leaders else 2)

    def update(self, probs: Tensor, digit: Tensor) -> EvolutionFigure:
        """Show another drawing's per-step probabilities (T, C); ``digit`` is accepted for the old signature."""
        p = probs.detach().float().cpu().numpy()
        if p.shape != (len(self.steps), len(self.lines)):
            raise ValueError("EvolutionFigure.update needs probabilities of the same shape")
        self._fill(p)
        return self

    def _dynamic(self) -> list:
        return sorted(self.lines, key=lambda a: a.get_zorder())

    def to_array(self) -> np.ndarray:
        """The figure as an RGB array (H, W, 3)."""
        canvas = self.fig.canvas
        if self._background is None:
            for artist in self._dynamic():
                artist.set_animated(True)
            canvas.draw()
            self._background = canvas.copy_from_bbox(self.fig.bbox)
        else:
            canvas.restore_region(self._background)
        for artist in self._dynamic():
            self.fig.draw_artist(artist)
        from lstmlab.analysis.figures import rgba_to_rgb

        return rgba_to_rgb(canvas.buffer_rgba())


def evolution_figure(probs: Tensor, names: list[str], view: str, digit: Tensor) -> Figure:
    """Lines of each class's probability after every step; the classes that ever lead are labelled."""
    return EvolutionFigure(probs, names, view, digit).fig


def _heatmaps_top(gates: Any) -> int:
    """The first pixel row of the gates figure's heatmaps (with their titles), for cropping off the rest."""
    fig = gates.fig
    renderer = fig.canvas.get_renderer()
    top = max(h.axes.get_tightbbox(renderer).y1 for h in gates.heat.values())  # display units, y upwards
    return int(max(0, fig.bbox.height - top - 6))


class FigureCache:
    """The demo's two figures for one checkpoint, built on the first drawing and refilled for every later one.

    Matplotlib is not thread-safe, so one lock serialises the drawing; with the figures reused and only their
    data redrawn, a drawing costs tens of milliseconds, so the requests the server runs at once mostly wait for
    the model, not for each other."""

    def __init__(self, permutation: Tensor | None, names: list[str], view: str) -> None:
        import threading

        self.lock = threading.Lock()
        self.permutation, self.names, self.view = permutation, names, view
        self.gates: Any = None
        self.crop: int | None = None
        self.evolution: EvolutionFigure | None = None

    def render(self, rec: Any, digit: Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """(gates figure, evolution figure or None) as RGB arrays for one recording."""
        from lstmlab.analysis.gates import GatesFigure

        with self.lock:
            if self.gates is None:
                # no live probability title: the page's message says the prediction, and text is the slow part
                self.gates = GatesFigure(rec, digit, self.view, self.names, permutation=self.permutation,
                                         title="Your digit", image_title="your digit, preprocessed", dpi=DPI,
                                         live_title=False, order="change", unit_labels=False)
            else:
                self.gates.update(rec, digit)
            gates = self.gates.to_array()
            if self.crop is None:
                self.crop = _heatmaps_top(self.gates)
            gates = gates[self.crop :]  # the heatmaps only: the input and the guess are shown once elsewhere
            evolution = None
            if rec.probs is not None:
                if self.evolution is None:
                    self.evolution = EvolutionFigure(rec.probs[0], self.names, self.view, digit)
                else:
                    self.evolution.update(rec.probs[0], digit)
                evolution = self.evolution.to_array()
        return gates, evolution


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
# the step view's panel labels, short enough for a panel's width with ": mean +0.00" after them
STEP_LABELS = {"i": "i input gate", "f": "f forget gate", "g": "g candidate", "o": "o output gate",
               "c": "c cell (memory)", "h": "h hidden state", "z_f": "z_f f pre-act.", "c_norm": "LN(c')",
               "peep_i": "peephole p_i·c", "peep_f": "peephole p_f·c", "peep_o": "peephole p_o·c'",
               "zone_c": "zoneout on c", "zone_h": "zoneout on h"}


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


# Gradio's toolbar opens with no tool and its trash button drops the brush: pick it again (after the toolbar settles).
SELECT_BRUSH_JS = """() => { const pick = () => {
  const brush = document.querySelector("#sketchpad button[aria-label='Brush']");
  if (brush && !brush.classList.contains("highlight")) brush.click();
}; setTimeout(pick, 150); setTimeout(pick, 600); return []; }"""
PLAY_DELAY = 0.18  # seconds between steps when playing: 28 rows in about 5 s, slow enough to follow the gates


def build_app(ckpt: Checkpoint, title: str = "lstmlab: watch an LSTM read your digit"):
    """The Gradio Blocks app around ``predict_drawing``, with the step-by-step view (slider and play button)."""
    import time

    from lstmlab.analysis.inputs import class_names

    gr = _gradio()
    names = class_names(ckpt.config.data.dataset)
    view = ckpt.config.data.view
    word = "row" if view == "rows" else "pixel"
    figures = FigureCache(ckpt.permutation, names, view)

    def handle(drawing):
        r = predict_drawing(ckpt, drawing, figure_cache=figures)
        if not r.ok:
            return None, None, None, None, r.message, None, gr.update(value=1, interactive=False), "", None
        data = r.step_data
        last = data.steps
        return (render_step(data, last), r.probabilities, r.evolution, r.gates, r.message, data,
                gr.update(value=last, maximum=last, interactive=True), step_caption(data, last),
                input_picture(r.digit))

    def clear():
        return None, None, None, None, "", None, gr.update(value=1, interactive=False), "", None

    def scrub(data, step):
        if data is None:
            return None, ""
        return render_step(data, int(step)), step_caption(data, int(step))

    def play(data):
        if data is None:
            return
        stride = max(1, data.steps // 28)  # the pixel views play 28 stops, not 784
        for t in [*range(1, data.steps, stride), data.steps]:
            yield t, render_step(data, t), step_caption(data, t)
            time.sleep(PLAY_DELAY)

    # delete_cache: a long-running demo would otherwise pile up every figure it served in gradio's temp folder
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(600, 3600)) as app:
        gr.Markdown(
            f"# {title}\nDraw one "
            f"{'digit' if names == [str(k) for k in range(10)] else 'item'} ({', '.join(names)}) with the brush, then "
            f"press **Read my digit**. The model reads the image "
            f"{'row by row, top to bottom' if view == 'rows' else 'pixel by pixel'}: drag the slider or press "
            f"**Play** to watch its gates {word} by {word}. The trash button clears the canvas and the answers."
        )
        with gr.Row():
            with gr.Column(scale=1):
                pad = gr.Sketchpad(label="draw here", type="pil", canvas_size=(400, 400), fixed_canvas=True,
                                   brush=gr.Brush(default_size=22, colors=["#000000"], color_mode="fixed"),
                                   elem_id="sketchpad")
                button = gr.Button("Read my digit", variant="primary", elem_id="read-button")
            with gr.Column(scale=1):
                message = gr.Markdown(elem_id="message")
                label = gr.Label(num_top_classes=3, label="prediction", elem_id="prediction")
                seen = gr.Image(label="what the model read: your drawing as its 28 x 28 input", format="png",
                                elem_id="model-input", height=240)
                evolution = gr.Image(label=f"the guess after each {word} (counted from 1)", format="jpeg",
                                     elem_id="evolution")
        step_view = gr.Image(label=f"step by step: what the LSTM has read, its gates (hidden units top to bottom, "
                             f"sorted by the {word} where their gates change most, as below) and its guess, "
                             f"{word} by {word}",
                             format="png", elem_id="step-view")
        with gr.Row():
            slider = gr.Slider(1, 28 if view == "rows" else 784, value=1, step=1, interactive=False,
                               label=f"{word} (1 = the first {word} read)", elem_id="step-slider", scale=4)
            play_button = gr.Button("▶ Play", elem_id="play-button", scale=1)
        caption = gr.Markdown(elem_id="step-caption")
        # JPEG: a tenth of PNG's encoding time for these figures, and no visible loss at the size they are shown
        gates = gr.Image(label=f"inside the LSTM: gates and states at every {word}", format="jpeg",
                         elem_id="gates")
        state = gr.State(None)
        outputs = [step_view, label, evolution, gates, message, state, slider, caption, seen]
        button.click(handle, inputs=pad, outputs=outputs, api_name="predict", concurrency_limit=CONCURRENCY)
        pad.clear(clear, outputs=outputs, js=SELECT_BRUSH_JS, api_name=False, queue=False)
        # Scrubbing and playing are pure numpy on the session's own arrays: no lock, their own concurrency slots.
        slider.input(scrub, inputs=[state, slider], outputs=[step_view, caption], api_name=False,
                     trigger_mode="always_last", show_progress="hidden", concurrency_id="scrub",
                     concurrency_limit=CONCURRENCY)
        play_button.click(play, inputs=state, outputs=[slider, step_view, caption], api_name=False,
                          show_progress="hidden", concurrency_id="play", concurrency_limit=8)
        app.load(None, js=SELECT_BRUSH_JS)
    # Requests beyond the running ones wait in gradio's queue, in order, up to QUEUE_SIZE; more are turned away.
    # Queue positions go out every 2 s rather than to every waiting client after every answer (N^2 messages).
    app.queue(status_update_rate=2.0, default_concurrency_limit=CONCURRENCY, max_size=QUEUE_SIZE)
    return app


def _gradio():
    try:
        import gradio as gr
    except ImportError:
        raise LstmlabError("the demo needs gradio: pip install 'lstmlab[demo]'") from None
    return gr


def launch(app, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> str:
    """Serve the app on host:port (never a public share link); returns the local URL."""
    try:
        _, url, _ = app.launch(server_name=host, server_port=port, share=False, inbrowser=False,
                               prevent_thread_lock=True, quiet=True, show_error=True, max_file_size=MAX_UPLOAD)
    except OSError as e:
        raise LstmlabError(f"cannot serve on {host}:{port} ({e}); pick another --port") from None
    if block:
        print(f"lstmlab demo: serving on {url} (Ctrl+C to stop)", flush=True)
        app.block_thread()  # returns after Ctrl+C, with the server closed
    return url


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a .safetensors checkpoint written by `lstmlab train`")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")


def run(args: argparse.Namespace) -> int:
    from lstmlab.checkpoint import load_checkpoint

    if not 0 < args.port < 65536:
        raise LstmlabError(f"--port must be in 1..65535, got {args.port}")
    _gradio()  # the hint comes before loading anything
    ckpt = load_checkpoint(args.checkpoint)  # a damaged or hostile checkpoint is refused before anything is served
    from PIL import Image

    # Each request is one small sample: more intra-op threads per request only fight the concurrent requests.
    torch.set_num_threads(1)
    # Uploads are decoded by gradio before the demo sees them: PIL refuses above twice this, before decoding.
    Image.MAX_IMAGE_PIXELS = MAX_DRAWING_PIXELS // 2
    app = build_app(ckpt)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"lstmlab demo: binding {args.host}: anyone who can reach this machine can use the demo")
    launch(app, args.host, args.port, block=True)
    return 0
