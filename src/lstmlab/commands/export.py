"""``lstmlab export``: the classifier of a run or checkpoint as an ONNX file (``lstmlab.onnxfile``)."""

from __future__ import annotations

import argparse

from lstmlab.errors import LstmlabError
from lstmlab.onnxfile import OPSET, export_onnx


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``lstmlab export``."""
    parser.add_argument("checkpoint", metavar="RUN",
                        help="a run folder written by `lstmlab train` (its best.safetensors) or any checkpoint")
    parser.add_argument("output", help="the .onnx file to write (run it with `lstmlab predict OUTPUT IMAGE`)")


def run(args: argparse.Namespace) -> int:
    """``lstmlab export``: the classifier of a run or checkpoint as an ONNX file."""
    from lstmlab.checkpoint import load_checkpoint
    from lstmlab.runs import checkpoint_path

    if not str(args.output).endswith(".onnx"):
        raise LstmlabError(f"the output {args.output} should end in .onnx")
    ckpt = load_checkpoint(checkpoint_path(args.checkpoint))
    err = export_onnx(ckpt, args.output)
    print(f"Wrote {args.output}: ONNX opset {OPSET}, input x (batch, T, I), output logits; "
          f"onnxruntime agrees with the checkpoint to {err:.1e}")
    return 0
