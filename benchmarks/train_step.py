"""Training-step throughput of lstmlab's LSTM backends against torch.nn.LSTM, measured in one run.

    python benchmarks/train_step.py                      # H=128, T=28, B = 64 256 1024, all backends
    python benchmarks/train_step.py --threads 1 --repeats 9
    python benchmarks/train_step.py --seq-len 784 --input-size 1 --batch-sizes 128   # pixel MNIST

A step = SequenceClassifier forward (LSTM + linear head) + cross-entropy + backward + SGD. Backends take
turns so that load from other processes hits all of them; the ratio column is against nn.LSTM.
"""

from __future__ import annotations

import argparse
import sys

from lstmlab.commands import bench


def main(argv: list[str] | None = None) -> int:
    """Parse the flags of ``lstmlab bench`` (same defaults) and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.add_arguments(parser)
    args = parser.parse_args(argv)
    return bench.run(args)


if __name__ == "__main__":
    sys.exit(main())
