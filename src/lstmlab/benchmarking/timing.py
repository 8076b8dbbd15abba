"""Timing one (mode, variant, batch size) on every backend: warm up, measure memory, then timed rounds in turns
(A B C, B C A, ...) so that a burst of load from other processes hits every backend alike; one row per backend
with the median samples/s and its ratios."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any

from lstmlab.benchmarking.memory import memory_label, peak_memory
from lstmlab.benchmarking.settings import PLAIN, variant_label
from lstmlab.benchmarking.steps import make_step


def bench_one(mode: str, batch: int, seq_len: int, input_size: int, hidden_size: int, layers: int,
              backends: list[str], repeats: int, warmup: int, min_samples: int, device: Any,
              seed: int, clock: str = "wall", variant: tuple[str, Any, float] = PLAIN, bidirectional: bool = False,
              min_seconds: float = 0.0) -> list[dict[str, Any]]:
    """One batch size, mode and variant: every backend, interleaved (torch runs plain nn.LSTM)."""
    import torch

    steps = {name: make_step(mode, name, batch, seq_len, input_size, hidden_size, layers, device, seed,
                             PLAIN if name == "torch" else variant, bidirectional)
             for name in backends}
    outputs = {}
    for name, step in steps.items():
        for _ in range(warmup):
            step()
        outputs[name] = step()  # inference modes: the logits, compared with nn.LSTM's below
    per_round = max(1, math.ceil(min_samples / batch), _steps_for(min_seconds, steps.values(), device))
    memory = {name: peak_memory(step, device) for name, step in steps.items()}
    rates = _interleaved_rates(steps, backends, repeats, per_round, batch, device, clock)
    del steps
    shape = {"seq_len": seq_len, "input_size": input_size, "hidden_size": hidden_size, "layers": layers,
             "bidirectional": bidirectional}
    measured = {"rates": rates, "medians": {name: statistics.median(v) for name, v in rates.items()},
                "memory": memory, "diffs": _diffs_vs_torch(outputs)}
    run = {"threads": torch.get_num_threads(), "clock": clock, "device": str(device)}
    return [_row(name, batch, mode, variant, measured, shape, run, device) for name in backends]


def _interleaved_rates(steps: dict[str, Callable[[], Any]], backends: list[str], repeats: int, per_round: int,
                       batch: int, device: Any, clock: str) -> dict[str, list[float]]:
    """Samples/s of every timed round per backend; each round rotates who goes first."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    rates: dict[str, list[float]] = {name: [] for name in backends}
    for r in range(repeats):
        order = backends[r % len(backends):] + backends[: r % len(backends)]  # rotate who goes first
        for name in order:
            _sync(device)
            start = now()
            for _ in range(per_round):
                steps[name]()
            _sync(device)
            rates[name].append(per_round * batch / (now() - start))
    return rates


def _diffs_vs_torch(outputs: dict[str, Any]) -> dict[str, float | None]:
    """Each backend's largest absolute difference from nn.LSTM's logits (None without them: training modes)."""
    want = outputs.get("torch")
    return {name: None if want is None or out is None else (out.float() - want.float()).abs().max().item()
            for name, out in outputs.items()}


def _row(name: str, batch: int, mode: str, variant: tuple[str, Any, float], measured: dict[str, Any],
         shape: dict[str, Any], run: dict[str, Any], device: Any) -> dict[str, Any]:
    """The JSON row of one backend (its keys in the order ``--json`` has always written them)."""
    cell, zoneout, recurrent_dropout = variant
    medians = measured["medians"]
    base = medians.get("torch")
    ref = medians.get("reference")
    return {
        "backend": name,
        "batch_size": batch,
        "mode": mode,
        "variant": variant_label(cell, zoneout, recurrent_dropout),
        "cell": "lstm" if name == "torch" else cell,
        "zoneout": 0.0 if name == "torch" else (list(zoneout) if isinstance(zoneout, tuple) else zoneout),
        "recurrent_dropout": 0.0 if name == "torch" else recurrent_dropout,
        "samples_per_s": medians[name],
        "samples_per_s_all": measured["rates"][name],
        "ratio_vs_torch": (medians[name] / base) if base else None,
        "ratio_vs_reference": (medians[name] / ref) if ref else None,
        "peak_memory_mib": measured["memory"][name],
        "memory_measure": memory_label(device),
        **shape,
        "ms_per_batch": 1e3 * batch / medians[name],
        "max_abs_diff_vs_torch": measured["diffs"][name],
        **run,
    }


def _steps_for(min_seconds: float, steps: Iterable[Callable[[], Any]], device: Any) -> int:
    """Steps per timed round so that every backend's round lasts ``min_seconds`` at least (0: one step)."""
    if min_seconds <= 0:
        return 1
    fastest = math.inf
    for step in steps:
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        fastest = min(fastest, time.perf_counter() - start)
    return max(1, math.ceil(min_seconds / max(fastest, 1e-6)))


def _sync(device: Any) -> None:
    """Wait for the GPU's queued work, so that a round's clock stops when its steps are done."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)
