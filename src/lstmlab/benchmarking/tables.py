"""The benchmark's rows as text: :func:`format_table` (plain text, one line per backend and batch size) and
:func:`format_grid` (Markdown, one line per shape of the grid, under a header naming the machine and the GEMM)."""

from __future__ import annotations

from typing import Any

from lstmlab.benchmarking.settings import NAMES, SERVING


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of benchmark rows."""
    if not rows:
        return "(no results)"
    first = rows[0]
    lines = [
        f"LSTM T={first['seq_len']} I={first['input_size']} H={first['hidden_size']} layers={first['layers']} "
        f"device={first['device']} threads={first['threads']} clock={first.get('clock', 'wall')} "
        f"allocator={first.get('allocator', 'default')}; "
        "samples/s = median of repeats; "
        f"x torch = ratio to plain nn.LSTM in this run; x ref = ratio to the same variant on the reference backend; "
        f"memory = {first['memory_measure']}"
        + (f"; fused step loops: {first['fused_loops']}" if first.get("fused_loops") else "")
        + (f"; machine: {first['machine']}" if first.get("machine") else ""),
        f"{'backend':<10} {'B':>6} {'mode':<8} {'samples/s':>11} {'x torch':>8} {'x ref':>8} {'peak MiB':>9}  variant",
    ]

    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}x"

    for row in rows:
        mem = "n/a" if row["peak_memory_mib"] is None else f"{row['peak_memory_mib']:.1f}"
        variant = "nn.LSTM" if row["backend"] == "torch" else row.get("variant", "lstm")
        lines.append(f"{row['backend']:<10} {row['batch_size']:>6} {row['mode']:<8} "
                     f"{row['samples_per_s']:>11.0f} {ratio(row['ratio_vs_torch']):>8} "
                     f"{ratio(row.get('ratio_vs_reference')):>8} {mem:>9}  {variant}")
    return "\n".join(lines)


def format_grid(rows: list[dict[str, Any]]) -> str:
    """The grid's rows as a Markdown table, one line per shape: each backend's ms per batch and its ratio to nn.LSTM
    (> 1: faster), under a header naming the machine, the matmuls and how it was timed."""
    if not rows:
        return "(no results)"
    first = rows[0]
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    header = (f"machine: {first.get('machine', '?')}; GEMM: lstmlab's float32 matmuls "
              f"{(first.get('fused_loops') or 'not timed').replace('native, float32 matmuls ', '')}, nn.LSTM "
              f"torch's own CPU kernel; clock={first['clock']} allocator={first.get('allocator', 'default')}; "
              "ms = median of the rounds per batch; x = nn.LSTM's time / this backend's, same run")
    cols = ["mode", "B", "T", "I", "H", "layers", "bidir"]
    for b in backends:
        cols += [f"{NAMES[b]} ms"] + ([f"x nn.LSTM ({NAMES[b]})"] if b != "torch" else [])
        cols += [f"max abs diff ({NAMES[b]})"] if b in SERVING else []
    lines = [header, "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    shapes: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in rows:
        key = (r["mode"], r["batch_size"], r["seq_len"], r["input_size"], r["hidden_size"], r["layers"],
               r.get("bidirectional", False))
        shapes.setdefault(key, {})[r["backend"]] = r
    for (mode, *shape, bidir), group in shapes.items():
        cells = [mode, *(str(v) for v in shape), "yes" if bidir else "no"]
        for b in backends:
            r = group.get(b)
            cells.append("-" if r is None else f"{r['ms_per_batch']:.2f}")
            if b != "torch":
                ratio = None if r is None else r["ratio_vs_torch"]
                cells.append("-" if ratio is None else f"{ratio:.2f}x")
            if b in SERVING:  # the logits' largest difference from nn.LSTM's, same weights and inputs
                diff = None if r is None else r.get("max_abs_diff_vs_torch")
                cells.append("-" if diff is None else f"{diff:.1e}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
