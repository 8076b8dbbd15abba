"""Augmentation of uint8 image batches (B, 28, 28): shifts, mirroring, random erasing; one op per batch."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each uint8 image (B, 28, 28) by its own random offset in [-max_shift, max_shift],
    filling with black; one gather for the whole batch, no per-image Python."""
    b, height, width = images.shape
    padded_width = width + 2 * max_shift
    padded = F.pad(images, (max_shift,) * 4).view(b, -1)  # (B, (28 + 2s)^2)
    dy = torch.randint(0, 2 * max_shift + 1, (b, 1), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (b, 1), generator=generator)
    window = (torch.arange(height).view(height, 1) * padded_width + torch.arange(width)).view(1, -1)  # (1, 784)
    return padded.gather(1, dy * padded_width + dx + window).view(b, height, width)  # (B, 28, 28)


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each uint8 image (B, 28, 28) left-right with probability 1/2."""
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    return torch.where(flip.view(-1, 1, 1), images.flip(2), images)


def random_erase(images: torch.Tensor, p: float, generator: torch.Generator,
                 area: tuple[float, float] = (0.02, 0.4), log_ratio: float = math.log(3.3)) -> torch.Tensor:
    """Random erasing (Zhong et al. 2017): with probability p, black out one rectangle of each uint8 image
    (B, H, W), its area a uniform fraction ``area`` of the image and its aspect ratio log-uniform in 1/3.3..3.3,
    clipped to the image."""
    b, height, width = images.shape
    u = torch.rand(b, 5, generator=generator)  # (B, 5): apply?, area, ratio, top, left
    size = (area[0] + (area[1] - area[0]) * u[:, 1]) * height * width
    ratio = torch.exp((2 * u[:, 2] - 1) * log_ratio)  # height / width
    h = (size * ratio).sqrt().round().clamp(1, height)
    w = (size / ratio).sqrt().round().clamp(1, width)
    top = (u[:, 3] * (height - h + 1)).floor()
    left = (u[:, 4] * (width - w + 1)).floor()
    rows = torch.arange(height).view(1, -1)
    cols = torch.arange(width).view(1, -1)
    inside_rows = (rows >= top.view(-1, 1)) & (rows < (top + h).view(-1, 1))  # (B, H)
    inside_cols = (cols >= left.view(-1, 1)) & (cols < (left + w).view(-1, 1))  # (B, W)
    erase = inside_rows.unsqueeze(2) & inside_cols.unsqueeze(1) & (u[:, 0] < p).view(-1, 1, 1)  # (B, H, W)
    return images.masked_fill(erase, 0)

