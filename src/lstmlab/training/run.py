"""A run from start to end: ``train`` (a new run) and ``resume`` (a stopped one), in a locked folder.

A run lives in one folder, locked while it runs (``lstmlab.runs``): ``run.json`` (id and config) first, then at
every evaluation ``best``/``last.safetensors``, ``metrics.csv`` and ``state.safetensors`` (everything
``--resume`` needs), and ``summary.json`` at the end.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from lstmlab.config import Config, validate_config
from lstmlab.device import resolve_device
from lstmlab.errors import LstmlabError
from lstmlab.nn.lstm import resolve_backend
from lstmlab.runs import STATE_FILE, load_state, read_run_json
from lstmlab.training import distributed
from lstmlab.training.folder import (
    check_free,
    finished_summary,
    locked,
    new_run_info,
    prepare_folder,
    run_data,
    saved_config,
    tensorboard_class,
)
from lstmlab.training.report import end_message, log_start, native_build_note, report
from lstmlab.training.splits import load_data
from lstmlab.training.stopping import ignore_sigterm_under_torchrun, interrupted
from lstmlab.training.trainer import Trainer


def _train_in(config: Config, out: Path, data_dir: Path | str | None, quiet: bool, dry_run: bool,
              clock: Callable[[], float], run: dict[str, Any] | None, overwrite: bool,
              tensorboard: bool = False, keep: bool = True) -> dict[str, Any]:
    """Train in the locked folder ``out``: a new run (``run`` None) or the one run.json describes. Under torchrun
    every rank runs this, and rank 0 alone holds and writes the folder."""
    from tqdm import tqdm

    from lstmlab.data import resolve_data_dir

    log = (lambda s: None) if quiet else tqdm.write
    device = resolve_device(config.train.device)
    tr = None
    board = tensorboard_class() if tensorboard else None  # before the data: a missing package fails at once
    writer, saved, fresh = None, None, run is None
    try:
        torch.manual_seed(config.train.seed)
        source = resolve_data_dir(config.data.dataset, data_dir, quiet=quiet)
        config, data = load_data(config, source, dry_run)
        config = replace(config, train=replace(config.train, world_size=distributed.world().size))
        if distributed.is_main():
            run = new_run_info(config, source, dry_run, tensorboard) if fresh else run
            saved = None if fresh else load_state(out)
        # every rank has its data (else all stop here with the first error); the others get rank 0's run and state
        run, saved, out = distributed.share((run, saved, out), last=True)
        if distributed.is_main():
            writer = prepare_folder(out, run if fresh else None, overwrite, board)
        tr = Trainer(config, data, out, run["run_id"], device, dry_run, clock)
        distributed.seed_ranks(config.train.seed)
        tr.data_dir = str(Path(source).resolve())
        tr.tensorboard = writer
        if saved is not None:
            try:
                tr.restore(*saved)
            except (KeyError, ValueError, TypeError, RuntimeError) as e:  # a state file of another version
                raise LstmlabError(f"{out / STATE_FILE} does not fit this run ({type(e).__name__}: {e}); start "
                                   "the run again with --overwrite") from None
        log_start(tr, log, run)
        note = native_build_note(resolve_backend(config.model.backend, device), device)
        if note is not None:
            log(note)
        tr.loop(log, quiet)
        summary = report(tr, quiet, dry_run) if distributed.is_main() else {}
    except BaseException as e:
        ignore_sigterm_under_torchrun()
        if not (isinstance(e, KeyboardInterrupt) or distributed.lost_peer(e)):
            raise
        raise interrupted(tr, out, e) from None
    finally:
        if writer is not None:
            writer.close()
    log(end_message(out, tr, dry_run, keep))
    return summary


def train(
    config: Config,
    out_dir: Path,
    data_dir: Path | str | None = None,
    quiet: bool = False,
    dry_run: bool = False,
    clock: Callable[[], float] = time.perf_counter,
    overwrite: bool = False,
    tensorboard: bool = False,
    _keep: bool = True,
) -> dict[str, Any]:
    """Train, validate every ``eval_every`` iterations, test the best model once; returns the summary.

    Writes ``run.json``, ``metrics.csv``, ``summary.json``, ``best``/``last``/``state.safetensors`` to out_dir,
    which must be new or empty unless ``overwrite`` (which clears the previous run's files first), and is locked
    while the run lasts. ``dry_run`` runs a few batches on small subsets, end to end, to check the set-up.
    A dry run lasts ``config.train.iterations`` steps when set, else 3. ``tensorboard`` also writes TensorBoard
    scalars and per-gate activation histograms into ``out_dir/tensorboard`` (needs the tensorboard package).
    ``clock`` (seconds) times the run and drives ``--time-budget``; tests pass a fake one so that a budgeted run
    does not depend on the machine's speed. Raises ``Diverged`` (an LstmlabError) when the loss diverges and
    ``Interrupted`` (a KeyboardInterrupt) with a resume hint on Ctrl-C.
    """
    validate_config(config)
    config = replace(config)  # the caller's object is left as given
    out = Path(out_dir)
    if not distributed.is_main():  # under torchrun, rank 0 alone holds the folder
        return _train_in(config, out, data_dir, True, dry_run, clock, None, overwrite)
    with locked(out, create=True):  # before the data loads: an unwritable --out fails at once
        check_free(out, overwrite)
        return _train_in(config, out, data_dir, quiet, dry_run, clock, None, overwrite, tensorboard, _keep)


def resume(
    run_dir: Path | str,
    data_dir: Path | str | None = None,
    quiet: bool = False,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Any]:
    """Continue the run in ``run_dir`` from its last checkpoint, with its saved config; returns the summary.

    On the CPU, with the same number of threads (and the fused backend's native loops built before the run
    started), the final weights equal those of an uninterrupted run bit for bit, however the run was stopped.
    A run with a time budget goes on with what is left of it (such runs depend on the machine's speed anyway).
    """
    out = Path(run_dir)
    if not distributed.is_main():  # under torchrun: the run as rank 0 read it
        run, finished = distributed.share()
        if finished:
            return {}
        return _train_in(saved_config(out, run), out, run_data(run, data_dir), True, bool(run.get("dry_run")),
                         clock, run, False)
    read_run_json(out)  # one-line errors for a folder that is not a run, before locking it
    with locked(out, create=False):
        run = read_run_json(out)  # again, under the lock: another process may have changed it
        config = saved_config(out, run)
        done = finished_summary(out, run["run_id"])
        distributed.share((run, done is not None))
        if done is not None:
            if not quiet:
                print(f"lstmlab train: run {run['run_id']} in {out} already finished; nothing to resume",
                      file=sys.stderr)
            return done
        return _train_in(config, out, run_data(run, data_dir), quiet, bool(run.get("dry_run")), clock, run,
                         False, bool(run.get("tensorboard")))

