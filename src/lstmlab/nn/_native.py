"""The compiled step loops of the ``fused`` backend: built once per machine, cached on disk, never waited for.

``get()`` returns the ``torch.ops.lstmlab_native`` namespace when the library is built, else ``None`` and,
the first time, starts building it in a low-priority background process (~20-60 s of one core). Until it
is ready the fused backend runs its Python loops, which give the same numbers up to float rounding.

Controlled by the environment variable ``LSTMLAB_NATIVE``: ``auto`` (default, as above), ``0`` (never
build or load it), ``1`` (build in the foreground on first use if needed, and use it). The cache lives in
``$LSTMLAB_CACHE_DIR`` or ``$XDG_CACHE_HOME/lstmlab`` or ``~/.cache/lstmlab``. ``python -m lstmlab.nn._native``
builds it now and prints where. This file imports nothing from lstmlab but ``_hooks`` (standard library only, and
optional) so that it can run as a script.

The cache is written so that a crash, a full disk or a damaged file can never take a command down: the library
is built in a temp folder, fsynced and renamed into place, and its size and SHA-256 are recorded beside it
(``lstmlab_native.so.sha256``). A library that does not match its record (truncated, overwritten, or with no
record) is never loaded -- loading a truncated shared object dies with SIGBUS -- but set aside and rebuilt, with
one warning line. The build lock holds the builder's pid and start time, so a lock whose builder died is cleared
at once.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:  # standard library only: the hooks the package hands this loader (its self-test)
    from lstmlab.nn import _hooks
except ImportError:  # run as a bare script outside the package
    _hooks = None

_CSRC = Path(__file__).with_name("csrc")
# The translation units of the one library (they share csrc/*.h); the cache key covers every file in csrc.
_SOURCES = (_CSRC / "lstm_native.cpp", _CSRC / "lstm_variants.cpp", _CSRC / "lstm_infer.cpp")
# Each flag is kept only where the compiler takes it (_build_flags): -march=native (x86) or -mcpu=native (Arm), since
# the library is built on the machine that runs it (the CPU's flags are in the cache key); -fno-trapping-math lets
# the compiler vectorise the branch-free exp/sigmoid/tanh; -fopenmp turns on at::parallel_for, which then runs on
# torch's own OpenMP threads (Apple clang refuses it: the loops then run serially, with the same results).
_CFLAGS = ["-O3"]
_OPTIONAL_CFLAGS = [("-march=native", "-mcpu=native"), ("-fno-trapping-math",), ("-fopenmp",)]
_ARCH_OK = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
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


def _arch() -> str | None:
    """``LSTMLAB_NATIVE_ARCH``: build for this CPU level (``-march=<it>``, e.g. ``x86-64-v3``: AVX2 and FMA) rather
    than this machine's own (``-march=native``): one library for the older CPUs of a fleet, or the AVX2 code paths
    on an AVX-512 machine."""
    arch = os.environ.get("LSTMLAB_NATIVE_ARCH", "").strip()
    if not arch:
        return None
    if not _ARCH_OK.fullmatch(arch):
        raise RuntimeError(f"LSTMLAB_NATIVE_ARCH={arch!r} is not a CPU name for -march= (e.g. x86-64-v3, haswell)")
    return arch


def _optional_cflags() -> list[tuple[str, ...]]:
    """_OPTIONAL_CFLAGS, the CPU level :func:`_arch` names in place of the machine's own."""
    arch = _arch()
    return list(_OPTIONAL_CFLAGS) if arch is None else [(f"-march={arch}",), *_OPTIONAL_CFLAGS[1:]]


@functools.cache
def _key() -> str:
    """What the binary depends on: the source, torch, Python, the flags and this CPU."""
    import torch

    h = hashlib.sha256()
    sources = [p.read_bytes() for p in sorted(_CSRC.iterdir()) if p.suffix in (".cpp", ".h")]
    flags = repr((_CFLAGS, _optional_cflags(), _compiler())).encode()
    for part in (*sources, torch.__version__.encode(), sys.version.encode(), platform.machine().encode(),
                 flags, _cpu_flags().encode()):
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
            raise RuntimeError(failure_reason((done.stdout or "") + "\n" + (done.stderr or "")))
    return final


def _compiler() -> str:
    """The C++ compiler torch's extension builder runs: $CXX, else c++ (cl on Windows)."""
    return os.environ.get("CXX") or ("cl" if sys.platform == "win32" else "c++")


@functools.cache
def compiler_problem() -> str | None:
    """Why no library can be built here (one line), or None when the compiler runs. Cheap: ``CXX --version``."""
    cxx = _compiler()
    if sys.platform == "win32":
        return "MSVC cannot build them (they use GCC/Clang vector extensions); no build is tried on Windows"
    try:
        done = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        return f"no C++ compiler: `{cxx}` is not installed (install g++ or clang++, or set CXX)"
    except (OSError, subprocess.SubprocessError) as e:
        return f"the C++ compiler `{cxx}` does not run ({type(e).__name__}: {e})"
    if done.returncode != 0:
        return f"the C++ compiler `{cxx}` does not run (`{cxx} --version` exited {done.returncode})"
    return None


def _accepts(cxx: str, flag: str, folder: Path) -> bool:
    """Whether the compiler compiles and links a small OpenMP-using program with this flag."""
    src = folder / "probe.cpp"
    src.write_text("#ifdef _OPENMP\n#include <omp.h>\n#endif\nint main() {\n#ifdef _OPENMP\n"
                   "  return omp_get_max_threads() > 0 ? 0 : 1;\n#else\n  return 0;\n#endif\n}\n")
    try:
        done = subprocess.run([cxx, flag, str(src), "-o", str(folder / "probe")], capture_output=True,
                              timeout=120, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def _build_flags(folder: Path) -> list[str]:
    """_CFLAGS plus, of each group of optional flags, the first flag this compiler takes; a CPU level asked for
    with LSTMLAB_NATIVE_ARCH that it does not take is an error, not a build for some other CPU."""
    flags, arch = list(_CFLAGS), _arch()
    for group in _optional_cflags():
        taken = next((flag for flag in group if _accepts(_compiler(), flag, folder)), None)
        if taken is not None:
            flags.append(taken)
        elif arch is not None and group == (f"-march={arch}",):
            raise RuntimeError(f"LSTMLAB_NATIVE_ARCH={arch}: {_compiler()} does not take -march={arch}")
    return flags


def _compile(verbose: bool = False) -> Path:
    """Compile in this process (it loads the library as a side effect) in a temp folder, then install it."""
    import torch.utils.cpp_extension as cpp

    final = library_path()
    if verify(final) is None:
        return final
    problem = compiler_problem()
    if problem is not None:
        raise RuntimeError(problem)
    _discard(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=final.parent, prefix=f"build-{os.getpid()}-"))
    try:
        flags = _build_flags(work)
        if verbose:
            print(f"lstmlab: building with {_compiler()} {' '.join(flags)}", flush=True)
        so = cpp.load(
            name=f"lstmlab_native_{final.parent.name}",
            sources=[str(p) for p in _SOURCES],
            extra_cflags=flags,
            extra_ldflags=[f for f in flags if f == "-fopenmp"],
            build_directory=str(work),
            is_python_module=False,
            verbose=verbose,
        )
        _install(Path(so), final)
        (final.parent / "FAILED.log").unlink(missing_ok=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def failure_reason(text: str) -> str:
    """One line of a failed build's output: the compiler's first error, else the exception's message, else the
    last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if ": error:" in line or ": fatal error:" in line:
            return line[:300]
    for line in reversed(lines):
        name, _, message = line.partition(": ")
        if message and name.isidentifier() and name.endswith(("Error", "Exception")):
            return message[:300]
    return (lines[-1] if lines else "no output")[:300]


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
    if sys.platform == "win32":  # os.kill(pid, 0) sends CTRL_C_EVENT there: only the lock's age tells
        return age < _LOCK_STALE_S
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user
    except OSError:
        return age < _LOCK_STALE_S
    fields = _process_stat(pid)
    if fields is not None and fields[0] in ("Z", "X"):
        return False  # killed, and not yet reaped by its parent
    started = text[1] if len(text) > 1 else "-"
    now = fields[19] if fields is not None and len(fields) > 19 else None
    if started != "-" and now is not None and now != started:
        return False  # the pid was reused by another process
    return now is not None or age < _LOCK_STALE_S  # without /proc, only the lock's age tells


_OFF = ("0", "off", "false", "no")
_FOREGROUND = ("1", "on", "true", "yes")
_UNAVAILABLE = "fast loops unavailable ({}); using the Python loops (same results, slower)"


class _Loader:
    """Loads the library once it exists and passes its self-test; starts at most one background build per cache
    entry; says at most one line per process about why the Python loops run instead."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ops: Any = None
        self.disabled = False
        self.reason: str | None = None  # why the Python loops run, once known
        self.spoke = False
        self.next_poll = 0.0
        self.process: subprocess.Popen | None = None

    def say(self, message: str) -> None:
        """One warning line, the first time this process has something to say."""
        if not self.spoke:
            self.spoke = True
            _warn(message)

    def off(self, reason: str, message: str | None = None) -> None:
        """The Python loops for the rest of this process, with one line (``message``, else the reason's)."""
        self.ops, self.disabled, self.reason = None, True, reason
        self.say(message or _UNAVAILABLE.format(reason))

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
            if mode in _OFF:
                self.disabled, self.reason = True, "LSTMLAB_NATIVE=0"
                return None
            try:
                self._find_or_build(library_path(), mode in _FOREGROUND)
            except Exception as e:  # noqa: BLE001 - any failure just means: run the Python loops
                self.off(f"{type(e).__name__}: {_first_line(e)}")
            return self.ops

    def _find_or_build(self, path: Path, foreground: bool) -> None:
        why = verify(path)
        if why is not None and why != "missing":
            # never dlopen it: a truncated shared object kills the process with SIGBUS
            _discard(path)
            self.say(f"the cached native LSTM loops {path} are damaged ({why}); rebuilding them"
                     + ("" if foreground else " in the background, using the Python loops meanwhile"))
            why = "missing"
        if why is not None and foreground:
            build()
            why = verify(path)
        if why is None:
            self._load_checked(path)
            if self.process is not None:
                self.process.poll()  # reap our finished build process
            return
        self._start_background_build(path)

    def _load_checked(self, path: Path) -> None:
        """Load the library, then hold it to the Python loops on tiny cases (self_test) before any use."""
        try:
            ops = _load(path)
        except Exception as e:  # noqa: BLE001
            self.off(f"cannot load {path}: {type(e).__name__}: {_first_line(e)}")
            return
        problem = self_test(ops)
        if problem is not None:
            self.off(f"self-test: {problem}", f"the fast loops failed their self-test ({problem}); using the Python "
                     "loops for this process (same results, slower)")
            return
        self.ops = ops

    def _start_background_build(self, path: Path) -> None:
        failed = path.parent / "FAILED.log"
        if self.process is not None:
            if self.process.poll() is None:
                return  # still building
            if not path.exists():  # it ended without a library: do not start another
                self.off(f"the build failed: {_failed_reason(failed)}")
            return
        if failed.exists() and time.time() - failed.stat().st_mtime < _FAILED_RETRY_S:
            self.off(_failed_reason(failed))
            return
        problem = compiler_problem()
        if problem is not None:
            _record_failure(failed, problem)
            self.off(problem)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
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


def _first_line(e: BaseException) -> str:
    """An exception's message up to its first newline (ATen's carry a C++ stack trace after it)."""
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _failed_reason(failed: Path) -> str:
    try:
        return failed.read_text().strip().splitlines()[0][:300]
    except (OSError, IndexError):
        return "an earlier build failed"


def _record_failure(failed: Path, reason: str) -> None:
    """Write why the build failed, so that no process retries for a day (a full or read-only cache: then not)."""
    try:
        failed.parent.mkdir(parents=True, exist_ok=True)
        failed.write_text(reason.strip().splitlines()[0] + "\n")
    except (OSError, IndexError):
        pass


@functools.cache
def _loader() -> _Loader:
    # One per process: the loaded library and the build in flight are process-wide by nature.
    return _Loader()


_AUTO = object()
# Which loops this context forces (an ops namespace, or None for the Python loops): the self-test, the recomputation
# after a failure and the tests pick the loops per call without touching the process-wide loader.
_FORCED: contextvars.ContextVar[Any] = contextvars.ContextVar("lstmlab_native_forced", default=_AUTO)


@contextlib.contextmanager
def forced(ops: Any) -> Iterator[None]:
    """Within this block (this thread), ``get()`` returns ``ops``: the compiled loops, or None for the Python ones."""
    token = _FORCED.set(ops)
    try:
        yield
    finally:
        _FORCED.reset(token)


def get() -> Any:
    """``torch.ops.lstmlab_native`` if the library is ready and passed its self-test, else None (and a build is
    started)."""
    ops = _FORCED.get()
    return _loader().get() if ops is _AUTO else ops


def fail(where: str, error: BaseException) -> None:
    """A compiled op raised: one warning line, and the Python loops for the rest of this process."""
    _loader().off(f"{where} raised {type(error).__name__}", (
        f"the fast loops failed in {where} ({type(error).__name__}: {_first_line(error)}); the Python loops take "
        "over for the rest of this process (same results, slower); please report this line and the output of "
        "`python -m lstmlab.nn._native`"))


def why_unavailable() -> str | None:
    """Why this process runs the Python loops, once the loader knows (None while the library is in use or
    still building)."""
    return _loader().reason


def self_test(ops: Any) -> str | None:
    """Hold freshly loaded loops to the Python ones on tiny cases (the check ``lstmlab.nn`` registers in
    ``_hooks``); None when they agree, else why not."""
    if _hooks is None or not _hooks.SELF_TEST:  # a bare script outside the package: nothing to compare with
        return None
    return _hooks.SELF_TEST[0](ops)


def build_pending() -> bool:
    """Whether this process will run the Python loops only until a build (started or running) lands: what the
    "compiling in the background" note is for. False when the library is ready, off, or cannot be built."""
    if os.environ.get("LSTMLAB_NATIVE", "auto").strip().lower() in _OFF:
        return False
    path = library_path()
    if verify(path) is None:
        return False
    failed = path.parent / "FAILED.log"
    try:
        if time.time() - failed.stat().st_mtime < _FAILED_RETRY_S:
            return False
    except OSError:
        pass
    return compiler_problem() is None


def _background(lock: str) -> int:
    """Entry of the background build process: lowest priority, one compiler job, lock removed at the end."""
    try:
        os.nice(19)  # not on Windows (no os.nice), and refused in some containers: then at normal priority
    except (AttributeError, OSError):
        pass
    try:
        _write_lock(Path(lock), os.getpid())  # in case the process that started it died before recording us
        _compile()
    except Exception as e:  # noqa: BLE001 - record why, so that no process retries for a day
        print(f"{type(e).__name__}: {e}", flush=True)  # the whole compiler output, into build.log
        _record_failure(library_path().parent / "FAILED.log", failure_reason(str(e)))
        return 1
    finally:
        Path(lock).unlink(missing_ok=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m lstmlab.nn._native``: build (or find) the library, check it and print its path; exit 2 with one
    line when it cannot be built or fails its self-test."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--background"]:
        return _background(argv[1])
    if argv[:1] == ["--compile"]:
        try:
            _compile(verbose="-v" in argv)
        except Exception as e:  # noqa: BLE001 - the parent reads the reason from our output
            print(f"{type(e).__name__}: {failure_reason(str(e))}", file=sys.stderr)
            return 1
        return 0
    try:
        _arch()  # a malformed LSTMLAB_NATIVE_ARCH names no cache folder to record the failure in
    except RuntimeError as e:
        print(f"lstmlab: {_UNAVAILABLE.format(_first_line(e))}", file=sys.stderr)
        return 2
    try:
        path = build(verbose="-v" in argv)
        problem = self_test(_load(path))
    except Exception as e:  # noqa: BLE001 - one line, not a traceback
        _record_failure(library_path().parent / "FAILED.log", _first_line(e))
        print(f"lstmlab: {_UNAVAILABLE.format(_first_line(e))}", file=sys.stderr)
        return 2
    if problem is not None:
        print(f"lstmlab: the fast loops at {path} failed their self-test ({problem})", file=sys.stderr)
        return 2
    import torch

    gemm, why = torch.ops.lstmlab_native.gemm(), torch.ops.lstmlab_native.gemm_reason()
    print(path)
    print(f"float32 matmuls: {gemm}" + (f" ({why})" if why else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
