"""The demo's two matplotlib figures, built on the first drawing and refilled for every later one: the gates
(heatmaps of :class:`lstmlab.analysis.gates.GatesFigure`, cropped to them) and each class's probability after every
step (:class:`EvolutionFigure`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 64  # the page shows the figures about this size; every pixel more costs drawing and PNG time per request


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
