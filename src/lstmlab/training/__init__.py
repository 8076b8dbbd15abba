"""Training a sequence classifier: the textbook's loop (SGD, evaluate every 500 iterations) made into a tool, with
a real validation split, schedules, checkpoints, metrics and exact resume.

``recipes`` (named Configs) → ``splits`` (the data) → ``trainer`` (the loop: ``optim``, ``augment``, ``guards``)
→ ``evaluation`` and ``report`` (the test and summary.json), all in a locked run ``folder``; ``run`` ties them
together as :func:`train` and :func:`resume`; ``stopping`` handles Ctrl-C, SIGTERM and torchrun's lost peers.
"""

from __future__ import annotations

from lstmlab.config.recipes import recipe
from lstmlab.training.guards import Diverged
from lstmlab.training.run import resume, train
from lstmlab.training.stopping import Interrupted

__all__ = ["Diverged", "Interrupted", "recipe", "resume", "train"]
