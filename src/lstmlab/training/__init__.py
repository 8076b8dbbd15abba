"""Training a sequence classifier: the textbook's loop (SGD, evaluate every 500 iterations) made into a tool, with
a real validation split, schedules, checkpoints, metrics and exact resume.

``splits`` (the data) → ``trainer`` (the loop: ``optim`` and ``schedules``, ``augment``, ``guards``) →
``evaluation`` and ``report`` (the test and summary.json), all in a locked run ``folder``; ``run`` ties them
together as :func:`train` and :func:`resume`; ``stopping`` handles Ctrl-C, SIGTERM and torchrun's lost peers.
The recipes are data, in :mod:`lstmlab.config.recipes`.

The names below are imported on first use (PEP 562), so that the torch-free ``schedules`` table can be read on
its own (the flags offer its names).
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {"Diverged": "lstmlab.training.guards", "Interrupted": "lstmlab.training.stopping",
          "recipe": "lstmlab.config.recipes", "resume": "lstmlab.training.run", "train": "lstmlab.training.run"}

__all__ = ["Diverged", "Interrupted", "recipe", "resume", "train"]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'lstmlab.training' has no attribute {name!r}")
