"""The flags of ``lstmlab train``, in a module of their own that imports no torch, so that
``lstmlab train --help`` answers without loading it (``lstmlab.train`` holds the training itself)."""

from __future__ import annotations

import argparse

RECIPES = ("default", "seed", "fast", "fashion", "pixels", "permuted")  # lstmlab.train.recipe's names

DRY_RUN_ITERATIONS = 3  # a dry run's length unless --iterations says otherwise


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def zoneout_arg(text: str) -> float | list[float]:
    """--zoneout (of train and bench): one probability for both states, or Z_C,Z_H."""
    try:
        parts = [float(p) for p in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected a probability or two as Z_C,Z_H, got {text!r}")
    return parts[0] if len(parts) == 1 else parts


def _both(default: object, seed: object) -> str:
    """How a flag's default reads when the two recipes differ."""
    return f"(default: {default}; --recipe seed: {seed})" if default != seed else f"(default: {default})"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``lstmlab train``; every config flag defaults to None, meaning "as the recipe says"."""
    g = parser.add_argument_group("recipe and output")
    g.add_argument("--recipe", choices=RECIPES,
                   help="preset to start from; any flag below overrides it: default (MNIST, ~99.1%%), seed (the "
                   "textbook's), fast (30 s of training, selective backprop), fashion (Fashion-MNIST; chosen by "
                   "--dataset fashion-mnist), pixels and permuted (30 minutes, one pixel per step; chosen by --view) "
                   "(default: default)")
    g.add_argument("--out", metavar="DIR",
                   help="output folder; must be new or empty (default: runs/<dataset>-<view>-<time>)")
    g.add_argument("--overwrite", action="store_true", help="clear the run already in --out and start a new one")
    g.add_argument("--resume", metavar="RUN_DIR",
                   help="continue a stopped run from its last checkpoint, with its saved config (default: a new run)")
    g.add_argument("--dry-run", action="store_true",
                   help=f"{DRY_RUN_ITERATIONS} iterations (or --iterations) on small subsets, end to end, to check "
                   "the set-up; keeps nothing unless --out is given")
    g.add_argument("--quiet", action="store_true", help="no progress bar or log lines, only the test accuracy")
    g.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard scalars and per-gate histograms to OUT/tensorboard "
                   "(pip install 'lstmlab[tensorboard]')")
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", choices=["mnist", "fashion-mnist"], help="which images (default: mnist)")
    g.add_argument("--view", choices=["rows", "pixels", "permuted"],
                   help="rows (28 steps of 28), pixels (784 of 1) or permuted (784 of 1, fixed shuffle) "
                   "(default: rows)")
    g.add_argument("--data-dir", metavar="DIR",
                   help="folder holding the four IDX files (default: $LSTMLAB_DATA, then the cache, downloading)")
    g.add_argument("--val-size", type=_whole_number, metavar="N",
                   help="images held out of training for validation (default: 5000)")
    g.add_argument("--normalize", choices=["dataset", "seed"],
                   help="dataset (training-set mean/std) or seed ((x-0.5)/1) " + _both("dataset", "seed"))
    g.add_argument("--augment-shift", type=_whole_number, metavar="N",
                   help="shift training images randomly by up to N pixels each way, 0 = off " + _both(2, 0))
    g.add_argument("--augment-flip", action="store_true", default=None,
                   help="mirror half the training images left-right: for clothes, not digits (default: off)")
    g.add_argument("--augment-erase", type=float, metavar="P",
                   help="black out one random rectangle (2-40%% of the image) in a fraction P of the training "
                   "images, random erasing (default: 0)")
    g = parser.add_argument_group("model")
    g.add_argument("--hidden-size", type=_whole_number, metavar="H", help="hidden units per layer (default: 128)")
    g.add_argument("--layers", type=_whole_number, dest="num_layers", metavar="N",
                   help="stacked LSTM layers (default: 1)")
    g.add_argument("--bidirectional", action="store_true", default=None,
                   help="read each sequence both ways (default: off)")
    g.add_argument("--dropout", type=float, metavar="P", help="dropout between stacked layers (default: 0)")
    g.add_argument("--forget-bias", type=float, metavar="B",
                   help="added to the forget gate's bias at init, e.g. 1.0 (default: 0)")
    g.add_argument("--backend", choices=["auto", "reference", "fused", "torch"],
                   help="the LSTM's implementation: auto = fused on the CPU, torch (cuDNN) on CUDA (default: auto)")
    g.add_argument("--cell", choices=["lstm", "peephole", "layernorm"],
                   help="the LSTM cell: lstm, peephole (Gers et al.) or layernorm (Ba et al.) (default: lstm)")
    g.add_argument("--zoneout", type=zoneout_arg, metavar="Z",
                   help="in training each unit keeps its previous c and h with probability Z at each step; "
                   "Z_C,Z_H for two (default: 0)")
    g.add_argument("--recurrent-dropout", type=float, metavar="P",
                   help="dropout on the h entering the recurrent product, one mask per sequence (default: 0)")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], help="the optimizer " + _both("adam", "sgd"))
    g.add_argument("--lr", type=float, help="peak learning rate " + _both(4e-3, 0.1))
    g.add_argument("--weight-decay", type=float, metavar="WD", help="weight decay (default: 0)")
    g.add_argument("--label-smoothing", type=float, metavar="S",
                   help="train towards 1-S on the label and S spread over the classes; validation and test "
                   "losses stay plain cross-entropy (default: 0)")
    g.add_argument("--schedule", choices=["none", "onecycle", "cosine"],
                   help="learning-rate schedule " + _both("onecycle", "none"))
    g.add_argument("--batch-size", type=_whole_number, metavar="B", help="images per step " + _both(256, 100))
    g.add_argument("--epochs", type=float, metavar="E",
                   help="length in passes over the training split " + _both(10, "6000 iterations"))
    g.add_argument("--iterations", type=_whole_number, metavar="N",
                   help="length in steps; wins over --epochs " + _both("10 epochs", 6000))
    g.add_argument("--eval-every", type=_whole_number, metavar="N", help="validate every N iterations (default: 500)")
    g.add_argument("--clip", type=float, metavar="NORM",
                   help="clip the gradient norm to this " + _both(1.0, "off"))
    g.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="stop after this much training time, the schedule following the clock, e.g. 30 "
                   "(default: off)")
    g.add_argument("--select", choices=["none", "stale-loss"],
                   help="which samples a step trains on: stale-loss = after --select-warmup epochs keep each "
                   "sample with probability (percentile of its last loss) ** --select-beta; --epochs and "
                   "--iterations then count trained batches (default: none)")
    g.add_argument("--select-beta", type=float, metavar="BETA", help="selection's exponent (default: 3)")
    g.add_argument("--select-floor", type=float, metavar="Q", help="selection's least keep probability (default: 0)")
    g.add_argument("--select-warmup", type=_whole_number, metavar="E",
                   help="epochs on every sample before selection starts (default: 1)")
    g.add_argument("--seed", type=_whole_number, help="seed of init, split, shuffling and permutation (default: 125)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"],
                   help="auto = cuda when available, else cpu (default: auto)")
    g.add_argument("--threads", type=_whole_number, metavar="N",
                   help="torch threads of this process (default: torch's choice; under torchrun, the machine's cores "
                   "shared out among its processes unless OMP_NUM_THREADS is set to other than torchrun's 1)")
