"""The training-time shift augmentation: each image moves as a whole by its own offset, black fills in."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lstmlab.training.augment import random_erase, random_flip, random_shift


def shifted(image: torch.Tensor, dy: int, dx: int, s: int) -> torch.Tensor:
    """image moved down by dy and right by dx (negative: up/left), zero-filled: the brute-force version."""
    height, width = image.shape
    padded = F.pad(image, (s, s, s, s))
    return padded[s - dy : s - dy + height, s - dx : s - dx + width]


def test_each_image_is_a_translation_within_the_limit() -> None:
    images = torch.randint(1, 256, (64, 28, 28), dtype=torch.uint8)  # no zeros: every offset is distinguishable
    s = 2
    out = random_shift(images, s, torch.Generator().manual_seed(7))
    assert out.shape == images.shape and out.dtype == torch.uint8
    seen = set()
    for image, got in zip(images, out, strict=True):
        offsets = [(dy, dx) for dy in range(-s, s + 1) for dx in range(-s, s + 1)
                   if torch.equal(shifted(image, dy, dx, s), got)]
        assert len(offsets) == 1, "output is not a translation of its own input by at most s pixels"
        seen.add(offsets[0])
    assert len(seen) > 5  # offsets really vary from image to image


def test_same_generator_same_shifts() -> None:
    images = torch.randint(0, 256, (32, 28, 28), dtype=torch.uint8)
    a = random_shift(images, 3, torch.Generator().manual_seed(1))
    b = random_shift(images, 3, torch.Generator().manual_seed(1))
    c = random_shift(images, 3, torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_random_flip_mirrors_about_half_reproducibly() -> None:
    images = torch.randint(0, 256, (400, 28, 28), dtype=torch.uint8)
    a = random_flip(images, torch.Generator().manual_seed(3))
    b = random_flip(images, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    mirrored = torch.tensor([torch.equal(a[k], images[k].flip(1)) for k in range(400)])
    kept = torch.tensor([torch.equal(a[k], images[k]) for k in range(400)])
    assert (mirrored | kept).all() and 150 < int(mirrored.sum()) < 250


def test_random_erase_blacks_out_one_rectangle_of_the_allowed_size() -> None:
    images = torch.full((400, 28, 28), 200, dtype=torch.uint8)
    out = random_erase(images, 1.0, torch.Generator().manual_seed(3))
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert set(out.unique().tolist()) <= {0, 200}
    areas = []
    for got in out:
        black = (got == 0).nonzero()
        assert len(black) > 0, "p=1 erases every image"
        top, left = black.min(0).values.tolist()
        bottom, right = black.max(0).values.tolist()
        box = got[top : bottom + 1, left : right + 1]
        assert (box == 0).all(), "the black pixels form one filled rectangle"
        areas.append(len(black) / 784)
    assert min(areas) >= 0.01 and max(areas) <= 0.45  # 2-40% of the image, give or take rounding
    assert max(areas) - min(areas) > 0.2  # sizes vary


def test_random_erase_probability_and_seed() -> None:
    images = torch.full((1000, 28, 28), 9, dtype=torch.uint8)
    assert torch.equal(random_erase(images, 0.0, torch.Generator().manual_seed(1)), images)
    a = random_erase(images, 0.5, torch.Generator().manual_seed(1))
    erased = (a == 0).flatten(1).any(1).float().mean().item()
    assert 0.42 < erased < 0.58
    assert torch.equal(a, random_erase(images, 0.5, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, random_erase(images, 0.5, torch.Generator().manual_seed(2)))
