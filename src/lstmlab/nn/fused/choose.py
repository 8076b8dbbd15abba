"""Which step loops run: the compiled ones (:mod:`lstmlab.nn._native`) when they are loaded and take the call's
device, dtype and variants, else the Python ones; and the guard that falls back from the first to the second."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

from lstmlab.nn.variants import OWNER

_T = TypeVar("_T")


def _mm(native: Any, a: Tensor, b: Tensor) -> Tensor:
    """a @ b on the compiled loops' GEMM when they are loaded (oneDNN's in float32: csrc/lstm_gemm.h), else torch.mm."""
    return torch.mm(a, b) if native is None else native.mm(a, b)


def _loader() -> Any:
    """The module that builds and loads the compiled loops: imported on first use, as `python -m` runs it as a
    script (a copy imported with this package would be a second one)."""
    from lstmlab.nn import _native

    return _native


def _native_for(x: Tensor, variant: dict[str, Tensor | None] | None = None) -> Any:
    """The compiled step loops when they are built and support x's device and dtype and every variant argument
    given (the table's ``loops``), else None."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return None
    if variant and any(OWNER[name].loops != "native" for name, t in variant.items() if t is not None):
        return None
    return _loader().get()


def _guarded(where: str, like: Tensor, run: Callable[[], _T]) -> _T:
    """run(); if it raised on the compiled loops, one warning line and run() again on the Python loops, which take
    over for the rest of the process. Only for calls whose inputs the compiled loops do not overwrite."""
    if _native_for(like) is None:
        return run()
    try:
        return run()
    except Exception as e:  # noqa: BLE001 - whatever the compiled loops raise, the Python loops give the numbers
        _loader().fail(where, e)
        with _loader().forced(None):
            return run()
