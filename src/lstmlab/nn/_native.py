"""The compiled step loops of the ``fused`` backend: built once per machine, cached on disk, never waited for.

``get()`` returns the ``torch.ops.lstmlab_native`` namespace when the library is built, else ``None`` and,
the first time, starts building it in a low-priority background process (~20-60 s of one core). Until it
is ready the fused backend runs its Python loops, which give the same numbers up to float rounding.

Controlled by the environment variable ``LSTMLAB_NATIVE``: ``auto`` (default, as above), ``0`` (never
build or load it), ``1`` (build in the foreground on first use if needed, and use it). The cache lives in
``$LSTMLAB_CACHE_DIR`` or ``$XDG_CACHE_HOME/lstmlab`` or ``~/.cache/lstmlab``. ``python -m lstmlab.nn._native``
builds it now and prints where. This file imports nothing from lstmlab so that it can run as a script.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

_SOURCE = Path(__file__).with_name("csrc") / "lstm_native.cpp"
# -march=native: the library is built on the machine that runs it (the CPU's flags are in the cache key);
# -fno-trapping-math lets the compiler vectorise the branch-free exp/sigmoid/tanh; -fopenmp turns on
# at::parallel_for, which then runs on torch's own OpenMP threads (its libgomp is already loaded).
_CFLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]
_LOCK_STALE_S = 900.0  # a build lock older than this belongs to a dead build
_FAILED_RETRY_S = 86400.0  # after a failed build, try again only a day later (or with LSTMLAB_NATIVE=1)
_POLL_S = 2.0  # how often a process whose build is running looks for the finished library


def cache_dir() -> Path:
    """Where built libraries are kept."""
    if os.environ.get("LSTMLAB_CACHE_DIR"):
        return Path(os.environ["LSTMLAB_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lstmlab"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


@functools.cache
def _key() -> str:
    """What the binary depends on: the source, torch, Python, the flags and this CPU."""
    import torch

    h = hashlib.sha256()
    for part in (_SOURCE.read_bytes(), torch.__version__.encode(), sys.version.encode(), platform.machine().encode(),
                 " ".join(_CFLAGS + _LDFLAGS).encode(), _cpu_flags().encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def library_path() -> Path:
    """The built library for this source, torch and CPU (it may not exist yet)."""
    return cache_dir() / "native" / _key() / "lstmlab_native.so"


def build(verbose: bool = False) -> Path:
    """Compile the library into the cache in a child process (blocking); returns its path. Raises on failure.

    A child, because compiling also loads the library, and a process can hold only one copy of its ops.
    """
    final = library_path()
    if not final.exists():
        cmd = _self_command("--compile", *(["-v"] if verbose else []))
        done = subprocess.run(cmd, capture_output=not verbose, text=True, stdin=subprocess.DEVNULL)
        if done.returncode != 0 or not final.exists():
            raise RuntimeError(f"building {_SOURCE.name} failed: {(done.stderr or '').strip()[-2000:]}")
    return final


def _compile(verbose: bool = False) -> Path:
    """Compile in this process (it loads the library as a side effect)."""
    import torch.utils.cpp_extension as cpp

    final = library_path()
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    work = final.parent / f"build-{os.getpid()}"
    work.mkdir(exist_ok=True)
    try:
        so = cpp.load(
            name=f"lstmlab_native_{final.parent.name}",
            sources=[str(_SOURCE)],
            extra_cflags=_CFLAGS,
            extra_ldflags=_LDFLAGS,
            build_directory=str(work),
            is_python_module=False,
            verbose=verbose,
        )
        os.replace(so, final)  # atomic: readers never see a half-written library
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


class _Loader:
    """Loads the library once it exists; starts at most one background build per cache entry."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ops: Any = None
        self.disabled = False
        self.next_poll = 0.0
        self.process: subprocess.Popen | None = None

    def get(self) -> Any:
        if self.ops is not None or self.disabled:
            return self.ops
        now = time.monotonic()
        if now < self.next_poll:
            return None
        with self.lock:
            if self.ops is not None or self.disabled:
                return self.ops
            self.next_poll = now + _POLL_S
            mode = os.environ.get("LSTMLAB_NATIVE", "auto").strip().lower()
            if mode in ("0", "off", "false", "no"):
                self.disabled = True
                return None
            try:
                path = library_path()
                if not path.exists() and mode in ("1", "on", "true", "yes"):
                    build()
                if path.exists():
                    self.ops = _load(path)
                    if self.process is not None:
                        self.process.poll()  # reap our finished build process
                    return self.ops
                self._start_background_build(path)
            except Exception as e:  # noqa: BLE001 - any failure just means: run the Python loops
                self.disabled = True
                _warn(f"the fused LSTM's compiled loops are unavailable ({type(e).__name__}: {e}); "
                      "using the Python loops (same results, slower at small batches)")
            return None

    def _start_background_build(self, path: Path) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                return  # still building
            self.disabled = not path.exists()  # it ended without a library: do not start another
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        failed = path.parent / "FAILED.log"
        if failed.exists() and time.time() - failed.stat().st_mtime < _FAILED_RETRY_S:
            self.disabled = True
            return
        lock = path.parent / "building.lock"
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if time.time() - lock.stat().st_mtime > _LOCK_STALE_S:
                lock.unlink(missing_ok=True)  # a build that died; the next poll starts a new one
            return  # another process is building it
        os.close(fd)
        log = open(path.parent / "build.log", "w")  # noqa: SIM115 - handed to the child process
        env = dict(os.environ, MAX_JOBS="1")
        self.process = subprocess.Popen(
            _self_command("--background", str(lock)),
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
        )
        log.close()


def _self_command(*args: str) -> list[str]:
    """Run this file in a fresh interpreter. Not as `python FILE`, which would put the package's own folder
    first on sys.path, where a module may shadow the standard library's (lstmlab has an ``inspect.py``)."""
    code = (
        "import runpy, sys; del sys.path[0]; sys.argv = sys.argv[1:]; "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    return [sys.executable, "-c", code, __file__, *args]


def _load(path: Path) -> Any:
    import torch

    torch.ops.load_library(str(path))
    return torch.ops.lstmlab_native


def _warn(message: str) -> None:
    import warnings

    warnings.warn(message, RuntimeWarning, stacklevel=4)


@functools.cache
def _loader() -> _Loader:
    # One per process: the loaded library and the build in flight are process-wide by nature.
    return _Loader()


def get() -> Any:
    """``torch.ops.lstmlab_native`` if the library is ready, else None (and a build is started)."""
    return _loader().get()


def _background(lock: str) -> int:
    """Entry of the background build process: lowest priority, one compiler job, lock removed at the end."""
    try:
        os.nice(19)
    except OSError:
        pass
    try:
        _compile(verbose=True)
    except Exception as e:  # noqa: BLE001 - record why, so that no process retries for a day
        failed = library_path().parent / "FAILED.log"
        failed.write_text(f"{type(e).__name__}: {e}\n")
        return 1
    finally:
        Path(lock).unlink(missing_ok=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m lstmlab.nn._native``: build (or find) the library and print its path."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--background"]:
        return _background(argv[1])
    if argv[:1] == ["--compile"]:
        _compile(verbose="-v" in argv)
        return 0
    path = build(verbose="-v" in argv)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
