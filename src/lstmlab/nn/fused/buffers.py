"""The big CPU buffers the fused backend keeps from one training step to the next (:class:`_BufferCache`)."""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable

import torch
from torch import Tensor


class _BufferCache:
    """Big CPU buffers kept from one training step to the next, handed out again only when provably free.

    Why: a fresh multi-megabyte CPU tensor comes from the kernel as untouched pages (glibc maps anything over
    32 MB anew on every allocation), and faulting them in cost more than the LSTM math: at B=1024, 50 000 page
    faults and ~120 ms of a ~250 ms training step. Safety: each handed-out tensor is a separate tensor on a cached
    storage; a storage is reused only when no tensor but the cache's own still holds it (its use count), so
    nothing a caller, autograd or a saved-tensor hook keeps can ever be overwritten. Only calls that save for
    backward use it (no_grad and inference calls allocate fresh and keep nothing), and it holds at most
    ``max_bytes``; ``release_buffers()`` empties it.
    """

    def __init__(self, max_bytes: int = 1 << 30, min_bytes: int = 1 << 18) -> None:
        self._bufs: list[Tensor] = []  # most recently used last
        self._max_bytes = max_bytes
        self._min_bytes = min_bytes
        self._lock = threading.Lock()

    @staticmethod
    def _free(buf: Tensor) -> bool:
        storage = buf.untyped_storage()  # this handle counts as one holder, buf as another
        return torch._C._storage_Use_Count(storage._cdata) <= 2

    def empty(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """An uninitialised contiguous tensor of this shape, like's dtype and device."""
        numel = math.prod(shape)
        nbytes = numel * like.element_size()
        if like.device.type != "cpu" or nbytes < self._min_bytes or nbytes > self._max_bytes:
            return like.new_empty(shape)
        with self._lock:
            for k, buf in enumerate(self._bufs):
                if buf.numel() == numel and buf.dtype == like.dtype and self._free(buf):
                    self._bufs.append(self._bufs.pop(k))
                    return like.new_empty(0).set_(buf.untyped_storage(), 0, shape)
            with torch.inference_mode(False):  # a cached buffer must never be an inference tensor
                buf = like.new_empty(numel)
            self._bufs.append(buf)
            total = sum(b.numel() * b.element_size() for b in self._bufs)
            for old in list(self._bufs[:-1]):  # drop the least recently used free ones past the budget
                if total <= self._max_bytes:
                    break
                if self._free(old):
                    # by identity: list.remove compares tensors with ==, elementwise (and raises across sizes)
                    self._bufs = [b for b in self._bufs if b is not old]
                    total -= old.numel() * old.element_size()
            return like.new_empty(0).set_(buf.untyped_storage(), 0, shape)

    def clear(self) -> None:
        with self._lock:
            self._bufs.clear()


@functools.cache
def _cache() -> _BufferCache:
    # One per process, like an allocator's cache (and no more mutable than one): see _BufferCache.
    return _BufferCache()


def release_buffers() -> None:
    """Free the big buffers the fused backend keeps between training steps (e.g. after training)."""
    _cache().clear()


def _allocator(like: Tensor, save: bool, packed: bool) -> Callable[..., Tensor]:
    """``new(*shape)`` for a layer's buffers: from the cache when the call saves for backward, zero-filled when the
    batch is packed (a packed step leaves rows untouched: they must read as zeros)."""

    def new(*shape: int) -> Tensor:
        buf = _cache().empty(shape, like) if save else like.new_empty(shape)
        return buf.zero_() if packed else buf

    return new
