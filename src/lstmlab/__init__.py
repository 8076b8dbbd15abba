"""lstmlab: a gate-level LSTM equal to ``torch.nn.LSTM``, and a sequential-MNIST lab around it.

The names below are imported on first use (PEP 562), so that ``lstmlab --help`` answers without torch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_WHERE = {
    "LSTM": "lstmlab.nn.lstm",
    "Config": "lstmlab.config",
    "DataConfig": "lstmlab.config",
    "LSTMCell": "lstmlab.nn.cell",
    "LstmlabError": "lstmlab.errors",
    "ModelConfig": "lstmlab.config",
    "SequenceClassifier": "lstmlab.model",
    "TrainConfig": "lstmlab.config",
    "lstm_step": "lstmlab.nn.cell",
}

__all__ = [
    "LSTM",
    "Config",
    "DataConfig",
    "LSTMCell",
    "LstmlabError",
    "ModelConfig",
    "SequenceClassifier",
    "TrainConfig",
    "lstm_step",
]

if TYPE_CHECKING:
    from lstmlab.config import Config, DataConfig, ModelConfig, TrainConfig
    from lstmlab.errors import LstmlabError
    from lstmlab.model import SequenceClassifier
    from lstmlab.nn.cell import LSTMCell, lstm_step
    from lstmlab.nn.lstm import LSTM


def __getattr__(name: str) -> Any:
    """Import a public name's module the first time the name is used."""
    if name not in _WHERE:
        raise AttributeError(f"module 'lstmlab' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value
