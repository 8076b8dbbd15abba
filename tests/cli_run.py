"""Running ``lstmlab`` in-process for the CLI tests: exit code, stdout and stderr of one command."""

from __future__ import annotations

import pytest

from lstmlab.cli import main


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``lstmlab ARGV...`` in this process; argparse's SystemExit becomes the exit code."""
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse exits on bad flags
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err
