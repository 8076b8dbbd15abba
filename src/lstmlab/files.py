"""Files: written so that a crash or a full disk never leaves half a file where a good one was; output paths
checked before the work that fills them; and every OS error met on the way worded as one line naming the path,
what happened and what to do, from one errno table.

A figure or a table written after minutes of work must not end in a traceback because its folder is read-only,
full, or a file: ``check_writable`` finds that first, ``os_error`` words it when it happens anyway.
"""

from __future__ import annotations

import errno
import os
import tempfile
import threading
from pathlib import Path

from lstmlab.errors import LstmlabError

_UMASK_LOCK = threading.Lock()

# errno -> what it means for the user, and what to do about it
_ADVICE: dict[int, tuple[str, str]] = {
    errno.EACCES: ("permission denied", "fix its permissions or choose another path"),
    errno.EPERM: ("operation not permitted", "fix its permissions or choose another path"),
    errno.EROFS: ("the file system is read-only", "choose a path on a writable disk"),
    errno.ENOSPC: ("the disk is full", "free some space or choose another disk"),
    errno.EDQUOT: ("the disk quota is exhausted", "free some space or choose another disk"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "choose another path"),
    errno.EISDIR: ("it is a folder", "give a file name"),
    errno.ENOENT: ("it does not exist", "check the path"),
    errno.ENAMETOOLONG: ("the name is too long", "choose a shorter path"),
    errno.EIO: ("the disk reported an I/O error", "check the disk or choose another path"),
}


def advice(e: OSError) -> str:
    """What ``e`` means and what to do about it, as "<meaning>; <what to do>"."""
    meaning, fix = _ADVICE.get(e.errno or 0, (str(e.strerror or e), "check the path, its permissions and the free "
                                              "space"))
    return f"{meaning}; {fix}"


def os_error(e: OSError, path: str | os.PathLike[str], doing: str) -> LstmlabError:
    """A one-line LstmlabError for ``e``, raised while ``doing`` (e.g. "write") ``path``: what happened, what to do."""
    return LstmlabError(f"cannot {doing} {path}: {advice(e)}")


class FileWriteError(LstmlabError, OSError):
    """A file could not be written (disk full, read-only, no permission...): one line naming the path and what
    to do. Also an ``OSError``, so callers that catch those still do."""


def write_error(path: str | Path, error: OSError) -> FileWriteError:
    """The one-line error for an OSError met while writing ``path``."""
    return FileWriteError(f"cannot write {path}: {advice(error)}")


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


def check_writable(path: str | os.PathLike[str], flag: str = "--out") -> Path:
    """Check that a file can be written at ``path`` before the work that produces it: not a folder, and its folder
    writable or creatable. Returns ``path`` as a Path; else a one-line error."""
    path = Path(path)
    if path.is_dir():
        raise LstmlabError(f"{flag} {path} is a folder; give a file name such as {path / 'figure.png'}")
    check_writable_dir(path.parent, flag, of=path)
    return path


def check_writable_dir(directory: str | os.PathLike[str], flag: str = "--out-dir", of: Path | None = None) -> Path:
    """Check that files can be created in ``directory``, or that it can be made (without making it); returns it,
    or raises a one-line error."""
    directory = Path(directory)
    shown = f"{flag} {of if of is not None else directory}"
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise LstmlabError(f"{shown}: {existing} is a file, not a folder; choose another path")
    try:  # a file created and removed where the first missing folder would go: nothing is left behind
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".lstmlab-", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise LstmlabError(f"{shown}: cannot write in {existing}: {advice(e)}") from None
    return directory
