"""Configuration: every setting declared once (``schema``), the named recipes as data (``recipes``), and
``lstmlab train``'s flags built from both (``flags``). A ``Config`` is saved inside every checkpoint, so a model
can be rebuilt from the file alone. Torch-free, so that ``lstmlab train --help`` answers without loading torch."""

from lstmlab.config.schema import (
    MAX_BATCH_SIZE,
    MAX_EPOCHS,
    MAX_HIDDEN_SIZE,
    MAX_ITERATIONS,
    MAX_LAYERS,
    MAX_LR,
    MAX_SEED,
    SELECTIONS,
    Config,
    DataConfig,
    ModelConfig,
    TrainConfig,
    validate_config,
)

__all__ = ["MAX_BATCH_SIZE", "MAX_EPOCHS", "MAX_HIDDEN_SIZE", "MAX_ITERATIONS", "MAX_LAYERS", "MAX_LR", "MAX_SEED",
           "SELECTIONS", "Config", "DataConfig", "ModelConfig", "TrainConfig", "validate_config"]
