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
        from lstmlab.predict import open_image

        return open_image(drawing)
    array = np.asarray(drawing)
    if array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    if array.ndim not in (2, 3) or array.size == 0:
        raise LstmlabError(f"cannot read a drawing of shape {array.shape}")
    return Image.fromarray(array)


class EvolutionFigure:
    """Lines of each class's probability after every step beside the input, built once and refilled per drawing
    (``update``, then ``to_array``, which redraws only the input and the lines over a cached background). Each
    class keeps one colour, so the legend, beside the plot, never changes; the classes that lead at some step are
    drawn bold. One thread at a time per object."""

    def __init__(self, probs: Tensor, names: list[str], view: str, digit: Tensor) -> None:
        from lstmlab.plots import new_figure

        p = probs.detach().float().cpu().numpy()  # (T, C)
        self.names, self.steps = names, np.arange(1, len(p) + 1)
        fig = self.fig = new_figure(10, 4.2, dpi=DPI)
        img_ax, ax = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 3.2]})
        self.ax = ax
        self.digit = img_ax.imshow(digit.cpu().numpy(), cmap="gray", vmin=0, vmax=255)
        img_ax.set_title("what the LSTM reads\n(28 x 28, one row per step)" if view == "rows" else
                         "what the LSTM reads (28 x 28)", fontsize=10)
        img_ax.set_xticks([])
        img_ax.set_yticks([0, 9, 18, 27])
        self.lines = [ax.plot(self.steps, p[:, c], color=f"C{c % 10}", label=names[c])[0] for c in range(p.shape[1])]
        self._background = None
        ax.set_ylim(0, 1.02)
        ax.set_xlim(1, len(p))
        ax.set_xlabel("rows read so far" if view == "rows" else "pixels read so far")
        ax.set_ylabel("probability")
        ax.grid(True, alpha=0.3)
        ax.set_title("The guess as the LSTM reads: each class's probability after each step", fontsize=11)
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
        """Show another drawing's per-step probabilities (T, C) and input."""
        p = probs.detach().float().cpu().numpy()
        if p.shape != (len(self.steps), len(self.lines)):
            raise ValueError("EvolutionFigure.update needs probabilities of the same shape")
        self.digit.set_data(digit.cpu().numpy())
        self._fill(p)
        return self

    def _dynamic(self) -> list:
        ax = self.digit.axes
        return [self.digit, *ax.spines.values(), *sorted(self.lines, key=lambda a: a.get_zorder())]

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
        from lstmlab.plots import rgba_to_rgb

        return rgba_to_rgb(canvas.buffer_rgba())


def evolution_figure(probs: Tensor, names: list[str], view: str, digit: Tensor) -> Figure:
    """Lines of each class's probability after every step; the classes that ever lead are labelled."""
    return EvolutionFigure(probs, names, view, digit).fig


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
        self.evolution: EvolutionFigure | None = None

    def render(self, rec: Any, digit: Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """(gates figure, evolution figure or None) as RGB arrays for one recording."""
        from lstmlab.gates import GatesFigure

        with self.lock:
            if self.gates is None:
                # no live probability title: the page's message says the prediction, and text is the slow part
                self.gates = GatesFigure(rec, digit, self.view, self.names, permutation=self.permutation,
                                         title="Your digit", image_title="your digit, preprocessed", dpi=DPI,
                                         live_title=False)
            else:
                self.gates.update(rec, digit)
            gates = self.gates.to_array()
            evolution = None
            if rec.probs is not None:
                if self.evolution is None:
                    self.evolution = EvolutionFigure(rec.probs[0], self.names, self.view, digit)
                else:
                    self.evolution.update(rec.probs[0], digit)
                evolution = self.evolution.to_array()
        return gates, evolution


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
    from lstmlab.inspect import record
    from lstmlab.predict import class_names, model_input, preprocess_image

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
    result = DrawingResult(ok=True, message=message, digit=digit, probabilities=probabilities, steps=changes)
    if figures:
        cache = figure_cache or FigureCache(ckpt.permutation, names, view)
        result.gates, result.evolution = cache.render(rec, digit)
    return result


def build_app(ckpt: Checkpoint, title: str = "lstmlab: watch an LSTM read your digit"):
    """The Gradio Blocks app around ``predict_drawing``."""
    from lstmlab.predict import class_names

    gr = _gradio()
    names = class_names(ckpt.config.data.dataset)
    figures = FigureCache(ckpt.permutation, names, ckpt.config.data.view)

    def handle(drawing):
        r = predict_drawing(ckpt, drawing, figure_cache=figures)
        if not r.ok:
            return None, None, None, None, r.message
        big = np.kron(r.digit.numpy(), np.ones((8, 8), dtype=np.uint8))  # 224 x 224, sharp pixels
        return big, r.probabilities, r.evolution, r.gates, r.message

    # delete_cache: a long-running demo would otherwise pile up every figure it served in gradio's temp folder
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(600, 3600)) as app:
        gr.Markdown(
            f"# {title}\nPick the brush (the pencil left of the canvas), draw one "
            f"{'digit' if names == [str(k) for k in range(10)] else 'item'} ({', '.join(names)}), then press "
            f"**Read my digit**. The model reads the image "
            f"{'row by row, top to bottom' if ckpt.config.data.view == 'rows' else 'pixel by pixel'}."
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
                digit = gr.Image(label="model input, 28 x 28", height=224, width=224, format="png",
                                 elem_id="digit")
        # JPEG: a tenth of PNG's encoding time for these figures, and no visible loss at the size they are shown
        evolution = gr.Image(label="the guess, step by step", format="jpeg", elem_id="evolution")
        gates = gr.Image(label="inside the LSTM: gates and states at every step", format="jpeg", elem_id="gates")
        outputs = [digit, label, evolution, gates, message]
        button.click(handle, inputs=pad, outputs=outputs, api_name="predict", concurrency_limit=CONCURRENCY)
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
