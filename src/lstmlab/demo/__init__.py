"""Draw a digit in the browser and watch the LSTM read it (``lstmlab demo`` serves it).

``drawing`` (a drawing -> everything the page shows: :func:`predict_drawing`, testable without gradio) reads
``figures`` (the gates and the guess per step, refilled per drawing) and ``steps`` (the step-by-step view, pure
numpy); ``app`` is the Gradio page around them (:func:`build_app`, :func:`launch`, :func:`serve`), the one module
that imports gradio, when an app is built.
"""

from __future__ import annotations

from lstmlab.demo.app import build_app, launch, require_gradio, serve
from lstmlab.demo.drawing import (
    BLANK_MESSAGE,
    MAX_DRAWING_PIXELS,
    DrawingResult,
    drawing_to_image,
    input_picture,
    predict_drawing,
)
from lstmlab.demo.figures import DPI, EvolutionFigure, FigureCache, evolution_figure
from lstmlab.demo.steps import STEP_PANEL, StepData, render_step, step_caption, step_data

__all__ = ["BLANK_MESSAGE", "DPI", "MAX_DRAWING_PIXELS", "STEP_PANEL", "DrawingResult", "EvolutionFigure",
           "FigureCache", "StepData", "build_app", "drawing_to_image", "evolution_figure", "input_picture", "launch",
           "predict_drawing", "render_step", "require_gradio", "serve", "step_caption", "step_data"]
