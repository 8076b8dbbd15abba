"""The run folder: created and locked while the run lasts, run.json first, then metrics.csv, losses.csv and
summary.json (the checkpoints and the resume state are written by the trainer through ``lstmlab.runs``)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from lstmlab.config import Config, ModelConfig, validate_config
from lstmlab.errors import LstmlabError
from lstmlab.files import advice
from lstmlab.runs import (
    RUN_JSON,
    TENSORBOARD_DIR,
    RunLock,
    clear_run,
    new_run_id,
    remove_scratch,
    run_contents,
    write_run_json,
)
from lstmlab.training import distributed

# trained_fraction: of the training split, in the data epoch under way (below 1 with --select); run_id stays last
METRIC_FIELDS = ["iteration", "epoch", "train_loss", "val_loss", "val_accuracy", "lr", "trained_fraction",
                 "elapsed_s", "run_id"]
LOSS_FIELDS = ["iteration", "epoch", "train_loss", "lr"]  # losses.csv: the training loss between evaluations


def metrics_csv(rows: list[dict[str, Any]], fields: list[str] = METRIC_FIELDS) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def make_folder(out: Path) -> bool:
    """Create ``out`` if needed (True when this call created it); one-line errors for whatever is in the way."""
    if out.exists() and not out.is_dir():
        raise LstmlabError(f"--out {out} is a file; give a folder")
    existed = out.is_dir()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise LstmlabError(f"--out {out}: a part of the path is a file, not a folder; pick another --out") from None
    except OSError as e:
        raise LstmlabError(f"--out {out}: cannot create it: {advice(e)}") from None
    return not existed


def check_free(out: Path, overwrite: bool) -> None:
    """A new run needs an empty folder (scratch files aside) unless --overwrite."""
    contents = run_contents(out)
    if not contents or overwrite:
        return
    if RUN_JSON in contents and "summary.json" not in contents:
        raise LstmlabError(f"{out} holds an unfinished run; continue it with `{distributed.resume_command(out)}`, "
                           "or pass --overwrite to start again")
    raise LstmlabError(f"{out} already holds files; pick another --out or pass --overwrite")


@contextlib.contextmanager
def locked(out: Path, create: bool) -> Iterator[None]:
    """Hold the run folder's lock; a folder this call created is removed again if the run fails before writing
    anything into it."""
    created = make_folder(out) if create else False
    lock = RunLock(out)
    try:
        lock.acquire()
    except BaseException:
        if created:  # another run may have taken it meanwhile: then it is not empty, and stays
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    try:
        yield
    except BaseException:
        lock.release()
        if created and not run_contents(out):
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    lock.release()


def new_run_info(config: Config, source: Path | str, dry_run: bool, tensorboard: bool) -> dict[str, Any]:
    """run.json of a new run: its id, the config as the user gave it, and how it was set up."""
    run = {"run_id": new_run_id(), "config": user_config(config).to_dict(), "dry_run": dry_run,
           "data_dir": str(Path(source).resolve()), "tensorboard": tensorboard,
           "threads": torch.get_num_threads(), "started_at": datetime.now().isoformat(timespec="seconds")}
    if distributed.job_id() is not None:  # torchrun's job: its restarts continue this run (see ``run``)
        run["job"] = distributed.job_id()
    return run


def prepare_folder(out: Path, new_run: dict[str, Any] | None, overwrite: bool, board: Any) -> Any:
    """The writing part of the set-up: a new run's run.json (after clearing the previous run's files with
    --overwrite), no temp files of a killed writer, and TensorBoard's writer (or None)."""
    if new_run is not None:
        if overwrite:
            clear_run(out)
        write_run_json(out, new_run)
    remove_scratch(out)
    if board is None:
        return None
    return board(log_dir=str(out / TENSORBOARD_DIR))  # after clear_run, which deletes a previous run's events


def tensorboard_class() -> Any:
    """TensorBoard's SummaryWriter class, imported only for --tensorboard; a one-line error when it is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise LstmlabError("--tensorboard needs the tensorboard package: pip install 'lstmlab[tensorboard]'") \
            from None
    return SummaryWriter


def user_config(config: Config) -> Config:
    """The config as the user gave it: what the data fill in (mean/std, input size) left out, so that a resumed
    run computes them again exactly as the first did."""
    return replace(config, data=replace(config.data, mean=None, std=None),
                   model=replace(config.model, input_size=ModelConfig.input_size))


def summary_json(summary: dict[str, Any]) -> str:
    """summary.json, indented, with each row of the confusion matrix on one line (not one number per line)."""
    rows = summary.get("confusion_matrix") or []
    marks = [f"@@row{i}@@" for i in range(len(rows))]
    text = json.dumps({**summary, "confusion_matrix": marks}, indent=2) + "\n"
    for mark, row in zip(marks, rows, strict=True):
        text = text.replace(f'"{mark}"', json.dumps(row))
    return text


def run_data(run: dict[str, Any], data_dir: Path | str | None) -> Path | str | None:
    """--data-dir when given, else the run's own data when it is still there (on this machine), else None."""
    remembered = run.get("data_dir")
    if data_dir is None and isinstance(remembered, str) and Path(remembered).is_dir():
        return remembered
    return data_dir


def saved_config(out: Path, run: dict[str, Any]) -> Config:
    """The config in run.json, checked as the command line's flags are."""
    config = Config.from_dict(run["config"])
    try:
        validate_config(config)
    except TypeError:  # a number where a name belongs, or the reverse: the file was edited
        raise LstmlabError(f"{out / RUN_JSON} holds an invalid config; start a new run") from None
    return config


def finished_summary(out: Path, run_id: str) -> dict[str, Any] | None:
    """The summary of the run ``run_id`` when it finished, else None."""
    try:
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("run_id") == run_id else None

