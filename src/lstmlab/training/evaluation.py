"""Scoring a model on a split: loss, accuracy, per-class accuracy and confusion matrix, and the textbook's
closing line. Used by training (validation, the final test), ``lstmlab evaluate`` and torchrun's sharded
validation."""

from __future__ import annotations

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
