"""Short runs on the other sequential-image tasks, with accuracy floors on the real data (issue 13).

The floors sit well below what these fixed-seed runs reach (measured when they were written), and nothing here
depends on the machine's speed: the runs are counted in iterations, not seconds, on one thread.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lstmlab.data import DATASETS, FILE_NAMES
from lstmlab.training import recipe, train

FASHION_SYSTEM_DIR = DATASETS["fashion-mnist"].system_dir


def _has_fashion() -> bool:
    return all((FASHION_SYSTEM_DIR / f"{name}.gz").is_file() for name in FILE_NAMES.values())


@pytest.fixture
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_fashion_mnist_short_run_beats_its_floor(tmp_path: Path, one_thread: None) -> None:
    """300 iterations of a small LSTM on the real Fashion-MNIST: 81.9 % test when written; the floor is 75 %."""
    if not _has_fashion():
        if os.environ.get("CI") == "true":  # CI installs it (.ci/datasets.sh): missing there is a failure
            pytest.fail(f"Fashion-MNIST is not in {FASHION_SYSTEM_DIR}; .ci/datasets.sh should have installed it")
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    config = recipe("default")
    config.data.dataset, config.data.val_size, config.data.augment_shift = "fashion-mnist", 1000, 0
    config.model.hidden_size = 64
    config.train.batch_size, config.train.iterations, config.train.eval_every = 128, 300, 300
    config.train.device = "cpu"
    summary = train(config, tmp_path / "run", data_dir=FASHION_SYSTEM_DIR, quiet=True)
    assert summary["config"]["data"]["dataset"] == "fashion-mnist"
    assert summary["test_accuracy"] >= 0.75, summary["test_accuracy"]


def test_a_short_permuted_pixel_run_learns_above_chance(mnist_dir: Path, real_mnist: bool, tmp_path: Path,
                                                         one_thread: None) -> None:
    """300 iterations, one pixel per step (T=784) in the seed's fixed shuffle: 35.5 % test on the real MNIST when
    written (chance: 11.35 %, always the commonest digit); the floor is 25 %. The unshuffled pixel view sat at
    chance after 800 such iterations (the digit's last rows are blank, so the signal is far back), too long here."""
    config = recipe("default")
    config.data.view, config.data.val_size, config.data.augment_shift = "permuted", 500, 0
    config.model.hidden_size, config.model.forget_bias = 32, 1.0
    config.train.batch_size, config.train.iterations, config.train.eval_every = 32, 300, 300
    config.train.schedule, config.train.lr = "none", 4e-3
    config.train.device = "cpu"
    summary = train(config, tmp_path / "run", data_dir=mnist_dir, quiet=True)
    assert summary["config"]["data"]["view"] == "permuted"
    assert summary["test_accuracy"] >= (0.25 if real_mnist else 0.2), summary["test_accuracy"]
