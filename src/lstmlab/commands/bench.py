"""``lstmlab bench``: samples/s of each LSTM backend against ``torch.nn.LSTM``, measured in the same run.

The flags and the printing; the harness (backends, timing in turns, the grid, the tables) is
:mod:`lstmlab.benchmarking`. ``--cell``, ``--zoneout``, ``--recurrent-dropout`` or ``--variants`` time variants on
the reference and fused backends; ``--mode infer`` times a served model; ``--grid`` times the built-in grid of shapes,
with the serving backends ``int8`` and ``onnxruntime`` in inference modes only.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lstmlab.benchmarking import (
    ALLOCATORS,
    BACKENDS,
    GRID_BACKENDS,
    SERVING,
    VARIANTS,
    benchmark,
    format_grid,
    format_table,
    grid_benchmark,
    variant_label,
)
from lstmlab.config.schema import zoneout_arg
from lstmlab.errors import LstmlabError
from lstmlab.files import atomic_write_text
from lstmlab.nn.variants import CELLS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``lstmlab bench``."""
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 1024], metavar="B",
                        help="batch sizes to time (default: 64 256 1024)")
    parser.add_argument("--seq-len", type=int, default=28, help="time steps T (28 rows; 784 for pixel MNIST)")
    parser.add_argument("--input-size", type=int, default=28, help="features per step I (28 rows; 1 pixels)")
    parser.add_argument("--hidden-size", type=int, default=128, help="hidden units H (default 128)")
    parser.add_argument("--layers", type=int, default=1, help="stacked LSTM layers (default 1)")
    parser.add_argument("--bidirectional", action="store_true", help="a bidirectional LSTM")
    parser.add_argument("--backends", nargs="+", default=None, metavar="NAME",
                        help=f"backends to time, any of {', '.join(BACKENDS + SERVING)} (default: "
                             f"{' '.join(BACKENDS)}; with --grid: {' '.join(GRID_BACKENDS)}); 'torch' is nn.LSTM's "
                             "kernel and the reference of the ratio column; int8 (torch's dynamic quantisation) "
                             "and onnxruntime (the graph `lstmlab export` writes) time inference only")
    parser.add_argument("--mode", choices=("train", "forward", "infer", "both"), default="train",
                        help="train: forward+backward+SGD step; forward: eval() under no_grad; infer: eval() under "
                             "inference_mode, as a served model; both: train and forward (default train)")
    parser.add_argument("--grid", action="store_true",
                        help="time the built-in grid of shapes (inference from B=1 to 256, H up to 512, T up to "
                             "500, 2 layers, bidirectional; training steps) instead of --batch-sizes, --seq-len, "
                             "--input-size, --hidden-size, --layers, --bidirectional and --mode")
    parser.add_argument("--min-seconds", type=float, default=None,
                        help="seconds per timed round at least (default: 0.25 with --grid, else no minimum)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per backend (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per backend first")
    parser.add_argument("--min-samples", type=int, default=2048,
                        help="samples per timed round at least (more steps per round at small batches)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto = cuda when available, else cpu")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: elapsed time (default); cpu: this process's CPU time, steadier on a machine "
                             "shared with other jobs when --threads 1")
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                        help="write the rows as JSON to PATH (or stdout instead of the table without PATH) "
                        "(default: the table only)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and data")
    parser.add_argument("--allocator", choices=ALLOCATORS, default="default",
                        help="default: glibc malloc as it comes; warm: keep freed big blocks in the heap "
                             "(mallopt), as jemalloc or tcmalloc would, so that no backend pays fresh "
                             "page faults for its large temporaries every step (default: default)")
    g = parser.add_argument_group("LSTM variants (reference and fused backends; the torch rows stay plain nn.LSTM)")
    g.add_argument("--cell", choices=CELLS, default="lstm",
                   help="the cell: lstm, peephole or layernorm (default: lstm)")
    g.add_argument("--zoneout", type=zoneout_arg, default=0.0, metavar="Z",
                   help="zoneout probability, or Z_C,Z_H for the cell and the hidden state (default: 0)")
    g.add_argument("--recurrent-dropout", type=float, default=0.0, metavar="P",
                   help="recurrent dropout, one mask per sequence (default: 0)")
    g.add_argument("--variants", action="store_true",
                   help="time each of: " + ", ".join(variant_label(*v) for v in VARIANTS)
                   + " (instead of the one --cell/--zoneout/--recurrent-dropout give)")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark and print the table (or JSON)."""
    from lstmlab.files import check_writable

    if args.json not in (None, "-"):
        check_writable(args.json, "--json")  # before the minutes of timing, not after
    if args.variants and (args.cell != "lstm" or args.zoneout or args.recurrent_dropout):
        raise LstmlabError("--variants times its own list; leave out --cell, --zoneout and --recurrent-dropout")
    variants = list(VARIANTS) if args.variants else [(args.cell, args.zoneout, args.recurrent_dropout)]
    if args.grid:
        if args.variants or args.cell != "lstm" or args.zoneout or args.recurrent_dropout:
            raise LstmlabError("--grid times the plain cell; leave out --variants, --cell, --zoneout and "
                               "--recurrent-dropout")
        rows = grid_benchmark(backends=args.backends or list(GRID_BACKENDS), repeats=args.repeats,
                              warmup=args.warmup, min_seconds=0.25 if args.min_seconds is None else args.min_seconds,
                              threads=args.threads, seed=args.seed, clock=args.clock, allocator=args.allocator)
        return _emit(args, rows, format_grid)
    rows = benchmark(
        batch_sizes=args.batch_sizes,
        seq_len=args.seq_len,
        input_size=args.input_size,
        hidden_size=args.hidden_size,
        layers=args.layers,
        backends=args.backends or list(BACKENDS),
        mode=args.mode,
        repeats=args.repeats,
        warmup=args.warmup,
        min_samples=args.min_samples,
        threads=args.threads,
        device=_device_name(args.device),
        seed=args.seed,
        clock=args.clock,
        variants=variants,
        allocator=args.allocator,
        bidirectional=args.bidirectional,
        min_seconds=args.min_seconds or 0.0,
    )
    return _emit(args, rows, format_table)


def _emit(args: argparse.Namespace, rows: list[dict[str, Any]], table: Callable[[list[dict[str, Any]]], str]) -> int:
    """Print the rows as a table (or JSON to stdout), and write them to --json PATH."""
    from lstmlab.files import os_error

    if args.json == "-":
        print(json.dumps(rows, indent=2))
        return 0
    print(table(rows))
    if args.json:
        try:
            atomic_write_text(Path(args.json), json.dumps(rows, indent=2) + "\n")
        except LstmlabError:  # already one line (files words its own OS errors)
            raise
        except OSError as e:
            raise os_error(e, args.json, "write") from None
    return 0



def _device_name(name: str) -> str:
    """``auto`` -> cuda when torch sees a GPU, else cpu (as every lstmlab command reads --device)."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"

