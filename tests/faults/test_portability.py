"""lstmlab runs wherever PyTorch runs: the compiled loops probe, fall back and never take a run down, and the run
folder's lock, atomic writes and the background builder work without fcntl, os.fchmod and os.nice."""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lstmlab.cli import main
from lstmlab.nn import _native
from lstmlab.runs import RunLock

REPO = Path(__file__).resolve().parents[2]
SHORT = ["train", "--quiet", "--batch-size", "16", "--hidden-size", "8", "--iterations", "12", "--eval-every", "6",
         "--val-size", "200", "--seed", "3", "--threads", "1"]


def _env(**extra: str) -> dict[str, str]:
    """The child's environment: this one, one OpenMP thread, and the loops built for the machine (-march=native)
    unless ``extra`` names a CPU level (LSTMLAB_NATIVE_ARCH)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("LSTMLAB_NATIVE_ARCH", None)
    return {**env, **extra}


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("lstmlab: warning:")]


# ---------------------------------------------------------------------------------------------
# a CPU whose oneDNN refuses float32 (every x86 CPU without AVX-512)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="ONEDNN_MAX_CPU_ISA is x86's")
def test_native_loops_pass_on_an_avx2_build_with_onednn_capped_at_avx2(native_ops, tmp_path: Path) -> None:  # noqa: ANN001
    """The native-loop tests again in a child as on an AVX2 CPU: the loops built for x86-64-v3 (AVX2 and FMA: 256-bit
    vectors, 3-row tiles; LSTMLAB_NATIVE_ARCH) and oneDNN capped at AVX2 (set before torch loads). Where oneDNN's
    float32 GEMM refuses such a CPU, the loops' probe sends the matmuls to at::mm and says why."""
    env = _env(ONEDNN_MAX_CPU_ISA="AVX2", OMP_NUM_THREADS="2", LSTMLAB_NATIVE_ARCH="x86-64-v3", LSTMLAB_NATIVE="1")
    env.pop("LSTMLAB_ONEDNN", None)
    built = subprocess.run([sys.executable, "-m", "lstmlab.nn._native"], capture_output=True, text=True, env=env,
                           timeout=900)
    assert built.returncode == 0, built.stderr
    library = Path(built.stdout.splitlines()[0])
    if shutil.which("objdump"):  # no AVX-512 instruction in it
        code = subprocess.run(["objdump", "-d", str(library)], capture_output=True, text=True, timeout=300).stdout
        assert "ymm" in code and "zmm" not in code
    gemm = subprocess.run(
        [sys.executable, "-c", "import torch; from lstmlab.nn import _native; ops = _native.get(); "
                               "print(ops.gemm()); print(ops.gemm_reason())"],
        capture_output=True, text=True, env=env, timeout=600)
    assert gemm.returncode == 0, gemm.stderr
    name, reason = (gemm.stdout.splitlines() + [""])[:2]
    assert name in ("onednn", "at::mm")
    assert (name == "at::mm") == bool(reason), gemm.stdout  # at::mm always comes with its reason
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
         str(REPO / "tests" / "nn" / "test_fused.py"), str(REPO / "tests" / "nn" / "test_variants.py"),
         str(REPO / "tests" / "nn" / "test_infer.py"), "-k", "native or onednn or autocast or grid or loops"],
        capture_output=True, text=True, env=env, timeout=1200, cwd=tmp_path)
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-2000:]
    assert " passed" in tests.stdout and "failed" not in tests.stdout


def test_the_build_level_is_named_and_checked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """LSTMLAB_NATIVE_ARCH: the speed figures' machine line names it; a malformed or unknown CPU name is one line
    and exit 2 from the builder, and the Python loops in a run, never a build for some other CPU."""
    from lstmlab import machine

    monkeypatch.setenv("LSTMLAB_NATIVE_ARCH", "x86-64-v3")
    assert machine.isa().endswith("lstmlab's loops built for x86-64-v3")
    for bad in ("x86-64-v3; rm -rf ~", "no-such-cpu-9"):
        done = subprocess.run([sys.executable, "-m", "lstmlab.nn._native"], capture_output=True, text=True,
                              env=_env(LSTMLAB_NATIVE_ARCH=bad, LSTMLAB_NATIVE="1", LSTMLAB_CACHE_DIR=str(tmp_path)),
                              timeout=300)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "LSTMLAB_NATIVE_ARCH=" in lines[0] and "Python loops" in lines[0], lines


def test_gemm_reason_names_the_switch(native_ops, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("LSTMLAB_ONEDNN", "0")
    assert native_ops.gemm() == "at::mm"
    assert native_ops.gemm_reason() == "LSTMLAB_ONEDNN=0"


# ---------------------------------------------------------------------------------------------
# a compiled op that raises in the middle of a run


class _Faulty:
    """The compiled ops, but the n-th call of one of them raises (as a CPU that refuses a kernel would)."""

    def __init__(self, ops, op: str, n: int) -> None:  # noqa: ANN001
        self._ops, self._op, self._left = ops, op, n

    def __getattr__(self, name: str):  # noqa: ANN204
        real = getattr(self._ops, name)
        if name != self._op:
            return real

        def call(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            self._left -= 1
            if self._left == 0:
                raise RuntimeError("injected: this CPU refuses the kernel\nC++ stack trace line")
            return real(*args, **kwargs)

        return call


def _loader_with(monkeypatch: pytest.MonkeyPatch, ops) -> _native._Loader:  # noqa: ANN001
    """A fresh process-wide loader that hands out ``ops`` (None: the Python loops)."""
    loader = _native._Loader()
    loader.ops, loader.disabled = ops, ops is None
    monkeypatch.setattr(_native, "_loader", lambda: loader)
    return loader


# batch 16: the plain cell trains on lstm_infer.cpp's step loops (train_*); 64: on lstm_native.cpp's row blocks
@pytest.mark.parametrize(("op", "cell", "batch"), [
    ("train_forward", "lstm", 16), ("train_backward", "lstm", 16), ("forward", "lstm", 64), ("backward", "lstm", 64),
    ("variant_backward", "peephole", 16)])
def test_a_native_op_that_raises_mid_run_hands_over_to_the_python_loops(
        native_ops, mnist_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],  # noqa: ANN001
        monkeypatch: pytest.MonkeyPatch, op: str, cell: str, batch: int) -> None:
    argv = [*SHORT, "--batch-size", str(batch), "--cell", cell, "--backend", "fused", "--data-dir", str(mnist_dir)]
    loader = _loader_with(monkeypatch, _Faulty(native_ops, op, 5))
    assert main([*argv, "--out", str(tmp_path / "faulty")]) == 0
    err = capsys.readouterr().err
    assert len(_warnings(err)) == 1, err
    line = _warnings(err)[0]
    assert f"the fast loops failed in the {'forward' if op.endswith('forward') else 'backward'}" in line
    assert "injected: this CPU refuses the kernel" in line and "C++ stack" not in line
    assert "Python loops take over" in line and "report" in line
    assert "Traceback" not in err
    assert loader.ops is None and loader.disabled  # the rest of the process on the Python loops

    _loader_with(monkeypatch, None)
    assert main([*argv, "--out", str(tmp_path / "python")]) == 0
    assert _warnings(capsys.readouterr().err) == []
    got, want = load_file(tmp_path / "faulty" / "last.safetensors"), load_file(tmp_path / "python" / "last.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)


def test_loops_that_fail_their_self_test_are_never_used(native_ops, capsys: pytest.CaptureFixture[str],  # noqa: ANN001
                                                        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    class Wrong:
        def __getattr__(self, name: str):  # noqa: ANN204
            real = getattr(native_ops, name)
            if name != "forward":
                return real

            def forward(xh, c0, w, acts, out, cs, tcs, sizes):  # noqa: ANN001, ANN202
                real(xh, c0, w, acts, out, cs, tcs, sizes)
                out.add_(1e-2)  # a kernel that computes something else

            return forward

    monkeypatch.setattr(_native, "_load", lambda path: Wrong())
    monkeypatch.setattr(_native, "verify", lambda path: None)
    loader = _native._Loader()
    assert loader.get() is None and loader.disabled
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "failed their self-test (out of the plain cell in torch.float32 differs from the Python loops)" in err
    assert _native.self_test(native_ops) is None  # the real ones pass


# ---------------------------------------------------------------------------------------------
# no compiler, an unwritable cache


def _train(tmp: Path, mnist_dir: Path, env: dict[str, str], name: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lstmlab", *SHORT, "--iterations", "4", "--eval-every", "4",
                           "--backend", "fused", "--data-dir", str(mnist_dir), "--out", str(tmp / name)],
                          capture_output=True, text=True, env=env, timeout=600)


def test_no_compiler_is_one_line_per_run_and_never_compiling(mnist_dir: Path, tmp_path: Path) -> None:
    env = _env(CXX="/bin/false", LSTMLAB_CACHE_DIR=str(tmp_path / "cache"), LSTMLAB_NATIVE="auto")
    for run in ("first", "second"):
        done = _train(tmp_path, mnist_dir, env, run)
        assert done.returncode == 0, done.stderr
        lines = done.stderr.strip().splitlines()
        assert lines == ["lstmlab: warning: fast loops unavailable (the C++ compiler `/bin/false` does not run "
                         "(`/bin/false --version` exited 1)); using the Python loops (same results, slower)"], run
        assert "compiling" not in done.stdout + done.stderr
        assert (tmp_path / run / "best.safetensors").is_file()
    cli = subprocess.run([sys.executable, "-m", "lstmlab.nn._native"], capture_output=True, text=True, env=env,
                         timeout=600)
    assert cli.returncode == 2
    assert len(cli.stderr.strip().splitlines()) == 1 and "`/bin/false` does not run" in cli.stderr, cli.stderr
    assert "Traceback" not in cli.stderr


def test_a_compiler_that_fails_is_one_line_naming_its_error(mnist_dir: Path, tmp_path: Path) -> None:
    """A compiler that runs but cannot build the loops: the background build records its first error, and every
    later run says it in one line instead of compiling again."""
    cxx = tmp_path / "broken-c++"
    cxx.write_text('#!/bin/sh\n[ "$1" = --version ] && { echo "broken c++ 1.0"; exit 0; }\n'
                   'echo "lstm_native.cpp:1:1: error: simulated failure" >&2\nexit 1\n')
    cxx.chmod(0o755)
    cache = tmp_path / "cache"
    env = _env(CXX=str(cxx), LSTMLAB_CACHE_DIR=str(cache), LSTMLAB_NATIVE="auto")
    first = _train(tmp_path, mnist_dir, env, "first")
    assert first.returncode == 0, first.stderr
    deadline = time.monotonic() + 300  # the background builder outlives a short run
    while (not list(cache.glob("native/*/FAILED.log")) or list(cache.glob("native/*/building.lock"))) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    (failed,) = cache.glob("native/*/FAILED.log")
    assert failed.read_text().strip() == "lstm_native.cpp:1:1: error: simulated failure"
    second = _train(tmp_path, mnist_dir, env, "second")
    assert second.returncode == 0, second.stderr
    assert second.stderr.strip().splitlines() == [
        "lstmlab: warning: fast loops unavailable (lstm_native.cpp:1:1: error: simulated failure); using the Python "
        "loops (same results, slower)"]
    assert (tmp_path / "second" / "best.safetensors").is_file()


def test_an_unwritable_cache_is_one_line(mnist_dir: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    env = _env(LSTMLAB_CACHE_DIR=str(blocker / "cache"), LSTMLAB_NATIVE="auto")
    done = _train(tmp_path, mnist_dir, env, "run")
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lstmlab: warning: fast loops unavailable ("), done.stderr
    assert "using the Python loops" in lines[0]
    assert (tmp_path / "run" / "best.safetensors").is_file()


def test_a_failed_build_says_its_compiler_error_in_one_line() -> None:
    out = ("ninja: build stopped\n/x/lstm_native.cpp:12:3: error: 'foo' was not declared in this scope\n"
           "RuntimeError: Error building extension 'lstmlab_native_x'\n")
    assert _native.failure_reason(out) == "/x/lstm_native.cpp:12:3: error: 'foo' was not declared in this scope"
    assert _native.failure_reason("Traceback...\nRuntimeError: no C++ compiler\n") == "no C++ compiler"


# ---------------------------------------------------------------------------------------------
# no fcntl, os.fchmod, os.nice (Windows has none of them)

_WITHOUT = ("import os, sys; sys.modules['fcntl'] = None; del os.fchmod; del os.nice; "
            "from lstmlab.cli import main; sys.exit(main(sys.argv[1:]))")


def test_train_resume_and_evaluate_without_fcntl_fchmod_nice(mnist_dir: Path, tmp_path: Path) -> None:
    """A run stopped by Ctrl-C once it has saved its state, resumed to the end, then evaluated."""
    env = _env(LSTMLAB_NATIVE="0")
    out = tmp_path / "run"
    common = ["--data-dir", str(mnist_dir)]
    first = subprocess.Popen([sys.executable, "-c", _WITHOUT, *SHORT, "--iterations", "300", "--eval-every", "5",
                              *common, "--out", str(out)], stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 300
    while not (out / "state.safetensors").is_file() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=300)
    assert first.returncode in (0, 130), err  # 0: it had ended before the signal came
    assert (out / "state.safetensors").is_file() and not (out / ".lock").exists()
    more = subprocess.run([sys.executable, "-c", _WITHOUT, "train", "--quiet", "--resume", str(out), *common],
                          capture_output=True, text=True, env=env, timeout=600)
    assert more.returncode == 0, more.stderr
    assert json.loads((out / "summary.json").read_text())["iterations"] == 300
    evaluate = subprocess.run([sys.executable, "-c", _WITHOUT, "evaluate", str(out / "best.safetensors"), *common],
                              capture_output=True, text=True, env=env, timeout=600)
    assert evaluate.returncode == 0, evaluate.stderr
    assert "Test Accuracy" in evaluate.stdout
    assert "Traceback" not in err + more.stderr + evaluate.stderr


def test_run_lock_without_fcntl_is_a_marker_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lstmlab import runs
    from lstmlab.errors import LstmlabError

    monkeypatch.setattr(runs, "_file_locks", lambda: False)  # no fcntl, no msvcrt
    with RunLock(tmp_path):
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
        with pytest.raises(LstmlabError, match=f"in use by another `lstmlab train` \\(pid {os.getpid()}\\)"):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / ".lock").exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(f"{dead.pid}\n")  # a killed run's marker is taken over
    with RunLock(tmp_path):
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())


def test_background_builder_without_os_nice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LSTMLAB_CACHE_DIR", str(tmp_path))
    monkeypatch.delattr(os, "nice")
    built = []
    monkeypatch.setattr(_native, "_compile", lambda verbose=False: built.append(1))
    lock = tmp_path / "building.lock"
    lock.write_text("x")
    assert _native._background(str(lock)) == 0
    assert built == [1] and not lock.exists()
