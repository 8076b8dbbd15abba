"""Which torch device a command runs on; its own module so that evaluate, predict and train all depend on it
rather than on each other."""

from __future__ import annotations

import torch

from lstmlab.errors import LstmlabError


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; asking for cuda without one is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LstmlabError("--device cuda asked for, but torch sees no CUDA GPU; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise LstmlabError(f"unknown device {name!r}; use auto, cpu or cuda") from e
