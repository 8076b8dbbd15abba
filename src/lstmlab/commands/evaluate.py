"""``lstmlab evaluate``: a checkpoint's loss, accuracy, per-class accuracy and confusion matrix on a split."""

from __future__ import annotations

import argparse
import json

from torch import Tensor

from lstmlab.config import DataConfig
from lstmlab.errors import LstmlabError
from lstmlab.training.evaluation import evaluate_model, format_confusion, format_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``lstmlab evaluate``."""
    parser.add_argument("checkpoint", metavar="RUN",
                        help="a run folder written by `lstmlab train` (its best.safetensors) or any checkpoint")
    parser.add_argument("--data-dir", metavar="DIR",
                        help="folder holding the dataset's four IDX files (default: the run's own data folder, "
                        "else $LSTMLAB_DATA, else the cache)")
    parser.add_argument("--split", choices=["train", "val", "test"], default="test",
                        help="which images: train (what the model trained on), val (held out of train by the run's "
                        "seed and --val-size) or test")
    parser.add_argument("--batch-size", type=int, default=1000, help="evaluation batch size")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto = cuda when available, else cpu")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")


def split_images(dataset: str, split: str, data: DataConfig, seed: int,
                 data_dir: str | None = None) -> tuple[Tensor, Tensor]:
    """The uint8 images and labels of ``split``: ``train``/``val`` as a run cut them (``data.val_size`` images held
    out with ``seed``), or ``test``."""
    from lstmlab.data import load_dataset, train_val_split

    if split == "test":
        return load_dataset(dataset, "test", data_dir=data_dir)
    images, labels = load_dataset(dataset, "train", data_dir=data_dir)
    train_idx, val_idx = train_val_split(len(labels), data.val_size, seed)
    idx = train_idx if split == "train" else val_idx
    return images[idx], labels[idx]


def run(args: argparse.Namespace) -> int:
    """``lstmlab evaluate``: one split's metrics for a run folder or a checkpoint."""
    from lstmlab.checkpoint import load_checkpoint
    from lstmlab.data import DATASETS
    from lstmlab.device import resolve_device
    from lstmlab.runs import checkpoint_path, run_data_dir

    device = resolve_device(args.device)
    path = checkpoint_path(args.checkpoint)
    ckpt = load_checkpoint(path, map_location=device)
    config = ckpt.config
    if args.split == "val" and config.data.val_size == 0:
        raise LstmlabError(f"{path} was trained with --val-size 0, so it has no validation split; use --split test")
    images, labels = split_images(config.data.dataset, args.split, config.data, config.train.seed,
                                  run_data_dir(path, args.data_dir))
    result = evaluate_model(
        ckpt.model, images, labels, config.data, ckpt.permutation, batch_size=max(1, args.batch_size),
        num_classes=config.model.num_classes,
    )
    if args.json:
        print(json.dumps({"checkpoint": str(path), "split": args.split, "images": len(labels), **result.to_dict()}))
    else:
        print(f"{path}: {len(labels)} {args.split} images of {config.data.dataset}")
        print(format_report(result, DATASETS[config.data.dataset].classes, args.split))
        print("Confusion matrix (rows: true class):")
        print(format_confusion(result.confusion))
    return 0
