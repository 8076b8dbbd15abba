"""Faults of a run's life: kill -9 and resume (bit for bit), SIGTERM, the folder lock, --overwrite, run ids,
divergence, overflowing flags, unwritable or full disks, file modes. Every fault: one line, its exit status,
and nothing saved before damaged."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from run_files import assert_same_weights, wait_for_state, weights

from lstmlab.cli import main
from lstmlab.runs import STATE_FILE, RunLock, load_state

TINY = ["--quiet", "--batch-size", "16", "--hidden-size", "8", "--val-size", "200", "--device", "cpu"]


def _run(capsys, *argv: str) -> tuple[int, str]:
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse exits on bad flags
        code = e.code
    return code, capsys.readouterr().err


def _one_line(code: int, err: str, *needles: str, status: int = 2) -> str:
    assert code == status, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _env() -> dict[str, str]:
    # One thread and the Python step loops in every process: the processes compared must compute alike, and
    # no native build may finish (and switch loops) in the middle of one of them.
    return {**os.environ, "OMP_NUM_THREADS": "1", "LSTMLAB_NATIVE": "0", "PYTHONUNBUFFERED": "1"}


def _train_cmd(*argv: str) -> list[str]:
    return [sys.executable, "-m", "lstmlab", "train", *argv]








def _metrics_without_time(path: Path) -> list[list[str]]:
    lines = [line.split(",") for line in path.read_text().splitlines()]
    return [row[:6] for row in lines]  # elapsed_s and run_id differ between runs


# ---------------------------------------------------------------------------------------------
# kill -9, SIGTERM and --resume


RESUMABLE = [*TINY, "--iterations", "120", "--eval-every", "10", "--layers", "2", "--dropout", "0.2",
             "--augment-shift", "2"]


def test_kill9_twice_then_resume_gives_the_same_weights_bit_for_bit(mnist_dir, tmp_path):
    """Adam + one-cycle + shifts + dropout: every piece of state a resume must restore is exercised."""
    argv = [*RESUMABLE, "--data-dir", str(mnist_dir)]
    whole = tmp_path / "whole"
    subprocess.run(_train_cmd(*argv, "--out", str(whole)), env=_env(), check=True, timeout=600)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(*argv, "--out", str(killed)), env=_env())
    first = wait_for_state(killed, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists()
    # the second attempt is resumed, then killed again later on
    proc = subprocess.Popen(_train_cmd("--resume", str(killed), "--quiet"), env=_env())
    second = wait_for_state(killed, proc, past=first)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first < second < 120

    done = subprocess.run(_train_cmd("--resume", str(killed), "--quiet"), env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    for name in ("last.safetensors", "best.safetensors"):
        assert_same_weights(whole / name, killed / name)
    assert _metrics_without_time(whole / "metrics.csv") == _metrics_without_time(killed / "metrics.csv")
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["iterations"] == 120 and summary["resumed_at"] == [first, second]
    assert json.loads((whole / "summary.json").read_text())["test_accuracy"] == summary["test_accuracy"]


@pytest.mark.parametrize("signum, word, status", [(signal.SIGTERM, "terminated", 143),
                                                  (signal.SIGINT, "interrupted", 130)])
def test_sigterm_and_sigint_keep_the_checkpoint_and_say_how_to_resume(mnist_dir, tmp_path, capsys, signum, word,
                                                                      status):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(*RESUMABLE, "--data-dir", str(mnist_dir), "--out", str(run_dir)),
                            env=_env(), stderr=subprocess.PIPE, text=True)
    wait_for_state(run_dir, proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    line = _one_line(proc.returncode, err, word, f"lstmlab train --resume {run_dir}", status=status)
    assert "keeps the checkpoint of iteration" in line
    assert not (run_dir / ".lock").exists() and not list(run_dir.glob(".*.tmp"))
    assert load_state(run_dir) is not None
    # a new run into the folder is pointed at --resume, and touches nothing
    before = _snapshot(run_dir)
    code, err = _run(capsys, "train", *TINY, "--out", str(run_dir))
    _one_line(code, err, "unfinished run", f"lstmlab train --resume {run_dir}", "--overwrite")
    assert _snapshot(run_dir) == before


def test_resume_before_the_first_checkpoint_starts_over(mnist_dir, tmp_path, capsys):
    """A run killed before its first checkpoint has only run.json; resuming it starts from iteration 0."""
    argv = [*TINY, "--iterations", "4", "--eval-every", "2", "--data-dir", str(mnist_dir)]
    assert main(["train", *argv, "--out", str(tmp_path / "whole")]) == 0
    assert main(["train", *argv, "--out", str(tmp_path / "cut")]) == 0
    for name in ("state.safetensors", "summary.json", "best.safetensors", "last.safetensors", "metrics.csv"):
        (tmp_path / "cut" / name).unlink()  # as if killed right after run.json was written
    (tmp_path / "cut" / ".last.safetensors.x1y2.tmp").write_bytes(b"half a file")
    assert main(["train", "--resume", str(tmp_path / "cut"), "--quiet"]) == 0
    assert_same_weights(tmp_path / "whole" / "last.safetensors", tmp_path / "cut" / "last.safetensors")
    assert not list((tmp_path / "cut").glob(".*.tmp"))


def test_resume_refuses_other_flags(mnist_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", *TINY, "--dry-run", "--data-dir", str(mnist_dir), "--out", str(run_dir)]) == 0
    before = _snapshot(run_dir)
    for flags, needle in [(["--lr", "0.5"], "--lr 0.5 differs"), (["--hidden-size", "16"], "--hidden-size"),
                          (["--overwrite"], "--overwrite"), (["--out", str(tmp_path / "x")], "--out"),
                          (["--recipe", "seed"], "--recipe")]:
        code, err = _run(capsys, "train", "--resume", str(run_dir), *flags)
        _one_line(code, err, needle)
    code, err = _run(capsys, "train", "--resume", str(tmp_path / "nowhere"))
    _one_line(code, err, "no such run folder")
    code, err = _run(capsys, "train", "--resume", str(mnist_dir))
    _one_line(code, err, "run.json")
    # flags that agree are fine, and a finished run is not run again
    code, err = _run(capsys, "train", "--resume", str(run_dir), "--hidden-size", "8", "--batch-size", "16")
    assert code == 0 and "already finished" in err
    assert _snapshot(run_dir) == before


# ---------------------------------------------------------------------------------------------
# the run folder: lock, --overwrite, run ids, temp files


_HOLDER = """
import sys, time
from lstmlab.runs import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_second_writer_is_refused_and_the_folder_untouched(mnist_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", *TINY, "--dry-run", "--data-dir", str(mnist_dir), "--out", str(run_dir)]) == 0
    before = _snapshot(run_dir)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        lock_bytes = (run_dir / ".lock").read_bytes()
        for argv in (["--out", str(run_dir), "--overwrite"], ["--resume", str(run_dir)]):
            code, err = _run(capsys, "train", *TINY, "--dry-run", "--data-dir", str(mnist_dir), *argv)
            _one_line(code, err, "in use by another `lstmlab train`", f"pid {holder.pid}")
            assert _snapshot(run_dir) == {**before, ".lock": lock_bytes}
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock is stale and simply taken over
    assert (run_dir / ".lock").exists()
    assert main(["train", *TINY, "--dry-run", "--data-dir", str(mnist_dir), "--out", str(run_dir),
                 "--overwrite"]) == 0
    assert not (run_dir / ".lock").exists()


def test_two_runs_started_at_once_into_one_folder(mnist_dir, tmp_path):
    """One wins; the other is refused with one line (in use, or already holding a run if it came late) and the
    folder holds the winner's run alone."""
    run_dir = tmp_path / "run"
    cmd = _train_cmd(*TINY, "--dry-run", "--data-dir", str(mnist_dir), "--out", str(run_dir))
    procs = [subprocess.Popen(cmd, env=_env(), stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = sorted((p.wait(timeout=600), p.stderr.read()) for p in procs)
    assert [code for code, _ in results] == [0, 2], results
    _one_line(*results[1], str(run_dir))
    run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    assert json.loads((run_dir / "summary.json").read_text())["run_id"] == run_id
    assert load_state(run_dir)[1]["run_id"] == run_id


def test_overwrite_clears_the_old_run_and_every_file_has_the_run_id(mnist_dir, tmp_path):
    run_dir = tmp_path / "run"
    argv = ["train", *TINY, "--dry-run", "--data-dir", str(mnist_dir), "--out", str(run_dir)]
    assert main(argv) == 0
    old_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    (run_dir / "curves.png").write_bytes(b"a figure of the old run")
    (run_dir / "notes.txt").write_text("mine")  # not a run file: left alone
    (run_dir / ".summary.json.abc.tmp").write_text("{")
    assert main([*argv, "--overwrite"]) == 0
    new_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    assert new_id != old_id
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(
        ["run.json", "state.safetensors", "metrics.csv", "losses.csv", "summary.json", "best.safetensors",
         "last.safetensors", "notes.txt"])
    assert json.loads((run_dir / "summary.json").read_text())["run_id"] == new_id
    assert {line.rsplit(",", 1)[1] for line in (run_dir / "metrics.csv").read_text().splitlines()[1:]} == {new_id}
    for name in ("best.safetensors", "last.safetensors"):
        from lstmlab.checkpoint import load_checkpoint

        assert load_checkpoint(run_dir / name).meta["run_id"] == new_id
    assert load_state(run_dir)[1]["run_id"] == new_id


def test_temp_files_do_not_make_a_folder_taken(mnist_dir, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".best.safetensors.k2j3.tmp").write_bytes(b"left by a kill")
    (run_dir / ".lock").write_text("999999999\n")  # a dead process's lock file
    assert main(["train", *TINY, "--dry-run", "--data-dir", str(mnist_dir), "--out", str(run_dir)]) == 0
    assert not list(run_dir.glob(".*"))


def test_lock_in_process(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(Exception, match="in use"):
            RunLock(tmp_path).acquire()
    with RunLock(tmp_path):  # released: free again
        pass


# ---------------------------------------------------------------------------------------------
# divergence and overflowing flags


def test_divergence_rule():
    from lstmlab.training.guards import DIVERGE_WARMUP, Guard

    healthy = Guard()
    assert all(healthy.check(2.3 - 0.01 * k, k) is None for k in range(200))
    assert "nan" in Guard().check(float("nan"), 1)
    exploding = Guard()
    losses = [2.3] * DIVERGE_WARMUP + [50.0] * 30
    messages = [exploding.check(v, k) for k, v in enumerate(losses, 1)]
    first = next(k for k, m in enumerate(messages, 1) if m)
    assert first > DIVERGE_WARMUP and "over 3x" in messages[first - 1]
    early = Guard()  # an explosion within the warm-up is caught against the first step's loss
    messages = [early.check(v, k) for k, v in enumerate([2.3, 2.3, 80.0, 90.0], 1)]
    assert messages[:2] == [None, None] and "over 3x its reference 2.3" in messages[2]


@pytest.mark.parametrize("flags, kept", [(["--optimizer", "sgd", "--lr", "1e4"], False),
                                         (["--optimizer", "adam", "--lr", "10", "--clip", "1"], True)])
def test_divergence_stops_with_one_line(mnist_dir, tmp_path, capsys, flags, kept):
    """SGD at 1e4 turns the loss into NaN at once; clipped Adam at 10 wanders up past 3x after some evaluations."""
    run_dir = tmp_path / "run"
    code, err = _run(capsys, "train", *TINY, "--iterations", "300", "--eval-every", "5", *flags,
                     "--data-dir", str(mnist_dir), "--out", str(run_dir))
    line = _one_line(code, err, "training diverged", "lower --lr")
    assert not (run_dir / "summary.json").exists()
    assert ("keeps iteration" in line) == kept
    if kept:  # the last evaluation before divergence is what is kept
        from lstmlab.checkpoint import load_checkpoint

        kept = int(line.split("keeps iteration ")[1].split(",")[0])
        assert load_checkpoint(run_dir / "last.safetensors").meta["iteration"] == kept
    for name in ("best.safetensors", "last.safetensors"):  # what was kept is finite
        if (run_dir / name).exists():
            assert all(torch.isfinite(t).all() for t in weights(run_dir / name).values())
    if (run_dir / "metrics.csv").exists():
        vals = [line.split(",")[3] for line in (run_dir / "metrics.csv").read_text().splitlines()[1:]]
        assert all(v and float(v) == float(v) and abs(float(v)) != float("inf") for v in vals)


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--epochs", "inf"], "--epochs"),
        (["--epochs", "nan"], "--epochs"),
        (["--seed", str(2**64 + 1)], "--seed"),
        (["--seed", "-1"], "--seed"),
        (["--hidden-size", "1e9"], "--hidden-size"),
        (["--hidden-size", "1000000000"], "--hidden-size"),
        (["--layers", "1000"], "--layers"),
        (["--recipe", "seed", "--lr", "1e300"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--iterations", str(10**12)], "--iterations"),
        (["--batch-size", str(10**9)], "--batch-size"),
        (["--clip", "inf"], "--clip"),
        (["--forget-bias", "nan"], "--forget-bias"),
        (["--weight-decay", "inf"], "--weight-decay"),
        (["--label-smoothing", "1"], "--label-smoothing"),
        (["--label-smoothing", "nan"], "--label-smoothing"),
    ],
)
def test_overflowing_flags(capsys, tmp_path, flags, needle):
    code, err = _run(capsys, "train", "--out", str(tmp_path / "r"), *flags)
    _one_line(code, err, needle)
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------------------------
# unwritable and full disks, file modes


def _empty_data_dir(tmp_path: Path) -> Path:
    empty = tmp_path / "no-data"
    empty.mkdir(exist_ok=True)
    return empty


def test_out_under_a_file_fails_before_the_data_loads(tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    # an empty --data-dir: were --out checked after loading, the error would be about missing data
    code, err = _run(capsys, "train", *TINY, "--data-dir", str(_empty_data_dir(tmp_path)),
                     "--out", str(blocker / "run"))
    _one_line(code, err, str(blocker / "run"), "not a folder")
    code, err = _run(capsys, "train", *TINY, "--data-dir", str(_empty_data_dir(tmp_path)), "--out", str(blocker))
    _one_line(code, err, str(blocker), "is a file")
    assert blocker.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any folder whatever its mode; the read-only "
                    "mount test covers refused writes when running as root")
def test_out_in_an_unwritable_folder(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    code, err = _run(capsys, "train", *TINY, "--data-dir", str(_empty_data_dir(tmp_path)),
                     "--out", str(locked / "run"))
    _one_line(code, err, str(locked / "run"), "permission")


def test_out_without_permission_is_one_line(tmp_path, capsys, monkeypatch):
    """The same refusal as test_out_in_an_unwritable_folder, simulated so that it runs as root too."""
    import errno

    def refuse(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    code, err = _run(capsys, "train", *TINY, "--data-dir", str(tmp_path), "--out", str(tmp_path / "new" / "run"))
    _one_line(code, err, str(tmp_path / "new" / "run"), "permission denied", "choose another path")


def _mount_tmpfs(where: Path, options: str) -> None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    where.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")


@pytest.fixture
def mount_point(tmp_path):
    where = tmp_path / "mnt"
    yield where
    subprocess.run(["umount", str(where)], capture_output=True)


def test_out_on_a_read_only_file_system(tmp_path, capsys, mount_point):
    _mount_tmpfs(mount_point, "size=1m,ro")
    for out in (mount_point / "run", mount_point):
        code, err = _run(capsys, "train", *TINY, "--data-dir", str(_empty_data_dir(tmp_path)), "--out", str(out))
        _one_line(code, err, "read-only", str(out))


def test_disk_full_is_one_line_and_keeps_earlier_files(mnist_dir, tmp_path, capsys, mount_point):
    _mount_tmpfs(mount_point, "size=4m")
    earlier = mount_point / "earlier"
    assert main(["train", *TINY, "--dry-run", "--data-dir", str(mnist_dir), "--out", str(earlier)]) == 0
    before = _snapshot(earlier)
    stat = os.statvfs(mount_point)
    room = stat.f_bavail * stat.f_frsize - 16 * 1024  # leave 16 KB: run.json fits, a checkpoint does not
    (mount_point / "filler").write_bytes(b"\0" * room)
    run_dir = mount_point / "run"
    code, err = _run(capsys, "train", *TINY, "--dry-run", "--hidden-size", "64", "--data-dir", str(mnist_dir),
                     "--out", str(run_dir))
    _one_line(code, err, "the disk is full", str(run_dir), "free some space")
    assert _snapshot(earlier) == before
    assert not list(run_dir.glob(".*"))  # no temp file, no lock left behind
    (mount_point / "filler").unlink()
    # the run that hit the full disk has its run.json: resuming it now finishes it
    assert main(["train", "--resume", str(run_dir), "--quiet"]) == 0


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_follow_the_umask(mnist_dir, tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        assert main(["train", *TINY, "--dry-run", "--data-dir", str(mnist_dir), "--out", str(tmp_path / "r")]) == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "r").iterdir()}
    assert set(modes.values()) == {mode}, modes
    assert STATE_FILE in modes


def test_damaged_state_is_one_line_and_left_as_it_is(mnist_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", *TINY, "--iterations", "4", "--eval-every", "2", "--data-dir", str(mnist_dir),
                 "--out", str(run_dir)]) == 0
    (run_dir / "summary.json").unlink()  # as if killed before the report
    state = run_dir / STATE_FILE
    state.write_bytes(state.read_bytes()[:1000])
    before = _snapshot(run_dir)
    code, err = _run(capsys, "train", "--resume", str(run_dir))
    _one_line(code, err, str(state), "--overwrite")
    assert _snapshot(run_dir) == before


def test_selective_backprop_resumes_bit_for_bit(tmp_path):
    """--select stale-loss: the loss record is part of the run state, so kill -9 and --resume change nothing."""
    from synthetic_idx import write_synthetic_mnist

    data = write_synthetic_mnist(tmp_path / "data", n_train=600, n_test=200)
    env = {**_env(), "LSTMLAB_VERIFY": "0"}  # synthetic files: not MNIST's checksums
    argv = ["--quiet", "--batch-size", "16", "--hidden-size", "8", "--val-size", "200", "--device", "cpu",
            "--iterations", "120", "--eval-every", "10", "--select", "stale-loss", "--select-beta", "2",
            "--select-floor", "0.05", "--augment-flip", "--data-dir", str(data)]
    whole = tmp_path / "whole"
    subprocess.run(_train_cmd(*argv, "--out", str(whole)), env=env, check=True, timeout=600)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(*argv, "--out", str(killed)), env=env)
    first = wait_for_state(killed, proc, past=40)  # past the first (full) epoch of 25 batches
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run(_train_cmd("--resume", str(killed), "--quiet"), env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    for name in ("last.safetensors", "best.safetensors"):
        assert_same_weights(whole / name, killed / name)
    assert (whole / "metrics.csv").read_text().count(",") == (killed / "metrics.csv").read_text().count(",")
    rows = [line.split(",") for line in (whole / "metrics.csv").read_text().splitlines()]
    fractions = [float(r[rows[0].index("trained_fraction")]) for r in rows[1:]]
    assert fractions[0] == 1.0 and min(fractions[3:]) < 0.8  # everything in the warm-up epoch, a selection after
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["resumed_at"] == [first] and summary["data_epochs"] > summary["epochs"]
    assert summary["config"]["train"]["select"] == "stale-loss"
