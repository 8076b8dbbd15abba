"""What the run-folder tests read: checkpoint weights, and the state file of a run still going."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from lstmlab.runs import load_state


def weights(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors."""
    return load_file(str(path))


def assert_same_weights(a: Path, b: Path) -> None:
    """Two checkpoints hold the same tensors, bit for bit."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def wait_for_state(run_dir: Path, proc: subprocess.Popen, past: int = 0, timeout: float = 300.0) -> int:
    """Poll until the run's state file records an iteration beyond ``past``; returns that iteration."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before it could be stopped"
        try:
            saved = load_state(run_dir)
        except Exception:  # the file may be replaced while it is read
            saved = None
        if saved is not None and saved[1]["iteration"] > past:
            return saved[1]["iteration"]
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")
