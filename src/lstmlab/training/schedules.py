"""The learning-rate schedules, one table: each is a function of the run's progress in [0, 1] (not of a step
count, so that a run with a time budget can follow the clock) returning (learning rate, Adam's beta1 or None).
Adding a schedule is one entry in ``SCHEDULES``; ``--schedule`` offers every name in it. Torch-free."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass


def _anneal(start: float, end: float, fraction: float) -> float:
    """Cosine from start (fraction 0) to end (fraction 1)."""
    return end + (start - end) * (1.0 + math.cos(math.pi * fraction)) / 2.0


def _constant(lr: float, p: float) -> tuple[float, float | None]:
    return lr, None


def _onecycle(lr: float, p: float) -> tuple[float, float | None]:
    # Smith's one-cycle, as torch.optim.lr_scheduler.OneCycleLR: a quarter warming up from lr/25 while beta1
    # falls from 0.95 to 0.85, then both back by cosine, down to lr/250 000
    warm, low = 0.25, lr / 25.0
    if p < warm:
        return _anneal(low, lr, p / warm), _anneal(0.95, 0.85, p / warm)
    x = (p - warm) / (1.0 - warm)
    return _anneal(lr, low / 1e4, x), _anneal(0.85, 0.95, x)


def _cosine(lr: float, p: float) -> tuple[float, float | None]:
    return _anneal(lr, 0.0, p), None


@dataclass(frozen=True)
class Schedule:
    """A named schedule: how the run's first line reads it, and its function of (peak lr, progress)."""

    label: str
    at: Callable[[float, float], tuple[float, float | None]]


SCHEDULES: dict[str, Schedule] = {
    "none": Schedule("constant lr", _constant),
    "onecycle": Schedule("one-cycle schedule", _onecycle),
    "cosine": Schedule("cosine decay", _cosine),
}


def schedule(name: str, lr: float, progress: float) -> tuple[float, float | None]:
    """(learning rate, Adam's beta1 or None) of schedule ``name`` at ``progress`` (clamped to [0, 1]) of the run."""
    return SCHEDULES[name].at(lr, min(max(progress, 0.0), 1.0))
