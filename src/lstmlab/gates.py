"""Draw what the LSTM does while it reads one image: ``lstmlab gates``.

One figure: the input image with the current step marked, the class probabilities after every step,
and heatmaps (hidden unit x time step) of the gates i, f, g, o and the states c, h of one layer.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lstmlab.errors import LstmlabError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from lstmlab.inspect import Recording

# name -> (title, colour map, fixed range or None for symmetric around 0)
PANELS: dict[str, tuple[str, str, tuple[float, float] | None]] = {
    "i": ("i: input gate — how much of g is written (0..1)", "viridis", (0.0, 1.0)),
    "f": ("f: forget gate — how much of c is kept (0..1)", "viridis", (0.0, 1.0)),
    "g": ("g: candidate — what could be written (−1..1)", "RdBu_r", (-1.0, 1.0)),
    "o": ("o: output gate — how much of tanh(c) is shown (0..1)", "viridis", (0.0, 1.0)),
    "c": ("c: cell state — the memory (unbounded)", "RdBu_r", None),
    "h": ("h: hidden state = o · tanh(c) (−1..1)", "RdBu_r", (-1.0, 1.0)),
}


def step_position(view: str, step: int, permutation: Tensor | None = None) -> tuple[int, int | None]:
    """Where step ``step`` reads in the 28x28 image: (row, column), column None for a whole row."""
    if view == "rows":
        return step, None
    pixel = int(permutation[step]) if view == "permuted" and permutation is not None else step
    return pixel // 28, pixel % 28


def _time_label(view: str) -> str:
    return {"rows": "time step = image row read", "pixels": "time step = pixel read (row-major)",
            "permuted": "time step = pixel read (fixed shuffle)"}.get(view, "time step")


def draw_image(ax, image: Tensor, view: str, step: int, permutation: Tensor | None, title: str) -> None:
    """The 28x28 input with the pixels read at ``step`` outlined."""
    from matplotlib.patches import Rectangle

    ax.imshow(image.cpu().numpy(), cmap="gray", vmin=0, vmax=255)
    row, col = step_position(view, step, permutation)
    if col is None:
        ax.add_patch(Rectangle((-0.5, row - 0.5), 28, 1, fill=False, edgecolor="red", linewidth=2))
        where = f"row {row}"
    else:
        ax.add_patch(Rectangle((col - 1.5, row - 1.5), 3, 3, fill=False, edgecolor="red", linewidth=2))
        where = f"pixel ({row}, {col})"
    ax.set_title(f"{title}\nred: step {step} reads {where}", fontsize=10)
    ax.set_xticks([0, 9, 18, 27])
    ax.set_yticks([0, 9, 18, 27])


def draw_probs(fig, ax, probs: Tensor | None, note: str, names: list[str], step: int, view: str) -> None:
    """Classes x time heatmap of the prediction after each step, or the reason there is none."""
    if probs is None:
        ax.text(0.5, 0.5, note, ha="center", va="center", wrap=True, transform=ax.transAxes)
        ax.set_axis_off()
        return
    p = probs.detach().float().cpu().numpy().T  # (C, T)
    image = ax.imshow(p, aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="probability", fraction=0.04, pad=0.02)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel(_time_label(view))
    ax.axvline(step, color="cyan", linestyle="--", linewidth=1)
    final = int(p[:, -1].argmax())
    ax.set_title(f"The guess after each step (class probabilities) — final: {names[final]} ({100 * p[final, -1]:.1f}%)",
                 fontsize=10)


def draw_final_bars(ax, probs: Tensor, names: list[str]) -> None:
    """Horizontal bars of the final class probabilities, the top one highlighted."""
    p = probs.detach().float().cpu().tolist()
    top = max(range(len(p)), key=p.__getitem__)
    ax.barh(range(len(p)), p, color=["tab:red" if k == top else "tab:gray" for k in range(len(p))])
    ax.set_yticks(range(len(p)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability")
    ax.set_title("Final prediction", fontsize=10)
    for k, v in enumerate(p):
        if v >= 0.01:
            ax.text(min(v + 0.02, 0.8), k, f"{100 * v:.0f}%", va="center", fontsize=8)


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
) -> Figure:
    """The whole picture for sample ``sample`` of a recording; ``image`` is its uint8 (28, 28) input."""
    from lstmlab.plots import new_figure

    layer_rec = rec.get(layer, direction)
    steps = layer_rec.h.size(1)
    step = steps - 1 if step is None else step
    if not 0 <= step < steps:
        raise LstmlabError(f"--step must be in 0..{steps - 1}, got {step}")
    fig = new_figure(17, 12, dpi=dpi)
    outer = fig.add_gridspec(3, 1, height_ratios=[1.0, 1.0, 1.0], hspace=0.42,
                             left=0.05, right=0.96, top=0.91, bottom=0.05)
    top = outer[0].subgridspec(1, 3, width_ratios=[1.0, 3.2, 1.2], wspace=0.25)
    draw_image(fig.add_subplot(top[0]), image, view, step, permutation, image_title)
    probs = rec.probs[sample] if rec.probs is not None else None
    draw_probs(fig, fig.add_subplot(top[1]), probs, rec.probs_note, names, step, view)
    draw_final_bars(fig.add_subplot(top[2]), torch.softmax(rec.logits[sample].float(), 0), names)

    grid = outer[1:].subgridspec(2, 3, hspace=0.42, wspace=0.22)
    for k, (name, (panel_title, cmap, limits)) in enumerate(PANELS.items()):
        ax = fig.add_subplot(grid[k // 3, k % 3])
        values = layer_rec[name][sample].detach().float().cpu().numpy().T  # (H, T)
        if limits is None:
            bound = max(float(abs(values).max()), 1e-6)
            limits = (-bound, bound)
        heat = ax.imshow(values, aspect="auto", cmap=cmap, vmin=limits[0], vmax=limits[1], interpolation="nearest")
        fig.colorbar(heat, ax=ax, fraction=0.05, pad=0.02)
        ax.axvline(step, color="black" if cmap == "RdBu_r" else "white", linestyle="--", linewidth=1)
        ax.set_title(panel_title, fontsize=10)
        if k % 3 == 0:  # one label per row: the colour bars leave no room between panels
            ax.set_ylabel("hidden unit")
        ax.set_xlabel(_time_label(view), fontsize=9)
    where = f"layer {layer_rec.layer + 1} of {rec.num_layers}"
    if rec.num_directions == 2:
        where += ", forward direction" if direction == 0 else ", reverse direction (reads from the last step)"
    fig.suptitle(f"{title}  —  {where}" if title else f"Inside the LSTM — {where}", fontsize=13)
    return fig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a .safetensors checkpoint written by `lstmlab train`")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--index", type=int, help="which image of --split to read (0-based)")
    source.add_argument("--image", help="your own image of a digit (any format Pillow reads)")
    parser.add_argument("--out", default="gates.png",
                        help="figure to write, .png, .jpg, .pdf or .svg (default gates.png)")
    parser.add_argument("--split", choices=["test", "train"], default="test", help="split for --index (default test)")
    parser.add_argument("--data-dir", help="folder holding the dataset's IDX files (offline use)")
    parser.add_argument("--layer", type=int, default=-1, help="which LSTM layer to draw (default the last, -1)")
    parser.add_argument("--direction", choices=["forward", "reverse"], default="forward",
                        help="for a bidirectional model: which direction to draw")
    parser.add_argument("--step", type=int, help="the step to mark in every panel (default the last)")


def run(args: argparse.Namespace) -> int:
    from lstmlab.checkpoint import load_checkpoint
    from lstmlab.inspect import record
    from lstmlab.plots import check_figure_path, save_figure
    from lstmlab.predict import class_names, load_digit, model_input

    check_figure_path(args.out)  # a bad --out is found before the checkpoint and data are read
    ckpt = load_checkpoint(args.checkpoint)
    dataset = ckpt.config.data.dataset
    names = class_names(dataset)
    if args.image is not None:
        image = load_digit(args.image)
        image_title = f"{Path(args.image).name} (preprocessed)"
    else:
        from lstmlab.data import load_dataset

        images, labels = load_dataset(dataset, args.split, data_dir=args.data_dir)
        if not 0 <= args.index < len(labels):
            raise LstmlabError(
                f"--index {args.index} is out of range: the {args.split} split of {dataset} has {len(labels)} "
                f"images (0..{len(labels) - 1})"
            )
        image = images[args.index]
        image_title = f"{dataset} {args.split} #{args.index}, label {names[int(labels[args.index])]}"
    rec = record(ckpt.model, model_input(ckpt, image[None]))
    direction = 0 if args.direction == "forward" else 1
    fig = gates_figure(rec, image, ckpt.config.data.view, names, layer=args.layer, direction=direction,
                       step=args.step, permutation=ckpt.permutation, title=f"{Path(args.checkpoint).name}",
                       image_title=image_title)
    print(f"wrote {save_figure(fig, args.out)}")
    return 0
