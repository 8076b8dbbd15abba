"""Reading IDX files (raw or gzipped), bounded and checked: a corrupt, truncated or oversized file is a one-line
error saying what to do, never a traceback or an unbounded read."""

from __future__ import annotations

import math
import os
import zlib
from pathlib import Path

import torch

from lstmlab.data.registry import KNOWN_SIZES
from lstmlab.errors import LstmlabError

IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension
IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
FIX_HINT = "pass --data-dir DIR holding the four IDX files (or set LSTMLAB_DATA)"
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
    redo = f"delete it and run again to re-download, or {FIX_HINT}"
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
                    f"{path} is not a gzip file; delete it and run again to re-download, or {FIX_HINT}"
                )
            if not is_gzip:
                size = os.fstat(f.fileno()).st_size
                if size > limit:
                    raise LstmlabError(
                        f"{path} holds {size:,} bytes, more than the {limit:,} such an IDX file can hold; "
                        f"delete it and run again to re-download, or {FIX_HINT}"
                    )
                return magic + f.read()
            f.seek(0)
            try:
                return _inflate(path, f, limit)
            except (EOFError, zlib.error) as e:
                raise LstmlabError(
                    f"{path} is a corrupt gzip file ({e}); delete it and run again to re-download, or {FIX_HINT}"
                ) from None
    except OSError as e:
        raise LstmlabError(f"cannot read {path}: {e.strerror or e}; {FIX_HINT}") from None


def _parse_idx(data: bytes, path: Path) -> torch.Tensor:
    """A uint8 tensor from the bytes of an IDX file, checking the header against the payload size."""
    redo = f"delete it and run again to re-download, or {FIX_HINT}"
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


