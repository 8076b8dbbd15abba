"""Figures of a training run: loss and accuracy curves, confusion matrix, misclassified test digits (drawn by
``lstmlab plot RUN_DIR``); and the matplotlib helpers every figure of lstmlab uses.

Figures are made with ``matplotlib.figure.Figure`` and the Agg canvas directly, never pyplot, so no
global backend or figure registry is touched and nothing needs a display.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lstmlab.errors import LstmlabError
from lstmlab.files import atomic_write_bytes

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure

METRIC_COLUMNS = ("iteration", "train_loss", "val_loss", "val_accuracy", "lr")


def new_figure(width: float, height: float, dpi: int = 100) -> Figure:
    """A matplotlib Figure on the Agg canvas (no pyplot, no display); size in inches."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise LstmlabError("figures need matplotlib: pip install 'lstmlab[plot]'") from None
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


# file suffix -> matplotlib format; anything else is refused before the figure is drawn
FIGURE_FORMATS: dict[str, str] = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".pdf": "pdf", ".svg": "svg"}


def figure_format(path: str | Path, flag: str = "--out") -> str:
    """The format a figure is written in, from the file's suffix; an unknown suffix is a one-line error."""
    suffix = Path(path).suffix.lower()
    if suffix not in FIGURE_FORMATS:
        raise LstmlabError(f"{flag} {path}: cannot write figures as {suffix or 'a file without a suffix'}; "
                           f"name it .png, .jpg, .pdf or .svg")
    return FIGURE_FORMATS[suffix]


def check_figure_path(path: str | Path, flag: str = "--out") -> Path:
    """Before drawing: the suffix is a known format and the file can be written there; returns the path."""
    from lstmlab.files import check_writable

    if Path(path).is_dir():  # "a folder" says more than "no suffix"
        check_writable(path, flag)
    figure_format(path, flag)
    return check_writable(path, flag)


def save_figure(fig: Figure, path: str | Path, flag: str = "--out") -> Path:
    """Save a figure atomically (temp file beside it, then rename) in the format its suffix names (PNG, JPEG, PDF,
    SVG); returns the path. An OS error (read-only, full disk, ...) is a one-line error and the old file stays."""
    from lstmlab.files import os_error

    path = Path(path)
    if path.is_dir():
        raise LstmlabError(f"{flag} {path} is a folder; give a file name such as {path / 'figure.png'}")
    kind = figure_format(path, flag)
    buf = io.BytesIO()
    options = {"pil_kwargs": {"quality": 90}} if kind == "jpeg" else {}
    fig.savefig(buf, format=kind, dpi=fig.dpi, **options)
    try:
        atomic_write_bytes(path, buf.getvalue())
    except LstmlabError:  # already one line (files words its own OS errors)
        raise
    except OSError as e:
        raise os_error(e, path, "write") from None
    return path


def rgba_to_rgb(buffer: Any) -> np.ndarray:
    """An RGB uint8 array (H, W, 3) from an Agg RGBA buffer (H, W, 4); Pillow's conversion, several times faster
    than numpy's strided copy."""
    import numpy as np
    from PIL import Image

    rgba = np.asarray(buffer)
    return np.asarray(Image.frombuffer("RGBA", (rgba.shape[1], rgba.shape[0]), rgba, "raw", "RGBA", 0, 1)
                      .convert("RGB"))


def figure_to_array(fig: Figure) -> np.ndarray:
    """Render a figure to an RGB numpy array (H, W, 3), for the demo's image outputs."""
    fig.canvas.draw()
    return rgba_to_rgb(fig.canvas.buffer_rgba())


# ---------------------------------------------------------------------------------------------
# reading a run


def read_metrics(path: Path) -> dict[str, list[float]]:
    """metrics.csv -> columns as float lists (NaN where a value is empty, e.g. no validation split)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise LstmlabError(f"{path} is missing; is this a run folder written by `lstmlab train`?") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise LstmlabError(f"cannot read {path}: {e}") from None
    if not rows:
        raise LstmlabError(f"{path} holds no rows; the run stopped before its first evaluation")
    missing = [c for c in METRIC_COLUMNS if c not in rows[0]]
    if missing:
        raise LstmlabError(f"{path} lacks the column(s) {', '.join(missing)}; it was not written by `lstmlab train`")
    columns: dict[str, list[float]] = {c: [] for c in METRIC_COLUMNS}
    for n, row in enumerate(rows, start=2):
        for c in METRIC_COLUMNS:
            text = (row.get(c) or "").strip()
            try:
                columns[c].append(float(text) if text else math.nan)
            except ValueError:
                raise LstmlabError(f"{path} line {n}: {c} is {text!r}, not a number; the file is damaged") from None
    return columns


def read_losses(path: Path) -> dict[str, list[float]] | None:
    """losses.csv (the training loss logged between evaluations) -> columns, or None when the run has none or it
    cannot be read (the curves then use metrics.csv alone)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        return {c: [float(r[c]) for r in rows] for c in ("iteration", "train_loss", "lr")} if rows else None
    except (OSError, UnicodeDecodeError, csv.Error, KeyError, TypeError, ValueError):
        return None


FEW_POINTS = 3  # fewer evaluations than this make a curve of dots: the figure says so


def read_summary(path: Path) -> dict[str, Any]:
    """summary.json, checked for the fields the figures need."""
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LstmlabError(f"{path} is missing; the run did not finish (summary.json is written at the end)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LstmlabError(f"{path} is not readable JSON ({e}); the file is damaged") from None
    if not isinstance(summary, dict):
        raise LstmlabError(f"{path} does not hold a JSON object; the file is damaged")
    cm = summary.get("confusion_matrix")
    if (not isinstance(cm, list) or not cm or not all(isinstance(r, list) and len(r) == len(cm) for r in cm)
            or not all(isinstance(v, int) for r in cm for v in r)):
        raise LstmlabError(f"{path} has no square confusion_matrix of counts; the file is damaged")
    return summary


def _class_names(summary: dict[str, Any], n: int) -> list[str]:
    """Class names of the run's dataset, or 0..n-1 when the dataset is unknown."""
    from lstmlab.data import DATASETS

    dataset = (summary.get("config") or {}).get("data", {}).get("dataset")
    if dataset in DATASETS and len(DATASETS[dataset].classes) == n:
        return list(DATASETS[dataset].classes)
    return [str(k) for k in range(n)]


# ---------------------------------------------------------------------------------------------
# the three figures


def curves_figure(metrics: dict[str, list[float]], title: str = "",
                  losses: dict[str, list[float]] | None = None) -> Figure:
    """Train/val loss against iteration (left); val accuracy with the learning rate on a second axis (right).
    ``losses`` (losses.csv's columns), when given, draws the training loss and the learning rate at its finer
    grain; with fewer than ``FEW_POINTS`` evaluations the accuracy panel says how to get more."""
    fig = new_figure(13, 5)
    loss_ax, acc_ax = fig.subplots(1, 2)
    it = metrics["iteration"]
    if losses is not None and len(losses["iteration"]) > len(it):
        loss_ax.plot(losses["iteration"], losses["train_loss"], "-", lw=1,
                     label=_grain_label(losses["iteration"]))
    else:
        loss_ax.plot(it, metrics["train_loss"], "o-", ms=3, label="train (mean since last evaluation)")
    if not all(math.isnan(v) for v in metrics["val_loss"]):
        loss_ax.plot(it, metrics["val_loss"], "s-", ms=3, label="validation")
    loss_ax.set_xlabel("iteration")
    loss_ax.set_ylabel("cross-entropy loss")
    loss_ax.set_title("Loss")
    if min(v for v in metrics["train_loss"] + metrics["val_loss"] if not math.isnan(v)) > 0:
        loss_ax.set_yscale("log")  # losses fall over orders of magnitude
    loss_ax.grid(True, which="both", alpha=0.3)
    loss_ax.legend()

    accuracy = [100 * v for v in metrics["val_accuracy"]]
    if all(math.isnan(v) for v in accuracy):
        acc_ax.text(0.5, 0.5, "no validation split in this run", ha="center", va="center", transform=acc_ax.transAxes)
    else:
        acc_ax.plot(it, accuracy, "o-", ms=3, color="tab:green", label="validation accuracy")
        best = max(range(len(accuracy)), key=lambda k: -math.inf if math.isnan(accuracy[k]) else accuracy[k])
        acc_ax.annotate(f"best {accuracy[best]:.2f}%", (it[best], accuracy[best]), textcoords="offset points",
                        xytext=(-10, -18), ha="right", color="tab:green")
    acc_ax.set_xlabel("iteration")
    acc_ax.set_ylabel("validation accuracy (%)", color="tab:green")
    acc_ax.set_title("Validation accuracy and learning rate")
    acc_ax.grid(True, alpha=0.3)
    if len(it) < FEW_POINTS:
        acc_ax.text(0.5, 0.95, f"only {len(it)} evaluation{'s' if len(it) != 1 else ''}: for a curve, train with a "
                    "smaller --eval-every", ha="center", va="center", transform=acc_ax.transAxes, fontsize=9,
                    color="dimgray")
    lr_ax = acc_ax.twinx()
    fine = losses is not None and len(losses["iteration"]) > len(it)
    lr_ax.plot(losses["iteration"] if fine else it, losses["lr"] if fine else metrics["lr"], "--", color="tab:red",
               label="learning rate")
    lr_ax.set_ylabel("learning rate", color="tab:red")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    handles = acc_ax.get_legend_handles_labels()[0] + lr_ax.get_legend_handles_labels()[0]
    acc_ax.legend(handles, [h.get_label() for h in handles], loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _grain_label(iterations: list[float]) -> str:
    """The legend of the fine training-loss line: how many steps each point averages."""
    grain = int(iterations[1] - iterations[0]) if len(iterations) > 1 else int(iterations[0])
    return "train (each step)" if grain == 1 else f"train (mean of every {grain} steps)"


def confusion_figure(confusion: list[list[int]], names: list[str], title: str = "") -> Figure:
    """The confusion matrix (rows: true class) as a heatmap with counts; log colour so errors show."""
    import numpy as np
    from matplotlib.colors import LogNorm

    cm = np.asarray(confusion, dtype=np.int64)
    n = len(cm)
    fig = new_figure(9, 8)
    ax = fig.subplots()
    image = ax.imshow(np.maximum(cm, 1), cmap="Blues", norm=LogNorm(vmin=1, vmax=max(int(cm.max()), 2)))
    fig.colorbar(image, ax=ax, label="test images (log scale)", fraction=0.046, pad=0.04)
    for r in range(n):
        for c in range(n):
            if cm[r, c]:
                dark = cm[r, c] > math.sqrt(max(int(cm.max()), 1))
                ax.text(c, r, str(cm[r, c]), ha="center", va="center", fontsize=9,
                        color="white" if dark else ("black" if r == c else "darkred"))
    ax.set_xticks(range(n), names, rotation=45 if max(map(len, names)) > 2 else 0, ha="right" if
                  max(map(len, names)) > 2 else "center")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    total = int(cm.sum())
    accuracy = 100 * int(np.trace(cm)) / max(total, 1)
    ax.set_title(title or f"Confusion matrix: {total} test images, accuracy {accuracy:.2f}%")
    fig.tight_layout()
    return fig


def mistakes_figure(images, true, pred, prob, names: list[str], total_wrong: int, total: int) -> Figure:
    """A grid of misclassified digits (uint8 (N, 28, 28)) titled ``true X / pred Y (p%)``."""
    n = len(images)
    cols = 8
    rows = max(1, math.ceil(n / cols))
    fig = new_figure(cols * 1.6, rows * 1.9 + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if k < n:
            ax.imshow(images[k], cmap="gray", vmin=0, vmax=255)
            ax.set_title(f"true {names[true[k]]}\npred {names[pred[k]]} ({100 * prob[k]:.0f}%)", fontsize=8,
                         color="darkred")
    if n == 0:
        axes[0, 0].text(0, 0.5, "no mistakes on the test set", fontsize=14)
    shown = f"the {n} most confident" if n < total_wrong else f"all {n}"
    fig.suptitle(f"Misclassified test images: {total_wrong} of {total}; {shown} shown")
    fig.tight_layout()
    return fig


@torch.no_grad()
def find_mistakes(checkpoint: Path, data_dir: str | None, limit: int, batch_size: int = 1000):
    """Run a checkpoint over its dataset's test split; the ``limit`` most confident mistakes.

    Returns (images uint8 (n, 28, 28), true, pred, prob of pred, total wrong, total, class names).
    """
    from lstmlab.checkpoint import load_checkpoint

    return _mistakes(load_checkpoint(checkpoint), data_dir, limit, batch_size)


@torch.no_grad()
def _mistakes(ckpt: Any, data_dir: str | None, limit: int, batch_size: int = 1000):
    from lstmlab.analysis.inputs import class_names, model_input
    from lstmlab.data import load_dataset

    images, labels = load_dataset(ckpt.config.data.dataset, "test", data_dir=data_dir)
    probs = torch.cat([
        torch.softmax(ckpt.model(model_input(ckpt, images[s : s + batch_size])).float(), 1).cpu()
        for s in range(0, len(labels), batch_size)
    ])  # (N, C)
    conf, pred = probs.max(1)
    wrong = (pred != labels).nonzero().flatten()
    order = wrong[conf[wrong].argsort(descending=True)][:limit]  # most confident mistakes first: the instructive ones
    return (images[order].numpy(), labels[order].tolist(), pred[order].tolist(), conf[order].tolist(),
            len(wrong), len(labels), class_names(ckpt.config.data.dataset))


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None, data_dir: str | None = None,
             max_mistakes: int = 48, notes: list[str] | None = None) -> list[Path]:
    """Write curves.png, confusion.png and mistakes.png for a run (its folder, or any checkpoint in it); returns
    their paths. Only the mistakes figure needs the data: the run's own data folder unless ``data_dir`` is given.
    When that data cannot be read and ``data_dir`` was not given, mistakes.png is skipped and ``notes`` (when
    given) says why; with ``data_dir`` given, it is an error."""
    from lstmlab.checkpoint import load_checkpoint
    from lstmlab.runs import run_data_dir, run_folder

    given = Path(run_dir)
    if not given.exists():
        raise LstmlabError(f"run folder {given} does not exist; pass the --out folder of `lstmlab train`")
    folder = run_folder(given)
    if folder is None:
        raise LstmlabError(f"{given} is not a run (no run.json or summary.json beside it); pass the --out folder of "
                           "`lstmlab train` or a checkpoint in it")
    from lstmlab.files import check_writable_dir

    out = Path(out_dir) if out_dir else folder
    check_writable_dir(out, "--out-dir" if out_dir else "RUN_DIR")  # before the minutes of work, not after
    metrics = read_metrics(folder / "metrics.csv")
    losses = read_losses(folder / "losses.csv")
    summary = read_summary(folder / "summary.json")
    names = _class_names(summary, len(summary["confusion_matrix"]))
    checkpoint = given if given.is_file() else folder / "best.safetensors"
    if not checkpoint.is_file():
        raise LstmlabError(f"{checkpoint} is missing; the mistakes figure needs the run's best checkpoint")
    cfg = summary.get("config") or {}
    label = f"{cfg.get('data', {}).get('dataset', '?')}/{cfg.get('data', {}).get('view', '?')}, " \
            f"H={cfg.get('model', {}).get('hidden_size', '?')}, recipe {cfg.get('recipe', '?')}"
    test_acc = summary.get("test_accuracy")
    dry = " (dry run)" if summary.get("dry_run") else ""
    title = f"{folder.resolve().name}{dry}: {label}" + (f", test accuracy {100 * test_acc:.2f}%" if
                                                       isinstance(test_acc, (int, float)) else "")
    # Everything is read and checked before the first file is written, so a bad run leaves no partial output.
    ckpt = load_checkpoint(checkpoint)
    figures = {
        "curves.png": curves_figure(metrics, title, losses),
        "confusion.png": confusion_figure(summary["confusion_matrix"], names),
    }
    try:
        images, true, pred, prob, wrong, total, mnames = _mistakes(ckpt, run_data_dir(folder, data_dir),
                                                                   max_mistakes)
        figures["mistakes.png"] = mistakes_figure(images, true, pred, prob, mnames, wrong, total)
    except LstmlabError as e:
        if data_dir is not None:
            raise
        if notes is not None:
            notes.append(f"skipped mistakes.png, which needs the test images: {e}")
    if notes is not None and len(metrics["iteration"]) < FEW_POINTS:
        notes.append(f"the run has {len(metrics['iteration'])} evaluation(s), so the accuracy curve is a few dots; "
                     "train with a smaller --eval-every for a curve")
    return [save_figure(fig, out / name, "--out-dir") for name, fig in figures.items()]
