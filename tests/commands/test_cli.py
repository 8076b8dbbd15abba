"""`lstmlab train` / `lstmlab evaluate` end to end, on the data the `mnist_dir` fixture provides,
and every bad input: one line on stderr, exit 2, nothing already written damaged."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from cli_run import run_cli

from lstmlab.cli import main

DRY = ["train", "--dry-run", "--quiet", "--batch-size", "16", "--hidden-size", "8"]


_run = run_cli


def _one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def dry_run_dir(mnist_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "dry"
    code = main([*DRY, "--data-dir", str(mnist_dir), "--out", str(out)])
    assert code == 0
    return out


def test_dry_run_writes_everything(dry_run_dir):
    for name in ("run.json", "metrics.csv", "summary.json", "best.safetensors", "last.safetensors",
                 "state.safetensors"):
        assert (dry_run_dir / name).stat().st_size > 0, name
    rows = list(csv.DictReader((dry_run_dir / "metrics.csv").open()))
    assert list(rows[0]) == ["iteration", "epoch", "train_loss", "val_loss", "val_accuracy", "lr",
                             "trained_fraction", "elapsed_s", "run_id"]
    assert {r["run_id"] for r in rows} == {json.loads((dry_run_dir / "run.json").read_text())["run_id"]}
    assert rows[-1]["iteration"] == "3"
    summary = json.loads((dry_run_dir / "summary.json").read_text())
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    assert summary["test_loss"] > 0
    assert summary["config"]["model"]["hidden_size"] == 8
    assert len(summary["per_class_accuracy"]) == 10
    assert sum(map(sum, summary["confusion_matrix"])) == 256  # the dry run tests on 256 images


def test_evaluate_checkpoint(dry_run_dir, mnist_dir, capsys):
    code, out, _ = _run(capsys, "evaluate", str(dry_run_dir / "best.safetensors"), "--data-dir", str(mnist_dir),
                        "--json")
    assert code == 0
    result = json.loads(out)
    assert 0.0 <= result["accuracy"] <= 1.0
    assert len(result["confusion_matrix"]) == 10
    assert sum(map(sum, result["confusion_matrix"])) > 256  # the whole test split this time
    code, out, _ = _run(capsys, "evaluate", str(dry_run_dir / "best.safetensors"), "--data-dir", str(mnist_dir))
    assert code == 0 and "Test Accuracy" in out and "Confusion matrix" in out


def _settle_native_loops(timeout: float = 120.0) -> None:
    """Wait until the fused backend has decided between its native and Python loops, so that
    neither run below switches mid-way (the two paths differ in the last bits)."""
    import time

    from lstmlab.nn import _native

    deadline = time.monotonic() + timeout
    while _native.get() is None and not _native._loader().disabled and time.monotonic() < deadline:
        time.sleep(0.5)


def test_same_seed_same_metrics(mnist_dir, tmp_path):
    _settle_native_loops()
    argv = [*DRY, "--data-dir", str(mnist_dir), "--eval-every", "1", "--seed", "7"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0

    def table(run: str) -> list[dict]:
        rows = list(csv.DictReader((tmp_path / run / "metrics.csv").open()))
        return [{k: v for k, v in r.items() if k not in ("elapsed_s", "run_id")} for r in rows]  # these differ

    assert table("a") == table("b")
    assert len(table("a")) == 3


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--lr", "-1"], "--lr"),
        (["--lr", "0"], "--lr"),
        (["--hidden-size", "0"], "--hidden-size"),
        (["--layers", "-2"], "--layers"),
        (["--batch-size", "abc"], "--batch-size"),
        (["--dataset", "cifar"], "--dataset"),
        (["--view", "columns"], "--view"),
        (["--optimizer", "lbfgs"], "--optimizer"),
        (["--dropout", "1.5"], "--dropout"),
        (["--recipe", "fastest"], "--recipe"),
        (["--time-budget", "0"], "--time-budget"),
        (["--time-budget", "-3"], "--time-budget"),
        (["--time-budget", "inf"], "--time-budget"),
        (["--no-such-flag"], "--no-such-flag"),
    ],
)
def test_bad_train_flags(capsys, tmp_path, flags, needle):
    code, _, err = _run(capsys, "train", "--out", str(tmp_path / "r"), *flags)
    _one_line_error(code, err, needle)
    assert not (tmp_path / "r").exists()


def test_missing_data_names_files_and_flag(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _run(capsys, *DRY, "--data-dir", str(empty), "--out", str(tmp_path / "r"))
    _one_line_error(code, err, "train-images-idx3-ubyte", "--data-dir")


def test_existing_run_is_not_overwritten(dry_run_dir, mnist_dir, capsys):
    before = {p.name: p.read_bytes() for p in dry_run_dir.iterdir()}
    code, _, err = _run(capsys, *DRY, "--data-dir", str(mnist_dir), "--out", str(dry_run_dir))
    _one_line_error(code, err, "--overwrite")
    assert {p.name: p.read_bytes() for p in dry_run_dir.iterdir()} == before


def test_bad_checkpoints(capsys, tmp_path, mnist_dir):
    import torch
    from safetensors.torch import save_file

    missing = tmp_path / "nope.safetensors"
    code, _, err = _run(capsys, "evaluate", str(missing))
    _one_line_error(code, err, "does not exist")

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00not a checkpoint" * 20)
    code, _, err = _run(capsys, "evaluate", str(garbage))
    _one_line_error(code, err, "not a readable lstmlab checkpoint")

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    code, _, err = _run(capsys, "evaluate", str(foreign))
    _one_line_error(code, err, "not an lstmlab checkpoint")


def test_truncated_checkpoint(dry_run_dir, capsys, tmp_path):
    data = (dry_run_dir / "best.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    code, _, err = _run(capsys, "evaluate", str(cut))
    _one_line_error(code, err, "cut.safetensors")


class _FakeClock:
    """A clock that moves ``tick`` seconds each time it is read: the run's timing follows the code, not the
    machine's speed or load, so the budgeted run below ends at the same step every time."""

    def __init__(self, tick: float) -> None:
        self.now, self.tick = 1000.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def test_time_budget_ends_training_on_the_clock(mnist_dir, tmp_path):
    """--time-budget stops a run whose iterations would last far longer, with the schedule annealed by then."""
    from lstmlab.training import recipe, train

    budget = 1.5
    config = recipe("default")
    config.model.hidden_size = 8
    config.data.val_size = 500
    config.train.batch_size = 16
    config.train.iterations = 1_000_000
    config.train.eval_every = 1_000_000
    config.train.time_budget = budget
    config.train.device = "cpu"
    out = tmp_path / "run"
    summary = train(config, out, data_dir=mnist_dir, quiet=True, clock=_FakeClock(0.01))
    again = train(config, tmp_path / "again", data_dir=mnist_dir, quiet=True, clock=_FakeClock(0.01))
    assert 10 < summary["iterations"] < 1_000
    assert again["iterations"] == summary["iterations"]  # the fake clock makes the stop exact
    assert budget / 2 <= summary["train_seconds"] <= budget  # it used the time, validation included
    assert summary["config"]["train"]["time_budget"] == budget
    (last,) = list(csv.DictReader((out / "metrics.csv").open()))  # one row: the end
    assert int(last["iteration"]) == summary["iterations"]
    assert float(last["lr"]) < 3e-3 / 100  # one-cycle annealed by the deadline, not cut off mid-way


def test_a_scheduled_validation_that_uses_up_the_budget_is_the_closing_one():
    """After a validation the deadline is asked again: one more step and another validation would overrun."""
    from lstmlab.training.guards import Deadline

    now = [0.0]
    deadline = Deadline(10.0, val_fraction=1.0, start=0.0, clock=lambda: now[0])
    for _ in range(7):  # 1 s steps
        now[0] += 1.0
        assert not deadline.step_done()
    deadline.eval_done(1.0)  # a scheduled validation (and its checkpoint) took 1 s: reserved with a margin
    assert deadline.eval_s == 1.5
    now[0] += 1.0  # 8 s used
    assert deadline.out_of_time()  # 8 + a 1-s step + 1.5 s of closing validation > 10
    deadline.eval_done(0.5)  # a faster one later does not shrink the reserve
    assert deadline.eval_s == 1.5


def test_console_script_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lstmlab", "evaluate", str(tmp_path / "x.safetensors")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_real_data_training_reaches_floor(mnist_dir, real_mnist, tmp_path):
    """A short real run: 400 Adam steps on MNIST rows must already beat 93% test accuracy."""
    from lstmlab.training import recipe, train

    config = recipe("default")
    config.train.iterations = 400
    config.train.batch_size = 128
    config.train.eval_every = 200
    summary = train(config, tmp_path / "run", data_dir=mnist_dir, quiet=True)
    floor = 0.93 if real_mnist else 0.80  # synthetic fallback data are easier but far fewer
    assert summary["test_accuracy"] >= floor, summary["test_accuracy"]
    assert summary["iterations"] == 400


def test_label_smoothing_trains_a_smoothed_loss_and_is_saved(mnist_dir, tmp_path):
    """--label-smoothing changes the training loss (same seed, same batches, same init) and lands in the
    checkpoint's config (a checkpoint without it reads as 0)."""
    from lstmlab.checkpoint import load_checkpoint

    rows = {}
    for s in ("0", "0.3"):
        out = tmp_path / f"ls{s}"
        assert main([*DRY, "--data-dir", str(mnist_dir), "--out", str(out), "--label-smoothing", s]) == 0
        rows[s] = list(csv.DictReader((out / "metrics.csv").open()))[-1]
    assert float(rows["0.3"]["train_loss"]) != float(rows["0"]["train_loss"])
    assert load_checkpoint(tmp_path / "ls0.3" / "last.safetensors").config.train.label_smoothing == 0.3
    assert load_checkpoint(tmp_path / "ls0" / "last.safetensors").config.train.label_smoothing == 0.0
