"""``lstmlab gates``: one figure of everything the LSTM does while it reads one image, drawn by
``lstmlab.analysis.gates``."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lstmlab.analysis.gates import UNIT_ORDERS
from lstmlab.errors import LstmlabError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``lstmlab gates``."""
    parser.add_argument("checkpoint", metavar="RUN",
                        help="a run folder written by `lstmlab train` (its best.safetensors) or any checkpoint")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--index", type=int, metavar="N",
                        help="which image of --split to read, 0-based (default: none)")
    source.add_argument("--image", metavar="FILE",
                        help="your own image of a digit, any format Pillow reads (default: none)")
    parser.add_argument("--out", default="gates.png", metavar="FILE",
                        help="figure to write, .png, .jpg, .pdf or .svg")
    parser.add_argument("--split", choices=["test", "train"], default="test", help="split for --index")
    parser.add_argument("--data-dir", metavar="DIR",
                        help="folder holding the dataset's IDX files (default: the run's own data folder, else "
                        "$LSTMLAB_DATA, else the cache)")
    parser.add_argument("--layer", type=int, default=None, metavar="N",
                        help="which LSTM layer to draw, 1 = the first, as in the title (default: the last)")
    parser.add_argument("--direction", choices=["forward", "reverse"], default="forward",
                        help="for a bidirectional model: which direction to draw")
    parser.add_argument("--step", type=int, metavar="T",
                        help="the step to mark in every panel, counting from 1 as every label does (default: the last)")
    parser.add_argument("--order", choices=list(UNIT_ORDERS), default="change",
                        help="order of the hidden units in the heatmaps: change = by the step where each unit's "
                        "gates change most (stated on the figure), index = as stored")
    parser.add_argument("--zoneout", choices=["expected", "sample"], default="expected",
                        help="for a model with zoneout: expected = as it predicts (eval: every unit pulled back by "
                        "z), sample = 0/1 masks drawn as in training, so the zoned-out units show")
    parser.add_argument("--seed", type=int, default=0, metavar="N",
                        help="seed of the masks --zoneout sample draws (default: 0)")


def run(args: argparse.Namespace) -> int:
    """``lstmlab gates``: one figure of everything the LSTM does while it reads one image."""
    from lstmlab.analysis.figures import check_figure_path, save_figure
    from lstmlab.analysis.gates import gates_figure
    from lstmlab.analysis.inputs import class_names, load_digit, model_input
    from lstmlab.analysis.recording import record
    from lstmlab.checkpoint import load_checkpoint
    from lstmlab.runs import checkpoint_path, run_data_dir, run_name

    check_figure_path(args.out)  # a bad --out is found before the checkpoint and data are read
    path = checkpoint_path(args.checkpoint)
    ckpt = load_checkpoint(path)
    layers = ckpt.config.model.num_layers
    layer = layers if args.layer is None else args.layer
    if not 1 <= layer <= layers:
        raise LstmlabError(f"--layer {args.layer} is out of range: {path} has {layers} layer"
                           f"{'s' if layers > 1 else ''}, numbered 1..{layers}")
    dataset = ckpt.config.data.dataset
    names = class_names(dataset)
    if args.image is not None:
        image = load_digit(args.image)
        image_title = f"{Path(args.image).name} (preprocessed)"
    else:
        from lstmlab.data import load_dataset

        images, labels = load_dataset(dataset, args.split, data_dir=run_data_dir(path, args.data_dir))
        if not 0 <= args.index < len(labels):
            raise LstmlabError(
                f"--index {args.index} is out of range: the {args.split} split of {dataset} has {len(labels)} "
                f"images (0..{len(labels) - 1})"
            )
        image = images[args.index]
        image_title = f"{dataset} {args.split} #{args.index}, label {names[int(labels[args.index])]}"
    rec = record(ckpt.model, model_input(ckpt, image[None]), zoneout=args.zoneout,
                 generator=torch.Generator().manual_seed(args.seed))
    direction = 0 if args.direction == "forward" else 1
    fig = gates_figure(rec, image, ckpt.config.data.view, names, layer=layer - 1, direction=direction,
                       step=args.step, permutation=ckpt.permutation, title=f"run {run_name(path)}",
                       image_title=image_title, order=args.order)
    print(f"wrote {save_figure(fig, args.out)}")
    return 0
