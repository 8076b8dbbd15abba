"""Evaluation: loss, accuracy, per-class accuracy and confusion matrix; ``lstmlab evaluate``."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lstmlab.config import DataConfig
from lstmlab.errors import LstmlabError


@dataclass
class EvalResult:
    """Metrics of a model on one split."""

    loss: float
    accuracy: float  # 0..1
    per_class_accuracy: list[float]
    confusion: list[list[int]]  # rows: true class, columns: predicted class

    def to_dict(self) -> dict:
        """The metrics as JSON-ready values (summary.json's and ``evaluate --json``'s keys)."""
        return {
            "loss": self.loss,
            "accuracy": self.accuracy,
            "per_class_accuracy": self.per_class_accuracy,
            "confusion_matrix": self.confusion,
        }


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    data: DataConfig,
    permutation: Tensor | None = None,
    batch_size: int = 1000,
    num_classes: int = 10,
) -> EvalResult:
    """Run ``model`` over uint8 ``images`` (N, 28, 28) in batches; mean loss over all samples."""
    from lstmlab.data import to_sequence

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_loss = 0.0
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for start in range(0, len(labels), batch_size):
        x = to_sequence(images[start : start + batch_size], data.view, data.mean, data.std, permutation)
        y = labels[start : start + batch_size].to(device)
        logits = model(x.to(device))  # (B, C)
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        pred = logits.argmax(dim=1)
        confusion += torch.bincount(y.cpu() * num_classes + pred.cpu(), minlength=num_classes**2).view(
            num_classes, num_classes
        )
    model.train(was_training)
    n = max(len(labels), 1)
    per_class = (confusion.diag().double() / confusion.sum(1).clamp(min=1).double()).tolist()
    return EvalResult(
        loss=total_loss / n,
        accuracy=confusion.diag().sum().item() / n,
        per_class_accuracy=per_class,
        confusion=confusion.tolist(),
    )


SPLIT_TITLES = {"test": "Test", "val": "Validation", "train": "Train"}


def format_report(result: EvalResult, class_names: list[str], split: str = "test") -> str:
    """The textbook's closing line for ``split`` (loss, accuracy in %), then the accuracy of each class."""
    title = SPLIT_TITLES.get(split, split.capitalize())
    lines = [f"{title} Loss : {result.loss:.4f} | {title} Accuracy : {100 * result.accuracy:.2f}%"]
    lines.append("Per-class accuracy:")
    for name, acc in zip(class_names, result.per_class_accuracy, strict=True):
        lines.append(f"  {name:>12}: {100 * acc:6.2f}%")
    return "\n".join(lines)


def format_confusion(confusion: list[list[int]]) -> str:
    """Confusion matrix as aligned text, rows = true class."""
    header = "true\\pred " + " ".join(f"{j:>5}" for j in range(len(confusion)))
    rows = [f"{i:>9} " + " ".join(f"{v:>5}" for v in row) for i, row in enumerate(confusion)]
    return "\n".join([header, *rows])


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
