"""The harness: :func:`benchmark` checks its arguments, readies the fused backend's compiled loops and the
allocator, then times every (mode, variant, batch size) on every backend; :func:`grid_benchmark` does it for each
shape of a grid. Every row carries the machine's summary (CPU, ISA, GEMM) for the tables' headers."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from lstmlab.benchmarking.memory import warm_allocator
from lstmlab.benchmarking.settings import (
    ALLOCATORS,
    BACKENDS,
    GRID,
    GRID_BACKENDS,
    INFERENCE_MODES,
    MODES,
    PLAIN,
    SERVING,
)
from lstmlab.benchmarking.timing import bench_one
from lstmlab.errors import LstmlabError


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise LstmlabError(message)


def benchmark(
    batch_sizes: Sequence[int] = (64, 256, 1024),
    seq_len: int = 28,
    input_size: int = 28,
    hidden_size: int = 128,
    layers: int = 1,
    backends: Sequence[str] = BACKENDS,
    mode: str = "train",
    repeats: int = 5,
    warmup: int = 2,
    min_samples: int = 2048,
    threads: int | None = None,
    device: str = "cpu",
    seed: int = 0,
    clock: str = "wall",
    variants: Sequence[tuple[str, float | Sequence[float], float]] = (PLAIN,),
    allocator: str = "default",
    bidirectional: bool = False,
    min_seconds: float = 0.0,
) -> list[dict[str, Any]]:
    """Time each backend; one row per (mode, variant, batch size, backend) with samples/s, ratios and peak memory.
    ``variants`` are (cell, zoneout, recurrent_dropout) triples; the torch backend always runs plain nn.LSTM. A
    timed round runs at least ``min_samples`` samples and ``min_seconds`` seconds.

    Raises ``LstmlabError`` on bad arguments (non-positive sizes, unknown backend, missing CUDA, bad variant).
    """
    _check_sizes(batch_sizes, {"--seq-len": seq_len, "--input-size": input_size, "--hidden-size": hidden_size,
                               "--layers": layers, "--repeats": repeats, "--min-samples": min_samples},
                 warmup, threads)
    _check_choices(backends, mode, device, clock, min_seconds, allocator)
    _check_variants(variants)
    dev = _torch_device(device)
    loops = _prepare(backends, dev, allocator, threads)

    backends = list(dict.fromkeys(backends))  # drop repeats, keep order
    modes = ["train", "forward"] if mode == "both" else [mode]
    rows: list[dict[str, Any]] = []
    for m in modes:
        for variant in variants:
            for batch in batch_sizes:
                rows.extend(bench_one(m, batch, seq_len, input_size, hidden_size, layers, backends, repeats,
                                      warmup, min_samples, dev, seed, clock, variant, bidirectional, min_seconds))
    from lstmlab.machine import summary

    for row in rows:
        row["fused_loops"] = loops
        row["allocator"] = allocator
        row["machine"] = summary()
    return rows


def _check_sizes(batch_sizes: Sequence[int], sizes: dict[str, int], warmup: int, threads: int | None) -> None:
    """Batch sizes, shapes and counts: positive (``sizes`` maps each flag's name to its value)."""
    _check(len(batch_sizes) > 0 and all(b > 0 for b in batch_sizes),
           f"--batch-sizes must be positive integers, got {list(batch_sizes)}")
    for name, value in sizes.items():
        _check(value > 0, f"{name} must be a positive integer, got {value}")
    _check(warmup >= 0, f"--warmup must be >= 0, got {warmup}")
    _check(threads is None or threads > 0, f"--threads must be a positive integer, got {threads}")


def _check_choices(backends: Sequence[str], mode: str, device: str, clock: str, min_seconds: float,
                   allocator: str) -> None:
    """Backends, mode, clock and allocator: known, and compatible with each other and the device."""
    unknown = [b for b in backends if b not in BACKENDS + SERVING]
    _check(not unknown and len(backends) > 0,
           f"unknown backend(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(BACKENDS + SERVING)}")
    _check(mode in (*MODES, "both"), f"--mode must be train, forward, infer or both, got {mode!r}")
    serving = [b for b in backends if b in SERVING]
    _check(not serving or mode in INFERENCE_MODES,
           f"{', '.join(serving)} time inference only: use --mode infer or forward")
    _check(not serving or device == "cpu", f"{', '.join(serving)}: CPU only here; use --device cpu")
    _check(min_seconds >= 0, f"--min-seconds must be >= 0, got {min_seconds}")
    _check(clock in ("wall", "cpu"), f"--clock must be wall or cpu, got {clock!r}")
    _check(clock == "wall" or device == "cpu", "--clock cpu measures CPU work; use it with --device cpu")
    _check(allocator in ALLOCATORS, f"--allocator must be one of {', '.join(ALLOCATORS)}, got {allocator!r}")


def _check_variants(variants: Sequence[tuple[str, float | Sequence[float], float]]) -> None:
    """At least one variant, each one the cell accepts."""
    from lstmlab.nn.cell import check_variant

    _check(len(variants) > 0, "no variant to time")
    for cell, zoneout, recurrent_dropout in variants:
        try:
            check_variant(cell, tuple(zoneout) if isinstance(zoneout, list) else zoneout, recurrent_dropout)
        except ValueError as e:  # worded for the module's keywords; the flags carry the same names
            raise LstmlabError(f"--cell/--zoneout/--recurrent-dropout: {e}") from None


def _torch_device(device: str) -> Any:
    """``device`` as a torch.device that is there to run on."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise LstmlabError(f"--device {device!r} is not a device torch knows ({e}); use cpu or cuda") from e
    _check(dev.type != "cuda" or torch.cuda.is_available(), "--device cuda: no CUDA GPU is available here; use cpu")
    return dev


def _prepare(backends: Sequence[str], dev: Any, allocator: str, threads: int | None) -> str | None:
    """Ready the fused backend, the allocator and torch's threads before timing; returns which loops the fused rows
    time (None without fused rows)."""
    import torch

    loops = None
    if "fused" in backends:
        from lstmlab.nn.lstm import _layer_backends

        _check("fused" in _layer_backends(), "the fused backend is not available in this installation")
        loops = _prepare_native() if dev.type == "cpu" else "python"
    if allocator == "warm":
        warm_allocator()
    if threads is not None:
        torch.set_num_threads(threads)
    return loops


def _prepare_native() -> str:
    """Make the fused backend's compiled loops ready before timing (a benchmark may wait for the one-off
    build; training never does). Returns which loops the fused rows time: "python", or "native, float32 matmuls on
    onednn" (or "at::mm", see csrc/lstm_gemm.h)."""
    import sys

    from lstmlab.nn import _native

    if os.environ.get("LSTMLAB_NATIVE", "auto").strip().lower() in ("0", "off", "false", "no"):
        return "python"
    if _native.get() is None and not _native.library_path().exists():
        print("lstmlab bench: compiling the fused backend's C++ loops once (about a minute)...", file=sys.stderr)
        try:
            _native.build()
        except Exception as e:  # noqa: BLE001 - no compiler, no headers...: time the Python loops
            print(f"lstmlab bench: compiled loops unavailable ({e}); timing the Python loops", file=sys.stderr)
            return "python"
    deadline = time.monotonic() + 5.0
    while _native.get() is None and time.monotonic() < deadline:  # another process may be just finishing
        time.sleep(0.5)
    ops = _native.get()
    if ops is None:
        why = _native.why_unavailable()
        return "python" + (f" ({why})" if why else "")
    gemm, why = ops.gemm(), ops.gemm_reason()
    return f"native, float32 matmuls on {gemm}" + (f" -- {why.split(': ')[0]}" if why else "")


def grid_benchmark(backends: Sequence[str] = GRID_BACKENDS, repeats: int = 5, warmup: int = 2,
                   min_seconds: float = 0.25, threads: int | None = None, seed: int = 0, clock: str = "wall",
                   allocator: str = "default", grid: Sequence[tuple[str, int, int, int, int, int, bool]] = GRID,
                   ) -> list[dict[str, Any]]:
    """:func:`benchmark` over ``grid`` ((mode, B, T, I, H, layers, bidirectional) each) on the CPU: per shape, every
    backend that runs its mode (the serving ones in inference modes only), timed in turns."""
    rows: list[dict[str, Any]] = []
    for mode, batch, seq_len, input_size, hidden_size, layers, bidirectional in grid:
        names = [b for b in backends if b not in SERVING or mode in INFERENCE_MODES]
        if not names:
            continue
        rows.extend(benchmark(batch_sizes=[batch], seq_len=seq_len, input_size=input_size, hidden_size=hidden_size,
                              layers=layers, backends=names, mode=mode, repeats=repeats, warmup=warmup,
                              min_samples=1, threads=threads, device="cpu", seed=seed, clock=clock,
                              allocator=allocator, bidirectional=bidirectional, min_seconds=min_seconds))
    return rows


