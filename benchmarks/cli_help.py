"""How long `lstmlab --help` (and a bare `lstmlab`, and `lstmlab train --help`) take, each in a fresh process.

The top-level help imports no command module and so no torch (issue 11 asked for <= 0.5 s; it took ~2 s when
torch was imported eagerly). Run: ``python benchmarks/cli_help.py [--repeats N]``; prints the median and the
slowest of N runs per command line. A timing, not a test: the tests check only that help imports no torch.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = (["--help"], [], ["train", "--help"])


def time_command(args: list[str], repeats: int) -> list[float]:
    """Wall seconds of ``python -m lstmlab ARGS`` in a fresh interpreter, ``repeats`` times."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "lstmlab", *args], stdout=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    """Print one line per command line: median and max seconds."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="runs per command line (default: 10)")
    args = parser.parse_args()
    for command in COMMANDS:
        times = time_command(command, args.repeats)
        shown = "lstmlab " + " ".join(command) if command else "lstmlab"
        print(f"{shown:<24} median {statistics.median(times):.3f} s, max {max(times):.3f} s ({args.repeats} runs)")


if __name__ == "__main__":
    main()
