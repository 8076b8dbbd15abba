"""``lstmlab plot RUN_DIR``: a run's figures (curves, confusion matrix, mistakes), drawn by
``lstmlab.analysis.figures``."""

from __future__ import annotations

import argparse

from lstmlab.errors import LstmlabError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``lstmlab plot``."""
    parser.add_argument("run_dir", metavar="RUN",
                        help="a run folder written by `lstmlab train`, or any checkpoint in it")
    parser.add_argument("--out-dir", metavar="DIR", help="where to write the PNGs (default: the run folder)")
    parser.add_argument("--data-dir", metavar="DIR",
                        help="folder holding the dataset's IDX files, for the mistakes figure (default: the run's "
                        "own data folder, else $LSTMLAB_DATA, else the cache)")
    parser.add_argument("--max-mistakes", type=int, default=48, metavar="N", help="misclassified digits to show")


def run(args: argparse.Namespace) -> int:
    """``lstmlab plot``: the run's figures; a note on stderr for each one skipped."""
    import sys

    if args.max_mistakes < 1:
        raise LstmlabError(f"--max-mistakes must be at least 1, got {args.max_mistakes}")
    notes: list[str] = []
    from lstmlab.analysis.figures import plot_run

    for path in plot_run(args.run_dir, args.out_dir, args.data_dir, args.max_mistakes, notes):
        print(f"wrote {path}")
    for note in notes:
        print(f"lstmlab plot: note: {note}", file=sys.stderr)
    return 0
