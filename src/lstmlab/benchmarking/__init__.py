"""Samples/s of each LSTM backend against ``torch.nn.LSTM``, measured in the same run (``lstmlab bench`` reads it).

A training step is what ``lstmlab train`` does per batch: the LSTM of a ``SequenceClassifier`` (batch
first) + linear head on the last hidden state + cross-entropy + backward + SGD step, on random data. Every
backend gets its own copy of the same initial weights. The backends are timed in turns (A B C, B C A, ...)
so that a burst of load from other processes hits them all alike; the table gives the median of the
repeats and its ratio to ``torch`` (PyTorch's own LSTM kernel, oneDNN on CPU, cuDNN on GPU).

A variant (``cell``, ``zoneout``, ``recurrent_dropout``, or each of :data:`VARIANTS`) runs on the reference and
fused backends; its ``torch`` row is plain ``nn.LSTM`` (which has no variants), timed in turns with them, so
"x torch" is always the ratio to plain nn.LSTM, and "x ref" the ratio to the same variant on the reference backend.

Mode ``infer`` times a model as it is served: ``model.eval()`` under ``torch.inference_mode()``. :func:`grid_benchmark`
times a fixed grid of shapes (:data:`GRID`: inference from B=1, H up to 512, T up to 500, 2 layers, bidirectional,
and training steps), one table row per shape, each in its own interleaved rounds. The serving backends ``int8``
(``torch.ao.nn.quantized.dynamic.LSTM`` and Linear, int8 weights) and ``onnxruntime`` (the graph ``lstmlab export``
writes) run inference modes only, next to the same weights on nn.LSTM.

``settings`` (what can be timed; plain data) → ``steps`` (one step per backend) and ``memory`` → ``timing`` (the
interleaved rounds, one row per backend) → ``harness`` (:func:`benchmark`, :func:`grid_benchmark`) → ``tables``.
Every module imports torch on first use only, so the command's ``--help`` reads the settings without it.
"""

from __future__ import annotations

from lstmlab.benchmarking.harness import benchmark, grid_benchmark
from lstmlab.benchmarking.settings import (
    ALLOCATORS,
    BACKENDS,
    GRID,
    GRID_BACKENDS,
    INFERENCE_MODES,
    MODES,
    NAMES,
    PLAIN,
    SERVING,
    VARIANTS,
    variant_label,
)
from lstmlab.benchmarking.tables import format_grid, format_table

__all__ = ["ALLOCATORS", "BACKENDS", "GRID", "GRID_BACKENDS", "INFERENCE_MODES", "MODES", "NAMES", "PLAIN",
           "SERVING", "VARIANTS", "benchmark", "format_grid", "format_table", "grid_benchmark", "variant_label"]
