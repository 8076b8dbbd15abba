"""Checkpoints as safetensors files: tensors plus the JSON config in the metadata, so loading
never unpickles code and a model is rebuilt from the file alone."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lstmlab.config import Config
from lstmlab.errors import LstmlabError
from lstmlab.fileio import atomic_write_bytes
from lstmlab.model import SequenceClassifier

FORMAT = "lstmlab-checkpoint"
FORMAT_VERSION = "1"


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (in eval mode), its config, the pixel permutation if any."""

    model: SequenceClassifier
    config: Config
    permutation: Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(
    path: Path,
    model: SequenceClassifier,
    config: Config,
    permutation: Tensor | None = None,
    meta: dict[str, Any] | None = None,
) -> None:
    """Save model weights, config and permutation into one safetensors file, atomically."""
    from safetensors.torch import save

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if permutation is not None:
        tensors["permutation"] = permutation.cpu().contiguous()
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": json.dumps(config.to_dict()),
        "meta": json.dumps(meta or {}),
    }
    atomic_write_bytes(Path(path), save(tensors, metadata=metadata))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint written by ``save_checkpoint``; anything else is a one-line LstmlabError."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise LstmlabError(f"checkpoint {path} does not exist; pass the .safetensors file a training run wrote")
    try:
        data = path.read_bytes()
        tensors = load(data)
        header_len = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__", {})
    except (SafetensorError, ValueError, OSError, UnicodeDecodeError) as e:
        raise LstmlabError(f"{path} is not a readable lstmlab checkpoint (safetensors: {e})") from e
    if metadata.get("format") != FORMAT:
        raise LstmlabError(f"{path} is a safetensors file but not an lstmlab checkpoint (no lstmlab metadata)")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise LstmlabError(
            f"{path} has checkpoint format {metadata.get('format_version')!r}; this lstmlab reads {FORMAT_VERSION!r}"
        )
    try:
        config = Config.from_dict(json.loads(metadata["config"]))
        meta = json.loads(metadata.get("meta", "{}"))
    except (KeyError, json.JSONDecodeError) as e:
        raise LstmlabError(f"{path}: the checkpoint's config is damaged ({e})") from e
    model = SequenceClassifier(config.model)
    state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise LstmlabError(f"{path}: weights do not match the saved config ({first})") from e
    model.to(map_location).eval()
    permutation = tensors.get("permutation")
    return Checkpoint(model=model, config=config, permutation=permutation, meta=meta)
