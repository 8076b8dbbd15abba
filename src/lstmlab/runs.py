"""Run folders: the lock a run holds while it writes, which files make a run, the run's id, and the training
state (optimizer, RNGs, data order, metrics) that lets ``lstmlab train --resume`` continue a killed run to the
same weights, bit for bit."""

from __future__ import annotations

import errno
import json
import os
import random
import secrets
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lstmlab.errors import LstmlabError
from lstmlab.files import atomic_write_bytes, atomic_write_text, write_error

RUN_JSON = "run.json"  # written first: the run's id and config, so that even a run killed at once can resume
STATE_FILE = "state.safetensors"  # weights + everything else --resume needs, one atomic file
# Everything a run writes, and what `lstmlab plot` draws from it: --overwrite clears exactly these.
RUN_FILES = (RUN_JSON, STATE_FILE, "metrics.csv", "losses.csv", "summary.json", "best.safetensors",
             "last.safetensors", "curves.png", "confusion.png", "mistakes.png")
TENSORBOARD_DIR = "tensorboard"  # --tensorboard's event files: --overwrite clears this folder too
LOCK_FILE = ".lock"
STATE_FORMAT = "lstmlab-train-state"


def new_run_id() -> str:
    """A run's id: its start time and 6 random hex digits (unique even for runs started in the same second)."""
    return f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def is_scratch(name: str) -> bool:
    """Temp files of interrupted atomic writes (``.NAME.*.tmp``) and the lock: never part of a run."""
    return name == LOCK_FILE or (name.startswith(".") and name.endswith(".tmp"))


def run_contents(folder: Path) -> list[str]:
    """Names in ``folder`` that count as content (everything but scratch files), sorted."""
    return sorted(p.name for p in folder.iterdir() if not is_scratch(p.name))


def remove_scratch(folder: Path) -> None:
    """Delete the temp files a killed writer left behind (only ours: ``.NAME.*.tmp`` of the run's files)."""
    for p in folder.iterdir():
        if is_scratch(p.name) and p.name != LOCK_FILE and any(p.name.startswith(f".{n}.") for n in RUN_FILES):
            p.unlink(missing_ok=True)


def clear_run(folder: Path) -> None:
    """Delete a previous run's files (and only those) so that a new run never mixes with it. run.json and the
    state go first: a clear cut short leaves a folder that is not a resumable run rather than half of one."""
    try:
        for name in (RUN_JSON, STATE_FILE, "summary.json", *RUN_FILES):
            (folder / name).unlink(missing_ok=True)
        board = folder / TENSORBOARD_DIR
        if board.is_dir() and not board.is_symlink():
            shutil.rmtree(board)
        remove_scratch(folder)
    except OSError as e:
        raise LstmlabError(f"cannot clear the previous run in {folder}: {e.strerror or e}; remove it yourself") \
            from None


def _file_locks() -> bool:
    """Whether this platform has kernel file locks: fcntl's flock (POSIX) or msvcrt's byte-range locks (Windows)."""
    for name in ("fcntl", "msvcrt"):
        try:
            __import__(name)
            return True
        except ImportError:
            pass
    return False


def _lock_fd(fd: int) -> bool:
    """Try to lock an open file exclusively, without waiting: True when taken, False when another process holds
    it; other OS errors raise. flock where there is fcntl, else a byte-range lock (Windows): the kernel drops either
    when its process dies, however it dies."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            raise
        return True
    import msvcrt

    try:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EDEADLK):
            return False
        raise
    return True


def _read_holder(fd: int) -> str:
    """The pid the lock file holds (the holder wrote it), for the message a second writer gets."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 32).decode(errors="replace").strip() or "?"
    except OSError:
        return "?"  # Windows: the holder's locked byte cannot be read


def _pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs (POSIX; elsewhere assume it does: a stale marker is removed by hand)."""
    if sys.platform == "win32":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


class RunLock:
    """An exclusive lock on a run folder, held for the whole run (``flock`` on ``FOLDER/.lock``).

    The kernel drops a ``flock`` when its process dies, however it dies, so the lock of a killed run is simply
    taken over; the file holds the owner's pid only for the message a second writer gets. Where neither fcntl nor
    msvcrt exists, the lock is the file's existence (created with O_EXCL), taken over when its pid is not alive.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.fd: int | None = None

    def _busy(self, holder: str) -> LstmlabError:
        return LstmlabError(f"{self.folder} is in use by another `lstmlab train` (pid {holder}); wait for it "
                            "to end, or pick another --out")

    def acquire(self) -> RunLock:
        """Take the lock or raise a one-line LstmlabError naming the process that holds it."""
        if not _file_locks():
            return self._acquire_marker()
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise write_error(self.path, e) from None
            try:
                taken = _lock_fd(fd)
            except OSError as e:
                os.close(fd)
                raise write_error(self.path, e) from None
            if not taken:
                holder = _read_holder(fd)
                os.close(fd)
                raise self._busy(holder) from None
            try:  # the previous owner may have deleted the file between our open and our lock: lock the new one
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self._write_pid(fd)
        self.fd = fd
        return self

    def _write_pid(self, fd: int) -> None:
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as e:
            os.close(fd)
            raise write_error(self.path, e) from None

    def _acquire_marker(self) -> RunLock:
        """The lock as a file created with O_EXCL, for platforms with neither fcntl nor msvcrt."""
        for _ in range(2):  # a second try only after removing a dead holder's marker
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                try:
                    holder = self.path.read_text().strip() or "?"
                    age = time.time() - self.path.stat().st_mtime
                except OSError:
                    holder, age = "?", 0.0
                # a dead holder's marker, or one left empty for a minute (its writer died before writing its pid)
                if (not _pid_alive(int(holder)) if holder.isdigit() else age > 60):
                    self.path.unlink(missing_ok=True)
                    continue
                raise self._busy(holder) from None
            except OSError as e:
                raise write_error(self.path, e) from None
            self._write_pid(fd)
            self.fd = fd
            return self
        raise self._busy("?")

    def release(self) -> None:
        """Delete the lock file and drop the lock (in that order, so nobody locks a file about to vanish)."""
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass  # a lock file that stays behind is harmless: flock, not its existence, is the lock
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# ---------------------------------------------------------------------------------------------
# run.json


def write_run_json(folder: Path, info: dict[str, Any]) -> None:
    """The run's id, config and set-up, written before training starts."""
    atomic_write_text(folder / RUN_JSON, json.dumps(info, indent=2) + "\n")


def read_run_json(folder: Path) -> dict[str, Any]:
    """run.json of a run folder, or a one-line error saying why this is not a run that can be resumed."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LstmlabError(f"--resume {folder}: no such run folder; pass the --out folder of a run")
    path = folder / RUN_JSON
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LstmlabError(f"--resume {folder}: no {RUN_JSON}, so it is not a run this lstmlab can resume; start "
                           "a new run") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LstmlabError(f"--resume {folder}: cannot read {path} ({e}); start a new run") from None
    if not isinstance(info, dict) or not isinstance(info.get("run_id"), str) or not isinstance(info.get("config"),
                                                                                              dict):
        raise LstmlabError(f"--resume {folder}: {path} is damaged (no run_id or config); start a new run")
    return info


# ---------------------------------------------------------------------------------------------
# RNG and optimizer state, as tensors plus JSON


def rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Every global RNG a training step may draw from: torch's CPU generator, Python's ``random`` and, when it is
    loaded, numpy's legacy global one."""
    tensors = {"rng.torch": torch.get_rng_state()}
    version, internal, gauss = random.getstate()
    info: dict[str, Any] = {"python": [version, list(internal), gauss]}
    if "numpy" in sys.modules:
        name, keys, pos, has_gauss, cached = sys.modules["numpy"].random.get_state(legacy=True)
        info["numpy"] = [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]
    return tensors, info


def set_rng_state(tensors: dict[str, Tensor], info: dict[str, Any]) -> None:
    """Undo ``rng_state``: put every global RNG back where it was."""
    torch.set_rng_state(tensors["rng.torch"])
    version, internal, gauss = info["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in info:
        import numpy as np

        name, keys, pos, has_gauss, cached = info["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The optimizer's state_dict split into tensors (moments, step counts) and JSON (hyper-parameters)."""
    sd = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{pid}.{key}"] = value.detach().cpu().clone().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def set_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], info: dict[str, Any]) -> None:
    """Undo ``optimizer_state``."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for pid, entry in info["scalars"].items():
        state.setdefault(int(pid), {}).update(entry)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in info["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ---------------------------------------------------------------------------------------------
# the state file


def save_state(folder: Path, tensors: dict[str, Tensor], info: dict[str, Any]) -> None:
    """Write the training state (tensors + JSON ``info``) as one safetensors file, atomically."""
    from safetensors.torch import save

    metadata = {"format": STATE_FORMAT, "state": json.dumps(info)}
    atomic_write_bytes(folder / STATE_FILE, save(tensors, metadata=metadata))


def load_state(folder: Path) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """The training state of a run folder, or None when the run stopped before its first checkpoint."""
    from safetensors import SafetensorError, safe_open

    path = Path(folder) / STATE_FILE
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != STATE_FORMAT:
                raise ValueError("not an lstmlab training state")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        info = json.loads(metadata["state"])
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise LstmlabError(f"cannot resume from {path} ({e}); start the run again with --overwrite") from None
    return tensors, info


# ---------------------------------------------------------------------------------------------
# a run as the other commands see it: a folder, or any checkpoint in it


def checkpoint_path(path: str | os.PathLike[str], name: str = "best.safetensors") -> Path:
    """The checkpoint a command should read: ``path`` itself when it is a file, ``path/name`` when it is a run
    folder (``last.safetensors`` when the run has no ``name``); a one-line error otherwise."""
    p = Path(path)
    if p.is_dir():
        for candidate in (name, "last.safetensors"):
            if (p / candidate).is_file():
                return p / candidate
        raise LstmlabError(f"{p} holds no {name} or last.safetensors; pass a run folder written by `lstmlab train` "
                           "or a .safetensors checkpoint")
    if not p.exists():
        raise LstmlabError(f"{p} does not exist; pass a run folder written by `lstmlab train` or a checkpoint in it")
    return p


def run_folder(path: str | os.PathLike[str]) -> Path | None:
    """The run folder of ``path`` (a run folder, or a checkpoint inside one), or None when it is not in a run."""
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    return folder if (folder / RUN_JSON).is_file() or (folder / "summary.json").is_file() else None


def run_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What run.json and summary.json of ``path``'s run say (summary's keys win), or {} outside a run."""
    folder = run_folder(path)
    info: dict[str, Any] = {}
    if folder is None:
        return info
    for name in (RUN_JSON, "summary.json"):
        try:
            loaded = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(loaded, dict):
            info.update(loaded)
    return info


def run_data_dir(path: str | os.PathLike[str], given: str | os.PathLike[str] | None = None) -> str | None:
    """The data folder a command on ``path``'s run should read: ``given`` (--data-dir) when set, else the folder
    the run trained on when it still exists, else None (the usual search: $LSTMLAB_DATA, the cache...)."""
    if given is not None:
        return str(given)
    remembered = run_info(path).get("data_dir")
    if isinstance(remembered, str) and Path(remembered).is_dir():
        return remembered
    return None


def run_name(path: str | os.PathLike[str]) -> str:
    """A short name for figure titles: the run folder's name (and the checkpoint's, when one was given)."""
    p = Path(path)
    folder = run_folder(p)
    if folder is None:
        return p.name
    name = folder.resolve().name
    return f"{name}/{p.name}" if p.is_file() else name
