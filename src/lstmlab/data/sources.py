"""Finding the files of a dataset (--data-dir, $LSTMLAB_DATA, its system folder, the cache), downloading what is
missing from its mirrors (each file verified before it is renamed into place), and loading a split as tensors.

Verification runs on every load (about 0.1 s for the 47 MB training images); set the environment variable
``LSTMLAB_VERIFY=0``, or pass ``verify=False``, to read IDX files of your own (the tests do so for their small
synthetic files when the real MNIST is not on the machine).
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from lstmlab.data import registry
from lstmlab.data.idx import FIX_HINT, MAX_IDX_BYTES, _parse_idx, _read_bytes, _size_limit
from lstmlab.data.registry import FILE_NAMES, KNOWN_SIZES, SPLITS, DatasetInfo, dataset_info
from lstmlab.errors import LstmlabError

DOWNLOAD_TIMEOUT_S = 30.0


def _verify_default(verify: bool | None) -> bool:
    """``verify`` when given, else true unless the environment sets LSTMLAB_VERIFY=0."""
    if verify is not None:
        return verify
    return os.environ.get("LSTMLAB_VERIFY", "1").strip().lower() not in ("0", "false", "no", "off")


def _find_file(directory: Path, base: str) -> Path | None:
    """The raw or ``.gz`` copy of ``base`` in ``directory`` (raw first: no gunzip), or None."""
    for candidate in (directory / base, directory / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _missing(directory: Path, info: DatasetInfo) -> list[str]:
    return [base for base in info.files if _find_file(directory, base) is None]


def _check_sha256(data: bytes, path: Path, info: DatasetInfo, base: str) -> None:
    digest = hashlib.sha256(data).hexdigest()
    if digest != info.sha256[base]:
        other = next((o.name for o in registry.DATASETS.values() if o.sha256.get(base) == digest), None)
        if other is not None:  # a folder of the other dataset, e.g. LSTMLAB_DATA set for MNIST
            raise LstmlabError(
                f"{path} is {other}'s file, not {info.name}'s; pass --data-dir DIR holding {info.name}'s four "
                f"IDX files (or a folder with {info.name}/ inside)"
            )
        raise LstmlabError(
            f"{path} is corrupt or of another dataset than {info.name} (SHA-256 {digest[:12]}..., expected "
            f"{info.sha256[base][:12]}...); delete it and run again to re-download, or {FIX_HINT}"
        )


def cache_dir(name: str) -> Path:
    """Where downloads of ``name`` go: ``$XDG_CACHE_HOME/lstmlab/<name>`` or ``~/.cache/lstmlab/<name>``."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "lstmlab" / name


def _given_dir(directory: Path, info: DatasetInfo) -> Path:
    """A user-given directory holding the files, or its ``<name>/`` sub-directory when that one does."""
    sub = directory / info.name
    if _missing(directory, info) and sub.is_dir() and not _missing(sub, info):
        return sub
    return directory


class _MirrorError(Exception):
    """A mirror served something that is not the file."""


def _download_one(
    base: str, target_dir: Path, info: DatasetInfo, mirrors: Sequence[str], timeout: float, verify: bool, quiet: bool
) -> str | None:
    """Fetch ``base``.gz from the first mirror that serves it intact; None on success, else why not."""
    import urllib.request

    from lstmlab.files import os_error

    failures = []
    limit = KNOWN_SIZES.get(base, MAX_IDX_BYTES) if verify else MAX_IDX_BYTES
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + base + ".gz"
        # a temp file in the target dir, renamed into place only once verified: never a half file
        try:
            fd, tmp_name = tempfile.mkstemp(dir=target_dir, prefix=f".{base}.", suffix=".part")
        except OSError as e:
            raise os_error(e, target_dir, "download into") from None
        tmp = Path(tmp_name)
        try:
            if not quiet:
                print(f"lstmlab: downloading {url}", file=sys.stderr)
            request = urllib.request.Request(url, headers={"User-Agent": "lstmlab"})
            received = 0
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as response:
                while chunk := response.read(1 << 20):
                    received += len(chunk)
                    if received > limit + (1 << 20):  # gzip never grows real data by this much
                        raise _MirrorError(f"sent more than {limit:,} bytes")
                    try:
                        out.write(chunk)
                    except OSError as e:  # the local disk, not the mirror: no other mirror helps
                        raise os_error(e, target_dir / f"{base}.gz", "download") from None
            try:
                with open(tmp, "rb") as f:
                    if f.read(2) != b"\x1f\x8b":
                        raise _MirrorError("not a gzip file")
                data = _read_bytes(tmp, limit)
            except LstmlabError as e:
                raise _MirrorError("not a valid gzip file of IDX data") from e
            if verify:
                digest = hashlib.sha256(data).hexdigest()
                if digest != info.sha256[base]:
                    raise _MirrorError(f"checksum mismatch (SHA-256 {digest[:12]}...)")
            else:
                try:
                    _parse_idx(data, tmp)
                except LstmlabError as e:
                    raise _MirrorError("not a valid IDX file") from e
            os.replace(tmp, target_dir / f"{base}.gz")
            return None
        except (OSError, _MirrorError) as e:  # URLError, HTTPError and timeouts are OSErrors
            failures.append(f"{url}: {e}")
        finally:
            tmp.unlink(missing_ok=True)
    return "; ".join(failures) or "no mirrors"


def _offline_hint(info: DatasetInfo) -> str:
    """What to do when a dataset cannot be downloaded: name its folder, or for Fashion-MNIST install Debian's
    package."""
    if info.system_package:
        return f"install it with `apt-get install {info.system_package}` (into {info.system_dir}), or {FIX_HINT}"
    return FIX_HINT


def _other_dataset(directory: Path, info: DatasetInfo) -> str | None:
    """The name of the other dataset whose files ``directory`` holds (told by the SHA-256 of its small test-labels
    file), else None."""
    base = "t10k-labels-idx1-ubyte"
    path = _find_file(directory, base)
    if path is None:
        return None
    try:
        digest = hashlib.sha256(_read_bytes(path, KNOWN_SIZES.get(base, MAX_IDX_BYTES))).hexdigest()
    except (LstmlabError, OSError):  # unreadable or corrupt: loading it will say so
        return None
    others = (o for o in registry.DATASETS.values() if o.name != info.name and o.sha256.get(base) == digest)
    return next((o.name for o in others), None)


def _env_note(info: DatasetInfo) -> str:
    """For error messages: that $LSTMLAB_DATA was set but skipped, as it holds no copy of the dataset."""
    value = os.environ.get("LSTMLAB_DATA")
    return f" (LSTMLAB_DATA={value} holds no {info.name}, so it was skipped)" if value else ""


def _from_environment(info: DatasetInfo) -> Path | None:
    """The first folder of ``$LSTMLAB_DATA`` (one folder, or several joined by ``os.pathsep``) that holds the
    dataset, itself or in a ``<name>/`` sub-folder. A folder without its files, or holding another dataset's, is
    skipped, so that LSTMLAB_DATA pointing at MNIST does not stop Fashion-MNIST from being found elsewhere."""
    for entry in (os.environ.get("LSTMLAB_DATA") or "").split(os.pathsep):
        if not entry.strip():
            continue
        directory = Path(entry.strip()).expanduser()
        try:
            if not directory.is_dir():
                continue
            os.listdir(directory)
        except OSError:
            continue
        directory = _given_dir(directory, info)
        if not _missing(directory, info) and _other_dataset(directory, info) is None:
            return directory
    return None


def resolve_data_dir(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    *,
    mirrors: Sequence[str] | None = None,
    timeout: float = DOWNLOAD_TIMEOUT_S,
    verify: bool | None = None,
    quiet: bool = False,
) -> Path:
    """The directory holding the four IDX files of dataset ``name``, downloading them if needed.

    Order: ``data_dir``; ``$LSTMLAB_DATA`` (one folder or several joined by ``os.pathsep``; a folder that does
    not hold this dataset is skipped); the dataset's system folder (``DatasetInfo.system_dir``: for fashion-mnist
    Debian's package dataset-fashion-mnist); the cache dir (see ``cache_dir``). A given directory (argument or
    environment) may hold the files itself or in a ``<name>/`` sub-directory; it is never downloaded into.
    ``data_dir`` must hold the dataset: anything else there is a one-line error.
    Into the cache dir, missing files are downloaded from ``mirrors`` (default: the dataset's) in order, each
    verified (SHA-256 of the decompressed bytes, unless ``verify`` is false) before it is renamed into place.
    Files already present are verified when loaded (``load_dataset``), not here.
    """
    info = dataset_info(name)
    if data_dir is not None:
        return _given_data_dir(Path(data_dir).expanduser(), info)
    found = _from_environment(info)
    if found is not None:
        return found
    if info.system_dir is not None and info.system_dir.is_dir() and not _missing(info.system_dir, info):
        return info.system_dir
    directory = cache_dir(info.name)
    missing = _missing(directory, info) if directory.is_dir() else list(info.files)
    if missing:
        _download_missing(directory, info, missing, download, mirrors, timeout, _verify_default(verify), quiet)
    return directory


def _given_data_dir(directory: Path, info: DatasetInfo) -> Path:
    """--data-dir: it, or its ``<name>/`` sub-folder, must hold the dataset; anything else is a one-line error."""
    source = "--data-dir"
    if not directory.is_dir():
        raise LstmlabError(f"{source} {directory} is not a directory; {FIX_HINT}")
    try:
        os.listdir(directory)  # an unreadable folder would otherwise look empty
    except OSError as e:
        raise LstmlabError(f"cannot read {source} {directory}: {e.strerror or e}; fix its permissions or "
                           f"{FIX_HINT}") from None
    directory = _given_dir(directory, info)
    missing = _missing(directory, info)
    if missing:
        raise LstmlabError(
            f"{source} {directory} lacks {', '.join(missing)} (raw or .gz) of {info.name}; "
            f"pass --data-dir DIR holding the four IDX files"
        )
    return directory


def _download_missing(directory: Path, info: DatasetInfo, missing: list[str], download: bool,
                      mirrors: Sequence[str] | None, timeout: float, verify: bool, quiet: bool) -> None:
    """Download the ``missing`` files into the cache folder ``directory``, or say in one line why not."""
    if not download:
        raise LstmlabError(
            f"{info.name} is not in {directory} (missing {', '.join(missing)}){_env_note(info)} and downloading is "
            f"off; allow the download or {_offline_hint(info)}"
        )
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LstmlabError(f"cannot create the cache dir {directory} ({e.strerror or e}); {FIX_HINT}") from e
    urls = tuple(mirrors) if mirrors is not None else info.mirrors
    failed = {}
    for base in missing:
        why = _download_one(base, directory, info, urls, timeout, verify, quiet)
        if why is not None:
            failed[base] = why
    if failed:
        first, why = next(iter(failed.items()))  # the first file's reasons stand for the rest: keep one line short
        raise LstmlabError(
            f"could not download {', '.join(failed)} of {info.name} from any mirror ({first}: {why}){_env_note(info)}; "
            f"{_offline_hint(info)}"
        )


# ---------------------------------------------------------------------------------------------
# loading


def load_dataset(
    name: str,
    split: str,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    *,
    verify: bool | None = None,
    quiet: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 (N, 28, 28) and labels int64 (N,) of ``split`` ("train" or "test") of dataset ``name``.

    Finds (or downloads) the files with ``resolve_data_dir``, checks their SHA-256 unless ``verify`` is
    false (default: true unless ``LSTMLAB_VERIFY=0``), and checks shapes, counts and label range.
    """
    info = dataset_info(name)
    if split not in SPLITS:
        raise LstmlabError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    directory = resolve_data_dir(name, data_dir, download, verify=verify, quiet=quiet)
    check = _verify_default(verify)
    tensors = {}
    for kind in ("images", "labels"):
        base = FILE_NAMES[(split, kind)]
        path = _find_file(directory, base)
        if path is None:  # removed between resolving and reading
            raise LstmlabError(f"{directory} lacks {base} (raw or .gz); {FIX_HINT}")
        data = _read_bytes(path, _size_limit(path, check))
        if check:
            _check_sha256(data, path, info, base)
        tensors[kind] = (_parse_idx(data, path), path)
    (images, images_path), (labels, labels_path) = tensors["images"], tensors["labels"]
    if images.dim() != 3 or tuple(images.shape[1:]) != (28, 28):
        raise LstmlabError(f"{images_path} holds shape {tuple(images.shape)}, not (N, 28, 28) images; {FIX_HINT}")
    if labels.dim() != 1:
        raise LstmlabError(f"{labels_path} holds shape {tuple(labels.shape)}, not (N,) labels; {FIX_HINT}")
    if images.shape[0] != labels.shape[0]:
        raise LstmlabError(
            f"{images_path} has {images.shape[0]} images but {labels_path} has {labels.shape[0]} labels; {FIX_HINT}"
        )
    if labels.numel() and int(labels.max()) >= len(info.classes):
        raise LstmlabError(
            f"{labels_path} has label {int(labels.max())}, outside 0..{len(info.classes) - 1}; {FIX_HINT}"
        )
    return images, labels.long()


