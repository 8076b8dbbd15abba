"""Evaluation: loss, accuracy, per-class accuracy and confusion matrix; ``lstmlab evaluate``."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lstmlab.config import DataConfig


@dataclass
class EvalResult:
    """Metrics of a model on one split."""

    loss: float
    accuracy: float  # 0..1
    per_class_accuracy: list[float]
    confusion: list[list[int]]  # rows: true class, columns: predicted class

    def to_dict(self) -> dict:
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


def format_report(result: EvalResult, class_names: list[str]) -> str:
    """The textbook's closing line, then per-class accuracy."""
    lines = [f"Test Loss : {result.loss:5.2f} | Test Accuracy : {result.accuracy:5.2f}"]
    lines.append(f"Test accuracy {100 * result.accuracy:.2f}% ({result.accuracy:.4f}); per class:")
    for name, acc in zip(class_names, result.per_class_accuracy, strict=True):
        lines.append(f"  {name:>12}: {100 * acc:6.2f}%")
    return "\n".join(lines)


def format_confusion(confusion: list[list[int]]) -> str:
    """Confusion matrix as aligned text, rows = true class."""
    header = "true\\pred " + " ".join(f"{j:>5}" for j in range(len(confusion)))
    rows = [f"{i:>9} " + " ".join(f"{v:>5}" for v in row) for i, row in enumerate(confusion)]
    return "\n".join([header, *rows])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a .safetensors checkpoint written by `lstmlab train`")
    parser.add_argument("--data-dir", help="folder holding the dataset's four IDX files (offline use)")
    parser.add_argument("--split", choices=["test", "train"], default="test", help="which split (default test)")
    parser.add_argument("--batch-size", type=int, default=1000, help="evaluation batch size")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")


def run(args: argparse.Namespace) -> int:
    from lstmlab.checkpoint import load_checkpoint
    from lstmlab.data import DATASETS, load_dataset
    from lstmlab.device import resolve_device

    device = resolve_device(args.device)
    ckpt = load_checkpoint(args.checkpoint, map_location=device)
    images, labels = load_dataset(ckpt.config.data.dataset, args.split, data_dir=args.data_dir)
    result = evaluate_model(
        ckpt.model, images, labels, ckpt.config.data, ckpt.permutation, batch_size=max(1, args.batch_size),
        num_classes=ckpt.config.model.num_classes,
    )
    if args.json:
        print(json.dumps({"checkpoint": str(args.checkpoint), "split": args.split, **result.to_dict()}))
    else:
        print(format_report(result, DATASETS[ckpt.config.data.dataset].classes))
        print("Confusion matrix:")
        print(format_confusion(result.confusion))
    return 0
