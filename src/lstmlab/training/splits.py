"""The data of a run: the train / validation / test splits as uint8 images, and what they decide in the config."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from torch import Tensor

from lstmlab.config import Config
from lstmlab.errors import LstmlabError


@dataclass
class Data:
    """The uint8 images and labels of each split, and the permuted view's permutation."""

    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor
    permutation: Tensor | None
    seq_len: int


def load_data(config: Config, data_dir: Path | str | None, dry_run: bool) -> tuple[Config, Data]:
    """The splits, and the config with what the data decide filled in (mean/std, input size)."""
    from lstmlab.data import load_dataset, make_permutation, pixel_stats, to_sequence, train_val_split

    d, t = config.data, config.train
    images, labels = load_dataset(d.dataset, "train", data_dir=data_dir)
    test_x, test_y = load_dataset(d.dataset, "test", data_dir=data_dir)
    if d.val_size >= len(labels):
        raise LstmlabError(f"--val-size {d.val_size} leaves no training data (the split has {len(labels)} images)")
    train_idx, val_idx = train_val_split(len(labels), d.val_size, t.seed)
    if dry_run:
        train_idx, val_idx = train_idx[: 4 * t.batch_size], val_idx[:256]
        test_x, test_y = test_x[:256], test_y[:256]
    train_x, train_y = images[train_idx], labels[train_idx]
    if d.normalize == "dataset":  # statistics of the training split only, never of val or test
        mean, std = pixel_stats(train_x)
    else:
        mean, std = 0.5, 1.0
    d = replace(d, mean=float(mean), std=float(std))
    permutation = make_permutation(t.seed) if d.view == "permuted" else None
    seq_len, input_size = to_sequence(train_x[:1], d.view, d.mean, d.std, permutation).shape[1:]
    config = replace(config, data=d, model=replace(config.model, input_size=int(input_size)))
    data = Data(train_x, train_y, images[val_idx], labels[val_idx], test_x, test_y, permutation, int(seq_len))
    return config, data

