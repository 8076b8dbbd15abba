"""Training on many processes under ``torchrun``: its environment, the process group, each rank's part of a
global batch, the reductions the training loop needs, and which process writes or speaks.

``torchrun --standalone --nproc_per_node N -m lstmlab train ...`` starts N processes; each finds its place in
torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK, LOCAL_WORLD_SIZE) and joins one process group: gloo for
CPU tensors, and NCCL for CUDA tensors on a machine with a GPU. Every rank draws the same global batch order from
the seed, takes its own contiguous slice of each global batch (``my_part``) and DistributedDataParallel averages
the gradients, so that N processes follow the one-process run with the same seed and global batch. Rank 0 alone
writes the run folder and prints; the others are quiet.

Outside torchrun (no WORLD_SIZE, or WORLD_SIZE=1) every function here is the identity of one process, and
training is exactly what it was.

A set-up error on any rank (its data missing, the folder in use on rank 0) reaches every rank at the next
``share``: all stop, and rank 0 prints the first one. Once training runs, a rank that dies breaks the group's
next collective; the survivors stop, and one of them prints the closing line (``claim_closing_line``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lstmlab.errors import LstmlabError

MAX_THREADS = 1024


@dataclass(frozen=True)
class World:
    """This process's place among the job's: ``size`` processes, this one is ``rank``; ``local_*`` count the
    processes of this machine."""

    size: int = 1
    rank: int = 0
    local_rank: int = 0
    local_size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes the run folder and prints."""
        return self.rank == 0


class SetupFailed(LstmlabError):
    """Some rank's set-up failed; raised on every rank with the first rank's message (rank 0 prints it)."""


_world: World | None = None  # set while ``started`` holds the process group
_setup_open = False  # True from joining the group until the last ``share``: a failing rank still tells the others


def _env_int(env: dict[str, str] | os._Environ[str], name: str, default: int) -> int:
    text = env.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise LstmlabError(f"torchrun's environment variable {name}={text!r} is not a whole number") from None


def from_env(env: dict[str, str] | os._Environ[str] = os.environ) -> World:
    """The world torchrun describes in WORLD_SIZE, RANK, LOCAL_RANK and LOCAL_WORLD_SIZE; one process when
    WORLD_SIZE is absent."""
    if "WORLD_SIZE" not in env:
        return World()
    size = _env_int(env, "WORLD_SIZE", 1)
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if size > 1 and not env.get(k)]
    if missing:  # torch's env:// rendezvous would fail with a traceback
        raise LstmlabError(f"WORLD_SIZE={size} but {', '.join(missing)} not set: start the job with torchrun "
                           "(see README, More than one machine), or unset WORLD_SIZE for one process")
    rank = _env_int(env, "RANK", 0)
    local_rank = _env_int(env, "LOCAL_RANK", rank)
    local_size = _env_int(env, "LOCAL_WORLD_SIZE", size)
    if not (size >= 1 and 0 <= rank < size and 0 <= local_rank < local_size <= size):
        raise LstmlabError(f"torchrun's environment does not add up: WORLD_SIZE={size} RANK={rank} "
                           f"LOCAL_RANK={local_rank} LOCAL_WORLD_SIZE={local_size}")
    return World(size, rank, local_rank, local_size)


def world() -> World:
    """This process's world: the one ``started`` joined, else that of a process group someone else initialised,
    else one process."""
    if _world is not None:
        return _world
    if dist.is_available() and dist.is_initialized():
        try:
            env = from_env()
        except LstmlabError:  # a group joined some other way (tcp://, file://): its size and rank are what count
            env = World()
        return World(dist.get_world_size(), dist.get_rank(), env.local_rank, env.local_size)
    return World()


def is_main() -> bool:
    """Whether this process writes and prints (always, outside torchrun)."""
    return world().main


def speaks() -> bool:
    """Whether this process prints a user's mistake: rank 0 by torchrun's RANK (readable before the group is
    joined, and even when the rest of the environment is garbled), or the one process outside torchrun."""
    return "WORLD_SIZE" not in os.environ or os.environ.get("RANK", "0").strip() in ("", "0")


def backend() -> str:
    """gloo for CPU tensors; on a machine with a GPU, NCCL for CUDA tensors too (the small set-up and loss
    reductions stay on the CPU, the gradients go where the model is)."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def usable_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def set_threads(threads: int | None, w: World) -> None:
    """torch's threads in this process: ``threads`` when given; under torchrun with several processes on this
    machine, its cores shared out among them, unless OMP_NUM_THREADS says otherwise (torchrun itself sets it to 1
    when it was unset, so 1 counts as unset: pass ``--threads 1`` to insist on it); else torch's own choice."""
    if threads is not None:
        if not 1 <= threads <= MAX_THREADS:
            raise LstmlabError(f"--threads must be in 1..{MAX_THREADS}, got {threads}")
        torch.set_num_threads(threads)
    elif w.local_size > 1 and os.environ.get("OMP_NUM_THREADS", "1").strip() == "1":
        torch.set_num_threads(max(1, usable_cores() // w.local_size))


@contextlib.contextmanager
def started(threads: int | None = None) -> Iterator[World]:
    """Join torchrun's process group for the block (one process: nothing to join) with this process's threads
    set; leave it at the end."""
    global _world, _setup_open
    w = from_env()
    set_threads(threads, w)
    if w.size == 1:
        yield w
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(w.local_rank)
    dist.init_process_group(backend(), **_attempt_store(w))
    _world, _setup_open = w, True
    try:
        yield w
    finally:
        _world, _setup_open = None, False
        with contextlib.suppress(Exception):  # a group another rank broke may refuse a clean goodbye
            dist.destroy_process_group()


def _attempt_store(w: World) -> dict[str, Any]:
    """How to join the group: torchrun's env:// rendezvous, except in an attempt torchrun restarted on one
    machine. torchrun's store outlives the attempts, and the gloo addresses the dead attempt left in it can reach
    a new process before its peers overwrite them: it then fails to connect (pytorch issue 135712). On one
    machine every process counts restarts alike, so the attempt's keys go under a prefix of their own. (On many
    machines the counts can differ; there, set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun.)"""
    count = restart_count()
    if not count or w.size != w.local_size or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), w.size, is_master=False,
                           timeout=timedelta(minutes=30))
    return {"store": dist.PrefixStore(f"lstmlab/attempt-{count}/default_pg", client), "rank": w.rank,
            "world_size": w.size}


def leave_together() -> None:
    """After a job that went well, wait for every process before leaving the group (rank 0 tests the model
    while the others are done). A gloo worker thread drops its last message's tensors a moment after the message
    completes; a process that exits at once can be shutting its interpreter down by then, and the thread's
    attempt to take the GIL for those tensors aborts it (SIGABRT, "terminate called without an active
    exception"; seen here about once in 60 jobs). A barrier's own tensor is not Python's. A peer that failed has
    said so itself: an error here is dropped. The barrier alone did not end it (a worker still aborted in a CI
    run), so the process also leaves without shutting its interpreter down (``lstmlab.cli.entry``)."""
    if world().size > 1:
        with contextlib.suppress(Exception):
            dist.barrier()


# ---------------------------------------------------------------------------------------------
# set-up: rank 0's decisions shared, and any rank's error stopping all


def _gather(obj: Any) -> list[Any]:
    got: list[Any] = [None] * world().size
    dist.all_gather_object(got, obj)
    return got


def _first_error(got: list[tuple[str | None, Any]]) -> None:
    for error, _ in got:
        if error is not None:
            raise SetupFailed(error)


def share(payload: Any = None, *, last: bool = False) -> Any:
    """Rank 0's ``payload`` on every rank, once every rank has reached this point without an error; otherwise
    ``SetupFailed`` on every rank, with the first failed rank's message. ``last`` closes the set-up: from then
    on a rank that fails simply stops (its peers find the group broken)."""
    global _setup_open
    w = world()
    if w.size == 1:
        return payload
    got = _gather((None, payload if w.main else None))
    if last:
        _setup_open = False
    _first_error(got)
    return got[0][1]


@contextlib.contextmanager
def set_up_errors_shared() -> Iterator[None]:
    """Around a rank's set-up: its one-line error reaches the ranks waiting at the next ``share``."""
    global _setup_open
    try:
        yield
    except LstmlabError as e:
        w = world()
        if w.size > 1 and _setup_open and not isinstance(e, SetupFailed):
            _setup_open = False
            message = str(e) if w.main else f"rank {w.rank} of {w.size}: {e}"
            _first_error(_gather((message, None)))
        raise


# ---------------------------------------------------------------------------------------------
# the training step: each rank's part of a global batch, and the values every rank must agree on


def wrap(model: nn.Module) -> nn.Module:
    """The module a training step calls: DistributedDataParallel around ``model`` (it starts every rank from
    rank 0's weights and averages the gradients), or ``model`` itself in one process."""
    w = world()
    if w.size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def my_part(n: int) -> tuple[slice, float]:
    """This rank's slice of a global batch of ``n`` samples, and the weight of its mean loss.

    Rank r of W takes samples ``r*n//W .. (r+1)*n//W`` (sizes within one of each other, even in an epoch's short
    last batch). The weight, its samples x W / n (1.0 when W divides n), makes DDP's average of the ranks'
    gradients the gradient of the global batch's mean loss. A rank left without samples (n < W) takes the first
    sample with weight 0, so that it still joins the gradients' reduction.
    """
    w = world()
    if w.size == 1:
        return slice(None), 1.0
    lo, hi = w.rank * n // w.size, (w.rank + 1) * n // w.size
    if hi == lo:
        return slice(0, 1), 0.0
    return slice(lo, hi), (hi - lo) * w.size / n


def whole_batch(values: torch.Tensor, n: int) -> torch.Tensor:
    """Per-sample values of this rank's part of a global batch of ``n`` (see ``my_part``) -> the global batch's, in
    its order, on every rank (``values`` itself in one process)."""
    w = world()
    if w.size == 1:
        return values
    _, weight = my_part(n)
    parts: list[Any] = [None] * w.size
    dist.all_gather_object(parts, values.detach().cpu() if weight else values.new_empty(0).cpu())
    return torch.cat(parts)


def average(value: float) -> float:
    """The mean of ``value`` over the ranks (``value`` itself in one process)."""
    w = world()
    if w.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / w.size


def from_main(value: float) -> float:
    """Rank 0's ``value`` on every rank (a clock reading, so that all ranks follow one schedule)."""
    if world().size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.broadcast(t, src=0)
    return t.item()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any (so that all ranks stop at the same step)."""
    if world().size == 1:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def evaluate(model: nn.Module, images: Tensor, labels: Tensor, data: Any, permutation: Tensor | None = None,
             num_classes: int = 10) -> Any:
    """``evaluate_model`` over all of ``images``: each rank evaluates its contiguous shard and the loss sums and
    confusion counts are added up, so every rank gets the whole split's EvalResult (the counts exactly, the loss
    to the last bits) in 1/W of the time."""
    from lstmlab.training.evaluation import EvalResult, evaluate_model

    w = world()
    if w.size == 1:
        return evaluate_model(model, images, labels, data, permutation, num_classes=num_classes)
    n = len(labels)
    lo, hi = w.rank * n // w.size, (w.rank + 1) * n // w.size
    mine = evaluate_model(model, images[lo:hi], labels[lo:hi], data, permutation, num_classes=num_classes)
    counts = torch.tensor(mine.confusion, dtype=torch.float64).flatten()
    totals = torch.cat([torch.tensor([mine.loss * (hi - lo)], dtype=torch.float64), counts])
    dist.all_reduce(totals)
    confusion = totals[1:].round().long().view(num_classes, num_classes)
    per_class = (confusion.diag().double() / confusion.sum(1).clamp(min=1).double()).tolist()
    return EvalResult(loss=totals[0].item() / max(n, 1), accuracy=confusion.diag().sum().item() / max(n, 1),
                      per_class_accuracy=per_class, confusion=confusion.tolist())


# ---------------------------------------------------------------------------------------------
# random streams: dropout draws differ between ranks, and a resume puts back each rank's own


def seed_ranks(seed: int) -> None:
    """Give ranks other than 0 a global torch stream of their own (dropout and zoneout masks); call it after the
    model is built, whose initial weights come from the common seed (and DDP copies rank 0's anyway)."""
    w = world()
    if w.rank:
        torch.manual_seed((seed + w.rank) % 2**64)


def rank_rng_states() -> dict[str, Tensor]:
    """Every rank's global torch RNG state but rank 0's (which ``runs.rng_state`` keeps), named for the state
    file; on rank 0 only (empty elsewhere, and in one process). Every rank must call it."""
    w = world()
    if w.size == 1:
        return {}
    mine = torch.get_rng_state()
    got = [torch.empty_like(mine) for _ in range(w.size)]
    dist.all_gather(got, mine)
    return {f"rng.torch.rank{r}": got[r] for r in range(1, w.size)} if w.main else {}


def restore_rank_rng(tensors: dict[str, Tensor], saved_world_size: int, seed: int, iteration: int) -> None:
    """On a rank other than 0, put back its own RNG state from a resumed state (a job of another size starts
    a fresh stream for it, derived from the seed and the iteration)."""
    w = world()
    if not w.rank:
        return
    state = tensors.get(f"rng.torch.rank{w.rank}")
    if state is not None and saved_world_size == w.size:
        torch.set_rng_state(state)
    else:
        torch.manual_seed((seed + w.rank + 7919 * iteration) % 2**64)


# ---------------------------------------------------------------------------------------------
# the end of a job: failures, the closing line, how to go on


def lost_peer(error: BaseException) -> bool:
    """Whether ``error`` says that another process of the job is gone (the group's collective broke)."""
    if world().size == 1:
        return False
    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        s in text for s in ("gloo", "Connection reset by peer", "Connection closed by peer", "NCCL", "Broken pipe"))


def claim_closing_line() -> bool:
    """Whether this process prints the job's closing line: the first survivor to claim it in torchrun's store
    (so one line, whichever rank died); rank 0 when the store cannot be reached. Always, in one process."""
    w = world()
    if w.size == 1:
        return True
    try:
        store = dist.distributed_c10d._get_default_store()
        return store.add(f"lstmlab/closing-line/{restart_count()}", 1) == 1
    except Exception:  # noqa: BLE001 - no store, no claim: rank 0 speaks
        return w.main


def restart_count() -> int:
    """How many times torchrun has restarted the job (its --max-restarts); 0 outside torchrun."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def restarts_left() -> int:
    """How many more times torchrun will restart the job when a process fails (--max-restarts); 0 outside it."""
    try:
        return max(0, int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) - restart_count())
    except ValueError:
        return 0


def job_id() -> str | None:
    """torchrun's id of this job (its --rdzv-id, random with --standalone), the same over its restarts; None
    outside torchrun."""
    return os.environ.get("TORCHELASTIC_RUN_ID") or None


def resume_command(out: Path | str) -> str:
    """The command that continues the run in ``out``, for this job's shape."""
    w = world()
    if w.size == 1:
        return f"lstmlab train --resume {out}"
    if w.size == w.local_size:
        return f"torchrun --standalone --nproc_per_node {w.local_size} -m lstmlab train --resume {out}"
    return (f"torchrun --nnodes {w.size // w.local_size} --nproc_per_node {w.local_size} --rdzv-endpoint HOST:PORT "
            f"-m lstmlab train --resume {out}")
