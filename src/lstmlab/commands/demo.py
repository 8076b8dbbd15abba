"""Draw a digit in the browser and watch the LSTM read it: ``lstmlab demo CHECKPOINT``.

The flags; the page and its core are :mod:`lstmlab.demo`. The app binds 127.0.0.1 by default and never creates a
public share link.
"""

from __future__ import annotations

import argparse

from lstmlab.errors import LstmlabError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``lstmlab demo``."""
    parser.add_argument("checkpoint", help="a .safetensors checkpoint written by `lstmlab train`")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")


def run(args: argparse.Namespace) -> int:
    """Check the flags and gradio, load the checkpoint, then serve the demo until Ctrl+C."""
    if not 0 < args.port < 65536:
        raise LstmlabError(f"--port must be in 1..65535, got {args.port}")
    from lstmlab.checkpoint import load_checkpoint
    from lstmlab.demo import app

    app.require_gradio()  # the hint comes before loading anything
    ckpt = load_checkpoint(args.checkpoint)  # a damaged or hostile checkpoint is refused before anything is served
    app.serve(ckpt, args.host, args.port)
    return 0
