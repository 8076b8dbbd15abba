"""The Gradio page around :func:`lstmlab.demo.drawing.predict_drawing`: the sketchpad, the answer, the figures and the
step-by-step view, served on 127.0.0.1 by default and never through a public share link. gradio is an optional
extra (``lstmlab[demo]``), imported only here, when an app is built."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lstmlab.demo.drawing import MAX_DRAWING_PIXELS, input_picture, predict_drawing
from lstmlab.demo.figures import FigureCache
from lstmlab.demo.steps import render_step, step_caption
from lstmlab.errors import LstmlabError

if TYPE_CHECKING:
    from lstmlab.checkpoint import Checkpoint

# Drawings handled at once: the model and the figure code are thread-safe; two fit a 2-core machine, and more
# only make each answer slower (the figure drawing is serialised by one lock anyway).
CONCURRENCY = max(1, min(4, os.cpu_count() or 1))
QUEUE_SIZE = 256  # waiting requests; the next ones get "queue full" at once instead of waiting for minutes
MAX_UPLOAD = "5mb"  # a 400 x 400 canvas is ~20 KB as PNG; anything this big is not a drawing


# Gradio's toolbar opens with no tool and its trash button drops the brush: pick it again (after the toolbar settles).
SELECT_BRUSH_JS = """() => { const pick = () => {
  const brush = document.querySelector("#sketchpad button[aria-label='Brush']");
  if (brush && !brush.classList.contains("highlight")) brush.click();
}; setTimeout(pick, 150); setTimeout(pick, 600); return []; }"""
PLAY_DELAY = 0.18  # seconds between steps when playing: 28 rows in about 5 s, slow enough to follow the gates


def build_app(ckpt: Checkpoint, title: str = "lstmlab: watch an LSTM read your digit"):
    """The Gradio Blocks app around ``predict_drawing``, with the step-by-step view (slider and play button)."""
    from lstmlab.analysis.inputs import class_names

    gr = require_gradio()
    names = class_names(ckpt.config.data.dataset)
    view = ckpt.config.data.view
    figures = FigureCache(ckpt.permutation, names, view)
    # delete_cache: a long-running demo would otherwise pile up every figure it served in gradio's temp folder
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(600, 3600)) as app:
        page = _page(gr, title, names, view)
        _wire(gr, app, page, _predictor(gr, ckpt, figures))
    # Requests beyond the running ones wait in gradio's queue, in order, up to QUEUE_SIZE; more are turned away.
    # Queue positions go out every 2 s rather than to every waiting client after every answer (N^2 messages).
    app.queue(status_update_rate=2.0, default_concurrency_limit=CONCURRENCY, max_size=QUEUE_SIZE)
    return app


@dataclass
class _Page:
    """The page's components that the events read or write."""

    pad: Any
    button: Any
    message: Any
    label: Any
    seen: Any
    evolution: Any
    step_view: Any
    slider: Any
    play_button: Any
    caption: Any
    gates: Any
    state: Any

    def outputs(self) -> list:
        """What a prediction (or a cleared canvas) fills, in the order of :func:`_predictor`'s values."""
        return [self.step_view, self.label, self.evolution, self.gates, self.message, self.state, self.slider,
                self.caption, self.seen]


def _page(gr: Any, title: str, names: list[str], view: str) -> _Page:
    """Lay out the page inside the open Blocks: the sketchpad and the answers, the step view, the gates."""
    word = "row" if view == "rows" else "pixel"
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
    return _Page(pad, button, message, label, seen, evolution, step_view, slider, play_button, caption, gates,
                 gr.State(None))


def _wire(gr: Any, app: Any, page: _Page, handle: Callable[[Any], tuple]) -> None:
    """The page's events: read the drawing, clear it, scrub the step view, play it."""
    outputs = page.outputs()
    page.button.click(handle, inputs=page.pad, outputs=outputs, api_name="predict", concurrency_limit=CONCURRENCY)

    def clear():
        return _empty(gr, "")

    page.pad.clear(clear, outputs=outputs, js=SELECT_BRUSH_JS, api_name=False, queue=False)
    # Scrubbing and playing are pure numpy on the session's own arrays: no lock, their own concurrency slots.
    page.slider.input(_scrub, inputs=[page.state, page.slider], outputs=[page.step_view, page.caption],
                      api_name=False, trigger_mode="always_last", show_progress="hidden", concurrency_id="scrub",
                      concurrency_limit=CONCURRENCY)
    page.play_button.click(_play, inputs=page.state, outputs=[page.slider, page.step_view, page.caption],
                           api_name=False, show_progress="hidden", concurrency_id="play", concurrency_limit=8)
    app.load(None, js=SELECT_BRUSH_JS)


def _empty(gr: Any, message: str) -> tuple:
    """The page's outputs with nothing to show but ``message`` (a blank or cleared canvas)."""
    return None, None, None, None, message, None, gr.update(value=1, interactive=False), "", None


def _predictor(gr: Any, ckpt: Checkpoint, figures: FigureCache) -> Callable[[Any], tuple]:
    """The handler of **Read my digit**: a drawing -> the page's outputs, the step view at the last step."""
    def handle(drawing):
        r = predict_drawing(ckpt, drawing, figure_cache=figures)
        if not r.ok:
            return _empty(gr, r.message)
        data = r.step_data
        last = data.steps
        return (render_step(data, last), r.probabilities, r.evolution, r.gates, r.message, data,
                gr.update(value=last, maximum=last, interactive=True), step_caption(data, last),
                input_picture(r.digit))

    return handle


def _scrub(data, step):
    """The step view at the slider's step (nothing before a drawing was read)."""
    if data is None:
        return None, ""
    return render_step(data, int(step)), step_caption(data, int(step))


def _play(data):
    """The step view step after step, up to the last one, at a pace the eye can follow."""
    if data is None:
        return
    stride = max(1, data.steps // 28)  # the pixel views play 28 stops, not 784
    for t in [*range(1, data.steps, stride), data.steps]:
        yield t, render_step(data, t), step_caption(data, t)
        time.sleep(PLAY_DELAY)


def require_gradio():
    """gradio, or a one-line hint to install it (the demo's optional extra)."""
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


def serve(ckpt: Checkpoint, host: str = "127.0.0.1", port: int = 7860) -> None:
    """Build the app for ``ckpt`` and serve it on host:port until Ctrl+C, set up for many small requests at once."""
    from PIL import Image

    # Each request is one small sample: more intra-op threads per request only fight the concurrent requests.
    torch.set_num_threads(1)
    # Uploads are decoded by gradio before the demo sees them: PIL refuses above twice this, before decoding.
    Image.MAX_IMAGE_PIXELS = MAX_DRAWING_PIXELS // 2
    app = build_app(ckpt)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"lstmlab demo: binding {host}: anyone who can reach this machine can use the demo")
    launch(app, host, port, block=True)
