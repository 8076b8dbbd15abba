"""Draw what the LSTM does while it reads one image (``lstmlab gates``, the demo's step view).

One figure: the input image with the current step marked, the class probabilities after every step,
and heatmaps (hidden unit x time step) of the gates i, f, g, o and the states c, h of one layer; for a variant
model, heatmaps of its own terms below them (``VARIANT_PANELS``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lstmlab.errors import LstmlabError
from lstmlab.nn.variants import SIGNALS

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.axes import Axes
    from matplotlib.backend_bases import RendererBase
    from matplotlib.figure import Figure
    from matplotlib.image import AxesImage

    from lstmlab.analysis.recording import Recording

# name -> (title, colour map, fixed range or None for symmetric around 0)
PANELS: dict[str, tuple[str, str, tuple[float, float] | None]] = {
    "i": ("i: input gate — how much of g is written (0..1)", "viridis", (0.0, 1.0)),
    "f": ("f: forget gate — how much of c is kept (0..1)", "viridis", (0.0, 1.0)),
    "g": ("g: candidate — what could be written (−1..1)", "RdBu_r", (-1.0, 1.0)),
    "o": ("o: output gate — how much of tanh(c) is shown (0..1)", "viridis", (0.0, 1.0)),
    "c": ("c: cell state — the memory (unbounded)", "RdBu_r", None),
    "h": ("h: hidden state = o · tanh(c) (−1..1)", "RdBu_r", (-1.0, 1.0)),
}
# A variant's own terms (lstm_step's signals, c' the new cell and h' the new hidden state before zoneout), drawn in
# the variants' table order below the gates when the recording has them; a signal without a title (LayerNorm's z_i,
# z_g and z_o: i, g and o above are their squashed values) is recorded, not drawn.
VARIANT_PANELS: dict[str, tuple[str, str, tuple[float, float] | None]] = {
    s.name: (s.title, "RdBu_r", None) for s in SIGNALS if s.title
}


def panels(layer_rec: Any) -> dict[str, tuple[str, str, tuple[float, float] | None]]:
    """The heatmaps to draw for one layer's record: the six of ``PANELS``, then its variant's ``VARIANT_PANELS``."""
    return PANELS | {name: panel for name, panel in VARIANT_PANELS.items() if name in layer_rec.extra}


def panel_values(layer_rec: Any, name: str, sample: int, rows: np.ndarray) -> np.ndarray:
    """One heatmap's data: gate or signal ``name`` of one sample as (H, T), the units in display order ``rows``."""
    return layer_rec[name][sample].detach().float().cpu().numpy().T[rows]


def step_position(view: str, step: int, permutation: Tensor | None = None) -> tuple[int, int | None]:
    """Where step ``step`` (counted from 0, as an index) reads in the 28x28 image: (row, column) as indices,
    column None for a whole row."""
    if view == "rows":
        return step, None
    pixel = int(permutation[step]) if view == "permuted" and permutation is not None else step
    return pixel // 28, pixel % 28


def _time_label(view: str) -> str:
    return {"rows": "time step = image row read", "pixels": "time step = pixel read (row-major)",
            "permuted": "time step = pixel read (fixed shuffle)"}.get(view, "time step")


def count_from_one(ax: Axes, steps: int) -> None:
    """Label an axes' time axis 1..T: every label a reader sees (figure, CLI, demo message, slider) counts steps,
    rows and columns from 1."""
    ticks = sorted({0, *range(4, steps, 5), steps - 1})
    ax.set_xticks(ticks, labels=[str(t + 1) for t in ticks])


def draw_image(ax: Axes, image: Tensor, view: str, step: int, permutation: Tensor | None,
               title: str) -> AxesImage:
    """The 28x28 input with the pixels read at step index ``step`` outlined; returns the image artist."""
    from matplotlib.patches import Rectangle

    shown = ax.imshow(image.cpu().numpy(), cmap="gray", vmin=0, vmax=255)
    row, col = step_position(view, step, permutation)
    if col is None:
        ax.add_patch(Rectangle((-0.5, row - 0.5), 28, 1, fill=False, edgecolor="red", linewidth=2))
        where = f"row {row + 1}"
    else:
        ax.add_patch(Rectangle((col - 1.5, row - 1.5), 3, 3, fill=False, edgecolor="red", linewidth=2))
        where = f"row {row + 1}, column {col + 1}"
    ax.set_title(f"{title}\nred: step {step + 1} reads {where}", fontsize=10)
    ax.set_xticks([0, 9, 18, 27], labels=["1", "10", "19", "28"])
    ax.set_yticks([0, 9, 18, 27], labels=["1", "10", "19", "28"])
    return shown


def _probs_title(p, names: list[str]) -> str:
    final = int(p[:, -1].argmax())
    return f"The guess after each step (class probabilities) — final: {names[final]} ({100 * p[final, -1]:.1f}%)"


def draw_probs(fig: Figure, ax: Axes, probs: Tensor | None, note: str, names: list[str], step: int,
               view: str) -> AxesImage | None:
    """Classes x time heatmap of the prediction after each step, or the reason there is none; returns the heatmap
    artist (None without probabilities)."""
    if probs is None:
        ax.text(0.5, 0.5, note, ha="center", va="center", wrap=True, transform=ax.transAxes)
        ax.set_axis_off()
        return None
    p = probs.detach().float().cpu().numpy().T  # (C, T)
    image = ax.imshow(p, aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="probability", fraction=0.04, pad=0.02)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel(_time_label(view))
    count_from_one(ax, p.shape[1])
    ax.axvline(step, color="cyan", linestyle="--", linewidth=1)
    ax.set_title(_probs_title(p, names), fontsize=10)
    return image


def _update_bars(bars, texts, p: list[float]) -> None:
    top = max(range(len(p)), key=p.__getitem__)
    for k, (bar, text, v) in enumerate(zip(bars, texts, p, strict=True)):
        bar.set_width(v)
        bar.set_color("tab:red" if k == top else "tab:gray")
        text.set_x(min(v + 0.02, 0.8))
        text.set_text(f"{100 * v:.0f}%" if v >= 0.01 else "")


def draw_final_bars(ax: Axes, probs: Tensor, names: list[str]) -> tuple[Any, list[Any]]:
    """Horizontal bars of the final class probabilities, the top one highlighted; returns (bars, labels)."""
    p = probs.detach().float().cpu().tolist()
    bars = ax.barh(range(len(p)), p)
    ax.set_yticks(range(len(p)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability")
    ax.set_title("Final prediction", fontsize=10)
    texts = [ax.text(0, k, "", va="center", fontsize=8) for k in range(len(p))]
    _update_bars(bars, texts, p)
    return bars, texts


# how the heatmaps' rows (hidden units) may be ordered -> the axis label that states it
UNIT_ORDERS = {
    "index": "hidden unit (index order)",
    "change": "hidden unit (sorted by the step\nwhere its gates change most)",
}


def unit_order(layer_rec: Any, sample: int = 0, order: str = "change") -> np.ndarray:
    """The display order of the hidden units: ``index`` as stored; ``change`` by the time step at which the unit's
    four gates together change most (|Δi|+|Δf|+|Δg|+|Δo| from one step to the next), earliest first, ties broken
    by the size of that change, largest first. Units that react to the same part of the input then sit together,
    so a heatmap shows bands instead of noise."""
    import numpy as np

    hidden = layer_rec.h.size(2)
    if order == "index" or layer_rec.h.size(1) < 2:
        return np.arange(hidden)
    change = sum(layer_rec[g][sample].detach().float().cpu().diff(dim=0).abs() for g in "ifgo")  # (T-1, H)
    size, when = change.max(dim=0)  # (H,), (H,)
    return np.lexsort((-size.numpy(), when.numpy()))


class GatesFigure:
    """The gates figure of one sample, built once and then refilled: ``update`` puts a new recording in,
    ``to_array`` renders it. After the first ``to_array`` only what changes is redrawn over a cached background
    (blitting), which makes the demo's figure some 20 times cheaper than drawing a new one. Not thread-safe: one
    thread at a time per object. ``step`` is the step to mark, counted from 1 (default: the last). ``live_title``
    False keeps the probability panel's title fixed (it otherwise names the final guess), which saves redrawing
    text. With ``order`` other than ``index`` each recording sorts the units anew; ``unit_labels`` then labels a
    few heatmap rows with the unit they show, and a new recording redraws those labels (the slow path); without
    them the rows carry no unit numbers and ``update`` stays fast. A variant model's own terms (``VARIANT_PANELS``)
    add rows of panels below the six gates, the figure growing 4 inches a row."""

    def __init__(
        self,
        rec: Recording,
        image: Tensor,
        view: str,
        names: list[str],
        *,
        sample: int = 0,
        layer: int = -1,
        direction: int = 0,
        step: int | None = None,
        permutation: Tensor | None = None,
        title: str = "",
        image_title: str = "input",
        dpi: int = 100,
        live_title: bool = True,
        order: str = "index",
        unit_labels: bool = True,
    ) -> None:
        from lstmlab.analysis.figures import new_figure

        if order not in UNIT_ORDERS:
            raise LstmlabError(f"unknown unit order {order!r}; choose one of {', '.join(UNIT_ORDERS)}")
        self.order, self.unit_labels = order, unit_labels and order != "index"

        layer_rec = rec.get(layer, direction)
        steps = layer_rec.h.size(1)
        step = steps if step is None else step
        if not 1 <= step <= steps:
            raise LstmlabError(f"--step must be in 1..{steps} (steps count from 1), got {step}")
        step -= 1  # an index from here on
        self.names, self.layer, self.direction = names, layer, direction
        self.panels = panels(layer_rec)
        self.shape = (len(rec.layers), steps, layer_rec.h.size(2), rec.probs is not None, tuple(self.panels))
        extra_rows = -(-(len(self.panels) - len(PANELS)) // 3)  # the variant's panels, three to a row
        height = 12 + 4 * extra_rows
        fig = self.fig = new_figure(17, height, dpi=dpi)
        # margins in inches, as the plain figure's: a taller figure adds rows, not space around them
        outer = fig.add_gridspec(3 + extra_rows, 1, height_ratios=[1.0] * (3 + extra_rows), hspace=0.42,
                                 left=0.05, right=0.96, top=1 - 1.08 / height, bottom=0.6 / height)
        top = outer[0].subgridspec(1, 3, width_ratios=[1.0, 3.2, 1.2], wspace=0.25)
        self.image = draw_image(fig.add_subplot(top[0]), image, view, step, permutation, image_title)
        probs = rec.probs[sample] if rec.probs is not None else None
        self.probs_ax = fig.add_subplot(top[1])
        self.probs = draw_probs(fig, self.probs_ax, probs, rec.probs_note, names, step, view)
        self.live_title = live_title and self.probs is not None  # the title names the final guess
        if self.probs is not None and not live_title:
            self.probs_ax.set_title("The guess after each step (class probabilities)", fontsize=10)
        self.bars, self.bar_texts = draw_final_bars(fig.add_subplot(top[2]),
                                                    torch.softmax(rec.logits[sample].float(), 0), names)
        self._draw_heatmaps(outer[1:].subgridspec(2 + extra_rows, 3, hspace=0.42, wspace=0.22), layer_rec, sample,
                            step, view)
        where = f"layer {layer_rec.layer + 1} of {rec.num_layers}"
        if rec.num_directions == 2:
            where += ", forward direction" if direction == 0 else ", reverse direction (reads from the last step)"
        if rec.zoneout == "sample" and "zone_c" in self.panels:
            where += ", zoneout masks drawn as in training (nonzero = the unit was zoned out)"
        fig.suptitle(f"{title}  —  {where}" if title else f"Inside the LSTM — {where}", fontsize=13)
        self._background = None

    def _draw_heatmaps(self, grid: Any, layer_rec: Any, sample: int, step: int, view: str) -> None:
        """Every panel of ``self.panels``, three to a row of ``grid``, units in ``self.order``."""
        self.heat, self.colorbars = {}, {}
        rows = unit_order(layer_rec, sample, self.order)
        for k, name in enumerate(self.panels):
            ax = self.fig.add_subplot(grid[k // 3, k % 3])
            self._draw_heatmap(ax, name, panel_values(layer_rec, name, sample, rows), step)
            if self.order != "index":  # rows are no longer unit numbers: label a few with the unit they show, or none
                self._label_units(ax, rows)
            if k % 3 == 0:  # one label per row: the colour bars leave no room between panels
                ax.set_ylabel(UNIT_ORDERS[self.order], fontsize=9)
            ax.set_xlabel(_time_label(view), fontsize=9)
            count_from_one(ax, layer_rec.h.size(1))

    def _draw_heatmap(self, ax: Axes, name: str, values: np.ndarray, step: int) -> None:
        """Panel ``name``: values (H, T) as a heatmap with its colour bar, step index ``step`` marked."""
        panel_title, cmap, limits = self.panels[name]
        low, high = limits if limits is not None else self._symmetric(values)
        heat = ax.imshow(values, aspect="auto", cmap=cmap, vmin=low, vmax=high, interpolation="nearest")
        self.heat[name] = heat
        self.colorbars[name] = self.fig.colorbar(heat, ax=ax, fraction=0.05, pad=0.02)
        if limits is None:
            self._symmetric_ticks(name)
        ax.axvline(step, color="black" if cmap == "RdBu_r" else "white", linestyle="--", linewidth=1)
        ax.set_title(panel_title, fontsize=10)

    def _label_units(self, ax: Axes, rows: np.ndarray) -> None:
        ticks = list(range(0, len(rows), max(1, len(rows) // 8))) if self.unit_labels else []
        ax.set_yticks(ticks, labels=[str(int(rows[t])) for t in ticks], fontsize=8)

    def _symmetric_ticks(self, name: str) -> None:
        """Three ticks, -bound, 0 and +bound, on a colour bar whose range follows the data: the bound is what the
        reader needs, and a new drawing redraws three labels instead of nine."""
        low, high = self.heat[name].get_clim()
        self.colorbars[name].set_ticks([low, 0.0, high], labels=[f"{low:.2g}", "0", f"{high:.2g}"])

    @staticmethod
    def _symmetric(values) -> tuple[float, float]:
        bound = max(float(abs(values).max()), 1e-6)
        return -bound, bound

    def _images(self) -> list:
        return [self.image, *self.heat.values()] + ([self.probs] if self.probs is not None else [])

    def _dynamic(self) -> list:
        """The artists a new recording changes, other than the images (``_ImagePixels`` paints those); everything
        else is the cached background."""
        artists = [*self.bars, *self.bar_texts] + ([self.probs_ax.title] if self.live_title else [])
        unbounded = [name for name, (_, _, limits) in self.panels.items() if limits is None]
        return artists + [self.colorbars[name].ax for name in unbounded]  # their ticks follow the data

    def update(self, rec: Recording, image: Tensor, sample: int = 0) -> GatesFigure:
        """Show another recording of a model of the same shape (layers, steps, hidden size)."""
        layer_rec = rec.get(self.layer, self.direction)
        shape = (len(rec.layers), layer_rec.h.size(1), layer_rec.h.size(2), rec.probs is not None,
                 tuple(panels(layer_rec)))
        if shape != self.shape:
            raise ValueError("GatesFigure.update needs a recording of the same model shape and variant")
        self.image.set_data(image.cpu().numpy())
        if self.probs is not None:
            p = rec.probs[sample].detach().float().cpu().numpy().T  # (C, T)
            self.probs.set_data(p)
            if self.live_title:
                self.probs_ax.set_title(_probs_title(p, self.names), fontsize=10)
        _update_bars(self.bars, self.bar_texts, torch.softmax(rec.logits[sample].float(), 0).cpu().tolist())
        rows = unit_order(layer_rec, sample, self.order)
        for name, (_, _, limits) in self.panels.items():
            values = panel_values(layer_rec, name, sample, rows)
            self.heat[name].set_data(values)
            if limits is None:
                self.heat[name].set_clim(*self._symmetric(values))
                self._symmetric_ticks(name)
            if self.unit_labels:  # the labels are part of the cached background: draw it anew
                self._label_units(self.heat[name].axes, rows)
                self._background = None
        return self

    def to_array(self) -> np.ndarray:
        """The figure as an RGB array (H, W, 3). The first call draws the figure without its images and dynamic
        artists, keeps that background, and measures where each image goes; every call then restores the
        background, paints the images' pixels straight into it and draws the few dynamic artists on top."""
        import numpy as np

        canvas = self.fig.canvas
        if self._background is None:
            for artist in [*self._images(), *self._dynamic()]:
                artist.set_animated(True)  # left out of the background
            canvas.draw()
            self._background = canvas.copy_from_bbox(self.fig.bbox)
            with_marks = np.array(canvas.buffer_rgba())
            marks = [a for im in self._images() for a in (*im.axes.lines, *im.axes.patches, *im.axes.spines.values())]
            for mark in marks:
                mark.set_visible(False)
            canvas.draw()
            without_marks = np.array(canvas.buffer_rgba())
            for mark in marks:
                mark.set_visible(True)
            renderer = canvas.get_renderer()
            self._pixels = [_ImagePixels(im, renderer, with_marks, without_marks) for im in self._images()]
        canvas.restore_region(self._background)
        buffer = np.asarray(canvas.buffer_rgba())
        for pixels in self._pixels:
            pixels.paint(buffer)
        for artist in self._dynamic():
            self.fig.draw_artist(artist)
        from lstmlab.analysis.figures import rgba_to_rgb

        return rgba_to_rgb(canvas.buffer_rgba())


class _ImagePixels:
    """Paints an ``imshow`` image (nearest-neighbour, opaque) straight into an Agg RGBA buffer, leaving the pixels
    of the marks drawn over it (step line, frame, outline) as they are in the background: about ten times cheaper
    than matplotlib's resampling and redrawing the marks, for the same picture up to the marks' anti-aliased
    edges."""

    def __init__(self, image: AxesImage, renderer: RendererBase, with_marks: np.ndarray,
                 without_marks: np.ndarray) -> None:
        import numpy as np

        self.image = image
        height = with_marks.shape[0]
        x0, y0, x1, y1 = image.get_window_extent(renderer).extents  # display pixels, y upwards
        box = image.axes.bbox
        cx0, cy0, cx1, cy1 = max(x0, box.x0), max(y0, box.y0), min(x1, box.x1), min(y1, box.y1)
        cols = np.arange(int(np.floor(cx0)), int(np.ceil(cx1)))
        cols = cols[(cols + 0.5 >= cx0) & (cols + 0.5 < cx1)]
        rows = np.arange(int(np.floor(height - cy1)), int(np.ceil(height - cy0)))  # buffer rows, top down
        rows = rows[(height - rows - 0.5 >= cy0) & (height - rows - 0.5 < cy1)]
        n_rows, n_cols = image.get_array().shape[:2]
        flipped = image.origin == "lower"
        self.rows = slice(int(rows[0]), int(rows[-1]) + 1)
        self.cols = slice(int(cols[0]), int(cols[-1]) + 1)
        self.data_cols = np.clip(((cols + 0.5 - x0) / (x1 - x0) * n_cols).astype(int), 0, n_cols - 1)
        from_top = (y1 - (height - rows - 0.5)) / (y1 - y0)
        self.data_rows = np.clip(((1 - from_top if flipped else from_top) * n_rows).astype(int), 0, n_rows - 1)
        region = (self.rows, self.cols)
        self.keep = (with_marks[region] != without_marks[region]).any(-1)[..., None]  # the marks' pixels
        self.lut = np.round(image.get_cmap()(np.linspace(0.0, 1.0, 256)) * 255).astype(np.uint8)  # (256, 4)

    def paint(self, buffer: np.ndarray) -> None:
        """Write the image's current data and colour limits into ``buffer`` (H, W, 4)."""
        import numpy as np

        data = np.asarray(self.image.get_array(), dtype=np.float64)
        low, high = self.image.get_clim()
        scaled = (data - low) / (high - low if high > low else 1.0)
        index = np.clip(np.nan_to_num(scaled * 256), 0, 255).astype(np.intp)  # as Colormap: N bins, 1.0 in the last
        colours = self.lut[index[self.data_rows][:, self.data_cols]]
        np.copyto(buffer[self.rows, self.cols], colours, where=~self.keep)


def gates_figure(
    rec: Recording,
    image: Tensor,
    view: str,
    names: list[str],
    *,
    sample: int = 0,
    layer: int = -1,
    direction: int = 0,
    step: int | None = None,
    permutation: Tensor | None = None,
    title: str = "",
    image_title: str = "input",
    dpi: int = 100,
    order: str = "index",
) -> Figure:
    """The whole picture for sample ``sample`` of a recording; ``image`` is its uint8 (28, 28) input; ``step``
    (counted from 1, default the last) is marked in every panel. ``order``
    orders the heatmaps' hidden units (see ``unit_order``)."""
    return GatesFigure(rec, image, view, names, sample=sample, layer=layer, direction=direction, step=step,
                       permutation=permutation, title=title, image_title=image_title, dpi=dpi, order=order).fig
