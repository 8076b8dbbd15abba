"""Helpers for the tests: write IDX files (well-formed or deliberately broken) and a small synthetic
MNIST look-alike whose classes a model can learn (class k is a bright band at rows 2k+3 .. 2k+5)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import torch

from lstmlab.data import FILE_NAMES

CORRUPTIONS = (
    "bad_magic",
    "bad_dtype",
    "bad_ndim",
    "truncated",
    "trailing",
    "corrupt_gzip",
    "truncated_gzip",
    "not_gzip",
    "empty",
)


def idx_bytes(t: torch.Tensor, *, dtype_byte: int = 0x08) -> bytes:
    """The IDX encoding of a uint8 tensor of 1 to 3 dimensions."""
    header = bytes([0, 0, dtype_byte, t.dim()]) + b"".join(int(d).to_bytes(4, "big") for d in t.shape)
    return header + t.contiguous().numpy().tobytes()


def write_bytes(path: Path, data: bytes, *, gz: bool | None = None) -> Path:
    """Write ``data`` to ``path`` atomically, gzipped when ``gz`` (default: when the name ends in .gz)."""
    if gz is None:
        gz = path.suffix == ".gz"
    if gz:
        data = gzip.compress(data, compresslevel=1, mtime=0)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def write_idx(path: Path, t: torch.Tensor) -> Path:
    """Write a uint8 tensor as an IDX file (gzipped when the name ends in .gz)."""
    return write_bytes(path, idx_bytes(t))


def corrupt_idx(path: Path, kind: str) -> Path:
    """Write a small broken IDX file of the given kind (one of CORRUPTIONS) at ``path``."""
    labels = torch.arange(10, dtype=torch.uint8)
    good = idx_bytes(labels)
    if kind == "bad_magic":
        data = b"\x12\x34" + good[2:]
    elif kind == "bad_dtype":
        data = idx_bytes(labels, dtype_byte=0x0D)  # 0x0D is float32 in IDX
    elif kind == "bad_ndim":
        data = bytes([0, 0, 8, 2]) + (2).to_bytes(4, "big") + (5).to_bytes(4, "big") + bytes(10)
    elif kind == "truncated":
        data = good[:-3]
    elif kind == "trailing":
        data = good + b"\x00\x01"
    elif kind == "corrupt_gzip":
        whole = gzip.compress(good, mtime=0)
        data = whole[: len(whole) // 2] + bytes(8)  # gzip header, then garbage
        return write_bytes(path, data, gz=False)
    elif kind == "truncated_gzip":
        whole = gzip.compress(good, mtime=0)
        return write_bytes(path, whole[:-5], gz=False)  # the stream ends before its end marker
    elif kind == "not_gzip":
        return write_bytes(path, good, gz=False)  # raw IDX bytes under a .gz name
    elif kind == "empty":
        data = b""
    else:
        raise ValueError(f"unknown corruption {kind!r}")
    return write_bytes(path, data)


def synthetic_split(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images uint8 (n, 28, 28) and labels uint8 (n,): class k is a bright band at rows 2k+3..2k+5
    with a random horizontal extent, on a noisy dark background."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    labels = labels[torch.randperm(n, generator=g)]
    images = torch.randint(0, 40, (n, 28, 28), generator=g, dtype=torch.int64)
    rows = torch.arange(28).view(1, 28, 1)
    cols = torch.arange(28).view(1, 1, 28)
    top = (2 * labels + 3).view(n, 1, 1)
    left = torch.randint(0, 8, (n, 1, 1), generator=g)
    right = torch.randint(20, 28, (n, 1, 1), generator=g)
    band = (rows >= top) & (rows < top + 3) & (cols >= left) & (cols < right)
    bright = torch.randint(180, 256, (n, 28, 28), generator=g)
    images = torch.where(band, bright, images)
    return images.to(torch.uint8), labels.to(torch.uint8)


def write_synthetic_mnist(directory: Path, n_train: int = 6000, n_test: int = 1000, *, gz: bool = True) -> Path:
    """Write the four MNIST-named IDX files of a synthetic dataset into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for split, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        images, labels = synthetic_split(n, seed)
        write_idx(directory / (FILE_NAMES[(split, "images")] + suffix), images)
        write_idx(directory / (FILE_NAMES[(split, "labels")] + suffix), labels)
    return directory
