"""Every setting, declared once: the dataclasses saved inside every checkpoint, whose defaults ARE the default
recipe, and per field its flag, help, choices and bounds. ``lstmlab.config.flags`` builds ``lstmlab train``'s
flags from these declarations and ``validate_config`` checks a config against them, in the flags' words.

Torch-free on purpose: ``lstmlab train --help`` reads this module without loading torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from lstmlab.data import registry as data_registry
from lstmlab.errors import LstmlabError
from lstmlab.nn.variants import CELLS
from lstmlab.training.schedules import SCHEDULES

# Upper bounds of the flags: far above anything this lab trains, far below what overflows or exhausts memory.
MAX_HIDDEN_SIZE = 4096
MAX_LAYERS = 16
MAX_BATCH_SIZE = 65536
MAX_EPOCHS = 10_000
MAX_ITERATIONS = 10**9
MAX_LR = 1e6
MAX_SEED = 2**64 - 1  # torch's generators take a 64-bit seed
DATASETS = tuple(data_registry.DATASETS)  # from the torch-free dataset registry: a new entry there is a choice here
VIEWS = tuple(data_registry.VIEWS)
# lstmlab.nn.lstm's BACKENDS, spelled here so that the flags need no torch; tests/config/test_config.py holds
# them equal. The cells come from the variants' own (torch-free) table.
BACKENDS = ("auto", "reference", "fused", "torch")
SELECTIONS = ("none", "stale-loss")
DRY_RUN_ITERATIONS = 3  # a dry run's length unless --iterations says otherwise


def zoneout_arg(text: str) -> float | list[float]:
    """--zoneout (of train and bench): one probability for both states, or Z_C,Z_H."""
    try:
        parts = [float(p) for p in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected a probability or two as Z_C,Z_H, got {text!r}")
    return parts[0] if len(parts) == 1 else parts


@dataclass(frozen=True)
class Setting:
    """How one config field meets the user: its flag, help, choices, bounds (``None`` = unbounded), the group it
    is listed in, and whether ``None`` is a valid value (``optional``: "off")."""

    flag: str | None = None  # None: no flag (filled in by the data, or internal)
    help: str = ""
    group: str = ""
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # the bound itself is excluded
    high_open: bool = False
    unit: str = ""  # "pixels", "epochs", ...: read after the range in a message
    optional: bool = False
    checked_elsewhere: bool = False  # the variant fields: nn.cell.check_variant's rules
    applies: Callable[[Any], bool] | None = None  # e.g. --epochs only counts without --iterations
    shown: Callable[[Any], str] | None = None  # the default as the help reads it, from the section's values
    parse: Callable[[str], Any] | None = None  # the flag's argparse type, where int/float/choices do not say it


def setting(default: Any = dataclasses.MISSING, *, factory: Callable[[], Any] | None = None, **meta: Any) -> Any:
    """A dataclass field with its ``Setting``."""
    if factory is not None:
        return field(default_factory=factory, metadata={"setting": Setting(**meta)})
    return field(default=default, metadata={"setting": Setting(**meta)})


@dataclass
class ModelConfig:
    """The network: an LSTM over the sequence and a linear head on its last hidden state."""

    input_size: int = setting(28, low=1)  # filled in from the data's view
    hidden_size: int = setting(128, flag="--hidden-size", metavar="H", group="model", low=1, high=MAX_HIDDEN_SIZE,
                               help="hidden units per layer")
    num_layers: int = setting(1, flag="--layers", metavar="N", group="model", low=1, high=MAX_LAYERS,
                              help="stacked LSTM layers")
    num_classes: int = setting(10, low=1)
    bidirectional: bool = setting(False, flag="--bidirectional", group="model", help="read each sequence both ways")
    dropout: float = setting(0.0, flag="--dropout", metavar="P", group="model", low=0, high=1, high_open=True,
                             help="dropout between stacked layers")
    forget_bias: float = setting(0.0, flag="--forget-bias", metavar="B", group="model", low=-100, high=100,
                                 help="added to the forget gate's bias at init, e.g. 1.0")
    backend: str = setting("auto", flag="--backend", group="model", choices=BACKENDS,
                           help="the LSTM's implementation: auto = fused on the CPU, torch (cuDNN) on CUDA")
    cell: str = setting("lstm", flag="--cell", group="model", choices=CELLS, checked_elsewhere=True,
                        help="the LSTM cell: lstm, peephole (Gers et al.) or layernorm (Ba et al.)")
    zoneout: float | list[float] = setting(0.0, flag="--zoneout", metavar="Z", group="model", checked_elsewhere=True,
                                           parse=zoneout_arg,
                                           help="in training each unit keeps its previous c and h with probability "
                                           "Z at each step; Z_C,Z_H for two")
    recurrent_dropout: float = setting(0.0, flag="--recurrent-dropout", metavar="P", group="model",
                                       checked_elsewhere=True,
                                       help="dropout on the h entering the recurrent product, one mask per sequence")


@dataclass
class DataConfig:
    """Which images, read how: ``view`` is rows (28 x 28), pixels or permuted (784 x 1)."""

    dataset: str = setting("mnist", flag="--dataset", group="data", choices=DATASETS, help="which images")
    view: str = setting("rows", flag="--view", group="data", choices=VIEWS,
                        help="rows (28 steps of 28), pixels (784 of 1) or permuted (784 of 1, fixed shuffle)")
    val_size: int = setting(5000, flag="--val-size", metavar="N", group="data", low=0, high=10**7,
                            help="images held out of training for validation")
    normalize: str = setting("dataset", flag="--normalize", group="data", choices=("dataset", "seed"),
                             help="dataset (training-set mean/std) or seed ((x-0.5)/1)")
    augment_shift: int = setting(2, flag="--augment-shift", metavar="N", group="data", low=0, high=8, unit="pixels",
                                 help="shift training images randomly by up to N pixels each way, 0 = off")
    augment_flip: bool = setting(False, flag="--augment-flip", group="data",
                                 help="mirror half the training images left-right: for clothes, not digits")
    augment_erase: float = setting(0.0, flag="--augment-erase", metavar="P", group="data", low=0, high=1,
                                   help="black out one random rectangle (2-40% of the image) in a fraction P of "
                                   "the training images, random erasing")
    mean: float | None = setting(None, optional=True, checked_elsewhere=True)  # from the training split
    std: float | None = setting(None, optional=True, checked_elsewhere=True)


@dataclass
class TrainConfig:
    """Optimisation; ``iterations`` wins over ``epochs`` when both are set; ``time_budget`` (seconds) ends training
    earlier when it runs out, and then drives the schedule."""

    optimizer: str = setting("adam", flag="--optimizer", group="optimisation", choices=("sgd", "adam", "adamw"),
                             help="the optimizer")
    lr: float = setting(4e-3, flag="--lr", group="optimisation", low=0, low_open=True, high=MAX_LR,
                        help="peak learning rate")
    weight_decay: float = setting(0.0, flag="--weight-decay", metavar="WD", group="optimisation", low=0, high=MAX_LR,
                                  help="weight decay")
    label_smoothing: float = setting(0.0, flag="--label-smoothing", metavar="S", group="optimisation", low=0, high=1,
                                     high_open=True, help="train towards 1-S on the label and S spread over the "
                                     "classes; validation and test losses stay plain cross-entropy")
    schedule: str = setting("onecycle", flag="--schedule", group="optimisation", choices=tuple(SCHEDULES),
                            help="learning-rate schedule")
    batch_size: int = setting(256, flag="--batch-size", metavar="B", group="optimisation", low=1, high=MAX_BATCH_SIZE,
                              help="images per step")
    epochs: float = setting(10.0, flag="--epochs", metavar="E", group="optimisation", low=0, low_open=True,
                            high=MAX_EPOCHS, applies=lambda t: t.iterations is None,
                            shown=lambda t: f"{t.epochs:g}" if t.iterations is None else f"{t.iterations} iterations",
                            help="length in passes over the training split")
    iterations: int | None = setting(None, flag="--iterations", metavar="N", group="optimisation", low=1,
                                     high=MAX_ITERATIONS, optional=True,
                                     shown=lambda t: f"{t.epochs:g} epochs" if t.iterations is None else
                                     str(t.iterations), help="length in steps; wins over --epochs")
    eval_every: int = setting(500, flag="--eval-every", metavar="N", group="optimisation", low=1, high=MAX_ITERATIONS,
                              help="validate every N iterations")
    clip: float | None = setting(1.0, flag="--clip", metavar="NORM", group="optimisation", low=0, low_open=True,
                                 optional=True, help="clip the gradient norm to this")
    time_budget: float | None = setting(None, flag="--time-budget", metavar="SECONDS", group="optimisation", low=0,
                                        low_open=True, optional=True, unit="seconds",
                                        help="stop after this much training time, the schedule following the "
                                        "clock, e.g. 30")
    select: str = setting("none", flag="--select", group="optimisation", choices=SELECTIONS,
                          help="which samples a step trains on: stale-loss = after --select-warmup epochs keep each "
                          "sample with probability (percentile of its last loss) ** --select-beta; --epochs and "
                          "--iterations then count trained batches")
    select_beta: float = setting(3.0, flag="--select-beta", metavar="BETA", group="optimisation", low=0, high=100,
                                 help="selection's exponent")
    select_floor: float = setting(0.0, flag="--select-floor", metavar="Q", group="optimisation", low=0, high=1,
                                  help="selection's least keep probability")
    select_warmup: int = setting(1, flag="--select-warmup", metavar="E", group="optimisation", low=0,
                                 high=MAX_EPOCHS, unit="epochs", help="epochs on every sample before selection starts")
    seed: int = setting(125, flag="--seed", group="optimisation", low=0, high=MAX_SEED,
                        help="seed of init, split, shuffling and permutation")
    device: str = setting("auto", flag="--device", group="optimisation", choices=("auto", "cpu", "cuda"),
                          help="auto = cuda when available, else cpu")
    world_size: int = setting(1, low=1, high=MAX_BATCH_SIZE)  # processes that trained it (torchrun's WORLD_SIZE)


@dataclass
class Config:
    """Everything needed to rebuild and retrain a model; ``Config()`` is the default recipe."""

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


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


def settings() -> Iterator[tuple[str, dataclasses.Field, Setting]]:
    """(section, field, setting) of every config field, in declaration order."""
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            yield section, f, f.metadata["setting"]


def flag_name(section: str, f: dataclasses.Field, s: Setting) -> str:
    """How a message names a field: its flag, else where it sits in the config."""
    return s.flag or f"the config's {f.name}"


def _range_text(s: Setting, is_int: bool) -> str:
    """The allowed values as a message reads them: "in 1..4096", "in [0, 1)", "a positive number of seconds"."""
    unit = f" {s.unit}" if s.unit else ""
    if s.low is not None and s.high is not None:
        if is_int:
            return f"in {int(s.low)}..{int(s.high)}{unit}"
        return f"in {'(' if s.low_open else '['}{s.low:g}, {s.high:g}{')' if s.high_open else ']'}{unit}"
    if s.low is not None:
        if s.low == 0 and s.low_open:
            return f"a positive number{' of' + unit if unit else ''}"
        return f"at least {s.low:g}{unit}"
    return "a finite number"


def _in_range(v: float, s: Setting) -> bool:
    low_ok = s.low is None or (v > s.low if s.low_open else v >= s.low)
    high_ok = s.high is None or (v < s.high if s.high_open else v <= s.high)
    return low_ok and high_ok


def check_field(section_obj: Any, f: dataclasses.Field, s: Setting, name: str) -> str | None:
    """None when the field's value fits its setting, else the one-line complaint."""
    v = getattr(section_obj, f.name)
    if s.checked_elsewhere or (s.applies is not None and not s.applies(section_obj)):
        return None
    if v is None and s.optional:
        return None
    if s.choices is not None:
        return None if v in s.choices else f"{name} must be one of {', '.join(s.choices)}, got {v!r}"
    if isinstance(f.default, bool):
        return None if isinstance(v, bool) else f"{name} must be true or false, got {v!r}"
    is_int = "int" in str(f.type) and "float" not in str(f.type)
    number = isinstance(v, int) if is_int else isinstance(v, int | float) and math.isfinite(v)
    if isinstance(v, bool) or not number or not _in_range(v, s):
        got = repr(v) if isinstance(v, str) else v
        return f"{name} must be {_range_text(s, is_int)}, got {got}"
    return None


def validate_config(config: Config) -> None:
    """Refuse nonsense before any work starts, with a message naming the flag: every number finite and within its
    setting's bounds, every choice one of the known names, the variant by the LSTM's own rules."""
    for section, f, s in settings():
        problem = check_field(getattr(config, section), f, s, flag_name(section, f, s))
        if problem:
            raise LstmlabError(problem)
    _validate_variant(config.model)


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
