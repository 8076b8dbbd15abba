"""Writing files so that a crash or a full disk never leaves half a file where a good one was."""

from __future__ import annotations

import errno
import os
import tempfile
import threading
from pathlib import Path

from lstmlab.errors import LstmlabError

_UMASK_LOCK = threading.Lock()


class FileWriteError(LstmlabError, OSError):
    """A file could not be written (disk full, read-only, no permission...): one line naming the path and what
    to do. Also an ``OSError``, so callers that catch those still do."""


_ADVICE = {
    errno.ENOSPC: "the disk is full; free some space or write elsewhere",
    errno.EDQUOT: "the disk quota is used up; free some space or write elsewhere",
    errno.EROFS: "the file system is read-only; write elsewhere",
    errno.EACCES: "no permission; write to a folder you own",
    errno.EPERM: "no permission; write to a folder you own",
    errno.ENOTDIR: "a parent of it is a file, not a folder; pick another path",
    errno.EISDIR: "it is a folder; give a file name",
}


def advice(error: OSError) -> str:
    """What to do about an OSError met while writing, in a few words."""
    return _ADVICE.get(error.errno or 0, "check the path, its permissions and the free space")


def write_error(path: str | Path, error: OSError) -> FileWriteError:
    """The one-line error for an OSError met while writing ``path``."""
    return FileWriteError(f"cannot write {path}: {error.strerror or error}; {advice(error)}")


def current_umask() -> int:
    """The process's umask (only readable by setting it, hence the lock against other threads doing the same)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file beside ``path``, then rename it over ``path`` (atomic on POSIX).

    The file gets the mode a plain ``open`` would give (0644 under umask 022; ``mkstemp`` alone makes 0600) and
    is flushed to disk before the rename, so ``path`` holds either the old or the whole new content. Any OS error
    (disk full, read-only, no permission) removes the temp file and raises ``FileWriteError``.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):  # not on Windows, where mkstemp's file is already writable by its user
                os.fchmod(f.fileno(), 0o666 & ~current_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the content is on disk before the name points at it
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise write_error(path, e) from e
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """UTF-8 text version of ``atomic_write_bytes``."""
    atomic_write_bytes(path, text.encode("utf-8"))
