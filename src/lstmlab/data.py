"""The data layer: IDX files of MNIST and Fashion-MNIST (read, verified, downloaded), and the
sequence views an LSTM reads them as (rows, pixels, permuted pixels).

Only torch and the standard library: no torchvision.

Checksums are SHA-256 of each file's *decompressed* bytes, because mirrors gzip the same content
differently (Debian's Fashion-MNIST package, for one, has other ``.gz`` bytes than Zalando's).
Verification runs on every load (about 0.1 s for the 47 MB training images); set the environment
variable ``LSTMLAB_VERIFY=0``, or pass ``verify=False``, to read IDX files of your own (the tests do so
for their small synthetic files when the real MNIST is not on the machine).
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import tempfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch

from lstmlab.errors import LstmlabError

IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension
IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
SPLITS = ("train", "test")
# the four files of an MNIST-format dataset: (split, kind) -> name without ".gz"
FILE_NAMES: Mapping[tuple[str, str], str] = MappingProxyType(
    {
        ("train", "images"): "train-images-idx3-ubyte",
        ("train", "labels"): "train-labels-idx1-ubyte",
        ("test", "images"): "t10k-images-idx3-ubyte",
        ("test", "labels"): "t10k-labels-idx1-ubyte",
    }
)
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian/Ubuntu package dataset-fashion-mnist
DOWNLOAD_TIMEOUT_S = 30.0
_FIX_HINT = "pass --data-dir DIR holding the four IDX files (or set LSTMLAB_DATA)"


@dataclass(frozen=True)
class DatasetInfo:
    """One MNIST-format dataset: its files, their checksums, class names and download mirrors."""

    name: str
    sha256: Mapping[str, str]  # file name (without .gz) -> SHA-256 of the decompressed bytes
    classes: tuple[str, ...]
    mirrors: tuple[str, ...]  # base URLs; a file's URL is base + name + ".gz"

    @property
    def files(self) -> tuple[str, ...]:
        """The four file names, without ``.gz``."""
        return tuple(FILE_NAMES.values())


DATASETS: Mapping[str, DatasetInfo] = MappingProxyType(
    {
        "mnist": DatasetInfo(
            name="mnist",
            sha256=MappingProxyType(
                {
                    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
                    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
                    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
                    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
                }
            ),
            classes=tuple(str(d) for d in range(10)),
            mirrors=(
                "https://ossci-datasets.s3.amazonaws.com/mnist/",
                "https://storage.googleapis.com/cvdf-datasets/mnist/",
            ),
        ),
        "fashion-mnist": DatasetInfo(
            name="fashion-mnist",
            sha256=MappingProxyType(
                {
                    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
                }
            ),
            classes=(
                "T-shirt/top",
                "Trouser",
                "Pullover",
                "Dress",
                "Coat",
                "Sandal",
                "Shirt",
                "Sneaker",
                "Bag",
                "Ankle boot",
            ),
            mirrors=(
                "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
            ),
        ),
    }
)

# (T, I) of each view: time steps and inputs per step
VIEWS: Mapping[str, tuple[int, int]] = MappingProxyType({"rows": (28, 28), "pixels": (784, 1), "permuted": (784, 1)})


def dataset_info(name: str) -> DatasetInfo:
    """The registry entry of ``name``; an unknown name is an LstmlabError listing the valid ones."""
    try:
        return DATASETS[name]
    except KeyError:
        valid = ", ".join(DATASETS)
        raise LstmlabError(f"unknown dataset {name!r}; choose one of: {valid}") from None


# ---------------------------------------------------------------------------------------------
# IDX files


# Decompressed size of each standard file (the same for MNIST and Fashion-MNIST): header + payload.
KNOWN_SIZES: Mapping[str, int] = MappingProxyType(
    {
        "train-images-idx3-ubyte": 16 + 60_000 * 28 * 28,
        "train-labels-idx1-ubyte": 8 + 60_000,
        "t10k-images-idx3-ubyte": 16 + 10_000 * 28 * 28,
        "t10k-labels-idx1-ubyte": 8 + 10_000,
    }
)
# Unverified IDX files of one's own may be larger than MNIST's, but not without bound: 2 GiB is 2.7 M images.
MAX_IDX_BYTES = 2 << 30
_CHUNK = 1 << 20  # compressed bytes read at a time


def _size_limit(path: Path, verify: bool) -> int:
    """The most bytes the decompressed file may hold: its known size when checked against a checksum, else
    ``MAX_IDX_BYTES``."""
    base = path.name.removesuffix(".gz")
    return KNOWN_SIZES[base] if verify and base in KNOWN_SIZES else MAX_IDX_BYTES


def _idx_start_ok(head: bytes | bytearray) -> bool:
    """Whether the first 4 bytes are an IDX magic number this reader takes (unsigned bytes, 1 or 3 dimensions)."""
    return len(head) >= 4 and head[0] == 0 and head[1] == 0 and head[2] == 0x08 and head[3] in (1, 3)


def _idx_total(head: bytes | bytearray) -> int:
    """The whole size (header + payload) announced by a complete IDX header that ``_idx_start_ok`` accepted."""
    dims = [int.from_bytes(head[4 + 4 * k : 8 + 4 * k], "big") for k in range(head[3])]
    return 4 + 4 * head[3] + math.prod(dims)


def _inflate(path: Path, f, limit: int) -> bytes:
    """Gunzip an open file streaming, never producing more than its IDX header announces (nor ``limit``): a gzip
    bomb is refused after a few bytes of output, not after inflating gigabytes."""
    redo = f"delete it and run again to re-download, or {_FIX_HINT}"
    out = bytearray()
    want = 4  # output needed before the IDX header can be read
    cap: int | None = None  # the whole size the header announces
    d = None
    pending = b""
    while True:
        if not pending:
            pending = f.read(_CHUNK)
            if not pending:
                break
        if d is None:  # the start of a gzip member (several may be concatenated, as gzip.decompress accepts)
            if not pending.strip(b"\0"):  # zero padding after the last member
                pending = b""
                continue
            d = zlib.decompressobj(wbits=31)
        room = (cap if cap is not None else want) + 1 - len(out)
        out += d.decompress(pending, room)
        pending = d.unconsumed_tail
        if d.eof:  # what follows the member's end (also left in unconsumed_tail): the next member or padding
            pending, d = d.unused_data, None
        if cap is None and len(out) >= want:
            if not _idx_start_ok(out):
                return bytes(out[:4])  # not an IDX header: _parse_idx says what is wrong with it
            want = 4 + 4 * out[3]
            if len(out) >= want:
                cap = _idx_total(out)
                if cap > limit:
                    raise LstmlabError(
                        f"{path}'s IDX header announces {cap:,} bytes, more than the {limit:,} such a file can "
                        f"hold; {redo}"
                    )
        if cap is not None and len(out) > cap:
            raise LstmlabError(
                f"{path} inflates past the {cap:,} bytes its IDX header announces (trailing data or a gzip bomb); "
                f"{redo}"
            )
    if d is not None:
        raise EOFError("the compressed stream ends before its end-of-stream marker")
    return bytes(out)


def _read_bytes(path: Path, limit: int = MAX_IDX_BYTES) -> bytes:
    """The file's content, gunzipped (streaming, bounded by its IDX header and ``limit``) when it is a gzip file."""
    try:
        with open(path, "rb") as f:
            magic = f.read(2)
            is_gzip = magic == b"\x1f\x8b"
            if path.suffix == ".gz" and not is_gzip:
                raise LstmlabError(
                    f"{path} is not a gzip file; delete it and run again to re-download, or {_FIX_HINT}"
                )
            if not is_gzip:
                size = os.fstat(f.fileno()).st_size
                if size > limit:
                    raise LstmlabError(
                        f"{path} holds {size:,} bytes, more than the {limit:,} such an IDX file can hold; "
                        f"delete it and run again to re-download, or {_FIX_HINT}"
                    )
                return magic + f.read()
            f.seek(0)
            try:
                return _inflate(path, f, limit)
            except (EOFError, zlib.error) as e:
                raise LstmlabError(
                    f"{path} is a corrupt gzip file ({e}); delete it and run again to re-download, or {_FIX_HINT}"
                ) from None
    except OSError as e:
        raise LstmlabError(f"cannot read {path}: {e.strerror or e}; {_FIX_HINT}") from None


def _parse_idx(data: bytes, path: Path) -> torch.Tensor:
    """A uint8 tensor from the bytes of an IDX file, checking the header against the payload size."""
    redo = f"delete it and run again to re-download, or {_FIX_HINT}"
    if len(data) < 4:
        raise LstmlabError(f"{path} is too short to be an IDX file ({len(data)} bytes); {redo}")
    magic = int.from_bytes(data[:4], "big")
    if data[0] != 0 or data[1] != 0:
        raise LstmlabError(f"{path} is not an IDX file (magic number 0x{magic:08x}); {redo}")
    if data[2] != 0x08:
        raise LstmlabError(f"{path} holds IDX type 0x{data[2]:02x}, not unsigned bytes (0x08); {redo}")
    if magic not in (IDX_LABELS_MAGIC, IDX_IMAGES_MAGIC):
        raise LstmlabError(f"{path} is an IDX file of {data[3]} dimensions, not labels (1) or images (3); {redo}")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise LstmlabError(f"{path} is truncated inside its IDX header; {redo}")
    dims = [int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim)]
    expected = 1
    for d in dims:
        expected *= d
    payload = len(data) - header
    if payload < expected:
        raise LstmlabError(f"{path} is truncated: {payload} data bytes for shape {tuple(dims)} ({expected}); {redo}")
    if payload > expected:
        raise LstmlabError(
            f"{path} has {payload - expected} unexpected trailing bytes after shape {tuple(dims)}; {redo}"
        )
    if expected == 0:  # torch.frombuffer refuses an empty buffer
        return torch.empty(dims, dtype=torch.uint8)
    # bytearray: a writable copy, so torch owns memory it may modify
    return torch.frombuffer(bytearray(memoryview(data)[header:]), dtype=torch.uint8).reshape(dims)


def read_idx(path: str | os.PathLike[str]) -> torch.Tensor:
    """Read an IDX file of unsigned bytes (``.gz`` or raw) into a uint8 tensor of its shape.

    Raises LstmlabError, one line naming the file, for a corrupt gzip, a wrong magic number or
    data type, or a payload that is shorter or longer than the header says.
    """
    p = Path(path)
    return _parse_idx(_read_bytes(p), p)


# ---------------------------------------------------------------------------------------------
# finding, verifying and downloading the files


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
        other = next((o.name for o in DATASETS.values() if o.sha256.get(base) == digest), None)
        if other is not None:  # a folder of the other dataset, e.g. LSTMLAB_DATA set for MNIST
            raise LstmlabError(
                f"{path} is {other}'s file, not {info.name}'s; pass --data-dir DIR holding {info.name}'s four "
                f"IDX files (or a folder with {info.name}/ inside)"
            )
        raise LstmlabError(
            f"{path} is corrupt or of another dataset than {info.name} (SHA-256 {digest[:12]}..., expected "
            f"{info.sha256[base][:12]}...); delete it and run again to re-download, or {_FIX_HINT}"
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

    from lstmlab.oserrors import os_error

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
    if info.name == "fashion-mnist":
        return (f"install it with `apt-get install dataset-fashion-mnist` (into {FASHION_SYSTEM_DIR}), or "
                f"{_FIX_HINT}")
    return _FIX_HINT


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
    return next((o.name for o in DATASETS.values() if o.name != info.name and o.sha256.get(base) == digest), None)


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
    not hold this dataset is skipped); for fashion-mnist ``/usr/share/datasets/fashion-mnist`` (Debian package
    dataset-fashion-mnist); the cache dir (see ``cache_dir``). A given directory (argument or environment) may
    hold the files itself or in a ``<name>/`` sub-directory; it is never downloaded into. ``data_dir`` must hold
    the dataset: anything else there is a one-line error.
    Into the cache dir, missing files are downloaded from ``mirrors`` (default: the dataset's) in order, each
    verified (SHA-256 of the decompressed bytes, unless ``verify`` is false) before it is renamed into place.
    Files already present are verified when loaded (``load_dataset``), not here.
    """
    info = dataset_info(name)
    if data_dir is None:
        found = _from_environment(info)
        if found is not None:
            return found
    else:
        source = "--data-dir"
        directory = Path(data_dir).expanduser()
        if not directory.is_dir():
            raise LstmlabError(f"{source} {directory} is not a directory; {_FIX_HINT}")
        try:
            os.listdir(directory)  # an unreadable folder would otherwise look empty
        except OSError as e:
            raise LstmlabError(f"cannot read {source} {directory}: {e.strerror or e}; fix its permissions or "
                               f"{_FIX_HINT}") from None
        directory = _given_dir(directory, info)
        missing = _missing(directory, info)
        if missing:
            raise LstmlabError(
                f"{source} {directory} lacks {', '.join(missing)} (raw or .gz) of {info.name}; "
                f"pass --data-dir DIR holding the four IDX files"
            )
        return directory

    if info.name == "fashion-mnist" and FASHION_SYSTEM_DIR.is_dir() and not _missing(FASHION_SYSTEM_DIR, info):
        return FASHION_SYSTEM_DIR

    directory = cache_dir(info.name)
    missing = _missing(directory, info) if directory.is_dir() else list(info.files)
    if not missing:
        return directory
    if not download:
        raise LstmlabError(
            f"{info.name} is not in {directory} (missing {', '.join(missing)}){_env_note(info)} and downloading is "
            f"off; allow the download or {_offline_hint(info)}"
        )
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LstmlabError(f"cannot create the cache dir {directory} ({e.strerror or e}); {_FIX_HINT}") from e
    urls = tuple(mirrors) if mirrors is not None else info.mirrors
    failed = {}
    for base in missing:
        why = _download_one(base, directory, info, urls, timeout, _verify_default(verify), quiet)
        if why is not None:
            failed[base] = why
    if failed:
        first, why = next(iter(failed.items()))  # the first file's reasons stand for the rest: keep one line short
        raise LstmlabError(
            f"could not download {', '.join(failed)} of {info.name} from any mirror ({first}: {why}){_env_note(info)}; "
            f"{_offline_hint(info)}"
        )
    return directory


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
            raise LstmlabError(f"{directory} lacks {base} (raw or .gz); {_FIX_HINT}")
        data = _read_bytes(path, _size_limit(path, check))
        if check:
            _check_sha256(data, path, info, base)
        tensors[kind] = (_parse_idx(data, path), path)
    (images, images_path), (labels, labels_path) = tensors["images"], tensors["labels"]
    if images.dim() != 3 or tuple(images.shape[1:]) != (28, 28):
        raise LstmlabError(f"{images_path} holds shape {tuple(images.shape)}, not (N, 28, 28) images; {_FIX_HINT}")
    if labels.dim() != 1:
        raise LstmlabError(f"{labels_path} holds shape {tuple(labels.shape)}, not (N,) labels; {_FIX_HINT}")
    if images.shape[0] != labels.shape[0]:
        raise LstmlabError(
            f"{images_path} has {images.shape[0]} images but {labels_path} has {labels.shape[0]} labels; {_FIX_HINT}"
        )
    if labels.numel() and int(labels.max()) >= len(info.classes):
        raise LstmlabError(
            f"{labels_path} has label {int(labels.max())}, outside 0..{len(info.classes) - 1}; {_FIX_HINT}"
        )
    return images, labels.long()


# ---------------------------------------------------------------------------------------------
# sequences, splits, statistics, batches


def make_permutation(seed: int, length: int = 784) -> torch.Tensor:
    """A fixed permutation of ``length`` pixel positions (LongTensor), the same for the same seed."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(length, generator=g)


def to_sequence(
    images: torch.Tensor,
    view: str,
    mean: float,
    std: float,
    permutation: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float32 sequences (B, T, I) from uint8 images (B, 28, 28): ``(images/255 - mean) / std``, then
    rows (T=28, I=28), pixels (T=784, I=1, row-major) or permuted (pixels reordered by ``permutation``)."""
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; choose one of: {', '.join(VIEWS)}")
    if images.dtype != torch.uint8:
        raise TypeError(f"to_sequence wants uint8 images (0..255), got {images.dtype}")
    if images.dim() != 3 or tuple(images.shape[1:]) != (28, 28):
        raise ValueError(f"to_sequence wants images of shape (B, 28, 28), got {tuple(images.shape)}")
    if std <= 0:
        raise ValueError(f"std must be positive, got {std}")
    b = images.shape[0]
    t, i = VIEWS[view]
    x = images.to(torch.float32).div_(255.0).sub_(mean).div_(std)  # (B, 28, 28)
    if view == "permuted":
        if permutation is None:
            raise ValueError("the permuted view needs a permutation (make_permutation(seed))")
        if permutation.shape != (t,):
            raise ValueError(f"permutation must have shape ({t},), got {tuple(permutation.shape)}")
        x = x.reshape(b, t)[:, permutation.to(device=x.device, dtype=torch.long)]  # (B, 784)
    return x.reshape(b, t, i)  # (B, T, I)


def train_val_split(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint, sorted index tensors (train, val) covering ``range(n)``, the same for the same seed."""
    if not 0 <= val_size < n:
        raise LstmlabError(f"the validation size must be at least 0 and below the {n} training images, got {val_size}")
    g = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(n, generator=g)
    return order[val_size:].sort().values, order[:val_size].sort().values


def pixel_stats(images: torch.Tensor) -> tuple[float, float]:
    """Mean and (population) standard deviation of uint8 pixels on the 0..1 scale."""
    if images.dtype != torch.uint8:
        raise TypeError(f"pixel_stats wants uint8 images, got {images.dtype}")
    if images.numel() == 0:
        raise ValueError("pixel_stats needs at least one pixel")
    # a histogram is exact in float64 without a float copy of all the pixels
    counts = torch.bincount(images.reshape(-1).cpu(), minlength=256).to(torch.float64)
    values = torch.arange(256, dtype=torch.float64) / 255.0
    total = counts.sum()
    mean = (counts * values).sum() / total
    var = (counts * (values - mean) ** 2).sum() / total
    return float(mean), float(var.sqrt())


def batch_indices(
    n: int,
    batch_size: int,
    generator: torch.Generator | None = None,
    shuffle: bool = True,
    drop_last: bool = False,
) -> Iterator[torch.Tensor]:
    """Index tensors of the batches of one pass over ``range(n)``, shuffled with ``generator`` when asked;
    index the whole uint8 image tensor with each to make a batch."""
    if batch_size < 1:
        raise LstmlabError(f"the batch size must be at least 1, got {batch_size}")
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start : start + batch_size]
