"""Which step loops the fused backend runs in a test (the fixtures ``loops`` and ``native_ops`` are in conftest)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from lstmlab.nn import _native


@contextlib.contextmanager
def using(ops) -> Iterator[None]:  # noqa: ANN001
    """Force the fused backend onto the given step loops (None = Python), forward and backward."""
    with _native.forced(ops):
        yield
