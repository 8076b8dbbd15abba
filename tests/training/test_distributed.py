"""Training under torchrun (issue 13): 2 CPU processes over gloo, started by ``python -m torch.distributed.run
--standalone`` (which picks a free port), on a small synthetic MNIST look-alike whose training split ends an epoch
within the runs (so the short last batch is split too).

The 2-process run follows the 1-process run with the same seed and global batch; only rank 0 writes; a rank that
dies ends the job with one line from lstmlab; ``--resume`` under torchrun (and torchrun's own restart) ends equal to
an uninterrupted run, bit for bit."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from run_files import assert_same_weights, wait_for_state, weights
from synthetic_idx import write_synthetic_mnist

from lstmlab.training import distributed

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="this torch has no gloo backend")

# 1100 training images, 100 held out: an epoch is 30 batches of 33, which 2 ranks split 16 + 17 (weighted), and a
# last one of 10
SMALL = ["--quiet", "--device", "cpu", "--batch-size", "33", "--hidden-size", "16", "--val-size", "100",
         "--eval-every", "20"]
# dropout and two layers: a resume must put back every rank's own random stream
RESUMABLE = ["--quiet", "--device", "cpu", "--batch-size", "16", "--hidden-size", "8", "--val-size", "100",
             "--iterations", "200", "--eval-every", "10", "--layers", "2", "--dropout", "0.2"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_mnist(tmp_path_factory.mktemp("ddp-data"), n_train=1100, n_test=200, gz=False)


def _env() -> dict[str, str]:
    # One thread and the Python step loops in every process, so that runs compute alike; synthetic data has no
    # MNIST checksums.
    return {**os.environ, "OMP_NUM_THREADS": "1", "LSTMLAB_NATIVE": "0", "LSTMLAB_VERIFY": "0",
            "PYTHONUNBUFFERED": "1"}


def _command(procs: int, *argv: str, torchrun: tuple[str, ...] = ()) -> list[str]:
    if procs == 1:
        return [sys.executable, "-m", "lstmlab", "train", *argv]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
            *torchrun, "-m", "lstmlab", "train", *argv]


def _run(procs: int, *argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_command(procs, *argv), env=_env(), cwd=cwd, capture_output=True, text=True, timeout=600)


def _ours(stderr: str) -> list[str]:
    """lstmlab's own lines in a torchrun job's stderr (torchrun adds its warnings and its report of failures)."""
    return [line for line in stderr.splitlines() if line.startswith("lstmlab train")]


def _assert_no_traceback_of_ours(stderr: str) -> None:
    """No worker printed a traceback (torchrun prints one of its own when a worker fails)."""
    assert not re.search(r'File ".*[/\\]lstmlab[/\\]', stderr), stderr






# ---------------------------------------------------------------------------------------------
# the rank's slice of a global batch, and torchrun's environment (in this process)


@pytest.mark.parametrize("n, size, parts", [(32, 2, [(0, 16), (16, 32)]), (33, 2, [(0, 16), (16, 33)]),
                                            (8, 3, [(0, 2), (2, 5), (5, 8)]), (1, 2, [None, (0, 1)])])
def test_each_rank_takes_its_slice_and_the_weights_make_the_global_mean(monkeypatch, n, size, parts):
    """DDP averages the ranks' gradients of weight x (mean loss of the slice): each sample must count 1/n."""
    for rank, part in enumerate(parts):
        monkeypatch.setattr(distributed, "_world", distributed.World(size, rank, rank, size))
        got, weight = distributed.my_part(n)
        if part is None:  # no sample left for this rank: it joins with one sample at weight 0
            assert (got, weight) == (slice(0, 1), 0.0)
            continue
        assert (got.start, got.stop) == part
        assert weight / size / (part[1] - part[0]) == pytest.approx(1 / n)
        assert weight == 1.0 or n % size  # exactly 1 when the ranks' slices are equal


def test_torchrun_environment(monkeypatch):
    assert distributed.from_env({}) == distributed.World()
    store = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    env = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", **store}
    assert distributed.from_env(env) == distributed.World(4, 3, 1, 2)
    for bad in ({"WORLD_SIZE": "two"}, {"WORLD_SIZE": "2", "RANK": "2", **store}, {"WORLD_SIZE": "2", "RANK": "0"}):
        with pytest.raises(distributed.LstmlabError):
            distributed.from_env(bad)


# ---------------------------------------------------------------------------------------------
# 2 processes against 1


@pytest.fixture(scope="module")
def one_and_two(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The same 40-iteration run (shifts on, no dropout) in 1 process and in 2 under torchrun, each started in an
    empty working folder."""
    base = tmp_path_factory.mktemp("one-and-two")
    results: dict[str, object] = {}
    for procs in (1, 2):
        cwd = base / f"cwd{procs}"
        cwd.mkdir()
        out = base / f"run{procs}"
        done = _run(procs, *SMALL, "--iterations", "40", "--augment-shift", "2", "--data-dir", str(data_dir),
                    "--out", str(out), cwd=cwd)
        assert done.returncode == 0, done.stderr
        results[f"out{procs}"], results[f"cwd{procs}"], results[f"proc{procs}"] = out, cwd, done
    return results


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_a_torchrun_process_exits_with_its_status_and_its_output_flushed(world_size):
    """Under torchrun (WORLD_SIZE > 1) the entry point leaves by os._exit, skipping the interpreter's shutdown that
    a gloo thread can abort: the status and every line printed must still come out, to a pipe (block-buffered)."""
    env = {**os.environ, "WORLD_SIZE": world_size}
    ok = subprocess.run([sys.executable, "-m", "lstmlab", "--version"], env=env, capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0 and ok.stdout.startswith("lstmlab "), (ok.stdout, ok.stderr)
    bad = subprocess.run([sys.executable, "-m", "lstmlab", "train", "--epochs", "-1"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    # one process: the bad flag; WORLD_SIZE=2 without the rest of torchrun's environment: that, not a traceback
    assert ("--epochs" if world_size == "1" else "RANK, MASTER_ADDR, MASTER_PORT not set") in bad.stderr, bad.stderr


def test_two_processes_follow_one_within_1e4_after_40_steps(one_and_two):
    one, two = one_and_two["out1"], one_and_two["out2"]
    for name in ("last.safetensors", "best.safetensors"):
        w1, w2 = weights(one / name), weights(two / name)
        assert w1.keys() == w2.keys()
        for k in w1:
            assert torch.allclose(w1[k], w2[k], rtol=0, atol=1e-4), (name, k, (w1[k] - w2[k]).abs().max())
    s1, s2 = (json.loads((out / "summary.json").read_text()) for out in (one, two))
    assert s1["iterations"] == s2["iterations"] == 40 and s1["epochs"] > 1  # an epoch ended, short batch and all
    assert (s1["world_size"], s2["world_size"]) == (1, 2)
    assert (s1["config"]["train"]["world_size"], s2["config"]["train"]["world_size"]) == (1, 2)
    rows1, rows2 = ((out / "metrics.csv").read_text().splitlines() for out in (one, two))
    for a, b in zip(rows1[1:], rows2[1:], strict=True):  # the global batch's loss, averaged over the ranks
        assert a.split(",")[:2] == b.split(",")[:2]
        assert float(a.split(",")[2]) == pytest.approx(float(b.split(",")[2]), abs=1e-4)


def test_only_rank_0_writes_and_speaks(one_and_two):
    one, two = one_and_two["out1"], one_and_two["out2"]
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert not list(two.glob(".*"))  # no lock or temp file left behind
    assert list(one_and_two["cwd2"].iterdir()) == []  # nothing written where the job was started
    assert len((two / "metrics.csv").read_text().splitlines()) == 1 + 2  # header, iterations 20 and 40
    run = json.loads((two / "run.json").read_text())
    assert run["config"]["train"]["world_size"] == 2 and run["job"]
    # torchrun's OMP_NUM_THREADS=1 counts as unset: each process gets its share of the cores
    assert json.loads((two / "summary.json").read_text())["threads"] == max(1, distributed.usable_cores() // 2)
    proc = one_and_two["proc2"]
    assert proc.stdout.count("Test Accuracy") == 1, proc.stdout  # the report, once
    assert _ours(proc.stderr) == [], proc.stderr


# ---------------------------------------------------------------------------------------------
# a rank that dies, --resume under torchrun, torchrun's restarts


needs_proc = pytest.mark.skipif(not Path("/proc/self/environ").exists(),
                                reason="finding a torchrun worker's pid reads /proc")


def _worker_pid(torchrun: subprocess.Popen, rank: int, timeout: float = 60.0) -> int:
    """The pid of the torchrun worker with RANK=rank (a child of the torchrun process)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                environ = (entry / "environ").read_bytes().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue
            if ppid == torchrun.pid and f"RANK={rank}".encode() in environ:
                return int(entry.name)
        time.sleep(0.05)
    raise AssertionError(f"no worker of rank {rank} found")




def _kill_a_rank(run_dir: Path, rank: int, argv: list[str], torchrun: tuple[str, ...] = ()) -> tuple[int, str, int]:
    """Start a 2-process job, SIGKILL rank ``rank`` after the first checkpoint; (exit status, stderr, the
    iteration checkpointed)."""
    proc = subprocess.Popen(_command(2, *argv, "--out", str(run_dir), torchrun=torchrun), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        pid = _worker_pid(proc, rank)
        saved = wait_for_state(run_dir, proc)
        os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # a failed test leaves no worker behind: torchrun and its workers, all at once
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, err, saved


@pytest.fixture(scope="module")
def uninterrupted(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    done = _run(2, *RESUMABLE, "--data-dir", str(data_dir), "--out", str(out))
    assert done.returncode == 0, done.stderr
    return out


@needs_proc
@pytest.mark.parametrize("rank", [1, 0])
def test_a_rank_that_dies_ends_the_job_with_one_line_and_resume_ends_equal(data_dir, tmp_path, uninterrupted, rank):
    run_dir = tmp_path / "run"
    code, err, saved = _kill_a_rank(run_dir, rank, [*RESUMABLE, "--data-dir", str(data_dir)])
    assert code != 0
    lines = _ours(err)
    assert len(lines) == 1, err  # from the survivor, whichever rank died
    assert "another process of the torchrun job ended" in lines[0] or "SIGTERM" in lines[0], lines[0]
    assert f"torchrun --standalone --nproc_per_node 2 -m lstmlab train --resume {run_dir}" in lines[0]
    _assert_no_traceback_of_ours(err)
    assert not (run_dir / "summary.json").exists()

    done = _run(2, "--resume", str(run_dir), "--quiet")
    assert done.returncode == 0, done.stderr
    for name in ("last.safetensors", "best.safetensors"):
        assert_same_weights(uninterrupted / name, run_dir / name)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["iterations"] == 200 and summary["resumed_at"] == [saved]
    assert (uninterrupted / "metrics.csv").read_text().count("\n") == (run_dir / "metrics.csv").read_text().count("\n")


@needs_proc
def test_torchrun_restarts_continue_the_run(data_dir, tmp_path, uninterrupted):
    """With --max-restarts, torchrun starts the same command again after a rank dies: it continues the run."""
    run_dir = tmp_path / "run"
    code, err, saved = _kill_a_rank(run_dir, 1, [*RESUMABLE, "--data-dir", str(data_dir)],
                                    torchrun=("--max-restarts", "1"))
    assert code == 0, err
    assert "with restarts left, does that by itself" in _ours(err)[0]
    assert_same_weights(uninterrupted / "last.safetensors", run_dir / "last.safetensors")
    assert json.loads((run_dir / "summary.json").read_text())["resumed_at"] == [saved]


# ---------------------------------------------------------------------------------------------
# set-up errors: one line from rank 0, whichever rank met it


def test_set_up_errors_are_one_line_from_rank_0(data_dir, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    for argv, needle in [(["--hidden-size", "x"], "--hidden-size"),
                         (["--out", str(taken)], "already holds files"),
                         (["--resume", str(tmp_path / "nowhere")], "no such run folder")]:
        done = _run(2, *SMALL, "--data-dir", str(data_dir), *argv)
        assert done.returncode != 0
        lines = _ours(done.stderr)
        assert len(lines) == 1 and needle in lines[0], done.stderr
        _assert_no_traceback_of_ours(done.stderr)
    assert sorted(p.name for p in taken.iterdir()) == ["notes.txt"]


def test_a_set_up_error_of_rank_1_alone_reaches_rank_0(data_dir, tmp_path):
    """Rank 1's --data-dir is empty (a machine without the data); rank 0 says so, naming the rank, and leaves no
    run behind."""
    empty = tmp_path / "empty"
    empty.mkdir()
    script = (f'if [ "$RANK" = 1 ]; then d="{empty}"; else d="{data_dir}"; fi; '
              f'exec "{sys.executable}" -m lstmlab train "$@" --data-dir "$d"')
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "--no-python", "sh", "-c", script, "sh", *SMALL, "--iterations", "4", "--out", str(out)]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    lines = _ours(done.stderr)
    assert len(lines) == 1 and "rank 1 of 2" in lines[0] and str(empty) in lines[0], done.stderr
    _assert_no_traceback_of_ours(done.stderr)
    assert not out.exists()


def test_selective_backprop_under_two_processes_follows_one(data_dir, tmp_path):
    """--select stale-loss: every rank records the whole global batch's losses (gathered), so every rank draws the
    same selective epochs as one process would."""
    argv = [*SMALL, "--iterations", "80", "--select", "stale-loss", "--select-beta", "2", "--data-dir", str(data_dir)]
    outs = []
    for procs in (1, 2):
        out = tmp_path / f"out{procs}"
        done = _run(procs, *argv, "--out", str(out))
        assert done.returncode == 0, done.stderr
        outs.append(out)
    w1, w2 = weights(outs[0] / "last.safetensors"), weights(outs[1] / "last.safetensors")
    for k in w1:
        assert torch.allclose(w1[k], w2[k], rtol=0, atol=1e-4), (k, (w1[k] - w2[k]).abs().max())
    s1, s2 = (json.loads((out / "summary.json").read_text()) for out in outs)
    assert s1["data_epochs"] == s2["data_epochs"] > s1["epochs"]  # selective epochs, the same on both
