"""The model side: the textbook cell (``cell``), layers with nn.LSTM's interface (``lstm``), and the fast
paths held equal to them (``fused``, ``_native``)."""

from lstmlab.nn.cell import LSTMCell, lstm_step
from lstmlab.nn.lstm import LSTM

__all__ = ["LSTM", "LSTMCell", "fast_loops_pending", "lstm_step"]


def fast_loops_pending() -> bool:
    """True while the fused backend's compiled step loops are still to be built on this machine (a run then starts
    on the Python loops, the same math, while they compile in the background); False when they are ready, switched
    off, or cannot be built (the loader says why, once)."""
    from lstmlab.nn import _native

    return _native.build_pending()
