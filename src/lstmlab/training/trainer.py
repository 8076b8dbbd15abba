"""The training loop: a run's moving parts stepped one batch at a time, validated every ``eval_every`` steps and
checkpointed whole, so that a resumed run goes on exactly where it stopped."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lstmlab.checkpoint import save_checkpoint
from lstmlab.config import Config
from lstmlab.config.schema import DRY_RUN_ITERATIONS
from lstmlab.errors import LstmlabError
from lstmlab.files import atomic_write_text
from lstmlab.model import SequenceClassifier
from lstmlab.runs import optimizer_state, rng_state, save_state, set_optimizer_state, set_rng_state
from lstmlab.training import distributed
from lstmlab.training.augment import random_erase, random_flip, random_shift
from lstmlab.training.folder import LOSS_FIELDS, metrics_csv
from lstmlab.training.guards import Deadline, Diverged, Guard
from lstmlab.training.optim import make_optimizer, set_schedule
from lstmlab.training.selection import StaleLossSelection
from lstmlab.training.splits import Data

LOSS_POINTS = 20  # losses.csv gets about this many rows per evaluation interval (every step for short intervals)


_NEWER = {"newer": True}  # a Progress field that state files of earlier versions lack


@dataclass
class Progress:
    """Where a run is: the loop's own state, saved into state.safetensors field by field (as JSON) at every
    evaluation and restored the same way by ``--resume``. A field added here is saved and restored with no other
    change; give it ``metadata=_NEWER`` so that state files written before it existed restore its default."""

    iteration: int = 0
    epoch: int = 0  # data epochs begun (``batch`` of this one's order used)
    batch: int = 0
    finished: bool = False
    rows: list[dict[str, Any]] = field(default_factory=list)  # metrics.csv
    loss_rows: list[dict[str, Any]] = field(default_factory=list, metadata=_NEWER)  # losses.csv
    best_acc: float = -1.0
    best_iter: int = 0
    running: float = 0.0  # the training loss since the last evaluation, and its count
    running_n: int = 0
    fine: float = field(default=0.0, metadata=_NEWER)  # the training loss since the last losses.csv row
    fine_n: int = field(default=0, metadata=_NEWER)
    resumes: list[int] = field(default_factory=list)  # the iterations the run was resumed at

    def to_json(self) -> dict[str, Any]:
        """The fields as JSON-ready values."""
        return asdict(self)

    @classmethod
    def from_json(cls, info: dict[str, Any]) -> Progress:
        """Undo ``to_json``; a field missing from the file is a KeyError unless it is newer than the file."""
        return cls(**{f.name: info[f.name] for f in fields(cls) if f.name in info or not f.metadata.get("newer")})


class Trainer:
    """A run's moving parts (model, optimizer, data order, RNGs, metrics, best so far), stepped one batch at a
    time and checkpointed whole at every evaluation, so that a resumed run goes on exactly where it stopped."""

    def __init__(self, config: Config, data: Data, out: Path, run_id: str, device: torch.device,
                 dry_run: bool, clock: Callable[[], float]) -> None:
        m, t = config.model, config.train
        self.config, self.data, self.out, self.run_id = config, data, out, run_id
        self.device, self.clock = device, clock
        self.model = SequenceClassifier(m).to(device)
        self.forward = distributed.wrap(self.model)  # DDP under torchrun: a step's gradients averaged over ranks
        self.optimizer = make_optimizer(self.model, t)
        self.generator = torch.Generator().manual_seed(t.seed)  # data order and shifts
        self.steps_per_epoch = math.ceil(len(data.train_y) / t.batch_size)
        total = t.iterations if t.iterations is not None else max(1, math.ceil(t.epochs * self.steps_per_epoch))
        if dry_run:  # a dry run's default length is a few steps; the CLI passes --iterations as t.iterations
            total = t.iterations if t.iterations is not None else DRY_RUN_ITERATIONS
        self.total = total
        self.log_every = max(1, t.eval_every // LOSS_POINTS)
        self.at = Progress()  # where the run is (what --resume restores besides tensors and RNGs)
        self.tensorboard: Any = None  # a SummaryWriter when --tensorboard
        self.dry_run = dry_run
        self.data_dir: str | None = None  # where the data came from, for summary.json
        self.order: Tensor | None = None  # this epoch's shuffled indices; ``batch`` of them are used
        self.selection = None  # --select stale-loss: the loss record that picks each epoch's samples
        if t.select == "stale-loss":
            self.selection = StaleLossSelection(len(data.train_y), t.select_beta, t.select_floor, t.select_warmup)
        self.saved_iter = 0  # the iteration of the last checkpoint
        self.guard = Guard()
        self.saved_world_size = distributed.world().size  # processes of the job that wrote the resumed state
        self.elapsed_before = 0.0  # training seconds of the processes before this one
        self.start = clock()
        self.deadline = None
        if t.time_budget is not None:
            self.deadline = Deadline(t.time_budget, len(data.val_y) / t.batch_size, self.start, clock)

    def elapsed(self) -> float:
        """Seconds of training so far, over every process of the run."""
        return self.elapsed_before + self.clock() - self.start

    def next_batch(self) -> Tensor:
        """The next batch's indices: the epoch's order drawn from the generator when the epoch starts, as
        ``data.batch_indices`` does."""
        n, size = len(self.data.train_y), self.config.train.batch_size
        while self.order is None or self.at.batch * size >= len(self.order):  # (a selective epoch may keep none)
            if self.order is not None:
                self.at.epoch += 1
            if self.selection is None:
                self.order = torch.randperm(n, generator=self.generator)
            else:
                self.order = self.selection.epoch_order(self.at.epoch, self.generator)
            self.at.batch = 0
        idx = self.order[self.at.batch * size : (self.at.batch + 1) * size]
        self.at.batch += 1
        return idx

    def step(self, idx: Tensor) -> float:
        """One optimisation step on the batch ``idx``; returns the learning rate used."""
        from lstmlab.data import to_sequence

        d, t = self.config.data, self.config.train
        batch = self.data.train_x[idx]  # (B, 28, 28) uint8
        if d.augment_shift:  # the whole global batch, on every rank: the generator moves as in one process
            batch = random_shift(batch, d.augment_shift, self.generator)
        if d.augment_flip:
            batch = random_flip(batch, self.generator)
        if d.augment_erase:
            batch = random_erase(batch, d.augment_erase, self.generator)
        part, weight = distributed.my_part(len(idx))  # this rank's slice of the global batch (all of it alone)
        x = to_sequence(batch[part], d.view, d.mean, d.std, self.data.permutation).to(self.device)  # (b, T, I)
        y = self.data.train_y[idx[part]].to(self.device)
        progress = self.at.iteration / self.total
        if self.deadline is not None:  # the clock may be further along than the step count (rank 0's clock)
            progress = max(progress, distributed.from_main(self.deadline.progress()))
        lr = set_schedule(self.optimizer, t, progress)
        losses = F.cross_entropy(self.forward(x), y, reduction="none",  # (b,): selection keeps each one
                                 label_smoothing=t.label_smoothing)
        loss = losses.mean()
        if self.selection is not None:
            self.selection.record(idx, distributed.whole_batch(losses.detach(), len(idx)))
        self.optimizer.zero_grad(set_to_none=True)
        (loss * weight if weight != 1.0 else loss).backward()
        if t.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.clip)
        self.optimizer.step()
        self.at.iteration += 1
        loss_value = distributed.average(loss.item() * weight)  # the global batch's mean loss, on every rank
        problem = self.guard.check(loss_value, self.at.iteration)
        if problem:
            raise self.diverged(problem)
        self.at.running += loss_value
        self.at.running_n += 1
        self.at.fine += loss_value
        self.at.fine_n += 1
        if self.at.iteration % self.log_every == 0:
            mean = self.at.fine / self.at.fine_n
            self.at.loss_rows.append({"iteration": self.at.iteration,
                                   "epoch": round(self.at.iteration / self.steps_per_epoch, 4),
                                   "train_loss": round(mean, 6), "lr": lr})
            if self.tensorboard is not None:
                self.tensorboard.add_scalar("loss/train", mean, self.at.iteration)
                self.tensorboard.add_scalar("lr", lr, self.at.iteration)
            self.at.fine, self.at.fine_n = 0.0, 0
        return lr

    def diverged(self, problem: str) -> Diverged:
        """The one-line error of a diverged run, saying what is kept."""
        if self.saved_iter:
            kept = f"{self.out / 'last.safetensors'} keeps iteration {self.saved_iter}, the last good one"
        else:
            kept = "no checkpoint was saved before"
        fix = "lower --lr" if self.config.train.clip is not None else "lower --lr or set --clip"
        return Diverged(f"training diverged: {problem}; {fix} ({kept})")

    def evaluate_and_save(self, lr: float, log: Callable[[str], None]) -> None:
        """Validate, log the textbook's line, and checkpoint: best/last, metrics.csv, then the resume state."""
        eval_start = self.clock()
        d, m = self.config.data, self.config.model
        val = None
        if len(self.data.val_y):
            val = distributed.evaluate(self.model, self.data.val_x, self.data.val_y, d, self.data.permutation,
                                       num_classes=m.num_classes)  # under torchrun: each rank a shard, summed
            if not math.isfinite(val.loss):
                raise self.diverged(f"the validation loss became {val.loss} at iteration {self.at.iteration}")
        self.model.train()
        mean_loss = self.at.running / max(self.at.running_n, 1)
        self.at.rows.append({
            "iteration": self.at.iteration,
            "epoch": round(self.at.iteration / self.steps_per_epoch, 4),
            "train_loss": round(mean_loss, 6),
            "val_loss": round(val.loss, 6) if val else "",
            "val_accuracy": round(val.accuracy, 6) if val else "",
            "lr": lr,
            "elapsed_s": round(self.elapsed(), 3),
            "run_id": self.run_id,
            "trained_fraction": round(len(self.order) / len(self.data.train_y), 4) if self.order is not None else 1.0,
        })
        # The textbook's line: Loss is the mean training loss since the last line, Accuracy on validation.
        shown = f"{100 * val.accuracy:.2f}" if val else "n/a"
        log(f"Iteration: {self.at.iteration}. Loss: {mean_loss:.4f}. Accuracy: {shown}")
        meta = {"iteration": self.at.iteration, "val_accuracy": val.accuracy if val else None, "run_id": self.run_id}
        writes = distributed.is_main()  # every rank keeps the books, rank 0 alone writes them
        if val is None or val.accuracy > self.at.best_acc:
            self.at.best_acc, self.at.best_iter = (val.accuracy if val else 0.0), self.at.iteration
            if writes:
                save_checkpoint(self.out / "best.safetensors", self.model, self.config, self.data.permutation, meta)
        if writes:
            save_checkpoint(self.out / "last.safetensors", self.model, self.config, self.data.permutation, meta)
            atomic_write_text(self.out / "metrics.csv", metrics_csv(self.at.rows))
            atomic_write_text(self.out / "losses.csv", metrics_csv(self.at.loss_rows, LOSS_FIELDS))
        if self.tensorboard is not None:
            self.write_tensorboard(mean_loss, val)
        self.saved_iter = self.at.iteration
        self.save_state()
        if self.deadline is not None:  # the run state's write counts too: it is part of the closing evaluation
            self.deadline.eval_done(self.clock() - eval_start)

    def write_tensorboard(self, train_loss: float, val: Any) -> None:
        """Scalars of this evaluation, and a histogram per gate of the layers' activations on a validation batch."""
        from lstmlab.analysis.recording import GATE_NAMES, record

        tb, it = self.tensorboard, self.at.iteration
        tb.add_scalar("loss/train_since_last_eval", train_loss, it)
        if val is not None:
            tb.add_scalar("loss/val", val.loss, it)
            tb.add_scalar("accuracy/val", val.accuracy, it)
        if len(self.data.val_y):
            from lstmlab.data import to_sequence

            d = self.config.data
            x = to_sequence(self.data.val_x[:128], d.view, d.mean, d.std, self.data.permutation).to(self.device)
            rec = record(self.model, x, max_prefix_steps=0)  # the per-step probabilities are not drawn here
            for layer in rec.layers:
                suffix = f"layer{layer.layer + 1}" + ("_reverse" if layer.direction else "")
                for name in GATE_NAMES:
                    tb.add_histogram(f"gates_{suffix}/{name}", layer[name].float().cpu(), it)
        self.model.train()
        tb.flush()

    def save_state(self) -> None:
        """Everything --resume needs, as one atomic file written after the others (by rank 0, with every rank's
        random stream)."""
        ranks_rng = distributed.rank_rng_states()  # a collective: every rank calls it
        if not distributed.is_main():
            return
        tensors = {f"model.{k}": v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        tensors.update(ranks_rng)
        optim_tensors, optim_info = optimizer_state(self.optimizer)
        rng_tensors, rng_info = rng_state()
        tensors.update(optim_tensors)
        tensors.update(rng_tensors)
        tensors["rng.data"] = self.generator.get_state()
        if self.order is not None:
            tensors["order"] = self.order
        if self.selection is not None:
            tensors.update(self.selection.state())
        info = {
            **self.at.to_json(), "run_id": self.run_id, "guard": vars(self.guard), "elapsed": self.elapsed(),
            "deadline": self.deadline.state() if self.deadline else None, "rng": rng_info, "optimizer": optim_info,
            "threads": torch.get_num_threads(), "world_size": distributed.world().size,
        }
        save_state(self.out, tensors, info)

    def restore(self, tensors: dict[str, Tensor], info: dict[str, Any]) -> None:
        """Undo ``save_state``: the weights, the optimizer, every RNG and the position in the data."""
        if info.get("run_id") != self.run_id:
            raise LstmlabError(f"{self.out}: the saved state belongs to run {info.get('run_id')}, not to "
                               f"{self.run_id}; start again with --overwrite")
        weights = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
        self.model.load_state_dict(weights)
        set_optimizer_state(self.optimizer, tensors, info["optimizer"])
        self.generator.set_state(tensors["rng.data"])
        set_rng_state(tensors, info["rng"])
        self.saved_world_size = info.get("world_size", 1)
        self.order = tensors.get("order")
        if self.selection is not None:
            self.selection.load(tensors)
        self.at = Progress.from_json(info)
        vars(self.guard).update(info["guard"])
        self.saved_iter = self.at.iteration
        distributed.restore_rank_rng(tensors, self.saved_world_size, self.config.train.seed, self.at.iteration)
        self.elapsed_before = info["elapsed"]
        self.at.resumes.append(self.at.iteration)
        if self.deadline is not None and info["deadline"] is not None:
            self.deadline.restore(info["deadline"])
            self.deadline.start = self.start - self.elapsed_before  # the budget already used stays used

    def loop(self, log: Callable[[str], None], quiet: bool) -> None:
        """Step until the iterations or the time budget run out, evaluating every ``eval_every`` steps."""
        from tqdm import tqdm

        t = self.config.train
        self.at.finished = self.at.finished or self.at.iteration >= self.total
        bar = tqdm(total=self.total, initial=self.at.iteration, disable=quiet, desc="train", unit="it",
                   dynamic_ncols=True, leave=False)
        self.model.train()
        try:
            while not self.at.finished:
                lr = self.step(self.next_batch())
                bar.update(1)
                bar.set_postfix(loss=f"{self.at.running / max(self.at.running_n, 1):.4f}", refresh=False)
                self.at.finished = (self.deadline is not None and distributed.any_rank(self.deadline.step_done())) \
                    or self.at.iteration >= self.total
                if self.at.iteration % t.eval_every == 0 or self.at.finished:
                    self.evaluate_and_save(lr, log)
                    # A scheduled validation that used up the time is the closing one: no step and validation more.
                    self.at.finished = self.at.finished or (
                        self.deadline is not None and distributed.any_rank(self.deadline.out_of_time()))
        finally:
            bar.close()

