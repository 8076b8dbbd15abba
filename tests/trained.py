"""A small model trained once per test session on the ``mnist_dir`` data, shared by the predict, plot
and demo tests (each file's session fixture calls ``trained_run``; the run is cached on disk)."""

from __future__ import annotations

from pathlib import Path

import torch

from lstmlab.config import Config, DataConfig, ModelConfig, TrainConfig

ITERATIONS = 300  # ~94% on the real MNIST test set with H=64, in about 5-15 s on 2 CPU cores


def trained_run(base: Path, mnist_dir: Path, iterations: int = ITERATIONS) -> Path:
    """A run folder (metrics.csv, summary.json, best/last.safetensors) of a briefly trained rows-view model."""
    from lstmlab.training import train

    out = base / ("lstmlab-trained-run" if iterations == ITERATIONS else f"lstmlab-trained-run-{iterations}")
    if (out / "summary.json").is_file():
        return out
    config = Config(
        model=ModelConfig(hidden_size=64),
        data=DataConfig(dataset="mnist", view="rows", val_size=1000, augment_shift=0),
        train=TrainConfig(optimizer="adam", lr=3e-3, schedule="onecycle", batch_size=128, iterations=iterations,
                          eval_every=100, clip=None, seed=125, device="cpu"),
    )
    threads = torch.get_num_threads()
    # One thread: on a shared 2-core machine OpenMP threads spin against other processes (12 s vs 110 s here).
    torch.set_num_threads(1)
    try:
        train(config, out, data_dir=mnist_dir, quiet=True)
    finally:
        torch.set_num_threads(threads)
    return out
