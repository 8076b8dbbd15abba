"""Configuration dataclasses; a ``Config`` is saved inside every checkpoint so a model can be
rebuilt from the file alone."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lstmlab.errors import LstmlabError


@dataclass
class ModelConfig:
    """The network: an LSTM over the sequence and a linear head on its last hidden state."""

    input_size: int = 28
    hidden_size: int = 128
    num_layers: int = 1
    num_classes: int = 10
    bidirectional: bool = False
    dropout: float = 0.0
    forget_bias: float = 0.0
    backend: str = "auto"


@dataclass
class DataConfig:
    """Which images, read how: ``view`` is rows (28 x 28), pixels or permuted (784 x 1)."""

    dataset: str = "mnist"
    view: str = "rows"
    val_size: int = 5000
    normalize: str = "dataset"  # "dataset": training-set mean/std; "seed": the textbook's (x-0.5)/1
    augment_shift: int = 0  # training only: shift each image by up to this many pixels each way
    mean: float | None = None  # filled in from the training split when normalize == "dataset"
    std: float | None = None


@dataclass
class TrainConfig:
    """Optimisation; ``iterations`` wins over ``epochs`` when both are set; ``time_budget`` (seconds) ends training
    earlier when it runs out, and then drives the schedule."""

    optimizer: str = "adam"
    lr: float = 3e-3
    weight_decay: float = 0.0
    schedule: str = "onecycle"
    batch_size: int = 128
    epochs: float = 6.0
    iterations: int | None = None
    eval_every: int = 500
    clip: float | None = None
    time_budget: float | None = None  # seconds of training: stop then, the schedule annealed by then
    seed: int = 125
    device: str = "auto"


@dataclass
class Config:
    """Everything needed to rebuild and retrain a model."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    recipe: str = "default"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        """Rebuild from ``to_dict`` output; unknown keys are an error, not silently dropped."""
        try:
            return cls(
                model=ModelConfig(**d["model"]),
                data=DataConfig(**d["data"]),
                train=TrainConfig(**d["train"]),
                recipe=d.get("recipe", "custom"),
            )
        except (KeyError, TypeError) as e:
            raise LstmlabError(f"invalid lstmlab config ({e}); was it written by another version?") from e
