"""The model side: the textbook cell (``cell``), layers with nn.LSTM's interface (``lstm``), and the fast
paths held equal to them (``fused``, ``_native``)."""

from lstmlab.nn.cell import LSTMCell, lstm_step
from lstmlab.nn.lstm import LSTM

__all__ = ["LSTM", "LSTMCell", "lstm_step"]
