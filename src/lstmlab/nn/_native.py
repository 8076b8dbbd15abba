"""The compiled step loops of the ``fused`` backend: built once per machine, cached on disk, never waited for.

``get()`` returns the ``torch.ops.lstmlab_native`` namespace when the library is built, else ``None`` and,
the first time, starts building it in a low-priority background process (~20-60 s of one core). Until it
is ready the fused backend runs its Python loops, which give the same numbers up to float rounding.

Controlled by the environment variable ``LSTMLAB_NATIVE``: ``auto`` (default, as above), ``0`` (never
build or load it), ``1`` (build in the foreground on first use if needed, and use it). The cache lives in
``$LSTMLAB_CACHE_DIR`` or ``$XDG_CACHE_HOME/lstmlab`` or ``~/.cache/lstmlab``. ``python -m lstmlab.nn._native``
builds it now and prints where. This file imports nothing from lstmlab so that it can run as a script.

The cache is written so that a crash, a full disk or a damaged file can never take a command down: the library
is built in a temp folder, fsynced and renamed into place, and its size and SHA-256 are recorded beside it
(``lstmlab_native.so.sha256``). A library that does not match its record (truncated, overwritten, or with no
record) is never loaded -- loading a truncated shared object dies with SIGBUS -- but set aside and rebuilt, with
one warning line. The build lock holds the builder's pid and start time, so a lock whose builder died is cleared
at once.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

_CSRC = Path(__file__).with_name("csrc")
# The translation units of the one library (they share csrc/*.h); the cache key covers every file in csrc.
_SOURCES = (_CSRC / "lstm_native.cpp", _CSRC / "lstm_variants.cpp")
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
    sources = [p.read_bytes() for p in sorted(_CSRC.iterdir()) if p.suffix in (".cpp", ".h")]
    for part in (*sources, torch.__version__.encode(), sys.version.encode(), platform.machine().encode(),
                 " ".join(_CFLAGS + _LDFLAGS).encode(), _cpu_flags().encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def library_path() -> Path:
    """The built library for this source, torch and CPU (it may not exist yet)."""
    return cache_dir() / "native" / _key() / "lstmlab_native.so"


def _record_path(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _digest(path: Path) -> tuple[int, str]:
    """(size, SHA-256 hex) of a file, read in chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a folder; the rename is still atomic
    finally:
        os.close(fd)


def verify(library: Path) -> str | None:
    """None when ``library`` exists and matches its recorded size and SHA-256, else why not (``"missing"`` when
    there is no library at all)."""
    if not library.exists():
        return "missing"
    try:
        record = json.loads(_record_path(library).read_text())
        size, sha = int(record["size"]), str(record["sha256"])
    except FileNotFoundError:
        if _elf_complete(library):  # built before records existed: adopt it once its structure is whole
            try:
                _write_record(library)
                return None
            except OSError:
                return "it has no size and checksum record, and none can be written"
        return "it has no size and checksum record and is not a whole ELF file"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its record is unreadable ({type(e).__name__})"
    try:
        actual_size = library.stat().st_size
        if actual_size != size:
            return f"it has {actual_size} bytes, its record says {size}"
        if _digest(library)[1] != sha:
            return "its SHA-256 differs from its record"
    except OSError as e:
        return f"it cannot be read ({e.strerror or e})"
    return None


def _elf_complete(path: Path) -> bool:
    """Whether a file is a 64-bit little-endian ELF file whose section header table, which linkers put last, lies
    inside the file: a truncated library fails this."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
        return False
    shoff = int.from_bytes(head[0x28:0x30], "little")
    shentsize = int.from_bytes(head[0x3A:0x3C], "little")
    shnum = int.from_bytes(head[0x3C:0x3E], "little")
    return 0 < shoff and shoff + shentsize * shnum <= size


def _write_record(library: Path) -> None:
    """Record a library's size and SHA-256 beside it (temp file, fsync, rename)."""
    size, sha = _digest(library)
    tmp = library.with_name(f".{library.name}.sha256.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump({"size": size, "sha256": sha}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, _record_path(library))
    finally:
        tmp.unlink(missing_ok=True)


def _discard(library: Path) -> None:
    """Move a damaged library and its record out of the way (a process that mapped it keeps its copy)."""
    for path in (library, _record_path(library)):
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _install(built: Path, final: Path) -> None:
    """Copy a freshly built library beside ``final``, fsync it, rename it into place, then record its size and
    SHA-256 the same way: readers never see half a file, and a library without a matching record is not loaded."""
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        shutil.copyfile(built, tmp)
        shutil.copymode(built, tmp)  # the linker's rwxr-xr-x, as a shared object usually has
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _record_path(final).unlink(missing_ok=True)  # no moment where an old record vouches for the new file
        os.replace(tmp, final)
        _write_record(final)
        _fsync_dir(final.parent)
    finally:
        tmp.unlink(missing_ok=True)


def build(verbose: bool = False) -> Path:
    """Compile the library into the cache in a child process (blocking); returns its path. Raises on failure.

    A child, because compiling also loads the library, and a process can hold only one copy of its ops. A cached
    library that fails ``verify`` is rebuilt.
    """
    final = library_path()
    if verify(final) is not None:
        cmd = _self_command("--compile", *(["-v"] if verbose else []))
        done = subprocess.run(cmd, capture_output=not verbose, text=True, stdin=subprocess.DEVNULL)
        if done.returncode != 0 or verify(final) is not None:
            tail = (done.stderr or "").strip()[-2000:]
            raise RuntimeError(f"building the native step loops ({_CSRC}) failed: {tail}")
    return final


def _compile(verbose: bool = False) -> Path:
    """Compile in this process (it loads the library as a side effect) in a temp folder, then install it."""
    import tempfile

    import torch.utils.cpp_extension as cpp

    final = library_path()
    if verify(final) is None:
        return final
    _discard(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=final.parent, prefix=f"build-{os.getpid()}-"))
    try:
        so = cpp.load(
            name=f"lstmlab_native_{final.parent.name}",
            sources=[str(p) for p in _SOURCES],
            extra_cflags=_CFLAGS,
            extra_ldflags=_LDFLAGS,
            build_directory=str(work),
            is_python_module=False,
            verbose=verbose,
        )
        _install(Path(so), final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def _process_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None where there is no such file."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _process_start(pid: int) -> str | None:
    """A process's start time (clock ticks since boot), to tell it from a later one with its pid."""
    fields = _process_stat(pid)
    return fields[19] if fields is not None and len(fields) > 19 else None


def _write_lock(lock: Path, pid: int) -> None:
    lock.write_text(f"{pid} {_process_start(pid) or '-'}\n")


def _lock_owner_alive(lock: Path) -> bool:
    """Whether the process named in a build lock still runs. A lock without a readable pid is trusted while young
    (its writer may be between creating and filling it) and stale after ``_LOCK_STALE_S``."""
    try:
        text = lock.read_text().split()
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    except OSError:
        return True  # cannot tell: leave it to its owner
    try:
        pid = int(text[0])
    except (IndexError, ValueError):
        return age < _LOCK_STALE_S
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user
    fields = _process_stat(pid)
    if fields is not None and fields[0] in ("Z", "X"):
        return False  # killed, and not yet reaped by its parent
    started = text[1] if len(text) > 1 else "-"
    now = fields[19] if fields is not None and len(fields) > 19 else None
    if started != "-" and now is not None and now != started:
        return False  # the pid was reused by another process
    return now is not None or age < _LOCK_STALE_S  # without /proc, only the lock's age tells


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
                why = verify(path)
                if why is not None and why != "missing":
                    # never dlopen it: a truncated shared object kills the process with SIGBUS
                    _discard(path)
                    _warn(f"the cached native LSTM loops {path} are damaged ({why}); rebuilding them"
                          + ("" if mode in ("1", "on", "true", "yes") else
                             " in the background, using the Python loops meanwhile"))
                    why = "missing"
                if why is not None and mode in ("1", "on", "true", "yes"):
                    build()
                    why = verify(path)
                if why is None:
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
        for _ in range(2):  # a second try only after clearing a dead builder's lock
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                break
            except FileExistsError:
                if _lock_owner_alive(lock):
                    return  # another process is building it
                lock.unlink(missing_ok=True)  # its builder died: build now, not after a timeout
        else:
            return
        os.close(fd)
        _write_lock(lock, os.getpid())
        log = open(path.parent / "build.log", "w")  # noqa: SIM115 - handed to the child process
        env = dict(os.environ, MAX_JOBS="1")
        try:
            self.process = subprocess.Popen(
                _self_command("--background", str(lock)),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
            )
        except BaseException:
            lock.unlink(missing_ok=True)
            raise
        finally:
            log.close()
        _write_lock(lock, self.process.pid)  # the builder outlives this process when it is a short command


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
    """One line on stderr (a Python warning would add a second line of source)."""
    print(f"lstmlab: warning: {message}", file=sys.stderr, flush=True)


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
        _write_lock(Path(lock), os.getpid())  # in case the process that started it died before recording us
        _compile(verbose=True)
    except Exception as e:  # noqa: BLE001 - record why, so that no process retries for a day
        failed = library_path().parent / "FAILED.log"
        try:
            failed.write_text(f"{type(e).__name__}: {e}\n")
        except OSError:
            pass  # a full or read-only cache: the lock goes anyway, so the next command may retry
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
