"""What ``lstmlab.nn`` hands its loader (:mod:`lstmlab.nn._native`, standard library only), so that the loader
imports nothing above it and every copy of it (``python -m`` runs it as a second one) sees the same hooks.

``SELF_TEST`` holds one ``check(ops) -> str | None``: how freshly loaded compiled loops are held to the Python ones
(None when they agree, else why not); ``lstmlab.nn`` sets it to :func:`lstmlab.nn.selftest.self_test`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

SELF_TEST: list[Callable[[Any], str | None]] = []
