"""How a run is stopped from outside (Ctrl-C, SIGTERM, a lost torchrun peer) and the line that says what was kept."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from lstmlab.runs import RUN_JSON
from lstmlab.training import distributed

if TYPE_CHECKING:
    from lstmlab.training.trainer import Trainer


class Interrupted(KeyboardInterrupt):
    """Training was interrupted (Ctrl-C or SIGTERM); ``message`` says what was kept and how to resume."""

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.message, self.exit_code = message, exit_code


class Terminated(KeyboardInterrupt):
    """Raised by the SIGTERM handler, so that a terminated run ends as an interrupted one does."""


def how_it_stopped(error: BaseException) -> tuple[str, int]:
    """What stopped a run, in a few words, and the exit status that says so."""
    if isinstance(error, Terminated):
        if distributed.world().size > 1:
            return "terminated (SIGTERM, which torchrun sends to every process when one of them fails)", 143
        return "terminated (SIGTERM)", 143
    if isinstance(error, KeyboardInterrupt):
        return "interrupted", 130
    return "stopped because another process of the torchrun job ended", 1


def interrupted(tr: Trainer | None, out: Path, error: BaseException) -> Interrupted:
    """The closing line of an interrupted run: where it stopped, what is kept, how to go on."""
    how, code = how_it_stopped(error)
    command = f"`{distributed.resume_command(out)}`"
    if distributed.restarts_left():  # torchrun --max-restarts: its next attempt continues the run (see ``run``)
        command += " (torchrun, with restarts left, does that by itself)"
    if tr is None and (out / RUN_JSON).exists():
        return Interrupted(f"{how} before training started; {command} starts it", code)
    if tr is None:
        return Interrupted(f"{how} before training started; nothing was saved", code)
    if tr.saved_iter:
        kept = (f"{out} keeps the checkpoint of iteration {tr.saved_iter} (best.safetensors, last.safetensors, "
                "metrics.csv and the state to resume from)")
    else:
        kept = f"no checkpoint yet (the first comes at iteration {tr.config.train.eval_every}), so it starts again " \
               "from iteration 0"
    return Interrupted(f"{how} at iteration {tr.at.iteration} of {tr.total}; {kept}: continue with {command}", code)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM ends a run as Ctrl-C does: checkpoints kept, a closing line saying how to resume."""
    def handler(signum: int, frame: object) -> None:
        ignore_sigterm_under_torchrun()  # torchrun's next SIGTERMs find the process already stopping
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is handler:  # not when a torchrun process is stopping
            signal.signal(signal.SIGTERM, previous)


def ignore_sigterm_under_torchrun() -> None:
    """Once a process of a torchrun job is stopping, the SIGTERM torchrun sends to every survivor must not cut its
    closing line short (one process alone keeps the usual handling)."""
    if distributed.world().size > 1:
        with contextlib.suppress(ValueError):  # not the main thread
            signal.signal(signal.SIGTERM, signal.SIG_IGN)

