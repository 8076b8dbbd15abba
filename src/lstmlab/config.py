"""Configuration dataclasses; a ``Config`` is saved inside every checkpoint so a model can be
rebuilt from the file alone."""

from __future__ import annotations

import dataclasses
import math
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
    cell: str = "lstm"  # "lstm", "peephole" or "layernorm" (lstmlab.LSTM's cell=)
    zoneout: float | list[float] = 0.0  # one probability for c and h, or [z_c, z_h]
    recurrent_dropout: float = 0.0


@dataclass
class DataConfig:
    """Which images, read how: ``view`` is rows (28 x 28), pixels or permuted (784 x 1)."""

    dataset: str = "mnist"
    view: str = "rows"
    val_size: int = 5000
    normalize: str = "dataset"  # "dataset": training-set mean/std; "seed": the textbook's (x-0.5)/1
    augment_shift: int = 0  # training only: shift each image by up to this many pixels each way
    augment_flip: bool = False  # training only: mirror half the images left-right (clothes, not digits)
    augment_erase: float = 0.0  # training only: black out a random rectangle in this fraction of the images
    mean: float | None = None  # filled in from the training split when normalize == "dataset"
    std: float | None = None


@dataclass
class TrainConfig:
    """Optimisation; ``iterations`` wins over ``epochs`` when both are set; ``time_budget`` (seconds) ends training
    earlier when it runs out, and then drives the schedule."""

    optimizer: str = "adam"
    lr: float = 3e-3
    weight_decay: float = 0.0
    label_smoothing: float = 0.0  # the training loss's target: 1 - s on the label, s spread over all classes
    schedule: str = "onecycle"
    batch_size: int = 128
    epochs: float = 6.0
    iterations: int | None = None
    eval_every: int = 500
    clip: float | None = None
    time_budget: float | None = None  # seconds of training: stop then, the schedule annealed by then
    seed: int = 125
    device: str = "auto"
    world_size: int = 1  # processes that trained it (torchrun's WORLD_SIZE), each on a slice of every batch
    select: str = "none"  # "stale-loss": selective backprop on each sample's last trained loss (lstmlab.selection)
    select_beta: float = 3.0  # keep a sample with probability percentile ** beta ...
    select_floor: float = 0.0  # ... but at least this
    select_warmup: int = 1  # epochs on every sample before selection starts


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


# Upper bounds of the flags: far above anything this lab trains, far below what overflows or exhausts memory.
MAX_HIDDEN_SIZE = 4096
MAX_LAYERS = 16
MAX_BATCH_SIZE = 65536
MAX_EPOCHS = 10_000
MAX_ITERATIONS = 10**9
MAX_LR = 1e6
MAX_SEED = 2**64 - 1  # torch's generators take a 64-bit seed
SELECTIONS = ("none", "stale-loss")


def _finite(x: object) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def validate_config(config: Config) -> None:
    """Refuse nonsense before any work starts, with a message naming the flag: every number finite and within
    the bounds above, every choice one of the known names."""
    from lstmlab.data import DATASETS, VIEWS
    from lstmlab.nn.lstm import BACKENDS

    m, d, t = config.model, config.data, config.train
    checks = [
        (d.dataset in DATASETS, f"--dataset must be one of {', '.join(DATASETS)}, got {d.dataset!r}"),
        (d.view in VIEWS, f"--view must be one of {', '.join(VIEWS)}, got {d.view!r}"),
        (d.normalize in ("dataset", "seed"), f"--normalize must be dataset or seed, got {d.normalize!r}"),
        (0 <= d.val_size <= 10**7, f"--val-size must be in 0..10000000, got {d.val_size}"),
        (0 <= d.augment_shift <= 8, f"--augment-shift must be in 0..8 pixels, got {d.augment_shift}"),
        (_finite(d.augment_erase) and 0 <= d.augment_erase <= 1,
         f"--augment-erase must be a probability in 0..1, got {d.augment_erase}"),
        (0 < m.hidden_size <= MAX_HIDDEN_SIZE, f"--hidden-size must be in 1..{MAX_HIDDEN_SIZE}, got {m.hidden_size}"),
        (0 < m.num_layers <= MAX_LAYERS, f"--layers must be in 1..{MAX_LAYERS}, got {m.num_layers}"),
        (_finite(m.dropout) and 0 <= m.dropout < 1, f"--dropout must be in [0, 1), got {m.dropout}"),
        (_finite(m.forget_bias) and abs(m.forget_bias) <= 100,
         f"--forget-bias must be a number in -100..100, got {m.forget_bias}"),
        (m.backend in BACKENDS, f"--backend must be one of {', '.join(BACKENDS)}, got {m.backend!r}"),
        (t.optimizer in ("sgd", "adam", "adamw"), f"--optimizer must be sgd, adam or adamw, got {t.optimizer!r}"),
        (t.schedule in ("none", "onecycle", "cosine"),
         f"--schedule must be none, onecycle or cosine, got {t.schedule!r}"),
        (_finite(t.lr) and 0 < t.lr <= MAX_LR, f"--lr must be a positive number up to {MAX_LR:g}, got {t.lr}"),
        (_finite(t.weight_decay) and 0 <= t.weight_decay <= MAX_LR,
         f"--weight-decay must be a number in 0..{MAX_LR:g}, got {t.weight_decay}"),
        (_finite(t.label_smoothing) and 0 <= t.label_smoothing < 1,
         f"--label-smoothing must be in [0, 1), got {t.label_smoothing}"),
        (0 < t.batch_size <= MAX_BATCH_SIZE, f"--batch-size must be in 1..{MAX_BATCH_SIZE}, got {t.batch_size}"),
        (t.iterations is None or 0 < t.iterations <= MAX_ITERATIONS,
         f"--iterations must be in 1..{MAX_ITERATIONS}, got {t.iterations}"),
        (t.iterations is not None or (_finite(t.epochs) and 0 < t.epochs <= MAX_EPOCHS),
         f"--epochs must be a positive number up to {MAX_EPOCHS}, got {t.epochs}"),
        (0 < t.eval_every <= MAX_ITERATIONS, f"--eval-every must be in 1..{MAX_ITERATIONS}, got {t.eval_every}"),
        (t.clip is None or (_finite(t.clip) and t.clip > 0), f"--clip must be a positive number, got {t.clip}"),
        (t.time_budget is None or (_finite(t.time_budget) and t.time_budget > 0),
         f"--time-budget must be a positive number of seconds, got {t.time_budget}"),
        (0 <= t.seed <= MAX_SEED, f"--seed must be in 0..2**64-1, got {t.seed}"),
        (t.select in SELECTIONS, f"--select must be one of {', '.join(SELECTIONS)}, got {t.select!r}"),
        (_finite(t.select_beta) and 0 <= t.select_beta <= 100, f"--select-beta must be in 0..100, got {t.select_beta}"),
        (_finite(t.select_floor) and 0 <= t.select_floor <= 1, f"--select-floor must be in 0..1, got {t.select_floor}"),
        (0 <= t.select_warmup <= MAX_EPOCHS,
         f"--select-warmup must be in 0..{MAX_EPOCHS} epochs, got {t.select_warmup}"),
        (isinstance(t.world_size, int) and 1 <= t.world_size <= MAX_BATCH_SIZE,
         f"the config's world_size must be in 1..{MAX_BATCH_SIZE}, got {t.world_size}"),
    ]
    for ok, message in checks:
        if not ok:
            raise LstmlabError(message)
    _validate_variant(m)


def _validate_variant(m: ModelConfig) -> None:
    """The LSTM variant's fields, checked by the LSTM's own rules, in the flags' words."""
    from lstmlab.nn.cell import check_variant

    try:
        pair = check_variant(m.cell, m.zoneout, m.recurrent_dropout)
    except ValueError as e:
        flag = "--cell" if str(e).startswith("cell") else "--zoneout" if str(e).startswith("zoneout") else \
            "--recurrent-dropout"
        raise LstmlabError(f"{flag}: {e}") from None
    if m.backend == "torch" and (m.cell != "lstm" or any(pair) or m.recurrent_dropout):
        raise LstmlabError("--backend torch runs only the plain cell: use --backend auto, fused or reference with "
                           "--cell, --zoneout or --recurrent-dropout")
