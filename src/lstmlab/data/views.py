"""The sequence views an LSTM reads an image as (rows, pixels, permuted pixels), the train/validation split, pixel
statistics and batch order."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from lstmlab.data.registry import VIEWS
from lstmlab.errors import LstmlabError


def make_permutation(seed: int, length: int = 784) -> torch.Tensor:
    """A fixed permutation of ``length`` pixel positions (LongTensor), the same for the same seed."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(length, generator=g)


def to_sequence(
    images: torch.Tensor,
    view: str,
    mean: float,
    std: float,
    permutation: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float32 sequences (B, T, I) from uint8 images (B, 28, 28): ``(images/255 - mean) / std``, then
    rows (T=28, I=28), pixels (T=784, I=1, row-major) or permuted (pixels reordered by ``permutation``)."""
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; choose one of: {', '.join(VIEWS)}")
    if images.dtype != torch.uint8:
        raise TypeError(f"to_sequence wants uint8 images (0..255), got {images.dtype}")
    if images.dim() != 3 or tuple(images.shape[1:]) != (28, 28):
        raise ValueError(f"to_sequence wants images of shape (B, 28, 28), got {tuple(images.shape)}")
    if std <= 0:
        raise ValueError(f"std must be positive, got {std}")
    b = images.shape[0]
    t, i = VIEWS[view]
    x = images.to(torch.float32).div_(255.0).sub_(mean).div_(std)  # (B, 28, 28)
    if view == "permuted":
        if permutation is None:
            raise ValueError("the permuted view needs a permutation (make_permutation(seed))")
        if permutation.shape != (t,):
            raise ValueError(f"permutation must have shape ({t},), got {tuple(permutation.shape)}")
        x = x.reshape(b, t)[:, permutation.to(device=x.device, dtype=torch.long)]  # (B, 784)
    return x.reshape(b, t, i)  # (B, T, I)


def train_val_split(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint, sorted index tensors (train, val) covering ``range(n)``, the same for the same seed."""
    if not 0 <= val_size < n:
        raise LstmlabError(f"the validation size must be at least 0 and below the {n} training images, got {val_size}")
    g = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(n, generator=g)
    return order[val_size:].sort().values, order[:val_size].sort().values


def pixel_stats(images: torch.Tensor) -> tuple[float, float]:
    """Mean and (population) standard deviation of uint8 pixels on the 0..1 scale."""
    if images.dtype != torch.uint8:
        raise TypeError(f"pixel_stats wants uint8 images, got {images.dtype}")
    if images.numel() == 0:
        raise ValueError("pixel_stats needs at least one pixel")
    # a histogram is exact in float64 without a float copy of all the pixels
    counts = torch.bincount(images.reshape(-1).cpu(), minlength=256).to(torch.float64)
    values = torch.arange(256, dtype=torch.float64) / 255.0
    total = counts.sum()
    mean = (counts * values).sum() / total
    var = (counts * (values - mean) ** 2).sum() / total
    return float(mean), float(var.sqrt())


def batch_indices(
    n: int,
    batch_size: int,
    generator: torch.Generator | None = None,
    shuffle: bool = True,
    drop_last: bool = False,
) -> Iterator[torch.Tensor]:
    """Index tensors of the batches of one pass over ``range(n)``, shuffled with ``generator`` when asked;
    index the whole uint8 image tensor with each to make a batch."""
    if batch_size < 1:
        raise LstmlabError(f"the batch size must be at least 1, got {batch_size}")
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start : start + batch_size]
