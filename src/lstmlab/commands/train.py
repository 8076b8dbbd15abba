"""``lstmlab train``: a new run, or ``--resume`` of a stopped one, from the command line (and under torchrun).

The training itself lives in :mod:`lstmlab.training` (recipes, optimizer and schedule, augmentation, guards, the
loop, the run folder, reports); this module turns flags into a Config, checks ``--resume``'s flags against the
saved run, and handles signals and torchrun's restarts. ``recipe``, ``train`` and ``resume`` are re-exported
here for scripts written against earlier versions.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from datetime import datetime
from pathlib import Path

from lstmlab.config import Config, validate_config
from lstmlab.config.flags import add_arguments, config_from_args, flag_of, given_settings
from lstmlab.config.recipes import recipe
from lstmlab.config.schema import DRY_RUN_ITERATIONS
from lstmlab.errors import LstmlabError
from lstmlab.runs import read_run_json
from lstmlab.training import distributed
from lstmlab.training.folder import saved_config
from lstmlab.training.run import resume, train
from lstmlab.training.stopping import (
    Interrupted,
    how_it_stopped,
    ignore_sigterm_under_torchrun,
    sigterm_as_interrupt,
)

__all__ = ["add_arguments", "config_from_args", "recipe", "resume", "run", "train"]


def _check_resume_flags(args: argparse.Namespace) -> None:
    """--resume takes the run's saved config: any other flag must agree with it."""
    run_dir = Path(args.resume)
    run = read_run_json(run_dir)
    saved = saved_config(run_dir, run)
    if args.overwrite:
        raise LstmlabError("--resume continues a run and --overwrite starts a new one; pass one of them")
    if args.out is not None and Path(args.out).resolve() != run_dir.resolve():
        raise LstmlabError(f"--out {args.out} differs from --resume {args.resume}; a resumed run stays in its folder")
    if args.dry_run and not run.get("dry_run"):
        raise LstmlabError(f"--dry-run: {args.resume} is not a dry run; drop the flag")
    if args.recipe is not None and saved.recipe.split("+")[0] != args.recipe:
        raise LstmlabError(f"--recipe {args.recipe} differs from the run's ({saved.recipe}); drop the flag")
    for section, values in given_settings(args).items():
        for name, given in values.items():
            was = getattr(getattr(saved, section), name)
            if given != was:
                raise LstmlabError(f"{flag_of(section, name)} {given} differs from the run's {was}; --resume "
                                   "continues a run with its saved config, so drop the flag")


def _say_interrupted(message: str) -> None:
    """The closing line of an interrupted run, on a line of its own (a terminal has just echoed ^C after the
    progress bar)."""
    lead = "\n" if sys.stderr.isatty() else ""
    print(f"{lead}lstmlab train: {message}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """``lstmlab train``: a new run, or ``--resume`` of a stopped one. Under torchrun, one process of the job:
    rank 0 writes the run and prints, the others stay quiet (a user's mistake is one line, from rank 0)."""
    try:
        with distributed.started(getattr(args, "threads", None)):
            code = _run(args)
            if code == 0:
                distributed.leave_together()
            return code
    except LstmlabError:
        if distributed.speaks():
            raise
        return 2


def _run(args: argparse.Namespace) -> int:
    scratch = None
    temporary = args.dry_run and not args.out and not args.resume
    try:
        with sigterm_as_interrupt(), distributed.set_up_errors_shared():
            if distributed.restart_count():
                _continue_after_restart(args)
            quiet = args.quiet or not distributed.is_main()
            if args.resume:
                if distributed.is_main():
                    _check_resume_flags(args)
                resume(args.resume, data_dir=args.data_dir, quiet=quiet)
            else:
                config, out, scratch = _new_run(args)
                train(config, out, data_dir=args.data_dir, quiet=quiet, dry_run=args.dry_run,
                      overwrite=args.overwrite, tensorboard=args.tensorboard, _keep=not temporary)
    except Interrupted as e:
        return _closing_line("interrupted; a dry run keeps nothing" if temporary else e.message, e.exit_code)
    except BaseException as e:  # under torchrun, before training started: another process ended, or a signal
        ignore_sigterm_under_torchrun()
        if distributed.world().size == 1 or not (isinstance(e, KeyboardInterrupt) or distributed.lost_peer(e)):
            raise
        how, code = how_it_stopped(e)
        return _closing_line(f"{how} before training started", code)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


def _new_run(args: argparse.Namespace) -> tuple[Config, Path, Path | None]:
    """The config of a new run, its folder, and the temp folder to delete at the end (a dry run without --out)."""
    config = config_from_args(args)
    if args.dry_run and args.iterations is None:
        config.train.iterations = DRY_RUN_ITERATIONS
    validate_config(config)
    if args.out:
        return config, Path(args.out), None
    if args.dry_run:  # nothing permanent: a temp folder, deleted at the end (rank 0's; the others write nothing)
        if not distributed.is_main():
            return config, Path("lstmlab-dry-run"), None
        scratch = Path(tempfile.mkdtemp(prefix="lstmlab-dry-run-"))
        return config, scratch / "run", scratch
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return config, Path("runs") / f"{config.data.dataset}-{config.data.view}-{stamp}", None


def _continue_after_restart(args: argparse.Namespace) -> None:
    """After torchrun restarted the job (--max-restarts), a new-run command whose --out holds the run this very
    job started continues that run, as --resume would (a finished one is left as it is)."""
    if args.resume or not args.out:
        return
    ours = distributed.share(_started_by_this_job(Path(args.out)) if distributed.is_main() else None)
    if ours:
        args.resume, args.overwrite = args.out, False


def _started_by_this_job(out: Path) -> bool:
    """Whether the run in ``out`` was started by this torchrun job (an earlier attempt of it)."""
    job = distributed.job_id()
    try:
        run = read_run_json(out)
    except LstmlabError:
        return False
    return job is not None and run.get("job") == job


def _closing_line(message: str, code: int) -> int:
    """Print the closing line of a stopped run, under torchrun once, by whichever process claims it first; returns
    the exit status."""
    ignore_sigterm_under_torchrun()
    if distributed.claim_closing_line():
        _say_interrupted(message)
    return code
