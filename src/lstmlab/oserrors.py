"""Operating-system errors as one line naming the path and what to do, and output paths checked before any work.

A figure or a table written after minutes of work must not end in a traceback because its folder is read-only,
full, or a file: ``check_writable`` finds that first, ``os_error`` words it when it happens anyway.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from lstmlab.errors import LstmlabError

# errno -> what it means for the user and what to do about it
_ADVICE: dict[int, str] = {
    errno.EACCES: "permission denied; fix its permissions or choose another path",
    errno.EPERM: "operation not permitted; fix its permissions or choose another path",
    errno.EROFS: "the file system is read-only; choose a path on a writable disk",
    errno.ENOSPC: "the disk is full; free some space or choose another disk",
    errno.EDQUOT: "the disk quota is exhausted; free some space or choose another disk",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
    errno.EISDIR: "it is a folder; give a file name",
    errno.ENOENT: "it does not exist; check the path",
    errno.ENAMETOOLONG: "the name is too long; choose a shorter path",
    errno.EIO: "the disk reported an I/O error; check the disk or choose another path",
}


def os_error(e: OSError, path: str | os.PathLike[str], doing: str) -> LstmlabError:
    """A one-line LstmlabError for ``e``, raised while ``doing`` (e.g. "write") ``path``: what happened, what to do."""
    advice = _ADVICE.get(e.errno or 0) or f"{e.strerror or e}; check the path or choose another"
    return LstmlabError(f"cannot {doing} {path}: {advice}")


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
        raise LstmlabError(f"{shown}: cannot write in {existing}: "
                           f"{_ADVICE.get(e.errno or 0) or e.strerror or e}") from None
    return directory
