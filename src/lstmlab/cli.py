"""The ``lstmlab`` command: one sub-command per module, each module giving
``add_arguments(parser)`` and ``run(args) -> int``; modules are imported only when used."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

from lstmlab.errors import LstmlabError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("lstmlab.train", "train a sequence classifier (downloads the data if needed)"),
    "evaluate": ("lstmlab.evaluate", "test loss, accuracy, per-class accuracy and confusion matrix"),
    "bench": ("lstmlab.bench", "samples/s of each LSTM backend against nn.LSTM"),
    "predict": ("lstmlab.predict", "classify your own images of digits"),
    "gates": ("lstmlab.gates", "draw the gate activations of a model reading one image"),
    "plot": ("lstmlab.plots", "loss/accuracy curves, confusion matrix and mistakes of a run"),
    "export": ("lstmlab.export", "write a trained classifier as ONNX (runs in onnxruntime)"),
    "demo": ("lstmlab.demo", "draw a digit in the browser and watch the LSTM read it"),
}


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag gives one line (what is wrong, where to look), not the usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The full parser; each sub-command's module adds its own arguments."""
    from lstmlab import __version__

    parser = _Parser(prog="lstmlab", description="A gate-level LSTM lab on sequential MNIST.")
    parser.add_argument("--version", action="version", version=f"lstmlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            if e.name != module_name:  # a real bug inside the module, not a command not built yet
                raise
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lstmlab`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args._run(args)
    except LstmlabError as e:
        print(f"lstmlab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lstmlab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
