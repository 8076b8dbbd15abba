"""The ``lstmlab`` command: one sub-command per module, each module giving
``add_arguments(parser)`` and ``run(args) -> int``. Only the command being run is imported, so that
``lstmlab --help`` (and a bare ``lstmlab``) answer without importing torch."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from lstmlab.errors import LstmlabError

VERSION = "0.1.0"  # kept equal to lstmlab.__version__ by a test; read here without importing torch

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("lstmlab.commands.train", "train a sequence classifier (downloads the data if needed)"),
    "evaluate": ("lstmlab.commands.evaluate", "loss, accuracy, per-class accuracy and confusion matrix on a split"),
    "bench": ("lstmlab.commands.bench", "samples/s of each LSTM backend against nn.LSTM"),
    "predict": ("lstmlab.commands.predict", "classify your own images of digits"),
    "gates": ("lstmlab.commands.gates", "draw the gate activations of a model reading one image"),
    "plot": ("lstmlab.commands.plot", "loss/accuracy curves, confusion matrix and mistakes of a run"),
    "export": ("lstmlab.commands.export", "write a trained classifier as ONNX (runs in onnxruntime)"),
    "demo": ("lstmlab.commands.demo", "draw a digit in the browser and watch the LSTM read it"),
}

# commands whose flags live in a torch-free module of their own, so that `lstmlab COMMAND --help` is quick
ARGUMENTS: dict[str, str] = {"train": "lstmlab.config.flags"}

EPILOG = """examples:
  lstmlab train --data-dir /path/to/mnist     train the default recipe, saving runs/<dataset>-<view>-<time>/
  lstmlab evaluate runs/X                     test accuracy of a run's best checkpoint
  lstmlab plot runs/X                         curves, confusion matrix, mistakes
  lstmlab gates runs/X --index 0              the gates of one test digit
  lstmlab demo runs/X                         draw digits in the browser

`lstmlab COMMAND --help` lists a command's options."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows every option's default after its help (unless the help already states it); switches are off
    unless given, so they show none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "default" in text or default is None or default is argparse.SUPPRESS
                or isinstance(default, bool)):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {str(shown).replace('%', '%%')})"


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag gives one line (what is wrong, where to look), not the usage dump."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> NoReturn:
        if os.environ.get("WORLD_SIZE") and os.environ.get("RANK", "0").strip() not in ("", "0"):
            self.exit(2)  # one of torchrun's processes other than rank 0: rank 0 says it, once for the job
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _chosen(argv: Sequence[str]) -> str | None:
    """The command named in ``argv`` (its first word that is not an option), if it is one."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def _upper_positionals(parser: argparse.ArgumentParser) -> None:
    """Positional arguments are shown in capitals in every command (CHECKPOINT, IMAGE, RUN_DIR)."""
    for action in parser._actions:
        if not action.option_strings and not isinstance(action, argparse._SubParsersAction):
            action.metavar = (action.metavar or action.dest).upper()


def _runner(module_name: str) -> Callable[[argparse.Namespace], int]:
    """The command's ``run``, its module imported only when the command runs (not for --help)."""

    def run(args: argparse.Namespace) -> int:
        return importlib.import_module(module_name).run(args)

    return run


def build_parser(commands: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; the options of ``commands`` (default: all) are added by importing their modules, the
    others are listed by name only."""
    wanted = list(COMMANDS) if commands is None else list(commands)
    parser = _Parser(prog="lstmlab", description="A gate-level LSTM lab on sequential MNIST.", epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"lstmlab {VERSION}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        if name not in wanted:
            continue
        try:
            module = importlib.import_module(ARGUMENTS.get(name, module_name))
        except ImportError as e:
            if e.name != module_name:  # a real bug inside the module, not a command not built yet
                raise
            continue
        module.add_arguments(p)
        _upper_positionals(p)
        p.set_defaults(_run=_runner(module_name))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lstmlab`` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _chosen(argv)
    parser = build_parser([command] if command else [])
    if not argv:  # a bare `lstmlab`: what it can do, not an error
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.error("name a command: " + ", ".join(COMMANDS))
    try:
        return args._run(args)
    except LstmlabError as e:
        print(f"lstmlab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        lead = "\n" if sys.stderr.isatty() else ""  # a terminal has just echoed ^C: start a line of our own
        print(f"{lead}lstmlab {args.command}: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """The console script and ``python -m lstmlab``: :func:`main`, then exit with its status. A process of a
    torchrun job (WORLD_SIZE > 1) leaves with ``os._exit`` once its output is flushed: its process group is gone by
    then, but a gloo worker thread can still drop Python tensors a moment later, and if the interpreter is shutting
    down it aborts the process (SIGABRT, "terminate called without an active exception"; seen in CI)."""
    code = main()
    if os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1"):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
