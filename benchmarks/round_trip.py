"""Top-1 of ``lstmlab predict`` on MNIST test digits written out as image files in many ways and read back.

    python benchmarks/round_trip.py --checkpoint runs/x/best.safetensors --data-dir /path/to/mnist
    python benchmarks/round_trip.py --checkpoint ... --before aeab672   # also the preprocessing of another commit

The first ``--n`` test digits (default 1 000) are written as files in each of the ``WAYS`` below, read back with
``load_digit`` (what ``lstmlab predict`` runs on each file) and classified; each way's top-1 is printed beside
the top-1 of the same model on the raw test tensors (what ``lstmlab evaluate`` measures), with the number of
images refused as blank. ``tests/test_round_trip.py`` runs the same ways.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

Picture = Callable[[np.ndarray, np.random.Generator], Image.Image]


def _big(a: np.ndarray, factor: int) -> Image.Image:
    """A 28x28 uint8 digit (light on dark) upscaled with bicubic blur: bold, soft-edged strokes."""
    img = Image.fromarray(a)
    return img if factor == 1 else img.resize((28 * factor, 28 * factor), Image.Resampling.BICUBIC)


def _low_resolution(a: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """Down to 8-14 pixels a side (area averaging), then back up to 64 with bicubic blur: a small scan."""
    side = int(rng.integers(8, 15))
    small = Image.fromarray(a).resize((side, side), Image.Resampling.BOX)
    return small.resize((64, 64), Image.Resampling.BICUBIC)


def _blue_on_white(a: np.ndarray) -> Image.Image:
    """Blue ink on white paper, RGB."""
    m = np.asarray(_big(a, 4), np.float32)[..., None] / 255.0
    ink, paper = np.array([20, 40, 170], np.float32), np.array([255, 255, 255], np.float32)
    return Image.fromarray(np.round(paper * (1 - m) + ink * m).astype(np.uint8))


def _margin(a: np.ndarray) -> Image.Image:
    """The x2 digit in the middle of a canvas three times its size: a wide empty margin."""
    canvas = Image.new("L", (168, 168), 0)
    canvas.paste(_big(a, 2), (56, 56))
    return canvas


def _gamma(a: np.ndarray, g: float) -> Image.Image:
    big = np.asarray(_big(a, 4), np.float32) / 255.0
    return Image.fromarray(np.round(255 * big**g).astype(np.uint8))


# name -> (picture of a uint8 28x28 digit, file suffix, lossless); all light ink on dark unless the name says not.
WAYS: dict[str, tuple[Picture, str, bool]] = {
    "28 px": (lambda a, r: _big(a, 1), "png", True),
    "x2 bicubic (56 px)": (lambda a, r: _big(a, 2), "png", True),
    "x4 bicubic (112 px)": (lambda a, r: _big(a, 4), "png", True),
    "x8 bicubic (224 px)": (lambda a, r: _big(a, 8), "png", True),
    "inverted, x4 (dark on light)": (lambda a, r: Image.fromarray(255 - np.asarray(_big(a, 4))), "png", True),
    "blue ink on white, x4 (RGB)": (lambda a, r: _blue_on_white(a), "png", True),
    "wide margin, x2 on 168 px": (lambda a, r: _margin(a), "png", True),
    "gamma 0.5, x4": (lambda a, r: _gamma(a, 0.5), "png", True),
    "gamma 2, x4": (lambda a, r: _gamma(a, 2.0), "png", True),
    "low resolution (8-14 px, up to 64)": (_low_resolution, "png", False),
    "JPEG quality 50, x4": (lambda a, r: _big(a, 4), "jpg", False),  # saved at quality 50
}


def write_way(name: str, images: torch.Tensor, folder: Path, seed: int = 0) -> list[Path]:
    """Write every uint8 (28, 28) image of ``images`` as a file of way ``name`` into ``folder``; their paths."""
    picture, suffix, _ = WAYS[name]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, a in enumerate(images.numpy()):
        path = folder / f"{k:05d}.{suffix}"
        picture(a, rng).save(path, **({"quality": 50} if suffix == "jpg" else {}))
        paths.append(path)
    return paths


def read_back(load_digit: Callable[[Path], torch.Tensor], paths: list[Path]) -> tuple[torch.Tensor, int]:
    """Each file through ``load_digit``; a refused one (blank) becomes an empty frame. (images, refused)."""
    from lstmlab.errors import LstmlabError

    digits, refused = [], 0
    for path in paths:
        try:
            digits.append(load_digit(path))
        except LstmlabError:
            refused += 1
            digits.append(torch.zeros(28, 28, dtype=torch.uint8))
    return torch.stack(digits), refused


def top1(ckpt, images: torch.Tensor, labels: torch.Tensor) -> float:  # noqa: ANN001 - a Checkpoint
    """Top-1 in % of ``ckpt`` on uint8 images (N, 28, 28)."""
    from lstmlab.analysis.inputs import predict_images

    got = torch.tensor([r.label for r in predict_images(ckpt, images, [""] * len(images))])
    return 100.0 * (got == labels).float().mean().item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a .safetensors checkpoint of an MNIST rows model")
    parser.add_argument("--data-dir", required=True, help="the MNIST folder")
    parser.add_argument("--n", type=int, default=1000, help="the first N test digits (default 1000)")
    parser.add_argument("--before", metavar="REV", help="also measure predict.py as of this git revision")
    args = parser.parse_args(argv)

    from photo_digits import _module_at

    from lstmlab.analysis.inputs import load_digit
    from lstmlab.checkpoint import load_checkpoint
    from lstmlab.data import load_dataset

    torch.set_num_threads(1)
    ckpt = load_checkpoint(args.checkpoint)
    images, labels = load_dataset("mnist", "test", data_dir=args.data_dir)
    images, labels = images[: args.n], labels[: args.n]
    versions = {"now": load_digit}
    if args.before:
        versions = {f"before ({args.before})": _module_at(args.before).load_digit, **versions}
    print(f"first {args.n} MNIST test digits; checkpoint {args.checkpoint}")
    print(f"direct (raw test tensors): {top1(ckpt, images, labels):.1f}%")
    with tempfile.TemporaryDirectory(prefix="lstmlab-round-trip-") as tmp:
        for k, name in enumerate(WAYS):
            paths = write_way(name, images, Path(tmp) / str(k))
            cells = []
            for version, load in versions.items():
                back, refused = read_back(load, paths)
                cells.append(f"{version} {top1(ckpt, back, labels):5.1f}%" + (f" ({refused} blank)" if refused else ""))
            print(f"{name:36s} " + "   ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # photo_digits beside this file
    sys.exit(main())
