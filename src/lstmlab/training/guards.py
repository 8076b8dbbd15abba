"""What stops a run on its own: the time budget (``Deadline``) and the divergence rule (``Guard``).

Divergence rule: the run stops with a one-line error when a training or validation loss is not finite, or when
the smoothed training loss (an exponential average, each step moving it 10% of the way to its loss) exceeds
3x a reference: the first step's loss during a 10-step warm-up, then the smaller of that and the smoothed loss
after the warm-up. The checkpoints of the last evaluation before that are kept.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from lstmlab.errors import LstmlabError

DIVERGE_WARMUP = 10  # steps before the reference loss is taken
DIVERGE_FACTOR = 3.0  # the smoothed loss may not exceed this multiple of the reference


DIVERGE_DECAY = 0.9  # smoothing of the training loss: each step moves the average 10% of the way to its loss


class Diverged(LstmlabError):
    """Training stopped because the loss diverged (see the module's docstring for the rule)."""


class Deadline:
    """A run's time budget: steps stop early enough that the closing validation also ends within it.

    Progress for the schedule is the fraction of the time for steps used so far; it never goes back. The time a
    step and a validation take are measured as the run goes. Until the first validation, its time is guessed from
    the average step (a third of a training step's time per sample, a forward pass alone): the average, not the
    last step, because the guess multiplies it by the validation batches and one slow step on a busy machine must
    not end the run. At most half the budget is held back for validating.
    """

    def __init__(self, budget: float, val_fraction: float, start: float,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.budget = budget
        self.val_fraction = val_fraction  # validation samples per training batch
        self.start = start
        self.last = self.start
        self.step_s = 0.0  # the next step's time, for stopping in time: a slow step counts at once
        self.step_avg: float | None = None  # a moving average of step times, for the validation guess
        self.eval_s: float | None = None
        self._progress = 0.0

    def _for_steps(self) -> float:
        if self.eval_s is not None:
            reserve = self.eval_s
        else:
            reserve = self.val_fraction * (self.step_avg or 0.0) / 3
        return self.budget - min(reserve, self.budget / 2)

    def progress(self) -> float:
        self._progress = max(self._progress, (self.clock() - self.start) / self._for_steps())
        return self._progress

    def step_done(self) -> bool:
        """Record a step; True when there is no time for another one."""
        now = self.clock()
        took = now - self.last
        self.step_s = max(took, 0.5 * self.step_s)
        self.step_avg = took if self.step_avg is None else 0.9 * self.step_avg + 0.1 * took
        self.last = now
        return self.out_of_time()

    def out_of_time(self) -> bool:
        """True when another step would not leave time for the closing validation."""
        return self.clock() - self.start + self.step_s >= self._for_steps()

    def eval_done(self, seconds: float) -> None:
        # The slowest so far, with a margin: the closing one may also write best.safetensors, on a busier disk.
        self.eval_s = max(1.5 * seconds, self.eval_s or 0.0)
        self.last = self.clock()

    def state(self) -> dict[str, Any]:
        """What a resumed run needs to go on with the remaining budget."""
        return {"step_s": self.step_s, "step_avg": self.step_avg, "eval_s": self.eval_s, "progress": self._progress}

    def restore(self, state: dict[str, Any]) -> None:
        """Undo ``state`` (``start`` is set by the caller to account for the time already used)."""
        self.step_s, self.step_avg, self.eval_s = state["step_s"], state["step_avg"], state["eval_s"]
        self._progress = state["progress"]


class Guard:
    """The divergence rule of the module's docstring, fed one training loss per step."""

    def __init__(self) -> None:
        self.steps = 0
        self.smoothed: float | None = None
        self.reference: float | None = None

    def check(self, loss: float, iteration: int) -> str | None:
        """None while training is healthy, else what went wrong."""
        if not math.isfinite(loss):
            return f"the training loss became {loss} at iteration {iteration}"
        self.steps += 1
        self.smoothed = loss if self.smoothed is None else DIVERGE_DECAY * self.smoothed + (1 - DIVERGE_DECAY) * loss
        if self.reference is None:  # the untrained model's loss (about ln 10) until the warm-up ends
            self.reference = loss
        if self.steps == DIVERGE_WARMUP:  # an explosion within the warm-up must not become the reference
            self.reference = min(self.reference, self.smoothed)
        if self.smoothed > DIVERGE_FACTOR * self.reference:
            return (f"the smoothed training loss reached {self.smoothed:.4g} at iteration {iteration}, over "
                    f"{DIVERGE_FACTOR:g}x its reference {self.reference:.4g}")
        return None

