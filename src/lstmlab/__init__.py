"""lstmlab: a gate-level LSTM equal to ``torch.nn.LSTM``, and a sequential-MNIST lab around it."""

from lstmlab.config import Config, DataConfig, ModelConfig, TrainConfig
from lstmlab.errors import LstmlabError
from lstmlab.model import SequenceClassifier
from lstmlab.nn.cell import LSTMCell, lstm_step
from lstmlab.nn.lstm import LSTM

__version__ = "0.1.0"

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
