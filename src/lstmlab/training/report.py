"""What a run says: its opening lines, the test of the best checkpoint with summary.json, and what to do next."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from lstmlab.files import atomic_write_text
from lstmlab.nn.lstm import resolve_backend
from lstmlab.runs import TENSORBOARD_DIR
from lstmlab.training import distributed
from lstmlab.training.evaluation import evaluate_model, format_report
from lstmlab.training.folder import summary_json
from lstmlab.training.schedules import SCHEDULES
from lstmlab.training.trainer import Trainer


def report(tr: Trainer, quiet: bool, dry_run: bool) -> dict[str, Any]:
    """Test the best checkpoint once and write summary.json."""
    from lstmlab.checkpoint import load_checkpoint
    from lstmlab.data import DATASETS

    config, data, out = tr.config, tr.data, tr.out
    train_seconds = tr.elapsed()
    best = load_checkpoint(out / "best.safetensors", map_location=tr.device)
    test = evaluate_model(best.model, data.test_x, data.test_y, config.data, data.permutation,
                          num_classes=config.model.num_classes)
    if dry_run:
        print(f"Dry run: the test below is on {len(data.test_y)} images after {tr.at.iteration} iterations, "
              "not a real result")
    if quiet:  # one line even when quiet: the number the run was for
        print(format_report(test, DATASETS[config.data.dataset].classes).splitlines()[0])
    else:
        print(format_report(test, DATASETS[config.data.dataset].classes))
    summary = {
        "run_id": tr.run_id,
        "test_accuracy": test.accuracy,
        "test_loss": test.loss,
        "per_class_accuracy": test.per_class_accuracy,
        "confusion_matrix": test.confusion,
        "best_val_accuracy": tr.at.best_acc if len(data.val_y) else None,
        "best_iteration": tr.at.best_iter,
        "iterations": tr.at.iteration,
        "epochs": round(tr.at.iteration / tr.steps_per_epoch, 4),
        "data_epochs": tr.at.epoch + (tr.at.batch * config.train.batch_size / len(tr.order) if tr.order is not None
                                   and len(tr.order) else 0.0),
        "train_seconds": round(train_seconds, 3),
        "samples_per_second": round(tr.at.iteration * config.train.batch_size / max(train_seconds, 1e-9), 1),
        "resumed_at": tr.at.resumes,
        "device": str(tr.device),
        "backend": resolve_backend(config.model.backend, tr.device),
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "world_size": distributed.world().size,
        "dry_run": dry_run,
        "data_dir": tr.data_dir,
        "finished_at": datetime.now().isoformat(timespec="seconds"),
        "config": config.to_dict(),
    }
    atomic_write_text(out / "summary.json", summary_json(summary))
    return summary


def native_build_note(backend: str, device: torch.device) -> str | None:
    """The line to show when the fused backend's C++ step loops are not built yet (they then compile in the
    background while the run starts on the Python loops), else None."""
    if backend != "fused" or device.type != "cpu":
        return None
    try:
        from lstmlab.nn import fast_loops_pending

        if not fast_loops_pending():  # ready, off, or unbuildable (the loader then says why, once)
            return None
    except Exception:  # noqa: BLE001 - a note only: whatever fails here, the run itself decides what to do
        return None
    return ("lstmlab: compiling the fused backend's C++ step loops in the background, once per machine "
            "(~20-60 s of one core); the first steps run the same math as Python loops meanwhile")


def end_message(out: Path, tr: Trainer, dry_run: bool, kept: bool) -> str:
    """What was saved, once, and what to do next."""
    if dry_run and not kept:
        return ("Dry run done: the set-up works end to end. Nothing was kept; pass --out DIR to keep a dry run's "
                "files, or drop --dry-run to train.")
    names = ["best.safetensors", "last.safetensors", "metrics.csv", "losses.csv", "summary.json"]
    if tr.tensorboard is not None:
        names.append("tensorboard/")
    what = "Dry run saved" if dry_run else "Saved"
    lines = [f"{what} in {out}/: {', '.join(names)} (best = iteration {tr.at.best_iter})"]
    if dry_run:
        lines.append("These files come from a dry run (marked dry_run in run.json and summary.json).")
    hints = [(f"lstmlab plot {out}", "loss curves, confusion matrix, mistakes"),
             (f"lstmlab gates {out} --index 0", "the gates while it reads test digit 0"),
             (f"lstmlab evaluate {out} --split val", "the best checkpoint on another split"),
             (f"lstmlab demo {out / 'best.safetensors'}", "draw digits in the browser")]
    if tr.tensorboard is not None:
        hints.append((f"tensorboard --logdir {out / TENSORBOARD_DIR}", "scalars and gate histograms"))
    width = max(len(command) for command, _ in hints)
    lines.append("Next:")
    lines += [f"  {command:<{width}}   {why}" for command, why in hints]
    return "\n".join(lines)


def log_start(tr: Trainer, log: Callable[[str], None], run: dict[str, Any]) -> None:
    m, d, t, data = tr.config.model, tr.config.data, tr.config.train, tr.data
    log(
        f"lstmlab{': DRY RUN on small subsets,' if tr.dry_run else ':'} {d.dataset}/{d.view} "
        f"(T={data.seq_len}, I={m.input_size}), {len(data.train_y)} train / "
        f"{len(data.val_y)} val / {len(data.test_y)} test, H={m.hidden_size} x{m.num_layers}"
        f"{' bi' if m.bidirectional else ''}, {t.optimizer} lr {t.lr:g} ({SCHEDULES[t.schedule].label}), "
        f"batch {t.batch_size}, "
        f"{tr.total} iterations{f' or {t.time_budget:g} s' if t.time_budget else ''} on {tr.device}, backend "
        f"{resolve_backend(m.backend, tr.device)}, run {tr.run_id}"
    )
    size = distributed.world().size
    if size > 1:
        low, high, threads = t.batch_size // size, -(-t.batch_size // size), torch.get_num_threads()
        log(f"{size} processes (torchrun, DistributedDataParallel), each with {threads} thread"
            f"{'s' if threads > 1 else ''} and {low if low == high else f'{low}-{high}'} images of every batch")
    if tr.at.resumes:
        log(f"Resuming at iteration {tr.at.iteration} of {tr.total}")
        if tr.saved_world_size != size:
            log(f"warning: the run's last checkpoint was written by {tr.saved_world_size} processes, this job has "
                f"{size}: the batches are the same, the result differs in the last bits from an uninterrupted run")
        if run.get("threads") != torch.get_num_threads():
            log(f"warning: the run started with {run.get('threads')} threads, this process has "
                f"{torch.get_num_threads()}: the result will differ in the last bits from an uninterrupted run")

