"""The benchmarking library itself (:mod:`lstmlab.benchmarking`), called as Python: the grid's rows on the serving
backends and its Markdown table. No timing assertions; the command's flags are tested in
tests/commands/test_bench.py."""

from __future__ import annotations

import pytest

from lstmlab.benchmarking import format_grid, grid_benchmark


def test_grid_rows_and_table_with_the_serving_backends() -> None:
    pytest.importorskip("onnxruntime")
    grid = [("infer", 2, 3, 3, 8, 2, True), ("train", 3, 3, 2, 4, 1, False)]
    rows = grid_benchmark(backends=["fused", "torch", "int8", "onnxruntime"], repeats=1, warmup=0, min_seconds=0,
                          grid=grid)
    assert [(r["mode"], r["backend"]) for r in rows] == [("infer", b) for b in ("fused", "torch", "int8",
                                                                                 "onnxruntime")] + \
        [("train", "fused"), ("train", "torch")]
    infer_rows = {r["backend"]: r for r in rows if r["mode"] == "infer"}
    assert infer_rows["fused"]["max_abs_diff_vs_torch"] < 1e-5
    assert infer_rows["onnxruntime"]["max_abs_diff_vs_torch"] < 1e-4
    assert infer_rows["int8"]["max_abs_diff_vs_torch"] < 0.1  # int8 weights: close, not equal
    lines = format_grid(rows).splitlines()
    assert lines[0].startswith("machine: ") and "GEMM: " in lines[0]
    assert lines[1].startswith("| mode | B |") and "x nn.LSTM (onnxruntime)" in lines[1]
    assert len(lines) == 3 + 2 and lines[3].startswith("| infer | 2 | 3 | 3 | 8 | 2 | yes |")
    assert lines[4].count(" - ") == 6  # no serving backend on a training row
