"""The model side: the textbook cell (``cell``), the variants' table (``variants``), layers with nn.LSTM's
interface (``lstm``), and the fast paths held equal to them (``fused``, ``_native``).

The names below are imported on first use (PEP 562), so that the torch-free ``variants`` table can be read on its
own (``lstmlab --help`` does)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lstmlab.nn import _hooks

_WHERE = {"LSTM": "lstmlab.nn.lstm", "LSTMCell": "lstmlab.nn.cell", "lstm_step": "lstmlab.nn.cell"}

__all__ = ["LSTM", "LSTMCell", "fast_loops_pending", "lstm_step"]

if TYPE_CHECKING:
    from lstmlab.nn.cell import LSTMCell, lstm_step
    from lstmlab.nn.lstm import LSTM


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'lstmlab.nn' has no attribute {name!r}")


def fast_loops_pending() -> bool:
    """True while the fused backend's compiled step loops are still to be built on this machine (a run then starts
    on the Python loops, the same math, while they compile in the background); False when they are ready, switched
    off, or cannot be built (the loader says why, once)."""
    from lstmlab.nn import _native

    return _native.build_pending()


def _self_test(ops: Any) -> str | None:
    """The compiled loops' self-test, imported when a library is first loaded (it imports torch and the loops)."""
    from lstmlab.nn.selftest import self_test

    return self_test(ops)


_hooks.SELF_TEST[:] = [_self_test]  # before any load: whatever imports the loader runs this package first
