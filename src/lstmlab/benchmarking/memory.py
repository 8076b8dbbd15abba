"""Peak memory of one step (CUDA's caching allocator, or Linux's peak resident set) and glibc's heap settings
(``--allocator warm``), so that the memory column and the timings mean the same on every backend."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lstmlab.errors import LstmlabError


def memory_label(device: Any) -> str:
    """What the peak-memory column measures on ``device``."""
    return "cuda max_memory_allocated" if device.type == "cuda" else "CPU peak RSS growth (VmHWM)"


def peak_memory(step: Callable[[], None], device: Any) -> float | None:
    """MiB that one step needs at its peak above what was in use before it; None where it cannot be measured.

    CUDA: the caching allocator's peak. CPU: Linux's peak resident set (VmHWM) after resetting it, minus the
    resident set before the step; the fused backend's scratch pool is emptied first so that it is counted.
    """
    import gc

    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    try:
        from lstmlab.nn.fused import release_buffers

        release_buffers()
    except ImportError:
        pass
    gc.collect()
    _malloc_trim()  # hand freed heap back to the OS, so that this step's allocations show in the resident set
    try:
        rss = _proc_status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        step()
        peak = _proc_status_kib("VmHWM")
    except (OSError, ValueError):
        step()
        return None
    return max(0.0, (peak - rss) / 1024)


def warm_allocator() -> None:
    """Make glibc keep freed blocks of any size in its heap for reuse. By default it returns blocks above a
    dynamic threshold (at most 32 MiB) to the OS, so a backend whose step allocates such temporaries anew (nn.LSTM
    at B=256 and up) page-faults them in again every step: up to a third of its time here."""
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    libc = _glibc()
    ok = libc is not None and libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, (1 << 31) - 1)
    if not ok:
        raise LstmlabError("--allocator warm needs glibc's mallopt (Linux with glibc); use --allocator default")


def _glibc() -> Any:
    """glibc through ctypes, or None where the C library is another one."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - both are glibc's own
    except (OSError, AttributeError):
        return None
    return libc


def _malloc_trim() -> None:
    libc = _glibc()
    if libc is not None:  # not glibc: the figure may then undercount reused memory
        libc.malloc_trim(0)


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise ValueError(f"{field} not in /proc/self/status")


